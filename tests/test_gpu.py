"""The CUDA/NCCL path end to end: the real `python job.py`, one NCCL rank per visible GPU on every
site. It runs where torch sees a GPU and is skipped elsewhere; test_job.py covers the CPU path."""

import os

import pytest

from conftest import GPUS, assert_clean, assert_learns, round_metrics, run_job
from results import JOB_NAME

pytestmark = pytest.mark.skipif(GPUS == 0, reason="no CUDA device is visible; the NCCL end-to-end run needs a GPU")


def test_every_site_trains_on_the_gpus_with_nccl(synthetic_root, tmp_path):
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", "3", "--nproc_per_node", str(GPUS), "--data_root", synthetic_root,
        "--workspace", workspace, "--master_port", "7850", gpus=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = round_metrics(workspace)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"] for r in rounds)
    for site in ("site-1", "site-2"):
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            assert f"{site}: {GPUS} rank(s), backend nccl on cuda\n" in f.read()
    assert_learns(rounds)
    assert_clean(workspace)

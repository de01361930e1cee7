"""The CUDA/NCCL path end to end: the real `python job.py` on this machine's GPUs. It runs where torch sees a GPU
and is skipped elsewhere; test_job.py and test_gpu_plan.py cover the CPU path and the placement."""

import os
import re
import time

import pytest

from conftest import GPUS, assert_clean, assert_learns, free_ports, processes_of, round_metrics, run_job
from job import JOB_NAME
from local_run.results import log_times

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(GPUS == 0, reason="no CUDA device is visible; the NCCL end-to-end runs need a GPU"),
]


def test_every_site_trains_on_its_own_gpus_with_nccl(synthetic_root, tmp_path):
    # As a user runs it: job.py picks the ranks and deals the GPUs; on one GPU, both sites share it.
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", "3", "--data_root", synthetic_root, "--workspace", workspace,
        "--master_port", str(free_ports(2)), gpus=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = 1 if GPUS < 4 else 2
    first = ",".join(str(i) for i in range(ranks))
    second = first if GPUS == 1 else ",".join(str(i) for i in range(ranks, 2 * ranks))
    assert f"site-1: {ranks} rank(s) on GPU(s) {first}" in result.stdout
    assert f"site-2: {ranks} rank(s) on GPU(s) {second}" in result.stdout
    rounds = round_metrics(workspace)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"] for r in rounds)
    devices = {}
    for site in ("site-1", "site-2"):
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            log = f.read()
        assert f"{site}: {ranks} rank(s), backend nccl on cuda\n" in log
        devices[site] = set(re.findall(rf"{site} rank \d: cuda:\d = [^,]+, (GPU-[0-9a-f-]+)", log))
        assert len(devices[site]) == ranks  # a physical GPU of its own for each rank
    assert (devices["site-1"] == devices["site-2"]) == (GPUS == 1)  # shared only where there is one GPU
    assert_learns(rounds)
    assert_clean(workspace)


@pytest.mark.skipif(GPUS < 2, reason="a stuck NCCL rank needs a site of 2 NCCL ranks, so 2 GPUs")
def test_a_stuck_nccl_rank_ends_its_site_within_the_stall_timeout(synthetic_root, tmp_path):
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", "2", "--nproc_per_node", "2", "--stall_timeout", "10", "--data_root", synthetic_root,
        "--workspace", workspace, "--master_port", str(free_ports(2)), timeout=300, gpus=True,
        DDP_EXAMPLE_FAULT="site-2:1:1:stop",
    )  # fmt: skip
    ended = time.time()
    assert result.returncode == 1, result.stderr[-3000:]
    stopped = log_times(os.path.join(workspace, JOB_NAME, "site-2", "log.txt"), "injecting fault")
    assert stopped and ended - stopped[0] < 10 + 60
    assert "ERROR: the job stopped in round 1 of 2: site-2" in result.stderr
    assert processes_of(workspace) == []

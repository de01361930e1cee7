import os
import subprocess
import sys

import pytest
import torch

from client import choose_backend, parse_args
from conftest import ROOT, venv_env


def test_nccl_on_own_gpu_when_every_rank_has_one():
    assert choose_backend(gpus=4, local_rank=2, local_world_size=4) == ("nccl", torch.device("cuda", 2), None)


def test_gloo_on_cpu_without_gpus():
    backend, device, why = choose_backend(gpus=0, local_rank=1, local_world_size=2)
    assert (backend, device.type) == ("gloo", "cpu") and "no CUDA device" in why


def test_gloo_on_cpu_when_ranks_outnumber_gpus_says_how_to_fix():
    backend, device, why = choose_backend(gpus=1, local_rank=0, local_world_size=2)
    assert (backend, device.type) == ("gloo", "cpu") and "--nproc_per_node to 1" in why


@pytest.mark.parametrize(
    "bad", [["--batch_size", "0"], ["--epochs", "-1"], ["--lr", "0"], ["--lr", "abc"], ["--site", "site-9"]]
)
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        parse_args(["--site", "site-1", "--sites", "site-1,site-2", *bad])
    assert e.value.code == 2


def test_trainer_under_torchrun_names_prepare_data_when_data_is_missing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--log-dir=/dev/null",
            os.path.join(ROOT, "client.py"),
            "--data_root",
            str(tmp_path),
            "--site",
            "site-1",
            "--sites",
            "site-1",
        ],
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"site-1 rank {rank}: ERROR: no CIFAR-10 in {tmp_path}" in result.stderr
    assert "run: bash prepare_data.sh" in result.stderr

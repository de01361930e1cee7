import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from protocol import TRAINING_FLAGS, rank_line, rank_line_pattern, train_args


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--epochs", "3", "--batch_size", "16", "--lr", "0.5", "--alpha", "0.3", "--seed", "7", "--use_tracking"],
        ["--data_root", "/data/cifar"],
        ["--data_root", "/data/my set's über data"],  # NVFlare splits the arguments as a shell would
        ["--momentum", "0", "--max_grad_norm", "0", "--warmup_rounds", "3", "--stall_timeout", "30", "--no_augment"],
    ],
)
def test_every_training_flag_reaches_the_trainer_unchanged(flags):
    import client
    import job

    job_args = job.parse_args(flags)
    trainer_args = client.parse_args(
        shlex.split(train_args(job_args)) + ["--site", "site-1", "--sites", "site-1,site-2"]
    )
    for name in TRAINING_FLAGS:
        assert getattr(trainer_args, name) == getattr(job_args, name), name


def test_job_does_not_import_the_trainer():
    code = "import sys, job; print('client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr[-2000:]


def test_rank_lines_are_read_back_as_written():
    line = rank_line("site-2", 1, "ERROR", "RuntimeError: boom")
    match = re.search(rank_line_pattern("site-2", "ERROR"), f"noise\n{line}\nmore")
    assert match.groups() == ("1", "RuntimeError: boom")
    assert not re.search(rank_line_pattern("site-1", "ERROR"), line)

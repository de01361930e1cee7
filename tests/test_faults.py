"""Faults mid-job: `python job.py` must end non-zero, name the site and rank, keep the last good
global model, and leave no process behind.

client.py reads a test-only switch, DDP_EXAMPLE_FAULT=SITE:RANK:ROUND:KIND, with KIND one of
kill (SIGKILL that rank), raise (an exception in training) or kill_torchrun (SIGKILL the site's torchrun).
"""

import os
import time

import pytest

from conftest import processes_of, run_job
from model import load_global_model
from results import JOB_NAME


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("site-2:1:1:kill", "site-2 rank 1 failed (exit code -9 (SIGKILL))"),
        ("site-1:0:1:raise", "site-1 rank 0: ERROR: RuntimeError: injected fault"),
        ("site-2:0:1:kill_torchrun", "site-2's torchrun ended (rc=-9) before it sent a result"),
    ],
)
def test_fault_stops_the_job_and_names_the_cause(fault, cause, synthetic_root, tmp_path):
    workspace = str(tmp_path)
    started = time.monotonic()
    result = run_job(
        "--num_rounds",
        "3",
        "--data_root",
        synthetic_root,
        "--workspace",
        workspace,
        "--master_port",
        "7830",
        timeout=300,
        DDP_EXAMPLE_FAULT=fault,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stderr[-3000:]
    assert elapsed < 120
    assert "ERROR: the job stopped in round 1 of 3: " + cause in result.stderr
    assert processes_of(workspace) == []
    # Round 0 finished before the fault, so its global model is on disk and loads.
    load_global_model(os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt"))

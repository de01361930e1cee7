import glob
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import JOB_NAME, log_times, metric, read_rounds  # noqa: E402

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def venv_env(gpus: bool = False, **extra) -> dict:
    """The environment a user has after activating the venv: its bin first on PATH.

    The processes a test starts see no GPU unless it asks for them: the tests of the CPU path make
    that path happen on any machine, with or without GPUs."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def run_job(*args, timeout=600, gpus=False, **env) -> subprocess.CompletedProcess:
    """The real `python job.py ARGS`, as a user runs it from this folder (on the CPU unless gpus=True)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "job.py"), *args],
        cwd=ROOT,
        env=venv_env(gpus, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def processes_of(path: str) -> list[str]:
    """Live processes that belong to a run: their command line names `path`, or they work inside it."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if int(pid) != os.getpid() and (path in cmdline or cwd.startswith(path)):
            found.append(f"{pid}: {cmdline}")
    return found


def processes_left(path: str, grace: float = 30.0) -> list[str]:
    """processes_of(path), after giving stragglers `grace` seconds to exit."""
    deadline = time.monotonic() + grace
    while processes_of(path) and time.monotonic() < deadline:
        time.sleep(1)
    return processes_of(path)


class WritesMarker:
    """Pickled, it makes the unpickler create the file `marker`: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def wait_for_log_lines(path: str, text: str, count: int, timeout: float) -> None:
    """Wait until `count` timestamped lines of the log at `path` (any that matches the glob) hold `text`."""
    deadline = time.monotonic() + timeout
    while sum(len(log_times(p, text)) for p in glob.glob(path)) < count:
        assert time.monotonic() < deadline, f"no {count} '{text}' lines in {path}"
        time.sleep(0.2)


def round_metrics(workspace: str) -> list[dict]:
    """round_metrics.jsonl of a simulator run under `workspace`."""
    return read_rounds(os.path.join(workspace, JOB_NAME, "server", "simulate_job"))


def assert_learns(rounds: list[dict]) -> None:
    """Global accuracy climbs well above chance (0.1) over the rounds."""
    first, last = (metric(r["aggregated_metrics"], "accuracy") for r in (rounds[0], rounds[-1]))
    assert last > 0.5 and last > first + 0.3, (first, last)


def assert_clean(workspace: str) -> None:
    """What a successful run leaves: no traceback or error in any log, and no process."""
    logs = [
        p for p in glob.glob(os.path.join(workspace, "**", "*.txt"), recursive=True) if "log" in os.path.basename(p)
    ]
    assert logs
    for path in logs:
        with open(path) as f:
            log = f.read()
        assert "Traceback" not in log and " - ERROR - " not in log and "ERROR:" not in log, path
        assert "terminate called" not in log, path  # a rank that aborted while exiting
    assert processes_of(workspace) == []


def prepared_root(tmp_path_factory, flag: str) -> str:
    """A data root holding a synthetic stand-in, written by the real `prepare_data.sh FLAG`."""
    root = str(tmp_path_factory.mktemp("data"))
    subprocess.run(
        ["bash", os.path.join(ROOT, "prepare_data.sh"), flag],
        env=venv_env(DATA_ROOT=root),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    return prepared_root(tmp_path_factory, "--synthetic")


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> str:
    return prepared_root(tmp_path_factory, "--synthetic-small")

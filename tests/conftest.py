import contextlib
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from job import JOB_NAME  # noqa: E402
from local_run.results import log_times, metric, read_rounds  # noqa: E402
from protocol import TRAINING_FLAGS  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "e2e: a real run of job.py or of NVFlare's CLI (the full tier; `-m 'not e2e'` leaves them out)"
    )


GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")
POC_WORKSPACE = "/tmp/nvflare/poc"
POC_PROJECT = os.path.join(POC_WORKSPACE, "example_project", "prod_00")  # a folder per participant
ADMIN_KIT = os.path.join(POC_PROJECT, "admin@nvidia.com")


INJECT_FAULT = os.path.join(ROOT, "tests", "inject_fault")  # read its sitecustomize.py for DDP_EXAMPLE_FAULT


def venv_env(gpus: bool = False, **extra) -> dict:
    """The environment a user has after activating the venv: its bin first on PATH.

    The processes a test starts see no GPU unless it asks for them: the tests of the CPU path make
    that path happen on any machine, with or without GPUs. With DDP_EXAMPLE_FAULT, the trainers
    fail on cue (tests/inject_fault)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    if env.get("DDP_EXAMPLE_FAULT"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [INJECT_FAULT, env.get("PYTHONPATH")]))
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


def nvflare(*args, timeout=300, cwd=None, **env) -> subprocess.CompletedProcess:
    """The real `nvflare ARGS` CLI."""
    return subprocess.run(
        [NVFLARE, *args], env=venv_env(**env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def poc_system(log_dir, env_of: dict[str, dict] | None = None):
    """A POC system of a server and site-1, site-2, started with the CLI as a user would: each participant with
    `nvflare poc start -p NAME` and its own environment (env_of[NAME], if any). Stopped and cleaned whatever
    happens; yields the admin's startup kit."""
    assert not os.path.exists(POC_WORKSPACE), "a POC workspace exists already; refusing to touch it"
    prepared = nvflare("poc", "prepare", "-n", "2", "--force", cwd=log_dir, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    try:
        for name in ("server", "site-1", "site-2"):
            started = nvflare("poc", "start", "-p", name, cwd=log_dir, timeout=120, **(env_of or {}).get(name, {}))
            assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 120
        while nvflare("job", "list", "--startup-kit", ADMIN_KIT, timeout=60).returncode != 0:
            assert time.monotonic() < deadline, "the POC server did not come up within 120 s"
            time.sleep(3)
        yield ADMIN_KIT
    finally:
        nvflare("poc", "stop", cwd=log_dir, timeout=120)
        left = processes_left(POC_WORKSPACE)
        for line in left:  # do not leave them running for the next test, whatever it asserts
            with contextlib.suppress(ProcessLookupError):  # it may have ended since
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
        cleaned = nvflare("poc", "clean", cwd=log_dir, timeout=60)
    assert left == [], "POC processes outlived `nvflare poc stop`"
    assert not os.path.exists(POC_WORKSPACE), cleaned.stdout + cleaned.stderr


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


def site_weight(shard: int) -> int:
    """The FedAvg weight a site reports for a round: the samples it trained, every sample of its shard in every
    local epoch (at the defaults), however many ranks it has."""
    return TRAINING_FLAGS["epochs"]["default"] * shard


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

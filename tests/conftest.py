import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def venv_env(**extra) -> dict:
    """The environment a user has after activating the venv: its bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def run_job(*args, timeout=600, **env) -> subprocess.CompletedProcess:
    """The real `python job.py ARGS`, as a user runs it from this folder."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "job.py"), *args], cwd=ROOT, env=venv_env(**env),
                          capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A data root holding the synthetic stand-in, written by the real prepare_data.sh."""
    root = str(tmp_path_factory.mktemp("data"))
    subprocess.run(["bash", os.path.join(ROOT, "prepare_data.sh"), "--synthetic"],
                   env=venv_env(DATA_ROOT=root), check=True, capture_output=True, timeout=300)
    return root

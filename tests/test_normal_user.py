"""What a contributor or user who is not root sees. CI runs the suite as root, so these tests run job.py as the user
`nobody` (through setpriv), in a network namespace of nobody's own (a user namespace first, as a normal user makes
one): a simulator run, and a run on a POC that job.py starts and ends (--env poc). As a normal user, the whole suite
is this check, and these tests, which need root to change user, skip."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ISOLATED, LOOPBACK_UP, ROOT, processes_left
from job import JOB_NAME

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root; this run is a normal user's"),
]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups"]
SITE_PACKAGES = next((p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)), None)


def open_to_all(path) -> str:
    """path, made a folder that every user may read and write (as /tmp is)."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o777 | stat.S_ISVTX)
    return str(path)


@pytest.fixture(scope="module")
def as_nobody(small_root) -> dict:
    """A copy of the project, the small data set and a home, where nobody may read them, in a folder that every user
    may enter; a bin folder whose python3 nobody may run (this venv's interpreter, or the system's of the same
    version) with this venv's packages on PYTHONPATH, and an `nvflare` command. Returns the environment and paths."""
    folder = open_to_all(f"/tmp/ddp_example_nobody_{os.getpid()}")
    try:
        project = shutil.copytree(ROOT, os.path.join(folder, "project"), ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".pytest_cache"))  # fmt: skip
        data = shutil.copytree(small_root, os.path.join(folder, "data"))
        home, bin_dir = open_to_all(os.path.join(folder, "home")), os.path.join(folder, "bin")
        os.makedirs(bin_dir)
        for path in (folder, project, data, bin_dir):
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chmod(os.path.join(root, name), os.stat(os.path.join(root, name)).st_mode | 0o555)
        env = dict(os.environ, HOME=home, PATH=f"{bin_dir}:/usr/bin:/bin", PYTHONPATH=SITE_PACKAGES or "",
                   CUDA_VISIBLE_DEVICES="")  # fmt: skip
        python = next((p for p in (sys.executable, "/usr/bin/python3") if runs_as_nobody(p, env)), None)
        if python is None:
            pytest.skip(f"no Python that user nobody may run with this venv's packages ({SITE_PACKAGES})")
        os.symlink(python, os.path.join(bin_dir, "python3"))
        with open(os.path.join(bin_dir, "nvflare"), "w") as f:
            f.write('#!/bin/sh\nexec python3 -c "import sys; from nvflare.cli import main; sys.exit(main())" "$@"\n')
        os.chmod(os.path.join(bin_dir, "nvflare"), 0o755)
        yield {"env": env, "project": project, "data": data, "folder": folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runs_as_nobody(python: str, env: dict) -> bool:
    check = f"import sys, torch, nvflare; sys.exit(sys.version_info[:2] != {tuple(sys.version_info[:2])})"
    return subprocess.run([*NOBODY, python, "-c", check], env=env, capture_output=True).returncode == 0


def run_as_nobody(as_nobody: dict, *args, **env) -> subprocess.CompletedProcess:
    """`python3 job.py ARGS` as nobody, in a user and network namespace of nobody's own (where they can be made),
    from the project's copy."""
    own_network = ["unshare", "--user", "--map-root-user", "--net", "python3", *LOOPBACK_UP[1:]] if ISOLATED else []
    return subprocess.run(
        [*NOBODY, *own_network, "python3", "job.py", *args], cwd=as_nobody["project"],
        env={**as_nobody["env"], **env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_a_normal_user_runs_the_job_in_the_simulator(as_nobody):
    workspace = os.path.join(as_nobody["folder"], "sim")
    result = run_as_nobody(
        as_nobody, "--n_clients", "1", "--nproc_per_node", "2", "--num_rounds", "2", "--data_root", as_nobody["data"],
        "--workspace", workspace,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "final global model: after round 1" in result.stdout + result.stderr, result.stdout[-3000:]
    model = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt")
    assert os.stat(model).st_uid == int(subprocess.check_output(["id", "-u", "nobody"]))  # written by nobody
    assert processes_left(workspace) == []


def test_a_normal_user_runs_the_job_on_a_poc(as_nobody):
    poc = os.path.join(as_nobody["folder"], "poc")
    result = run_as_nobody(
        as_nobody, "--env", "poc", "--n_clients", "1", "--nproc_per_node", "1", "--num_rounds", "2", "--data_root",
        as_nobody["data"], "--workspace", os.path.join(as_nobody["folder"], "poc_result"),
        NVFLARE_POC_WORKSPACE=poc,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ended with status FINISHED:COMPLETED" in result.stdout
    assert not os.path.exists(poc)
    assert processes_left(poc) == []

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def venv_env(**extra) -> dict:
    """The environment a user has after activating the venv: its bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A data root holding the synthetic stand-in, written by the real prepare_data.sh."""
    root = str(tmp_path_factory.mktemp("data"))
    subprocess.run(["bash", os.path.join(ROOT, "prepare_data.sh"), "--synthetic"],
                   env=venv_env(DATA_ROOT=root), check=True, capture_output=True, timeout=300)
    return root

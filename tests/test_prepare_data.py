import os
import subprocess

from conftest import ROOT, venv_env
from data import BATCH_DIR, is_synthetic, load_cifar10, synthetic_preset

SCRIPT = os.path.join(ROOT, "prepare_data.sh")


def test_two_synthetic_runs_at_once_leave_one_complete_dataset(tmp_path):
    env = venv_env(DATA_ROOT=str(tmp_path))
    runs = [
        subprocess.Popen(["bash", SCRIPT, "--synthetic"], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert any("wrote a SYNTHETIC stand-in" in out for out in outputs)
    assert any("already in" in out for out in outputs)  # the second waited on the lock, then found it
    assert is_synthetic(str(tmp_path)) and len(load_cifar10(str(tmp_path))[1]) == 10_000
    assert sorted(os.listdir(tmp_path / BATCH_DIR)) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    )


def test_download_without_network_names_the_synthetic_option(tmp_path):
    # A proxy on a closed local port stands in for "no network", even on a machine that has one.
    env = venv_env(DATA_ROOT=str(tmp_path), https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    result = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("ERROR: could not download CIFAR-10") and "prepare_data.sh --synthetic" in lines[-1]
    assert "Traceback" not in result.stderr


def test_unknown_option_is_refused():
    result = subprocess.run(["bash", SCRIPT, "--synthtic"], env=venv_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash prepare_data.sh [--synthetic | --synthetic-small]" in result.stderr


def test_small_preset_replaces_the_standard_one_and_not_the_real_dataset(tmp_path):
    env = venv_env(DATA_ROOT=str(tmp_path))
    for flag in ("--synthetic", "--synthetic-small"):
        result = subprocess.run(["bash", SCRIPT, flag], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert "wrote a SYNTHETIC stand-in for CIFAR-10 (small" in result.stdout
    assert synthetic_preset(str(tmp_path)) == "small" and len(load_cifar10(str(tmp_path))[1]) == 1_500

    # A folder that holds anything but a stand-in is the user's: it is never overwritten.
    real = tmp_path / "real"
    (real / BATCH_DIR).mkdir(parents=True)
    (real / BATCH_DIR / "data_batch_1").write_bytes(b"the user's own file")
    env = venv_env(DATA_ROOT=str(real))
    result = subprocess.run(["bash", SCRIPT, "--synthetic-small"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "leaving it alone" in result.stderr
    assert (real / BATCH_DIR / "data_batch_1").read_bytes() == b"the user's own file"

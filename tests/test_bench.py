"""A smoke run of bench.py: every benchmark item executes and prints its ratio. Speed itself is
measured by running benchmarks/bench.py by hand (benchmarks/BENCHMARKS.md), not asserted here."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import OWN_NETWORK, ROOT, venv_env


@pytest.mark.e2e  # it runs job.py twice, of 1 site on the small set: the least that shows items 1-4 run
def test_quick_bench_prints_items_1_to_4(small_root):
    # Items 5 and 6 are a job run each with one flag changed (--exchange_format numpy, --master_port), and those
    # settings run in other tests' jobs (test_learning.py, test_faults.py); item 7 (models of real size) is
    # test_model_size.py's own short run.
    bench = os.path.join(ROOT, "benchmarks", "bench.py")
    result = subprocess.run(
        [
            *OWN_NETWORK,
            sys.executable,
            bench,
            "--quick",
            "--items",
            "1234",
            "--baseline",  # item 4 against the defaults quantized: the original settings' batch of 8 costs minutes
            "blockwise8",
            "--n_clients",
            "1",
            "--data_root",
            small_root,
        ],
        cwd=ROOT,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("machine: ")
    assert re.search(r"^1 data path: .* [\d.]+x faster$", out, re.M)
    assert re.search(r"^2 DDP: .* \(gloo\) .* [\d.]+x the time$", out, re.M)
    assert re.search(r"^3 FL overhead per round .* [\d.]+ s +of [\d.]+ s$", out, re.M)
    assert re.search(r"^  slowest site's train\+eval: round 0 vs a later round +[\d.]+ s +vs [\d.]+ s$", out, re.M)
    assert re.search(r"^4 blockwise8 settings vs defaults, 1 seed\(s\), 1 site\(s\), IID, 3 rounds$", out, re.M)
    mean_range = r"0\.\d{3} \[0\.\d{3}-0\.\d{3}\]"
    assert re.search(rf"^  final model accuracy: mean \[min-max\] +{mean_range} +{mean_range}$", out, re.M)
    assert re.search(r"^  worst dip below the best so far, after round 2 +0\.\d{3} +0\.\d{3}$", out, re.M)
    assert re.search(r"^  runs whose train loss went back near chance +\d of 1 +\d of 1$", out, re.M)
    assert re.search(r"^  job wall time \(s\): .* [\d.]+x the time$", out, re.M)


def test_fast_path_gives_the_original_paths_images_and_labels(synthetic_root):
    from benchmarks.bench import OriginalStyleCIFAR10
    from data import load_cifar10, normalize

    original = OriginalStyleCIFAR10(synthetic_root)
    train_x, train_y, _, _ = load_cifar10(synthetic_root)
    assert len(original) == len(train_y)
    for i in (0, 1, 1999, 2000, 5555, len(original) - 1):  # across batch-file boundaries
        image, label = original[i]
        assert label == train_y[i]
        assert torch.allclose(image, normalize(train_x[i]), atol=1e-6)


def test_gpu_check_fails_on_any_missed_target():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_check import verdicts

    met = {"backend": "nccl", "device": "cuda:0", "step_images_per_s": 150_000, "data_ratio": 120.0,
           "first_compute": 2.4, "steady_compute": 0.5, "job_wall": 24.0}  # fmt: skip
    assert all(ok for *_, ok in verdicts(met))
    for key, value in [("backend", "gloo"), ("device", "cpu"), ("step_images_per_s", 119_999), ("data_ratio", 99.9),
                       ("first_compute", 2.6), ("job_wall", 25.1)]:  # fmt: skip
        assert [ok for *_, ok in verdicts({**met, key: value})].count(False) == 1, key

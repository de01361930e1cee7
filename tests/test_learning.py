"""The defaults learn without dips or collapse: a short multi-seed check on the small synthetic preset, in the
hardest setting of docs/defaults.md (3 sites with skewed labels). The full check, 5 seeds on
both presets with 2 and 3 sites, is benchmarks/bench.py item 4 (benchmarks/BENCHMARKS.md)."""

import os

import pytest

from conftest import run_job
from job import JOB_NAME
from local_run.results import back_to_chance, learning_curve, worst_dip

pytestmark = pytest.mark.e2e  # real runs of job.py or nvflare: the full tier only


@pytest.mark.parametrize(
    "seed, flags",
    [
        # 1 rank a site: a site's ranks change its speed, not its model (test_gpu_plan.py), and so does FSDP, which
        # reaches DDP's global model (test_transformer.py). One seed's weights travel as NumPy arrays.
        (0, ["--nproc_per_node", "1"]),
        (1, ["--nproc_per_node", "1", "--exchange_format", "numpy"]),
    ],
)
def test_defaults_climb_without_a_dip_on_three_skewed_sites(small_root, tmp_path, seed, flags):
    flags = ["--n_clients", "3", *flags, "--alpha", "0.5", "--num_rounds", "8", "--seed", str(seed)]
    result = run_job("--data_root", small_root, "--workspace", str(tmp_path), *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accuracies, losses = learning_curve(os.path.join(tmp_path, JOB_NAME, "server", "simulate_job"))
    assert len(accuracies) == 9  # after 0..8 rounds: the last is the final model's
    assert worst_dip(accuracies) <= 0.05, accuracies
    assert not back_to_chance(losses), losses
    assert accuracies[-1] > 0.8, accuracies

"""The short run of benchmarks/model_size.py (bench.py item 7): a model of 100 MiB through this job and through
NVFlare's stock job, side by side, with the server's peak memory held against the model's size. Time is noisy
here, and stays in the benchmark; memory is steady enough to assert."""

import os
import sys

import pytest

from conftest import OWN_NETWORK, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import model_size  # noqa: E402

pytestmark = pytest.mark.e2e  # real runs of job.py and of NVFlare's stock job: the full tier only

MiB = 2**20


def test_a_100_mib_model_costs_the_server_no_more_than_nvflares_own_job():
    width = 5120  # one layer of 5120 x 5120 float32: 100 MiB
    model = width * width * 4
    runs = model_size.measure(1, "float32", 2, ["this", "stock"], ranks=1, width=width, prefix=OWN_NETWORK)
    ours, stock = runs["this"]["server"], runs["stock"]["server"]
    # Against NVFlare's own server, in the same test. When two sites' results are in memory at once depends on the
    # machine's load: under the full suite this job's server peaked 2 models above the stock job's, alone 0.4
    # (BENCHMARKS.md has the steady numbers). A float64 copy of the model and a result held too long, or a copy of
    # the global model kept each round, add more than this margin.
    assert ours <= stock + 3 * model, (ours / MiB, stock / MiB)
    # Against the model: the server process's own base (about 600 MiB: torch and NVFlare) plus what
    # BENCHMARKS.md measures a server holds at its peak, about 7 models (the global model, the persistor's, each
    # site's serialized copy and received result, the running sum), with room for the load's 2.
    assert ours <= 700 * MiB + 10 * model, ours / MiB
    assert runs["this"]["rank 0"] > model  # the sampler saw the trainer, which holds the model

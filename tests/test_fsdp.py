"""Sites that shard the model with FSDP2 (`--fsdp`): the same global model as DDP, the same tasks answered, each rank
holding its part of the weights."""

import json
import os
import re

import pytest
import torch

from conftest import accuracy_as_the_sites_measure, assert_clean, jobs_at_once, round_metrics
from job import JOB_NAME, load_global_model
from local_run.results import metric
from model import Net

pytestmark = pytest.mark.e2e  # real runs of job.py: the full tier only

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def fsdp_and_ddp(small_root, tmp_path_factory) -> dict:
    """The same job, 2 sites of 2 ranks, with and without --fsdp, side by side: lr 0.01, 2 rounds, started from a
    saved model, with cross-site evaluation. Each: (the finished process, its workspace), and the initial model."""
    folder = tmp_path_factory.mktemp("fsdp")
    initial = str(folder / "initial.pt")
    torch.save({"model": Net(seed=5).state_dict()}, initial)
    flags = ["--num_rounds", "2", "--lr", "0.01", "--data_root", small_root, "--cross_site_eval"]
    workspaces = {name: str(folder / name) for name in ("fsdp", "ddp")}
    done = jobs_at_once(
        {
            "fsdp": [*flags, "--initial_model", initial, "--workspace", workspaces["fsdp"], "--fsdp"],
            "ddp": [*flags, "--initial_model", initial, "--workspace", workspaces["ddp"]],
        },
    )
    return {name: (done[name], workspaces[name]) for name in workspaces} | {"initial": initial}


def global_model(workspace: str) -> dict:
    path = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt")
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.xdist_group("fsdp")
def test_fsdp_and_ddp_reach_the_same_global_model(fsdp_and_ddp):
    for name in ("fsdp", "ddp"):
        result, workspace = fsdp_and_ddp[name]
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-3000:]
        assert [sorted(s["name"] for s in r["sites"]) for r in round_metrics(workspace)] == [SITES, SITES]
    fsdp, ddp = (global_model(fsdp_and_ddp[name][1]) for name in ("fsdp", "ddp"))
    initial = Net(seed=5).state_dict()
    assert fsdp.keys() == ddp.keys() == initial.keys()
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) <= 1e-4
    assert max((fsdp[k] - initial[k]).abs().max().item() for k in fsdp) > 1e-3  # it trained
    assert_clean(fsdp_and_ddp["fsdp"][1])


@pytest.mark.xdist_group("fsdp")
def test_each_fsdp_rank_holds_half_the_parameters(fsdp_and_ddp):
    _, workspace = fsdp_and_ddp["fsdp"]
    total = sum(t.numel() for t in Net().parameters())
    for site in SITES:
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            held = re.search(rf"{site}: FSDP2 shards the model: rank 0 holds (\d+) of its (\d+) parameters", f.read())
        assert held and int(held[2]) == total
        assert total / 2 <= int(held[1]) <= total / 2 + 100  # each layer's weights split in two (rounded up)


@pytest.mark.xdist_group("fsdp")
def test_fsdp_starts_from_the_initial_model(fsdp_and_ddp, small_root):
    _, workspace = fsdp_and_ddp["fsdp"]
    expected = accuracy_as_the_sites_measure(load_global_model(fsdp_and_ddp["initial"]), small_root, ranks=2)
    for site in round_metrics(workspace)[0]["sites"]:  # the accuracy each site measured of the round-0 weights
        assert metric(site["metrics"], "accuracy") == pytest.approx(expected, abs=1e-6)


@pytest.mark.xdist_group("fsdp")
def test_fsdp_sites_answer_cross_site_evaluation(fsdp_and_ddp):
    result, workspace = fsdp_and_ddp["fsdp"]
    path = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "cross_site_val", "cross_val_results.json")
    with open(path) as f:
        matrix = json.load(f)
    models = [*SITES, "SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"]
    assert sorted(matrix) == SITES and all(sorted(scores) == sorted(models) for scores in matrix.values())
    # Each site's own model, gathered from its shards, is what it sent in the last round.
    last = {s["name"]: metric(s["metrics"], "local_accuracy") for s in round_metrics(workspace)[-1]["sites"]}
    for site in SITES:
        assert matrix[site][site]["accuracy"] == pytest.approx(last[site], abs=1e-6)

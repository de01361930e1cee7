"""A transformer under FSDP2, as people shard one (tests/transformer_site): each block sharded, then the root, which
keeps the token and position embeddings, the final norm and the head, tied to the token embedding. Its trainer is
written as docs/your-own-model-and-data.md says, in a project of its own; sites of 2 and 3 ranks."""

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, assert_clean, jobs_at_once, round_metrics
from job import JOB_NAME
from local_run.results import metric
from test_your_own_trainer import doc_blocks, your_project

SITE = os.path.join(ROOT, "tests", "transformer_site")
sys.path.insert(0, SITE)
from my_transformer import TinyLM, next_token_data  # noqa: E402

pytestmark = pytest.mark.e2e  # real runs of job.py: the full tier only

SITES = ["site-1", "site-2"]
RANKS = ["--nproc_per_node", "2,3"]


def transformer_project(folder, keep_optimizer: bool) -> str:
    """The doc's project with TinyLM and its trainer in place of MyNet and the doc's trainer."""
    job = doc_blocks()["job.py"].replace("my_model", "my_transformer").replace("MyNet", "TinyLM")
    job = job.replace('TRAIN_SCRIPT = "my_trainer.py"', 'TRAIN_SCRIPT = "my_transformer_trainer.py"')
    with open(os.path.join(SITE, "my_transformer_trainer.py")) as f:
        trainer = f.read().replace("KEEP_OPTIMIZER = False", f"KEEP_OPTIMIZER = {keep_optimizer}")
    your_project(folder, {"job.py": job, "my_transformer_trainer.py": trainer})
    shutil.copy(os.path.join(SITE, "my_transformer.py"), folder)
    return str(folder)


def data(folder) -> str:
    folder.mkdir()
    torch.save(next_token_data(1200, seed=1), folder / "train.pt")  # 600 sequences a site
    torch.save(next_token_data(300, seed=2), folder / "test.pt")
    return str(folder)


def global_model(workspace: str) -> dict:
    path = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt")
    return torch.load(path, weights_only=True)["model"]


def comparison(folder) -> list[str]:
    """The flags of the runs compared: lr 0.01, 2 rounds of 4 epochs, started from a saved model, with cross-site
    evaluation, on next-token data written into folder."""
    torch.save({"model": TinyLM(seed=5).state_dict()}, folder / "initial.pt")
    return ["--num_rounds", "2", "--epochs", "4", "--lr", "0.01", "--data_root", data(folder / "data"),
            "--initial_model", str(folder / "initial.pt"), "--cross_site_eval"]  # fmt: skip


def assert_same_model_and_every_parameter_trained(sharded: dict, ddp: dict) -> None:
    """A sharded run's global model against DDP's: the same within 1e-4, and every parameter moved from the initial
    model, the root's (embeddings, position, final norm, tied head) as much as the blocks'."""
    initial = TinyLM(seed=5).state_dict()
    assert sharded.keys() == ddp.keys() == initial.keys()
    assert max((sharded[k].double() - ddp[k].double()).abs().max().item() for k in sharded) <= 1e-4
    for model in (sharded, ddp):
        assert [k for k in initial if k != "steps" and torch.equal(model[k], initial[k])] == []
        assert model["steps"].dtype == torch.int64 and model["steps"].item() > 0


def full_matrix(path: str) -> dict:
    """cross_val_results.json at path, asserting that every site scored every site's model and both global
    models."""
    with open(path) as f:
        matrix = json.load(f)
    models = [*SITES, "SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"]
    assert sorted(matrix) == SITES and all(sorted(scores) == sorted(models) for scores in matrix.values())
    assert all(0 <= cell["accuracy"] <= 1 for scores in matrix.values() for cell in scores.values())
    return matrix


def assert_learns_next_tokens(rounds: list[dict], final: float) -> None:
    """From the initial model (round 0's accuracy) to the final one, next-token accuracy climbs well above chance
    (1 in 16)."""
    initial = metric(rounds[0]["aggregated_metrics"], "accuracy")
    assert initial < 0.2 and final > 0.4, (initial, final)


def cross_site_matrix(workspace: str) -> dict:
    return full_matrix(
        os.path.join(workspace, JOB_NAME, "server", "simulate_job", "cross_site_val", "cross_val_results.json")
    )


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory) -> dict:
    """The same job with DDP and with FSDP2, sites of 2 and 3 ranks; the trainer evaluates first and builds its
    optimizer (SGD) after that. Each: (the run, its workspace)."""
    folder = tmp_path_factory.mktemp("transformer")
    project = transformer_project(folder / "project", keep_optimizer=False)
    flags = [*RANKS, *comparison(folder)]
    workspaces = {name: str(folder / name) for name in ("ddp", "fsdp")}
    runs = jobs_at_once(
        {
            "ddp": [*flags, "--workspace", workspaces["ddp"]],
            "fsdp": [*flags, "--workspace", workspaces["fsdp"], "--fsdp"],
        },
        project=project,
    )
    return {name: (runs[name], workspaces[name]) for name in workspaces}


@pytest.mark.xdist_group("transformer")
def test_fsdp_and_ddp_reach_the_same_global_model_and_every_parameter_trains(side_by_side):
    for name, (run, workspace) in side_by_side.items():
        assert run.returncode == 0, name + run.stdout[-3000:] + run.stderr[-3000:]
        rounds = round_metrics(workspace)
        assert [sorted(s["name"] for s in r["sites"]) for r in rounds] == [SITES, SITES]
        assert_learns_next_tokens(rounds, cross_site_matrix(workspace)["site-1"]["SRV_FL_global_model.pt"]["accuracy"])
        assert_clean(workspace)
    assert_same_model_and_every_parameter_trained(*(global_model(side_by_side[n][1]) for n in ("fsdp", "ddp")))


@pytest.mark.xdist_group("transformer")
def test_the_tied_global_model_loads_strictly_and_stays_tied(side_by_side):
    for name in ("ddp", "fsdp"):
        state = global_model(side_by_side[name][1])
        assert torch.equal(state["head.weight"], state["embed.weight"])
        model = TinyLM()
        model.load_state_dict(state, strict=True)
        assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, state["embed.weight"])


@pytest.mark.xdist_group("transformer")
def test_sharded_sites_answer_every_cell_of_cross_site_evaluation(side_by_side):
    matrix = cross_site_matrix(side_by_side["fsdp"][1])
    # Each site's own model, gathered from its shards, is the one it sent in the last round.
    last = {
        s["name"]: metric(s["metrics"], "local_accuracy") for s in round_metrics(side_by_side["fsdp"][1])[-1]["sites"]
    }
    assert all(matrix[site][site]["accuracy"] == pytest.approx(last[site], abs=1e-6) for site in SITES)


def test_an_optimizer_kept_across_rounds_learns_under_fsdp_in_bf16(tmp_path):
    # AdamW built once, before the loop: each round's weights load into the sharded parameters it holds, and its
    # moments carry over. FSDP2 computes in bf16 (MixedPrecisionPolicy). Chance is 1 in 16. (Under DDP the weights
    # load into the same parameter tensors in place: test_flare_ddp.py's bucket broadcast.)
    project = transformer_project(tmp_path / "project", keep_optimizer=True)
    workspace = str(tmp_path / "fsdp")
    flags = [*RANKS, "--num_rounds", "3", "--epochs", "1", "--lr", "0.01", "--data_root", data(tmp_path / "data")]
    run = jobs_at_once({"fsdp": [*flags, "--workspace", workspace, "--fsdp"]}, project=project)["fsdp"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rounds = round_metrics(workspace)
    assert_learns_next_tokens(rounds, metric(rounds[-1]["aggregated_metrics"], "accuracy"))  # round 2 starts from it
    assert_clean(workspace)

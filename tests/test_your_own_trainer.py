"""docs/your-own-model-and-data.md, followed to the letter: its code blocks become the files of an empty folder with
the files it says to copy, and the job runs for real. Then the same bridge carries a model of bf16, fp16 and an
integer buffer through a real job, and job.py, copied without local_run/, still exports a job that runs."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean, assert_learns, job_command, processes_of, round_metrics, venv_env
from job import JOB_NAME, load_global_model
from local_run.results import metric, read_rounds

DOC = os.path.join(ROOT, "docs", "your-own-model-and-data.md")
COPIED = [
    "flare_ddp.py",
    "job.py",
    "protocol.py",
    "server_fedavg.py",
    "quantize.py",
    "streaming.py",
    "local_run",
]  # the doc's "What to copy"


def doc_blocks() -> dict[str, str]:
    """The doc's python blocks, by the file named in their first line (`# my_model.py`)."""
    with open(DOC) as f:
        blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", f.read(), re.S)
    return dict(blocks)


def copy_files(folder, names) -> None:
    for name in names:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, folder / name)


def your_project(folder, blocks: dict[str, str]) -> None:
    """An empty folder made as the doc says: the copied files, the new files, and job.py's block replaced."""
    folder.mkdir()
    copy_files(folder, COPIED)
    for name, code in blocks.items():
        if name != "job.py":
            (folder / name).write_text(code)
    job = (folder / "job.py").read_text()
    start, end = job.index("TRAIN_SCRIPT = "), job.index("JOB_NAME = ")
    (folder / "job.py").write_text(job[:start] + blocks["job.py"] + "\n\n" + job[end:])


def run_your_job(folder, *args, timeout=600) -> subprocess.CompletedProcess:
    """Your project's `python job.py ARGS`, in a network of its own like every real run of the tests."""
    return subprocess.run(job_command(*args, folder=str(folder)), cwd=folder, env=venv_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def points(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """4 classes of 16 features: a Gaussian cloud around each class's centre."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, 4, (n,), generator=generator)
    return {"x": centres[y] + torch.randn(n, 16, generator=generator), "y": y}


def run_points_job(tmp_path, blocks: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Your project made from `blocks`, run for 3 rounds of 1 epoch on the doc's points, with job.py's `args`: (the
    run, its workspace)."""
    your_project(tmp_path / "yours", blocks)
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    # 2,002 training samples: 1,001 a site, which 2 ranks can't split evenly.
    torch.save(points(2002, g), data / "train.pt")
    torch.save(points(1000, g), data / "test.pt")
    workspace = str(tmp_path / "ws")
    result = run_your_job(
        tmp_path / "yours", "--num_rounds", "3", "--epochs", "1", "--data_root", str(data), "--workspace", workspace,
        *args,
    )  # fmt: skip
    return result, workspace


def test_the_doc_has_every_file_it_names_and_a_short_trainer():
    blocks = doc_blocks()
    assert set(blocks) == {"my_model.py", "my_trainer.py", "job.py"}
    # A trainer of its own, Dataset included, in about 60 lines of code.
    assert sum(1 for line in blocks["my_trainer.py"].splitlines() if line.strip()) <= 60
    assert "data" not in re.findall(r"^(?:from|import) (\w+)", blocks["my_trainer.py"], re.M)  # none of data.py


@pytest.mark.e2e
def test_the_doc_makes_a_trainer_of_your_own_that_learns(tmp_path):
    result, workspace = run_points_job(tmp_path, doc_blocks())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "site-1: 2 rank(s) on the CPU" in result.stdout and "site-2: 2 rank(s) on the CPU" in result.stdout
    rounds = round_metrics(workspace)
    assert [len(r["sites"]) for r in rounds] == [2, 2, 2]
    assert all(s["weight"] == 1001 for r in rounds for s in r["sites"])
    first, last = (metric(r["aggregated_metrics"], "accuracy") for r in (rounds[0], rounds[-1]))
    assert first < 0.5 and last > 0.8, (first, last)  # 4 classes: chance is 0.25
    model = torch.load(
        os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt"),
        weights_only=True,
    )["model"]
    assert model["layers.1.num_batches_tracked"].dtype == torch.int64
    assert model["layers.1.num_batches_tracked"].item() > 0  # BatchNorm's counter came back from the sites
    assert processes_of(workspace) == []


def sharding_block() -> str | None:
    """The doc's FSDP2 block: what replaces `ddp = DDP(model)` in my_trainer.py."""
    with open(DOC) as f:
        block = re.search(r"```python\n# in my_trainer.py, instead of ddp = DDP\(model\):\n(.*?)```", f.read(), re.S)
    return block and block[1]


def fine_tuning_blocks() -> dict[str, str]:
    """The doc's blocks as they are after section 5 (fine-tune part of a model): its classes added to my_model.py,
    its lines put into my_trainer.py where it says, and MyTunedNet in job.py."""
    with open(DOC) as f:
        doc = f.read()
    added = re.search(r"```python\n# added to my_model.py:\n(.*?)```", doc, re.S)[1]
    lines = re.search(r"```python\n# in my_trainer.py, to fine-tune part of the model:\n(.*?)```", doc, re.S)[1]
    blocks = doc_blocks()
    blocks["my_model.py"] += "\n\n" + added
    new = dict(line.split(" = ", 1) for line in lines.strip().splitlines() if " = " in line.split("(")[0])
    send = next(line for line in lines.strip().splitlines() if line.startswith("task.send("))
    trainer = blocks["my_trainer.py"].replace("MyNet", "MyTunedNet")
    trainer = trainer.replace("ddp = DDP(model)\n", f"ddp = DDP(model)\nfrozen = {new['frozen']}\n")
    assert len(re.findall(r"^ *optimizer = [^\n]*$", trainer, re.M)) == 1  # the line that builds it
    trainer = re.sub(r"^( *)optimizer = [^\n]*$", rf"\g<1>optimizer = {new['optimizer']}", trainer, flags=re.M)
    old = re.findall(r"^( *)(task\.send\(params=[^\n]*metrics=metrics[^\n]*)$", trainer, re.M)
    assert len(old) == 1  # the train task's send
    indent, line = old[0]
    trainer = trainer.replace(indent + line, f"{indent}trained = {new['trained']}\n{indent}{send}")
    blocks["my_trainer.py"] = trainer
    blocks["job.py"] = blocks["job.py"].replace("MyNet", "MyTunedNet")
    return blocks


def task_lines(workspace: str, site: str) -> list[tuple[str, int, int, int]]:
    """What flare_ddp printed at `site` for each task it received: (kind, round, tensors, kept)."""
    with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
        found = re.findall(
            r"flare_ddp: (\w+) task of round (\d+): received (\d+) tensors, [\d,]+ bytes, (\d+) kept", f.read()
        )
    return [(kind, int(r), int(n), int(kept)) for kind, r, n, kept in found]


@pytest.mark.e2e
def test_the_doc_fine_tunes_part_of_a_model_and_only_that_part_travels_after_round_0(tmp_path):
    # Quantized both ways too: what is sent, what the server sends back, and what the site keeps.
    result, workspace = run_points_job(tmp_path, fine_tuning_blocks(), "--quantize_mode", "blockwise8")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = round_metrics(workspace)
    last = metric(rounds[-1]["aggregated_metrics"], "accuracy")
    assert last > 0.8, last  # 4 classes: chance is 0.25
    spec = importlib.util.spec_from_file_location("your_tuned_model", tmp_path / "yours" / "my_model.py")
    spec.loader.exec_module(your_model := importlib.util.module_from_spec(spec))
    initial = your_model.MyTunedNet(seed=0).state_dict()
    frozen = {"layers.0.layer.weight", "layers.0.layer.bias", "layers.1.weight", "layers.1.bias"}
    model = torch.load(
        os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt"),
        weights_only=True,
    )["model"]
    assert model.keys() == initial.keys()  # the saved global model is whole
    assert all(torch.equal(model[k], initial[k]) for k in frozen)  # what no site sent, bit for bit
    assert not any(torch.equal(model[k], initial[k]) for k in initial.keys() - frozen)  # the rest trained
    for site in ("site-1", "site-2"):
        tasks = task_lines(workspace, site)
        # Round 0 brings the whole model; every later task (rounds 1 and 2, the final evaluation of the last and the
        # best global model, which NVFlare reloads from their files) all but the frozen part, which the site keeps.
        later = [("train", 1, 7, 4), ("train", 2, 7, 4), ("validate", 0, 7, 4), ("validate", 0, 7, 4)]
        assert tasks == [("train", 0, len(initial), 0), *later]
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:  # its results, quantized
            sizes = re.findall(r"(\d+) tensors quantized to blockwise8: ([\d,]+) -> ([\d,]+) bytes", f.read())
        assert len(sizes) == 3 and all(
            int(n) == 6 and int(b.replace(",", "")) > int(a.replace(",", "")) for n, b, a in sizes
        )
    # The server hashes a tensor once while it lives, for both sites: the whole model (11 tensors) in round 0, then
    # only the round's new average (the 7 trained). A copy of the global model a round (NVFlare's broadcast copy)
    # would be hashed whole; the final evaluation's last global model is the one the server holds (7 new tensors),
    # the best one comes from its file (11).
    with open(os.path.join(workspace, JOB_NAME, "server", "log.txt")) as f:
        found = re.findall(
            r"task_name=(\w+),.* - site-\d: \d+ tensors to send, \d+ kept at the site; (\d+) hashed", f.read()
        )
    train = [int(n) for task, n in found if task == "train"]
    assert [a + b for a, b in zip(train[::2], train[1::2])] == [11, 7, 7], found
    assert sum(int(n) for task, n in found if task == "validate") == 7 + 11, found
    assert processes_of(workspace) == []


@pytest.mark.e2e
def test_sites_that_send_different_parts_end_the_job_naming_the_site_and_the_tensor(tmp_path):
    blocks = fine_tuning_blocks()
    blocks["my_trainer.py"] = blocks["my_trainer.py"].replace(
        "if k not in frozen}", 'if k not in frozen or args.site == "site-2"}'
    )
    result, workspace = run_points_job(tmp_path, blocks, "--nproc_per_node", "1")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        "ERROR: the job stopped in round 0 of 3: the server stopped the job: round 0: site-" in last
        and "every site must send the same part" in last
    )
    assert processes_of(workspace) == []


# Where the doc's trainer raises (site-2, at RANK), and how the run's last line names the phase.
RAISES = {
    "start": ("flare_ddp.init()\n", 1, "during start-up"),  # before the handshake
    "round": ("    optimizer = ", 1, "in round 1 of 3"),  # in round 1's training
    "eval": ("        task.send(metrics=", 0, "in the final evaluation"),  # scoring the final global model
}


@pytest.mark.e2e
@pytest.mark.parametrize("phase", RAISES)
def test_a_trainer_of_your_own_that_raises_ends_the_job_naming_site_rank_and_message(phase, tmp_path):
    before, rank, said = RAISES[phase]
    indent = before[: len(before) - len(before.lstrip())]
    when = "task.round == 1 and " if phase == "round" else ""
    fault = f'{indent}if {when}args.site == "site-2" and rank == {rank}:\n{indent}    raise ValueError("no {phase}")\n'
    blocks = doc_blocks()
    assert blocks["my_trainer.py"].count(before) == 1
    blocks["my_trainer.py"] = blocks["my_trainer.py"].replace(before, fault + before)
    result, workspace = run_points_job(tmp_path, blocks, "--nproc_per_node", "1,2")  # site-1: a rank less to start
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: the job stopped {said}: site-2 rank {rank}: ERROR: ValueError: no {phase}. "), last
    assert processes_of(workspace) == []


def test_the_sharding_block_replaces_the_one_ddp_line():
    assert sharding_block() and doc_blocks()["my_trainer.py"].count("ddp = DDP(model)\n") == 1


@pytest.mark.e2e
def test_the_doc_sharded_with_fsdp2_in_bf16_learns_and_sends_float32(tmp_path):
    blocks = doc_blocks()
    blocks["my_trainer.py"] = blocks["my_trainer.py"].replace("ddp = DDP(model)\n", sharding_block())
    result, workspace = run_points_job(tmp_path, blocks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = round_metrics(workspace)
    assert [len(r["sites"]) for r in rounds] == [2, 2, 2]
    first, last = (metric(r["aggregated_metrics"], "accuracy") for r in (rounds[0], rounds[-1]))
    assert first < 0.5 and last > 0.8, (first, last)
    model = torch.load(
        os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt"),
        weights_only=True,
    )["model"]
    # The full weights, gathered from the shards: every parameter whole, in float32 (bf16 was only computed in).
    shapes = {name: tuple(t.shape) for name, t in model.items()}
    assert shapes == {
        **{f"layers.0.{n}": s for n, s in (("weight", (64, 16)), ("bias", (64,)))},
        **{f"layers.1.{n}": (64,) for n in ("weight", "bias", "running_mean", "running_var")},
        **{"layers.1.num_batches_tracked": (), "layers.3.weight": (4, 64), "layers.3.bias": (4,)},
    }
    assert {t.dtype for name, t in model.items() if "num_batches" not in name} == {torch.float32}
    assert processes_of(workspace) == []


# A trainer that sends weights of three dtypes, and keeps what it sent in --data_root for the test to compare.
MIXED_MODEL = """
import torch
from torch import nn


class Mixed(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.half = nn.Linear(8, 4).to(torch.float16)
        self.brain = nn.Linear(4, 2).to(torch.bfloat16)
        self.register_buffer("steps", torch.tensor([7, 2**40 + 3], dtype=torch.int64))
"""
MIXED_TRAINER = """
import argparse, os
import torch
import torch.distributed as dist
import flare_ddp
from my_model import Mixed

p = argparse.ArgumentParser()
p.add_argument("--data_root")
args, _ = p.parse_known_args()
dist.init_process_group("gloo")
model = Mixed()
flare_ddp.init()
for task in flare_ddp.tasks(model):
    if task.kind != flare_ddp.TRAIN:
        task.send(metrics={"accuracy": 0.0})
        continue
    g = torch.Generator().manual_seed(task.round)  # the same on every rank
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g).to(tensor.dtype) / 3)
            else:
                tensor.add_(1000 * task.round + 1)
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), os.path.join(args.data_root, f"sent_{task.round}.pt"))
    task.send(params=model.state_dict(), metrics={"accuracy": 0.0, "train_loss": 0.0}, weight=3)
dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.e2e
def test_bf16_fp16_and_integer_tensors_keep_dtype_and_value_through_fedavg(tmp_path):
    blocks = doc_blocks()
    blocks["my_model.py"], blocks["my_trainer.py"] = MIXED_MODEL, MIXED_TRAINER
    blocks["job.py"] = blocks["job.py"].replace("MyNet", "Mixed")
    your_project(tmp_path / "yours", blocks)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.pt", "test.pt"):  # what the doc's check_data asks for
        (data / name).write_bytes(b"")
    workspace = str(tmp_path / "ws")
    result = run_your_job(
        tmp_path / "yours", "--n_clients", "1", "--num_rounds", "2", "--data_root", str(data), "--workspace", workspace
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = torch.load(
        os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt"),
        weights_only=True,
    )["model"]
    sent = torch.load(data / "sent_1.pt", weights_only=True)
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in sent.items()}
    assert {v.dtype for v in saved.values()} == {torch.float16, torch.bfloat16, torch.int64}
    # One site: FedAvg's average is its own update, computed in float64 and cast back, so exactly what it sent.
    for name, tensor in sent.items():
        assert torch.equal(saved[name], tensor), name
    assert saved["steps"].tolist() == [7 + 1 + 1001, 2**40 + 3 + 1 + 1001]  # beyond float32's 24 bits
    assert_clean(workspace)


TRAINER_FILES = [
    "client.py",
    "flare_ddp.py",
    "data.py",
    "model.py",
    "protocol.py",
    "rank_exit.py",
    "server_fedavg.py",
    "quantize.py",
    "streaming.py",
]


def test_job_py_exports_without_the_runner(tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    copy_files(folder, ["job.py", *TRAINER_FILES])
    result = run_your_job(folder, "--export_config", str(tmp_path / "out"), "--num_rounds", "1", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job_dir = tmp_path / "out" / JOB_NAME
    assert f"job folder written to {job_dir}" in result.stdout
    for site in ("site-1", "site-2"):
        assert {"client.py", "flare_ddp.py"} <= set(os.listdir(job_dir / f"app_{site}" / "custom"))
    assert not (folder / "local_run").exists()


@pytest.mark.e2e
def test_the_job_exported_without_the_runner_runs_under_the_race_free_simulator_cli(synthetic_root, tmp_path):
    # `nvflare simulator`'s arguments, with the start-up race forced: NVFlare's own CLI would hang here.
    folder = tmp_path / "copied"
    folder.mkdir()
    copy_files(folder, ["job.py", *TRAINER_FILES])
    exported = run_your_job(
        folder, "--export_config", str(tmp_path / "out"), "--num_rounds", "3", "--data_root", synthetic_root
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    workspace = str(tmp_path / "ws")
    ran = subprocess.run(
        [sys.executable, os.path.join(ROOT, "local_run", "race_free_simulator.py"), str(tmp_path / "out" / JOB_NAME),
         "-w", workspace, "-n", "2", "-t", "2"],
        env=venv_env(PYTHONPATH=os.path.join(ROOT, "tests", "force_race")), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    server_dir = os.path.join(workspace, "server", "simulate_job")
    rounds = read_rounds(server_dir)
    assert [sorted(s["name"] for s in r["sites"]) for r in rounds] == [["site-1", "site-2"]] * 3
    assert_learns(rounds)
    load_global_model(os.path.join(server_dir, "app_server", "FL_global_model.pt"))
    assert processes_of(workspace) == []

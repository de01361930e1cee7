"""End to end: the real `python job.py` in NVFlare's simulator, 2 gloo ranks per site, on the synthetic set."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, venv_env
from data import load_cifar10, normalize
from model import Net

JOB_NAME = "pt_ddp_fedavg"


def run_job(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "job.py"), *args], cwd=ROOT, env=venv_env(),
                          capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the run's workspace or data root)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


def log_files(workspace: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(workspace, "**", "*.txt"), recursive=True) if "log" in os.path.basename(p)]


def round_metrics(workspace: str) -> list[dict]:
    path = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "metrics", "round_metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def accuracy(metrics: list[dict]) -> float:
    return next(m["value"] for m in metrics if m["name"] == "accuracy")


def load_net(path: str) -> Net:
    net = Net()
    net.load_state_dict(torch.load(path, weights_only=True)["model"])
    return net


@pytest.fixture(scope="module")
def default_run(synthetic_root, tmp_path_factory):
    workspace = str(tmp_path_factory.mktemp("sim"))
    result = run_job("--num_rounds", "3", "--data_root", synthetic_root, "--workspace", workspace,
                     "--master_port", "7810")
    return result, workspace


def test_job_exits_zero_and_every_site_reports_every_round(default_run):
    result, workspace = default_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = round_metrics(workspace)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"] for r in rounds)
    for line in ("round  global accuracy", "best global model: round", "final global model: after round 2"):
        assert line in result.stdout


def test_each_site_trains_with_two_gloo_ranks(default_run):
    _, workspace = default_run
    for site in ("site-1", "site-2"):
        with open(os.path.join(workspace, JOB_NAME, site, "log.txt")) as f:
            log = f.read()
        assert f"{site}: 2 rank(s), backend gloo on cpu (no CUDA device is visible)" in log
        assert f"{site}: SYNTHETIC stand-in shard of 5000 training images" in log


def test_global_accuracy_climbs_well_above_chance(default_run):
    _, workspace = default_run
    rounds = round_metrics(workspace)
    first, last = accuracy(rounds[0]["aggregated_metrics"]), accuracy(rounds[-1]["aggregated_metrics"])
    assert last > 0.5 and last > first + 0.3


def test_global_models_load_into_net_and_best_is_the_best_round(default_run, synthetic_root):
    _, workspace = default_run
    app = os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server")
    load_net(os.path.join(app, "FL_global_model.pt"))
    best = load_net(os.path.join(app, "best_FL_global_model.pt"))
    _, _, test_x, test_y = load_cifar10(synthetic_root)
    with torch.no_grad():
        best_accuracy = (best(normalize(test_x)).argmax(1) == test_y).float().mean().item()
    assert best_accuracy == pytest.approx(max(accuracy(r["aggregated_metrics"]) for r in round_metrics(workspace)),
                                          abs=1e-4)


def test_clean_run_leaves_no_traceback_and_no_process(default_run):
    _, workspace = default_run
    logs = log_files(workspace)
    assert logs
    for path in logs:
        with open(path) as f:
            assert "Traceback" not in f.read(), path
    assert processes_mentioning(workspace) == []
    assert not glob.glob(os.path.join(workspace, "**", "*tfevents*"), recursive=True)  # no tracking asked for


def test_tracking_with_three_sites_logs_per_site_scalars(synthetic_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace = str(tmp_path)
    result = run_job("--num_rounds", "2", "--n_clients", "3", "--use_tracking", "--data_root", synthetic_root,
                     "--workspace", workspace, "--master_port", "7820")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(len(r["sites"]) == 3 for r in round_metrics(workspace))
    shards = result.stdout.split("training shards: ")[1].splitlines()[0]
    assert sum(int(part.split()[1]) for part in shards.split(", ")) == 10_000
    for site in ("site-1", "site-2", "site-3"):
        events = EventAccumulator(os.path.join(workspace, JOB_NAME, "server", "simulate_job", "tb_events", site))
        events.Reload()
        for tag in ("train_loss", "global_accuracy", "local_accuracy"):
            assert [e.step for e in events.Scalars(tag)] == [0, 1], (site, tag)
        histogram = [events.Scalars(f"shard_class_count/{c}")[0].value for c in range(10)]
        assert sum(histogram) == int(shards.split(f"{site} ")[1].split(",")[0])
    assert processes_mentioning(workspace) == []


def test_empty_data_root_fails_fast_naming_prepare_data(tmp_path):
    started = time.monotonic()
    result = run_job("--data_root", str(tmp_path), "--workspace", str(tmp_path / "ws"), timeout=180)
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert "prepare_data.sh" in result.stderr and "Traceback" not in result.stderr


def test_export_config_writes_one_app_per_site_with_its_own_port():
    result = run_job("--export_config", "--nproc_per_node", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    job_dir = f"/tmp/nvflare/jobs/job_config/{JOB_NAME}"
    assert job_dir in result.stdout
    with open(os.path.join(job_dir, "meta.json")) as f:
        deploy_map = json.load(f)["deploy_map"]
    ports = set()
    for site in ("site-1", "site-2"):
        config = glob.glob(os.path.join(job_dir, "**", f"*{site}*", "config", "config_fed_client.json"),
                           recursive=True)
        assert len(config) == 1, deploy_map
        with open(config[0]) as f:
            command = json.load(f)["executors"][0]["executor"]["args"]["command"]
        assert command[:4] == ["python3", "-u", "-m", "torch.distributed.run"] and "--nproc_per_node=3" in command
        assert f"--site {site}" in " ".join(command)
        ports |= {part for part in command if part.startswith("--master_port=")}
        custom = os.path.join(os.path.dirname(os.path.dirname(config[0])), "custom")
        assert {"client.py", "data.py", "model.py"} <= set(os.listdir(custom))
    assert len(ports) == 2


def test_nvflare_export_flag_still_works(tmp_path):
    result = run_job("--export", "--export-dir", str(tmp_path / "job"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "job" / JOB_NAME / "meta.json")

"""Deployment: the exported job on a live POC system through `nvflare job submit`, `job.py --env prod` and
`job.py --env poc` (under the simulator's CLI: test_your_own_trainer.py). Loopback only: each POC in a network and a
workspace of its own. On the small synthetic set: what is tested is how the job runs, not what it learns."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (
    POC_PROJECT,
    ROOT,
    end_poc,
    job_command,
    own_poc,
    poc_system,
    processes_left,
    run_job,
    venv_env,
    wait_for_log_lines,
)
from job import JOB_NAME, load_global_model
from local_run.results import log_times
from model import Net

pytestmark = pytest.mark.e2e  # real runs of job.py or nvflare: the full tier only


ROUNDS = 2  # of an exported job
POC_END = 120  # seconds from a fault or signal until job.py on its own POC has ended everything (docs/failures.md)


def export_job(data_root: str, folder, *args: str) -> str:
    result = run_job(
        "--export", "--export-dir", str(folder), "--num_rounds", str(ROUNDS), "--data_root", data_root, *args,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(str(folder), JOB_NAME)


def assert_finished(server_dir: str, rounds: int) -> None:
    """Every round reported by both sites, and the final global model loads into Net."""
    with open(os.path.join(server_dir, "metrics", "round_metrics.jsonl")) as f:
        reported = [json.loads(line) for line in f]
    assert [r["round"] for r in reported] == list(range(rounds))
    assert all(sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2"] for r in reported)
    load_global_model(os.path.join(server_dir, "app_server", "FL_global_model.pt"))


def test_exported_job_has_no_path_of_this_machine(small_root, tmp_path):
    job_dir = export_job(small_root, tmp_path)
    for folder, _, files in os.walk(job_dir):
        for name in files:
            with open(os.path.join(folder, name), errors="replace") as f:
                text = f.read()
            for local in (ROOT, os.path.expanduser("~") + "/", sys.executable, os.getcwd()):
                assert local not in text, (name, local)


# What a test of how job.py ends its POC needs of the job: one site of one rank.
ONE_SITE = ["--n_clients", "1", "--nproc_per_node", "1"]


def poc_workspace(tmp_path) -> str:
    return own_poc(tmp_path)["NVFLARE_POC_WORKSPACE"]


def test_env_poc_start_up_fault_ends_the_job_naming_the_site(small_root, tmp_path):
    result = run_job(
        "--env", "poc", "--n_clients", "1", "--num_rounds", "2", "--data_root", small_root, "--workspace",
        str(tmp_path / "ws"), timeout=600, DDP_EXAMPLE_FAULT="site-1:1:start:kill", **own_poc(tmp_path),
    )  # fmt: skip
    ended = time.time()
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ended with status FINISHED:EXECUTION_EXCEPTION" in result.stdout
    assert "ERROR: the job stopped during start-up: site-1 rank 1 failed (exit code -9 (SIGKILL))" in result.stderr
    (kept,) = [os.path.join(tmp_path, "ws", JOB_NAME, d) for d in os.listdir(tmp_path / "ws" / JOB_NAME)]
    injected = log_times(os.path.join(kept, "site-1", "log.txt"), "injecting fault")
    assert injected and ended - injected[0] < POC_END
    assert not os.path.exists(poc_workspace(tmp_path))
    assert processes_left(poc_workspace(tmp_path)) == []


def test_env_poc_with_min_clients_goes_on_without_a_failed_site(small_root, tmp_path):
    # Also the plain `--env poc` run: the job on a POC of its own, its workspace downloaded, the POC removed.
    result = run_job(
        "--env", "poc", "--n_clients", "3", "--nproc_per_node", "1", "--min_clients", "2", "--num_rounds", "3",
        "--data_root", small_root, "--workspace", str(tmp_path / "ws"), timeout=600,
        DDP_EXAMPLE_FAULT="site-3:0:1:kill", **own_poc(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ended with status FINISHED:COMPLETED" in result.stdout
    assert "site-3 dropped out in round 1 (site-3 rank 0 failed (exit code -9 (SIGKILL)))" in result.stdout
    (result_dir,) = [os.path.join(tmp_path, "ws", JOB_NAME, d) for d in os.listdir(tmp_path / "ws" / JOB_NAME)]
    with open(os.path.join(result_dir, "workspace", "metrics", "round_metrics.jsonl")) as f:
        assert [len(json.loads(line)["sites"]) for line in f] == [3, 2, 2]
    load_global_model(os.path.join(result_dir, "workspace", "app_server", "FL_global_model.pt"))
    assert not os.path.exists(poc_workspace(tmp_path))
    assert processes_left(poc_workspace(tmp_path)) == []


def test_sigterm_to_job_py_ends_its_poc_and_keeps_the_job(small_root, tmp_path):
    poc = poc_workspace(tmp_path)
    job = subprocess.Popen(
        job_command("--env", "poc", *ONE_SITE, "--num_rounds", "4", "--data_root", small_root, "--workspace",
                    str(tmp_path / "ws")),
        cwd=ROOT, env=venv_env(**own_poc(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        server_logs = os.path.join(poc, POC_PROJECT, "server", "*", "log.txt")
        wait_for_log_lines(server_logs, "Sending task train", 2, timeout=300)  # round 1 has started
        sent = time.monotonic()
        job.send_signal(signal.SIGTERM)
        # 18-22 s here, most of it NVFlare's abort and POC stop; CI, with the other worker's run beside it, took over
        # 30 s once. The bound is docs/failures.md's for POC: a job.py that hangs still fails it.
        _, stderr = job.communicate(timeout=POC_END)
        assert processes_left(poc, grace=POC_END - (time.monotonic() - sent)) == []
    finally:
        if job.poll() is None:  # the test failed before job.py ended: leave no POC behind
            job.kill()
            end_poc(poc)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert not os.path.exists(poc)
    stop = stderr.strip().splitlines()[-1]
    assert stop.startswith("ERROR: the job was stopped by SIGTERM in round ") and " is kept: " in stop, stderr[-3000:]
    load_global_model(stop.split(" is kept: ")[1])


def test_sigkill_to_job_py_ends_its_poc(small_root, tmp_path):
    poc = poc_workspace(tmp_path)
    job = subprocess.Popen(
        job_command("--env", "poc", *ONE_SITE, "--num_rounds", "50", "--data_root", small_root, "--workspace",
                    str(tmp_path / "ws")),
        cwd=ROOT, env=venv_env(**own_poc(tmp_path)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        server_logs = os.path.join(poc, POC_PROJECT, "server", "*", "log.txt")
        wait_for_log_lines(server_logs, "Sending task train", 2, timeout=300)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=10)
        left = processes_left(poc, grace=POC_END)
        gone = not os.path.exists(poc)
    finally:
        job.kill()
        end_poc(poc)  # if the test failed: leave no POC behind
    assert left == []
    assert gone


# Runs job.py as `python job.py ARGS` does, after making one call of a library it uses send a signal to job.py
# first: a signal at exactly that stage of the run. argv: MODULE:ATTRIBUTE SIGNUM job.py ARGS...
SIGNAL_AT_CALL = """
import importlib, os, runpy, sys
target, signum = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
module, attribute = target.split(":")
*path, name = attribute.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)

def signal_first(*args, **kwargs):
    setattr(owner, name, original)
    os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

setattr(owner, name, signal_first)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "call, signum, message",
    [
        # POC started, the job not yet submitted; the terminal closed.
        ("nvflare.recipe.session_mgr:SessionManager.submit_job", signal.SIGHUP, "before it was submitted"),
        # The job has finished, and job.py copies what it left (Ctrl-C).
        ("shutil:copytree", signal.SIGINT, "after the job had finished"),
        # job.py stops its POC (SIGTERM).
        ("nvflare.recipe.poc_env:PocEnv.stop", signal.SIGTERM, "after the job had finished"),
    ],
)
def test_a_signal_at_any_stage_of_env_poc_leaves_no_poc(call, signum, message, small_root, tmp_path):
    poc = poc_workspace(tmp_path)
    args = ["--env", "poc", *ONE_SITE, "--num_rounds", "1", "--data_root", small_root, "--workspace",
            str(tmp_path / "ws")]  # fmt: skip
    command = job_command(*args)
    script = command.index(os.path.join(ROOT, "job.py"))  # python SIGNAL_AT_CALL CALL SIGNUM job.py ARGS
    command[script:script] = ["-c", SIGNAL_AT_CALL, call, str(int(signum))]
    try:
        result = subprocess.run(
            command,
            cwd=ROOT, env=venv_env(**own_poc(tmp_path)), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        left, poc_left = processes_left(poc), os.path.exists(poc)
        end_poc(poc)  # if the test failed: leave no POC behind
    assert result.returncode == 128 + signum, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ERROR: the job was stopped by {signal.Signals(signum).name} {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert left == [] and not poc_left


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    with poc_system(tmp_path_factory.mktemp("poc")) as system:
        yield system


@pytest.mark.xdist_group("poc")  # the tests of one POC run in one worker, which starts it once
def test_exported_job_completes_on_poc_through_the_cli(poc, small_root, tmp_path):
    # Sharded sites, and weights quantized both ways: the filters travel in the job's config.
    job_dir = export_job(small_root, tmp_path / "export", "--fsdp", "--quantize_mode", "blockwise8")
    with open(os.path.join(job_dir, "app_site-1", "config", "config_fed_client.json")) as f:
        config = f.read()
    assert "--fsdp" in config and "quantize.Dequantize" in config and "quantize.Quantize" in config
    submitted = poc.nvflare("job", "submit", "-j", job_dir, "--startup-kit", poc.kit, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"job_id: (\S+)", submitted.stdout + submitted.stderr).group(1)

    waited = poc.nvflare("job", "wait", job_id, "--timeout", "600", "--startup-kit", poc.kit, timeout=660)
    assert "FINISHED:COMPLETED" in waited.stdout + waited.stderr, waited.stdout + waited.stderr
    downloaded = poc.nvflare("job", "download", job_id, "-o", str(tmp_path / "result"), "--startup-kit", poc.kit)
    assert downloaded.returncode == 0, downloaded.stdout + downloaded.stderr
    assert_finished(str(tmp_path / "result" / job_id / "workspace"), rounds=ROUNDS)
    total = sum(t.numel() for t in Net().parameters())
    # The server's job process and each site's take the slow-link streaming settings, every one of them the job's.
    settings = re.compile(
        r"SlowLinkStreaming - INFO - streaming settings for slow links: \{.+\}; the system's own: \[\]"
    )
    logs = {"server": str(tmp_path / "result" / job_id / "workspace" / "log.txt")}  # the server's, downloaded
    logs.update((site, os.path.join(poc.project, site, job_id, "log.txt")) for site in ("site-1", "site-2"))
    for participant, path in logs.items():
        with open(path) as f:
            assert settings.search(f.read()), participant  # all of them set by the job
    for site in ("site-1", "site-2"):  # where docs/deploy.md says the site logs are
        with open(os.path.join(poc.project, site, job_id, "log.txt")) as f:
            log = f.read()
        assert re.search(r"Quantize - INFO .* tensors quantized to blockwise8: [\d,]+ -> ", log)  # its results
        held = re.search(rf"{site}: FSDP2 shards the model: rank 0 holds (\d+) of its (\d+) parameters", log)
        assert held and int(held[2]) == total
        assert total / 2 <= int(held[1]) <= total / 2 + 100  # each layer's weights split over 2 ranks (rounded up)


@pytest.mark.xdist_group("poc")
def test_env_prod_submits_to_the_running_system(poc, small_root, tmp_path):
    result = run_job(
        "--env", "prod", "--startup_kit", poc.kit, "--num_rounds", "2", "--data_root", small_root,
        "--workspace", str(tmp_path), timeout=600, net=poc.net,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ended with status FINISHED:COMPLETED" in result.stdout
    assert "final global model: after round 1" in result.stdout


@pytest.mark.xdist_group("poc")
def test_env_poc_refuses_to_replace_a_running_poc(poc, small_root, tmp_path):
    result = run_job(
        "--env", "poc", "--data_root", small_root, "--workspace", str(tmp_path), timeout=120, net=poc.net,
        NVFLARE_POC_WORKSPACE=poc.workspace,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"ERROR: a POC workspace exists at {poc.workspace}" in result.stderr
    assert poc.nvflare("job", "list", "--startup-kit", poc.kit, timeout=60).returncode == 0  # still up

"""Faults at every phase: `python job.py` must end non-zero and soon, name the site, the rank and the
phase, keep the last complete global model, and leave no process behind. So must a stuck rank, and
a SIGTERM or Ctrl-C to job.py itself.

The faults come from outside the trainer: with DDP_EXAMPLE_FAULT=SITE:RANK:PHASE:KIND set, tests/inject_fault's
sitecustomize makes that rank fail. PHASE is `start` (after torchrun started, before the handshake), a round number,
or `eval` (the final evaluation); KIND is kill (SIGKILL that rank), raise (an exception), stop (SIGSTOP: the rank
hangs) or kill_torchrun (SIGKILL the site's torchrun). Several faults are comma-separated.

The runs that need not learn train on the small synthetic set: what is tested is the phase, not the data.
"""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from conftest import (
    ROOT,
    assert_learns,
    free_ports,
    job_command,
    processes_left,
    processes_of,
    round_metrics,
    run_job,
    venv_env,
    wait_for_log_lines,
)
from job import DEFAULT_LINK_MBIT, JOB_NAME, load_global_model, transfer_timeout
from local_run.results import log_times
from model import Net

pytestmark = pytest.mark.e2e  # real runs of job.py or nvflare: the full tier only

ROUNDS = 2
PHASES = {  # PHASE: (how the summary names it, the round whose global model is kept)
    "start": ("during start-up", None),
    "1": (f"in round 1 of {ROUNDS}", 0),
    "eval": ("in the final evaluation", ROUNDS - 1),
}
# site-2, whose rank 1 most tests make fail, has the 2 ranks that needs; site-1, which the job must stop as well, has 1
# (a rank less to start).
FAULTY_SITE_2 = ["--nproc_per_node", "1,2"]
KINDS = {  # KIND: (the rank it hits, the cause the summary gives for SITE)
    "kill": (1, "{site} rank 1 failed (exit code -9 (SIGKILL))"),
    "kill_torchrun": (0, "{site}'s torchrun ended (rc=-9) before it sent a result"),
}


def model_path(workspace: str) -> str:
    return os.path.join(workspace, JOB_NAME, "server", "simulate_job", "app_server", "FL_global_model.pt")


def assert_kept(stderr: str, workspace: str, kept_round: int | None) -> None:
    if kept_round is None:
        assert "no round finished, so no global model was saved" in stderr
    else:
        assert f"the global model after round {kept_round} is kept: {model_path(workspace)}" in stderr
        load_global_model(model_path(workspace))


@pytest.mark.parametrize(
    # A rank killed (as by the OOM killer) or a site's torchrun killed, in each phase. A raise takes client.py's own
    # handler in every phase: in a round it is test_below_min_clients_the_job_ends_naming_the_sites_it_lost's, and a
    # trainer of your own that raises in each phase is test_your_own_trainer.py's.
    "phase, kind",
    [(phase, kind) for kind in ("kill", "kill_torchrun") for phase in PHASES],
)
def test_fault_ends_the_job_naming_site_rank_and_phase(phase, kind, small_root, tmp_path):
    site = "site-2"
    rank, cause = KINDS[kind]
    said, kept_round = PHASES[phase]
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", str(ROUNDS), *FAULTY_SITE_2, "--data_root", small_root, "--workspace", workspace,
        "--master_port", str(free_ports(3)), timeout=300, DDP_EXAMPLE_FAULT=f"{site}:{rank}:{phase}:{kind}",
    )  # fmt: skip
    ended = time.time()

    assert result.returncode == 1, result.stderr[-3000:]
    injected = log_times(os.path.join(workspace, JOB_NAME, site, "log.txt"), "injecting fault")
    assert injected and ended - injected[0] < 60
    assert f"ERROR: the job stopped {said}: {cause.format(site=site)}. Logs: " in result.stderr
    assert_kept(result.stderr, workspace, kept_round)
    assert processes_of(workspace) == []


@pytest.mark.parametrize("phase", ["1", "send", "eval"])
def test_fsdp_rank_killed_in_a_round_in_the_gather_or_in_the_evaluation_ends_the_job(phase, small_root, tmp_path):
    # `1`: as round 1's task arrives, before its weights go into the shards; `send`: as round 1's result is sent,
    # while rank 0 waits in the gather of the full weights; `eval`: as the final evaluation's VALIDATE task arrives,
    # while rank 0 runs the sharded model's forward, which gathers each layer from every rank.
    workspace = str(tmp_path)
    result = run_job(
        "--fsdp", "--num_rounds", str(ROUNDS), *FAULTY_SITE_2, "--data_root", small_root, "--workspace", workspace,
        "--master_port", str(free_ports(3)), timeout=300, DDP_EXAMPLE_FAULT=f"site-2:1:{phase}:kill",
    )  # fmt: skip
    ended = time.time()

    said, kept_round = PHASES["1" if phase == "send" else phase]
    assert result.returncode == 1, result.stderr[-3000:]
    injected = log_times(os.path.join(workspace, JOB_NAME, "site-2", "log.txt"), "injecting fault")
    assert injected and ended - injected[0] < 60
    assert f"ERROR: the job stopped {said}: site-2 rank 1 failed (exit code -9 (SIGKILL)). " in result.stderr
    assert_kept(result.stderr, workspace, kept_round)
    assert processes_of(workspace) == []


def test_stuck_rank_ends_its_site_after_the_stall_timeout(small_root, tmp_path):
    workspace = str(tmp_path)
    result = run_job(
        "--num_rounds", str(ROUNDS), *FAULTY_SITE_2, "--stall_timeout", "10", "--data_root", small_root,
        "--workspace", workspace, "--master_port", str(free_ports(3)), timeout=300, DDP_EXAMPLE_FAULT="site-2:1:1:stop",
    )  # fmt: skip
    ended = time.time()

    assert result.returncode == 1, result.stderr[-3000:]
    stopped = log_times(os.path.join(workspace, JOB_NAME, "site-2", "log.txt"), "injecting fault")
    assert stopped and 10 <= ended - stopped[0] < 10 + 30
    assert (
        f"ERROR: the job stopped in round 1 of {ROUNDS}: site-2 rank 0: ERROR: a peer rank did not answer within "
        "--stall_timeout 10 s: it is stuck or stopped" in result.stderr
    )
    assert_kept(result.stderr, workspace, 0)
    assert processes_of(workspace) == []


@pytest.mark.parametrize(
    "signum, phase, wait_for, kept_round, fault",
    [
        # Ctrl-C while the sites' trainers start; SIGTERM (kill, a scheduler, a CI timeout) in round 1.
        (signal.SIGINT, "during start-up", ("site-1", "launching external trainer", 1), None, ""),
        (signal.SIGTERM, f"in round 1 of {ROUNDS}", ("server", "Sending task train", 2), 0, ""),
        # SIGHUP (the terminal closed) in the final evaluation, which a stopped rank holds open until then.
        (signal.SIGHUP, "in the final evaluation", ("site-1", "injecting fault", 1), ROUNDS - 1, "site-1:1:eval:stop"),
    ],
)
def test_signal_to_job_py_ends_every_process_it_started(
    signum, phase, wait_for, kept_round, fault, small_root, tmp_path
):
    workspace = str(tmp_path)
    job = subprocess.Popen(
        job_command("--num_rounds", str(ROUNDS), "--nproc_per_node", "2,1", "--data_root", small_root,
                    "--workspace", workspace, "--master_port", str(free_ports(3))),
        cwd=ROOT, env=venv_env(DDP_EXAMPLE_FAULT=fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        site, text, count = wait_for
        wait_for_log_lines(os.path.join(workspace, JOB_NAME, site, "log.txt"), text, count, timeout=120)
        sent = time.monotonic()
        job.send_signal(signum)
        _, stderr = job.communicate(timeout=30)
        assert processes_left(workspace, grace=30 - (time.monotonic() - sent)) == []
    finally:
        job.kill()
    assert job.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert f"ERROR: the job was stopped by {name} {phase}; " in stderr
    assert_kept(stderr, workspace, kept_round)
    assert stderr.strip().splitlines()[-1].startswith("ERROR: the job was stopped"), stderr[-3000:]


def test_sigkill_of_the_server_mid_round_is_named_in_the_last_line_and_blames_no_site(small_root, tmp_path):
    # Round 1 is held open by a stopped rank (SIGSTOP), so the server dies mid-round, as under the OOM killer.
    workspace = str(tmp_path)
    server_log = os.path.join(workspace, JOB_NAME, "server", "log.txt")
    job = subprocess.Popen(
        job_command("--num_rounds", str(ROUNDS), "--nproc_per_node", "1", "--data_root", small_root,
                    "--workspace", workspace),
        cwd=ROOT, env=venv_env(DDP_EXAMPLE_FAULT="site-1:0:1:stop"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for_log_lines(os.path.join(workspace, JOB_NAME, "site-1", "log.txt"), "injecting fault", 1, 180)
        server = [p.pid for p in psutil.process_iter() if any(f.path == server_log for f in safe_open_files(p))]
        assert len(server) == 1
        os.kill(server[0], signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    killed = f"NVFlare's server process (pid {server[0]}) failed (exit code -9 (SIGKILL))"
    assert last.startswith(f"ERROR: the job stopped in round 1 of {ROUNDS}: {killed}. Logs: "), stderr[-3000:]
    assert_kept(stderr, workspace, 0)
    assert processes_left(workspace) == []


NET_BYTES = f"{sum(t.numel() * t.element_size() for t in Net().state_dict().values()):,}"
SLOW_LINK_HINT = r" \(a slow link\? docs/performance\.md, Slow links\)\. Logs: "
GAVE_UP = {  # the direction that fails: what the last line says of it
    "download": r"site-1: the task's weights did not arrive \(server -> site-1\): the server put out ([\d,]+) bytes in "
    r"([\d.]+) s, then NVFlare gave up: error requesting data from server\.simulate_job after [\d.]+ secs: timeout",
    "upload": rf"site-1: its result of {NET_BYTES} bytes did not arrive \(site-1 -> server\): ([\d.]+) s after the "
    r"trainer sent it, NVFlare gave up: error requesting data from site-1\.simulate_job\.client_api_trainer_1 after "
    r"[\d.]+ secs: timeout",
}


@pytest.mark.parametrize("direction", GAVE_UP)
def test_a_transfer_nvflare_gives_up_on_ends_the_job_naming_site_direction_bytes_and_time(
    direction, small_root, tmp_path
):
    # Each of NVFlare's requests times out at once (tests/inject_fault), as over a link too slow for them: after its
    # retries (2 + 4 + 8 s apart) NVFlare gives up on the task's weights in the trainer, or on its result in the server.
    workspace = str(tmp_path)
    job = run_job(
        "--num_rounds", "1", "--epochs", "1", "--n_clients", "1", "--nproc_per_node", "1", "--data_root", small_root,
        "--workspace", workspace, timeout=300, DDP_EXAMPLE_TRANSFER_FAILS=direction,
    )  # fmt: skip
    assert job.returncode == 1, job.stderr[-3000:]
    last = job.stderr.strip().splitlines()[-1]
    said = re.fullmatch(rf"ERROR: the job stopped in round 0 of 1: {GAVE_UP[direction]}{SLOW_LINK_HINT}.*", last)
    assert said, job.stderr[-3000:]
    *sent, seconds = said.groups()
    assert float(seconds) >= 14  # the retries' waits: the time is the transfer's, not a request's
    if sent:  # the server's count: the task's weights at least once
        assert int(sent[0].replace(",", "")) >= int(NET_BYTES.replace(",", ""))
    assert_kept(job.stderr, workspace, None)
    assert processes_left(workspace) == []


def test_a_download_that_fails_after_nvflare_forgot_the_task_ends_the_job_after_the_sites_wait(small_root, tmp_path):
    # NVFlare 2.9's site client forgets a task it sent its trainer 300 s after it went, and the failure of a trainer's
    # download that came later was never heard: the client waited for the trainer to take the task forever (the hang
    # over a slow link, NVFlare's stock job's too). Forced here: the client forgets at once, and the download gives
    # up after its retries (2 + 4 + 8 s). The site's wait for its task's weights (job.py's task_wait_timeout) ends it.
    workspace = str(tmp_path)
    job = run_job(
        "--num_rounds", "1", "--epochs", "1", "--n_clients", "1", "--nproc_per_node", "1", "--data_root", small_root,
        "--workspace", workspace, timeout=600, DDP_EXAMPLE_TRANSFER_FAILS="late_download",
    )  # fmt: skip
    assert job.returncode == 1, job.stderr[-3000:]
    last = job.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"ERROR: the job stopped in round 0 of 1: {GAVE_UP['download']}{SLOW_LINK_HINT}.*", last), last
    with open(os.path.join(workspace, JOB_NAME, "site-1", "log.txt")) as f:
        log = f.read()
    assert "Ignored uncorrelated stream error" in log  # the trainer's failure came too late to be heard
    wait = transfer_timeout(Net(seed=0), 1, DEFAULT_LINK_MBIT)
    assert f"TASK_READY timed out after {wait}s" in log  # the site's wait ended it
    assert_kept(job.stderr, workspace, None)
    assert processes_left(workspace) == []


def safe_open_files(process: psutil.Process) -> list:
    try:
        return process.open_files()
    except psutil.Error:  # it ended, or is not ours to read
        return []


MIN_CLIENTS_RUN = ["--n_clients", "3", "--nproc_per_node", "1", "--min_clients", "2"]


def run_min_clients_job(data_root: str, workspace: str, rounds: int, fault: str) -> subprocess.CompletedProcess:
    """3 sites x 1 rank, --min_clients 2, with DDP_EXAMPLE_FAULT=fault."""
    return run_job(
        "--num_rounds", str(rounds), *MIN_CLIENTS_RUN, "--master_port", str(free_ports(3)), "--data_root", data_root,
        "--workspace", workspace,
        timeout=300, DDP_EXAMPLE_FAULT=fault,
    )  # fmt: skip


def site_lists(workspace: str) -> list[list[str]]:
    return [sorted(s["name"] for s in r["sites"]) for r in round_metrics(workspace)]


def test_with_min_clients_a_failed_site_drops_out_and_the_others_finish(synthetic_root, tmp_path):
    workspace = str(tmp_path)
    result = run_min_clients_job(synthetic_root, workspace, 3, "site-3:0:1:kill")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "site-3 dropped out in round 1 (site-3 rank 0 failed (exit code -9 (SIGKILL))); "
        "rounds 1-2 averaged 2 of 3 sites" in result.stdout
    )
    assert site_lists(workspace) == [["site-1", "site-2", "site-3"], ["site-1", "site-2"], ["site-1", "site-2"]]
    assert_learns(round_metrics(workspace))
    assert "final global model: after round 2" in result.stdout
    with open(os.path.join(workspace, JOB_NAME, "server", "log.txt")) as f:
        # The final evaluation asks only the sites that are left (LiveSitesEvaluation): NVFlare's own would send
        # site-3 a validate task too, and log its failure as ERRORs and tracebacks.
        assert [line for line in f if "peer=site-3" in line and "task_name=validate" in line] == []
    assert processes_of(workspace) == []


def test_below_min_clients_the_job_ends_naming_the_sites_it_lost(small_root, tmp_path):
    workspace = str(tmp_path)
    result = run_min_clients_job(small_root, workspace, 3, "site-2:0:1:raise,site-3:0:1:kill")

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "ERROR: the job stopped in round 1 of 3: site-2 rank 0: ERROR: RuntimeError: injected fault; "
        "site-3 rank 0 failed (exit code -9 (SIGKILL)); fewer than --min_clients 2 sites were left. Logs: "
    ) in result.stderr
    assert_kept(result.stderr, workspace, 0)
    assert processes_of(workspace) == []


@pytest.mark.parametrize(
    "phase, said, kept_round", [("start", "during start-up", None), ("eval", "in the final evaluation", 1)]
)
def test_with_min_clients_a_failure_outside_the_rounds_still_ends_the_job(
    phase, said, kept_round, small_root, tmp_path
):
    # Before its handshake a site can't drop out (the server is never told it ended), and after the rounds the
    # final model would lack its score: both end the job, as without --min_clients.
    workspace = str(tmp_path)
    result = run_min_clients_job(small_root, workspace, 2, f"site-3:0:{phase}:kill")

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ERROR: the job stopped {said}: site-3 rank 0 failed (exit code -9 (SIGKILL)). Logs: " in result.stderr
    assert_kept(result.stderr, workspace, kept_round)
    assert processes_of(workspace) == []


def test_sigkill_to_job_py_in_a_round_leaves_no_process(small_root, tmp_path):
    # SIGKILL can't be handled (nor can the OOM killer or a CI runner's hard timeout): local_run/keeper.py, which
    # job.py starts in a session of its own, sees job.py's end and ends what it had started.
    workspace = str(tmp_path)
    job = subprocess.Popen(
        job_command("--num_rounds", "300", "--data_root", small_root, "--workspace", workspace),
        cwd=ROOT, env=venv_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_log_lines(os.path.join(workspace, JOB_NAME, "server", "log.txt"), "Sending task train", 3, 120)
        assert processes_of(workspace)  # the run is training: round 2 has started
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=10)
        assert processes_left(workspace, grace=30) == []
    finally:
        job.kill()

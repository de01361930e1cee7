import os
import signal
import subprocess
import sys

import pytest

from local_run import results
from local_run.results import back_to_chance, diagnose, dropouts, failure_phase, summarize, worst_dip

ROOT_CAUSE = """2026-11-27 05:45:39,772 - ExternalProcessBackend - INFO - Root Cause (first observed failure):
2026-11-27 05:45:39,772 - ExternalProcessBackend - INFO - [0]:
2026-11-27 05:45:39,773 - ExternalProcessBackend - INFO -   rank      : 1 (local_rank: 1)
2026-11-27 05:45:39,773 - ExternalProcessBackend - INFO -   exitcode  : -9 (pid: 7626){suffix}
2026-11-27 05:45:39,773 - ExternalProcessBackend - INFO -   error_file: <N/A>
"""


def write_log(root, site: str, text: str) -> str:
    os.makedirs(root / site, exist_ok=True)
    (root / site / "log.txt").write_text(text)
    return str(root)


@pytest.mark.parametrize("suffix", ["  (SIGKILL)", " "])  # torch 2.14 names the signal, torch 2.11 does not
@pytest.mark.parametrize("kernel_log", ["readable", "unreadable"])  # as root; as a normal user
def test_a_killed_rank_is_named_with_its_signal(tmp_path, suffix, kernel_log, monkeypatch):
    # A machine without OOM kills during the run: the real one's counts and log change as the suite's own OOM kill
    # (below) runs, which made this test fail when that kill came first on the same worker.
    if kernel_log == "unreadable":
        monkeypatch.setattr(results, "killed_for_memory", lambda pid: None)
        monkeypatch.setattr(results, "OOM_KILLS_AT_START", 3)
        monkeypatch.setattr(results, "oom_kills", lambda: 3)
    else:
        monkeypatch.setattr(results, "kernel_log", lambda: "[ 1.000000] a kernel log without an OOM kill\n")
    logs = write_log(tmp_path, "site-2", ROOT_CAUSE.format(suffix=suffix))
    assert diagnose(logs, "site-2") == "site-2 rank 1 failed (exit code -9 (SIGKILL))"


KILL = "[ {t}] Memory cgroup out of memory: Killed process 7626 (python) total-vm:119964kB\n"
MARK = "[ 20.000002] the kernel log's last line as the run began"


@pytest.mark.parametrize(
    "kernel_says, out_of_memory",
    [
        (KILL.format(t="10.000001") + MARK + "\n", False),  # an earlier process with the PID the rank got later
        (KILL.format(t="10.000001") + MARK + "\n" + KILL.format(t="30.000003"), True),
        (KILL.format(t="30.000003"), True),  # the run's first line has left the kernel's ring: all of it is new
    ],
)
def test_only_an_oom_kill_during_the_run_counts(tmp_path, monkeypatch, kernel_says, out_of_memory):
    monkeypatch.setattr(results, "KERNEL_LOG_AT_START", MARK)
    monkeypatch.setattr(results, "kernel_log", lambda: kernel_says)
    said = diagnose(write_log(tmp_path, "site-2", ROOT_CAUSE.format(suffix="")), "site-2")
    assert said.startswith("site-2 rank 1 failed (exit code -9 (SIGKILL))")
    assert ("memory ran out" in said) == out_of_memory


def test_the_failed_ranks_own_error_line_is_preferred(tmp_path):
    text = "x - INFO - site-2 rank 1: ERROR: RuntimeError: boom\n" + ROOT_CAUSE.format(suffix="")
    assert diagnose(write_log(tmp_path, "site-2", text), "site-2") == "site-2 rank 1: ERROR: RuntimeError: boom"


LOST = "RuntimeError: [pair.cc:545] Read error [127.0.0.1]:46988: Connection reset by peer."
FAILED_TOO = ROOT_CAUSE.replace("Root Cause (first observed failure)", "Failures")


@pytest.mark.parametrize("other", ["raised", "killed"])
def test_a_rank_that_only_lost_its_peer_is_not_the_cause_when_torchrun_names_it(tmp_path, other):
    # Rank 1 failed, rank 0 lost it within the same second: torchrun's failure times are whole seconds, and it names
    # the lower rank of a tie (seen in CI).
    first = ROOT_CAUSE.replace("1 (local_rank: 1)", "0 (local_rank: 0)").replace("-9 (pid: 7626){suffix}", "1")
    if other == "raised":
        text = f"x - INFO - site-2 rank 1: ERROR: ValueError: no round\nx - INFO - site-2 rank 0: ERROR: {LOST}\n"
        text += FAILED_TOO.replace("-9 (pid: 7626){suffix}", "1") + first
        expected = "site-2 rank 1: ERROR: ValueError: no round"
    else:
        text = f"x - INFO - site-2 rank 0: ERROR: {LOST}\n" + FAILED_TOO.format(suffix="") + first
        expected = "site-2 rank 1 failed (exit code -9 (SIGKILL))"
    assert diagnose(write_log(tmp_path, "site-2", text), "site-2").startswith(expected)


def test_a_lost_peer_is_the_cause_when_no_rank_here_failed_otherwise(tmp_path):
    # A rank on another node was killed: this node's ranks only lost it, and the named rank says so.
    text = f"x - INFO - site-2 rank 0: ERROR: {LOST}\nx - INFO - site-2 rank 1: ERROR: {LOST}\n" + ROOT_CAUSE.replace(
        "-9 (pid: 7626){suffix}", "1"
    )
    assert diagnose(write_log(tmp_path, "site-2", text), "site-2") == f"site-2 rank 1: ERROR: {LOST}"


def test_a_rank_that_raised_without_a_line_of_its_own_is_named_from_torchs_traceback(tmp_path):
    # A trainer of the user's own that raised before flare_ddp.init(): torch leads each traceback line with the rank.
    text = (
        "x - INFO - [rank0]: Traceback (most recent call last):\n"
        'x - INFO - [rank1]:   File "my_trainer.py", line 9, in <module>\n'
        "x - INFO - [rank1]:     raise ValueError('no data: x')\n"
        "x - INFO - [rank1]: ValueError: no data: x\n"
        "x - INFO - [rank0]: torch.distributed.DistBackendError: peer gone\n"
    ) + ROOT_CAUSE.replace("-9 (pid: 7626){suffix}", "1 (pid: 7626)")
    assert diagnose(write_log(tmp_path, "site-2", text), "site-2") == "site-2 rank 1: ERROR: ValueError: no data: x"


def test_what_the_servers_workflow_raised_is_named_when_no_site_failed(tmp_path, capsys):
    server_log = tmp_path / "server.log"
    server_log.write_text(
        "x - MergingFedAvg - ERROR - [identity=simulator_server] - Exception in model controller run: RuntimeError: "
        "round 0: site-2 sent 'x', which the global model does not have; send the model's own names\n"
    )
    logs = write_log(tmp_path, "site-1", "")
    assert summarize(str(tmp_path / "server"), str(server_log), ["site-1"], 1, logs) == 1
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "ERROR: the job stopped in round 0 of 1: the server stopped the job: round 0: site-2 sent 'x', which the "
            "global model does not have; send the model's own names. Logs: "
        )
    )


def test_what_a_site_logs_after_the_server_ended_its_run_is_no_cause(tmp_path):
    text = "x - INFO - server asked to end the run\nx - INFO - site-1 rank 0: ERROR: RuntimeError: late\n"
    assert diagnose(write_log(tmp_path, "site-1", text), "site-1") is None


# What site-1's client logged when NVFlare 2.9.0's simulator set it up under site-2's name (seen here).
MIXED_UP = (
    "2026-11-30 14:32:32,586 - ClientRunner - ERROR - [identity=site-2, run=simulate_job] - Stopped ClientRunner "
    "due to FATAL_SYSTEM_ERROR: ClientAPIExecutor cannot start: backend for execution_mode 'external_process' "
    "failed to initialize: FileNotFoundError: [Errno 2] No such file or directory: "
    "'/ws/site-1/simulate_job/app_site-2/.client_api_bootstrap-judqrhth.tmp'\n"
)


def test_a_site_nvflare_could_not_start_is_named_with_nvflares_reason(tmp_path, capsys):
    logs = write_log(tmp_path, "site-1", MIXED_UP)
    write_log(tmp_path, "site-2", "2026-11-30 14:32:31,000 - X - INFO - launching external trainer\n")
    assert summarize(str(tmp_path / "server"), str(tmp_path / "server.log"), ["site-1", "site-2"], 1, logs) == 1
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(  # the run's last line
            "ERROR: the job stopped during start-up: site-1: NVFlare could not start the trainer: ClientAPIExecutor "
            "cannot start: backend for execution_mode 'external_process' failed to initialize: FileNotFoundError: "
            "[Errno 2] No such file or directory: '/ws/site-1/simulate_job/app_site-2/"
        )
    )


def test_phase_is_start_up_until_the_trainer_shook_hands(tmp_path):
    logs = write_log(tmp_path, "site-1", "2026-11-27 05:45:39,772 - X - INFO - launching external trainer\n")
    assert failure_phase(logs, ["site-1"], 0, 3) == "during start-up"
    write_log(tmp_path, "site-1", "2026-11-27 05:45:39,772 - X - INFO - trainer session established: launch=1\n")
    assert failure_phase(logs, ["site-1"], 0, 3) == "in round 0 of 3"
    assert failure_phase(logs, ["site-1"], 3, 3) == "in the final evaluation"


def test_a_dip_counts_from_the_settled_rounds_on():
    # Near chance, before round 3, the accuracy may wander; after it, a fall below the best so far is a dip.
    assert worst_dip([0.14, 0.10, 0.09, 0.30, 0.60, 0.90]) == 0.0
    assert worst_dip([0.08, 0.13, 0.29, 0.63, 0.77, 0.80, 0.94, 0.60, 0.96]) == pytest.approx(0.34)
    assert worst_dip([0.10, 0.20]) == 0.0


def test_a_loss_back_near_chance_after_learning_is_a_collapse():
    assert back_to_chance([2.30, 2.29, 2.26, 2.16, 1.41, 2.59, 1.99])  # the old defaults, small preset, seed 1
    assert not back_to_chance([2.30, 2.29, 2.28, 2.27, 2.25, 2.10])  # slow, but never learned and lost it
    assert not back_to_chance([2.30, 1.60, 1.45, 1.70, 0.90])  # a rise, but nowhere near chance


def test_a_site_missing_from_every_later_round_dropped_out():
    rounds = [
        {"round": 0, "sites": [{"name": "site-1"}, {"name": "site-2"}, {"name": "site-3"}]},
        {"round": 1, "sites": [{"name": "site-1"}, {"name": "site-2"}]},
        {"round": 2, "sites": [{"name": "site-1"}, {"name": "site-2"}]},
    ]
    assert dropouts(rounds, ["site-1", "site-2", "site-3"]) == {"site-3": 1}
    assert dropouts(rounds[:1], ["site-1", "site-2", "site-3"]) == {}
    assert dropouts(rounds[1:], ["site-1", "site-2", "site-3"]) == {"site-3": 1}  # gone from the first round on


def test_a_rank_the_kernels_oom_killer_ended_is_said_to_have_run_out_of_memory(tmp_path, monkeypatch):
    """A real out-of-memory kill: a process in a memory cgroup of 100 MB that asks for 1 GB. Root reads the kernel's
    log, which names the process; a normal user, who may not, gets the kernel's count of OOM kills during the run."""
    cgroup = f"/sys/fs/cgroup/memory/ddp_example_oom_{os.getpid()}"
    if not os.path.isdir(os.path.dirname(cgroup)):
        pytest.skip("no cgroup v1 memory controller to make a real OOM kill in")
    if not os.access(os.path.dirname(cgroup), os.W_OK):
        pytest.skip("a real OOM kill needs a memory cgroup of its own, which only root may make")
    monkeypatch.setattr(results, "OOM_KILLS_AT_START", results.oom_kills())
    os.mkdir(cgroup)
    try:
        with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
            f.write(str(100 * 2**20))
        joiner = f"open({os.path.join(cgroup, 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))"
        hog = subprocess.Popen([sys.executable, "-c", f"{joiner}; b = [bytearray(10**7) for _ in range(100)]"])
        assert hog.wait(timeout=60) == -signal.SIGKILL
    finally:
        os.rmdir(cgroup)
    logs = write_log(tmp_path, "site-2", ROOT_CAUSE.format(suffix="").replace("pid: 7626", f"pid: {hog.pid}"))
    assert diagnose(logs, "site-2") == (
        "site-2 rank 1 failed (exit code -9 (SIGKILL)): memory ran out, and the kernel's OOM killer ended it "
        "(docs/performance.md, Large models)"
    )
    # A later run whose rank gets the same PID (they recur: a long CI run wraps pid_max) was not killed for memory.
    monkeypatch.setattr(results, "KERNEL_LOG_AT_START", results.kernel_log().rstrip("\n").rpartition("\n")[2])
    assert diagnose(logs, "site-2") == "site-2 rank 1 failed (exit code -9 (SIGKILL))"
    monkeypatch.setattr(results, "killed_for_memory", lambda pid: None)  # the kernel's log, as a normal user sees it
    assert diagnose(logs, "site-2").startswith(
        "site-2 rank 1 failed (exit code -9 (SIGKILL)): memory likely ran out: the kernel's OOM killer ended "
    )


def test_a_download_nvflare_aborted_as_the_job_ended_blames_no_site(tmp_path):
    # As in a real run: site-2's trainer gave up on its download (the cause); site-1's was aborted as the job ended.
    line = (
        "2026-12-03 23:26:06,863 - ExternalProcessBackend - INFO - failed to download from server.simulate_job for "
        "source {{'fqcn': 'server.simulate_job', 'ref_id': '{ref}'}}: {why}\n"
    )
    write_log(tmp_path, "site-1", line.format(ref="91fc", why="download aborted after 0.003335237503051758 secs"))
    gave_up = "error requesting data from server.simulate_job after 0.0008771419525146484 secs: timeout"
    write_log(tmp_path, "site-2", line.format(ref="01e3", why=gave_up))
    server_log = tmp_path / "server.txt"
    server_log.write_text(
        "2026-12-03 23:25:52,638 - TensorDownloadable - INFO - set transaction info: tx_id='T1', ref_id='01e3' x\n"
        "2026-12-03 23:26:06,766 - _Transaction - INFO - [server] download tx T1 done: status=deleted elapsed=14.13s "
        "size=0.9MB (995,008 bytes)\n"
    )
    assert diagnose(str(tmp_path), "site-1", str(server_log)) is None
    assert diagnose(str(tmp_path), "site-2", str(server_log)) == (
        "site-2: the task's weights did not arrive (server -> site-2): the server put out 995,008 bytes in 14.1 s, "
        "then NVFlare gave up: error requesting data from server.simulate_job after 0.0 secs: timeout (a slow link? "
        "docs/performance.md, Slow links)"
    )


def test_task_weights_still_on_their_way_when_the_sites_wait_ran_out_are_named_with_the_servers_bytes(tmp_path):
    # The server's log gives each site its task, then offers the task's tensors; site-1's client stopped waiting for
    # its trainer to take the task (job.py's task_wait_timeout) while the trainer was still fetching them.
    task = (
        "2026-12-04 15:20:{s},100 - GetTaskCommand - INFO - return task to client.  client_name: {site}  task_name: "
        "train   task_id: {tx}  sharable_header_task_id: {tx}\n"
    )
    offer = "2026-12-04 15:20:{s},101 - TensorDownloadable - INFO - set transaction info: tx_id='{tx}', ref_id='r' x\n"
    done = (
        "2026-12-04 15:25:{s},500 - _Transaction - INFO - [server] download tx {tx} done: status=deleted "
        "elapsed=301.17s size=2.9MB ({n} bytes)\n"
    )
    end = task.format(s=59, site="site-1", tx="").replace("task_name: train", "task_name: __end_run__")
    server_log = tmp_path / "server.txt"
    write_log(
        tmp_path, "site-1", "2026-12-04 15:25:01,000 - ClientAPIExecutor - ERROR - [identity=site-1, run=simulate_job, "
        "task_name=train] - TASK_READY timed out after 300.0s while TASK_READY was pending for task 'train'\n",
    )  # fmt: skip
    said = (
        "site-1: the task's weights did not arrive (server -> site-1): the site's wait for them (task_wait_timeout) "
        "ran out after 300 s{moved} (a link slower than job.py's --link_mbit? docs/performance.md, Slow links)"
    )
    server_log.write_text(
        task.format(s=10, site="site-2", tx="T2") + offer.format(s=10, tx="T2")
        + task.format(s=11, site="site-1", tx="T1") + offer.format(s=11, tx="T1") + end
        + done.format(s=20, tx="T2", n="8,000,000") + done.format(s=21, tx="T1", n="3,000,000")
    )  # fmt: skip
    moved = ", and the server put out 3,000,000 bytes in 301.2 s for them"
    assert diagnose(str(tmp_path), "site-1", str(server_log)) == said.format(moved=moved)
    # Both sites' tasks given before either's tensors were offered: which transaction is whose, the log does not say.
    server_log.write_text(
        task.format(s=10, site="site-2", tx="T2") + task.format(s=11, site="site-1", tx="T1")
        + offer.format(s=11, tx="T2") + offer.format(s=11, tx="T1") + end
        + done.format(s=20, tx="T2", n="8,000,000") + done.format(s=21, tx="T1", n="3,000,000")
    )  # fmt: skip
    assert diagnose(str(tmp_path), "site-1", str(server_log)) == said.format(moved="")


def test_a_result_the_server_did_not_take_within_the_sites_wait_is_named_with_its_bytes_and_time(tmp_path):
    # As in a real run over a shaped link with a 10 s wait: the site sent its result again each time its wait ran out.
    timed_out = (
        "2026-12-04 08:48:{s},153 - SimulatorClientRunManager - ERROR - failed to send task result: timeout\n"
        "2026-12-04 08:48:{s},154 - ClientRunner - ERROR - [identity=site-1, run=simulate_job, peer=simulator_server, "
        "peer_run=simulate_job, task_name=train] - failed to send task result to server - will try again\n"
    )
    write_log(
        tmp_path,
        "site-1",
        "2026-12-04 08:47:59,653 - ExternalProcessBackend - INFO - flare_ddp: train task of round 0: sent 1 tensors, "
        "16,777,216 bytes\n" + timed_out.format(s=30) + timed_out.format(s=50),
    )
    server_log = tmp_path / "server.txt"
    server_log.write_text(
        "2026-12-04 08:51:16,777 - Adapter - CRITICAL - failed to decode streamed submit_update in server job cell "
        "server.simulate_job; exiting job process to fail the job: TypeError: object of type 'NoneType' has no len()\n"
    )
    assert diagnose(str(tmp_path), "site-1", str(server_log)) == (
        "site-1: its result of 16,777,216 bytes did not reach the server in time (site-1 -> server): the site's wait "
        "for the server to take it (submit_task_result_timeout) ran out 2 times in 50.5 s after the trainer sent it "
        "(a link slower than job.py's --link_mbit? docs/performance.md, Slow links)"
    )

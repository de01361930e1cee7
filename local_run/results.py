"""What a run left behind, read back: per-round metrics, final scores, round times from the server
log, the cause of a failure from the sites' logs, and the summary job.py prints."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

from protocol import ERROR, PEER_LOST, STOPPING, rank_line, rank_line_pattern

# Lines of NVFlare's and torchrun's own that the diagnosis reads, checked against nvflare 2.9.0 and torch 2.14.1.
NVFLARE_END_RUN = "server asked to end the run"  # a site's client, when the server ends its run
NVFLARE_TRAINER_EXITED = r"trainer process group exited \(rc=(-?\d+)\)"  # the trainer died before its result
NVFLARE_TASK_SENT = "Sending task train"  # the server, at the start of each round
NVFLARE_MODEL_SAVED = "End persist model on server"  # the server, at the end of each round
NVFLARE_HANDSHAKE = "trainer session established"  # a site, once its trainer's rank 0 has shaken hands
# The server, when its workflow (FedAvg) raised: for example a site's result that does not fit the global model.
NVFLARE_WORKFLOW_FAILED = r"Exception in model controller run: (?:RuntimeError: )?([^\n]*)"
# A site's client when it ends its run by itself, with NVFlare's reason: for example its trainer could not be
# launched, or exited before the handshake. The simulator's server is not told, and would wait for it forever.
NVFLARE_SITE_ENDED = "Stopped ClientRunner due to FATAL_SYSTEM_ERROR"
# Whoever downloads (a site's trainer the task's weights, the server a trainer's result), when NVFlare's download
# gave up: from whom, the transfer's reference, and why ("error requesting data from server.simulate_job after 600.1
# secs: timeout" after its retries; "download aborted after ..." when the job was ending already: not a cause).
NVFLARE_DOWNLOAD_FAILED = re.compile(
    r"failed to download from (\S+) for source \{[^}]*'ref_id': '([^']+)'\}: (.*)$", re.M
)
# The sender of a download (the server for a task's weights), when it offers one and when that download ends.
NVFLARE_TX_OFFERED = r"set transaction info: tx_id='([^']+)', ref_id='{ref}'"
NVFLARE_TX_DONE = r"download tx {tx} done: status=\w+ elapsed=([\d.]+)s size=[^(]*\(([\d,]+) bytes\)"
# A site's client, when its wait for its trainer to take a task ran out (task_wait_timeout: the trainer takes a task
# once it has fetched the task's tensors from the server); the server, as it gives a site a task, whose tensors it
# offers in a transaction right after.
NVFLARE_TASK_WAIT_ENDED = r"TASK_READY timed out after ([\d.]+)s"
NVFLARE_TASK_GIVEN = r"return task to client\.  client_name: (\S+)  task_name: (?!__end_run__)"
# A site's client, each time its wait for the server to take its result (submit_task_result_timeout) ran out: the
# server fetches the result's tensors before it answers. NVFlare then sends the result again.
NVFLARE_RESULT_WAIT_ENDED = "failed to send task result: timeout"
# flare_ddp on rank 0, as it hands a result to NVFlare: "flare_ddp: train task of round 0: sent 10 tensors, 9 bytes".
FLARE_DDP_SENT = r"flare_ddp: \w+ task of round \d+: sent \d+ tensors, ([\d,]+) bytes"
# torch 2.14 ends the exitcode line with "(SIGKILL)", torch 2.11 does not: the signal is named here instead.
TORCHRUN_ROOT_CAUSE = r"Root Cause \(first observed failure\):.*?"
TORCHRUN_FAILURE = r"rank\s*:\s*(\d+) \(local_rank: \d+\).*?exitcode\s*:\s*(-?\d+)(?: \(pid: (\d+)\))?"
# The last line of an exception's traceback, as torch prints it on a rank: "[rank1]: ValueError: ...".
TORCH_RANK_EXCEPTION = r"\[rank{rank}\]: ((?:\w+\.)*\w+: [^\n]*)"
# NVFlare's log lines start with a timestamp such as "2026-11-27 05:30:40,123".
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def read_rounds(server_dir: str) -> list[dict]:
    path = os.path.join(server_dir, "metrics", "round_metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cross_val_path(server_dir: str) -> str:
    """NVFlare's JSON of the evaluation after the last round: {site that scored: {model: {"accuracy": ...}}}."""
    return os.path.join(server_dir, "cross_site_val", "cross_val_results.json")


def read_cross_val(server_dir: str) -> dict[str, dict]:
    path = cross_val_path(server_dir)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_final_scores(server_dir: str) -> dict[str, float]:
    """Each site's test accuracy of the final global model, from the evaluation after the last round."""
    results = read_cross_val(server_dir)
    return {
        site: scores["SRV_FL_global_model.pt"]["accuracy"]
        for site, scores in results.items()
        if "SRV_FL_global_model.pt" in scores
    }


def metric(metrics: list[dict], name: str) -> float:
    """A metric a site reported; NaN where it reported none of that name (a trainer of the user's own)."""
    return next((m["value"] for m in metrics if m["name"] == name), math.nan)


def cross_site_lines(server_dir: str, sites: list[str]) -> list[str]:
    """The matrix of NVFlare's cross-site evaluation (--cross_site_eval): a row a model (each site's own, then the
    server's global models), a column a site that scored it; no lines after a final evaluation of the global
    model alone."""
    results = read_cross_val(server_dir)
    models = sorted({model for scores in results.values() for model in scores}, key=lambda m: (m not in sites, m))
    if not any(model in sites for model in models):
        return []
    width = max(len(m) for m in models)
    lines = [
        f"cross-site evaluation, accuracy of each model (row) on each site's test set: {cross_val_path(server_dir)}"
    ]
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{site:>8}" for site in sites))
    for model in models:
        cells = [results.get(site, {}).get(model, {}).get("accuracy") for site in sites]
        lines.append(f"{model:<{width}}  " + "  ".join("       -" if c is None else f"{c:>8.4f}" for c in cells))
    return lines


def learning_curve(server_dir: str) -> tuple[list[float], list[float]]:
    """(accuracy of the global model after 0, 1, ... rounds, ending with the final model's; mean train loss of
    each round) of a finished run."""
    rounds = read_rounds(server_dir)
    final = read_final_scores(server_dir)
    accuracies = [metric(r["aggregated_metrics"], "accuracy") for r in rounds]
    accuracies += [sum(final.values()) / len(final)] if final else []
    return accuracies, [metric(r["aggregated_metrics"], "train_loss") for r in rounds]


# What "the defaults never collapse" means, measured on a learning curve (docs/defaults.md).
SETTLE_ROUNDS = 3  # dips are counted from the global model after this many rounds on
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 classes


def worst_dip(accuracies: list[float]) -> float:
    """The largest fall of the global accuracy below the best so far, from SETTLE_ROUNDS rounds on."""
    return max(
        [max(accuracies[: r + 1]) - accuracies[r] for r in range(SETTLE_ROUNDS, len(accuracies))] + [0.0],
    )


def back_to_chance(losses: list[float]) -> bool:
    """Whether the training loss climbed back near chance (90% of it) after it had fallen below two thirds of it."""
    learned = [r for r, loss in enumerate(losses) if loss < 2 / 3 * CHANCE_LOSS]
    return bool(learned) and any(loss > 0.9 * CHANCE_LOSS for loss in losses[learned[0] :])


def follow_rounds(server_dir: str, num_rounds: int, done: threading.Event, poll: float = 0.5) -> None:
    """Print a line as each round of a running job finishes, until `done` is set."""
    path = os.path.join(server_dir, "metrics", "round_metrics.jsonl")
    started = last = time.time()  # a file older than this is a previous run's, before the simulator clears it
    shown = 0
    while not done.wait(poll):
        try:
            if os.stat(path).st_mtime < started:
                continue
            rounds = read_rounds(server_dir)
        except (OSError, ValueError):  # not there yet, or a line half written
            continue
        for r in rounds[shown:]:
            now, m = time.time(), r["aggregated_metrics"]
            left = num_rounds - r["round"] - 1
            # Round 0 holds the start-up: only later rounds tell how long the rest will take.
            eta = f", about {left * (now - last):.0f} s" if r["round"] else ""
            what_next = f"{left} round(s) left{eta}" if left else "final evaluation next"
            print(
                f"round {r['round']}: global accuracy {metric(m, 'accuracy'):.4f}, train loss "
                f"{metric(m, 'train_loss'):.4f}, {now - last:.1f} s; {what_next}",
                flush=True,
            )
            last = now
        shown = len(rounds)


def log_times(path: str, text: str) -> list[float]:
    """When (epoch seconds) the log lines that contain `text` were written."""
    lines = read_text(path).splitlines()
    return [stamp for stamp in (log_time(line) for line in lines if text in line) if stamp is not None]


def log_time(line: str) -> float | None:
    """When (epoch seconds) a log line was written, or None if it does not start with NVFlare's timestamp."""
    stamp = LOG_TIME.match(line)
    return stamp and datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def read_text(path: str | None) -> str:
    """A log's text, or "" where there is none."""
    try:
        with open(path or "", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def round_wall_times(server_log: str) -> list[float]:
    """Wall time of each round: from the server sending the train task to saving the new global model."""
    return [
        end - start
        for start, end in zip(log_times(server_log, NVFLARE_TASK_SENT), log_times(server_log, NVFLARE_MODEL_SAVED))
    ]


def diagnose(workspace: str, site: str, server_log: str | None = None) -> str | None:
    """What went wrong on a site, from its log and the server's: torchrun's root-cause report, how the trainer ended,
    or a transfer between the site and the server that NVFlare gave up on."""
    path = os.path.join(workspace, site, "log.txt")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        # Whatever happened after the server ended this site's run is a consequence, not a cause.
        log = f.read().split(NVFLARE_END_RUN)[0]
    if re.search(rank_line_pattern(site, STOPPING, rank="0"), log):  # the server aborted this site's task
        return None
    said = {}  # each rank's own first line
    for line in re.finditer(rank_line_pattern(site, ERROR), log):
        said.setdefault(line.group(1), line.group(0))
    failed = {rank: (int(code), pid and int(pid)) for rank, code, pid in re.findall(TORCHRUN_FAILURE, log, re.S)}
    root = re.search(TORCHRUN_ROOT_CAUSE + TORCHRUN_FAILURE, log, re.S)
    # torchrun's first failure, then the other ranks. A rank that only lost a peer is a cause only when no other rank
    # is: torchrun's failure times are whole seconds, and of two ranks that end together it names the lower.
    ranks = list(dict.fromkeys(([root.group(1)] if root else []) + list(said) + list(failed)))
    rank = next(
        (r for r in ranks if not any(sign in said.get(r, "") for sign in PEER_LOST)), ranks[0] if ranks else None
    )
    if rank in said:
        return said[rank]
    if rank in failed:
        code, pid = failed[rank]
        if code < 0:
            return killed(f"{site} rank {rank}", -code, pid)
        # A trainer of the user's own, raising before flare_ddp.init: torch's traceback, each line led by the rank.
        raised = re.findall(TORCH_RANK_EXCEPTION.format(rank=rank), log)
        if raised:
            return rank_line(site, int(rank), ERROR, raised[-1])
        return f"{site} rank {rank} failed (exit code {code})"
    lost = transfer_failed(site, log, read_text(server_log))
    if lost:
        return lost
    ended = re.search(NVFLARE_TRAINER_EXITED, log)
    if ended:
        return f"{site}'s torchrun ended (rc={ended.group(1)}) before it sent a result"
    fatal = re.search(re.escape(NVFLARE_SITE_ENDED) + r": ([^\n]*)", log)
    if fatal:
        return f"{site}: NVFlare could not start the trainer: {fatal.group(1)}"
    return None


def transfer_failed(site: str, site_log: str, server_log: str) -> str | None:
    """A transfer between `site` and the server that NVFlare gave up on, or a result the server did not take within
    the site's wait, from both logs: its direction, and the bytes and seconds the logs tell of it."""
    hint = "(a slow link? docs/performance.md, Slow links)"
    down = next(gave_up(site_log), None)
    if down:  # the trainer downloads the task's weights from the server
        _, ref, why, _ = down
        offered = re.search(NVFLARE_TX_OFFERED.format(ref=re.escape(ref)), server_log)
        moved = put_out(offered and offered.group(1), server_log)
        moved = f"the server put out {moved}, then " if moved else ""
        return f"{site}: the task's weights did not arrive (server -> {site}): {moved}NVFlare gave up: {why} {hint}"
    waited = re.search(NVFLARE_TASK_WAIT_ENDED, site_log)
    if waited:  # the trainer was still fetching them
        moved = put_out(last_task_offered(site, server_log), server_log)
        return (
            f"{site}: the task's weights did not arrive (server -> {site}): the site's wait for them "
            f"(task_wait_timeout) ran out after {float(waited.group(1)):.0f} s"
            f"{f', and the server put out {moved} for them' if moved else ''} (a link slower than job.py's "
            "--link_mbit? docs/performance.md, Slow links)"
        )
    sent = list(re.finditer(rf"^.*?{FLARE_DDP_SENT}", site_log, re.M))
    result = f"its result of {sent[-1].group(1)} bytes" if sent else "its result"
    start = sent and log_time(sent[-1].group(0))
    up = next((f for f in gave_up(server_log) if f[0].split(".")[0] == site), None)
    if up:  # the server downloads a trainer's result
        _, _, why, when = up
        spent = f" {when - start:.1f} s after the trainer sent it," if start and when else ""
        return f"{site}: {result} did not arrive ({site} -> server):{spent} NVFlare gave up: {why} {hint}"
    waits = re.findall(rf"^.*{NVFLARE_RESULT_WAIT_ENDED}$", site_log, re.M)
    if waits:  # the server was still taking the result each time the site's wait for it ran out
        when = log_time(waits[-1])
        times = f"{len(waits)} time{'s' * (len(waits) > 1)}"
        spent = f" in {when - start:.1f} s after the trainer sent it" if start and when else ""
        return (
            f"{site}: {result} did not reach the server in time ({site} -> server): the site's wait for the server to "
            f"take it (submit_task_result_timeout) ran out {times}{spent} (a link slower than job.py's --link_mbit? "
            "docs/performance.md, Slow links)"
        )
    return None


def put_out(tx: str | None, server_log: str) -> str:
    """What the server put out for its transaction `tx` by its end ("N bytes in S s": its count, repeats included), or
    "" where its log does not say."""
    done = tx and re.search(NVFLARE_TX_DONE.format(tx=re.escape(tx)), server_log)
    return f"{done.group(2)} bytes in {float(done.group(1)):.1f} s" if done else ""


def last_task_offered(site: str, server_log: str) -> str | None:
    """The transaction that offered the tensors of the last task the server gave `site`: the next one its log offers,
    unless it gave another site a task before that (then which is whose, the log does not tell)."""
    tx, giving = None, None
    for line in server_log.splitlines():
        given = re.search(NVFLARE_TASK_GIVEN, line)
        offered = re.search(NVFLARE_TX_OFFERED.format(ref="[^']+"), line)
        if given:
            giving = given.group(1) if giving is None else ""  # "": two sites' tasks at once
        elif offered and giving is not None:
            tx = offered.group(1) if giving == site else tx
            giving = None
    return tx


def gave_up(log: str):
    """NVFlare's downloads in `log` that failed, as (from whom, reference, why, when), leaving out those it aborted
    because the job was ending already."""
    for found in NVFLARE_DOWNLOAD_FAILED.finditer(log):
        source, ref, why = found.groups()
        if "download aborted" in why:
            continue
        why = re.sub(r"\d+\.\d+", lambda n: f"{float(n.group()):.1f}", why)  # "after 0.0008771419525146484 secs"
        yield source, ref, why, log_time(log[log.rfind("\n", 0, found.start()) + 1 :])


def killed(what: str, signum: int, pid: int | None) -> str:
    """A process of the run, `what`, ended by a signal: the signal, and for a SIGKILL of process `pid`, whether memory
    ran out: from the kernel's log where this user may read it (root), otherwise from the kernel's count of OOM
    kills, which anyone may read, against its count when the run began."""
    said = f"{what} failed (exit code -{signum} ({signal.Signals(signum).name}))"
    if signum != signal.SIGKILL or not pid:
        return said
    oom = killed_for_memory(pid)
    if oom:
        return f"{said}: memory ran out, and the kernel's OOM killer ended it (docs/performance.md, Large models)"
    if oom is None:
        now = oom_kills()
        if now is None or OOM_KILLS_AT_START is None:
            return f"{said}, and the kernel's log can't be read here: if memory ran out, `dmesg` says so"
        if now > OOM_KILLS_AT_START:
            return (
                f"{said}: memory likely ran out: the kernel's OOM killer ended {now - OOM_KILLS_AT_START} process(es) "
                "on this machine during the run (`dmesg`, as root, names them; docs/performance.md, Large models)"
            )
    return said


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended since boot (/proc/vmstat, readable by any user)."""
    try:
        with open("/proc/vmstat") as f:
            counts = dict(line.split() for line in f)
    except (OSError, ValueError):
        return None
    return int(counts["oom_kill"]) if "oom_kill" in counts else None


def kernel_log() -> str | None:
    """The kernel's log (dmesg), or None where this user may not read it."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return log.stdout if log.returncode == 0 else None


# As the run begins (job.py imports this module when it starts a local run): the kernel's count of OOM kills, and
# the last line of its log, after which a kill belongs to this run (the log keeps kills from before, and PIDs recur).
OOM_KILLS_AT_START = oom_kills()
KERNEL_LOG_AT_START = ((kernel_log() or "").rstrip("\n").rpartition("\n")[2]) or None


def killed_for_memory(pid: int) -> bool | None:
    """Whether the kernel's log (dmesg) says its OOM killer ended process `pid` during the run; None where it can't
    be read."""
    log = kernel_log()
    if log is None:
        return None
    if KERNEL_LOG_AT_START and KERNEL_LOG_AT_START in log:  # else the line left the kernel's ring: all of it is new
        log = log.rpartition(KERNEL_LOG_AT_START)[2]
    # "Out of memory: Killed process PID (python3) ..." or "Memory cgroup out of memory: Killed process PID ..."
    return re.search(rf"Killed process {pid} \(", log) is not None


def failure_phase(logs_root: str | None, sites: list[str], complete_rounds: int, num_rounds: int) -> str:
    """When a run failed: during start-up (one of `sites` never had its trainer shake hands), in a round,
    or after the rounds."""
    if complete_rounds >= num_rounds:
        return "in the final evaluation"
    for site in sites if logs_root else []:
        if not log_times(os.path.join(logs_root, site, "log.txt"), NVFLARE_HANDSHAKE):
            return "during start-up"
    return f"in round {complete_rounds} of {num_rounds}"


def report_failure(
    server_dir: str,
    sites: list[str],
    num_rounds: int,
    complete_rounds: int,
    logs_root: str | None,
    stopped_by: str | None,
    min_clients: int,
    finished: bool = False,
    server_ended: str | None = None,
    server_log: str | None = None,
) -> None:
    """Which global model is kept, then the error line: what stopped the job, and where. finished: the job itself
    had finished when job.py was stopped; server_ended: how NVFlare's server process ended, if it was killed (then
    no site is blamed: what the sites logged after is a consequence); server_log: where the server's workflow says
    why it stopped, when no site failed."""
    causes = {site: diagnose(logs_root, site, server_log) for site in sites} if logs_root and not server_ended else {}
    failed = [site for site, cause in causes.items() if cause]
    # A stop by signal has no failed site: then any site still starting means start-up.
    phase = (
        "after the job had finished"
        if finished
        else failure_phase(logs_root, sites if stopped_by else failed, complete_rounds, num_rounds)
    )
    model = os.path.join(server_dir, "app_server", "FL_global_model.pt")
    kept = (
        f"the global model after round {complete_rounds - 1} is kept: {model}"
        if complete_rounds and os.path.isfile(model)
        else "no round finished, so no global model was saved"
    )
    if stopped_by:
        print(f"ERROR: the job was stopped by {stopped_by} {phase}; {kept}", file=sys.stderr)
        return
    where = f"{logs_root}/<site>/log.txt" if logs_root else "each site's workspace"
    why = server_ended or "; ".join(causes[site] for site in failed) or workflow_error(server_log)
    why = why or "a site did not report"
    if min_clients < len(sites) and len(sites) - len(failed) < min_clients:
        why += f"; fewer than --min_clients {min_clients} sites were left"
    print(kept, file=sys.stderr)
    print(f"ERROR: the job stopped {phase}: {why}. Logs: {where}", file=sys.stderr)


def workflow_error(server_log: str | None) -> str | None:
    """Why the server's workflow stopped the job, from its log, or None."""
    found = re.search(NVFLARE_WORKFLOW_FAILED, read_text(server_log))
    return found and f"the server stopped the job: {found.group(1)}"


def dropouts(rounds: list[dict], sites: list[str]) -> dict[str, int]:
    """The sites that stopped reporting before the last round: site -> the first round without it."""
    dropped = {}
    for site in sites:
        present = [i for i, r in enumerate(rounds) if site in {s["name"] for s in r["sites"]}]
        last = present[-1] if present else -1
        if last < len(rounds) - 1:
            dropped[site] = rounds[last + 1]["round"]
    return dropped


def summarize(
    server_dir: str,
    server_log: str,
    sites: list[str],
    num_rounds: int,
    logs_root: str | None = None,
    stopped_by: str | None = None,
    min_clients: int | None = None,
    server_ended: str | None = None,
) -> int:
    """Print the results a person wants; 1 if the job did not finish every round and the final evaluation.

    server_dir holds the server's metrics/ and app_server/; logs_root, where known, the sites' logs;
    stopped_by names the signal that stopped job.py, if one did; min_clients, the fewest sites a round may
    average (default: all of them); server_ended, how NVFlare's server process ended if a signal killed it."""
    rounds = read_rounds(server_dir)
    times = round_wall_times(server_log)
    if rounds:
        print("round  global accuracy  mean train loss  round time (s)")
    for r, seconds in zip(rounds, times + [float("nan")] * len(rounds)):
        m = r["aggregated_metrics"]
        print(f"{r['round']:>5}  {metric(m, 'accuracy'):>15.4f}  {metric(m, 'train_loss'):>15.4f}  {seconds:>14.1f}")
    min_clients = min_clients or len(sites)
    complete = [r for r in rounds if len(r["sites"]) >= min_clients]
    dropped = dropouts(rounds, sites) if min_clients < len(sites) else {}
    final_scores = read_final_scores(server_dir)
    finished = len(complete) >= num_rounds and set(final_scores) == set(sites) - set(dropped)
    if stopped_by or server_ended or not finished:
        report_failure(
            server_dir, sites, num_rounds, len(complete), logs_root, stopped_by, min_clients, finished, server_ended,
            server_log,
        )  # fmt: skip
        return 1
    for site, r in dropped.items():
        cause = (diagnose(logs_root, site, server_log) if logs_root else None) or "see its log"
        later = sorted({len(x["sites"]) for x in rounds if x["round"] >= r})
        print(
            f"{site} dropped out in round {r} ({cause}); rounds {r}-{rounds[-1]['round']} averaged "
            f"{' or '.join(map(str, later))} of {len(sites)} sites"
        )
    shards = {s["name"]: metric(s["metrics"], "shard_size") for r in rounds for s in r["sites"]}
    if not any(math.isnan(size) for size in shards.values()):
        print("training shards: " + ", ".join(f"{name} {int(shards[name])}" for name in sites if name in shards))
    print("(global accuracy in round R: the test accuracy of the global model that round R started from)")

    app_dir = os.path.join(server_dir, "app_server")
    best = max(rounds, key=lambda r: metric(r["aggregated_metrics"], "accuracy"))
    made = f"after round {best['round'] - 1}" if best["round"] else "the initial model"
    print(
        f"best global model: {made} (the one round {best['round']} started from), accuracy "
        f"{metric(best['aggregated_metrics'], 'accuracy'):.4f}: {os.path.join(app_dir, 'best_FL_global_model.pt')}"
    )
    final = sum(final_scores.values()) / len(final_scores)
    print(
        f"final global model: after round {rounds[-1]['round']}, accuracy {final:.4f}: "
        f"{os.path.join(app_dir, 'FL_global_model.pt')}"
    )
    for line in cross_site_lines(server_dir, sites):
        print(line)
    return 0

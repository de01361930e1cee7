"""Runs the job that job.py built: in NVFlare's simulator or on a POC of its own, both on this machine, or on a
running system; watches it, and prints the summary. job.py calls run_and_report() once."""

import argparse
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nvflare.lighter
import yaml
from nvflare.recipe import PocEnv, ProdEnv
from nvflare.tool.poc.poc_commands import get_poc_workspace

from local_run.gpu_plan import default_ranks, gpu_blocks, plan_lines, visible_gpus
from local_run.race_free_simulator import SimEnv, console_log
from local_run.results import follow_rounds, killed, summarize
from local_run.watchdog import Watchdog


def run_here(args: argparse.Namespace, build_recipe, sites: list[str], check_data, most_ranks: int) -> int:
    """Run the job on this machine (--env sim or poc) as job.py's flags say, and print the summary; the exit code.
    build_recipe(args, gpu_blocks) makes the job; check_data(data_root) says what is wrong with the data, or None;
    most_ranks: a site's ranks where no GPU limits them."""
    gpus = visible_gpus()
    if args.nproc_per_node is None:
        args.nproc_per_node = [default_ranks(len(gpus), args.n_clients, most_ranks)] * args.n_clients
        if gpus:
            print(f"{len(gpus)} GPU(s) visible: {args.nproc_per_node[0]} rank(s) a site (--nproc_per_node not given)")
    blocks = gpu_blocks(gpus, args.nproc_per_node) if gpus else None
    args.data_root = os.path.abspath(args.data_root)  # the sites run in folders of their own
    problem = check_data(args.data_root) or preflight(args, sites)
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 2
    recipe = build_recipe(args, blocks)
    # Sites run `python3` from PATH: make that this interpreter, whose environment has torch.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    # Every site's ranks share this machine's cores; a user's own setting wins.
    cpus = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(sum(args.nproc_per_node), cpus)))
    # torchrun_node (--slurm_nodes) has no --log-dir; this keeps torchrun from leaving a /tmp/torchelastic_*.
    os.environ.setdefault("PET_LOG_DIR", "/dev/null")
    # Every site is on this machine: the ranks' process groups listen on loopback, not on the address the
    # hostname resolves to. (torchrun's own store listens on every interface; docs/security.md.)
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, "lo")
    if args.env == "sim":
        workspace = os.path.join(args.workspace, recipe.name)
        print(
            f"NVFlare's logs: {workspace}/server/log.txt and {workspace}/<site>/log.txt; its console output: "
            f"{console_log(args.workspace, recipe.name)}" + ("" if args.verbose else " (--verbose shows it here)")
        )
    for line in plan_lines(sites, args.nproc_per_node, blocks or [[] for _ in sites], len(gpus)):
        print(line)
    if args.env == "sim":
        return run_in_simulator(recipe, args, sites)
    return run_on_system(recipe, args, sites)


def port_in_use(number: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like torchrun's store: a port that only lingers in TIME_WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", number))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def threads_per_rank(ranks: int, cpus: int) -> int:
    """CPU threads for each of a run's `ranks` on this machine. torchrun sets 1 only for 2+ ranks a site; with one
    rank a site, every rank would take all the cores, and 3 sites on 2 cores ran rounds up to 10x slower."""
    return max(1, cpus // ranks)


def preflight(args: argparse.Namespace, sites: list[str]) -> str | None:
    """The ports a local run needs, checked before any process starts: what is wrong, or None."""
    for i, site in enumerate(sites if args.master_port else []):
        if port_in_use(args.master_port + i):
            return (
                f"port {args.master_port + i} ({site}'s torchrun master port) is in use; "
                "pick a free range with --master_port"
            )
    return None


def run_in_simulator(recipe, args: argparse.Namespace, sites: list[str]) -> int:
    env = SimEnv(clients=sites, workspace_root=args.workspace, quiet=not args.verbose)
    workspace = os.path.join(args.workspace, recipe.name)
    server_dir = os.path.join(workspace, "server", "simulate_job")
    done = threading.Event()
    threading.Thread(target=follow_rounds, args=(server_dir, args.num_rounds, done), daemon=True).start()
    with keeper(), Watchdog(workspace, sites) as watchdog:
        try:
            recipe.execute(env)
        except RuntimeError:  # the simulator failed; the summary says which site and why
            pass
        finally:
            done.set()
    stopped_by = signal_name(watchdog.signum)
    # A server killed by a signal that neither job.py nor its watchdog sent (the watchdog ends the run's processes
    # once a site has ended before its handshake).
    killed_outside = env.server_signal and not stopped_by and not watchdog.ended_sites
    server_ended = (
        killed(f"NVFlare's server process (pid {env.server_pid})", env.server_signal, env.server_pid)
        if killed_outside
        else None
    )
    code = summarize(server_dir, os.path.join(workspace, "server", "log.txt"), sites, args.num_rounds, workspace,
                     stopped_by, args.min_clients, server_ended)  # fmt: skip
    return 128 + watchdog.signum if stopped_by else code


@contextlib.contextmanager
def keeper(folders: list[str] = ()):
    """local_run/keeper.py, for the length of the block: if job.py dies unannounced (SIGKILL), it ends the run's
    processes and deletes `folders`. Put the Watchdog inside the block: its end of the run kills the keeper first."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "keeper.py"), str(os.getpid()),
         *folders],
        stdin=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        process.stdin.close()  # the keeper's cue: by now the watchdog has killed it
        process.wait()


def signal_name(signum: int | None) -> str | None:
    return signal.Signals(signum).name if signum else None


POC_LOGIN_TIMEOUT = 60  # seconds that --env poc waits for its POC's server to let it log in


def run_on_system(recipe, args: argparse.Namespace, sites: list[str]) -> int:
    """Submit to a POC that this run starts, or to the running system behind --startup_kit."""
    if args.env == "poc":
        poc_workspace = get_poc_workspace()
        if os.path.exists(poc_workspace):
            print(
                f"ERROR: a POC workspace exists at {poc_workspace}, and --env poc would stop and delete it; "
                f"if it is yours, submit to it with --env prod --startup_kit <its admin kit>, "
                f"or remove it first: nvflare poc stop; nvflare poc clean",
                file=sys.stderr,
            )
            return 2
        with tempfile.TemporaryDirectory() as folder:  # NVFlare copies the project file into the POC
            # NVFlare's PocEnv gives its fresh server 3 s and then 10 s to answer the login: on a busy machine
            # (2 cores, a test suite beside it) the server was seen to take longer, and the job never ran.
            env = PocEnv(project_conf_path=poc_project(sites, folder), extra={"login_timeout": POC_LOGIN_TIMEOUT})
            return run_on(env, recipe, args, sites)
    return run_on(ProdEnv(startup_kit_location=args.startup_kit), recipe, args, sites)


def poc_project(sites: list[str], folder: str) -> str:
    """A project file for --env poc in `folder`: NVFlare's sample project with `sites` as its clients, and a server on
    two ports that are free now in place of NVFlare's fixed 8002 and 8003, so that the POC meets no other program's
    ports on this machine, another POC's included."""
    with open(os.path.join(os.path.dirname(nvflare.lighter.__file__), "dummy_project.yml")) as f:
        project = yaml.safe_load(f)
    server = next(p for p in project["participants"] if p["type"] == "server")
    with socket.socket() as a, socket.socket() as b:
        a.bind(("", 0))
        b.bind(("", 0))
        server.update(name="server", fed_learn_port=a.getsockname()[1], admin_port=b.getsockname()[1])
    admins = [p for p in project["participants"] if p["type"] == "admin"]
    project["participants"] = [server, *({"name": site, "type": "client", "org": server["org"]} for site in sites),
                               *admins]  # fmt: skip
    path = os.path.join(folder, "project.yml")
    with open(path, "w") as f:
        yaml.safe_dump(project, f, sort_keys=False)
    return path


def run_on(env, recipe, args: argparse.Namespace, sites: list[str]) -> int:
    """Submit the job to `env`, a POC that this run starts or a running system; wait, stop the POC, report."""
    run = result = status = failure = None
    poc = [get_poc_workspace()] if args.env == "poc" else []
    with keeper(poc) as keeper_process, Watchdog(None, sites) as watchdog:
        try:
            run = recipe.execute(env)
            if poc:  # should job.py die unannounced, the keeper aborts the job before it stops the POC
                kit = os.path.join(get_poc_workspace(), "example_project", "prod_00", "admin@nvidia.com")
                keeper_process.stdin.write(f"abort {run.get_job_id()} {kit}\n".encode())
                keeper_process.stdin.flush()
            print(f"submitted job {run.get_job_id()}; waiting for it to finish")
            # Not run.get_result(): it would stop the POC on its way out, where a signal must not cut in.
            result = env.get_job_result(run.get_job_id())
            status = run.get_status()
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
        finally:
            watchdog.hold_signals()  # whatever happened, and whatever signal comes now, the POC goes
            if args.env == "poc":
                result = stop_poc(env, run, recipe.name, result, args, sites, aborted=watchdog.signum is not None)
    if args.env == "poc":  # what NVFlare's stop could not clean, now that every process of it has ended
        shutil.rmtree(get_poc_workspace(), ignore_errors=True)
    if watchdog.signum:
        return report_stop(run, result, args, sites, watchdog.signum)
    if failure:
        print(f"ERROR: the job could not run on the system: {failure}", file=sys.stderr)
        return 1
    print(f"job {run.get_job_id()} ended with status {status}; result: {result}")
    if not result:
        print(f"ERROR: job {run.get_job_id()} left no result to read (status {status})", file=sys.stderr)
        return 1
    logs_root = result if args.env == "poc" else None
    code = summarize_kept(result, args, sites, logs_root)
    if status != "FINISHED:COMPLETED":
        print(f"ERROR: job {run.get_job_id()} did not complete (status {status})", file=sys.stderr)
        return 1
    return code


def summarize_kept(result: str, args: argparse.Namespace, sites: list[str], logs_root: str | None, stopped_by=None):
    """summarize() for a job's folder as `nvflare job download` writes it, or as keep_poc_job keeps it."""
    workspace = os.path.join(result, "workspace")
    return summarize(workspace, os.path.join(workspace, "log.txt"), sites, args.num_rounds, logs_root, stopped_by,
                     args.min_clients)  # fmt: skip


def stop_poc(
    env, run, job_name: str, download: str | None, args: argparse.Namespace, sites: list[str], aborted: bool
) -> str | None:
    """Keep what the job left, then stop and delete job.py's own POC; returns where the job's folders are kept."""
    try:
        if run is None:
            return None
        kept = keep_poc_job(run.get_job_id(), job_name, download, args.workspace, sites)  # the POC goes next
        if aborted:
            # Otherwise the job stays RUNNING in NVFlare's job store, which outlives the POC workspace, and the next
            # POC's stop fails on it.
            run.abort()
            wait_until_finished(run, timeout=15)
        return kept
    finally:
        env.stop(clean_up=True)


def wait_until_finished(run, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not str(run.get_status()).startswith("FINISHED") and time.monotonic() < deadline:
        time.sleep(0.5)


def keep_poc_job(job_id: str, job_name: str, download: str | None, workspace: str, sites: list[str]) -> str:
    """Copy what a POC job left to workspace/<job>/<id> before the POC is deleted: the downloaded result, or,
    for a job still running, the server's job folder (both as workspace/), and each site's log (<site>/log.txt)."""
    project = os.path.join(get_poc_workspace(), "example_project", "prod_00")
    kept = os.path.join(workspace, job_name, job_id)
    sources = (
        [(download, kept)] if download else [(os.path.join(project, "server", job_id), os.path.join(kept, "workspace"))]
    )
    sources += [(os.path.join(project, site, job_id), os.path.join(kept, site)) for site in sites]
    for source, target in sources:
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
    return kept


def report_stop(run, result: str | None, args: argparse.Namespace, sites: list[str], signum: int) -> int:
    """job.py was stopped while a job ran on a system: say so, and what was kept or goes on."""
    name = signal_name(signum)
    if run is None:
        print(f"ERROR: the job was stopped by {name} before it was submitted", file=sys.stderr)
    elif result:  # a POC of job.py's own: it is gone now, its job's folders kept
        summarize_kept(result, args, sites, result, stopped_by=name)
    else:
        print(
            f"ERROR: the job was stopped by {name} while job {run.get_job_id()} runs on the system, where it "
            f"goes on; to end it: nvflare job abort {run.get_job_id()} --startup-kit {args.startup_kit}",
            file=sys.stderr,
        )
    return 128 + signum

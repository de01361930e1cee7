"""Build the FedAvg job: every site trains `Net` with DDP under torch.distributed.run.

Runs it in NVFlare's simulator (default), or writes the job folder for `nvflare job submit`
(--export_config, or NVFlare's own --export --export-dir DIR)."""

import argparse
import errno
import os
import shutil
import signal
import socket
import sys
import threading
import time

# Importing nvflare.recipe takes NVFlare's own --export / --export-dir out of sys.argv; note them first.
NVFLARE_EXPORT = "--export" in sys.argv[1:]

from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import (
    PocEnv,
    ProdEnv,
    SimEnv,
    add_experiment_tracking,
    add_final_global_evaluation,
    set_per_site_config,
    set_recipe_meta,
)
from nvflare.tool.poc.poc_commands import get_poc_workspace

from data import DataError, batch_paths
from gpu_plan import default_ranks, gpu_blocks, plan_lines, visible_gpus
from model import Net, load_global_model
from protocol import add_training_flags, positive_int, train_args
from race_free_simulator import SimEnv as RaceFreeSimEnv
from race_free_simulator import console_log
from results import JOB_NAME, follow_rounds, summarize
from tolerant_fedavg import LiveSitesEvaluation, TolerantFedAvg
from watchdog import Watchdog

EXPORT_DIR = "/tmp/nvflare/jobs/job_config"
HERE = os.path.dirname(os.path.abspath(__file__))


def rank_counts(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65000:
        raise argparse.ArgumentTypeError(f"must be between 1024 and 65000, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but not None: there the help says what leaving the option out does."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--num_rounds", type=positive_int, default=5, help="FedAvg rounds")
    p.add_argument(
        "--export_config",
        action="store_true",
        help=f"write the job folder to {EXPORT_DIR} for `nvflare job submit` instead of running it",
    )
    p.add_argument("--n_clients", type=positive_int, default=2, help="number of sites, named site-1..site-N")
    p.add_argument(
        "--min_clients",
        type=positive_int,
        help="the fewest sites a round may average. Below --n_clients, a site whose training fails drops out and "
        "the others go on; by default every site is needed, and any failure ends the job",
    )
    p.add_argument(
        "--nproc_per_node",
        type=rank_counts,
        help="DDP ranks (GPUs) of each site: one number for every site, or one per site (2,4); if not given, 2, "
        "or fewer where that puts every site of a local run on this machine's GPUs",
    )
    p.add_argument(
        "--master_port",
        type=port,
        help="torchrun master port of site-1; site-N uses master_port + N - 1; 7777 if not given",
    )
    p.add_argument(
        "--slurm_nodes",
        type=positive_int,
        help="nodes of every site, for NVFlare's Slurm job launcher (with --slurm_gpus_per_node): each site's "
        "command becomes nvflare.app_opt.pt.torchrun_node, and the job asks each site for this many nodes",
    )
    p.add_argument(
        "--slurm_gpus_per_node",
        type=positive_int,
        help="GPUs, and so DDP ranks, on each node of a site (with --slurm_nodes)",
    )
    add_training_flags(p)
    p.add_argument(
        "--initial_model",
        help="start from this saved global model (FL_global_model.pt or best_FL_global_model.pt of an earlier run) "
        "instead of random weights",
    )
    p.add_argument(
        "--env",
        choices=["sim", "poc", "prod"],
        default="sim",
        help="sim: NVFlare's simulator. poc: start a local POC system, run the job, stop and DELETE the "
        "POC workspace (refused if one exists already). prod: submit to a running system "
        "through --startup_kit",
    )
    p.add_argument("--startup_kit", help="admin startup kit folder of the system to submit to (--env prod)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="--env sim: show NVFlare's console output as it comes, not only its warnings and errors (it is always "
        "kept in a file, named when the run starts)",
    )
    p.add_argument(
        "--workspace",
        default="/tmp/nvflare/simulation",
        help="simulator workspace root; --env poc copies the job's result under it",
    )
    args = p.parse_args(argv)
    if (args.slurm_nodes is None) != (args.slurm_gpus_per_node is None):
        p.error("--slurm_nodes and --slurm_gpus_per_node go together: give both, or neither for single-node sites")
    if args.slurm_nodes is not None:
        if args.nproc_per_node is not None or args.master_port is not None:
            p.error(
                "--nproc_per_node and --master_port are for single-node sites; with --slurm_nodes every node runs "
                "--slurm_gpus_per_node ranks, and torchrun_node picks the ports"
            )
        args.nproc_per_node = [args.slurm_gpus_per_node]  # ranks on each node
    else:
        args.master_port = args.master_port or 7777
    if args.nproc_per_node is not None and len(args.nproc_per_node) == 1:
        args.nproc_per_node *= args.n_clients
    if args.nproc_per_node is not None and len(args.nproc_per_node) != args.n_clients:
        p.error(
            f"--nproc_per_node gives {len(args.nproc_per_node)} rank counts for {args.n_clients} sites: give one "
            "for every site, or one per site"
        )
    if args.min_clients is None:
        args.min_clients = args.n_clients
    if args.min_clients > args.n_clients:
        p.error(f"--min_clients {args.min_clients} is more than --n_clients {args.n_clients}")
    if (args.env == "prod") != (args.startup_kit is not None):
        p.error("--env prod needs --startup_kit DIR, and --startup_kit only goes with --env prod")
    if args.startup_kit is not None and not os.path.isdir(args.startup_kit):
        p.error(f"--startup_kit {args.startup_kit} is not a folder; give the admin's startup kit")
    return args


def site_names(n_clients: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n_clients + 1)]


def site_command(nproc_per_node: int, master_port: int | None, gpus: list[str] | None = None) -> str:
    """How a site starts its ranks: torchrun on one node, or, with no master_port (--slurm_nodes), NVFlare's
    torchrun_node, which joins the nodes that NVFlare's Slurm job launcher names in the NVFL_* variables.
    gpus: the GPUs of this machine the site may use (a local run), or None (the site's own machine decides)."""
    # NVFlare runs a leading `env VAR=value` as a shell would; an empty list hides every GPU from the site.
    pin = "" if gpus is None else f"env CUDA_VISIBLE_DEVICES={','.join(gpus)} "
    # `python3` from the site's PATH: no path of this machine ends up in the job.
    if master_port is None:
        return f"{pin}python3 -u -m nvflare.app_opt.pt.torchrun_node --nproc-per-node={nproc_per_node}"
    # --log-dir=/dev/null: otherwise torchrun leaves an empty /tmp/torchelastic_* folder on every run.
    return (
        f"{pin}python3 -u -m torch.distributed.run --nnodes=1 --nproc_per_node={nproc_per_node} "
        f"--master_addr=127.0.0.1 --master_port={master_port} --log-dir=/dev/null"
    )


class QuickFedAvgRecipe(FedAvgRecipe):
    """FedAvg whose server notices finished tasks within 0.1 s instead of NVFlare's default 0.5 s. With
    `tolerate_down_to` K below the number of sites, the server runs TolerantFedAvg: failed sites drop out, down to
    K sites."""

    def __init__(self, *, tolerate_down_to: int, **kwargs):
        self.tolerate_down_to = tolerate_down_to  # read while the parent's __init__ creates the controller
        super().__init__(**kwargs)

    def _get_controller_kwargs(self):
        return {**super()._get_controller_kwargs(), "task_check_period": 0.1}

    def _create_controller(self, persistor_id, model_params, model_aggregator):
        if self.tolerate_down_to >= self.min_clients:
            return super()._create_controller(persistor_id, model_params, model_aggregator)
        # The arguments of NVFlare 2.9's FedAvgRecipe._create_controller, plus the floor.
        return TolerantFedAvg(
            min_clients=self.tolerate_down_to,
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            **self._get_controller_kwargs(),
        )


def build_recipe(args: argparse.Namespace, gpu_blocks: list[list[str]] | None = None):
    """The job. gpu_blocks: each site's GPUs on this machine, for a local run; None leaves them to each site."""
    sites = site_names(args.n_clients)
    recipe = QuickFedAvgRecipe(
        name=JOB_NAME,
        model=Net(seed=args.seed),  # the initial global model: the same for the same --seed
        min_clients=len(sites),  # NVFlare's FedAvg samples this many sites a round: all of them
        tolerate_down_to=args.min_clients,
        # A relative path: the recipe copies the file into the job, so the job does not depend on it staying put.
        initial_ckpt=os.path.relpath(args.initial_model) if args.initial_model else None,
        num_rounds=args.num_rounds,
        train_script=os.path.join(HERE, "client.py"),
        launch_external_process=True,
        # Lets torchrun finish on its own at the end instead of being killed mid-shutdown.
        shutdown_timeout=30.0,
    )
    set_per_site_config(
        recipe,
        {
            site: {
                "command": site_command(
                    args.nproc_per_node[i], args.master_port and args.master_port + i, gpu_blocks and gpu_blocks[i]
                ),
                "train_args": f"{train_args(args)} --site {site} --sites {','.join(sites)}",
            }
            for i, site in enumerate(sites)
        },
    )
    if args.slurm_nodes:
        # Read when the client apps are made (below, at the first client file): each site's command is copied
        # into its block as the additional_node_command, which NVFlare's Slurm launcher runs on nodes 1..N-1.
        slurm = {"nodes": args.slurm_nodes, "gpus_per_node": args.slurm_gpus_per_node}
        set_recipe_meta(recipe, JobMetaKey.JOB_LAUNCHER_SPEC, {site: {"slurm": dict(slurm)} for site in sites})
    recipe.add_server_config({
        # A site that sent its result asks for the next task after this many seconds (NVFlare's default: 2).
        "server": {"task_request_interval": 0.1},
        # On a real system the server learns when a site's job has died; end the job then, not after NVFlare's
        # default grace of 60 s (the same as FedJob's fail_fast).
        "dead_client_grace_period": 0.0,
    })  # fmt: skip
    for module in ("data.py", "model.py", "protocol.py"):  # what client.py imports
        recipe.add_client_file(os.path.join(HERE, module))
    if args.min_clients < args.n_clients:
        recipe.add_server_file(os.path.join(HERE, "tolerant_fedavg.py"))
    if args.use_tracking:
        add_experiment_tracking(recipe, "tensorboard")
    # After the last round, every site scores the final global model, which no round has evaluated.
    add_final_global_evaluation(recipe)
    if args.min_clients < args.n_clients:  # ... every site that is left
        for workflow in recipe._job._deploy_map["server"].app_config.workflows:  # as NVFlare's recipe utils do
            if type(workflow.controller) is CrossSiteModelEval:
                workflow.controller.__class__ = LiveSitesEvaluation
    return recipe


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


def preflight(args: argparse.Namespace) -> str | None:
    """What a local run needs, checked before any process starts: what is wrong, or None."""
    try:
        batch_paths(args.data_root)
    except DataError as e:
        return str(e)
    for i, site in enumerate(site_names(args.n_clients) if args.master_port else []):
        if port_in_use(args.master_port + i):
            return (
                f"port {args.master_port + i} ({site}'s torchrun master port) is in use; "
                "pick a free range with --master_port"
            )
    return None


def main() -> int:
    args = parse_args()
    if args.initial_model:
        try:
            load_global_model(args.initial_model)
        except ValueError as e:
            print(f"ERROR: --initial_model: {e}; give the FL_global_model.pt of an earlier run", file=sys.stderr)
            return 2
    local = args.env != "prod" and not (args.export_config or NVFLARE_EXPORT)  # every site on this machine
    gpus = visible_gpus() if local else []
    if args.nproc_per_node is None:
        args.nproc_per_node = [default_ranks(len(gpus), args.n_clients)] * args.n_clients
        if gpus:
            print(f"{len(gpus)} GPU(s) visible: {args.nproc_per_node[0]} rank(s) a site (--nproc_per_node not given)")
    blocks = gpu_blocks(gpus, args.nproc_per_node) if gpus else None
    if local:
        args.data_root = os.path.abspath(args.data_root)  # the sites run in folders of their own
    recipe = build_recipe(args, blocks)
    if args.export_config:
        try:
            recipe.export(EXPORT_DIR)
        except OSError as e:
            print(f"ERROR: can't write the job folder to {EXPORT_DIR}: {e.strerror}", file=sys.stderr)
            return 2
        job_dir = os.path.join(EXPORT_DIR, JOB_NAME)
        print(f"job folder written to {job_dir}; submit it with: nvflare job submit -j {job_dir}")
        return 0

    if NVFLARE_EXPORT:
        # With NVFlare's --export, execute() writes the job folder and exits; nothing runs.
        env = SimEnv(clients=site_names(args.n_clients))
        try:
            recipe.execute(env)
        except OSError as e:
            print(f"ERROR: can't write the job folder: {e}", file=sys.stderr)
            return 2
    problem = preflight(args) if args.env != "prod" else None  # on a real system the data and ports are the sites' own
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 2
    # Sites run `python3` from PATH: make that this interpreter, whose environment has torch.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if args.env != "prod":  # every site's ranks share this machine's cores; a user's own setting wins
        cpus = len(os.sched_getaffinity(0))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(sum(args.nproc_per_node), cpus)))
        # torchrun_node (--slurm_nodes) has no --log-dir; this keeps torchrun from leaving a /tmp/torchelastic_*.
        os.environ.setdefault("PET_LOG_DIR", "/dev/null")
        # Every site is on this machine: the ranks' process groups listen on loopback, not on the address the
        # hostname resolves to. (torchrun's own store listens on every interface; docs/security.md.)
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, "lo")
    if args.env == "sim":
        workspace = os.path.join(args.workspace, JOB_NAME)
        print(
            f"NVFlare's logs: {workspace}/server/log.txt and {workspace}/<site>/log.txt; its console output: "
            f"{console_log(args.workspace, JOB_NAME)}" + ("" if args.verbose else " (--verbose shows it here)")
        )
    if local:
        sites = site_names(args.n_clients)
        for line in plan_lines(sites, args.nproc_per_node, blocks or [[] for _ in sites], len(gpus)):
            print(line)
    if args.env == "sim":
        return run_in_simulator(recipe, args)
    return run_on_system(recipe, args)


def run_in_simulator(recipe, args: argparse.Namespace) -> int:
    sites = site_names(args.n_clients)
    env = RaceFreeSimEnv(clients=sites, workspace_root=args.workspace, quiet=not args.verbose)
    workspace = os.path.join(args.workspace, JOB_NAME)
    server_dir = os.path.join(workspace, "server", "simulate_job")
    done = threading.Event()
    threading.Thread(target=follow_rounds, args=(server_dir, args.num_rounds, done), daemon=True).start()
    with Watchdog(workspace, sites) as watchdog:
        try:
            recipe.execute(env)
        except RuntimeError:  # the simulator failed; the summary says which site and why
            pass
        finally:
            done.set()
    stopped_by = signal_name(watchdog.signum)
    code = summarize(
        server_dir,
        os.path.join(workspace, "server", "log.txt"),
        sites,
        args.num_rounds,
        logs_root=workspace,
        stopped_by=stopped_by,
        min_clients=args.min_clients,
    )
    return 128 + watchdog.signum if stopped_by else code


def signal_name(signum: int | None) -> str | None:
    return signal.Signals(signum).name if signum else None


def run_on_system(recipe, args: argparse.Namespace) -> int:
    """Submit to a POC that this run starts, or to the running system behind --startup_kit."""
    sites = site_names(args.n_clients)
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
        env = PocEnv(num_clients=len(sites), clients=sites)
    else:
        env = ProdEnv(startup_kit_location=args.startup_kit)
    run = result = status = failure = None
    with Watchdog(None, sites) as watchdog:
        try:
            run = recipe.execute(env)
            print(f"submitted job {run.get_job_id()}; waiting for it to finish")
            result = run.get_result(clean_up=False)
            status = run.get_status()
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
        finally:
            watchdog.hold_signals()  # whatever happened, and whatever signal comes now, the POC goes
            if args.env == "poc":
                result = stop_poc(env, run, result, args, sites, aborted=watchdog.signum is not None)
    if args.env == "poc":  # what NVFlare's stop could not clean, now that every process of it has ended
        shutil.rmtree(get_poc_workspace(), ignore_errors=True)
    if watchdog.signum:
        return report_stop(run, result, args, watchdog.signum)
    if failure:
        print(f"ERROR: the job could not run on the system: {failure}", file=sys.stderr)
        return 1
    print(f"job {run.get_job_id()} ended with status {status}; result: {result}")
    if not result:
        print(f"ERROR: job {run.get_job_id()} left no result to read (status {status})", file=sys.stderr)
        return 1
    logs_root = result if args.env == "poc" else None
    code = summarize(
        os.path.join(result, "workspace"),
        os.path.join(result, "workspace", "log.txt"),
        sites,
        args.num_rounds,
        logs_root=logs_root,
        min_clients=args.min_clients,
    )
    if status != "FINISHED:COMPLETED":
        print(f"ERROR: job {run.get_job_id()} did not complete (status {status})", file=sys.stderr)
        return 1
    return code


def stop_poc(env, run, download: str | None, args: argparse.Namespace, sites: list[str], aborted: bool) -> str | None:
    """Keep what the job left, then stop and delete job.py's own POC; returns where the job's folders are kept."""
    try:
        if run is None:
            return None
        kept = keep_poc_job(run.get_job_id(), download, args.workspace, sites)  # the POC workspace goes next
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


def keep_poc_job(job_id: str, download: str | None, workspace: str, sites: list[str]) -> str:
    """Copy what a POC job left to workspace/<job>/<id> before the POC is deleted: the downloaded result, or,
    for a job still running, the server's job folder (both as workspace/), and each site's log (<site>/log.txt)."""
    project = os.path.join(get_poc_workspace(), "example_project", "prod_00")
    kept = os.path.join(workspace, JOB_NAME, job_id)
    sources = (
        [(download, kept)] if download else [(os.path.join(project, "server", job_id), os.path.join(kept, "workspace"))]
    )
    sources += [(os.path.join(project, site, job_id), os.path.join(kept, site)) for site in sites]
    for source, target in sources:
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
    return kept


def report_stop(run, result: str | None, args: argparse.Namespace, signum: int) -> int:
    """job.py was stopped while a job ran on a system: say so, and what was kept or goes on."""
    name = signal_name(signum)
    if run is None:
        print(f"ERROR: the job was stopped by {name} before it was submitted", file=sys.stderr)
    elif result:  # a POC of job.py's own: it is gone now, its job's folders kept
        summarize(
            os.path.join(result, "workspace"),
            os.path.join(result, "workspace", "log.txt"),
            site_names(args.n_clients),
            args.num_rounds,
            logs_root=result,
            stopped_by=name,
            min_clients=args.min_clients,
        )
    else:
        print(
            f"ERROR: the job was stopped by {name} while job {run.get_job_id()} runs on the system, where it "
            f"goes on; to end it: nvflare job abort {run.get_job_id()} --startup-kit {args.startup_kit}",
            file=sys.stderr,
        )
    return 128 + signum


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal: NVFlare's admin connection may keep threads alive; do not wait for them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

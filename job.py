"""Build the FedAvg job: every site trains `Net` with DDP under torch.distributed.run.

Runs it in NVFlare's simulator (default), or writes the job folder for `nvflare job submit`
(--export_config, or NVFlare's own --export --export-dir DIR)."""

import argparse
import os
import pickle
import sys

# Importing nvflare.recipe takes NVFlare's own --export / --export-dir out of sys.argv; note them first.
NVFLARE_EXPORT = "--export" in sys.argv[1:]

import nvflare
import torch
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import ExchangeFormat
from nvflare.recipe import (
    SimEnv,
    add_cross_site_evaluation,
    add_experiment_tracking,
    add_final_global_evaluation,
    set_per_site_config,
    set_recipe_meta,
)

from protocol import add_training_flags, positive_float, positive_int, train_args
from quantize import MODES, Dequantize, Quantize
from server_fedavg import (
    Cut,
    DtypeKeepingAggregator,
    ForgetTrained,
    Join,
    LiveSitesEvaluation,
    MergingFedAvg,
    OneCopyEvaluation,
    SendOnce,
    TolerantFedAvg,
)
from streaming import SlowLinkStreaming

# What every site runs, and the model the server starts from. To federate your own model and data, change these
# four (docs/your-own-model-and-data.md).
TRAIN_SCRIPT = "client.py"  # what torchrun starts on every rank
TRAINER_FILES = ["flare_ddp.py", "data.py", "model.py", "protocol.py", "rank_exit.py"]  # what it imports


def initial_model(seed: int) -> torch.nn.Module:
    """The initial global model: the same for the same seed."""
    from model import Net

    return Net(seed=seed)


def check_data(data_root: str) -> str | None:
    """What a local run checks before anything starts: what is wrong with --data_root, or None."""
    from data import DataError, batch_paths

    try:
        batch_paths(data_root)
    except DataError as e:
        return str(e)
    return None


JOB_NAME = "pt_ddp_fedavg"  # the job's name, and its folder in every workspace
# A site waits for two transfers over the server's link: its task's weights, which its trainer fetches before it
# takes the task (task_wait_timeout; NVFlare sets no bound, and a fetch that failed more than 300 s after the task
# went out was never heard: the job hung), and the server's taking its result, which the server fetches before it
# answers (submit_task_result_timeout; a site whose wait runs out sends its result again). Each wait is
# TRANSFER_WAIT_MARGIN times what the whole model to or from every site takes at --link_mbit, and at least NVFlare's
# default for the second (docs/performance.md, Slow links).
TRANSFER_WAIT_MARGIN = 2.0
NVFLARE_REQUEST_TIMEOUT = 300.0  # NVFlare's communication timeout, its default for submit_task_result_timeout
DEFAULT_LINK_MBIT = 10.0


def transfer_timeout(model: torch.nn.Module, n_sites: int, link_mbit: float) -> float:
    """Seconds a site waits for its task's weights, or for the server to take its result: the whole model to or from
    every site over the link, twice over."""
    model_bits = 8 * sum(tensor.nbytes for tensor in model.state_dict().values())
    return max(NVFLARE_REQUEST_TIMEOUT, round(TRANSFER_WAIT_MARGIN * n_sites * model_bits / (link_mbit * 1e6)))


EXPORT_DIR = "/tmp/nvflare/jobs/job_config"
DEFAULT_RANKS = 2  # a site's ranks where no GPU of this machine limits them
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
        nargs="?",
        const=EXPORT_DIR,
        metavar="DIR",
        help=f"write the job folder to DIR (default {EXPORT_DIR}) for `nvflare job submit` instead of running it",
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
        help="torchrun master port of site-1; site-N uses master_port + N - 1; if not given, each site's torchrun "
        "takes a free port at each launch (its standalone rendezvous)",
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
    p.add_argument(
        "--cross_site_eval",
        action="store_true",
        help="after the last round, NVFlare's cross-site evaluation: every site's own model and the global models "
        "are scored on every site (instead of the final global model alone)",
    )
    p.add_argument(
        "--exchange_format",
        choices=["pytorch", "numpy"],
        default="pytorch",
        help="how weights travel between sites and server: as PyTorch tensors (any dtype, bf16 included), or as "
        "NumPy arrays (no bf16)",
    )
    p.add_argument(
        "--quantize_mode",
        choices=MODES,
        help="weights travel between server and sites quantized, both ways: float16 or bfloat16 (half of float32's "
        "bytes), or blockwise8 (int8 in blocks of 256 values with a float32 scale each: about a quarter); integer "
        "tensors travel exactly. Needs --exchange_format pytorch. Left out: full precision",
    )
    p.add_argument(
        "--link_mbit",
        type=positive_float,
        default=DEFAULT_LINK_MBIT,
        help="the server's link to the sites, in Mbit/s each way (shared by all sites): how long a site waits for "
        "its task's weights, and for the server to take its result, follows from it and the model's size. Slower "
        "than this, a large model's weights may not arrive in time, and the run's last line says so",
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
    if args.nproc_per_node is not None and len(args.nproc_per_node) == 1:
        args.nproc_per_node *= args.n_clients
    if args.nproc_per_node is not None and len(args.nproc_per_node) != args.n_clients:
        p.error(
            f"--nproc_per_node gives {len(args.nproc_per_node)} rank counts for {args.n_clients} sites: give one "
            "for every site, or one per site"
        )
    if args.quantize_mode and args.exchange_format != "pytorch":
        p.error(f"--quantize_mode {args.quantize_mode} needs --exchange_format pytorch: NumPy has no bfloat16")
    if args.min_clients is None:
        args.min_clients = args.n_clients
    if args.min_clients > args.n_clients:
        p.error(f"--min_clients {args.min_clients} is more than --n_clients {args.n_clients}")
    if args.env == "sim" and any(c.isspace() for c in os.path.abspath(args.workspace)):
        # NVFlare 2.9's simulator joins each site's worker command into one string and splits it on spaces.
        p.error(f"--workspace {args.workspace!r} holds a space, which NVFlare's simulator cannot run in; pick a path "
                "without spaces")  # fmt: skip
    if (args.env == "prod") != (args.startup_kit is not None):
        p.error("--env prod needs --startup_kit DIR, and --startup_kit only goes with --env prod")
    if args.startup_kit is not None and not os.path.isdir(args.startup_kit):
        p.error(f"--startup_kit {args.startup_kit} is not a folder; give the admin's startup kit")
    return args


def site_names(n_clients: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n_clients + 1)]


def site_command(
    nproc_per_node: int, master_port: int | None = None, multinode: bool = False, gpus: list[str] | None = None
) -> str:
    """How a site starts its ranks: torchrun on one node, on a free port of its own at each launch (torchrun's
    standalone rendezvous) or on `master_port`; or, multinode (--slurm_nodes), NVFlare's torchrun_node, which joins
    the nodes that NVFlare's Slurm job launcher names in the NVFL_* variables.
    gpus: the GPUs of this machine the site may use (a local run), or None (the site's own machine decides)."""
    # NVFlare runs a leading `env VAR=value` as a shell would; an empty list hides every GPU from the site.
    pin = "" if gpus is None else f"env CUDA_VISIBLE_DEVICES={','.join(gpus)} "
    # `python3` from the site's PATH: no path of this machine ends up in the job.
    if multinode:
        return f"{pin}python3 -u -m nvflare.app_opt.pt.torchrun_node --nproc-per-node={nproc_per_node}"
    port = "--standalone" if master_port is None else f"--nnodes=1 --master_addr=127.0.0.1 --master_port={master_port}"
    # --log-dir=/dev/null: otherwise torchrun leaves an empty /tmp/torchelastic_* folder on every run.
    return f"{pin}python3 -u -m torch.distributed.run {port} --nproc_per_node={nproc_per_node} --log-dir=/dev/null"


# QuickFedAvgRecipe and build_recipe reach into NVFlare's FedAvg recipe where it has no public hook (the controller's
# task_check_period and class, the final evaluation's class); main() refuses any other NVFlare version.
NVFLARE_VERSION = "2.9"


class QuickFedAvgRecipe(FedAvgRecipe):
    """NVFlare's FedAvg recipe, whose server notices finished tasks within 0.1 s instead of 0.5 s, and whose sites
    may send part of the model (MergingFedAvg). With `tolerate_down_to` K below the number of sites, the controller
    is TolerantFedAvg: failed sites drop out, down to K sites."""

    def __init__(self, *, tolerate_down_to: int, **kwargs):
        self.tolerate_down_to = tolerate_down_to  # read while the parent's __init__ creates the controller
        super().__init__(**kwargs)

    def _tolerant(self) -> bool:
        return self.tolerate_down_to < self.min_clients

    def _get_controller_kwargs(self):
        kwargs = {**super()._get_controller_kwargs(), "task_check_period": 0.1}
        if self._tolerant():  # a failed result is dropped instead of ending the job
            kwargs["ignore_result_error"] = True
        return kwargs

    def _create_controller(self, *args, **kwargs):
        controller = super()._create_controller(*args, **kwargs)
        if self._tolerant():
            TolerantFedAvg.tolerate(controller, self.tolerate_down_to)
        else:
            MergingFedAvg.merging(controller)
        return controller


def build_recipe(args: argparse.Namespace, gpu_blocks: list[list[str]] | None = None):
    """The job. gpu_blocks: each site's GPUs on this machine, for a local run; None leaves them to each site."""
    sites = site_names(args.n_clients)
    model = initial_model(args.seed)
    recipe = QuickFedAvgRecipe(
        name=JOB_NAME,
        model=model,
        min_clients=len(sites),  # NVFlare's FedAvg samples this many sites a round: all of them
        tolerate_down_to=args.min_clients,
        # A relative path: the recipe copies the file into the job, so the job does not depend on it staying put.
        initial_ckpt=os.path.relpath(args.initial_model) if args.initial_model else None,
        num_rounds=args.num_rounds,
        train_script=os.path.join(HERE, TRAIN_SCRIPT),
        server_expected_format=ExchangeFormat.PYTORCH if args.exchange_format == "pytorch" else ExchangeFormat.NUMPY,
        aggregator=DtypeKeepingAggregator(),  # the global model keeps every tensor's dtype
        launch_external_process=True,
        # Lets torchrun finish on its own at the end instead of being killed mid-shutdown.
        shutdown_timeout=30.0,
        # After each round the server collects garbage and hands freed memory back to the system (malloc_trim): a
        # 256 MiB model's server peaked 20-26% lower (docs/performance.md, Large models).
        server_memory_gc_rounds=1,
    )
    set_per_site_config(
        recipe,
        {
            site: {
                "command": site_command(
                    args.nproc_per_node[i],
                    args.master_port and args.master_port + i,
                    multinode=args.slurm_nodes is not None,
                    gpus=gpu_blocks and gpu_blocks[i],
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
    wait = transfer_timeout(model, len(sites), args.link_mbit)
    recipe.add_client_config({"submit_task_result_timeout": wait})
    for app in recipe._job._deploy_map.values():  # NVFlare's recipe has no hook for the executor's task_wait_timeout
        for executor in getattr(app.app_config, "executors", []):
            executor.executor._task_wait_timeout = wait
    for module in TRAINER_FILES:
        recipe.add_client_file(os.path.join(HERE, module))
    # The server's average, the names it shares with sites, and the filters.
    for module in ("server_fedavg.py", "flare_ddp.py", "quantize.py", "streaming.py"):
        recipe.add_server_file(os.path.join(HERE, module))
    # NVFlare's streaming, made fit for slow links in the server's process and each site's (streaming.py); a site's
    # trainer inherits its client's settings.
    recipe.add_client_file(os.path.join(HERE, "streaming.py"))
    for target in ["server", *sites]:
        recipe._job.to(SlowLinkStreaming(), target, id="slow_link_streaming")  # NVFlare's recipe has no public hook
    # What carries weights to the sites, and back (NVFlare wants the filters of one side on the same task sets).
    tasks = [AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION]
    results = [AppConstants.TASK_TRAIN, AppConstants.TASK_SUBMIT_MODEL]
    # Each tensor goes to a site once: a tied pair's second name, and what the site has unchanged, are left out; what
    # a site sent back, it may have changed. Large tensors travel in pieces (flare_ddp.PIECE_BYTES), joined where they
    # arrive; quantized, each piece is quantized alone. Each side's filters run in the order they are added.
    recipe.add_server_output_filter(SendOnce(), tasks=tasks)
    recipe.add_server_output_filter(Cut(), tasks=tasks)
    if args.quantize_mode:  # quantized as they leave, restored as they arrive, both ways
        recipe.add_server_output_filter(Quantize(args.quantize_mode), tasks=tasks)
        recipe.add_client_input_filter(Dequantize(), tasks=tasks)
        recipe.add_client_output_filter(Quantize(args.quantize_mode), tasks=results)
        recipe.add_server_input_filter(Dequantize(), tasks=results)
        recipe.add_client_file(os.path.join(HERE, "quantize.py"))  # for the site's NVFlare client, not the trainer
    recipe.add_server_input_filter(Join(), tasks=results)
    recipe.add_server_input_filter(ForgetTrained(), tasks=results)
    if args.use_tracking:
        add_experiment_tracking(recipe, "tensorboard")
    if args.cross_site_eval:
        add_cross_site_evaluation(recipe)
    else:  # after the last round, every site scores the final global model, which no round has evaluated
        add_final_global_evaluation(recipe)
    # ... holding one copy of each model it sends, and with --min_clients, on every site that is left
    evaluation = LiveSitesEvaluation if args.min_clients < args.n_clients else OneCopyEvaluation
    for workflow in recipe._job._deploy_map["server"].app_config.workflows:  # as NVFlare's recipe utils do
        if type(workflow.controller) is CrossSiteModelEval:
            workflow.controller.__class__ = evaluation
    return recipe


def load_global_model(path: str, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """`model` (default: this job's initial_model) with the weights of a checkpoint of NVFlare's PyTorch persistor
    ({"model": state dict, ...}) or of a plain state dict, loaded without running any pickled code. ValueError
    says what is wrong with any other file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if blocked:  # the pickle names a class or function, which a checkpoint of tensors never does
            raise ValueError(f"{path} holds more than tensors, refusing to load it ({blocked})") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint") from None
    except OSError as e:
        raise ValueError(f"{path} can't be read ({e.strerror})") from None
    except Exception:  # on arbitrary bytes, torch.load fails with errors of many kinds
        raise ValueError(f"{path} is not a PyTorch checkpoint") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    model = initial_model(0) if model is None else model
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} does not hold the weights of this job's model ({first})") from None
    return model


def main() -> int:
    args = parse_args()
    if nvflare.__version__.split(".")[:2] != NVFLARE_VERSION.split("."):
        print(
            f"ERROR: job.py is built on NVFlare {NVFLARE_VERSION}'s FedAvg recipe, and nvflare {nvflare.__version__} "
            f"is installed; install nvflare~={NVFLARE_VERSION}.0 (requirements.txt)",
            file=sys.stderr,
        )
        return 2
    if args.initial_model:
        try:
            load_global_model(args.initial_model)
        except ValueError as e:
            print(f"ERROR: --initial_model: {e}; give the FL_global_model.pt of an earlier run", file=sys.stderr)
            return 2
    if not (args.export_config or NVFLARE_EXPORT or args.env == "prod"):
        from local_run import runner  # only a run on this machine needs it: job.py can be copied without it

        return runner.run_here(args, build_recipe, site_names(args.n_clients), check_data, DEFAULT_RANKS)
    # A job for a real system: each site's own machine decides its GPUs.
    args.nproc_per_node = args.nproc_per_node or [DEFAULT_RANKS] * args.n_clients
    recipe = build_recipe(args)
    if args.export_config:
        try:
            recipe.export(args.export_config)
        except OSError as e:
            print(f"ERROR: can't write the job folder to {args.export_config}: {e.strerror}", file=sys.stderr)
            return 2
        job_dir = os.path.join(args.export_config, JOB_NAME)
        print(f"job folder written to {job_dir}; submit it with: nvflare job submit -j {job_dir}")
        return 0
    if NVFLARE_EXPORT:
        # With NVFlare's --export, execute() writes the job folder and exits; nothing runs.
        try:
            recipe.execute(SimEnv(clients=site_names(args.n_clients)))
        except OSError as e:
            print(f"ERROR: can't write the job folder: {e}", file=sys.stderr)
            return 2
    from local_run import runner

    return runner.run_on_system(recipe, args, site_names(args.n_clients))


if __name__ == "__main__":
    code = main()
    if code > 128:  # stopped by a signal: NVFlare's admin connection may keep threads alive; do not wait for them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

"""Build the FedAvg job: every site trains `Net` with DDP under torch.distributed.run.

Runs it in NVFlare's simulator (default), or writes the job folder for `nvflare job submit`
(--export_config, or NVFlare's own --export --export-dir DIR)."""

import argparse
import errno
import json
import os
import re
import shutil
import socket
import sys
from datetime import datetime

# Importing nvflare.recipe takes NVFlare's own --export / --export-dir out of sys.argv; note them first.
NVFLARE_EXPORT = "--export" in sys.argv[1:]

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe  # noqa: E402
from nvflare.recipe import (PocEnv, ProdEnv, SimEnv, add_experiment_tracking, add_final_global_evaluation,  # noqa: E402
                            set_per_site_config)
from nvflare.tool.poc.poc_commands import get_poc_workspace  # noqa: E402

from client import TRAINING_DEFAULTS, positive_float, positive_int  # noqa: E402
from data import DataError, batch_paths  # noqa: E402
from model import Net  # noqa: E402

JOB_NAME = "pt_ddp_fedavg"
EXPORT_DIR = "/tmp/nvflare/jobs/job_config"
HERE = os.path.dirname(os.path.abspath(__file__))


def port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65000:
        raise argparse.ArgumentTypeError(f"must be between 1024 and 65000, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num_rounds", type=positive_int, default=5, help="FedAvg rounds")
    p.add_argument("--use_tracking", action="store_true", help="log each site's metrics to TensorBoard")
    p.add_argument("--export_config", action="store_true",
                   help=f"write the job folder to {EXPORT_DIR} for `nvflare job submit` instead of running it")
    p.add_argument("--n_clients", type=positive_int, default=2, help="number of sites, named site-1..site-N")
    p.add_argument("--nproc_per_node", type=positive_int, default=2, help="DDP ranks (GPUs) per site")
    p.add_argument("--master_port", type=port, default=7777,
                   help="torchrun master port of site-1; site-N uses master_port + N - 1")
    p.add_argument("--data_root", default="/tmp/nvflare/data", help="where each site finds cifar-10-batches-py")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help="Dirichlet label skew across sites (small: skewed); default IID shards")
    p.add_argument("--epochs", type=positive_int, default=TRAINING_DEFAULTS["epochs"], help="local epochs per round")
    p.add_argument("--batch_size", type=positive_int, default=TRAINING_DEFAULTS["batch_size"],
                   help="batch size of each rank")
    p.add_argument("--lr", type=positive_float, default=TRAINING_DEFAULTS["lr"], help="SGD learning rate")
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim",
                   help="sim: NVFlare's simulator. poc: start a local POC system, run the job, stop and DELETE the "
                        "POC workspace (refused if one exists already). prod: submit to a running system "
                        "through --startup_kit")
    p.add_argument("--startup_kit", help="admin startup kit folder of the system to submit to (--env prod)")
    p.add_argument("--workspace", default="/tmp/nvflare/simulation",
                   help="simulator workspace root; --env poc copies the job's result under it")
    args = p.parse_args(argv)
    if (args.env == "prod") != (args.startup_kit is not None):
        p.error("--env prod needs --startup_kit DIR, and --startup_kit only goes with --env prod")
    if args.startup_kit is not None and not os.path.isdir(args.startup_kit):
        p.error(f"--startup_kit {args.startup_kit} is not a folder; give the admin's startup kit")
    return args


def site_names(n_clients: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n_clients + 1)]


def site_command(nproc_per_node: int, master_port: int) -> str:
    # `python3` from the site's PATH: no path of this machine ends up in the job.
    # --log-dir=/dev/null: otherwise torchrun leaves an empty /tmp/torchelastic_* folder on every run.
    return (f"python3 -u -m torch.distributed.run --nnodes=1 --nproc_per_node={nproc_per_node} "
            f"--master_addr=127.0.0.1 --master_port={master_port} --log-dir=/dev/null")


def train_args(args: argparse.Namespace, site: str, sites: list[str]) -> str:
    parts = [f"--data_root {args.data_root}", f"--epochs {args.epochs}", f"--batch_size {args.batch_size}",
             f"--lr {args.lr}", f"--site {site}", f"--sites {','.join(sites)}"]
    if args.alpha is not None:
        parts.append(f"--alpha {args.alpha}")
    if args.use_tracking:
        parts.append("--use_tracking")
    return " ".join(parts)


class QuickFedAvgRecipe(FedAvgRecipe):
    """FedAvg whose server notices finished tasks within 0.1 s instead of NVFlare's default 0.5 s."""

    def _get_controller_kwargs(self):
        return {"task_check_period": 0.1}


def build_recipe(args: argparse.Namespace):
    sites = site_names(args.n_clients)
    recipe = QuickFedAvgRecipe(
        name=JOB_NAME,
        model=Net(),
        min_clients=len(sites),
        num_rounds=args.num_rounds,
        train_script=os.path.join(HERE, "client.py"),
        launch_external_process=True,
        # Lets torchrun finish on its own at the end instead of being killed mid-shutdown.
        shutdown_timeout=30.0,
    )
    set_per_site_config(recipe, {
        site: {
            "command": site_command(args.nproc_per_node, args.master_port + i),
            "train_args": train_args(args, site, sites),
        }
        for i, site in enumerate(sites)
    })
    # A site that sent its result asks for the next task after this many seconds (NVFlare's default: 2).
    recipe.add_server_config({"server": {"task_request_interval": 0.1}})
    recipe.add_client_file(os.path.join(HERE, "data.py"))
    recipe.add_client_file(os.path.join(HERE, "model.py"))
    if args.use_tracking:
        add_experiment_tracking(recipe, "tensorboard")
    # After the last round, every site scores the final global model, which no round has evaluated.
    add_final_global_evaluation(recipe)
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


def preflight(args: argparse.Namespace) -> None:
    """What a local run needs, checked before any process starts."""
    batch_paths(args.data_root)
    for i, site in enumerate(site_names(args.n_clients)):
        if port_in_use(args.master_port + i):
            raise DataError(f"port {args.master_port + i} ({site}'s torchrun master port) is in use; "
                            f"pick a free range with --master_port")


def read_rounds(server_dir: str) -> list[dict]:
    path = os.path.join(server_dir, "metrics", "round_metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_final_scores(server_dir: str) -> list[float]:
    """Each site's test accuracy of the final global model, from the evaluation after the last round."""
    path = os.path.join(server_dir, "cross_site_val", "cross_val_results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        results = json.load(f)
    return [scores["SRV_FL_global_model.pt"]["accuracy"] for scores in results.values()
            if "SRV_FL_global_model.pt" in scores]


def diagnose(workspace: str, site: str) -> str | None:
    """What went wrong on a site, from its log: torchrun's root-cause report, or how the trainer ended."""
    path = os.path.join(workspace, site, "log.txt")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        # Whatever happened after the server ended this site's run is a consequence, not a cause.
        log = f.read().split("server asked to end the run")[0]
    if f"{site} rank 0: stopping:" in log:  # the server aborted the task this site was running
        return None
    root = re.search(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\n",
                     log, re.S)
    rank = root.group(1) if root else r"\d+"
    own = re.search(r"(" + re.escape(site) + r" rank " + rank + r": ERROR: [^\n]*)", log)
    if own:
        return own.group(1)
    if root:
        _, code, sig = root.groups()
        return f"{site} rank {rank} failed (exit code {code}{' ' + sig if sig else ''})"
    ended = re.search(r"trainer process group exited \(rc=(-?\d+)\)", log)
    if ended:
        return f"{site}'s torchrun ended (rc={ended.group(1)}) before it sent a result"
    return None


def metric(metrics: list[dict], name: str) -> float:
    return next(m["value"] for m in metrics if m["name"] == name)


def log_times(path: str, text: str) -> list[float]:
    """When (epoch seconds) the log lines that contain `text` were written."""
    times = []
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            for line in f:
                if text in line:
                    times.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def round_seconds(server_log: str) -> list[float]:
    """Wall time of each round: from the server sending the train task to saving the new global model."""
    return [end - start for start, end in zip(log_times(server_log, "Sending task train"),
                                              log_times(server_log, "End persist model on server"))]


def summarize(server_dir: str, server_log: str, args: argparse.Namespace, logs_root: str | None = None) -> int:
    """Print the results a person wants; 1 if any round is missing or a site did not report.

    server_dir holds the server's metrics/ and app_server/; logs_root, where known, the sites' logs."""
    sites = site_names(args.n_clients)
    rounds = read_rounds(server_dir)
    times = round_seconds(server_log)
    print("round  global accuracy  mean train loss  round time (s)  global accuracy as each site measured it")
    for r, seconds in zip(rounds, times + [float("nan")] * len(rounds)):
        m = r["aggregated_metrics"]
        by_site = ", ".join(f"{s['name']} {metric(s['metrics'], 'accuracy'):.4f}"
                            for s in sorted(r["sites"], key=lambda s: s["name"]))
        print(f"{r['round']:>5}  {metric(m, 'accuracy'):>15.4f}  {metric(m, 'train_loss'):>15.4f}  {seconds:>14.1f}  "
              f"{by_site}")
    complete = [r for r in rounds if {s["name"] for s in r["sites"]} == set(sites)]
    if len(complete) < args.num_rounds:
        causes = [cause for cause in (diagnose(logs_root, site) for site in sites) if cause] if logs_root else []
        where = f"{logs_root}/<site>/log.txt" if logs_root else "each site's workspace"
        print(f"ERROR: the job stopped in round {len(complete)} of {args.num_rounds}: "
              f"{'; '.join(causes) or 'a site did not report'}. Logs: {where}", file=sys.stderr)
        if complete:
            print(f"the global model after round {complete[-1]['round']} is kept: "
                  f"{os.path.join(server_dir, 'app_server', 'FL_global_model.pt')}", file=sys.stderr)
        return 1
    shards = {s["name"]: int(metric(s["metrics"], "shard_size")) for s in rounds[-1]["sites"]}
    print("training shards: " + ", ".join(f"{name} {shards[name]}" for name in sites))
    print("(global accuracy: the test accuracy of the global model each site received at the start of the round)")

    app_dir = os.path.join(server_dir, "app_server")
    best = max(rounds, key=lambda r: metric(r["aggregated_metrics"], "accuracy"))
    print(f"best global model: round {best['round']}, accuracy {metric(best['aggregated_metrics'], 'accuracy'):.4f}: "
          f"{os.path.join(app_dir, 'best_FL_global_model.pt')}")
    final_scores = read_final_scores(server_dir)
    final = f"accuracy {sum(final_scores) / len(final_scores):.4f}" if final_scores else "not scored"
    print(f"final global model: after round {rounds[-1]['round']}, {final}: {os.path.join(app_dir, 'FL_global_model.pt')}")
    return 0


def main() -> int:
    args = parse_args()
    if args.env != "prod" and not (args.export_config or NVFLARE_EXPORT):
        args.data_root = os.path.abspath(args.data_root)  # the sites run in folders of their own
    recipe = build_recipe(args)
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
    try:
        if args.env != "prod":  # on a real system the data and ports are the sites' own
            preflight(args)
    except DataError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    # Sites run `python3` from PATH: make that this interpreter, whose environment has torch.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if args.env == "sim":
        return run_in_simulator(recipe, args)
    return run_on_system(recipe, args)


def run_in_simulator(recipe, args: argparse.Namespace) -> int:
    env = SimEnv(clients=site_names(args.n_clients), workspace_root=args.workspace)
    try:
        workspace = recipe.execute(env).get_result()
    except RuntimeError:  # the simulator failed; the summary says which site and why
        workspace = os.path.join(args.workspace, JOB_NAME)
    return summarize(os.path.join(workspace, "server", "simulate_job"), os.path.join(workspace, "server", "log.txt"),
                     args, logs_root=workspace)


def run_on_system(recipe, args: argparse.Namespace) -> int:
    """Submit to a POC that this run starts, or to the running system behind --startup_kit."""
    if args.env == "poc":
        poc_workspace = get_poc_workspace()
        if os.path.exists(poc_workspace):
            print(f"ERROR: a POC workspace exists at {poc_workspace}, and --env poc would stop and delete it; "
                  f"if it is yours, submit to it with --env prod --startup_kit <its admin kit>, "
                  f"or remove it first: nvflare poc stop; nvflare poc clean", file=sys.stderr)
            return 2
        env = PocEnv(clients=site_names(args.n_clients))
    else:
        env = ProdEnv(startup_kit_location=args.startup_kit)
    run = recipe.execute(env)
    print(f"submitted job {run.get_job_id()}; waiting for it to finish")
    result = run.get_result(clean_up=False)
    status = run.get_status()
    if args.env == "poc" and result:
        # The result lives inside the POC workspace, which is deleted next: keep a copy.
        result = shutil.copytree(result, os.path.join(args.workspace, JOB_NAME, run.get_job_id()))
        env.stop(clean_up=True)
    print(f"job {run.get_job_id()} ended with status {status}; result: {result}")
    if not result or status != "FINISHED:COMPLETED":
        print(f"ERROR: job {run.get_job_id()} did not complete (status {status})", file=sys.stderr)
        return 1
    return summarize(os.path.join(result, "workspace"), os.path.join(result, "workspace", "log.txt"), args)


if __name__ == "__main__":
    sys.exit(main())

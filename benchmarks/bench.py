"""Benchmarks, each a side-by-side comparison in one run (see BENCHMARKS.md):

1. client data path: images/s of this project's training step vs NVFlare's original example's
   (torchvision CIFAR10 -> PIL -> ToTensor + Normalize, DataLoader batch 4, 2 workers);
2. DDP scaling: epoch time with 2 ranks vs 1 rank;
3. FL overhead: round wall time minus the slowest site's train + eval, and time to the first
   trainer handshake, from the job's own logs;
4. accuracy over seeds (mean and range, dips, collapses) and wall time of the defaults vs a baseline's
   settings (the original example's, or this project's previous defaults), after the same rounds;
5. weights exchanged as NumPy arrays vs as PyTorch tensors (the default): a round's wall time and FL overhead;
6. torchrun's rendezvous on a fixed --master_port vs its standalone one (the default): the time from
   `python job.py` to the last trainer handshake. Items 5 and 6 alternate jobs of the two settings
   (--quick, a smoke run, compares with the run of the defaults that items 3 and 4 made);
7. models of real size (model_size.py): this job vs NVFlare's stock job vs a loopback floor, round time and peak
   memory per process, for models of 64 MiB to 768 MiB (--quick: 64 MiB).

  python benchmarks/bench.py --data_root /tmp/nvflare/data          # everything, about 30 minutes on 2 cores
  python benchmarks/bench.py --data_root /tmp/nvflare/data --quick  # a smoke run of every item
  python benchmarks/bench.py --data_root /tmp/small --items 4 --n_clients 3 --alpha 0.5 --baseline previous
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
# the example's own modules, one folder up, and model_size.py beside this file (also when imported as benchmarks.bench)
sys.path[:0] = [PROJECT, HERE]

import model_size

from data import BATCH_DIR, META_FILE, epoch_batches, load_cifar10, normalize, read_pickle
from job import JOB_NAME
from local_run.results import back_to_chance, learning_curve, log_times, metric, read_rounds, worst_dip
from model import Net
from protocol import DEFAULT_DATA_ROOT, TRAINING_FLAGS, positive_float, positive_int

# The client.py of NVFlare's original example: batch 4 a rank (a site batch of 8 on 2 ranks), SGD lr 0.001 with
# momentum 0.9, no clipping, no warm-up.
ORIGINAL_SETTINGS = {
    "batch_size": 8, "lr": 0.001, "momentum": 0.9, "max_grad_norm": 0, "warmup_rounds": 1, "epochs": 2,
    "no_augment": True,
}  # fmt: skip
# This project's defaults before they were chosen over seeds (docs/defaults.md): 64 a rank, on 2 ranks.
PREVIOUS_DEFAULTS = {
    "batch_size": 128, "lr": 0.04, "momentum": 0.9, "max_grad_norm": 0, "warmup_rounds": 1, "epochs": 2,
    "no_augment": True,
}  # fmt: skip
# The defaults chosen over seeds on the synthetic presets (2026-11-27), before real images were at hand.
SYNTHETIC_TUNED = {
    "batch_size": 128, "lr": 0.2, "momentum": 0.5, "max_grad_norm": 2.0, "warmup_rounds": 2, "epochs": 2,
    "no_augment": True,
}  # fmt: skip
BASELINES = {
    "original": ORIGINAL_SETTINGS, "previous": PREVIOUS_DEFAULTS, "synthetic-tuned": SYNTHETIC_TUNED,
    # The defaults with weights quantized both ways (quantize.py), against the defaults in full precision.
    "blockwise8": {"quantize_mode": "blockwise8"},
}  # fmt: skip


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def sgd_step(net, optimizer, images, labels) -> None:
    loss = F.cross_entropy(net(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def tensor_path_images_per_s(data_root: str, n: int, batch_size: int, device: torch.device) -> float:
    """This project's path: the images sit on the device as uint8; a batch is an index op."""
    train_x, train_y, _, _ = load_cifar10(data_root)
    x, y = train_x[:n].to(device), train_y[:n].to(device)
    net = Net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    batches = [b.to(device) for b in epoch_batches(n, batch_size, epoch=0, seed=0)]
    sgd_step(net, optimizer, normalize(x[batches[0]]), y[batches[0]])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for idx in batches:
        sgd_step(net, optimizer, normalize(x[idx]), y[idx])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


class OriginalStyleCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 with the original example's transforms, on any batch files: its md5 checks refuse
    all bytes but the real dataset's, so they are skipped here."""

    def __init__(self, root: str):
        transform = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        super().__init__(root, train=True, transform=transform)

    def _check_integrity(self):
        return True

    def _load_meta(self):
        self.classes = read_pickle(os.path.join(self.root, BATCH_DIR, META_FILE))["label_names"]


def original_path_images_per_s(data_root: str, n: int, device: torch.device) -> float:
    """The original example's path: torchvision's dataset, PIL and transforms per sample, batch 4, 2 workers."""
    dataset = torch.utils.data.Subset(OriginalStyleCIFAR10(data_root), range(n))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)
    net = Net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    started = time.perf_counter()
    for images, labels in loader:
        sgd_step(net, optimizer, images.to(device), labels.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def ddp_epoch_worker(data_root: str, n: int, batch_size: int) -> None:
    """Runs under torchrun: one epoch of client.train on n images; rank 0 prints the epoch time."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from client import choose_backend, train

    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    backend, device, _ = choose_backend(torch.cuda.device_count(), local_rank, local_world)  # as client.py does
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    train_x, train_y, _, _ = load_cifar10(data_root)
    x, y = train_x[:n].to(device), train_y[:n].to(device)
    model = Net().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    defaults = {name: TRAINING_FLAGS[name]["default"] for name in ("lr", "momentum", "max_grad_norm")}
    settings = {"epochs": 1, "batch_size": batch_size, "seed": 0, "augment": True, **defaults}
    train(ddp, x, y, **settings, first_epoch=0)  # warm-up epoch
    dist.barrier()
    started = time.perf_counter()
    train(ddp, x, y, **settings, first_epoch=1)
    dist.barrier()
    if dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "epoch_seconds": time.perf_counter() - started,
                    "backend": dist.get_backend(),
                    "device": str(next(model.parameters()).device),
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


def ddp_epoch_seconds(data_root: str, nproc: int, n: int, batch_size: int) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "--log-dir=/dev/null",
            __file__,
            "--data_root",
            data_root,
            "--ddp_epoch",
            str(n),
            "--batch_size",
            str(batch_size),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # torchrun sets it for 2+ ranks only
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode:
        sys.exit(f"the DDP epoch with {nproc} rank(s) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_job(data_root: str, job_flags: list[str], settings: dict, workspace: str) -> dict:
    """The real `python job.py`; returns wall time, the learning curve and overheads read from its workspace."""
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in settings.items()]
    started = time.time()
    subprocess.run(
        [sys.executable, os.path.join(PROJECT, "job.py"), "--data_root", data_root, "--workspace", workspace]
        + job_flags
        + flags,
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    wall = time.time() - started
    ws = os.path.join(workspace, JOB_NAME)
    server_dir = os.path.join(ws, "server", "simulate_job")
    server_log = os.path.join(ws, "server", "log.txt")
    rounds_done = read_rounds(server_dir)
    accuracies, losses = learning_curve(server_dir)

    # Round r runs from "Sending task train" to the next one; the last round has no next.
    sends = log_times(server_log, "Sending task train")
    pickups = log_times(server_log, "sent task assignment to client")  # one per site per round
    results = log_times(server_log, "finished processing client result by controller")
    sites = [s["name"] for s in rounds_done[0]["sites"]]
    n_sites = len(sites)
    per_round = []
    for r in range(1, len(sends) - 1):  # round 0 includes start-up; the last has no successor
        wall_r = sends[r + 1] - sends[r]
        compute = max(metric(s["metrics"], "compute_seconds") for s in rounds_done[r]["sites"])
        per_round.append(
            {
                "round_wall": wall_r,
                "compute": compute,
                "overhead": wall_r - compute,
                "task_pickup": max(pickups[r * n_sites : (r + 1) * n_sites]) - sends[r],
                "after_last_result": sends[r + 1] - max(results[r * n_sites : (r + 1) * n_sites]),
            }
        )
    handshakes = [
        t for site in sites for t in log_times(os.path.join(ws, site, "log.txt"), "trainer session established")
    ]
    mean = lambda key: sum(p[key] for p in per_round) / len(per_round) if per_round else float("nan")  # noqa: E731
    return {
        "wall": wall,
        "last_round_accuracy": accuracies[-2],
        "final_accuracy": accuracies[-1],
        "worst_dip": worst_dip(accuracies),
        "back_to_chance": back_to_chance(losses),
        "to_handshake": max(handshakes) - started,
        # The slowest site's own time for its first task (receive to send), which start-up costs would inflate.
        "first_compute": max(metric(s["metrics"], "compute_seconds") for s in rounds_done[0]["sites"]),
        **{key: mean(key) for key in ("round_wall", "compute", "overhead", "task_pickup", "after_last_result")},
    }


def alternate(
    data_root: str, job_flags: list[str], a: dict, pairs: int, defaults: list[dict] | None
) -> tuple[list[dict], list[dict]]:
    """run_job() with settings a, then with the defaults, `pairs` times: both sides see the same machine load.
    With `defaults` (a smoke run's runs of the defaults, made already), only a's side runs."""
    runs_a, runs_b = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            runs_a.append(run_job(data_root, job_flags, a, os.path.join(tmp, f"a{i}")))
            if defaults is None:
                runs_b.append(run_job(data_root, job_flags, {}, os.path.join(tmp, f"b{i}")))
    return runs_a, runs_b if defaults is None else defaults[:pairs]


def over_seeds(runs: list[dict], key: str, fmt: str = ".3f") -> str:
    """mean [min-max] of runs[*][key]."""
    values = [run[key] for run in runs]
    return f"{sum(values) / len(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--quick", action="store_true", help="small sizes: checks that every item runs")
    p.add_argument("--items", default="1234567", help="the items to run, for example 4 (default: all)")
    p.add_argument("--seeds", type=positive_int, help="seeds 0..N-1 of item 4 (default 5; 1 with --quick)")
    p.add_argument("--num_rounds", type=positive_int, help="rounds of each job (default 5; 3 with --quick)")
    p.add_argument("--n_clients", type=positive_int, default=2, help="sites of each job")
    p.add_argument("--alpha", type=positive_float, help="Dirichlet label skew of each job (default IID)")
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default="original",
        help="item 4's baseline: the original example's settings, this project's first defaults (previous), "
        "its defaults chosen on the synthetic presets (synthetic-tuned), or the defaults quantized (blockwise8)",
    )
    p.add_argument("--ddp_epoch", type=int, help=argparse.SUPPRESS)  # internal: the torchrun worker
    p.add_argument(
        "--batch_size",
        type=int,
        default=TRAINING_FLAGS["batch_size"]["default"],
        help="batch size of this project's path",
    )
    args = p.parse_args()
    if args.ddp_epoch:
        return ddp_epoch_worker(args.data_root, args.ddp_epoch, args.batch_size)

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_original, n_fast, n_ddp = (200, 1000, 1000) if args.quick else (2000, 10_000, 10_000)
    seeds = args.seeds or (1 if args.quick else 5)
    rounds = args.num_rounds or (3 if args.quick else 5)
    print(f"machine: {machine()}; one thread per process; device {device}")
    rows = []

    if "1" in args.items:
        original = original_path_images_per_s(args.data_root, n_original, device)
        fast = tensor_path_images_per_s(args.data_root, n_fast, args.batch_size, device)
        rows.append(
            (
                f"1 data path: images/s, original path (batch 4) vs ours (batch {args.batch_size})",
                f"{original:,.0f}",
                f"{fast:,.0f}",
                f"{fast / original:.1f}x faster",
            )
        )

    if "2" in args.items:
        one = ddp_epoch_seconds(args.data_root, 1, n_ddp, args.batch_size)
        two = ddp_epoch_seconds(args.data_root, 2, n_ddp, args.batch_size)
        rows.append(
            (
                f"2 DDP: epoch of {n_ddp} images, 1 rank vs 2 ranks ({two['backend']})",
                f"{one['epoch_seconds']:.2f} s",
                f"{two['epoch_seconds']:.2f} s",
                f"{two['epoch_seconds'] / one['epoch_seconds']:.2f}x the time",
            )
        )

    job_flags = ["--num_rounds", str(rounds), "--n_clients", str(args.n_clients)]
    job_flags += ["--alpha", str(args.alpha)] if args.alpha else []
    ours, base = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds if "4" in args.items else 1 if "3" in args.items else 0):
            seeded = job_flags + ["--seed", str(seed)]
            ours.append(run_job(args.data_root, seeded, {}, os.path.join(tmp, f"ours{seed}")))
            if "4" in args.items:
                base.append(run_job(args.data_root, seeded, BASELINES[args.baseline], os.path.join(tmp, f"base{seed}")))

    if "3" in args.items:
        first = ours[0]
        rows.append(
            (
                "3 FL overhead per round (s): round wall - slowest site's train+eval",
                "",
                f"{first['overhead']:.2f} s",
                f"of {first['round_wall']:.2f} s",
            )
        )
        rows.append(("  of which: round start -> last site picks up its task", "", f"{first['task_pickup']:.2f} s", ""))
        rows.append(
            ("  of which: last result in -> next round's task sent", "", f"{first['after_last_result']:.2f} s", "")
        )
        rows.append(
            ("  time from `python job.py` to the last trainer handshake", "", f"{first['to_handshake']:.1f} s", "")
        )
        rows.append(
            (
                "  slowest site's train+eval: round 0 vs a later round",
                "",
                f"{first['first_compute']:.2f} s",
                f"vs {first['compute']:.2f} s",
            )
        )

    pairs = 1 if args.quick else 3
    made = ours if args.quick and ours else None  # a smoke run reuses its run of the defaults
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    if "5" in args.items:
        numpy_runs, torch_runs = alternate(args.data_root, job_flags, {"exchange_format": "numpy"}, pairs, made)
        rows.append(
            (
                f"5 exchange: round wall time (s), NumPy vs PyTorch tensors, {len(torch_runs)} jobs each",
                f"{mean(numpy_runs, 'round_wall'):.2f} s",
                f"{mean(torch_runs, 'round_wall'):.2f} s",
                f"{mean(torch_runs, 'round_wall') / mean(numpy_runs, 'round_wall'):.2f}x the time",
            )
        )
        rows.append(
            (
                "  FL overhead per round (s): round wall - slowest site's train+eval",
                f"{mean(numpy_runs, 'overhead'):.2f} s",
                f"{mean(torch_runs, 'overhead'):.2f} s",
                "",
            )
        )

    if "6" in args.items:
        fixed_runs, free_runs = alternate(args.data_root, job_flags, {"master_port": 7777}, pairs, made)
        rows.append(
            (
                f"6 start-up: python job.py -> last handshake, --master_port vs standalone, {pairs} jobs each",
                f"{mean(fixed_runs, 'to_handshake'):.1f} s",
                f"{mean(free_runs, 'to_handshake'):.1f} s",
                f"{mean(free_runs, 'to_handshake') / mean(fixed_runs, 'to_handshake'):.2f}x the time",
            )
        )

    if "4" in args.items:
        setup = f"{seeds} seed(s), {args.n_clients} site(s), {f'alpha {args.alpha}' if args.alpha else 'IID'}"
        rows.append(
            (
                f"4 {args.baseline} settings vs defaults, {setup}, {rounds} rounds",
                "",
                "",
                "",
            )
        )
        rows.append(
            (
                "  final model accuracy: mean [min-max]",
                over_seeds(base, "final_accuracy"),
                over_seeds(ours, "final_accuracy"),
                "",
            )
        )
        rows.append(
            (
                "  last round's global accuracy: mean [min-max]",
                over_seeds(base, "last_round_accuracy"),
                over_seeds(ours, "last_round_accuracy"),
                "",
            )
        )
        rows.append(
            (
                "  worst dip below the best so far, after round 2",
                f"{max(r['worst_dip'] for r in base):.3f}",
                f"{max(r['worst_dip'] for r in ours):.3f}",
                "",
            )
        )
        rows.append(
            (
                "  runs whose train loss went back near chance",
                f"{sum(r['back_to_chance'] for r in base)} of {seeds}",
                f"{sum(r['back_to_chance'] for r in ours)} of {seeds}",
                "",
            )
        )
        wall = lambda runs: sum(r["wall"] for r in runs) / len(runs)  # noqa: E731
        rows.append(
            (
                "  round wall time (s), rounds 1 on: mean [min-max]",
                over_seeds(base, "round_wall", ".2f"),
                over_seeds(ours, "round_wall", ".2f"),
                f"{mean(ours, 'round_wall') / mean(base, 'round_wall'):.2f}x the time",
            )
        )
        rows.append(
            (
                "  job wall time (s): mean [min-max]",
                over_seeds(base, "wall", ".1f"),
                over_seeds(ours, "wall", ".1f"),
                f"{wall(ours) / wall(base):.2f}x the time",
            )
        )

    width = max((len(r[0]) for r in rows), default=0)
    if rows:
        print(f"{'item':<{width}}  {'baseline':>21}  {'this project':>21}  ratio")
    for name, base_value, ours_value, ratio in rows:
        print(f"{name:<{width}}  {base_value:>21}  {ours_value:>21}  {ratio}".rstrip())
    if "7" in args.items:
        print("7 models of real size: 2 sites; this job's sites 2 ranks, the stock job's one process")
        model_size.report([(1, "float32")] if args.quick else model_size.SIZES, rounds, ["this", "stock"], ranks=2)


if __name__ == "__main__":
    main()

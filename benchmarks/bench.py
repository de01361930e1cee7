"""Benchmarks, each a side-by-side comparison in one run (see BENCHMARKS.md):

1. client data path: images/s of this project's training step vs NVFlare's original example's
   (torchvision CIFAR10 -> PIL -> ToTensor + Normalize, DataLoader batch 4, 2 workers);
2. DDP scaling: epoch time with 2 ranks vs 1 rank;
3. FL overhead: round wall time minus the slowest site's train + eval, and time to the first
   trainer handshake, from the job's own logs;
4. accuracy and wall time of the defaults vs the original example's settings, after the same rounds.

  python benchmarks/bench.py --data_root /tmp/nvflare/data          # everything, about 6 minutes on 2 cores
  python benchmarks/bench.py --data_root /tmp/nvflare/data --quick  # a smoke run of every item
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
sys.path.insert(0, PROJECT)  # the example's own modules, one folder up

from data import BATCH_DIR, META_FILE, epoch_batches, load_cifar10, normalize, read_pickle
from model import Net
from protocol import DEFAULT_DATA_ROOT, TRAINING_FLAGS
from results import JOB_NAME, log_times, metric, read_final_scores, read_rounds

ORIGINAL_SETTINGS = {"batch_size": 4, "lr": 0.001, "epochs": 2}  # the client.py of NVFlare's original example


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
    batches = [b.to(device) for b in epoch_batches(n, 0, 1, batch_size, epoch=0, seed=0)]
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
    settings = {"epochs": 1, "batch_size": batch_size, "lr": 0.01, "seed": 0}
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


def run_job(data_root: str, rounds: int, settings: dict, workspace: str) -> dict:
    """The real `python job.py`; returns wall time, accuracies and overheads read from its workspace."""
    flags = [f"--{k}={v}" for k, v in settings.items()]
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            os.path.join(PROJECT, "job.py"),
            "--num_rounds",
            str(rounds),
            "--data_root",
            data_root,
            "--workspace",
            workspace,
            *flags,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    )
    wall = time.time() - started
    ws = os.path.join(workspace, JOB_NAME)
    server_log = os.path.join(ws, "server", "log.txt")
    rounds_done = read_rounds(os.path.join(ws, "server", "simulate_job"))
    final = read_final_scores(os.path.join(ws, "server", "simulate_job"))

    # Round r runs from "Sending task train" to the next one; the last round has no next.
    sends = log_times(server_log, "Sending task train")
    pickups = log_times(server_log, "sent task assignment to client")  # one per site per round
    results = log_times(server_log, "finished processing client result by controller")
    n_sites = len(rounds_done[0]["sites"])
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
        t
        for site in ("site-1", "site-2")
        for t in log_times(os.path.join(ws, site, "log.txt"), "trainer session established")
    ]
    mean = lambda key: sum(p[key] for p in per_round) / len(per_round) if per_round else float("nan")  # noqa: E731
    return {
        "wall": wall,
        "last_round_accuracy": metric(rounds_done[-1]["aggregated_metrics"], "accuracy"),
        "final_accuracy": sum(final.values()) / len(final),
        "to_handshake": max(handshakes) - started,
        **{key: mean(key) for key in ("round_wall", "compute", "overhead", "task_pickup", "after_last_result")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=DEFAULT_DATA_ROOT)
    p.add_argument("--quick", action="store_true", help="small sizes: checks that every item runs")
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
    n_original, n_fast, n_ddp, rounds = (200, 1000, 1000, 3) if args.quick else (2000, 10_000, 10_000, 5)
    print(f"machine: {machine()}; one thread per process; device {device}")
    rows = []

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

    with tempfile.TemporaryDirectory() as tmp:
        original_run = run_job(args.data_root, rounds, ORIGINAL_SETTINGS, os.path.join(tmp, "original"))
        ours = run_job(args.data_root, rounds, {}, os.path.join(tmp, "ours"))
    rows.append(
        (
            "3 FL overhead per round (s): round wall - slowest site's train+eval",
            "",
            f"{ours['overhead']:.2f} s",
            f"of {ours['round_wall']:.2f} s",
        )
    )
    rows.append(("  of which: round start -> last site picks up its task", "", f"{ours['task_pickup']:.2f} s", ""))
    rows.append(("  of which: last result in -> next round's task sent", "", f"{ours['after_last_result']:.2f} s", ""))
    rows.append(("  time from `python job.py` to the last trainer handshake", "", f"{ours['to_handshake']:.1f} s", ""))
    rows.append(
        (
            f"4 accuracy after {rounds} rounds: original settings vs defaults (last round / final model)",
            f"{original_run['last_round_accuracy']:.3f} / {original_run['final_accuracy']:.3f}",
            f"{ours['last_round_accuracy']:.3f} / {ours['final_accuracy']:.3f}",
            "",
        )
    )
    rows.append(
        (
            f"  job wall time, {rounds} rounds: original settings vs defaults",
            f"{original_run['wall']:.1f} s",
            f"{ours['wall']:.1f} s",
            f"{ours['wall'] / original_run['wall']:.2f}x the time",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"{'item':<{width}}  {'baseline':>15}  {'this project':>15}  ratio")
    for name, base, mine, ratio in rows:
        print(f"{name:<{width}}  {base:>15}  {mine:>15}  {ratio}")


if __name__ == "__main__":
    main()

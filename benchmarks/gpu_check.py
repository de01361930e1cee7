"""One short run on a GPU machine: the client's CUDA/NCCL path measured against its speed targets, side
by side with the seed's data path, in one run. Prints a table with the device, and exits non-zero when CUDA or
NCCL is not what ran or when any target is missed.

    pip install -r requirements.txt && python benchmarks/gpu_check.py
"""

import os
import sys
import tempfile

import torch

from bench import (
    ddp_epoch_seconds,
    machine,
    original_path_images_per_s,
    run_job,
    tensor_path_images_per_s,
)
from data import write_synthetic
from protocol import TRAINING_FLAGS

BATCH = TRAINING_FLAGS["batch_size"]["default"]
STEP_IMAGES = 10_000  # images of the timed epoch of client.train


def verdicts(m: dict) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for each target, from the measurements `m`."""
    first, steady = m["first_compute"], m["steady_compute"]
    return [
        ("backend of client.train, 1 rank", f"{m['backend']} on {m['device']}", "nccl on cuda",
         m["backend"] == "nccl" and m["device"].startswith("cuda")),
        (f"1 client.train under DDP, 1 rank, batch {BATCH}", f"{m['step_images_per_s']:,.0f} images/s",
         ">= 120,000 images/s", m["step_images_per_s"] >= 120_000),
        ("3 data path: ours vs the seed's (batch 4)", f"{m['data_ratio']:.1f}x", ">= 100x", m["data_ratio"] >= 100),
        ("4 first task's train+eval vs a steady round's", f"{first:.2f} s vs {steady:.2f} s", "<= steady + 2 s",
         first <= steady + 2),
        ("5 job.py --nproc_per_node 1, 5 rounds, synthetic", f"{m['job_wall']:.1f} s wall", "<= 25 s",
         m["job_wall"] <= 25),
    ]  # fmt: skip


def measure(data_root: str, workspace: str, device: torch.device) -> dict:
    step = ddp_epoch_seconds(data_root, 1, n=STEP_IMAGES, batch_size=BATCH)
    original = original_path_images_per_s(data_root, 2000, device)
    ours = tensor_path_images_per_s(data_root, STEP_IMAGES, BATCH, device)
    job = run_job(data_root, ["--nproc_per_node", "1", "--num_rounds", "5"], {}, workspace)
    return {
        "backend": step["backend"],
        "device": step["device"],
        "step_images_per_s": STEP_IMAGES / step["epoch_seconds"],
        "data_ratio": ours / original,
        "first_compute": job["first_compute"],
        "steady_compute": job["compute"],
        "job_wall": job["wall"],
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device; this check needs a GPU machine", file=sys.stderr)
        return 1
    print(f"machine: {machine()}; {torch.cuda.device_count()} GPU(s); NCCL {torch.cuda.nccl.version()}")
    with tempfile.TemporaryDirectory() as data_root, tempfile.TemporaryDirectory() as workspace:
        write_synthetic(data_root)
        rows = verdicts(measure(data_root, workspace, torch.device("cuda", 0)))
    width = max(len(what) for what, *_ in rows)
    print(f"{'check':<{width}}  {'measured':>28}  {'target':>20}  result")
    for what, measured, target, met in rows:
        print(f"{what:<{width}}  {measured:>28}  {target:>20}  {'met' if met else 'MISSED'}")
    missed = [what for what, _, _, met in rows if not met]
    if missed:
        print(f"FAIL: {len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""One short run on a GPU machine: the client's CUDA path under torchrun with NCCL, and benchmark
item 1 (data path) on the GPU. Fails loudly if CUDA or NCCL is not what actually ran.

    pip install -r requirements.txt && python benchmarks/gpu_check.py
"""

import os
import sys
import tempfile

import torch

from bench import ddp_epoch_seconds, machine, original_path_images_per_s, tensor_path_images_per_s
from data import write_synthetic


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device; this check needs a GPU machine", file=sys.stderr)
        return 1
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", 0)
    print(f"machine: {machine()}; {gpus} GPU(s)")
    with tempfile.TemporaryDirectory() as data_root:
        write_synthetic(data_root)
        ddp = ddp_epoch_seconds(data_root, gpus, n=10_000, batch_size=32)
        original = original_path_images_per_s(data_root, 2000, device)
        fast = tensor_path_images_per_s(data_root, 10_000, 32, device)
    print(f"{'check':<50}  result")
    print(
        f"{f'client.train, DDP over {gpus} rank(s), 10,000 images':<50}  backend {ddp['backend']}, "
        f"{ddp['epoch_seconds']:.2f} s per epoch"
    )
    print(
        f"{'1 data path: original (batch 4) vs ours (batch 32)':<50}  {original:,.0f} vs {fast:,.0f} images/s, "
        f"{fast / original:.1f}x"
    )
    if ddp["backend"] != "nccl" or not ddp["device"].startswith("cuda"):
        print(
            f"FAIL: the client trained with {ddp['backend']} on {ddp['device']}, not NCCL on CUDA, "
            f"with {gpus} GPU(s) for {gpus} rank(s)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

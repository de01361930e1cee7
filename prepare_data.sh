#!/usr/bin/env bash
# Puts CIFAR-10 (python version) in $DATA_ROOT/cifar-10-batches-py, once, for every site and rank.
#   bash prepare_data.sh              download the real dataset through torchvision (md5-checked)
#   bash prepare_data.sh --synthetic        write a learnable SYNTHETIC stand-in, 10,000 images (no network needed)
#   bash prepare_data.sh --synthetic-small  a smaller, sharper stand-in, 1,500 images: where a too-bold learning
#                                           rate makes the global model dip or collapse, as on small real data
set -euo pipefail

DATA_ROOT="${DATA_ROOT:-/tmp/nvflare/data}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${1:-}" in
  "") MODE=download ;;
  --synthetic) MODE=standard ;;
  --synthetic-small) MODE=small ;;
  *) echo "usage: bash prepare_data.sh [--synthetic | --synthetic-small]" >&2; exit 2 ;;
esac

mkdir -p "$DATA_ROOT"
# One preparer at a time; a second waits, then finds the data in place.
exec 9>"$DATA_ROOT/.prepare_data.lock"
flock 9

python3 - "$DATA_ROOT" "$MODE" "$HERE" <<'PY'
import os, sys
data_root, mode, here = sys.argv[1:]
sys.path.insert(0, here)
from data import BATCH_DIR, DataError, is_synthetic, synthetic_preset, write_synthetic

folder = os.path.join(data_root, BATCH_DIR)
if mode != "download":
    if os.path.isdir(folder) and os.listdir(folder) and not is_synthetic(data_root):
        sys.exit(f"ERROR: {folder} holds the real CIFAR-10; leaving it alone. Use another DATA_ROOT for the stand-in.")
    if synthetic_preset(data_root) == mode and len(os.listdir(folder)) >= 7:
        print(f"the SYNTHETIC stand-in for CIFAR-10 ({mode}) is already in {folder}")
        sys.exit(0)
    write_synthetic(data_root, mode)
    print(f"wrote a SYNTHETIC stand-in for CIFAR-10 ({mode}, not the real images) to {folder}")
    sys.exit(0)

import socket
import torchvision

socket.setdefaulttimeout(30)
try:
    if os.path.isdir(folder) and is_synthetic(data_root):
        sys.exit(f"ERROR: {folder} holds the SYNTHETIC stand-in; remove it first to download the real CIFAR-10.")
    torchvision.datasets.CIFAR10(root=data_root, train=True, download=True)
    torchvision.datasets.CIFAR10(root=data_root, train=False, download=True)
except DataError as e:
    sys.exit(f"ERROR: {e}")
except (OSError, RuntimeError) as e:
    sys.exit(f"ERROR: could not download CIFAR-10 ({e.__class__.__name__}: {e}); "
             f"without network access, use: bash prepare_data.sh --synthetic")
print(f"CIFAR-10 is ready in {folder}")
PY

"""What job.py and the trainers it launches agree on: the training flags, declared once, and the
lines a trainer prints that job.py reads back from the site logs."""

import argparse
import re
import shlex

DEFAULT_DATA_ROOT = "/tmp/nvflare/data"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


# Every flag that reaches client.py: job.py offers each one and passes it on through train_args().
TRAINING_FLAGS = {
    "data_root": {"default": DEFAULT_DATA_ROOT, "help": "folder that holds cifar-10-batches-py on every site"},
    "epochs": {"type": positive_int, "default": 3, "help": "local epochs per round"},
    "batch_size": {
        "type": positive_int,
        "default": 64,
        "help": "a site's batch: the samples of one optimizer step, split over the site's ranks, so that a site "
        "trains the same model on any number of GPUs",
    },
    # The defaults were chosen over seeds on a small set of real images, and checked on both synthetic presets
    # (docs/defaults.md): with augmentation, more and smaller steps at a lower rate learn more without dips.
    "lr": {"type": positive_float, "default": 0.1, "help": "SGD learning rate, reached after --warmup_rounds"},
    "momentum": {"type": non_negative_float, "default": 0.5, "help": "SGD momentum"},
    "max_grad_norm": {
        "type": non_negative_float,
        "default": 2.0,
        "help": "clip each step's gradient to this L2 norm; 0 turns clipping off",
    },
    "warmup_rounds": {
        "type": positive_int,
        "default": 2,
        "help": "round r trains at lr * min(1, (r + 1) / warmup_rounds); 1 turns the warm-up off",
    },
    "no_augment": {
        "action": "store_true",
        "help": "train on the images as they are; by default each training image is randomly cropped (reflect "
        "padding of 4) and flipped, never an evaluated one",
    },
    "alpha": {
        "type": positive_float,
        "default": None,
        "help": "Dirichlet label skew across sites (small: skewed); default IID shards",
    },
    "seed": {
        "type": non_negative_int,
        "default": 0,
        "help": "seed of the initial global model, the shard split and the shuffles",
    },
    "fsdp": {
        "action": "store_true",
        "help": "shard the model over each site's ranks with FSDP2 (fully_shard), each rank holding a part of the "
        "weights, gradients and optimizer state, instead of a whole copy on every rank (DDP)",
    },
    "use_tracking": {"action": "store_true", "help": "log each site's metrics to TensorBoard"},
    "stall_timeout": {
        "type": positive_float,
        "default": 120.0,
        "help": "seconds a rank waits for its peers inside a round before it ends its site as stuck",
    },
}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    for name, spec in TRAINING_FLAGS.items():
        parser.add_argument(f"--{name}", **spec)


def train_args(args: argparse.Namespace) -> str:
    """The training flags in `args` as the trainer's command-line arguments, quoted for NVFlare, which splits
    them as a shell would (shlex): a path may hold spaces and quotes."""
    parts = []
    for name, spec in TRAINING_FLAGS.items():
        value = getattr(args, name)
        if spec.get("action") == "store_true":
            parts += [f"--{name}"] if value else []
        elif value is not None:
            parts += [f"--{name}", str(value)]
    return shlex.join(parts)


# A trainer's own report lines: "<site> rank <r>: <kind>: <text>".
ERROR = "ERROR"  # the rank failed; the text says why
STOPPING = "stopping"  # the server ended the run while this rank was working: a consequence, not a cause


# How gloo and NCCL report that a peer rank went away (torch 2.14). A rank's line that says so is a consequence:
# the peer that went first is the cause.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "NCCL communicator was aborted")


def rank_line(site: str, rank: int, kind: str, text: str) -> str:
    return f"{site} rank {rank}: {kind}: {text}"


def rank_line_pattern(site: str, kind: str, rank: str = r"\d+") -> str:
    """A regex for rank_line(site, <rank>, kind, <text>): group 1 is the rank, group 2 the text."""
    return re.escape(f"{site} rank ") + f"({rank})" + re.escape(f": {kind}: ") + r"([^\n]*)"

"""The trainer of one site: torch.distributed.run starts one copy per rank, and the ranks train `Net`
together with DistributedDataParallel (or, with --fsdp, sharded with FSDP2). Rank 0 talks to the NVFlare server;
the others follow it."""

import argparse
import hashlib
import os
import socket
import time
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from nvflare.client.tracking import SummaryWriter
from torch.nn.parallel import DistributedDataParallel as DDP

import flare_ddp
from data import (
    DataError,
    crop_and_flip,
    epoch_augmentation,
    epoch_batches,
    is_synthetic,
    load_cifar10,
    normalize,
    partition_indices,
    rank_share,
)
from model import Net
from protocol import add_training_flags
from rank_exit import die_with_parent, failures_end_the_rank, leave, say


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    add_training_flags(p)
    p.add_argument("--site", required=True, help="this site's name, one of --sites")
    p.add_argument("--sites", required=True, help="comma-separated names of all sites; fixes the data shards")
    args = p.parse_args(argv)
    args.sites = args.sites.split(",")
    if args.site not in args.sites:
        p.error(f"--site {args.site} is not in --sites {','.join(args.sites)}")
    return args


def main() -> NoReturn:
    die_with_parent(os.getppid())
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, device, why_cpu = choose_backend(gpus, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A collective inside a round that waits longer than this ends the site: a peer is stuck.
    dist.init_process_group(backend, timeout=timedelta(seconds=args.stall_timeout))
    rank = dist.get_rank()
    with failures_end_the_rank(args.site, args.stall_timeout):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(not set)")
        say(f"{args.site} rank {rank}: {describe(device)}; CUDA_VISIBLE_DEVICES={visible}")
        if rank == 0:
            why = f" ({why_cpu})" if why_cpu else ""
            say(f"{args.site}: {dist.get_world_size()} rank(s), backend {backend} on {device.type}{why}")
        run_site(args, device)
    dist.destroy_process_group()
    leave(0)


def run_site(args, device: torch.device) -> None:
    """This site's part of the job: load its shard, then answer the server's tasks until it says stop."""
    rank = dist.get_rank()
    train_x, train_y, test_x, test_y = load_cifar10(args.data_root)
    # One floor for every site (a site batch), so that all sites compute the same shards.
    shard = partition_indices(train_y, args.sites, args.site, args.alpha, args.seed, min_size=args.batch_size)
    agree_on_data(
        args.site,
        {
            "training images": len(train_y),
            "test images": len(test_y),
            "shard size": len(shard),
            "steps an epoch": len(epoch_batches(len(shard), args.batch_size, epoch=0, seed=args.seed)),
            "labels' sha256": hashlib.sha256(train_y.numpy().tobytes() + test_y.numpy().tobytes()).hexdigest()[:16],
        },
    )
    # The whole shard and test set stay on the device; a batch is an index op.
    train_x, train_y = train_x[shard].to(device), train_y[shard].to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    class_counts = torch.bincount(train_y, minlength=10).tolist()
    if rank == 0:
        kind = "SYNTHETIC stand-in" if is_synthetic(args.data_root) else "CIFAR-10"
        say(
            f"{args.site}: {kind} shard of {len(shard)} training images, per class {class_counts}; "
            f"{len(test_y)} test images"
        )
    # Before the handshake: DDP's first collective must not wait on rank 0's handshake.
    model = Net().to(device)
    # What trains: DDP's wrapper, or the model itself once fully_shard has sharded it in place.
    trainer = sharded(model) if args.fsdp else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.fsdp and rank == 0:
        mine, total = (sum(f(p) for p in model.parameters()) for f in (lambda p: p.to_local().numel(), torch.numel))
        say(f"{args.site}: FSDP2 shards the model: rank 0 holds {mine} of its {total} parameters")
    warm_up(trainer, model, train_x, train_y, test_x, test_y, args)

    # (1) init: only global rank 0 talks to the server. The other ranks, on this node or on other nodes of the
    # site, never touch NVFlare: flare_ddp hands them every task from rank 0.
    flare_ddp.init()
    writer = SummaryWriter() if args.use_tracking and rank == 0 else None
    histogram_logged = False

    # (2) receive: every rank gets each task, with the global weights already loaded into `model`.
    for task in flare_ddp.tasks(model):
        started = time.perf_counter()
        if task.kind == flare_ddp.SUBMIT_MODEL:  # cross-site evaluation: this site's model, as its last round left it
            task.send(params=model.state_dict())
            continue
        # (3) evaluate the weights as received: this drives NVFlare's best-model selection.
        global_accuracy = evaluate(model, test_x, test_y)
        if task.kind == flare_ddp.VALIDATE:  # the final global model, or another site's: score it, train nothing
            task.send(metrics={"accuracy": global_accuracy})
            continue
        # (4) train locally with DDP (or FSDP), each rank on its part of every site batch.
        train_loss = train(
            trainer,
            train_x,
            train_y,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=round_lr(args.lr, task.round, args.warmup_rounds),
            momentum=args.momentum,
            max_grad_norm=args.max_grad_norm,
            seed=args.seed,
            first_epoch=task.round * args.epochs,
            augment=not args.no_augment,
        )
        local_accuracy = evaluate(model, test_x, test_y)
        if rank == 0:
            say(
                f"{args.site} round {task.round}: global accuracy {global_accuracy:.4f}, "
                f"train loss {train_loss:.4f}, local accuracy {local_accuracy:.4f}"
            )
            if writer is not None:
                # Not before the first task: NVFlare drops what a site logs before its run has started.
                if not histogram_logged:
                    for c, count in enumerate(class_counts):
                        writer.add_scalar(f"shard_class_count/{c}", count, global_step=0)
                    histogram_logged = True
                writer.add_scalar("global_accuracy", global_accuracy, global_step=task.round)
                writer.add_scalar("train_loss", train_loss, global_step=task.round)
                writer.add_scalar("local_accuracy", local_accuracy, global_step=task.round)
        # (5) send the new weights and metrics; FedAvg weighs each site by the samples it trained.
        task.send(
            params=model.state_dict(),
            metrics={
                "accuracy": global_accuracy,
                "local_accuracy": local_accuracy,
                "train_loss": train_loss,
                "shard_size": len(shard),
                "compute_seconds": time.perf_counter() - started,
            },
            weight=args.epochs * len(shard),
        )


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each layer that has weights, then the root, sharded in place over the site's ranks. Returns `model`,
    which is now what trains and what flare_ddp loads into and sends from."""
    from torch.distributed.fsdp import fully_shard  # here, not at the top: a DDP site's ranks start faster without it

    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def choose_backend(gpus: int, local_rank: int, local_world_size: int) -> tuple[str, torch.device, str | None]:
    """NCCL on this rank's own GPU when every local rank has one; gloo on the CPU otherwise.

    Returns (backend, device, why the CPU was chosen or None)."""
    if gpus >= local_world_size:
        return "nccl", torch.device("cuda", local_rank), None
    if gpus == 0:
        return "gloo", torch.device("cpu"), "no CUDA device is visible"
    return (
        "gloo",
        torch.device("cpu"),
        (
            f"{gpus} GPU(s) are visible for {local_world_size} ranks and NCCL needs one GPU per rank; "
            f"lower --nproc_per_node to {gpus} to train on the GPUs"
        ),
    )


def agree_on_data(site: str, facts: dict) -> None:
    """Every rank of the site, on every node, must have loaded the same data: a node with another copy would compute
    other shards and step counts, and DDP would then wait for a step that never comes. DataError names what differs,
    and on which ranks and nodes."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), facts))
    differences = []
    for name in facts:
        ranks_by_value = {}
        for rank, (host, theirs) in enumerate(everyone):
            ranks_by_value.setdefault(theirs[name], []).append(f"{rank} ({host})")
        if len(ranks_by_value) > 1:
            where = [f"{value} on rank {', '.join(ranks)}" for value, ranks in ranks_by_value.items()]
            differences.append(f"{name}: {', '.join(where)}")
    if differences:
        raise DataError(
            f"the ranks of {site} loaded different data ({'; '.join(differences)}); give every node of the site the "
            "same --data_root, and run prepare_data.sh again where it differs"
        )


def describe(device: torch.device) -> str:
    """The physical device behind `device`: every site's first GPU is cuda:0, so name it by UUID and PCI bus."""
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    name = f"{device} = {props.name}, GPU-{props.uuid}"
    if hasattr(props, "pci_bus_id"):  # torch 2.6 and later
        name += f", PCI {props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"
    return name


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, chunk: int = 2000) -> float:
    """Accuracy over the whole test set; each rank scores its own slice, then the counts are summed. Every rank
    runs the same number of forward passes (the last may be empty): under FSDP each one is a collective."""
    model.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine_x, mine_y = images[rank::world], labels[rank::world]
    longest = -(-len(labels) // world)  # rank 0's slice
    correct = sum(
        int((model(normalize(mine_x[i : i + chunk])).argmax(1) == mine_y[i : i + chunk]).sum())
        for i in range(0, longest, chunk)
    )
    counts = torch.tensor([correct, len(mine_y)], dtype=torch.float64, device=images.device)
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def train(
    trainer: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    max_grad_norm: float,
    seed: int,
    first_epoch: int,
    augment: bool,
) -> float:
    """Local epochs on this site's shard, in site batches of batch_size split over the ranks; returns the mean
    training loss over the samples. trainer: the DDP wrapper, or the model sharded with FSDP2; both average the
    ranks' gradients.

    Each rank's loss is summed over its part of the batch and scaled by world / len(batch): DDP's average of the
    ranks' gradients is then the gradient of the mean loss over the whole site batch, however the batch splits.
    So the site trains the same model on any number of ranks; only the speed changes. The gradient is clipped
    after DDP has averaged it, so every rank clips the same gradient the same way. augment: each sample randomly
    cropped and flipped, drawn from the seed and the epoch (data.epoch_augmentation)."""
    trainer.train()
    optimizer = torch.optim.SGD(trainer.parameters(), lr=lr, momentum=momentum)
    rank, world = dist.get_rank(), dist.get_world_size()
    loss_sum = torch.zeros((), device=images.device)
    for epoch in range(first_epoch, first_epoch + epochs):
        offsets, flips = (t.to(images.device) for t in epoch_augmentation(len(labels), epoch, seed))
        for batch in epoch_batches(len(labels), batch_size, epoch, seed):
            idx = rank_share(batch, rank, world).to(images.device)
            x = normalize(images[idx])
            if augment:
                x = crop_and_flip(x, offsets[idx], flips[idx])
            summed = F.cross_entropy(trainer(x), labels[idx], reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (summed * (world / len(batch))).backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainer.parameters(), max_grad_norm)
            optimizer.step()
            loss_sum += summed.detach()
    dist.all_reduce(loss_sum)
    return loss_sum.item() / (epochs * len(labels))


def round_lr(lr: float, current_round: int, warmup_rounds: int) -> float:
    """The learning rate of a round: a linear warm-up over the first warmup_rounds rounds, then lr.

    While the global model is near chance, the sites' first updates disagree most; smaller steps then keep the
    average from swinging."""
    return lr * min(1.0, (current_round + 1) / warmup_rounds)


def warm_up(trainer: torch.nn.Module, model: torch.nn.Module, train_x, train_y, test_x, test_y, args) -> None:
    """One training step and one evaluation before the first task, so that what a first step costs (CUDA's
    context and kernels, DDP's first all-reduce and bucket rebuild) is paid during start-up, not in round 0.
    The weights are put back as they were; the server's replace them at the first task anyway."""
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    one_batch = args.batch_size  # one site batch, split over the ranks as in training
    train(
        trainer, train_x[:one_batch], train_y[:one_batch], epochs=1, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, max_grad_norm=args.max_grad_norm, seed=args.seed, first_epoch=0,
        augment=not args.no_augment,
    )  # fmt: skip
    evaluate(model, test_x[:one_batch], test_y[:one_batch])
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()

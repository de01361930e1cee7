"""Federate a PyTorch DistributedDataParallel (or FSDP2, fully_shard) training loop with NVFlare: global rank 0 talks
to the NVFlare server, and every rank gets the task, the round and the global weights. It imports only torch,
NumPy and nvflare.

In the script that torchrun starts on each site, after `dist.init_process_group(...)`:

    import flare_ddp

    flare_ddp.init()                              # every rank; only rank 0 shakes hands with NVFlare
    for task in flare_ddp.tasks(model):           # every rank; `model` is the plain module, not the DDP wrapper
        if task.kind == flare_ddp.SUBMIT_MODEL:   # cross-site evaluation asks for this site's own model
            task.send(params=model.state_dict())  # nothing was loaded for this task: the model is the local one
            continue
        accuracy = evaluate(model)                # the global weights are already loaded, on every rank
        if task.kind == flare_ddp.VALIDATE:       # score the weights, train nothing
            task.send(metrics={"accuracy": accuracy})
            continue
        samples = train(ddp_model, ...)           # flare_ddp.TRAIN: your own DDP loop, unchanged
        task.send(params=model.state_dict(), metrics={"accuracy": accuracy}, weight=samples)

Every rank runs every line: `task.send` does its work on rank 0 and nothing elsewhere, so the loop needs no
`if rank == 0`. The loop ends when the server ends the job. Every task must be answered with one `send`.
With FSDP2, `model` is the module sharded in place by `fully_shard`, and the loop is the same.

How it works: rank 0 calls `flare.receive()`; then it broadcasts the task's kind and round to every rank over a
gloo group that waits as long as the server takes, and the weights over the default (training) group, NCCL or gloo,
so every rank starts the task from the same weights. This is what NVFlare's Lightning bridge
(nvflare/app_opt/lightning/api.py) does for Lightning. A sharded model takes the weights through torch's
`set_model_state_dict(..., broadcast_from_rank0=True)`, each rank keeping its shard, and its `send` gathers the full
weights onto rank 0's CPU with `get_model_state_dict(..., full_state_dict=True, cpu_offload=True)`: a collective,
which is why every rank calls `send`. FSDP2 leaves the root's own parameters (a transformer's embeddings, final norm
and head) gathered after a forward pass that no backward pass follows; the bridge puts them back into their shards
before each load and gather, and after such a forward pass, so that an evaluation never breaks the next load and an
optimizer built after it holds the shards.

A site may send part of its state dict (what it trains: the server merges it into the global model), and the server
may leave out of a task what the site already has, unchanged (server_fedavg.SendOnce, which names it in the task's
meta as KEPT): the bridge loads what came, keeps the rest of the model as it is, and stops with one line if the two
do not make up the model."""

import ctypes
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import nvflare.client as flare
import torch
import torch.distributed as dist
from nvflare.apis.fl_constant import FLMetaKey

# The kinds of task NVFlare's PyTorch recipes send a trainer.
TRAIN = "train"  # FedAvg's round: train from the global weights, send the new weights
VALIDATE = "validate"  # score the weights received (the final global model, or another site's), send metrics
SUBMIT_MODEL = "submit_model"  # cross-site evaluation: send this site's own model
_KINDS = [None, TRAIN, VALIDATE, SUBMIT_MODEL]  # their codes on the wire; None (0) means the job has ended

# How long ranks other than 0 wait for the next task: as long as the slowest site's round and the server take.
TASK_WAIT = timedelta(days=1)

_control = None  # the gloo group the tasks travel on

# In a result's meta: the names left out because their tensor is another name's (tied weights), each with that name.
# The server's average gives them the tensor again (server_fedavg.py).
TIED = "ddp_example_tied"
# In a task's meta: the names the server left out because this site has them already, unchanged since it was sent
# them (server_fedavg.SendOnce): the site keeps its own copies.
KEPT = "ddp_example_kept"
# A tensor of more than PIECE_BYTES travels cut into flat pieces of at most that size, each one request of NVFlare's
# download: whole, a large tensor is one request, which over a slow link outlives NVFlare's timeouts and is then sent
# again from its first byte. A piece of 8 MiB crosses within NVFlare's per-request timeout (600 s) at 0.11 Mbit/s, less
# than the share streaming.py's settings need anyway (0.14 Mbit/s); each piece costs a request, so smaller ones cost
# time on a fast link (at 810 MB a round took 45.0 s in pieces of 2 MiB, 37.7 s in pieces of 8 MiB, 33.7 s whole). In
# a task's or result's meta, PIECES names each cut tensor with its shape and its number of pieces; piece i travels as
# f"{name}{PIECE}{i}".
PIECE_BYTES = 8 * 2**20
PIECES = "ddp_example_pieces"
PIECE = "#piece"


@dataclass
class Task:
    """One task from the server, as every rank sees it."""

    kind: str  # TRAIN, VALIDATE or SUBMIT_MODEL
    round: int  # FedAvg's round (0 for tasks outside the rounds)
    total_rounds: int  # FedAvg's number of rounds (0 where the server did not say)
    answered: bool = False
    model: torch.nn.Module | None = field(default=None, repr=False)  # the model given to tasks()

    def send(self, params: dict | None = None, metrics: dict | None = None, weight: float | None = None) -> None:
        """Answer the task; on ranks other than 0 this only marks it answered.

        params: a state dict, or the part of it that the site trains (moved to the CPU before sending; every site
        sends the same part, and the server keeps the rest of the global model); metrics: numbers by name; weight:
        how much FedAvg counts this site's update against the others' (for example the samples it trained; NVFlare's
        NUM_STEPS_CURRENT_ROUND). For a model sharded with fully_shard, `params` is its state_dict() (or part of
        it): every rank takes part in gathering the full weights, which only rank 0 holds, on the CPU, and sends."""
        if self.answered:
            raise RuntimeError(f"the {self.kind} task of round {self.round} was answered already")
        self.answered = True
        if params is not None and _reshard(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            params = {name: full[name] for name in params} if dist.get_rank() == 0 else None
        if dist.get_rank() != 0:
            return
        meta = {} if weight is None else {FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight}
        tied = {alias: name for alias, name in _ties(self.model).items() if params and {alias, name} <= params.keys()}
        if tied:  # a tied pair travels once
            meta[TIED] = tied
        cpu_params = None if params is None else {n: t.detach().cpu() for n, t in params.items() if n not in tied}
        if cpu_params is not None:
            print(f"flare_ddp: {self.kind} task of round {self.round}: sent {_size(cpu_params)}", flush=True)
            cpu_params, meta[PIECES] = cut(cpu_params)
        flare.send(flare.FLModel(params=cpu_params, metrics=metrics, meta=meta))


def init() -> None:
    """Call on every rank after dist.init_process_group(): rank 0 shakes hands with the NVFlare client.

    From then on, an exception that nothing catches ends its rank at once, after its traceback and one line that
    names the site, the rank and the exception: "<site> rank <r>: ERROR: <type>: <message>". Otherwise NVFlare's
    threads would keep rank 0 alive and the other ranks would wait on it; now torchrun ends the site, and the job
    ends naming the cause."""
    global _control
    _control = dist.new_group(backend="gloo", timeout=TASK_WAIT)
    site = [None]
    if dist.get_rank() == 0:
        flare.init(rank=0)
        site[0] = flare.get_site_name()
    dist.broadcast_object_list(site, src=0, group=_control)
    previous = sys.excepthook

    def end_rank(kind, value, traceback):
        previous(kind, value, traceback)
        message = " ".join(f"{kind.__name__}: {value}".split())  # one line, whatever the message's own lines
        sys.stderr.write(f"{site[0]} rank {dist.get_rank()}: ERROR: {message}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)

    sys.excepthook = end_rank


def tasks(model: torch.nn.Module):
    """The server's tasks, one at a time, on every rank, until the job ends. For TRAIN and VALIDATE the task's
    weights are in `model` on every rank when the task is handed out; for SUBMIT_MODEL the model is left as it is.
    `model` is the plain module under DDP, or the root module sharded with fully_shard (FSDP2)."""
    if _control is None:
        raise RuntimeError("call flare_ddp.init() on every rank before flare_ddp.tasks()")
    if _reshard(model):
        model.register_forward_hook(_reshard_unless_training)
    task = None
    while True:
        if task is not None and not task.answered:
            raise RuntimeError(f"the {task.kind} task of round {task.round} got no answer: call task.send() once")
        header, weights = _receive() if dist.get_rank() == 0 else ([0, 0, 0, 0], None)
        header = torch.tensor(header)
        dist.broadcast(header, src=0, group=_control)
        code, current_round, total_rounds, loaded = header.tolist()
        if code == 0:
            return
        if loaded:
            if dist.get_rank() == 0:
                print(f"flare_ddp: {_KINDS[code]} task of round {current_round}: received {_size(weights[0])}, "
                      f"{len(weights[1] or [])} kept from earlier tasks", flush=True)  # fmt: skip
            _load(model, *(weights or (None, None)))
        weights = None  # the received copy goes as soon as it is in the model
        task = Task(_KINDS[code], current_round, total_rounds, model=model)
        yield task


_received: set[str] = set()  # rank 0: the names this trainer has been sent by the server


def _load(model: torch.nn.Module, weights: dict | None, kept: list[str] | None) -> None:
    """Every rank: rank 0's received weights (None elsewhere) into `model` on every rank, in place: the parameter
    objects stay the same, so an optimizer built before the task keeps stepping them. `kept`: the names the server
    left out because this site has them from an earlier task."""
    if dist.get_rank() == 0:  # a tied pair arrives under one name, or is kept (server_fedavg.SendOnce): give it both
        ties = _ties(model)
        weights = {**{alias: weights[name] for alias, name in ties.items() if name in weights}, **weights}
        kept = [*(kept or []), *(alias for alias, name in ties.items() if name in (kept or []))]
        _check_complete(model, weights, kept)
    if _reshard(model):  # sharded: each rank takes its shard of rank 0's
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, weights if dist.get_rank() == 0 else {}, options=options)
        return
    names = [set(weights)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(names, src=0, group=_control)  # what came: the rest stays as it is on every rank
    if dist.get_rank() == 0:
        model.load_state_dict(weights, strict=False)
    tensors = [t for name, t in model.state_dict().items() if name in names[0]]
    _broadcast(list({_memory(t): t for t in tensors}.values()))  # a tied pair (one tensor, two names) goes once


def _check_complete(model: torch.nn.Module, weights: dict, kept: list[str]) -> None:
    """Rank 0: that the received weights and this site's kept copies make up the model's state dict, no more."""
    names = model.state_dict().keys()
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise RuntimeError(
            f"the server sent {unknown[0]!r}, which this site's model does not have: the job's initial model and the "
            "trainer's model differ"
        )
    never = [name for name in kept if name not in _received and name in names]
    if never:
        raise RuntimeError(
            f"the server left out {never[0]!r} as this site's own copy, but this trainer was never sent it: was the "
            "trainer started again during the job?"
        )
    missing = [name for name in names if name not in weights and name not in kept]
    if missing:
        raise RuntimeError(f"the server's weights lack {missing[0]!r} of this site's model, and it has no copy of it")
    _received.update(weights)


def _size(params: dict) -> str:
    return f"{len(params)} tensors, {sum(t.numel() * t.element_size() for t in params.values()):,} bytes"


def tied_names(named) -> dict[str, str]:
    """Of (name, tensor) pairs, the names whose tensor is an earlier name's, or a view of the same memory (tied
    weights: a head that is the token embedding, in a model, a state dict or a loaded checkpoint), each with that
    earlier name."""
    first, tied = {}, {}
    for name, tensor in named:
        key = _memory(tensor)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _memory(tensor) -> tuple:
    """What identifies a tensor's values: the memory a plain tensor views, else the object itself."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.numel():
        storage = tensor.untyped_storage().data_ptr()
        return storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype
    return (id(tensor),)


def _ties(model: torch.nn.Module | None) -> dict[str, str]:
    """The state-dict names of `model` that are another name's parameter or buffer, each with that name."""
    if model is None:
        return {}
    return tied_names([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


def _reshard(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded with fully_shard; if so, every sharded unit in it is put back into its shards.

    FSDP2 leaves the root's own parameters (embeddings, final norm, head in a transformer) gathered after a forward
    with no backward after it, such as an evaluation: they are then plain tensors in place of the shards, which
    torch's state-dict calls refuse, and which an optimizer built then would hold and never step."""
    # torch.distributed.fsdp is loaded where a model was sharded, and only there: imported for all, with its
    # DTensor and state-dict code, it would cost every rank of a DDP site more than a second at start-up.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    units = [m for m in model.modules() if fsdp and isinstance(m, fsdp.FSDPModule)]
    for unit in units:
        unit.reshard()
    return bool(units)


def _reshard_unless_training(model: torch.nn.Module, inputs, output) -> None:
    """After a forward of the sharded model that no backward follows (no gradients, or eval mode): its shards back."""
    if not (torch.is_grad_enabled() and model.training):
        _reshard(model)


# Small tensors go from rank 0 to the others in buckets of up to this many bytes, one broadcast a bucket: on 2 gloo
# ranks, 2,000 tensors of 4 KiB took 632 ms one by one and 27 ms in buckets. Larger tensors go alone, uncopied.
BUCKET_BYTES = 32 * 2**20


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` into every rank's."""
    bucket, size = [], 0
    for tensor in [*tensors, None]:
        nbytes = 0 if tensor is None else tensor.numel() * tensor.element_size()
        if bucket and (tensor is None or tensor.dtype != bucket[0].dtype or tensor.device != bucket[0].device
                       or size + nbytes > BUCKET_BYTES):  # fmt: skip
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.broadcast(flat, src=0)
            for t, value in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(value.view_as(t))
            bucket, size = [], 0
        if tensor is None:
            continue
        if nbytes >= BUCKET_BYTES:
            dist.broadcast(tensor, src=0)
        else:
            bucket.append(tensor)
            size += nbytes


def _receive() -> tuple[list[int], tuple[dict, list[str]] | None]:
    """On rank 0: the next task from the server as [kind code, round, rounds, whether it brings weights], and its
    weights with the names it left out as this site's own (KEPT)."""
    received = flare.receive() if flare.is_running() else None
    if received is None:
        return [0, 0, 0, 0], None
    if flare.is_submit_model():
        kind = SUBMIT_MODEL
    elif flare.is_evaluate():
        kind = VALIDATE
    elif flare.is_train():
        kind = TRAIN
    else:
        raise RuntimeError("the server sent a task that is not train, validate or submit_model")
    loaded = kind != SUBMIT_MODEL
    if loaded and received.params is None:
        raise RuntimeError(f"the server sent a {kind} task without weights")
    header = [_KINDS.index(kind), received.current_round or 0, received.total_rounds or 0, int(loaded)]
    meta = received.meta or {}
    return header, (join(received.params, meta.get(PIECES) or {}), meta.get(KEPT)) if loaded else None


def cut(params: dict) -> tuple[dict, dict]:
    """`params` with every tensor (or NumPy array) of more than PIECE_BYTES in flat pieces of at most that size (views
    of it, not copies), and what join() needs to put them together again (the meta's PIECES)."""
    out, pieces = {}, {}
    for name, value in params.items():
        size = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else getattr(value, "nbytes", 0)
        if PIECE in name:
            raise ValueError(f"{name!r}: a state dict's names must not hold {PIECE!r}, which marks a piece in transit")
        if size <= PIECE_BYTES:
            out[name] = value
            continue
        flat = value.reshape(-1)
        step = PIECE_BYTES // (size // len(flat))  # the values of a piece
        parts = [flat[i : i + step] for i in range(0, len(flat), step)]
        pieces[name] = [list(value.shape), len(parts)]
        out.update((f"{name}{PIECE}{i}", part) for i, part in enumerate(parts))
    return out, pieces


def join(params: dict, pieces: dict) -> dict:
    """The tensors that cut() put in pieces, whole again, in their places. Takes the pieces out of `params` one tensor
    at a time, so that no more than one tensor is held twice."""
    whole = {}
    for key in list(params):
        if key not in params:  # a piece, taken already
            continue
        name = key.rpartition(PIECE)[0]
        if name not in pieces:
            whole[key] = params.pop(key)
            continue
        shape, count = pieces[name]
        parts = [params.pop(f"{name}{PIECE}{i}") for i in range(count)]
        joined = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)
        whole[name] = joined.reshape(shape)
        del parts
        _give_back_freed_memory()
    return whole


# glibc keeps freed blocks smaller than its mmap threshold (which it raises, up to 32 MiB, as larger blocks are freed)
# in its heap, where they still count in the process's memory: the pieces of a model would stay there beside the
# joined tensors, a model more in a process's peak. malloc_trim gives them back (other C libraries have no such call).
_LIBC = ctypes.CDLL(None)


def _give_back_freed_memory() -> None:
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)

"""Large tensors in pieces, in process: the server's and the trainer's sides of the exchange, with NVFlare's own DXO
and filters: what travels, in pieces of what size, and what arrives."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

import flare_ddp
from conftest import ROOT
from flare_ddp import PIECE, PIECE_BYTES, PIECES, cut, join
from quantize import Dequantize, Quantize, dequantize, quantize
from server_fedavg import Cut, Join


def model() -> dict:
    """Shaped like what people send: a large bf16 embedding of an odd size, a float32 layer of exactly one piece and
    one just over it, small weights, an integer step counter, a bool mask."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(3001, 4096, generator=g).to(torch.bfloat16),  # 23.4 MiB: 3 pieces, the last short
        "exact": torch.randn(PIECE_BYTES // 4, generator=g),  # one piece: travels whole
        "over": torch.randn(PIECE_BYTES // 4 + 1, generator=g),  # one value more: 2 pieces
        "head.bias": torch.randn(7, generator=g),
        "steps": torch.tensor([7, 2**40 + 3]),
        "mask": torch.rand(5, generator=g) > 0.5,
    }


def travel(params: dict, *filters) -> tuple[dict, dict]:
    """`params` through `filters` as the server's or a site's NVFlare applies them: (the data, the meta)."""
    shareable = DXO(DataKind.WEIGHTS, dict(params)).to_shareable()
    for f in filters:
        shareable = f.process(shareable, FLContext())
    dxo = from_shareable(shareable)
    return dxo.data, dxo.meta


def test_a_large_tensor_travels_in_pieces_of_at_most_piece_bytes_that_view_it_and_arrives_whole_and_exact():
    sent = model()
    data, meta = travel(sent, Cut())
    assert meta[PIECES] == {"embed.weight": [[3001, 4096], 3], "over": [[PIECE_BYTES // 4 + 1], 2]}
    assert {"exact", "head.bias", "steps", "mask"} < data.keys() and "embed.weight" not in data
    for name, value in data.items():
        assert value.numel() * value.element_size() <= PIECE_BYTES, name
        if PIECE in name:  # a view of the tensor, not a copy: the server holds nothing more for it
            whole = sent[name.split(PIECE)[0]]
            assert value.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr(), name
    arrived = join(data, meta[PIECES])
    assert list(arrived) == list(sent)  # in their places
    for name, tensor in sent.items():
        assert arrived[name].dtype == tensor.dtype and torch.equal(arrived[name], tensor), name


def test_a_sites_result_in_pieces_is_whole_before_the_servers_other_filters_read_it():
    pieces, meta = cut(model())
    shareable = DXO(DataKind.WEIGHTS, pieces, {PIECES: meta}).to_shareable()
    dxo = from_shareable(Join().process(shareable, FLContext()))
    assert PIECES not in dxo.meta
    for name, tensor in model().items():
        assert torch.equal(dxo.data[name], tensor), name


@pytest.mark.parametrize("mode", ["bfloat16", "blockwise8"])
def test_quantized_pieces_arrive_as_the_whole_tensor_quantized(mode):
    # Each side quantizes after it cuts and restores before it joins: each piece is quantized alone, and a piece holds
    # whole blocks of blockwise8, so the values that arrive are those of the whole tensor quantized.
    sent = model()
    data, meta = travel(sent, Cut(), Quantize(mode), Dequantize())
    arrived = join(data, meta[PIECES])
    for name in ("embed.weight", "over"):
        values, scales = quantize(sent[name], mode) or (sent[name], None)
        expected = dequantize(values, scales, mode, sent[name].dtype, list(sent[name].shape))
        assert torch.equal(arrived[name], expected), name
    assert torch.equal(arrived["steps"], sent["steps"]) and torch.equal(arrived["mask"], sent["mask"])


def test_numpy_arrays_travel_in_pieces_too():
    sent = {name: t.float().numpy() if t.is_floating_point() else t.numpy() for name, t in model().items()}
    data, meta = travel(sent, Cut())
    assert set(meta[PIECES]) == {"embed.weight", "over"}  # the float32 copy of the embedding: 47 MiB, 6 pieces
    assert all(value.nbytes <= PIECE_BYTES for value in data.values())
    arrived = join(data, meta[PIECES])
    assert all(np.array_equal(arrived[name], value) for name, value in sent.items())


def test_a_name_that_looks_like_a_piece_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"'layer#piece0': a state dict's names must not hold '#piece'"):
        cut({"layer#piece0": torch.zeros(2)})


def test_what_a_trainer_sends_goes_in_pieces_with_their_meta(monkeypatch):
    sent = []
    monkeypatch.setattr(flare_ddp.flare, "send", sent.append)
    monkeypatch.setattr(flare_ddp.dist, "get_rank", lambda: 0)
    flare_ddp.Task(flare_ddp.TRAIN, 0, 1, model=torch.nn.Linear(1, 1)).send(params=model(), weight=3)
    (result,) = sent
    assert set(result.meta[PIECES]) == {"embed.weight", "over"}
    assert all(t.numel() * t.element_size() <= PIECE_BYTES for t in result.params.values())
    arrived = join(dict(result.params), result.meta[PIECES])
    assert all(torch.equal(arrived[name], tensor) for name, tensor in model().items())


# In a process of its own, whose allocator has freed a block larger than a piece once (as every process of a job has:
# glibc then keeps blocks up to that size in its heap), a 256 MiB tensor travels in pieces as NVFlare moves them (each
# piece serialized and loaded with safetensors), and join() makes it whole. The process's memory after join must hold
# the tensor once, not its freed pieces as well (which glibc keeps where what the process allocated meanwhile sits
# above them in its heap).
JOINED_IN_A_FRESH_PROCESS = """
import os
import torch
from safetensors.torch import load, save
from flare_ddp import PIECE_BYTES, cut, join

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

block = bytes(3 * PIECE_BYTES)  # under glibc's 32 MiB cap on the threshold it raises
del block
tensor = torch.randn(2**26)
pieces, meta = cut({"w": tensor})
wire = [save({name: piece}) for name, piece in pieces.items()]
del tensor, pieces
one_copy = rss()  # the serialized pieces: the tensor's bytes, once
received, kept = {}, []
for item in wire:
    received.update(load(item))
    kept.append(bytearray(64 * 2**10))  # what else the process allocates meanwhile, and keeps
del wire, item
whole = join(received, meta)
print((rss() - one_copy) / 2**20)
"""


def test_joined_pieces_leave_the_tensor_once_in_memory_not_the_freed_pieces_as_well():
    result = subprocess.run(
        [sys.executable, "-c", JOINED_IN_A_FRESH_PROCESS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) < 16, f"{result.stdout.strip()} MiB more than one copy of a 256 MiB tensor"

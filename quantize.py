"""Smaller messages between server and sites: NVFlare filters that quantize the weights a task or a result carries
before they leave, and restore them where they arrive. Plain torch, on the CPU; no bitsandbytes, no GPU needed.

job.py --quantize_mode MODE puts Quantize(MODE) on what the server sends and on what each site's client sends, and
Dequantize() on what each receives; the trainer and the server's average see tensors of their own dtypes again.

MODES (NVFlare's names):
- float16, bfloat16: each floating tensor of more than 16 bits travels in 16 (half the bytes of float32);
- blockwise8: each floating tensor travels as int8, in blocks of BLOCK values that each carry a float32 scale (their
  largest magnitude / 127): about a quarter of float32's bytes.
Integer and bool tensors (step counters, masks) always travel exactly, and so does a float tensor that float16 cannot
hold (a value beyond its range)."""

import math

import torch
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter

MODES = ["float16", "bfloat16", "blockwise8"]
BLOCK = 256  # values a blockwise8 scale covers: 4 bytes of scale on 256 of data (1.6%)
QUANTIZED = "ddp_example_quantized"  # in the DXO's meta: {name: [mode, dtype, shape]} of what travels quantized
SCALES = "ddp_example_scales:"  # a blockwise8 tensor's scales travel beside it under this prefix
_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPES = {str(dtype): dtype for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


class Quantize(Filter):
    """The weights of a task or result in fewer bytes; Dequantize restores them."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quantize mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode

    def process(self, shareable, fl_ctx):
        dxo = weights_of(shareable)
        if dxo is None:
            return shareable
        data, quantized = {}, {}
        for name, value in dxo.data.items():
            packed = quantize(value, self.mode) if isinstance(value, torch.Tensor) else None
            if packed is None:
                data[name] = value
                continue
            data[name], scales = packed
            if scales is not None:
                data[SCALES + name] = scales
            quantized[name] = [self.mode, str(value.dtype), list(value.shape)]
        before, after = _nbytes(dxo.data), _nbytes(data)
        self.log_info(fl_ctx, f"{len(quantized)} tensors quantized to {self.mode}: {before:,} -> {after:,} bytes")
        dxo.data = data
        dxo.set_meta_prop(QUANTIZED, quantized)
        return dxo.update_shareable(shareable)


class Dequantize(Filter):
    """The weights Quantize packed, back in their own dtypes and shapes."""

    def process(self, shareable, fl_ctx):
        dxo = weights_of(shareable)
        quantized = dxo and dxo.get_meta_prop(QUANTIZED)
        if not quantized:
            return shareable
        data = {name: value for name, value in dxo.data.items() if not name.startswith(SCALES)}
        for name, (mode, dtype, shape) in quantized.items():
            data[name] = dequantize(data[name], dxo.data.get(SCALES + name), mode, _DTYPES[dtype], shape)
        dxo.data = data
        dxo.remove_meta_props([QUANTIZED])
        return dxo.update_shareable(shareable)


def quantize(tensor: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`tensor` packed for `mode` as (values, blockwise8's scales or None), or None where it travels as it is."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    if mode in _HALF:
        half = _HALF[mode]
        if tensor.element_size() <= 2 or (half == torch.float16 and not _fits_float16(tensor)):
            return None
        return tensor.to(half), None
    flat = tensor.detach().reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1) / 127
    scales[scales == 0] = 1  # a block of zeros
    values = torch.round(blocks / scales[:, None]).to(torch.int8)
    return values.view(-1), scales


def dequantize(values, scales, mode: str, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if mode in _HALF:
        return values.to(dtype)
    numel = math.prod(shape)
    blocks = values.view(-1, BLOCK).float() * scales[:, None]
    return blocks.view(-1)[:numel].view(shape).to(dtype)


def _fits_float16(tensor: torch.Tensor) -> bool:
    finite = tensor[torch.isfinite(tensor)]
    return finite.numel() == 0 or finite.abs().max().item() <= torch.finfo(torch.float16).max


def _nbytes(params: dict) -> int:
    return sum(t.numel() * t.element_size() for t in params.values() if isinstance(t, torch.Tensor))


def weights_of(shareable):
    """The shareable's DXO if it carries weights, else None."""
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        return None
    if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) or not isinstance(dxo.data, dict):
        return None
    return dxo

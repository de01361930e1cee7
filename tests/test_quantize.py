"""quantize.py's filters, in process: what travels, in how many bytes, and what comes back."""

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext

from quantize import BLOCK, MODES, Dequantize, Quantize


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """What people send: float32 weights of odd sizes, bf16 and fp16 ones, an integer counter, a bool mask, and a
    tensor of zeros."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(1000, 7, generator=g) * 0.02,
        "head.bias": torch.randn(3, generator=g),
        "scalar": torch.tensor(2.5),
        "bf16": torch.randn(300, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(40, 3, generator=g).to(torch.float16),
        "steps": torch.tensor([7, 2**40 + 3]),
        "mask": torch.rand(20, generator=g) > 0.5,
        "zeros": torch.zeros(BLOCK + 1),
        "big": torch.tensor([1e6, -3.0]),  # beyond float16's range
    }


def wire(params: dict, mode: str) -> tuple[dict, dict]:
    """(what travels, what arrives) for `params` quantized in `mode`."""
    shareable = DXO(DataKind.WEIGHTS, {k: v.clone() for k, v in params.items()}, {MetaKey.NUM_STEPS_CURRENT_ROUND: 3})
    sent = Quantize(mode).process(shareable.to_shareable(), FLContext())
    travelled = dict(from_shareable(sent).data)
    arrived = from_shareable(Dequantize().process(sent, FLContext()))
    assert arrived.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 3  # the rest of the meta goes along
    return travelled, arrived.data


def nbytes(params: dict) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


@pytest.mark.parametrize("mode", MODES)
def test_each_tensor_comes_back_in_its_dtype_and_shape_close_and_integers_exact(mode):
    sent = model()
    travelled, arrived = wire(sent, mode)
    assert arrived.keys() == sent.keys()
    for name, tensor in sent.items():
        assert arrived[name].dtype == tensor.dtype and arrived[name].shape == tensor.shape, name
    for name in ("steps", "mask", "zeros", "bf16" if mode != "blockwise8" else "steps"):
        assert torch.equal(arrived[name], sent[name]), name  # exact: integers, bools, zeros, already 16 bits
    # Within one step of the scale: half precision's rounding, or blockwise8's 1/254 of a block's largest magnitude.
    bound = {"float16": 1e-3, "bfloat16": 8e-3, "blockwise8": 1 / 254 + 1e-6}[mode]
    for name in ("embed.weight", "head.bias", "scalar"):
        error = (arrived[name] - sent[name]).abs().max() / sent[name].abs().max()
        assert error <= bound, (name, error.item())
    assert not torch.equal(arrived["embed.weight"], sent["embed.weight"])  # it did travel quantized
    if mode == "float16":
        assert torch.equal(arrived["big"], sent["big"])  # what float16 can't hold travels as it is
    assert nbytes(travelled) < nbytes(sent) * {"float16": 0.6, "bfloat16": 0.6, "blockwise8": 0.35}[mode]


def test_blockwise8_takes_a_quarter_of_float32_and_a_block_is_as_exact_as_its_largest_value_allows():
    g = torch.Generator().manual_seed(1)
    sent = {"w": torch.randn(4096, 1024, generator=g)}
    sent["w"][0, :BLOCK] *= 1000  # one block of large values does not coarsen the others
    travelled, arrived = wire(sent, "blockwise8")
    assert nbytes(travelled) / nbytes(sent) == pytest.approx(0.25 + 1 / BLOCK, rel=1e-3)
    rest = (arrived["w"][1:] - sent["w"][1:]).abs().max()
    assert rest < sent["w"][1:].abs().max() / 254 + 1e-6


def test_metrics_and_tasks_without_weights_pass_untouched():
    metrics = DXO(DataKind.METRICS, {"accuracy": 0.5}).to_shareable()
    assert from_shareable(Quantize("blockwise8").process(metrics, FLContext())).data == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="not one of float16, bfloat16, blockwise8"):
        Quantize("int4")

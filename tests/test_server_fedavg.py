"""The server's aggregation, in process: what the sites' results average to, in which dtype, and what it holds."""

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from flare_ddp import TIED
from server_fedavg import DtypeKeepingAggregator, SendTiedOnce


def result(params, weight, site="site-1", metrics=None):
    meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight, "client_name": site}
    return FLModel(params=params, metrics=metrics, meta=meta)


def mixed(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "fp32": torch.randn(64, 33, generator=g),
        "bf16": torch.randn(17, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(5, 7, generator=g).to(torch.float16),
        "steps": torch.tensor([7, 2**40 + 3], dtype=torch.int64),
    }


def test_one_site_comes_back_bit_for_bit_in_every_dtype():
    sent = mixed(0)
    aggregator = DtypeKeepingAggregator()
    aggregator.accept_model(result({k: v.clone() for k, v in sent.items()}, weight=12345))
    params = aggregator.aggregate_model().params
    for name, tensor in sent.items():
        assert params[name].dtype == tensor.dtype, name
        assert torch.equal(params[name], tensor), name


def test_two_sites_average_by_their_weights_in_each_dtype():
    a, b = mixed(1), mixed(2)
    b["steps"] = torch.tensor([10, 2**40 + 9], dtype=torch.int64)
    aggregator = DtypeKeepingAggregator()
    aggregator.accept_model(result({k: v.clone() for k, v in a.items()}, weight=1, metrics={"accuracy": 0.2}))
    aggregator.accept_model(result({k: v.clone() for k, v in b.items()}, 3, "site-2", {"accuracy": 0.6}))
    model = aggregator.aggregate_model()
    for name in a:
        exact = (a[name].double() + 3 * b[name].double()) / 4
        got = model.params[name]
        assert got.dtype == a[name].dtype, name
        if got.is_floating_point():
            # Within one rounding of the tensor's own dtype from the exact mean.
            assert torch.allclose(got.double(), exact, rtol=torch.finfo(got.dtype).eps, atol=0), name
        else:
            assert got.tolist() == exact.round().long().tolist(), name
    assert model.metrics["accuracy"] == pytest.approx(0.5)
    sites = model.meta[AppConstants.METRICS_AGGREGATION_INFO]["site_weights"]
    assert [(s["name"], s["weight"]) for s in sites] == [("site-1", 1.0), ("site-2", 3.0)]


def test_numpy_results_come_back_as_numpy():
    aggregator = DtypeKeepingAggregator()
    aggregator.accept_model(result({"w": np.ones((3, 2), np.float32)}, 1))
    aggregator.accept_model(result({"w": np.full((3, 2), 3, np.float32)}, 1, "site-2"))
    w = aggregator.aggregate_model().params["w"]
    assert isinstance(w, np.ndarray) and w.dtype == np.float32
    assert (w == 2).all()


def test_the_running_sum_is_float32_and_each_result_is_let_go_as_it_is_summed():
    """No float64 copy of a float32 model: the server holds one float32 sum, not a widened copy of each result."""
    aggregator = DtypeKeepingAggregator()
    params = {"fp32": torch.randn(1000), "bf16": torch.randn(1000).to(torch.bfloat16)}
    aggregator.accept_model(result(params, 2))
    assert params == {}  # the received tensors are no longer referenced by the result
    assert {name: t.dtype for name, t in aggregator._sums.items()} == {"fp32": torch.float32, "bf16": torch.float32}


def test_a_missing_or_bad_weight_counts_as_one():
    aggregator = DtypeKeepingAggregator()
    aggregator.accept_model(result({"w": torch.zeros(2)}, None))
    aggregator.accept_model(result({"w": torch.full((2,), 4.0)}, float("nan"), "site-2"))
    assert aggregator.aggregate_model().params["w"].tolist() == [2.0, 2.0]


def test_a_tied_pair_sent_once_comes_back_under_both_names_as_one_tensor_and_goes_out_once():
    # What flare_ddp sends for a head tied to the embedding: the embedding alone, and the tie in the meta.
    aggregator = DtypeKeepingAggregator()
    for seed, site in ((1, "site-1"), (2, "site-2")):
        params = {"embed.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(seed)), "b": torch.ones(2)}
        sent = result(params, weight=1, site=site)
        sent.meta[TIED] = {"head.weight": "embed.weight"}
        aggregator.accept_model(sent)
    params = aggregator.aggregate_model().params
    assert params["head.weight"] is params["embed.weight"]  # one tensor, two names: the global model is whole
    once = SendTiedOnce()

    def send(params):
        return from_shareable(once.process(FLModelUtils.to_shareable(FLModel(params=params)), FLContext())).data

    sent = send(params)
    assert sorted(sent) == ["b", "embed.weight"] and torch.equal(sent["embed.weight"], params["embed.weight"])
    assert sorted(params) == ["b", "embed.weight", "head.weight"]  # the global model itself keeps both names
    # The same model as NVFlare reloads it for an evaluation: the pair as two equal tensors, still sent once; two
    # tensors of those names that differ are not a tied pair, and both go.
    reloaded = {name: tensor.clone() for name, tensor in params.items()}
    assert sorted(send(reloaded)) == ["b", "embed.weight"]
    reloaded["head.weight"] += 1
    assert sorted(send(reloaded)) == ["b", "embed.weight", "head.weight"]

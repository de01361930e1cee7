"""The server's aggregation, in process: what the sites' results average to, in which dtype, and what it holds."""

import os

import numpy as np
import pytest
import torch
from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from flare_ddp import KEPT, TIED
from server_fedavg import (
    DtypeKeepingAggregator,
    ForgetTrained,
    MergingFedAvg,
    OneCopyEvaluation,
    SendOnce,
    share_with_every_site,
)


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
    once = SendOnce()
    sent = send(once, params, "site-1")
    assert sorted(sent) == ["b", "embed.weight"] and torch.equal(sent["embed.weight"], params["embed.weight"])
    assert sorted(params) == ["b", "embed.weight", "head.weight"]  # the global model itself keeps both names
    # The same model as NVFlare reloads it for an evaluation: the pair as two equal tensors, still sent once; two
    # tensors of those names that differ are not a tied pair, and both go.
    reloaded = {name: tensor.clone() for name, tensor in params.items()}
    assert sorted(send(once, reloaded, "site-2")) == ["b", "embed.weight"]
    reloaded["head.weight"] += 1
    assert sorted(send(once, reloaded, "site-3")) == ["b", "embed.weight", "head.weight"]


def context(site: str) -> FLContext:
    """The server's context of a task for `site` (or its result), in a job of its own for each test."""
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx = FLContext()
    fl_ctx.set_peer_context(peer)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, os.environ.get("PYTEST_CURRENT_TEST"), private=False, sticky=False)
    return fl_ctx


def send(once: SendOnce, params: dict, site: str, meta: dict | None = None) -> dict:
    """What the filter lets through of a task for `site` that carries `params`; `meta` gets the task's meta."""
    dxo = from_shareable(once.process(FLModelUtils.to_shareable(FLModel(params=params)), context(site)))
    (meta if meta is not None else {}).update(dxo.meta)
    return dxo.data


@pytest.mark.parametrize("numpy", [False, True])
def test_each_tensor_reaches_a_site_once_until_it_changes(numpy):
    g = torch.Generator().manual_seed(0)
    model = {"backbone": torch.randn(8, 8, generator=g), "head": torch.randn(3, 8, generator=g),
             "steps": torch.tensor(5)}  # fmt: skip
    if numpy:
        model = {name: tensor.numpy() for name, tensor in model.items()}
    once, meta = SendOnce(), {}
    assert send(once, model, "site-1", meta).keys() == model.keys() and meta[KEPT] == []  # the first task: all
    assert send(once, model, "site-2", meta).keys() == model.keys()  # each site its own
    # A round later: the same objects for what no site trained, a new head (the round's average).
    model = {**model, "head": model["head"] * 2}
    assert send(once, model, "site-1", meta).keys() == {"head"} and sorted(meta[KEPT]) == ["backbone", "steps"]
    # The same values again, as new objects (NVFlare's persistor reloads the model for an evaluation): nothing.
    copies = {name: value.copy() if numpy else value.clone() for name, value in model.items()}
    assert send(once, copies, "site-1", meta) == {} and sorted(meta[KEPT]) == ["backbone", "head", "steps"]
    # Changed in place: noticed (a tensor's version counter; an array is read each time).
    copies["backbone"][0, 0] += 1
    assert send(once, copies, "site-1", meta).keys() == {"backbone"}
    # A model that lacks names (another site's, which sends only what it trains): the site keeps its own copies.
    assert send(once, {"head": copies["head"] * 3}, "site-1", meta).keys() == {"head"}
    assert sorted(meta[KEPT]) == ["backbone", "steps"]
    # A site never sent a name gets it whatever the others have.
    assert send(once, {"head": copies["head"] * 3}, "site-3", meta).keys() == {"head"} and meta[KEPT] == []


def test_what_a_site_trained_and_sent_back_goes_to_it_again_even_unchanged():
    # The best global model can be the one the last round started from: exactly what each site was sent then, and
    # has trained since.
    model = {"backbone": torch.ones(4), "head": torch.zeros(2)}
    once = SendOnce()
    assert send(once, model, "site-1").keys() == {"backbone", "head"}
    result = FLModelUtils.to_shareable(FLModel(params={"head": torch.ones(2)}))
    ForgetTrained().process(result, context("site-1"))
    meta = {}
    assert send(once, model, "site-1", meta).keys() == {"head"} and meta[KEPT] == ["backbone"]


def fed_avg(global_model: dict) -> MergingFedAvg:
    controller = MergingFedAvg(num_clients=2, num_rounds=1)
    controller._global, controller._names = global_model, None
    return controller


def test_partial_results_must_fit_the_global_model_and_each_other():
    global_model = {"embed.weight": torch.zeros(10, 4), "head.weight": torch.zeros(3, 4)}
    controller = fed_avg(global_model)
    assert controller._misfit_of(result({"head.weight": torch.ones(3, 4)}, 1, "site-1")) is None
    assert controller._misfit_of(result({"head.weight": torch.ones(3, 4)}, 1, "site-2")) is None
    assert controller._misfit_of(result({"head.bias": torch.ones(3)}, 1, "site-2")) == (
        "site-2 sent 'head.bias', which the global model does not have; send the model's own names"
    )
    assert controller._misfit_of(result({"head.weight": torch.ones(3, 5)}, 1, "site-2")) == (
        "site-2 sent 'head.weight' of shape [3, 5], but the global model's is [3, 4]"
    )
    both = {"head.weight": torch.ones(3, 4), "embed.weight": torch.ones(10, 4)}
    assert controller._misfit_of(result(both, 1, "site-3")) == (
        "site-3's result holds 'embed.weight' and site-1's does not: every site must send the same part of the model"
    )
    controller = fed_avg(global_model)
    controller._misfit_of(result(both, 1, "site-1"))
    assert controller._misfit_of(result({"head.weight": torch.ones(3, 4)}, 1, "site-2")) == (
        "site-1's result holds 'embed.weight' and site-2's does not: every site must send the same part of the model"
    )


def test_each_evaluation_task_gets_its_own_model_when_two_are_given_out_at_once():
    # The final evaluation's tasks of two models can be given to two sites at once, each under a lock of its own.
    # Forced here: the second request's task is prepared while the first one's model is being found.
    def task(value: float) -> Task:
        t = Task(name="validate", data=Shareable(), props={AppConstants.MODEL_OWNER: f"SRV_{value}"})
        t.data = DXO(DataKind.WEIGHTS, {"w": torch.full((2,), value)}).to_shareable()
        share_with_every_site(t)  # as NVFlare's broadcast does for its first site: here, the model it loaded
        return t

    first, second = task(1.0), task(2.0)

    class Interleaved(OneCopyEvaluation):
        def _load_validation_content(self, name, load_dir, fl_ctx):
            if name == "SRV_1.0":  # the first request, paused: the second is given its task meanwhile
                self._before_send_validate_task_cb(ClientTask(client=Client("site-1", None), task=second), FLContext())
            return super()._load_validation_content(name, load_dir, fl_ctx)

    evaluation = Interleaved()
    evaluation._located = {}
    evaluation._before_send_validate_task_cb(ClientTask(client=Client("site-2", None), task=first), FLContext())
    assert from_shareable(first.data).data["w"].tolist() == [1.0, 1.0]
    assert from_shareable(second.data).data["w"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("numpy", [False, True])
def test_the_final_evaluation_sends_the_last_global_model_as_its_file_holds_it(numpy, tmp_path):
    # OneCopyEvaluation takes the last global model from NVFlare's persistor, which holds what it saved last: NumPy
    # arrays in the NumPy exchange format (whose meta names no processed keys), tensors in the PyTorch one. What it
    # sends must be what the persistor's file gives NVFlare's own evaluation.
    initial = {"w": torch.zeros(3, 2), "steps": torch.tensor(4)}
    persistor = PTFileModelPersistor(model=None)
    persistor.log_dir = str(tmp_path)
    persistor.persistence_manager = PTModelPersistenceFormatManager(dict(initial))
    trained = {"w": torch.full((3, 2), 0.5), "steps": torch.tensor(5)}
    persistor.persistence_manager.update(
        make_model_learnable({k: v.numpy() if numpy else v for k, v in trained.items()}, {})
    )
    persistor.save_model_file(os.path.join(str(tmp_path), persistor.global_model_file_name))
    locator = PTFileModelLocator(pt_persistor_id="persistor")
    locator.model_persistor = persistor
    evaluation = OneCopyEvaluation(model_locator_id="locator")
    evaluation._model_locator, evaluation._located = locator, {"SRV_FL_global_model.pt": "FL_global_model.pt"}
    fl_ctx = FLContext()
    assert locator.get_model_names(fl_ctx) == ["FL_global_model.pt"]
    held = evaluation._load_validation_content("SRV_FL_global_model.pt", str(tmp_path), fl_ctx).data
    from_file = locator.locate_model("FL_global_model.pt", fl_ctx).data
    assert held.keys() == from_file.keys() == trained.keys()
    for name, value in trained.items():
        assert type(held[name]) is type(from_file[name])
        assert np.array_equal(np.asarray(held[name]), value.numpy())

"""The server's workflows: NVFlare's FedAvg, with every tensor kept in its dtype; for `--min_clients K` below the
number of sites, FedAvg that goes on without a site whose training failed, as long as at least K sites send a
result in every round, and a final evaluation on the sites that are left."""

import math

import numpy as np
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.apis.shareable import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import make_fedavg_metrics_aggregation_info
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg

from flare_ddp import TIED, tied_names

# What TolerantFedAvg leaves for the final evaluation: the names of the sites that dropped out.
DROPPED_SITES = "ddp_example_dropped_sites"


class DtypeKeepingAggregator(ModelAggregator):
    """FedAvg's weighted average of the sites' weights and metrics, each tensor kept in its dtype, summed in place.

    NVFlare's own average rounds bf16 and fp16 weights twice (when weighted, when divided) and turns an integer buffer
    (BatchNorm's num_batches_tracked) into a float. Here each tensor is summed in float32 (float64 for float64 and
    integer tensors, which are exact there up to 2**53) and cast back at the end, integers rounded. Weights are taken
    relative to the first site's, so with one site the global model is exactly what it sent.

    A tied pair (two names of one tensor, flare_ddp.TIED in the result's meta) arrives under one name; the global
    model gives both names the same averaged tensor again, so it is saved whole, and SendTiedOnce sends it once.

    Memory: one running sum the size of the model in float32, plus the one result being added, which is let go
    tensor by tensor as it is summed (and, with NVFlare's disk offload, read from disk one tensor at a time)."""

    def __init__(self):
        super().__init__()
        self.reset_stats()

    def reset_stats(self):
        self._sums, self._kinds = {}, {}  # name: running sum; name: (dtype, whether it came as a NumPy array)
        self._metrics, self._sites = {}, []  # metric: running weighted sum; the round's sites and their weights
        self._first_weight, self._total, self._params_type = None, 0.0, None
        self._tied = {}  # name left out: the name it is tied to

    def accept_model(self, model: FLModel):
        weight = _weight(model)
        self._first_weight = self._first_weight or weight
        factor = weight / self._first_weight  # 1.0 for the first site: its tensors are summed without rounding
        self._total += factor
        self._params_type = self._params_type or model.params_type
        self._tied.update((model.meta or {}).get(TIED) or {})
        name = (model.meta or {}).get("client_name", "unknown")
        self._sites.append({"name": name, "weight": weight, "weight_key": FLMetaKey.NUM_STEPS_CURRENT_ROUND})
        for key in list(model.params or {}):
            value = model.params.pop(key)  # let the received copy go as soon as it is summed
            if callable(getattr(value, "materialize", None)):  # NVFlare's disk offload: the tensor is read here
                value = value.materialize()
            is_numpy = isinstance(value, np.ndarray)
            tensor = torch.from_numpy(value) if is_numpy else value
            if key not in self._sums:
                self._kinds[key] = (tensor.dtype, is_numpy)
                wide = torch.float32 if tensor.is_floating_point() and tensor.element_size() <= 4 else torch.float64
                self._sums[key] = tensor.to(wide, copy=tensor.dtype != wide or is_numpy).mul_(factor)
            else:
                self._sums[key].add_(tensor, alpha=factor)
        for key, value in (model.metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._metrics[key] = self._metrics.get(key, 0.0) + factor * value

    def aggregate_model(self) -> FLModel:
        params = {}
        for key in list(self._sums):
            mean = self._sums.pop(key).div_(self._total)
            dtype, is_numpy = self._kinds[key]
            if not (dtype.is_floating_point or dtype.is_complex):
                mean.round_()
            params[key] = mean.to(dtype).numpy() if is_numpy else mean.to(dtype)
        params.update({alias: params[name] for alias, name in self._tied.items() if name in params})
        metrics = {key: value / self._total for key, value in self._metrics.items()} or None
        info = make_fedavg_metrics_aggregation_info(site_weights=self._sites)
        info["use_contribution_sites"] = True  # round_metrics.jsonl lists each site's own metrics
        result = FLModel(
            params=params, params_type=self._params_type, metrics=metrics,
            meta={AppConstants.METRICS_AGGREGATION_INFO: info},
        )  # fmt: skip
        self.reset_stats()
        return result


def _weight(model: FLModel) -> float:
    """What FedAvg weighs a site's result by: the NUM_STEPS_CURRENT_ROUND it sent, or 1."""
    value = (model.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 1.0
    return weight if math.isfinite(weight) and weight > 0 else 1.0


class TolerantFedAvg(FedAvg):
    """NVFlare's FedAvg, with two changes:
    - a site whose `train` task fails (its trainer died or raised) drops out: it gets no further task, and the
      round averages the results of the others;
    - a round that ends with fewer than `min_clients` results fails the job, as FedAvg does for any failure.

    A site that fails before its trainer's handshake ends its own run without telling the server, so job.py's
    watchdog still ends the job then (docs/failures.md)."""

    def __init__(self, *args, min_clients: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_clients = min_clients
        self.dropped: set[str] = set()  # sites whose task failed; the summary reads the round from the metrics

    @classmethod
    def tolerate(cls, controller: FedAvg, min_clients: int) -> None:
        """Make NVFlare's FedAvg controller, built with ignore_result_error=True, this one: the job's config then
        names this class and min_clients, with the controller's other arguments as NVFlare's recipe set them."""
        controller.__class__ = cls
        controller.min_clients = min_clients

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        return [site for site in super().sample_clients() if site not in self.dropped]

    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task=False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        rc = result.get_return_code()
        if not accepted and rc not in (None, ReturnCode.OK) and client_name not in self.dropped:
            self.dropped.add(client_name)
            self.warning(
                f"{client_name} dropped out of the federation in round {self.current_round} (its task returned {rc})"
            )
            fl_ctx.set_prop(DROPPED_SITES, sorted(self.dropped), private=True, sticky=True)
        return accepted

    def _get_aggregated_result(self):
        if self._received_count < self.min_clients:
            # Raised inside run(): NVFlare's controller turns it into a panic that ends the job with this message.
            raise RuntimeError(
                f"round {self.current_round} has {self._received_count} result(s), fewer than --min_clients "
                f"{self.min_clients}; dropped out: {', '.join(sorted(self.dropped)) or 'none'}"
            )
        return super()._get_aggregated_result()


class LiveSitesEvaluation(CrossSiteModelEval):
    """NVFlare's final evaluation of the global model, on every site but those TolerantFedAvg dropped: a dropped
    site's trainer is gone, and its failed `validate` task would only add errors to a run that succeeded."""

    def start_controller(self, fl_ctx):
        super().start_controller(fl_ctx)
        dropped = fl_ctx.get_prop(DROPPED_SITES) or []
        self._participating_clients = [site for site in self._participating_clients if site not in dropped]


class SendTiedOnce(Filter):
    """The server's task data without the second name of a tied pair (two names of one tensor in the global model, as
    DtypeKeepingAggregator makes them): the pair travels once, and flare_ddp gives it both names again at the site.
    A model that NVFlare reloaded from a file it wrote for an evaluation may come back with the pair as two equal
    tensors; names seen tied before are then left out as long as their values are still equal."""

    def __init__(self):
        super().__init__()
        self._seen = {}  # alias: name, of every tied pair seen so far

    def process(self, shareable, fl_ctx):
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # a task without weights
            return shareable
        if not isinstance(dxo.data, dict):
            return shareable
        self._seen.update(tied_names(dxo.data.items()))
        data = dxo.data
        tied = {
            alias
            for alias, name in self._seen.items()
            if {alias, name} <= data.keys() and _equal(data[alias], data[name])
        }
        if not tied:
            return shareable
        dxo.data = {name: value for name, value in data.items() if name not in tied}
        return dxo.update_shareable(shareable)


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))

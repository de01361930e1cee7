"""The server's workflows: NVFlare's FedAvg, with every tensor kept in its dtype; for `--min_clients K` below the
number of sites, FedAvg that goes on without a site whose training failed, as long as at least K sites send a
result in every round, and a final evaluation on the sites that are left."""

import numpy as np
import torch
from nvflare.apis.shareable import ReturnCode
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.fedavg import FedAvg

# What TolerantFedAvg leaves for the final evaluation: the names of the sites that dropped out.
DROPPED_SITES = "ddp_example_dropped_sites"


class DtypeKeepingFedAvg(FedAvg):
    """NVFlare 2.9's FedAvg, whose global model keeps the dtype of every tensor the sites send.

    NVFlare's own averages each tensor in its dtype: bf16 and fp16 weights are rounded twice (when weighted, when
    divided), and an integer buffer (BatchNorm's num_batches_tracked) comes back as a float. Here each tensor is
    averaged in float64 and cast back, integers rounded: with one site, the global model is exactly what it sent."""

    def _aggregate_one_result(self, result) -> bool:
        if result.params:
            self._dtypes = {name: value.dtype for name, value in result.params.items()}
            result.params = {name: _widen(value) for name, value in result.params.items()}
        return super()._aggregate_one_result(result)

    def _get_aggregated_result(self):
        aggregated = super()._get_aggregated_result()
        if aggregated.params and hasattr(self, "_dtypes"):
            aggregated.params = {
                name: _narrow(value, self._dtypes[name]) if name in self._dtypes else value
                for name, value in aggregated.params.items()
            }
        return aggregated


def _widen(value):
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return value


def _narrow(value, dtype):
    if isinstance(value, torch.Tensor):
        return (value.round() if not (dtype.is_floating_point or dtype.is_complex) else value).to(dtype)
    if isinstance(value, np.ndarray):
        return (np.rint(value) if np.issubdtype(dtype, np.integer) else value).astype(dtype)
    return value


class TolerantFedAvg(DtypeKeepingFedAvg):
    """DtypeKeepingFedAvg, with two changes:
    - a site whose `train` task fails (its trainer died or raised) drops out: it gets no further task, and the
      round averages the results of the others;
    - a round that ends with fewer than `min_clients` results fails the job, as FedAvg does for any failure.

    A site that fails before its trainer's handshake ends its own run without telling the server, so job.py's
    watchdog still ends the job then (docs/failures.md)."""

    def __init__(self, *args, min_clients: int, ignore_result_error: bool = True, **kwargs):
        # ignore_result_error: a failed result is dropped here instead of ending the job (see below).
        super().__init__(*args, ignore_result_error=ignore_result_error, **kwargs)
        self.min_clients = min_clients
        self.dropped: set[str] = set()  # sites whose task failed; the summary reads the round from the metrics

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

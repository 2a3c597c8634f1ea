"""Flower strategies that receive deltas of the exchanged tensors and record per-site metrics.

Clients upload ``w_local - w_global`` for the exchanged (trainable) tensors only. The
:class:`DeltaMixin` turns each delta back into weights before the parent strategy aggregates,
so FedAvg, FedProx, FedAdam and FedYogi keep their own update rules unchanged. The same holds
when secure aggregation hands over one already-averaged delta.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from server.metrics import CLINICAL_NAMES, SiteRoundMetrics
from server.recorder import FederationRecorder
from shared import protocol as wire
from shared.config import RunConfig
from shared.errors import RefusalError
from shared.log import log
from shared.params import add, serialized_bytes

ConfigFn = Callable[[int], dict[str, Scalar]]


class FederationStopped(RefusalError):
    """Too few sites took part in a round; the run ends with a clear message."""


class DeltaMixin:
    """Strategy mixin: uploads are deltas from the global model; metrics go to a recorder.

    Must precede a :class:`flwr.server.strategy.FedAvg` subclass in the bases.
    """

    def __init__(self, *args: Any, recorder: FederationRecorder, secure: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secure = secure
        initial = kwargs.get("initial_parameters")
        if initial is None:
            raise ValueError("a delta strategy needs `initial_parameters`")
        self._global: list[np.ndarray] = parameters_to_ndarrays(initial)
        self.recorder = recorder
        # SecAgg+ uploads the site's weight (one value) then the update, masked as int64:
        # the same size every round (the exchanged shapes never change).
        masked = [np.zeros(1, dtype=np.int64)] + [np.zeros(a.shape, dtype=np.int64) for a in self._global]
        self._masked_bytes = serialized_bytes(masked)

    def _uploaded_bytes(self, res: FitRes) -> int:
        """Bytes a site sent: its parameters, or under SecAgg+ its masked int64 vectors."""
        return self._masked_bytes if self.secure else sum(len(t) for t in res.parameters.tensors)

    @property
    def global_arrays(self) -> list[np.ndarray]:
        """The current global exchanged tensors."""
        return [a.copy() for a in self._global]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Restore weights from deltas, aggregate with the parent rule, keep the new global.

        Raises
        ------
        FederationStopped
            If fewer sites than ``min_fit_clients`` trained; the global model is unchanged.
        """
        self.recorder.upload_bytes[server_round] = [self._uploaded_bytes(res) for _, res in results]
        reasons = [failure_reason(f) for f in failures]
        self.recorder.add_failures(server_round, reasons)
        for reason in reasons:
            log(WARNING, "round %d: a site declined or failed: %s", server_round, reason)
        minimum = int(getattr(self, "min_fit_clients", 1))
        if len(results) < minimum:
            raise FederationStopped(
                f"round {server_round}: only {len(results)} site(s) trained, fewer than "
                f"min-sites = {minimum}; the run stops with the global model of round "
                f"{server_round - 1}. Declined: {' | '.join(reasons) or 'none'}"
            )
        restored = [
            (proxy, _with_parameters(res, add(self._global, parameters_to_ndarrays(res.parameters))))
            for proxy, res in results
        ]
        parameters, metrics = super().aggregate_fit(server_round, restored, failures)  # type: ignore[misc]
        if parameters is not None:
            self._global = parameters_to_ndarrays(parameters)
            self.recorder.final_parameters = self.global_arrays
        return parameters, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record each site's metrics, then aggregate with the parent rule."""
        rows = [
            SiteRoundMetrics(
                round=server_round,
                site=str(res.metrics.get(wire.METRIC_SITE, proxy.cid)),
                num_examples=int(res.num_examples),
                loss=float(res.loss),
                accuracy=float(res.metrics.get(wire.METRIC_ACCURACY, math.nan)),
                auc=float(res.metrics.get(wire.METRIC_AUC, math.nan)),
                epsilon=float(res.metrics.get(wire.METRIC_EPSILON, math.nan)),
                delta=float(res.metrics.get(wire.METRIC_DELTA, math.nan)),
                **{
                    name: float(res.metrics.get(key, math.nan))
                    for name, key in zip(CLINICAL_NAMES, wire.CLINICAL_METRICS, strict=True)
                },
            )
            for proxy, res in results
        ]
        for row, (_, res) in zip(rows, results):
            if wire.METRIC_DROPPED_ROWS in res.metrics:
                self.recorder.dropped_rows[row.site] = int(res.metrics[wire.METRIC_DROPPED_ROWS])
            if wire.METRIC_CLASS_COUNTS in res.metrics:
                self.recorder.class_balance[row.site] = parse_class_counts(res.metrics[wire.METRIC_CLASS_COUNTS])
        self.recorder.add_failures(server_round, [failure_reason(f) for f in failures])
        self.recorder.add_round(server_round, rows)
        return super().aggregate_evaluate(server_round, results, failures)  # type: ignore[misc]


def parse_class_counts(value: Scalar) -> dict[str, dict[str, int]]:
    """A site's ``class-counts`` metric (JSON text) as ``{"train": {label: n}, "val": {...}}``; ``{}`` if malformed."""
    try:
        parsed = json.loads(str(value))
        return {part: {str(k): int(v) for k, v in parsed[part].items()} for part in ("train", "val")}
    except (ValueError, TypeError, KeyError, AttributeError):
        log(WARNING, "a site's class counts are malformed; left out of the model card")
        return {}


def _with_parameters(res: FitRes, arrays: list[np.ndarray]) -> FitRes:
    return FitRes(
        status=res.status,
        parameters=ndarrays_to_parameters(arrays),
        num_examples=res.num_examples,
        metrics=res.metrics,
    )


def failure_reason(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    """The reason a site gave (its refusal), or what went wrong."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else None
        return str(getattr(error, "reason", failure))
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"


class CareFedAvg(DeltaMixin, FedAvg):
    """FedAvg on deltas."""


class CareFedProx(DeltaMixin, FedProx):
    """FedProx on deltas (clients add the proximal term)."""


class CareFedAdam(DeltaMixin, FedAdam):
    """FedAdam on deltas."""


class CareFedYogi(DeltaMixin, FedYogi):
    """FedYogi on deltas."""


def weighted_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the numeric metrics clients report (NaNs ignored)."""
    sums: dict[str, tuple[float, int]] = {}
    for count, values in metrics:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                total, n = sums.get(key, (0.0, 0))
                sums[key] = (total + count * float(value), n + count)
    return {key: total / n for key, (total, n) in sums.items() if n > 0}


def make_strategy(
    cfg: RunConfig,
    initial: list[np.ndarray],
    recorder: FederationRecorder,
    *,
    fit_config: ConfigFn,
    evaluate_config: ConfigFn,
) -> Strategy:
    """Build the strategy named by ``cfg.study.strategy``.

    Parameters
    ----------
    cfg : RunConfig
        Strategy name and its hyperparameters.
    initial : list[np.ndarray]
        The initial global exchanged tensors.
    recorder : FederationRecorder
        Receives metrics and byte counts.
    fit_config, evaluate_config : ConfigFn
        Per-round configuration sent to clients.
    """
    common: dict[str, Any] = {
        "fraction_fit": cfg.study.fraction_fit,
        "fraction_evaluate": cfg.study.fraction_evaluate,
        "min_fit_clients": cfg.study.min_sites,
        "min_evaluate_clients": cfg.study.min_sites,
        "min_available_clients": cfg.study.min_sites,
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": evaluate_config,
        "initial_parameters": ndarrays_to_parameters(initial),
        "fit_metrics_aggregation_fn": weighted_metrics,
        "evaluate_metrics_aggregation_fn": weighted_metrics,
        "recorder": recorder,
        "secure": cfg.study.secure_aggregation,
    }
    study = cfg.study
    adaptive = {"eta": study.server_learning_rate, "eta_l": study.learning_rate}
    own: dict[str, tuple[type[Strategy], dict[str, Any]]] = {
        "fedavg": (CareFedAvg, {}),
        "fedprox": (CareFedProx, {"proximal_mu": study.proximal_mu}),
        "fedadam": (CareFedAdam, adaptive),
        "fedyogi": (CareFedYogi, adaptive),
    }
    kind, params = own[study.strategy]
    return kind(**params, **common)

"""Flower strategies that receive deltas of the exchanged tensors and record per-site metrics.

Clients upload ``w_local - w_global`` for the exchanged (trainable) tensors only. The
:class:`DeltaMixin` turns each delta back into weights before the parent strategy aggregates,
so FedAvg, FedProx, FedAdam and FedYogi keep their own update rules unchanged. The same holds
when secure aggregation hands over one already-averaged delta.

Per-site metrics go to a :class:`~server.recorder.FederationRecorder`, each row attributed to the
global model it measures: row ``r`` is the model after round ``r`` (0: the initial model). With
``evaluate_in_fit`` the sites evaluate the model they receive in the same fit message that trains
on it, so round ``r``'s fit replies fill row ``r - 1``, and only the final model gets an evaluate
message of its own (row ``R``). Otherwise each round's evaluate replies fill row ``r``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
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

    def __init__(
        self,
        *args: Any,
        recorder: FederationRecorder,
        secure: bool = False,
        evaluate_in_fit: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.secure = secure
        self.evaluate_in_fit = evaluate_in_fit
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
        for proxy, res in results:
            self.recorder.add_training_privacy(server_round, _site_name(proxy, res.metrics), _privacy(res.metrics))
        if self.evaluate_in_fit:
            self._record_incoming(server_round, results)
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
        """Record each site's metrics as those of the model after ``server_round``, then aggregate with the parent rule."""
        self.recorder.add_failures(server_round, [failure_reason(f) for f in failures])
        self._record(server_round, [(proxy, float(res.loss), int(res.num_examples), res.metrics) for proxy, res in results])
        return super().aggregate_evaluate(server_round, results, failures)  # type: ignore[misc]

    def _record_incoming(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> None:
        """Record the evaluations round ``server_round``'s fit replies carry: the model after round ``server_round - 1``.

        A row already recorded (a run resumed from a checkpoint taken without ``evaluate_in_fit``)
        is kept as it was.
        """
        measured = server_round - 1
        if self.recorder.has_round(measured):
            return
        carried = [(proxy, wire.split_incoming(res.metrics)) for proxy, res in results]
        evaluations = [(proxy, *values) for proxy, values in carried if values is not None]
        if evaluations:
            self._record(measured, evaluations)

    def _record(self, measured: int, evaluations: list[tuple[ClientProxy, float, int, dict[str, Scalar]]]) -> None:
        """Record each site's evaluation of the model after round ``measured``.

        With ``evaluate_in_fit`` a site's epsilon and delta are those it reported when it trained
        round ``measured`` (what that model cost it; carried across a resume by the checkpoint),
        else those it read from its ledger when it evaluated.
        """
        rows = []
        for proxy, loss, num_examples, metrics in evaluations:
            row = site_row(measured, _site_name(proxy, metrics), loss, num_examples, metrics)
            trained = self.recorder.training_privacy.get(measured, {}).get(row.site)
            if self.evaluate_in_fit and trained is not None:
                row = replace(row, epsilon=trained[0], delta=trained[1])
            rows.append(row)
            if wire.METRIC_DROPPED_ROWS in metrics:
                self.recorder.dropped_rows[row.site] = int(metrics[wire.METRIC_DROPPED_ROWS])
            if wire.METRIC_CLASS_COUNTS in metrics:
                self.recorder.class_balance[row.site] = parse_class_counts(metrics[wire.METRIC_CLASS_COUNTS])
        self.recorder.add_round(measured, rows)


def site_row(measured: int, site: str, loss: float, num_examples: int, metrics: dict[str, Scalar]) -> SiteRoundMetrics:
    """One site's evaluation reply (loss, validation records, metrics) as the row of the model after round ``measured``."""
    return SiteRoundMetrics(
        round=measured,
        site=site,
        num_examples=int(num_examples),
        loss=float(loss),
        accuracy=float(metrics.get(wire.METRIC_ACCURACY, math.nan)),
        auc=float(metrics.get(wire.METRIC_AUC, math.nan)),
        epsilon=float(metrics.get(wire.METRIC_EPSILON, math.nan)),
        delta=float(metrics.get(wire.METRIC_DELTA, math.nan)),
        **{
            name: float(metrics.get(key, math.nan))
            for name, key in zip(CLINICAL_NAMES, wire.CLINICAL_METRICS, strict=True)
        },
    )


def _site_name(proxy: ClientProxy, metrics: dict[str, Scalar]) -> str:
    return str(metrics.get(wire.METRIC_SITE, proxy.cid))


def _privacy(metrics: dict[str, Scalar]) -> tuple[float, float] | None:
    """The (epsilon, delta) a fit reply reports after its training, or None (no DP)."""
    if wire.METRIC_EPSILON not in metrics:
        return None
    return float(metrics[wire.METRIC_EPSILON]), float(metrics.get(wire.METRIC_DELTA, math.nan))


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
        "evaluate_in_fit": cfg.server.evaluate_in_fit,
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

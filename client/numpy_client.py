"""The site's Flower client: trains the exchanged tensors locally and returns their delta.

It only translates between Flower's messages and the site's modules: data and model in
:mod:`shared.pipeline`, privacy in :mod:`client.privacy`, policy in :mod:`client.policy`.
"""

from __future__ import annotations

import json
import math
from logging import INFO, WARNING
from typing import Protocol

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from client.ledger import PrivacyLedger
from client.policy import SitePolicy, check_study
from client.privacy import check_request, plan_round, site_delta
from client.site import SiteEnvironment, site_data, site_label
from client.store import BackboneStore
from shared import protocol as wire
from shared.config import StudyConfig
from shared.dp import same_schedule, train_dp
from shared.errors import CareFLError, RefusalError
from shared.log import log
from shared.params import get_arrays, set_arrays, subtract
from shared.pipeline import LocalProblem, Pretrained, build_model, local_problem, train_settings
from shared.scores import binary_metrics, choose_threshold, classification_metrics
from shared.tasks import SiteData
from shared.training import TrainSettings, predict_proba, train


class ModelBuilder(Protocol):
    """Builds a study's model as :func:`shared.pipeline.build_model` does."""

    def build(self, cfg: StudyConfig, pretrained: Pretrained | None) -> torch.nn.Module:
        """The model of ``cfg``, with ``pretrained``'s backbone in the transfer setup."""


class SiteRefusal(RefusalError):
    """The site declines a request; the message starts with the site's name."""


def bound_delta(delta: NDArrays, bound: float) -> tuple[NDArrays, float]:
    """Clip every value of ``delta`` to ``[-bound, bound]``; returns it and the fraction clipped.

    Post-processing of the site's (DP) update, so it costs no privacy; it guarantees SecAgg+'s
    quantizer, whose range is ``bound``, never saturates silently.
    """
    total = sum(int(np.size(a)) for a in delta)
    clipped = sum(int(np.count_nonzero(np.abs(a) > bound)) for a in delta)
    return [np.clip(a, -bound, bound).astype(np.float32) for a in delta], clipped / max(total, 1)


def clinical_metrics(labels: np.ndarray, probs: np.ndarray | None, rule: str) -> dict[str, Scalar]:
    """The site's clinical scores: at 0.5, and at the threshold ``rule`` picks on these same records.

    Only these aggregates leave the site, never a score or a label. All NaN unless the task is
    binary and there are records.
    """
    if probs is None or probs.ndim != 2 or probs.shape[1] != 2:
        return {key: math.nan for key in wire.CLINICAL_METRICS}
    positive = probs[:, 1]
    at_half = binary_metrics(labels, positive, threshold=0.5)
    threshold = choose_threshold(labels, positive, rule)
    at_op = binary_metrics(labels, positive, threshold=threshold)
    return {
        wire.METRIC_SENSITIVITY: at_half.sensitivity, wire.METRIC_SPECIFICITY: at_half.specificity,
        wire.METRIC_PPV: at_half.ppv, wire.METRIC_NPV: at_half.npv, wire.METRIC_F1: at_half.f1,
        wire.METRIC_BALANCED_ACCURACY: at_half.balanced_accuracy, wire.METRIC_BRIER: at_half.brier,
        wire.METRIC_ECE: at_half.ece, wire.METRIC_THRESHOLD: threshold,
        wire.METRIC_SENSITIVITY_AT_OP: at_op.sensitivity, wire.METRIC_SPECIFICITY_AT_OP: at_op.specificity,
    }  # fmt: skip


def class_counts_text(y_train: np.ndarray, y_val: np.ndarray) -> str:
    """The site's records per class label in its training and validation parts, as JSON text."""

    def counts(labels: np.ndarray) -> dict[str, int]:
        values, numbers = np.unique(np.asarray(labels), return_counts=True)
        return {str(int(v)): int(n) for v, n in zip(values, numbers, strict=True)}

    return json.dumps({"train": counts(y_train), "val": counts(y_val)}, sort_keys=True)


def config_from_message(config: dict[str, Scalar]) -> tuple[StudyConfig, int, float]:
    """Split a fit/evaluate config into the study, the round and FedProx's mu.

    Any key that is neither a study key nor one the server adds per round is refused: the
    server's own settings never reach a site.
    """
    values = {k: v for k, v in config.items() if k not in wire.SERVER_KEYS}
    server_round = int(config.get(wire.ROUND_KEY, 0))
    mu = float(config.get(wire.PROXIMAL_MU_KEY, 0.0))
    return StudyConfig.from_run_config(values), server_round, mu


class SiteClient(NumPyClient):
    """Flower client of one hospital.

    Parameters
    ----------
    env : SiteEnvironment
        The site's data, private directory and policy.
    run_id : str
        Flower's run id (the privacy ledger's run key).
    models : ModelBuilder, optional
        Builds the study's model (default: :func:`shared.pipeline.build_model`); the site
        worker passes its kept models (:class:`client.worker.templates.ModelTemplates`).
    """

    def __init__(self, env: SiteEnvironment, run_id: str, models: ModelBuilder | None = None) -> None:
        self.env = env
        self.run_id = run_id
        self.build_model = models.build if models is not None else build_model
        torch.set_num_threads(1)

    def _admit(self, cfg: StudyConfig) -> SitePolicy:
        """Read the site's policy and check the study against it, before the site's data is read.

        Every message that touches the data (training and evaluation) goes through here.

        Raises
        ------
        InputError
            If the policy file is missing or invalid.
        PolicyViolation
            If the policy refuses the study's task, backbone, DP setting or rounds.
        """
        policy = SitePolicy.load(self.env.policy_path)
        check_study(policy, task=cfg.task, backbone_sha256=cfg.backbone_sha256, dp=cfg.dp, rounds=cfg.num_rounds)
        return policy

    def _problem(self, cfg: StudyConfig, site: SiteData | None = None) -> LocalProblem:
        """The site's local problem for ``cfg`` (its data: ``site``, loaded here if not given)."""
        pretrained = None
        sha = ""
        if cfg.setup == "transfer":
            pretrained = BackboneStore(self.env.site_dir).get(cfg.backbone_sha256)
            sha = pretrained.manifest.sha256
        model = self.build_model(cfg, pretrained)
        if site is None:
            site = site_data(cfg, self.env)
        return local_problem(cfg, model, site, backbone_sha256=sha, cache_dir=self.env.site_dir)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Check policy and budget, charge the ledger, train; return the delta and privacy spent.

        When the server asks (:data:`shared.protocol.EVALUATE_INCOMING_KEY`), the site first evaluates
        the received ``parameters`` exactly as :meth:`evaluate` would, and reports those figures too,
        named as the received model's (:func:`shared.protocol.incoming_metrics`).
        """
        cfg, server_round, mu = config_from_message(config)
        name = site_label(cfg, self.env)
        evaluate_incoming = bool(config.get(wire.EVALUATE_INCOMING_KEY, False))
        try:
            problem, metrics = self._train(
                cfg, parameters, server_round=server_round, proximal_mu=mu, evaluate_incoming=evaluate_incoming
            )
        except CareFLError as err:
            log(WARNING, "%s declines round %d: %s", name, server_round, err)
            raise SiteRefusal(f"{name}: {err}") from err
        delta = subtract(get_arrays(problem.model, problem.names), parameters)
        if cfg.secure_aggregation:
            if len(problem.y_train) > cfg.secagg_max_weight:
                raise SiteRefusal(
                    f"{name}: {len(problem.y_train)} training records exceed secagg-max-weight "
                    f"{cfg.secagg_max_weight:g}; secure aggregation would overflow."
                )
            delta, clipped = bound_delta(delta, cfg.delta_bound)
            metrics[wire.METRIC_DELTA_CLIPPED] = clipped
        return delta, len(problem.y_train), {wire.METRIC_SITE: name, **metrics}

    def _train(
        self,
        cfg: StudyConfig,
        parameters: NDArrays,
        *,
        server_round: int,
        proximal_mu: float,
        evaluate_incoming: bool = False,
    ) -> tuple[LocalProblem, dict[str, Scalar]]:
        """Check the request against the policy, then train (privately when ``cfg.dp``).

        With ``evaluate_incoming`` the received ``parameters`` are evaluated first (before the
        ledger is charged, so the epsilon reported with them is that of the model received).
        """
        policy = self._admit(cfg)
        problem = self._problem(cfg)
        noise = check_request(cfg, policy, num_records=len(problem.y_train), backbone_sha256=cfg.backbone_sha256)
        incoming: dict[str, Scalar] = {}
        if evaluate_incoming:
            incoming = wire.incoming_metrics(*self._evaluate_problem(cfg, problem, parameters))
        set_arrays(problem.model, problem.names, parameters)
        settings = train_settings(cfg, server_round=server_round, proximal_mu=proximal_mu)
        if cfg.dp:
            trained = self._train_private(cfg, policy, problem, settings, server_round=server_round, noise=noise)
            return problem, {**incoming, **trained}
        reference = [p.detach().clone() for p in problem.module.parameters() if p.requires_grad]
        loss = train(problem.module, problem.x_train, problem.y_train, settings, reference=reference)
        return problem, {**incoming, wire.METRIC_TRAIN_LOSS: loss}

    def _train_private(
        self,
        cfg: StudyConfig,
        policy: SitePolicy,
        problem: LocalProblem,
        settings: TrainSettings,
        *,
        server_round: int,
        noise: float,
    ) -> dict[str, Scalar]:
        """Plan the round against the ledger, charge it (before anything leaves), run DP-SGD."""
        ledger = PrivacyLedger.open(self.env.site_dir)
        plan = plan_round(cfg, policy, ledger, run_id=self.run_id, num_records=len(problem.y_train), noise_multiplier=noise)
        ledger.charge(
            run_id=self.run_id, round=server_round, charge=plan.charge, delta=plan.delta,
            accountant=cfg.accountant, max_grad_norm=cfg.max_grad_norm, expect_entries=len(ledger.entries()),
        )  # fmt: skip
        log(INFO, "%s: round %d charged to the ledger (run epsilon %.3f)", problem.site_name, server_round, plan.run_epsilon_after)
        result = train_dp(
            problem.module, problem.x_train, problem.y_train, settings,
            noise_multiplier=plan.charge.noise_multiplier, max_grad_norm=cfg.max_grad_norm, accountant=cfg.accountant,
        )  # fmt: skip
        if not same_schedule([plan.charge], result.charges):
            raise SiteRefusal(f"DP-SGD ran {result.charges}, not the charged {plan.charge}; update withheld.")
        return {
            wire.METRIC_TRAIN_LOSS: result.loss,
            wire.METRIC_EPSILON: plan.run_epsilon_after,
            wire.METRIC_DELTA: plan.delta,
            wire.METRIC_LIFETIME_EPSILON: plan.lifetime_epsilon_after,
            wire.METRIC_NOISE_MULTIPLIER: plan.charge.noise_multiplier,
        }

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the global tensors on the site's held-out part, if the site's policy covers the study."""
        cfg, server_round, _ = config_from_message(config)
        name = site_label(cfg, self.env)
        try:
            self._admit(cfg)
            problem = self._problem(cfg)
        except CareFLError as err:
            log(WARNING, "%s declines to evaluate round %d: %s", name, server_round, err)
            raise SiteRefusal(f"{name}: {err}") from err
        return self._evaluate_problem(cfg, problem, parameters)

    def _evaluate_problem(
        self, cfg: StudyConfig, problem: LocalProblem, parameters: NDArrays
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate ``parameters`` on ``problem``'s validation part (the site already admitted the study).

        Returns an evaluate reply: the loss, the validation records, and the metrics (with the
        privacy this run has spent at the site so far).
        """
        set_arrays(problem.model, problem.names, parameters)
        probs = predict_proba(problem.module, problem.x_val) if len(problem.y_val) else None
        loss, accuracy, auc = (math.nan,) * 3 if probs is None else classification_metrics(problem.y_val, probs)
        metrics: dict[str, Scalar] = {
            wire.METRIC_SITE: problem.site_name, wire.METRIC_ACCURACY: accuracy, wire.METRIC_AUC: auc,
            wire.METRIC_DROPPED_ROWS: problem.dropped,
            wire.METRIC_CLASS_COUNTS: class_counts_text(problem.y_train, problem.y_val),
        }
        metrics.update(clinical_metrics(problem.y_val, probs, cfg.operating_point))
        metrics.update(self._privacy_spent(cfg, len(problem.y_train)))
        return loss, len(problem.y_val), metrics

    def _privacy_spent(self, cfg: StudyConfig, num_records: int) -> dict[str, Scalar]:
        """The run's epsilon and delta at this site so far (NaN without DP or ledger)."""
        if not cfg.dp:
            return {wire.METRIC_EPSILON: math.nan, wire.METRIC_DELTA: math.nan}
        delta = site_delta(cfg, num_records)
        try:
            spent = PrivacyLedger.open(self.env.site_dir).spent(run_id=self.run_id, delta=delta, accountant=cfg.accountant)
        except CareFLError:
            spent = math.nan
        return {wire.METRIC_EPSILON: spent, wire.METRIC_DELTA: delta}

"""A site reports clinical scores in evaluation: at 0.5 and at the operating point it picks itself.

Driven through the real :class:`client.numpy_client.SiteClient` on a real heart-disease site.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Scalar

from client.numpy_client import SiteClient, clinical_metrics
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, Partition, SiteEnvironment
from server.app import site_config
from shared import protocol as wire
from shared.config import RunConfig
from shared.params import exchanged_names, get_arrays
from shared.pipeline import build_model, effective_trainable


def test_evaluate_reports_scores_at_half_and_at_the_sites_operating_point(tmp_path: Path) -> None:
    # Prepare: a real site (index 0: Hungary), a study asking for sensitivity 0.9
    site_dir = tmp_path / "site"
    prepare_site_dir(site_dir, site="Hungary", policy=SitePolicy())
    env = SiteEnvironment(data_path="", site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(0, 3))
    cfg = RunConfig.of(
        task="heart-disease", setup="scratch", num_rounds=1, secure_aggregation=False,
        operating_point="sensitivity:0.9",
    )  # fmt: skip
    model = build_model(cfg.study, None)
    parameters = get_arrays(model, exchanged_names(model, effective_trainable(cfg.study)))

    # Execute
    _, num_examples, metrics = SiteClient(env, "run-1").evaluate(parameters, {**site_config(cfg, None), wire.ROUND_KEY: 1})

    # Assert: only aggregates (scalars) leave the site, each clinical key present
    assert num_examples > 0
    assert set(wire.CLINICAL_METRICS) <= set(metrics)
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert metrics[wire.METRIC_SENSITIVITY_AT_OP] >= 0.9
    assert 0.0 <= metrics[wire.METRIC_THRESHOLD] <= 1.0
    assert 0.0 <= metrics[wire.METRIC_SPECIFICITY] <= 1.0 and 0.0 <= metrics[wire.METRIC_ECE] <= 1.0


def test_clinical_metrics_are_nan_without_a_binary_task_or_records() -> None:
    # Prepare
    three_classes = np.full((4, 3), 1 / 3)

    # Execute
    none = clinical_metrics(np.array([], int), None, "0.5")
    multi = clinical_metrics(np.array([0, 1, 2, 0]), three_classes, "youden")

    # Assert
    for values in (none, multi):
        assert set(values) == set(wire.CLINICAL_METRICS)
        assert all(math.isnan(float(v)) for v in values.values())


def test_fixed_operating_point_equals_the_half_figures() -> None:
    # Prepare
    labels = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])

    # Execute
    values = clinical_metrics(labels, probs, "0.5")

    # Assert
    assert values[wire.METRIC_THRESHOLD] == 0.5
    assert values[wire.METRIC_SENSITIVITY_AT_OP] == values[wire.METRIC_SENSITIVITY] == 2 / 3
    assert values[wire.METRIC_SPECIFICITY_AT_OP] == values[wire.METRIC_SPECIFICITY] == 1 / 2


def _site(tmp_path: Path, name: str, policy: SitePolicy) -> SiteEnvironment:
    site_dir = tmp_path / name
    prepare_site_dir(site_dir, site="Hungary", policy=policy)
    return SiteEnvironment(data_path="", site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(0, 3))


def _same(a: object, b: object) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_fit_asked_to_evaluate_the_incoming_model_reports_what_evaluate_reports(tmp_path: Path) -> None:
    # Prepare: a real site, a study without DP (training is then deterministic), a fresh head
    cfg = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=2, secure_aggregation=False, dp=False)
    policy = SitePolicy(require_dp=False)
    model = build_model(cfg.study, None)
    parameters = get_arrays(model, exchanged_names(model, effective_trainable(cfg.study)))
    config = {**site_config(cfg, None), wire.ROUND_KEY: 1}

    # Execute
    loss, num_examples, evaluated = SiteClient(_site(tmp_path, "a", policy), "run-1").evaluate(parameters, config)
    delta, _, fitted = SiteClient(_site(tmp_path, "b", policy), "run-1").fit(
        parameters, {**config, wire.EVALUATE_INCOMING_KEY: True}
    )
    plain_delta, _, plain = SiteClient(_site(tmp_path, "c", policy), "run-1").fit(parameters, config)

    # Assert: the fit reply carries the evaluate reply, every figure under the incoming prefix
    carried = wire.split_incoming(fitted)
    assert carried is not None
    assert carried[0] == loss and carried[1] == num_examples > 0
    assert set(carried[2]) == set(evaluated)
    assert all(_same(carried[2][key], value) for key, value in evaluated.items()), (carried[2], evaluated)
    assert fitted[wire.INCOMING_PREFIX + wire.METRIC_ACCURACY] == evaluated[wire.METRIC_ACCURACY]
    # ... and the training is the same as without it; a plain fit carries no evaluation
    assert fitted[wire.METRIC_TRAIN_LOSS] == plain[wire.METRIC_TRAIN_LOSS]
    for a, b in zip(delta, plain_delta, strict=True):
        np.testing.assert_array_equal(a, b)
    assert wire.split_incoming(plain) is None and not any(k.startswith(wire.INCOMING_PREFIX) for k in plain)


def test_the_incoming_models_epsilon_is_read_before_the_round_is_charged(tmp_path: Path) -> None:
    # Prepare: DP on; round 1 then round 2 at the same site
    cfg = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=2, secure_aggregation=False)
    env = _site(tmp_path, "dp", SitePolicy())
    model = build_model(cfg.study, None)
    parameters = get_arrays(model, exchanged_names(model, effective_trainable(cfg.study)))
    client = SiteClient(env, "run-1")

    def ask(server_round: int) -> dict[str, Scalar]:
        config = {**site_config(cfg, None), wire.ROUND_KEY: server_round, wire.EVALUATE_INCOMING_KEY: True}
        return client.fit(parameters, config)[2]

    # Execute
    first, second = ask(1), ask(2)

    # Assert: the model received in round 2 is the one trained in round 1, at round 1's epsilon
    spent = wire.INCOMING_PREFIX + wire.METRIC_EPSILON
    assert first[spent] == 0.0
    assert second[spent] == pytest.approx(first[wire.METRIC_EPSILON])
    assert 0.0 < first[wire.METRIC_EPSILON] < second[wire.METRIC_EPSILON]

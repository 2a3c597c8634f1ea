"""A site reports clinical scores in evaluation: at 0.5 and at the operating point it picks itself.

Driven through the real :class:`client.numpy_client.SiteClient` on a real heart-disease site.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

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

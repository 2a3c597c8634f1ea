"""The run folder carries each site's clinical scores: metrics.csv/json columns and the model card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from server.metrics import CLINICAL_NAMES, METRIC_NAMES, SiteRoundMetrics
from server.report.result import FederationResult, write_run_folder
from server.report.runfolder import read_metrics_csv
from shared.config import RunConfig


def _row(site: str, n: int, base: float) -> SiteRoundMetrics:
    return SiteRoundMetrics(
        1, site, n, 0.5, 0.8, 0.85, sensitivity=base, specificity=base + 0.1, ppv=0.6, npv=0.7, f1=0.65,
        balanced_accuracy=base + 0.05, brier=0.2, ece=0.05, threshold=base - 0.4,
        sensitivity_at_op=0.95, specificity_at_op=base - 0.2,
    )  # fmt: skip


def _result() -> FederationResult:
    return FederationResult(
        config=RunConfig.of(setup="scratch", num_rounds=1, operating_point="sensitivity:0.95"),
        manifest=None,
        names=["head.weight"],
        parameters=[np.zeros((2, 3), np.float32)],
        rows=[_row("Hungary", 30, 0.7), _row("Switzerland", 10, 0.5)],
    )


def test_model_card_shows_each_sites_operating_point_next_to_the_half_figures(tmp_path: Path) -> None:
    # Prepare
    result = _result()

    # Execute
    write_run_folder(tmp_path / "run", result)

    # Assert
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    clinical = card["clinical"]
    assert clinical["operating_point_rule"] == "sensitivity:0.95"
    assert clinical["per_site"]["Switzerland"] == {
        "accuracy": 0.8, "auc": 0.85, "sensitivity": 0.5, "specificity": 0.6,
        "operating_point": {"threshold": 0.5 - 0.4, "sensitivity": 0.95, "specificity": 0.5 - 0.2},
    }  # fmt: skip
    assert card["metrics"]["final_per_site"]["Hungary"]["ece"] == 0.05


def test_metrics_files_carry_the_clinical_columns_and_read_back(tmp_path: Path) -> None:
    # Prepare
    result = _result()

    # Execute
    write_run_folder(tmp_path / "run", result)
    back = read_metrics_csv(tmp_path / "run" / "metrics.csv")

    # Assert: rows round-trip; the mean row averages sensitivity but not the sites' own thresholds
    assert back == result.rows
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[3:] == list(METRIC_NAMES) and set(CLINICAL_NAMES) <= set(header)
    document = json.loads((tmp_path / "run" / "metrics.json").read_text())
    mean = document["rounds"][0]["weighted_mean"]
    assert mean["sensitivity"] == (30 * 0.7 + 10 * 0.5) / 40
    assert mean["threshold"] is None
    assert document["rounds"][0]["sites"]["Hungary"]["specificity_at_op"] == 0.7 - 0.2


def test_a_metrics_csv_written_before_the_clinical_columns_still_reads(tmp_path: Path) -> None:
    # Prepare: the header and rows of an older run folder
    path = tmp_path / "metrics.csv"
    path.write_text(
        "round,site,num_examples,loss,accuracy,auc,epsilon,delta\n"
        "1,Hungary,30,0.5,0.8,0.85,,\n"
        "1,weighted-mean,30,0.5,0.8,0.85,,\n"
    )

    # Execute
    rows = read_metrics_csv(path)

    # Assert
    assert [(r.site, r.accuracy) for r in rows] == [("Hungary", 0.8)]
    assert all(math.isnan(getattr(rows[0], name)) for name in CLINICAL_NAMES)

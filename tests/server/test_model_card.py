"""The model card's Mitchell et al. (2019) sections: per-site figures with intervals from the counts behind the
rates the sites sent, the intended and out-of-scope uses, the privacy per site, and the PNG summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from server.metrics import SiteRoundMetrics
from server.report.card import CARD_KEY, SUMMARY_FILE, confusion_from_rates
from server.report.result import FederationResult, write_run_folder
from shared.config import RunConfig
from shared.scores import binary_metrics

MITCHELL_SECTIONS = (
    "model_details", "intended_use", "factors", "metrics", "evaluation_data", "training_data",
    "quantitative_analyses", "ethical_considerations", "caveats_and_recommendations",
)  # fmt: skip


def _site_row(site: str, seed: int, n: int, op: float) -> tuple[SiteRoundMetrics, dict[str, int], dict[str, int]]:
    """A site's final row as its client computes it (shared.scores on real vectors), with the true counts."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(np.int64)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    half, at_op = binary_metrics(y, p, threshold=0.5), binary_metrics(y, p, threshold=op)
    row = SiteRoundMetrics(
        round=3, site=site, num_examples=n, loss=0.5, accuracy=half.accuracy, auc=half.auc, epsilon=2.5, delta=1e-5,
        sensitivity=half.sensitivity, specificity=half.specificity, ppv=half.ppv, npv=half.npv, f1=half.f1,
        balanced_accuracy=half.balanced_accuracy, brier=half.brier, ece=half.ece, threshold=op,
        sensitivity_at_op=at_op.sensitivity, specificity_at_op=at_op.specificity,
    )  # fmt: skip
    counts = {"tn": half.tn, "fp": half.fp, "fn": half.fn, "tp": half.tp}
    return row, counts, {"tp": at_op.tp, "tn": at_op.tn}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[dict[str, int], dict[str, int]]]]:
    truth = {}
    rows = []
    for site, seed, n, op in (("Hungary", 1, 89, 0.42), ("Switzerland", 2, 16, 0.6), ("VA Long Beach", 3, 45, 0.35)):
        row, counts, op_counts = _site_row(site, seed, n, op)
        rows.append(row)
        truth[site] = (counts, op_counts)
    result = FederationResult(
        config=RunConfig.of(setup="scratch", num_rounds=3, dp=True),
        manifest=None,
        names=["head.weight"],
        parameters=[np.zeros((2, 3), np.float32)],
        rows=rows,
        dropped_rows={"Hungary": 33, "Switzerland": 77, "VA Long Beach": 70},
        class_balance={"Hungary": {"train": {"0": 110, "1": 62}, "val": {"0": 58, "1": 31}}},
    )
    folder = write_run_folder(tmp_path_factory.mktemp("runs") / "run", result)
    return folder, truth


def test_the_card_has_every_mitchell_section_and_says_what_it_is_not_for(run: tuple[Path, dict]) -> None:
    # Execute
    card = json.loads((run[0] / "model_card.json").read_text())
    sections = card[CARD_KEY]

    # Assert
    assert list(sections) == list(MITCHELL_SECTIONS)
    out_of_scope = " ".join(sections["intended_use"]["out_of_scope"]).lower()
    assert "not a medical device" in out_of_scope and "uci heart-disease" in out_of_scope
    assert "research" in sections["intended_use"]["primary_uses"]
    privacy = sections["ethical_considerations"]["privacy"]
    assert set(privacy["per_site"]) == {"Hungary", "Switzerland", "VA Long Beach"}
    assert sections["training_data"]["per_site"]["Switzerland"]["dropped_rows"] == 77


def test_each_site_has_its_true_counts_and_scipys_wilson_intervals(run: tuple[Path, dict]) -> None:
    # Prepare
    folder, truth = run
    analyses = json.loads((folder / "model_card.json").read_text())[CARD_KEY]["quantitative_analyses"]["per_site"]

    # Assert: counts recovered exactly from the rates; intervals as SciPy computes them from those counts
    for site, (counts, op_counts) in truth.items():
        analysis = analyses[site]
        assert analysis["at_0_5"]["confusion_matrix"] == counts
        positives = counts["tp"] + counts["fn"]
        assert analysis["positives"] == positives and analysis["records"] == sum(counts.values())
        expected = binomtest(counts["tp"], positives).proportion_ci(method="wilson")
        assert analysis["at_0_5"]["sensitivity"]["interval"] == pytest.approx([expected.low, expected.high])
        low, high = analysis["at_0_5"]["accuracy"]["interval"]
        assert low <= analysis["at_0_5"]["accuracy"]["value"] <= high
        op = analysis["at_operating_point"]["specificity"]
        negatives = counts["tn"] + counts["fp"]
        expected_op = binomtest(op_counts["tn"], negatives).proportion_ci(method="wilson")
        assert op["interval"] == pytest.approx([expected_op.low, expected_op.high])
        assert op["value"] == pytest.approx(op_counts["tn"] / negatives)


def test_the_summary_png_is_written_with_the_run_folder(run: tuple[Path, dict]) -> None:
    # Execute
    with Image.open(run[0] / SUMMARY_FILE) as image:
        # Assert
        assert image.format == "PNG" and image.width > 1000


def test_rates_that_no_class_split_gives_have_no_counts() -> None:
    # Assert: sensitivity 1/3 needs 3 positives, and then no accuracy of 0.3; a one-class site has NaN sensitivity
    assert confusion_from_rates(0, math.nan, math.nan, math.nan) is None
    assert confusion_from_rates(4, 0.75, math.nan, 0.75) == (3, 1, 0, 0)
    assert confusion_from_rates(5, 0.3, 1 / 3, 0.5) is None
    # Equal rates fit several splits (5 of 45 ... 40 of 45 positives); the PPV sent picks the one
    assert confusion_from_rates(45, 0.8, 0.8, 0.8) is None
    assert confusion_from_rates(45, 0.8, 0.8, 0.8, ppv=12 / 18) == (24, 6, 3, 12)


def test_training_data_shows_each_sites_own_counts_and_class_balance(
    run: tuple[Path, dict[str, tuple[dict[str, int], dict[str, int]]]],
) -> None:
    folder, _ = run
    training = json.loads((folder / "model_card.json").read_text())[CARD_KEY]["training_data"]["per_site"]
    assert training["Hungary"] == {"records": 172, "per_class": {"0": 110, "1": 62}, "dropped_rows": 33}
    assert training["Switzerland"] == {"records": None, "per_class": {}, "dropped_rows": 77}  # it sent no counts

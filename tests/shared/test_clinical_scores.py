"""Clinical scores of binary predictions: against scikit-learn, NaN when undefined, bootstrap, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from shared.scores import binary_metrics, bootstrap_interval, choose_threshold, parse_operating_point

LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
PROBS = np.array([0.1, 0.4, 0.35, 0.8, 0.55, 0.9, 0.05, 0.62, 0.48, 0.3, 0.71, 0.66, 0.2, 0.97, 0.5, 0.5])


def _noisy_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, size=n), 0, 1)
    return y, p


@pytest.mark.parametrize("threshold", [0.5, 0.35, 0.7])
def test_binary_metrics_equal_scikit_learn(threshold: float) -> None:
    # Prepare
    predicted = (PROBS >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(LABELS, predicted).ravel()

    # Execute
    m = binary_metrics(LABELS, PROBS, threshold=threshold)

    # Assert
    assert m.threshold == threshold
    assert (m.tn, m.fp, m.fn, m.tp) == (tn, fp, fn, tp)
    assert m.auc == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert m.accuracy == pytest.approx(np.mean(predicted == LABELS))
    assert m.sensitivity == pytest.approx(recall_score(LABELS, predicted))
    assert m.specificity == pytest.approx(recall_score(LABELS, predicted, pos_label=0))
    assert m.ppv == pytest.approx(precision_score(LABELS, predicted))
    assert m.npv == pytest.approx(precision_score(LABELS, predicted, pos_label=0))
    assert m.f1 == pytest.approx(f1_score(LABELS, predicted))
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(LABELS, predicted))
    assert m.brier == pytest.approx(brier_score_loss(LABELS, PROBS))


def test_ece_uses_ten_equal_width_bins_as_calibration_curve() -> None:
    # Prepare: calibration_curve's non-empty uniform bins, weighted by their counts
    prob_true, prob_pred = calibration_curve(LABELS, PROBS, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], PROBS), minlength=10)
    counts = counts[counts > 0]
    expected = float(np.sum(counts / len(LABELS) * np.abs(prob_true - prob_pred)))

    # Execute
    m = binary_metrics(LABELS, PROBS)

    # Assert
    assert m.ece == pytest.approx(expected)
    assert binary_metrics([0, 1], [0.0, 1.0]).ece == 0.0


def test_undefined_scores_are_nan_not_errors() -> None:
    # Prepare: one class only, and no positive prediction at all
    y, p = np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3])

    # Execute
    m = binary_metrics(y, p, threshold=0.5)
    empty = binary_metrics(np.array([], int), np.array([]))

    # Assert
    assert math.isnan(m.auc) and math.isnan(m.sensitivity) and math.isnan(m.ppv)
    assert math.isnan(m.f1)  # no positive label and no positive prediction: 0 / 0
    assert m.specificity == 1.0 and m.npv == 1.0 and m.accuracy == 1.0
    assert math.isnan(m.balanced_accuracy)
    assert all(math.isnan(getattr(empty, name)) for name in ("auc", "accuracy", "brier", "ece", "sensitivity"))


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_records() -> None:
    # Prepare
    small_y, small_p = _noisy_scores(60, seed=1)
    large_y, large_p = _noisy_scores(2000, seed=1)

    # Execute
    small = bootstrap_interval(small_y, small_p, "auc", n=300, seed=7)
    large = bootstrap_interval(large_y, large_p, "auc", n=300, seed=7)
    again = bootstrap_interval(small_y, small_p, "auc", n=300, seed=7)

    # Assert
    assert small[0] <= roc_auc_score(small_y, small_p) <= small[1]
    assert large[0] <= roc_auc_score(large_y, large_p) <= large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    assert again == small


def test_bootstrap_interval_takes_a_function_and_skips_one_class_resamples() -> None:
    # Prepare: 2 records, so many resamples hold one class (AUC NaN there)
    y, p = np.array([0, 1]), np.array([0.2, 0.9])

    # Execute
    low, high = bootstrap_interval(y, p, lambda a, b: float(roc_auc_score(a, b)) if len(set(a)) == 2 else math.nan)

    # Assert
    assert (low, high) == (1.0, 1.0)


def test_sensitivity_rule_reaches_its_target_on_the_data_it_was_chosen_on() -> None:
    # Prepare
    y, p = _noisy_scores(300, seed=3)

    # Execute
    threshold = choose_threshold(y, p, "sensitivity:0.95")

    # Assert: reaches 0.95, and the next higher candidate does not
    assert binary_metrics(y, p, threshold=threshold).sensitivity >= 0.95
    higher = np.unique(p[p > threshold])
    assert len(higher) == 0 or binary_metrics(y, p, threshold=float(higher[0])).sensitivity < 0.95


def test_youden_rule_maximises_tpr_minus_fpr_as_a_brute_force_search() -> None:
    # Prepare: J at every distinct score as the cut-off
    y, p = _noisy_scores(200, seed=5)

    def youden(t: float) -> float:
        m = binary_metrics(y, p, threshold=t)
        return m.sensitivity + m.specificity - 1

    best = max(youden(float(t)) for t in np.unique(p))

    # Execute
    threshold = choose_threshold(y, p, "youden")

    # Assert
    assert youden(threshold) == pytest.approx(best)


def test_fixed_threshold_returns_itself_and_one_class_makes_data_rules_nan() -> None:
    # Prepare / Execute / Assert
    assert choose_threshold(LABELS, PROBS, "0.5") == 0.5
    assert choose_threshold(LABELS, PROBS, "0.3") == 0.3
    assert math.isnan(choose_threshold(np.zeros(4, int), np.linspace(0, 1, 4), "youden"))
    assert math.isnan(choose_threshold(np.ones(4, int), np.linspace(0, 1, 4), "sensitivity:0.9"))


@pytest.mark.parametrize("rule", ["sensitivity:1", "sensitivity:0", "sensitivity:x", "1.5", "-0.1", "youdn", ""])
def test_bad_operating_point_rule_is_refused(rule: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="youden"):
        parse_operating_point(rule)

"""Bootstrap and Wilson intervals of shared.scores: SciPy's own numbers, around the estimate, narrower with more data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import roc_auc_score

from shared.scores import (
    INTERVAL_METRICS,
    binary_metrics,
    bootstrap_interval,
    bootstrap_intervals,
    difference_interval,
    wilson_interval,
)


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)
    return y, p


def test_auc_interval_is_scipys_stratified_percentile_bootstrap() -> None:
    # Prepare: an independent call of scipy.stats.bootstrap on the two classes
    y, p = _scores(150, seed=3)
    negatives, positives = p[y == 0], p[y == 1]

    def auc(neg: np.ndarray, pos: np.ndarray) -> float:
        return roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])

    reference = bootstrap((negatives, positives), auc, n_resamples=200, vectorized=False, method="percentile",
                          rng=np.random.default_rng(11)).confidence_interval  # fmt: skip

    # Execute
    low, high = bootstrap_interval(y, p, "auc", n=200, seed=11)

    # Assert
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-12)


def test_every_interval_contains_its_estimate_and_shrinks_with_more_records() -> None:
    # Prepare
    small_y, small_p = _scores(80, seed=1)
    large_y, large_p = _scores(3000, seed=1)

    # Execute
    small = bootstrap_intervals(small_y, small_p, threshold=0.5, n=200, seed=2)
    large = bootstrap_intervals(large_y, large_p, threshold=0.5, n=200, seed=2)

    # Assert
    assert set(small) == set(INTERVAL_METRICS)
    for y, p, intervals in ((small_y, small_p, small), (large_y, large_p, large)):
        estimate = binary_metrics(y, p, threshold=0.5)
        for name, (low, high) in intervals.items():
            assert low <= getattr(estimate, name) <= high, name
    for name in INTERVAL_METRICS:
        assert large[name][1] - large[name][0] < (small[name][1] - small[name][0]) / 2, name


def test_the_same_seed_gives_the_same_intervals_and_each_resample_holds_both_classes() -> None:
    # Prepare: 3 positives among 60; an unstratified resample would often hold none
    y = np.r_[np.ones(3, np.int64), np.zeros(57, np.int64)]
    p = np.linspace(0.05, 0.95, 60)[::-1]

    # Execute
    first = bootstrap_intervals(y, p, threshold=0.5, n=100, seed=5)
    again = bootstrap_intervals(y, p, threshold=0.5, n=100, seed=5)

    # Assert: sensitivity defined in every resample, AUC of a perfect ranking stays 1
    assert first == again
    assert first["auc"] == (1.0, 1.0)
    assert all(math.isfinite(v) for v in first["sensitivity"])


def test_no_records_give_nan_intervals() -> None:
    # Execute
    intervals = bootstrap_intervals(np.zeros(0, np.int64), np.zeros(0), n=10)

    # Assert
    assert all(math.isnan(low) and math.isnan(high) for low, high in intervals.values())


@pytest.mark.parametrize(("successes", "trials"), [(0, 10), (7, 10), (93, 120), (120, 120)])
def test_wilson_interval_is_scipys(successes: int, trials: int) -> None:
    # Prepare
    reference = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")

    # Execute
    low, high = wilson_interval(successes, trials)

    # Assert
    assert (low, high) == pytest.approx((reference.low, reference.high))
    assert low <= successes / trials <= high
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize(
    ("counts", "expected"),
    [  # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 10 (hybrid score)
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
        ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ],
)
def test_difference_interval_is_newcombes_hybrid_score(
    counts: tuple[int, int, int, int], expected: tuple[float, float]
) -> None:
    difference, low, high = difference_interval(*counts)
    assert difference == pytest.approx(counts[0] / counts[1] - counts[2] / counts[3])
    assert (low, high) == pytest.approx(expected, abs=5e-5)

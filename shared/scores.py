"""Scores of a model's predictions on labelled data (computed at the site, on its own records)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray
) -> tuple[float, float, float]:
    """Compute loss, accuracy and ROC AUC from class probabilities.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape ``(n,)``.
    probabilities : np.ndarray
        Class probabilities, shape ``(n, num_classes)``.

    Returns
    -------
    tuple[float, float, float]
        Mean cross-entropy, accuracy, and ROC AUC of class 1 (NaN unless exactly two classes
        are present in ``labels``).
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    auc = math.nan
    if probs.shape[1] == 2 and len(np.unique(labels)) == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    return loss, accuracy, auc


ECE_BINS = 10
"""Expected calibration error uses this many equal-width bins of ``[0, 1]``."""


@dataclass(frozen=True)
class BinaryMetrics:
    """Clinical scores of positive-class probabilities at one decision threshold.

    A record is predicted positive when its probability is ``>= threshold`` (the convention of
    scikit-learn's ``roc_curve``). Every value that is undefined on the data (AUC with one
    class, PPV with no positive prediction, ...) is NaN.

    Attributes
    ----------
    threshold : float
        The cut-off the thresholded scores use.
    auc : float
        ROC AUC (threshold-free).
    accuracy, sensitivity, specificity, ppv, npv, f1, balanced_accuracy : float
        Scores of the thresholded predictions; sensitivity is recall, PPV is precision.
    brier : float
        Mean squared error of the probabilities (threshold-free).
    ece : float
        Expected calibration error over :data:`ECE_BINS` equal-width bins (threshold-free).
    tn, fp, fn, tp : int
        The confusion matrix.
    """

    threshold: float
    auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    balanced_accuracy: float
    brier: float
    ece: float
    tn: int
    fp: int
    fn: int
    tp: int


def _ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, NaN when the denominator is 0."""
    return numerator / denominator if denominator else math.nan


def _binary_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert 0/1 labels and positive-class probabilities of the same length."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities must have the same length, got {len(y)} and {len(p)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels of a binary task must be 0 or 1")
    return y, p


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / n) |mean label_b - mean prob_b|``.

    The bins split ``[0, 1]`` into ``bins`` equal widths (scikit-learn's ``calibration_curve``
    with ``strategy="uniform"``); empty bins count nothing. NaN on no data.
    """
    y, p = _binary_inputs(labels, probs)
    if len(y) == 0:
        return math.nan
    which = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.sum() * abs(float(y[members].mean()) - float(p[members].mean()))
    return total / len(y)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5) -> BinaryMetrics:
    """Compute :class:`BinaryMetrics` of positive-class probabilities at ``threshold``.

    Parameters
    ----------
    labels : np.ndarray
        0/1 labels, shape ``(n,)``.
    probs : np.ndarray
        Probability of class 1, shape ``(n,)``.
    threshold : float
        Predict positive when ``probs >= threshold``; NaN makes every thresholded score NaN.

    Returns
    -------
    BinaryMetrics
        The scores; undefined ones are NaN (never an exception).
    """
    from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

    y, p = _binary_inputs(labels, probs)
    both = len(np.unique(y)) == 2
    auc = float(roc_auc_score(y, p)) if both else math.nan
    brier = float(brier_score_loss(y, p, pos_label=1)) if len(y) else math.nan
    ece = expected_calibration_error(y, p)
    if math.isnan(threshold) or len(y) == 0:
        nan = math.nan
        return BinaryMetrics(threshold, auc, nan, nan, nan, nan, nan, nan, nan, brier, ece, 0, 0, 0, 0)
    predicted = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv = _ratio(tp, tp + fp)
    return BinaryMetrics(
        threshold=float(threshold),
        auc=auc,
        accuracy=_ratio(tp + tn, len(y)),
        sensitivity=sensitivity,
        specificity=specificity,
        ppv=ppv,
        npv=_ratio(tn, tn + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        balanced_accuracy=(sensitivity + specificity) / 2 if both else math.nan,
        brier=brier,
        ece=ece,
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )


Metric = Callable[[np.ndarray, np.ndarray], float]


def bootstrap_interval(
    labels: np.ndarray,
    probs: np.ndarray,
    metric: str | Metric,
    n: int = 1000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of ``metric`` over the records.

    One metric of :func:`bootstrap_statistics`; see there for the resampling.

    Parameters
    ----------
    labels, probs : np.ndarray
        0/1 labels and positive-class probabilities, shape ``(n_records,)``.
    metric : str | Callable[[np.ndarray, np.ndarray], float]
        A field of :class:`BinaryMetrics` (at threshold 0.5), or a function of (labels, probs).
    n : int
        Number of bootstrap resamples.
    seed : int
        Seed of the resampling.
    confidence : float
        Coverage of the interval.

    Returns
    -------
    tuple[float, float]
        Lower and upper bound; NaNs when no resample gives a finite value.
    """
    score = _metric_function(metric)
    low, high = bootstrap_statistics(
        labels, probs, lambda y, p: np.array([score(y, p)]), n=n, seed=seed, confidence=confidence
    )
    return float(low[0]), float(high[0])


INTERVAL_METRICS: tuple[str, ...] = (
    "auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "brier", "ece",
)  # fmt: skip
"""The fields of :class:`BinaryMetrics` that :func:`bootstrap_intervals` gives an interval for."""


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    threshold: float = 0.5,
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of every score of :data:`INTERVAL_METRICS` at ``threshold``, in one pass.

    The same resamples serve every metric (:func:`bootstrap_statistics`), so the intervals of
    one report come from one bootstrap distribution.

    Parameters
    ----------
    labels, probs : np.ndarray
        0/1 labels and positive-class probabilities.
    threshold : float
        Decision threshold of the thresholded scores (fixed: not re-chosen per resample).
    n, seed, confidence
        As for :func:`bootstrap_interval`.

    Returns
    -------
    dict[str, tuple[float, float]]
        Metric name -> (low, high); NaNs where undefined.
    """

    def scores(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        values = binary_metrics(y, p, threshold=threshold)
        return np.array([getattr(values, name) for name in INTERVAL_METRICS], dtype=np.float64)

    low, high = bootstrap_statistics(labels, probs, scores, n=n, seed=seed, confidence=confidence)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(INTERVAL_METRICS, low, high, strict=True)}


def bootstrap_statistics(
    labels: np.ndarray,
    probs: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified percentile bootstrap of a vector ``statistic`` of (labels, probs).

    ``scipy.stats.bootstrap`` resamples the positive and the negative records independently,
    each with replacement and at its own size (a stratified bootstrap, as pROC's for AUC), so
    every resample holds both classes in the data's proportions and AUC, sensitivity and
    specificity are defined in each. A class with a single record is the same in every
    resample (SciPy needs two records to resample a sample) and is held fixed. Resamples where
    a value is still undefined (PPV with no positive prediction) are left out of that value's
    percentiles; with every value finite, the bounds are SciPy's ``method="percentile"``
    interval.

    Parameters
    ----------
    labels, probs : np.ndarray
        0/1 labels and positive-class probabilities, shape ``(n_records,)``.
    statistic : Callable[[np.ndarray, np.ndarray], np.ndarray]
        Function of (labels, probs) returning a 1-d array of values.
    n : int
        Number of bootstrap resamples.
    seed : int
        Seed of the resampling.
    confidence : float
        Coverage of the interval.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Lower and upper bounds, one per value; NaN where no resample gives a finite value (and
        everywhere when there are no records).
    """
    from scipy.stats import bootstrap

    if n < 1:
        raise ValueError(f"`n` must be at least 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    y, p = _binary_inputs(labels, probs)
    if len(y) == 0:
        width = len(np.atleast_1d(statistic(y, p)))
        return np.full(width, math.nan), np.full(width, math.nan)
    strata = [p[y == 0], p[y == 1]]
    varying = [c for c, part in enumerate(strata) if len(part) >= 2]

    def resampled(*samples: np.ndarray) -> np.ndarray:
        parts = list(strata)
        for c, sample in zip(varying, samples, strict=True):
            parts[c] = sample
        resampled_labels = np.concatenate([np.full(len(part), c, dtype=np.int64) for c, part in enumerate(parts)])
        return np.atleast_1d(np.asarray(statistic(resampled_labels, np.concatenate(parts)), dtype=np.float64))

    if not varying:  # one record per class: every resample is the data itself
        values = resampled()
        return values.copy(), values.copy()
    result = bootstrap(
        [strata[c] for c in varying], resampled, n_resamples=n, vectorized=False, paired=False,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    distribution = np.atleast_2d(result.bootstrap_distribution)
    low, high = np.full(len(distribution), math.nan), np.full(len(distribution), math.nan)
    for i, values in enumerate(distribution):
        finite = values[np.isfinite(values)]
        if len(finite):
            low[i], high[i] = np.percentile(finite, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return low, high


def wilson_interval(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / trials`` (SciPy's ``binomtest``).

    Returns
    -------
    tuple[float, float]
        Lower and upper bound; NaNs when ``trials`` is 0.
    """
    from scipy.stats import binomtest

    if trials <= 0:
        return math.nan, math.nan
    interval = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def difference_interval(
    successes_a: int, trials_a: int, successes_b: int, trials_b: int, *, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Difference of two proportions ``a - b`` with Newcombe's hybrid score interval (his method 10).

    Built on each proportion's Wilson interval (:func:`wilson_interval`); it treats the two
    samples as independent, which is conservative when both are scored on the same records.

    Returns
    -------
    tuple[float, float, float]
        The difference, its lower and its upper bound; NaNs when a sample is empty.
    """
    if trials_a <= 0 or trials_b <= 0:
        return math.nan, math.nan, math.nan
    pa, pb = successes_a / trials_a, successes_b / trials_b
    la, ua = wilson_interval(successes_a, trials_a, confidence=confidence)
    lb, ub = wilson_interval(successes_b, trials_b, confidence=confidence)
    difference = pa - pb
    return difference, difference - math.hypot(pa - la, ub - pb), difference + math.hypot(ua - pa, pb - lb)


def _metric_function(metric: str | Metric) -> Metric:
    """The function of (labels, probs) that ``metric`` names."""
    if callable(metric):
        return metric
    if metric not in BinaryMetrics.__dataclass_fields__:
        raise ValueError(f"`metric` must be one of {', '.join(BinaryMetrics.__dataclass_fields__)}, got {metric!r}")
    return lambda y, p: float(getattr(binary_metrics(y, p), metric))


YOUDEN = "youden"
SENSITIVITY_PREFIX = "sensitivity:"


def parse_operating_point(rule: str) -> tuple[str, float]:
    """Split an operating-point rule into its kind and value.

    Parameters
    ----------
    rule : str
        ``"youden"``, ``"sensitivity:S"`` with S in (0, 1), or a fixed threshold in [0, 1]
        such as ``"0.5"``.

    Returns
    -------
    tuple[str, float]
        ``("youden", nan)``, ``("sensitivity", S)`` or ``("fixed", t)``.

    Raises
    ------
    ValueError
        If ``rule`` is none of these.
    """
    text = str(rule).strip()
    expected = 'must be "youden", "sensitivity:S" with S in (0, 1), or a fixed threshold in [0, 1] like "0.5"'
    if text == YOUDEN:
        return YOUDEN, math.nan
    kind, raw = ("sensitivity", text[len(SENSITIVITY_PREFIX):]) if text.startswith(SENSITIVITY_PREFIX) else ("fixed", text)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(expected) from None
    inside = 0 < value < 1 if kind == "sensitivity" else 0 <= value <= 1
    if not inside:
        raise ValueError(expected)
    return kind, value


def choose_threshold(labels: np.ndarray, probs: np.ndarray, rule: str) -> float:
    """The decision threshold that ``rule`` picks on ``(labels, probs)``.

    Candidates are scikit-learn's ``roc_curve`` thresholds (positive when ``probs >= t``).
    ``youden`` maximises ``tpr - fpr`` (the highest such threshold on a tie);
    ``sensitivity:S`` takes the highest threshold whose sensitivity is at least S; a fixed
    threshold is returned as it is, whatever the data.

    Returns
    -------
    float
        The threshold; NaN for a data-driven rule when ``labels`` hold fewer than two classes.
    """
    from sklearn.metrics import roc_curve

    kind, value = parse_operating_point(rule)
    if kind == "fixed":
        return value
    y, p = _binary_inputs(labels, probs)
    if len(np.unique(y)) < 2:
        return math.nan
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if kind == YOUDEN:
        return float(thresholds[int(np.argmax(tpr - fpr))])
    return float(thresholds[int(np.argmax(tpr >= value))])

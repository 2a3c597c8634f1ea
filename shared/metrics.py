"""Evaluation metrics of one site in one round, and their example-weighted mean."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("loss", "accuracy", "auc", "epsilon", "delta")


@dataclass(frozen=True)
class SiteRoundMetrics:
    """Evaluation of the global model on one site's held-out part after one round.

    Attributes
    ----------
    round : int
        Federated round (1-based); 0 is the model before any training.
    site : str
        Site (hospital) name.
    num_examples : int
        Number of held-out examples the metrics were computed on.
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct predictions.
    auc : float
        ROC AUC of the positive class (binary tasks); NaN when undefined.
    epsilon : float
        Privacy this site's data has spent in the run so far (NaN without DP).
    delta : float
        Delta of that guarantee (NaN without DP).
    """

    round: int
    site: str
    num_examples: int
    loss: float
    accuracy: float
    auc: float
    epsilon: float = math.nan
    delta: float = math.nan

    def as_row(self) -> dict[str, float | int | str]:
        """Return the metrics as a flat dict (one CSV row)."""
        return asdict(self)


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


def weighted_mean(rows: Sequence[SiteRoundMetrics], name: str) -> float:
    """Return the example-weighted mean of metric ``name`` over ``rows``, ignoring NaNs.

    Parameters
    ----------
    rows : Sequence[SiteRoundMetrics]
        Metrics of several sites (usually one round).
    name : str
        One of :data:`METRIC_NAMES`.

    Returns
    -------
    float
        The weighted mean, or NaN when no row has a finite value.
    """
    values = [(r.num_examples, float(getattr(r, name))) for r in rows]
    finite = [(n, v) for n, v in values if math.isfinite(v)]
    total = sum(n for n, _ in finite)
    if total == 0:
        return math.nan
    return sum(n * v for n, v in finite) / total


def rounds_of(rows: Iterable[SiteRoundMetrics]) -> list[int]:
    """Return the sorted distinct rounds present in ``rows``."""
    return sorted({r.round for r in rows})

"""Evaluation metrics of one site in one round, and their example-weighted mean."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

CLINICAL_NAMES: tuple[str, ...] = (
    "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "brier", "ece",
    "threshold", "sensitivity_at_op", "specificity_at_op",
)  # fmt: skip
"""The clinical fields of :class:`SiteRoundMetrics` (binary tasks), in wire order."""
METRIC_NAMES: tuple[str, ...] = ("loss", "accuracy", "auc", "epsilon", "delta", *CLINICAL_NAMES)
SITE_ONLY_NAMES: tuple[str, ...] = ("threshold",)
"""Metrics that have no meaningful mean over sites (each site's own operating point)."""


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
    sensitivity, specificity, ppv, npv, f1, balanced_accuracy : float
        Binary tasks: scores at the 0.5 cut-off (positive when p >= 0.5); NaN when undefined.
    brier, ece : float
        Brier score and expected calibration error (10 equal-width bins) of the probabilities.
    threshold : float
        The site's operating point, chosen by the study's ``operating-point`` rule on its own
        validation data.
    sensitivity_at_op, specificity_at_op : float
        Sensitivity and specificity at that operating point.

    Every field after ``auc`` defaults to NaN, so rows written before a field existed still load.
    """

    round: int
    site: str
    num_examples: int
    loss: float
    accuracy: float
    auc: float
    epsilon: float = math.nan
    delta: float = math.nan
    sensitivity: float = math.nan
    specificity: float = math.nan
    ppv: float = math.nan
    npv: float = math.nan
    f1: float = math.nan
    balanced_accuracy: float = math.nan
    brier: float = math.nan
    ece: float = math.nan
    threshold: float = math.nan
    sensitivity_at_op: float = math.nan
    specificity_at_op: float = math.nan

    def as_row(self) -> dict[str, float | int | str]:
        """Return the metrics as a flat dict (one CSV row)."""
        return asdict(self)


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

"""Evaluation metrics of one site in one round, and their example-weighted mean."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

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

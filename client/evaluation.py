"""``carefl evaluate``: a trained model's scores on a site's labelled data, with bootstrap intervals.

Everything is computed at the site, on its own records, and written to a report folder
(``report.json``, ``report.csv``, ``roc.png``, ``reliability.png``) that appears complete or not at
all. The scores come from :mod:`shared.scores` (scikit-learn's metrics, SciPy's bootstrap);
the curves from scikit-learn's ``roc_curve`` and ``calibration_curve``.

The model is scored at its stored threshold (the site's operating point in ``site.json``, 0.5
for a server run folder) and, when an operating-point rule is given, at the threshold that rule
picks on these same records (optimistic for a data-driven rule: it is chosen and scored on the
same data). That re-chosen threshold can be stored into ``site.json`` (:func:`store_threshold`),
e.g. when the site's class priors changed since training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic import atomic_write_text, fsync_path
from shared.errors import InputError
from shared.log import log
from shared.scores import (
    ECE_BINS,
    INTERVAL_METRICS,
    BinaryMetrics,
    binary_metrics,
    bootstrap_intervals,
    choose_threshold,
)

REPORT_FILES: tuple[str, ...] = ("report.json", "report.csv", "roc.png", "reliability.png")
"""What a report folder holds."""
CSV_COLUMNS: tuple[str, ...] = ("operating_point", "rule", "threshold", "metric", "value", "ci_low", "ci_high")
"""Header of ``report.csv``: one row per operating point and metric (confusion counts without interval)."""
COUNT_FIELDS: tuple[str, ...] = ("tn", "fp", "fn", "tp")
STORED, RECHOSEN = "stored", "re-chosen"
DPI = 120


@dataclass(frozen=True)
class OperatingPoint:
    """Scores at one decision threshold.

    Attributes
    ----------
    name : str
        ``"stored"`` (the model's threshold) or ``"re-chosen"`` (picked by ``rule`` on these records).
    rule : str
        The operating-point rule the threshold comes from.
    threshold : float
        Positive when probability ``>= threshold`` (NaN when the rule is undefined on the data).
    metrics : BinaryMetrics
        Point estimates, confusion matrix included.
    intervals : dict[str, tuple[float, float]]
        Bootstrap interval per metric of :data:`shared.scores.INTERVAL_METRICS`.
    """

    name: str
    rule: str
    threshold: float
    metrics: BinaryMetrics
    intervals: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Evaluation:
    """A model's evaluation on one labelled data set.

    Attributes
    ----------
    points : list[OperatingPoint]
        The stored operating point, then the re-chosen one if asked for.
    labels, probs : np.ndarray
        The records' labels and positive-class probabilities (kept at the site).
    confidence : float
        Coverage of the intervals.
    resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the bootstrap.
    context : dict[str, Any]
        What was evaluated (model folder, data, task, site, records read and refused).
    """

    points: list[OperatingPoint]
    labels: np.ndarray
    probs: np.ndarray
    confidence: float = 0.95
    resamples: int = 1000
    seed: int = 0
    context: dict[str, Any] = field(default_factory=dict)

    def point(self, name: str) -> OperatingPoint | None:
        """The operating point called ``name``, or ``None``."""
        return next((p for p in self.points if p.name == name), None)


def evaluate_probabilities(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    threshold: float,
    rule: str,
    rechoose: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    context: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Score positive-class probabilities at the stored threshold and, optionally, a re-chosen one.

    Parameters
    ----------
    labels, probs : np.ndarray
        0/1 labels and positive-class probabilities.
    threshold, rule : float, str
        The model's stored threshold and the rule it came from.
    rechoose : str, optional
        An operating-point rule (:func:`shared.scores.parse_operating_point`) to pick a new
        threshold by on these records.
    resamples, seed, confidence
        Bootstrap settings (:func:`shared.scores.bootstrap_intervals`).
    context : Mapping[str, Any], optional
        What was evaluated, copied into the report.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    choices = [(STORED, rule, float(threshold))]
    if rechoose is not None:
        choices.append((RECHOSEN, rechoose, choose_threshold(y, p, rechoose)))
    points = [
        OperatingPoint(
            name, chosen_rule, cut, binary_metrics(y, p, threshold=cut),
            bootstrap_intervals(y, p, threshold=cut, n=resamples, seed=seed, confidence=confidence),
        )  # fmt: skip
        for name, chosen_rule, cut in choices
    ]
    return Evaluation(points, y, p, confidence, resamples, seed, dict(context or {}))


def report_json(evaluation: Evaluation) -> dict[str, Any]:
    """The report as JSON-ready values (NaN as ``None``)."""
    y = evaluation.labels
    document = {
        **evaluation.context,
        "records": int(len(y)),
        "positives": int(y.sum()),
        "negatives": int(len(y) - y.sum()),
        "positive_when": "probability of class 1 >= threshold",
        "intervals": {
            "method": "stratified percentile bootstrap (scipy.stats.bootstrap; positives and negatives resampled "
            "separately), threshold held fixed",
            "confidence": evaluation.confidence,
            "resamples": evaluation.resamples,
            "seed": evaluation.seed,
        },
        "ece_bins": ECE_BINS,
        "operating_points": {
            point.name: {
                "rule": point.rule,
                "threshold": point.threshold,
                "metrics": {name: getattr(point.metrics, name) for name in INTERVAL_METRICS},
                "intervals": {name: list(bounds) for name, bounds in point.intervals.items()},
                "confusion_matrix": {name: getattr(point.metrics, name) for name in COUNT_FIELDS},
            }
            for point in evaluation.points
        },
    }
    if evaluation.point(RECHOSEN) is not None:
        document["note"] = "the re-chosen threshold is picked and scored on these same records (optimistic)"
    return _json_ready(document)


def report_csv(evaluation: Evaluation) -> str:
    """The report as CSV text, one row per operating point and metric (:data:`CSV_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for point in evaluation.points:
        for name in INTERVAL_METRICS:
            low, high = point.intervals[name]
            writer.writerow([point.name, point.rule, _cell(point.threshold), name, _cell(getattr(point.metrics, name)), _cell(low), _cell(high)])
        for name in COUNT_FIELDS:
            writer.writerow([point.name, point.rule, _cell(point.threshold), name, getattr(point.metrics, name), "", ""])
    return buffer.getvalue()


def _cell(value: float) -> str:
    return "" if value is None or not math.isfinite(float(value)) else repr(float(value))


def roc_png(evaluation: Evaluation, *, title: str = "") -> bytes:
    """The ROC curve (scikit-learn's ``roc_curve``) with each operating point marked, as PNG bytes."""
    from sklearn.metrics import roc_curve

    figure, ax = _figure()
    y, p = evaluation.labels, evaluation.probs
    stored = evaluation.points[0]
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        low, high = stored.intervals["auc"]
        label = f"ROC (AUC {stored.metrics.auc:.3f}, {evaluation.confidence:.0%} CI {low:.3f}-{high:.3f})"
        ax.plot(fpr, tpr, linewidth=2.0, label=label)
    ax.plot([0, 1], [0, 1], linestyle=":", color="tab:gray", label="chance")
    for point, marker in zip(evaluation.points, ("o", "s"), strict=False):
        m = point.metrics
        if math.isfinite(m.sensitivity) and math.isfinite(m.specificity):
            ax.plot(1 - m.specificity, m.sensitivity, marker=marker, markersize=9, linestyle="none",
                    label=f"{point.name} threshold {point.threshold:.3g} ({point.rule}): sens {m.sensitivity:.2f}, spec {m.specificity:.2f}")  # fmt: skip
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(title or f"ROC on {len(y)} records")
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def reliability_png(evaluation: Evaluation, *, title: str = "") -> bytes:
    """The reliability diagram (scikit-learn's ``calibration_curve``, :data:`ECE_BINS` uniform bins) as PNG bytes."""
    from sklearn.calibration import calibration_curve

    figure, ax = _figure()
    y, p = evaluation.labels, evaluation.probs
    stored = evaluation.points[0].metrics
    ax.plot([0, 1], [0, 1], linestyle=":", color="tab:gray", label="perfect calibration")
    if len(y):
        observed, predicted = calibration_curve(y, p, n_bins=ECE_BINS, strategy="uniform")
        ax.plot(predicted, observed, marker="o", linewidth=2.0, label=f"model (Brier {stored.brier:.3f}, ECE {stored.ece:.3f})")
        counts, edges = np.histogram(p, bins=ECE_BINS, range=(0.0, 1.0))
        share = ax.twinx()
        share.bar(edges[:-1], counts, width=1.0 / ECE_BINS, align="edge", alpha=0.15, color="tab:blue")
        share.set_ylabel("records per bin")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction of positives")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or f"Reliability on {len(y)} records")
    ax.legend(loc="upper left", fontsize="small")
    return _png(figure)


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 5.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.grid(True, alpha=0.3)
    return figure, ax


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def report_files(evaluation: Evaluation) -> dict[str, bytes]:
    """Every file of the report folder (:data:`REPORT_FILES`), rendered in memory."""
    return {
        "report.json": (json.dumps(report_json(evaluation), indent=2, allow_nan=False) + "\n").encode("utf-8"),
        "report.csv": report_csv(evaluation).encode("utf-8"),
        "roc.png": roc_png(evaluation),
        "reliability.png": reliability_png(evaluation),
    }


def refuse_occupied(folder: Path, *, flag: str) -> None:
    """Refuse an output folder that exists and is not empty (checked before any work).

    Raises
    ------
    InputError
        Naming the folder and ``flag``.
    """
    from shared.atomic import require_writable_dir

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder} already exists and is not an empty folder; choose another {flag}.")
    require_writable_dir(folder.parent, what="output folder", hint=f"choose another {flag}")


def publish_folder(folder: Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (relative name -> bytes) as the folder ``folder``, completely or not at all.

    They go to a hidden staging folder beside it, are fsync'd, and the staging folder is
    renamed onto ``folder`` (which must be missing or empty); any failure removes it.

    Raises
    ------
    InputError
        If ``folder`` exists and is not empty.
    """
    folder = Path(folder)
    refuse_occupied(folder, flag="output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.staging-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for name, data in files.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{name!r} leaves the output folder")
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            fsync_path(target)
        fsync_path(staging)
        if folder.is_dir():
            folder.rmdir()  # empty, checked above
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(folder.parent)
    log(INFO, "wrote %s (%d files)", folder, len(files))
    return folder


def write_report(evaluation: Evaluation, folder: Path) -> Path:
    """Render the report and publish it as ``folder`` (:func:`publish_folder`)."""
    return publish_folder(folder, report_files(evaluation))


def store_threshold(model_dir: Path, point: OperatingPoint, *, data: str, now: datetime | None = None) -> Path:
    """Make ``point`` the site's operating point in ``model_dir/site.json`` (written atomically).

    The previous operating point is kept in ``previous_operating_points`` (newest last), so
    what the site applied before stays on record.

    Raises
    ------
    InputError
        If the folder has no ``site.json`` (a server run folder), or the threshold is undefined.
    """
    from client.models import SITE_FILE

    path = Path(model_dir) / SITE_FILE
    if not path.is_file():
        raise InputError(f"{model_dir} has no {SITE_FILE} (a server run folder): a threshold is stored in a site's copy only.")
    if not math.isfinite(point.threshold):
        raise InputError(f"rule {point.rule} picks no threshold on {data} (one class only): nothing stored.")
    site = json.loads(path.read_text(encoding="utf-8"))
    previous = site.get("operating_point")
    site.setdefault("previous_operating_points", []).append(previous)
    created = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    site["operating_point"] = {
        "rule": point.rule,
        "threshold": point.threshold,
        "sensitivity": point.metrics.sensitivity,
        "specificity": point.metrics.specificity,
        "chosen_on": {"data": str(data), "records": point.metrics.tn + point.metrics.fp + point.metrics.fn + point.metrics.tp, "utc": created},
    }
    atomic_write_text(path, json.dumps(_json_ready(site), indent=2, allow_nan=False) + "\n")
    log(INFO, "stored threshold %.4g (%s) in %s", point.threshold, point.rule, path)
    return path


def _json_ready(obj: Any) -> Any:
    """Plain JSON values: NaN and infinities as ``None``, numpy values as Python ones."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, BinaryMetrics):
        return _json_ready(asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj

"""The model card's sections as Mitchell et al. (2019), "Model Cards for Model Reporting", lay them out.

Model details, intended use (and out-of-scope uses), factors, metrics, evaluation data, training
data, quantitative analyses (per site, with intervals, at 0.5 and at each site's operating point),
ethical considerations (the privacy guarantee per site) and caveats, plus a one-page PNG summary.

The server holds what the sites sent: per site, the rates and the number of held-out records,
never a score or a label. The confusion counts behind a site's rates are recovered exactly from
them (:func:`confusion_from_rates`: the one class split consistent with its accuracy, sensitivity
and specificity), and the proportions get Wilson intervals (SciPy). An AUC interval needs the
scores: a site computes it with ``carefl evaluate`` (stratified bootstrap), and ROC curves are
drawn there too; the summary PNG shows each site's operating points in ROC space instead.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import atomic_write_bytes
from shared.scores import wilson_interval

if TYPE_CHECKING:
    from server.metrics import SiteRoundMetrics
    from server.report.result import FederationResult

CARD_KEY = "model_card_sections"
"""The model card key holding the sections."""
SUMMARY_FILE = "model_card.png"
_TOLERANCE = 1e-9

OUT_OF_SCOPE: tuple[str, ...] = (
    "Not a medical device: not for the diagnosis, triage or treatment of any patient.",
    "Not validated prospectively, nor on hospitals, devices or populations outside the federation.",
    "Not to be applied at a site before that site has checked it on its own labelled data (carefl evaluate) "
    "and chosen its threshold there.",
)
TASK_SCOPE: dict[str, str] = {
    "chest-xray": "Pediatric frontal chest radiographs at low resolution (PneumoniaMNIST-like), pneumonia vs. "
    "normal; not adult, lateral or other views, and not other findings.",
    "heart-disease": "Adults referred for angiography in the UCI heart-disease hospitals (1980s); 13 routine "
    "features; not a screening population.",
}
LIMITATIONS: tuple[str, ...] = (
    "Each site's operating point is chosen and measured on the same validation records (optimistic for a "
    "data-driven rule).",
    "Small sites have wide intervals; the weighted mean hides how much sites differ.",
    "Evaluation uses each site's own held-out split: there is no external test set.",
    "Differential privacy adds noise to training and costs accuracy; the guarantee covers the training "
    "records, not the evaluation figures sent.",
    "No demographic or device subgroup is recorded, so no subgroup analysis is possible.",
    "When a site's class balance changes, re-choose its threshold on recent labelled data: "
    "carefl evaluate --operating-point RULE --store-threshold.",
)


def confusion_from_rates(
    n: int, accuracy: float, sensitivity: float, specificity: float, ppv: float = math.nan, npv: float = math.nan
) -> tuple[int, int, int, int] | None:
    """The confusion counts ``(tn, fp, fn, tp)`` of ``n`` records that give exactly these rates.

    Every class split ``positives = 0 .. n`` is tried; the counts are returned when exactly one
    split reproduces accuracy, sensitivity and specificity (and PPV and NPV where finite) to
    1e-9, else ``None`` (equal rates can fit several splits). Undefined rates are NaN
    (sensitivity without positives, specificity without negatives).
    """
    if n <= 0 or not math.isfinite(accuracy):
        return None
    found = []
    for positives in range(n + 1):
        negatives = n - positives
        tp = _count(sensitivity, positives)
        tn = _count(specificity, negatives)
        if tp is None or tn is None or abs((tp + tn) / n - accuracy) > _TOLERANCE:
            continue
        fp, fn = negatives - tn, positives - tp
        if not (_fits(ppv, tp, tp + fp) and _fits(npv, tn, tn + fn)):
            continue
        found.append((tn, fp, fn, tp))
    return found[0] if len(found) == 1 else None


def _fits(rate: float, k: int, total: int) -> bool:
    """Whether ``k / total`` is ``rate`` (an unknown, NaN, rate fits anything)."""
    return math.isnan(rate) or (total > 0 and abs(k / total - rate) <= _TOLERANCE)


def _count(rate: float, total: int) -> int | None:
    """The count ``k <= total`` with ``k / total == rate`` (NaN rate: total must be 0)."""
    if total == 0:
        return 0 if math.isnan(rate) else None
    if math.isnan(rate):
        return None
    k = round(rate * total)
    return k if abs(k / total - rate) <= _TOLERANCE else None


def site_analysis(row: SiteRoundMetrics, *, confidence: float = 0.95) -> dict[str, Any]:
    """One site's figures with Wilson intervals, at threshold 0.5 and at its operating point."""
    counts = confusion_from_rates(row.num_examples, row.accuracy, row.sensitivity, row.specificity, row.ppv, row.npv)
    analysis: dict[str, Any] = {"records": row.num_examples, "auc": row.auc, "brier": row.brier, "ece": row.ece}
    if counts is None:
        analysis["note"] = "the rates sent do not determine the confusion counts: no intervals"
        return analysis
    tn, fp, fn, tp = counts
    positives, negatives = tp + fn, tn + fp

    def rate(k: int, total: int) -> dict[str, Any]:
        return {"value": k / total if total else math.nan, "interval": list(wilson_interval(k, total, confidence=confidence))}

    analysis.update(
        positives=positives,
        negatives=negatives,
        at_0_5={
            "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
            "accuracy": rate(tp + tn, row.num_examples), "sensitivity": rate(tp, positives),
            "specificity": rate(tn, negatives), "ppv": rate(tp, tp + fp), "npv": rate(tn, tn + fn),
        },  # fmt: skip
    )
    op_tp, op_tn = _count(row.sensitivity_at_op, positives), _count(row.specificity_at_op, negatives)
    analysis["at_operating_point"] = {
        "threshold": row.threshold,
        "sensitivity": rate(op_tp, positives) if op_tp is not None else {"value": row.sensitivity_at_op, "interval": [math.nan, math.nan]},
        "specificity": rate(op_tn, negatives) if op_tn is not None else {"value": row.specificity_at_op, "interval": [math.nan, math.nan]},
    }  # fmt: skip
    return analysis


def model_card_sections(result: FederationResult, *, confidence: float = 0.95) -> dict[str, Any]:
    """The Mitchell et al. (2019) sections of ``result``'s model card (JSON-ready but for NaN)."""
    from server.report.result import privacy_card

    study = result.config.study
    final = result.final_rows()
    analyses = {row.site: site_analysis(row, confidence=confidence) for row in final}
    backbone = (
        f"{result.manifest.architecture} backbone {result.manifest.name!r} ({result.manifest.source})"
        if result.manifest is not None
        else f"{study.task} architecture trained from scratch"
    )
    return {
        "model_details": {
            "developed_by": "the consortium's hospitals, trained with CareFL (Flower federated learning)",
            "model_type": f"binary classifier of {study.task}: {backbone}, trainable part {study.trainable}, linear head",
            "training": f"{study.strategy}, {study.num_rounds} rounds of {study.local_epochs} local epochs"
            + (f", DP-SGD (target epsilon {study.target_epsilon} per site)" if study.dp else ", no differential privacy")
            + (", secure aggregation (SecAgg+)" if study.secure_aggregation else ""),
            "license": "Apache-2.0 (code); the weights follow the data's terms of each site",
        },
        "intended_use": {
            "primary_uses": "research on federated transfer learning across hospitals; retrospective evaluation "
            f"of {study.task} classifiers at the participating sites",
            "primary_users": "researchers and data scientists at the consortium's hospitals",
            "out_of_scope": [*OUT_OF_SCOPE, TASK_SCOPE.get(study.task, "")],
        },
        "factors": {
            "relevant": "the hospital (site): case mix and class balance differ between sites, so every figure "
            "is reported per site",
            "not_evaluated": "patient demographics and acquisition devices are not recorded",
        },
        "metrics": {
            "reported": "AUC, accuracy, sensitivity, specificity, PPV, NPV at threshold 0.5 and at each site's "
            f"operating point (rule {study.operating_point!r}); Brier score and expected calibration error (10 bins)",
            "intervals": f"{confidence:.0%} Wilson intervals of the proportions from each site's confusion counts; "
            "AUC intervals and ROC curves are computed at each site by carefl evaluate (stratified bootstrap)",
            "positive_when": "probability of class 1 >= threshold",
        },
        "evaluation_data": {
            "what": "each site's own held-out validation part, at the final round",
            "per_site": {site: {k: a.get(k) for k in ("records", "positives", "negatives")} for site, a in analyses.items()},
        },
        "training_data": {
            "what": "each site's own training part; it never left the site",
            "per_site": {site: _training_data(result, site) for site in result.sites},
            "note": "records per class label as each site reported them (counts only, not covered by DP, like "
            "the record count); rows its preprocessing dropped for a missing value",
        },
        "quantitative_analyses": {"per_site": analyses},
        "ethical_considerations": {"privacy": privacy_card(result)},
        "caveats_and_recommendations": list(LIMITATIONS),
    }


def _training_data(result: FederationResult, site: str) -> dict[str, Any]:
    """One site's training part as the card shows it: records, records per class, dropped rows."""
    per_class = result.class_balance.get(site, {}).get("train", {})
    return {
        "records": sum(per_class.values()) if per_class else None,
        "per_class": dict(per_class),
        "dropped_rows": result.dropped_rows.get(site),
    }


def summary_png(result: FederationResult, *, confidence: float = 0.95) -> bytes:
    """A one-page summary: each site's operating points in ROC space, and its calibration (Brier, ECE)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from server.report.plot import DPI

    rows = result.final_rows()
    figure = Figure(figsize=(11.0, 4.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    roc, calibration = figure.subplots(1, 2)
    roc.plot([0, 1], [0, 1], linestyle=":", color="tab:gray", label="chance")
    for index, row in enumerate(rows):
        color = f"C{index}"
        analysis = site_analysis(row, confidence=confidence)
        for key, marker, label in (("at_0_5", "o", "0.5"), ("at_operating_point", "s", f"{row.threshold:.2f}")):
            part = analysis.get(key)
            if not part:
                continue
            sens, spec = part["sensitivity"], part["specificity"]
            if not (math.isfinite(sens["value"]) and math.isfinite(spec["value"])):
                continue
            x, y = 1 - spec["value"], sens["value"]
            xerr = [[x - (1 - spec["interval"][1])], [(1 - spec["interval"][0]) - x]]
            yerr = [[y - sens["interval"][0]], [sens["interval"][1] - y]]
            roc.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=color, capsize=3,
                         label=f"{row.site} @ {label} (AUC {row.auc:.2f})" if key == "at_0_5" else f"{row.site} @ {label}")  # fmt: skip
    roc.set_xlim(-0.02, 1.02)
    roc.set_ylim(-0.02, 1.02)
    roc.set_xlabel("1 - specificity")
    roc.set_ylabel("sensitivity")
    roc.set_title(f"Operating points per site ({confidence:.0%} Wilson intervals)")
    roc.grid(True, alpha=0.3)
    roc.legend(loc="lower right", fontsize="x-small")
    positions = np.arange(len(rows))
    calibration.bar(positions - 0.2, [r.brier for r in rows], width=0.4, label="Brier score")
    calibration.bar(positions + 0.2, [r.ece for r in rows], width=0.4, label="ECE (10 bins)")
    calibration.set_xticks(positions, [r.site for r in rows], rotation=20)
    calibration.set_title("Calibration per site (lower is better)")
    calibration.grid(True, axis="y", alpha=0.3)
    calibration.legend(fontsize="small")
    figure.suptitle(f"CareFL {result.config.study.task} model card summary (research use only; not a medical device)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_card_summary(result: FederationResult, path: Path) -> None:
    """Write :func:`summary_png` to ``path`` atomically (nothing when no site reported)."""
    if result.final_rows():
        atomic_write_bytes(Path(path), summary_png(result))

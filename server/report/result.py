"""The outcome of a federated run and how it is written to a run folder."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.metrics import SiteRoundMetrics, weighted_mean
from server.report.card import CARD_KEY, SUMMARY_FILE, model_card_sections, write_card_summary
from server.report.plot import plot_site_metrics
from server.report.runfolder import RunFolder, model_card, write_metrics
from shared.backbones.manifest import BackboneManifest
from shared.config import RunConfig
from shared.hashing import sha256_bytes


@dataclass
class FederationResult:
    """Everything a finished run produced.

    Attributes
    ----------
    config : RunConfig
        The run's configuration.
    manifest : BackboneManifest | None
        The pretrained backbone (``None`` when trained from scratch).
    names : list[str]
        Keys of the exchanged tensors.
    parameters : list[np.ndarray]
        Final global values of those tensors.
    rows : list[SiteRoundMetrics]
        Per-site federated evaluation per round.
    upload_bytes : dict[int, list[int]]
        Bytes each client uploaded per round.
    full_model_bytes : int
        Serialized size of the whole model, for comparison.
    backbone_bytes : dict[int, int]
        Backbone bytes sent per node (once).
    resumed : dict[str, Any] | None
        How the run was resumed from a checkpoint (:meth:`server.checkpoint.RunCheckpoints.card`);
        ``None`` if it ran in one go.
    class_balance : dict[str, dict[str, dict[str, int]]]
        Per site, its records per class label in its training and validation parts.
    dropped_rows : dict[str, int]
        Per site, the rows of its raw data its preprocessing left out, as the site reported.
    payload : bytes | None
        ``model.pt``'s bytes (:func:`model_payload`), once computed (:meth:`model_bytes`).
    card : dict[str, Any] | None
        The model card, once built at the end of the run (:func:`federation_card`, with the
        delivery's outcome); the run folder writes it, :func:`federation_card` builds one if ``None``.
    """

    config: RunConfig
    manifest: BackboneManifest | None
    names: list[str]
    parameters: list[np.ndarray]
    rows: list[SiteRoundMetrics]
    upload_bytes: dict[int, list[int]] = field(default_factory=dict)
    full_model_bytes: int = 0
    backbone_bytes: dict[int, int] = field(default_factory=dict)
    resumed: dict[str, Any] | None = None
    dropped_rows: dict[str, int] = field(default_factory=dict)
    class_balance: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    payload: bytes | None = None
    card: dict[str, Any] | None = None

    def model_bytes(self) -> bytes:
        """``model.pt``'s bytes, serialized once: what the run folder holds and the sites receive."""
        if self.payload is None:
            self.payload = model_payload(self)
        return self.payload

    @property
    def sites(self) -> list[str]:
        """Sites that reported metrics, sorted."""
        return sorted({r.site for r in self.rows})

    def final_rows(self) -> list[SiteRoundMetrics]:
        """Metrics of the last evaluated round."""
        if not self.rows:
            return []
        last = max(r.round for r in self.rows)
        return [r for r in self.rows if r.round == last]

    def final_summary(self) -> dict[str, float]:
        """Weighted mean of each metric in the last round."""
        rows = self.final_rows()
        return {name: weighted_mean(rows, name) for name in ("loss", "accuracy", "auc")}

    def mean_upload_bytes(self) -> float:
        """Mean bytes uploaded by one client in one round."""
        values = [b for per_round in self.upload_bytes.values() for b in per_round]
        return float(np.mean(values)) if values else math.nan


def privacy_card(result: FederationResult) -> dict[str, Any]:
    """The guarantee each site's data got in this run, for the model card."""
    cfg = result.config
    if not cfg.study.dp:
        return {"dp": False, "note": "trained without differential privacy: no formal guarantee"}
    return {
        "dp": True,
        "mechanism": "DP-SGD (Opacus), per-sample clipping, Poisson sampling",
        "accountant": cfg.study.accountant,
        "target_epsilon_per_site": cfg.study.target_epsilon,
        "max_grad_norm": cfg.study.max_grad_norm,
        "unit": "one patient record at one site",
        "per_site": {r.site: {"epsilon": r.epsilon, "delta": r.delta} for r in result.final_rows()},
    }


OPERATING_POINT_NOTE = (
    "each site picks its operating point by the study's operating-point rule on its own validation data, "
    "and its sensitivity/specificity there are measured on that same data (optimistic for a data-driven "
    "rule); only the threshold and these two figures leave the site"
)


def clinical_card(result: FederationResult) -> dict[str, Any]:
    """Per site at the final round: accuracy, AUC, sensitivity, specificity at 0.5 and at its operating point."""
    per_site = {
        r.site: {
            "accuracy": r.accuracy,
            "auc": r.auc,
            "sensitivity": r.sensitivity,
            "specificity": r.specificity,
            "operating_point": {
                "threshold": r.threshold,
                "sensitivity": r.sensitivity_at_op,
                "specificity": r.specificity_at_op,
            },
        }
        for r in result.final_rows()
    }
    return {
        "positive_when": "probability of class 1 >= threshold; the plain figures are at threshold 0.5",
        "operating_point_rule": result.config.study.operating_point,
        "per_site": per_site,
        "note": OPERATING_POINT_NOTE,
    }


DROPPED_ROWS_NOTE = (
    "rows of a site's raw data its task's preprocessing left out (heart-disease: a missing value in "
    "a used column, as FLamby's Fed-Heart-Disease), as each site reported them"
)


CLASS_BALANCE_NOTE = (
    "records per class label in each site's own training and validation parts, as the site reported "
    "them; counts leave a site unprotected by DP, like its record count"
)


def data_card(result: FederationResult) -> dict[str, Any]:
    """What each site's preprocessing left out of its data, for the model card."""
    return {
        "dropped_rows_per_site": dict(sorted(result.dropped_rows.items())),
        "note": DROPPED_ROWS_NOTE,
        "class_balance_per_site": dict(sorted(result.class_balance.items())),
        "class_balance_note": CLASS_BALANCE_NOTE,
    }


def model_payload(result: FederationResult) -> bytes:
    """Serialize the final model: exchanged tensors + what identifies the backbone.

    ``config`` is the study the sites trained in, its backbone pinned (the server's and the
    simulation's settings stay on the server: the sites receive these bytes).
    """
    state = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(result.names, result.parameters, strict=True)}
    pinned = result.manifest.sha256 if result.manifest else ""
    payload = {
        "format": "carefl-model/1",
        "task": result.config.study.task,
        "setup": result.config.study.setup,
        "config": result.config.study.model_copy(update={"backbone_sha256": pinned}).to_run_config(),
        "backbone_name": result.manifest.name if result.manifest else None,
        "backbone_sha256": result.manifest.sha256 if result.manifest else None,
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def federation_card(result: FederationResult) -> dict[str, Any]:
    """The model card of ``result``: built once at the end of the run, sent to the sites, written to the run folder.

    ``model_sha256`` is the SHA-256 of :meth:`FederationResult.model_bytes`.
    """
    backbone: dict[str, Any] = {"name": None, "sha256": None, "trained": "from scratch"}
    if result.manifest is not None:
        backbone = {
            "name": result.manifest.name,
            "sha256": result.manifest.sha256,
            "architecture": result.manifest.architecture,
            "source": result.manifest.source,
            "trained": result.config.study.trainable,
        }
    return model_card(
        task=result.config.study.task,
        sites=result.sites,
        rounds=result.config.study.num_rounds,
        backbone=backbone,
        metrics={"final_weighted_mean": result.final_summary(), "final_per_site": {r.site: r.as_row() for r in result.final_rows()}},
        extra={
            "model_sha256": sha256_bytes(result.model_bytes()),
            CARD_KEY: model_card_sections(result),
            "privacy": privacy_card(result),
            "clinical": clinical_card(result),
            "data": data_card(result),
            "setup": result.config.study.setup,
            "strategy": result.config.study.strategy,
            "exchanged_tensors": result.names,
            "bytes_uploaded_per_client_per_round": result.mean_upload_bytes(),
            "full_model_bytes": result.full_model_bytes,
            **({"resumed": result.resumed} if result.resumed else {}),
        },
    )


def write_run_folder(
    path: Path,
    result: FederationResult,
    *,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    extra: Mapping[str, Any] | None = None,
    extra_metrics: Mapping[str, Sequence[SiteRoundMetrics]] | None = None,
    title: str = "",
) -> Path:
    """Write metrics, model, model card and plot to ``path`` (all or nothing).

    The card is ``result.card`` (built at the end of the run, with the delivery's outcome), or
    :func:`federation_card` of ``result``; ``baselines`` and ``extra`` are added to it.

    Parameters
    ----------
    path : Path
        The run folder; must not exist or be empty.
    result : FederationResult
        The finished run.
    baselines : Mapping[str, Mapping[str, float]], optional
        Comparison figures (label -> metric -> value) drawn on the plot and put on the card.
    extra : Mapping[str, Any], optional
        More model-card fields.
    extra_metrics : Mapping[str, Sequence[SiteRoundMetrics]], optional
        More metric tables, written as ``<stem>.csv`` and ``<stem>.json``.
    title : str
        Plot title.
    """
    more: dict[str, Any] = {**({"baselines": baselines} if baselines else {}), **(dict(extra) if extra else {})}
    card = result.card if result.card is not None else federation_card(result)
    clashes = sorted(set(card) & set(more))
    if clashes:
        raise ValueError(f"`baselines` and `extra` may not override the model card's keys {clashes}")
    with RunFolder(path) as folder:
        write_metrics(folder, result.rows)
        for stem, rows in (extra_metrics or {}).items():
            write_metrics(folder, rows, stem=stem)
        folder.write_bytes("model.pt", result.model_bytes())
        folder.write_json("model_card.json", {**card, **more})
        plot_site_metrics(
            result.rows,
            folder.path("metrics.png"),
            title=title or f"CareFL {result.config.study.task} ({result.config.study.setup})",
            baselines=baselines,
        )
        write_card_summary(result, folder.path(SUMMARY_FILE))
    return path

"""Which frozen features a DP chest-xray head should see, scored on inner splits of the training images.

Pooled MobileNetV2 blocks (:data:`FEATURE_LEVERS`) and fixed projections to fewer columns
(fewer noised coordinates), drawn from a seed or from the backbone's public weights, never from
site data. Each lever is scored at epsilon 1 per site by :func:`scripts.tune_privacy.inner_score`
(DP FedAvg in-process on inner 66/34 cuts of each site's *training* images; the validation
images are never loaded) at each learning rate of :data:`LEVER_CELLS`, and by the non-private
central logistic regression's AUC (:func:`central_auc`), so the information a lever loses is
visible. It chose the chest demo's ``feature-blocks = "7,8,9,10"``.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/feature_levers.py --data ../shared/data/pneumoniamnist.npz --splits 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from scripts.tune_privacy import chest_target, inner_score, inner_split, projected
from shared.pipeline import build_model
from shared.scores import binary_metrics
from shared.tasks.base import SiteData


def random_projection(width: int, k: int, seed: int) -> np.ndarray:
    """A ``(width, k)`` matrix of orthonormal columns drawn from ``seed`` alone (the same at every site)."""
    gaussian = np.random.default_rng(seed).standard_normal((width, k))
    q, _ = np.linalg.qr(gaussian)
    return q.astype(np.float32)


def public_projection(backbone: torch.nn.Module, k: int) -> np.ndarray:
    """The top ``k`` right singular vectors ``(320, k)`` of MobileNetV2's last 1x1 convolution (320 -> 1280).

    That convolution reads block -2's 320 channels; its weights (scaled by its batch norm's
    per-channel gain, so the vectors are those of the linear map it applies) come from the
    ImageNet training of the public backbone only.

    Parameters
    ----------
    backbone : torch.nn.Module
        A MobileNetV2 trunk (or ``build_model``'s input module + trunk), its ImageNet weights loaded.
    k : int
        Columns kept.
    """
    trunk = backbone[-1] if isinstance(backbone, torch.nn.Sequential) else backbone  # after the input module
    conv, norm = trunk.features[18][0], trunk.features[18][1]
    weight = conv.weight.detach().double().numpy()[:, :, 0, 0]
    gain = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().double().numpy()
    _, _, vt = np.linalg.svd(gain[:, None] * weight, full_matrices=False)
    return vt[:k].T.astype(np.float32)


def central_auc(
    sites: list[SiteData], *, splits: int, projection: np.ndarray | None = None
) -> tuple[float, float]:
    """Non-private logistic regression on every site's inner training rows pooled: weighted inner-validation AUC.

    Each site's rows are standardized (and projected) as :func:`inner_score` sees them; mean and
    sd over ``splits`` cuts. The ceiling the features put on a DP head.
    """
    from sklearn.linear_model import LogisticRegression

    aucs = []
    for split in range(splits):
        inner = [projected(inner_split(s, seed=split), projection) for s in sites]
        model = LogisticRegression(max_iter=5000).fit(
            np.concatenate([s.x_train for s in inner]), np.concatenate([s.y_train for s in inner])
        )
        per_site = [
            (len(s.y_val), binary_metrics(s.y_val, model.predict_proba(s.x_val)[:, 1]).auc) for s in inner
        ]
        finite = [(n, a) for n, a in per_site if math.isfinite(a)]
        aucs.append(sum(n * a for n, a in finite) / sum(n for n, _ in finite))
    return float(np.mean(aucs)), float(np.std(aucs, ddof=1)) if splits > 1 else 0.0



LEVER_BLOCKS: tuple[int, ...] = tuple(range(2, 19))
"""MobileNetV2 blocks whose pooled features the feature-lever study caches at once (24 to 1280 channels)."""


@dataclass(frozen=True)
class FeatureLever:
    """Features a chest-xray head could train on: pooled blocks, optionally projected to fewer columns.

    Attributes
    ----------
    blocks : tuple[int, ...]
        MobileNetV2 blocks (indices of :data:`LEVER_BLOCKS`), concatenated as ``feature-blocks`` would.
    projection : str
        ``""`` (none), ``random-K`` (:func:`random_projection`, seed 42) or ``public-K``
        (:func:`public_projection`; block 17 alone, the last convolution's input).
    """

    blocks: tuple[int, ...]
    projection: str = ""

    @property
    def name(self) -> str:
        """E.g. ``blocks 11,12,13`` or ``blocks 17, public-64``."""
        return f"blocks {','.join(map(str, self.blocks))}" + (
            f", {self.projection}" if self.projection else ""
        )


FEATURE_LEVERS: tuple[FeatureLever, ...] = (
    *(FeatureLever(b) for b in ((17,), (16,), (15,), (14,), (14, 15, 16), (13,), (12,), (11,), (10,))),
    *(FeatureLever(b) for b in ((11, 12, 13), (12, 13), (10, 11, 12, 13), (7, 8, 9, 10))),
    *(FeatureLever(b) for b in ((9, 10), (8,), (6,), (4, 5, 6), (2, 3, 4, 5, 6), (10, 13))),
    *(FeatureLever(b) for b in ((7, 8, 9, 10, 11, 12, 13), (4, 5, 6, 7, 8, 9, 10))),
    *(FeatureLever((17,), f"{kind}-{k}") for kind in ("random", "public") for k in (32, 64, 128)),
    *(FeatureLever((11, 12, 13), f"random-{k}") for k in (32, 64, 128)),
)
"""What the feature-lever study compares (the demo's default before it: block 17, i.e. ``-2``; after it: 7-10)."""

LEVER_CELLS: tuple[dict[str, Any], ...] = tuple(
    {"batch_size": 32, "num_rounds": 5, "local_epochs": 5, "learning_rate": lr, "max_grad_norm": 1.0}
    for lr in (0.003, 0.01, 0.03)
)
"""The schedules each feature lever is scored with (the demo's, around its learning rate)."""


def block_widths(backbone: torch.nn.Module, blocks: tuple[int, ...]) -> dict[int, int]:
    """The channel count of each of ``blocks``' outputs (a probe image through the trunk's stages)."""
    trunk = backbone[-1] if isinstance(backbone, torch.nn.Sequential) else backbone
    widths, x, training = {}, torch.zeros(1, 3, 32, 32), trunk.training
    trunk.eval()
    try:
        with torch.no_grad():
            for index, stage in enumerate(trunk.stages()[: max(blocks) + 1]):
                x = stage(x)
                widths[index] = int(x.shape[1])
    finally:
        trunk.train(training)
    return {b: widths[b] for b in blocks}


def lever_sites(sites: list[SiteData], widths: dict[int, int], lever: FeatureLever) -> list[SiteData]:
    """The columns of ``lever``'s blocks out of sites whose rows are the pooled :data:`LEVER_BLOCKS` (in order)."""
    starts = dict(zip(widths, np.cumsum([0, *widths.values()])[:-1], strict=False))
    columns = np.concatenate([np.arange(starts[b], starts[b] + widths[b]) for b in lever.blocks])
    return [replace(s, x_train=s.x_train[:, columns]) for s in sites]


def lever_projection(lever: FeatureLever, width: int, backbone: torch.nn.Module) -> np.ndarray | None:
    """The fixed ``(width, k)`` matrix of ``lever.projection`` (``None`` without one)."""
    if not lever.projection:
        return None
    kind, k = lever.projection.split("-")
    if kind == "public":
        if lever.blocks != (17,):
            raise ValueError("the public projection reads block 17 (the last convolution's input)")
        return public_projection(backbone, int(k))
    return random_projection(width, int(k), seed=42)


def feature_levers(
    epsilon: float,
    data: Path,
    state_dir: Path,
    *,
    levers: tuple[FeatureLever, ...] = FEATURE_LEVERS,
    cells: tuple[dict[str, Any], ...] = LEVER_CELLS,
    splits: int = 2,
    repeats: int = 2,
) -> list[dict[str, Any]]:
    """Score each feature lever on inner splits at ``epsilon`` (DP FedAvg) and by a non-private central LR.

    Each site's training features of every block of :data:`LEVER_BLOCKS` are computed once
    (cached); a lever's columns are cut from them and (:func:`projected`) projected after the
    inner cut's standardization. One row per lever and cell: the DP figures of
    :func:`inner_score` and ``central_auc`` (:func:`central_auc`, 3 cuts), the ceiling the
    features put on any head.
    """
    from server.local.demo import ensure_backbone

    target = chest_target(epsilon, data, state_dir, {"feature_blocks": ",".join(map(str, LEVER_BLOCKS))})
    backbone = build_model(
        target.cfg.study.with_overrides(feature_blocks=""), ensure_backbone(target.cfg, Console(stderr=True))
    ).backbone
    widths = block_widths(backbone, LEVER_BLOCKS)
    rows = []
    for lever in levers:
        sites = lever_sites(target.sites, widths, lever)
        projection = lever_projection(lever, sites[0].x_train.shape[1], backbone)
        central = central_auc(sites, splits=3, projection=projection)
        width = sites[0].x_train.shape[1] if projection is None else projection.shape[1]
        for cell in cells:
            start = time.perf_counter()
            study = target.cfg.study.with_overrides(**cell)
            figures = inner_score(
                study, sites, splits=splits, repeats=repeats, features=True, projection=projection
            )
            row = {"lever": lever.name, "width": width, **cell, "central_auc": central,
                   **{f"inner_{k}": v for k, v in figures.items()}, "seconds": time.perf_counter() - start}  # fmt: skip
            print(json.dumps(row), flush=True)  # noqa: T201 (a script's progress)
            rows.append(row)
    return rows



def _print_levers(rows: list[dict[str, Any]], epsilon: float) -> None:
    table = Table(
        title=f"tune_privacy chest-xray: feature levers, inner-validation figures at epsilon {epsilon:g}"
    )
    for column in ("features", "width", "lr", "AUC", "balanced acc", "central LR AUC (no DP)"):
        table.add_column(column, justify="right")
    for r in rows:
        (auc, auc_sd), (bacc, bacc_sd) = r["inner_auc"], r["inner_balanced_accuracy"]
        table.add_row(
            r["lever"], str(r["width"]), f"{r['learning_rate']:g}", f"{auc:.3f} ± {auc_sd:.3f}",
            f"{bacc:.3f} ± {bacc_sd:.3f}", f"{r['central_auc'][0]:.3f} ± {r['central_auc'][1]:.3f}",
        )  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 200).print(table)




def main() -> None:
    """Score every feature lever and print the table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="backbone registry, feature cache")
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon per site")
    parser.add_argument("--splits", type=int, default=2, help="inner cuts of each site's training images")
    parser.add_argument("--repeats", type=int, default=2, help="federations (seeds, fresh DP noise) per cut")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = feature_levers(args.epsilon, args.data, args.state_dir, splits=args.splits, repeats=args.repeats)
    _print_levers(rows, args.epsilon)
    if args.json:
        args.json.write_text(json.dumps({"feature_levers": rows}, indent=2, default=float))


if __name__ == "__main__":
    main()

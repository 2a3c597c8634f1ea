"""Choose heart-disease's DP schedule on the training data only, then report it on the test split.

A small grid (model, expected batch, rounds x local epochs, learning rate, clipping bound) is
scored at epsilon 1 per site on *inner* splits of each site's training part: every site's
training rows are cut again 66/34 (stratified where both classes have 3 rows or more), the
inner training rows re-standardized, and the federation trained on the inner training rows and
scored on the inner validation rows (mean per-site accuracy, FLamby's figure). The held-out
test split the benchmark reports is never looked at while choosing. The best setting is then
run on the real split on Flower's simulation engine (:func:`scripts.bench_privacy.over_seeds`).

The grid's federations run in-process (:func:`federate`): what a CareFL site does in a round
(the noise calibrated for the whole run, DP-SGD with Opacus, the update clipped to
``delta-bound``) and the server's example-weighted FedAvg, without Flower's messaging, so a
cell costs seconds rather than a minute. Choosing costs privacy in a real federation, so this
is a benchmark-time choice of the shipped defaults, not a per-run search.

Usage::

    .venv/bin/python scripts/tune_privacy.py --splits 3 --seeds 5
    .venv/bin/python scripts/tune_privacy.py --quick   # a 4-cell grid, to check it runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.numpy_client import bound_delta
from client.privacy import cfg_run_noise
from server.local.demo import demo_config
from shared.config import StudyConfig
from shared.dp import train_dp
from shared.params import get_arrays, set_arrays, subtract
from shared.pipeline import build_model, local_problem, train_settings
from shared.tasks import load_sites
from shared.tasks.base import SiteData
from shared.training import predict_proba

INNER_TRAIN = 0.66
MIN_ROWS_TO_STRATIFY = 3


def inner_split(site: SiteData, seed: int) -> SiteData:
    """Cut ``site``'s training part into inner training and validation rows (its test part unused).

    The inner training rows are re-standardized by their own mean and scale (an affine map of
    the site's standardized values, so the same as standardizing the raw values by them).

    Parameters
    ----------
    site : SiteData
        A site of the benchmark (its ``x_train``/``y_train`` are cut; ``x_val``/``y_val`` dropped).
    seed : int
        Seed of the cut.
    """
    from sklearn.model_selection import train_test_split

    y = site.y_train
    counts = np.bincount(y, minlength=2)
    stratify = y if len(np.unique(y)) > 1 and counts.min() >= MIN_ROWS_TO_STRATIFY else None
    x_in, x_out, y_in, y_out = train_test_split(
        site.x_train, y, train_size=INNER_TRAIN, shuffle=True, stratify=stratify, random_state=seed
    )
    mean, std = x_in.mean(axis=0), x_in.std(axis=0)
    std[std == 0] = 1.0
    return replace(
        site,
        x_train=((x_in - mean) / std).astype(np.float32),
        y_train=y_in,
        x_val=((x_out - mean) / std).astype(np.float32),
        y_val=y_out,
    )


def federate(study: StudyConfig, sites: list[SiteData]) -> list[float]:
    """Train one DP FedAvg federation in-process as CareFL's sites and server would; per-site accuracy.

    Every site calibrates its noise for the whole run (:func:`client.privacy.cfg_run_noise`),
    trains with :func:`shared.dp.train_dp` from the global tensors each round, and clips its
    update to ``delta-bound``; the server adds the example-weighted mean of the updates.

    Parameters
    ----------
    study : StudyConfig
        A ``benchmark`` or ``scratch`` study with ``dp`` on and ``strategy`` fedavg.
    sites : list[SiteData]
        The federation's sites; each is scored on its ``x_val``/``y_val``.

    Returns
    -------
    list[float]
        Each site's accuracy of the final global model on its validation rows.
    """
    if study.strategy != "fedavg" or not study.dp:
        raise ValueError("federate() runs DP FedAvg only")
    problems = [local_problem(study, build_model(study, None), s, backbone_sha256="", cache_dir=None) for s in sites]
    names = problems[0].names
    current = get_arrays(problems[0].model, names)
    noises = [cfg_run_noise(study, len(p.y_train)).noise_multiplier for p in problems]
    weights = np.array([len(p.y_train) for p in problems], dtype=np.float64)
    for server_round in range(1, study.num_rounds + 1):
        settings = train_settings(study, server_round=server_round)
        deltas = []
        for problem, noise in zip(problems, noises, strict=True):
            set_arrays(problem.model, names, current)
            train_dp(
                problem.module, problem.x_train, problem.y_train, settings,
                noise_multiplier=noise, max_grad_norm=study.max_grad_norm, accountant=study.accountant,
            )  # fmt: skip
            delta, _ = bound_delta(subtract(get_arrays(problem.model, names), current), study.delta_bound)
            deltas.append(delta)
        mean = [sum(w * d[i] for w, d in zip(weights, deltas, strict=True)) / weights.sum() for i in range(len(names))]
        current = [(c + m).astype(np.float32) for c, m in zip(current, mean, strict=True)]
    accuracies = []
    for problem in problems:
        set_arrays(problem.model, names, current)
        predicted = predict_proba(problem.module, problem.x_val).argmax(axis=1)
        accuracies.append(float(np.mean(predicted == problem.y_val)))
    return accuracies


Grid = list[dict[str, tuple[Any, ...]]]
"""Products of settings, each a mapping of a setting to its values (``schedule``: rounds, local epochs)."""

GRID: Grid = [
    {  # full-batch DP-GD: 256 > every site's training rows, so the sample rate is 1 and an epoch is one step
        "model": ("logreg", "mlp"),
        "batch_size": (256,),
        "schedule": ((5, 5), (10, 5), (5, 1), (10, 1), (20, 1), (40, 1)),
        "learning_rate": (0.05, 0.2, 1.0, 3.0),
        "max_grad_norm": (1.0,),
    },
    {  # minibatch DP-SGD, as the defaults before this search (5 x 5, batch 32, lr 0.05)
        "model": ("logreg", "mlp"),
        "batch_size": (32,),
        "schedule": ((5, 5), (5, 1)),
        "learning_rate": (0.05, 0.2, 1.0),
        "max_grad_norm": (1.0,),
    },
]
"""The settings searched first (every combination of each product)."""

CLIPS: tuple[float, ...] = (0.5, 1.0, 2.0)
"""Clipping bounds tried on the best cells of :data:`GRID` (the refinement)."""

QUICK_GRID: Grid = [
    {
        "model": ("logreg",),
        "batch_size": (32, 256),
        "schedule": ((5, 1),),
        "learning_rate": (0.05, 1.0),
        "max_grad_norm": (1.0,),
    }
]


def cells(grid: Grid) -> list[dict[str, Any]]:
    """Every combination of each product of ``grid`` as StudyConfig overrides (``schedule`` -> rounds, epochs)."""
    out = []
    for product in grid:
        for values in itertools.product(*product.values()):
            cell = dict(zip(product, values, strict=True))
            rounds, epochs = cell.pop("schedule")
            out.append({**cell, "num_rounds": rounds, "local_epochs": epochs})
    return out


def inner_score(
    study: StudyConfig, sites: list[SiteData], *, splits: int, repeats: int, first_split: int = 0
) -> tuple[float, float]:
    """Mean and sd of the inner-validation mean per-site accuracy over ``splits`` cuts x ``repeats`` runs.

    Cut ``k`` (``first_split`` .. ``first_split + splits - 1``) is :func:`inner_split` with seed
    ``k``; run ``r`` of a cut has seed ``r`` (initialization) and fresh DP noise.
    """
    scores = []
    for split in range(first_split, first_split + splits):
        inner = [inner_split(s, seed=split) for s in sites]
        for repeat in range(repeats):
            scores.append(float(np.mean(federate(study.with_overrides(seed=repeat), inner))))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0


def tune(
    base: StudyConfig,
    sites: list[SiteData],
    grid: Grid,
    *,
    splits: int,
    repeats: int,
    refine: int = 0,
    clips: tuple[float, ...] = CLIPS,
) -> list[dict[str, Any]]:
    """Score every cell of ``grid`` on inner splits, then refine the best; rows sorted best first.

    The ``refine`` best cells are scored again with every clipping bound of ``clips``, on
    ``2 * splits`` fresh cuts (seeds from 100) x ``repeats`` runs; those rows (``stage`` 2) rank
    first, by their own score, so the choice rests on the larger sample.
    """
    rows = [_scored(base, sites, cell, stage=1, splits=splits, repeats=repeats) for cell in cells(grid)]
    rows.sort(key=lambda r: -r["inner_mean"])
    refined = [
        _scored(base, sites, {**_cell_of(r), "max_grad_norm": clip}, stage=2, splits=2 * splits, repeats=repeats, first_split=100)
        for r in rows[:refine]
        for clip in clips
    ]  # fmt: skip
    refined.sort(key=lambda r: -r["inner_mean"])
    return refined + rows


CELL_KEYS = ("model", "batch_size", "num_rounds", "local_epochs", "learning_rate", "max_grad_norm")


def _cell_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in CELL_KEYS}


def _scored(base: StudyConfig, sites: list[SiteData], cell: dict[str, Any], *, stage: int, **kwargs: Any) -> dict[str, Any]:
    start = time.perf_counter()
    mean, sd = inner_score(base.with_overrides(**cell), sites, **kwargs)
    row = {**cell, "stage": stage, "inner_mean": mean, "inner_sd": sd, "seconds": time.perf_counter() - start}
    print(json.dumps(row), flush=True)  # noqa: T201 (a script's progress)
    return row


def main() -> None:
    """Tune on inner splits, then report the chosen setting on the test split over seeds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, default=1.0, help="target epsilon per site")
    parser.add_argument("--splits", type=int, default=3, help="inner cuts of each site's training rows")
    parser.add_argument("--repeats", type=int, default=2, help="federations (seeds, fresh DP noise) per cut")
    parser.add_argument("--refine", type=int, default=4, help="best cells re-scored with each clipping bound")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the final test-split report")
    parser.add_argument("--quick", action="store_true", help="a 4-cell grid (to check the script)")
    parser.add_argument("--no-test", action="store_true", help="stop after choosing")
    parser.add_argument("--json", type=Path, default=None, help="also write the grid and the report as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = demo_config("heart-disease", setup="benchmark", target_delta=1e-3, target_epsilon=args.epsilon)
    sites = load_sites(cfg.study, cfg.simulation.data_path)
    grid = QUICK_GRID if args.quick else GRID
    rows = tune(cfg.study, sites, grid, splits=args.splits, repeats=args.repeats, refine=0 if args.quick else args.refine)
    console = Console()
    table = Table(title=f"tune_privacy: inner-validation mean per-site accuracy at epsilon {args.epsilon:g} (best 10)")
    for column in ("stage", "model", "batch", "rounds x epochs", "lr", "clip", "inner acc"):
        table.add_column(column, justify="right")
    for r in rows[:10]:
        table.add_row(
            str(r["stage"]), r["model"], str(r["batch_size"]), f"{r['num_rounds']} x {r['local_epochs']}", f"{r['learning_rate']:g}",
            f"{r['max_grad_norm']:g}", f"{r['inner_mean']:.3f} ± {r['inner_sd']:.3f}",
        )  # fmt: skip
    console.print(table)
    report: dict[str, Any] = {"grid": rows}
    if not args.no_test:
        from scripts.bench_privacy import over_seeds

        chosen = _cell_of(rows[0])
        test = over_seeds(cfg.with_overrides(**chosen), args.epsilon, args.seeds)
        report["chosen"], report["test"] = chosen, test
        acc = test["mean_site_accuracy"]
        console.print(f"chosen {chosen}: test mean per-site accuracy {acc['mean']:.3f} ± {acc['sd']:.3f} ({args.seeds} seeds)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()

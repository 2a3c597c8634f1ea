"""Benchmark of differential privacy (issue 3), printed from one run.

1. Time per training step with DP-SGD vs without, for the head only and for partial
   fine-tuning (last backbone block + head), on real chest X-ray features. Per-step time is
   the slope between 1-epoch and 6-epoch runs (median of 3 each, after a warm-up), so
   Opacus' per-call set-up is not counted as a step (it is printed separately).
2. Utility vs epsilon in {0.5, 1, 3, 8, none} on Flower's simulation engine, each cell the mean
   ± sample standard deviation over ``--seeds`` seeds (heart-disease: at least 5), with the
   clinical figures at 0.5 and at each site's operating point (the demo's rule, Youden):
   - heart-disease in FLamby's 4-site setup (all sites from one initialization, delta 1e-3):
     mean per-site test accuracy, the figure FLamby reports, with the benchmark's DP defaults
     (:data:`shared.tasks.heart_disease.DP_BENCHMARK`, chosen by ``scripts/tune_privacy.py``);
     ``--heart-schedule previous`` runs the MLP with the schedule before that search;
   - ``heart-transfer``: the transfer setup (MLP pretrained on Cleveland, frozen; its head
     federated by the other 3 hospitals), same delta, same two schedules (the model is the
     Cleveland backbone's);
   - chest-xray, 4 non-IID hospitals, frozen MobileNetV2 + head: validation accuracy and AUC.

Usage::

    .venv/bin/python scripts/bench_privacy.py --data ../shared/data/pneumoniamnist.npz
    .venv/bin/python scripts/bench_privacy.py --data ../shared/data/pneumoniamnist.npz --epsilons 1 --no-step-times
    .venv/bin/python scripts/bench_privacy.py --data ../shared/data/pneumoniamnist.npz --epsilons 1 --no-step-times \
        --tasks heart-disease,heart-transfer [--heart-schedule previous]
    PYTHONPATH=. .venv/bin/python scripts/bench_privacy.py --data ../shared/data/pneumoniamnist.npz --epsilons 1 --no-step-times \
        --tasks chest-xray --baselines --scratch-set num-rounds=5 --scratch-set local-epochs=1 \
        --scratch-set learning-rate=0.05 --scratch-set max-grad-norm=1.0

``--baselines`` adds, for chest-xray at each epsilon, each site alone (its own DP run, same
schedule in total) and federated from scratch (the compact CNN, all weights under DP; its
schedule set by ``--scratch-set``, the from-scratch learning rate chosen on an inner split).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.policy import SitePolicy
from server.local.demo import demo_config, ensure_backbone
from server.local.simulation import simulate
from server.metrics import weighted_mean
from shared.config import RunConfig
from shared.dp import train_dp
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.tasks import load_sites
from shared.tasks.heart_disease import DP_BENCHMARK
from shared.training import train


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


LONG_EPOCHS = 6
REPEATS = 3


def step_times(cfg: RunConfig, pretrained: Pretrained) -> dict[str, float]:
    """Seconds per step with and without DP (slope between 1 and 6 epochs), and DP set-up."""
    site = load_sites(cfg.study, cfg.simulation.data_path)[1]
    cache = Path(tempfile.mkdtemp(prefix="carefl-bench-"))  # features computed once, not timed

    def problem():  # type: ignore[no-untyped-def]
        model = build_model(cfg.study, pretrained)
        return local_problem(
            cfg.study, model, site, backbone_sha256=pretrained.manifest.sha256, cache_dir=cache
        )

    base = problem()
    x, y = base.x_train, base.y_train
    steps_per_epoch = math.ceil(len(y) / cfg.study.batch_size)
    times: dict[str, float] = {}
    for label, dp in (("plain", False), ("dp", True)):
        runs = {}
        for epochs in (1, 1, LONG_EPOCHS):  # the first 1-epoch pass is a warm-up
            settings = train_settings(cfg.study.with_overrides(local_epochs=epochs), server_round=1)
            samples = []
            for _ in range(REPEATS):
                module = problem().module
                if dp:
                    samples.append(_seconds(
                        lambda m=module, s=settings: train_dp(m, x, y, s, noise_multiplier=1.0, max_grad_norm=1.0)
                    ))  # fmt: skip
                else:
                    samples.append(_seconds(lambda m=module, s=settings: train(m, x, y, s)))
            runs[epochs] = float(np.median(samples))
        per_step = (runs[LONG_EPOCHS] - runs[1]) / ((LONG_EPOCHS - 1) * steps_per_epoch)
        times[f"{label}_step_s"] = per_step
        times[f"{label}_setup_s"] = runs[1] - steps_per_epoch * per_step
    times["ratio"] = times["dp_step_s"] / times["plain_step_s"]
    times["trainable_params"] = float(sum(p.numel() for p in base.module.parameters() if p.requires_grad))
    return times


def utility(cfg: RunConfig, eps: float | None, sites_root: Path) -> dict[str, float]:
    """Final held-out metrics of one federation at ``eps`` (None: no DP)."""
    run_cfg = cfg.with_overrides(dp=eps is not None, target_epsilon=eps or 1.0)
    num_sites = len(load_sites(run_cfg.study, run_cfg.simulation.data_path))
    start = time.perf_counter()
    result = simulate(
        run_cfg, num_sites=num_sites, sites_root=sites_root, policy=SitePolicy(require_dp=eps is not None,
        max_epsilon_per_run=max(eps or 1.0, 1.0), max_lifetime_epsilon=100.0),
    )  # fmt: skip
    rows = result.final_rows()
    return {
        "mean_site_accuracy": float(np.mean([r.accuracy for r in rows])),
        **{f"weighted_{name}": weighted_mean(rows, name) for name in WEIGHTED},
        "max_epsilon": max((r.epsilon for r in rows), default=math.nan),
        "seconds": time.perf_counter() - start,
    }


WEIGHTED = (
    "accuracy",
    "auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "sensitivity_at_op",
    "specificity_at_op",
)
"""Example-weighted means over the sites' held-out parts (the clinical ones at 0.5, then at each site's operating point)."""


def over_seeds(cfg: RunConfig, eps: float | None, seeds: int) -> dict[str, dict[str, float]]:
    """:func:`utility` for ``seeds`` seeds (0, 1, ...): mean and sample standard deviation of each figure."""
    runs = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory() as root:
            runs.append(utility(cfg.with_overrides(seed=seed), eps, Path(root)))
    return mean_sd(runs)


def mean_sd(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The mean and sample standard deviation (0 for one run) of each figure of ``runs``."""
    return {
        key: {
            "mean": float(np.mean([r[key] for r in runs])),
            "sd": float(np.std([r[key] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
        }
        for key in runs[0]
    }


def baselines(
    cfg: RunConfig, pretrained: Pretrained, eps: float, seeds: int, scratch: dict[str, Any]
) -> dict[str, Any]:
    """Each site alone (DP, the same schedule in total) and federated from scratch at ``eps``, over seeds.

    Site alone: :func:`server.local.baselines.site_alone` (each site's own DP run, its own
    budget ``eps``), example-weighted over the sites' held-out parts. From scratch: the
    ``scratch`` setup (the task's compact CNN, every weight trained with DP) federated
    in-process (:func:`scripts.tune_privacy.federate`, what the simulation runs, without its
    messaging), with the run-config overrides ``scratch`` (a shorter schedule keeps it cheap).
    """
    from scripts.tune_privacy import federate, site_scores
    from server.local.baselines import site_alone

    run_cfg = cfg.with_overrides(dp=True, target_epsilon=eps)
    out: dict[str, list[dict[str, float]]] = {"each site alone": [], "federated from scratch": []}
    for seed in range(seeds):
        seeded = run_cfg.with_overrides(seed=seed)
        sites = load_sites(seeded.study, seeded.simulation.data_path)
        with tempfile.TemporaryDirectory() as root:
            rows = site_alone(seeded, sites, pretrained, cache_root=Path(root))
        out["each site alone"].append(
            {f"weighted_{name}": weighted_mean(rows, name) for name in ("auc", "balanced_accuracy")}
        )
        start = time.perf_counter()
        study = seeded.study.with_overrides(setup="scratch", **scratch)
        scores = site_scores(sites, federate(study, sites))  # example-weighted over the sites, as above
        out["federated from scratch"].append({
            "weighted_auc": scores["auc"], "weighted_balanced_accuracy": scores["balanced_accuracy"],
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
    return {method: mean_sd(runs) for method, runs in out.items()}


def _cell(figure: dict[str, float]) -> str:
    return "-" if math.isnan(figure["mean"]) else f"{figure['mean']:.3f} ± {figure['sd']:.3f}"


def _overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (kebab-case keys, TOML values) as snake-case overrides."""
    import tomllib

    pairs = [item.split("=", 1) for item in items]
    return {key.strip().replace("-", "_"): tomllib.loads(f"v = {value}")["v"] for key, value in pairs}


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="backbone registry")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per cell (mean ± sd); heart-disease runs 5 at least"
    )
    parser.add_argument(
        "--epsilons", type=str, default="0.5,1,3,8,none", help="comma-separated; 'none' = no DP"
    )
    parser.add_argument(
        "--tasks", type=str, default="heart-disease,chest-xray", help="comma-separated (also: heart-transfer)"
    )
    parser.add_argument("--no-step-times", action="store_true", help="skip the per-step timing")
    parser.add_argument(
        "--heart-schedule", choices=("tuned", "previous"), default="tuned",
        help="heart-disease: the benchmark's DP defaults (tuned) or the MLP at batch 32, 5 x 5, lr 0.05 (previous)",
    )  # fmt: skip
    parser.add_argument(
        "--chest-set", action="append", default=[], metavar="KEY=VALUE",
        help="override a chest-xray run-config key (kebab case, TOML value), e.g. feature-blocks='\"-2\"'",
    )  # fmt: skip
    parser.add_argument(
        "--baselines", action="store_true",
        help="chest-xray: also each site alone and federated from scratch at each epsilon (not none)",
    )  # fmt: skip
    parser.add_argument(
        "--scratch-set", action="append", default=[], metavar="KEY=VALUE",
        help="override a run-config key of the from-scratch baseline, e.g. local-epochs=1 (its cost)",
    )  # fmt: skip
    args = parser.parse_args()
    epsilons = [None if e.strip() == "none" else float(e) for e in args.epsilons.split(",")]
    tasks = {t.strip() for t in args.tasks.split(",")}
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a file gets wide tables
    registry = str(args.state_dir / "registry")
    chest = demo_config(
        "chest-xray", registry_dir=registry, data_path=str(args.data), **_overrides(args.chest_set)
    )
    pretrained = ensure_backbone(chest, console)
    report: dict[str, Any] = {"step_time": {}, "utility": {}}
    if not args.no_step_times:
        for label, cfg in (
            ("head only", chest),
            ("last block + head", chest.with_overrides(trainable="last")),
        ):
            report["step_time"][label] = step_times(cfg, pretrained)
    tuned = args.heart_schedule == "tuned"
    heart = demo_config(
        "heart-disease",
        registry_dir=registry,
        setup="benchmark",
        target_delta=1e-3,
        **(DP_BENCHMARK if tuned else {}),
    )
    schedule = {k: v for k, v in DP_BENCHMARK.items() if k != "model"} if tuned else {}
    transfer = demo_config("heart-disease", registry_dir=registry, target_delta=1e-3, **schedule)
    if "heart-transfer" in tasks:
        ensure_backbone(transfer, console)
    label = "benchmark DP defaults" if tuned else "MLP, previous schedule"
    runs = {"heart-disease": (f"heart-disease (FLamby 4 sites, {label})", heart, max(args.seeds, 5)),
            "heart-transfer": (f"heart-disease transfer (Cleveland backbone, 3 sites, {label})", transfer,
                               max(args.seeds, 5)),
            "chest-xray": ("chest-xray (4 sites)", chest, args.seeds)}  # fmt: skip
    for name, (task, cfg, seeds) in runs.items():
        if name not in tasks:
            continue
        report["utility"][task] = {}
        for eps in epsilons:
            report["utility"][task]["none" if eps is None else f"{eps:g}"] = over_seeds(cfg, eps, seeds)

    if args.baselines and "chest-xray" in tasks:
        report["baselines"] = {
            f"{eps:g}": baselines(chest, pretrained, eps, args.seeds, _overrides(args.scratch_set))
            for eps in epsilons if eps is not None
        }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
    if report["step_time"]:
        table = Table(
            title=f"bench_privacy: time per step, DP-SGD vs plain (chest-xray, batch {chest.study.batch_size})"
        )
        for column in ("trainable", "params", "plain step", "DP step", "ratio", "DP set-up", "target"):
            table.add_column(column, justify="right")
        for label, t in report["step_time"].items():
            table.add_row(
                label, f"{t['trainable_params']:.0f}", f"{1e3 * t['plain_step_s']:.2f} ms",
                f"{1e3 * t['dp_step_s']:.2f} ms", f"{t['ratio']:.2f}x", f"{t['dp_setup_s']:.2f} s",
                "<= 1.5x" if label == "head only" else "-",
            )  # fmt: skip
        console.print(table)
    for task, by_eps in report["utility"].items():
        table = Table(
            title=f"bench_privacy: utility vs epsilon, {task} (mean ± sd over seeds; held-out data)"
        )
        columns = ("epsilon", "mean per-site acc", "weighted acc", "AUC", "balanced acc", "sens / spec at 0.5",
                   "sens / spec at op", "epsilon spent", "wall per run")  # fmt: skip
        for column in columns:
            table.add_column(column, justify="right")
        for eps, u in by_eps.items():
            table.add_row(
                eps, _cell(u["mean_site_accuracy"]), _cell(u["weighted_accuracy"]), _cell(u["weighted_auc"]),
                _cell(u["weighted_balanced_accuracy"]),
                f"{_cell(u['weighted_sensitivity'])} / {_cell(u['weighted_specificity'])}",
                f"{_cell(u['weighted_sensitivity_at_op'])} / {_cell(u['weighted_specificity_at_op'])}",
                _cell(u["max_epsilon"]), f"{u['seconds']['mean']:.0f} s",
            )  # fmt: skip
        console.print(table)
    for eps, methods in report.get("baselines", {}).items():
        table = Table(
            title=f"bench_privacy: chest-xray baselines at epsilon {eps} (mean ± sd over seeds; held-out data)"
        )
        for column in ("method", "AUC", "balanced acc"):
            table.add_column(column, justify="right")
        for method, u in methods.items():
            table.add_row(method, _cell(u["weighted_auc"]), _cell(u["weighted_balanced_accuracy"]))
        console.print(table)


if __name__ == "__main__":
    main()

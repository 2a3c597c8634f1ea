"""Benchmark of federated transfer learning (issue 2), printed as ratios from one run.

1. chest-xray: time of one round of local work at every site with the feature cache vs
   recomputing the backbone every round (target: at least 10x faster);
2. bytes uploaded per client per round vs the full model (target: under 1%), both tasks;
3. held-out accuracy/AUC of federated transfer vs each site alone vs federated from scratch,
   both tasks, on Flower's simulation engine.

Without differential privacy, to measure transfer learning itself; DP is measured by
``scripts/bench_privacy.py``.

Usage::

    .venv/bin/python scripts/bench_transfer.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from client.policy import SitePolicy
from server.local.baselines import site_alone
from server.local.demo import comparison_table, demo_config, ensure_backbone, summarize
from server.local.simulation import simulate
from shared.config import RunConfig
from shared.params import exchanged_names, full_model_bytes, get_arrays, serialized_bytes
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.tasks import load_sites
from shared.training import evaluate, train


def local_round_seconds(cfg: RunConfig, pretrained: Pretrained, cache_dir: Path | None) -> float:
    """Seconds of one round of local work at every site (build, features, train, evaluate)."""
    start = time.perf_counter()
    for site in load_sites(cfg.study, cfg.simulation.data_path):
        model = build_model(cfg.study, pretrained)
        problem = local_problem(cfg.study, model, site, backbone_sha256=pretrained.manifest.sha256, cache_dir=cache_dir)
        train(problem.module, problem.x_train, problem.y_train, train_settings(cfg.study, server_round=1))
        evaluate(problem.module, problem.x_val, problem.y_val)
    return time.perf_counter() - start


def cache_speedup(cfg: RunConfig, pretrained: Pretrained, repeats: int) -> dict[str, float]:
    """Median round time with a warm feature cache and without any cache."""
    with tempfile.TemporaryDirectory() as tmp:
        local_round_seconds(cfg, pretrained, Path(tmp))  # fills the cache (first round)
        cached = [local_round_seconds(cfg, pretrained, Path(tmp)) for _ in range(repeats)]
    recompute = [local_round_seconds(cfg, pretrained, None) for _ in range(repeats)]
    return {
        "cached_s": statistics.median(cached),
        "recompute_s": statistics.median(recompute),
        "speedup": statistics.median(recompute) / statistics.median(cached),
    }


def payload_ratio(cfg: RunConfig, pretrained: Pretrained) -> dict[str, float]:
    """Serialized bytes of the exchanged tensors vs the whole model."""
    model = build_model(cfg.study, pretrained)
    sent = serialized_bytes(get_arrays(model, exchanged_names(model, cfg.study.trainable)))
    full = full_model_bytes(model)
    return {"upload_bytes": sent, "full_model_bytes": full, "ratio": sent / full}


def compare_methods(cfg: RunConfig, pretrained: Pretrained, cache_root: Path, console: Console) -> dict[str, Any]:
    """Federated transfer, each site alone and federated from scratch on held-out data."""
    sites = load_sites(cfg.study, cfg.simulation.data_path)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    no_dp = SitePolicy(require_dp=False)
    transfer = simulate(cfg, num_sites=len(sites), sites_root=cache_root / "transfer", policy=no_dp)
    timings["transfer_s"] = time.perf_counter() - start
    alone = site_alone(cfg, sites, pretrained, cache_root=cache_root / "transfer" / "site-0")
    start = time.perf_counter()
    scratch = simulate(
        cfg.with_overrides(setup="scratch"), num_sites=len(sites), sites_root=cache_root / "scratch", policy=no_dp
    )
    timings["scratch_s"] = time.perf_counter() - start
    comparison = {
        "federated transfer": summarize(transfer.final_rows()),
        "each site alone": summarize(alone),
        "federated from scratch": summarize(scratch.final_rows()),
    }
    console.print(comparison_table(comparison))
    measured_upload = transfer.mean_upload_bytes()
    return {"comparison": comparison, "timings": timings, "measured_upload_bytes": measured_upload}


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repetitions (median)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="registry and caches")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    registry = str(args.state_dir / "registry")
    report: dict[str, Any] = {}
    configs = {
        "heart-disease": demo_config("heart-disease", registry_dir=registry, dp=False),
        "chest-xray": demo_config("chest-xray", registry_dir=registry, data_path=str(args.data), dp=False),
    }
    for task, cfg in configs.items():
        console.rule(task)
        pretrained = ensure_backbone(cfg, console)
        entry: dict[str, Any] = {"payload": payload_ratio(cfg, pretrained)}
        if task == "chest-xray":
            entry["cache"] = cache_speedup(cfg, pretrained, args.repeats)
        with tempfile.TemporaryDirectory() as cache_root:
            entry.update(compare_methods(cfg, pretrained, Path(cache_root), console))
        report[task] = entry

    table = Table(title="bench_transfer: ratios from this run")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    cache = report["chest-xray"]["cache"]
    table.add_row(
        "chest-xray round, recompute backbone / feature cache",
        f"{cache['recompute_s']:.2f}s / {cache['cached_s']:.3f}s = {cache['speedup']:.1f}x",
        ">= 10x",
    )
    for task, entry in report.items():
        pay = entry["payload"]
        table.add_row(
            f"{task}: upload per client per round / full model",
            f"{pay['upload_bytes']} / {pay['full_model_bytes']} B = {100 * pay['ratio']:.3f}%",
            "< 1%" if task == "chest-xray" else "-",
        )
        table.add_row(f"{task}: measured upload in the federation", f"{entry['measured_upload_bytes']:.0f} B", "-")
        for method, summary in entry["comparison"].items():
            wm = summary["weighted_mean"]
            table.add_row(f"{task}: {method} (acc / AUC)", f"{wm['accuracy']:.3f} / {wm['auc']:.3f}", "-")
        t = entry["timings"]
        table.add_row(f"{task}: wall time transfer / scratch federation", f"{t['transfer_s']:.1f}s / {t['scratch_s']:.1f}s", "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()

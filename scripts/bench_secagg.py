"""Benchmark of secure aggregation (issue 4), printed from one run.

1. Time per round, SecAgg+ vs plain FedAvg, on Flower's simulation engine for 4 and 10 chest
   X-ray hospitals (frozen MobileNetV2 + head, no DP so both runs do the same training). The
   time per round is measured between the ends of rounds 1 and R (the simulation's start-up
   and the backbone's distribution in round 1 are not counted).
2. Bytes each site uploads per round, plain vs SecAgg+ (masked int64 vectors).
3. Error of the secure aggregate against the plaintext weighted mean after one round (same
   sites, same deterministic training), with the bound :meth:`SecAggSettings.error_bound`
   gives.
4. Mask generation throughput: CareFL's ChaCha20 generator vs Flower's MT19937 one, for one
   large vector and for the chest head's shapes.

Usage::

    .venv/bin/python scripts/bench_secagg.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from client.policy import SitePolicy
from server.local.demo import demo_config, ensure_backbone
from server.local.simulation import simulate
from server.recorder import FederationRecorder
from server.report.result import FederationResult
from shared.config import RunConfig
from shared.masks import expand_masks
from shared.tasks import load_sites

SITE_COUNTS = (4, 10)
ROUNDS = 4
NO_DP = SitePolicy(require_dp=False)


def timed_run(cfg: RunConfig, sites_root: Path) -> tuple[FederationResult, float]:
    """Run ``cfg``; return its result and the mean seconds per round after round 1."""
    ends: list[float] = []
    recorder = FederationRecorder(listeners=[lambda _round, _rows: ends.append(time.perf_counter())])
    result = simulate(cfg, num_sites=cfg.study.num_sites, sites_root=sites_root, recorder=recorder, policy=NO_DP)
    return result, (ends[-1] - ends[0]) / (len(ends) - 1)


def max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two lists of arrays."""
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def per_value_rate(generate: Callable[[], object], values: int, repeats: int = 5) -> float:
    """Values generated per second (median of ``repeats`` timings)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    return values / statistics.median(times)


def mask_throughput() -> list[dict[str, Any]]:
    """Values per second of both generators, for a large vector and for a head's shapes."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # Flower's own

    seed = os.urandom(32)
    rows = []
    for label, shapes in (("1,048,576 values", [(1 << 20,)]), ("chest head (2 x 1280 + 2)", [(2, 1280), (2,)])):
        values = sum(int(np.prod(s)) for s in shapes)
        ours = per_value_rate(lambda shapes=shapes: expand_masks(seed, 1 << 32, shapes), values)
        flower = per_value_rate(lambda shapes=shapes: pseudo_rand_gen(seed, 1 << 32, shapes), values)
        rows.append({"shapes": label, "carefl_per_s": ours, "flower_per_s": flower, "ratio": ours / flower})
    return rows


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="backbone registry and site caches")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    console = Console()
    report: dict[str, Any] = {"rounds": [], "error": [], "masks": mask_throughput()}

    for count in SITE_COUNTS:
        cfg = demo_config(
            "chest-xray", data_path=str(args.data), num_sites=count, num_rounds=ROUNDS, dp=False,
            registry_dir=str(args.state_dir / "registry"),
        )  # fmt: skip
        ensure_backbone(cfg, console)
        sites_root = args.state_dir / "bench-secagg" / f"{count}-sites"  # feature caches reused
        sizes = [len(s.y_train) for s in load_sites(cfg.study, cfg.simulation.data_path)]
        row: dict[str, Any] = {"sites": count}
        for secure in (False, True):
            run_cfg = cfg.with_overrides(secure_aggregation=secure)
            console.print(f"{count} sites, {'SecAgg+' if secure else 'plain FedAvg'}: {ROUNDS} rounds...")
            result, per_round = timed_run(run_cfg, sites_root)
            key = "secure" if secure else "plain"
            row[f"{key}_s_per_round"] = per_round
            row[f"{key}_upload_bytes"] = result.upload_bytes[ROUNDS][0]
            row[f"{key}_auc"] = result.final_summary()["auc"]
        row["ratio"] = row["secure_s_per_round"] / row["plain_s_per_round"]
        report["rounds"].append(row)

        one = cfg.with_overrides(num_rounds=1)
        plain = simulate(one.with_overrides(secure_aggregation=False), num_sites=count, sites_root=sites_root, policy=NO_DP)
        secure_run = simulate(one, num_sites=count, sites_root=sites_root, policy=NO_DP)
        report["error"].append({
            "sites": count,
            "max_abs_error": max_error(secure_run.parameters, plain.parameters),
            "bound": one.secagg.error_bound(sizes),
            "max_abs_value": max(float(np.max(np.abs(p))) for p in plain.parameters),
        })  # fmt: skip

    table = Table(title=f"bench_secagg: seconds per round (rounds 2-{ROUNDS}), chest-xray, no DP")
    for column in ("sites", "plain s/round", "SecAgg+ s/round", "ratio", "plain B/site/round", "SecAgg+ B/site/round", "AUC plain / SecAgg+"):
        table.add_column(column, justify="right")
    for r in report["rounds"]:
        table.add_row(
            str(r["sites"]), f"{r['plain_s_per_round']:.2f}", f"{r['secure_s_per_round']:.2f}", f"{r['ratio']:.2f}x",
            f"{r['plain_upload_bytes']:,}", f"{r['secure_upload_bytes']:,}", f"{r['plain_auc']:.3f} / {r['secure_auc']:.3f}",
        )  # fmt: skip
    console.print(table)
    table = Table(title="bench_secagg: secure aggregate vs plaintext weighted mean (1 round)")
    for column in ("sites", "max |secure - plain|", "bound", "max |value|"):
        table.add_column(column, justify="right")
    for r in report["error"]:
        table.add_row(str(r["sites"]), f"{r['max_abs_error']:.2e}", f"{r['bound']:.2e}", f"{r['max_abs_value']:.3f}")
    console.print(table)
    table = Table(title="bench_secagg: mask generation, values per second (modulus 2^32)")
    for column in ("shapes", "CareFL ChaCha20", "Flower MT19937", "ratio"):
        table.add_column(column, justify="right")
    for r in report["masks"]:
        table.add_row(r["shapes"], f"{r['carefl_per_s']:.3g}", f"{r['flower_per_s']:.3g}", f"{r['ratio']:.2f}x")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()

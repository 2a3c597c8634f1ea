"""Time per DP-SGD step over a plain step in each of Opacus' per-sample gradient modes (issue 13).

Chest X-ray features of one site (frozen MobileNetV2, as ``bench_privacy``), head only and last
block + head, on the site's first ``--records`` training records (the cost of a step does not
depend on how many records there are, only on the batch). Per-step time is the slope between
1-epoch and ``--epochs``-epoch runs (fastest of ``--repeats`` each, after a warm-up: the
fastest is the least disturbed by other processes), so the per-call set-up (Opacus' wrapping)
is not counted as a step; it is printed separately. All ratios come from one run, on one thread.

Usage::

    .venv/bin/python scripts/bench_dp_modes.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from server.local.demo import demo_config, ensure_backbone
from shared.config import RunConfig
from shared.dp import GRAD_SAMPLE_MODES, train_dp
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.tasks import load_sites
from shared.training import TrainSettings, train

TARGETS = {"head only": 1.5, "last block + head": 3.0}
"""Issue 13's targets for the DP/plain per-step ratio."""


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(
    cfg: RunConfig, pretrained: Pretrained, *, epochs: int, repeats: int, records: int
) -> dict[str, float]:
    """Seconds per step and per-call set-up: plain, and DP-SGD in every mode; ratios to plain."""
    site = load_sites(cfg.study, cfg.simulation.data_path)[1]
    cache = Path(tempfile.mkdtemp(prefix="carefl-bench-"))  # features computed once, not timed

    def module() -> torch.nn.Module:
        model = build_model(cfg.study, pretrained)
        return local_problem(
            cfg.study, model, site, backbone_sha256=pretrained.manifest.sha256, cache_dir=cache
        ).module

    base = local_problem(
        cfg.study,
        build_model(cfg.study, pretrained),
        site,
        backbone_sha256=pretrained.manifest.sha256,
        cache_dir=cache,
    )
    x, y = base.x_train[:records], base.y_train[:records]
    steps = math.ceil(len(y) / cfg.study.batch_size)
    out: dict[str, float] = {
        "trainable_params": float(sum(p.numel() for p in base.module.parameters() if p.requires_grad))
    }

    def runner(mode: str | None) -> Callable[[TrainSettings], float]:
        def run(settings: TrainSettings) -> float:
            m = module()
            if mode is None:
                return _seconds(lambda: train(m, x, y, settings))
            s = replace(settings, grad_sample_mode=mode)
            return _seconds(lambda: train_dp(m, x, y, s, noise_multiplier=1.0, max_grad_norm=1.0))

        return run

    for label in ("plain", *GRAD_SAMPLE_MODES):
        run = runner(None if label == "plain" else label)
        fastest = {}
        for n in (1, 1, epochs):  # the first 1-epoch pass is a warm-up
            settings = train_settings(cfg.study.with_overrides(local_epochs=n), server_round=1)
            fastest[n] = min(run(settings) for _ in range(repeats))
        per_step = (fastest[epochs] - fastest[1]) / ((epochs - 1) * steps)
        out[f"{label}_step_s"] = per_step
        out[f"{label}_setup_s"] = fastest[1] - steps * per_step
    for mode in GRAD_SAMPLE_MODES:
        out[f"{mode}_ratio"] = out[f"{mode}_step_s"] / out["plain_step_s"]
    return out


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="backbone registry")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the long run (the slope's end)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing (the fastest counts)")
    parser.add_argument("--records", type=int, default=256, help="training records timed (8 steps of 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    chest = demo_config("chest-xray", registry_dir=str(args.state_dir / "registry"), data_path=str(args.data))
    pretrained = ensure_backbone(chest, console)
    start = time.perf_counter()
    report = {
        label: step_times(cfg, pretrained, epochs=args.epochs, repeats=args.repeats, records=args.records)
        for label, cfg in (
            ("head only", chest),
            ("last block + head", chest.with_overrides(trainable="last")),
        )
    }
    table = Table(
        title=f"bench_dp_modes: DP-SGD step / plain step (chest-xray, batch {chest.study.batch_size}, 1 thread)"
    )
    for column in (
        "trainable",
        "params",
        "plain step",
        *(f"{m} step (ratio)" for m in GRAD_SAMPLE_MODES),
        "DP set-up",
        "target",
    ):
        table.add_column(column, justify="right")
    for label, t in report.items():
        table.add_row(
            label, f"{t['trainable_params']:.0f}", f"{1e3 * t['plain_step_s']:.2f} ms",
            *(f"{1e3 * t[f'{m}_step_s']:.2f} ms ({t[f'{m}_ratio']:.2f}x)" for m in GRAD_SAMPLE_MODES),
            " / ".join(f"{t[f'{m}_setup_s']:.2f}" for m in GRAD_SAMPLE_MODES) + " s", f"<= {TARGETS[label]:g}x",
        )  # fmt: skip
    console.print(table)
    console.print(f"timed in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

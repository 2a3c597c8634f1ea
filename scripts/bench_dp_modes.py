"""Time per DP-SGD step over a plain step in every per-sample gradient mode (issue 13).

Opacus' modes (hooks, ghost, functorch) and CareFL's closed form for a linear head (``linear``,
head only: it refuses the last block + head). Chest X-ray features of one site (frozen
MobileNetV2, as ``bench_privacy``), head only and last block + head, on the site's first
``--records`` training records (the cost of a step does not depend on how many records there
are, only on the batch). Per-step time is the slope between
1-epoch and ``--epochs``-epoch runs (fastest of ``--repeats`` each, after a warm-up: the
fastest is the least disturbed by other processes), so the per-call set-up (Opacus' wrapping)
is not counted as a step; it is printed separately. All ratios come from one run, on one thread.

Usage::

    .venv/bin/python scripts/bench_dp_modes.py --data ../shared/data/pneumoniamnist.npz
"""

from __future__ import annotations

import argparse
import copy
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
from shared.dp import OPACUS_MODES, train_dp
from shared.pipeline import Pretrained, build_model, local_problem, train_settings
from shared.tasks import load_sites
from shared.training import TrainSettings, train

TARGETS = {"head only": 1.5, "last block + head": 3.0}
"""Issue 13's targets for the DP/plain per-step ratio."""

MODES = (*OPACUS_MODES, "linear")
"""The modes timed (``auto`` is ``linear`` for the head, ``hooks`` otherwise)."""


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_times(
    cfg: RunConfig, pretrained: Pretrained, *, epochs: int, repeats: int, records: int
) -> dict[str, float]:
    """Seconds per step and per-call set-up: plain, and DP-SGD in every mode that applies; ratios to plain.

    The runs of all modes alternate (one of each per repeat), so a change in the machine's load
    during the benchmark touches every mode alike.
    """
    site = load_sites(cfg.study, cfg.simulation.data_path)[1]
    cache = Path(tempfile.mkdtemp(prefix="carefl-bench-"))  # features computed once, not timed
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

    def run(mode: str | None, settings: TrainSettings) -> float:
        m = copy.deepcopy(base.module)  # the same initial parameters every run
        if mode is None:
            return _seconds(lambda: train(m, x, y, settings))
        s = replace(settings, grad_sample_mode=mode)
        return _seconds(lambda: train_dp(m, x, y, s, noise_multiplier=1.0, max_grad_norm=1.0))

    modes = [m for m in MODES if m != "linear" or cfg.study.trains_linear_head()]
    labels = ("plain", *modes)
    schedule = {
        n: train_settings(cfg.study.with_overrides(local_epochs=n), server_round=1) for n in (1, epochs)
    }
    fastest = {(label, n): math.inf for label in labels for n in schedule}
    for repeat in range(repeats + 1):  # the first round is a warm-up
        for label in labels:
            for n, settings in schedule.items():
                seconds = run(None if label == "plain" else label, settings)
                if repeat:
                    fastest[label, n] = min(fastest[label, n], seconds)
    for label in labels:
        per_step = (fastest[label, epochs] - fastest[label, 1]) / ((epochs - 1) * steps)
        out[f"{label}_step_s"] = per_step
        out[f"{label}_setup_s"] = fastest[label, 1] - steps * per_step
    for mode in modes:
        out[f"{mode}_ratio"] = out[f"{mode}_step_s"] / out["plain_step_s"]
    return out


def _cell(times: dict[str, float], mode: str) -> str:
    """``step ms (ratio)`` of ``mode``, or ``n/a`` where it does not apply."""
    if f"{mode}_step_s" not in times:
        return "n/a"
    return f"{1e3 * times[f'{mode}_step_s']:.2f} ms ({times[f'{mode}_ratio']:.2f}x)"


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PneumoniaMNIST .npz (or image folder)")
    parser.add_argument("--state-dir", type=Path, default=Path(".carefl"), help="backbone registry")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the long run (the slope's end)")
    parser.add_argument(
        "--head-epochs", type=int, default=32, help="--epochs of the head only (its steps are short)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per timing (the fastest counts)")
    parser.add_argument("--head-repeats", type=int, default=5, help="--repeats of the head only")
    parser.add_argument("--records", type=int, default=256, help="training records timed (8 steps of 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=180)
    chest = demo_config("chest-xray", registry_dir=str(args.state_dir / "registry"), data_path=str(args.data))
    pretrained = ensure_backbone(chest, console)
    start = time.perf_counter()
    report = {
        "head only": step_times(
            chest, pretrained, epochs=args.head_epochs, repeats=args.head_repeats, records=args.records
        ),
        "last block + head": step_times(
            chest.with_overrides(trainable="last"),
            pretrained,
            epochs=args.epochs,
            repeats=args.repeats,
            records=args.records,
        ),
    }
    table = Table(
        title=f"bench_dp_modes: DP-SGD step / plain step (chest-xray, batch {chest.study.batch_size}, 1 thread)"
    )
    for column in (
        "trainable",
        "params",
        "plain step",
        *(f"{m} step (ratio)" for m in MODES),
        "DP set-up",
        "target",
    ):
        table.add_column(column, justify="right")
    for label, t in report.items():
        table.add_row(
            label, f"{t['trainable_params']:.0f}", f"{1e3 * t['plain_step_s']:.2f} ms",
            *(_cell(t, m) for m in MODES),
            " / ".join(f"{t[f'{m}_setup_s']:.3f}" for m in MODES if f"{m}_setup_s" in t) + " s", f"<= {TARGETS[label]:g}x",
        )  # fmt: skip
    console.print(table)
    console.print(f"timed in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

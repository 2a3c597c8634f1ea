"""Plots of per-site metrics over federated rounds.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, so no pyplot
state and no global backend switch is involved; the PNG is rendered in memory and written
atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.metrics import METRIC_NAMES, SiteRoundMetrics, rounds_of, weighted_mean
from shared.atomic import atomic_write_bytes

DPI = 120
UNIT_INTERVAL_METRICS: frozenset[str] = frozenset({"accuracy", "auc"})
"""Metrics whose values lie in [0, 1]; their y-axis ends just above 1."""

_BASELINE_COLORS: tuple[str, ...] = ("tab:gray", "tab:brown", "tab:olive", "tab:pink", "tab:cyan")


def plot_site_metrics(
    rows: Sequence[SiteRoundMetrics],
    path: Path,
    *,
    title: str,
    metrics: Sequence[str] = ("accuracy", "auc"),
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """Write a PNG with one subplot per metric: each site and the weighted mean over rounds.

    Parameters
    ----------
    rows : Sequence[SiteRoundMetrics]
        One row per site per round.
    path : Path
        Destination PNG; written atomically.
    title : str
        Figure title.
    metrics : Sequence[str]
        Metrics to plot, each one of :data:`server.metrics.METRIC_NAMES`; those without a
        finite value are skipped.
    baselines : Mapping[str, Mapping[str, float]] | None
        Reference values drawn as labelled horizontal dotted lines, as label -> metric -> value,
        e.g. ``{"each site alone": {"accuracy": 0.71}}``; drawn on each subplot whose metric
        they hold.

    Raises
    ------
    ValueError
        When ``rows`` is empty, a metric is unknown, or no metric has a finite value.
    """
    if not rows:
        raise ValueError("`rows` must hold at least one SiteRoundMetrics")
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"`metrics` must be among {list(METRIC_NAMES)}, got {unknown}")
    plotted = [name for name in metrics if _has_finite(rows, name)]
    if not plotted:
        raise ValueError(f"no finite values to plot for metrics {list(metrics)}")
    figure = Figure(figsize=(5.5 * len(plotted), 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(plotted), squeeze=False)[0]
    for ax, name in zip(axes, plotted):
        _draw_metric(ax, rows, name, baselines or {})
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _has_finite(rows: Sequence[SiteRoundMetrics], name: str) -> bool:
    """Return whether any row has a finite value of metric ``name``."""
    return any(math.isfinite(float(getattr(row, name))) for row in rows)


def _draw_metric(
    ax: Axes,
    rows: Sequence[SiteRoundMetrics],
    name: str,
    baselines: Mapping[str, Mapping[str, float]],
) -> None:
    """Draw one metric on ``ax``: a line per site, the weighted mean, and the baselines."""
    values: list[float] = []
    for site in _sites_of(rows):
        site_rows = sorted((row for row in rows if row.site == site), key=lambda row: row.round)
        ys = [float(getattr(row, name)) for row in site_rows]
        if any(math.isfinite(y) for y in ys):
            ax.plot([row.round for row in site_rows], ys, marker="o", linewidth=1.2, label=site)
            values.extend(ys)
    rounds = rounds_of(rows)
    means = [weighted_mean([row for row in rows if row.round == rnd], name) for rnd in rounds]
    ax.plot(rounds, means, linestyle="--", linewidth=3.0, color="black", label="weighted mean")
    values.extend(means)
    values.extend(_draw_baselines(ax, name, baselines))
    ax.set_xlabel("model after round")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if name in UNIT_INTERVAL_METRICS:
        ax.set_ylim(_unit_interval_bottom(values), 1.02)
    ax.legend(loc="best", fontsize="small")


def _sites_of(rows: Sequence[SiteRoundMetrics]) -> list[str]:
    """Return the distinct site names of ``rows`` in order of first appearance."""
    return list(dict.fromkeys(row.site for row in rows))


def _draw_baselines(
    ax: Axes, name: str, baselines: Mapping[str, Mapping[str, float]]
) -> list[float]:
    """Draw the finite baselines of metric ``name`` as dotted lines; return their values."""
    drawn = []
    for index, (label, by_metric) in enumerate(baselines.items()):
        value = float(by_metric.get(name, math.nan))
        if not math.isfinite(value):
            continue
        color = _BASELINE_COLORS[index % len(_BASELINE_COLORS)]
        ax.axhline(value, linestyle=":", linewidth=2.0, color=color, label=f"{label} ({value:.3f})")
        drawn.append(value)
    return drawn


def _unit_interval_bottom(values: Sequence[float]) -> float:
    """Return a lower y-limit for a [0, 1] metric: 0.1 steps, a margin below the smallest value."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return 0.0
    return max(0.0, math.floor((min(finite) - 0.05) * 10.0) / 10.0)

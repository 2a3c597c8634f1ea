"""The hospital's commands for a trained model: ``evaluate`` and ``predict``.

Thin composers over :mod:`client.trained` (read, verify, rebuild the model), :mod:`client.evaluation`
(scores, intervals, report) and :mod:`client.explain` (Grad-CAM, Integrated Gradients). Every
output is checked before the model is loaded and written completely or not at all; errors are
one line with the exit status of their kind (:mod:`server.local.cli`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from shared.errors import ConfigError, InputError

if TYPE_CHECKING:
    from client.evaluation import Evaluation
    from shared.tasks.base import Records

DEFAULT_REGISTRY = Path(".carefl") / "registry"
PROGRESS_MIN = 200
"""Records from which a progress bar is shown."""

ModelOption = Annotated[
    Path,
    typer.Option(help="The model folder: a site's copy (<site-dir>/models/<run-id>/) or a server run folder."),
]
DataOption = Annotated[Path, typer.Option(help="The records: any layout the site trains on (image folder, DICOM, .npz, manifest, CSV).")]
RegistryOption = Annotated[
    Path, typer.Option(help="Backbone registry, tried when the site's store lacks the model's backbone.")
]


def evaluate(
    model: ModelOption,
    data: DataOption,
    operating_point: Annotated[str | None, typer.Option(help="Also re-choose the threshold on these data: youden, sensitivity:S or a fixed threshold.")] = None,
    store_threshold: Annotated[bool, typer.Option(help="Store the re-chosen threshold in the site's site.json (needs --operating-point).")] = False,
    out: Annotated[Path | None, typer.Option(help="Report folder to write (default MODEL/evaluations/<time>-<data>).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the confidence intervals.")] = 1000,
    confidence: Annotated[float, typer.Option(help="Coverage of the confidence intervals.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Score a trained model on a site's labelled data: every metric with bootstrap intervals, ROC, calibration."""
    from client.evaluation import evaluate_probabilities, refuse_occupied, write_report
    from client.evaluation import store_threshold as store
    from client.trained import load_trained_model, read_records

    _check_rule(operating_point)
    if store_threshold and operating_point is None:
        raise ConfigError("--store-threshold stores the threshold --operating-point re-chooses: give --operating-point.")
    if bootstrap < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {bootstrap}.")
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {confidence}.")
    folder = out or _default_report(model, data)
    refuse_occupied(folder, flag="--out")
    trained = load_trained_model(model, registry_dir=registry)
    if store_threshold and trained.site is None:
        raise InputError(f"{model} is a server run folder (no site.json): --store-threshold needs a site's copy.")
    console = Console(stderr=True)
    with _reading(console) as progress:
        records = read_records(trained, data, labelled=True, progress=progress)
    _warn_refused(console, records)
    if records.y is None:
        raise InputError(f"{data}: the records carry no labels; `carefl evaluate` needs labelled data (see `carefl predict`).")
    with _progress(console, len(records.ids), "scoring") as advance:
        probs = trained.probabilities(records.x, advance=advance)
    context = {
        "model": str(model), "model_kind": trained.kind, "task": trained.study.task, "data": str(data),
        "site": (trained.site or {}).get("site"), "run_id": (trained.site or {}).get("run_id"),
        "data_report": records.report.to_json(),
    }  # fmt: skip
    evaluation = evaluate_probabilities(
        records.y, probs, threshold=trained.threshold, rule=trained.rule, rechoose=operating_point,
        resamples=bootstrap, seed=seed, confidence=confidence, context=context,
    )  # fmt: skip
    write_report(evaluation, folder)
    Console().print(summary_table(evaluation))
    if store_threshold:
        point = evaluation.points[-1]
        store(model, point, data=str(data))
        Console().print(f"stored threshold {point.threshold:.4g} ({point.rule}) in {model / 'site.json'}", highlight=False)
    Console().print(f"report: {folder}", highlight=False)


def predict(
    model: ModelOption,
    data: DataOption,
    out: Annotated[Path, typer.Option(help="CSV to write: one row per record (id, probability, label, threshold).")],
    explain: Annotated[Path | None, typer.Option(help="Folder for explanations: a Grad-CAM overlay per image, or per-feature attributions (CSV and bar plot).")] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Apply a trained model to a site's records: probability and label at the site's threshold."""
    from client.evaluation import publish_folder, refuse_occupied
    from client.explain import explanation_files
    from client.trained import load_trained_model, read_records
    from shared.atomic import atomic_write_text, require_writable_dir

    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the CSV file to write.")
    require_writable_dir(out.parent, what="predictions file", hint="choose another --out")
    if explain is not None:
        refuse_occupied(explain, flag="--explain")
    trained = load_trained_model(model, registry_dir=registry)
    console = Console(stderr=True)
    with _reading(console) as progress:
        records = read_records(trained, data, labelled=False, progress=progress)
    _warn_refused(console, records)
    with _progress(console, len(records.ids), "predicting") as advance:
        probs = trained.probabilities(records.x, advance=advance)
    if explain is not None:
        with _progress(console, len(records.ids), "explaining", always=True) as advance:
            files = explanation_files(trained, records, probs, advance=advance)
        publish_folder(explain, files)
    atomic_write_text(out, predictions_csv(records.ids, probs, trained.threshold))
    positives = int((probs >= trained.threshold).sum())
    Console().print(
        f"{len(records.ids)} records -> {out} ({positives} positive at threshold {trained.threshold:.4g}, {trained.rule})"
        + (f"; explanations in {explain}" if explain is not None else ""),
        highlight=False,
    )


def predictions_csv(ids: list[str], probs: object, threshold: float) -> str:
    """CSV text of ``carefl predict``: ``id, probability, label, threshold`` (label 1 when ``probability >= threshold``)."""
    import csv
    import io

    import numpy as np

    values = np.asarray(probs, dtype=np.float64)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "probability", "label", "threshold"])
    for record, p in zip(ids, values, strict=True):
        writer.writerow([record, repr(float(p)), int(p >= threshold), repr(float(threshold))])
    return buffer.getvalue()


def summary_table(evaluation: Evaluation) -> object:
    """A rich table: each metric with its interval, at each operating point."""
    import math

    from rich.table import Table

    from shared.scores import INTERVAL_METRICS

    table = Table(title=f"Evaluation on {len(evaluation.labels)} records ({evaluation.confidence:.0%} bootstrap CI)")
    table.add_column("metric")
    for point in evaluation.points:
        table.add_column(f"{point.name}: threshold {point.threshold:.4g} ({point.rule})", justify="right")
    for name in INTERVAL_METRICS:
        cells = []
        for point in evaluation.points:
            value, (low, high) = getattr(point.metrics, name), point.intervals[name]
            cells.append("n/a" if not math.isfinite(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]")
        table.add_row(name, *cells)
    table.add_row("confusion (tn fp fn tp)", *(f"{p.metrics.tn} {p.metrics.fp} {p.metrics.fn} {p.metrics.tp}" for p in evaluation.points))
    return table


def _check_rule(rule: str | None) -> None:
    from shared.scores import parse_operating_point

    if rule is None:
        return
    try:
        parse_operating_point(rule)
    except ValueError as err:
        raise ConfigError(f"--operating-point {rule!r}: {err}.") from None


def _default_report(model: Path, data: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return model / "evaluations" / f"{stamp}-{data.stem or 'data'}"


@contextmanager
def _progress(console: Console, total: int, what: str, *, always: bool = False) -> Iterator[Callable[[int], None]]:
    """A transient progress bar over ``total`` records (only from :data:`PROGRESS_MIN` records unless ``always``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if total < PROGRESS_MIN and not always:
        yield lambda _done: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda done: progress.advance(task, done)


@contextmanager
def _reading(console: Console) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar for a reader calling ``progress(done, total)`` (large image folders)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("reading"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("reading", total=None, visible=False)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, visible=total >= PROGRESS_MIN)

        yield update


def _warn_refused(console: Console, records: Records) -> None:
    """Name the records the reader left out (they get no row): the first few, then a count."""
    refused = records.report.refused
    if not refused:
        return
    shown = "; ".join(f"{r.where} ({r.reason})" for r in refused[:3])
    more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
    console.print(f"warning: {len(refused)} record(s) left out, no row: {shown}{more}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``predict`` to ``app``."""
    app.command()(evaluate)
    app.command()(predict)

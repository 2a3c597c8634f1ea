"""``carefl data check``: what a hospital's data look like to CareFL, before it joins.

Site-local and read-only: the data are read exactly as the node would read them (the same
readers, the same split), summarized, and nothing is written anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

from shared.errors import InputError
from shared.tasks.report import MAX_LISTED_REFUSALS, DataReport

data_app = typer.Typer(help="A hospital's own data: check it before joining.", no_args_is_help=True)


@data_app.command("check")
def check(
    task: Annotated[str, typer.Option(help="The task the data are for (heart-disease, chest-xray).")],
    data: Annotated[
        Path, typer.Option(help="The site's data: class folders, a manifest CSV, DICOM, an .npz or a table.")
    ],
    val_fraction: Annotated[
        float, typer.Option(help="Share of records held out for validation, as the node would.")
    ] = 0.2,
    split_seed: Annotated[int, typer.Option(help="Seed of the split, as the node would.")] = 42,
    image_size: Annotated[int, typer.Option(help="Side images are resized to (chest-xray).")] = 64,
    missing: Annotated[str, typer.Option(help="Tabular rows with a missing value: drop or impute.")] = "drop",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON (for scripts).")] = False,
) -> None:
    """Read the site's data as its node would, and report what it found; writes nothing.

    Exit 0 when the data are usable; otherwise one line saying why, and a non-zero exit.
    """
    from shared.config import StudyConfig
    from shared.tasks import OwnData, get_task

    cfg = StudyConfig.from_run_config({"task": task, "image-size": image_size, "missing": missing})
    if not data.exists():
        raise InputError(f"{data} does not exist.")
    source = OwnData(path=str(data), name=data.name, val_fraction=val_fraction, seed=split_seed)
    with Progress(
        *Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True), transient=True
    ) as bar:
        reading = bar.add_task(f"reading {data}", total=None)
        report = get_task(cfg.task).check_data(
            cfg, source, progress=lambda done, total: bar.update(reading, completed=done, total=total)
        )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, sort_keys=True, default=str))
    else:
        render(report, Console())
    if not report.usable:
        raise InputError(report.problem if str(data) in report.problem else f"{data}: {report.problem}")
    if not as_json:
        train = sum(report.split.get("train", {}).values())
        val = sum(report.split.get("val", {}).values())
        Console().print(f"[green]usable[/]: {train} training and {val} validation records.", highlight=False)


def render(report: DataReport, console: Console) -> None:
    """Print ``report`` as tables: overview, classes, formats and sizes, refusals, missing values."""
    overview = Table(title=f"{report.task} data at {report.path}", show_header=False)
    overview.add_row("layout", report.layout or "?")
    overview.add_row("records", str(report.records))
    overview.add_row("patients", str(report.patients) if report.patients else "no patient column")
    ratio = report.imbalance()
    overview.add_row(
        "class imbalance", "n/a" if math.isnan(ratio) else f"{ratio:.1f} : 1 (largest : smallest)"
    )
    if report.dropped:
        overview.add_row("rows dropped (missing value)", str(report.dropped))
    overview.add_row("refused", str(len(report.refused)))
    console.print(overview)
    _classes(report, console)
    files = Table(title="what the usable files are", show_header=False)
    for title, counts in (
        ("formats", report.formats), ("image sizes (original)", report.image_sizes), ("bit depths", report.bit_depths),
        *((f"DICOM {key.replace('_', ' ')}", value) for key, value in report.dicom.items()),
    ):  # fmt: skip
        if counts:
            files.add_row(title, _counts(counts))
    if files.row_count:
        console.print(files)
    if report.missing:
        table = Table(title="missing values per column")
        table.add_column("column")
        table.add_column("missing", justify="right")
        table.add_column("imputed", justify="right")
        for column, count in report.missing.items():
            table.add_row(column, str(count), str(report.imputed.get(column, 0)))
        console.print(table)
    if report.refused:
        table = Table(title=f"refused ({len(report.refused)}; the first {MAX_LISTED_REFUSALS} listed)")
        table.add_column("where")
        table.add_column("why")
        for refusal in report.refused[:MAX_LISTED_REFUSALS]:
            table.add_row(refusal.where, refusal.reason)
        console.print(table)


def _classes(report: DataReport, console: Console) -> None:
    table = Table(title="records per class, and the split the node would train with")
    table.add_column("class")
    table.add_column("records", justify="right")
    table.add_column("training", justify="right")
    table.add_column("validation", justify="right")
    train = report.split.get("train", {})
    val = report.split.get("val", {})
    for name, count in report.per_class.items():
        table.add_row(name, str(count), str(train.get(name, "")), str(val.get(name, "")))
    if report.split:
        how = ", ".join(
            word for word, on in (("by patient", report.split.get("by_patient")), ("stratified", report.split.get("stratified"))) if on
        )  # fmt: skip
        table.caption = f"split: {how or 'random'}"
    console.print(table)


def _counts(counts: dict[str, int]) -> str:
    """``"value n, value n, ..."``, most frequent first (the first :data:`MAX_LISTED_REFUSALS`)."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{value} {count}" for value, count in ranked[:MAX_LISTED_REFUSALS])
    return shown + (
        f", ... ({len(ranked) - MAX_LISTED_REFUSALS} more)" if len(ranked) > MAX_LISTED_REFUSALS else ""
    )

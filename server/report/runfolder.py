"""Run folders that are written completely or not at all, and the files that go in them.

A run (training, evaluation, federation) writes into a hidden staging directory next to its
final place; only when the ``with`` block ends without an exception is the staging directory
flushed to disk and renamed onto the final path in one ``os.replace``. Any exception, including
``KeyboardInterrupt``, removes the staging directory, so a reader finds a complete run folder or
none at all.

Example
-------
>>> with RunFolder(Path("runs/heart-disease")) as run:  # doctest: +SKIP
...     write_metrics(run, rows)
...     run.write_json("model_card.json", model_card(task="heart-disease", ...))
...     torch.save(state, run.path("global.pt"))
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from logging import INFO, WARNING
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np

from server.metrics import METRIC_NAMES, SITE_ONLY_NAMES, SiteRoundMetrics, rounds_of, weighted_mean
from shared.atomic import fsync_path, require_writable_dir
from shared.errors import InputError
from shared.log import log

WEIGHTED_MEAN_SITE = "weighted-mean"
"""Site name of the per-round weighted-mean rows in ``metrics.csv``."""

CSV_COLUMNS: tuple[str, ...] = ("round", "site", "num_examples", *METRIC_NAMES)
"""Header of ``metrics.csv``."""

_MAX_STAGING_TRIES = 16


class RunFolder:
    """Context manager that publishes a directory atomically.

    Parameters
    ----------
    final_dir : Path
        Where the run folder appears on success. It must not exist, or be an empty directory.

    Raises
    ------
    InputError
        On ``__enter__``, when ``final_dir`` exists and is not an empty directory.
    """

    def __init__(self, final_dir: Path) -> None:
        self._final = Path(final_dir)
        self._staging: Path | None = None

    @property
    def final(self) -> Path:
        """Path the run folder gets once the ``with`` block succeeds."""
        return self._final

    @property
    def staging(self) -> Path:
        """Hidden directory the files are written to while the ``with`` block runs."""
        if self._staging is None:
            raise RuntimeError("RunFolder.staging is only available inside the `with` block")
        return self._staging

    def __enter__(self) -> RunFolder:
        """Check the final path and create the staging directory next to it."""
        if self._staging is not None:
            raise RuntimeError(f"RunFolder for {self._final} is already active")
        refuse_occupied(self._final)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._staging = _make_staging_dir(self._final)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Publish the staging directory, or remove it when the block raised (and re-raise)."""
        staging = self.staging
        self._staging = None
        if exc_type is not None:
            shutil.rmtree(staging, ignore_errors=True)
            log(WARNING, "run folder %s not written: %s", self._final, exc_type.__name__)
            return
        try:
            _publish(staging, self._final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(INFO, "wrote run folder %s", self._final)

    def path(self, name: str) -> Path:
        """Return the staging path of file ``name``, creating its parent directories.

        Parameters
        ----------
        name : str
            Relative file name, e.g. ``"global.pt"`` or ``"plots/accuracy.png"``; it must stay
            inside the run folder (no absolute path, no ``..``).

        Returns
        -------
        Path
            Where to write the file now; it ends up at ``final / name``.
        """
        relative = Path(name)
        if not relative.parts or relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"`name` must be a relative path inside the run folder, got {name!r}")
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` to file ``name`` of the run folder and return its staging path."""
        target = self.path(name)
        target.write_bytes(data)
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) to file ``name`` of the run folder and return its staging path."""
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: object) -> Path:
        """Write ``obj`` as strict, indented JSON (see :func:`dumps_json`) to file ``name``."""
        return self.write_text(name, dumps_json(obj))


def refuse_occupied(final: Path) -> None:
    """Raise :class:`InputError` unless ``final`` is missing or an empty directory, in a writable place.

    Checked before any work starts (the demo, a local deployment) and again when the folder is
    written: the run folder is staged next to ``final`` and renamed onto it, so its parent
    must be writable (a read-only place would otherwise fail only after training).
    """
    require_writable_dir(final.parent, what=f"run folder {final}: its parent", hint="choose another --out")
    if not final.exists() and not final.is_symlink():
        return
    if final.is_symlink() or not final.is_dir():
        raise InputError(f"run folder {final} exists and is not a directory; choose another --out")
    if any(final.iterdir()):
        raise InputError(f"run folder {final} already exists and is not empty; choose another --out or remove it")


def _make_staging_dir(final: Path) -> Path:
    """Create ``final.parent / .<name>.partial-<random>`` (respecting the umask) and return it."""
    for _ in range(_MAX_STAGING_TRIES):
        candidate = final.parent / f".{final.name}.partial-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"could not create a staging directory next to {final}")


def _publish(staging: Path, final: Path) -> None:
    """Flush every file of ``staging`` to disk and rename it onto ``final``."""
    _fsync_tree(staging)
    if final.is_dir() and not final.is_symlink():
        try:
            final.rmdir()  # only succeeds while it is still empty
        except OSError as err:
            raise InputError(
                f"run folder {final} was filled by someone else during the run; choose another path"
            ) from err
    os.replace(staging, final)
    fsync_path(final.parent)


def _fsync_tree(root: Path) -> None:
    """Fsync every file and directory under ``root`` (directories after their content)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            fsync_path(Path(dirpath) / filename)
        fsync_path(Path(dirpath))


def json_ready(obj: object) -> object:
    """Return ``obj`` converted to plain JSON types.

    Numpy scalars and arrays become Python numbers and lists, NaN and infinities become ``None``,
    tuples become lists, paths become strings and mapping keys become strings.

    Parameters
    ----------
    obj : object
        Nested mappings, sequences, numbers, strings, ``None``, numpy values or paths.

    Returns
    -------
    object
        A value :func:`json.dumps` accepts with ``allow_nan=False``.

    Raises
    ------
    TypeError
        For a value of any other type.
    """
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(key): json_ready(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(item) for item in obj]
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON: {obj!r}")


def dumps_json(obj: object) -> str:
    """Return ``obj`` as strict JSON text (indent 2, final newline); see :func:`json_ready`."""
    return json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n"


def write_metrics(
    folder: RunFolder, rows: Sequence[SiteRoundMetrics], *, stem: str = "metrics"
) -> None:
    """Write ``<stem>.csv`` and ``<stem>.json`` with per-site metrics and their weighted means.

    Parameters
    ----------
    folder : RunFolder
        Active run folder.
    rows : Sequence[SiteRoundMetrics]
        One row per site per round; a (round, site) pair may appear once.
    stem : str
        File name without extension.

    Notes
    -----
    ``round`` is the global model a row measures: the model after round ``r`` (0: the initial model,
    measured when ``evaluate-in-fit`` has the sites evaluate what they receive in round 1).
    The CSV holds one row per site per round, followed in each round by a row with site
    ``"weighted-mean"`` whose ``num_examples`` is the round's total (its ``threshold`` is empty: each
    site has its own operating point). Floats keep full ``repr``
    precision; NaN is an empty cell. The JSON is ``{"rounds": [{"round", "sites",
    "weighted_mean"}]}`` with NaN as ``null``.
    """
    by_round = _group_by_round(rows)
    folder.write_text(f"{stem}.csv", _metrics_csv(by_round))
    folder.write_json(f"{stem}.json", _metrics_document(by_round))


def _group_by_round(rows: Sequence[SiteRoundMetrics]) -> dict[int, list[SiteRoundMetrics]]:
    """Group ``rows`` by round (rounds ascending, sites in input order), rejecting bad rows."""
    seen: set[tuple[int, str]] = set()
    for row in rows:
        if row.site == WEIGHTED_MEAN_SITE:
            raise ValueError(f"site name {WEIGHTED_MEAN_SITE!r} is reserved for the mean rows")
        if (row.round, row.site) in seen:
            raise ValueError(f"site {row.site!r} appears twice in round {row.round}")
        seen.add((row.round, row.site))
    return {rnd: [row for row in rows if row.round == rnd] for rnd in rounds_of(rows)}


def _mean_row(rnd: int, rows: Sequence[SiteRoundMetrics]) -> SiteRoundMetrics:
    """Return the example-weighted mean of one round's ``rows`` as a pseudo-site row."""
    means = {name: weighted_mean(rows, name) for name in METRIC_NAMES if name not in SITE_ONLY_NAMES}
    total = sum(row.num_examples for row in rows)
    return SiteRoundMetrics(round=rnd, site=WEIGHTED_MEAN_SITE, num_examples=total, **means)


def _metrics_csv(by_round: Mapping[int, Sequence[SiteRoundMetrics]]) -> str:
    """Render the grouped metrics as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rnd, rows in by_round.items():
        for row in [*rows, _mean_row(rnd, rows)]:
            cells = [_float_cell(getattr(row, name)) for name in METRIC_NAMES]
            writer.writerow([row.round, row.site, row.num_examples, *cells])
    return buffer.getvalue()


def _float_cell(value: float) -> str:
    """Return ``value`` with full precision, or an empty string for NaN."""
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _metrics_document(by_round: Mapping[int, Sequence[SiteRoundMetrics]]) -> dict[str, object]:
    """Build the ``metrics.json`` document from the grouped metrics."""
    document = []
    for rnd, rows in by_round.items():
        document.append(
            {
                "round": rnd,
                "sites": {row.site: _metric_fields(row) for row in rows},
                "weighted_mean": _metric_fields(_mean_row(rnd, rows)),
            }
        )
    return {"rounds": document}


def _metric_fields(row: SiteRoundMetrics) -> dict[str, object]:
    """Return ``num_examples`` and the metrics of ``row`` (floats, NaN kept for json_ready)."""
    metrics = {name: float(getattr(row, name)) for name in METRIC_NAMES}
    return {"num_examples": row.num_examples, **metrics}


def read_metrics_csv(path: Path) -> list[SiteRoundMetrics]:
    """Read the per-site rows of a ``metrics.csv`` written by :func:`write_metrics`.

    Parameters
    ----------
    path : Path
        The CSV file.

    Returns
    -------
    list[SiteRoundMetrics]
        The per-site rows in file order; weighted-mean rows are left out, empty cells are NaN,
        and so are the metrics of columns an older file lacks.

    Raises
    ------
    InputError
        When the file is missing, has another header, or holds a malformed row.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read metrics file {path}: {err.strerror or err}") from err
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    columns = _metric_columns(header)
    if columns is None:
        expected = ",".join(CSV_COLUMNS)
        raise InputError(f"metrics file {path} must start with header {expected}, found {header}")
    rows = []
    for line_number, cells in enumerate(reader, start=2):
        if len(cells) == 3 + len(columns) and cells[1] == WEIGHTED_MEAN_SITE:
            continue
        rows.append(_parse_row(cells, columns, path, line_number))
    return rows


def _metric_columns(header: Sequence[str] | None) -> tuple[str, ...] | None:
    """The metric columns of a ``metrics.csv`` header, or ``None`` if it is not one.

    A file written before a metric existed lacks its column (the row's field is then NaN); its
    header still starts with ``round,site,num_examples`` and names only known metrics, once each.
    """
    if header is None or tuple(header[:3]) != CSV_COLUMNS[:3]:
        return None
    columns = tuple(header[3:])
    if not columns or len(set(columns)) != len(columns) or not set(columns) <= set(METRIC_NAMES):
        return None
    return columns


def _parse_row(cells: Sequence[str], columns: Sequence[str], path: Path, line_number: int) -> SiteRoundMetrics:
    """Parse one CSV row into :class:`SiteRoundMetrics`, naming the line on failure."""
    if len(cells) != 3 + len(columns):
        raise InputError(
            f"metrics file {path}, line {line_number}: "
            f"expected {3 + len(columns)} cells, found {len(cells)}"
        )
    rnd, site, num_examples, *metric_cells = cells
    try:
        metrics = {
            name: math.nan if cell == "" else float(cell)
            for name, cell in zip(columns, metric_cells)
        }
        return SiteRoundMetrics(
            round=int(rnd), site=site, num_examples=int(num_examples), **metrics
        )
    except ValueError as err:
        raise InputError(f"metrics file {path}, line {line_number}: {err}") from err


def model_card(
    *,
    task: str,
    sites: Sequence[str],
    rounds: int,
    backbone: Mapping[str, object],
    metrics: Mapping[str, object],
    extra: Mapping[str, object] | None = None,
    now: datetime | None = None,
) -> dict[str, object]:
    """Describe a trained model: what, from where, how long, starting from which backbone, how good.

    Parameters
    ----------
    task : str
        Task name, e.g. ``"heart-disease"``.
    sites : Sequence[str]
        Sites that took part.
    rounds : int
        Number of federated rounds (0 or more).
    backbone : Mapping[str, object]
        Pretrained backbone facts (name, weights hash, frozen layers...).
    metrics : Mapping[str, object]
        Final metrics, e.g. the last round's weighted mean.
    extra : Mapping[str, object] | None
        More fields; they may not reuse a standard key.
    now : datetime | None
        Creation time (timezone-aware); the current UTC time when ``None``.

    Returns
    -------
    dict[str, object]
        JSON-ready card with keys ``carefl_version``, ``created_utc``, ``task``, ``sites``,
        ``rounds``, ``backbone``, ``metrics`` and those of ``extra``.
    """
    if rounds < 0:
        raise ValueError(f"`rounds` must be 0 or more, got {rounds}")
    created = datetime.now(UTC) if now is None else now
    if created.tzinfo is None:
        raise ValueError("`now` must be timezone-aware, e.g. datetime.now(timezone.utc)")
    card: dict[str, Any] = {
        "carefl_version": _carefl_version(),
        "created_utc": created.astimezone(UTC).isoformat(timespec="seconds"),
        "task": task,
        "sites": list(sites),
        "rounds": int(rounds),
        "backbone": dict(backbone),
        "metrics": dict(metrics),
    }
    clashes = sorted(set(card) & set(extra or {}))
    if clashes:
        raise ValueError(f"`extra` may not override the standard model card keys {clashes}")
    card.update(extra or {})
    return cast(dict[str, object], json_ready(card))


def _carefl_version() -> str:
    """Return the installed CareFL version, or ``"unknown"`` when it is not installed."""
    try:
        return version("carefl")
    except PackageNotFoundError:
        return "unknown"

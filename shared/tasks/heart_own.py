"""A hospital's own heart-disease CSV, used whole: any hospital, not only the 4 UCI ones.

The file holds one row per record and at least the 10 raw UCI columns the model's 13 features
come from (:data:`shared.tasks.heart.RAW_FEATURES`; ``thalach``, UCI's own spelling, is read as
``thalch``) and a label, ``num`` (UCI's 0-4, disease = ``num > 0``) or ``target`` (0/1). A
``patient_id`` column is optional: with it the split keeps every patient on one side. Any other
column (``dataset``, ``id``, ``slope``, ``ca``, ``thal`` ...) is ignored, logged and listed in the
report (one entry of :attr:`DataReport.refused` whose ``where`` is ``"columns"``).

Values follow the benchmark's column rules (:func:`shared.tasks.heart.parse_column`: numbers,
``True``/``False`` or 1/0, UCI's text levels or their codes), and each numeric column has a
valid range (:data:`RANGES`; every row of the 4 UCI hospitals passes). A resting blood pressure
or a cholesterol of 0 is UCI's code for "not measured" (172 cholesterol values of Switzerland
and VA Long Beach): here it is a missing value, counted as one. Empty cells, ``NA``, ``NaN`` and
``?`` (UCI's own files) are missing too. A value breaking its column's rule or range is refused,
naming the file, the line (the header is line 1) and the column.

A record missing a value is dropped (``missing = "drop"``, FLamby's rule) or filled in
(``"impute"``: the median of a numeric column, the mode of a categorical one, learned from the
site's own training rows only: the split comes first, and the validation rows are filled with
the training values). A record without a label is always dropped. The rows are then
standardized by the training rows; what a new record needs to be prepared the same way is
:attr:`SiteData.preprocessing` (:func:`shared.tasks.heart.describe_preprocessing`), which
:func:`read_records` applies to new patients.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared.errors import ConfigError, InputError
from shared.hashing import sha256_bytes
from shared.log import log
from shared.tasks import heart
from shared.tasks.base import OwnData, Records, SiteData
from shared.tasks.heart_disease import HEART
from shared.tasks.report import DataReport
from shared.tasks.split import site_split

__all__ = [
    "ALIASES", "CATEGORICAL", "CLASS_NAMES", "LABEL_COLUMNS", "NUMERIC", "PATIENT_COLUMN", "RANGES",
    "RECORD_ID_COLUMN", "ZERO_IS_MISSING", "load_own", "read_records", "transform",
]  # fmt: skip

NUMERIC: tuple[str, ...] = ("age", "trestbps", "chol", "thalch", "oldpeak")
"""Raw columns imputed with their training median."""
CATEGORICAL: tuple[str, ...] = ("sex", "cp", "fbs", "restecg", "exang")
"""Raw columns imputed with their training mode (the smallest code on a tie)."""
LABEL_COLUMNS: tuple[str, ...] = ("num", "target")
PATIENT_COLUMN = "patient_id"
RECORD_ID_COLUMN = "id"
ALIASES: dict[str, str] = {"thalach": "thalch"}
ZERO_IS_MISSING: tuple[str, ...] = ("trestbps", "chol")
"""Columns whose value 0 is UCI's "not measured"."""
RANGES: dict[str, tuple[float, float, str]] = {
    "age": (0.0, 120.0, "years"),
    "trestbps": (50.0, 250.0, "mmHg"),
    "chol": (50.0, 1000.0, "mg/dl"),
    "thalch": (30.0, 250.0, "bpm"),
    "oldpeak": (-5.0, 10.0, "mm"),
}
"""Valid range (inclusive) and unit per numeric column; the UCI data span 28-77, 80-200, 85-603, 60-202, -2.6-6.2."""
CLASS_NAMES: tuple[str, str] = ("no disease", "disease")
_NA_VALUES = ["?"]
_PREPROCESSING_KIND = "tabular-standardize"


@dataclass(frozen=True)
class _Table:
    """A CSV's rows, parsed; indexed by row (the CSV line minus 2).

    Attributes
    ----------
    features : pd.DataFrame
        The raw feature columns as floats (codes for levels), NaN where missing.
    labels : pd.Series | None
        0/1 as floats, NaN where missing; ``None`` when not read.
    label_column : str
        The label column read ("" when none).
    patients, record_ids : pd.Series | None
        The ``patient_id`` and ``id`` columns as text (NaN where blank), if the file has them.
    ignored : list[str]
        Columns not used.
    """

    features: pd.DataFrame
    labels: pd.Series | None
    label_column: str
    patients: pd.Series | None
    record_ids: pd.Series | None
    ignored: list[str]


def load_own(source: OwnData, *, missing: str) -> tuple[SiteData, DataReport]:
    """Read a hospital's heart-disease CSV whole, split it the site's way and standardize it.

    Parameters
    ----------
    source : OwnData
        The CSV (``path``), the site's name, its ``val_fraction`` and ``seed``.
    missing : str
        ``drop`` a record missing a value, or ``impute`` it from the training rows.

    Returns
    -------
    tuple[SiteData, DataReport]
        The site's data (its :attr:`~SiteData.preprocessing` set) and the report of what was read.

    Raises
    ------
    InputError
        Naming the file, the line and the column of a wrong value; a missing column; too few
        usable rows for both parts; a column with no training value to impute from.
    """
    if missing not in ("drop", "impute"):
        raise ConfigError(f"`missing` must be drop or impute, got {missing!r}.")
    path = Path(source.path)
    table = _read_table(path, labelled=True, zero_is_missing=ZERO_IS_MISSING)
    assert table.labels is not None
    report = DataReport(task=HEART.name, path=str(path), layout="csv")
    _report_columns(report, table, path)
    features, labels = table.features, table.labels
    report.missing = _missing_counts(table)
    usable = labels.notna()
    if missing == "drop":
        usable &= features.notna().all(axis=1)
    rows = features.index[usable.to_numpy()]
    dropped = len(features) - len(rows)
    if not len(rows):
        raise InputError(
            f"{path}: none of its {len(features)} rows is usable: each misses its label or a value."
        )
    patients = None
    if table.patients is not None:
        _refuse_blank_patients(table.patients, path)
        patients = table.patients.loc[rows].to_numpy()
    y = labels.loc[rows].to_numpy().astype(np.int64)
    split = site_split(
        y, val_fraction=source.val_fraction, seed=source.seed, patients=patients, source=str(path)
    )
    train_rows, val_rows = rows[split.train], rows[split.val]
    impute = _impute_values(features.loc[train_rows], path) if missing == "impute" else {}
    if impute:
        report.imputed = {c: n for c in heart.RAW_FEATURES if (n := int(features.loc[rows, c].isna().sum()))}
    encoded_train = heart.encode(features.loc[train_rows].fillna(impute)).to_numpy(dtype=np.float64)
    mean = encoded_train.mean(axis=0)
    scale = encoded_train.std(axis=0)
    scale[scale == 0] = 1.0
    preprocessing = heart.describe_preprocessing(
        mean, scale, impute=impute, missing=missing, zero_is_missing=ZERO_IS_MISSING
    )
    blob = json.dumps({"features": heart.FEATURES, "missing": missing, "zero_is_missing": ZERO_IS_MISSING})
    fingerprint = sha256_bytes(
        blob.encode()
        + features.loc[rows].to_numpy(dtype=np.float64).tobytes()
        + y.tobytes()
        + split.train.tobytes()
        + split.val.tobytes()
    )
    site = SiteData(
        name=source.name,
        x_train=transform(features.loc[train_rows], preprocessing),
        y_train=y[split.train],
        x_val=transform(features.loc[val_rows], preprocessing),
        y_val=y[split.val],
        fingerprint=fingerprint,
        dropped=dropped,
        preprocessing=preprocessing,
    )
    report.records = len(rows)
    report.per_class = _per_class(y)
    report.formats = Counter({"CSV": len(rows)})
    report.dropped = dropped
    report.patients = int(len(set(patients.tolist()))) if patients is not None else 0
    report.split = {
        "train": _per_class(site.y_train),
        "val": _per_class(site.y_val),
        "by_patient": split.by_patient,
        "stratified": split.stratified,
    }
    log(
        INFO, "%s: %d rows used (%d training, %d validation), %d dropped (missing = %s), %d imputed",
        source.name, len(rows), site.num_train, site.num_val, dropped, missing, sum(report.imputed.values()),
    )  # fmt: skip
    return site, report


def read_records(path: Path, *, preprocessing: Mapping[str, Any], labelled: bool) -> Records:
    """Read new patients' rows (the columns of :func:`load_own`) and prepare them as the site's training rows.

    A missing value is filled with the stored training value (a model trained with
    ``missing = "impute"``), or the row is refused and listed in the report as ``file, line N``
    (``"drop"``). With ``labelled``, a label column is required and a row without a label is
    refused; without it, a label column is ignored.

    Each record's id is its ``id`` column value, else its ``patient_id``, else ``line N`` (also
    where that cell is blank), so that a hospital can join the predictions back to its rows.

    Parameters
    ----------
    path : Path
        The CSV.
    preprocessing : Mapping[str, Any]
        :attr:`SiteData.preprocessing` of the site the model was trained at.
    labelled : bool
        Whether labels are required (evaluate) or ignored (predict).

    Raises
    ------
    ConfigError
        If ``preprocessing`` is not a heart-disease standardization.
    InputError
        Naming the file, the line and the column of a wrong value; a missing column; no usable row.
    """
    _check_preprocessing(preprocessing)
    path = Path(path)
    table = _read_table(path, labelled=labelled, zero_is_missing=tuple(preprocessing["zero_is_missing"]))
    report = DataReport(task=HEART.name, path=str(path), layout="csv")
    _report_columns(report, table, path)
    features = table.features
    report.missing = _missing_counts(table)
    drop = preprocessing["missing"] == "drop"
    kept, refused = [], 0
    for index in features.index:
        where = heart.where_row(path, index)
        if table.labels is not None and np.isnan(table.labels.loc[index]):
            report.refuse(where, f"no label (`{table.label_column}`)")
            refused += 1
            continue
        absent = [c for c in heart.RAW_FEATURES if np.isnan(features.at[index, c])]
        if absent and drop:
            names = ", ".join(f"`{c}`" for c in absent)
            report.refuse(where, f"missing value in {names} (the model was trained with missing = drop)")
            report.dropped += 1
            refused += 1
            continue
        kept.append(index)
    if not kept:
        first = f": {report.refused[-1].reason}" if report.refused else ""
        raise InputError(f"{path}: none of its {len(features)} rows is usable{first}.")
    rows = features.loc[kept]
    if not drop:
        report.imputed = {c: n for c in heart.RAW_FEATURES if (n := int(rows[c].isna().sum()))}
    y = table.labels.loc[kept].to_numpy().astype(np.int64) if table.labels is not None else None
    report.records = len(kept)
    report.per_class = _per_class(y) if y is not None else {}
    report.formats = Counter({"CSV": len(kept)})
    log(INFO, "%s: %d records read, %d refused", path, len(kept), refused)
    return Records(ids=_ids(table, kept), x=transform(rows, preprocessing), y=y, report=report)


def transform(frame: pd.DataFrame, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """Model inputs of parsed raw rows, prepared by a site's stored ``preprocessing``.

    UCI's 0 is made missing where ``zero_is_missing`` says so, missing values are filled with
    the stored ``impute`` values, the 13 features are encoded (:func:`shared.tasks.heart.encode`)
    and standardized with the stored ``mean`` and ``scale``.

    Parameters
    ----------
    frame : pd.DataFrame
        The :data:`shared.tasks.heart.RAW_FEATURES` columns as :func:`shared.tasks.heart.parse_column`
        gives them (floats, level codes), NaN where missing.
    preprocessing : Mapping[str, Any]
        :attr:`SiteData.preprocessing`.

    Returns
    -------
    np.ndarray
        float32, one row per row of ``frame``, 13 columns.

    Raises
    ------
    ConfigError
        If ``preprocessing`` is not a heart-disease standardization.
    ValueError
        If a value is missing and ``preprocessing`` has none to fill it with (callers drop such rows).
    """
    _check_preprocessing(preprocessing)
    raw = _mark_unknown(
        frame[list(heart.RAW_FEATURES)].astype(np.float64), tuple(preprocessing["zero_is_missing"])
    )
    filled = raw.fillna({c: float(v) for c, v in preprocessing["impute"].items()})
    x = heart.encode(filled).to_numpy(dtype=np.float64)
    mean = np.asarray(preprocessing["mean"], dtype=np.float64)
    scale = np.asarray(preprocessing["scale"], dtype=np.float64)
    return ((x - mean) / scale).astype(np.float32)


# ------------------------------------------------------------------ reading


def _read_table(path: Path, *, labelled: bool, zero_is_missing: tuple[str, ...]) -> _Table:
    """Read and parse the CSV at ``path`` (a label column is required only if ``labelled``)."""
    frame = _read_csv(path)
    columns = list(frame.columns)
    for alias, name in ALIASES.items():
        if alias in columns:
            if name in columns:
                raise InputError(f"{path}, line 1: both `{name}` and `{alias}` (the same column): keep one.")
            frame = frame.rename(columns={alias: name})
    absent = [c for c in heart.RAW_FEATURES if c not in frame.columns]
    if absent:
        raise InputError(
            f"{path}, line 1: missing column(s) {', '.join(f'`{c}`' for c in absent)} "
            f"(required: {', '.join(heart.RAW_FEATURES)}, and `num` or `target`)."
        )
    label_column = ""
    if labelled:
        present = [c for c in LABEL_COLUMNS if c in frame.columns]
        if not present:
            raise InputError(
                f"{path}, line 1: no label column: `num` (UCI's 0-4, 0 = no disease) or `target` (0/1)."
            )
        if len(present) > 1:
            raise InputError(f"{path}, line 1: both `num` and `target` label the rows: keep one.")
        label_column = present[0]
    features = pd.DataFrame(
        {c: heart.parse_column(frame[c], c, path) for c in heart.RAW_FEATURES}, index=frame.index
    )
    _check_ranges(frame, features, path)
    zeros = {c: n for c in zero_is_missing if (n := int((features[c] == 0).sum()))}
    if zeros:
        counts = ", ".join(f"{c} {n}" for c, n in zeros.items())
        log(INFO, "%s: values 0 read as missing (UCI's code for not measured): %s", path, counts)
    features = _mark_unknown(features, zero_is_missing)
    labels = None
    if label_column:
        parsed = heart.parse_column(frame[label_column], label_column, path)
        labels = parsed.where(parsed.isna(), (parsed > 0).astype(np.float64))
    used = {*heart.RAW_FEATURES, label_column, PATIENT_COLUMN}
    ignored = [c for c in frame.columns if c not in used]
    text = {c: _text(frame[c]) if c in frame.columns else None for c in (PATIENT_COLUMN, RECORD_ID_COLUMN)}
    return _Table(features, labels, label_column, text[PATIENT_COLUMN], text[RECORD_ID_COLUMN], ignored)


def _text(column: pd.Series) -> pd.Series:
    """A text column's values stripped, NaN where blank."""
    return column.map(lambda v: v.strip() if isinstance(v, str) and v.strip() else np.nan)


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV as text cells (NaN where empty), indexed by line - 2; blank lines skipped."""
    if not path.is_file():
        raise InputError(f"{path}: heart-disease CSV not found.")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
        frame = pd.read_csv(
            path,
            dtype=str,
            index_col=False,
            na_values=_NA_VALUES,
            skip_blank_lines=False,
            skipinitialspace=True,
            encoding="utf-8",
        )
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: not a readable CSV ({err}).") from err
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(
            f"{path}, line 1: column(s) {', '.join(f'`{c}`' for c in repeated)} appear more than once."
        )
    frame.columns = header
    return frame.dropna(how="all")


def _check_ranges(frame: pd.DataFrame, features: pd.DataFrame, path: Path) -> None:
    """Refuse the first value outside its column's valid range (UCI's 0 code exempt where it has one)."""
    for name, (low, high, unit) in RANGES.items():
        values = features[name]
        outside = values.notna() & ((values < low) | (values > high))
        if name in ZERO_IS_MISSING:
            outside &= values != 0
        if outside.any():
            index = outside.index[outside.to_numpy()][0]
            raise InputError(
                f"{heart.where_row(path, index)}, column `{name}`: {frame.at[index, name]!r} is outside "
                f"the valid range {low:g} to {high:g} {unit}."
            )


def _mark_unknown(features: pd.DataFrame, zero_is_missing: tuple[str, ...]) -> pd.DataFrame:
    """``features`` with UCI's 0 ("not measured") as NaN in the columns ``zero_is_missing`` names."""
    marked = features.copy()
    for name in zero_is_missing:
        marked.loc[marked[name] == 0, name] = np.nan
    return marked


def _refuse_blank_patients(patients: pd.Series, path: Path) -> None:
    blank = patients.isna()
    if blank.any():
        index = blank.index[blank.to_numpy()][0]
        raise InputError(
            f"{heart.where_row(path, index)}, column `{PATIENT_COLUMN}`: no patient id (with a patient column, "
            "every row needs one)."
        )


# ------------------------------------------------------------------ preprocessing and report


def _impute_values(train: pd.DataFrame, path: Path) -> dict[str, float]:
    """Median of each numeric column, mode of each categorical one, over the training rows."""
    values: dict[str, float] = {}
    for name in heart.RAW_FEATURES:
        column = train[name].dropna()
        if column.empty:
            raise InputError(
                f"{path}, column `{name}`: no value in the site's {len(train)} training rows to impute from."
            )
        values[name] = float(column.median()) if name in NUMERIC else float(column.mode().min())
    return values


def _check_preprocessing(preprocessing: Mapping[str, Any]) -> None:
    """Refuse a stored preprocessing that is not a heart-disease standardization of the 13 features."""
    kind = preprocessing.get("kind")
    if kind != _PREPROCESSING_KIND or list(preprocessing.get("features", ())) != list(heart.FEATURES):
        raise ConfigError(
            f"the model's preprocessing is not the heart-disease task's (kind {kind!r}, features "
            f"{preprocessing.get('features')!r}): was it trained on another task?"
        )
    for key in ("mean", "scale"):
        if len(preprocessing.get(key, ())) != heart.NUM_FEATURES:
            raise ConfigError(f"the model's preprocessing has no {heart.NUM_FEATURES} `{key}` values.")
    if preprocessing.get("missing") not in ("drop", "impute"):
        raise ConfigError(f"the model's preprocessing has `missing` {preprocessing.get('missing')!r}.")
    impute = preprocessing.get("impute", {})
    if preprocessing["missing"] == "impute" and sorted(impute) != sorted(heart.RAW_FEATURES):
        raise ConfigError("the model's preprocessing imputes, but not every column has a value to impute.")


def _report_columns(report: DataReport, table: _Table, path: Path) -> None:
    if table.ignored:
        names = ", ".join(table.ignored)
        log(INFO, "%s: columns not used by the model, ignored: %s", path, names)
        report.refuse("columns", f"not used by the model, ignored: {names}")


def _missing_counts(table: _Table) -> dict[str, int]:
    counts = {c: int(n) for c, n in table.features.isna().sum().items() if n}
    if table.labels is not None and (n := int(table.labels.isna().sum())):
        counts[table.label_column] = n
    return counts


def _per_class(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASS_NAMES))
    return {name: int(counts[k]) for k, name in enumerate(CLASS_NAMES)}


def _ids(table: _Table, rows: list[Any]) -> list[str]:
    """Each row's id: its ``id``, else its ``patient_id``, else (also where blank) ``line N``."""
    column = table.record_ids if table.record_ids is not None else table.patients
    ids = []
    for index in rows:
        value = column.loc[index] if column is not None else np.nan
        ids.append(str(value) if isinstance(value, str) else f"line {int(index) + 2}")
    return ids

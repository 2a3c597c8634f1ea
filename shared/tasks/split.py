"""A site's own train/validation split: stratified by label, by patient when patients are known.

Every format a hospital brings (image folder, manifest, DICOM, tabular CSV) is split here, with
the ``val-fraction`` and seed the site sets in its node config. With a patient column no patient
has records on both sides (several images of one patient, or repeated visits, would otherwise
leak the patient into validation and flatter every figure).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError, InputError

MIN_PER_CLASS_TO_STRATIFY = 2
"""A class with fewer records than this cannot be spread over both parts: the split is then unstratified."""


@dataclass(frozen=True)
class Split:
    """Indices of a site's training and validation records.

    Attributes
    ----------
    train, val : np.ndarray
        Sorted int64 indices into the site's records; disjoint, together every record.
    stratified : bool
        Whether the split kept each class's share on both sides.
    by_patient : bool
        Whether whole patients were assigned (no patient on both sides).
    """

    train: np.ndarray
    val: np.ndarray
    stratified: bool
    by_patient: bool


def site_split(
    labels: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
    patients: np.ndarray | None = None,
    source: str = "the site's data",
) -> Split:
    """Split a site's records into training and validation parts.

    Parameters
    ----------
    labels : np.ndarray
        Integer label of each record.
    val_fraction : float
        Share of records (of patients, with ``patients``) held out, in (0, 1).
    seed : int
        Seed of the split; the same seed gives the same parts.
    patients : np.ndarray, optional
        Patient id of each record (any hashable values); then the split is by patient,
        stratified on each patient's most frequent label (scikit-learn's
        ``StratifiedGroupKFold``, one fold of ``round(1 / val_fraction)``).
    source : str
        Names the data in errors.

    Returns
    -------
    Split
        The parts.

    Raises
    ------
    ConfigError
        If ``val_fraction`` is outside (0, 1).
    InputError
        If there are too few records (or patients) for both parts.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"`val-fraction` must be in (0, 1), got {val_fraction}.")
    labels = np.asarray(labels)
    if patients is not None:
        return _by_patient(labels, np.asarray(patients), val_fraction, seed, source)
    if len(labels) < 2:
        raise InputError(
            f"{source}: {len(labels)} record(s) cannot be split into training and validation parts."
        )
    from sklearn.model_selection import train_test_split

    stratify = _stratifiable(labels)
    indices = np.arange(len(labels))
    try:
        train, val = train_test_split(
            indices, test_size=val_fraction, stratify=labels if stratify else None, random_state=seed
        )
    except ValueError as err:
        raise InputError(
            f"{source}: cannot split {len(labels)} records with val-fraction {val_fraction}: {err}"
        ) from err
    return Split(np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), stratify, False)


def _stratifiable(labels: np.ndarray) -> bool:
    _, counts = np.unique(labels, return_counts=True)
    return len(counts) > 1 and int(counts.min()) >= MIN_PER_CLASS_TO_STRATIFY


def _by_patient(
    labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int, source: str
) -> Split:
    """Assign whole patients to one side, stratified on each patient's majority label."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if len(patients) != len(labels):
        raise InputError(f"{source}: {len(patients)} patient ids for {len(labels)} records.")
    groups = np.unique(patients.astype(str), return_inverse=True)[1]
    num_patients = int(groups.max()) + 1 if len(groups) else 0
    if num_patients < 2:
        raise InputError(
            f"{source}: {num_patients} patient(s) cannot be split by patient into training and validation parts."
        )
    indices = np.arange(len(labels))
    folds = max(2, round(1.0 / val_fraction))
    majority = np.array([np.bincount(labels[groups == g]).argmax() for g in range(num_patients)])
    if _stratifiable(majority) and num_patients >= folds:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        train, val = next(splitter.split(indices, labels, groups))
        stratified = True
    else:
        splitter_g = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter_g.split(indices, labels, groups))
        stratified = False
    if len(train) == 0 or len(val) == 0:
        raise InputError(
            f"{source}: {num_patients} patients leave one part empty with val-fraction {val_fraction}."
        )
    return Split(np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), stratified, True)

"""A hospital's own chest X-rays, used whole: its site data, its data report, records to predict.

The counterpart, for one real site, of :mod:`shared.tasks.chest` (which partitions one shared
data set into simulated sites, and stays for simulations). The site's data path is read whole:

* class folders or a CSV manifest (:mod:`shared.tasks.images`: PNG, JPEG, TIFF, BMP, DICOM),
  split by :func:`shared.tasks.split.site_split` with the site's ``val-fraction`` and seed; by
  patient when the manifest has a ``patient_id`` column, or when every image is DICOM with a
  Patient ID (kept in memory for the split only: never written, logged or reported);
* a ``.npz`` in MedMNIST layout, as :func:`shared.tasks.chest_data.load_image_dataset` reads
  it, its own train/validation split kept.

Every image is resized to the study's ``image-size`` squared as it is read. Labels follow the
task's one rule (:func:`shared.tasks.base.label_problem`); the classes (sorted class names, or
``0 .. k-1`` for integer labels) are kept in :attr:`SiteData.preprocessing` so that records a
trained model is applied to (:func:`read_image_records`) get the same label for the same class.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import InputError
from shared.log import log
from shared.tasks.base import OwnData, Records, SiteData, class_counts, label_problem
from shared.tasks.chest_xray import CHEST
from shared.tasks.images import (
    ImageFiles,
    Progress,
    ReadImages,
    find_entries,
    is_integer_label,
    read_entries,
    resize_square,
)  # fmt: skip
from shared.tasks.report import DataReport
from shared.tasks.split import site_split

if TYPE_CHECKING:
    from shared.config import StudyConfig

NPZ_PARTS: tuple[str, ...] = ("train", "val", "test")
"""MedMNIST parts a ``.npz`` may hold (``<part>_images``, ``<part>_labels``)."""


def load_own_images(
    cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None
) -> tuple[SiteData, DataReport]:
    """Read a hospital's chest X-rays whole and split them the site's way.

    Parameters
    ----------
    cfg : StudyConfig
        The study (its ``image_size``).
    source : OwnData
        The site's data path, name, validation fraction and seed.
    progress : Progress, optional
        Called as ``progress(done, total)`` after each file read.

    Returns
    -------
    tuple[SiteData, DataReport]
        The site's images (float32 (N, S, S) in ``[0, 255]``) and labels, and the report.

    Raises
    ------
    InputError
        If nothing usable is there, or the labels do not fit the task (one line naming the path).
    """
    report = DataReport(task=CHEST.name, path=str(source.path))
    return _load(cfg, source, report, progress), report


def check_own_images(cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None) -> DataReport:
    """The data report of :func:`load_own_images`, with ``problem`` set instead of raising.

    For ``carefl data check``: a hospital sees what was read and refused even when the data
    cannot be used.
    """
    report = DataReport(task=CHEST.name, path=str(source.path))
    try:
        _load(cfg, source, report, progress)
    except InputError as err:
        report.problem = str(err)
    return report


def read_image_records(
    cfg: StudyConfig,
    path: str,
    *,
    preprocessing: Mapping[str, Any],
    labelled: bool,
    progress: Progress | None = None,
) -> Records:
    """Read chest X-rays a trained model is applied to: the training layouts, or unlabelled files.

    Parameters
    ----------
    cfg : StudyConfig
        The study the model was trained in (its ``image_size``).
    path : str
        Class folders, a CSV manifest or a MedMNIST ``.npz``; when ``labelled`` is false also a
        folder of image files (any subfolders) or one image file, or a manifest with a ``path``
        column only.
    preprocessing : Mapping[str, Any]
        The site's :attr:`SiteData.preprocessing`: its ``classes`` map class names to labels.
    labelled : bool
        Whether labels are required (then returned in ``y``) or ignored (``y`` is ``None``).
    progress : Progress, optional
        Called as ``progress(done, total)`` after each file read.

    Returns
    -------
    Records
        ids (paths relative to ``path``; ``train_images[i]`` ... for an npz), images, labels, report.

    Raises
    ------
    InputError
        If nothing usable is there, or a label is not one of the model's classes.
    """
    source = Path(path)
    report = DataReport(task=CHEST.name, path=str(path))
    known = tuple(str(name) for name in preprocessing.get("classes") or ()) or None
    if _is_npz(source):
        ids, x, y, classes = _records_npz(source, cfg.image_size, report)
    else:
        found = find_entries(source, labelled=labelled, report=report)
        read = read_entries(
            found.entries, image_size=cfg.image_size, report=report, source=source, progress=progress
        )
        ids, x = [entry.id for entry in read.entries], read.x
        y, classes = _labels(read, found, source=source, known=known) if labelled else (None, ())
    report.records = len(ids)
    if not labelled:
        return Records(ids, x, None, report)
    assert y is not None
    if known is not None and classes != known:
        y, classes = _relabel(y, classes, known, source)
    report.per_class = _per_class(y, classes)
    problem = label_problem(y, CHEST, need_every_class=False)
    if problem is not None:
        raise InputError(f"{source}: the records {problem} (counts {class_counts(y, classes)}).")
    return Records(ids, x, y, report)


# ---------------------------------------------------------------------------------------------
# A site's own data
# ---------------------------------------------------------------------------------------------


def _load(cfg: StudyConfig, source: OwnData, report: DataReport, progress: Progress | None) -> SiteData:
    path = Path(source.path)
    if _is_npz(path):
        return _load_npz(cfg, source, report)
    found = find_entries(path, labelled=True, report=report)
    read = read_entries(
        found.entries, image_size=cfg.image_size, report=report, source=path, progress=progress
    )
    y, classes = _labels(read, found, source=path, known=None)
    report.records = len(y)
    report.per_class = _per_class(y, classes)
    problem = label_problem(y, CHEST, need_every_class=True)
    if problem is not None:
        raise InputError(f"{path}: the site's images {problem} (counts {class_counts(y, classes)}).")
    patients = _patients(found, read)
    report.patients = len(set(patients.tolist())) if patients is not None else 0
    split = site_split(
        y, val_fraction=source.val_fraction, seed=source.seed, patients=patients, source=str(path)
    )
    report.split = {
        "train": _per_class(y[split.train], classes), "val": _per_class(y[split.val], classes),
        "by_patient": split.by_patient, "stratified": split.stratified,
    }  # fmt: skip
    problem = label_problem(y[split.train], CHEST, need_every_class=True)
    if problem is not None:
        raise InputError(
            f"{path}: the site's training part {problem} (counts {class_counts(y[split.train], classes)}); "
            "add images of the missing class or lower `val-fraction`."
        )
    site = SiteData(
        name=source.name,
        x_train=read.x[split.train], y_train=y[split.train], x_val=read.x[split.val], y_val=y[split.val],
        fingerprint=_fingerprint(read.x, y, split.train, split.val, cfg.image_size),
        preprocessing={"classes": list(classes), "image_size": cfg.image_size},
    )  # fmt: skip
    log(
        INFO, "%s: %d images (%d training, %d validation; %s), classes %s", source.name, len(y), site.num_train,
        site.num_val, "by patient" if split.by_patient else "by image", ", ".join(classes),
    )  # fmt: skip
    return site


def _load_npz(cfg: StudyConfig, source: OwnData, report: DataReport) -> SiteData:
    """A MedMNIST ``.npz``: its own train/validation split kept, images resized to ``image_size``."""
    from shared.tasks.chest import check_dataset
    from shared.tasks.chest_data import load_image_dataset

    path = Path(source.path)
    dataset = load_image_dataset(path)
    report.layout = "npz"
    y = np.concatenate([dataset.train_labels, dataset.val_labels])
    report.records = len(y)
    report.per_class = _per_class(y, dataset.classes)
    check_dataset(path, dataset)
    side = f"{dataset.train_images.shape[2]}x{dataset.train_images.shape[1]}"
    report.formats["NPZ"] = report.image_sizes[side] = report.bit_depths["8"] = len(y)
    report.split = {
        "train": _per_class(dataset.train_labels, dataset.classes),
        "val": _per_class(dataset.val_labels, dataset.classes),
        "by_patient": False, "stratified": False, "from_file": True,
    }  # fmt: skip
    x_train = _resize_all(dataset.train_images, cfg.image_size)
    x_val = _resize_all(dataset.val_images, cfg.image_size)
    train = np.arange(len(x_train), dtype=np.int64)
    val = np.arange(len(x_train), len(y), dtype=np.int64)
    return SiteData(
        name=source.name,
        x_train=x_train, y_train=dataset.train_labels.astype(np.int64),
        x_val=x_val, y_val=dataset.val_labels.astype(np.int64),
        fingerprint=_fingerprint(np.concatenate([x_train, x_val]), y, train, val, cfg.image_size),
        preprocessing={"classes": list(dataset.classes), "image_size": cfg.image_size},
    )  # fmt: skip


def _records_npz(
    path: Path, size: int, report: DataReport
) -> tuple[list[str], np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every part of a MedMNIST ``.npz`` (train, val, and test where present), ids ``<part>_images[i]``."""
    from shared.tasks.chest_data import _as_grayscale, _as_labels, _npz_classes, _read_npz_arrays

    arrays = _read_npz_arrays(path)
    parts = {part: (arrays[f"{part}_images"], arrays[f"{part}_labels"]) for part in ("train", "val")}
    test = _test_part(path)
    if test is not None:
        parts["test"] = test
    ids: list[str] = []
    images, labels = [], []
    for part, (raw_images, raw_labels) in parts.items():
        part_images = _as_grayscale(path, f"{part}_images", raw_images)
        images.append(_resize_all(part_images, size))
        labels.append(_as_labels(path, f"{part}_labels", raw_labels, len(part_images)))
        ids.extend(f"{part}_images[{i}]" for i in range(len(part_images)))
        report.image_sizes[f"{part_images.shape[2]}x{part_images.shape[1]}"] += len(part_images)
    y = np.concatenate(labels)
    report.layout = "npz"
    report.formats["NPZ"] = report.bit_depths["8"] = len(y)
    return ids, np.concatenate(images), y, _npz_classes(path, labels[0], y)


def _test_part(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    with np.load(path, allow_pickle=False) as archive:
        if {"test_images", "test_labels"} <= set(archive.files):
            return np.asarray(archive["test_images"]), np.asarray(archive["test_labels"])
    return None


# ---------------------------------------------------------------------------------------------
# Labels, patients, fingerprint
# ---------------------------------------------------------------------------------------------


def _labels(
    read: ReadImages, found: ImageFiles, *, source: Path, known: tuple[str, ...] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels and class names of the images read.

    Class folders: the sorted folder names. A manifest: ``0 .. k-1`` when every label is an
    integer, else the sorted label names, which must be as many as the task has classes.
    With ``known`` (a trained model's classes), names map to its labels.
    """
    texts = [str(entry.label) for entry in read.entries]
    if known is not None:
        return _relabel_texts(read, known, source), known
    if found.layout == "class folders":
        classes = found.classes
    elif all(is_integer_label(text) for text in texts):
        values = np.array([int(text) for text in texts], dtype=np.int64)
        top = max(int(values.max()) + 1, CHEST.num_classes)
        return values, tuple(str(i) for i in range(top))
    else:
        classes = tuple(sorted(set(texts)))
    if len(classes) != CHEST.num_classes:
        where = "class folders" if found.layout == "class folders" else "labels"
        raise InputError(
            f"{source}: the {where} name {len(classes)} class(es) ({', '.join(classes)}); the {CHEST.name} "
            f"task has {CHEST.num_classes} classes."
        )
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[text] for text in texts], dtype=np.int64), classes


def _relabel_texts(read: ReadImages, known: tuple[str, ...], source: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(known)}
    labels = []
    for entry in read.entries:
        text = str(entry.label)
        if text in index:
            labels.append(index[text])
        elif is_integer_label(text):
            labels.append(int(text))
        else:
            raise InputError(
                f"{source}: {entry.where}: label {text!r} is not one of the model's classes ({', '.join(known)})."
            )
    return np.array(labels, dtype=np.int64)


def _relabel(
    y: np.ndarray, classes: tuple[str, ...], known: tuple[str, ...], source: Path
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map an npz's class names to the model's, by name (integer names stay as they are)."""
    index = {name: i for i, name in enumerate(known)}
    mapping = np.array([index.get(name, i) for i, name in enumerate(classes)], dtype=np.int64)
    return mapping[y] if len(y) else y, known


def _patients(found: ImageFiles, read: ReadImages) -> np.ndarray | None:
    """Patient id per image: the manifest's column, else every image's DICOM Patient ID, else none."""
    if found.patient_column:
        return np.array([str(entry.patient) for entry in read.entries])
    if read.all_dicom_with_patient:
        return np.array(read.dicom_patients)
    return None


def _per_class(y: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(y[(y >= 0)], minlength=len(classes)) if len(y) else np.zeros(len(classes), np.int64)
    return {(classes[i] if i < len(classes) else str(i)): int(n) for i, n in enumerate(counts)}


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:] == (size, size):
        return images.astype(np.float32)
    return (
        np.stack([resize_square(image, size) for image in images])
        if len(images)
        else np.zeros((0, size, size), np.float32)
    )


def _is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz" and not path.is_dir()


def _fingerprint(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, image_size: int) -> str:
    """SHA-256 over the decoded pixels, labels, split indices and image size (the feature-cache key)."""
    digest = hashlib.sha256(json.dumps({"image_size": image_size, "shape": list(x.shape)}).encode())
    for array, dtype in ((x, np.float32), (y, np.int64), (train, np.int64), (val, np.int64)):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest()

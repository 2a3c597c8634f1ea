"""The ``chest-xray`` task: pediatric chest X-rays (PneumoniaMNIST or an image folder).

A data set (MedMNIST-layout ``.npz`` or one subfolder per class) is split into N hospitals by
:func:`shared.tasks.chest_data.split_sites` (Dirichlet label skew, seeded). Each site keeps raw
grayscale pixels; the model's input module does the resizing and ImageNet normalization, so
features are computed batch by batch and never all held as full-size images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, InputError
from shared.hashing import sha256_bytes
from shared.tasks.base import SiteData, class_counts, label_problem
from shared.tasks.chest_data import ImageDataset, SitePart, load_image_dataset, split_sites
from shared.tasks.chest_xray import CHEST


def load_dataset(data_path: str, *, val_fraction: float, seed: int) -> ImageDataset:
    """Load the chest-xray data named by ``data_path``."""
    if not data_path:
        raise ConfigError(
            "the chest-xray task needs data: pass --data PATH (a MedMNIST .npz or an image "
            "folder with one subfolder per class)."
        )
    dataset = load_image_dataset(Path(data_path), val_fraction=val_fraction, seed=seed)
    check_dataset(Path(data_path), dataset)
    return dataset


def check_dataset(path: Path, dataset: ImageDataset) -> None:
    """Refuse a data set whose labels the task's model cannot take, before it is split.

    The rule of :func:`shared.tasks.base.label_problem`: labels ``0..num_classes-1``, every
    class in the training split. Each site is checked again after the split.

    Raises
    ------
    InputError
        Naming the file or folder, the split and its class counts.
    """
    for split, labels, trained in (
        ("training", dataset.train_labels, True), ("validation", dataset.val_labels, False)
    ):  # fmt: skip
        problem = label_problem(labels, CHEST, need_every_class=trained)
        if problem is not None:
            counts = class_counts(labels, dataset.classes)
            raise InputError(f"{path}: the {split} split {problem} (counts {counts}).")


def load_sites(
    dataset: ImageDataset, *, num_sites: int, alpha: float, seed: int, only: int | None = None
) -> list[SiteData]:
    """Split ``dataset`` into hospitals and return each one's raw pixels and labels.

    The split is always computed for every site (it decides who gets which images); with
    ``only``, just that site's arrays are built (a node needs its own data, not everyone's).
    """
    parts = split_sites(dataset, num_sites=num_sites, alpha=alpha, seed=seed)
    if only is not None:
        if not 0 <= only < len(parts):
            raise ConfigError(f"site index {only} out of range: the federation has {len(parts)} sites.")
        parts = [parts[only]]
    return [_site(dataset, part) for part in parts]


def _site(dataset: ImageDataset, part: SitePart) -> SiteData:
    blob = json.dumps({"dataset": dataset.fingerprint, "site": part.name}).encode()
    return SiteData(
        name=part.name,
        x_train=dataset.train_images[part.train_idx].astype(np.float32),
        y_train=dataset.train_labels[part.train_idx].astype(np.int64),
        x_val=dataset.val_images[part.val_idx].astype(np.float32),
        y_val=dataset.val_labels[part.val_idx].astype(np.int64),
        fingerprint=sha256_bytes(blob + part.train_idx.tobytes() + part.val_idx.tobytes()),
    )

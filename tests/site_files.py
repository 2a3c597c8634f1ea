"""Hospitals' own chest X-ray folders, written from PneumoniaMNIST's real images (test helper).

Each hospital gets the images in its own format: PNG class folders, or DICOM class folders
mixing the encodings a PACS export holds (MONOCHROME1 and 2, 8 and 16 bits with a rescale
slope, RLE Lossless, a window) plus two objects a site must refuse (a multi-frame image and a
Basic Text SR), each file carrying unique identifying tags a test can grep for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shared.tasks.chest_data import load_image_dataset
from tests.dicom_files import write_dicom, write_rle, write_sr

CLASSES = ("normal", "pneumonia")


def _images(npz: Path, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` training images and labels of the PneumoniaMNIST file from ``start``, both classes alternating."""
    data = load_image_dataset(npz)
    by_class = [np.flatnonzero(data.train_labels == c)[start : start + count // 2 + 1] for c in (0, 1)]
    order = np.stack(by_class, axis=1).reshape(-1)[:count]
    return data.train_images[order], data.train_labels[order]


def pneumonia_subset(npz: Path, path: Path, *, train: int, val: int, seed: int) -> Path:
    """Write ``train`` training and ``val`` validation images of the PneumoniaMNIST file, drawn at random, to ``path``."""
    rng = np.random.default_rng(seed)
    data = np.load(npz)
    rows = rng.choice(len(data["train_labels"]), train, replace=False)
    val_rows = rng.choice(len(data["val_labels"]), val, replace=False)
    np.savez(
        path, train_images=data["train_images"][rows], train_labels=data["train_labels"][rows],
        val_images=data["val_images"][val_rows], val_labels=data["val_labels"][val_rows],
    )  # fmt: skip
    return path


def png_site(folder: Path, npz: Path, *, count: int = 60, start: int = 0) -> Path:
    """A class-folder tree of 8-bit PNGs."""
    images, labels = _images(npz, start, count)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / CLASSES[label] / f"img-{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)
    return folder


def dicom_site(folder: Path, npz: Path, *, count: int = 60, start: int = 0, tag: str = "CAREFL") -> Path:
    """A class-folder tree of DICOM files in several encodings, plus a multi-frame file and an SR.

    Every file's PatientName is ``<tag>^PATIENT<i>`` and PatientID ``<tag>-ID-<i>`` (unique
    strings to grep for); two images share each patient.
    """
    images, labels = _images(npz, start, count)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / CLASSES[label] / f"img-{i:04d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        identity = {"PatientName": f"{tag}^PATIENT{i // 2}", "PatientID": f"{tag}-ID-{i // 2}", "AccessionNumber": f"{tag}-ACC-{i}"}
        kind = i % 4
        if kind == 0:
            write_dicom(target, image, identity=identity)
        elif kind == 1:
            write_dicom(target, 255 - image, photometric="MONOCHROME1", identity=identity)
        elif kind == 2:
            stored = image.astype(np.uint16) * 16  # 12 bits stored, slope 1/16 back to 0..255
            write_dicom(target, stored, bits_stored=12, rescale=(1 / 16, 0.0), identity=identity)
        else:
            write_rle(target, image, identity=identity)
    write_dicom(folder / CLASSES[0] / "cine.dcm", np.stack([images[0]] * 3), identity={"PatientName": f"{tag}^CINE"})
    write_sr(folder / CLASSES[1] / "report.dcm", identity={"PatientName": f"{tag}^REPORT"})
    return folder

"""A hospital's image files, as they are: which files, with which labels, decoded to model pixels.

Layouts (:func:`find_entries`)
------------------------------
* ``class folders``: a directory with one subfolder per class (sorted names are the classes),
  each holding image files, in any depth of folders below it (a DICOM export's patient/study/
  series folders);
* ``manifest``: a CSV file with columns ``path,label[,patient_id]`` (paths relative to the
  manifest's folder, or absolute), naming images in any layout;
* ``folder`` (unlabelled records only): every image file under a directory;
* ``file`` (unlabelled records only): one image file.

Files (:func:`decode_file`)
---------------------------
PNG, JPEG, TIFF and BMP through PIL, and DICOM (a ``.dcm``/``.dicom`` name, or ``DICM`` after
the 128-byte preamble) through :mod:`shared.tasks.dicom`. Pixels become grayscale float32 in
``[0, 255]`` scaled by the stored bit depth (a 16-bit PNG or TIFF keeps its 65536 levels, not
truncated to 8 bits), then are resized to the study's square ``image-size`` (bilinear,
antialiased: the model's own resize, :class:`shared.backbones.architectures.ImageNetInput`,
then has nothing left to do), one file at a time, so a site's full-size X-rays never need to
fit in memory together. A file that cannot be used is refused, with its reason, in the
:class:`~shared.tasks.report.DataReport`; the rest are read.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import InputError
from shared.log import log
from shared.tasks.chest_data import MIN_IMAGE_SIDE
from shared.tasks.dicom import Refused, looks_like_dicom, read_dicom
from shared.tasks.report import DataReport

__all__ = [
    "IMAGE_FORMATS", "MANIFEST_COLUMNS", "Decoded", "Entry", "ImageFiles", "Progress", "Refused",
    "decode_file", "find_entries", "read_entries", "resize_square",
]  # fmt: skip

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP")
"""Formats read through PIL (DICOM is read by :mod:`shared.tasks.dicom`)."""
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id")
LISTED_IN_ERRORS = 3
"""Refused files named in the error raised when no file is usable."""

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each file."""

_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_INTEGER = re.compile(r"^[+-]?\d+$")
_FORMAT_ALIASES = {"MPO": "JPEG"}
"""PIL names a JPEG with an extra (e.g. thumbnail) frame MPO."""


@dataclass(frozen=True)
class Decoded:
    """One decoded image file, before resizing.

    Attributes
    ----------
    pixels : np.ndarray
        float32 (H, W) in ``[0, 255]``.
    format : str
        ``PNG``, ``JPEG``, ``TIFF``, ``BMP`` or ``DICOM``.
    bit_depth : int
        Stored bits per sample (DICOM: Bits Stored).
    modality, photometric, transfer_syntax : str
        The DICOM summary (``""`` for other formats).
    patient_id : str
        DICOM Patient ID (``""`` when absent or not DICOM); identifying: memory only, no ``repr``.
    """

    pixels: np.ndarray
    format: str
    bit_depth: int
    modality: str = ""
    photometric: str = ""
    transfer_syntax: str = ""
    patient_id: str = field(default="", repr=False)

    @property
    def size(self) -> str:
        """The original size, ``"WxH"``."""
        return f"{self.pixels.shape[1]}x{self.pixels.shape[0]}"


@dataclass(frozen=True)
class Entry:
    """One file to read.

    Attributes
    ----------
    file : Path
        The file.
    id : str
        Its name in reports and predictions: the path relative to the data path (a manifest's
        ``path`` as written).
    where : str
        Where it is named, for a refusal (the id; with a manifest also its line).
    label : str | None
        The class folder's name or the manifest's label, as text (``None``: unlabelled).
    patient : str | None
        The manifest's patient id (``None`` without that column). Identifying: memory only.
    """

    file: Path
    id: str
    where: str
    label: str | None = None
    patient: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ImageFiles:
    """What :func:`find_entries` found.

    Attributes
    ----------
    layout : str
        ``"class folders"``, ``"manifest"``, ``"folder"`` or ``"file"``.
    entries : list[Entry]
        The files to read, in reading order.
    classes : tuple[str, ...]
        Class folder names, sorted (``()`` for the other layouts: labels are the manifest's).
    patient_column : bool
        Whether a manifest gave a patient id for each entry.
    """

    layout: str
    entries: list[Entry]
    classes: tuple[str, ...] = ()
    patient_column: bool = False


@dataclass(frozen=True)
class ReadImages:
    """The usable images of :func:`read_entries`.

    Attributes
    ----------
    entries : list[Entry]
        The entries read, in order (refused ones left out).
    x : np.ndarray
        float32 (N, S, S) in ``[0, 255]``.
    dicom_patients : list[str]
        DICOM Patient ID per image (``""`` when absent or not DICOM). Identifying: memory only.
    """

    entries: list[Entry]
    x: np.ndarray
    dicom_patients: list[str] = field(repr=False)

    @property
    def all_dicom_with_patient(self) -> bool:
        """Whether every image is DICOM with a Patient ID (then the site can split by patient)."""
        return bool(self.dicom_patients) and all(self.dicom_patients)


# ---------------------------------------------------------------------------------------------
# Decoding one file
# ---------------------------------------------------------------------------------------------


def decode_file(file: Path) -> Decoded:
    """Decode an image or DICOM file to grayscale float32 pixels in ``[0, 255]``.

    Parameters
    ----------
    file : Path
        A PNG, JPEG, TIFF, BMP or DICOM file.

    Returns
    -------
    Decoded
        The pixels at their original size, format and bit depth (and the DICOM summary).

    Raises
    ------
    Refused
        If the file cannot be used, with the reason (no DICOM tag value in it).
    """
    if looks_like_dicom(file):
        image = read_dicom(file)
        _check_side(image.pixels.shape[1], image.pixels.shape[0])
        return Decoded(
            pixels=image.pixels, format="DICOM", bit_depth=image.bits_stored, modality=image.modality,
            photometric=image.photometric, transfer_syntax=image.transfer_syntax, patient_id=image.patient_id,
        )  # fmt: skip
    kind = "image"
    try:
        with Image.open(file) as image:
            kind = _FORMAT_ALIASES.get(str(image.format), str(image.format))
            if kind not in IMAGE_FORMATS:
                raise Refused(
                    f"unsupported image format {image.format} (accepted: {', '.join(IMAGE_FORMATS)}, DICOM)"
                )
            pages = int(getattr(image, "n_frames", 1))
            if pages > 1 and kind != "JPEG":
                raise Refused(f"{kind} with {pages} pages: single images only")
            _check_side(*image.size)
            pixels, depth = _grayscale(image, kind)
    except Refused:
        raise
    except UnidentifiedImageError:
        raise Refused(f"not an image file ({', '.join(IMAGE_FORMATS)} or DICOM)") from None
    except _PIL_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Refused(f"not a readable {kind} file: {reason}") from None
    return Decoded(pixels=pixels, format=kind, bit_depth=depth)


def _check_side(width: int, height: int) -> None:
    if min(width, height) < MIN_IMAGE_SIDE:
        raise Refused(
            f"{width}x{height} pixels: too small to be an X-ray (at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
        )


def _grayscale(image: Image.Image, kind: str) -> tuple[np.ndarray, int]:
    """Gray float32 pixels in ``[0, 255]`` scaled by the stored depth, and that depth."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        depth = _stored_depth(image, kind, default=16 if mode.startswith("I;16") or kind == "PNG" else 32)
        values = np.asarray(image).astype(np.float64)
        return np.clip(values * (255.0 / (2.0**depth - 1.0)), 0.0, 255.0).astype(np.float32), depth
    if mode == "F":
        raise Refused(f"floating-point {kind} pixels: no stored range to scale them by")
    if mode in ("LA", "La", "PA"):
        image = image.convert("LA" if mode == "PA" else mode).getchannel(0)
    depth = 1 if mode == "1" else 8
    gray = image if image.mode == "L" else image.convert("L")
    return np.asarray(gray, dtype=np.float32), depth


def _stored_depth(image: Image.Image, kind: str, *, default: int) -> int:
    """Bits per sample a TIFF declares (BitsPerSample), else ``default``."""
    if kind == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)
        value = bits[0] if isinstance(bits, tuple) and bits else bits
        if isinstance(value, int) and 1 <= value <= 32:
            return value
    return default


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W) float pixels to (size, size): bilinear, antialiased (PIL, as torch's ``antialias``).

    Parameters
    ----------
    pixels : np.ndarray
        Grayscale pixels (H, W).
    size : int
        Side of the square result.

    Returns
    -------
    np.ndarray
        float32 (size, size); the input itself (as float32) when it is already that size.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.shape == (size, size):
        return pixels
    resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def find_entries(path: Path, *, labelled: bool, report: DataReport) -> ImageFiles:
    """Find the files of an image data path and their labels (see the module docstring).

    Parameters
    ----------
    path : Path
        A directory of class folders, a CSV manifest, or (``labelled`` false) a directory of
        images or one image file.
    labelled : bool
        Whether labels are required. Without, a directory's files are all read, whatever
        folders they are in, and a manifest needs only its ``path`` column.
    report : DataReport
        Gets the layout and the manifest rows refused.

    Returns
    -------
    ImageFiles
        The layout and the files to read.

    Raises
    ------
    InputError
        If the path is missing, empty or malformed (one line naming it).
    """
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    if path.is_file() and path.suffix.lower() == ".csv":
        found = _manifest(path, labelled=labelled, report=report)
    elif path.is_dir():
        found = _class_folders(path) if labelled else _any_folder(path)
    elif path.is_file() and not labelled:
        found = ImageFiles("file", [Entry(path, path.name, path.name)])
    else:
        raise InputError(
            f"{path} is neither a folder of class folders nor a CSV manifest (path,label[,patient_id])."
        )
    report.layout = found.layout
    return found


def _visible(folder: Path) -> list[Path]:
    return sorted(
        (child for child in folder.iterdir() if not child.name.startswith(".")), key=lambda c: c.name
    )


def _files_below(folder: Path) -> list[Path]:
    """Every non-hidden regular file under ``folder`` (no hidden folder either), sorted by path."""
    return sorted(
        f for f in folder.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    )  # fmt: skip


def _class_folders(path: Path) -> ImageFiles:
    children = _visible(path)
    folders = [c for c in children if c.is_dir()]
    if not folders:
        if not children:
            raise InputError(f"{path} is an empty folder: no class folders, no images.")
        raise InputError(
            f"{path} holds files but no class folders: put each class's images in a folder named after the "
            "class, or give a CSV manifest (path,label[,patient_id])."
        )
    _refuse_split_folders(path, folders)
    entries = [
        Entry(file, rel, rel, label=folder.name)
        for folder in folders
        for file in _files_below(folder)
        for rel in [file.relative_to(path).as_posix()]
    ]
    loose = [c.name for c in children if c.is_file()]
    if loose:
        log(INFO, "%s: %d file(s) outside the class folders not read (e.g. %s)", path, len(loose), loose[0])
    if not entries:
        raise InputError(f"{path}: the class folders ({', '.join(f.name for f in folders)}) hold no files.")
    return ImageFiles("class folders", entries, classes=tuple(f.name for f in folders))


def _refuse_split_folders(path: Path, folders: Sequence[Path]) -> None:
    """Refuse ``train/NORMAL``, ``test/NORMAL`` ...: a data path one level above the classes.

    Folders inside class folders are read (a DICOM export's patient and series folders), but
    when every class folder holds the same folders, those are the classes and the top level
    is a split: reading it would label the images ``test`` and ``train``.
    """
    inner = [frozenset(c.name for c in _visible(f) if c.is_dir()) for f in folders]
    if len(folders) > 1 and len(inner[0]) > 1 and all(names == inner[0] for names in inner):
        raise InputError(
            f"{path}: every class folder ({', '.join(f.name for f in folders)}) holds the same folders "
            f"({', '.join(sorted(inner[0]))}); the data path looks one level too high: point it at the folder "
            "whose subfolders are the classes, or give a CSV manifest."
        )


def _any_folder(path: Path) -> ImageFiles:
    files = _files_below(path)
    if not files:
        raise InputError(f"{path} is an empty folder: no images.")
    entries = [Entry(f, rel, rel) for f in files for rel in [f.relative_to(path).as_posix()]]
    return ImageFiles("folder", entries)


def _manifest(path: Path, *, labelled: bool, report: DataReport) -> ImageFiles:
    """Read a CSV manifest's rows; rows naming no usable file are refused, the manifest's shape is fatal."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not a readable CSV manifest: {type(exc).__name__}: {exc}") from exc
    if not rows:
        raise InputError(f"{path} is an empty manifest: no header (path,label[,patient_id]).")
    header = [name.strip().lower() for name in rows[0]]
    needed = ("path", "label") if labelled else ("path",)
    missing = [name for name in needed if name not in header]
    if missing:
        raise InputError(
            f"{path}: the manifest has no {', '.join(missing)} column (header: {', '.join(rows[0]) or 'empty'}); "
            "a manifest has the columns path,label[,patient_id]."
        )
    column = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
    with_patient = "patient_id" in column
    entries: list[Entry] = []
    seen: set[Path] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path.name}, line {line}"
        cells = {name: row[index].strip() if index < len(row) else "" for name, index in column.items()}
        problem = _row_problem(cells, labelled=labelled, with_patient=with_patient)
        file = (path.parent / cells["path"]) if cells["path"] else path.parent
        if problem is None and not file.is_file():
            problem = f"file {cells['path']} not found"
        if problem is None and file.resolve() in seen:
            problem = f"file {cells['path']} listed twice"
        if problem is not None:
            report.refuse(where, problem)
            continue
        seen.add(file.resolve())
        entries.append(
            Entry(
                file, cells["path"], f"{cells['path']} ({where})",
                label=cells.get("label") or None,
                patient=cells["patient_id"] if with_patient else None,
            )
        )  # fmt: skip
    if not entries:
        raise InputError(f"{path}: the manifest names no usable file ({_refusals(report)}).")
    return ImageFiles("manifest", entries, patient_column=with_patient)


def _row_problem(cells: dict[str, str], *, labelled: bool, with_patient: bool) -> str | None:
    if not cells["path"]:
        return "empty path"
    if labelled and not cells.get("label"):
        return "no label"
    if labelled and with_patient and not cells["patient_id"]:
        return "no patient_id (the split keeps each patient on one side)"
    return None


def is_integer_label(text: str) -> bool:
    """Whether a manifest label is an integer (``0``, ``1``) rather than a class name."""
    return bool(_INTEGER.match(text))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_entries(
    entries: Sequence[Entry],
    *,
    image_size: int,
    report: DataReport,
    source: Path,
    progress: Progress | None = None,
) -> ReadImages:
    """Decode and resize every entry's file; refuse (in ``report``) those that cannot be used.

    Parameters
    ----------
    entries : Sequence[Entry]
        The files (from :func:`find_entries`).
    image_size : int
        Side of the square images returned.
    report : DataReport
        Gets the formats, original sizes, bit depths, DICOM summaries and refusals.
    source : Path
        The data path (named in the error).
    progress : Progress, optional
        Called as ``progress(done, total)`` after each file.

    Returns
    -------
    ReadImages
        The usable images, in the entries' order.

    Raises
    ------
    InputError
        If no file is usable (naming the first refused ones and why).
    """
    x = np.empty((len(entries), image_size, image_size), dtype=np.float32)
    kept: list[Entry] = []
    patients: list[str] = []
    for done, entry in enumerate(entries, start=1):
        try:
            image = decode_file(entry.file)
        except Refused as refusal:
            report.refuse(entry.where, refusal.reason)
        else:
            x[len(kept)] = resize_square(image.pixels, image_size)
            kept.append(entry)
            patients.append(image.patient_id)
            _count(report, image)
        if progress is not None:
            progress(done, len(entries))
    if not kept:
        raise InputError(f"{source}: no usable image ({_refusals(report)}).")
    log(INFO, "read %d image(s) from %s, %d refused", len(kept), source, len(report.refused))
    if len(kept) < len(entries):
        x.resize((len(kept), image_size, image_size), refcheck=False)  # in place: no second copy of the site
    return ReadImages(kept, x, patients)


def _count(report: DataReport, image: Decoded) -> None:
    report.formats[image.format] += 1
    report.image_sizes[image.size] += 1
    report.bit_depths[str(image.bit_depth)] += 1
    if image.format == "DICOM":
        for key, value in (
            ("modality", image.modality or "none"), ("photometric", image.photometric),
            ("transfer_syntax", image.transfer_syntax),
        ):  # fmt: skip
            report.dicom.setdefault(key, Counter())[value] += 1


def _refusals(report: DataReport) -> str:
    refused = report.refused
    if not refused:
        return "no image file found"
    named = "; ".join(f"{r.where}: {r.reason}" for r in refused[:LISTED_IN_ERRORS])
    more = f"; {len(refused) - LISTED_IN_ERRORS} more" if len(refused) > LISTED_IN_ERRORS else ""
    return f"{len(refused)} refused: {named}{more}"

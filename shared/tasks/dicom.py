"""DICOM images: single-frame grayscale pixels for a model, without ever exposing who they show.

:func:`read_dicom` decodes one file with pydicom 3 (and pylibjpeg with its libjpeg and openjpeg
plugins for the JPEG, JPEG-LS and JPEG 2000 transfer syntaxes; pydicom decodes RLE and the
uncompressed ones itself), in the order of the DICOM grayscale pipeline:

1. the modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
2. the VOI LUT (VOI LUT Sequence) or else the first window (Window Center/Width), as
   :func:`pydicom.pixels.apply_voi_lut` applies them;
3. scaling to ``[0, 255]``: by the output range of that VOI LUT or window where there is one,
   else by the range Bits Stored allows, after the modality LUT;
4. MONOCHROME1 inverted (its smallest value is white).

What is accepted
----------------
Single-frame images with Photometric Interpretation MONOCHROME1 or MONOCHROME2, and colour
images pydicom gives as RGB (``RGB``; ``YBR_FULL`` and ``YBR_FULL_422``, which pydicom converts
to RGB; ``YBR_ICT`` and ``YBR_RCT``, which the JPEG 2000 decoder returns as RGB), turned to
gray with the ITU-R 601-2 luma weights. Refused, with the reason: multi-frame images, objects
without pixel data (structured reports, presentation states, DICOMDIR), PALETTE COLOR and the
other photometric interpretations (a palette maps indices to colours, not to densities), pixel
data no installed decoder can decode, and unreadable or truncated files.

Privacy
-------
A DICOM file names its patient. Nothing this module returns, raises or logs carries a tag's
value other than those of :data:`SAFE_TAGS` (modality, photometric interpretation, transfer
syntax, bit depths, sizes, frame count): a refusal's reason is this module's own text, never
pydicom's message (which may quote a value). The patient id, used to split the site by patient,
is kept in memory only (:attr:`DicomImage.patient_id`, left out of the ``repr``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
PREAMBLE = 128
MAGIC = b"DICM"
MONOCHROME: frozenset[str] = frozenset({"MONOCHROME1", "MONOCHROME2"})
AS_RGB: frozenset[str] = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
"""Colour photometric interpretations pydicom (or its JPEG 2000 decoder) returns as RGB."""
SAFE_TAGS: tuple[str, ...] = (
    "Modality", "PhotometricInterpretation", "TransferSyntaxUID", "BitsAllocated", "BitsStored",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
)  # fmt: skip
"""The only tags whose values may leave this module."""
LUMA = np.array([0.299, 0.587, 0.114])


class Refused(Exception):
    """A file left out of a site's data; ``reason`` (the message) is safe to show, log and store.

    Attributes
    ----------
    reason : str
        Why, in one phrase (e.g. ``"multi-frame DICOM (12 frames): single-frame images only"``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DicomImage:
    """One decoded DICOM image.

    Attributes
    ----------
    pixels : np.ndarray
        float32 (H, W) in ``[0, 255]``, 255 the brightest (most attenuating).
    modality : str
        Modality (``CR``, ``DX``, ...; ``""`` when absent).
    photometric : str
        Photometric Interpretation as stored.
    transfer_syntax : str
        The transfer syntax's name (``"Explicit VR Little Endian"``, ``"RLE Lossless"`` ...).
    bits_stored : int
        Bits Stored.
    patient_id : str
        Patient ID (``""`` when absent). Identifying: kept in memory to split by patient, never
        written, logged or shown; not part of the ``repr``.
    """

    pixels: np.ndarray
    modality: str
    photometric: str
    transfer_syntax: str
    bits_stored: int
    patient_id: str = field(default="", repr=False)


def looks_like_dicom(path: Path) -> bool:
    """Whether ``path`` is meant as DICOM: a ``.dcm``/``.dicom`` name or ``DICM`` after the preamble.

    Parameters
    ----------
    path : Path
        A regular file.
    """
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(PREAMBLE + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE:] == MAGIC


def read_dicom(path: Path) -> DicomImage:
    """Decode the single-frame DICOM image at ``path`` (see the module docstring).

    Parameters
    ----------
    path : Path
        A DICOM file, with or without the preamble.

    Returns
    -------
    DicomImage
        Pixels in ``[0, 255]`` and the file's non-identifying summary.

    Raises
    ------
    Refused
        If the file is not a readable single-frame DICOM image this module accepts; the
        reason names no tag value but those of :data:`SAFE_TAGS`.
    """
    with warnings.catch_warnings():
        # pydicom warns about invalid values by quoting them: a name or an id may be one.
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=_lacks_preamble(path))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Refused(f"not a readable DICOM file ({type(exc).__name__})") from None
        return _decode(ds)


def _lacks_preamble(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(PREAMBLE + len(MAGIC))[PREAMBLE:] != MAGIC


def _decode(ds: Dataset) -> DicomImage:
    """Turn a read dataset into a :class:`DicomImage`, or refuse it."""
    syntax = _syntax_name(ds)
    if "PixelData" not in ds:
        kind = _sop_class_name(ds)
        raise Refused(
            f"DICOM object without pixel data ({kind})" if kind else "DICOM object without pixel data"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        bits_stored = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        int(ds.Rows), int(ds.Columns)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise Refused(f"DICOM image lacks a valid image pixel module ({type(exc).__name__})") from None
    if frames > 1:
        raise Refused(f"multi-frame DICOM ({frames} frames): single-frame images only")
    if photometric not in MONOCHROME | AS_RGB:
        raise Refused(
            f"unsupported photometric interpretation {photometric} (accepted: MONOCHROME1, MONOCHROME2, "
            f"{', '.join(sorted(AS_RGB))})"
        )
    if not 1 <= bits_stored <= 32:
        raise Refused(f"Bits Stored {bits_stored} out of range")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure refuses this file, never the site
        raise Refused(
            f"pixel data cannot be decoded (transfer syntax {syntax}, {type(exc).__name__})"
        ) from None
    if photometric in MONOCHROME:
        if stored.ndim != 2:
            raise Refused(f"DICOM grayscale pixel data of shape {stored.shape}, not one 2-D image")
        pixels = _grayscale(stored, ds, bits_stored=bits_stored, signed=signed)
        if photometric == "MONOCHROME1":
            pixels = 255.0 - pixels
    else:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise Refused(f"DICOM colour pixel data of shape {stored.shape}, not one RGB image")
        pixels = (stored.astype(np.float64) @ LUMA) * (255.0 / (2.0**bits_stored - 1.0))
    return DicomImage(
        pixels=np.clip(pixels, 0.0, 255.0).astype(np.float32),
        modality=str(ds.get("Modality") or ""),
        photometric=photometric,
        transfer_syntax=syntax,
        bits_stored=bits_stored,
        patient_id=str(ds.get("PatientID") or "").strip(),
    )


def _grayscale(stored: np.ndarray, ds: Dataset, *, bits_stored: int, signed: bool) -> np.ndarray:
    """Modality LUT, VOI LUT or window, then scale to ``[0, 255]`` (MONOCHROME2 sense)."""
    try:
        values = apply_modality_lut(stored, ds)
        low, high = _modality_range(ds, bits_stored=bits_stored, signed=signed)
        if _has_voi_lut(ds):
            values = apply_voi_lut(np.rint(values).astype(np.int64), ds)
            low, high = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1.0
        elif _has_window(ds):
            # pydicom's windowing outputs the modality output range [low, high].
            values = apply_voi_lut(values, ds)
    except (AttributeError, KeyError, ValueError, TypeError, IndexError, NotImplementedError) as exc:
        raise Refused(f"DICOM modality or VOI LUT cannot be applied ({type(exc).__name__})") from None
    if high == low:
        raise Refused("DICOM modality LUT maps every stored value to one value")
    return (np.asarray(values, dtype=np.float64) - low) * (255.0 / (high - low))


def _modality_range(ds: Dataset, *, bits_stored: int, signed: bool) -> tuple[float, float]:
    """The range of values after the modality LUT, as pydicom's windowing takes it."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1.0
    low, high = (
        (-(2.0 ** (bits_stored - 1)), 2.0 ** (bits_stored - 1) - 1) if signed else (0.0, 2.0**bits_stored - 1)
    )
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _has_voi_lut(ds: Dataset) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid is None:
        return "unknown"
    return str(uid.name) if uid.is_transfer_syntax else "unknown"


def _sop_class_name(ds: Dataset) -> str:
    """The SOP class's registered name (a standard's name, not an identifier), or ``""``."""
    uid = getattr(ds, "SOPClassUID", None)
    name = getattr(uid, "name", "")
    return str(name) if name and name != str(uid) else ""

"""Real DICOM files for tests, written with pydicom from numpy pixels.

Every writer returns the path it wrote. The identifying tags (patient name and id, accession
number, institution, dates) are filled with the values given, so a test can check that none of
them ever reaches a log, a message or a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

IDENTITY: Mapping[str, str] = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-0001",
    "AccessionNumber": "ACC-0001",
    "InstitutionName": "Test Hospital",
    "StudyDate": "20240102",
    "PatientBirthDate": "20180304",
}
"""Identifying tags written into every file unless the caller overrides them."""


def _base(sop_class: UID, identity: Mapping[str, str], modality: str) -> Dataset:
    """A dataset with file meta, SOP identity, modality and the identifying tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    for keyword, value in {**IDENTITY, **identity}.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    compress: UID | None = None,
    modality: str = "CR",
    identity: Mapping[str, str] | None = None,
) -> Path:
    """Write ``pixels`` as a DICOM image file (single-frame for (H,W), multi-frame for (F,H,W)).

    Parameters
    ----------
    path : Path
        Where to write (with the 128-byte preamble and ``DICM``).
    pixels : np.ndarray
        Stored values: uint8 or uint16, (H,W), (F,H,W) or (H,W,3) for ``RGB``.
    photometric : str
        Photometric Interpretation (``MONOCHROME1``, ``MONOCHROME2``, ``RGB``, ...).
    bits_stored : int, optional
        Bits Stored (default: the dtype's width).
    rescale : tuple[float, float], optional
        Rescale Slope and Intercept.
    window : tuple[float, float], optional
        Window Center and Width.
    compress : UID, optional
        A transfer syntax pydicom encodes itself (e.g. ``RLELossless``).
    modality : str
        Modality.
    identity : Mapping[str, str], optional
        Identifying tags overriding :data:`IDENTITY` (e.g. a unique ``PatientID``).
    """
    ds = _base(ComputedRadiographyImageStorage, identity or {}, modality)
    bits = bits_stored or pixels.dtype.itemsize * 8
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_rle(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    """Write ``pixels`` as an RLE Lossless compressed DICOM image (see :func:`write_dicom`)."""
    return write_dicom(path, pixels, compress=RLELossless, **kwargs)  # type: ignore[arg-type]


def write_sr(path: Path, *, identity: Mapping[str, str] | None = None) -> Path:
    """Write a Basic Text SR object: a DICOM file without pixel data."""
    ds = _base(BasicTextSRStorage, identity or {}, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut the file at ``path`` to ``keep`` of its bytes (a transfer broken off)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)

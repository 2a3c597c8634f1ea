"""Tests of shared.tasks.dicom and of DICOM sites: real files written with pydicom from PneumoniaMNIST."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from shared.config import StudyConfig
from shared.errors import InputError
from shared.tasks.base import OwnData
from shared.tasks.chest_own import check_own_images
from shared.tasks.chest_xray import ChestXray
from shared.tasks.dicom import Refused, read_dicom
from tests.dicom_files import jpeg_decoded_by_pil, truncate, write_dicom, write_jpeg, write_rle, write_sr

SECRETS = {"PatientName": "Zyxwvut^Qqqjane", "PatientID": "PIDQQ-84731", "AccessionNumber": "ACCQQ-55129"}
"""Unique identifying values: none may reach a log record, a message or a report."""


def _cfg(size: int = 28) -> StudyConfig:
    return StudyConfig(task="chest-xray", image_size=size)


# ---------------------------------------------------------------------------------------------
# Decoding one file
# ---------------------------------------------------------------------------------------------


def test_monochrome2_8bit_decodes_to_the_stored_pixels(tmp_path: Path, source: tuple) -> None:
    image = source[0][0]
    decoded = read_dicom(write_dicom(tmp_path / "a.dcm", image))
    np.testing.assert_array_equal(decoded.pixels, image.astype(np.float32))
    assert (decoded.photometric, decoded.transfer_syntax, decoded.bits_stored) == (
        "MONOCHROME2", "Explicit VR Little Endian", 8,
    )  # fmt: skip


def test_monochrome1_is_inverted(tmp_path: Path, source: tuple) -> None:
    """MONOCHROME1 stores white as 0: the stored 255 - x must come back as x."""
    image = source[0][1]
    decoded = read_dicom(write_dicom(tmp_path / "a.dcm", 255 - image, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(decoded.pixels, image.astype(np.float32))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_16bit_with_rescale_scales_by_bits_stored_after_the_modality_lut(
    tmp_path: Path, source: tuple, photometric: str
) -> None:
    """12 bits stored, slope 2, intercept -1024: output range [-1024, 4095*2-1024], mapped to [0, 255]."""
    image = source[0][2]
    stored = image.astype(np.uint16) * 16 + 7
    if photometric == "MONOCHROME1":
        stored = 4095 - stored
    path = write_dicom(
        tmp_path / "a.dcm", stored, photometric=photometric, bits_stored=12, rescale=(2.0, -1024.0)
    )
    decoded = read_dicom(path)
    values = stored.astype(np.float64) * 2.0 - 1024.0
    expected = (values + 1024.0) / (4095 * 2.0) * 255.0
    if photometric == "MONOCHROME1":
        expected = 255.0 - expected
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-3)
    np.testing.assert_allclose(decoded.pixels, (image.astype(np.float64) * 16 + 7) / 4095 * 255, atol=1e-3)
    assert decoded.bits_stored == 12


def test_window_maps_the_window_to_the_full_range(tmp_path: Path, source: tuple) -> None:
    """Linear window (DICOM PS3.3 C.11.2.1.2.1), computed here independently of pydicom."""
    image = source[0][3]
    stored = image.astype(np.uint16) * 16
    center, width = 2000.0, 1500.0
    decoded = read_dicom(write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, window=(center, width)))
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-3)
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 255.0  # the window saturates both ends


def test_rle_lossless_decodes_exactly(tmp_path: Path, source: tuple) -> None:
    image = source[0][4]
    decoded = read_dicom(write_rle(tmp_path / "a.dcm", image))
    np.testing.assert_array_equal(decoded.pixels, image.astype(np.float32))
    assert decoded.transfer_syntax == "RLE Lossless"


def test_jpeg_syntaxes_decode_through_pylibjpeg(tmp_path: Path, source: tuple) -> None:
    """JPEG Baseline (libjpeg plugin) as PIL decodes the same JPEG; JPEG 2000 lossless (openjpeg) exactly."""
    image = source[0][5]
    decoded = read_dicom(write_jpeg(tmp_path / "j.dcm", image))
    assert decoded.transfer_syntax == "JPEG Baseline (Process 1)"
    assert np.abs(decoded.pixels - jpeg_decoded_by_pil(image)).max() <= 1.0
    large = np.kron(image, np.ones((2, 2), dtype=np.uint8))  # openjpeg's default needs >= 32 pixels a side
    decoded = read_dicom(write_dicom(tmp_path / "j2k.dcm", large, compress=JPEG2000Lossless))
    np.testing.assert_array_equal(decoded.pixels, large.astype(np.float32))


def test_rgb_becomes_luma(tmp_path: Path, source: tuple) -> None:
    image = source[0][6]
    rgb = np.stack([image, np.roll(image, 1, axis=0), 255 - image], axis=-1)
    decoded = read_dicom(write_dicom(tmp_path / "a.dcm", rgb, photometric="RGB"))
    np.testing.assert_allclose(decoded.pixels, rgb.astype(np.float64) @ [0.299, 0.587, 0.114], atol=1e-3)


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (lambda p, im: write_dicom(p, np.stack([im, im, im])), "multi-frame DICOM (3 frames)"),
        (lambda p, im: write_sr(p), "without pixel data (Basic Text SR Storage)"),
        (
            lambda p, im: write_dicom(p, im, photometric="PALETTE COLOR"),
            "photometric interpretation PALETTE COLOR",
        ),
        (lambda p, im: truncate(write_dicom(p, im), 0.6), "pixel data cannot be decoded"),
        (lambda p, im: p.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10"), "not a readable DICOM file"),
    ],
    ids=["multi-frame", "sr", "palette", "truncated", "garbage"],
)
def test_refusals_name_the_reason(tmp_path: Path, source: tuple, writer, reason: str) -> None:
    path = tmp_path / "x.dcm"
    writer(path, source[0][0])
    with pytest.raises(Refused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_dicom(path)


# ---------------------------------------------------------------------------------------------
# A DICOM site
# ---------------------------------------------------------------------------------------------


def _dicom_site(
    root: Path, images: np.ndarray, labels: np.ndarray, *, per_patient: int = 2
) -> dict[str, str]:
    """Class folders of DICOM files in patient folders, ``per_patient`` images each; returns id -> patient."""
    patients = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        patient = f"P{i // per_patient:03d}-{label}"
        folder = root / ("normal", "pneumonia")[label] / patient
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        path = folder / f"{i:03d}.dcm"
        identity = {"PatientID": patient}
        if kind == 0:
            write_dicom(path, image, identity=identity)
        elif kind == 1:
            write_dicom(path, 255 - image, photometric="MONOCHROME1", identity=identity)
        elif kind == 2:
            write_rle(path, image, identity=identity)
        else:
            write_dicom(
                path, image.astype(np.uint16) * 256, rescale=(0.5, 0.0), identity=identity, modality="DX"
            )
        patients[path.relative_to(root).as_posix()] = patient
    return patients


def test_all_dicom_site_is_split_by_patient_id(tmp_path: Path, source: tuple) -> None:
    patients = _dicom_site(tmp_path, *source)
    site, report = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h", val_fraction=0.25))
    records = ChestXray().read_records(_cfg(), str(tmp_path), preprocessing=site.preprocessing, labelled=True)
    owner = {records.x[i].tobytes(): patients[records.ids[i]] for i in range(len(records.ids))}
    train = {owner[row.tobytes()] for row in site.x_train}
    val = {owner[row.tobytes()] for row in site.x_val}
    assert train and val and not train & val
    assert report.split["by_patient"] and report.patients == len(set(patients.values())) > 2
    assert report.records == 40 and report.formats == {"DICOM": 40}
    assert report.dicom["photometric"] == {"MONOCHROME1": 10, "MONOCHROME2": 30}
    assert report.dicom["transfer_syntax"]["RLE Lossless"] == 10 and report.dicom["modality"] == {
        "CR": 30,
        "DX": 10,
    }
    assert report.bit_depths == {"8": 30, "16": 10}
    # Decoded as the source images (the 16-bit ones at 256/257 of their level).
    index = {i: records.ids.index(rel) for rel, i in ((r, int(r.split("/")[-1][:3])) for r in records.ids)}
    for i, image in enumerate(source[0]):
        scale = 256 * 255 / 65535 if i % 4 == 3 else 1.0
        np.testing.assert_allclose(records.x[index[i]], image * scale, atol=1e-3)


def test_refused_dicom_objects_are_listed_and_the_rest_is_read(tmp_path: Path, source: tuple) -> None:
    _dicom_site(tmp_path, *source)
    write_dicom(tmp_path / "normal" / "multi.dcm", np.stack([source[0][0]] * 2))
    write_sr(tmp_path / "pneumonia" / "report.dcm")
    truncate(write_dicom(tmp_path / "pneumonia" / "cut.dcm", source[0][1]), 0.6)
    site, report = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))
    assert site.num_train + site.num_val == report.records == 40
    refused = {r.where: r.reason for r in report.refused}
    assert set(refused) == {"normal/multi.dcm", "pneumonia/report.dcm", "pneumonia/cut.dcm"}
    assert refused["normal/multi.dcm"].startswith("multi-frame DICOM (2 frames)")
    assert "without pixel data" in refused["pneumonia/report.dcm"]


def test_no_identifying_value_reaches_a_log_a_message_or_the_report(
    tmp_path: Path, source: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    images, labels = source
    site = tmp_path / "site"
    for i in range(8):
        folder = site / ("normal", "pneumonia")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        write_dicom(folder / f"{i}.dcm", images[i], identity=SECRETS)
    write_dicom(site / "normal" / "multi.dcm", np.stack([images[0]] * 2), identity=SECRETS)
    write_sr(site / "pneumonia" / "sr.dcm", identity=SECRETS)
    truncate(write_dicom(site / "normal" / "cut.dcm", images[1], identity=SECRETS), 0.6)
    refused_only = tmp_path / "refused"
    for label in ("normal", "pneumonia"):
        (refused_only / label).mkdir(parents=True)
        write_dicom(refused_only / label / "multi.dcm", np.stack([images[0]] * 2), identity=SECRETS)
        write_sr(refused_only / label / "sr.dcm", identity=SECRETS)
    carefl = logging.getLogger("carefl")
    carefl.addHandler(caplog.handler)  # the CareFL logger does not propagate to the root
    texts = []
    try:
        with caplog.at_level(logging.DEBUG):
            data, report = ChestXray().load_own(_cfg(), OwnData(path=str(site), name="h"))
            texts += [json.dumps(report.to_json()), repr(data.preprocessing), data.name]
            texts.append(
                json.dumps(check_own_images(_cfg(), OwnData(path=str(refused_only), name="h")).to_json())
            )
            with pytest.raises(InputError) as caught:
                ChestXray().load_own(_cfg(), OwnData(path=str(refused_only), name="h"))
            texts.append(str(caught.value))
            with pytest.raises(InputError) as caught:
                ChestXray().read_records(
                    _cfg(), str(site / "normal" / "cut.dcm"), preprocessing={}, labelled=False
                )
            truncated_error = str(caught.value)
            texts.append(truncated_error)
            texts.append(repr(read_dicom(site / "normal" / "0.dcm")))
    finally:
        carefl.removeHandler(caplog.handler)
    texts += [record.getMessage() for record in caplog.records]
    assert report.records == 8 and len(report.refused) == 3 and "cut.dcm" in truncated_error
    assert len(caplog.records) > 0
    for secret in SECRETS.values():
        for part in secret.split("^"):
            assert not [text for text in texts if part in text], part


def test_truncated_dicom_alone_is_one_input_error_line_naming_it(tmp_path: Path, source: tuple) -> None:
    path = truncate(write_dicom(tmp_path / "cut.dcm", source[0][0]), 0.6)
    with pytest.raises(InputError) as caught:
        ChestXray().read_records(_cfg(), str(path), preprocessing={}, labelled=False)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "cut.dcm: pixel data cannot be decoded" in message

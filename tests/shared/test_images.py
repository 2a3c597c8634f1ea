"""Tests of a hospital's own chest X-ray files (shared.tasks.images, shared.tasks.chest_own).

Real PNG, JPEG, TIFF and BMP files written in tmp_path from real PneumoniaMNIST images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import StudyConfig
from shared.errors import InputError
from shared.tasks.base import OwnData
from shared.tasks.chest_own import check_own_images
from shared.tasks.chest_xray import ChestXray
from shared.tasks.images import decode_file, resize_square

CLASSES = ("normal", "pneumonia")
FORMATS = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif", "BMP": "bmp"}


def _cfg(size: int = 28) -> StudyConfig:
    return StudyConfig(task="chest-xray", image_size=size)


def _class_folders(root: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """One file per image in ``root/<class>/``, the formats in turn; returns id -> source index."""
    ids = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        fmt = list(FORMATS)[i % len(FORMATS)]
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:03d}.{FORMATS[fmt]}"
        Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        ids[path.relative_to(root).as_posix()] = i
    return ids


def _corrupt_png(path: Path, image: np.ndarray) -> Path:
    """A PNG whose data stream is cut short (a broken copy)."""
    Image.fromarray(image).save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_lossless_formats_decode_to_the_source_pixels(tmp_path: Path, source: tuple, fmt: str) -> None:
    image = source[0][0]
    path = tmp_path / f"a.{FORMATS[fmt]}"
    Image.fromarray(image).save(path, format=fmt)
    decoded = decode_file(path)
    np.testing.assert_array_equal(decoded.pixels, image.astype(np.float32))
    assert (decoded.format, decoded.bit_depth, decoded.size) == (fmt, 8, "28x28")


def test_jpeg_decodes_close_to_the_source(tmp_path: Path, source: tuple) -> None:
    image = source[0][1]
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    decoded = decode_file(tmp_path / "a.jpg")
    assert decoded.format == "JPEG" and np.abs(decoded.pixels - image).mean() < 2.0


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_keeps_its_range(tmp_path: Path, source: tuple, fmt: str) -> None:
    """16-bit levels scaled by 65535, not clipped to 8 bits (PIL's convert("L") would give 255 everywhere)."""
    stored = source[0][2].astype(np.uint16) * 256 + 97
    path = tmp_path / f"a.{FORMATS[fmt]}"
    Image.fromarray(stored).save(path, format=fmt)
    decoded = decode_file(path)
    np.testing.assert_allclose(decoded.pixels, stored / 65535.0 * 255.0, atol=1e-3)
    assert decoded.bit_depth == 16 and not np.allclose(decoded.pixels, np.rint(decoded.pixels))


def test_resize_is_the_models_antialiased_bilinear(source: tuple) -> None:
    """PIL's resize equals torch's bilinear antialiased interpolation (ImageNetInput's)."""
    large = np.asarray(Image.fromarray(source[0][3]).resize((120, 96), Image.Resampling.BICUBIC), np.float32)
    resized = resize_square(large, 32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(large)[None, None],
        size=(32, 32),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0, 0].numpy()
    assert resized.shape == (32, 32) and np.abs(resized - expected).max() < 0.01


# ---------------------------------------------------------------------------------------------
# A site's class folders
# ---------------------------------------------------------------------------------------------


def test_class_folders_of_every_format_are_read_whole_and_split(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    ids = _class_folders(tmp_path, images, labels)
    Image.fromarray(images[0].astype(np.uint16) * 257).save(tmp_path / "normal" / "deep.png")
    ids["normal/deep.png"] = 0
    calls = []
    source_data = OwnData(path=str(tmp_path), name="St Elsewhere", val_fraction=0.25, seed=3)
    site, report = ChestXray().load_own(
        _cfg(), source_data, progress=lambda done, total: calls.append((done, total))
    )
    assert site.name == "St Elsewhere"
    assert site.x_train.dtype == np.float32 and site.x_train.shape[1:] == (28, 28)
    assert site.num_train + site.num_val == report.records == 41
    assert calls[-1] == (41, 41) and len(calls) == 41
    expected = {name: int((labels == i).sum()) + (name == "normal") for i, name in enumerate(CLASSES)}
    assert report.per_class == expected and report.layout == "class folders"
    assert report.formats == {"PNG": 11, "JPEG": 10, "TIFF": 10, "BMP": 10}
    assert report.bit_depths == {"8": 40, "16": 1} and report.image_sizes == {"28x28": 41}
    assert report.split["stratified"] and not report.split["by_patient"]
    assert {c: report.split["train"][c] + report.split["val"][c] for c in CLASSES} == expected
    assert report.split["val"] == {c: int((site.y_val == i).sum()) for i, c in enumerate(CLASSES)}
    # Every record is the source image of its file (JPEG within its loss).
    records = ChestXray().read_records(_cfg(), str(tmp_path), preprocessing=site.preprocessing, labelled=True)
    for rid, row, label in zip(records.ids, records.x, records.y):
        tolerance = 8.0 if rid.endswith(".jpg") else 1e-3
        assert np.abs(row - images[ids[rid]]).max() <= tolerance, rid
        assert label == labels[ids[rid]]
    rows = {row.tobytes() for row in records.x}
    assert all(row.tobytes() in rows for row in np.concatenate([site.x_train, site.x_val]))


def test_same_data_same_fingerprint_another_seed_or_pixel_another(tmp_path: Path, source: tuple) -> None:
    _class_folders(tmp_path, *source)
    own = OwnData(path=str(tmp_path), name="h")
    first, _ = ChestXray().load_own(_cfg(), own)
    again, _ = ChestXray().load_own(_cfg(), own)
    reseeded, _ = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h", seed=7))
    resized, _ = ChestXray().load_own(_cfg(32), own)
    Image.fromarray(255 - source[0][0]).save(tmp_path / "normal" / "000.png")
    changed, _ = ChestXray().load_own(_cfg(), own)
    assert first.fingerprint == again.fingerprint
    assert len({first.fingerprint, reseeded.fingerprint, resized.fingerprint, changed.fingerprint}) == 4
    assert resized.x_train.shape[1:] == (32, 32)


def test_unusable_files_are_refused_and_listed_the_rest_read(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    _class_folders(tmp_path, images, labels)
    _corrupt_png(tmp_path / "normal" / "broken.png", images[0])
    Image.fromarray(images[0][:6, :6]).save(tmp_path / "normal" / "tiny.png")
    Image.fromarray(images[0]).save(tmp_path / "pneumonia" / "anim.gif")
    (tmp_path / "pneumonia" / "notes.txt").write_text("not an image")
    (tmp_path / "pneumonia" / ".DS_Store").write_bytes(b"\0\1")
    site, report = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))
    assert site.num_train + site.num_val == report.records == 40
    reasons = {r.where: r.reason for r in report.refused}
    assert set(reasons) == {
        "normal/broken.png",
        "normal/tiny.png",
        "pneumonia/anim.gif",
        "pneumonia/notes.txt",
    }
    assert reasons["normal/broken.png"].startswith("not a readable PNG file")
    assert "6x6 pixels: too small" in reasons["normal/tiny.png"]
    assert "unsupported image format GIF" in reasons["pneumonia/anim.gif"]
    assert "not an image file" in reasons["pneumonia/notes.txt"]
    assert report.to_json()["refused_count"] == 4


def test_data_path_one_level_above_the_classes_is_refused(tmp_path: Path, source: tuple) -> None:
    for split in ("test", "train"):
        _class_folders(tmp_path / split, *source)
    with pytest.raises(InputError, match="looks one level too high"):
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))


def test_nested_folders_inside_class_folders_are_read(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / CLASSES[label] / f"patient{i // 3}" / "study"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    _, report = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))
    assert report.records == 40 and not report.refused


# ---------------------------------------------------------------------------------------------
# A manifest
# ---------------------------------------------------------------------------------------------


def test_manifest_with_patients_keeps_each_patient_on_one_side(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    (tmp_path / "scans" / "a").mkdir(parents=True)
    lines = ["path,label,patient_id"]
    patient_of = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        rel = f"scans/{'a/' if i % 2 else ''}{i:03d}.png"
        Image.fromarray(image).save(tmp_path / rel)
        patient = f"MRN{(i // 3) * 2 + int(label)}"  # up to 3 images a patient, one label each
        patient_of[images[i].astype(np.float32).tobytes()] = patient
        lines.append(f"{rel},{CLASSES[label]},{patient}")
    lines.append("scans/missing.png,normal,MRN999")
    lines.append(f"scans/000.png,{CLASSES[labels[0]]},MRN0")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    site, report = ChestXray().load_own(
        _cfg(), OwnData(path=str(tmp_path / "manifest.csv"), name="h", val_fraction=0.25)
    )
    train = {patient_of[row.tobytes()] for row in site.x_train}
    val = {patient_of[row.tobytes()] for row in site.x_val}
    assert train and val and not train & val
    assert report.layout == "manifest" and report.records == 40
    assert report.split["by_patient"] and report.patients == len(set(patient_of.values()))
    assert [(r.where, r.reason) for r in report.refused] == [
        ("manifest.csv, line 42", "file scans/missing.png not found"),
        ("manifest.csv, line 43", "file scans/000.png listed twice"),
    ]
    assert site.preprocessing["classes"] == list(CLASSES)


def test_manifest_integer_labels_are_the_classes(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    lines = ["label,path"]
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(tmp_path / f"{i}.bmp")
        lines.append(f"{label},{i}.bmp")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    site, report = ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path / "labels.csv"), name="h"))
    assert report.per_class == {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())}
    assert site.preprocessing["classes"] == ["0", "1"] and not report.split["by_patient"]
    records = ChestXray().read_records(
        _cfg(), str(tmp_path / "labels.csv"), preprocessing=site.preprocessing, labelled=True
    )
    np.testing.assert_array_equal(records.y, labels)


# ---------------------------------------------------------------------------------------------
# Records for a trained model
# ---------------------------------------------------------------------------------------------


def test_unlabelled_flat_folder_and_path_only_manifest(tmp_path: Path, source: tuple) -> None:
    images = source[0][:5]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"x{i}.png")
    (tmp_path / "list.csv").write_text("path\nx3.png\nx1.png\n")
    records = ChestXray().read_records(_cfg(), str(tmp_path), preprocessing={}, labelled=False)
    assert records.ids == [f"x{i}.png" for i in range(5)] and records.y is None
    assert [r.where for r in records.report.refused] == ["list.csv"]  # the manifest itself is no image
    np.testing.assert_array_equal(records.x, images.astype(np.float32))
    listed = ChestXray().read_records(_cfg(), str(tmp_path / "list.csv"), preprocessing={}, labelled=False)
    assert listed.ids == ["x3.png", "x1.png"] and listed.report.layout == "manifest"
    np.testing.assert_array_equal(listed.x, images[[3, 1]].astype(np.float32))


def test_evaluation_folder_with_one_class_keeps_the_models_labels(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    (tmp_path / "pneumonia").mkdir()
    for i in np.flatnonzero(labels == 1)[:4]:
        Image.fromarray(images[i]).save(tmp_path / "pneumonia" / f"{i}.png")
    preprocessing = {"classes": list(CLASSES), "image_size": 28}
    records = ChestXray().read_records(_cfg(), str(tmp_path), preprocessing=preprocessing, labelled=True)
    assert records.y.tolist() == [1, 1, 1, 1]
    (tmp_path / "covid").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "covid" / "c.png")
    with pytest.raises(InputError, match="label 'covid' is not one of the model's classes"):
        ChestXray().read_records(_cfg(), str(tmp_path), preprocessing=preprocessing, labelled=True)


def test_npz_keeps_its_own_split(pneumonia_npz: Path) -> None:
    site, report = ChestXray().load_own(_cfg(), OwnData(path=str(pneumonia_npz), name="h", val_fraction=0.5))
    with np.load(pneumonia_npz) as archive:
        np.testing.assert_array_equal(site.y_train, archive["train_labels"][:, 0])
        np.testing.assert_array_equal(site.x_val, archive["val_images"].astype(np.float32))
    assert report.layout == "npz" and report.records == 5232 and report.formats == {"NPZ": 5232}
    assert report.split["train"] == {"normal": 1214, "pneumonia": 3494} and site.preprocessing[
        "classes"
    ] == list(CLASSES)
    records = ChestXray().read_records(
        _cfg(), str(pneumonia_npz), preprocessing=site.preprocessing, labelled=True
    )
    assert (
        records.ids[0] == "train_images[0]"
        and records.ids[-1] == "val_images[523]"
        and len(records.y) == 5232
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one InputError line naming the file
# ---------------------------------------------------------------------------------------------


def _one_line(caught: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(caught.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_corrupt_png_alone(tmp_path: Path, source: tuple) -> None:
    path = _corrupt_png(tmp_path / "broken.png", source[0][0])
    with pytest.raises(InputError) as caught:
        ChestXray().read_records(_cfg(), str(path), preprocessing={}, labelled=False)
    _one_line(caught, str(path), "broken.png: not a readable PNG file")


def test_class_folders_of_corrupt_files_only(tmp_path: Path, source: tuple) -> None:
    for name in CLASSES:
        (tmp_path / name).mkdir()
        _corrupt_png(tmp_path / name / "x.png", source[0][0])
    with pytest.raises(InputError) as caught:
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))
    _one_line(caught, str(tmp_path), "no usable image", "normal/x.png: not a readable PNG file")
    report = check_own_images(_cfg(), OwnData(path=str(tmp_path), name="h"))
    assert not report.usable and "no usable image" in report.problem and len(report.refused) == 2


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path), name="h"))
    _one_line(caught, str(tmp_path), "empty folder")


def test_manifest_missing_a_column(tmp_path: Path, source: tuple) -> None:
    Image.fromarray(source[0][0]).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,diagnosis\na.png,normal\n")
    with pytest.raises(InputError) as caught:
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path / "m.csv"), name="h"))
    _one_line(caught, str(tmp_path / "m.csv"), "no label column", "header: path, diagnosis")


def test_labels_the_task_cannot_take(tmp_path: Path, source: tuple) -> None:
    images, labels = source
    _class_folders(tmp_path / "three", images, labels)
    (tmp_path / "three" / "covid").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "three" / "covid" / "c.png")
    with pytest.raises(InputError) as caught:
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path / "three"), name="h"))
    _one_line(caught, "name 3 class(es) (covid, normal, pneumonia)", "has 2 classes")
    (tmp_path / "one" / "normal").mkdir(parents=True)
    (tmp_path / "one" / "pneumonia").mkdir(parents=True)
    Image.fromarray(images[0]).save(tmp_path / "one" / "normal" / "n.png")
    _corrupt_png(tmp_path / "one" / "pneumonia" / "p.png", images[1])
    with pytest.raises(InputError) as caught:
        ChestXray().load_own(_cfg(), OwnData(path=str(tmp_path / "one"), name="h"))
    _one_line(caught, str(tmp_path / "one"), "holds only class 0", "0 (normal): 1")

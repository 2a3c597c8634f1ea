"""`carefl predict`: the model's own forward pass on the site's records, one row each; bad inputs refused whole."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.trained import load_trained_model, read_records
from server.local.cli import main
from shared.errors import EXIT_INTEGRITY, EXIT_USAGE
from shared.tasks import heart
from tests.client.trained_models import (
    Built,
    chest_model,
    heart_model,
    numpy_standardized_probabilities,
    standardized_chest_model,
    write_server_folder,
)
from tests.dicom_files import truncate, write_dicom


@pytest.fixture(scope="module")
def heart_built(tmp_path_factory: pytest.TempPathFactory, heart_registry: Path) -> Built:
    return heart_model(heart_registry, tmp_path_factory.mktemp("heart-site"))


@pytest.fixture(scope="module")
def chest_built(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Built:
    return chest_model(pneumonia_npz, tmp_path_factory.mktemp("chest-site"), records=300, epochs=5)


@pytest.fixture(scope="module")
def standardized_built(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Built:
    return standardized_chest_model(pneumonia_npz, tmp_path_factory.mktemp("std-site"), records=300, epochs=5)


@pytest.fixture(scope="module")
def hungary_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = heart.load_frame()
    path = tmp_path_factory.mktemp("heart-data") / "hungary.csv"
    rows[rows["dataset"] == "Hungary"].to_csv(path, index=False)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _forward(built: Built, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(built.model(torch.from_numpy(x)), dim=1)[:, 1].numpy()


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_predict_on_a_csv_equals_the_models_forward_pass(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the records as the site's preprocessing reads them, independently of predict
    out = tmp_path / "predictions.csv"
    records = read_records(load_trained_model(heart_built.folder), hungary_csv, labelled=False)

    # Execute
    code = main(["predict", "--model", str(heart_built.folder), "--data", str(hungary_csv), "--out", str(out)])

    # Assert: one row per usable record, probabilities = the trained model's own forward pass
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [r["id"] for r in rows] == records.ids and len(rows) == len(records.ids) > 200
    probs = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(probs, _forward(heart_built, records.x), rtol=0, atol=1e-6)
    assert [int(r["label"]) for r in rows] == (probs >= 0.5).astype(int).tolist()
    assert 0 < sum(int(r["label"]) for r in rows) < len(rows)


def test_predict_on_dicom_files_equals_the_models_forward_pass(
    tmp_path: Path, chest_built: Built, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: real PneumoniaMNIST pixels as DICOM files (8-bit and 12-bit) in a folder
    with np.load(pneumonia_npz) as arrays:
        pixels = arrays["val_images"][:6]
    folder = tmp_path / "xrays"
    folder.mkdir()
    for i, image in enumerate(pixels):
        stored = image if i % 2 else (image.astype(np.uint16) * 16)
        write_dicom(folder / f"img{i}.dcm", stored, bits_stored=8 if i % 2 else 12, identity={"PatientID": f"P{i}"})
    out = tmp_path / "predictions.csv"
    records = read_records(load_trained_model(chest_built.folder), folder, labelled=False)

    # Execute
    code = main(["predict", "--model", str(chest_built.folder), "--data", str(folder), "--out", str(out)])

    # Assert
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"img{i}.dcm" for i in range(6))
    assert [r["id"] for r in rows] == records.ids
    probs = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(probs, _forward(chest_built, records.x), rtol=0, atol=1e-5)
    assert {r["threshold"] for r in rows} == {"0.5"}


def test_a_server_run_folder_predicts_at_0_5_for_images(
    tmp_path: Path, chest_built: Built, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the same model as the server wrote it, and 4 images as PNG files
    from PIL import Image

    from tests.client.trained_models import mobilenet

    run = write_server_folder(tmp_path / "run", chest_built.study, chest_built.model, mobilenet())
    with np.load(pneumonia_npz) as arrays:
        pixels = arrays["val_images"][:4]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"x{i}.png")
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(run), "--data", str(folder), "--out", str(out)])

    # Assert
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert len(rows) == 4 and {r["threshold"] for r in rows} == {"0.5"}


def test_a_tabular_server_run_folder_is_refused_in_one_line(
    tmp_path: Path, heart_built: Built, heart_registry: Path, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    from shared.backbones.registry import BackboneRegistry
    from shared.pipeline import Pretrained

    resolved = BackboneRegistry(heart_registry).resolve("heart-mlp-cleveland")
    run = write_server_folder(tmp_path / "run", heart_built.study, heart_built.model, Pretrained(resolved.manifest, resolved.path))
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(run), "--data", str(hungary_csv), "--out", str(out), "--registry", str(heart_registry)])

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_USAGE and len(errors) == 1 and "preprocessing" in errors[0]
    assert not out.exists()


def test_a_missing_model_folder_is_one_line_and_writes_nothing(
    tmp_path: Path, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    out = tmp_path / "p.csv"
    code = main(["predict", "--model", str(tmp_path / "nope"), "--data", str(hungary_csv), "--out", str(out)])

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_USAGE and len(errors) == 1 and "nope" in errors[0] and "not found" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_a_model_whose_backbone_hash_does_not_match_is_refused(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a copy of the site folder whose site.json names another backbone
    site_dir = tmp_path / "site"
    shutil.copytree(heart_built.site_dir, site_dir)
    folder = site_dir / "models" / heart_built.folder.name
    facts = json.loads((folder / "site.json").read_text())
    facts["backbone_sha256"] = "0" * 64
    (folder / "site.json").write_text(json.dumps(facts))
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(folder), "--data", str(hungary_csv), "--out", str(out)])

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_INTEGRITY and len(errors) == 1 and "site.json" in errors[0] and "backbone" in errors[0]
    assert not out.exists()


def test_a_tampered_backbone_in_the_site_store_is_refused(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the site's stored backbone weights altered after delivery
    site_dir = tmp_path / "site"
    shutil.copytree(heart_built.site_dir, site_dir)
    weights = next((site_dir / "backbones").glob("*/weights"))
    weights.write_bytes(weights.read_bytes() + b"x")
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(site_dir / "models" / heart_built.folder.name), "--data", str(hungary_csv),
                 "--out", str(out)])  # fmt: skip

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_INTEGRITY and len(errors) == 1 and "SHA-256" in errors[0]
    assert not out.exists()


def test_a_corrupt_image_is_one_line_and_writes_nothing(
    tmp_path: Path, chest_built: Built, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a DICOM file cut in half, and an explanation folder asked for
    with np.load(pneumonia_npz) as arrays:
        image = arrays["val_images"][0]
    bad = truncate(write_dicom(tmp_path / "cut.dcm", image), keep=0.4)
    out, explain = tmp_path / "p.csv", tmp_path / "why"

    # Execute
    code = main(["predict", "--model", str(chest_built.folder), "--data", str(bad), "--out", str(out),
                 "--explain", str(explain)])  # fmt: skip

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_USAGE and len(errors) == 1 and "cut.dcm" in errors[0]
    assert not out.exists() and not explain.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.dcm"]


def test_csv_with_a_bad_value_names_the_line(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    frame = pd.read_csv(hungary_csv, dtype=str, keep_default_na=False)
    frame.loc[3, "age"] = "old"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(heart_built.folder), "--data", str(bad), "--out", str(out)])

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_USAGE and len(errors) == 1 and "line 5" in errors[0] and "age" in errors[0]
    assert not out.exists()


def _png_folder(folder: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"x{i:02d}.png")
    return folder


def test_predict_with_standardized_features_equals_the_training_pipeline(
    tmp_path: Path, standardized_built: Built, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 12 real validation X-rays as PNG files; the training rows the site standardized by
    with np.load(pneumonia_npz) as arrays:
        train_images, pixels = arrays["train_images"][:300], arrays["val_images"][:12]
    folder = _png_folder(tmp_path / "pngs", pixels)
    out = tmp_path / "predictions.csv"

    # Execute
    code = main(["predict", "--model", str(standardized_built.folder), "--data", str(folder), "--out", str(out)])

    # Assert: the probabilities of features -> (x - mean) / sd of the training rows -> head, recomputed in numpy
    assert code == 0, capsys.readouterr().err
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"x{i:02d}.png" for i in range(12)]
    probs = np.array([float(r["probability"]) for r in rows])
    expected = numpy_standardized_probabilities(standardized_built, train_images, pixels.astype(np.float32))
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)
    # ... and not those of the head on unscaled features (the standardization matters)
    assert np.abs(probs - _forward(standardized_built, pixels.astype(np.float32))).max() > 0.05


def test_a_standardized_server_run_folder_is_refused_in_one_line(
    tmp_path: Path, standardized_built: Built, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the consortium's run folder of the same model (no site's statistics there)
    from tests.client.trained_models import mobilenet

    run = write_server_folder(tmp_path / "run", standardized_built.study, standardized_built.model, mobilenet())
    with np.load(pneumonia_npz) as arrays:
        folder = _png_folder(tmp_path / "pngs", arrays["val_images"][:2])
    out = tmp_path / "p.csv"

    # Execute
    code = main(["predict", "--model", str(run), "--data", str(folder), "--out", str(out)])

    # Assert
    errors = _errors(capsys.readouterr().err)
    assert code == EXIT_USAGE and len(errors) == 1
    assert "standardized features" in errors[0] and "<site-dir>/models/<run-id>/" in errors[0]
    assert not out.exists()

"""`carefl evaluate`: every metric equals scikit-learn's on the model's own forward pass; intervals; the stored threshold."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from client.models import load_site_model
from client.trained import load_trained_model, read_records
from server.local.cli import main
from shared.errors import EXIT_USAGE
from shared.scores import choose_threshold
from shared.tasks import heart
from tests.client.trained_models import (
    Built,
    chest_model,
    heart_model,
    numpy_standardized_probabilities,
    standardized_chest_model,
)


@pytest.fixture(scope="module")
def heart_built(tmp_path_factory: pytest.TempPathFactory, heart_registry: Path) -> Built:
    return heart_model(heart_registry, tmp_path_factory.mktemp("heart-site"))


@pytest.fixture(scope="module")
def hungary_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = heart.load_frame()
    path = tmp_path_factory.mktemp("heart-data") / "hungary.csv"
    rows[rows["dataset"] == "Hungary"].to_csv(path, index=False)
    return path


def _probs(built: Built, data: Path) -> tuple[np.ndarray, np.ndarray]:
    records = read_records(load_trained_model(built.folder), data, labelled=True)
    with torch.no_grad():
        probs = torch.softmax(built.model(torch.from_numpy(records.x)), dim=1)[:, 1].numpy().astype(np.float64)
    return records.y, probs


def _site_copy(built: Built, tmp_path: Path) -> Path:
    site_dir = tmp_path / "site"
    shutil.copytree(built.site_dir, site_dir)
    return site_dir / "models" / built.folder.name


def test_every_metric_equals_scikit_learn_with_intervals_around_it(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "report"
    y, p = _probs(heart_built, hungary_csv)
    predicted = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, predicted).ravel()

    # Execute
    code = main(["evaluate", "--model", str(heart_built.folder), "--data", str(hungary_csv), "--out", str(out),
                 "--bootstrap", "100"])  # fmt: skip

    # Assert: the files, each metric against scikit-learn, each interval around its estimate
    assert code == 0, capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == ["reliability.png", "report.csv", "report.json", "roc.png"]
    report = json.loads((out / "report.json").read_text())
    stored = report["operating_points"]["stored"]
    expected = {
        "auc": roc_auc_score(y, p), "accuracy": float(np.mean(predicted == y)),
        "sensitivity": recall_score(y, predicted), "specificity": recall_score(y, predicted, pos_label=0),
        "ppv": precision_score(y, predicted), "npv": precision_score(y, predicted, pos_label=0),
        "f1": f1_score(y, predicted), "balanced_accuracy": balanced_accuracy_score(y, predicted),
        "brier": brier_score_loss(y, p),
    }  # fmt: skip
    for name, value in expected.items():
        assert stored["metrics"][name] == pytest.approx(value, abs=1e-9), name
        low, high = stored["intervals"][name]
        assert low <= stored["metrics"][name] <= high and high - low > 0, name
    assert stored["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert stored["threshold"] == 0.5 and report["records"] == len(y)
    with (out / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    auc_row = next(r for r in rows if r["metric"] == "auc")
    assert float(auc_row["value"]) == pytest.approx(expected["auc"]) and float(auc_row["ci_low"]) < float(auc_row["value"])
    for name in ("roc.png", "reliability.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_a_re_chosen_threshold_is_stored_atomically_and_predict_uses_it(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    folder = _site_copy(heart_built, tmp_path)
    y, p = _probs(heart_built, hungary_csv)
    expected = choose_threshold(y, p, "sensitivity:0.9")

    # Execute
    code = main(["evaluate", "--model", str(folder), "--data", str(hungary_csv), "--out", str(tmp_path / "r"),
                 "--operating-point", "sensitivity:0.9", "--store-threshold", "--bootstrap", "50"])  # fmt: skip
    predicted = tmp_path / "p.csv"
    assert main(["predict", "--model", str(folder), "--data", str(hungary_csv), "--out", str(predicted)]) == 0

    # Assert: site.json holds the new point (and the old one), the folder still verifies, predict applies it
    assert code == 0, capsys.readouterr().err
    facts = load_site_model(folder).site
    point = facts["operating_point"]
    assert point["rule"] == "sensitivity:0.9" and point["threshold"] == pytest.approx(expected)
    assert point["sensitivity"] >= 0.9 and point["chosen_on"]["records"] == len(y)
    assert facts["previous_operating_points"][-1]["threshold"] == 0.5
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["operating_points"]["re-chosen"]["threshold"] == pytest.approx(expected)
    with predicted.open(newline="") as handle:
        labels = [int(r["label"]) for r in csv.DictReader(handle)]
    assert labels == (p >= expected).astype(int).tolist()
    assert [f.name for f in folder.iterdir() if f.name.startswith(".")] == []


def test_store_threshold_without_a_rule_is_refused_before_any_work(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["evaluate", "--model", str(heart_built.folder), "--data", str(hungary_csv), "--out",
                 str(tmp_path / "r"), "--store-threshold"])  # fmt: skip

    # Assert
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_USAGE and len(lines) == 1 and "--operating-point" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_occupied_report_folder_is_refused_and_kept(
    tmp_path: Path, heart_built: Built, hungary_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "r"
    out.mkdir()
    (out / "mine.txt").write_text("keep")

    # Execute
    code = main(["evaluate", "--model", str(heart_built.folder), "--data", str(hungary_csv), "--out", str(out)])

    # Assert
    assert code == EXIT_USAGE and "already exists" in capsys.readouterr().err
    assert [f.name for f in out.iterdir()] == ["mine.txt"]


def test_evaluate_on_a_labelled_image_npz(
    tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a small MedMNIST-layout npz of real validation images
    built = chest_model(pneumonia_npz, tmp_path / "site", records=200, epochs=5)
    with np.load(pneumonia_npz) as arrays:
        x, labels = arrays["val_images"][:120], arrays["val_labels"][:120]
    data = tmp_path / "small.npz"
    np.savez(data, train_images=x[:60], train_labels=labels[:60], val_images=x[60:], val_labels=labels[60:])
    y, p = _probs(built, data)

    # Execute
    code = main(["evaluate", "--model", str(built.folder), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--operating-point", "youden", "--bootstrap", "100"])  # fmt: skip

    # Assert
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["records"] == 120 and report["positives"] == int(labels.sum())
    assert report["operating_points"]["stored"]["metrics"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert report["operating_points"]["re-chosen"]["threshold"] == pytest.approx(choose_threshold(y, p, "youden"))


def test_evaluate_a_standardized_chest_model_scores_the_training_pipelines_probabilities(
    tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a head trained on standardized pooled features; 120 labelled validation X-rays
    built = standardized_chest_model(pneumonia_npz, tmp_path / "site", records=200, epochs=5)
    with np.load(pneumonia_npz) as arrays:
        train_images = arrays["train_images"][:200]
        x, labels = arrays["val_images"][:120], arrays["val_labels"][:120]
    data = tmp_path / "small.npz"
    np.savez(data, train_images=x[:60], train_labels=labels[:60], val_images=x[60:], val_labels=labels[60:])
    records = read_records(load_trained_model(built.folder), data, labelled=True)
    expected = numpy_standardized_probabilities(built, train_images, records.x)

    # Execute
    code = main(["evaluate", "--model", str(built.folder), "--data", str(data), "--out", str(tmp_path / "r"),
                 "--bootstrap", "100"])  # fmt: skip

    # Assert: the report's AUC and accuracy at the stored threshold are scikit-learn's on those probabilities
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    metrics = report["operating_points"]["stored"]["metrics"]
    assert report["records"] == 120
    assert metrics["auc"] == pytest.approx(roc_auc_score(records.y, expected))
    assert metrics["sensitivity"] == pytest.approx(recall_score(records.y, expected >= 0.5))
    assert metrics["specificity"] == pytest.approx(recall_score(records.y, expected >= 0.5, pos_label=0))

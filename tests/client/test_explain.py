"""Explanations: Grad-CAM maps of the right shape and range that depend on the model (Adebayo et al.'s sanity
check), Integrated Gradients that add up, and the files `carefl predict --explain` writes."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from client.explain import cam_layer, gradcam_heatmaps, integrated_gradients
from server.local.cli import main
from shared.tasks import heart
from tests.client.trained_models import Built, chest_model, heart_model, standardized_chest_model


@pytest.fixture(scope="module")
def chest_built(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Built:
    return chest_model(pneumonia_npz, tmp_path_factory.mktemp("chest-site"), image_size=64, records=200, epochs=8)


@pytest.fixture(scope="module")
def images(pneumonia_npz: Path) -> np.ndarray:
    with np.load(pneumonia_npz) as arrays:
        return arrays["val_images"][:8].astype(np.float32)


def test_heatmaps_have_the_images_shape_and_lie_in_0_1(chest_built: Built, images: np.ndarray) -> None:
    # Execute
    maps = gradcam_heatmaps(chest_built.model, images)

    # Assert: one map per image at its size, normalised per image, not constant
    assert maps.shape == images.shape and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    assert np.all((peaks == 1.0) | (peaks == 0.0)) and (peaks == 1.0).sum() >= len(maps) // 2
    assert float(maps.std(axis=(1, 2)).mean()) > 0.05


def test_the_cam_layer_keeps_a_spatial_map(chest_built: Built, images: np.ndarray) -> None:
    # Execute
    layer = cam_layer(chest_built.model, torch.from_numpy(images))

    # Assert: at 64 px MobileNetV2's last block is 2x2; the layer chosen is the deepest still >= 7 px (8x8)
    features = chest_built.model.backbone[1].features
    assert layer is features[6]


def test_heatmaps_change_when_the_head_is_randomized(chest_built: Built, images: np.ndarray) -> None:
    # Prepare: Adebayo et al. (2018) model-parameter randomization of the last layer
    randomized = copy.deepcopy(chest_built.model)
    torch.manual_seed(123)
    torch.nn.init.normal_(randomized.head.weight, std=float(chest_built.model.head.weight.detach().std()))
    torch.nn.init.zeros_(randomized.head.bias)

    # Execute
    trained = gradcam_heatmaps(chest_built.model, images)
    again = gradcam_heatmaps(chest_built.model, images)
    random = gradcam_heatmaps(randomized, images)

    # Assert: deterministic for the same model, far from it for the randomized one
    same = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, again)]
    other = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, random)]
    assert np.nanmin(same) > 0.999
    assert np.nanmedian(other) < 0.5


def test_integrated_gradients_add_up_to_the_change_in_probability(tmp_path: Path, heart_registry: Path) -> None:
    # Prepare
    built = heart_model(heart_registry, tmp_path / "site", epochs=10)
    x = heart.load_sites(("Hungary",))[0].x_val[:20]

    # Execute
    attributions, gap = integrated_gradients(built.model, x)

    # Assert: completeness (sum = p(x) - p(baseline)), one value per feature, nothing at a feature equal to the baseline
    with torch.no_grad():
        p = torch.softmax(built.model(torch.from_numpy(x)), dim=1)[:, 1].numpy()
        p0 = torch.softmax(built.model(torch.zeros(1, x.shape[1])), dim=1)[0, 1].item()
    assert attributions.shape == x.shape
    np.testing.assert_allclose(attributions.sum(axis=1), p - p0, atol=5e-3)  # a ReLU network: kinks on the path
    np.testing.assert_allclose(attributions.sum(axis=1) - (p - p0), gap, atol=1e-5)
    zeroed = x.copy()
    zeroed[:, 0] = 0.0
    assert np.abs(integrated_gradients(built.model, zeroed)[0][:, 0]).max() < 1e-7


def test_predict_explain_writes_an_overlay_per_image(
    tmp_path: Path, chest_built: Built, images: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 3 PNG files in a subfolder
    folder = tmp_path / "xrays" / "ward-a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(images[i].astype(np.uint8)).save(folder / f"scan {i}.png")
    explain = tmp_path / "why"

    # Execute
    code = main(["predict", "--model", str(chest_built.folder), "--data", str(tmp_path / "xrays"), "--out",
                 str(tmp_path / "p.csv"), "--explain", str(explain)])  # fmt: skip

    # Assert
    assert code == 0, capsys.readouterr().err
    with (explain / "heatmaps.csv").open(newline="") as handle:
        index = list(csv.DictReader(handle))
    assert sorted(r["id"] for r in index) == [f"ward-a/scan {i}.png" for i in range(3)]
    for row in index:
        path = explain / row["file"]
        assert path.stat().st_size < 200_000
        with Image.open(path) as overlay:
            assert overlay.mode == "RGB" and overlay.width == overlay.height >= 224  # 64 px read, drawn x4


def test_predict_explain_writes_attributions_for_tabular_records(
    tmp_path: Path, heart_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    built = heart_model(heart_registry, tmp_path / "site", epochs=10)
    rows = heart.load_frame()
    data = tmp_path / "new.csv"
    rows[rows["dataset"] == "Hungary"].head(40).to_csv(data, index=False)
    explain = tmp_path / "why"

    # Execute
    code = main(["predict", "--model", str(built.folder), "--data", str(data), "--out", str(tmp_path / "p.csv"),
                 "--explain", str(explain)])  # fmt: skip

    # Assert: one attribution column per feature, named, rows aligned with the predictions
    assert code == 0, capsys.readouterr().err
    with (explain / "attributions.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    with (tmp_path / "p.csv").open(newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert [r["id"] for r in table] == [r["id"] for r in predictions]
    assert list(table[0]) == ["id", "probability", *(f"attribution_{name}" for name in heart.FEATURES)]
    with Image.open(explain / "attributions.png") as plot:
        assert plot.format == "PNG"


def test_grad_cam_explains_a_model_on_standardized_features(
    tmp_path: Path, pneumonia_npz: Path, images: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the site's copy, applied as predict applies it (backbone, standardization, head)
    from client.trained import load_trained_model

    built = standardized_chest_model(pneumonia_npz, tmp_path / "site", image_size=64, records=200, epochs=5)
    module = load_trained_model(built.folder).module
    folder = tmp_path / "xrays"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(images[i].astype(np.uint8)).save(folder / f"scan{i}.png")

    # Execute
    maps = gradcam_heatmaps(module, images)
    code = main(["predict", "--model", str(built.folder), "--data", str(folder), "--out", str(tmp_path / "p.csv"),
                 "--explain", str(tmp_path / "why")])  # fmt: skip

    # Assert: the same layer as without standardization, maps that vary within each image, one overlay per image
    assert cam_layer(module, torch.from_numpy(images)) is module.backbone[1].features[6]
    assert maps.shape == images.shape and maps.min() >= 0.0 and maps.max() <= 1.0
    assert float(maps.std(axis=(1, 2)).mean()) > 0.05
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "why").iterdir()) == ["heatmaps.csv", "scan0.png", "scan1.png"]

"""Feature options of the frozen image backbone: pooled blocks, image size, standardization.

`feature-blocks` concatenates the global-average-pooled outputs of chosen MobileNetV2 blocks
(checked against forward hooks on the same trunk), each choice and each image size caches
under its own key, and `standardize-features` scales by the training rows' figures only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from shared.backbones import BackboneRegistry
from shared.backbones.architectures import MobileNetV2Features
from shared.config import StudyConfig
from shared.errors import ConfigError
from shared.features import SiteFeatures
from shared.pipeline import Pretrained, build_model, local_problem, standardized
from shared.tasks.base import SiteData

CHEST = {"task": "chest-xray", "backbone": "mobilenet_v2-imagenet", "image_size": 32}


@pytest.fixture(scope="module")
def pretrained() -> Pretrained:
    """MobileNetV2's ImageNet weights (offline package)."""
    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    return Pretrained(resolved.manifest, resolved.path)


@pytest.fixture(scope="module")
def site(source: tuple[np.ndarray, np.ndarray]) -> SiteData:
    """Twelve real X-rays (8 train, 4 held out)."""
    images, labels = source
    x = images[:12].astype(np.float32)
    return SiteData("site-1", x[:8], labels[:8], x[8:], labels[8:], fingerprint="f" * 64)


@pytest.mark.parametrize(("blocks", "width"), [("-2", 320), ("16,17,18", 1760), ("-1", 1280), ("14", 160)])
def test_pooled_blocks_concatenate_the_hooked_block_outputs(blocks: str, width: int) -> None:
    # Prepare: one trunk; hooks record every block's output on the same forward
    torch.manual_seed(0)
    trunk = MobileNetV2Features().eval()
    x = torch.randn(2, 3, 32, 32)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
        for i, block in enumerate(trunk.features)
    ]
    with torch.no_grad():
        trunk(x)
    for hook in hooks:
        hook.remove()
    indices = [int(b) % 19 for b in blocks.split(",")]
    expected = torch.cat([outputs[i].mean(dim=(2, 3)) for i in sorted(indices)], 1)
    # Execute
    trunk.pool_blocks(StudyConfig(**CHEST, feature_blocks=blocks).feature_block_indices())
    with torch.no_grad():
        got = trunk(x)
    # Assert
    assert trunk.feature_dim() == width
    assert got.shape == (2, width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_build_model_declares_the_pooled_width(pretrained: Pretrained) -> None:
    model = build_model(StudyConfig(**CHEST, feature_blocks="-3,-2"), pretrained)
    assert model.head.in_features == 160 + 320
    assert model(torch.zeros(2, 28, 28)).shape == (2, 2)


@pytest.mark.parametrize("other", [{"trainable": "last"}, {"setup": "scratch"}])
def test_feature_options_leave_scratch_and_last_models_alone(pretrained: Pretrained, other: dict[str, str]) -> None:
    cfg = StudyConfig(**CHEST, feature_blocks="-2", standardize_features=True, **other)  # type: ignore[arg-type]
    plain = StudyConfig(**CHEST, **other)  # type: ignore[arg-type]
    assert not cfg.shapes_features()
    assert build_model(cfg, pretrained).head.in_features == build_model(plain, pretrained).head.in_features


@pytest.mark.parametrize("blocks", ["19", "-20"])
def test_out_of_range_block_is_config_error_naming_the_key(pretrained: Pretrained, blocks: str) -> None:
    with pytest.raises(ConfigError, match=r"`feature-blocks` .*in \[-19, 18\]"):
        build_model(StudyConfig(**CHEST, feature_blocks=blocks), pretrained)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**CHEST, "feature_blocks": "17,x"}, "feature-blocks"),
        ({**CHEST, "feature_blocks": "17,17"}, "twice"),
        ({"task": "heart-disease", "feature_blocks": "-2"}, "image tasks"),
        ({"task": "heart-disease", "standardize_features": True}, "image tasks"),
    ],
)
def test_bad_feature_options_are_config_errors(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StudyConfig().with_overrides(**values)


def test_cache_key_differs_by_image_size_and_blocks(pretrained: Pretrained, site: SiteData, tmp_path: Path) -> None:
    # Prepare: three studies that differ only in image size or pooled blocks
    studies = [
        StudyConfig(**CHEST),
        StudyConfig(**{**CHEST, "image_size": 40}),
        StudyConfig(**CHEST, feature_blocks="-2"),
        StudyConfig(**CHEST, feature_blocks="-2"),  # the same as the one before: a cache hit
    ]
    # Execute
    widths = []
    for cfg in studies:
        problem = local_problem(
            cfg, build_model(cfg, pretrained), site, backbone_sha256=pretrained.manifest.sha256, cache_dir=tmp_path
        )
        widths.append(problem.x_train.shape[1])
    # Assert
    assert len(list((tmp_path / "features").glob("*.npz"))) == 3
    assert widths == [1280, 1280, 320, 320]


def test_standardization_uses_training_rows_only() -> None:
    # Prepare: the same training rows with two very different validation sets
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(50, 6)).astype(np.float32)
    train[:, 5] = 7.0  # a constant feature keeps scale 1
    val_a = rng.normal(0.0, 1.0, size=(10, 6)).astype(np.float32)
    val_b = val_a * 100.0 + 50.0
    # Execute
    a = standardized(SiteFeatures(train=train, val=val_a))
    b = standardized(SiteFeatures(train=train, val=val_b))
    # Assert: the training rows' transform ignores the validation rows, and equals scikit-learn's
    scaler = StandardScaler().fit(train)
    np.testing.assert_allclose(a.train, b.train)
    np.testing.assert_allclose(a.train, scaler.transform(train), atol=1e-5)
    np.testing.assert_allclose(a.val, scaler.transform(val_a), atol=1e-5)
    np.testing.assert_allclose(b.val, scaler.transform(val_b), atol=1e-3)
    np.testing.assert_allclose(a.train[:, 5], 0.0)


def test_standardization_of_augmented_views_pools_every_view() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(1.0, 3.0, size=(20, 4, 5)).astype(np.float32)
    val = rng.normal(size=(6, 5)).astype(np.float32)
    got = standardized(SiteFeatures(train=train, val=val))
    scaler = StandardScaler().fit(train.reshape(-1, 5))
    np.testing.assert_allclose(got.train.reshape(-1, 5), scaler.transform(train.reshape(-1, 5)), atol=1e-5)
    np.testing.assert_allclose(got.val, scaler.transform(val), atol=1e-5)


def test_local_problem_standardizes_with_the_sites_training_rows(
    pretrained: Pretrained, site: SiteData, tmp_path: Path
) -> None:
    cfg = StudyConfig(**CHEST, feature_blocks="-2", standardize_features=True)
    raw = StudyConfig(**CHEST, feature_blocks="-2")
    sha = pretrained.manifest.sha256
    got = local_problem(cfg, build_model(cfg, pretrained), site, backbone_sha256=sha, cache_dir=tmp_path)
    plain = local_problem(raw, build_model(raw, pretrained), site, backbone_sha256=sha, cache_dir=tmp_path)
    scaler = StandardScaler().fit(plain.x_train)
    np.testing.assert_allclose(got.x_train, scaler.transform(plain.x_train), atol=1e-4)
    np.testing.assert_allclose(got.x_val, scaler.transform(plain.x_val), atol=1e-4)

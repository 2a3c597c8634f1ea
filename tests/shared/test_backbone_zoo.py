"""The torchvision ImageNet backbones of the registry, checked without their published weights.

Only MobileNetV2's file is installable offline here (tests/shared/test_backbones.py uses it).
For every other built-in manifest a file of torchvision's own layout is written from the
randomly initialized torchvision model, and resolved as the operator's file with the
manifest's hash pinned to that file (as an operator pins the hash of a file of their own):
the architecture must load it, yield the declared feature width, split for
``trainable = "last"``, and a wrong file must be refused in one line. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shared.dp
from shared.backbones import BackboneManifest, BackboneRegistry
from shared.backbones import registry as registry_module
from shared.backbones.architectures import (
    ImageNetInput,
    TrainableStack,
    build_backbone,
    load_backbone_weights,
    split_backbone,
    unfreeze,
)
from shared.backbones.registry import BUILTIN_BACKBONES
from shared.dp import train_dp
from shared.errors import IntegrityError
from shared.training import TrainSettings
from shared.tv import torchvision_module

NEW_BACKBONES = {
    "vgg16-imagenet": "VGG16_Weights",
    "resnet18-imagenet": "ResNet18_Weights",
    "resnet50-imagenet": "ResNet50_Weights",
    "densenet121-imagenet": "DenseNet121_Weights",
    "efficientnet_b0-imagenet": "EfficientNet_B0_Weights",
}
# Published feature widths (torchvision's classifier input of each model).
WIDTHS = {"vgg16": 512, "resnet18": 512, "resnet50": 2048, "densenet121": 1024, "efficientnet_b0": 1280}


def _builtin(name: str) -> BackboneManifest:
    return next(m for m in BUILTIN_BACKBONES if m.name == name)


def _torchvision_state(architecture: str) -> dict[str, torch.Tensor]:
    """A state dict in the layout of torchvision's published file, from random weights.

    VGG16's fully connected layers (120 million weights, 480 MB) are replaced by small tensors of
    the same names: they are dropped on load, and writing them would take most of the test's time.
    DenseNet-121's dense-layer keys are written in the file's legacy form (``norm.1``).
    """
    models = torchvision_module().models
    if architecture == "vgg16":
        trunk = models.vgg.make_layers(models.vgg.cfgs["D"])
        state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
        return state | {f"classifier.{i}.{p}": torch.zeros(2) for i in (0, 3, 6) for p in ("weight", "bias")}
    state = getattr(models, architecture)(weights=None).state_dict()
    if architecture == "densenet121":  # published in 2017: legacy names, no num_batches_tracked
        for key in [k for k in state if ".denselayer" in k]:
            layer, name, leaf = key.rsplit(".", 2)
            if leaf == "num_batches_tracked":
                del state[key]
            elif name[-1] in "12" and name[:-1] in ("norm", "conv"):
                state[f"{layer}.{name[:-1]}.{name[-1]}.{leaf}"] = state.pop(key)
    return state


@pytest.fixture(scope="module", params=sorted(NEW_BACKBONES))
def weights_file(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """A torchvision-layout weights file of each new backbone, written once per module."""
    name = request.param
    path = tmp_path_factory.mktemp(name) / _builtin(name).filename
    torch.save(_torchvision_state(_builtin(name).architecture), path)
    return name, path


def _pinned_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, path: Path
) -> BackboneRegistry:
    """A registry whose built-in ``name`` expects ``path``'s SHA-256, with ``path`` as the operator's file."""
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    pinned = tuple(
        m.model_copy(update={"sha256": sha256}) if m.name == name else m for m in BUILTIN_BACKBONES
    )
    monkeypatch.setattr(registry_module, "BUILTIN_BACKBONES", pinned)
    return BackboneRegistry(weights_file=path, hub_dir=tmp_path / "hub", allow_download=False)


@pytest.mark.parametrize("name", sorted(NEW_BACKBONES))
def test_manifest_declares_torchvision_published_file(name: str) -> None:
    # Prepare: torchvision's own record of its ImageNet-1k weights
    weights = getattr(torchvision_module().models, NEW_BACKBONES[name]).IMAGENET1K_V1
    manifest = _builtin(name)

    # Execute
    prefix = weights.url.rsplit("-", 1)[1].split(".")[0]

    # Assert: same URL and file name; the full hash extends the prefix torchvision publishes
    assert manifest.url == weights.url
    assert manifest.filename == weights.url.rsplit("/", 1)[1]
    assert len(manifest.sha256) == 64 and manifest.sha256.startswith(prefix)
    assert manifest.feature_dim == WIDTHS[manifest.architecture]
    assert list(manifest.preprocessing["mean"]) == list(weights.transforms().mean)
    assert list(manifest.preprocessing["std"]) == list(weights.transforms().std)


def test_operator_file_loads_splits_and_yields_declared_width(
    weights_file: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    name, path = weights_file
    registry = _pinned_registry(monkeypatch, tmp_path, name, path)
    manifest = registry.manifest(name)
    trunk = build_backbone(manifest.architecture, manifest.arch_params)
    key = next(k for k, v in trunk.state_dict().items() if v.dim() == 4)  # the first convolution
    initial = trunk.state_dict()[key].clone()
    pixels = torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8)

    # Execute: resolve and load as a transfer run does, then cut for trainable = "last"
    resolved = registry.resolve(name)
    load_backbone_weights(trunk, resolved.manifest, resolved.path)
    backbone = nn.Sequential(ImageNetInput(64), trunk).eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    prefix, suffix = split_backbone(backbone, 1)
    unfreeze(suffix)
    with torch.no_grad():
        features = backbone(pixels)
        split = suffix(prefix(pixels))

    # Assert: the operator's file, every trunk tensor loaded, the declared width
    assert "operator file" in resolved.origin and resolved.path == path
    written = torch.load(path, weights_only=True)
    assert len(trunk.state_dict()) >= len(trunk.trunk_state(written)) > 0
    assert torch.equal(trunk.state_dict()[key], written[key]) and not torch.equal(written[key], initial)
    assert features.shape == (1, manifest.feature_dim)
    # the blocks before and after the cut compose to the backbone; only the last block's
    # non-BatchNorm weights train
    torch.testing.assert_close(split, features)
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert trainable and trainable <= {id(p) for p in suffix.parameters()}
    assert not any(p.requires_grad for p in prefix.parameters())
    assert sum(p.numel() for p in suffix.parameters()) < sum(p.numel() for p in backbone.parameters()) / 2


def test_wrong_files_are_refused_in_one_line(
    weights_file: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the file of random weights against torchvision's hash; a truncated copy and another
    # architecture's weights (MobileNetV2's), each with the manifest pinned to its own hash
    name, path = weights_file
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign = tmp_path / "foreign.pth"
    torch.save(torchvision_module().models.mobilenet_v2(weights=None).state_dict(), foreign)
    manifest = _builtin(name)

    # Execute
    with pytest.raises(IntegrityError) as wrong_hash:
        BackboneRegistry(weights_file=path, hub_dir=tmp_path / "hub", allow_download=False).resolve(name)
    refusals = {}
    for bad in (truncated, foreign):
        resolved = _pinned_registry(monkeypatch, tmp_path, name, bad).resolve(name)
        with pytest.raises(IntegrityError) as refused:
            load_backbone_weights(build_backbone(manifest.architecture, {}), resolved.manifest, resolved.path)
        refusals[bad] = str(refused.value)

    # Assert: each refused in one line naming the file and the backbone
    message = str(wrong_hash.value)
    assert "\n" not in message and str(path) in message and name in message and "does not match" in message
    for bad, message in refusals.items():
        assert "\n" not in message and str(bad) in message and name in message and "do not fit" in message
    assert "readable" in refusals[truncated] and "missing" in refusals[foreign]


@pytest.mark.parametrize("name", sorted(NEW_BACKBONES))
def test_dp_sgd_trains_the_last_two_blocks_alike_in_hooks_and_ghost_modes(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the trunk's last two blocks + a head on the features before them (ResNet: two
    # residual blocks with their in-place additions; EfficientNet-B0: an MBConv block with
    # stochastic depth, and the head convolution), the same Poisson draws and noise in both modes
    manifest = _builtin(name)
    torch.manual_seed(0)
    backbone = nn.Sequential(
        ImageNetInput(32), build_backbone(manifest.architecture, manifest.arch_params)
    ).eval()
    backbone.requires_grad_(False)
    prefix, suffix = split_backbone(backbone, 2)
    unfreeze(suffix)
    with torch.no_grad():
        inputs = prefix(torch.randint(0, 256, (12, 32, 32), dtype=torch.uint8)).numpy()
    labels = np.arange(12) % 2
    settings = TrainSettings(epochs=1, batch_size=6, learning_rate=0.5, seed=0, momentum=0.0)
    seeds = iter(range(10**6))
    monkeypatch.setattr(shared.dp, "fresh_generator", lambda: torch.Generator().manual_seed(next(seeds) % 2))
    initial = copy.deepcopy(suffix.state_dict())

    # Execute
    trained = {}
    for mode in ("hooks", "ghost"):
        suffix.load_state_dict(initial)
        torch.manual_seed(1)
        head = nn.Linear(manifest.feature_dim, 2)
        stack = TrainableStack(suffix, head)
        torch.manual_seed(2)  # stochastic depth draws from the global generator
        result = train_dp(
            stack, inputs, labels, replace(settings, grad_sample_mode=mode), noise_multiplier=1e-6, max_grad_norm=0.1
        )  # fmt: skip
        trained[mode] = copy.deepcopy(stack.state_dict())

    # Assert: trained (the clipped update moved the weights), finite, BatchNorm statistics kept,
    # and ghost clipping's norms clipped what the materialized per-sample gradients clipped
    assert result.charges and all(c.steps == 2 for c in result.charges)
    hooks, ghost = trained["hooks"], trained["ghost"]
    moved = [
        k
        for k, v in hooks.items()
        if k.startswith("0.") and k[2:] in initial and not torch.equal(v, initial[k[2:]])
    ]
    assert moved and all(torch.isfinite(v.float()).all() for v in hooks.values())
    assert all(torch.equal(hooks[f"0.{k}"], v) for k, v in initial.items() if "running_" in k)
    for key, value in hooks.items():
        torch.testing.assert_close(ghost[key], value, rtol=1e-4, atol=1e-6, msg=key)

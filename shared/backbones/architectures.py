"""Backbone architectures and the backbone + head model every task trains.

A backbone maps an input batch to ``(batch, feature_dim)`` features; the head is one linear
layer. With a frozen backbone only the head is trained, shared and (later) noised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.backbones.manifest import IMAGENET_MEAN, IMAGENET_STD, BackboneManifest
from shared.errors import IntegrityError
from shared.tv import torchvision_module


class MobileNetV2Features(nn.Module):
    """MobileNetV2's convolutional trunk followed by global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision_module().models.mobilenet_v2(weights=None).features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(batch, 1280)`` pooled features."""
        return torch.flatten(self.pool(self.features(x)), 1)


def heart_mlp(in_features: int, hidden: Sequence[int]) -> nn.Sequential:
    """Build the tabular MLP backbone: ``Linear -> ReLU`` per hidden layer."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers)


def small_cnn(channels: Sequence[int]) -> nn.Sequential:
    """Build a compact CNN trained from scratch: ``conv3x3 -> ReLU -> maxpool`` per width.

    No BatchNorm, so that DP-SGD can train it as it is; ends in global average pooling.
    """
    layers: list[nn.Module] = []
    width = 3
    for size in channels:
        layers += [nn.Conv2d(width, size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        width = size
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build_backbone(architecture: str, arch_params: Mapping[str, Any]) -> nn.Module:
    """Build a randomly initialized backbone of ``architecture``."""
    if architecture == "mobilenet_v2":
        return MobileNetV2Features()
    if architecture == "heart_mlp":
        return heart_mlp(int(arch_params["in_features"]), list(arch_params["hidden"]))
    if architecture == "small_cnn":
        return small_cnn(list(arch_params["channels"]))
    raise ValueError(f"unknown architecture {architecture!r}")


def load_backbone_weights(backbone: nn.Module, manifest: BackboneManifest, path: Path) -> None:
    """Load verified weights from ``path`` into ``backbone`` (all keys must match).

    The caller has checked the file's SHA-256 against the manifest already.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if manifest.architecture == "mobilenet_v2":
        # torchvision's file holds the whole classifier; keep the convolutional trunk.
        state = {k: v for k, v in state.items() if k.startswith("features.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise IntegrityError(
            f"{path}: weights do not fit backbone {manifest.name!r} ({manifest.architecture})."
        ) from err


class BackboneWithHead(nn.Module):
    """A backbone followed by a linear classification head.

    Parameters
    ----------
    backbone : nn.Module
        Feature extractor returning ``(batch, feature_dim)``.
    feature_dim : int
        Width of the backbone's output.
    num_classes : int
        Number of output logits.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> None:
        """Stop gradients into the backbone and keep its normalization layers in eval mode."""
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> BackboneWithHead:
        """Set train mode, but keep frozen parts in eval mode (see :func:`keep_frozen_in_eval`)."""
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        keep_frozen_in_eval(self)
        return self


def keep_frozen_in_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are frozen back in eval mode.

    Its pretrained running statistics are then used and never updated, whatever
    ``train()`` was called on.
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in sub.parameters()):
            sub.eval()


class TrainableStack(nn.Sequential):
    """The trainable tail of a model (last backbone blocks + head) as one module.

    ``train()`` keeps its frozen BatchNorm layers in eval mode, like
    :class:`BackboneWithHead` does.
    """

    def train(self, mode: bool = True) -> TrainableStack:
        """Set train mode, keeping frozen BatchNorm layers in eval mode."""
        super().train(mode)
        keep_frozen_in_eval(self)
        return self


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """Return the backbone as a sequence of blocks whose composition is the backbone.

    MobileNetV2: the input module, each of its 19 feature blocks, then pooling; the MLP: one
    ``Linear -> activation`` pair per hidden layer; any other ``nn.Sequential``: its children.
    """
    layers = list(backbone.children()) if isinstance(backbone, nn.Sequential) else [backbone]
    blocks: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, MobileNetV2Features):
            blocks += [*layer.features, nn.Sequential(layer.pool, nn.Flatten())]
        elif blocks and not any(True for _ in layer.parameters()) and isinstance(blocks[-1], nn.Linear):
            blocks[-1] = nn.Sequential(blocks[-1], layer)
        else:
            blocks.append(layer)
    return blocks


def split_backbone(backbone: nn.Module, last_blocks: int) -> tuple[nn.Module, nn.Module]:
    """Split ``backbone`` into a prefix and a suffix holding its last ``last_blocks`` blocks.

    Blocks without parameters (pooling) after the cut go to the suffix. Both parts share
    their parameters with ``backbone``.

    Raises
    ------
    ValueError
        If the backbone has fewer parameterized blocks than ``last_blocks``.
    """
    blocks = backbone_blocks(backbone)
    with_params = [i for i, b in enumerate(blocks) if any(True for _ in b.parameters())]
    if not 1 <= last_blocks <= len(with_params):
        raise ValueError(f"`last_blocks` must be in [1, {len(with_params)}], got {last_blocks}")
    cut = with_params[-last_blocks]
    return nn.Sequential(*blocks[:cut]), nn.Sequential(*blocks[cut:])


def unfreeze(module: nn.Module) -> None:
    """Make ``module``'s parameters trainable, except BatchNorm's (kept frozen for DP-SGD).

    In-place activations are switched off, as Opacus' per-sample gradients require.
    """
    for sub in module.modules():
        if hasattr(sub, "inplace"):
            sub.inplace = False
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            continue
        for param in sub.parameters(recurse=False):
            param.requires_grad_(True)


class ImageNetInput(nn.Module):
    """Turn grayscale pixels ``(batch, H, W)`` in ``[0, 255]`` into a MobileNet input.

    Scales to ``[0, 1]``, resizes (bilinear, antialiased) to ``image_size``, repeats the
    channel three times and applies the ImageNet mean and standard deviation.

    Parameters
    ----------
    image_size : int
        Side of the square output.
    mean, std : Sequence[float]
        Per-channel normalization (ImageNet's by default).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(batch, 3, image_size, image_size)`` normalized float32 images."""
        x = x.to(torch.float32).unsqueeze(1) / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear",
                antialias=True, align_corners=False,
            )  # fmt: skip
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

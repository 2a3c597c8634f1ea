"""From (config, backbone, site data) to a model and the arrays local training runs on.

Used identically by the federated client, the server (initial parameters), the "each site
alone" baseline and the benchmarks, so that all of them train the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.backbones.architectures import (
    BackboneWithHead,
    ImageNetInput,
    TrainableStack,
    build_backbone,
    load_backbone_weights,
    split_backbone,
    unfreeze,
)
from shared.backbones.manifest import BackboneManifest
from shared.config import StudyConfig
from shared.features import site_features
from shared.params import exchanged_names
from shared.tasks import TaskInfo, get_task, input_spec
from shared.tasks.base import SiteData
from shared.training import TrainSettings


@dataclass(frozen=True)
class Pretrained:
    """A backbone manifest and its verified weights file."""

    manifest: BackboneManifest
    path: Path


def effective_trainable(cfg: StudyConfig) -> str:
    """Return what is trained: the configured part in ``transfer``, everything otherwise."""
    return cfg.trainable if cfg.setup == "transfer" else "full"


def build_model(cfg: StudyConfig, pretrained: Pretrained | None) -> BackboneWithHead:
    """Build the model of ``cfg``: backbone (pretrained or random) + a seeded fresh head.

    Parameters
    ----------
    cfg : StudyConfig
        Task, setup, seed, image size.
    pretrained : Pretrained, optional
        Required in the ``transfer`` setup; ignored otherwise.
    """
    task = get_task(cfg.task).info
    torch.manual_seed(cfg.seed)
    if cfg.setup == "transfer":
        if pretrained is None:
            raise ValueError("the transfer setup needs pretrained backbone weights")
        trunk = build_backbone(pretrained.manifest.architecture, pretrained.manifest.arch_params)
        load_backbone_weights(trunk, pretrained.manifest, pretrained.path)
        feature_dim = pretrained.manifest.feature_dim
    else:
        trunk = build_backbone(task.architecture, task.arch_params)
        feature_dim = task.feature_dim
    backbone = _with_input_module(task, cfg, trunk)
    torch.manual_seed(cfg.seed + 1)
    model = BackboneWithHead(backbone, feature_dim, task.num_classes)
    trainable = effective_trainable(cfg)
    if trainable in ("head", "last"):
        model.freeze_backbone()
    if trainable == "last":
        unfreeze(split_backbone(model.backbone, cfg.last_blocks)[1])
    return model


def _with_input_module(task: TaskInfo, cfg: StudyConfig, trunk: nn.Module) -> nn.Module:
    if task.input_spec.get("kind") == "grayscale-image":
        return nn.Sequential(ImageNetInput(cfg.image_size), trunk)
    return trunk


@dataclass
class LocalProblem:
    """What local training optimizes at one site.

    Attributes
    ----------
    model : BackboneWithHead
        The whole model; its exchanged tensors are ``names``.
    names : list[str]
        State-dict keys shared with the server.
    module : nn.Module
        What the optimizer trains: the head on cached features, or the whole model on inputs.
    x_train, y_train, x_val, y_val : np.ndarray
        Inputs of ``module`` and labels.
    site_name : str
        The site these data belong to.
    dropped : int
        Rows of the site's raw data preprocessing left out (:attr:`SiteData.dropped`).
    """

    model: BackboneWithHead
    names: list[str]
    module: nn.Module
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    site_name: str
    dropped: int = 0


def local_problem(
    cfg: StudyConfig,
    model: BackboneWithHead,
    site: SiteData,
    *,
    backbone_sha256: str,
    cache_dir: Path | None,
) -> LocalProblem:
    """Prepare ``site`` for training ``model``: cached features with a frozen backbone.

    Parameters
    ----------
    cfg : StudyConfig
        The run configuration.
    model : BackboneWithHead
        Built by :func:`build_model` for ``cfg``.
    site : SiteData
        The site's data.
    backbone_sha256 : str
        Identity of the backbone weights (feature-cache key).
    cache_dir : Path, optional
        The site's cache directory; ``None`` recomputes features.
    """
    trainable = effective_trainable(cfg)
    names = exchanged_names(model, trainable)
    if trainable in ("head", "last"):
        frozen, module = model.backbone, model.head
        spec = input_spec(cfg)
        if trainable == "last":
            frozen, suffix = split_backbone(model.backbone, cfg.last_blocks)
            module = TrainableStack(suffix, model.head)
            spec = {**spec, "frozen_prefix": f"all but the last {cfg.last_blocks} block(s)"}
        features = site_features(
            frozen, site, backbone_sha256=backbone_sha256, preprocessing=spec, cache_dir=cache_dir
        )
        return LocalProblem(
            model, names, module, features.train, site.y_train, features.val, site.y_val, site.name, site.dropped
        )
    return LocalProblem(
        model, names, model, site.x_train, site.y_train, site.x_val, site.y_val, site.name, site.dropped
    )


def train_settings(cfg: StudyConfig, *, server_round: int, proximal_mu: float = 0.0) -> TrainSettings:
    """Return the local schedule of ``cfg`` for one round (seeded by round)."""
    return TrainSettings(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed * 1000 + server_round,
        proximal_mu=proximal_mu,
    )

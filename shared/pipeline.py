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

from shared.augment import Augmentation
from shared.backbones.architectures import (
    BackboneWithHead,
    ImageNetInput,
    ImageNetTrunk,
    TrainableStack,
    build_backbone,
    load_backbone_weights,
    split_backbone,
    unfreeze,
)
from shared.backbones.manifest import BackboneManifest
from shared.config import StudyConfig
from shared.errors import ConfigError
from shared.features import SiteFeatures, site_features
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
        Task, setup, seed, image size; ``model`` picks the architecture trained from a random
        initialization (:meth:`shared.tasks.base.Task.architecture`).
    pretrained : Pretrained, optional
        Required in the ``transfer`` setup; ignored otherwise.
    """
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    if cfg.setup == "transfer":
        if pretrained is None:
            raise ValueError("the transfer setup needs pretrained backbone weights")
        trunk = build_backbone(pretrained.manifest.architecture, pretrained.manifest.arch_params)
        load_backbone_weights(trunk, pretrained.manifest, pretrained.path)
        feature_dim = pretrained.manifest.feature_dim
        if cfg.feature_blocks and cfg.shapes_features():
            feature_dim = _pool_blocks(cfg, pretrained.manifest, trunk)
    else:
        architecture, arch_params, feature_dim = task.architecture(cfg)
        trunk = build_backbone(architecture, arch_params)
    backbone = _with_input_module(task.info, cfg, trunk)
    torch.manual_seed(cfg.seed + 1)
    model = BackboneWithHead(backbone, feature_dim, task.info.num_classes)
    trainable = effective_trainable(cfg)
    if trainable in ("head", "last"):
        model.freeze_backbone()
    if trainable == "last":
        unfreeze(split_backbone(model.backbone, cfg.last_blocks)[1])
    return model


def _pool_blocks(cfg: StudyConfig, manifest: BackboneManifest, trunk: nn.Module) -> int:
    """Make ``trunk``'s features the pooled blocks of ``cfg.feature_blocks``; return their width."""
    if not isinstance(trunk, ImageNetTrunk):
        raise ConfigError(
            f"`feature-blocks` {cfg.feature_blocks} needs an ImageNet backbone; {manifest.name!r} is a "
            f"{manifest.architecture}."
        )
    try:
        trunk.pool_blocks(cfg.feature_block_indices())
    except ValueError as err:
        raise ConfigError(f"`feature-blocks` {cfg.feature_blocks} for backbone {manifest.name!r}: {err}.") from None
    return trunk.feature_dim()


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
        Inputs of ``module`` and labels. With augmentation ``x_train`` holds ``K`` views per
        record, ``(N, K, F)``; ``module`` maps them to ``(B, K, classes)`` logits and the loss
        of a record is the mean over its views (:class:`shared.training.RecordLoss`).
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
    feature_stats: FeatureStats | None = None


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

    Raises
    ------
    ConfigError
        If the run would need more memory than this machine has (:func:`check_memory`),
        checked before any feature is computed or anything trained.
    """
    check_memory(cfg, model, site)
    trainable = effective_trainable(cfg)
    names = exchanged_names(model, trainable)
    if trainable in ("head", "last"):
        frozen, module = model.backbone, model.head
        spec = input_spec(cfg)
        if trainable == "last":
            frozen, suffix = split_backbone(model.backbone, cfg.last_blocks)
            module = TrainableStack(suffix, model.head)
            spec = {**spec, "frozen_prefix": f"all but the last {cfg.last_blocks} block(s)"}
        if cfg.feature_blocks and cfg.shapes_features():
            spec = {**spec, "feature_blocks": list(cfg.feature_block_indices())}
        features = site_features(
            frozen, site, backbone_sha256=backbone_sha256, preprocessing=spec, cache_dir=cache_dir,
            augmentation=augmentation_of(cfg),
        )  # fmt: skip
        stats = feature_stats(features.train) if cfg.standardize_features and cfg.shapes_features() else None
        if stats is not None:
            features = standardized(features, stats)
        return LocalProblem(
            model, names, module, features.train, site.y_train, features.val, site.y_val, site.name, site.dropped,
            stats,
        )  # fmt: skip
    return LocalProblem(
        model, names, model, site.x_train, site.y_train, site.x_val, site.y_val, site.name, site.dropped
    )


@dataclass(frozen=True)
class FeatureStats:
    """The per-feature mean and scale a site's training features are standardized by.

    Attributes
    ----------
    mean, scale : np.ndarray
        Shape ``(F,)``, float32; ``scale`` is the population standard deviation, 1 where a
        feature is constant.
    """

    mean: np.ndarray
    scale: np.ndarray

    @property
    def width(self) -> int:
        """``F``, the number of features."""
        return int(self.mean.shape[0])


def feature_stats(train: np.ndarray) -> FeatureStats:
    """The mean and standard deviation of every feature over the training rows ``train``.

    With augmented views (``(N, K, F)``) the statistics are over every view of every training
    record; a constant feature keeps scale 1.
    """
    rows = train.reshape(-1, train.shape[-1])
    mean = rows.mean(axis=0)
    scale = rows.std(axis=0)
    scale[scale == 0] = 1.0
    return FeatureStats(mean=mean.astype(np.float32), scale=scale.astype(np.float32))


def standardized(features: SiteFeatures, stats: FeatureStats | None = None) -> SiteFeatures:
    """Scale every feature by the mean and standard deviation of the training rows only.

    ``stats`` defaults to :func:`feature_stats` of ``features.train``: validation rows never
    influence the figures.
    """
    stats = stats if stats is not None else feature_stats(features.train)
    return SiteFeatures(
        train=((features.train - stats.mean) / stats.scale).astype(np.float32),
        val=((features.val - stats.mean) / stats.scale).astype(np.float32),
    )


class FeatureStandardization(nn.Module):
    """``(x - mean) / scale`` per feature, between a frozen backbone and the head of a site's model.

    What :func:`standardized` does to cached features, as a module, so that a model applied to
    new images (and its gradients, for Grad-CAM) runs backbone, standardization and head in one
    forward pass. ``mean`` and ``scale`` are buffers (never trained).
    """

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, stats: FeatureStats) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.asarray(stats.mean, dtype=np.float32).copy()))
        self.register_buffer("scale", torch.from_numpy(np.asarray(stats.scale, dtype=np.float32).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the standardized features."""
        return (x - self.mean) / self.scale


def with_standardization(model: BackboneWithHead, stats: FeatureStats) -> BackboneWithHead:
    """Append :class:`FeatureStandardization` of ``stats`` to ``model``'s backbone (in place); return it.

    The backbone's blocks keep their places (Grad-CAM's layer lookup and the state dict's
    backbone keys are unchanged); the standardization adds buffers ``backbone.<last>.mean`` and
    ``.scale``.

    Raises
    ------
    ValueError
        If the statistics' width is not the head's input width, or the backbone is not a
        ``nn.Sequential`` (an image model's input module and trunk).
    """
    if stats.width != model.head.in_features:
        raise ValueError(f"{stats.width} feature statistics for a head on {model.head.in_features} features")
    if not isinstance(model.backbone, nn.Sequential):
        raise ValueError(f"a {type(model.backbone).__name__} backbone takes no feature standardization")
    model.backbone.append(FeatureStandardization(stats))
    return model


def augmentation_of(cfg: StudyConfig) -> Augmentation:
    """The augmented views of ``cfg``'s training images (seeded by the study's seed)."""
    return Augmentation(kind=cfg.augment, views=cfg.augment_views, seed=cfg.seed)


def train_settings(cfg: StudyConfig, *, server_round: int, proximal_mu: float = 0.0) -> TrainSettings:
    """Return the local schedule of ``cfg`` for one round (seeded by round, with its class weighting
    and Opacus' per-sample gradient mode)."""
    return TrainSettings(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed * 1000 + server_round,
        proximal_mu=proximal_mu,
        class_weighting=cfg.class_weighting,
        grad_sample_mode=cfg.grad_sample_mode,
    )


# ------------------------------------------------------------------ memory a site needs
_PROBE_SIDE = 32
_FLOAT_BYTES = 4
GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """What one site's training process needs at its largest moment, approximately.

    Attributes
    ----------
    total_bytes : int
        The largest pass plus what stays resident (the site's arrays and features).
    pass_name : str
        Which pass is the largest, in words (named in a refusal).
    """

    total_bytes: int
    pass_name: str


def memory_estimate(cfg: StudyConfig, model: BackboneWithHead, site: SiteData) -> MemoryEstimate:
    """Estimate the memory local training of ``model`` on ``site`` needs (image tasks).

    Convolutional activations grow with the square of the image side, so the backbone is run
    once on one small probe image (hooks record every layer's input and output) and the sizes
    are scaled to ``cfg.image_size``. The passes: features through the frozen part
    (:data:`~shared.features.FEATURE_BATCH` images, the largest layer's input and output
    live at once), evaluation (:data:`~shared.training.PREDICT_BATCH`), and, when backbone
    layers train, a training batch keeping every activation and its gradient (with DP, one
    gradient per example of every trainable parameter as well). Tabular tasks hold only their
    arrays.
    """
    from shared.features import FEATURE_BATCH
    from shared.training import PREDICT_BATCH

    resident = site.x_train.nbytes + site.x_val.nbytes
    passes = {"the site's data": 0}
    if get_task(cfg.task).info.input_spec.get("kind") == "grayscale-image":
        peak, saved = _activations_per_image(model, cfg.image_size)
        trainable = effective_trainable(cfg)
        if trainable in ("head", "last"):
            passes[f"features of {FEATURE_BATCH} images at a time"] = FEATURE_BATCH * peak
        if trainable != "head":
            params = sum(p.numel() for p in model.parameters() if p.requires_grad) * _FLOAT_BYTES
            per_example = params if cfg.dp else 0
            passes[f"a training batch of {cfg.batch_size} images"] = cfg.batch_size * (2 * saved + per_example) + 3 * params
            passes[f"evaluating {PREDICT_BATCH} images at a time"] = PREDICT_BATCH * peak
        views = cfg.augment_views if cfg.augment != "none" else 1
        resident += (site.num_train * views + site.num_val) * model.head.in_features * _FLOAT_BYTES
    name = max(passes, key=lambda k: passes[k])
    return MemoryEstimate(total_bytes=int(resident + passes[name]), pass_name=name)


def check_memory(
    cfg: StudyConfig, model: BackboneWithHead, site: SiteData, *, flag: str = "image-size", available: int | None = None
) -> MemoryEstimate:
    """Refuse a run whose estimated memory exceeds what this machine has available.

    Parameters
    ----------
    cfg, model, site
        As for :func:`memory_estimate`.
    flag : str
        The setting to name (``image-size`` in a run config, ``--image-size`` on the command line).
    available : int, optional
        Bytes available (default: ``psutil.virtual_memory().available``).

    Raises
    ------
    ConfigError
        Naming ``flag`` and its value, the estimate, the pass it comes from, and the limit.
    """
    import psutil

    estimate = memory_estimate(cfg, model, site)
    limit = psutil.virtual_memory().available if available is None else available
    if estimate.total_bytes > limit:
        raise ConfigError(
            f"{flag} {cfg.image_size} needs about {estimate.total_bytes / GIB:.1f} GiB of memory at site "
            f"{site.name} ({estimate.pass_name} at {cfg.image_size}x{cfg.image_size}), more than the "
            f"{limit / GIB:.1f} GiB this machine has available; lower {flag}."
        )
    return estimate


def _activations_per_image(model: BackboneWithHead, image_size: int) -> tuple[int, int]:
    """Bytes per image at ``image_size``: (the largest layer's input + output, all layers' outputs)."""
    trunk = model.backbone[1] if isinstance(model.backbone, nn.Sequential) and isinstance(model.backbone[0], ImageNetInput) else model.backbone
    side = min(_PROBE_SIDE, image_size)
    probe = nn.Sequential(ImageNetInput(side), trunk)
    peak = saved = 0

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal peak, saved
        size_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        size_out = output.numel() if isinstance(output, torch.Tensor) else 0
        peak = max(peak, size_in + size_out)
        saved += size_out

    leaves = [m for m in probe.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    modes = {m: m.training for m in probe.modules()}  # frozen BatchNorm must stay in eval mode
    try:
        probe.eval()
        with torch.no_grad():
            probe(torch.zeros(1, side, side))
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    scale = (image_size / side) ** 2 * _FLOAT_BYTES
    return int(peak * scale), int(saved * scale)

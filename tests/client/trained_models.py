"""Trained model folders for tests: real backbones, a head trained on real rows or images, the real formats.

A site's copy is written by :func:`client.models.store_site_model` (the writer a delivery uses),
with the backbone in the site's :class:`client.store.BackboneStore`; a server run folder holds
model.pt and model_card.json only. The payload is the ``carefl-model/1`` dict the server writes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.models import store_site_model
from client.store import BackboneStore
from shared.backbones.architectures import BackboneWithHead
from shared.backbones.registry import BackboneRegistry
from shared.config import StudyConfig
from shared.hashing import sha256_bytes
from shared.params import exchanged_names
from shared.pipeline import FeatureStats, Pretrained, build_model, local_problem
from shared.tasks.base import SiteData
from shared.training import TrainSettings, train

RUN_ID = "run-7"


@dataclass
class Built:
    """A model trained for a test, and where its folder is."""

    folder: Path
    model: BackboneWithHead
    study: StudyConfig
    site_dir: Path


def payload_bytes(study: StudyConfig, model: BackboneWithHead, manifest_name: str | None, sha256: str | None) -> bytes:
    """The ``carefl-model/1`` payload of ``model`` (its exchanged tensors), as the server writes it."""
    names = exchanged_names(model, "head" if study.setup == "transfer" else "full")
    state = {n: model.state_dict()[n].detach().clone() for n in names}
    payload = {
        "format": "carefl-model/1",
        "task": study.task,
        "setup": study.setup,
        "config": study.to_run_config(),
        "backbone_name": manifest_name,
        "backbone_sha256": sha256,
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def card_of(study: StudyConfig, model_bytes: bytes, sha256: str | None, name: str | None) -> dict[str, Any]:
    """A minimal server model card naming the model's SHA-256, task and backbone."""
    return {"task": study.task, "model_sha256": sha256_bytes(model_bytes), "backbone": {"name": name, "sha256": sha256}}


def write_site_copy(
    site_dir: Path,
    study: StudyConfig,
    model: BackboneWithHead,
    pretrained: Pretrained,
    *,
    preprocessing: dict[str, Any],
    threshold: float,
    rule: str = "youden",
    feature_stats: FeatureStats | None = None,
) -> Path:
    """Store a site's copy of ``model`` (and its backbone in the site's store); return the folder."""
    manifest = pretrained.manifest
    BackboneStore(site_dir).put(manifest.to_json(), pretrained.path.read_bytes())
    data = payload_bytes(study, model, manifest.name, manifest.sha256)
    facts = {
        "format": "carefl-site-model/1",
        "site": "Test Hospital",
        "run_id": RUN_ID,
        "received_utc": "2026-12-01T12:00:00+00:00",
        "model_sha256": sha256_bytes(data),
        "backbone_sha256": manifest.sha256,
        "study": study.to_run_config(),
        "operating_point": {"rule": rule, "threshold": threshold, "sensitivity": 0.8, "specificity": 0.7},
        "at_0_5": {"sensitivity": 0.7, "specificity": 0.8},
        "validation_records": 50,
        "preprocessing": preprocessing,
    }
    card = card_of(study, data, manifest.sha256, manifest.name)
    return store_site_model(site_dir, RUN_ID, data, card, facts, feature_stats=feature_stats)


def write_server_folder(folder: Path, study: StudyConfig, model: BackboneWithHead, pretrained: Pretrained) -> Path:
    """A server run folder: model.pt and model_card.json."""
    folder.mkdir(parents=True)
    data = payload_bytes(study, model, pretrained.manifest.name, pretrained.manifest.sha256)
    (folder / "model.pt").write_bytes(data)
    card = card_of(study, data, pretrained.manifest.sha256, pretrained.manifest.name)
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def heart_model(registry: Path, site_dir: Path, *, epochs: int = 30) -> Built:
    """Hungary's head trained on its own rows over the Cleveland backbone; its site copy (threshold 0.5)."""
    from shared.tasks import heart

    resolved = BackboneRegistry(registry, allow_download=False).resolve("heart-mlp-cleveland")
    pretrained = Pretrained(resolved.manifest, resolved.path)
    study = StudyConfig(task="heart-disease", backbone_sha256=resolved.manifest.sha256, operating_point="youden")
    model = build_model(study, pretrained)
    site = heart.load_sites(("Hungary",))[0]
    with torch.no_grad():
        features = model.backbone(torch.from_numpy(site.x_train)).numpy()
    train(model.head, features, site.y_train, TrainSettings(epochs=epochs, batch_size=32, learning_rate=0.05, seed=1))
    model.eval()
    folder = write_site_copy(site_dir, study, model, pretrained, preprocessing=dict(site.preprocessing), threshold=0.5)
    return Built(folder, model, study, site_dir)


def mobilenet() -> Pretrained:
    """The built-in ImageNet MobileNetV2 (offline package), verified."""
    resolved = BackboneRegistry(allow_download=False).resolve("mobilenet_v2-imagenet")
    return Pretrained(resolved.manifest, resolved.path)


def chest_model(npz: Path, site_dir: Path, *, image_size: int = 32, records: int = 600, epochs: int = 15) -> Built:
    """A head on ImageNet MobileNetV2 trained on PneumoniaMNIST training images; its site copy (threshold 0.5)."""
    pretrained = mobilenet()
    study = StudyConfig(task="chest-xray", backbone="mobilenet_v2-imagenet", backbone_sha256=pretrained.manifest.sha256,
                        image_size=image_size)  # fmt: skip
    model = build_model(study, pretrained)
    with np.load(npz) as arrays:
        x = arrays["train_images"][:records].astype(np.float32)
        y = arrays["train_labels"][:records].ravel().astype(np.int64)
    with torch.no_grad():
        features = model.backbone(torch.from_numpy(x)).numpy()
    train(model.head, features, y, TrainSettings(epochs=epochs, batch_size=32, learning_rate=0.05, seed=1))
    model.eval()
    preprocessing = {"classes": ["0", "1"], "image_size": image_size}
    folder = write_site_copy(site_dir, study, model, pretrained, preprocessing=preprocessing, threshold=0.5)
    return Built(folder, model, study, site_dir)


def standardized_chest_model(
    npz: Path, site_dir: Path, *, image_size: int = 32, records: int = 300, epochs: int = 10
) -> Built:
    """A chest head trained as a site trains it with ``feature-blocks = -2`` and ``standardize-features``.

    The training rows are the first ``records`` PneumoniaMNIST training images; the features are
    the pipeline's (:func:`shared.pipeline.local_problem`), standardized by those rows' statistics,
    which the site's copy stores (``feature_stats.npz``). ``Built.model`` is the plain model (no
    standardization inside): backbone features, then the head on standardized features.
    """
    pretrained = mobilenet()
    study = StudyConfig(task="chest-xray", backbone="mobilenet_v2-imagenet", backbone_sha256=pretrained.manifest.sha256,
                        image_size=image_size, feature_blocks="-2", standardize_features=True)  # fmt: skip
    model = build_model(study, pretrained)
    with np.load(npz) as arrays:
        x = arrays["train_images"][:records].astype(np.float32)
        y = arrays["train_labels"][:records].ravel().astype(np.int64)
        x_val = arrays["val_images"][:40].astype(np.float32)
        y_val = arrays["val_labels"][:40].ravel().astype(np.int64)
    site = SiteData("Test Hospital", x, y, x_val, y_val, fingerprint="c" * 64)
    problem = local_problem(study, model, site, backbone_sha256=pretrained.manifest.sha256, cache_dir=None)
    assert problem.feature_stats is not None
    train(problem.module, problem.x_train, y, TrainSettings(epochs=epochs, batch_size=32, learning_rate=0.05, seed=1))
    model.eval()
    preprocessing = {"classes": ["0", "1"], "image_size": image_size}
    folder = write_site_copy(site_dir, study, model, pretrained, preprocessing=preprocessing, threshold=0.5,
                             feature_stats=problem.feature_stats)  # fmt: skip
    return Built(folder, model, study, site_dir)


def numpy_standardized_probabilities(built: Built, train_images: np.ndarray, images: np.ndarray) -> np.ndarray:
    """P(positive) of the training-time pipeline, recomputed with numpy: features, standardized, head.

    The statistics are the mean and population sd of the backbone features of ``train_images``
    (the site's training rows; scale 1 for a constant feature), computed here, not read back.
    """
    with torch.no_grad():
        train_features = built.model.backbone(torch.from_numpy(train_images.astype(np.float32))).numpy().astype(np.float64)
        features = built.model.backbone(torch.from_numpy(images.astype(np.float32))).numpy().astype(np.float64)
    mean, sd = train_features.mean(axis=0), train_features.std(axis=0)
    sd[sd == 0] = 1.0
    weight = built.model.head.weight.detach().numpy().astype(np.float64)
    bias = built.model.head.bias.detach().numpy().astype(np.float64)
    logits = ((features - mean) / sd) @ weight.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp[:, 1] / exp.sum(axis=1)

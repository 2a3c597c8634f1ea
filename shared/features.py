"""Backbone features, computed once per site and cached on disk.

With a frozen backbone the features of a site's data never change, so each round trains the
head on cached features instead of running the backbone again. The cache key covers everything
the features depend on: the backbone's SHA-256, the site's data fingerprint and the
preprocessing. A corrupt cache file is recomputed, never trusted.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.atomic import atomic_write_bytes
from shared.augment import Augmentation, augmented_views
from shared.hashing import sha256_bytes
from shared.log import log
from shared.tasks.base import SiteData


@dataclass(frozen=True)
class SiteFeatures:
    """Backbone features of a site's training rows (``(N, K, F)`` with ``K`` augmented views) and held-out rows."""

    train: np.ndarray
    val: np.ndarray


def cache_key(backbone_sha256: str, data_fingerprint: str, preprocessing: Mapping[str, object]) -> str:
    """Return the SHA-256 naming the cache entry of these inputs."""
    blob = json.dumps(
        {"backbone": backbone_sha256, "data": data_fingerprint, "preprocessing": preprocessing},
        sort_keys=True,
    )
    return sha256_bytes(blob.encode("utf-8"))


FEATURE_BATCH = 256
"""Examples run through the frozen backbone at once when features are computed."""


@torch.no_grad()
def compute_features(backbone: nn.Module, x: np.ndarray, *, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """Run ``backbone`` in eval mode over ``x`` in batches; returns float32 features."""
    backbone.eval()
    chunks = [
        backbone(torch.from_numpy(x[i : i + batch_size])).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


def site_features(
    backbone: nn.Module,
    site: SiteData,
    *,
    backbone_sha256: str,
    preprocessing: Mapping[str, object],
    cache_dir: Path | None,
    augmentation: Augmentation | None = None,
) -> SiteFeatures:
    """Return the site's features, from the cache when present, else computed and stored.

    Parameters
    ----------
    backbone : nn.Module
        The frozen backbone.
    site : SiteData
        The site's preprocessed inputs.
    backbone_sha256 : str
        Identity of the backbone's weights.
    preprocessing : Mapping[str, object]
        Description of the input preprocessing.
    cache_dir : Path, optional
        Where cache files live; ``None`` disables the cache.
    augmentation : Augmentation, optional
        Augmented views of the training images; the training features are then ``(N, K, F)``
        and the cache key includes :meth:`Augmentation.spec`. ``None`` or ``none``: the
        images themselves, ``(N, F)``, under the same key as without this argument.
    """
    augmentation = augmentation or Augmentation()
    if augmentation.active:
        preprocessing = {**preprocessing, "augmentation": augmentation.spec()}
    path = None
    if cache_dir is not None:
        key = cache_key(backbone_sha256, site.fingerprint, preprocessing)
        path = Path(cache_dir) / "features" / f"{key}.npz"
        cached = _load(path, site, augmentation)
        if cached is not None:
            return cached
    if augmentation.active:
        views = [compute_features(backbone, view) for view in augmented_views(site.x_train, augmentation)]
        train = np.stack(views, axis=1)
    else:
        train = compute_features(backbone, site.x_train)
    features = SiteFeatures(train=train, val=compute_features(backbone, site.x_val))
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, train=features.train, val=features.val)
        atomic_write_bytes(path, buffer.getvalue())
    return features


def _load(path: Path, site: SiteData, augmentation: Augmentation) -> SiteFeatures | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            features = SiteFeatures(train=data["train"], val=data["val"])
    except (OSError, ValueError, KeyError, EOFError) as err:
        log(WARNING, "feature cache %s unreadable (%s); recomputing", path, err)
        return None
    fits = not augmentation.active or (features.train.ndim == 3 and features.train.shape[1] == augmentation.views)
    if len(features.train) != site.num_train or len(features.val) != site.num_val or not fits:
        log(WARNING, "feature cache %s does not fit the site's data; recomputing", path)
        return None
    return features

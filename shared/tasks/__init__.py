"""Tasks: where each site's data come from and which model fits them.

Each task module (``heart``, ``chest``) loads data with no Flower imports; this module is the
one door the server, the client and the benchmarks use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.config import StudyConfig
from shared.errors import ConfigError
from shared.tasks.base import SiteData


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
        How raw site arrays become model inputs (``image_size`` is filled from the config).
    """

    name: str
    num_classes: int
    default_backbone: str
    architecture: str
    arch_params: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0
    input_spec: dict[str, Any] = field(default_factory=dict)


HEART = TaskInfo(
    name="heart-disease",
    num_classes=2,
    default_backbone="heart-mlp-cleveland",
    architecture="heart_mlp",
    arch_params={"in_features": 13, "hidden": [32, 32]},
    feature_dim=32,
    input_spec={"kind": "tabular", "standardize": "per-site training rows"},
)
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
TASKS: dict[str, TaskInfo] = {t.name: t for t in (HEART, CHEST)}


def get_task(name: str) -> TaskInfo:
    """Return the task called ``name``."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}.") from None


def input_spec(cfg: StudyConfig) -> dict[str, Any]:
    """Return the description of the input pipeline for ``cfg`` (a feature-cache key part)."""
    spec = dict(get_task(cfg.task).input_spec)
    if cfg.task == CHEST.name:
        spec["image_size"] = cfg.image_size
    return spec


def heart_site_names(cfg: StudyConfig) -> tuple[str, ...]:
    """Hospitals of the heart-disease federation: without Cleveland in the transfer setups."""
    from shared.tasks import heart

    if cfg.setup == "benchmark":
        return heart.SITES
    return tuple(s for s in heart.SITES if s != heart.PRETRAIN_SITE)


def site_name(cfg: StudyConfig, index: int) -> str:
    """Return the name of site ``index`` without loading any data."""
    if cfg.task == HEART.name:
        names = heart_site_names(cfg)
        return names[index] if 0 <= index < len(names) else f"site-{index + 1}"
    return f"site-{index + 1}"


def load_sites(cfg: StudyConfig, data_path: str = "", *, only: int | None = None) -> list[SiteData]:
    """Load the sites of the federation described by ``cfg`` (just site ``only`` if given).

    Parameters
    ----------
    cfg : StudyConfig
        The run configuration (task, setup, split parameters).
    data_path : str
        Data location (heart-disease: optional CSV; chest-xray: required).
    only : int, optional
        Index (0-based) of the one site to load.

    Raises
    ------
    ConfigError
        If ``only`` is not a site of the federation.
    """
    from pathlib import Path

    if cfg.task == HEART.name:
        from shared.tasks import heart

        names = heart_site_names(cfg)
        if only is not None:
            if not 0 <= only < len(names):
                raise ConfigError(f"site index {only} out of range: the federation has {len(names)} sites.")
            names = (names[only],)
        return heart.load_sites(names, Path(data_path) if data_path else None)
    if cfg.task == CHEST.name:
        from shared.tasks import chest

        dataset = chest.load_dataset(data_path, val_fraction=cfg.val_fraction, seed=cfg.seed)
        return chest.load_sites(
            dataset, num_sites=cfg.num_sites, alpha=cfg.dirichlet_alpha, seed=cfg.seed, only=only
        )
    raise ConfigError(f"unknown task {cfg.task!r}")


def load_site(cfg: StudyConfig, index: int, data_path: str = "") -> SiteData:
    """Load site number ``index`` (0-based) of the federation described by ``cfg``, only it."""
    return load_sites(cfg, data_path, only=index)[0]

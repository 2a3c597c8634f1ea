"""Tasks: where each site's data come from and which model fits them.

The one door the server, the client and the benchmarks use. Each task is an object in
:mod:`shared.tasks.registry`; its data modules (``heart``, ``chest``) load data with no Flower
imports and are imported only when data are loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError
from shared.tasks.base import OwnData, Progress, Records, SiteData, Task, TaskInfo, check_sites
from shared.tasks.chest_xray import CHEST
from shared.tasks.heart_disease import HEART
from shared.tasks.registry import TASKS, get_task

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.tasks.report import DataReport

__all__ = [
    "CHEST", "HEART", "TASKS", "OwnData", "Records", "SiteData", "Task", "TaskInfo",
    "check_sites", "get_task", "input_spec", "load_own", "load_partition", "load_site", "load_sites", "site_name",
]  # fmt: skip


def input_spec(cfg: StudyConfig) -> dict[str, Any]:
    """Return the description of the input pipeline for ``cfg`` (a feature-cache key part)."""
    return get_task(cfg.task).input_spec(cfg)


def site_name(cfg: StudyConfig, index: int) -> str:
    """Return the name of site ``index`` without loading any data."""
    return get_task(cfg.task).site_name(cfg, index)


def load_sites(cfg: StudyConfig, data_path: str = "", *, only: int | None = None) -> list[SiteData]:
    """Load the sites of the federation described by ``cfg`` (just site ``only`` if given).

    Parameters
    ----------
    cfg : StudyConfig
        The study (task, setup, split parameters).
    data_path : str
        Data location (heart-disease: optional CSV; chest-xray: required).
    only : int, optional
        Index (0-based) of the one site to load.

    Raises
    ------
    ConfigError
        If ``only`` is not a site of the federation.
    InputError
        If the data are unusable, or their labels do not fit the task (a label its model
        cannot take; training data that, all sites together, lack a class): checked on load,
        so a site refuses before it trains or charges its privacy ledger.
    """
    task = get_task(cfg.task)
    sites = task.load_sites(cfg, data_path, only=only)
    check_sites(sites, task.info)
    return sites


def load_own(cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None) -> tuple[SiteData, DataReport]:
    """Read a hospital's own data whole, split its way, and check the labels fit the task.

    Raises
    ------
    InputError
        If the data are unusable (the report's ``problem`` says why) or their labels do not fit.
    """
    task = get_task(cfg.task)
    site, report = task.load_own(cfg, source, progress=progress)
    check_sites([site], task.info)
    return site, report


def load_partition(cfg: StudyConfig, index: int, count: int, data_path: str = "") -> SiteData:
    """Load partition ``index`` of ``count`` of a shared data set (a simulated or benchmark site).

    Raises
    ------
    ConfigError
        If ``count`` (when set) is not the number of sites the study partitions the data into.
    """
    expected = get_task(cfg.task).num_partitions(cfg)
    if count and count != expected:
        raise ConfigError(
            f"`num-partitions` = {count}, but the {cfg.task} study partitions its data into {expected} sites."
        )
    return load_site(cfg, index, data_path)


def load_site(cfg: StudyConfig, index: int, data_path: str = "") -> SiteData:
    """Load site number ``index`` (0-based) of the federation described by ``cfg``, only it."""
    return load_sites(cfg, data_path, only=index)[0]

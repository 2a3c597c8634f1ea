"""What a task is: its static facts, the sites it loads, and the arrays it gives training.

A task is a :class:`Task` object registered by name in :mod:`shared.tasks.registry`; adding a
task means one module with its :class:`Task` subclass and one line in the registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import ConfigError, InputError
from shared.log import log

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.tasks.report import DataReport


Progress = Callable[[int, int], None]
"""Called with (records done, records in all) as data are read."""


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
    dropped : int
        Rows of the site's raw data its task's preprocessing left out (heart-disease: a
        missing value in a used column, as FLamby); reported, never silent.
    preprocessing : Mapping[str, Any]
        What the site's preprocessing learned from its own training rows and must apply again
        to a new record (heart-disease: the standardization's means and scales, imputed
        values), JSON-ready. Stays at the site, stored with its copy of the model.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str
    dropped: int = 0
    preprocessing: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(len(self.y_train))

    @property
    def num_val(self) -> int:
        """Number of held-out examples."""
        return int(len(self.y_val))


@dataclass(frozen=True)
class OwnData:
    """A hospital's own data, used whole: where they are and how the site splits them.

    Set by the site (node config), never by the server.

    Attributes
    ----------
    path : str
        The site's data: a file or folder in a format its task reads.
    name : str
        The site's name in metrics and reports.
    val_fraction : float
        Share of records (of patients, with a patient column) held out for validation.
    seed : int
        Seed of the site's split.
    """

    path: str
    name: str
    val_fraction: float = 0.2
    seed: int = 42


@dataclass(frozen=True)
class Records:
    """Records a trained model is applied to (``carefl evaluate`` / ``carefl predict``).

    Attributes
    ----------
    ids : list[str]
        One id per record: the file (relative to the data path) or ``line N`` of a table.
    x : np.ndarray
        Model inputs (float32), preprocessed exactly as the site's training records were.
    y : np.ndarray | None
        Integer labels, or ``None`` for unlabelled records.
    report : DataReport
        What was read and what was refused.
    """

    ids: list[str]
    x: np.ndarray
    y: np.ndarray | None
    report: DataReport


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

    def architecture(self, cfg: StudyConfig) -> tuple[str, dict[str, Any], int]:
        """The architecture trained from a random initialization for ``cfg`` (``scratch``, ``benchmark``).

        Returns
        -------
        tuple[str, dict[str, Any], int]
            The architecture's name (:func:`shared.backbones.architectures.build_backbone`), its
            constructor arguments and its feature width (the head's input).
        """
        return self.info.architecture, dict(self.info.arch_params), self.info.feature_dim

    def site_name(self, cfg: StudyConfig, index: int) -> str:
        """The name of site ``index`` (0-based), without loading any data."""
        return f"site-{index + 1}"

    def num_partitions(self, cfg: StudyConfig) -> int:
        """How many sites a shared data set is partitioned into for the study ``cfg``."""
        return cfg.num_sites

    def load_own(self, cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None) -> tuple[SiteData, DataReport]:
        """Read a hospital's own data whole and split them the site's way.

        Returns the site's data and the report of what was read (:mod:`shared.tasks.report`);
        ``progress(done, total)``, if given, is called as records are read.

        Raises
        ------
        InputError
            If the data cannot be used (one line naming the file and what is wrong).
        """
        raise ConfigError(f"the {self.info.name} task cannot read a site's own data.")

    def check_data(self, cfg: StudyConfig, source: OwnData, *, progress: Progress | None = None) -> DataReport:
        """The data report of :meth:`load_own`, with ``problem`` set instead of raising (``carefl data check``)."""
        from shared.tasks.report import DataReport

        try:
            return self.load_own(cfg, source, progress=progress)[1]
        except InputError as err:
            return DataReport(task=self.info.name, path=source.path, problem=str(err))

    def read_records(
        self,
        cfg: StudyConfig,
        path: str,
        *,
        preprocessing: Mapping[str, Any],
        labelled: bool,
        progress: Progress | None = None,
    ) -> Records:
        """Read records at ``path`` for a trained model, preprocessed with ``preprocessing``.

        Parameters
        ----------
        cfg : StudyConfig
            The study the model was trained in (task, image size).
        path : str
            Any data layout the task trains on; unlabelled layouts too when ``labelled`` is false.
        preprocessing : Mapping[str, Any]
            What the site learned from its training rows (:attr:`SiteData.preprocessing`).
        labelled : bool
            Whether labels are required (evaluate) or optional and ignored (predict).

        Raises
        ------
        InputError
            If nothing usable is there (one line naming the file and what is wrong).
        """
        raise ConfigError(f"the {self.info.name} task cannot read records for a trained model.")

    @abstractmethod
    def load_sites(self, cfg: StudyConfig, data_path: str, *, only: int | None = None) -> list[SiteData]:
        """Load the sites of the federation ``cfg`` describes (just site ``only`` if given).

        Raises
        ------
        ConfigError
            If ``only`` is not a site of the federation.
        """


def class_counts(labels: np.ndarray, names: Sequence[str] = ()) -> str:
    """Describe how many examples each label value has, e.g. ``"0: 12, 1: 30"``.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels.
    names : Sequence[str]
        Class names by label, shown beside the value where given.
    """
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return ", ".join(
        f"{v} ({names[v]}): {c}" if 0 <= v < len(names) and names[v] != str(v) else f"{v}: {c}"
        for v, c in zip(values.tolist(), counts.tolist())
    )


def label_problem(labels: np.ndarray, info: TaskInfo, *, need_every_class: bool) -> str | None:
    """Return why ``labels`` do not fit the task (a phrase: "holds ..."), or ``None``.

    The one rule for every task and every place data are loaded: labels are integers in
    ``0 .. info.num_classes - 1`` (what the task's model can output), and a part that is
    trained on holds every class (with one class only, a model learns nothing and still
    scores a perfect accuracy on that class).

    Parameters
    ----------
    labels : np.ndarray
        The labels of one part (a site's training or held-out part, a data set's split).
    info : TaskInfo
        The task they are for.
    need_every_class : bool
        Whether the part is trained on (then every class must be present).
    """
    array = np.asarray(labels)
    classes = f"0..{info.num_classes - 1}"
    if array.size and not np.issubdtype(array.dtype, np.integer):
        return f"holds {array.dtype} labels, not integers {classes}"
    present = set(np.unique(array).tolist())
    outside = sorted(v for v in present if not 0 <= v < info.num_classes)
    if outside:
        return (
            f"holds label(s) {', '.join(map(str, outside))}, outside the {info.name} task's classes {classes} "
            f"(its model has {info.num_classes} outputs)"
        )
    missing = sorted(set(range(info.num_classes)) - present)
    if need_every_class and missing:
        held = ", ".join(str(v) for v in sorted(present)) or "none"
        return (
            f"holds only class {held}, no example of class {', '.join(map(str, missing))}; the "
            f"{info.name} task needs every class ({classes}) in a part it trains on"
        )
    return None


def check_sites(sites: Sequence[SiteData], info: TaskInfo) -> None:
    """Refuse sites holding labels the task's model cannot take; warn of a one-class site.

    A label outside ``0 .. num_classes - 1`` (in a training or held-out part) is refused. A
    site whose own training part lacks a class is allowed, with a warning naming it: label
    skew is what federations are for (FLamby's Switzerland has its one negative patient in
    its held-out part), and :func:`check_federation` refuses training data that lack a class
    altogether. Called wherever sites are loaded, before anything is trained or charged.

    Raises
    ------
    InputError
        Naming every site that fails, its part and its class counts.
    """
    problems = []
    for site in sites:
        for part, labels in (("training", site.y_train), ("held-out", site.y_val)):
            problem = label_problem(labels, info, need_every_class=False)
            if problem is not None:
                problems.append(f"{site.name}'s {part} part {problem} (counts {class_counts(labels)})")
    if problems:
        raise InputError(f"{info.name} data refused: {'; '.join(problems)}.")
    for site in sites:
        if len(np.unique(site.y_train)) < info.num_classes:
            log(
                WARNING, "%s's training part lacks a class (counts %s): it can take part in a federation, "
                "but trained alone it learns one class", site.name, class_counts(site.y_train) or "no rows",
            )  # fmt: skip


def check_federation(sites: Sequence[SiteData], info: TaskInfo, *, source: str) -> None:
    """Refuse training data that, all sites together, lack a class the task needs.

    With one class only, the model learns a constant and still scores a perfect accuracy:
    a plausible wrong model. Each site's labels are checked by :func:`check_sites`.

    Parameters
    ----------
    sites : Sequence[SiteData]
        Every site that trains (a federation's hospitals, or the one pretraining cohort).
    info : TaskInfo
        Their task.
    source : str
        Where the data came from (named in the error).

    Raises
    ------
    InputError
        Naming the source, every site and its class counts.
    """
    labels = np.concatenate([np.asarray(site.y_train) for site in sites]) if sites else np.zeros(0, np.int64)
    problem = label_problem(labels, info, need_every_class=True)
    if problem is not None:
        counts = "; ".join(f"{site.name} {class_counts(site.y_train) or 'no rows'}" for site in sites)
        raise InputError(f"{source}: the sites' training data {problem} (counts: {counts}).")

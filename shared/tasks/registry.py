"""The tasks CareFL knows, by name (as Opacus keeps its accountants by mechanism name).

Adding a task: write its :class:`~shared.tasks.base.Task` subclass in its own module and add an
instance here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from shared.errors import ConfigError
from shared.tasks.base import Task
from shared.tasks.chest_xray import ChestXray
from shared.tasks.heart_disease import HeartDisease

TASKS: Mapping[str, Task] = MappingProxyType({task.info.name: task for task in (HeartDisease(), ChestXray())})
"""Every task, by its run-config name (read-only)."""


def get_task(name: str) -> Task:
    """Return the task called ``name``.

    Raises
    ------
    ConfigError
        If no task has that name.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}.") from None

"""Fixtures of the end-to-end tests: the processes a test starts, all gone when it ends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.processes import ProcessGroups, group_alive, tagged_processes


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[ProcessGroups]:
    """The test's processes; afterwards (pass or fail) none of their process groups may remain."""
    groups = ProcessGroups(tmp_path / "logs", grace=10)
    with groups:
        yield groups
    seen = groups.groups()
    deadline = time.monotonic() + 20
    while any(group_alive(g) for g in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [g for g in seen if group_alive(g)], f"process groups left running: {seen}"
    assert not tagged_processes(groups.tag)

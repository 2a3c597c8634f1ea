"""A run never waits for sites without a bound, and every wait ends at once when it is stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg

from server.stoppable import RunStopped, SitesPresent, StoppableGrid
from server.strategy import FederationStopped


def _context(connected: int) -> LegacyContext:
    manager = SimpleClientManager()
    for node in range(connected):
        manager.register(GridClientProxy(node_id=node + 1, grid=None, run_id=1))  # type: ignore[arg-type]
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return LegacyContext(context=base, config=ServerConfig(num_rounds=1), strategy=FedAvg(), client_manager=manager)


class SilentGrid:
    """A collaborator that accepts messages and never answers (sites that went away)."""

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return []

    def get_node_ids(self) -> list[int]:
        return [1]


def test_too_few_sites_stop_the_run_when_the_wait_is_up() -> None:
    # Prepare: one site connected, two needed; the round itself must never run
    ran: list[bool] = []
    present = SitesPresent(lambda grid, context: ran.append(True), minimum=2, timeout=0.5)

    # Execute
    start = time.monotonic()
    with pytest.raises(FederationStopped, match="only 1 site\\(s\\) connected within 0.5 s, fewer than min-sites = 2"):
        present(SilentGrid(), _context(connected=1))  # type: ignore[arg-type]

    # Assert
    assert time.monotonic() - start < 3
    assert ran == []


def test_enough_sites_run_the_round() -> None:
    # Prepare
    ran: list[bool] = []
    present = SitesPresent(lambda grid, context: ran.append(True), minimum=2, timeout=0.5)

    # Execute
    present(SilentGrid(), _context(connected=2))  # type: ignore[arg-type]

    # Assert
    assert ran == [True]


def test_a_stop_ends_the_wait_for_sites() -> None:
    # Prepare
    stop = threading.Event()
    present = SitesPresent(lambda grid, context: None, minimum=2, timeout=600, stop=stop)
    threading.Timer(0.3, stop.set).start()

    # Execute
    start = time.monotonic()
    with pytest.raises(RunStopped):
        present(SilentGrid(), _context(connected=0))  # type: ignore[arg-type]

    # Assert
    assert time.monotonic() - start < 2


def test_a_stop_ends_a_wait_for_replies_long_before_its_timeout() -> None:
    # Prepare: a stage waiting 120 s for sites that will not answer
    stop = threading.Event()
    grid = StoppableGrid(SilentGrid(), stop)  # type: ignore[arg-type]
    threading.Timer(0.3, stop.set).start()

    # Execute
    start = time.monotonic()
    with pytest.raises(RunStopped):
        grid.send_and_receive([object()], timeout=120)  # type: ignore[list-item]

    # Assert
    assert time.monotonic() - start < 2


def test_without_a_stop_the_wait_for_replies_ends_at_its_timeout() -> None:
    # Prepare
    grid = StoppableGrid(SilentGrid(), threading.Event())  # type: ignore[arg-type]

    # Execute
    start = time.monotonic()
    replies = grid.send_and_receive([object()], timeout=0.5)  # type: ignore[list-item]

    # Assert
    assert list(replies) == []
    assert 0.4 < time.monotonic() - start < 2


class LateGrid(SilentGrid):
    """Answers every message ``delay`` seconds after it was pushed; counts the pulls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pulls = 0
        self.pushed = 0.0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.pushed = time.monotonic()
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:  # type: ignore[override]
        self.pulls += 1
        if time.monotonic() - self.pushed < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))]  # type: ignore[list-item]


def test_quick_replies_are_collected_without_waiting_a_whole_poll_interval() -> None:
    # Prepare: the reply is there 20 ms after the push; a site that never answers
    quick, silent = LateGrid(delay=0.02), SilentGrid()
    pulls: list[int] = []
    counting = StoppableGrid(silent, threading.Event())  # type: ignore[arg-type]
    silent.pull_messages = lambda ids: pulls.append(1) or []  # type: ignore[method-assign]

    # Execute
    start = time.monotonic()
    replies = StoppableGrid(quick, threading.Event()).send_and_receive(["instruction"], timeout=5)  # type: ignore[arg-type]
    elapsed = time.monotonic() - start
    counting.send_and_receive(["instruction"], timeout=1.0)

    # Assert: back well before one POLL_S (0.2 s); a silent site is not polled much more often
    # than every POLL_S (the back-off: 5, 10, 20, ... ms, then 200 ms)
    assert len(replies) == 1 and elapsed < 0.15
    assert 6 <= len(pulls) <= 14

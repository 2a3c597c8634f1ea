"""A ServerApp that can be stopped from outside, and never waits for sites without a bound.

In a local simulation the ServerApp runs in a thread of the command's process. When the user
presses Ctrl-C (or the process gets SIGTERM), the command must end within seconds; Flower's
grid would keep the thread waiting for replies until a stage's timeout (120 s by default), and
Python waits for that thread before it exits. :class:`StoppableGrid` wraps the grid so that
every wait ends as soon as a stop event is set. :class:`SitesPresent` waits for ``min-sites``
sites before a round, at most ``timeout`` seconds and never past a stop: Flower's legacy
sampling would wait a day, deaf to the stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.server import Grid
from flwr.server.compat import LegacyContext
from flwr.supercore.run import Run

from server.distribution import Workflow
from server.strategy import FederationStopped

POLL_S = 0.2
FIRST_POLL_S = 0.005  # a stage's first pull waits this long, then twice as long each time, up to POLL_S


class RunStopped(Exception):
    """The run was stopped from outside (Ctrl-C, SIGTERM); the ServerApp ends at once."""


class StoppableGrid(Grid):
    """A grid whose waits end as soon as ``stop`` is set (they then raise :class:`RunStopped`).

    Parameters
    ----------
    grid : Grid
        Flower's grid, which does the work.
    stop : threading.Event
        Set by whoever runs the ServerApp to end the run.
    """

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid = grid
        self._stop = stop

    def check(self) -> None:
        """Raise :class:`RunStopped` if the run was stopped."""
        if self._stop.is_set():
            raise RunStopped("the run was stopped")

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid's interface
        self._grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # noqa: D102
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - also polled by Flower's own thread: never raises
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        self.check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        self.check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and collect the replies until all arrived, ``timeout`` passed or a stop.

        Pulls back off from ``FIRST_POLL_S`` to ``POLL_S``: a stage whose replies come quickly
        (SecAgg+'s key stages in a simulation) does not wait a whole ``POLL_S`` for them.
        """
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_POLL_S
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if pending and self._stop.wait(wait):
                self.check()
            wait = min(2 * wait, POLL_S)
        return replies


class SitesPresent:
    """Fit workflow that waits for ``minimum`` connected sites, at most ``timeout`` s, then runs ``inner``.

    The wait also ends when ``stop`` is set.

    Raises
    ------
    FederationStopped
        If fewer than ``minimum`` sites are connected when the time is up.
    """

    def __init__(self, inner: Workflow, *, minimum: int, timeout: float, stop: threading.Event | None = None) -> None:
        self._inner = inner
        self._minimum = minimum
        self._timeout = timeout
        self._stop = stop or threading.Event()

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Wait for the sites (as Flower's sampling counts them), then run the round."""
        deadline = time.monotonic() + self._timeout
        while (connected := context.client_manager.num_available()) < self._minimum:
            if time.monotonic() > deadline:
                raise FederationStopped(
                    f"only {connected} site(s) connected within {self._timeout:g} s, fewer than "
                    f"min-sites = {self._minimum}; the run stops."
                )
            if self._stop.wait(POLL_S):
                raise RunStopped("the run was stopped")
        self._inner(grid, context)

"""Flower's SuperNode, unchanged but for how long it idles between two pulls from the SuperLink.

``flower-supernode`` sleeps a hard-coded 3 s whenever a pull from the SuperLink finds no
message (``flwr/supernode/start_client_internal.py``), so every message of a round waits 1.5 s
on average before a hospital even sees it, five times per SecAgg+ round. This entry point runs
Flower's own ``flower_supernode()`` with that one sleep capped at ``--idle-poll`` seconds
(default :data:`IDLE_POLL_S`): the same protocol, the same requests, only sooner. Its 0.5 s
waits on its own state (for a reply to push, for an object to be stored) become
:data:`LOCAL_POLL_S`: they ask nothing of the SuperLink. If a Flower upgrade moves the sleep, the node
refuses to start rather than silently keep the old latency.

Run as ``python -P -m client.runtime.supernode [--idle-poll S] FLOWER_SUPERNODE_ARGS...``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

IDLE_POLL_S = 0.5
"""Seconds a SuperNode waits after a pull that found no message (Flower: 3 s)."""
LOCAL_POLL_S = 0.05
"""Seconds between the SuperNode's checks of its own state for a reply to push (Flower: 0.5 s)."""


class CappedSleep:
    """The :mod:`time` module as one module sees it, with its sleeps capped.

    A sleep of a second or more (the idle wait between pulls from the SuperLink) waits at most
    ``idle`` seconds; a shorter one (a wait on the node's own state, e.g. for a reply to push)
    at most ``local`` seconds.
    """

    def __init__(self, idle: float, local: float = LOCAL_POLL_S) -> None:
        self.idle = idle
        self.local = local

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, capped at ``idle`` (a second or more) or ``local`` (less)."""
        time.sleep(min(seconds, self.idle if seconds >= 1 else self.local))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_idle_poll(module: ModuleType, idle: float, local: float = LOCAL_POLL_S) -> None:
    """Make ``module``'s ``time.sleep`` calls wait at most ``idle`` (long sleeps) or ``local`` seconds.

    Raises
    ------
    RuntimeError
        If ``module`` does not use the :mod:`time` module as ``time`` (Flower changed).
    """
    if getattr(module, "time", None) is not time:
        raise RuntimeError(f"{module.__name__} has no `time` module to shorten its idle poll; check the Flower version")
    module.time = CappedSleep(idle, local)  # type: ignore[attr-defined]


def capped_supernode_command(flower_args: Sequence[str], *, idle_poll: float = IDLE_POLL_S) -> list[str]:
    """The command line running ``flower-supernode FLOWER_ARGS`` with its idle poll capped."""
    return [sys.executable, "-P", "-m", "client.runtime.supernode", "--idle-poll", f"{idle_poll:g}", *flower_args]


def flower_arguments(argv: Sequence[str]) -> list[str]:
    """The ``flower-supernode`` arguments of a command line made by :func:`capped_supernode_command`.

    Raises
    ------
    ValueError
        If ``argv`` is not such a command line.
    """
    prefix = [sys.executable, "-P", "-m", "client.runtime.supernode", "--idle-poll"]
    if list(argv[: len(prefix)]) != prefix:
        raise ValueError(f"not a capped SuperNode command line: {' '.join(argv[:6])}")
    return list(argv[len(prefix) + 1 :])


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -P -m client.runtime.supernode [--idle-poll S] FLOWER_SUPERNODE_ARGS...``."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    args = list(sys.argv[1:] if argv is None else argv)
    idle_poll = IDLE_POLL_S
    if args[:1] == ["--idle-poll"]:
        idle_poll, args = float(args[1]), args[2:]
    cap_idle_poll(internal, idle_poll)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()

"""Building blocks of a site's append-only records (privacy ledger, audit log).

Canonical JSON for hashing and MACs, UTC timestamps from an injectable clock, strict JSON
parsing (no NaN or Infinity), and an exclusive ``flock`` on a lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def utc_timestamp(clock: Clock, owner: str) -> str:
    """Return ``clock()`` as ISO 8601 in UTC; a naive datetime is refused.

    Parameters
    ----------
    clock : Clock
        Returns the current time.
    owner : str
        What the clock belongs to, for the error message (e.g. "the ledger").
    """
    moment = clock()
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{owner} clock must return a timezone-aware datetime")
    return moment.astimezone(UTC).isoformat()


def canonical(obj: object) -> bytes:
    """Canonical JSON: sorted keys, no spaces, ASCII, floats as their shortest exact repr, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def strict_json(raw: bytes, what: str) -> Any:
    """Parse UTF-8 JSON, refusing NaN and Infinity (``ValueError`` naming ``what``)."""

    def refuse(name: str) -> float:
        raise ValueError(f"{name} is not allowed in {what}")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (released on exit or process death)."""
    fd = os.open(lock_file, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock

"""The one logger of CareFL.

Use ``from shared.log import log`` then ``log(INFO, "round %d: %.4f", rnd, acc)``,
the same call shape as Flower's logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

LOGGER_NAME = "carefl"


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record to ``sys.stderr`` as it is *then*, not as it was at import time.

    A plain ``StreamHandler`` keeps the stream it was created with; when a test harness or an
    embedding tool swaps and closes ``sys.stderr``, later records would fail to write.
    """

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        """Ignore: the stream is always the current ``sys.stderr``."""


_logger = logging.getLogger(LOGGER_NAME)
if not _logger.handlers:
    _handler = _CurrentStderr()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def log(level: int, msg: str, *args: Any) -> None:
    """Log ``msg % args`` at ``level`` on the CareFL logger."""
    _logger.log(level, msg, *args)


def set_level(level: int) -> None:
    """Set the level of the CareFL logger."""
    _logger.setLevel(level)

"""The one logger of CareFL.

Use ``from shared.log import log`` then ``log(INFO, "round %d: %.4f", rnd, acc)``,
the same call shape as Flower's logger.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER_NAME = "carefl"
_logger = logging.getLogger(LOGGER_NAME)
if not _logger.handlers:
    _handler = logging.StreamHandler()
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

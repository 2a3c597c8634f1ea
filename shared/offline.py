"""Keep Flower from reaching the internet.

Flower's telemetry, update check and runtime dependency installation all open network
connections. :func:`configure_flower_env` switches them off; every entry point of CareFL calls
it before Flower is imported, and child processes inherit the environment.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

FLOWER_OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray (simulation engine) must not phone home either.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def configure_flower_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the variables that keep Flower and Ray offline, without overriding the user's.

    Parameters
    ----------
    environ : MutableMapping[str, str], optional
        The environment to update; ``os.environ`` by default.
    """
    env = os.environ if environ is None else environ
    for key, value in FLOWER_OFFLINE_ENV.items():
        env.setdefault(key, value)

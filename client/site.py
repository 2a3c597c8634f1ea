"""Facts about this site, set by its operator (node config), never by the server."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

DEFAULT_CACHE_ROOT = Path(os.path.expanduser("~")) / ".carefl" / "cache"


@dataclass(frozen=True)
class SiteEnvironment:
    """Where this site's data and cache are.

    Attributes
    ----------
    index : int
        Which site of the federation this node holds (``partition-id`` in simulation).
    data_path : str
        The site's data (empty: the task's built-in source).
    cache_dir : Path
        The site's private cache: received backbones and backbone features.
    """

    index: int
    data_path: str
    cache_dir: Path


def site_environment(context: Context, defaults: Mapping[str, str]) -> SiteEnvironment:
    """Resolve the site's environment: node config, then the app's defaults, then run config.

    Parameters
    ----------
    context : Context
        The ClientApp's context.
    defaults : Mapping[str, str]
        Fallbacks set by whoever built the ClientApp (the local simulation passes
        ``data-path`` and ``cache-root``).
    """
    node = context.node_config
    index = int(node.get("site-index", node.get("partition-id", 0)))
    data_path = str(
        node.get("data-path") or defaults.get("data-path") or context.run_config.get("data-path", "")
    )
    if "cache-dir" in node:
        cache_dir = Path(str(node["cache-dir"]))
    else:
        root = Path(defaults.get("cache-root") or DEFAULT_CACHE_ROOT)
        cache_dir = root / f"site-{index}"
    return SiteEnvironment(index=index, data_path=data_path, cache_dir=cache_dir)

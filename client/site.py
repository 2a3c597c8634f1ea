"""Facts about this site, set by its operator (node config), never by the server."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

DEFAULT_SITES_ROOT = Path(os.path.expanduser("~")) / ".carefl" / "sites"
POLICY_FILE = "policy.toml"


@dataclass(frozen=True)
class SiteEnvironment:
    """Where this site's data, private state and policy are.

    Attributes
    ----------
    index : int
        Which site of the federation this node holds (``partition-id`` in simulation).
    data_path : str
        The site's data (empty: the task's built-in source).
    site_dir : Path
        The site's private directory: privacy ledger, received backbones, feature cache.
    policy_path : Path
        The site's privacy policy (TOML).
    simulated : bool
        A node of Flower's simulation engine (``partition-id`` set, no ``site-dir``): a
        simulated hospital, whose site directory the ClientApp prepares itself.
    """

    index: int
    data_path: str
    site_dir: Path
    policy_path: Path
    simulated: bool = False


def site_environment(context: Context, defaults: Mapping[str, str]) -> SiteEnvironment:
    """Resolve the site's environment: node config, then the app's defaults, then run config.

    Node-config keys: ``site-index`` (or simulation's ``partition-id``), ``data-path``,
    ``site-dir``, ``policy``.

    Parameters
    ----------
    context : Context
        The ClientApp's context.
    defaults : Mapping[str, str]
        Fallbacks set by whoever built the ClientApp (the local simulation passes
        ``data-path`` and ``sites-root``).
    """
    node = context.node_config
    index = int(node.get("site-index", node.get("partition-id", 0)))
    data_path = str(
        node.get("data-path") or defaults.get("data-path") or context.run_config.get("data-path", "")
    )
    if "site-dir" in node:
        site_dir = Path(str(node["site-dir"]))
    else:
        site_dir = Path(defaults.get("sites-root") or DEFAULT_SITES_ROOT) / f"site-{index}"
    policy = Path(str(node["policy"])) if "policy" in node else site_dir / POLICY_FILE
    simulated = "site-dir" not in node and "partition-id" in node
    return SiteEnvironment(index=index, data_path=data_path, site_dir=site_dir, policy_path=policy, simulated=simulated)

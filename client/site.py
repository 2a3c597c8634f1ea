"""Facts about this site, set by its operator (node config), never by the server.

Where a node's data come from is explicit, one of two:

- **its own data** (a deployed hospital): ``data-path`` names the site's data, used whole; the
  site splits them itself (``val-fraction``, ``split-seed``; by patient where the data name
  patients) and reports under ``site-name``;
- **a partition** of one shared data set (a simulation, or a benchmark on public data):
  Flower's ``partition-id`` and ``num-partitions``, which the simulation engine sets for each
  simulated node and a benchmark node's operator sets by hand. ``data-path`` is then the
  shared data set (empty: the task's built-in source, e.g. the UCI hospitals).

A node never partitions silently: a deployed node with neither is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context

from shared.errors import ConfigError
from shared.log import log
from shared.tasks.base import OwnData

if TYPE_CHECKING:
    from shared.config import StudyConfig
    from shared.tasks.base import SiteData

DEFAULT_SITES_ROOT = Path(os.path.expanduser("~")) / ".carefl" / "sites"
POLICY_FILE = "policy.toml"
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 42
NODE_KEYS = (
    "data-path", "site-name", "val-fraction", "split-seed", "partition-id", "num-partitions", "site-dir", "policy",
)  # fmt: skip
"""The node-config keys a CareFL node reads."""


@dataclass(frozen=True)
class Partition:
    """Which part of a shared data set this node holds.

    Attributes
    ----------
    index : int
        Flower's ``partition-id`` (0-based).
    count : int
        Flower's ``num-partitions``; 0 when the simulation did not say.
    """

    index: int
    count: int = 0


@dataclass(frozen=True)
class SiteEnvironment:
    """Where this site's data, private state and policy are.

    Attributes
    ----------
    data_path : str
        The site's own data, or the shared data set a partition is cut from.
    site_dir : Path
        The site's private directory: privacy ledger, received backbones and models, caches.
    policy_path : Path
        The site's privacy policy (TOML).
    own : OwnData | None
        The site's own data and its split (``None`` for a partition).
    partition : Partition | None
        The partition this node holds (``None`` for its own data).
    simulated : bool
        A node of Flower's simulation engine (``partition-id`` set, no ``site-dir``): a
        simulated hospital, whose site directory the ClientApp prepares itself.
    """

    data_path: str
    site_dir: Path
    policy_path: Path
    own: OwnData | None = None
    partition: Partition | None = None
    simulated: bool = False

    @property
    def index(self) -> int:
        """The partition's index (0 for a site's own data)."""
        return self.partition.index if self.partition is not None else 0


def site_environment(context: Context, defaults: Mapping[str, str]) -> SiteEnvironment:
    """Resolve the site's environment from its node config (then the app's defaults, then run config).

    Parameters
    ----------
    context : Context
        The ClientApp's context.
    defaults : Mapping[str, str]
        Fallbacks set by whoever built the ClientApp (the local simulation passes
        ``data-path`` and ``sites-root``).

    Raises
    ------
    ConfigError
        If the node names neither its own data nor a partition, uses the retired
        ``site-index``, or a value is out of range.
    """
    node = context.node_config
    if "site-index" in node:
        raise ConfigError(
            "node config `site-index` is retired: a node's `data-path` is its own data, used whole; to hold "
            "a partition of a shared benchmark data set, set `partition-id` and `num-partitions`."
        )
    data_path = str(
        node.get("data-path") or defaults.get("data-path") or context.run_config.get("data-path", "")
    )
    partition = None
    if "partition-id" in node:
        partition = Partition(
            _int(node, "partition-id", minimum=0), _int(node, "num-partitions", minimum=0, default=0)
        )
    if "site-dir" in node:
        site_dir = Path(str(node["site-dir"]))
    else:
        site_dir = (
            Path(defaults.get("sites-root") or DEFAULT_SITES_ROOT)
            / f"site-{partition.index if partition else 0}"
        )
    policy = Path(str(node["policy"])) if "policy" in node else site_dir / POLICY_FILE
    own = None
    if partition is None:
        if not data_path:
            raise ConfigError(
                "this node names no data: set node config `data-path` to the site's own data (used whole), or "
                "`partition-id` and `num-partitions` for a partition of a shared benchmark data set."
            )
        own = OwnData(
            path=data_path,
            name=str(node.get("site-name") or site_dir.name),
            val_fraction=_float(node, "val-fraction", DEFAULT_VAL_FRACTION),
            seed=_int(node, "split-seed", minimum=None, default=DEFAULT_SPLIT_SEED),
        )
    simulated = "site-dir" not in node and partition is not None
    return SiteEnvironment(
        data_path=data_path,
        site_dir=site_dir,
        policy_path=policy,
        own=own,
        partition=partition,
        simulated=simulated,
    )


def site_label(cfg: StudyConfig, env: SiteEnvironment) -> str:
    """The site's name in metrics and logs, without reading its data."""
    if env.own is not None:
        return env.own.name
    from shared.tasks import site_name

    return site_name(cfg, env.index)


def site_data(cfg: StudyConfig, env: SiteEnvironment) -> SiteData:
    """Read the site's data: its own, whole (decoded once, then from the site's cache), or its
    partition of the shared data set.

    Raises
    ------
    InputError
        If the data are unusable.
    ConfigError
        If the partition does not fit the study.
    """
    from client.data_cache import cached_site, data_key, store_site
    from shared.tasks import load_own, load_partition

    if env.own is not None:
        key = data_key(cfg, env.own)
        cached = cached_site(env.site_dir, key)
        if cached is not None:
            return cached
        site, report = load_own(cfg, env.own)
        log(
            INFO, "%s: own data %s: %d training / %d validation records (%s), %d refused",
            site.name, env.own.path, site.num_train, site.num_val, report.layout or "?", len(report.refused),
        )  # fmt: skip
        store_site(env.site_dir, key, site)
        return site
    assert env.partition is not None
    return load_partition(cfg, env.partition.index, env.partition.count, env.data_path)


def _int(node: Mapping[str, object], key: str, *, minimum: int | None, default: int | None = None) -> int:
    value = node.get(key, default)
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"node config `{key}` must be an integer, got {value!r}.") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"node config `{key}` must be >= {minimum}, got {number}.")
    return number


def _float(node: Mapping[str, object], key: str, default: float) -> float:
    value = node.get(key, default)
    try:
        number = float(str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"node config `{key}` must be a number, got {value!r}.") from None
    if not 0.0 < number < 1.0:
        raise ConfigError(f"node config `{key}` must be in (0, 1), got {number}.")
    return number

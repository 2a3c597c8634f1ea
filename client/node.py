"""The ``flower-supernode`` command line of one hospital (pure: builds, never runs).

A hospital's SuperNode connects to the consortium's SuperLink over TLS, checking it with the
consortium's CA (``--root-certificates``), and authenticates with its node key
(``--auth-supernode-private-key``), whose public half the SuperLink operator registered. Its
node config tells the CareFL ClientApp where the site's data, private directory and policy are
(see :mod:`client.site`). Each SuperNode serves a Runtime API for its ClientApp processes on
``--host``/``--port`` (Flower 1.41's successor of ``--clientappio-api-address``): several
SuperNodes on one machine need distinct ports. It runs with ``--isolation process``: no app
code of its own; the site's runtime (:mod:`client.runtime`) pulls each task from that API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from client.runtime.supernode import IDLE_POLL_S, capped_supernode_command
from shared.errors import ConfigError, InputError

DEFAULT_RUNTIME_PORT = 9094  # flwr.supercore.constant.SUPERNODE_UVICORN_DEFAULT_PORT
CONNECTED_PATTERN = r"SuperNode ID: \d+"
ACTIVATION_FAILED = "Failed to activate SuperNode"  # Flower's FLEET_NODE_ACTIVATION_FAILED (code 2004)
NODE_KEY_FILE = "node.key"
CA_FILE = "ca.crt"


@dataclass(frozen=True)
class NodeCredentials:
    """A hospital's folder from ``carefl provision`` (``DIR/hospitals/<name>/``).

    Attributes
    ----------
    private_key : Path
        The node key (OpenSSH EC P-384).
    root_certificates : Path
        The consortium CA's certificate.
    """

    private_key: Path
    root_certificates: Path

    @classmethod
    def from_dir(cls, folder: Path) -> NodeCredentials:
        """Read ``node.key`` and ``ca.crt`` from ``folder``; refused if one is missing."""
        creds = cls(Path(folder) / NODE_KEY_FILE, Path(folder) / CA_FILE)
        for path in (creds.private_key, creds.root_certificates):
            if not path.is_file():
                raise InputError(
                    f"{path} not found: give the hospital's folder from `carefl provision` (hospitals/<name>)."
                )
        return creds


@dataclass(frozen=True)
class NodeOptions:
    """How to start one hospital's SuperNode.

    Attributes
    ----------
    superlink : str
        ``host:port`` of the SuperLink.
    partition : tuple[int, int] | None
        ``(partition-id, num-partitions)`` to hold a partition of a shared benchmark data set;
        ``None`` (a hospital): ``data_path`` is the site's own data, used whole.
    site_dir : Path
        The site's private directory (privacy ledger, policy, received backbones).
    credentials : NodeCredentials | None
        TLS and authentication; ``None`` connects without TLS and without a node key.
    data_path : str
        The site's own data (or the shared data set a partition is cut from; empty: the
        task's built-in source).
    site_name : str
        The site's name in metrics (default: the site directory's name).
    val_fraction : float | None
        Share of the site's own records it holds out for validation (default 0.2).
    split_seed : int | None
        Seed of the site's own split (default 42).
    policy : Path | None
        The site's policy file (default: ``site_dir/policy.toml``).
    host, port : str, int
        Where its Runtime API (for its ClientApp processes) listens.
    max_wait_time : float | None
        Give up connecting to the SuperLink after this many seconds (``None``: never).
    site_worker : bool
        Train and evaluate in the site's long-lived worker (:mod:`client.worker`; default), or
        in a fresh process per message as Flower does.
    idle_poll : float
        Seconds the SuperNode waits after a pull from the SuperLink that found no message
        (Flower's own: 3 s).
    """

    superlink: str
    site_dir: Path
    credentials: NodeCredentials | None
    data_path: str = ""
    partition: tuple[int, int] | None = None
    site_name: str = ""
    val_fraction: float | None = None
    split_seed: int | None = None
    policy: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_RUNTIME_PORT
    max_wait_time: float | None = None
    site_worker: bool = True
    idle_poll: float = IDLE_POLL_S

    def __post_init__(self) -> None:
        if self.partition is not None and not 0 <= self.partition[0] < self.partition[1]:
            raise ConfigError(
                f"partition {self.partition[0]} of {self.partition[1]} does not exist (0-based ids)."
            )
        if self.partition is None and not self.data_path:
            raise ConfigError("a hospital's node needs its own data (--data PATH), or a benchmark partition.")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"`val-fraction` must be in (0, 1), got {self.val_fraction!r}.")
        if not 0 < self.port < 65536:
            raise ConfigError(f"`port` must be in 1..65535, got {self.port!r}.")
        if not 0 < self.idle_poll <= 3:
            raise ConfigError(f"`idle-poll` must be in (0, 3] seconds, got {self.idle_poll!r}.")

    @property
    def insecure(self) -> bool:
        """Whether it connects without TLS (and without node authentication)."""
        return self.credentials is None

    def node_config(self) -> dict[str, str | int]:
        """The node-config keys :func:`client.site.site_environment` reads."""
        values: dict[str, str | int | float] = {"site-dir": str(Path(self.site_dir).resolve())}
        if self.data_path:
            values["data-path"] = self.data_path
        if self.partition is not None:
            values["partition-id"], values["num-partitions"] = self.partition
        else:
            values["site-name"] = self.site_name or Path(self.site_dir).resolve().name
            if self.val_fraction is not None:
                values["val-fraction"] = self.val_fraction
            if self.split_seed is not None:
                values["split-seed"] = self.split_seed
        if self.policy is not None:
            values["policy"] = str(Path(self.policy).resolve())
        return values


def node_config_arg(values: Mapping[str, str | int | float]) -> str:
    """Format ``--node-config``: ``key=value`` pairs, strings double-quoted (TOML).

    Raises
    ------
    ConfigError
        If a string holds a double quote or a line break, which Flower's parser cannot carry.
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value or "\n" in value or "\\" in value:
                raise ConfigError(
                    f"node-config value of `{key}` may not contain '\"', '\\' or a line break: {value!r}"
                )
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def supernode_command(options: NodeOptions, auth_secret_file: Path | None = None) -> list[str]:
    """Return the command line of Flower's SuperNode for ``options``.

    It is ``flower-supernode`` with its idle poll capped at ``options.idle_poll`` seconds
    (:mod:`client.runtime.supernode`; Flower waits 3 s after every pull that found nothing).

    ``auth_secret_file``: the secret its task runtime signs ``AcquireTask`` with (only that
    runtime takes its tasks).
    """
    argv = ["--superlink", options.superlink]
    if options.credentials is None:
        argv.append("--insecure")
    else:
        argv += [
            "--root-certificates", str(options.credentials.root_certificates),
            "--auth-supernode-private-key", str(options.credentials.private_key),
        ]  # fmt: skip
    argv += ["--node-config", node_config_arg(options.node_config())]
    argv += ["--host", options.host, "--port", str(options.port)]
    argv += ["--isolation", "process"]  # its tasks are run by the site's own runtime (client.runtime)
    if auth_secret_file is not None:
        argv += ["--superexec-auth-secret-file", str(auth_secret_file)]
    if options.max_wait_time is not None:
        argv += ["--max-wait-time", f"{options.max_wait_time:g}"]
    return capped_supernode_command(argv, idle_poll=options.idle_poll)

"""The ``flwr`` CLI commands CareFL runs against a SuperLink, and the config they read (pure).

``flwr`` finds a SuperLink by connection name in ``$FLWR_HOME/config.toml``: a
``[superlink.<name>]`` table with the ``address`` of its Control API and, for TLS, the
``root-certificates`` (the consortium's CA) to verify it. Registration
(``flwr supernode register KEY.pub <name>``) goes through that Control API, so it can only
happen once the SuperLink is up; a key registered before is refused with "Public key already
in use" (the SuperLink's state database keeps registrations across restarts).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from shared.atomic import atomic_write_text
from shared.errors import DeploymentError, InputError
from shared.executables import executable

CONNECTION_NAME = "carefl"
CONFIG_FILE = "config.toml"  # flwr.cli.constant.FLOWER_CONFIG_FILE
ALREADY_REGISTERED = "Public key already in use"
FINISHED = "finished"
COMPLETED = "finished:completed"


@dataclass(frozen=True)
class Connection:
    """A ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml``.

    Attributes
    ----------
    address : str
        ``host:port`` of the SuperLink's Control API.
    root_certificates : Path | None
        CA certificate that verifies the SuperLink; ``None`` connects without TLS.
    name : str
        Connection name given to ``flwr`` commands.
    """

    address: str
    root_certificates: Path | None
    name: str = CONNECTION_NAME

    def to_toml(self) -> str:
        """The config file making this the default connection."""
        entry: dict[str, Any] = {"address": self.address}
        if self.root_certificates is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(Path(self.root_certificates).resolve())
        return tomli_w.dumps({"superlink": {"default": self.name, self.name: entry}})


def write_flwr_home(home: Path, connection: Connection) -> Path:
    """Write ``home/config.toml`` with ``connection`` (atomically); returns its path."""
    path = Path(home) / CONFIG_FILE
    atomic_write_text(path, connection.to_toml())
    return path


def read_flwr_home(home: Path, name: str = CONNECTION_NAME) -> Connection:
    """Read connection ``name`` from ``home/config.toml`` (as :func:`write_flwr_home` wrote it).

    Raises
    ------
    InputError
        If the file or the connection is missing.
    """
    path = Path(home) / CONFIG_FILE
    try:
        entry = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"][name]
    except FileNotFoundError:
        raise InputError(f"{path} not found: start the SuperLink with `carefl server` first (same --state-dir).") from None
    except (KeyError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{path} has no usable [superlink.{name}] connection ({err}).") from err
    ca = entry.get("root-certificates")
    return Connection(str(entry["address"]), Path(ca) if ca and not entry.get("insecure") else None, name)


def register_command(public_key: Path, connection: Connection, *, name: str = "") -> list[str]:
    """``flwr supernode register``: allow the SuperNode holding ``public_key``'s private half."""
    argv = [executable("flwr"), "supernode", "register", str(public_key), connection.name]
    return argv + (["--name", name] if name else [])


def run_command(app_dir: Path, connection: Connection, run_config: Path) -> list[str]:
    """``flwr run``: submit the Flower app in ``app_dir`` with the overrides in ``run_config``."""
    return [executable("flwr"), "run", str(app_dir), connection.name, "--run-config", str(run_config), "--format", "json"]


def log_command(run_id: int, connection: Connection) -> list[str]:
    """``flwr log --stream``: follow a run's ServerApp output until the run ends."""
    return [executable("flwr"), "log", str(run_id), connection.name, "--stream"]


def list_command(run_id: int, connection: Connection) -> list[str]:
    """``flwr ls --run-id``: a run's status, as JSON."""
    return [executable("flwr"), "ls", connection.name, "--run-id", str(run_id), "--format", "json"]


def run_config_toml(values: Mapping[str, bool | int | float | str]) -> str:
    """Run-config overrides as a TOML file's text (what ``flwr run --run-config FILE`` reads)."""
    return tomli_w.dumps(dict(values))


def parse_json_output(stdout: str, command: str) -> dict[str, Any]:
    """The JSON document a ``flwr ... --format json`` command printed (its last ``{`` block).

    Raises
    ------
    DeploymentError
        If there is none, or it reports no success.
    """
    start = stdout.find("{")
    try:
        doc = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not doc.get("success"):
        raise DeploymentError(f"`{command}` failed: {stdout.strip()[-2000:] or 'no output'}")
    return doc


def parse_run_id(stdout: str) -> int:
    """The run id printed by :func:`run_command`."""
    return int(parse_json_output(stdout, "flwr run")["run-id"])


def parse_run_status(stdout: str) -> str:
    """The status (``running``, ``finished:completed``, ...) printed by :func:`list_command`."""
    runs = parse_json_output(stdout, "flwr ls")["runs"]
    if not runs:
        raise DeploymentError("`flwr ls` lists no such run")
    return str(runs[0]["status"])

"""``carefl server`` and ``carefl federate``: the consortium's SuperLink, and a run submitted to it.

``carefl server`` runs the SuperLink in the foreground (its log on the console) until it exits or
is interrupted: TLS with the consortium's certificate, node authentication, a state database,
and every hospital's node key registered once it serves. Its ``--state-dir`` keeps the database
and ``flwr-home/config.toml``, the connection ``flwr`` (and ``carefl federate``) use.

``carefl federate`` submits a run of the CareFL app to that SuperLink (``flwr run``), shows its
progress from the ServerApp's log and waits for it to end. After a crash of the SuperLink,
restart ``carefl server`` with the same state folder, then ``carefl federate --resume`` with the
same ``--checkpoint-dir``: the run continues from its last completed round.

One state folder serves one SuperLink: ``carefl server`` holds an exclusive lock on
``STATE/superlink.lock`` while it runs (released when it stops, or dies), and a second one on
the same folder refuses to start.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from server.deployment import (
    RunLog,
    RunningSuperLink,
    follow_run,
    progress_printer,
    register_nodes,
    start_superlink,
    submit_run,
)
from server.flwr_cli import COMPLETED, read_flwr_home
from server.provision import load_layout
from server.superlink import DEFAULT_HOST, DEFAULT_PORT, SuperLinkOptions, SuperLinkTLS
from shared.config import RunConfig, absolute_paths
from shared.errors import ConfigError, DeploymentError
from shared.executables import command_line, console_announcer
from shared.processes import ProcessGroups, follow_output

APP_DIR = Path(__file__).resolve().parents[1]
"""The Flower app (the project folder with its pyproject.toml) that ``flwr run`` submits."""
DEFAULT_REGISTRY = Path(".carefl") / "registry"
"""``registry-dir`` of a run submitted without one: ``carefl pretrain``'s default ``--registry``."""
LOCK_FILE = "superlink.lock"
"""Held by the ``carefl server`` that runs on a state folder (it holds that server's pid)."""


@contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir`` for one SuperLink: an exclusive ``flock`` on its lock file.

    The lock goes with the process (a crashed server releases it), and its descriptor is not
    inherited by the SuperLink's processes.

    Raises
    ------
    DeploymentError
        If another ``carefl server`` holds the folder; nothing is written.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            raise DeploymentError(
                f"another `carefl server` (pid {holder}) runs on the state folder {state_dir}; "
                "stop it first, or give this one another --state-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass(frozen=True)
class ServerOptions:
    """What ``carefl server`` was asked for.

    Attributes
    ----------
    consortium : Path | None
        The folder from ``carefl provision`` (``None`` only with ``insecure``).
    state_dir : Path
        Keeps the state database, ``flwr-home`` and the logs.
    host, port : str, int
        Where the SuperLink listens.
    insecure : bool
        No TLS and no node authentication (a local test only).
    """

    consortium: Path | None
    state_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and self.consortium is not None:
            raise ConfigError("--insecure runs without the consortium's TLS and node keys; give one of --consortium or --insecure.")
        if not self.insecure and self.consortium is None:
            raise ConfigError("--consortium is required (the folder from `carefl provision`), or --insecure for a local test.")

    @property
    def home(self) -> Path:
        """``FLWR_HOME`` of the SuperLink and of ``flwr`` commands against it."""
        return self.state_dir.resolve() / "flwr-home"


def serve_superlink(options: ServerOptions, console: Console) -> int:
    """Run the SuperLink until it exits or Ctrl-C; returns its exit status.

    Raises
    ------
    InputError
        If the consortium folder is incomplete.
    DeploymentError
        If another ``carefl server`` runs on the same state folder, the SuperLink does not
        start, or a node key cannot be registered.
    """
    state = options.state_dir.resolve()
    with hold_state_dir(state):
        return _serve_superlink(options, state, console)


def _serve_superlink(options: ServerOptions, state: Path, console: Console) -> int:
    tls = None
    keys: dict[str, Path] = {}
    if options.consortium is not None:
        layout = load_layout(options.consortium)
        tls = SuperLinkTLS.from_consortium(layout)
        keys = {name: layout.node_keys_dir / f"{name}.pub" for name in layout.hospitals()}
    superlink = SuperLinkOptions(
        tls=tls, database=state / "state.db", host=options.host, port=options.port, node_auth=tls is not None
    )
    announce = console_announcer(console)
    with ProcessGroups(state / "logs") as procs:
        link = start_superlink(procs, superlink, home=options.home, cli_home=options.home, announce=announce)
        assert link.process is not None
        if keys:
            outcome = register_nodes(link, keys, announce=announce)
            console.print(f"Node keys: {', '.join(f'{h} {s}' for h, s in outcome.items())}", highlight=False)
        _print_usage(link, options, console)
        status = follow_output(link.process, lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    if status != 0:
        raise DeploymentError(f"the SuperLink exited with status {status}; see {link.process.log_path}")
    return status


def _print_usage(link: RunningSuperLink, options: ServerOptions, console: Console) -> None:
    console.print(
        f"SuperLink ready on {link.connection.address} ({'no TLS' if options.insecure else 'TLS, node authentication'}), "
        f"state in {options.state_dir}. Submit a run with:",
        highlight=False,
    )
    console.print(
        f"  carefl federate --state-dir {options.state_dir} --run-config \"num-rounds=5\" --out runs/NAME --checkpoint-dir CKPT",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
    console.print("  or: " + command_line(["flwr", "run", str(APP_DIR), link.connection.name], {"FLWR_HOME": str(options.home)}),
                  highlight=False, markup=False, soft_wrap=True)  # fmt: skip
    console.print("Ctrl-C stops the SuperLink. Its log follows.", highlight=False)


@dataclass(frozen=True)
class FederateOptions:
    """What ``carefl federate`` was asked for.

    Attributes
    ----------
    state_dir : Path
        ``carefl server``'s state folder (its ``flwr-home`` holds the connection).
    overrides : Mapping[str, Any]
        Run-config values (kebab-case).
    out_dir : Path | None
        The run folder the ServerApp writes.
    checkpoint_dir : Path | None
        The ServerApp's checkpoint folder.
    resume : bool
        Continue the run checkpointed there.
    app_dir : Path
        The Flower app (CareFL's folder with pyproject.toml).
    timeout : float
        Seconds the run may take.
    """

    state_dir: Path
    overrides: Mapping[str, Any]
    out_dir: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    app_dir: Path = APP_DIR
    timeout: float = 24 * 3600.0

    def run_config(self) -> dict[str, Any]:
        """The validated overrides sent with ``flwr run`` (server paths absolute).

        ``registry-dir`` defaults to :data:`DEFAULT_REGISTRY`, where ``carefl pretrain``
        registers backbones.
        """
        values = {"registry-dir": str(DEFAULT_REGISTRY), **self.overrides}
        if self.out_dir is not None:
            values["run-dir"] = str(self.out_dir)
        if self.checkpoint_dir is not None:
            values["checkpoint-dir"] = str(self.checkpoint_dir)
        if self.resume:
            values["resume"] = True
        values = absolute_paths(values)
        RunConfig.from_run_config(values)  # refuse unknown keys and bad values before submitting
        return values


def federate(options: FederateOptions, console: Console) -> int:
    """Submit a run to ``carefl server``'s SuperLink and follow it; returns the run id.

    Raises
    ------
    InputError
        If there is no connection in the state folder.
    DeploymentError
        If the run cannot be submitted or does not complete.
    CareFLError
        The ServerApp's own error, of its kind, when it stopped the run (a refusal, a backbone
        that fails its hash, an unknown backbone...).
    """
    home = options.state_dir.resolve() / "flwr-home"
    run_config = options.run_config()  # a bad value is named before anything is looked up
    link = RunningSuperLink(read_flwr_home(home), home)
    announce = console_announcer(console)
    with ProcessGroups(options.state_dir.resolve() / "logs") as procs:
        config_file = options.state_dir.resolve() / "run-config.toml"
        run_id = submit_run(link, options.app_dir, run_config, config_file, announce=announce)
        console.print(f"Run {run_id} submitted; following its ServerApp log:", highlight=False)
        run_log = RunLog(progress_printer(console))
        status = follow_run(procs, link, run_id, run_log, announce=announce, timeout=options.timeout)
    if status != COMPLETED:
        raise run_log.failure(run_id, status, f"`flwr log {run_id} {link.connection.name} --show` shows its whole log.")
    if options.out_dir is not None:
        console.print(f"Run folder: [bold]{options.out_dir}[/]")
    return run_id

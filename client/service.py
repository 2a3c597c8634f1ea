"""Run a hospital's SuperNode process; ``carefl node`` keeps it in the foreground until Ctrl-C.

The hospital's operator prepares the site directory once (``carefl budget --init``: privacy
ledger and policy) and receives its folder from the consortium's ``carefl provision`` (node key
and the CA's certificate). The SuperNode (``--isolation process``) queues each message for the
site's own runtime (:mod:`client.runtime`), which checks the run's app against the policy's
``apps.approved`` and runs this machine's installed CareFL ClientApp; their log is shown on the
console.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from client.ledger import LEDGER_FILE
from client.node import ACTIVATION_FAILED, CONNECTED_PATTERN, NodeCredentials, NodeOptions, supernode_command
from client.policy import SitePolicy
from client.runtime.superexec import runtime_command
from client.runtime.supernode import IDLE_POLL_S
from client.site import POLICY_FILE
from shared.errors import ConfigError, DeploymentError, InputError
from shared.executables import INSECURE_WARNING, Announce, command_line, console_announcer, flower_env
from shared.processes import START_TIMEOUT_S, ManagedProcess, ProcessGroups, follow_output

RUNTIME_SECRET_FILE = "superexec.secret"
RUNTIME_SUFFIX = "-runtime"
"""Name of a SuperNode's site runtime process: the SuperNode's name with this suffix."""


def check_site_dir(site_dir: Path, policy: Path | None = None) -> SitePolicy:
    """Refuse a site directory without its privacy ledger, or whose policy file is broken.

    Parameters
    ----------
    site_dir : Path
        The site directory (the operator prepares it once).
    policy : Path, optional
        The site's policy file (default: ``site_dir/policy.toml``).

    Returns
    -------
    SitePolicy
        The site's policy, as every message will read it.

    Raises
    ------
    InputError
        If ``site_dir/privacy-ledger.json`` is missing, or the policy file is missing or invalid
        (the message names the file and the key).
    """
    if not (site_dir / LEDGER_FILE).is_file():
        raise InputError(
            f"{site_dir} has no privacy ledger; create it once with "
            f"`carefl budget --site-dir {site_dir} --init --site NAME` (and review its policy.toml)."
        )
    return SitePolicy.load(policy if policy is not None else site_dir / POLICY_FILE)


def serve_node(options: NodeOptions, console: Console, *, connect_timeout: float = START_TIMEOUT_S) -> int:
    """Run the SuperNode of ``options`` until it exits or Ctrl-C; returns its exit status.

    Parameters
    ----------
    options : NodeOptions
        SuperLink address, credentials, site directory, policy.
    console : Console
        Shows the Flower command and the SuperNode's log.
    connect_timeout : float
        Seconds the SuperNode may take to be accepted by the SuperLink; then it is stopped.

    Raises
    ------
    InputError
        If the site directory is not prepared or its policy file is broken.
    DeploymentError
        If the SuperNode is not accepted within ``connect_timeout`` or exits before (the message
        names the likely cause: a TLS mismatch, an unregistered key, no SuperLink there), or
        fails later.
    """
    if not connect_timeout > 0:
        raise ConfigError(f"`connect-timeout` must be > 0 seconds, got {connect_timeout!r}.")
    site_dir = Path(options.site_dir).resolve()
    policy = check_site_dir(site_dir, options.policy)
    if not policy.approved:
        console.print(
            f"warning: the site policy approves no app yet, so this node refuses every run; approve the "
            f"consortium's app with `carefl app approve --site-dir {site_dir} APP.fab` after reviewing it.",
            highlight=False,
        )
    else:
        console.print(f"Approved apps (FAB SHA-256): {', '.join(policy.approved)}", highlight=False)
    with ProcessGroups(site_dir / "logs") as procs:
        node = start_supernode(
            procs,
            options,
            home=site_dir / "flwr-home",
            announce=console_announcer(console),
            name="supernode",
            wait=False,
        )
        console.print(
            f"SuperNode started; connecting to {options.superlink} (giving up after {connect_timeout:g} s). "
            "Ctrl-C stops it. Its log follows.",
            highlight=False,
        )
        runtime = next(p for p in procs.processes if p.name == f"{node.name}{RUNTIME_SUFFIX}")
        watch = _ConnectionWatch(node, options, connect_timeout, runtime=runtime)
        status = follow_output(node, watch.show(console), check=watch.check)
        if not watch.connected:
            raise DeploymentError(
                not_connected(options, node, f"exited with status {status} before it was accepted")
            )
    if status != 0:
        raise DeploymentError(f"the SuperNode exited with status {status}; its log: {node.log_path}")
    return status


class _ConnectionWatch:
    """Follows a SuperNode's lines until it is accepted; past the deadline, says why it was not."""

    def __init__(
        self, node: ManagedProcess, options: NodeOptions, timeout: float, *, runtime: ManagedProcess | None = None
    ) -> None:
        self._node = node
        self._options = options
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._runtime = runtime
        self.connected = False

    def show(self, console: Console) -> Callable[[str], None]:
        pattern = re.compile(CONNECTED_PATTERN)

        def on_line(line: str) -> None:
            self.connected = self.connected or bool(pattern.search(line))
            console.print(line, markup=False, highlight=False, soft_wrap=True)

        return on_line

    def check(self) -> None:
        if self._runtime is not None and not self._runtime.alive():
            raise DeploymentError(
                f"the site runtime (which answers every task with this hospital's installed CareFL) exited with "
                f"status {self._runtime.returncode}; the node stops rather than leave runs waiting on it. "
                f"Start `carefl node` again. Its log: {self._runtime.log_path}"
            )
        if not self.connected and time.monotonic() > self._deadline:
            raise DeploymentError(
                not_connected(self._options, self._node, f"was not accepted within {self._timeout:g} s")
            )


def not_connected(options: NodeOptions, node: ManagedProcess, what: str) -> str:
    """One line: the SuperNode ``what`` (did not connect), the likely cause, and its log."""
    return f"the SuperNode {what} by the SuperLink at {options.superlink}; likely {connection_hint(options, node.output())}. Its log: {node.log_path}"


def connection_hint(options: NodeOptions, output: str) -> str:
    """The likely reason a SuperNode was not accepted, from its output and a probe of the address."""
    if ACTIVATION_FAILED in output:
        key = options.credentials.private_key if options.credentials else "this node's key"
        return (
            f"its key ({key}) is not registered with the SuperLink: its operator registers it with "
            "`flwr supernode register HOSPITAL.pub CONNECTION` (`carefl server --consortium DIR` registers every "
            "hospital of the consortium when it starts); or the SuperLink restarted and still counts this node "
            "as online: start it again in a minute"
        )
    host, _, port = options.superlink.rpartition(":")
    tls = speaks_tls(host.strip("[]"), int(port)) if port.isdigit() else None
    if tls is None:
        return f"nothing accepts connections at {options.superlink}: is the SuperLink running there (`carefl server`)?"
    if tls and options.insecure:
        return "a TLS mismatch: the SuperLink speaks TLS but this node runs with --insecure; give --credentials instead"
    if not tls and not options.insecure:
        return (
            "a TLS mismatch: the SuperLink does not speak TLS (it runs with --insecure); run both with TLS, "
            "or both with --insecure for a local test"
        )
    if not options.insecure:
        return (
            "a certificate problem: the SuperLink's certificate is not signed by this node's CA "
            f"({options.credentials.root_certificates if options.credentials else 'ca.crt'}) or does not name "
            f"the host {host}; use the folders of one `carefl provision`"
        )
    return "a problem its log shows"


def speaks_tls(host: str, port: int, timeout: float = 5.0) -> bool | None:
    """Whether ``host:port`` completes a TLS handshake; None when nothing accepts a connection there.

    The certificate is not checked: the question is only whether the server speaks TLS.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host or None):
            return True
    except OSError:  # ssl.SSLError, a reset or a timeout: not TLS
        return False
    finally:
        sock.close()


def start_supernode(
    procs: ProcessGroups,
    options: NodeOptions,
    *,
    home: Path,
    announce: Announce,
    name: str,
    wait: bool = True,
    timeout: float = START_TIMEOUT_S,
) -> ManagedProcess:
    """Start one hospital's SuperNode; with ``wait``, until the SuperLink accepted it.

    Parameters
    ----------
    procs : ProcessGroups
        Owner of the process.
    options : NodeOptions
        SuperLink address, credentials, node config, Runtime API port.
    home : Path
        The SuperNode's ``FLWR_HOME`` (where it installs submitted apps).
    announce : Announce
        Receives the command line before it runs.
    name : str
        Process name (log file stem).
    wait : bool
        Wait for "SuperNode ID" in its output (it connected and was accepted).
    timeout : float
        Seconds to wait.

    Raises
    ------
    DeploymentError
        If it exits (e.g. refused by the SuperLink) or does not connect in time.
    """
    if options.insecure:
        announce(INSECURE_WARNING)
    secret = runtime_secret(home)
    argv = supernode_command(options, auth_secret_file=secret)
    env = flower_env(FLWR_HOME=str(home))
    announce(command_line(argv, env))
    process = procs.start(name, argv, env=env)
    # The site's runtime runs each task from this machine's installed CareFL, never the FAB's code.
    address = f"{options.host}:{options.port}"
    runtime = runtime_command(
        address,
        process.pid,
        auth_secret_file=secret,
        output=process.log_path,
        site_dir=Path(options.site_dir).resolve(),
        site_worker=options.site_worker,
    )
    procs.start(f"{name}{RUNTIME_SUFFIX}", runtime, env=env)
    if wait:
        try:
            process.wait_for_output(CONNECTED_PATTERN, timeout)
        except DeploymentError:
            ended = (
                f"exited with status {process.returncode}"
                if not process.alive()
                else f"was not accepted within {timeout:g} s"
            )
            raise DeploymentError(not_connected(options, process, ended)) from None
    return process


def runtime_secret(home: Path) -> Path:
    """``home/superexec.secret``: 32 random bytes (0600) shared by a SuperNode and its runtime, made once."""
    path = Path(home) / RUNTIME_SECRET_FILE
    if not path.is_file():
        Path(home).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path


def node_options(
    *,
    superlink: str,
    site_dir: Path,
    credentials: Path | None,
    insecure: bool,
    data_path: str = "",
    partition: tuple[int, int] | None = None,
    site_name: str = "",
    val_fraction: float | None = None,
    split_seed: int | None = None,
    policy: Path | None = None,
    port: int,
    site_worker: bool = True,
    idle_poll: float = IDLE_POLL_S,
) -> NodeOptions:
    """Build the node options from the command line's values (credentials or ``--insecure``).

    Raises
    ------
    InputError
        If neither or both of ``credentials`` and ``insecure`` are given, or a file is missing.
    """
    if insecure == (credentials is not None):
        raise InputError(
            "give the hospital's folder from `carefl provision` with --credentials, or --insecure for a local test."
        )
    return NodeOptions(
        superlink=superlink,
        site_dir=site_dir,
        credentials=None if credentials is None else NodeCredentials.from_dir(credentials),
        data_path=data_path,
        partition=partition,
        site_name=site_name,
        val_fraction=val_fraction,
        split_seed=split_seed,
        policy=policy,
        port=port,
        site_worker=site_worker,
        idle_poll=idle_poll,
    )

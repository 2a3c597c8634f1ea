"""Drive a SuperLink: start it, register node keys, submit a run and follow it to its end.

Every process goes through a :class:`~shared.processes.ProcessGroups` (own process group,
log file, always stopped); every command is announced, exactly as run, before it runs. The
command lines themselves come from :mod:`server.superlink` and :mod:`server.flwr_cli` (a
hospital's SuperNode: :mod:`client.service`).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from server.flwr_cli import (
    ALREADY_REGISTERED,
    FINISHED,
    Connection,
    list_command,
    log_command,
    parse_run_id,
    parse_run_status,
    register_command,
    run_command,
    run_config_toml,
    write_flwr_home,
)
from server.progress import ROUND_LINE_PREFIX, parse_stop_line
from server.superlink import READY_PATTERN, SuperLinkOptions, superlink_command
from shared.atomic import atomic_write_text
from shared.errors import CareFLError, DeploymentError
from shared.executables import INSECURE_WARNING, Announce, command_line, flower_env
from shared.log import log
from shared.processes import START_TIMEOUT_S, ManagedProcess, ProcessGroups, read_new_lines, wait_for_port

LineHandler = Callable[[float, str], None]

CLI_TIMEOUT_S = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CAREFL_LINE = re.compile(r"\b(?:INFO|WARNING|ERROR) carefl: (.*)$")
_FLOWER_PROBLEM = re.compile(r"^(?:WARNING|ERROR)\s*:\s*(.*)$")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Violation|Stopped|Refusal)(?::\s.*)?$")


def plain(line: str) -> str:
    """``line`` without terminal colour codes."""
    return _ANSI.sub("", line)


def progress_printer(console: Console) -> LineHandler:
    """Show the ServerApp lines that matter: CareFL's own (rounds, checkpoints) and problems."""

    def show(_: float, line: str) -> None:
        carefl = _CAREFL_LINE.search(line)
        if carefl:
            text = carefl.group(1)
            style = "bold" if text.startswith(ROUND_LINE_PREFIX) else ""
            console.print(f"  {escape(text)}", style=style, highlight=False, soft_wrap=True)
            return
        problem = _FLOWER_PROBLEM.match(line.strip())
        if problem:
            console.print(f"  [yellow]Flower:[/] {escape(problem.group(1))}", highlight=False, soft_wrap=True)

    return show


class RunLog:
    """Reads a run's ServerApp lines for why it ended, and shows the ones that matter meanwhile.

    A CareFL ServerApp that stops on a CareFL error logs one :func:`server.progress.stop_line`;
    any other exception leaves Flower's traceback, whose last line names it. :meth:`failure`
    turns what was seen into the error ``carefl federate`` raises: the ServerApp's own error
    (same kind, so the same exit status), else a :class:`DeploymentError` naming the exception.

    Parameters
    ----------
    show : LineHandler | None
        Shows lines as they arrive (e.g. :func:`progress_printer`); after the stop line, neither
        it nor Flower's report of the same exception is shown (the error says it all).
    """

    def __init__(self, show: LineHandler | None = None) -> None:
        self._show = show
        self.stopped: CareFLError | None = None
        self.exception: str | None = None
        self._in_traceback = False

    def __call__(self, when: float, line: str) -> None:
        """Read one line (and show it, unless the run already said why it stopped)."""
        text = plain(line)
        carefl = _CAREFL_LINE.search(text)
        stop = parse_stop_line(carefl.group(1)) if carefl else None
        if stop is not None:
            self.stopped = stop
            return
        stripped = text.strip()
        if stripped.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
        elif self._in_traceback and _EXCEPTION_LINE.match(stripped):
            self.exception = stripped  # the last one: the exception that ended the run
        if self._show is not None and self.stopped is None:
            self._show(when, text)

    def failure(self, run_id: int, status: str, more: str) -> CareFLError:
        """The error of run ``run_id``, which ended as ``status``; ``more`` says where to look."""
        if self.stopped is not None:
            return type(self.stopped)(f"run {run_id}: {self.stopped}")
        raised = f": its ServerApp raised {self.exception}" if self.exception else ""
        return DeploymentError(f"run {run_id} ended as {status}{raised}; {more}")


@dataclass(frozen=True)
class RunningSuperLink:
    """A started SuperLink and how the ``flwr`` CLI reaches it.

    Attributes
    ----------
    connection : Connection
        The ``flwr`` connection to it.
    cli_home : Path
        ``FLWR_HOME`` of the ``flwr`` commands (holds ``config.toml``).
    process : ManagedProcess | None
        Its process, when started here (``None``: someone else's SuperLink).
    """

    connection: Connection
    cli_home: Path
    process: ManagedProcess | None = None

    def cli_env(self) -> dict[str, str]:
        """Environment additions of ``flwr`` commands against it."""
        return flower_env(FLWR_HOME=str(self.cli_home))


def start_superlink(
    procs: ProcessGroups,
    options: SuperLinkOptions,
    *,
    home: Path,
    cli_home: Path,
    announce: Announce,
    name: str = "superlink",
    timeout: float = START_TIMEOUT_S,
) -> RunningSuperLink:
    """Start a SuperLink, wait until it serves, and write the ``flwr`` connection to it.

    Parameters
    ----------
    procs : ProcessGroups
        Owner of the process.
    options : SuperLinkOptions
        Address, TLS, node authentication, database.
    home : Path
        The SuperLink's ``FLWR_HOME`` (where its SuperExec installs submitted apps).
    cli_home : Path
        ``FLWR_HOME`` of the ``flwr`` CLI; its ``config.toml`` is written.
    announce : Announce
        Receives each command line before it runs.
    name : str
        Process name (log file stem).
    timeout : float
        Seconds to wait for it to listen.

    Raises
    ------
    DeploymentError
        If it exits or does not listen in time.
    """
    if options.insecure:
        announce(INSECURE_WARNING)
    argv = superlink_command(options)
    env = flower_env(FLWR_HOME=str(home))
    announce(command_line(argv, env))
    process = procs.start(name, argv, env=env)
    process.wait_for_output(READY_PATTERN, timeout)
    wait_for_port(options.host, options.port, timeout, proc=process)
    connection = Connection(options.address, options.tls.ca_certfile if options.tls else None)
    write_flwr_home(cli_home, connection)
    log(INFO, "SuperLink serves on %s (%s)", options.address, "no TLS" if options.insecure else "TLS")
    return RunningSuperLink(connection, Path(cli_home), process)


def register_nodes(link: RunningSuperLink, public_keys: Mapping[str, Path], *, announce: Announce) -> dict[str, str]:
    """Register each hospital's node key with the running SuperLink.

    Parameters
    ----------
    link : RunningSuperLink
        The SuperLink (its Control API must be up: registration goes through it).
    public_keys : Mapping[str, Path]
        Hospital name -> its ``node.pub``.
    announce : Announce
        Receives each command line before it runs.

    Returns
    -------
    dict[str, str]
        Hospital -> ``registered`` or ``already registered`` (a key kept in the state database).

    Raises
    ------
    DeploymentError
        If a registration fails for another reason.
    """
    outcome: dict[str, str] = {}
    for hospital, public_key in public_keys.items():
        argv = register_command(public_key, link.connection, name=hospital)
        output, code = run_cli(argv, link.cli_env(), announce=announce)
        if code == 0:
            outcome[hospital] = "registered"
        elif ALREADY_REGISTERED in output:
            outcome[hospital] = "already registered"
        else:
            raise DeploymentError(f"registering {hospital}'s node key failed (status {code}): {output.strip()[-1500:]}")
    return outcome


def submit_run(
    link: RunningSuperLink,
    app_dir: Path,
    run_config: Mapping[str, bool | int | float | str],
    config_file: Path,
    *,
    announce: Announce,
) -> int:
    """Submit a run of the Flower app in ``app_dir`` (``flwr run``); returns its run id.

    The run-config overrides are written to ``config_file`` (TOML), which ``flwr run`` reads.
    """
    atomic_write_text(config_file, run_config_toml(run_config))
    output, code = run_cli(run_command(app_dir, link.connection, config_file), link.cli_env(), announce=announce)
    if code != 0:
        raise DeploymentError(f"`flwr run` failed (status {code}): {output.strip()[-2000:]}")
    return parse_run_id(output)


def run_status(link: RunningSuperLink, run_id: int, *, announce: Announce | None = None) -> str:
    """The run's status from the SuperLink (``flwr ls``)."""
    output, code = run_cli(list_command(run_id, link.connection), link.cli_env(), announce=announce)
    if code != 0:
        raise DeploymentError(f"`flwr ls` failed (status {code}): {output.strip()[-1500:]}")
    return parse_run_status(output)


def follow_run(
    procs: ProcessGroups,
    link: RunningSuperLink,
    run_id: int,
    on_line: LineHandler,
    *,
    announce: Announce,
    timeout: float,
    watch: Sequence[ManagedProcess] = (),
) -> str:
    """Stream the run's ServerApp output (``flwr log --stream``) until the run ends.

    Parameters
    ----------
    procs : ProcessGroups
        Owner of the log-streaming process.
    link : RunningSuperLink
        The SuperLink running it.
    run_id : int
        The run.
    on_line : LineHandler
        Called with (``time.monotonic()`` on arrival, line without colours) for each line.
    announce : Announce
        Receives the command line before it runs.
    timeout : float
        Seconds the run may take.
    watch : Sequence[ManagedProcess]
        More processes the run needs (e.g. local SuperNodes): the run fails if one exits.

    Returns
    -------
    str
        The run's final status (``finished:completed`` when it succeeded).

    Raises
    ------
    DeploymentError
        If the SuperLink or a watched process dies, or the run does not end within ``timeout``.
    """
    argv = log_command(run_id, link.connection)
    env = link.cli_env()
    announce(command_line(argv, env))
    deadline = time.monotonic() + timeout
    emitted = 0  # a new stream starts again from the run's first line: skip what was shown
    attempt = 0
    while True:
        attempt += 1
        stream = procs.start(f"flwr-log-{run_id}-{attempt}", argv, env=env)
        offset, seen = stream.log_offset, 0
        try:
            while True:
                running = stream.alive()
                lines, offset = read_new_lines(stream.log_path, offset)
                now = time.monotonic()
                for line in lines:
                    seen += 1
                    if seen > emitted:
                        emitted = seen
                        on_line(now, plain(line))
                if not running:
                    break
                _check_alive(link, watch, deadline, timeout)
                time.sleep(0.5)
        finally:
            procs.stop(stream)
        _check_alive(link, watch, deadline, timeout)
        status = run_status(link, run_id)
        if status.startswith(FINISHED):
            return status
        log(WARNING, "the log stream of run %d ended while the run is %s; reconnecting", run_id, status)
        time.sleep(2.0)


def _check_alive(link: RunningSuperLink, watch: Sequence[ManagedProcess], deadline: float, timeout: float) -> None:
    if link.process is not None and not link.process.alive():
        raise DeploymentError(
            f"the SuperLink exited (status {link.process.returncode}) during the run; "
            f"its last output ({link.process.log_path}):\n{link.process.tail()}"
        )
    for proc in watch:
        if not proc.alive():
            raise DeploymentError(
                f"{proc.name} exited (status {proc.returncode}) during the run; "
                f"its last output ({proc.log_path}):\n{proc.tail()}"
            )
    if time.monotonic() > deadline:
        raise DeploymentError(f"the run did not finish within {timeout:.0f} s")


def run_cli(argv: list[str], env: Mapping[str, str], *, announce: Announce | None) -> tuple[str, int]:
    """Run a short ``flwr`` command; returns its output (stdout and stderr) and status."""
    if announce is not None:
        announce(command_line(argv, env))
    try:
        done = subprocess.run(  # noqa: S603 - argv built by CareFL
            argv,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"`{' '.join(argv[:3])}` did not answer within {CLI_TIMEOUT_S:.0f} s") from None
    return plain(done.stdout + done.stderr), done.returncode

"""Start long-running processes (SuperLink, SuperNodes, the ``flwr`` CLI) and always stop them.

Each process starts in its own session, hence its own process group, with its output in a
log file. Flower's processes start children of their own, and the SuperLink starts its
``flower-superexec`` in yet another session (``start_new_session=True`` in
``flwr.superlink.cli.flower_superlink.SuperLinkLifespan._start_superexec_if_needed``), so
stopping one group is not enough: every process started here carries a tag in its
environment, which its descendants inherit, and :meth:`ProcessGroups.stop_all` signals every
group that holds a tagged process (found with :mod:`psutil` where it can read environments; else
only the groups started here are signalled).

Stopping is SIGTERM to the groups, a grace period, then SIGKILL. :class:`ProcessGroups` is a
context manager that stops everything on exit: on success, on an error and on Ctrl-C; while it
is active in the main thread, SIGTERM to this process is turned into
:class:`~shared.errors.Terminated` so that it stops its children too.

Example
-------
>>> with ProcessGroups(Path("logs")) as procs:  # doctest: +SKIP
...     link = procs.start("superlink", ["flower-superlink", "--insecure"])
...     link.wait_for_output("Uvicorn running on", timeout=60)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from types import FrameType, TracebackType

import psutil

from shared.atomic import require_writable_dir
from shared.errors import DeploymentError, Terminated
from shared.log import log

TAG_VARIABLE = "CAREFL_PROCESS_TAG"
"""Environment variable marking the processes of each :class:`ProcessGroups` (``:``-separated tags
when supervisors nest, e.g. a test running ``carefl server``)."""

DEFAULT_GRACE_S = 10.0
START_TIMEOUT_S = 120.0
"""Seconds a Flower process may take to start listening or connecting."""
_POLL_S = 0.2


class ManagedProcess:
    """One process started by :class:`ProcessGroups`, with its log file.

    Parameters
    ----------
    name : str
        Short name (also the log file's stem).
    argv : Sequence[str]
        The command line it runs.
    popen : subprocess.Popen
        The started process (leader of its own process group).
    log_path : Path
        Where its stdout and stderr go (appended).
    log_offset : int
        Size of the log file when it started: its own output begins there.
    """

    def __init__(
        self, name: str, argv: Sequence[str], popen: subprocess.Popen[bytes], log_path: Path, log_offset: int = 0
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = popen
        self.log_path = log_path
        self.log_offset = log_offset

    @property
    def pid(self) -> int:
        """Process id (also its process group id)."""
        return self.popen.pid

    @property
    def pgid(self) -> int:
        """Its process group id (it leads a new session)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has ended (negative: killed by that signal), else ``None``."""
        return self.popen.poll()

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything it has written so far (not what an earlier process wrote to the same log)."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_offset)
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 20) -> str:
        """Its last ``lines`` lines of output."""
        return "\n".join(self.output().splitlines()[-lines:])

    def wait(self, timeout: float) -> int:
        """Wait until it exits and return its status.

        Raises
        ------
        DeploymentError
            If it is still running after ``timeout`` seconds.
        """
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"{self.name} still runs after {timeout:.0f} s; see {self.log_path}") from None

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float, *, exit_ok: bool = False) -> re.Match[str]:
        """Wait until its output matches ``pattern``; return the match.

        Parameters
        ----------
        pattern : str | re.Pattern[str]
            A regular expression searched in the whole output.
        timeout : float
            Seconds to wait.
        exit_ok : bool
            Accept output written before the process exited (else its exit is an error).

        Raises
        ------
        DeploymentError
            If it exits first (unless ``exit_ok``) or ``timeout`` passes; the message holds the
            end of its output.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            ended = not self.alive()
            match = regex.search(self.output())
            if match:
                return match
            if ended and not exit_ok:
                raise DeploymentError(
                    f"{self.name} exited with status {self.returncode} before it was ready; "
                    f"its last output ({self.log_path}):\n{self.tail()}"
                )
            if ended or time.monotonic() > deadline:
                state = f"exited with status {self.returncode}" if ended else f"not ready after {timeout:.0f} s"
                raise DeploymentError(
                    f"{self.name} {state} (waited for {regex.pattern!r}); its last output ({self.log_path}):\n{self.tail()}"
                )
            time.sleep(_POLL_S)


class ProcessGroups:
    """Starts processes in their own process groups and stops all of them, always.

    Parameters
    ----------
    log_dir : Path
        Folder of the processes' log files (``<name>.log``), created if missing.
    env : Mapping[str, str], optional
        Variables added to this process's environment for every child.
    grace : float
        Seconds between SIGTERM and SIGKILL when stopping.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, *, grace: float = DEFAULT_GRACE_S) -> None:
        self.log_dir = Path(log_dir)
        self.tag = uuid.uuid4().hex
        self.grace = grace
        self._env = dict(env or {})
        self._procs: list[ManagedProcess] = []
        self._groups: set[int] = set()
        self._previous_sigterm: signal.Handlers | int | None = None
        self._handler_installed = False

    # ------------------------------------------------------------------------- context manager
    def __enter__(self) -> ProcessGroups:
        require_writable_dir(self.log_dir, what="log directory")  # one clear line, before any process starts
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)  # type: ignore[assignment]
            self._handler_installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if self._handler_installed:
                signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
                self._handler_installed = False

    # ------------------------------------------------------------------------------- starting
    @property
    def processes(self) -> list[ManagedProcess]:
        """The processes started, in order."""
        return list(self._procs)

    def groups(self) -> set[int]:
        """Every process group seen: those started here and those of tagged descendants."""
        self._groups |= {pgid for _, _, pgid in tagged_processes(self.tag)}
        return set(self._groups)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session; its output goes to ``log_dir/<name>.log``.

        Parameters
        ----------
        name : str
            Short unique name of the process.
        argv : Sequence[str]
            Command line.
        env : Mapping[str, str], optional
            More variables for this process only.
        cwd : Path, optional
            Working directory.
        """
        if any(p.name == name for p in self._procs):
            raise ValueError(f"a process named {name!r} was already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        inherited = os.environ.get(TAG_VARIABLE, "")
        tags = f"{inherited}:{self.tag}" if inherited else self.tag  # an outer supervisor still finds them
        environ = {**os.environ, **self._env, **(env or {}), TAG_VARIABLE: tags}
        die_with_parent = _parent_death_signal()
        with open(log_path, "ab") as out:
            offset = out.tell()
            popen = subprocess.Popen(  # noqa: S603 - argv is built by CareFL, never by a shell
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environ,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - one prctl call, no Python-level locks
            )
        proc = ManagedProcess(name, argv, popen, log_path, offset)
        self._procs.append(proc)
        self._groups.add(proc.pgid)
        log(INFO, "started %s (pid %d): %s", name, proc.pid, log_path)
        return proc

    # ------------------------------------------------------------------------------- stopping
    def kill(self, proc: ManagedProcess) -> None:
        """SIGKILL ``proc``'s process group at once, as a crash would (no cleanup by it)."""
        self.groups()
        if proc.popen.poll() is None:
            _signal_group(proc.pgid, signal.SIGKILL)
        proc.popen.wait()

    def stop(self, proc: ManagedProcess, grace: float | None = None) -> None:
        """Stop ``proc`` and its descendants: SIGTERM to their groups, then SIGKILL."""
        self._stop([proc], grace)

    def stop_all(self, grace: float | None = None) -> None:
        """Stop every process started (newest first) and every tagged process left."""
        self._stop(list(reversed(self._procs)), grace)
        leftovers = tagged_processes(self.tag)
        if leftovers:
            log(WARNING, "killing %d leftover process(es) of this deployment", len(leftovers))
            self._groups |= {pgid for _, _, pgid in leftovers}
            for _, _, pgid in leftovers:
                _signal_group(pgid, signal.SIGKILL)
        _wait_until_gone(self._groups, timeout=self.grace if grace is None else grace)

    def _stop(self, procs: Sequence[ManagedProcess], grace: float | None) -> None:
        grace = self.grace if grace is None else grace
        for pgid in self._live_groups(procs):
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(WARNING, "%s did not stop within %.0f s of SIGTERM; sending SIGKILL", proc.name, grace)
        for pgid in self._live_groups(procs):
            _signal_group(pgid, signal.SIGKILL)
        for proc in procs:
            proc.popen.wait()

    def _live_groups(self, procs: Sequence[ManagedProcess]) -> set[int]:
        """Live process groups of ``procs`` and their descendants.

        Only live ones, so that no signal reaches a reused id: a process not yet reaped (its pid
        is still its own), and the groups of live tagged processes (members a dead leader left
        behind, descendants in sessions of their own).
        """
        tagged = tagged_processes(self.tag)
        self._groups |= {pgid for _, _, pgid in tagged}
        roots = {p.pid for p in procs}
        live = {p.pgid for p in procs if p.popen.poll() is None}
        return live | {pgid for _, _, pgid in tagged if pgid in roots} | descendant_groups(tagged, roots)


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still holds a process (a zombie counts)."""
    return _takes_signal_zero(os.killpg, pgid)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (a zombie counts)."""
    return _takes_signal_zero(os.kill, pid)


def _takes_signal_zero(send: Callable[[int, int], None], target: int) -> bool:
    """Whether ``send(target, 0)`` finds its target (one of another user's counts)."""
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tagged_processes(tag: str) -> list[tuple[int, int, int]]:
    """Return ``(pid, ppid, pgid)`` of the live processes whose environment holds ``tag``.

    Environments are read with :mod:`psutil`; processes whose environment cannot be read (other
    users', or where the platform does not expose it) are not found, nor are zombies.
    """
    found: list[tuple[int, int, int]] = []
    for process in psutil.process_iter(["ppid", "status", "environ"], ad_value=None):
        info = process.info
        if process.pid == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if tag not in (info["environ"] or {}).get(TAG_VARIABLE, "").split(":"):
            continue
        try:
            found.append((process.pid, info["ppid"], os.getpgid(process.pid)))
        except ProcessLookupError:  # it ended after it was listed
            continue
    return found


def descendant_groups(processes: Sequence[tuple[int, int, int]], roots: set[int]) -> set[int]:
    """Process groups of the descendants of ``roots`` among ``(pid, ppid, pgid)`` triples."""
    parent = {pid: ppid for pid, ppid, _ in processes}
    groups: set[int] = set()
    for pid, _, pgid in processes:
        ancestor, seen = parent.get(pid), {pid}
        while ancestor is not None and ancestor not in roots and ancestor not in seen:
            seen.add(ancestor)
            ancestor = parent.get(ancestor)
        if ancestor in roots:
            groups.add(pgid)
    return groups


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, *, proc: ManagedProcess | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises
    ------
    DeploymentError
        If ``proc`` exits first or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if proc is not None and not proc.alive():
            raise DeploymentError(
                f"{proc.name} exited with status {proc.returncode} before listening on {host}:{port}; "
                f"its last output ({proc.log_path}):\n{proc.tail()}"
            )
        if time.monotonic() > deadline:
            raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(_POLL_S)


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Return the complete lines appended to ``path`` since byte ``offset``, and the new offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", errors="replace")
    return text.splitlines(), offset + end


def follow_output(
    proc: ManagedProcess,
    on_line: Callable[[str], None],
    *,
    poll: float = 0.5,
    check: Callable[[], None] | None = None,
) -> int:
    """Pass each line ``proc`` writes to ``on_line`` until it exits; returns its status.

    ``check`` is called after each poll's lines while ``proc`` runs; it stops the following by
    raising (e.g. a :class:`DeploymentError` when a deadline passed), and the caller's
    :class:`ProcessGroups` then stops ``proc``.
    """
    offset = proc.log_offset
    while True:
        running = proc.alive()
        lines, offset = read_new_lines(proc.log_path, offset)
        for line in lines:
            on_line(line)
        if not running:
            return proc.popen.wait()
        if check is not None:
            check()
        time.sleep(poll)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until_gone(groups: set[int], timeout: float) -> None:
    """Wait (bounded) until no process of ``groups`` is left, zombies reaped by their parents."""
    deadline = time.monotonic() + timeout
    while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    left = sorted(g for g in groups if group_alive(g))
    if left:
        log(WARNING, "process group(s) %s still hold processes (zombies not yet reaped?)", left)


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` so the child gets SIGTERM if this process dies without stopping it.

    The library is loaded here, in the parent; the child only makes the system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:  # pragma: no cover - runs in the child before exec
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_signal


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: raise :class:`~shared.errors.Terminated` in the main thread."""
    raise Terminated(f"signal {signum}")

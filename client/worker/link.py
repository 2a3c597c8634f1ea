"""The task process's side of the site worker: reach it (start it if down) and hand it a message.

Imports neither torch nor the model: a task process that only runs SecAgg+ stages, the audit
and the backbone offer stays a thin, fast process.
"""

from __future__ import annotations

import fcntl
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from logging import INFO
from pathlib import Path

from flwr.app import Context, Message

from client.worker import wire
from client.worker.channel import (
    ChannelError,
    connect,
    read_secret,
    recv_frame,
    send_frames,
    socket_path,
    worker_dir,
)
from shared import errors
from shared.log import log

START_TIMEOUT_S = 120.0
"""Seconds a starting worker may take to listen (it imports torch and Opacus)."""
PING_TIMEOUT_S = 10.0
LOCK_FILE = "start.lock"

Launch = Callable[[Sequence[str]], subprocess.Popen[bytes]]


class WorkerLink:
    """Reach the site's worker and let it answer messages.

    Parameters
    ----------
    site_dir : Path
        The hospital's site directory.
    parent_pid : int
        The site runtime's process id, given to a worker started here (it stops with the runtime).
    launch : Launch
        Starts the worker from its command line.
    start_timeout : float
        Seconds to wait for a started worker to answer.
    """

    def __init__(
        self,
        site_dir: Path,
        *,
        parent_pid: int,
        launch: Launch = subprocess.Popen,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.site_dir = Path(site_dir)
        self.parent_pid = parent_pid
        self.launch = launch
        self.start_timeout = start_timeout

    def handle(self, message: Message, context: Context) -> Message:
        """The worker's reply to ``message``; the worker's context state is copied into ``context``.

        A worker that is down is started first. A worker that stops while it handles the
        message fails that message (it is not retried: the ledger may already hold its charge);
        the next message starts a new one.

        Raises
        ------
        CareFLError
            The site's own refusal (same class as the worker raised, or ``CareFLError``).
        ChannelError
            If the worker cannot be reached, or refuses this process, or stops mid-message.
        RuntimeError
            If the site's code failed in the worker (the exception's type and text).
        """
        sock = self._open()
        with sock:
            try:
                send_frames(sock, wire.KIND_HANDLE, wire.message_bytes(message), wire.context_bytes(context))
                status = recv_frame(sock)
            except (ChannelError, OSError):
                raise ChannelError(
                    f"the site worker stopped while it handled a {message.metadata.message_type} message; "
                    "this message fails, the next one starts a new worker"
                ) from None
            if status == wire.STATUS_OK:
                reply, state = wire.parse_message(recv_frame(sock)), wire.parse_context(recv_frame(sock))
                context.state = state.state
                return reply
            if status == wire.STATUS_REFUSED:
                name, text = recv_frame(sock).decode(), recv_frame(sock).decode()
                raise _refusal_class(name)(text)
            raise RuntimeError(f"the site worker failed: {recv_frame(sock).decode(errors='replace')}")

    def ensure(self) -> None:
        """Start the worker unless one answers (one start at a time, under a lock in its folder)."""
        folder = worker_dir(self.site_dir)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(folder / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._answers():
                return
            self._start()

    def _open(self) -> socket.socket:
        """A connection that passed the secret check; the worker is started if it is down."""
        try:
            return self._authenticated()
        except ChannelError:
            self.ensure()
            return self._authenticated()

    def _authenticated(self, timeout: float | None = None) -> socket.socket:
        secret = read_secret(self.site_dir)
        sock = connect(socket_path(self.site_dir), timeout)
        try:
            send_frames(sock, secret)
            accepted = recv_frame(sock)
        except (ChannelError, OSError) as err:
            sock.close()
            raise ChannelError(
                f"the site worker at {socket_path(self.site_dir)} dropped the connection: {err}"
            ) from None
        if accepted != wire.STATUS_OK:
            sock.close()
            raise ChannelError(
                f"the site worker at {socket_path(self.site_dir)} refused this process's secret"
            )
        return sock

    def _answers(self) -> bool:
        """Whether a worker answers a ping with this start's secret."""
        try:
            sock = self._authenticated(PING_TIMEOUT_S)
        except ChannelError:
            return False
        with sock:
            try:
                send_frames(sock, wire.KIND_PING)
                return recv_frame(sock) == wire.STATUS_OK
            except (ChannelError, OSError):
                return False

    def _start(self) -> None:
        from client.worker.process import worker_command

        argv = worker_command(self.site_dir, self.parent_pid)
        log(INFO, "starting the site worker: %s", " ".join(argv))
        process = self.launch(argv)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._answers():
                return
            if process.poll() is not None:
                raise ChannelError(
                    f"the site worker exited with status {process.returncode} while starting; see the node's log"
                )
            time.sleep(0.1)
        process.kill()
        raise ChannelError(f"the site worker did not answer within {self.start_timeout:g} s of its start")


def _refusal_class(name: str) -> type[errors.CareFLError]:
    """The :mod:`shared.errors` class named ``name`` (:class:`~shared.errors.CareFLError` if unknown)."""
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, errors.CareFLError) else errors.CareFLError

"""The site worker: one long-lived process per hospital that trains and evaluates for its tasks.

Flower starts a fresh ClientApp process for every message, and each would import torch and
Opacus, rebuild the model and reload the site's data (several seconds of a round). The site's
task processes (:mod:`client.runtime.task`) stay thin instead: they run the mod chain (audit,
refusal, backbone offer, model delivery, SecAgg+) and hand the innermost call, the training or
evaluation, to this worker over the local channel (:mod:`client.worker.channel`). The worker
keeps torch, the site's data and the verified backbone in memory across messages and runs.

It runs the hospital's installed CareFL only (:func:`client.app.make_client_fn`, the same code
the simulation runs in-process): the server still ships configuration, never code. The ledger
charge stays where the guarantee needs it, in :class:`~client.numpy_client.SiteClient`, before
the update is returned. A worker that dies loses nothing: the ledger and the audit log are on
disk, and the next message starts a new worker.

Run as ``python -P -m client.worker.process --site-dir DIR [--parent-pid PID]``; it exits when
the process ``PID`` (the site runtime) is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message

from client.worker import wire
from client.worker.channel import (
    SECRET_BYTES,
    ChannelError,
    peer_uid,
    reachable,
    recv_frame,
    secret_path,
    secrets_match,
    send_frames,
    socket_path,
    worker_dir,
)
from shared.atomic import atomic_write_bytes
from shared.errors import CareFLError
from shared.log import log
from shared.processes import process_alive

PID_FILE = "worker.pid"
PARENT_CHECK_S = 0.5
"""Seconds between two checks that the site runtime is still running."""
Handler = Callable[[Message, Context], Message]
"""Answers one message: the innermost call of the site's ClientApp."""


def site_handler() -> Handler:
    """The installed CareFL's training and evaluation (no mods: the task process runs them).

    Built models are kept across messages (:class:`~client.worker.templates.ModelTemplates`).
    """
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    from client.app import make_client_fn
    from client.worker.templates import ModelTemplates

    warm_up()

    client_fn = make_client_fn(models=ModelTemplates())

    def handle(message: Message, context: Context) -> Message:
        return handle_legacy_message_from_msgtype(client_fn=client_fn, message=message, context=context)

    return handle


def warm_up() -> None:
    """Import what training needs (torch, Opacus, the site's client) once, before the first message."""
    import opacus  # noqa: F401  # pylint: disable=unused-import

    import client.numpy_client  # noqa: F401  # pylint: disable=unused-import


def listen(site_dir: Path) -> tuple[socket.socket, bytes]:
    """Make the worker's folder (0700), a new secret (0600) and the listening socket (0600).

    A stale socket of an earlier worker is replaced. The secret is written before the socket
    exists, so a client that finds the socket finds this start's secret.
    """
    folder = worker_dir(site_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    secret = secrets.token_bytes(SECRET_BYTES)
    atomic_write_bytes(secret_path(site_dir), secret)  # mkstemp's file: mode 0600
    os.chmod(secret_path(site_dir), 0o600)
    path = socket_path(site_dir)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with reachable(path) as name:
            listener.bind(name)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(16)
    (folder / PID_FILE).write_text(f"{os.getpid()}\n")
    return listener, secret


def answer_connection(conn: socket.socket, secret: bytes, handler: Handler) -> None:
    """Serve one request on ``conn``: check the peer and its secret, then run ``handler``."""
    uid = peer_uid(conn)
    if uid != os.getuid():
        log(WARNING, "site worker: refused a connection from uid %d", uid)
        send_frames(conn, wire.STATUS_DENIED, b"peer of another user")
        return
    if not secrets_match(recv_frame(conn), secret):
        log(WARNING, "site worker: refused a connection with a wrong secret")
        send_frames(conn, wire.STATUS_DENIED, b"wrong secret")
        return
    send_frames(conn, wire.STATUS_OK)  # the secret is accepted
    kind = recv_frame(conn)
    if kind == wire.KIND_PING:
        send_frames(conn, wire.STATUS_OK)
        return
    if kind != wire.KIND_HANDLE:
        send_frames(conn, wire.STATUS_FAILED, b"unknown request " + kind[:32])
        return
    message, context = wire.parse_message(recv_frame(conn)), wire.parse_context(recv_frame(conn))
    started = time.perf_counter()
    try:
        reply = handler(message, context)
    except CareFLError as err:
        send_frames(conn, wire.STATUS_REFUSED, error_class_name(err).encode(), str(err).encode())
        return
    except Exception as err:  # pylint: disable=broad-exception-caught  # reported to the task, as Flower does
        log(ERROR, "site worker: the ClientApp raised an exception", exc_info=err)
        send_frames(conn, wire.STATUS_FAILED, f"{type(err).__name__}: {err}".encode())
        return
    log(
        INFO,
        "site worker: %s message answered in %.2f s",
        message.metadata.message_type,
        time.perf_counter() - started,
    )
    send_frames(conn, wire.STATUS_OK, wire.message_bytes(reply), wire.context_bytes(context))


def error_class_name(err: CareFLError) -> str:
    """The most derived class of :mod:`shared.errors` that ``err`` is (what the task process re-raises)."""
    return next(cls.__name__ for cls in type(err).__mro__ if cls.__module__ == CareFLError.__module__)


def serve(site_dir: Path, *, parent_pid: int | None = None, handler: Handler | None = None) -> None:
    """Listen on the site's worker socket and answer requests one at a time until interrupted.

    Parameters
    ----------
    site_dir : Path
        The hospital's site directory (the socket and secret go in its ``worker/`` folder).
    parent_pid : int, optional
        The site runtime's process id: the worker stops when it is gone.
    handler : Handler, optional
        Answers each message (default: :func:`site_handler`, the installed CareFL).
    """
    answer = handler if handler is not None else site_handler()  # imports first: the socket means ready
    listener, secret = listen(site_dir)
    listener.settimeout(PARENT_CHECK_S)  # wake up to see whether the runtime is still there
    log(INFO, "site worker: ready (pid %d) on %s", os.getpid(), socket_path(site_dir))
    try:
        while parent_pid is None or process_alive(parent_pid):
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    answer_connection(conn, secret, answer)
                except (ChannelError, OSError) as err:
                    log(WARNING, "site worker: a request broke off: %s", err)
        log(INFO, "site worker: the site runtime is gone; stopping")
    except KeyboardInterrupt:
        log(INFO, "site worker: interrupted; stopping")
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            if secrets_match(secret_path(site_dir).read_bytes(), secret):  # not a newer worker's
                for path in (socket_path(site_dir), worker_dir(site_dir) / PID_FILE, secret_path(site_dir)):
                    path.unlink(missing_ok=True)


def worker_command(site_dir: Path, parent_pid: int) -> list[str]:
    """The command line of the site's worker: this Python, ``-P``, the installed CareFL."""
    return [
        sys.executable, "-P", "-m", "client.worker.process", "--site-dir", str(site_dir), "--parent-pid", str(parent_pid),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -P -m client.worker.process --site-dir DIR [--parent-pid PID]``."""
    from shared.offline import configure_flower_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    configure_flower_env()
    serve(args.site_dir.resolve(), parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()

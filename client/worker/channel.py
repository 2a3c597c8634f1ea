"""The local channel between a site's task processes and its worker: a Unix socket, a secret.

Only this node's processes may use it. Three checks, each on its own enough to stop another
local user:

- the socket lives in ``SITE_DIR/worker/`` (mode 0700) and is itself mode 0600, owned by this
  user; a client refuses a socket with any other mode or owner (:func:`check_socket`);
- the worker accepts only peers of its own user id (``SO_PEERCRED``);
- every connection opens with the worker's per-start secret (32 random bytes in
  ``worker.secret``, 0600), compared in constant time; a wrong secret is refused.

Frames are a 4-byte big-endian length and the bytes. A request is ``secret, message, context``
(Flower's protobuf serialization); the reply is ``status, payload...`` with status ``ok``
(reply message, context), ``refused`` (the error class name, its text: a
:class:`~shared.errors.CareFLError` raised by the site's code) or ``failed`` (a text).

Unix socket paths are limited to 107 bytes; a longer path is reached through
``/proc/self/fd/N/worker.sock`` on an open descriptor of its folder.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from shared.errors import CareFLError

WORKER_DIR = "worker"
SOCKET_FILE = "worker.sock"
SECRET_FILE = "worker.secret"
SECRET_BYTES = 32
MAX_FRAME = 1 << 31
_HEADER = struct.Struct(">I")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes with the NUL; keep a margin


class ChannelError(CareFLError):
    """The worker's channel is missing, unsafe or broke off; the message names the socket."""


def worker_dir(site_dir: Path) -> Path:
    """``site_dir/worker``: the worker's socket, secret and start lock."""
    return Path(site_dir) / WORKER_DIR


def socket_path(site_dir: Path) -> Path:
    """The worker's socket in ``site_dir``."""
    return worker_dir(site_dir) / SOCKET_FILE


def secret_path(site_dir: Path) -> Path:
    """The worker's per-start secret in ``site_dir``."""
    return worker_dir(site_dir) / SECRET_FILE


def check_socket(path: Path) -> None:
    """Refuse a socket that another user could have made or could use.

    Raises
    ------
    ChannelError
        If ``path`` is not a socket, not owned by this user, or its mode is not 0600.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ChannelError(f"no site worker socket at {path}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ChannelError(f"{path} is not a socket; refusing it")
    if info.st_uid != os.getuid():
        raise ChannelError(
            f"{path} is owned by uid {info.st_uid}, not this user ({os.getuid()}); refusing it"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o600:
        raise ChannelError(f"{path} has mode {mode:04o}, not 0600; refusing it")


def read_secret(site_dir: Path) -> bytes:
    """The worker's current secret; refused unless it is a 0600 file of this user of the right size.

    Raises
    ------
    ChannelError
        If it is missing or unsafe.
    """
    path = secret_path(site_dir)
    try:
        info = os.lstat(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ChannelError(f"no site worker secret at {path}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o600:
        raise ChannelError(f"{path} is not a 0600 file of this user; refusing it")
    if len(data) != SECRET_BYTES:
        raise ChannelError(f"{path} holds {len(data)} bytes, not {SECRET_BYTES}; refusing it")
    return data


def secrets_match(given: bytes, expected: bytes) -> bool:
    """Constant-time comparison of a peer's secret with the worker's."""
    return hmac.compare_digest(given, expected)


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits in a Unix socket address (through its folder's descriptor if long)."""
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float | None) -> socket.socket:
    """Connect to the worker's socket after :func:`check_socket`.

    Raises
    ------
    ChannelError
        If the socket is unsafe or nobody listens on it.
    """
    check_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with reachable(path) as name:
            sock.connect(name)
    except OSError as err:
        sock.close()
        raise ChannelError(f"no site worker listens on {path} ({err.strerror or err})") from None
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    """Send each frame as its length and its bytes."""
    for frame in frames:
        sock.sendall(_HEADER.pack(len(frame)) + frame)


def recv_frame(sock: socket.socket) -> bytes:
    """Receive one frame.

    Raises
    ------
    ChannelError
        If the peer closed the connection before a whole frame arrived.
    """
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size >= MAX_FRAME:
        raise ChannelError(f"a frame of {size} bytes is over the channel's limit")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ChannelError("the site worker closed the connection")
        chunks += chunk
    return bytes(chunks)

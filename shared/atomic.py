"""Crash-safe file writes: write to a temporary file in the same directory, fsync, rename.

A reader sees either the old content or the new one, never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    Parameters
    ----------
    path : Path
        Destination; its parent directory is created if missing.
    data : bytes
        Content to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: Path) -> None:
    """Fsync a file or a directory, so a write or rename survives a power loss (best effort).

    Some file systems refuse to fsync directories; that is ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def require_writable_dir(path: Path, *, what: str, hint: str = "") -> None:
    """Refuse, before any work starts, a directory that cannot be created or written.

    ``path`` need not exist: the nearest existing ancestor must then be a directory in which a
    file can be created (a probe file is created and removed again; nothing else is written).
    Trying beats ``os.access``: it also sees read-only mounts, and it is not fooled by root.

    Parameters
    ----------
    path : Path
        The directory a run will create or write into.
    what : str
        What it is, for the message (e.g. ``"run folder"``).
    hint : str
        What to do instead (e.g. ``"choose another --out"``).

    Raises
    ------
    InputError
        Naming ``path``, the ancestor that blocks it and the reason.
    """
    from shared.errors import InputError

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    advice = f"; {hint}" if hint else ""
    if not existing.is_dir():
        blocker = "" if existing == path else f" cannot be created: {existing}"
        raise InputError(f"{what} {path}{blocker} is not a directory{advice}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".carefl-write-probe-", dir=existing)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = "" if existing == path else f" ({existing}, where it would be created)"
        raise InputError(f"{what} {path} is not writable{where}: {reason}{advice}.") from err
    os.close(fd)
    Path(probe).unlink(missing_ok=True)

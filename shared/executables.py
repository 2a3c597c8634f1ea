"""Flower's console scripts: where they are, what environment they need, how they are shown.

``flower-superlink`` and ``flower-supernode`` start ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` by name, through ``PATH``: the folder of this Python's scripts goes first on
it, so a virtual environment that is not activated still works. Flower's network calls home stay
off (:mod:`shared.offline`). Before a command runs it is announced as a shell line that can be
copied and run as is (:func:`command_line`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from shared.offline import FLOWER_OFFLINE_ENV

Announce = Callable[[str], None]
"""Receives each command line before it runs (and warnings about how it runs)."""

INSECURE_WARNING = (
    "WARNING: --insecure: no TLS (traffic readable and alterable on the network) and no node "
    "authentication (any SuperNode may join). Only for a test on one machine."
)


def scripts_dir() -> Path:
    """The folder of this Python's console scripts (a virtual environment's ``bin``)."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """Return the full path of console script ``name``, preferring this Python's own.

    Falls back to ``PATH``, then to the bare name (the error comes when it is started).
    """
    own = scripts_dir() / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which(name) or name


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Return the variables to add for a Flower process: offline switches, ``PATH``, ``extra``.

    Parameters
    ----------
    base : Mapping[str, str], optional
        The environment whose ``PATH`` is extended (``os.environ`` by default).
    **extra : str
        More variables, e.g. ``FLWR_HOME``.
    """
    environ = os.environ if base is None else base
    path = os.pathsep.join([str(scripts_dir()), environ.get("PATH", "")]).rstrip(os.pathsep)
    offline = {k: environ.get(k, v) for k, v in FLOWER_OFFLINE_ENV.items() if k.startswith("FLWR_")}
    return {**offline, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A shell line that runs ``argv`` with ``env`` (copy-pasteable into ``sh``).

    ``PATH`` is shown as this Python's scripts folder prepended to the caller's ``$PATH``.
    """
    prefix = []
    for key, value in (env or {}).items():
        if key == "PATH":
            prefix.append(f'PATH={shlex.quote(str(scripts_dir()))}:"$PATH"')
        else:
            prefix.append(f"{key}={shlex.quote(value)}")
    return " ".join([*prefix, shlex.join(argv)])


def console_announcer(console: Console) -> Announce:
    """Print each command line (dimmed ``$`` prompt) and warnings (bold yellow)."""

    def announce(line: str) -> None:
        if line.startswith("WARNING"):
            console.print(f"[bold yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)
        else:
            console.print(f"[dim]$[/] {escape(line)}", highlight=False, soft_wrap=True)

    return announce

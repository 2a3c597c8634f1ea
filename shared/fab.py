"""Flower App Bundles (FABs): build one, fingerprint it, and say what is inside.

``flwr run APP_DIR`` builds a FAB (a zip: the app's ``pyproject.toml``, its code, and a
``.info/CONTENT`` manifest) with :func:`flwr.cli.build.build_fab_from_disk` and sends it with
``hash_str = sha256(fab bytes)``: the FAB's fingerprint. The build is deterministic (sorted
files, fixed zip timestamps), so the consortium and a hospital that build the same files get
the same fingerprint. A hospital approves an app by that fingerprint (``carefl app approve``);
its node refuses every FAB whose bytes hash to anything else.
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InputError
from shared.hashing import sha256_bytes

FAB_SUFFIX = ".fab"
CONTENT_FILE = ".info/CONTENT"  # flwr.cli.build: the FAB's manifest of files


@dataclass(frozen=True)
class FabInfo:
    """What a FAB is: its fingerprint, the app's metadata and its files.

    Attributes
    ----------
    sha256 : str
        SHA-256 (hex) of the FAB's bytes: Flower's ``Fab.hash_str``.
    publisher, name, version : str
        ``[tool.flwr.app] publisher``, ``[project] name`` and ``version`` of its ``pyproject.toml``.
    files : tuple[tuple[str, str, int], ...]
        ``(path, sha256, size in bytes)`` of each file, from its ``.info/CONTENT`` manifest.
    components : dict[str, str]
        ``[tool.flwr.app.components]``: the ServerApp and ClientApp it names.
    """

    sha256: str
    publisher: str
    name: str
    version: str
    files: tuple[tuple[str, str, int], ...]
    components: dict[str, str]

    @property
    def fab_id(self) -> str:
        """``publisher/name``, as Flower names the app."""
        return f"{self.publisher}/{self.name}"


def build_fab(app_dir: Path) -> bytes:
    """Build the FAB of the Flower app in ``app_dir`` exactly as ``flwr run`` does.

    Raises
    ------
    InputError
        If ``app_dir`` is not a Flower app (no valid ``pyproject.toml``).
    """
    from flwr.cli.build import build_fab_from_disk

    folder = Path(app_dir)
    if not (folder / "pyproject.toml").is_file():
        raise InputError(f"{folder} is not a Flower app: it has no pyproject.toml.")
    try:
        return build_fab_from_disk(folder)
    except ValueError as err:
        raise InputError(f"{folder}: cannot build its FAB ({err}).") from None


def fab_sha256(content: bytes) -> str:
    """The FAB's fingerprint: the SHA-256 (hex) of its bytes, as ``flwr run`` computes ``hash_str``."""
    return sha256_bytes(content)


def fab_filename(info: FabInfo) -> str:
    """``<publisher>.<name>.<version with dashes>.<sha256[:8]>.fab``: the name ``flwr build`` gives it."""
    from flwr.cli.build import get_fab_filename

    config = {"tool": {"flwr": {"app": {"publisher": info.publisher}}}, "project": {"name": info.name, "version": info.version}}
    return get_fab_filename(config, info.sha256)


def read_fab(content: bytes, source: str = "the FAB") -> FabInfo:
    """Read a FAB's metadata and manifest (nothing in it is imported or run).

    Parameters
    ----------
    content : bytes
        The FAB's bytes.
    source : str
        Named in errors (a file path).

    Raises
    ------
    InputError
        If it is not a zip, or has no readable ``pyproject.toml`` or manifest.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
            manifest = bundle.read(CONTENT_FILE).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"{source} is not a Flower App Bundle ({err}).") from None
    files = []
    for line in manifest.splitlines():
        path, digest, bits = line.rsplit(",", 2)
        files.append((path, digest, int(bits) // 8))
    flwr_app = config.get("tool", {}).get("flwr", {}).get("app", {})
    project = config.get("project", {})
    return FabInfo(
        sha256=fab_sha256(content),
        publisher=str(flwr_app.get("publisher", "")),
        name=str(project.get("name", "")),
        version=str(project.get("version", "")),
        files=tuple(files),
        components={str(k): str(v) for k, v in flwr_app.get("components", {}).items()},
    )


def read_fab_file(path: Path) -> FabInfo:
    """:func:`read_fab` of the file at ``path``.

    Raises
    ------
    InputError
        If the file is missing or is not a FAB.
    """
    try:
        content = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read the FAB ({err.strerror or err}).") from None
    return read_fab(content, source=str(path))

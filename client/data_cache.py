"""The site's own data, decoded once: a cache of the split arrays in the site directory.

Flower starts a fresh ClientApp process for every message, so a node would decode its whole
image folder (or DICOM archive) again for each round's training and evaluation. The decoded,
split arrays are cached under ``site-dir/cache/data/``, keyed by everything they depend on: the
task and its input settings, the site's split settings, and the name, size and modification
time of every file the data path holds (or a manifest names). A changed, added or removed file
changes the key; a corrupt entry is read again from the data, never trusted.

The cache stays at the site, like the data: it holds decoded pixels or rows, never a DICOM tag.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.atomic import atomic_write_bytes
from shared.hashing import sha256_bytes
from shared.log import log
from shared.tasks.base import OwnData, SiteData

if TYPE_CHECKING:
    from shared.config import StudyConfig

CACHE_DIR = Path("cache") / "data"
FORMAT = "carefl-site-data/1"
ARRAYS = ("x_train", "y_train", "x_val", "y_val")


def data_key(cfg: StudyConfig, source: OwnData) -> str:
    """The SHA-256 naming the cache entry of ``source`` read for the study ``cfg``.

    Parameters
    ----------
    cfg : StudyConfig
        The study (its task, image size and missing-value rule change what is read).
    source : OwnData
        The site's data and split settings.
    """
    from shared.tasks import input_spec

    description = {
        "format": FORMAT,
        "task": cfg.task,
        "input": input_spec(cfg),
        "missing": cfg.missing,
        "source": {"path": str(Path(source.path).resolve()), "name": source.name,
                   "val_fraction": source.val_fraction, "seed": source.seed},
        "files": sha256_bytes("\n".join(_file_stamps(Path(source.path))).encode("utf-8")),
    }  # fmt: skip
    return sha256_bytes(json.dumps(description, sort_keys=True, default=str).encode("utf-8"))


def _file_stamps(path: Path) -> Iterator[str]:
    """``relative path|size|mtime_ns`` of every file the data at ``path`` consist of, sorted."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_file() and path.suffix.lower() == ".csv":
        files += sorted(_manifest_files(path))
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            yield f"{file}|missing"
            continue
        yield f"{os.path.relpath(file, path.parent if path.is_file() else path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _manifest_files(manifest: Path) -> Iterator[Path]:
    """The files a manifest CSV names in its ``path`` column (none for a table without one)."""
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                value = (row.get("path") or "").strip()
                if value:
                    yield manifest.parent / value
    except (OSError, UnicodeDecodeError, csv.Error):
        return


def cached_site(site_dir: Path, key: str) -> SiteData | None:
    """The cached site data under ``key``, or ``None`` (absent or unreadable: read the data again)."""
    path = site_dir / CACHE_DIR / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            arrays = {name: np.asarray(archive[name]) for name in ARRAYS}
        if meta.get("format") != FORMAT:
            return None
        return SiteData(
            name=meta["name"], fingerprint=meta["fingerprint"], dropped=int(meta["dropped"]),
            preprocessing=meta["preprocessing"], **arrays,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        log(WARNING, "site data cache %s unreadable (%s): reading the data again", path.name, err)
        return None


def store_site(site_dir: Path, key: str, site: SiteData) -> None:
    """Cache ``site`` under ``key`` (atomically: a reader sees the whole entry or none)."""
    meta = {
        "format": FORMAT, "name": site.name, "fingerprint": site.fingerprint, "dropped": site.dropped,
        "preprocessing": dict(site.preprocessing),
    }  # fmt: skip
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.asarray(json.dumps(meta)), **{name: getattr(site, name) for name in ARRAYS})
    atomic_write_bytes(site_dir / CACHE_DIR / f"{key}.npz", buffer.getvalue())
    log(
        INFO,
        "%s: decoded data cached (%d training / %d validation records)",
        site.name,
        site.num_train,
        site.num_val,
    )

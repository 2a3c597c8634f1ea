"""The site's on-disk store of backbones received from the server, keyed by SHA-256.

A backbone is stored only if its bytes hash to the SHA-256 the server announced; it is
re-verified each time it is read, so a file altered on disk is refused, not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.backbones.manifest import BackboneManifest
from shared.backbones.registry import verify_bytes, verify_file
from shared.errors import InputError, IntegrityError

if TYPE_CHECKING:
    from shared.pipeline import Pretrained

WEIGHTS_FILE = "weights"
MANIFEST_FILE = "manifest.json"


class BackboneStore:
    """Backbones cached at a site.

    Parameters
    ----------
    root : Path
        The site's cache directory; backbones go to ``root/backbones/<sha256>/``.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root) / "backbones"

    def folder(self, sha256: str) -> Path:
        """Return the folder of backbone ``sha256``."""
        return self._root / sha256

    def has(self, sha256: str) -> bool:
        """Return whether backbone ``sha256`` is stored (not verifying its bytes)."""
        folder = self.folder(sha256)
        return (folder / WEIGHTS_FILE).is_file() and (folder / MANIFEST_FILE).is_file()

    def put(self, manifest_json: str, weights: bytes) -> BackboneManifest:
        """Verify and store a backbone sent by the server.

        Raises
        ------
        IntegrityError
            If ``weights`` do not hash to the manifest's SHA-256.
        """
        try:
            manifest = BackboneManifest.from_mapping(json.loads(manifest_json), origin="server")
        except json.JSONDecodeError as err:
            raise InputError(f"server sent an unreadable backbone manifest ({err}).") from err
        verify_bytes(weights, manifest, origin="backbone received from the server")
        folder = self.folder(manifest.sha256)
        atomic_write_bytes(folder / WEIGHTS_FILE, weights)
        atomic_write_text(folder / MANIFEST_FILE, manifest.to_json())
        return manifest

    def get(self, sha256: str) -> Pretrained:
        """Return the verified backbone ``sha256``.

        Raises
        ------
        InputError
            If the backbone was never received.
        IntegrityError
            If the stored file no longer matches its SHA-256.
        """
        if not self.has(sha256):
            raise InputError(
                f"backbone {sha256[:16]}... has not been received by this site; the server "
                "distributes it before the first round."
            )
        folder = self.folder(sha256)
        manifest = BackboneManifest.load(folder / MANIFEST_FILE)
        if manifest.sha256 != sha256:
            raise IntegrityError(f"{folder}: manifest names another backbone; refused.")
        verify_file(folder / WEIGHTS_FILE, manifest)
        from shared.pipeline import Pretrained  # torch: only where a model is built

        return Pretrained(manifest=manifest, path=folder / WEIGHTS_FILE)

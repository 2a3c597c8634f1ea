"""The manifest that identifies a backbone: what it is, how to feed it, and its exact weights."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InputError

# torchvision's ImageNet normalization, recorded in manifests (kept here: no torch import)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ARCHITECTURES: tuple[str, ...] = ("mobilenet_v2", "heart_mlp", "small_cnn")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Names and file names become paths in registries and caches: no separators, no dot-dot.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class BackboneManifest:
    """Description of a pretrained backbone.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``mobilenet_v2-imagenet``.
    architecture : str
        One of :data:`ARCHITECTURES`.
    sha256 : str
        Full SHA-256 of the weights file; weights that do not match are never loaded.
    feature_dim : int
        Size of the feature vector the backbone outputs.
    preprocessing : dict
        How inputs must be prepared (JSON-able); part of the feature-cache key.
    filename : str
        File name of the weights (torchvision checks hash prefixes in such names).
    arch_params : dict
        Constructor arguments of the architecture (e.g. the MLP's layer sizes).
    url : str
        Where online users can download the weights; empty if none.
    source : str
        Provenance, for the model card.
    """

    name: str
    architecture: str
    sha256: str
    feature_dim: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    filename: str = "weights.pt"
    arch_params: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "filename"):
            value = getattr(self, key)
            if not _SAFE_NAME.match(value) or ".." in value:
                raise InputError(
                    f"backbone manifest: `{key}` {value!r} must be letters, digits, '.', '_' "
                    "or '-' (it becomes a file name)."
                )
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"backbone {self.name!r}: unknown architecture {self.architecture!r}; "
                f"known: {', '.join(ARCHITECTURES)}."
            )
        if not _SHA256.match(self.sha256):
            raise InputError(f"backbone {self.name!r}: `sha256` must be 64 lowercase hex digits.")
        if self.feature_dim < 1:
            raise InputError(f"backbone {self.name!r}: `feature_dim` must be >= 1.")

    def to_json(self) -> str:
        """Serialize to canonical JSON (sorted keys)."""
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str) -> BackboneManifest:
        """Build a manifest from parsed JSON, naming ``origin`` in errors."""
        try:
            return cls(**dict(data))
        except TypeError as err:
            raise InputError(f"{origin}: not a backbone manifest ({err}).") from err

    @classmethod
    def load(cls, path: Path) -> BackboneManifest:
        """Read a manifest from a JSON file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise InputError(f"{path}: backbone manifest not found.") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable backbone manifest ({err}).") from err
        if not isinstance(data, dict):
            raise InputError(f"{path}: backbone manifest must be a JSON object.")
        return cls.from_mapping(data, origin=str(path))

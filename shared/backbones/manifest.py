"""The manifest that identifies a backbone: what it is, how to feed it, and its exact weights."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import AfterValidator, Field

from shared.errors import InputError
from shared.schema import BuiltDocument, Sha256, validate

# torchvision's ImageNet normalization, recorded in manifests (kept here: no torch import)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Architecture = Literal[
    "mobilenet_v2",
    "vgg16",
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "heart_mlp",
    "small_cnn",
]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
# Names and file names become paths in registries and caches: no separators, no dot-dot.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _safe_name(value: str) -> str:
    if not _SAFE_NAME.match(value) or ".." in value:
        raise ValueError("must be letters, digits, '.', '_' or '-' (it becomes a file name)")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]


class BackboneManifest(BuiltDocument):
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

    Raises
    ------
    InputError
        If a value has the wrong type or breaks its rule; the message names the key.
    """

    subject: ClassVar[str] = "backbone manifest"

    name: SafeName
    architecture: Architecture
    sha256: Sha256
    feature_dim: int = Field(ge=1)
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    filename: SafeName = "weights.pt"
    arch_params: dict[str, Any] = Field(default_factory=dict)
    url: str = ""
    source: str = ""

    def to_json(self) -> str:
        """Serialize to canonical JSON (sorted keys)."""
        return json.dumps(self.model_dump(), sort_keys=True, indent=2)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str) -> BackboneManifest:
        """Build a manifest from parsed JSON, naming ``origin`` in errors."""
        return validate(cls, data, source=origin, error=InputError, known=", ".join(cls.model_fields))

    @classmethod
    def load(cls, path: Path) -> BackboneManifest:
        """Read a manifest from a JSON file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise InputError(f"{path}: backbone manifest not found.") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: unreadable backbone manifest ({err}).") from err
        return cls.from_mapping(data, origin=str(path))

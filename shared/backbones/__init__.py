"""Backbones: manifests, the registry that resolves verified weights, and architectures."""

from shared.backbones.manifest import BackboneManifest
from shared.backbones.registry import BackboneRegistry, ResolvedBackbone, WeightsNotFound

__all__ = ["BackboneManifest", "BackboneRegistry", "ResolvedBackbone", "WeightsNotFound"]

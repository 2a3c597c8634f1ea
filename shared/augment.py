"""Seeded augmented views of training images (augmentation multiplicity, De et al. 2022).

A frozen backbone sees ``K`` random views of each training image once; their features are
cached and the head's loss of a record is the mean over its views (see
:class:`shared.training.RecordLoss`), so DP-SGD still clips one gradient per record. The views
are a function of the images, the seed and ``K`` only: the same site recomputes the same
views, and the feature cache is keyed by :meth:`Augmentation.spec`. Validation images are
never augmented.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

CROP_SCALE = (0.85, 1.0)
"""Area fraction of the random resized crop (mild: lesions near the border stay in view)."""
CROP_RATIO = (0.9, 1.0 / 0.9)
"""Aspect ratios of the crop."""
ROTATION_DEGREES = 10.0
"""Rotations are drawn uniformly within plus or minus this many degrees."""
FLIP_PROBABILITY = 0.5
"""Probability of a horizontal flip."""


@dataclass(frozen=True)
class Augmentation:
    """What augmented views a site computes for its training images.

    Attributes
    ----------
    kind : str
        ``none`` or ``crop-rotate-flip``.
    views : int
        ``K``, views per training image.
    seed : int
        Seed of the views (the study's seed: augmentation is not a privacy mechanism).
    """

    kind: str = "none"
    views: int = 1
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether training images are augmented at all."""
        return self.kind != "none"

    def spec(self) -> dict[str, object]:
        """The parameters the views depend on: part of the feature-cache key."""
        return {
            "kind": self.kind,
            "views": self.views,
            "seed": self.seed,
            "crop_scale": list(CROP_SCALE),
            "crop_ratio": list(CROP_RATIO),
            "rotation_degrees": ROTATION_DEGREES,
            "flip_probability": FLIP_PROBABILITY,
        }


def crop_rotate_flip(height: int, width: int):  # type: ignore[no-untyped-def]
    """The ``crop-rotate-flip`` transform of one ``(1, H, W)`` image (torchvision ``transforms.v2``).

    Random resized crop back to ``(H, W)`` (:data:`CROP_SCALE`, :data:`CROP_RATIO`), rotation
    within :data:`ROTATION_DEGREES` (corners filled with 0, bilinear) and a horizontal flip
    with :data:`FLIP_PROBABILITY`. Draws from the global torch RNG (see :func:`augmented_views`).
    """
    from shared.tv import torchvision_module

    torchvision_module()  # the CPU shim, before torchvision's first import
    from torchvision.transforms import InterpolationMode, v2

    bilinear = InterpolationMode.BILINEAR
    return v2.Compose(
        [
            v2.RandomResizedCrop((height, width), scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True),
            v2.RandomRotation(ROTATION_DEGREES, interpolation=bilinear),
            v2.RandomHorizontalFlip(FLIP_PROBABILITY),
        ]
    )


def augmented_views(images: np.ndarray, augmentation: Augmentation) -> Iterator[np.ndarray]:
    """Yield the ``K`` augmented versions of ``images``, one array ``(N, H, W)`` per view.

    Every image gets its own random draw. View ``k`` is seeded with ``(seed, k)`` inside
    :func:`torch.random.fork_rng`, so the global torch RNG is left as it was and the views do
    not depend on anything else drawn before.

    Parameters
    ----------
    images : np.ndarray
        Raw pixels ``(N, H, W)`` (any real dtype; values as the task stores them).
    augmentation : Augmentation
        Kind, number of views and seed; ``none`` yields ``images`` itself once.

    Raises
    ------
    ValueError
        For an unknown kind.
    """
    if not augmentation.active:
        yield images
        return
    if augmentation.kind != "crop-rotate-flip":
        raise ValueError(f"unknown augmentation {augmentation.kind!r}")
    pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    transform = crop_rotate_flip(*images.shape[1:3])
    for view in range(augmentation.views):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation.seed * 1_000_003 + view)
            out = (
                torch.stack([transform(image.unsqueeze(0))[0] for image in pixels]) if len(pixels) else pixels
            )
        yield out.numpy().astype(images.dtype, copy=False)

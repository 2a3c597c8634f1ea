"""Chest X-ray images: loading, and the documented non-IID split into sites.

Two input layouts are accepted by :func:`load_image_dataset`:

* a ``.npz`` file in MedMNIST layout (``train_images``, ``train_labels``, ``val_images``,
  ``val_labels``), e.g. PneumoniaMNIST; its own train/val split is kept as is;
* a directory with one sub-folder per class (sorted folder names are the classes) holding
  PNG/JPEG images; a stratified, seeded train/val split is drawn from it.

The documented non-IID split
----------------------------
:func:`split_sites` simulates hospitals with different case mixes. For every class ``c`` a
row of proportions ``p_c ~ Dirichlet(alpha, ..., alpha)`` over the ``num_sites`` sites is drawn
(:func:`dirichlet_split`, seeded with ``np.random.default_rng(seed)``; rows are redrawn until
every site gets at least ``min_per_site`` training examples). Site ``k`` then receives the
fraction ``p_c[k]`` of the examples of class ``c`` (:func:`partition_indices`). The SAME
proportion matrix is applied to the training split and to the validation split, so each site's
validation part has the same label skew as its training part: a site evaluates on the kind of
patients it trains on. Small ``alpha`` (e.g. 0.1) gives strongly skewed sites, large ``alpha``
(e.g. 100) nearly identical ones. Every index of each split goes to exactly one site.

Sites keep raw grayscale pixels: resizing and ImageNet normalization are done by the model's
input module (:mod:`shared.pipeline`), batch by batch.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from PIL import Image

from shared.errors import ConfigError, InputError
from shared.hashing import sha256_bytes
from shared.log import log

NPZ_KEYS: tuple[str, ...] = ("train_images", "train_labels", "val_images", "val_labels")
BINARY_CLASSES: tuple[str, ...] = ("normal", "pneumonia")
IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG"})
MIN_IMAGE_SIDE = 8
"""Smallest image side accepted (the smallest ``image-size`` too): below it nothing of an X-ray is left."""
MAX_REDRAWS = 1000

_NPZ_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, zlib.error)
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Grayscale images with a train/val split.

    Compared by identity (``eq=False``): compare :attr:`fingerprint` to compare contents.

    Attributes
    ----------
    train_images : np.ndarray
        uint8, shape (N, H, W).
    train_labels : np.ndarray
        int64, shape (N,), values in ``range(len(classes))``.
    val_images : np.ndarray
        uint8, shape (M, H, W).
    val_labels : np.ndarray
        int64, shape (M,).
    classes : tuple[str, ...]
        Class names; label ``i`` is ``classes[i]``.
    fingerprint : str
        Hex SHA-256 over the arrays (dtype, shape, bytes) and the classes; a cache key.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: tuple[str, ...]
    fingerprint: str


@dataclass(frozen=True, eq=False)
class SitePart:
    """The examples of one simulated site (hospital).

    Attributes
    ----------
    name : str
        Site name, ``"site-1"`` .. ``"site-N"``.
    train_idx : np.ndarray
        Sorted int64 indices into the dataset's training split.
    val_idx : np.ndarray
        Sorted int64 indices into the dataset's validation split.
    """

    name: str
    train_idx: np.ndarray
    val_idx: np.ndarray


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------


def dataset_fingerprint(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    classes: tuple[str, ...],
) -> str:
    """Return the hex SHA-256 identifying a data set's content.

    Each array contributes its name, dtype, shape and the SHA-256 of its C-ordered bytes;
    the class names are appended; the result is the SHA-256 of that description.

    Parameters
    ----------
    train_images, train_labels, val_images, val_labels : np.ndarray
        The arrays of an :class:`ImageDataset`.
    classes : tuple[str, ...]
        Class names.

    Returns
    -------
    str
        64 hex characters.
    """
    arrays = dict(zip(NPZ_KEYS, (train_images, train_labels, val_images, val_labels)))
    lines = [
        f"{name}|{array.dtype.str}|{list(array.shape)}|"
        f"{sha256_bytes(np.ascontiguousarray(array).tobytes())}"
        for name, array in arrays.items()
    ]
    lines.append("classes|" + "\x1f".join(classes))
    return sha256_bytes("\n".join(lines).encode("utf-8"))


def _make_dataset(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    classes: tuple[str, ...],
) -> ImageDataset:
    """Build an :class:`ImageDataset` with read-only arrays and its fingerprint."""
    arrays = [
        np.ascontiguousarray(train_images, dtype=np.uint8),
        np.ascontiguousarray(train_labels, dtype=np.int64),
        np.ascontiguousarray(val_images, dtype=np.uint8),
        np.ascontiguousarray(val_labels, dtype=np.int64),
    ]
    for array in arrays:
        array.setflags(write=False)
    fingerprint = dataset_fingerprint(*arrays, classes)
    return ImageDataset(*arrays, classes=classes, fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_image_dataset(
    path: Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 42,
    image_size_hint: int = 28,
) -> ImageDataset:
    """Load a chest X-ray data set from a MedMNIST ``.npz`` file or a folder of class folders.

    Parameters
    ----------
    path : Path
        A ``.npz`` file in MedMNIST layout, or a directory with one sub-folder per class.
    val_fraction : float
        Fraction of each class held out for validation (directories only; a ``.npz`` file
        keeps its own split).
    seed : int
        Seed of the stratified train/val split (directories only).
    image_size_hint : int
        Side length images are resized to when a directory's images differ in size.

    Returns
    -------
    ImageDataset
        The images, labels, class names and fingerprint.

    Raises
    ------
    InputError
        If the path is missing, not a ``.npz`` file or directory, or malformed.
    ConfigError
        If ``val_fraction`` or ``image_size_hint`` is out of range.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        dataset = _load_folder(
            path, val_fraction=val_fraction, seed=seed, image_size_hint=image_size_hint
        )
    elif path.suffix.lower() == ".npz":
        dataset = _load_npz(path)
    else:
        raise InputError(
            f"{path} is neither a .npz file (MedMNIST layout) nor a directory of class folders"
        )
    log(
        INFO,
        "loaded %s: %d train / %d val images of %dx%d, classes %s",
        path,
        len(dataset.train_labels),
        len(dataset.val_labels),
        dataset.train_images.shape[1],
        dataset.train_images.shape[2],
        ",".join(dataset.classes),
    )
    return dataset


def _load_npz(path: Path) -> ImageDataset:
    """Load and validate a MedMNIST-layout ``.npz`` file."""
    raw = _read_npz_arrays(path)
    train_images = _as_grayscale(path, "train_images", raw["train_images"])
    val_images = _as_grayscale(path, "val_images", raw["val_images"])
    if train_images.shape[1:] != val_images.shape[1:]:
        raise InputError(
            f"{path}: train_images are {train_images.shape[1]}x{train_images.shape[2]} but "
            f"val_images are {val_images.shape[1]}x{val_images.shape[2]}"
        )
    train_labels = _as_labels(path, "train_labels", raw["train_labels"], len(train_images))
    val_labels = _as_labels(path, "val_labels", raw["val_labels"], len(val_images))
    classes = _npz_classes(path, train_labels, val_labels)
    return _make_dataset(train_images, train_labels, val_images, val_labels, classes)


def _read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read the four MedMNIST arrays of ``path`` into memory, or raise InputError."""
    try:
        # Open the file here: np.load leaks its own handle when the archive is corrupt.
        with path.open("rb") as handle:
            if not zipfile.is_zipfile(handle):
                raise InputError(f"{path} is not a .npz file: not a zip archive, or truncated")
            handle.seek(0)
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise InputError(f"{path} holds a single .npy array, not a .npz archive")
            with loaded as archive:
                missing = [key for key in NPZ_KEYS if key not in archive.files]
                if missing:
                    raise InputError(f"{path} is missing key(s) {', '.join(missing)}")
                return {key: np.asarray(archive[key]) for key in NPZ_KEYS}
    except InputError:
        raise
    except _NPZ_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is not a readable .npz file: {reason}") from exc


def _as_grayscale(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """Validate ``images`` as uint8 (N,H,W) or (N,H,W,1|3) and return (N,H,W) uint8."""
    if images.dtype != np.uint8:
        raise InputError(f"{path}: {key} must be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[3] in (1, 3):
        images = images[..., 0] if images.shape[3] == 1 else _rgb_to_gray(images)
    if images.ndim != 3:
        raise InputError(
            f"{path}: {key} must have shape (N,H,W) or (N,H,W,1|3), got {images.shape}"
        )
    if min(images.shape) == 0:
        raise InputError(f"{path}: {key} is empty (shape {images.shape})")
    if min(images.shape[1:]) < MIN_IMAGE_SIDE:
        raise InputError(
            f"{path}: {key} are {images.shape[2]}x{images.shape[1]} pixels: too small to be X-rays "
            f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
        )
    return images


def _rgb_to_gray(images: np.ndarray) -> np.ndarray:
    """Convert uint8 (N,H,W,3) RGB to (N,H,W) luma with PIL's ITU-R 601-2 weights."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = images.astype(np.float32) @ weights
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _as_labels(path: Path, key: str, labels: np.ndarray, count: int) -> np.ndarray:
    """Validate integer labels of shape (N,) or (N,1) and return them as int64 (N,)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise InputError(f"{path}: {key} must have shape (N,) or (N,1), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: {key} must be integers, got {labels.dtype}")
    if len(labels) != count:
        raise InputError(f"{path}: {key} has {len(labels)} labels for {count} images")
    if labels.min() < 0:
        raise InputError(f"{path}: {key} has a negative label ({labels.min()})")
    return labels.astype(np.int64)


def _npz_classes(path: Path, train_labels: np.ndarray, val_labels: np.ndarray) -> tuple[str, ...]:
    """Name the classes of integer labels: normal/pneumonia when binary, else "0", "1", ...

    Whether the labels fit a task (every class present, none beyond its model's outputs) is
    the task's one rule (:func:`shared.tasks.base.label_problem`), not this loader's.
    """
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    if num_classes == len(BINARY_CLASSES):
        return BINARY_CLASSES
    return tuple(str(label) for label in range(num_classes))


def _load_folder(
    path: Path, *, val_fraction: float, seed: int, image_size_hint: int
) -> ImageDataset:
    """Load a directory of class folders and draw a stratified train/val split."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
    if image_size_hint < 1:
        raise ConfigError(f"`image_size_hint` must be >= 1, got {image_size_hint}")
    class_dirs = sorted(
        (child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")),
        key=lambda child: child.name,
    )
    if len(class_dirs) < 2:
        raise InputError(
            f"{path} must hold at least 2 class folders, found {len(class_dirs)}"
        )
    images: list[np.ndarray] = []
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = _image_files(class_dir)
        if not class_files:
            raise InputError(f"class folder {class_dir} holds no images")
        images.extend(_read_image(file) for file in class_files)
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    stacked = _stack_common_size(images, files, image_size_hint)
    label_array = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx = _stratified_split(path, label_array, val_fraction, seed)
    classes = tuple(class_dir.name for class_dir in class_dirs)
    return _make_dataset(
        stacked[train_idx], label_array[train_idx], stacked[val_idx], label_array[val_idx], classes
    )


def _image_files(class_dir: Path) -> list[Path]:
    """Return the non-hidden regular files of ``class_dir``, sorted by name.

    A folder inside a class folder is refused, not read and not skipped: its images would
    silently get the class folder's label (``train/NORMAL`` read as class ``train``, when
    the data path is one level too high), or silently be left out.
    """
    visible = [f for f in class_dir.iterdir() if not f.name.startswith(".")]
    nested = sorted(f.name for f in visible if f.is_dir())
    if nested:
        raise InputError(
            f"class folder {class_dir} holds folder(s) {', '.join(nested)}: a class folder holds "
            "images only; point the data path at the folder whose sub-folders are the classes"
        )
    return sorted((f for f in visible if f.is_file()), key=lambda f: f.name)


def _read_image(file: Path) -> np.ndarray:
    """Decode a PNG/JPEG file to a uint8 (H,W) grayscale array, or raise InputError."""
    try:
        with Image.open(file) as image:
            if image.format not in IMAGE_FORMATS:
                raise InputError(
                    f"{file} is not a readable image (PNG/JPEG): format is {image.format}"
                )
            if min(image.size) < MIN_IMAGE_SIDE:
                raise InputError(
                    f"{file} is {image.size[0]}x{image.size[1]} pixels: too small to be an X-ray "
                    f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
                )
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except InputError:
        raise
    except _IMAGE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{file} is not a readable image (PNG/JPEG): {reason}") from exc


def _stack_common_size(images: list[np.ndarray], files: list[Path], image_size_hint: int) -> np.ndarray:
    """Stack (H,W) images; if their sizes differ, resize all to ``image_size_hint`` squared.

    The warning names the smallest image and how many are enlarged, so an odd file is seen.
    """
    if all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    size = (image_size_hint, image_size_hint)
    smallest = min(range(len(images)), key=lambda i: min(images[i].shape))
    enlarged = sum(min(image.shape) < image_size_hint for image in images)
    log(
        WARNING, "images differ in size: resizing all to %dx%d (bilinear); %d enlarged, the smallest %s (%dx%d)",
        *size, enlarged, files[smallest], images[smallest].shape[1], images[smallest].shape[0],
    )  # fmt: skip
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            for image in images
        ]
    )


def _stratified_split(
    path: Path, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into sorted train/val indices, stratified by label."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(
            indices, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as exc:
        raise InputError(
            f"{path}: cannot split {len(labels)} images into train/val with "
            f"val_fraction={val_fraction}: {exc}"
        ) from exc
    return np.sort(train_idx), np.sort(val_idx)


# ---------------------------------------------------------------------------------------------
# Non-IID split into sites
# ---------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a non-empty 1-D int64 array of non-negative values."""
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(
            f"`labels` must be a non-empty 1-D integer array, got {array.dtype} {array.shape}"
        )
    if array.min() < 0:
        raise ConfigError(f"`labels` must be >= 0, got {array.min()}")
    return array.astype(np.int64)


def _site_counts(count: int, row: np.ndarray) -> np.ndarray:
    """Return how many of ``count`` examples each site gets under proportions ``row``."""
    bounds = np.floor(np.cumsum(row) * count).astype(np.int64)
    bounds = np.clip(bounds, 0, count)
    bounds[-1] = count
    return np.diff(bounds, prepend=0)


def _counts_per_site(class_counts: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Return the number of examples each site gets, summed over classes."""
    return np.sum(
        [_site_counts(int(n), row) for n, row in zip(class_counts, proportions)], axis=0
    )


def dirichlet_split(
    labels: np.ndarray,
    *,
    num_sites: int,
    alpha: float,
    seed: int,
    min_per_site: int = 10,
    num_classes: int | None = None,
) -> np.ndarray:
    """Draw the per-class proportions of a non-IID split into sites.

    Parameters
    ----------
    labels : np.ndarray
        Training labels, 1-D non-negative integers.
    num_sites : int
        Number of sites (>= 1).
    alpha : float
        Dirichlet concentration (> 0); small values give strongly skewed sites.
    seed : int
        Seed of ``np.random.default_rng``.
    min_per_site : int
        Redraw the whole matrix (same generator, up to 1000 times) until every site gets at
        least this many training examples under :func:`partition_indices`.
    num_classes : int, optional
        Number of rows; defaults to ``labels.max() + 1``.

    Returns
    -------
    np.ndarray
        float64, shape (num_classes, num_sites); each row sums to 1.

    Raises
    ------
    ConfigError
        If an argument is out of range, or no draw satisfies ``min_per_site``.
    """
    labels = _check_labels(labels)
    if num_sites < 1:
        raise ConfigError(f"`num_sites` must be >= 1, got {num_sites}")
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ConfigError(f"`alpha` must be > 0, got {alpha}")
    if min_per_site < 0:
        raise ConfigError(f"`min_per_site` must be >= 0, got {min_per_site}")
    rows = int(labels.max()) + 1 if num_classes is None else num_classes
    if rows <= labels.max():
        raise ConfigError(f"`num_classes` must be > the largest label {labels.max()}, got {rows}")
    if num_sites * min_per_site > len(labels):
        raise ConfigError(
            f"cannot give each of {num_sites} sites {min_per_site} of {len(labels)} examples: "
            "lower `num_sites` or `min_per_site`"
        )
    class_counts = np.bincount(labels, minlength=rows)
    rng = np.random.default_rng(seed)
    for attempt in range(1, MAX_REDRAWS + 1):
        proportions = rng.dirichlet(np.full(num_sites, float(alpha)), size=rows)
        if _counts_per_site(class_counts, proportions).min() >= min_per_site:
            if attempt > 1:
                log(INFO, "dirichlet_split: accepted draw %d (alpha=%g)", attempt, alpha)
            return proportions
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_REDRAWS} gave each of {num_sites} sites "
        f"at least {min_per_site} examples: raise `alpha` or lower `num_sites`"
    )


def partition_indices(
    labels: np.ndarray, proportions: np.ndarray, *, seed: int
) -> list[np.ndarray]:
    """Assign every index of ``labels`` to one site by per-class proportions.

    For each class its indices are shuffled (seeded) and cut at the cumulative proportions
    of that class's row; site ``k`` gets the ``k``-th slice.

    Parameters
    ----------
    labels : np.ndarray
        1-D non-negative integer labels.
    proportions : np.ndarray
        Shape (num_classes, num_sites), rows summing to 1 (from :func:`dirichlet_split`).
    seed : int
        Seed of the shuffles.

    Returns
    -------
    list[np.ndarray]
        One sorted int64 index array per site; together they cover every index once.
    """
    labels = _check_labels(labels)
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 2 or proportions.shape[1] < 1:
        raise ConfigError(f"`proportions` must be 2-D (classes, sites), got {proportions.shape}")
    if proportions.shape[0] <= labels.max():
        raise ConfigError(
            f"`proportions` has {proportions.shape[0]} rows but the largest label is "
            f"{labels.max()}"
        )
    if (proportions < 0).any() or not np.allclose(proportions.sum(axis=1), 1.0):
        raise ConfigError("`proportions` rows must be non-negative and sum to 1")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(proportions.shape[1])]
    for label, row in enumerate(proportions):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        bounds = np.cumsum(_site_counts(len(members), row))[:-1]
        for site, chunk in enumerate(np.split(members, bounds)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def split_sites(
    dataset: ImageDataset,
    *,
    num_sites: int,
    alpha: float,
    seed: int,
    min_per_site: int = 10,
) -> list[SitePart]:
    """Split a data set into ``num_sites`` non-IID sites (see the module docstring).

    Parameters
    ----------
    dataset : ImageDataset
        The data set to split.
    num_sites : int
        Number of sites (>= 1).
    alpha : float
        Dirichlet concentration (> 0).
    seed : int
        Seed; the same seed gives the same parts.
    min_per_site : int
        Minimum number of training examples per site.

    Returns
    -------
    list[SitePart]
        Sites ``"site-1"`` .. ``"site-N"``; train and val parts follow the same proportions.
    """
    proportions = dirichlet_split(
        dataset.train_labels,
        num_sites=num_sites,
        alpha=alpha,
        seed=seed,
        min_per_site=min_per_site,
        num_classes=len(dataset.classes),
    )
    train_parts = partition_indices(dataset.train_labels, proportions, seed=seed)
    val_parts = partition_indices(dataset.val_labels, proportions, seed=seed)
    sites = [
        SitePart(name=f"site-{k + 1}", train_idx=train, val_idx=val)
        for k, (train, val) in enumerate(zip(train_parts, val_parts))
    ]
    for site in sites:
        if len(site.val_idx) == 0:
            log(WARNING, "%s has no validation examples (alpha=%g)", site.name, alpha)
    return sites


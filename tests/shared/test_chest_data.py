"""Tests of shared.tasks.chest_data on the real PneumoniaMNIST file and tiny image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.backbones.architectures import IMAGENET_MEAN, IMAGENET_STD, ImageNetInput
from shared.errors import ConfigError, InputError
from shared.tasks.chest_data import (
    ImageDataset,
    dirichlet_split,
    load_image_dataset,
    partition_indices,
    split_sites,
)


@pytest.fixture(scope="module")
def real_dataset(pneumonia_npz: Path) -> ImageDataset:
    """The real data set, loaded once per module."""
    return load_image_dataset(pneumonia_npz)


def _subset_arrays(dataset: ImageDataset, n_train: int, n_val: int) -> dict[str, np.ndarray]:
    """Return the first examples of a data set in MedMNIST layout ((N,1) labels)."""
    return {
        "train_images": dataset.train_images[:n_train].copy(),
        "train_labels": dataset.train_labels[:n_train, None].astype(np.uint8),
        "val_images": dataset.val_images[:n_val].copy(),
        "val_labels": dataset.val_labels[:n_val, None].astype(np.uint8),
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as a compressed npz at ``path`` and return the path."""
    np.savez_compressed(path, **arrays)
    return path


def _positive_fractions(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Return the fraction of label 1 in each non-empty part."""
    return np.array([labels[idx].mean() for idx in parts if len(idx) > 0])


def _write_image(path: Path, value: int, size: tuple[int, int], fmt: str) -> None:
    """Write a constant grayscale image with a bright square, in format ``fmt``."""
    pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    pixels[1:4, 1:4] = 255
    Image.fromarray(pixels).save(path, format=fmt)


def _image_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    """Build class folders under ``root``: PNG images, every third one JPEG."""
    for class_name, class_sizes in sizes.items():
        class_dir = root / class_name
        class_dir.mkdir(parents=True)
        for i, size in enumerate(class_sizes):
            fmt, suffix = ("JPEG", "jpg") if i % 3 == 2 else ("PNG", "png")
            _write_image(class_dir / f"img{i:02d}.{suffix}", 10 * i, size, fmt)
    return root


# ---------------------------------------------------------------------------------------------
# Loading the real npz
# ---------------------------------------------------------------------------------------------


def test_real_npz_loads_with_official_sizes(real_dataset: ImageDataset) -> None:
    # Prepare / Execute: loaded by the fixture
    # Assert
    assert real_dataset.train_images.shape == (4708, 28, 28)
    assert real_dataset.val_images.shape == (524, 28, 28)
    assert real_dataset.train_images.dtype == np.uint8
    assert real_dataset.train_labels.shape == (4708,)
    assert real_dataset.val_labels.shape == (524,)
    assert real_dataset.train_labels.dtype == np.int64
    assert real_dataset.classes == ("normal", "pneumonia")
    assert np.bincount(real_dataset.train_labels).tolist() == [1214, 3494]
    assert len(real_dataset.fingerprint) == 64


def test_fingerprint_is_stable_and_changes_with_one_pixel(
    pneumonia_npz: Path, real_dataset: ImageDataset, tmp_path: Path
) -> None:
    # Prepare
    arrays = _subset_arrays(real_dataset, 300, 60)
    original = _write_npz(tmp_path / "a.npz", arrays)
    arrays["train_images"][17, 5, 9] ^= 1
    changed = _write_npz(tmp_path / "b.npz", arrays)

    # Execute
    again = load_image_dataset(pneumonia_npz)
    small = load_image_dataset(original)
    small_again = load_image_dataset(original)
    one_pixel = load_image_dataset(changed)

    # Assert
    assert again.fingerprint == real_dataset.fingerprint
    assert small.fingerprint == small_again.fingerprint
    assert small.fingerprint != real_dataset.fingerprint
    assert one_pixel.fingerprint != small.fingerprint


def test_rgb_npz_is_converted_to_grayscale(real_dataset: ImageDataset, tmp_path: Path) -> None:
    # Prepare
    arrays = _subset_arrays(real_dataset, 40, 10)
    gray_train = arrays["train_images"]
    arrays["train_images"] = np.repeat(gray_train[..., None], 3, axis=3)
    arrays["val_images"] = arrays["val_images"][..., None]
    path = _write_npz(tmp_path / "rgb.npz", arrays)

    # Execute
    dataset = load_image_dataset(path)

    # Assert
    np.testing.assert_array_equal(dataset.train_images, gray_train)
    assert dataset.val_images.shape == (10, 28, 28)


# ---------------------------------------------------------------------------------------------
# Errors on bad input
# ---------------------------------------------------------------------------------------------


def test_missing_path_raises_input_error(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "nowhere.npz"

    # Execute / Assert
    with pytest.raises(InputError, match="nowhere.npz does not exist"):
        load_image_dataset(missing)


def test_file_that_is_not_npz_raises_input_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")

    # Execute / Assert
    with pytest.raises(InputError, match="data.csv"):
        load_image_dataset(path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.5, 0.95])
def test_truncated_npz_raises_input_error(
    pneumonia_npz: Path, tmp_path: Path, keep_fraction: float
) -> None:
    # Prepare
    content = pneumonia_npz.read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(content[: int(len(content) * keep_fraction)])

    # Execute / Assert
    with pytest.raises(InputError, match="truncated.npz"):
        load_image_dataset(path)


@pytest.mark.parametrize("position", [100, 1000, 2_000_000])
def test_npz_with_corrupted_bytes_raises_input_error(
    pneumonia_npz: Path, tmp_path: Path, position: int
) -> None:
    # Prepare
    content = bytearray(pneumonia_npz.read_bytes())
    content[position : position + 16] = b"\xff" * 16
    path = tmp_path / "corrupt.npz"
    path.write_bytes(bytes(content))

    # Execute / Assert
    with pytest.raises(InputError, match="corrupt.npz is not a readable .npz file"):
        load_image_dataset(path)


def test_npz_missing_val_labels_names_the_key(
    real_dataset: ImageDataset, tmp_path: Path
) -> None:
    # Prepare
    arrays = _subset_arrays(real_dataset, 20, 5)
    del arrays["val_labels"]
    path = _write_npz(tmp_path / "partial.npz", arrays)

    # Execute / Assert
    with pytest.raises(InputError, match="partial.npz.*val_labels"):
        load_image_dataset(path)


@pytest.mark.parametrize(
    ("key", "bad_value", "message"),
    [
        ("train_images", np.zeros((20, 28, 28), dtype=np.float32), "train_images must be uint8"),
        ("val_images", np.zeros((5, 28 * 28), dtype=np.uint8), "val_images must have shape"),
        ("train_images", np.zeros((20, 28, 28, 2), dtype=np.uint8), "train_images must have"),
        ("train_labels", np.zeros((20, 1), dtype=np.float64), "train_labels must be integers"),
        ("val_labels", np.zeros((4, 1), dtype=np.int64), "val_labels has 4 labels for 5 images"),
        ("train_labels", np.zeros((20, 2), dtype=np.int64), "train_labels must have shape"),
    ],
)
def test_malformed_npz_raises_input_error(
    real_dataset: ImageDataset, tmp_path: Path, key: str, bad_value: np.ndarray, message: str
) -> None:
    # Prepare
    arrays = _subset_arrays(real_dataset, 20, 5)
    arrays[key] = bad_value
    path = _write_npz(tmp_path / "bad.npz", arrays)

    # Execute / Assert
    with pytest.raises(InputError, match=message):
        load_image_dataset(path)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def test_image_folder_loads_sorted_classes_and_stratified_split(tmp_path: Path) -> None:
    # Prepare
    root = _image_folder(
        tmp_path / "xrays", {"pneumonia": [(20, 20)] * 10, "normal": [(20, 20)] * 5}
    )
    (root / "normal" / ".DS_Store").write_bytes(b"\x00junk")
    (root / ".cache").mkdir()

    # Execute
    dataset = load_image_dataset(root, val_fraction=0.2, seed=3)
    again = load_image_dataset(root, val_fraction=0.2, seed=3)

    # Assert
    assert dataset.classes == ("normal", "pneumonia")
    assert dataset.train_images.shape == (12, 20, 20)
    assert dataset.val_images.shape == (3, 20, 20)
    assert np.bincount(dataset.train_labels).tolist() == [4, 8]
    assert np.bincount(dataset.val_labels).tolist() == [1, 2]
    assert again.fingerprint == dataset.fingerprint


def test_image_folder_with_mixed_sizes_is_resized_to_hint(tmp_path: Path) -> None:
    # Prepare
    root = _image_folder(tmp_path / "mixed", {"a": [(20, 20), (32, 24)] * 2, "b": [(28, 28)] * 4})

    # Execute
    dataset = load_image_dataset(root, val_fraction=0.25, image_size_hint=16)

    # Assert
    assert dataset.train_images.shape == (6, 16, 16)
    assert dataset.val_images.shape == (2, 16, 16)


def test_image_folder_with_text_file_names_that_file(tmp_path: Path) -> None:
    # Prepare
    root = _image_folder(tmp_path / "xrays", {"normal": [(8, 8)] * 3, "pneumonia": [(8, 8)] * 3})
    (root / "pneumonia" / "notes.png").write_text("not an image\n")

    # Execute / Assert
    with pytest.raises(InputError, match=r"notes\.png is not a readable image"):
        load_image_dataset(root)


@pytest.mark.parametrize("layout", ["one_class", "empty_class"])
def test_image_folder_needs_two_non_empty_classes(tmp_path: Path, layout: str) -> None:
    # Prepare
    root = _image_folder(tmp_path / "xrays", {"normal": [(8, 8)] * 4})
    if layout == "empty_class":
        (root / "pneumonia").mkdir()
        (root / "pneumonia" / ".hidden.png").write_bytes(b"")

    # Execute / Assert
    with pytest.raises(InputError, match="xrays"):
        load_image_dataset(root)


def test_a_folder_inside_a_class_folder_is_refused_naming_it(tmp_path: Path) -> None:
    # Prepare: the data path one level too high (train/NORMAL), or sub-folders per source
    root = _image_folder(tmp_path / "xrays", {"normal": [(8, 8)] * 3, "pneumonia": [(8, 8)] * 3})
    nested = root / "pneumonia" / "viral"
    nested.mkdir()
    _write_image(nested / "v0.png", 50, (8, 8), "PNG")
    (root / "normal" / ".thumbnails").mkdir()  # hidden folders stay ignored, like hidden files

    # Execute / Assert: on main its images were skipped without a word
    with pytest.raises(InputError, match=r"class folder .*xrays/pneumonia holds folder\(s\) viral: a class folder holds images only"):
        load_image_dataset(root)


def test_an_image_too_small_to_be_an_xray_is_refused_naming_it(tmp_path: Path) -> None:
    # Prepare: one 1x1 image among 28x28 ones (on main: resized without naming it)
    root = _image_folder(tmp_path / "xrays", {"normal": [(28, 28)] * 3, "pneumonia": [(28, 28)] * 3})
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(root / "normal" / "dot.png")

    # Execute / Assert
    with pytest.raises(InputError, match=r"dot\.png is 1x1 pixels: too small to be an X-ray \(at least 8x8\)"):
        load_image_dataset(root)


def test_an_npz_of_tiny_images_is_refused(real_dataset: ImageDataset, tmp_path: Path) -> None:
    # Prepare
    arrays = _subset_arrays(real_dataset, 20, 5)
    arrays["train_images"] = arrays["train_images"][:, :4, :4].copy()
    arrays["val_images"] = arrays["val_images"][:, :4, :4].copy()
    path = _write_npz(tmp_path / "tiny.npz", arrays)

    # Execute / Assert
    with pytest.raises(InputError, match=r"train_images are 4x4 pixels: too small"):
        load_image_dataset(path)


def test_resizing_mixed_sizes_names_the_smallest_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    root = _image_folder(tmp_path / "mixed", {"a": [(28, 28)] * 3, "b": [(28, 28)] * 2 + [(9, 12)]})

    # Execute
    load_image_dataset(root, val_fraction=0.34, image_size_hint=28)

    # Assert
    assert "1 enlarged, the smallest" in caplog.text and "img02.jpg (9x12)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Non-IID split into sites
# ---------------------------------------------------------------------------------------------


def test_split_sites_is_deterministic_per_seed(real_dataset: ImageDataset) -> None:
    # Prepare
    kwargs = {"num_sites": 4, "alpha": 0.5}

    # Execute
    first = split_sites(real_dataset, seed=7, **kwargs)
    second = split_sites(real_dataset, seed=7, **kwargs)
    other = split_sites(real_dataset, seed=8, **kwargs)

    # Assert
    assert [site.name for site in first] == ["site-1", "site-2", "site-3", "site-4"]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.train_idx, b.train_idx)
        np.testing.assert_array_equal(a.val_idx, b.val_idx)
    assert any(
        not np.array_equal(a.train_idx, c.train_idx) for a, c in zip(first, other)
    )


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_partition_covers_every_index_once(real_dataset: ImageDataset, alpha: float) -> None:
    # Prepare
    num_sites = 5

    # Execute
    sites = split_sites(real_dataset, num_sites=num_sites, alpha=alpha, seed=1)

    # Assert
    for split, total in (("train_idx", 4708), ("val_idx", 524)):
        parts = [getattr(site, split) for site in sites]
        joined = np.concatenate(parts)
        assert len(joined) == total
        np.testing.assert_array_equal(np.sort(joined), np.arange(total))
        assert all(np.all(np.diff(part) > 0) for part in parts)
    assert min(len(site.train_idx) for site in sites) >= 10


def test_small_alpha_skews_labels_far_more_than_large_alpha(
    real_dataset: ImageDataset,
) -> None:
    # Prepare
    labels = real_dataset.train_labels

    # Execute
    skewed = split_sites(real_dataset, num_sites=5, alpha=0.1, seed=11)
    even = split_sites(real_dataset, num_sites=5, alpha=100.0, seed=11)

    # Assert
    skewed_frac = _positive_fractions(labels, [site.train_idx for site in skewed])
    even_frac = _positive_fractions(labels, [site.train_idx for site in even])
    assert np.ptp(skewed_frac) > 0.3
    assert np.std(skewed_frac) > 5 * np.std(even_frac)
    val_frac = _positive_fractions(
        real_dataset.val_labels, [site.val_idx for site in skewed if len(site.val_idx) >= 30]
    )
    train_frac = _positive_fractions(
        labels, [site.train_idx for site in skewed if len(site.val_idx) >= 30]
    )
    np.testing.assert_allclose(val_frac, train_frac, atol=0.1)


def test_dirichlet_split_rows_are_proportions_and_respect_minimum() -> None:
    # Prepare
    labels = np.array([0] * 300 + [1] * 100)

    # Execute
    proportions = dirichlet_split(labels, num_sites=6, alpha=0.3, seed=5, min_per_site=15)
    parts = partition_indices(labels, proportions, seed=5)

    # Assert
    assert proportions.shape == (2, 6)
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0)
    assert min(len(part) for part in parts) >= 15


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sites": 3, "alpha": 0.0}, r"`alpha` must be > 0, got 0.0"),
        ({"num_sites": 3, "alpha": -1.0}, r"`alpha` must be > 0"),
        ({"num_sites": 0, "alpha": 1.0}, r"`num_sites` must be >= 1, got 0"),
        ({"num_sites": 50, "alpha": 1.0}, r"cannot give each of 50 sites"),
    ],
)
def test_invalid_split_arguments_raise_config_error(
    kwargs: dict[str, float], message: str
) -> None:
    # Prepare
    labels = np.array([0, 1] * 100)

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        dirichlet_split(labels, seed=0, **kwargs)  # type: ignore[arg-type]


def test_dirichlet_split_gives_up_after_bounded_redraws() -> None:
    # Prepare: 2 sites, 1 class, 20 examples, tiny alpha: almost never 10 each
    labels = np.zeros(20, dtype=np.int64)

    # Execute / Assert
    with pytest.raises(ConfigError, match="no Dirichlet"):
        dirichlet_split(labels, num_sites=2, alpha=1e-3, seed=0, min_per_site=10)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_input_module_maps_white_to_normalised_one() -> None:
    # Prepare
    white = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)

    # Execute
    out = ImageNetInput(64)(white)

    # Assert
    assert out.shape == (2, 3, 64, 64)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, expected.view(1, 3, 1, 1).expand(2, 3, 64, 64), atol=1e-5, rtol=0
    )


def test_input_module_is_batch_independent_and_gray_in_all_channels(real_dataset: ImageDataset) -> None:
    # Prepare
    images = torch.from_numpy(real_dataset.train_images[:600].astype(np.float32))
    module = ImageNetInput(16)

    # Execute
    whole = module(images)
    tail = module(images[500:])

    # Assert
    assert whole.shape == (600, 3, 16, 16)
    torch.testing.assert_close(whole[500:], tail)
    torch.testing.assert_close(whole[:, 0], whole[:, 1] * 0.224 / 0.229 + (0.456 - 0.485) / 0.229)

"""The SecAgg+ mask generator: full-seed ChaCha20, unbiased, pinned, installed on both sides."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation import secaggplus_utils
from scipy.stats import chisquare

from shared.masks import FLOWER_TARGETS, expand_masks, install_secure_masks, masks_installed, uniform_integers


def _flowers_own_generator() -> types.FunctionType:
    """Flower's ``pseudo_rand_gen`` from a fresh copy of its module (importing ``client.app``
    anywhere in the test session installs CareFL's masks into the loaded one)."""
    spec = importlib.util.find_spec(secaggplus_utils.__name__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh.pseudo_rand_gen


FLOWER_GENERATOR = _flowers_own_generator()


def _fold_twin(seed: bytes) -> bytes:
    """Another seed that Flower's 32-bit XOR fold maps to the same value."""
    twin = bytearray(seed)
    for i in range(4):  # flip the same bits in words 0 and 1: their XOR is unchanged
        twin[i] ^= 0x5A
        twin[4 + i] ^= 0x5A
    return bytes(twin)


def test_known_answer_is_pinned() -> None:
    # Execute
    masks = expand_masks(bytes(range(32)), 2**16, [(2, 3), ()])

    # Assert: computed once and pinned, so server and clients can never drift apart silently
    np.testing.assert_array_equal(masks[0], np.array([[34731, 20871, 40439], [1024, 41516, 20554]]))
    assert int(masks[1]) == 32083
    assert masks[0].dtype == np.int64 and masks[1].shape == ()


def test_masks_are_the_chacha20_keystream_of_the_hashed_full_seed() -> None:
    # Prepare: the construction, written out independently of shared.masks
    seed = bytes(range(32, 64))
    key = hashlib.sha256(b"carefl/secagg-mask/v2" + seed).digest()
    keystream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * 7))
    expected = [int.from_bytes(keystream[4 * i : 4 * i + 4], "little") % 2**32 for i in range(7)]

    # Execute
    masks = expand_masks(seed, 2**32, [(7,)])

    # Assert
    assert masks[0].tolist() == expected


def test_seeds_that_flower_folds_together_give_unrelated_masks() -> None:
    # Prepare
    seed = bytes(range(100, 132))
    twin = _fold_twin(seed)
    shapes = [(10_000,)]

    # Execute
    flower_a, flower_b = FLOWER_GENERATOR(seed, 2**20, shapes), FLOWER_GENERATOR(twin, 2**20, shapes)
    ours_a, ours_b = expand_masks(seed, 2**20, shapes), expand_masks(twin, 2**20, shapes)

    # Assert: Flower's generator collides on the two seeds; ours does not
    assert seed != twin
    np.testing.assert_array_equal(flower_a[0], flower_b[0])
    assert np.mean(ours_a[0] == ours_b[0]) < 1e-3


@pytest.mark.parametrize("num_range", [2**20, 2**32, 1000, 3])
def test_values_are_uniform_over_the_whole_range(num_range: int) -> None:
    # Prepare
    values = uniform_integers(b"\x07" * 32, num_range, 200_000)
    buckets = max(b for b in range(1, 65) if num_range % b == 0)  # equal-width buckets

    # Execute: chi-square over equal-width buckets of the range
    counts = np.bincount((values * buckets) // num_range, minlength=buckets)

    # Assert
    assert values.min() >= 0 and values.max() < num_range
    assert chisquare(counts).pvalue > 1e-3
    if num_range == 3:
        assert set(np.unique(values)) == {0, 1, 2}  # the top value occurs (Flower's never does)


def test_installation_replaces_flower_on_server_and_client_identically() -> None:
    # Execute
    install_secure_masks()
    install_secure_masks()  # idempotent

    # Assert
    assert masks_installed()
    server, client = (sys.modules[name].pseudo_rand_gen for name in FLOWER_TARGETS)
    seed = b"\x42" * 32
    np.testing.assert_array_equal(server(seed, 2**16, [(5,)])[0], client(seed, 2**16, [(5,)])[0])


def test_installation_fails_loudly_when_flower_changed() -> None:
    # Prepare: a module where the generator is not Flower's (another Flower version)
    fake = types.ModuleType("carefl_fake_secagg")
    fake.pseudo_rand_gen = lambda seed, num_range, dims: []  # type: ignore[attr-defined]
    sys.modules[fake.__name__] = fake
    missing = types.ModuleType("carefl_fake_missing")
    sys.modules[missing.__name__] = missing
    try:
        # Execute / Assert
        with pytest.raises(RuntimeError, match="weak"):
            install_secure_masks(targets=[fake.__name__])
        with pytest.raises(RuntimeError, match="weak"):
            install_secure_masks(targets=[missing.__name__])
    finally:
        del sys.modules[fake.__name__], sys.modules[missing.__name__]

"""Cryptographic mask expansion for Flower's SecAgg+ (replaces ``pseudo_rand_gen``).

Flower 1.41 expands each SecAgg+ mask seed (32 bytes) by XOR-folding it to 32 bits and feeding
numpy's MT19937: a curious server can search all 2^32 seeds, and its ``randint(0, range - 1)``
never produces ``range - 1``. :func:`expand_masks` has the same signature and expands the
*full* seed with ChaCha20 (from ``cryptography``): the key is ``SHA-256(domain || seed)``, the
nonce and counter start at zero, and values are uniform over ``[0, range)`` without bias. For a
power-of-two range up to 2^32 (SecAgg+'s modulus) each value is one little-endian 32-bit word
of the keystream masked to the range; larger ranges read 64-bit words, and a range that is not
a power of two uses rejection sampling on 64-bit words.

:func:`install_secure_masks` replaces Flower's generator where the SecAgg+ server workflow and
client mod imported it. The server and every client must call it (CareFL's apps do at start-up)
so both sides expand seeds identically; it also installs :mod:`shared.shamir`'s secret sharing
(the same scheme over a prime field, 100x faster). If Flower's internals are not where this module
expects (another Flower version), it raises instead of letting weak masks run.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from shared.shamir import install_secure_shares

DOMAIN = b"carefl/secagg-mask/v2"
FLOWER_UTILS = "flwr.common.secure_aggregation.secaggplus_utils"
FLOWER_TARGETS: tuple[str, ...] = (
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
)
_ATTRIBUTE = "pseudo_rand_gen"
_NONCE = bytes(16)  # one key per seed: a fixed nonce (ChaCha20's counter starts at 0)


def _keystream_words(seed: bytes, count: int, offset: int = 0, dtype: str = "<u8") -> np.ndarray:
    """Return ``count`` little-endian words of the seed's keystream, from word ``offset``."""
    width = np.dtype(dtype).itemsize
    key = hashlib.sha256(DOMAIN + seed).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    if offset:
        encryptor.update(bytes(width * offset))
    return np.frombuffer(encryptor.update(bytes(width * count)), dtype=dtype)


def uniform_integers(seed: bytes, num_range: int, count: int) -> np.ndarray:
    """Return ``count`` integers uniform over ``[0, num_range)`` expanded from ``seed``.

    Parameters
    ----------
    seed : bytes
        The full mask seed (all its bits are used).
    num_range : int
        Exclusive upper bound, in ``[1, 2**62]``.
    count : int
        How many values.
    """
    if not 1 <= num_range <= 2**62:
        raise ValueError(f"`num_range` must be in [1, 2**62], got {num_range}")
    if num_range & (num_range - 1) == 0:
        if num_range <= 2**32:
            return (_keystream_words(seed, count, dtype="<u4") & np.uint32(num_range - 1)).astype(np.int64)
        return (_keystream_words(seed, count) & np.uint64(num_range - 1)).astype(np.int64)
    limit = (2**64 // num_range) * num_range  # largest multiple of the range: no modulo bias
    values: list[np.ndarray] = []
    have, offset = 0, 0
    while have < count:
        batch = max(16, math.ceil((count - have) * 1.1))
        words = _keystream_words(seed, batch, offset)
        offset += batch
        accepted = words[words < np.uint64(limit)] % np.uint64(num_range)
        values.append(accepted[: count - have].astype(np.int64))
        have += len(values[-1])
    return np.concatenate(values) if values else np.zeros(0, dtype=np.int64)


def expand_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Expand ``seed`` into one int64 array per shape, uniform over ``[0, num_range)``.

    Drop-in replacement for Flower's ``pseudo_rand_gen`` (same arguments, same output types).
    """
    sizes = [math.prod(shape) for shape in dimensions_list]
    flat = uniform_integers(seed, num_range, sum(sizes))
    output: list[np.ndarray] = []
    start = 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        output.append(flat[start : start + size].reshape(shape))
        start += size
    return output


def install_secure_masks(targets: Sequence[str] = FLOWER_TARGETS, utils: str = FLOWER_UTILS) -> None:
    """Make Flower's SecAgg+ expand masks with :func:`expand_masks` (idempotent).

    Raises
    ------
    RuntimeError
        If a target module or its ``pseudo_rand_gen`` is missing, or holds something other than
        Flower's original generator: CareFL will not run secure aggregation with weak masks.
    """
    utils_module = importlib.import_module(utils)
    original = getattr(utils_module, _ATTRIBUTE, None)
    if original is None:
        raise RuntimeError(f"{utils}.{_ATTRIBUTE} not found: Flower's SecAgg+ changed; refusing weak masks.")
    for name in targets:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise RuntimeError(f"cannot import {name} to secure its SecAgg+ masks ({err}).") from err
        current = getattr(module, _ATTRIBUTE, None)
        if current is expand_masks:
            continue
        if current is None or current is not original:
            raise RuntimeError(
                f"{name}.{_ATTRIBUTE} is not Flower's generator this module replaces (found "
                f"{current!r}); the installed Flower is not the one CareFL was built for. "
                "Refusing to run SecAgg+ with masks that may be weak."
            )
        setattr(module, _ATTRIBUTE, expand_masks)
    setattr(utils_module, _ATTRIBUTE, expand_masks)
    install_secure_shares()


def masks_installed(targets: Sequence[str] = FLOWER_TARGETS) -> bool:
    """Return whether every target uses :func:`expand_masks`."""
    return all(getattr(importlib.import_module(n), _ATTRIBUTE, None) is expand_masks for n in targets)

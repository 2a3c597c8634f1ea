"""CareFL's Shamir secret sharing (shared/shamir.py) against exact rational interpolation and Flower's."""

from __future__ import annotations

import os
import random
import sys
import types
from fractions import Fraction

import pytest
from flwr.common.secure_aggregation.crypto import shamir as flower_shamir

from shared.masks import install_secure_masks
from shared.shamir import (
    CHUNK,
    HEADER,
    PRIME,
    SHARE_TARGETS,
    VALUE_BYTES,
    combine_shares,
    create_shares,
    install_secure_shares,
    lagrange_at_zero,
    shares_installed,
)

PEM_KEY_BYTES = 306  # Flower's SecAgg+ shares its P-384 private key as a PKCS8 PEM


def points(share: bytes) -> tuple[int, list[int]]:
    """The share's index and its value for each chunk."""
    x = int.from_bytes(share[:4], "little")
    body = share[HEADER:]
    return x, [int.from_bytes(body[i : i + VALUE_BYTES], "big") for i in range(0, len(body), VALUE_BYTES)]


def rational_value_at_zero(xs: list[int], ys: list[int]) -> int:
    """f(0) of the interpolating polynomial, with exact fractions over Q, then reduced mod PRIME."""
    total = Fraction(0)
    for j, (xj, yj) in enumerate(zip(xs, ys, strict=True)):
        term = Fraction(yj)
        for m, xm in enumerate(xs):
            if m != j:
                term *= Fraction(xm, xm - xj)
        total += term
    return total.numerator * pow(total.denominator, -1, PRIME) % PRIME


@pytest.mark.parametrize("length", [1, 32, CHUNK, CHUNK + 1, PEM_KEY_BYTES])
def test_any_threshold_shares_rebuild_the_secret(length: int) -> None:
    # Prepare: 10 shares, threshold 7 (SecAgg+'s two thirds)
    secret = os.urandom(length)
    shares = create_shares(secret, 7, 10)
    rng = random.Random(length)
    # Execute / Assert: any 7, 8 or all 10 of them, in any order
    for size in (7, 8, 10):
        subset = rng.sample(shares, size)
        assert combine_shares(subset) == secret
    assert len(shares) == 10 and all(len(s) == HEADER + -(-length // CHUNK) * VALUE_BYTES for s in shares)


def test_shares_are_points_of_a_polynomial_whose_constant_term_is_the_secret() -> None:
    # Prepare: a 100-byte secret (two chunks), threshold 4 of 6
    secret = os.urandom(100)
    shares = create_shares(secret, 4, 6)
    parsed = [points(s) for s in shares]
    xs = [x for x, _ in parsed]
    chunks = [int.from_bytes(secret[:CHUNK], "big"), int.from_bytes(secret[CHUNK:], "big")]
    # Execute: interpolate over the rationals (independent of the module's modular arithmetic)
    for c, chunk in enumerate(chunks):
        first, last = [y[c] for _, y in parsed[:4]], [y[c] for _, y in parsed[2:]]
        # Assert: f(0) is the chunk from either 4 shares; all 6 lie on one cubic
        assert rational_value_at_zero(xs[:4], first) == chunk
        assert rational_value_at_zero(xs[2:], last) == chunk
    assert xs == [1, 2, 3, 4, 5, 6]
    assert lagrange_at_zero([1, 2]) == [2, PRIME - 1]  # l_1(0) = 2 / 1, l_2(0) = 1 / -1


def test_fewer_shares_than_the_threshold_fit_every_secret() -> None:
    # Prepare: 3 of the 4 shares a threshold-4 secret needs
    secret = os.urandom(32)
    shares = create_shares(secret, 4, 6)
    known = shares[:3]
    wanted = os.urandom(32)
    # Execute: forge the fourth share so that the polynomial goes through (0, wanted)
    xs = [points(s)[0] for s in known] + [6]
    weights = lagrange_at_zero(xs)
    partial = sum(w * points(s)[1][0] for w, s in zip(weights, known)) % PRIME
    forged_y = (int.from_bytes(wanted, "big") - partial) * pow(weights[3], -1, PRIME) % PRIME
    forged = (6).to_bytes(4, "little") + (32).to_bytes(4, "little") + forged_y.to_bytes(VALUE_BYTES, "big")
    # Assert: 3 shares are consistent with any other secret (they say nothing about it); the
    # real 4th share gives the real one; 3 shares alone do not rebuild it
    assert combine_shares([*known, forged]) == wanted
    assert combine_shares([*known, shares[5]]) == secret
    try:
        assert combine_shares(known) != secret
    except ValueError:
        pass  # refused: not a 32-byte value


def test_same_thresholds_as_flowers_scheme_and_its_shares_are_refused() -> None:
    # Prepare: the same secret split by Flower's scheme (pycryptodome, GF(2^128)) and ours
    secret = os.urandom(PEM_KEY_BYTES)
    theirs = flower_shamir.create_shares(secret, 3, 5)
    ours = create_shares(secret, 3, 5)
    # Execute / Assert: both rebuild the secret from the same 3 share indices
    assert flower_shamir.combine_shares([theirs[0], theirs[2], theirs[4]]) == secret
    assert combine_shares([ours[0], ours[2], ours[4]]) == secret
    # Flower's share format (4 + 16k bytes) is refused, not misread
    with pytest.raises(ValueError, match="Failed to combine shares"):
        combine_shares(theirs[:3])
    with pytest.raises(ValueError, match="Failed to combine shares"):
        combine_shares([ours[0], ours[0], ours[1]])
    with pytest.raises(ValueError):
        create_shares(secret, 6, 5)


def test_installation_reaches_flowers_client_mod_and_server_workflow() -> None:
    # Execute
    install_secure_masks()  # installs the shares too
    install_secure_shares()  # idempotent
    # Assert
    assert shares_installed()
    client, server = (sys.modules[name] for name, _ in SHARE_TARGETS)
    assert client.create_shares is create_shares
    assert server.combine_shares is combine_shares


def test_installation_fails_loudly_when_flower_changed() -> None:
    # Prepare: a module whose create_shares is not Flower's
    fake = types.ModuleType("carefl_fake_secaggplus_mod")
    fake.create_shares = lambda *args: []  # type: ignore[attr-defined]
    sys.modules[fake.__name__] = fake
    try:
        # Execute / Assert
        with pytest.raises(RuntimeError, match="not Flower's function"):
            install_secure_shares(targets=[(fake.__name__, "create_shares")])
        with pytest.raises(RuntimeError, match="cannot import"):
            install_secure_shares(targets=[("carefl_no_such_module", "create_shares")])
    finally:
        del sys.modules[fake.__name__]

"""Shamir secret sharing for Flower's SecAgg+ over a prime field (replaces Flower's, 100x faster).

Each SecAgg+ site splits two secrets per round into one share per site: its private mask seed
(32 bytes) and its first private key (a 306-byte PEM); the server rebuilds one secret per site
at unmask. Flower 1.41 uses pycryptodome's ``Shamir`` over GF(2^128), in pure Python, one
16-byte chunk at a time: at 100 sites (threshold 67) splitting the key takes 3.7 s and
rebuilding a seed 0.7 s, so a round spends minutes in secret sharing and the share-keys stage
outlasts the default 120 s stage timeout.

:func:`create_shares` and :func:`combine_shares` have Flower's signatures and do the same
computation in another field: the secret is cut into 64-byte chunks, each chunk ``s`` (an
integer below 2^512) is the constant term of a polynomial ``f(x) = s + a_1 x + ... +
a_{t-1} x^{t-1}`` over GF(p), ``p = 2^521 - 1`` (a Mersenne prime), whose coefficients are
drawn uniformly from GF(p) with :mod:`secrets` (the operating system's CSPRNG); site ``i``
(``i = 1..n``) gets ``f(i)`` of every chunk. Python's integers evaluate the polynomials
(Horner) and rebuild ``f(0)`` by Lagrange interpolation at 0.

Why it is as sound as Flower's: Shamir's scheme is perfectly secret in *any* field with more
elements than shares: for ``t - 1`` shares and every candidate secret there is exactly one
polynomial of degree ``t - 1`` through them, so fewer than ``t`` shares say nothing about the
secret, whatever the field. The threshold ``t`` and the number of shares are Flower's, the
randomness is the OS CSPRNG (pycryptodome's ``get_random_bytes`` is too), and the shares are
still encrypted and authenticated per recipient by Flower (Fernet) as before.

A share is ``index (4 bytes, little-endian) || secret length (4 bytes, little-endian) || f(index)
of each chunk (66 bytes each, big-endian)``. :func:`combine_shares` refuses shares that
disagree on the length, repeat an index, have the wrong size (Flower's own 4 + 16k-byte
shares among them) or rebuild a value that is not a chunk, with ``ValueError`` as Flower's.

:func:`install_secure_shares` puts both functions where Flower's SecAgg+ client mod and server
workflow imported theirs; server and sites must both do it (``shared.masks.install_secure_masks``
does), and it refuses to patch a Flower whose functions are not the ones it replaces.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1  # Mersenne prime M521: every 64-byte chunk is a field element
CHUNK = 64  # secret bytes per field element
VALUE_BYTES = 66  # ceil(521 / 8): one share of one chunk
HEADER = 8  # index and secret length, 4 bytes each
FLOWER_SHAMIR = "flwr.common.secure_aggregation.crypto.shamir"
SHARE_TARGETS: tuple[tuple[str, str], ...] = (
    ("flwr.client.mod.secure_aggregation.secaggplus_mod", "create_shares"),
    ("flwr.server.workflow.secure_aggregation.secaggplus_workflow", "combine_shares"),
)


def _chunks(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i : i + CHUNK], "big") for i in range(0, len(secret), CHUNK)]


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Split ``secret`` into ``num`` shares, any ``threshold`` of which rebuild it.

    Parameters
    ----------
    secret : bytes
        The secret (any length below 2^32 bytes).
    threshold : int
        Shares needed to rebuild it (``1 <= threshold <= num``).
    num : int
        Shares to make (below 2^32).

    Returns
    -------
    list[bytes]
        Share ``i`` (0-based) holds the polynomials' values at ``x = i + 1``.
    """
    if not 1 <= threshold <= num < 1 << 32:
        raise ValueError(f"need 1 <= threshold <= num < 2^32, got threshold {threshold}, num {num}")
    if len(secret) >= 1 << 32:
        raise ValueError(f"secret of {len(secret)} bytes is too long to share")
    polynomials = [[s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for s in _chunks(secret)]
    length = len(secret).to_bytes(4, "little")
    shares = []
    for x in range(1, num + 1):
        values = []
        for coefficients in polynomials:
            y = 0
            for a in reversed(coefficients):  # Horner: ((a_{t-1} x + a_{t-2}) x + ...) x + s
                y = (y * x + a) % PRIME
            values.append(y.to_bytes(VALUE_BYTES, "big"))
        shares.append(b"".join([x.to_bytes(4, "little"), length, *values]))
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Return the Lagrange coefficients ``l_j(0) = prod_{m != j} x_m / (x_m - x_j)`` mod ``PRIME``."""
    coefficients = []
    for j, xj in enumerate(xs):
        numerator, denominator = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * xm % PRIME
                denominator = denominator * (xm - xj) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


def combine_shares(share_list: list[bytes]) -> bytes:
    """Rebuild the secret from shares made by :func:`create_shares` (at least its threshold).

    Raises
    ------
    ValueError
        If the shares are malformed or inconsistent (see the module docstring). Fewer shares
        than the threshold rebuild a wrong value: usually refused here, never the secret.
    """
    if not share_list:
        raise ValueError("Failed to combine shares: no shares")
    length = int.from_bytes(share_list[0][4:HEADER], "little")
    count = -(-length // CHUNK)
    xs = []
    for share in share_list:
        if len(share) != HEADER + count * VALUE_BYTES or int.from_bytes(share[4:HEADER], "little") != length:
            raise ValueError("Failed to combine shares: shares of different secrets or formats")
        xs.append(int.from_bytes(share[:4], "little"))
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("Failed to combine shares: repeated or zero share index")
    weights = lagrange_at_zero(xs)
    secret = bytearray()
    for c in range(count):
        start = HEADER + c * VALUE_BYTES
        value = (
            sum(
                w * int.from_bytes(s[start : start + VALUE_BYTES], "big") for w, s in zip(weights, share_list)
            )
            % PRIME
        )
        size = min(CHUNK, length - c * CHUNK)
        if value >= 1 << (8 * size):
            raise ValueError("Failed to combine shares: the shares do not rebuild a secret")
        secret += value.to_bytes(size, "big")
    return bytes(secret)


def install_secure_shares(
    targets: Sequence[tuple[str, str]] = SHARE_TARGETS, flower: str = FLOWER_SHAMIR
) -> None:
    """Make Flower's SecAgg+ share secrets with this module's functions (idempotent).

    Raises
    ------
    RuntimeError
        If a target module is missing or holds something other than Flower's function: the
        installed Flower is not the one CareFL was built for.
    """
    replacements = {"create_shares": create_shares, "combine_shares": combine_shares}
    originals = importlib.import_module(flower)
    for name, attribute in targets:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise RuntimeError(f"cannot import {name} to install CareFL's secret sharing ({err}).") from err
        current = getattr(module, attribute, None)
        if current is replacements[attribute]:
            continue
        if current is None or current is not getattr(originals, attribute, None):
            raise RuntimeError(
                f"{name}.{attribute} is not Flower's function this module replaces (found {current!r}); "
                "the installed Flower is not the one CareFL was built for."
            )
        setattr(module, attribute, replacements[attribute])


def shares_installed(targets: Sequence[tuple[str, str]] = SHARE_TARGETS) -> bool:
    """Return whether every target uses this module's functions."""
    mine = {"create_shares": create_shares, "combine_shares": combine_shares}
    return all(getattr(importlib.import_module(n), a, None) is mine[a] for n, a in targets)

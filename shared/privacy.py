"""Privacy arithmetic: epsilon of a history of DP-SGD charges, and noise calibration.

A *charge* is one stretch of DP-SGD with a fixed noise multiplier and sample rate:
``(noise_multiplier, sample_rate, steps)``, the triple Opacus' accountants keep in their
``history``. Epsilon is always recomputed from the full history (of a run, or of a site's
lifetime), never accumulated by addition, so composition is exact for the accountant used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import ConfigError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


@dataclass(frozen=True)
class Charge:
    """One round of DP-SGD at one site.

    Attributes
    ----------
    noise_multiplier : float
        Gaussian noise standard deviation divided by the clipping norm.
    sample_rate : float
        Poisson sampling probability of each record per step.
    steps : int
        Optimizer steps taken (planned) in the round.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"`noise_multiplier` must be > 0, got {self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {self.sample_rate!r}")
        if self.steps < 0:
            raise ValueError(f"`steps` must be >= 0, got {self.steps!r}")


def _accountant(name: str):  # type: ignore[no-untyped-def]
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"`accountant` must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")


def epsilon(charges: Iterable[Charge], *, delta: float, accountant: str = "rdp") -> float:
    """Return the epsilon of all ``charges`` composed, at ``delta``.

    Parameters
    ----------
    charges : Iterable[Charge]
        The history (any order; composition is commutative).
    delta : float
        Target delta, in (0, 1).
    accountant : str
        ``rdp`` (Rényi DP, Opacus' default) or ``prv`` (privacy random variables).

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history.
    """
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}")
    history = tuple(sorted((c.noise_multiplier, c.sample_rate, c.steps) for c in charges if c.steps > 0))
    return _composed_epsilon(history, delta, accountant) if history else 0.0


@functools.lru_cache(maxsize=256)
def _composed_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """:func:`epsilon` of a sorted history, remembered: a pure function the site asks again each round.

    A long-lived site worker asks the same questions every round (the run's plan, the ledger's
    history); the RDP sums cost tenths of a second each.
    """
    acc = _accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Return the smallest noise multiplier whose ``steps`` steps spend at most the target.

    Parameters
    ----------
    target_epsilon : float
        Epsilon the whole run may spend.
    delta : float
        Delta of the guarantee.
    sample_rate : float
        Poisson sampling rate.
    steps : int
        Planned steps of the whole run (rounds x local epochs x steps per epoch).
    accountant : str
        ``rdp`` or ``prv``.

    Raises
    ------
    ConfigError
        If no noise multiplier reaches the target (the target is too small for the plan).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"`target_epsilon` must be > 0, got {target_epsilon!r}")
    try:
        sigma = _noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    except ValueError as err:
        raise ConfigError(
            f"target epsilon {target_epsilon:g} at delta {delta:.1e} cannot be reached with "
            f"{steps} steps at sample rate {sample_rate:.4f} ({err}); raise the target "
            "epsilon, or lower the rounds or local epochs."
        ) from err
    # get_noise_multiplier stops within a tolerance *below* the target; check, never exceed.
    spent = epsilon([Charge(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if spent > target_epsilon:
        raise ArithmeticError(f"calibration overshoots: epsilon {spent} > {target_epsilon}")
    return sigma


DEFAULT_DELTA_CAP = 1e-5



@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' calibrated noise multiplier, remembered (a pure function; a binary search of RDP sums)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )

def default_delta(num_records: int) -> float:
    """Return a delta well below ``1 / num_records``: ``min(1e-5, 1 / (10 n))``."""
    if num_records < 1:
        raise ValueError("a site needs at least one training record")
    return min(DEFAULT_DELTA_CAP, 1.0 / (10.0 * num_records))


def run_delta(target_delta: float, num_records: int) -> float:
    """The delta of a run at a site: ``target_delta`` if set (> 0), else :func:`default_delta`."""
    return target_delta if target_delta > 0 else default_delta(num_records)


def poisson_schedule(num_records: int, batch_size: int) -> tuple[float, int]:
    """Return (sample rate, steps per epoch) of Poisson sampling with expected ``batch_size``.

    Opacus replaces a DataLoader of ``ceil(n / batch_size)`` batches by Poisson sampling at
    rate ``1 / ceil(n / batch_size)`` with as many steps per epoch; this is that schedule.
    """
    steps = max(1, math.ceil(num_records / batch_size))
    return 1.0 / steps, steps


def run_steps(num_records: int, batch_size: int, *, rounds: int, local_epochs: int) -> int:
    """Planned DP-SGD steps of a whole run at one site."""
    _, per_epoch = poisson_schedule(num_records, batch_size)
    return rounds * local_epochs * per_epoch


@dataclass(frozen=True)
class RunNoise:
    """The DP-SGD parameters of a whole run at one site.

    Attributes
    ----------
    noise_multiplier : float
        Calibrated so the run's planned steps spend at most the target epsilon.
    delta : float
        Delta of the guarantee.
    sample_rate : float
        Poisson sampling rate.
    steps : int
        Planned steps of the run.
    """

    noise_multiplier: float
    delta: float
    sample_rate: float
    steps: int


def run_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    num_records: int,
    batch_size: int,
    rounds: int,
    local_epochs: int,
    accountant: str = "rdp",
) -> RunNoise:
    """Calibrate the noise of a whole run at a site with ``num_records`` training records.

    ``target_delta`` of 0 means :func:`default_delta`.
    """
    sample_rate, _ = poisson_schedule(num_records, batch_size)
    steps = run_steps(num_records, batch_size, rounds=rounds, local_epochs=local_epochs)
    delta = run_delta(target_delta, num_records)
    sigma = calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    return RunNoise(noise_multiplier=sigma, delta=delta, sample_rate=sample_rate, steps=steps)

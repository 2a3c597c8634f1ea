"""The site's side of differential privacy: plan a round, check it, charge it.

Order of a DP round at a site, each step refusing to go on if it fails:

1. calibrate the noise multiplier for the *whole run* (rounds x local epochs x steps per
   epoch) from the target epsilon, so the run ends at, not past, its target;
2. check the request against the site's policy (:func:`client.policy.check_run`);
3. open and verify the ledger (fail closed), project this round's cost onto the run's and the
   site's lifetime spend, and check both against the policy;
4. write the charge to the ledger (atomic, fsync) -- *before* training, so a crash at any
   later point over-counts and never under-counts;
5. train with DP-SGD and check that Opacus ran the charged schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.ledger import PrivacyLedger
from client.policy import RunRequest, SitePolicy, check_round, check_run
from shared.config import StudyConfig
from shared.privacy import Charge, RunNoise, epsilon, poisson_schedule, run_delta, run_noise


@dataclass(frozen=True)
class RoundPlan:
    """The privacy parameters of one round at one site.

    Attributes
    ----------
    charge : Charge
        Noise multiplier, sample rate and steps of this round.
    delta : float
        Delta of the run's guarantee.
    run_epsilon_after : float
        The run's epsilon at this site once this round is counted.
    lifetime_epsilon_after : float
        The site's lifetime epsilon once this round is counted, at :func:`lifetime_delta`.
    """

    charge: Charge
    delta: float
    run_epsilon_after: float
    lifetime_epsilon_after: float


def site_delta(cfg: StudyConfig, num_records: int) -> float:
    """The run's delta at a site: the configured one, or :func:`shared.privacy.default_delta`."""
    return run_delta(cfg.target_delta, num_records)


def lifetime_delta(ledger: PrivacyLedger, current: float | None = None) -> float:
    """The delta at which a site's lifetime epsilon is stated: the strictest any run used.

    All charges of all runs compose into one guarantee; stating it at the smallest delta any
    run was promised keeps the lifetime epsilon at or above every single run's epsilon.
    """
    deltas = [e.delta for e in ledger.entries()] + ([current] if current is not None else [])
    return min(deltas) if deltas else math.nan


def cfg_run_noise(cfg: StudyConfig, num_records: int) -> RunNoise:
    """The whole run's DP-SGD noise at a site with ``num_records`` records, for ``cfg``."""
    return run_noise(
        target_epsilon=cfg.target_epsilon,
        target_delta=cfg.target_delta,
        num_records=num_records,
        batch_size=cfg.batch_size,
        rounds=cfg.num_rounds,
        local_epochs=cfg.local_epochs,
        accountant=cfg.accountant,
    )


def check_request(cfg: StudyConfig, policy: SitePolicy, *, num_records: int, backbone_sha256: str) -> float:
    """Calibrate the run's noise and check the request against the policy; returns the noise.

    Raises
    ------
    client.policy.PolicyViolation
        If the policy refuses the run.
    """
    noise = delta = math.nan
    if cfg.dp:
        planned = cfg_run_noise(cfg, num_records)
        noise, delta = planned.noise_multiplier, planned.delta
    request = RunRequest(
        task=cfg.task,
        backbone_sha256=backbone_sha256,
        dp=cfg.dp,
        target_epsilon=cfg.target_epsilon if cfg.dp else math.nan,
        delta=delta,
        noise_multiplier=noise,
        rounds=cfg.num_rounds,
    )
    check_run(policy, request)
    return noise


def plan_round(
    cfg: StudyConfig,
    policy: SitePolicy,
    ledger: PrivacyLedger,
    *,
    run_id: str,
    num_records: int,
    noise_multiplier: float,
) -> RoundPlan:
    """Project one round's cost onto the ledger and check it against the policy.

    Raises
    ------
    client.policy.PolicyViolation
        If the round would cross the run's or the site's lifetime limit.
    """
    q, per_epoch = poisson_schedule(num_records, cfg.batch_size)
    charge = Charge(noise_multiplier, q, cfg.local_epochs * per_epoch)
    delta = site_delta(cfg, num_records)
    run_after = epsilon([*ledger.charges(run_id), charge], delta=delta, accountant=cfg.accountant)
    life_delta = lifetime_delta(ledger, delta)
    lifetime_after = epsilon([*ledger.charges(None), charge], delta=life_delta, accountant=cfg.accountant)
    check_round(policy, run_epsilon_after=run_after, lifetime_epsilon_after=lifetime_after)
    return RoundPlan(charge=charge, delta=delta, run_epsilon_after=run_after, lifetime_epsilon_after=lifetime_after)

"""A site's privacy end to end: policy, ledger and real DP-SGD, driven through SiteClient.

The site is Hungary (site 0 of the heart-disease transfer setup, 172 training rows). Nothing
under test is mocked: the policy is read from its file, the ledger from disk, the noise is
calibrated and the rounds are trained by Opacus. Expected epsilons are recomputed here with
Opacus' pure RDP analysis functions, independently of the ledger and of ``shared.privacy.epsilon``.
"""

from __future__ import annotations

import faulthandler
import functools
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import NDArrays, Scalar

import client.numpy_client as numpy_client
from client.ledger import KEY_FILE, LEDGER_FILE, PrivacyLedger
from client.numpy_client import SiteClient, SiteRefusal
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, Partition, SiteEnvironment
from client.store import BackboneStore
from server.app import site_config
from server.local.simulation import simulate
from server.recorder import FederationRecorder
from server.strategy import FederationStopped
from shared.atomic import atomic_write_text
from shared.backbones import BackboneRegistry, ResolvedBackbone
from shared.config import RunConfig
from shared.params import exchanged_names, get_arrays
from shared.pipeline import Pretrained, build_model
from shared.privacy import Charge, calibrate_noise, default_delta, poisson_schedule, run_steps

SITE = "Hungary"  # site index 0 of the heart-disease transfer federation
SITE_INDEX = 0
TRAIN_ROWS = 172
BATCH_SIZE = 32
ROUNDS = 5
TARGET_EPSILON = 3.0
LIFETIME_LIMIT = 4.0
RUN_A = "run-a"
RUN_B = "run-b"
CRASH_RUN = "run-crash"
OTHER_SHA256 = hashlib.sha256(b"another backbone").hexdigest()
SIMULATION_LIMIT_S = 60.0


# ----------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Federation:
    """What the server would send: the run config, the backbone and the initial head."""

    cfg: RunConfig
    backbone: ResolvedBackbone
    parameters: NDArrays

    def config(self, server_round: int, **changes: Any) -> dict[str, Scalar]:
        """The fit config of ``server_round``, as ``server.app`` sends it (changes applied)."""
        return {
            **site_config(self.cfg.with_overrides(**changes), self.backbone),
            "server-round": server_round,
        }


@dataclass(frozen=True)
class FinishedRun:
    """A site directory after one whole run of :data:`RUN_A`, and the metrics of each round."""

    site_dir: Path
    metrics: list[dict[str, Scalar]]


def _environment(site_dir: Path) -> SiteEnvironment:
    return SiteEnvironment(
        data_path="", site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(SITE_INDEX, 3)
    )


def _prepare_site(site_dir: Path, backbone: ResolvedBackbone, policy: SitePolicy) -> SiteEnvironment:
    """A site as its operator sets it up: ledger, policy file, and the backbone already received."""
    prepare_site_dir(site_dir, site=SITE, policy=policy)
    BackboneStore(site_dir).put(backbone.manifest.to_json(), backbone.read_bytes())
    return _environment(site_dir)


@functools.cache
def _round_charge() -> tuple[Charge, float]:
    """Hungary's charge per round and the run's delta, rebuilt from the schedule alone."""
    delta = default_delta(TRAIN_ROWS)
    rate, steps_per_epoch = poisson_schedule(TRAIN_ROWS, BATCH_SIZE)
    steps = run_steps(TRAIN_ROWS, BATCH_SIZE, rounds=ROUNDS, local_epochs=1)
    noise = calibrate_noise(target_epsilon=TARGET_EPSILON, delta=delta, sample_rate=rate, steps=steps)
    return Charge(noise, rate, steps_per_epoch), delta


@functools.cache
def _rdp(charge: Charge) -> tuple[float, ...]:
    """RDP of one charge at Opacus' default orders, from its pure analysis function."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(
        q=charge.sample_rate, noise_multiplier=charge.noise_multiplier, steps=charge.steps, orders=orders
    )
    return tuple(float(v) for v in np.atleast_1d(rdp))


def _independent_epsilon(history: Sequence[Charge], delta: float) -> float:
    """Epsilon of ``history`` composed (RDP adds up) and converted with Opacus' pure functions."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = np.sum([np.asarray(_rdp(c)) for c in history], axis=0)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _charged(site_dir: Path) -> list[tuple[str, int]]:
    return [(e.run_id, e.round) for e in PrivacyLedger.open(site_dir).entries()]


def crash_after_charge(site_dir: str, parameters: NDArrays, config: dict[str, Scalar]) -> None:
    """Child process: fit one round, dying by SIGKILL where DP-SGD would start (after the charge)."""

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(numpy_client, "train_dp", die)  # the trainer is a collaborator here
        SiteClient(_environment(Path(site_dir)), CRASH_RUN).fit(parameters, config)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def federation(heart_registry: Path) -> Federation:
    """A heart transfer run of 5 rounds, 1 local epoch, target epsilon 3, as the server builds it."""
    cfg = RunConfig.of(
        registry_dir=str(heart_registry),
        num_rounds=ROUNDS,
        local_epochs=1,
        batch_size=BATCH_SIZE,
        target_epsilon=TARGET_EPSILON,
    )
    backbone = BackboneRegistry(heart_registry).resolve(cfg.study.backbone)
    model = build_model(cfg.study, Pretrained(backbone.manifest, backbone.path))
    parameters = get_arrays(model, exchanged_names(model, "head"))
    return Federation(cfg=cfg, backbone=backbone, parameters=parameters)


@pytest.fixture(scope="module")
def finished_run(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """Hungary after all 5 rounds of one run, under a lifetime limit of 4 (read-only for tests)."""
    site_dir = tmp_path_factory.mktemp("finished") / "site"
    policy = SitePolicy(max_epsilon_per_run=TARGET_EPSILON, max_lifetime_epsilon=LIFETIME_LIMIT)
    client = SiteClient(_prepare_site(site_dir, federation.backbone, policy), RUN_A)
    metrics: list[dict[str, Scalar]] = []
    for server_round in range(1, ROUNDS + 1):
        _, num_examples, round_metrics = client.fit(federation.parameters, federation.config(server_round))
        assert num_examples == TRAIN_ROWS
        metrics.append(round_metrics)
    return FinishedRun(site_dir=site_dir, metrics=metrics)


# ------------------------------------------------------------------------- budget accounting
def test_run_ends_at_its_target_epsilon(finished_run: FinishedRun) -> None:
    # Prepare
    charge, delta = _round_charge()

    # Execute
    ledger = PrivacyLedger.open(finished_run.site_dir)
    spent = ledger.spent(run_id=RUN_A, delta=delta)

    # Assert: the noise was calibrated for the whole run up front, so it ends at, not past, 3
    assert 0.98 * TARGET_EPSILON <= spent <= TARGET_EPSILON
    assert spent == pytest.approx(_independent_epsilon([charge] * ROUNDS, delta), rel=1e-9)
    assert finished_run.metrics[-1]["epsilon"] == pytest.approx(spent, rel=1e-12)
    assert finished_run.metrics[-1]["delta"] == delta
    assert ledger.rounds_charged(RUN_A) == [1, 2, 3, 4, 5]
    assert ledger.charges(RUN_A) == [charge] * ROUNDS
    # Epsilon grows every round (composition, not a reset per round)
    run_epsilons = [float(m["epsilon"]) for m in finished_run.metrics]
    assert run_epsilons == sorted(run_epsilons) and len(set(run_epsilons)) == ROUNDS


def test_lifetime_budget_refuses_the_first_round_that_would_cross_it(
    federation: Federation, finished_run: FinishedRun, tmp_path: Path
) -> None:
    # Prepare: the site after run A; the refusal round is found from the schedule alone
    site_dir = tmp_path / "site"
    shutil.copytree(finished_run.site_dir, site_dir)
    charge, delta = _round_charge()  # every run used delta = 1e-5: it is also the lifetime delta
    lifetime = {k: _independent_epsilon([charge] * (ROUNDS + k), delta) for k in range(1, ROUNDS + 1)}
    expected_refusal = min(k for k, eps in lifetime.items() if eps > LIFETIME_LIMIT)
    assert 2 <= expected_refusal <= ROUNDS  # run B trains at least once, then is stopped
    client = SiteClient(_environment(site_dir), RUN_B)

    # Execute
    trained: list[int] = []
    with pytest.raises(SiteRefusal) as refusal:
        for server_round in range(1, ROUNDS + 1):
            client.fit(federation.parameters, federation.config(server_round))
            trained.append(server_round)

    # Assert: refused exactly at the round that crosses 4.0, with the projected lifetime epsilon
    assert trained == list(range(1, expected_refusal))
    message = str(refusal.value)
    assert message.startswith(f"{SITE}: ") and "max_lifetime_epsilon" in message
    requested = re.search(r"max_lifetime_epsilon: requested ([0-9.e+-]+), limit 4\.0", message)
    assert requested is not None, message
    assert float(requested.group(1)) == pytest.approx(lifetime[expected_refusal], rel=1e-9)
    # ... and the refused round was not charged: the ledger holds exactly the rounds before it
    ledger = PrivacyLedger.open(site_dir)
    assert _charged(site_dir) == [(RUN_A, r) for r in range(1, ROUNDS + 1)] + [
        (RUN_B, r) for r in range(1, expected_refusal)
    ]
    assert ledger.charges(None) == [charge] * (ROUNDS + expected_refusal - 1)
    assert ledger.spent(run_id=None, delta=delta) == pytest.approx(lifetime[expected_refusal - 1], rel=1e-9)
    assert ledger.spent(run_id=None, delta=delta) <= LIFETIME_LIMIT


# ---------------------------------------------------------------------------- crash safety
def test_a_crash_after_the_charge_leaves_the_round_charged(federation: Federation, tmp_path: Path) -> None:
    # Prepare
    site_dir = tmp_path / "site"
    _prepare_site(site_dir, federation.backbone, SitePolicy())
    charge, delta = _round_charge()
    child = multiprocessing.get_context("spawn").Process(
        target=crash_after_charge, args=(str(site_dir), federation.parameters, federation.config(1))
    )

    # Execute: the node dies between the charge and DP-SGD; no update ever leaves it
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the child process did not finish within 120 s")

    # Assert
    assert child.exitcode == -signal.SIGKILL
    ledger = PrivacyLedger.open(site_dir)  # verifies: the charge was written whole
    assert [(e.run_id, e.round) for e in ledger.entries()] == [(CRASH_RUN, 1)]
    assert ledger.charges(CRASH_RUN) == [charge]
    assert ledger.entries()[0].delta == delta
    assert not list(site_dir.glob(f".{LEDGER_FILE}.*"))  # no half-written temporary file left


# ----------------------------------------------------------------------------- fail closed
def test_missing_ledger_is_refused_and_not_recreated(federation: Federation, tmp_path: Path) -> None:
    # Prepare: a site with its policy and backbone but no ledger
    site_dir = tmp_path / "site"
    atomic_write_text(site_dir / POLICY_FILE, SitePolicy().to_toml())
    BackboneStore(site_dir).put(federation.backbone.manifest.to_json(), federation.backbone.read_bytes())
    client = SiteClient(_environment(site_dir), RUN_A)

    # Execute
    with pytest.raises(SiteRefusal) as refusal:
        client.fit(federation.parameters, federation.config(1))

    # Assert: refused with the way out, and no fresh ledger started from zero
    message = str(refusal.value)
    assert message.startswith(f"{SITE}: ")
    assert "no privacy ledger" in message and "carefl budget --init" in message
    assert not (site_dir / LEDGER_FILE).exists() and not (site_dir / KEY_FILE).exists()


def test_tampered_ledger_is_refused_and_left_as_it_was(federation: Federation, tmp_path: Path) -> None:
    # Prepare: one charged round, then one digit of its step count changed (6 -> 5)
    site_dir = tmp_path / "site"
    client = SiteClient(_prepare_site(site_dir, federation.backbone, SitePolicy()), RUN_A)
    client.fit(federation.parameters, federation.config(1))
    path = site_dir / LEDGER_FILE
    text = path.read_text(encoding="ascii")
    match = re.search(r'"steps": (\d)', text)
    assert match is not None
    digit = match.start(1)
    tampered = text[:digit] + str((int(text[digit]) - 1) % 10) + text[digit + 1 :]
    assert len(tampered) == len(text) and sum(a != b for a, b in zip(text, tampered, strict=True)) == 1
    path.write_text(tampered, encoding="ascii")

    # Execute
    with pytest.raises(SiteRefusal) as refusal:
        client.fit(federation.parameters, federation.config(2))

    # Assert: refused, names the ledger, and nothing was appended
    message = str(refusal.value)
    assert message.startswith(f"{SITE}: ")
    assert LEDGER_FILE in message and "does not verify" in message
    assert path.read_text(encoding="ascii") == tampered


# ------------------------------------------------------------------------- policy refusals
REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # rule: (policy fields, run-config changes)
    "require_dp": ({}, {"dp": False}),
    "max_epsilon_per_run": ({}, {"target_epsilon": 8.0}),
    "max_delta": ({}, {"target_delta": 0.01}),
    "min_noise_multiplier": ({"min_noise_multiplier": 50.0}, {}),
    "max_rounds": ({"max_rounds": 3}, {}),
    "allowed_tasks": ({"allowed_tasks": ("chest-xray",)}, {}),
    "allowed_backbones": ({"allowed_backbones": (OTHER_SHA256,)}, {}),
}


@pytest.mark.parametrize("rule", list(REFUSALS))
def test_policy_refusal_names_site_and_rule_and_charges_nothing(
    federation: Federation, tmp_path: Path, rule: str
) -> None:
    # Prepare
    policy_fields, changes = REFUSALS[rule]
    site_dir = tmp_path / "site"
    client = SiteClient(_prepare_site(site_dir, federation.backbone, SitePolicy(**policy_fields)), RUN_A)

    # Execute
    with pytest.raises(SiteRefusal) as refusal:
        client.fit(federation.parameters, federation.config(1, **changes))

    # Assert
    message = str(refusal.value)
    assert message.startswith(f"{SITE}: site policy refuses the run: {rule}: "), message
    assert PrivacyLedger.open(site_dir).entries() == []


def test_unreachable_target_epsilon_is_refused_not_crashed(federation: Federation, tmp_path: Path) -> None:
    # Prepare
    site_dir = tmp_path / "site"
    client = SiteClient(_prepare_site(site_dir, federation.backbone, SitePolicy()), RUN_A)

    # Execute
    with pytest.raises(SiteRefusal) as refusal:
        client.fit(federation.parameters, federation.config(1, target_epsilon=1e-4))

    # Assert
    assert str(refusal.value).startswith(f"{SITE}: ")
    assert PrivacyLedger.open(site_dir).entries() == []


# ------------------------------------------------------------------ on the simulation engine
@pytest.fixture
def watchdog() -> Iterator[None]:
    """Abort the test session with tracebacks if a federation hangs instead of ending."""
    faulthandler.dump_traceback_later(3 * SIMULATION_LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _strict_sites(sites_root: Path, strict: dict[int, str]) -> None:
    """Set up the given sites (index: name) beforehand with a per-run limit of 0.5."""
    for index, name in strict.items():
        prepare_site_dir(sites_root / f"site-{index}", site=name, policy=SitePolicy(max_epsilon_per_run=0.5))


@pytest.mark.usefixtures("watchdog")
@pytest.mark.slow
def test_federation_goes_on_without_the_site_that_declines(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: Switzerland allows 0.5 per run; the run asks for 3
    sites_root = tmp_path / "sites"
    _strict_sites(sites_root, {1: "Switzerland"})
    cfg = RunConfig.of(
        registry_dir=str(heart_registry), num_rounds=2, local_epochs=1, target_epsilon=3.0, min_sites=2
    )
    recorder = FederationRecorder()
    assert cfg.study.secure_aggregation  # the refusal travels as an error reply of SecAgg+'s collect stage

    # Execute
    result = simulate(cfg, num_sites=3, sites_root=sites_root, recorder=recorder)

    # Assert: two sites trained each round. The two that trained reported every model they
    # received (rows 0 and 1, carried by the fit) and the final one; the site that declines
    # every fit reports only the final model, in its own evaluate message (not refused)
    assert {r: len(sizes) for r, sizes in result.upload_bytes.items()} == {1: 2, 2: 2}
    assert {(r.round, r.site) for r in result.rows} == {
        *((rnd, site) for rnd in (0, 1, 2) for site in ("Hungary", "VA Long Beach")),
        (2, "Switzerland"),
    }
    assert set(recorder.failures) == {1, 2}
    for reasons in recorder.failures.values():
        assert len(reasons) == 1  # the fit refusal only
        assert reasons[0].startswith("Switzerland: ") and "max_epsilon_per_run" in reasons[0]
    # Switzerland spent nothing; the others spent their run's budget
    assert _charged(sites_root / "site-1") == []
    epsilon = {r.site: r.epsilon for r in result.final_rows()}
    assert epsilon["Switzerland"] == 0.0
    assert 0.98 * 3.0 <= epsilon["Hungary"] <= 3.0 and 0.98 * 3.0 <= epsilon["VA Long Beach"] <= 3.0


@pytest.mark.usefixtures("watchdog")
@pytest.mark.slow
def test_federation_stops_promptly_when_too_few_sites_train(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: two of three sites refuse, and a round needs two
    sites_root = tmp_path / "sites"
    _strict_sites(sites_root, {1: "Switzerland", 2: "VA Long Beach"})
    cfg = RunConfig.of(
        registry_dir=str(heart_registry), num_rounds=3, local_epochs=1, target_epsilon=3.0, min_sites=2
    )
    recorder = FederationRecorder()
    assert cfg.study.secure_aggregation  # SecAgg+ halts below threshold: the run still stops, saying why

    # Execute
    started = time.monotonic()
    with pytest.raises(Exception) as stopped:
        simulate(cfg, num_sites=3, sites_root=sites_root, recorder=recorder)
    elapsed = time.monotonic() - started

    # Assert: stopped in round 1, saying why, without waiting for anything
    message = str(stopped.value)
    assert isinstance(stopped.value, FederationStopped) or "fewer than min-sites" in message
    assert "round 1: only 1 site(s) trained, fewer than min-sites = 2" in message, message
    assert elapsed < SIMULATION_LIMIT_S
    assert list(recorder.failures) == [1]
    assert sorted(reason.split(":")[0] for reason in recorder.failures[1]) == ["Switzerland", "VA Long Beach"]
    assert all("max_epsilon_per_run" in reason for reason in recorder.failures[1])
    assert recorder.rows == []  # no round was evaluated
    assert [rnd for _, rnd in _charged(sites_root / "site-0")] == [1]  # Hungary trained round 1 only
    assert _charged(sites_root / "site-1") == [] and _charged(sites_root / "site-2") == []

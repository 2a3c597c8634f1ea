"""Tests of client.ledger: the site's privacy ledger (real accountants, real files, real crashes)."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.ledger import KEY_FILE, LEDGER_FILE, RECOVERY, LedgerEntry, LedgerError, PrivacyLedger
from shared.privacy import Charge

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5
RUN_A = "run-a"
RUN_B = "run-b"
# Three rounds of run A and two of run B, each a (noise multiplier, sample rate, steps) triple.
HISTORY_A = (Charge(1.1, 0.01, 400), Charge(1.1, 0.01, 400), Charge(1.3, 0.02, 250))
HISTORY_B = (Charge(0.9, 0.015, 300), Charge(0.9, 0.015, 300))
FIXED_NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
Doc = dict[str, Any]


def _independent_epsilon(history: Sequence[Charge], delta: float) -> float:
    """Epsilon from Opacus' pure RDP analysis functions, without the ledger or its accountant."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        np.asarray(
            compute_rdp(q=c.sample_rate, noise_multiplier=c.noise_multiplier, steps=c.steps, orders=orders)
        )
        for c in history
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _charge_all(
    ledger: PrivacyLedger, run_id: str, history: Sequence[Charge], accountant: str = "rdp"
) -> None:
    for rnd, charge in enumerate(history, start=1):
        ledger.charge(
            run_id=run_id, round=rnd, charge=charge, delta=DELTA, accountant=accountant, max_grad_norm=1.0
        )


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    """A ledger holding HISTORY_A as run A, rounds 1..3."""
    site_ledger = PrivacyLedger.init(tmp_path / "site", site="hospital-1", now=lambda: FIXED_NOW)
    _charge_all(site_ledger, RUN_A, HISTORY_A)
    return site_ledger


def _read(site_dir: Path) -> Doc:
    return json.loads((site_dir / LEDGER_FILE).read_text())


def _write(site_dir: Path, doc: Doc) -> None:
    (site_dir / LEDGER_FILE).write_text(json.dumps(doc))


# ----------------------------------------------------------------------------- accounting
def test_spent_matches_opacus_analysis_functions(ledger: PrivacyLedger) -> None:
    # Prepare
    expected = _independent_epsilon(HISTORY_A, DELTA)

    # Execute
    spent = ledger.spent(run_id=RUN_A, delta=DELTA)

    # Assert
    assert spent == pytest.approx(expected, abs=1e-6)
    assert ledger.charges(RUN_A) == list(HISTORY_A)


def test_spent_pins_a_known_answer(tmp_path: Path) -> None:
    # Prepare
    site_ledger = PrivacyLedger.init(tmp_path, site="h")
    site_ledger.charge(
        run_id="r", round=1, charge=Charge(1.1, 0.01, 1000), delta=DELTA, accountant="rdp", max_grad_norm=1.0
    )

    # Execute
    spent = site_ledger.spent(run_id="r", delta=DELTA)

    # Assert: computed once with Opacus 1.6's RDP accountant (dp-accounting gives 1.71177017).
    assert spent == pytest.approx(1.7117700912203435, abs=1e-9)
    assert _independent_epsilon([Charge(1.1, 0.01, 1000)], DELTA) == pytest.approx(spent, abs=1e-9)


def test_lifetime_composes_all_runs(ledger: PrivacyLedger) -> None:
    # Prepare
    _charge_all(ledger, RUN_B, HISTORY_B)

    # Execute
    lifetime = ledger.spent(run_id=None, delta=DELTA)
    run_a = ledger.spent(run_id=RUN_A, delta=DELTA)
    run_b = ledger.spent(run_id=RUN_B, delta=DELTA)

    # Assert
    assert lifetime == pytest.approx(_independent_epsilon((*HISTORY_A, *HISTORY_B), DELTA), abs=1e-6)
    assert run_b == pytest.approx(_independent_epsilon(HISTORY_B, DELTA), abs=1e-6)
    assert lifetime > run_a
    assert lifetime > run_b
    assert lifetime < run_a + run_b  # composed, not summed
    assert ledger.run_ids() == [RUN_A, RUN_B]


def test_spent_agrees_with_google_dp_accounting(ledger: PrivacyLedger) -> None:
    # Prepare
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event

    accountant = dp_accounting.rdp.RdpAccountant()
    for c in HISTORY_A:
        sampled = dp_event.PoissonSampledDpEvent(c.sample_rate, dp_event.GaussianDpEvent(c.noise_multiplier))
        accountant.compose(dp_event.SelfComposedDpEvent(sampled, c.steps))

    # Execute
    google = accountant.get_epsilon(DELTA)
    ours = ledger.spent(run_id=RUN_A, delta=DELTA)

    # Assert: different RDP orders, so close but not identical.
    assert ours == pytest.approx(google, rel=0.03)


def test_prv_accountant_is_close_to_rdp(ledger: PrivacyLedger) -> None:
    # Execute
    prv = ledger.spent(run_id=RUN_A, delta=DELTA, accountant="prv")
    rdp = ledger.spent(run_id=RUN_A, delta=DELTA, accountant="rdp")

    # Assert
    assert 0 < prv
    assert prv == pytest.approx(rdp, rel=0.15)


def test_empty_ledger_has_spent_nothing(tmp_path: Path) -> None:
    # Execute
    site_ledger = PrivacyLedger.init(tmp_path, site="h")

    # Assert
    assert site_ledger.spent(run_id=None, delta=DELTA) == 0.0
    assert site_ledger.entries() == []
    assert site_ledger.run_ids() == []


# ------------------------------------------------------------------------ content and persistence
def test_entries_record_each_charge(ledger: PrivacyLedger) -> None:
    # Execute
    entries = ledger.entries(RUN_A)

    # Assert
    assert [e.seq for e in entries] == [0, 1, 2]
    assert ledger.rounds_charged(RUN_A) == [1, 2, 3]
    assert ledger.rounds_charged("unknown") == []
    assert entries[0] == LedgerEntry(
        seq=0,
        run_id=RUN_A,
        round=1,
        noise_multiplier=1.1,
        sample_rate=0.01,
        steps=400,
        delta=DELTA,
        accountant="rdp",
        max_grad_norm=1.0,
        time_utc="2025-01-02T03:04:05+00:00",
    )
    assert ledger.site == "hospital-1"
    assert ledger.path.name == LEDGER_FILE


def test_reopen_sees_same_entries_and_exact_floats(tmp_path: Path) -> None:
    # Prepare
    awkward = Charge(math.pi, 1 / 3, 7)
    site_ledger = PrivacyLedger.init(tmp_path, site="h")
    site_ledger.charge(
        run_id="r",
        round=0,
        charge=awkward,
        delta=0.1 + 0.2 - 0.3 + 1e-7,
        accountant="prv",
        max_grad_norm=math.nextafter(1.0, 2.0),
    )

    # Execute
    reopened = PrivacyLedger.open(tmp_path)

    # Assert
    assert reopened.entries() == site_ledger.entries()
    entry = reopened.entries()[0]
    assert entry.charge == awkward
    assert entry.delta == 0.1 + 0.2 - 0.3 + 1e-7
    assert entry.max_grad_norm == math.nextafter(1.0, 2.0)


def test_retried_round_is_charged_again(ledger: PrivacyLedger) -> None:
    # Execute: round 3 crashed after its charge and is run again; it pays again (over-count).
    ledger.charge(
        run_id=RUN_A, round=3, charge=HISTORY_A[2], delta=DELTA, accountant="rdp", max_grad_norm=1.0
    )

    # Assert
    assert ledger.rounds_charged(RUN_A) == [1, 2, 3]
    assert len(ledger.entries(RUN_A)) == 4
    assert ledger.spent(run_id=RUN_A, delta=DELTA) > _independent_epsilon(HISTORY_A, DELTA)


def test_charge_refuses_bad_arguments_and_naive_clock(tmp_path: Path) -> None:
    # Prepare
    PrivacyLedger.init(tmp_path, site="h")
    site_ledger = PrivacyLedger.open(tmp_path, now=lambda: datetime(2025, 1, 1))
    good: dict[str, Any] = {
        "run_id": "r",
        "round": 1,
        "charge": Charge(1.0, 0.1, 1),
        "delta": DELTA,
        "accountant": "rdp",
        "max_grad_norm": 1.0,
    }

    # Execute / Assert
    for name, bad in (("delta", 1.0), ("accountant", "gdp"), ("max_grad_norm", 0.0), ("round", -1)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            site_ledger.charge(**{**good, name: bad})
    with pytest.raises(ValueError, match="timezone-aware"):
        site_ledger.charge(**good)
    assert PrivacyLedger.open(tmp_path).entries() == []


# ------------------------------------------------------------------------------- fail closed
def test_init_twice_is_refused(ledger: PrivacyLedger) -> None:
    # Execute / Assert
    with pytest.raises(LedgerError, match="never re-initialise"):
        PrivacyLedger.init(ledger.path.parent, site="hospital-1")
    assert len(PrivacyLedger.open(ledger.path.parent).entries()) == 3


def test_init_with_a_naive_clock_writes_nothing(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="timezone-aware"):
        PrivacyLedger.init(tmp_path, site="h", now=lambda: datetime(2025, 1, 1))
    assert not (tmp_path / KEY_FILE).exists()
    assert not (tmp_path / LEDGER_FILE).exists()


def test_init_refuses_when_only_the_key_exists(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / KEY_FILE).write_bytes(b"x" * 32)

    # Execute / Assert
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.init(tmp_path, site="h")


def test_key_file_is_private(ledger: PrivacyLedger) -> None:
    # Execute
    mode = stat.S_IMODE((ledger.path.parent / KEY_FILE).stat().st_mode)

    # Assert
    assert mode == 0o600
    assert len((ledger.path.parent / KEY_FILE).read_bytes()) == 32


def test_open_without_ledger_says_how_to_initialise(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(LedgerError, match="no privacy ledger in .*carefl budget --init --site-dir") as info:
        PrivacyLedger.open(tmp_path)
    assert "would forget the privacy already spent" in str(info.value)


def _remove_ledger(site: Path) -> None:
    (site / LEDGER_FILE).unlink()


def _remove_key(site: Path) -> None:
    (site / KEY_FILE).unlink()


def _garbage(site: Path) -> None:
    (site / LEDGER_FILE).write_bytes(b"\x00not json")


def _truncate(site: Path) -> None:
    raw = (site / LEDGER_FILE).read_bytes()
    (site / LEDGER_FILE).write_bytes(raw[: len(raw) // 2])


def _unreadable(site: Path) -> None:
    (site / LEDGER_FILE).unlink()
    (site / LEDGER_FILE).mkdir()


def _edit(change: Callable[[Doc], None]) -> Callable[[Path], None]:
    def tamper(site: Path) -> None:
        doc = _read(site)
        change(doc)
        _write(site, doc)

    return tamper


def _set_version(doc: Doc) -> None:
    doc["header"]["version"] = 2


def _more_steps(doc: Doc) -> None:
    doc["entries"][1]["steps"] = 1


def _nudge_float(doc: Doc) -> None:
    entry = doc["entries"][1]
    entry["noise_multiplier"] = math.nextafter(entry["noise_multiplier"], 100.0)


def _drop_middle(doc: Doc) -> None:
    del doc["entries"][1]
    doc["count"] = 2


def _drop_last(doc: Doc) -> None:
    del doc["entries"][-1]


def _drop_last_and_fix_count(doc: Doc) -> None:
    del doc["entries"][-1]
    doc["count"] = 2
    doc["head_mac"] = doc["entries"][-1]["mac"]


def _swap(doc: Doc) -> None:
    entries = doc["entries"]
    entries[0], entries[1] = entries[1], entries[0]


def _duplicate_last(doc: Doc) -> None:
    doc["entries"].append(dict(doc["entries"][-1]))


def _rename_site(doc: Doc) -> None:
    doc["header"]["site"] = "hospital-2"


def _foreign_key(site: Path) -> None:
    (site / KEY_FILE).write_bytes(os.urandom(32))


def _short_key(site: Path) -> None:
    (site / KEY_FILE).write_bytes(b"short")


TAMPERING = [
    pytest.param(_remove_ledger, "privacy ledger is missing although its key", id="key-without-ledger"),
    pytest.param(_remove_key, "ledger key is missing although the privacy ledger", id="ledger-without-key"),
    pytest.param(_garbage, "not valid JSON", id="not-json"),
    pytest.param(_truncate, "not valid JSON", id="half-written"),
    pytest.param(_unreadable, "cannot read the privacy ledger", id="unreadable"),
    pytest.param(_edit(_set_version), "unsupported ledger format version 2", id="wrong-version"),
    pytest.param(_edit(_more_steps), "entry at position 1 was altered", id="entry-altered"),
    pytest.param(_edit(_nudge_float), "entry at position 1 was altered", id="float-nudged"),
    pytest.param(_edit(_drop_middle), "position 1 does not follow", id="middle-removed"),
    pytest.param(_edit(_drop_last), "entries were removed from .*the end", id="last-removed"),
    pytest.param(
        _edit(_drop_last_and_fix_count), "seal over count and head_mac", id="last-removed-count-fixed"
    ),
    pytest.param(_edit(_swap), "position 0 does not follow", id="reordered"),
    pytest.param(_edit(_duplicate_last), "position 3 does not follow", id="entry-inserted"),
    pytest.param(_edit(_rename_site), "header was altered", id="header-altered"),
    pytest.param(_foreign_key, "not the key of this ledger", id="foreign-key"),
    pytest.param(_short_key, "is 5 bytes, expected 32", id="short-key"),
]


@pytest.mark.parametrize(("tamper", "problem"), TAMPERING)
def test_tampered_ledger_is_refused_with_recovery_advice(
    ledger: PrivacyLedger, tamper: Callable[[Path], None], problem: str
) -> None:
    # Prepare
    tamper(ledger.path.parent)

    # Execute / Assert
    with pytest.raises(LedgerError, match=problem) as info:
        PrivacyLedger.open(ledger.path.parent)
    assert RECOVERY in str(info.value)
    assert "Never delete the ledger" in str(info.value)


def test_charge_refuses_a_ledger_tampered_after_open(ledger: PrivacyLedger) -> None:
    # Prepare
    _edit(_drop_last)(ledger.path.parent)
    tampered = ledger.path.read_bytes()

    # Execute / Assert
    with pytest.raises(LedgerError, match="removed from"):
        ledger.charge(
            run_id=RUN_A, round=4, charge=HISTORY_A[0], delta=DELTA, accountant="rdp", max_grad_norm=1.0
        )
    assert ledger.path.read_bytes() == tampered


# ---------------------------------------------------------------------------- crashes and races
def _python(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO)


def test_charge_survives_sigkill_right_after_it_returns(ledger: PrivacyLedger) -> None:
    # Prepare
    site = ledger.path.parent
    child = _python(
        f"""
        import os, signal
        from pathlib import Path
        from client.ledger import PrivacyLedger
        from shared.privacy import Charge
        ledger = PrivacyLedger.open(Path({str(site)!r}))
        ledger.charge(run_id={RUN_A!r}, round=4, charge=Charge(1.2, 0.01, 100), delta=1e-5,
                      accountant="rdp", max_grad_norm=1.0)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )

    # Execute
    returncode = child.wait(timeout=60)
    reopened = PrivacyLedger.open(site)

    # Assert
    assert returncode == -signal.SIGKILL
    assert reopened.rounds_charged(RUN_A) == [1, 2, 3, 4]
    assert reopened.entries()[-1].charge == Charge(1.2, 0.01, 100)
    assert not [p.name for p in site.iterdir() if p.name.endswith(".tmp")]
    reopened.charge(
        run_id=RUN_A, round=5, charge=HISTORY_A[0], delta=DELTA, accountant="rdp", max_grad_norm=1.0
    )
    assert len(PrivacyLedger.open(site).entries()) == 5


def test_concurrent_charges_are_all_kept(ledger: PrivacyLedger) -> None:
    # Prepare
    site, per_process = ledger.path.parent, 12
    code = """
        import sys
        from pathlib import Path
        from client.ledger import PrivacyLedger
        from shared.privacy import Charge
        ledger = PrivacyLedger.open(Path({site!r}))
        for rnd in range({n}):
            ledger.charge(run_id={run!r}, round=rnd, charge=Charge(1.0, 0.01, 10), delta=1e-5,
                          accountant="rdp", max_grad_norm=1.0)
        """

    # Execute
    children = [_python(code.format(site=str(site), n=per_process, run=run)) for run in ("p1", "p2")]
    returncodes = [child.wait(timeout=60) for child in children]

    # Assert
    reopened = PrivacyLedger.open(site)
    assert returncodes == [0, 0]
    assert len(reopened.entries()) == 3 + 2 * per_process
    assert [e.seq for e in reopened.entries()] == list(range(3 + 2 * per_process))
    assert reopened.rounds_charged("p1") == reopened.rounds_charged("p2") == list(range(per_process))

"""What ``carefl budget`` shows a hospital: its privacy spent per run, lifetime, and remaining."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from client.ledger import PrivacyLedger
from client.policy import SitePolicy
from client.privacy import lifetime_delta
from client.site import POLICY_FILE


def budget_table(site_dir: Path, *, policy_path: Path | None = None) -> Table:
    """Render the site's ledger against its policy.

    Each run's epsilon is computed at that run's delta; the lifetime epsilon composes every
    charge of every run, at the strictest delta any run used.

    Raises
    ------
    client.ledger.LedgerError
        If the ledger is missing, corrupt or tampered (with how to recover).
    """
    ledger = PrivacyLedger.open(site_dir)
    policy = SitePolicy.load(policy_path or Path(site_dir) / POLICY_FILE)
    table = Table(title=f"Privacy budget of {ledger.site} ({site_dir})")
    for column in ("run", "rounds", "steps", "accountant", "delta", "epsilon", "limit"):
        table.add_column(column, justify="right" if column not in ("run", "accountant") else "left")
    lifetime_accountant = "rdp"
    for run_id in ledger.run_ids():
        entries = ledger.entries(run_id)
        delta = entries[-1].delta
        accountant = entries[-1].accountant
        lifetime_accountant = accountant
        spent = ledger.spent(run_id=run_id, delta=delta, accountant=accountant)
        table.add_row(
            run_id, str(len(entries)), str(sum(e.steps for e in entries)), accountant,
            f"{delta:.2e}", f"{spent:.4f}", f"{policy.max_epsilon_per_run:g}",
        )  # fmt: skip
    life_delta = lifetime_delta(ledger)
    lifetime = ledger.spent(run_id=None, delta=life_delta, accountant=lifetime_accountant) if ledger.entries() else 0.0
    remaining = max(0.0, policy.max_lifetime_epsilon - lifetime)
    table.add_section()
    table.add_row(
        "lifetime", str(len(ledger.entries())), str(sum(e.steps for e in ledger.entries())),
        lifetime_accountant, f"{life_delta:.2e}", f"{lifetime:.4f}", f"{policy.max_lifetime_epsilon:g}",
    )  # fmt: skip
    table.caption = f"remaining lifetime epsilon: {remaining:.4f} (policy limit {policy.max_lifetime_epsilon:g})"
    return table

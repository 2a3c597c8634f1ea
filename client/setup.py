"""Prepare a hospital's site directory: its privacy ledger and its policy file.

Done once by the site's operator (``carefl budget --init``); the local simulation does it
for each simulated hospital. Existing files are never overwritten: a ledger that already
exists keeps counting.
"""

from __future__ import annotations

from pathlib import Path

from client.ledger import KEY_FILE, LEDGER_FILE, PrivacyLedger
from client.policy import SitePolicy
from client.site import POLICY_FILE
from shared.atomic import atomic_write_text, require_writable_dir


def prepare_site_dir(site_dir: Path, *, site: str, policy: SitePolicy | None = None) -> Path:
    """Create the ledger and a policy file in ``site_dir`` where they do not exist yet.

    Parameters
    ----------
    site_dir : Path
        The site's private directory.
    site : str
        The site's name (recorded in the ledger).
    policy : SitePolicy, optional
        Written to ``policy.toml`` if there is none (default: :class:`SitePolicy`'s defaults).

    Returns
    -------
    Path
        ``site_dir``.

    Raises
    ------
    InputError
        If ``site_dir`` cannot be created or written (a read-only place, a file in the way).
    """
    site_dir = Path(site_dir)
    require_writable_dir(site_dir, what="site directory", hint="the site keeps its privacy ledger there")
    site_dir.mkdir(parents=True, exist_ok=True)
    if not (site_dir / LEDGER_FILE).exists() and not (site_dir / KEY_FILE).exists():
        PrivacyLedger.init(site_dir, site=site)
    policy_path = site_dir / POLICY_FILE
    if not policy_path.exists():
        atomic_write_text(policy_path, (policy or SitePolicy()).to_toml())
    return site_dir

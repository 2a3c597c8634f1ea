"""A real deployment on 127.0.0.1 runs only the app its hospitals approved.

The consortium submits, with ``flwr run``, a CareFL whose ClientApp was modified to skip the
privacy ledger: every hospital's node refuses its FAB by SHA-256 (an error reply, an audit entry),
and none of its code runs. The approved CareFL then runs to the end on the same nodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

from client.audit import AUDIT_FILE, verify
from client.policy import SitePolicy
from client.site import POLICY_FILE
from server.deployment import follow_run, submit_run
from server.flwr_cli import COMPLETED
from server.local.demo import demo_config
from server.local.deployment import DeploymentDemoOptions, LocalDeployment, _run_config
from server.service import APP_DIR
from shared.fab import build_fab
from shared.processes import ProcessGroups

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking is checked on Linux only"),
]



def _modified_carefl(folder: Path, marker: Path) -> Path:
    """A copy of this CareFL whose ClientApp skips the ledger (and leaves ``marker`` if it runs)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    folder.mkdir(parents=True)
    shutil.copy(APP_DIR / "pyproject.toml", folder / "pyproject.toml")
    for package in ("client", "server", "shared"):
        shutil.copytree(APP_DIR / package, folder / package, ignore=ignore)
    ledger = folder / "client" / "ledger.py"
    ledger.write_text(
        ledger.read_text()
        + f"\nfrom pathlib import Path as _P\n_P({str(marker)!r}).write_text('the FAB ran')\n"
        + "PrivacyLedger.charge = lambda *args, **kwargs: None  # skip the privacy ledger\n"
    )
    return folder


def test_modified_app_is_refused_by_every_node_and_the_approved_one_runs(
    heart_registry: Path, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare: 3 hospitals that approved this CareFL; a modified copy of it
    cfg = demo_config("heart-disease", num_rounds=1, local_epochs=1, registry_dir=str(heart_registry), secure_aggregation=False)
    buffer = io.StringIO()
    deployment = LocalDeployment(
        DeploymentDemoOptions(cfg, tmp_path / "run", tmp_path / "work"), Console(file=buffer, width=200), procs
    )
    marker = tmp_path / "the-fab-ran"
    modified = _modified_carefl(tmp_path / "modified" / "carefl", marker)
    modified_sha = hashlib.sha256(build_fab(modified)).hexdigest()
    link = deployment.start_superlink()
    nodes = deployment.start_nodes()

    # Execute: `flwr run` of the modified app, then of the approved one
    lines: list[str] = []
    refused_config = _run_config(cfg, tmp_path / "refused-run", deployment.paths, resume=False)
    run_id = submit_run(link, modified, refused_config.to_run_config(), tmp_path / "refused.toml", announce=print)
    status = follow_run(procs, link, run_id, lambda _, line: lines.append(line), announce=print, timeout=300, watch=nodes)
    out = deployment.run(resume=False)
    approved_sha = hashlib.sha256(build_fab(APP_DIR)).hexdigest()

    # Assert: the modified run failed; every node refused its FAB by hash, audited, and ran none of it
    assert status != COMPLETED and modified_sha != approved_sha == deployment.app_sha256
    assert "site policy refuses the app" in "\n".join(lines) and modified_sha in "\n".join(lines)
    assert not marker.exists()
    for hospital in deployment.hospitals:
        site = deployment.paths.site_dir(hospital)
        approved = SitePolicy.load(site / POLICY_FILE).approved
        assert approved_sha in approved and modified_sha not in approved
        entries = [json.loads(line) for line in (site / AUDIT_FILE).read_text().splitlines()]
        refusals = [e for e in entries if e["run_id"] == str(run_id)]
        assert refusals and all(e["decision"].startswith("refused: ") and modified_sha in e["decision"] for e in refusals), hospital
        assert all(e["decision"] == "accepted" for e in entries if e["run_id"] != str(run_id)), hospital
        assert verify(site).ok, hospital
        assert not (deployment.paths.node_home(hospital) / "apps").exists()  # no FAB was ever installed at a node
    node_logs = "\n".join(node.output() for node in nodes)
    assert node_logs.count(f"FAB's SHA-256 {modified_sha} is not in `apps.approved`") >= len(nodes)
    # ... and the approved app ran to the end on the same nodes, charging each site's ledger
    card = json.loads((out / "model_card.json").read_text())
    assert card["rounds"] == 1 and card["privacy"]["dp"] is True
    assert all(card["privacy"]["per_site"][site]["epsilon"] > 0 for site in card["privacy"]["per_site"])
    assert f"approved (SHA-256 {approved_sha})" in node_logs

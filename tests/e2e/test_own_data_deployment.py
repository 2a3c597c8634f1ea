"""A real deployment where each hospital brings its own chest X-rays and runs only the app it approved.

SuperLink + 3 SuperNodes on 127.0.0.1 with TLS, node authentication, DP-SGD and SecAgg+: one
hospital has a PNG class-folder tree, one a DICOM export (four encodings, a multi-frame file and
an SR the node refuses, unique identifying tags in every file), one a MedMNIST ``.npz``.

First the consortium submits, with ``flwr run``, a CareFL whose ClientApp was modified to skip
the privacy ledger: every node refuses its FAB by SHA-256 (an error reply, an audit entry) and
none of its code runs. Then the approved CareFL runs on the same nodes: each hospital uses its
data whole, the counts it reports are its own split, every hospital receives the final model,
and no identifying tag value reaches any file the run writes. (One deployment for both: a
deployment's start-up is most of each test's time.)
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
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
from shared.tasks import OwnData, load_own
from shared.tasks.chest_data import load_image_dataset
from tests.site_files import dicom_site, png_site

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tracking is checked on Linux only"),
]
TAG = "ZQXPHI"


def _npz_site(path: Path, npz: Path) -> Path:
    data = load_image_dataset(npz)
    np.savez_compressed(
        path, train_images=data.train_images[-80:], train_labels=data.train_labels[-80:, None],
        val_images=data.val_images[-20:], val_labels=data.val_labels[-20:, None],
    )  # fmt: skip
    return path


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


def test_hospitals_refuse_a_modified_app_and_train_on_their_own_images_in_three_formats(
    pneumonia_npz: Path, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare: 3 hospitals, each with its own data, that approved this CareFL; a modified copy of it
    data = tmp_path / "hospital-data"
    own = {
        "PNG Hospital": str(png_site(data / "png", pneumonia_npz, count=60)),
        "DICOM Hospital": str(dicom_site(data / "dicom", pneumonia_npz, count=60, start=100, tag=TAG)),
        "NPZ Hospital": str(_npz_site(data / "medmnist.npz", pneumonia_npz)),
    }
    cfg = demo_config(
        "chest-xray", num_rounds=1, local_epochs=1, image_size=32, secure_aggregation=True, dp=True,
        operating_point="youden",
    )  # fmt: skip
    buffer = io.StringIO()
    work, out = tmp_path / "work", tmp_path / "run"
    deployment = LocalDeployment(DeploymentDemoOptions(cfg, out, work, own_data=own), Console(file=buffer, width=200), procs)
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
    deployment.run(resume=False)
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
    assert f"approved (SHA-256 {approved_sha})" in node_logs
    # ... and the approved app ran to the end on the same nodes, charging each site's ledger; every
    # hospital trained and evaluated on its own split, named as it says
    card = json.loads((out / "model_card.json").read_text())
    assert card["rounds"] == 1 and card["privacy"]["dp"] is True
    assert all(card["privacy"]["per_site"][site]["epsilon"] > 0 for site in card["privacy"]["per_site"])
    balance = card["data"]["class_balance_per_site"]
    assert sorted(balance) == sorted(own) == sorted(card["privacy"]["per_site"])
    for name, path in own.items():
        expected, report = load_own(cfg.study, OwnData(path, name))
        assert sum(balance[name]["train"].values()) == expected.num_train, name
        assert sum(balance[name]["val"].values()) == expected.num_val, name
    # Each hospital holds the final model, bit for bit
    model = (out / "model.pt").read_bytes()
    for hospital in deployment.hospitals:
        (copy,) = (work / "sites" / hospital / "models").glob("*/model.pt")
        assert copy.read_bytes() == model, hospital
    # No identifying DICOM tag value in any file the run wrote (run folder, sites, logs, caches)
    leaks = [p for root in (out, work) for p in root.rglob("*") if p.is_file() and TAG.encode() in p.read_bytes()]
    assert leaks == []
    assert TAG not in buffer.getvalue()

"""A real deployment where each hospital brings its own chest X-rays, each in another format.

SuperLink + 3 SuperNodes on 127.0.0.1 with TLS, node authentication, DP-SGD and SecAgg+: one
hospital has a PNG class-folder tree, one a DICOM export (four encodings, a multi-frame file and
an SR the node refuses, unique identifying tags in every file), one a MedMNIST ``.npz``. Each
uses its data whole; the counts it reports are its own split; every hospital receives the final
model; and no identifying tag value reaches any file the run writes.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from server.local.demo import demo_config
from server.local.deployment import DeploymentDemoOptions, LocalDeployment
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


def test_hospitals_train_on_their_own_images_in_three_formats(
    pneumonia_npz: Path, procs: ProcessGroups, tmp_path: Path
) -> None:
    # Prepare
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

    # Execute
    deployment.start_superlink()
    deployment.start_nodes()
    deployment.run(resume=False)

    # Assert: every hospital trained and evaluated on its own split, named as it says
    card = json.loads((out / "model_card.json").read_text())
    balance = card["data"]["class_balance_per_site"]
    assert sorted(balance) == sorted(own)
    for name, path in own.items():
        expected, report = load_own(cfg.study, OwnData(path, name))
        assert sum(balance[name]["train"].values()) == expected.num_train, name
        assert sum(balance[name]["val"].values()) == expected.num_val, name
    assert card["privacy"]["dp"] is True
    # Each hospital holds the final model, bit for bit
    model = (out / "model.pt").read_bytes()
    for hospital in deployment.hospitals:
        (copy,) = (work / "sites" / hospital / "models").glob("*/model.pt")
        assert copy.read_bytes() == model, hospital
    # No identifying DICOM tag value in any file the run wrote (run folder, sites, logs, caches)
    leaks = [p for root in (out, work) for p in root.rglob("*") if p.is_file() and TAG.encode() in p.read_bytes()]
    assert leaks == []
    assert TAG not in buffer.getvalue()

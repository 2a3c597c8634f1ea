"""A site refuses data its task cannot learn from before its privacy ledger is charged.

Driven through the real :class:`client.numpy_client.SiteClient`: the site directory, ledger and
policy are real files; DP-SGD would run for real if the data were accepted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.ledger import PrivacyLedger
from client.numpy_client import SiteClient, SiteRefusal
from client.policy import SitePolicy
from client.setup import prepare_site_dir
from client.site import POLICY_FILE, Partition, SiteEnvironment
from server.app import site_config
from shared import protocol as wire
from shared.config import RunConfig
from shared.params import exchanged_names, get_arrays
from shared.pipeline import build_model, effective_trainable
from shared.tasks import heart
from shared.tasks.chest_data import load_image_dataset


def _site(site_dir: Path, data: Path, name: str) -> SiteEnvironment:
    prepare_site_dir(site_dir, site=name, policy=SitePolicy())
    return SiteEnvironment(data_path=str(data), site_dir=site_dir, policy_path=site_dir / POLICY_FILE, partition=Partition(0))


def _fit(env: SiteEnvironment, cfg: RunConfig) -> None:
    """One round as the server would ask it (setup scratch: no backbone to receive)."""
    model = build_model(cfg.study, None)
    parameters = get_arrays(model, exchanged_names(model, effective_trainable(cfg.study)))
    SiteClient(env, "run-1").fit(parameters, {**site_config(cfg, None), wire.ROUND_KEY: 1})


def test_an_all_sick_csv_is_refused_before_the_ledger_is_charged(tmp_path: Path) -> None:
    # Prepare: every `num` > 0 (on main: trained, charged, and scored accuracy 1.000)
    frame = heart.load_frame()
    frame["num"] = 3
    csv = tmp_path / "all_sick.csv"
    frame.to_csv(csv, index=False)
    env = _site(tmp_path / "site", csv, "Hungary")
    cfg = RunConfig.of(task="heart-disease", setup="scratch", num_rounds=1, local_epochs=1)

    # Execute
    with pytest.raises(SiteRefusal) as info:
        _fit(env, cfg)

    # Assert
    assert str(info.value).startswith(f"Hungary: {csv}: the sites' training data holds only class 1")
    assert PrivacyLedger.open(env.site_dir).entries() == []


def test_labels_the_model_cannot_take_are_refused_before_the_ledger_is_charged(
    tmp_path: Path, pneumonia_npz: Path
) -> None:
    # Prepare: labels {0, 7} for a 2-output model (on main: charged, then a crash inside training)
    real = load_image_dataset(pneumonia_npz)
    labels = np.array([0, 7] * 40, dtype=np.uint8)[:, None]
    data = tmp_path / "zero_seven.npz"
    np.savez_compressed(
        data, train_images=real.train_images[:80], train_labels=labels,
        val_images=real.val_images[:20], val_labels=labels[:20],
    )  # fmt: skip
    env = _site(tmp_path / "site", data, "site-1")
    cfg = RunConfig.of(
        task="chest-xray", setup="scratch", num_sites=1, num_rounds=1, local_epochs=1, image_size=16,
        secure_aggregation=False,
    )  # fmt: skip

    # Execute
    with pytest.raises(SiteRefusal, match=r"label\(s\) 7, outside the chest-xray task's classes 0\.\.1"):
        _fit(env, cfg)

    # Assert
    assert PrivacyLedger.open(env.site_dir).entries() == []

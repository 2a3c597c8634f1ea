"""scripts/tune_privacy.py: the inner splits use training rows only; chest-xray's path runs a grid cell."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from rich.console import Console

from scripts.bench_privacy import baselines, step_times
from scripts.feature_levers import (
    FeatureLever,
    block_widths,
    central_auc,
    lever_sites,
    public_projection,
    random_projection,
)
from scripts.tune_privacy import FULL_BATCH, ServerRule, chest_target, inner_split, tune
from server.local.demo import ensure_backbone
from server.recorder import FederationRecorder
from server.strategy import make_strategy
from shared.backbones.architectures import MobileNetV2Features
from shared.config import RunConfig
from shared.pipeline import build_model
from shared.tasks.base import SiteData
from shared.tv import torchvision_module
from tests.node_proxy import NodeProxy

TRAIN_MARK, VAL_MARK = 5.0, 99.0


def test_inner_split_cuts_the_training_rows_only() -> None:
    # Prepare: column 0 is constant over the training rows, another value on the validation rows
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(60, 4)).astype(np.float32)
    x_train[:, 0] = TRAIN_MARK
    x_val = np.full((20, 4), VAL_MARK, np.float32)
    y_train = np.array([0, 1] * 30)
    site = SiteData("site-1", x_train, y_train, x_val, np.ones(20, np.int64), fingerprint="f")

    # Execute
    inner = inner_split(site, seed=3)

    # Assert: every inner row is a training row (the constant column standardizes to 0), all of them used
    assert len(inner.y_train) + len(inner.y_val) == len(y_train)
    assert np.all(inner.x_train[:, 0] == 0) and np.all(inner.x_val[:, 0] == 0)
    assert sorted(np.concatenate([inner.y_train, inner.y_val])) == sorted(y_train)
    assert (
        np.bincount(inner.y_val).tolist() == np.bincount(inner.y_val, minlength=2).tolist()
    )  # both classes kept
    assert abs(len(inner.y_train) / len(y_train) - 0.66) < 0.05


@pytest.fixture(scope="module")
def small_npz(pneumonia_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two MedMNIST-layout files of 240 real training images; the second's validation images are blank."""
    with np.load(pneumonia_npz) as arrays:
        x, y = arrays["train_images"][:240], arrays["train_labels"][:240]
        xv, yv = arrays["val_images"][:60], arrays["val_labels"][:60]
    folder = tmp_path_factory.mktemp("npz")
    real, blank = folder / "real.npz", folder / "blank.npz"
    np.savez(real, train_images=x, train_labels=y, val_images=xv, val_labels=yv)
    np.savez(blank, train_images=x, train_labels=y, val_images=np.zeros_like(xv), val_labels=yv)
    return real, blank


SMALL = {"num_sites": 2, "image_size": 32}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One backbone registry and feature cache for the module (registering the backbone takes seconds)."""
    return tmp_path_factory.mktemp("state")


def test_chest_search_never_sees_validation_images(small_npz: tuple[Path, Path], state_dir: Path) -> None:
    # Prepare
    real, blank = small_npz

    # Execute: the same training images, different validation images
    sites = chest_target(1.0, real, state_dir, SMALL).sites
    other = chest_target(1.0, blank, state_dir, SMALL).sites

    # Assert: no validation row in what the search sees, and the features do not depend on them
    assert all(len(s.x_val) == 0 and len(s.y_val) == 0 for s in sites)
    assert sum(len(s.y_train) for s in sites) > 0.6 * 240
    # feature-blocks "7,8,9,10": four 64-channel blocks
    assert all(s.x_train.shape[1] == 4 * 64 for s in sites)
    for a, b in zip(sites, other, strict=True):
        np.testing.assert_array_equal(a.x_train, b.x_train)


def test_chest_one_cell_grid_runs(small_npz: tuple[Path, Path], state_dir: Path) -> None:
    # Prepare
    target = chest_target(1.0, small_npz[0], state_dir, SMALL)
    grid = [
        {"batch_size": (FULL_BATCH,), "schedule": ((2, 1),), "learning_rate": (1.0,), "max_grad_norm": (1.0,)}
    ]

    # Execute
    rows = tune(target, grid, splits=1, repeats=1)

    # Assert: one scored cell, ranked by the mean of weighted AUC and balanced accuracy
    assert len(rows) == 1
    row = rows[0]
    assert (row["batch_size"], row["num_rounds"], row["local_epochs"]) == (FULL_BATCH, 2, 1)
    auc, bacc = row["inner_auc"][0], row["inner_balanced_accuracy"][0]
    assert 0.0 <= auc <= 1.0 and 0.0 <= bacc <= 1.0
    assert math.isclose(row["inner_mean"], (auc + bacc) / 2)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedyogi"])
def test_server_rule_steps_as_the_federation_strategy(strategy: str) -> None:
    # Prepare: the server's strategy of a real run, and 3 rounds of 3 sites' deltas
    rng = np.random.default_rng(1)
    initial = [rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    cfg = RunConfig.of(secure_aggregation=False, strategy=strategy, server_learning_rate=0.3)
    real = make_strategy(
        cfg, initial, FederationRecorder(), fit_config=lambda r: {}, evaluate_config=lambda r: {}
    )
    rule = ServerRule(strategy, eta=0.3)
    counts = np.array([20, 50, 30])
    current = [a.copy() for a in initial]

    for server_round in (1, 2, 3):
        deltas = [[0.1 * rng.normal(size=a.shape).astype(np.float32) for a in initial] for _ in counts]
        results = [
            (NodeProxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(d), int(n), {}))
            for i, (d, n) in enumerate(zip(deltas, counts, strict=True))
        ]

        # Execute
        parameters, _ = real.aggregate_fit(server_round, results, [])
        mean = [sum(n * d[i] for n, d in zip(counts, deltas, strict=True)) / counts.sum() for i in range(2)]
        current = rule.step(server_round, current, mean)

        # Assert: the in-process rule lands where the federation's strategy does, every round
        for got, expected in zip(current, parameters_to_ndarrays(parameters), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(current[0], initial[0])  # the rounds moved the model


def test_public_projection_is_fixed_by_the_weights_alone(
    state_dir: Path, small_npz: tuple[Path, Path]
) -> None:
    # Prepare: the backbone's public weights
    target = chest_target(1.0, small_npz[0], state_dir, {**SMALL, "feature_blocks": "-2"})  # its input: 320
    backbone = build_model(
        target.cfg.study.with_overrides(feature_blocks=""),
        ensure_backbone(target.cfg, Console(file=io.StringIO())),
    ).backbone

    # Execute
    first, second = public_projection(backbone, 16), public_projection(backbone, 16)

    # Assert: deterministic, orthonormal columns; the central LR check runs on the projected rows
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first.T @ first, np.eye(16), atol=1e-5)
    np.testing.assert_array_equal(random_projection(320, 8, 3), random_projection(320, 8, 3))
    auc, _ = central_auc(target.sites, splits=1, projection=first)
    assert 0.5 < auc <= 1.0


def test_lever_sites_cut_the_blocks_columns_and_widths_match_mobilenet() -> None:
    # Prepare: rows whose value is their column index, for blocks 7 (2 wide), 8 (3 wide) and 9 (1 wide)
    widths = {7: 2, 8: 3, 9: 1}
    x = np.tile(np.arange(6, dtype=np.float32), (4, 1))
    site = SiteData("s", x, np.array([0, 1, 0, 1]), x[:0], np.zeros(0, np.int64), fingerprint="f")
    mobilenet = torchvision_module().models.mobilenet_v2(weights=None).features

    # Execute
    cut = lever_sites([site], widths, FeatureLever((7, 9)))[0]
    measured = block_widths(MobileNetV2Features(), (4, 11, 14, 17, 18))

    # Assert: block 7's two columns then block 9's; the widths are torchvision's output channels
    np.testing.assert_array_equal(cut.x_train[0], [0, 1, 5])
    assert (
        measured
        == {b: mobilenet[b].out_channels for b in (4, 11, 14, 17, 18)}
        == {4: 32, 11: 96, 14: 160, 17: 320, 18: 1280}
    )


def test_bench_baselines_report_site_alone_and_scratch(small_npz: tuple[Path, Path], state_dir: Path) -> None:
    # Prepare: the small chest federation (2 sites) and its backbone
    target = chest_target(1.0, small_npz[0], state_dir, SMALL)
    pretrained = ensure_backbone(target.cfg, Console(file=io.StringIO()))
    cheap = {"num_rounds": 1, "local_epochs": 1, "learning_rate": 0.05}

    # Execute
    figures = baselines(target.cfg.with_overrides(num_rounds=1, local_epochs=1), pretrained, 1.0, 2, cheap)

    # Assert: both methods, every figure a mean and an sd over the 2 seeds, AUCs in range
    assert set(figures) == {"each site alone", "federated from scratch"}
    for method in figures.values():
        assert 0.0 <= method["weighted_auc"]["mean"] <= 1.0 and method["weighted_auc"]["sd"] >= 0.0
        assert 0.0 <= method["weighted_balanced_accuracy"]["mean"] <= 1.0


def test_bench_step_times_time_a_dp_step_against_a_plain_one(small_npz: tuple[Path, Path], state_dir: Path) -> None:
    # Prepare: the small chest federation's head, as bench_privacy's step-time table times it
    target = chest_target(1.0, small_npz[0], state_dir, SMALL)
    pretrained = ensure_backbone(target.cfg, Console(file=io.StringIO()))

    # Execute
    times = step_times(target.cfg, pretrained)

    # Assert: positive per-step times, their ratio, and the head's trainable parameters (2 x 256 + 2)
    assert times["plain_step_s"] > 0 and times["dp_step_s"] > 0
    assert times["ratio"] == pytest.approx(times["dp_step_s"] / times["plain_step_s"])
    assert times["trainable_params"] == 2 * 256 + 2

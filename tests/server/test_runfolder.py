"""Tests of server.report.runfolder (all-or-nothing run folders, metrics, model card) and server.report.plot."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from server.metrics import SiteRoundMetrics
from server.report.plot import plot_site_metrics
from server.report.runfolder import (
    RunFolder,
    dumps_json,
    model_card,
    read_metrics_csv,
    write_metrics,
)
from shared.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[SiteRoundMetrics]:
    """Two sites over rounds 0..2; site "b" has no AUC (NaN) throughout."""
    return [
        SiteRoundMetrics(0, "a", 30, 0.69, 0.5, 0.5),
        SiteRoundMetrics(0, "b", 10, 0.70, 0.4, math.nan),
        SiteRoundMetrics(1, "a", 30, 0.5, 0.8, 0.9),
        SiteRoundMetrics(1, "b", 10, 0.7, 0.6, math.nan),
        SiteRoundMetrics(2, "a", 30, 0.41, 1 / 3, 0.9123456789012345),
        SiteRoundMetrics(2, "b", 10, 0.62, 0.7, math.nan),
    ]


def _same(left: SiteRoundMetrics, right: SiteRoundMetrics) -> bool:
    """Field-wise equality where NaN equals NaN."""
    for name in ("loss", "accuracy", "auc"):
        a, b = getattr(left, name), getattr(right, name)
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            return False
    keys = ("round", "site", "num_examples")
    return all(getattr(left, key) == getattr(right, key) for key in keys)


def _leftovers(parent: Path) -> list[str]:
    """Names of staging directories left in ``parent``."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def _reject_constant(token: str) -> float:
    """``json.loads`` hook that fails on NaN / Infinity, i.e. enforces strict JSON."""
    raise AssertionError(f"non-standard JSON constant {token}")


def test_success_publishes_files_and_leaves_no_staging(tmp_path: Path) -> None:
    # Prepare
    final = tmp_path / "run"

    # Execute
    with RunFolder(final) as run:
        staging = run.staging
        run.write_text("notes.txt", "hello")
        run.write_bytes("blob.bin", b"\x00\x01")
        run.write_json("card.json", {"x": np.float32(0.5), "n": np.int64(3), "bad": math.nan})
        run.path("sub/model.pt").write_bytes(b"weights")
        assert not final.exists()

    # Assert
    assert (final / "notes.txt").read_text() == "hello"
    assert (final / "blob.bin").read_bytes() == b"\x00\x01"
    assert json.loads((final / "card.json").read_text()) == {"x": 0.5, "n": 3, "bad": None}
    assert (final / "sub" / "model.pt").read_bytes() == b"weights"
    assert not staging.exists()
    assert _leftovers(tmp_path) == []
    assert run.final == final


def test_existing_empty_final_dir_is_replaced(tmp_path: Path) -> None:
    # Prepare
    final = tmp_path / "run"
    final.mkdir()

    # Execute
    with RunFolder(final) as run:
        run.write_text("a.txt", "a")

    # Assert
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_leaves_nothing_behind(tmp_path: Path, error: BaseException) -> None:
    # Prepare
    final = tmp_path / "run"

    # Execute
    with pytest.raises(type(error)):
        with RunFolder(final) as run:
            run.write_text("half.txt", "half")
            raise error

    # Assert
    assert not final.exists()
    assert _leftovers(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_final_dir(tmp_path: Path) -> None:
    # Prepare
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("keep me")

    # Execute
    with pytest.raises(InputError) as caught:
        with RunFolder(final):
            pass  # pragma: no cover - never entered

    # Assert
    message = str(caught.value)
    assert str(final) in message and "\n" not in message
    assert (final / "old.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == []


def test_rejects_names_outside_the_folder(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with RunFolder(tmp_path / "run") as run:
        for name in ("../escape.txt", "/abs.txt", ""):
            with pytest.raises(ValueError):
                run.path(name)


def test_metrics_csv_round_trip_keeps_values_and_nan(tmp_path: Path) -> None:
    # Prepare
    rows = _rows()
    final = tmp_path / "run"

    # Execute
    with RunFolder(final) as run:
        write_metrics(run, rows)
    back = read_metrics_csv(final / "metrics.csv")

    # Assert
    assert len(back) == len(rows)
    assert all(_same(a, b) for a, b in zip(back, rows))
    lines = (final / "metrics.csv").read_text().splitlines()
    assert lines[0] == (
        "round,site,num_examples,loss,accuracy,auc,epsilon,delta,sensitivity,specificity,ppv,npv,f1,"
        "balanced_accuracy,brier,ece,threshold,sensitivity_at_op,specificity_at_op"
    )
    assert len(lines) == 1 + len(rows) + 3  # header, per-site rows, one mean row per round
    assert lines[2] == "0,b,10,0.7,0.4,,," + "," * 11  # NaN auc, epsilon, delta and 11 clinical: empty


def test_metrics_json_is_strict_and_holds_the_weighted_mean(tmp_path: Path) -> None:
    # Prepare
    rows = _rows()
    final = tmp_path / "run"

    # Execute
    with RunFolder(final) as run:
        write_metrics(run, rows)
    document = json.loads((final / "metrics.json").read_text(), parse_constant=_reject_constant)

    # Assert
    round1 = document["rounds"][1]
    assert [r["round"] for r in document["rounds"]] == [0, 1, 2]
    assert round1["sites"]["b"]["auc"] is None
    mean = round1["weighted_mean"]
    assert mean["num_examples"] == 40
    assert mean["accuracy"] == pytest.approx((30 * 0.8 + 10 * 0.6) / 40)  # 0.75
    assert mean["loss"] == pytest.approx((30 * 0.5 + 10 * 0.7) / 40)  # 0.55
    assert mean["auc"] == pytest.approx(0.9)  # site b's NaN is left out, not counted as 0


def test_metrics_csv_weighted_mean_row(tmp_path: Path) -> None:
    # Prepare
    final = tmp_path / "run"

    # Execute
    with RunFolder(final) as run:
        write_metrics(run, _rows(), stem="eval")
    lines = (final / "eval.csv").read_text().splitlines()

    # Assert
    mean_cells = [line.split(",") for line in lines if line.startswith("1,weighted-mean,")][0]
    assert mean_cells[2] == "40"
    assert float(mean_cells[4]) == pytest.approx(0.75)


def test_read_metrics_csv_rejects_foreign_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")

    # Execute / Assert
    with pytest.raises(InputError, match="header"):
        read_metrics_csv(path)


def test_dumps_json_is_strict_with_numpy_and_nan() -> None:
    # Prepare
    value = {"arr": np.array([1.0, np.nan]), "inf": np.float64(np.inf), "t": (1, np.bool_(True))}

    # Execute
    text = dumps_json(value)

    # Assert
    assert json.loads(text, parse_constant=_reject_constant) == {
        "arr": [1.0, None],
        "inf": None,
        "t": [1, True],
    }


@pytest.mark.parametrize(
    ("rows", "baselines"),
    [
        (
            _rows(),
            {"each site alone": {"accuracy": 0.71, "auc": 0.8}, "scratch": {"accuracy": 0.68}},
        ),
        ([r for r in _rows() if r.site == "b"], None),  # auc all NaN: subplot skipped
    ],
)
def test_plot_writes_a_readable_png(
    tmp_path: Path, rows: list[SiteRoundMetrics], baselines: dict[str, dict[str, float]] | None
) -> None:
    # Prepare
    path = tmp_path / "plots" / "metrics.png"

    # Execute
    plot_site_metrics(rows, path, title="heart-disease", baselines=baselines)

    # Assert
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["metrics.png"]  # no temp file left


def test_plot_all_nan_auc_gives_narrower_figure(tmp_path: Path) -> None:
    # Prepare
    both = tmp_path / "both.png"
    only_accuracy = tmp_path / "only_accuracy.png"
    no_auc = [replace(row, auc=math.nan) for row in _rows()]

    # Execute
    plot_site_metrics(_rows(), both, title="t")
    plot_site_metrics(no_auc, only_accuracy, title="t")

    # Assert
    width_both = matplotlib.image.imread(both).shape[1]
    width_one = matplotlib.image.imread(only_accuracy).shape[1]
    assert width_one < width_both


def test_plot_refuses_unknown_metric(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="metrics"):
        plot_site_metrics(_rows(), tmp_path / "x.png", title="t", metrics=("f1",))


def test_model_card_fields() -> None:
    # Prepare
    now = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)

    # Execute
    card = model_card(
        task="heart-disease",
        sites=("a", "b"),
        rounds=5,
        backbone={"name": "heart-mlp-cleveland", "sha256": "ab" * 32},
        metrics={"accuracy": np.float64(0.75), "auc": math.nan},
        extra={"strategy": "fedavg"},
        now=now,
    )

    # Assert
    assert card["created_utc"] == "2024-05-01T12:30:00+00:00"
    assert isinstance(card["carefl_version"], str) and card["carefl_version"]
    assert card["task"] == "heart-disease"
    assert card["sites"] == ["a", "b"]
    assert card["rounds"] == 5
    assert card["backbone"] == {"name": "heart-mlp-cleveland", "sha256": "ab" * 32}
    assert card["metrics"] == {"accuracy": 0.75, "auc": None}
    assert card["strategy"] == "fedavg"
    json.dumps(card, allow_nan=False)


def test_model_card_refuses_overriding_standard_keys() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="task"):
        model_card(task="t", sites=["a"], rounds=1, backbone={}, metrics={}, extra={"task": "x"})

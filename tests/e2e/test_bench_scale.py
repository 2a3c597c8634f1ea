"""scripts/bench_scale.py's core, at 3 sites for 1 round (so the benchmark cannot rot)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from rich.console import Console

from server.local.demo import ensure_backbone
from shared.params import exchanged_names, get_arrays
from shared.pipeline import build_model, effective_trainable
from tests.site_files import pneumonia_subset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_scale.py"


def load_script() -> ModuleType:
    """Import the script from its file (``scripts/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_chest(pneumonia_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 real training and 90 validation images of PneumoniaMNIST."""
    return pneumonia_subset(pneumonia_npz, tmp_path_factory.mktemp("chest") / "small.npz", train=300, val=90, seed=1)


def test_one_secure_round_reports_time_memory_and_each_stages_bytes(small_chest: Path, tmp_path: Path) -> None:
    # Prepare
    bench = load_script()
    # Execute: 3 sites, SecAgg+, 1 round
    row = bench.run_scale(small_chest, 3, rounds=1, secure=True, state_dir=tmp_path, alpha=10.0)
    # Assert: a time and a memory peak were taken; every SecAgg+ stage was counted both ways;
    # the masked upload is at least 8 bytes per exchanged value of the head (int64)
    cfg = bench.scale_config(
        small_chest, 3, rounds=1, secure=True, alpha=10.0, registry=tmp_path / "registry", stage_timeout=None
    )
    model = build_model(cfg.study, ensure_backbone(cfg, Console(file=io.StringIO())))
    values = sum(int(np.size(a)) for a in get_arrays(model, exchanged_names(model, effective_trainable(cfg.study))))
    assert row["sites"] == 3 and row["secure"] is True
    assert row["s_per_round"] > 0
    assert row["peak_rss_bytes"] > 100 * 2**20
    stages = row["stages"]
    for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
        assert stages[stage]["received"] > 0 and stages[stage]["sent"] > 0, stage
    assert stages["collect_masked_vectors"]["sent"] > 8 * values
    assert row["sent"] == pytest.approx(sum(s["sent"] for s in stages.values()))
    assert 0.0 <= row["auc"] <= 1.0

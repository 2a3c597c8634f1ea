"""The model card written with a run folder states what each site's preprocessing dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from server.metrics import SiteRoundMetrics
from server.report.result import FederationResult, write_run_folder
from shared.config import RunConfig


def test_model_card_names_each_sites_dropped_rows(tmp_path: Path) -> None:
    # Prepare: a finished run whose sites reported their dropped rows
    result = FederationResult(
        config=RunConfig.of(setup="scratch", num_rounds=1),
        manifest=None,
        names=["head.weight"],
        parameters=[np.zeros((2, 3), np.float32)],
        rows=[SiteRoundMetrics(1, "Hungary", 89, 0.5, 0.8, 0.85), SiteRoundMetrics(1, "Switzerland", 16, 0.4, 0.9, 0.7)],
        dropped_rows={"Switzerland": 77, "Hungary": 33},
    )

    # Execute
    write_run_folder(tmp_path / "run", result)

    # Assert
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["data"]["dropped_rows_per_site"] == {"Hungary": 33, "Switzerland": 77}
    assert "missing value" in card["data"]["note"]

"""After a federation every hospital holds the final model, bit for bit the server's, with its own operating point."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.metrics import recall_score

from client.models import list_site_models, load_site_model
from client.store import BackboneStore
from server.local.simulation import simulate
from server.report.result import write_run_folder
from shared.config import RunConfig
from shared.pipeline import build_model
from shared.tasks import load_site

SITES = ("Hungary", "Switzerland", "VA Long Beach")


def test_every_site_stores_the_servers_model_and_its_operating_point(
    heart_registry: Path, tmp_path: Path
) -> None:
    # Prepare
    cfg = RunConfig.of(
        registry_dir=str(heart_registry), num_rounds=2, local_epochs=1, operating_point="sensitivity:0.9",
        secure_aggregation=False,
    )  # fmt: skip
    sites = tmp_path / "sites"

    # Execute
    result = simulate(cfg, num_sites=3, sites_root=sites)
    run = write_run_folder(tmp_path / "run", result)

    # Assert: the card says who stored the model, and which one
    server_model = (run / "model.pt").read_bytes()
    card = json.loads((run / "model_card.json").read_text())
    assert card["delivered_to"] == list(SITES) and card["not_delivered"] == [] and card["not_reached"]["sites"] == []
    for index in range(3):
        site_dir = sites / f"site-{index}"
        [folder] = list_site_models(site_dir)
        stored = load_site_model(folder)
        # ... bit for bit the server's model, with the card the server built (less who stored it)
        assert (folder / "model.pt").read_bytes() == server_model
        assert stored.card == {k: v for k, v in card.items() if k not in ("delivered_to", "not_delivered", "not_reached")}
        assert stored.site["site"] == SITES[index]
        # ... and an operating point that meets the rule on the site's validation data, recomputed here
        data = load_site(cfg.study, index)
        model = build_model(stored.study, BackboneStore(site_dir).get(stored.site["backbone_sha256"]))
        model.load_state_dict(stored.payload["state_dict"], strict=False)
        model.eval()
        with torch.no_grad():
            positive = torch.softmax(model(torch.from_numpy(data.x_val)), dim=1)[:, 1].numpy()
        threshold = stored.threshold
        assert threshold is not None
        sensitivity = recall_score(data.y_val, positive >= threshold)
        assert sensitivity >= 0.9
        assert stored.site["operating_point"]["sensitivity"] == sensitivity
        assert stored.site["validation_records"] == len(data.y_val)

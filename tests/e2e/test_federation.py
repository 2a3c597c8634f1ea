"""End-to-end federations on Flower's simulation engine, one per task, on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import ndarray_to_bytes

from client.audit import verify
from client.policy import SitePolicy
from server.local.simulation import simulate
from server.report.result import write_run_folder
from server.report.runfolder import read_metrics_csv
from shared.backbones import BackboneRegistry
from shared.config import RunConfig
from shared.params import get_arrays
from shared.pipeline import Pretrained, build_model


def _head_bytes(model_arrays: list[np.ndarray]) -> int:
    return sum(len(ndarray_to_bytes(a)) for a in model_arrays)


def message_counter(out: Path) -> Mod:
    """A mod that leaves one empty file ``<message type>-r<round>-s<site>-<n>`` per message a site receives."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        stem = f"{message.metadata.message_type}-r{message.metadata.group_id}-s{context.node_config['partition-id']}"
        (out / f"{stem}-{len(list(out.glob(stem + '-*')))}").touch()
        return call_next(message, context)

    return mod


def _evaluate_messages(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(f"{MessageType.EVALUATE}-"))


SITES = ("Hungary", "Switzerland", "VA Long Beach")


def test_heart_transfer_federation(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: SecAgg+ and DP (the defaults); the first run evaluates in its fit messages (the
    # default), the second sends an evaluate message after every round
    cfg = RunConfig.of(registry_dir=str(heart_registry), num_rounds=2, local_epochs=1, operating_point="sensitivity:0.9")
    resolved = BackboneRegistry(heart_registry).resolve(cfg.study.backbone)
    initial_model = build_model(cfg.study, Pretrained(resolved.manifest, resolved.path))
    initial_head = get_arrays(initial_model, ["head.weight", "head.bias"])
    sites = tmp_path / "sites"
    counted = [tmp_path / "messages-1", tmp_path / "messages-2"]
    for folder in counted:
        folder.mkdir()

    # Execute
    first = simulate(cfg, num_sites=3, sites_root=sites, client_mods=[message_counter(counted[0])])
    second = simulate(
        cfg.with_overrides(evaluate_in_fit=False), num_sites=3, sites_root=sites, client_mods=[message_counter(counted[1])]
    )
    folder = write_run_folder(tmp_path / "run", first)

    # Assert: one evaluate message per site, for the final model; the plain pattern has one per round
    assert _evaluate_messages(counted[0]) == [f"{MessageType.EVALUATE}-r2-s{i}-0" for i in range(3)]
    assert _evaluate_messages(counted[1]) == [f"{MessageType.EVALUATE}-r{r}-s{i}-0" for r in (1, 2) for i in range(3)]
    # ... and every site's figures of every model: the initial one (measured in round 1's fit), the
    # model after round 1 (in round 2's fit) and the final model; the plain pattern has no initial one
    assert sorted((r.round, r.site) for r in first.rows) == [(rnd, site) for rnd in (0, 1, 2) for site in SITES]
    assert sorted((r.round, r.site) for r in second.rows) == [(rnd, site) for rnd in (1, 2) for site in SITES]
    # ... at the privacy each model cost: none for the initial model, then growing to the final one
    for site in SITES:
        spent = [r.epsilon for r in sorted(first.rows, key=lambda r: r.round) if r.site == site]
        assert spent[0] == 0.0 and 0.0 < spent[1] < spent[2] <= cfg.study.target_epsilon * 1.01, (site, spent)
    # The CSV holds the same rows (and each model's weighted mean); the card's final figures are the final model's
    written = read_metrics_csv(folder / "metrics.csv")
    assert sorted((r.round, r.site) for r in written) == sorted((r.round, r.site) for r in first.rows)
    assert {r.round for r in first.final_rows()} == {2}
    assert all(0.0 <= r.accuracy <= 1.0 for r in first.rows)
    # ... with its clinical scores at 0.5, and at the operating point it chose on its own data
    assert all(0.0 <= r.sensitivity <= 1.0 and 0.0 <= r.brier <= 1.0 for r in first.rows)
    assert all(r.sensitivity_at_op >= 0.9 and 0.0 <= r.threshold <= 1.0 for r in first.rows)
    # Only the head travels, as a masked delta (SecAgg+: int64) of the same shapes after the
    # site's masked weight
    assert first.names == ["head.weight", "head.bias"]
    expected = _head_bytes([np.zeros(1, dtype=np.int64)] + [np.zeros(a.shape, dtype=np.int64) for a in initial_head])
    assert all(b == expected for per_round in first.upload_bytes.values() for b in per_round)
    assert len(first.upload_bytes[1]) == 3
    assert expected < first.full_model_bytes / 5  # int64 masks double the head; .npy headers weigh
    # The backbone went once to each node, with the weights file's exact size ...
    weights_size = resolved.path.stat().st_size
    assert sorted(first.backbone_bytes.values()) == [weights_size] * 3
    # ... and a second run against the same site caches sends it to nobody
    assert second.backbone_bytes == {}
    # Training moved the head
    assert not np.allclose(first.parameters[0], initial_head[0])
    # Each site's audit log verifies: sealed, and every charged round (2 runs x 2) has its entry
    reports = [verify(site) for site in sorted(sites.iterdir())]
    assert [(r.ok, r.sealed, r.charged_rounds) for r in reports] == [(True, True, 4)] * 3, reports


def test_chest_xray_federation_writes_run_folder(pneumonia_npz: Path, tmp_path: Path) -> None:
    # Prepare
    cfg = RunConfig.of(
        task="chest-xray",
        backbone="mobilenet_v2-imagenet",
        data_path=str(pneumonia_npz),
        num_sites=3,
        image_size=32,
        num_rounds=2,
        local_epochs=1,
        learning_rate=0.01,
        dp=False,  # the pipeline itself; DP utility is measured in scripts/bench_privacy.py
    )

    # Execute
    result = simulate(cfg, num_sites=3, sites_root=tmp_path / "sites", policy=SitePolicy(require_dp=False))
    folder = write_run_folder(tmp_path / "run", result)

    # Assert
    assert {r.site for r in result.rows} == {"site-1", "site-2", "site-3"}
    assert sum(r.num_examples for r in result.final_rows()) == 524  # the whole validation split
    upload = result.mean_upload_bytes()
    assert upload / result.full_model_bytes < 0.01
    assert result.final_summary()["auc"] > 0.8  # ImageNet features separate pneumonia already
    for name in ("metrics.csv", "metrics.json", "model.pt", "model_card.json", "metrics.png"):
        assert (folder / name).is_file(), name


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(heart_registry: Path, tmp_path: Path, strategy: str) -> None:
    # Prepare
    cfg = RunConfig.of(
        registry_dir=str(heart_registry), num_rounds=1, local_epochs=1, strategy=strategy,
        dp=strategy != "fedprox",  # FedProx's proximal term is refused with DP-SGD
    )

    # Execute
    result = simulate(cfg, num_sites=3, sites_root=tmp_path / "sites", policy=SitePolicy(require_dp=cfg.study.dp))

    # Assert
    assert len(result.final_rows()) == 3
    assert all(np.isfinite(a).all() for a in result.parameters)

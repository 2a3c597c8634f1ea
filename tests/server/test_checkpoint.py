"""Server checkpoints: exact round trip, crash-safe writes, refusals, and a resumed run that ends
with the model of an uninterrupted one."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from client.models import list_site_models
from client.policy import SitePolicy
from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointAfterRound,
    ResumedRounds,
    RunCheckpoints,
    checkpoint_bytes,
    checkpoint_from_bytes,
    load_checkpoint,
    privacy_across_runs,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.local.simulation import simulate
from server.metrics import SiteRoundMetrics
from server.recorder import FederationRecorder
from server.strategy import make_strategy
from shared.config import RunConfig
from shared.errors import ConfigError, IntegrityError

NAMES = ["head.weight", "head.bias"]


def _checkpoint(round_: int = 2, cfg: RunConfig | None = None) -> Checkpoint:
    rng = np.random.default_rng(round_)
    return Checkpoint(
        round=round_,
        names=NAMES,
        arrays=[rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=2).astype(np.float32)],
        strategy_state={"m_t": [np.full((2, 32), 0.5), np.ones(2)], "v_t": [np.full((2, 32), 0.25), np.ones(2)]},
        config=(cfg or RunConfig.of(checkpoint_dir="/ck", strategy="fedadam")).to_run_config(),
        backbone_sha256="ab" * 32,
        rows=[
            SiteRoundMetrics(1, "Hungary", 59, 0.6, 0.7, 0.8, epsilon=1.5, delta=1e-5),
            SiteRoundMetrics(1, "Switzerland", 8, 0.9, 0.5, math.nan),
        ],
        upload_bytes={1: [784, 784]},
        backbone_bytes={12345678901234567890: 8285},
        failures={1: ["node 7: declined"]},
        segments=[{"flower_run_id": 11, "first_round": 1, "last_round": round_}],
        training_privacy={round_: {"Hungary": [1.5, 1e-5]}},
    )


def _cells(row: SiteRoundMetrics) -> dict[str, object]:
    """``row.as_row()`` with NaN as ``"nan"`` (NaN equals nothing, itself included)."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.as_row().items()}


def _same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.round, a.names, a.config, a.backbone_sha256) == (b.round, b.names, b.config, b.backbone_sha256)
    for x, y in zip(a.arrays, b.arrays, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert a.strategy_state.keys() == b.strategy_state.keys()
    for key in a.strategy_state:
        assert all(np.array_equal(x, y) for x, y in zip(a.strategy_state[key], b.strategy_state[key], strict=True))
    assert _cells(a.rows[0]) == _cells(b.rows[0])
    assert math.isnan(b.rows[1].auc) and b.rows[1].site == "Switzerland"
    assert (a.upload_bytes, a.backbone_bytes, a.failures, a.segments) == (b.upload_bytes, b.backbone_bytes, b.failures, b.segments)
    assert a.training_privacy == b.training_privacy


def test_round_trip_is_exact(tmp_path: Path) -> None:
    # Prepare
    ckpt = _checkpoint()

    # Execute
    path = save_checkpoint(tmp_path, ckpt)
    loaded = load_checkpoint(tmp_path)

    # Assert
    assert path == tmp_path / CHECKPOINT_FILE
    assert loaded is not None
    _same(ckpt, loaded)
    assert load_checkpoint(tmp_path / "empty") is None


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: round 1 is on disk; the write of round 2 dies after its bytes hit the temporary file
    save_checkpoint(tmp_path, _checkpoint(1))

    def power_cut(_fd: int) -> None:
        raise OSError("power cut")

    monkeypatch.setattr("shared.atomic.os.fsync", power_cut)

    # Execute
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()

    # Assert: round 1 intact, no temporary file left
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1
    _same(_checkpoint(1), loaded)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    data = checkpoint_bytes(_checkpoint())
    for bad in (data[: len(data) // 2], b"not a checkpoint", data[:-200] + bytes(200)):
        (tmp_path / CHECKPOINT_FILE).write_bytes(bad)
        with pytest.raises(IntegrityError, match="cannot be resumed"):
            load_checkpoint(tmp_path)
    other = io.BytesIO()
    np.savez(other, meta=np.array(json.dumps({"format": "someone-elses", "version": 1})))
    with pytest.raises(IntegrityError, match="not a CareFL checkpoint"):
        checkpoint_from_bytes(other.getvalue())


def test_fedadam_moments_are_carried_over() -> None:
    # Prepare
    cfg = RunConfig.of(strategy="fedadam", dp=False)
    initial = [np.zeros((2, 32), np.float32), np.zeros(2, np.float32)]
    source = make_strategy(cfg, initial, FederationRecorder(), fit_config=dict, evaluate_config=dict)
    source.m_t = [np.full((2, 32), 0.1), np.full(2, 0.2)]  # type: ignore[attr-defined]
    source.v_t = [np.full((2, 32), 0.3), np.full(2, 0.4)]  # type: ignore[attr-defined]
    target = make_strategy(cfg, initial, FederationRecorder(), fit_config=dict, evaluate_config=dict)

    # Execute
    state = strategy_state(source)
    restore_strategy_state(target, state)

    # Assert
    assert sorted(state) == ["m_t", "v_t"]
    assert np.array_equal(target.v_t[1], np.full(2, 0.4))  # type: ignore[attr-defined]
    assert strategy_state(make_strategy(cfg.with_overrides(strategy="fedavg"), initial, FederationRecorder(),
                                        fit_config=dict, evaluate_config=dict)) == {}  # fmt: skip
    with pytest.raises(ConfigError, match="m_t"):
        restore_strategy_state(FedAvg(), state)


def test_resume_refuses_what_would_not_continue_the_same_run(tmp_path: Path) -> None:
    # Prepare
    cfg = RunConfig.of(checkpoint_dir=str(tmp_path), strategy="fedadam")
    sha = "ab" * 32

    # Execute / Assert: nothing to resume
    with pytest.raises(ConfigError, match="nothing to resume"):
        RunCheckpoints(cfg.with_overrides(resume=True), NAMES, sha, 1).resume_point()
    save_checkpoint(tmp_path, _checkpoint(2, cfg))
    # a new run would overwrite it
    with pytest.raises(ConfigError, match="set `resume` = true"):
        RunCheckpoints(cfg, NAMES, sha, 1).resume_point()
    # another computation
    with pytest.raises(ConfigError, match="learning-rate: 0.05 -> 0.1"):
        RunCheckpoints(cfg.with_overrides(resume=True, learning_rate=0.1), NAMES, sha, 1).resume_point()
    with pytest.raises(ConfigError, match="backbone"):
        RunCheckpoints(cfg.with_overrides(resume=True), NAMES, "cd" * 32, 1).resume_point()
    with pytest.raises(ConfigError, match="tensors"):
        RunCheckpoints(cfg.with_overrides(resume=True), ["head.weight"], sha, 1).resume_point()
    # where things are may change
    moved = cfg.with_overrides(resume=True, run_dir="/elsewhere", stage_timeout=30.0)
    resumed = RunCheckpoints(moved, NAMES, sha, 7)
    assert resumed.resume_point() is not None and resumed.done == 2
    assert resumed.segments(3)[-1] == {"flower_run_id": 7, "first_round": 3, "last_round": 3}
    assert resumed.segments(2) == [{"flower_run_id": 11, "first_round": 1, "last_round": 2}]  # nothing left to run
    with pytest.raises(ConfigError, match="checkpoint-dir"):
        RunConfig.of(resume=True)


def test_rounds_are_renumbered_and_checkpointed_after_evaluation() -> None:
    # Prepare: DefaultWorkflow has set round 1 of a run resumed after round 4
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=FedAvg(),
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    seen: list[tuple[str, int]] = []

    def fit(_grid: object, ctx: LegacyContext) -> None:
        seen.append(("fit", int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])))  # type: ignore[arg-type]

    def evaluate(_grid: object, ctx: LegacyContext) -> None:
        seen.append(("evaluate", int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])))  # type: ignore[arg-type]

    # Execute
    ResumedRounds(fit, offset=4, total=5)(None, context)  # type: ignore[arg-type]
    CheckpointAfterRound(evaluate, lambda r: seen.append(("saved", r)))(None, context)  # type: ignore[arg-type]

    # Assert
    assert seen == [("fit", 5), ("evaluate", 5), ("saved", 5)]


def test_privacy_across_runs_sums_each_runs_last_round() -> None:
    rows = [
        SiteRoundMetrics(1, "A", 10, 0.5, 0.5, 0.5, epsilon=1.0, delta=1e-5),
        SiteRoundMetrics(2, "A", 10, 0.5, 0.5, 0.5, epsilon=2.0, delta=1e-5),
        SiteRoundMetrics(3, "A", 10, 0.5, 0.5, 0.5, epsilon=1.1, delta=1e-5),
        SiteRoundMetrics(3, "B", 10, 0.5, 0.5, 0.5),
    ]
    segments = [{"flower_run_id": 1, "first_round": 1, "last_round": 2}, {"flower_run_id": 2, "first_round": 3, "last_round": 3}]
    total = privacy_across_runs(rows, segments)
    assert total == {"A": {"epsilon": pytest.approx(3.1), "delta": pytest.approx(2e-5)}}


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_model(heart_registry: Path, tmp_path: Path) -> None:
    # Prepare: FedAdam, whose server moments must carry over. DP and SecAgg+ off: DP noise is fresh
    # in each run, and SecAgg+ rounds stochastically, which FedAdam's m/sqrt(v) step amplifies
    # where an update is near zero. While round 3 is evaluated, the checkpoint on disk is still
    # round 2's: copy it, as a crash during round 3 would have left it.
    cfg = RunConfig.of(
        registry_dir=str(heart_registry), num_rounds=3, local_epochs=1, dp=False, strategy="fedadam",
        secure_aggregation=False, checkpoint_dir=str(tmp_path / "full"),
    )  # fmt: skip
    crashed = tmp_path / "crashed"

    def keep_round_2(server_round: int, _rows: list[SiteRoundMetrics]) -> None:
        if server_round == 3:
            crashed.mkdir()
            shutil.copy(tmp_path / "full" / CHECKPOINT_FILE, crashed / CHECKPOINT_FILE)

    policy = SitePolicy(require_dp=False)

    # Execute
    full = simulate(cfg, num_sites=3, sites_root=tmp_path / "sites", recorder=FederationRecorder(listeners=[keep_round_2]), policy=policy)
    resumed = simulate(cfg.with_overrides(checkpoint_dir=str(crashed), resume=True), num_sites=3, sites_root=tmp_path / "sites", policy=policy)

    # Assert
    ckpt = load_checkpoint(crashed)
    assert ckpt is not None and ckpt.round == 3 and sorted(ckpt.strategy_state) == ["m_t", "v_t"]
    for a, b in zip(full.parameters, resumed.parameters, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [(r.round, r.site) for r in resumed.rows] == [(r.round, r.site) for r in full.rows]
    for a_row, b_row in zip(full.final_rows(), resumed.final_rows(), strict=True):
        assert a_row.accuracy == pytest.approx(b_row.accuracy) and a_row.loss == pytest.approx(b_row.loss, rel=1e-4)
    assert full.resumed is None
    assert resumed.resumed is not None and resumed.resumed["resumed_after_round"] == 2
    # Each run, the resumed one too, sent its final model home to every site
    assert resumed.card is not None and resumed.card["delivered_to"] == ["Hungary", "Switzerland", "VA Long Beach"]
    for site_dir in sorted((tmp_path / "sites").iterdir()):
        held = {(folder / "model.pt").read_bytes() for folder in list_site_models(site_dir)}
        assert held == {full.model_bytes(), resumed.model_bytes()}


def test_a_checkpoint_from_before_the_clinical_metrics_still_loads() -> None:
    # Prepare: today's checkpoint with its rows cut to the fields an older version wrote
    from server.metrics import CLINICAL_NAMES

    with np.load(io.BytesIO(checkpoint_bytes(_checkpoint())), allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta["rows"] = [{k: v for k, v in row.items() if k not in CLINICAL_NAMES} for row in meta["rows"]]
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)

    # Execute
    loaded = checkpoint_from_bytes(buffer.getvalue())

    # Assert
    assert loaded.rows[0].epsilon == 1.5
    assert all(math.isnan(getattr(loaded.rows[0], name)) for name in CLINICAL_NAMES)

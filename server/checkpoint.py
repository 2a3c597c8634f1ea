"""Server checkpoints: a federation killed mid-run continues from its last completed round.

After every round (training, aggregation, federated evaluation if the round has one) the ServerApp writes one file,
``<checkpoint-dir>/checkpoint.npz``, atomically (temporary file, fsync, rename: a crash while
writing leaves the previous checkpoint). It holds:

- the global exchanged tensors,
- the strategy's own state (FedAdam/FedYogi's first and second moments ``m_t``/``v_t``; FedAvg
  and FedProx keep none beyond the global model),
- the round, the run config, the recorder's history (per-site metrics, bytes, failures) and the
  Flower runs that produced it.

A new run with ``resume = true`` and the same ``checkpoint-dir`` (and the same study,
:class:`~shared.config.StudyConfig`; the server's and the simulation's settings may change) starts
from it: the strategy starts from the checkpointed model
and moments, and Flower's ``DefaultWorkflow`` runs only the remaining rounds, numbered as in the
interrupted run (sites seed their training by round). Without DP, the final model equals the one
an uninterrupted run would have produced.

Privacy across a resume: each site's ledger keys charges by Flower run id, so the epsilon a site
reports after the resume covers the rounds run since. The model card then also states, per site,
the sum over the Flower runs (basic composition, an upper bound) of the epsilon each reported.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from flwr.server import Grid
from flwr.server.compat import LegacyContext
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from pydantic import Field, ValidationError

from server.distribution import Workflow
from server.metrics import SiteRoundMetrics
from server.recorder import FederationRecorder
from shared.atomic import atomic_write_bytes
from shared.config import RunConfig
from shared.errors import ConfigError, IntegrityError
from shared.log import log
from shared.schema import Document, problem

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = "carefl-checkpoint"
VERSION = 1
MOMENTS: tuple[str, ...] = ("m_t", "v_t")
"""Strategy attributes carried across a resume (those of ``flwr.server.strategy.FedAdam``/``FedYogi``)."""


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after its last completed round.

    Attributes
    ----------
    round : int
        Last completed round.
    names : list[str]
        Keys of the exchanged tensors.
    arrays : list[np.ndarray]
        Their global values after ``round``.
    strategy_state : dict[str, list[np.ndarray]]
        The strategy's state by attribute (see :data:`MOMENTS`).
    config : dict[str, Any]
        The run config (kebab-case keys).
    backbone_sha256 : str
        SHA-256 of the backbone (empty: trained from scratch).
    rows : list[SiteRoundMetrics]
        Per-site federated evaluation of rounds 1 to ``round``.
    upload_bytes : dict[int, list[int]]
        Per round, the bytes each site uploaded.
    backbone_bytes : dict[int, int]
        Per node, the backbone bytes sent to it.
    failures : dict[int, list[str]]
        Per round, why sites failed or declined.
    segments : list[dict[str, int]]
        The Flower runs that produced it: ``{"flower_run_id", "first_round", "last_round"}``.
    training_privacy : dict[int, dict[str, list[float]]]
        Per round, per site, the ``[epsilon, delta]`` the site reported when it trained it: with
        ``evaluate-in-fit`` the model after ``round`` is evaluated in the next run, whose own
        ledger run has spent nothing yet, so its row takes them from here.
    """

    round: int
    names: list[str]
    arrays: list[np.ndarray]
    strategy_state: dict[str, list[np.ndarray]]
    config: dict[str, Any]
    backbone_sha256: str
    rows: list[SiteRoundMetrics] = field(default_factory=list)
    upload_bytes: dict[int, list[int]] = field(default_factory=dict)
    backbone_bytes: dict[int, int] = field(default_factory=dict)
    failures: dict[int, list[str]] = field(default_factory=dict)
    segments: list[dict[str, int]] = field(default_factory=list)
    training_privacy: dict[int, dict[str, list[float]]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ file format
class _Meta(Document):
    """The JSON document ``meta`` of a checkpoint: all but the arrays, stored beside it.

    JSON keys are strings: the rounds and node ids keying ``upload_bytes``, ``backbone_bytes``
    and ``failures`` are read back as integers.
    """

    format: Literal["carefl-checkpoint"]
    version: Literal[1]
    round: int = Field(ge=0)
    names: list[str]
    strategy_state: dict[str, int]
    config: dict[str, Any]
    backbone_sha256: str
    rows: list[SiteRoundMetrics]
    upload_bytes: dict[int, list[int]]
    backbone_bytes: dict[int, int]
    failures: dict[int, list[str]]
    segments: list[dict[str, int]]
    training_privacy: dict[int, dict[str, list[float]]] = Field(default_factory=dict)


_STAMP = ((), ("format",), ("version",))
"""Where an error means the document is not a checkpoint of this version at all."""


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """Serialize ``ckpt`` as an ``.npz`` archive (arrays plus one JSON document; no pickle)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "round": ckpt.round,
        "names": ckpt.names,
        "strategy_state": {key: len(values) for key, values in ckpt.strategy_state.items()},
        "config": ckpt.config,
        "backbone_sha256": ckpt.backbone_sha256,
        "rows": [r.as_row() for r in ckpt.rows],
        "upload_bytes": {str(k): v for k, v in ckpt.upload_bytes.items()},
        "backbone_bytes": {str(k): v for k, v in ckpt.backbone_bytes.items()},
        "failures": {str(k): v for k, v in ckpt.failures.items()},
        "segments": ckpt.segments,
        "training_privacy": {str(k): v for k, v in ckpt.training_privacy.items()},
    }
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    arrays.update({f"global/{i}": np.asarray(a) for i, a in enumerate(ckpt.arrays)})
    for key, values in ckpt.strategy_state.items():
        arrays.update({f"strategy/{key}/{i}": np.asarray(a) for i, a in enumerate(values)})
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def checkpoint_from_bytes(data: bytes, source: str = "checkpoint") -> Checkpoint:
    """Parse what :func:`checkpoint_bytes` wrote.

    Raises
    ------
    IntegrityError
        If the content is truncated, altered or of another format.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = _read_meta(str(archive["meta"][()]), source)
            arrays = [archive[f"global/{i}"] for i in range(len(meta.names))]
            state = {
                key: [archive[f"strategy/{key}/{i}"] for i in range(count)]
                for key, count in meta.strategy_state.items()
            }
    except IntegrityError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as err:
        raise IntegrityError(f"{source} is damaged or truncated ({type(err).__name__}: {err}); it cannot be resumed from.") from err
    return Checkpoint(
        round=meta.round,
        names=meta.names,
        arrays=arrays,
        strategy_state=state,
        config=meta.config,
        backbone_sha256=meta.backbone_sha256,
        rows=meta.rows,
        upload_bytes=meta.upload_bytes,
        backbone_bytes=meta.backbone_bytes,
        failures=meta.failures,
        segments=meta.segments,
        training_privacy=meta.training_privacy,
    )


def _read_meta(text: str, source: str) -> _Meta:
    """Parse the checkpoint's JSON document ``meta``.

    Raises
    ------
    IntegrityError
        If it is not a CareFL checkpoint of this version, or is damaged (naming the first
        invalid key).
    """
    try:
        return _Meta.model_validate_json(text)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        if first["type"] != "json_invalid" and first["loc"][:1] in _STAMP:
            kind = f"a CareFL checkpoint of version {VERSION}"
            raise IntegrityError(f"{source} is not {kind}.") from None
        reason = problem(err, spell=_Meta.key_of)
        raise IntegrityError(f"{source} is damaged or truncated ({reason}); it cannot be resumed from.") from None


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``directory/checkpoint.npz`` atomically; returns the file's path."""
    path = Path(directory) / CHECKPOINT_FILE
    atomic_write_bytes(path, checkpoint_bytes(ckpt))
    return path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Read ``directory/checkpoint.npz``; ``None`` if there is none.

    Raises
    ------
    IntegrityError
        If the file is damaged.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return checkpoint_from_bytes(path.read_bytes(), source=str(path))


# --------------------------------------------------------------------- strategy and recorder
def strategy_state(strategy: object) -> dict[str, list[np.ndarray]]:
    """The strategy's moments (:data:`MOMENTS`) that are set, copied."""
    state: dict[str, list[np.ndarray]] = {}
    for key in MOMENTS:
        values = getattr(strategy, key, None)
        if values:
            state[key] = [np.array(a, copy=True) for a in values]
    return state


def restore_strategy_state(strategy: object, state: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Put checkpointed moments back on ``strategy``.

    Raises
    ------
    ConfigError
        If the strategy has no such attribute (the checkpoint is of another strategy).
    """
    for key, values in state.items():
        if not hasattr(strategy, key):
            raise ConfigError(f"the checkpoint holds `{key}`, which strategy {type(strategy).__name__} does not have.")
        setattr(strategy, key, [np.array(a, copy=True) for a in values])


def restore_recorder(recorder: FederationRecorder, ckpt: Checkpoint) -> None:
    """Put the checkpointed history in ``recorder`` (listeners are not called again)."""
    recorder.rows.extend(ckpt.rows)
    recorder.upload_bytes.update(ckpt.upload_bytes)
    recorder.backbone_bytes.update(ckpt.backbone_bytes)
    for server_round, reasons in ckpt.failures.items():
        recorder.failures.setdefault(server_round, []).extend(reasons)
    recorder.final_parameters = [a.copy() for a in ckpt.arrays]
    for server_round, sites in ckpt.training_privacy.items():
        for site, (epsilon, delta) in sites.items():
            recorder.add_training_privacy(server_round, site, (epsilon, delta))


def check_compatible(ckpt: Checkpoint, cfg: RunConfig, names: Sequence[str], backbone_sha256: str, source: str) -> None:
    """Refuse to resume ``ckpt`` under another computation than the one it was taken of.

    Raises
    ------
    ConfigError
        If a study value (what is computed), the exchanged tensors or the backbone differ.
    """
    current = cfg.study.to_run_config()
    changed = sorted(key for key in current if current[key] != ckpt.config.get(key))
    if changed:
        details = ", ".join(f"{k}: {ckpt.config.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"{source} was taken with another run config ({details}); resume with the same values.")
    if list(names) != ckpt.names:
        raise ConfigError(f"{source} holds tensors {ckpt.names}, this run exchanges {list(names)}.")
    if backbone_sha256 != ckpt.backbone_sha256:
        raise ConfigError(
            f"{source} was taken with backbone {ckpt.backbone_sha256[:16] or 'none'}..., "
            f"this run resolves {backbone_sha256[:16] or 'none'}...; refused."
        )


def privacy_across_runs(rows: Sequence[SiteRoundMetrics], segments: Sequence[Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """Per site, the sum over Flower runs of the (epsilon, delta) reported at each run's last round.

    A site's ledger keys charges by Flower run: summing is basic composition, an upper bound
    (it leaves out charges of a round a crash interrupted, which the ledger still holds).
    """
    total: dict[str, dict[str, float]] = {}
    for segment in segments:
        for row in rows:
            if row.round == segment["last_round"] and math.isfinite(row.epsilon):
                site = total.setdefault(row.site, {"epsilon": 0.0, "delta": 0.0})
                site["epsilon"] += row.epsilon
                site["delta"] += row.delta
    return total


# ------------------------------------------------------------------------------ round loop
def current_round(context: LegacyContext) -> int:
    """The round ``DefaultWorkflow`` is in (as renumbered by :class:`ResumedRounds`)."""
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


class ResumedRounds:
    """Fit workflow wrapper: ``DefaultWorkflow`` counts rounds from 1; shift them by ``offset``.

    ``DefaultWorkflow`` sets the round before the fit workflow, which every later step of the
    round (SecAgg+, the strategy's configs, evaluation) reads back: round ``i`` of a run resumed
    after round ``offset`` is round ``offset + i`` of the federation.
    """

    def __init__(self, inner: Workflow, offset: int, total: int) -> None:
        self._inner = inner
        self._offset = offset
        self._total = total

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Renumber the round, then run the inner fit workflow."""
        record = context.state.config_records[MAIN_CONFIGS_RECORD]
        record[Key.CURRENT_ROUND] = int(cast(int, record[Key.CURRENT_ROUND])) + self._offset
        if self._offset:
            log(INFO, "round %d of %d (resumed after round %d)", current_round(context), self._total, self._offset)
        self._inner(grid, context)


class CheckpointAfterRound:
    """Evaluate workflow wrapper: after the round's evaluation, call ``save(round)``."""

    def __init__(self, inner: Workflow, save: Callable[[int], None]) -> None:
        self._inner = inner
        self._save = save

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Run the inner evaluate workflow, then checkpoint the round."""
        self._inner(grid, context)
        self._save(current_round(context))


class RunCheckpoints:
    """The checkpoints of one federated run in its ``checkpoint-dir`` (none if that is empty).

    Parameters
    ----------
    cfg : RunConfig
        The run's config: ``checkpoint-dir``, and ``resume`` to continue the checkpoint there.
    names : Sequence[str]
        Keys of the exchanged tensors.
    backbone_sha256 : str
        The resolved backbone's SHA-256 (empty without one).
    flower_run_id : int
        This Flower run's id.
    """

    def __init__(self, cfg: RunConfig, names: Sequence[str], backbone_sha256: str, flower_run_id: int) -> None:
        self.directory = Path(cfg.server.checkpoint_dir) if cfg.server.checkpoint_dir else None
        self.cfg = cfg
        self.names = list(names)
        self.backbone_sha256 = backbone_sha256
        self.flower_run_id = int(flower_run_id)
        self.start: Checkpoint | None = None

    def resume_point(self) -> Checkpoint | None:
        """Load the checkpoint to continue from (``resume = true``), or check there is none.

        Raises
        ------
        ConfigError
            If ``resume`` is set and there is no checkpoint, or it belongs to another
            computation; or if ``resume`` is not set and a checkpoint would be overwritten.
        IntegrityError
            If the checkpoint is damaged.
        """
        if self.directory is None:
            return None
        existing = load_checkpoint(self.directory)
        source = str(self.directory / CHECKPOINT_FILE)
        if not self.cfg.server.resume:
            if existing is not None:
                raise ConfigError(
                    f"{source} holds round {existing.round} of a run; set `resume` = true to continue it, "
                    "or choose an empty `checkpoint-dir`."
                )
            return None
        if existing is None:
            raise ConfigError(f"`resume` = true but {source} does not exist: nothing to resume.")
        check_compatible(existing, self.cfg, self.names, self.backbone_sha256, source)
        log(INFO, "resuming from %s: round %d of %d done", source, existing.round, self.cfg.study.num_rounds)
        self.start = existing
        return existing

    @property
    def done(self) -> int:
        """Rounds completed before this run started."""
        return self.start.round if self.start else 0

    def restore(self, strategy: object, recorder: FederationRecorder) -> None:
        """Put the checkpointed strategy state and history in place (no-op without one)."""
        if self.start is not None:
            restore_strategy_state(strategy, self.start.strategy_state)
            restore_recorder(recorder, self.start)

    def workflow(
        self, fit: Workflow, strategy: Any, recorder: FederationRecorder, evaluate: Workflow = default_evaluate_workflow
    ) -> DefaultWorkflow:
        """``DefaultWorkflow`` running the remaining rounds (``fit``, then ``evaluate``) and checkpointing after each.

        ``strategy`` must expose ``global_arrays`` (:class:`server.strategy.DeltaMixin`).
        """
        directory = self.directory
        if directory is None:
            return DefaultWorkflow(fit_workflow=fit, evaluate_workflow=evaluate)

        def save(server_round: int) -> None:
            ckpt = Checkpoint(
                round=server_round,
                names=self.names,
                arrays=strategy.global_arrays,
                strategy_state=strategy_state(strategy),
                config=self.cfg.to_run_config(),
                backbone_sha256=self.backbone_sha256,
                rows=list(recorder.rows),
                upload_bytes=dict(recorder.upload_bytes),
                backbone_bytes=dict(recorder.backbone_bytes),
                failures={k: list(v) for k, v in recorder.failures.items()},
                segments=self.segments(server_round),
                training_privacy={
                    r: {site: list(values) for site, values in sites.items()}
                    for r, sites in recorder.training_privacy.items()
                },
            )
            path = save_checkpoint(directory, ckpt)
            log(INFO, "checkpoint of round %d written: %s", server_round, path)

        return DefaultWorkflow(
            fit_workflow=ResumedRounds(fit, self.done, self.cfg.study.num_rounds),
            evaluate_workflow=CheckpointAfterRound(evaluate, save),
        )

    def segments(self, last_round: int) -> list[dict[str, int]]:
        """The Flower runs of this federation, this one ending at ``last_round`` (if it ran a round)."""
        before = list(self.start.segments) if self.start else []
        if last_round <= self.done:  # resumed after the last round: nothing left to run
            return before
        return [*before, {"flower_run_id": self.flower_run_id, "first_round": self.done + 1, "last_round": last_round}]

    def card(self, rows: Sequence[SiteRoundMetrics]) -> dict[str, Any] | None:
        """What the model card says about the resume (``None`` if this run did not resume)."""
        if self.start is None:
            return None
        segments = self.segments(self.cfg.study.num_rounds)
        return {
            "resumed_after_round": self.start.round,
            "flower_runs": segments,
            "privacy_per_site_all_runs": privacy_across_runs(rows, segments),
            "privacy_note": (
                "each site's ledger charges by Flower run: the per-site epsilon of the final round covers "
                "the rounds since the resume; privacy_per_site_all_runs sums the runs (basic composition, "
                "an upper bound). A round interrupted by the crash may have been charged too: see each "
                "site's ledger (`carefl budget`)."
            ),
        }


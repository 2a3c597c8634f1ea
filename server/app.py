"""The CareFL ServerApp, run by the consortium.

It resolves and verifies the backbone, builds the initial exchanged tensors, distributes the
backbone once, then runs Flower's legacy ``DefaultWorkflow`` (the path secure aggregation
needs) with a delta-aware strategy, and at the end sends the final model to the sites still
connected (:mod:`server.model_delivery`). By default (``evaluate-in-fit``) each site evaluates the
model it receives in the fit message that trains on it, and only the final model is sent for
evaluation on its own (:class:`FinalEvaluation`). ``app`` is what ``flwr run`` loads;
:func:`create_server_app` lets a local simulation pass its typed config and a recorder.
"""

from __future__ import annotations

import logging
import threading
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import Scalar
from flwr.common.logger import FLOWER_LOGGER
from flwr.server import Grid, ServerApp, ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow

from server.checkpoint import RunCheckpoints, current_round
from server.distribution import BackboneDistribution, Workflow
from server.model_delivery import deliver_model
from server.progress import RoundLog, stop_line
from server.recorder import FederationRecorder
from server.report.result import FederationResult, federation_card, write_run_folder
from server.secure import SecureFitWorkflow
from server.stoppable import SitesPresent, StoppableGrid
from server.strategy import make_strategy
from shared.backbones import BackboneRegistry, ResolvedBackbone
from shared.config import RunConfig
from shared.errors import CareFLError, IntegrityError
from shared.log import log
from shared.offline import configure_flower_env
from shared.params import exchanged_names, full_model_bytes, get_arrays
from shared.pipeline import Pretrained, build_model, effective_trainable
from shared.protocol import EVALUATE_INCOMING_KEY, ROUND_KEY

DISTRIBUTION_TIMEOUT_S = 600.0


def backbone_registry(cfg: RunConfig) -> BackboneRegistry:
    """The registry ``cfg`` names: its registry directory and operator weights file."""
    return BackboneRegistry(
        Path(cfg.server.registry_dir) if cfg.server.registry_dir else None,
        weights_file=Path(cfg.server.backbone_weights) if cfg.server.backbone_weights else None,
    )


def resolve_backbone(cfg: RunConfig) -> ResolvedBackbone | None:
    """Resolve and verify the backbone of a transfer run (``None`` otherwise)."""
    if cfg.study.setup != "transfer":
        return None
    resolved = backbone_registry(cfg).resolve(cfg.study.backbone)
    if cfg.study.backbone_sha256 and resolved.manifest.sha256 != cfg.study.backbone_sha256:
        raise IntegrityError(
            f"backbone {cfg.study.backbone!r} has SHA-256 {resolved.manifest.sha256[:16]}..., but the "
            f"run config requires {cfg.study.backbone_sha256[:16]}...; refused."
        )
    return resolved


def site_config(cfg: RunConfig, backbone: ResolvedBackbone | None) -> dict[str, Scalar]:
    """Return what sites receive: the study, with the backbone's hash pinned.

    Only :class:`~shared.config.StudyConfig` travels; the server's settings and the
    simulation's never leave the server.
    """
    pinned = cfg.study.model_copy(update={"backbone_sha256": backbone.manifest.sha256 if backbone else ""})
    return dict(pinned.to_run_config())


def fit_workflow(cfg: RunConfig, recorder: FederationRecorder) -> Workflow:
    """Return the fit workflow of one round: SecAgg+ when configured, else Flower's default.

    SecAgg+'s clipping range is the sites' delta bound, so its quantizer never saturates.
    """
    if not cfg.study.secure_aggregation:
        return default_fit_workflow
    return SecureFitWorkflow(cfg.secagg, recorder)


class FinalEvaluation:
    """Evaluate workflow that evaluates only the final model (the sites evaluated the others in their fit messages).

    Parameters
    ----------
    last_round : int
        The federation's last round (``num-rounds``); the rounds before it send no evaluate message.
    inner : Workflow
        The evaluate workflow run after the last round.
    """

    def __init__(self, last_round: int, inner: Workflow = default_evaluate_workflow) -> None:
        self.last_round = last_round
        self._inner = inner

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Run the inner workflow if this is the last round."""
        if current_round(context) == self.last_round:
            self._inner(grid, context)


def evaluate_workflow(cfg: RunConfig) -> Workflow:
    """The evaluate workflow of every round: after each round, or (``evaluate-in-fit``) after the last only."""
    if cfg.server.evaluate_in_fit:
        return FinalEvaluation(cfg.study.num_rounds)
    return default_evaluate_workflow


def run_federation(
    grid: Grid, context: Context, cfg: RunConfig, recorder: FederationRecorder, stop: threading.Event | None = None
) -> FederationResult:
    """Run the federation described by ``cfg`` on ``grid``, then send the sites the final model; returns the result.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    context : Context
        The ServerApp's context.
    cfg : RunConfig
        The validated run configuration.
    recorder : FederationRecorder
        Collects metrics and byte counts as the run goes.
    stop : threading.Event, optional
        Ends every wait of the run when set.
    """
    backbone = resolve_backbone(cfg)
    pretrained = Pretrained(backbone.manifest, backbone.path) if backbone else None
    model = build_model(cfg.study, pretrained)
    names = exchanged_names(model, effective_trainable(cfg.study))
    checkpoints = RunCheckpoints(cfg, names, backbone.manifest.sha256 if backbone else "", context.run_id)
    start = checkpoints.resume_point()
    initial = start.arrays if start else get_arrays(model, names)
    sent = site_config(cfg, backbone)
    log(
        INFO,
        "CareFL %s (%s): backbone %s, %d exchanged tensors, %d rounds, strategy %s",
        cfg.study.task, cfg.study.setup, backbone.manifest.name if backbone else "none (from scratch)",
        len(names), cfg.study.num_rounds, cfg.study.strategy,
    )  # fmt: skip

    def round_config(server_round: int) -> dict[str, Scalar]:
        return {**sent, ROUND_KEY: server_round}

    def train_config(server_round: int) -> dict[str, Scalar]:
        # With evaluate-in-fit, each site evaluates the model it receives before it trains on it.
        return {**round_config(server_round), **({EVALUATE_INCOMING_KEY: True} if cfg.server.evaluate_in_fit else {})}

    strategy = make_strategy(cfg, initial, recorder, fit_config=train_config, evaluate_config=round_config)
    checkpoints.restore(strategy, recorder)
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.study.num_rounds - checkpoints.done), strategy=strategy
    )
    fit = SitesPresent(
        BackboneDistribution(fit_workflow(cfg, recorder), backbone, recorder, timeout=DISTRIBUTION_TIMEOUT_S),
        minimum=cfg.study.min_sites,
        timeout=cfg.server.stage_timeout,
        stop=stop,
    )
    checkpoints.workflow(fit, strategy, recorder, evaluate=evaluate_workflow(cfg))(grid, legacy)
    if recorder.dropped_rows:
        dropped = ", ".join(f"{site} {n}" for site, n in sorted(recorder.dropped_rows.items()))
        log(INFO, "rows the sites' preprocessing dropped (a missing value): %s", dropped)
    result = FederationResult(
        config=cfg,
        manifest=backbone.manifest if backbone else None,
        names=names,
        parameters=strategy.global_arrays,  # type: ignore[attr-defined]
        rows=list(recorder.rows),
        upload_bytes=dict(recorder.upload_bytes),
        full_model_bytes=full_model_bytes(model),
        backbone_bytes=dict(recorder.backbone_bytes),
        resumed=checkpoints.card(recorder.rows),
        dropped_rows=dict(recorder.dropped_rows),
        class_balance=dict(recorder.class_balance),
    )
    # The card is built once: the sites receive it with the model, the run folder adds who stored it.
    card = federation_card(result)
    delivery = deliver_model(grid, result.model_bytes(), card, timeout=cfg.server.stage_timeout)
    delivered = delivery.card()
    left = sorted(set(result.sites) - set(delivered["delivered_to"]))
    delivered["not_reached"] = {
        "sites": left,
        "note": "sites that took part but were not connected at the end received nothing, and cannot fetch "
        "the model later: CareFL sends a model only to the nodes present when the run ends",
    }
    result.card = {**card, **delivered}
    return result


def create_server_app(
    config: RunConfig | None = None,
    recorder: FederationRecorder | None = None,
    results: list[FederationResult] | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """Build the ServerApp.

    Parameters
    ----------
    config : RunConfig, optional
        The run's configuration, already validated (a local simulation); by default it is
        read from ``context.run_config``.
    recorder : FederationRecorder, optional
        Receives metrics as rounds finish (e.g. for a live table).
    results : list[FederationResult], optional
        The finished run's result is appended here.
    stop : threading.Event, optional
        Ends the run within a fraction of a second when set (a local simulation sets it on
        Ctrl-C or SIGTERM); see :class:`server.stoppable.StoppableGrid`.
    """
    configure_flower_env()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = config or RunConfig.from_run_config(context.run_config)
            if stop is not None:
                grid = StoppableGrid(grid, stop)
            listeners = [RoundLog(cfg.study.num_rounds)]
            result = run_federation(grid, context, cfg, recorder or FederationRecorder(listeners=listeners), stop)
            if cfg.server.run_dir:
                write_run_folder(Path(cfg.server.run_dir), result)
                log(INFO, "run folder written: %s", cfg.server.run_dir)
        except CareFLError as err:
            if config is None:  # loaded by Flower (`flwr run`); a local caller reports errors itself
                report_stop(err)
            raise  # Flower marks the run failed (exit code 201), without the traceback
        if results is not None:
            results.append(result)

    return app


def report_stop(err: CareFLError) -> None:
    """Log why the run stops in one line, and keep Flower from adding the traceback of ``err``.

    Flower logs every exception that leaves a ServerApp with its traceback ("ServerApp raised an
    exception" in a deployment, "Simulation raised an exception" under ``flwr run`` with a
    simulation SuperLink), then marks the run failed. For a CareFL error the cause is already
    said: the traceback of that one exception is dropped from Flower's record, which keeps its
    line and the run's failed status and exit code.
    """
    log(ERROR, "%s", stop_line(err))
    setattr(err, _REPORTED, True)  # noqa: B010 - marks this one exception object
    if not any(isinstance(f, _ReportedErrors) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_ReportedErrors())


_REPORTED = "_carefl_reported"


class _ReportedErrors(logging.Filter):
    """A filter on Flower's logger: records of an error :func:`report_stop` reported lose their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if getattr(error, _REPORTED, False):
            record.exc_info = None
            record.exc_text = None
        return True


app = create_server_app()

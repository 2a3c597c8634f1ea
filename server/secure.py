"""Secure aggregation on the server: Flower's SecAgg+ with CareFL's checks and clear failures.

:class:`SecureFitWorkflow` is Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow`
(unchanged protocol, masks from :mod:`shared.masks`, Shamir shares from :mod:`shared.shamir`)
with three additions:

- every stage waits at most ``stage-timeout`` seconds; a site that does not answer in time is
  a dropped site, as one that answers with an error;
- after the setup stage (public keys only: no update has left a site) it refuses a number of
  sampled sites whose quantized sum could wrap the modulus;
- when a stage leaves fewer sites than the reconstruction threshold, Flower only logs
  "Insufficient available nodes" and returns: here the round is reported as failed, with the
  stage, the sites left and the threshold, in the log and in the recorder's failures, and the
  sites' own reasons (a DP refusal) are kept. The global model is not touched (the strategy
  never aggregates). With fewer sites left than ``min-sites`` the run stops
  (:class:`~server.strategy.FederationStopped`), as without secure aggregation.

Flower 1.41 fails the round when a site drops before its key shares were sent (at setup or
share keys): :func:`_forget_dropped` takes such a site out of the protocol. A site that drops
after its masked vector arrived is still part of the sum: its own mask is reconstructed from
the other sites' shares, as SecAgg+ specifies.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, WARNING
from typing import cast

from flwr.server import Grid
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from server.recorder import FederationRecorder
from server.strategy import FederationStopped, failure_reason
from shared.errors import ConfigError
from shared.log import log
from shared.masks import install_secure_masks
from shared.secagg import SecAggSettings

SHARE_FRACTION = 1.0  # every sampled site receives a share of every other site's secrets
AUTO_THRESHOLD = 2 / 3  # fraction of sampled sites whose shares reconstruct a secret
TRAINING_STAGES = ("collect masked vectors", "unmask")

Stage = Callable[[Grid, LegacyContext, WorkflowState], bool]


class SecureFitWorkflow(SecAggPlusWorkflow):
    """SecAgg+ fit workflow with start-up checks, stage timeouts and reported failures.

    Parameters
    ----------
    settings : SecAggSettings
        Checked parameters of the run (see :meth:`SecAggSettings.check`).
    recorder : FederationRecorder
        Receives the reason of a failed round.
    """

    def __init__(self, settings: SecAggSettings, recorder: FederationRecorder) -> None:
        install_secure_masks()
        super().__init__(
            num_shares=SHARE_FRACTION,
            reconstruction_threshold=settings.threshold or AUTO_THRESHOLD,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            modulus_range=settings.modulus,
            timeout=settings.timeout,
        )
        self.settings = settings
        self.recorder = recorder

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Sample sites, collect their public keys; refuse a sample that could wrap the modulus."""
        ok = self._checked("setup (public keys)", super().setup_stage, grid, context, state)
        sampled = len(state.sampled_node_ids)
        _forget_dropped(state)
        if not ok:
            return False
        try:
            self.settings.check_sites(sampled)
        except ConfigError as error:
            return self._failed(_round(context), str(error))
        return True

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Forward public keys, collect encrypted key shares."""
        ok = self._checked("share keys", super().share_keys_stage, grid, context, state)
        _forget_dropped(state)
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Send the training instructions, collect masked vectors."""
        return self._checked("collect masked vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Collect the shares that remove the masks, then aggregate."""
        return self._checked("unmask", super().unmask_stage, grid, context, state)

    def _checked(self, name: str, stage: Stage, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Run one stage of the parent; report silent sites and a failed stage."""
        server_round = _round(context)
        before = len(state.active_node_ids)
        known_failures = len(state.failures)
        ok = stage(grid, context, state)
        # Flower records an error reply of the collect stage twice; keep one of each.
        state.failures = _unique(state.failures)
        before = before or len(state.sampled_node_ids)  # setup: the parent sampled the sites
        silent = before - len(state.active_node_ids) - (len(state.failures) - known_failures)
        if silent > 0:
            reason = f"round {server_round}, SecAgg+ stage '{name}': {silent} site(s) did not answer within {self.settings.timeout:g} s"
            log(WARNING, "%s; treated as dropped", reason)
            self.recorder.add_failures(server_round, [reason])
        if ok:
            return True
        declined = [failure_reason(f) for f in state.failures]
        for reason in declined:
            log(WARNING, "round %d: a site declined or failed: %s", server_round, reason)
        self.recorder.add_failures(server_round, declined)
        remaining = len(state.active_node_ids)
        minimum = int(getattr(context.strategy, "min_fit_clients", 1))
        if remaining < minimum:
            verb = "trained" if name in TRAINING_STAGES else f"took part in SecAgg+ stage '{name}'"
            raise FederationStopped(
                f"round {server_round}: only {remaining} site(s) {verb}, fewer than min-sites = "
                f"{minimum}; the run stops with the global model of round {server_round - 1}. "
                f"Declined: {' | '.join(declined) or 'none'}"
            )
        return self._failed(
            server_round,
            f"round {server_round}: secure aggregation failed at stage '{name}': "
            f"{remaining} of {len(state.sampled_node_ids)} sampled sites remain, "
            f"below the reconstruction threshold {state.threshold}; the global model is unchanged.",
        )

    def _failed(self, server_round: int, reason: str) -> bool:
        """Report a failed round (the global model stays as it was) and halt SecAgg+."""
        log(ERROR, "%s", reason)
        self.recorder.add_failures(server_round, [reason])
        return False


def _round(context: LegacyContext) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])


def _forget_dropped(state: WorkflowState) -> None:
    """Take sites that dropped before their key shares were sent out of the protocol.

    Flower 1.41 keeps them among the sampled sites, so the unmask stage looks for shares of
    their secrets that nobody holds and fails the round ("Not enough shares"). No surviving
    site masked its vector with them (masks are only derived with sites whose shares arrived),
    so there is nothing of theirs to remove.
    """
    state.sampled_node_ids = set(state.active_node_ids)


def _unique(failures: list[Exception]) -> list[Exception]:
    """``failures`` without a second wrapper of the same reply error."""
    seen: set[int] = set()
    unique = []
    for failure in failures:
        key = id(failure.args[0]) if failure.args else id(failure)
        if key not in seen:
            seen.add(key)
            unique.append(failure)
    return unique

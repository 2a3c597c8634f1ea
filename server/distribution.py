"""Send the pretrained backbone to each site once, before its first training round.

Wraps a fit workflow (Flower's default one, or SecAgg+'s): before each round, nodes that have
not confirmed the backbone get an *offer* (manifest + SHA-256, no weights); only those that
answer ``need`` get the weights. A node that already holds it from an earlier run receives
nothing but the offer. After this, only the exchanged tensors travel.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.server import Grid
from flwr.server.compat import LegacyContext

from server.recorder import FederationRecorder
from shared import protocol as wire
from shared.backbones.registry import ResolvedBackbone
from shared.log import log

STATE_RECORD = "carefl.backbone"
DELIVERED = "delivered"

Workflow = Callable[[Grid, Context], None]


class BackboneDistribution:
    """Fit workflow that distributes the backbone to new nodes, then runs ``inner``.

    Parameters
    ----------
    inner : Workflow
        The fit workflow of one round.
    backbone : ResolvedBackbone, optional
        The verified backbone; ``None`` (training from scratch) distributes nothing.
    recorder : FederationRecorder
        Receives the bytes sent per node.
    timeout : float
        Seconds to wait for the nodes' replies.
    """

    def __init__(
        self,
        inner: Workflow,
        backbone: ResolvedBackbone | None,
        recorder: FederationRecorder,
        *,
        timeout: float,
    ) -> None:
        self._inner = inner
        self._backbone = backbone
        self._recorder = recorder
        self._timeout = timeout

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        """Deliver the backbone where needed, then run the inner fit workflow."""
        if self._backbone is not None:
            record = context.state.config_records.setdefault(STATE_RECORD, ConfigRecord())
            delivered = set(record.get(DELIVERED, []))  # type: ignore[arg-type]
            nodes = sorted(p.node_id for p in context.client_manager.all().values())
            pending = [n for n in nodes if n not in delivered]
            if pending:
                delivered |= self._distribute(grid, pending)
                record[DELIVERED] = sorted(delivered)
        self._inner(grid, context)

    def _distribute(self, grid: Grid, nodes: list[int]) -> set[int]:
        assert self._backbone is not None
        manifest = self._backbone.manifest
        offer = {wire.BACKBONE_SHA256: manifest.sha256, wire.BACKBONE_MANIFEST: manifest.to_json()}
        replies = self._send(grid, nodes, offer)
        have = {n for n, status in replies.items() if status == wire.STATUS_HAVE}
        need = [n for n, status in replies.items() if status == wire.STATUS_NEED]
        if need:
            weights = self._backbone.read_bytes()
            log(INFO, "sending backbone %s (%d bytes) to %d node(s)", manifest.name, len(weights), len(need))
            stored = self._send(grid, need, {**offer, wire.BACKBONE_WEIGHTS: weights})
            for node in stored:
                self._recorder.backbone_bytes[node] = len(weights)
            have |= {n for n, status in stored.items() if status == wire.STATUS_STORED}
        return have

    def _send(self, grid: Grid, nodes: list[int], record: dict[str, str | bytes]) -> dict[int, str]:
        messages = [
            Message(
                content=RecordDict({wire.BACKBONE_RECORD: ConfigRecord(dict(record))}),  # type: ignore[arg-type]
                dst_node_id=node,
                message_type=wire.BACKBONE_MESSAGE_TYPE,
            )
            for node in nodes
        ]
        statuses: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self._timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d refused the backbone: %s", node, reply.error.reason)
                continue
            statuses[node] = str(reply.content.config_records[wire.BACKBONE_RECORD][wire.BACKBONE_STATUS])
        for node in set(nodes) - set(statuses):
            log(WARNING, "node %d did not confirm the backbone", node)
        return statuses

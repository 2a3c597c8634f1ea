"""Send the final global model home: to every site still connected when the last round ends.

After the last round the server sends each node in the grid a message of type
:data:`shared.protocol.MODEL_MESSAGE_TYPE`: ``model.pt``'s bytes (the exchanged tensors; the
sites hold the backbone already, by SHA-256), their SHA-256 and the model card (whose
``model_sha256`` is the same). A site that dropped before the end is no longer in the grid and
gets nothing. Each site verifies and stores the model (:mod:`client.model_mod`) and answers
``stored``; a refusal, an error or no answer within the timeout is logged as a warning and
stated on the card: the run succeeds whether or not a site stored the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server import Grid

from shared import protocol as wire
from shared.hashing import sha256_bytes
from shared.log import log


@dataclass
class ModelDelivery:
    """Which nodes stored the final model, and why the others did not.

    Attributes
    ----------
    delivered : dict[int, str]
        Node id -> the name of the site that stored the model.
    not_delivered : dict[int, str]
        Node id -> why it did not (its refusal, or no reply in time).
    """

    delivered: dict[int, str] = field(default_factory=dict)
    not_delivered: dict[int, str] = field(default_factory=dict)

    def card(self) -> dict[str, Any]:
        """The model card's fields: ``delivered_to`` (site names) and ``not_delivered`` (node ids, reasons)."""
        return {
            "delivered_to": sorted(self.delivered.values()),
            "not_delivered": [
                {"node_id": node, "reason": reason} for node, reason in sorted(self.not_delivered.items())
            ],
        }


def deliver_model(grid: Grid, model: bytes, card: Mapping[str, Any], *, timeout: float) -> ModelDelivery:
    """Send ``model`` and ``card`` to every node in ``grid`` and collect who stored it.

    Parameters
    ----------
    grid : Grid
        Flower's grid; its nodes now are the sites still connected at the end of the run.
    model : bytes
        ``model.pt``'s bytes (:meth:`server.report.result.FederationResult.model_bytes`).
    card : Mapping[str, Any]
        The model card, JSON-ready, with ``model_sha256``.
    timeout : float
        Seconds to wait for the replies (a node silent that long did not store it).

    Raises
    ------
    server.stoppable.RunStopped
        If the run is stopped meanwhile (a :class:`~server.stoppable.StoppableGrid`).
    """
    sha256 = sha256_bytes(model)
    nodes = sorted(grid.get_node_ids())
    delivery = ModelDelivery()
    if not nodes:
        log(WARNING, "no site is connected at the end of the run: the final model goes to nobody")
        return delivery
    record = {
        wire.MODEL_PAYLOAD: model,
        wire.MODEL_SHA256: sha256,
        wire.MODEL_CARD: json.dumps(card, allow_nan=False),
    }
    messages = [
        Message(
            content=RecordDict({wire.MODEL_RECORD: ConfigRecord(dict(record))}),  # type: ignore[arg-type]
            dst_node_id=node,
            message_type=wire.MODEL_MESSAGE_TYPE,
        )
        for node in nodes
    ]
    log(
        INFO,
        "sending the final model (%d bytes, sha256 %s...) to %d site(s)",
        len(model),
        sha256[:16],
        len(nodes),
    )
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            delivery.not_delivered[node] = f"refused: {reply.error.reason}"
            continue
        answer = reply.content.config_records.get(wire.MODEL_RECORD)
        status = answer.get(wire.MODEL_STATUS) if answer is not None else None
        if status == wire.STATUS_STORED and answer.get(wire.MODEL_SHA256) == sha256:  # type: ignore[union-attr]
            delivery.delivered[node] = str(answer.get(wire.MODEL_SITE, f"node {node}"))  # type: ignore[union-attr]
        else:
            delivery.not_delivered[node] = f"unexpected reply (status {status!r})"
    for node in set(nodes) - set(delivery.delivered) - set(delivery.not_delivered):
        delivery.not_delivered[node] = f"no reply within {timeout:g} s"
    for node, reason in sorted(delivery.not_delivered.items()):
        log(WARNING, "node %d did not store the final model: %s", node, reason)
    if delivery.delivered:
        log(INFO, "final model stored at %s", ", ".join(sorted(delivery.delivered.values())))
    return delivery

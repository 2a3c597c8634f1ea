"""The server sends the final model to the sites still connected, states who stored it, and never hangs."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.model_delivery import deliver_model
from server.stoppable import RunStopped, StoppableGrid
from shared import protocol as wire
from shared.hashing import sha256_bytes

MODEL = b"the final model"
CARD = {"model_sha256": sha256_bytes(MODEL)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


class Sites:
    """A grid of three nodes: 1 stores the model, 2 refuses it, 3 never answers (node 4 dropped earlier)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return [3, 1, 2]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.sent = list(messages)
        return [self._answer(m) for m in self.sent if m.metadata.dst_node_id != 3]

    def _answer(self, message: Message) -> Message:
        record = message.content.config_records[wire.MODEL_RECORD]
        if message.metadata.dst_node_id == 2:
            return _reply(message, Error(code=wire.MODEL_REFUSED, reason="backbone not held"))
        answer = {
            wire.MODEL_SHA256: record[wire.MODEL_SHA256],
            wire.MODEL_STATUS: wire.STATUS_STORED,
            wire.MODEL_SITE: "Hungary",
        }
        return _reply(message, RecordDict({wire.MODEL_RECORD: ConfigRecord(answer)}))


def _reply(message: Message, content: RecordDict | Error) -> Message:
    return Message(content, reply_to=message)  # from the node the message went to


def test_the_card_states_who_stored_the_model_and_why_the_others_did_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    grid = Sites()

    # Execute
    with caplog.at_level(logging.WARNING):
        delivery = deliver_model(grid, MODEL, CARD, timeout=5.0)  # type: ignore[arg-type]

    # Assert: every connected node got the exact bytes, their hash and the card; no other node
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3]
    for message in grid.sent:
        record = message.content.config_records[wire.MODEL_RECORD]
        assert message.metadata.message_type == wire.MODEL_MESSAGE_TYPE
        assert record[wire.MODEL_PAYLOAD] == MODEL and record[wire.MODEL_SHA256] == sha256_bytes(MODEL)
        assert json.loads(str(record[wire.MODEL_CARD])) == CARD
    assert delivery.card() == {
        "delivered_to": ["Hungary"],
        "not_delivered": [
            {"node_id": 2, "reason": "refused: backbone not held"},
            {"node_id": 3, "reason": "no reply within 5 s"},
        ],
    }
    assert sum("did not store the final model" in r.getMessage() for r in caplog.records) == 2


class Silent:
    """A grid whose sites never answer."""

    def get_node_ids(self) -> Iterable[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []


def test_a_stop_ends_the_delivery_at_once() -> None:
    # Prepare: a stop (Ctrl-C) arrives while the server waits for the replies, long before the timeout
    stop = threading.Event()
    grid = StoppableGrid(Silent(), stop)  # type: ignore[arg-type]
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()

    # Execute / Assert
    with pytest.raises(RunStopped):
        deliver_model(grid, MODEL, CARD, timeout=600.0)
    assert time.monotonic() - started < 5.0

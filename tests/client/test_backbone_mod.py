"""The site receives the backbone once, verifies it against its SHA-256, and refuses tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.backbone_mod import make_backbone_mod
from client.store import BackboneStore
from shared.backbones import BackboneRegistry
from shared.errors import IntegrityError
from shared.protocol import BACKBONE_MESSAGE_TYPE
from shared.protocol import BACKBONE_RECORD as RECORD


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need the identity of the running task; Flower's runtimes set it the same way.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


@pytest.fixture()
def backbone(heart_registry: Path) -> tuple[str, bytes]:
    resolved = BackboneRegistry(heart_registry).resolve("heart-mlp-cleveland")
    return resolved.manifest.to_json(), resolved.read_bytes()


def _message(manifest_json: str, sha256: str, weights: bytes | None = None) -> Message:
    record = {"sha256": sha256, "manifest": manifest_json}
    if weights is not None:
        record["weights"] = weights  # type: ignore[assignment]
    return Message(RecordDict({RECORD: ConfigRecord(record)}), dst_node_id=1, message_type=BACKBONE_MESSAGE_TYPE)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _unreachable(message: Message, context: Context) -> Message:
    raise AssertionError("a backbone message must not reach the ClientApp")


def test_offer_delivery_then_offer(tmp_path: Path, backbone: tuple[str, bytes]) -> None:
    # Prepare
    manifest_json, weights = backbone
    sha = json.loads(manifest_json)["sha256"]
    mod = make_backbone_mod(lambda _: tmp_path)

    # Execute
    first = mod(_message(manifest_json, sha), _context(), _unreachable)
    stored = mod(_message(manifest_json, sha, weights), _context(), _unreachable)
    again = mod(_message(manifest_json, sha), _context(), _unreachable)

    # Assert
    assert first.content.config_records[RECORD]["status"] == "need"
    assert stored.content.config_records[RECORD]["status"] == "stored"
    assert again.content.config_records[RECORD]["status"] == "have"
    assert BackboneStore(tmp_path).get(sha).path.read_bytes() == weights


def test_tampered_delivery_is_refused_and_nothing_stored(tmp_path: Path, backbone: tuple[str, bytes]) -> None:
    # Prepare
    manifest_json, weights = backbone
    sha = json.loads(manifest_json)["sha256"]
    tampered = bytes([weights[0] ^ 1]) + weights[1:]
    mod = make_backbone_mod(lambda _: tmp_path)

    # Execute
    reply = mod(_message(manifest_json, sha, tampered), _context(), _unreachable)

    # Assert
    assert reply.has_error()
    assert "SHA-256" in reply.error.reason
    assert not BackboneStore(tmp_path).has(sha)


def test_stored_backbone_altered_on_disk_is_refused(tmp_path: Path, backbone: tuple[str, bytes]) -> None:
    # Prepare
    manifest_json, weights = backbone
    store = BackboneStore(tmp_path)
    manifest = store.put(manifest_json, weights)
    path = store.get(manifest.sha256).path
    path.write_bytes(weights[:-10])

    # Execute / Assert
    with pytest.raises(IntegrityError):
        store.get(manifest.sha256)


def test_other_messages_pass_through(tmp_path: Path) -> None:
    # Prepare
    mod = make_backbone_mod(lambda _: tmp_path)
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    seen: list[Message] = []

    def app(msg: Message, context: Context) -> Message:
        seen.append(msg)
        return msg

    # Execute
    mod(message, _context(), app)

    # Assert
    assert seen == [message]

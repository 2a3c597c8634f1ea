"""Client mod that writes every reply leaving the site to the site's audit log, before it leaves.

Installed as the *outermost* mod, it sees exactly what Flower sends: the reply after SecAgg+
masking, after a refusal became an error reply. For each reply it records the run, the round
(from the message's config), the message type and SecAgg+ stage, the SHA-256 and size of the
serialized reply, the epsilon the reply reports and whether the site accepted or refused, and,
for the reply to the server's final model (a model receipt), the SHA-256 of the model stored;
see :mod:`client.audit`. The entry is on disk before the reply is returned to Flower. If it cannot
be written, the reply does not leave: the mod raises, and Flower answers with an error instead.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.audit import ACCEPTED, AuditLog, AuditRecord
from client.records import canonical
from shared.protocol import (
    METRIC_EPSILON,
    MODEL_MESSAGE_TYPE,
    MODEL_RECORD,
    MODEL_SHA256,
    MODEL_STATUS,
    ROUND_KEYS,
    STATUS_STORED,
)

__all__ = ["make_audit_mod", "payload_digest"]


def make_audit_mod(site_dir_of: Callable[[Context], Path]) -> Mod:
    """Return a mod that records each outgoing reply in ``site_dir_of(context)/audit.jsonl``.

    Parameters
    ----------
    site_dir_of : Callable[[Context], Path]
        Maps the node's context to its private site directory.
    """

    def audit_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # Read before call_next: Flower's SecAgg+ mod pops the stage from the message's config.
        server_round = _round_of(message.content) if message.has_content() else None
        stage = _secagg_stage(message.content) if message.has_content() else None
        audit = AuditLog(site_dir_of(context))
        facts = {
            "run_id": str(message.metadata.run_id),
            "round": server_round,
            "message_type": message.metadata.message_type,
            "secagg_stage": stage,
            "reply_to": str(message.metadata.message_id),
        }
        try:
            reply = call_next(message, context)
        except Exception as exc:
            # Flower turns the exception into an error reply; record that nothing else left.
            reason = f"refused: the ClientApp raised {type(exc).__name__}: {exc}"
            audit.append(
                AuditRecord(**facts, payload_sha256=None, payload_bytes=0, epsilon=None, decision=reason)
            )
            raise
        sha256, size = payload_digest(reply)
        if reply.has_error():
            decision, epsilon = f"refused: {reply.error.reason}", None
        else:
            decision, epsilon = ACCEPTED, _epsilon_of(reply.content)
        audit.append(
            AuditRecord(
                **facts, payload_sha256=sha256, payload_bytes=size, epsilon=epsilon, decision=decision,
                model_sha256=_model_stored(reply),
            )  # fmt: skip
        )
        return reply

    return audit_mod


def payload_digest(reply: Message) -> tuple[str, int]:
    """Return the SHA-256 (hex) and size of ``reply``'s serialized content.

    The content is serialized with Flower's own protobuf encoding (deterministic), the bytes
    a reviewer can recompute from the same ``RecordDict``; an error reply is the canonical
    JSON of its code and reason.
    """
    if reply.has_error():
        data = canonical({"code": int(reply.error.code), "reason": str(reply.error.reason)})
    else:
        from flwr.common.serde import recorddict_to_proto

        data = recorddict_to_proto(reply.content).SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest(), len(data)


def _round_of(content: RecordDict) -> int | None:
    """Return the server round named in any config record of ``content``, else None."""
    for record in content.config_records.values():
        for key in ROUND_KEYS:
            value = record.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _secagg_stage(content: RecordDict) -> str | None:
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    value = record.get(Key.STAGE) if record is not None else None
    return value if isinstance(value, str) else None


def _model_stored(reply: Message) -> str | None:
    """The SHA-256 of the final model a reply says the site stored, else None."""
    if reply.has_error() or reply.metadata.message_type != MODEL_MESSAGE_TYPE:
        return None
    record = reply.content.config_records.get(MODEL_RECORD)
    value = record.get(MODEL_SHA256) if record is not None else None
    return value if isinstance(value, str) and record.get(MODEL_STATUS) == STATUS_STORED else None  # type: ignore[union-attr]


def _epsilon_of(content: RecordDict) -> float | None:
    """Return the finite ``epsilon`` a reply reports (its metrics or legacy ``*.metrics``), else None."""
    for record in (*content.metric_records.values(), *content.config_records.values()):
        value = record.get(METRIC_EPSILON)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None

"""Client mod that receives the backbone from the server, once, and stores it by SHA-256.

The server sends messages of type :data:`BACKBONE_MESSAGE_TYPE`. An *offer* names a backbone
(manifest + SHA-256): the site answers whether it already holds it. A *delivery* adds the
weights' bytes: the site verifies them against the SHA-256 and stores them. Every other
message passes through to the ClientApp unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.store import BackboneStore
from shared.errors import CareFLError

BACKBONE_MESSAGE_TYPE = "query.carefl_backbone"
RECORD = "backbone"
ERROR_CODE = 4001


def make_backbone_mod(site_dir_of: Callable[[Context], Path]) -> Mod:
    """Return a mod that handles backbone offers and deliveries.

    Parameters
    ----------
    site_dir_of : Callable[[Context], Path]
        Maps the node's context to its private site directory.
    """

    def backbone_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != BACKBONE_MESSAGE_TYPE:
            return call_next(message, context)
        store = BackboneStore(site_dir_of(context))
        record = message.content.config_records[RECORD]
        sha256 = str(record["sha256"])
        try:
            if "weights" in record:
                store.put(str(record["manifest"]), bytes(record["weights"]))  # type: ignore[arg-type]
                status = "stored"
            else:
                status = "have" if store.has(sha256) else "need"
        except CareFLError as err:
            return Message(Error(code=ERROR_CODE, reason=str(err)), reply_to=message)
        reply = RecordDict({RECORD: ConfigRecord({"sha256": sha256, "status": status})})
        return Message(reply, reply_to=message)

    return backbone_mod

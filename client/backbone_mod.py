"""Client mod that receives the backbone from the server, once, and stores it by SHA-256.

The server sends messages of type :data:`shared.protocol.BACKBONE_MESSAGE_TYPE`. An *offer* names a backbone
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
from shared import protocol as wire
from shared.errors import CareFLError


def make_backbone_mod(site_dir_of: Callable[[Context], Path]) -> Mod:
    """Return a mod that handles backbone offers and deliveries.

    Parameters
    ----------
    site_dir_of : Callable[[Context], Path]
        Maps the node's context to its private site directory.
    """

    def backbone_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != wire.BACKBONE_MESSAGE_TYPE:
            return call_next(message, context)
        store = BackboneStore(site_dir_of(context))
        record = message.content.config_records[wire.BACKBONE_RECORD]
        sha256 = str(record[wire.BACKBONE_SHA256])
        try:
            if wire.BACKBONE_WEIGHTS in record:
                weights = bytes(record[wire.BACKBONE_WEIGHTS])  # type: ignore[arg-type]
                store.put(str(record[wire.BACKBONE_MANIFEST]), weights)
                status = wire.STATUS_STORED
            else:
                status = wire.STATUS_HAVE if store.has(sha256) else wire.STATUS_NEED
        except CareFLError as err:
            return Message(Error(code=wire.BACKBONE_REFUSED, reason=str(err)), reply_to=message)
        reply = RecordDict(
            {wire.BACKBONE_RECORD: ConfigRecord({wire.BACKBONE_SHA256: sha256, wire.BACKBONE_STATUS: status})}
        )
        return Message(reply, reply_to=message)

    return backbone_mod

"""Client mod that receives the backbone from the server, once, and stores it by SHA-256.

The server sends messages of type :data:`shared.protocol.BACKBONE_MESSAGE_TYPE`. An *offer* names a backbone
(manifest + SHA-256): the site answers whether it already holds it. A *delivery* adds the
weights' bytes: the site verifies them against the SHA-256 and stores them. Every other
message passes through to the ClientApp unchanged.

Before either is answered, the site's policy is read and its ``allowed_backbones`` checked
(:func:`client.policy.check_backbone`): a backbone the site does not accept is refused (a
:class:`~client.policy.PolicyViolation`, which :mod:`client.refusal_mod` turns into the
``SITE_REFUSED`` error reply) and nothing is stored. A delivery whose manifest names another
backbone than the one offered is refused too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.policy import SitePolicy, check_backbone
from client.store import BackboneStore
from shared import protocol as wire
from shared.errors import CareFLError, IntegrityError


def make_backbone_mod(
    site_dir_of: Callable[[Context], Path], policy_of: Callable[[Context], Path] | None = None
) -> Mod:
    """Return a mod that handles backbone offers and deliveries.

    Parameters
    ----------
    site_dir_of : Callable[[Context], Path]
        Maps the node's context to its private site directory.
    policy_of : Callable[[Context], Path], optional
        Maps the node's context to its policy file, whose ``allowed_backbones`` every offer
        and delivery is checked against (the ClientApp always passes it; without it, any
        backbone whose weights verify is accepted).
    """

    def backbone_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != wire.BACKBONE_MESSAGE_TYPE:
            return call_next(message, context)
        record = message.content.config_records[wire.BACKBONE_RECORD]
        sha256 = str(record[wire.BACKBONE_SHA256])
        if policy_of is not None:  # a refusal here becomes the SITE_REFUSED reply (refusal_mod)
            check_backbone(SitePolicy.load(policy_of(context)), sha256)
        store = BackboneStore(site_dir_of(context))
        try:
            if wire.BACKBONE_WEIGHTS in record:
                weights = bytes(record[wire.BACKBONE_WEIGHTS])  # type: ignore[arg-type]
                _same_backbone(str(record[wire.BACKBONE_MANIFEST]), sha256)
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


def _same_backbone(manifest_json: str, offered: str) -> None:
    """Refuse a delivery whose manifest names another backbone than the SHA-256 offered."""
    try:
        named = json.loads(manifest_json).get("sha256")
    except (json.JSONDecodeError, AttributeError):
        return  # the store refuses an unreadable manifest, naming the problem
    if named != offered:
        raise IntegrityError(
            f"the backbone delivered (manifest sha256 {str(named)[:16]}...) is not the one offered "
            f"({offered[:16]}...); refused, nothing stored."
        )

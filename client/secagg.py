"""Secure aggregation at the site: Flower's SecAgg+ client mod, only where the server uses it.

Flower's ``secaggplus_mod`` takes over every training message and expects SecAgg+ stage
configs in it; a run without secure aggregation sends none. :func:`secure_aggregation_mod`
hands a message to SecAgg+ only when it carries those configs, and passes every other message
on unchanged. Masks are expanded by :mod:`shared.masks`, installed right here before each
SecAgg+ message: in the simulation engine the ClientApp reaches its worker processes by value,
without importing CareFL's modules, so an install at import time would not reach them.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared.masks import install_secure_masks


def secure_aggregation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ for messages of a secure-aggregation round, pass the others through."""
    if message.has_content() and RECORD_KEY_CONFIGS in message.content.config_records:
        install_secure_masks()
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)

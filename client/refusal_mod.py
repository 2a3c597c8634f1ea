"""Client mod that turns a site's refusal into a Flower error reply the server can read.

A :class:`~shared.errors.CareFLError` raised while handling a message (a policy violation, an
exhausted or unverifiable ledger, a backbone that fails its hash) becomes
``Error(code=shared.protocol.SITE_REFUSED, reason=...)``: the reason names the site, the rule, the value asked
for and the limit. The site does not train and sends nothing else.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.errors import CareFLError
from shared.protocol import SITE_REFUSED


def refusal_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Pass ``message`` on; answer with an error reply if the site refuses it."""
    try:
        return call_next(message, context)
    except CareFLError as err:
        return Message(Error(code=SITE_REFUSED, reason=str(err)), reply_to=message)

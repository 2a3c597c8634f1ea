"""What crosses the site worker's channel: request kinds, reply statuses, Flower's protobufs.

A message and its context travel as Flower's own protobuf serialization
(:mod:`flwr.common.serde`), so the worker sees exactly what the task process pulled.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

KIND_PING = b"ping"
KIND_HANDLE = b"handle"
STATUS_OK = b"ok"
STATUS_REFUSED = b"refused"
STATUS_FAILED = b"failed"
STATUS_DENIED = b"denied"


def message_bytes(message: Message) -> bytes:
    """``message`` as Flower's protobuf bytes."""
    return message_to_proto(message).SerializeToString()


def parse_message(data: bytes) -> Message:
    """The message serialized by :func:`message_bytes`."""
    return message_from_proto(ProtoMessage.FromString(data))


def context_bytes(context: Context) -> bytes:
    """``context`` (node and run config, state) as Flower's protobuf bytes."""
    return context_to_proto(context).SerializeToString()


def parse_context(data: bytes) -> Context:
    """The context serialized by :func:`context_bytes`."""
    return context_from_proto(ProtoContext.FromString(data))

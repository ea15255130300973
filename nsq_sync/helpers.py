"""pynsq's top-level protocol helpers, under pynsq's names: each returns the bytes to send."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .message import Message
from .protocol import commands
from .protocol.commands import MessageBody
from .protocol.constants import FRAME_TYPE_ERROR, FRAME_TYPE_MESSAGE, FRAME_TYPE_RESPONSE
from .protocol.frames import Frame
from .protocol.frames import decode_message as _decode_raw
from .protocol.frames import unpack_response as _unpack_raw
from .protocol.names import valid_channel_name, valid_topic_name

__all__ = [
    "identify",
    "auth",
    "subscribe",
    "ready",
    "finish",
    "requeue",
    "touch",
    "nop",
    "pub",
    "mpub",
    "dpub",
    "valid_topic_name",
    "valid_channel_name",
    "unpack_response",
    "decode_message",
    "FRAME_TYPE_RESPONSE",
    "FRAME_TYPE_ERROR",
    "FRAME_TYPE_MESSAGE",
]


def identify(data: Mapping[str, Any]) -> bytes:
    """IDENTIFY with *data* as its JSON body."""
    return commands.identify(data)


def auth(data: Any) -> bytes:
    """AUTH with the secret *data*."""
    return commands.auth(data)


def subscribe(topic: str, channel: str) -> bytes:
    """SUB topic channel. Raises ConfigError for a bad name."""
    return commands.sub(topic, channel)


def ready(count: int) -> bytes:
    """RDY count."""
    return commands.rdy(count)


def finish(id: Any) -> bytes:
    """FIN id."""
    return commands.fin(id)


def requeue(id: Any, time_ms: int = 0) -> bytes:
    """REQ id time_ms."""
    return commands.req(id, time_ms)


def touch(id: Any) -> bytes:
    """TOUCH id."""
    return commands.touch(id)


def nop() -> bytes:
    """NOP."""
    return commands.nop()


def pub(topic: str, data: MessageBody) -> bytes:
    """PUB topic with one body (bytes, or str encoded as UTF-8)."""
    return commands.pub(topic, data)


def mpub(topic: str, data: Iterable[MessageBody]) -> bytes:
    """MPUB topic with a list of bodies."""
    return commands.mpub(topic, data)


def dpub(topic: str, delay_ms: int, data: MessageBody) -> bytes:
    """DPUB topic delay_ms with one body."""
    return commands.dpub(topic, delay_ms, data)


def _check_data(data: object) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")


def unpack_response(data: bytes) -> Frame:
    """Split a frame without its size prefix into ``(frame_type, data)``.

    TypeError naming ``data`` unless it is bytes-like; IntegrityError when it is shorter than 4 bytes.
    """
    _check_data(data)
    return _unpack_raw(data)


def decode_message(data: bytes) -> Message:
    """Decode a message frame's data into a :class:`Message` (not tied to a connection).

    TypeError naming ``data`` unless it is bytes-like; IntegrityError when it is shorter than the 26-byte header.
    """
    _check_data(data)
    raw = _decode_raw(data)
    return Message(raw.id, raw.body, raw.timestamp, raw.attempts)

"""Command encoders: arguments in, the exact bytes to send out. No I/O.

Each encoder checks its arguments (names, ranges, body types) and raises
:class:`~nsq_sync.errors.ConfigError` (a ValueError) or TypeError before any
byte is produced.
"""

from __future__ import annotations

import json
import re
import struct
from operator import countOf as _count_of
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

from ..errors import ConfigError
from .constants import MAGIC_V2, MESSAGE_ID_SIZE
from .limits import limit, limit_note
from .names import check_channel, check_topic

__all__ = [
    "MAGIC_V2",
    "to_body",
    "identify",
    "auth",
    "sub",
    "pub",
    "mpub",
    "mpub_sized",
    "mpub_parts",
    "dpub",
    "rdy",
    "fin",
    "req",
    "touch",
    "cls",
    "nop",
]

#: a message body as the publishing calls take it (Writer.pub, NsqdHTTPClient.pub, ...): bytes,
#: bytearray or memoryview, or str (sent encoded as UTF-8). Exactly what :func:`to_body` accepts.
MessageBody = Union[bytes, bytearray, memoryview, str]

_pack_size = struct.Struct(">l").pack
#: a size field is a signed 32-bit int (nsqd's own --max-msg-size default is far lower: 1 MiB)
MAX_BODY_SIZE = 2**31 - 1 - 8
_NOP = b"NOP\n"
_CLS = b"CLS\n"


def to_body(body: object, param: str = "body") -> bytes:
    """Return *body* as bytes (str is encoded as UTF-8).

    Raises TypeError for anything but bytes-like or str, ConfigError for an empty body
    (nsqd refuses it with a fatal E_BAD_MESSAGE).
    """
    if isinstance(body, bytes):
        data = body
    elif isinstance(body, str):
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _not_utf8(param, body, exc) from None
    elif isinstance(body, (bytearray, memoryview)):
        data = bytes(body)
    else:
        raise TypeError(f"{param} must be bytes or str, not {type(body).__name__}")
    if not data:
        raise ConfigError(param, body, "must not be empty (nsqd rejects empty messages)")
    if len(data) > MAX_BODY_SIZE:
        raise ConfigError(param, f"<{len(data)} bytes>", f"is larger than the protocol's limit of {MAX_BODY_SIZE} bytes")
    return data


def _not_utf8(param: str, text: str, exc: UnicodeEncodeError) -> ConfigError:
    """The error for a str that cannot be encoded as UTF-8 (a lone surrogate, e.g. from os.fsdecode)."""
    shown: object = "<hidden>" if param == "auth_secret" else (text if len(text) <= 64 else f"<str of {len(text)} characters>")
    return ConfigError(param, shown, f"str is not encodable as UTF-8 ({exc.reason} at index {exc.start}); pass bytes")


#: nsqd's message ids are 16 hex digits; any 16 printable, non-space ASCII bytes keep the
#: command line intact (nsqd splits it on spaces and strips a trailing CR).
_MESSAGE_ID = re.compile(b"[!-~]{%d}" % MESSAGE_ID_SIZE).fullmatch
_MESSAGE_ID_CHARS = f"must be {MESSAGE_ID_SIZE} printable ASCII characters without spaces (nsqd's ids are hex digits)"


def _message_id(message_id: object) -> bytes:
    # Hot path (one FIN per message): an id as nsqd sends it, bytes of 16 ASCII letters/digits.
    if message_id.__class__ is bytes and message_id.isalnum() and len(message_id) == MESSAGE_ID_SIZE:  # type: ignore[attr-defined]
        return message_id  # type: ignore[return-value]
    return _check_message_id(message_id)


def _check_message_id(message_id: object) -> bytes:
    if isinstance(message_id, str):
        try:
            message_id = message_id.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError("message_id", message_id, _MESSAGE_ID_CHARS) from None
    elif isinstance(message_id, (bytearray, memoryview)):
        message_id = bytes(message_id)
    if not isinstance(message_id, bytes):
        raise TypeError(f"message id must be bytes or str, not {type(message_id).__name__}")
    if len(message_id) != MESSAGE_ID_SIZE:
        raise ConfigError("message_id", message_id, f"must be {MESSAGE_ID_SIZE} bytes")
    if _MESSAGE_ID(message_id) is None:
        raise ConfigError("message_id", message_id, _MESSAGE_ID_CHARS)
    return bytes(message_id)


def _int(param: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{param} must be int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigError(param, value, f"must be between {low} and {high}")
    return value


def identify(data: Mapping[str, Any]) -> bytes:
    """IDENTIFY with a JSON body built from *data* (already in nsqd's units).

    TypeError naming ``data`` when it is not a mapping or holds a value JSON cannot carry;
    ConfigError naming it for NaN/infinity (not valid JSON) or a circular reference.
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping of IDENTIFY fields, not {type(data).__name__}")
    try:
        text = json.dumps(dict(data), separators=(",", ":"), allow_nan=False)
    except TypeError as exc:
        raise TypeError(f"data cannot be sent as JSON: {exc}") from None
    except ValueError as exc:  # NaN/inf (allow_nan=False) or a circular reference
        raise ConfigError("data", data, f"cannot be sent as JSON ({exc})") from None
    body = text.encode("utf-8")  # ensure_ascii: the text is ASCII, so this cannot fail
    return b"IDENTIFY\n" + _pack_size(len(body)) + body


def auth(secret: object) -> bytes:
    """AUTH with the secret as its body."""
    data = to_body(secret, "auth_secret")
    return b"AUTH\n" + _pack_size(len(data)) + data


def sub(topic: str, channel: str) -> bytes:
    """SUB <topic> <channel>."""
    topic = check_topic(topic)
    channel = check_channel(channel)
    return b"SUB %s %s\n" % (topic.encode("ascii"), channel.encode("ascii"))


#: each checked topic's "PUB <topic>\n" (Writer.pub's fast path reads it: a topic found here is valid)
_PUB_HEADS: Dict[object, bytes] = {}
_MPUB_HEADS: Dict[object, bytes] = {}


def _head(cache: Dict[object, bytes], verb: bytes, topic: object) -> bytes:
    # Publishing is a hot path and applications use few topics: check each name once.
    try:
        return cache[topic]
    except (KeyError, TypeError):  # TypeError: an unhashable topic, refused below
        pass
    head = b"%s %s\n" % (verb, check_topic(topic).encode("ascii"))
    if type(topic) is str:
        if len(cache) >= 1024:
            cache.clear()
        cache[topic] = head
    return head


def _pub_head(topic: object) -> bytes:
    return _head(_PUB_HEADS, b"PUB", topic)


class _SizeFields(dict):  # type: ignore[type-arg]
    """The 4-byte size field of each message size seen, packed once (MPUB packs one per message)."""

    def __missing__(self, size: int) -> bytes:
        field = _pack_size(size)
        if size < 65536 and len(self) < 4096:
            self[size] = field
        return field


_size_field = _SizeFields().__getitem__


def pub(topic: str, body: object) -> bytes:
    """PUB <topic> with one message body."""
    data = to_body(body)
    return _pub_head(topic) + _pack_size(len(data)) + data


def mpub(topic: str, bodies: Iterable[object]) -> bytes:
    """MPUB <topic> with [count][size body]... as its body. Zero messages is a ConfigError."""
    return mpub_parts(topic, bodies)[0]


def mpub_sized(topic: str, bodies: Iterable[object]) -> Tuple[bytes, int]:
    """:func:`mpub` and the size of its largest message (for a max_msg_size check without re-parsing)."""
    data, _body_size, sizes = mpub_parts(topic, bodies)
    return data, max(sizes)


def mpub_parts(topic: str, bodies: Iterable[object]) -> Tuple[bytes, int, List[int]]:
    """:func:`mpub`, the size of the MPUB body (count and messages, as nsqd checks it against
    --max-body-size) and the size of each message, in order."""
    head = _head(_MPUB_HEADS, b"MPUB", topic)
    if type(bodies) is not list:
        if isinstance(bodies, (bytes, str, bytearray, memoryview)):
            raise TypeError("msgs: mpub takes a list of message bodies, not a single body")
        if bodies is None or not hasattr(bodies, "__iter__"):
            raise TypeError(f"msgs: mpub takes a list of message bodies, not {type(bodies).__name__}")
        bodies = list(bodies)  # once through a generator: the slow path below may need a second look
    # Common case, checked in C: every body is bytes and none is empty.
    datas: List[Any] = bodies
    sizes = list(map(len, datas)) if _count_of(map(type, datas), bytes) == len(datas) else [0]
    if 0 in sizes:
        # Anything else goes through to_body, which converts, or raises the first bad body's error.
        datas = [body if type(body) is bytes and body else to_body(body, f"msgs[{index}]") for index, body in enumerate(datas)]
        sizes = list(map(len, datas))
    count = len(sizes)
    if count == 0:
        raise ConfigError("msgs", [], "mpub needs at least one message")
    body_size = 4 + 4 * count + sum(sizes)
    if body_size > MAX_BODY_SIZE:
        largest = max(sizes)
        if largest > MAX_BODY_SIZE:
            raise ConfigError("body", f"<{largest} bytes>", f"is larger than the protocol's limit of {MAX_BODY_SIZE} bytes")
        raise ConfigError("msgs", f"<{count} messages, {body_size - 4} bytes>", f"exceed the protocol's limit of {MAX_BODY_SIZE} bytes")
    # head, then [size][body] pairs interleaved by slice assignment: every loop runs in C,
    # and the message bytes are copied once, by the join.
    parts: List[bytes] = [head + _pack_size(body_size) + _pack_size(count)] * (2 * count + 1)
    parts[1::2] = map(_size_field, sizes)
    parts[2::2] = datas
    return b"".join(parts), body_size, sizes


def dpub(topic: str, delay_ms: int, body: object) -> bytes:
    """DPUB <topic> <delay_ms>; the delay must be 0..3,600,000 ms (nsqd's default --max-req-timeout;
    see :func:`~nsq_sync.protocol.limits.set_nsqd_limits`)."""
    high = int(limit("max_req_timeout") * 1000)
    try:
        delay = _int("delay_ms", delay_ms, 0, high)
    except ConfigError as exc:
        raise ConfigError("delay_ms", delay_ms, exc.reason + limit_note("max_req_timeout")) from None
    data = to_body(body)
    return b"DPUB %s %d\n" % (check_topic(topic).encode("ascii"), delay) + _pack_size(len(data)) + data


def rdy(count: int) -> bytes:
    """RDY <count>."""
    return b"RDY %d\n" % _int("count", count, 0, 2**31 - 1)


def fin(message_id: object) -> bytes:
    """FIN <message_id>."""
    return b"FIN %s\n" % _message_id(message_id)


def req(message_id: object, time_ms: int) -> bytes:
    """REQ <message_id> <time_ms>; time_ms must be >= 0 (nsqd clamps to its --max-req-timeout)."""
    return b"REQ %s %d\n" % (_message_id(message_id), _int("time_ms", time_ms, 0, 2**31 - 1))


def touch(message_id: object) -> bytes:
    """TOUCH <message_id>."""
    return b"TOUCH %s\n" % _message_id(message_id)


def cls() -> bytes:
    """CLS: stop sending messages; nsqd answers CLOSE_WAIT."""
    return _CLS


def nop() -> bytes:
    """NOP: the answer to a heartbeat."""
    return _NOP

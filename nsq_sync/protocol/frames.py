"""The incremental frame decoder: bytes in, frames out. No I/O.

A frame is ``[int32 size][int32 type][data]`` where size counts type + data.
:class:`FrameDecoder` accepts any chunking of the stream and returns
``(frame_type, data)`` pairs. Every size the server controls is capped.
"""

from __future__ import annotations

import struct
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

from ..errors import IntegrityError, ProtocolError
from .constants import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HTTP_SNIFF,
    MESSAGE_HEADER_SIZE,
)

__all__ = ["FrameDecoder", "RawMessage", "decode_message", "unpack_response", "Frame"]

_unpack_header = struct.Struct(">lL").unpack_from
_unpack_size = struct.Struct(">l").unpack_from
_unpack_message = struct.Struct(">qH16s").unpack_from

Frame = Tuple[int, bytes]
_KNOWN_TYPES = (FRAME_TYPE_RESPONSE, FRAME_TYPE_ERROR, FRAME_TYPE_MESSAGE)
_MESSAGE_MIN = 4 + MESSAGE_HEADER_SIZE  # a message frame's size field: its type and header at least
assert FRAME_TYPE_MESSAGE == 2 and MESSAGE_HEADER_SIZE == 26  # FrameDecoder.feed's fast path spells them out


class RawMessage(NamedTuple):
    """A decoded message frame."""

    timestamp: int
    attempts: int
    id: bytes
    body: bytes


def decode_message(data: bytes) -> RawMessage:
    """Decode the data of a message frame: int64 ns timestamp, uint16 attempts, 16-byte id, body.

    Raises IntegrityError when *data* is shorter than the 26-byte header.
    """
    if len(data) < MESSAGE_HEADER_SIZE:
        raise IntegrityError(f"message frame of {len(data)} bytes is shorter than its {MESSAGE_HEADER_SIZE}-byte header")
    timestamp, attempts, message_id = _unpack_message(data)
    return RawMessage(timestamp, attempts, message_id, bytes(data[MESSAGE_HEADER_SIZE:]))


def unpack_response(data: bytes) -> Frame:
    """pynsq's helper: split a frame without its size prefix into ``(frame_type, data)``."""
    if len(data) < 4:
        raise IntegrityError(f"frame of {len(data)} bytes has no frame type")
    (frame_type,) = _unpack_size(data)
    return frame_type, bytes(data[4:])


class FrameDecoder:
    """Turns the byte stream from nsqd into frames, whatever the chunking.

    ``feed(data)`` returns every frame completed by *data*. Sizes below 4,
    above ``max_frame_size``, the b"HTTP" sniff and unknown frame types raise
    :class:`ProtocolError`; after an error the decoder stays failed.
    """

    __slots__ = ("max_frame_size", "_buf", "_failed", "_make", "_owner", "messages")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._failed = False
        self._make: Optional[Callable[..., Any]] = None
        self._owner: Any = None
        #: Messages decoded by :meth:`feed` after :meth:`build_messages`; the caller takes them.
        self.messages: List[Any] = []

    def build_messages(self, factory: Callable[..., Any], owner: Any) -> None:
        """From now on, turn message frames into ``factory(id, body, timestamp, attempts, owner)``.

        They are appended to :attr:`messages` instead of being returned by :meth:`feed`:
        one header unpack and one copy of the body per message, the consumer's hot path.
        A message frame shorter than its 26-byte header raises ProtocolError.
        """
        self._make = factory
        self._owner = owner

    def feed(self, data: bytes, max_frames: int = 0) -> List[Frame]:
        """Add *data*; return the frames it completes (at most *max_frames* when > 0, the rest stays buffered).

        A handshake reads one frame at a time, so bytes that belong to the next layer
        (TLS, snappy, deflate) stay unparsed for :meth:`take_unconsumed`.
        """
        if self._failed:
            raise ProtocolError("the frame decoder already failed; the stream is unusable")
        buf = self._buf
        if buf:
            buf += data
            if len(buf) >= 8:
                (size,) = _unpack_size(buf)
                if 4 <= size <= self.max_frame_size and size != HTTP_SNIFF and len(buf) < 4 + size:
                    return []  # the first frame is still incomplete: no copy until it is whole
            view = bytes(buf)
            buf.clear()
        else:
            # Frames are sliced out of bytes: one copy of the chunk is cheaper than a
            # memoryview slice per frame.
            view = data if data.__class__ is bytes else bytes(data)
        frames: List[Frame] = []
        append = frames.append
        make = self._make
        if make is not None:
            owner = self._owner
            add_message = self.messages.append
        offset = 0
        end_of_data = len(view)
        # A message frame of a size that passes every check below takes the first branch.
        message_max = min(self.max_frame_size, HTTP_SNIFF - 1) if make is not None else -1
        try:
            while end_of_data - offset >= 8:
                size, frame_type = _unpack_header(view, offset)
                if frame_type == 2 and _MESSAGE_MIN <= size <= message_max:  # FRAME_TYPE_MESSAGE
                    end = offset + 4 + size
                    if end > end_of_data:
                        break
                    timestamp, attempts, message_id = _unpack_message(view, offset + 8)
                    add_message(make(message_id, view[offset + 34 : end], timestamp, attempts, owner))
                    offset = end
                    continue
                if size < 4 or size > self.max_frame_size or size == HTTP_SNIFF:
                    self._fail(size)
                end = offset + 4 + size
                if end > end_of_data:
                    break
                if frame_type > 2:
                    self._failed = True
                    self._buf = bytearray()
                    raise ProtocolError(f"unknown frame type {frame_type} (frame of {size} bytes)")
                if frame_type == FRAME_TYPE_MESSAGE and make is not None:
                    # The first branch took every message frame of a valid size.
                    self._failed = True
                    raise ProtocolError(f"message frame of {size - 4} bytes is shorter than its {MESSAGE_HEADER_SIZE}-byte header")
                append((frame_type, view[offset + 8 : end]))
                offset = end
                if max_frames and len(frames) >= max_frames:
                    break
            else:
                if end_of_data - offset >= 4:
                    (size,) = _unpack_size(view, offset)
                    if size < 4 or size > self.max_frame_size or size == HTTP_SNIFF:
                        self._fail(size)
        finally:
            if self._failed:
                self._buf = bytearray()  # a failed stream keeps nothing
            elif offset < end_of_data:
                buf += view[offset:]
        return frames

    def _fail(self, size: int) -> None:
        self._failed = True
        self._buf = bytearray()
        if size == HTTP_SNIFF:
            raise ProtocolError("received an HTTP response: is this nsqd's HTTP port instead of its TCP port?")
        if size < 4:
            raise ProtocolError(f"bad frame size {size}: a frame needs at least 4 bytes for its type")
        raise ProtocolError(f"frame size {size} exceeds the limit of {self.max_frame_size} bytes (max_frame_size)")

    @property
    def buffered(self) -> int:
        """How many bytes wait for the rest of their frame."""
        return len(self._buf)

    def take_unconsumed(self) -> bytes:
        """Return and clear the bytes not yet part of a frame (handed to the next layer after an upgrade)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

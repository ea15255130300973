"""The incremental frame decoder: bytes in, frames out. No I/O.

A frame is ``[int32 size][int32 type][data]`` where size counts type + data.
:class:`FrameDecoder` accepts any chunking of the stream and returns
``(frame_type, data)`` pairs. Every size the server controls is capped.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Tuple

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

    __slots__ = ("max_frame_size", "_buf", "_failed")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._failed = False

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
            view = buf
        else:
            view = data
        frames: List[Frame] = []
        append = frames.append
        offset = 0
        end_of_data = len(view)
        try:
            while end_of_data - offset >= 8:
                size, frame_type = _unpack_header(view, offset)
                if size < 4 or size > self.max_frame_size or size == HTTP_SNIFF:
                    self._fail(size)
                end = offset + 4 + size
                if end > end_of_data:
                    break
                if frame_type > 2:
                    self._failed = True
                    self._buf = bytearray()
                    raise ProtocolError(f"unknown frame type {frame_type} (frame of {size} bytes)")
                append((frame_type, bytes(view[offset + 8 : end])))
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
            elif view is buf:
                del buf[:offset]
            elif offset < end_of_data:
                buf += data[offset:]
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

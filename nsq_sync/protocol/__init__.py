"""The sans-IO core of nsq_sync: commands to bytes, bytes to frames. No sockets, threads or clocks.

Usable on its own, e.g. with any socket loop::

    from nsq_sync.protocol import commands, FrameDecoder
    sock.sendall(commands.MAGIC_V2 + commands.sub("t", "c") + commands.rdy(1))
    for frame_type, data in decoder.feed(sock.recv(65536)): ...
"""

from __future__ import annotations

from . import commands
from .constants import (
    CLOSE_WAIT,
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    OK,
)
from .frames import FrameDecoder, RawMessage, decode_message, unpack_response
from .identify import build_identify, parse_identify_response
from .names import check_channel, check_topic, valid_channel_name, valid_topic_name

__all__ = [
    "commands",
    "CLOSE_WAIT",
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_TYPE_ERROR",
    "FRAME_TYPE_MESSAGE",
    "FRAME_TYPE_RESPONSE",
    "HEARTBEAT",
    "MAGIC_V2",
    "OK",
    "FrameDecoder",
    "RawMessage",
    "decode_message",
    "unpack_response",
    "build_identify",
    "parse_identify_response",
    "check_channel",
    "check_topic",
    "valid_channel_name",
    "valid_topic_name",
]

"""nsq_sync: the synchronous NSQ client for Python (threads or gevent, no event loop).

Public names come from here; submodules are implementation detail unless documented.
"""

from __future__ import annotations

from .__about__ import __version__
from .conn import AsyncConn
from .dispatch import WorkerPool
from .errors import *  # noqa: F401,F403 - the whole error tree is public
from .errors import __all__ as _errors_all
from .helpers import (
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    auth,
    decode_message,
    dpub,
    finish,
    identify,
    mpub,
    nop,
    pub,
    ready,
    requeue,
    subscribe,
    touch,
    unpack_response,
    valid_channel_name,
    valid_topic_name,
)
from .httpapi import LookupdClient, NSQDHTTPClient, NsqdHTTPClient
from .lifecycle import run
from .message import Message
from .reader import Reader
from .writer import Writer

__all__ = [
    "__version__",
    "AsyncConn",
    "Writer",
    "Reader",
    "NsqdHTTPClient",
    "NSQDHTTPClient",
    "LookupdClient",
    "run",
    "Message",
    "WorkerPool",
    "FRAME_TYPE_ERROR",
    "FRAME_TYPE_MESSAGE",
    "FRAME_TYPE_RESPONSE",
    "auth",
    "decode_message",
    "dpub",
    "finish",
    "identify",
    "mpub",
    "nop",
    "pub",
    "ready",
    "requeue",
    "subscribe",
    "touch",
    "unpack_response",
    "valid_channel_name",
    "valid_topic_name",
] + list(_errors_all)

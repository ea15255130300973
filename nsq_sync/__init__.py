"""nsq_sync: the synchronous NSQ client for Python (threads or gevent, no event loop).

Public names come from here; submodules are implementation detail unless documented.
"""

from __future__ import annotations

import typing as _typing

from .__about__ import __version__
from .conn import AsyncConn
from .dispatch import WorkerPool
from . import events as event  # pynsq's nsq.event: nsq_sync.event.MESSAGE, ...
from . import errors as _errors
from .errors import *  # noqa: F401,F403 - the whole error tree is public
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
from .lifecycle import run
from .message import Message
from .protocol.limits import nsqd_limits, set_nsqd_limits
from .writer import Writer

__all__ = [
    "__version__",
    "AsyncConn",
    "event",
    "Writer",
    "Reader",
    "NsqdHTTPClient",
    "NSQDHTTPClient",
    "LookupdClient",
    "run",
    "set_nsqd_limits",
    "nsqd_limits",
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
]
# (the forms mypy and pyright read: a list of str, and += <module>.__all__; tests/unit/test_exports.py)
__all__ += _errors.__all__

_LAZY = {
    "Reader": ("reader", "Reader"),
    "NsqdHTTPClient": ("httpapi", "NsqdHTTPClient"),
    "NSQDHTTPClient": ("httpapi", "NSQDHTTPClient"),
    "LookupdClient": ("httpapi", "LookupdClient"),
}

if _typing.TYPE_CHECKING:
    # What type checkers see of the names __getattr__ loads: the classes themselves (never
    # imported here at run time; tests/unit/test_exports.py keeps this list and _LAZY the same).
    from .httpapi import LookupdClient, NSQDHTTPClient, NsqdHTTPClient
    from .reader import Reader
else:
    # Defined only at run time: a module __getattr__ that type checkers saw would make every
    # attribute of nsq_sync valid for them, a misspelled nsq_sync.Rader included.
    def __getattr__(name: str) -> object:
        """Reader and the HTTP clients load on first use: a process that only publishes
        never pays for http.client and email (about 5 MB of RSS)."""
        target = _LAZY.get(name)
        if target is None:
            raise AttributeError(f"module 'nsq_sync' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f".{target[0]}", __name__), target[1])
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


del annotations  # (bound by the __future__ import: not a name of the package)

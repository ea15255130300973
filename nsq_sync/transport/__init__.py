"""Blocking byte streams: TCP, TLS, deflate and snappy. They know sockets, not NSQ.

Every stream has ``recv(n)`` (b"" at end of stream; raises ``socket.timeout``
when nothing arrived within the timeout), ``sendall(data)``, ``settimeout(t)``
and ``close()``. A reader and writers may use one stream from different
threads at once: on plain TCP the kernel allows it, compression keeps separate
compressor and decompressor state, and :class:`TLSStream` serializes every
call into OpenSSL (see its docstring).
"""

from __future__ import annotations

from typing import Any

from .compression import DeflateStream, SnappyStream
from .tcp import SocketStream


def __getattr__(name: str) -> Any:
    # TLS pulls in ssl (~3 MB): only when asked for.
    if name in ("TLSStream", "make_ssl_context"):
        from . import tls

        return getattr(tls, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["SocketStream", "TLSStream", "DeflateStream", "SnappyStream", "make_ssl_context"]

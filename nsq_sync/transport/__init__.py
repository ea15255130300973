"""Blocking byte streams: TCP, TLS, deflate and snappy. They know sockets, not NSQ.

Every stream has ``recv(n)`` (b"" at end of stream; raises ``socket.timeout``
when nothing arrived within the timeout), ``sendall(data)``, ``settimeout(t)``
and ``close()``. A reader and writers may use one stream from different
threads at once: on plain TCP the kernel allows it, compression keeps separate
compressor and decompressor state, and :class:`TLSStream` serializes every
call into OpenSSL (see its docstring).
"""

from __future__ import annotations

from .compression import DeflateStream, SnappyStream
from .tcp import SocketStream
from .tls import TLSStream, make_ssl_context

__all__ = ["SocketStream", "TLSStream", "DeflateStream", "SnappyStream", "make_ssl_context"]

"""Plain TCP."""

from __future__ import annotations

import socket
from typing import Optional


class SocketStream:
    """A connected socket. The reader calls recv, writers (serialized by the caller) sendall."""

    __slots__ = ("sock", "_recv", "_sendall", "_recv_into", "_buffer", "_view")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._recv = sock.recv
        self._sendall = sock.sendall
        self._recv_into = getattr(sock, "recv_into", None)
        self._buffer: Optional[bytearray] = None
        self._view: Optional[memoryview] = None

    def recv(self, size: int) -> bytes:
        return self._recv(size)

    def read_some(self, size: int) -> Optional[memoryview]:
        """What one recv brings, as a view valid until the next call: None at the end of the stream.

        Reads into one buffer kept for the connection: ``recv(size)`` would allocate *size*
        bytes on every call, which costs more than the recv for a small answer.
        """
        if self._recv_into is None:  # a socket-like object without recv_into
            return self._recv(size) or None
        view = self._view
        if view is None or len(view) < size:
            self._buffer = bytearray(size)
            self._view = view = memoryview(self._buffer)
        count = self._recv_into(view)
        return view[:count] if count else None

    def sendall(self, data: bytes) -> None:
        self._sendall(data)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

    def pending(self) -> bool:
        """True when data is buffered above the socket (a recv would not wait for the network)."""
        return False

    def shutdown(self, write_only: bool = False) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR if write_only else socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass

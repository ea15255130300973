"""Plain TCP."""

from __future__ import annotations

import socket
from typing import Optional


class SocketStream:
    """A connected socket. The reader calls recv, writers (serialized by the caller) sendall."""

    __slots__ = ("sock", "_recv", "_sendall")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._recv = sock.recv
        self._sendall = sock.sendall

    def recv(self, size: int) -> bytes:
        return self._recv(size)

    def sendall(self, data: bytes) -> None:
        self._sendall(data)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.sock.settimeout(timeout)

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

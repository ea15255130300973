"""Plain TCP."""

from __future__ import annotations

import socket
from typing import Optional


class SocketStream:
    """A connected socket. The reader calls recv, writers (serialized by the caller) sendall."""

    __slots__ = ("sock", "_recv", "_send", "_sendall", "_recv_into", "_buffer", "_view", "sendall")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._recv = sock.recv
        self._send = getattr(sock, "send", None)
        self._sendall = self.sendall = sock.sendall
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

    def _send_with_progress(self, data: bytes) -> None:
        """sendall where the socket's timeout bounds each wait for progress, not the whole
        write (a large write to a slow but working peer may take longer than that)."""
        sent = self._send(data)
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            view = view[self._send(view) :]

    def settimeout(self, timeout: Optional[float]) -> None:
        """The socket's timeout; with one, a write fails once it made no progress for that long."""
        self.sock.settimeout(timeout)
        bounded = timeout is not None and self._send is not None
        self.sendall = self._send_with_progress if bounded else self._sendall  # type: ignore[method-assign]

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

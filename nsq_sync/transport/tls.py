"""TLS, safe for one reader thread and many writer threads.

OpenSSL forbids SSL_read and SSL_write running at the same time on one SSL
object (CPython does not serialize them for us; see ARCHITECTURE.md). So the
socket is non-blocking and every call into OpenSSL happens under one lock,
while the waiting for readiness happens outside it with select. A reader
blocked waiting for data therefore never holds up a writer, and no two threads
are ever inside OpenSSL for this socket together.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Callable, Dict, Mapping, Optional, Union

from ..errors import ConfigError

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_TLS_OPTION_KEYS = {"ca_certs", "certfile", "keyfile", "cert_reqs", "check_hostname", "ciphers", "password", "minimum_version"}


def client_hello() -> bytes:
    """The bytes of a TLS ClientHello (no certificate checks: only for :func:`answers_tls`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def answers_tls(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer of *sock*, a fresh connection, answers a TLS ClientHello with a TLS
    record (a ServerHello, or an alert): whether it is a TLS server. The socket is closed.

    Only the first bytes of the answer are read, each read within *timeout*; nothing is
    verified or decrypted. Used to name what a connection reached when it closed on NSQ's
    handshake without a word (an HTTPS port does: see conn.AsyncConn._read_frame).
    """
    head = b""
    try:
        sock.settimeout(timeout)
        sock.sendall(client_hello())
        while len(head) < 3:
            data = sock.recv(3 - len(head))
            if not data:
                break
            head += data
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.close()
    # a record header: content type handshake (22) or alert (21), then version 3.x
    return len(head) == 3 and head[0] in (21, 22) and head[1] == 3


def make_ssl_context(tls_options: Union[None, ssl.SSLContext, Mapping[str, Any]]) -> ssl.SSLContext:
    """Build the client SSLContext from pynsq-style ``tls_options``.

    *tls_options* may be an SSLContext (used as is), None (system CAs, verification and host
    name checking on), or a dict with ``ca_certs``, ``certfile``, ``keyfile``, ``password``,
    ``cert_reqs`` (ssl.CERT_*), ``check_hostname``, ``ciphers``, ``minimum_version``.
    Verification and host name checking are on unless ``cert_reqs=ssl.CERT_NONE``.
    Raises ConfigError for unknown keys or unreadable files.
    """
    if isinstance(tls_options, ssl.SSLContext):
        return tls_options
    options: Dict[str, Any] = dict(tls_options or {})
    unknown = set(options) - _TLS_OPTION_KEYS
    if unknown:
        raise ConfigError("tls_options", sorted(unknown), f"unknown keys; allowed: {sorted(_TLS_OPTION_KEYS)}")
    try:
        context = ssl.create_default_context(cafile=options.get("ca_certs"))
        cert_reqs = options.get("cert_reqs", ssl.CERT_REQUIRED)
        if cert_reqs == ssl.CERT_NONE:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.verify_mode = cert_reqs
            context.check_hostname = bool(options.get("check_hostname", True))
        if options.get("certfile"):
            context.load_cert_chain(options["certfile"], options.get("keyfile"), options.get("password"))
        if options.get("ciphers"):
            context.set_ciphers(options["ciphers"])
        if options.get("minimum_version") is not None:
            context.minimum_version = options["minimum_version"]
    except (OSError, ssl.SSLError, TypeError, ValueError) as exc:  # (a wrong type or value in a key, too)
        raise ConfigError("tls_options", {k: v for k, v in options.items() if k != "password"}, f"cannot build a TLS context: {exc}") from exc
    return context


class TLSStream:
    """An established TLS connection used from one reader and many writers (see the module docstring)."""

    def __init__(
        self,
        sock: ssl.SSLSocket,
        wait_readable: Callable[[Any, Optional[float]], bool],
        wait_writable: Callable[[Any, Optional[float]], bool],
        lock: Any,
        timeout: Optional[float] = None,
    ) -> None:
        self.sock = sock
        self._wait_readable = wait_readable
        self._wait_writable = wait_writable
        self._lock = lock
        self._timeout = timeout
        #: a caller's deadline (time.monotonic()) that also ends a read, set for the read of
        #: a caller waiting for its answer: part of a TLS record may come long before the rest
        self.deadline: Optional[float] = None
        self._view: Optional[memoryview] = None
        sock.setblocking(False)

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = timeout

    def pending(self) -> bool:
        """True when OpenSSL holds decrypted bytes not read yet (select would not see them)."""
        with self._lock:
            try:
                return self.sock.pending() > 0
            except (OSError, ValueError):
                return False

    def recv(self, size: int) -> bytes:
        data = self.read_some(size)
        return b"" if data is None else bytes(data)

    def read_some(self, size: int) -> Optional[memoryview]:
        """What one read brings, as a view valid until the next call: None at the end of the stream
        (one buffer kept for the connection, as SocketStream.read_some)."""
        view = self._view
        if view is None or len(view) < size:
            self._view = view = memoryview(bytearray(size))
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        if self.deadline is not None and (deadline is None or self.deadline < deadline):
            deadline = self.deadline
        while True:
            with self._lock:
                try:
                    count = self.sock.recv_into(view)
                except _WANT:
                    count = -1
            if count >= 0:
                return view[:count] if count else None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout("timed out")
            self._wait_readable(self.sock, remaining)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while view:
            with self._lock:
                try:
                    sent = self.sock.send(view)
                except _WANT:
                    sent = 0
            if sent:
                view = view[sent:]
                if view and deadline is not None:  # the timeout bounds each wait for progress, not the whole write
                    deadline = time.monotonic() + self._timeout  # type: ignore[operator]
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout("timed out")
            # OpenSSL wants the same buffer again once the socket can take it.
            self._wait_writable(self.sock, min(remaining, 0.05) if remaining is not None else 0.05)

    def shutdown(self, write_only: bool = False) -> None:
        # Shut the TCP socket below TLS: SSLSocket.shutdown would drop the SSL object
        # while the reader may be using it.
        how = socket.SHUT_WR if write_only else socket.SHUT_RDWR
        try:
            socket.socket.shutdown(self.sock, how)
        except (OSError, ValueError, TypeError):
            try:
                self.sock.shutdown(how)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass

"""A scripted fake nsqd for tests (in the spirit of go-nsq's ``mock_test.go``).

It speaks the server side of the NSQ V2 TCP protocol on ``127.0.0.1:<free port>``
with plain :mod:`socket` and :mod:`threading`, so it also runs (as greenlets) in a
gevent-monkey-patched test process. It does not import nsq_sync: frames are built
here, independently of the code under test. No TLS and no compression.

Quick start::

    from fake_nsqd import FakeNsqd, error, raw, close

    with FakeNsqd(identify_response={"max_rdy_count": 100}) as server:
        conn = AsyncConn(server.host, server.port)
        conn.connect()
        server.wait_for_command("IDENTIFY")
        server.send_message(b"hello")                 # push a frame at any time
        server.wait_for_command("FIN")                # no sleeps: wait on what the client sends
        assert server.commands == [b"IDENTIFY", b"FIN 0000000000000001"]

or use the :func:`fake_nsqd` pytest fixture (import it into your test module).

**What the client sends** is recorded in arrival order:

* ``server.commands`` / ``session.commands``: command lines without the newline,
  e.g. ``b"SUB t c"``, ``b"RDY 5"``, ``b"FIN <id>"``;
* ``server.received`` / ``session.received``: :class:`Command` objects with
  ``line``, ``name``, ``args`` and ``body`` (IDENTIFY/AUTH/PUB/DPUB/MPUB bodies
  are read by their size prefix; ``command.json()`` parses one, ``command.messages``
  splits an MPUB body);
* ``session.magic`` (the first 4 bytes) and ``session.raw`` (every byte received);
* ``session.identify`` (the client's IDENTIFY dict), ``session.auth_secret``,
  ``server.published`` (``(topic, body, defer_ms)`` for PUB/DPUB/MPUB),
  ``session.finished`` / ``requeued`` / ``touched`` (message ids; ``requeued`` holds
  ``(id, ms)``).

**How it answers.** Each answer goes out *before* the command is recorded: once
``wait_for_command("SUB")`` returns, the client has been sent its ``OK``. The other
way round, a client that already saw an answer (a resolved Future, a returned
``subscribe()``) may be a moment ahead of the record, so wait for the command
(or ``wait_disconnected()``) before asserting on ``server.commands``.

=========== ==========================================================
IDENTIFY    JSON ``server.identify_response`` when the client asked for
            feature_negotiation, else ``OK``
AUTH        JSON ``server.auth_response``
SUB         ``OK``
PUB/MPUB/   ``OK``
DPUB
CLS         ``CLOSE_WAIT`` (and RDY becomes 0: no more messages)
RDY, FIN,   nothing. With ``strict=True`` (the default) it checks like nsqd:
REQ, TOUCH, RDY outside 0..max_rdy_count or before SUB -> fatal ``E_INVALID``
NOP         (error frame, then close); FIN/REQ/TOUCH of an id not in flight
            -> non-fatal ``E_FIN_FAILED``/``E_REQ_FAILED``/``E_TOUCH_FAILED``;
            CLS before SUB, a second CLS or a second SUB -> fatal ``E_INVALID``
unknown     fatal ``E_INVALID``
=========== ==========================================================

Override with :meth:`FakeNsqd.set_answer`; an *answer* is any of

* ``None`` (or :data:`NOTHING`): send nothing;
* ``bytes``, :func:`ok`, :func:`response`: a response frame;
* :func:`error` (``error("E_BAD_TOPIC PUB topic name ...")``): an error frame;
* :func:`raw`: bytes as they are (garbage, partial or oversize frames);
* :func:`message`: a message frame;
* :func:`close` / :func:`close(abort=True) <close>`: close the connection (FIN / RST);
* :data:`DEFAULT`: the default answer above;
* a list of answers, sent in order (``[error("E_INVALID x"), close()]``);
* a callable ``fn(session, command) -> answer``, called in the session's thread
  without the server lock held (it may block, e.g. on an Event of the test).

State effects (RDY count, in-flight, subscribed, closing) are applied whatever
the answer.

**Pushing frames**: ``send_message``, ``send_response``, ``send_error``,
``send_heartbeat``, ``send_raw`` and ``close_client`` exist on the server (acting on
the most recent session, ``server.session``) and on each :class:`Session`.

**RDY control** (like nsqd): :meth:`FakeNsqd.enqueue` queues a message that is
delivered only to a subscribed, not-closing session whose in-flight count is below
its RDY count (RDY n sets the count; each delivery holds one slot until FIN or REQ
frees it; ``send_message`` bypasses RDY but is counted in flight). ``session.rdy``,
``session.in_flight`` (dict id -> :class:`FakeMessage`), ``server.queued``.
With ``redeliver_requeued=True`` a REQ puts the message back on the queue at once
with ``attempts + 1`` (the delay is recorded, not waited for).

**Waiting** (condition variable, no sleeps; each raises :class:`FakeNsqdTimeout`,
an AssertionError that lists what was received): :meth:`~FakeNsqd.wait_for_command`,
:meth:`~FakeNsqd.wait_for_commands`, :meth:`~FakeNsqd.wait_connected`,
:meth:`~FakeNsqd.wait_disconnected`, :meth:`~FakeNsqd.wait_until`.

Every accepted connection gets its own :class:`Session` (``server.sessions``,
``server.session`` is the newest); :meth:`FakeNsqd.stop` closes everything and
joins every thread it started. Thread names start with ``fake_nsqd``.
"""

from __future__ import annotations

import collections
import itertools
import json
import socket
import struct
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

import pytest

__all__ = [
    "FakeNsqd",
    "Session",
    "Command",
    "FakeMessage",
    "FakeNsqdTimeout",
    "ok",
    "response",
    "error",
    "raw",
    "message",
    "close",
    "NOTHING",
    "DEFAULT",
    "frame",
    "response_frame",
    "error_frame",
    "message_frame",
    "HEARTBEAT",
    "fake_nsqd",
]

FRAME_TYPE_RESPONSE = 0
FRAME_TYPE_ERROR = 1
FRAME_TYPE_MESSAGE = 2
MAGIC_V2 = b"  V2"
HEARTBEAT = b"_heartbeat_"
BODY_COMMANDS = frozenset({"IDENTIFY", "AUTH", "PUB", "DPUB", "MPUB"})
MAX_LINE = 64 * 1024
MAX_BODY = 64 * 1024 * 1024

#: nsqd 1.3.0's IDENTIFY response with its default settings (no TLS, no compression)
DEFAULT_IDENTIFY_RESPONSE: Dict[str, Any] = {
    "max_rdy_count": 2500,
    "version": "1.3.0",
    "max_msg_timeout": 900000,
    "msg_timeout": 60000,
    "tls_v1": False,
    "deflate": False,
    "deflate_level": 6,
    "max_deflate_level": 6,
    "snappy": False,
    "sample_rate": 0,
    "auth_required": False,
    "output_buffer_size": 16384,
    "output_buffer_timeout": 250,
}

DEFAULT_AUTH_RESPONSE: Dict[str, Any] = {"identity": "test-identity", "identity_url": "", "permission_count": 1}


# ---------------------------------------------------------------------- frames
def frame(frame_type: int, data: bytes) -> bytes:
    """``[int32 size][int32 frame_type][data]`` with size = len(data) + 4."""
    return struct.pack(">ll", len(data) + 4, frame_type) + bytes(data)


def response_frame(data: Union[bytes, str]) -> bytes:
    return frame(FRAME_TYPE_RESPONSE, _b(data))


def error_frame(text: Union[bytes, str]) -> bytes:
    return frame(FRAME_TYPE_ERROR, _b(text))


def message_frame(message_id: bytes, body: bytes, attempts: int = 1, timestamp: Optional[int] = None) -> bytes:
    """A message frame: int64 ns timestamp, uint16 attempts, 16-byte id, body."""
    if timestamp is None:
        timestamp = time.time_ns()
    return frame(FRAME_TYPE_MESSAGE, struct.pack(">qH", timestamp, attempts) + _b(message_id) + _b(body))


def _b(data: Union[bytes, bytearray, memoryview, str]) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


# --------------------------------------------------------------------- answers
class _Reply:
    __slots__ = ()


class _Frame(_Reply):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.data[:40]!r}>"


class _Close(_Reply):
    __slots__ = ("abort",)

    def __init__(self, abort: bool) -> None:
        self.abort = abort

    def __repr__(self) -> str:
        return f"<close abort={self.abort}>"


class _Default(_Reply):
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFAULT"


#: answer: send nothing
NOTHING = None
#: answer: the default answer for this command
DEFAULT = _Default()


def ok() -> _Frame:
    """Answer: a response frame ``OK``."""
    return _Frame(response_frame(b"OK"))


def response(data: Union[bytes, str, dict]) -> _Frame:
    """Answer: a response frame with *data* (a dict is sent as JSON)."""
    if isinstance(data, dict):
        data = json.dumps(data).encode("utf-8")
    return _Frame(response_frame(data))


def error(text: Union[bytes, str]) -> _Frame:
    """Answer: an error frame, e.g. ``error("E_BAD_TOPIC PUB topic name 'x y' is not valid")``."""
    return _Frame(error_frame(text))


def raw(data: Union[bytes, str]) -> _Frame:
    """Answer: these bytes exactly as given (garbage, partial or oversize frames, an HTTP reply)."""
    return _Frame(_b(data))


def message(body: Union[bytes, str], attempts: int = 1, id: Optional[bytes] = None, timestamp: Optional[int] = None) -> _Frame:
    """Answer: a message frame (not tracked as in flight; use ``session.send_message`` for that)."""
    return _Frame(message_frame(id or b"0123456789abcdef", _b(body), attempts, timestamp))


def close(abort: bool = False) -> _Close:
    """Answer: close the connection (after the frames before it); ``abort=True`` resets it (RST)."""
    return _Close(abort)


Answer = Any  # None | bytes | str | _Reply | list of answers | callable(session, command) -> answer


class FakeNsqdTimeout(AssertionError):
    """A wait_* helper timed out; the message says what the fake received."""


# -------------------------------------------------------------------- records
class Command:
    """One command from the client.

    ``line``: the command line without ``\\n`` (and ``\\r``), e.g. ``b"REQ <id> 1000"``;
    ``name``: ``"REQ"``; ``args``: ``(b"<id>", b"1000")``; ``body``: the bytes after the
    size prefix for IDENTIFY/AUTH/PUB/DPUB/MPUB, else None; ``session``: where it came from.
    """

    __slots__ = ("line", "name", "args", "body", "session", "time")

    def __init__(self, line: bytes, body: Optional[bytes], session: "Session") -> None:
        self.line = line
        parts = line.split(b" ")
        self.name = parts[0].decode("ascii", "replace")
        self.args: Tuple[bytes, ...] = tuple(parts[1:])
        self.body = body
        self.session = session
        self.time = time.monotonic()

    def json(self) -> Any:
        """The body parsed as JSON (IDENTIFY)."""
        if self.body is None:
            raise ValueError(f"{self.name} has no body")
        return json.loads(self.body)

    @property
    def messages(self) -> List[bytes]:
        """The message bodies of an MPUB (or ``[body]`` for PUB/DPUB)."""
        if self.body is None:
            return []
        if self.name != "MPUB":
            return [self.body]
        (count,) = struct.unpack_from(">l", self.body, 0)
        out, offset = [], 4
        for _ in range(count):
            (size,) = struct.unpack_from(">l", self.body, offset)
            out.append(self.body[offset + 4 : offset + 4 + size])
            offset += 4 + size
        return out

    def __repr__(self) -> str:
        body = "" if self.body is None else f" +{len(self.body)}B"
        return f"<Command {self.line!r}{body}>"


class FakeMessage:
    """A message the fake sent (or will send): ``id`` (16 bytes), ``body``, ``attempts``, ``timestamp`` (ns)."""

    __slots__ = ("id", "body", "attempts", "timestamp")

    def __init__(self, id: bytes, body: bytes, attempts: int = 1, timestamp: Optional[int] = None) -> None:
        self.id = id
        self.body = body
        self.attempts = attempts
        self.timestamp = time.time_ns() if timestamp is None else timestamp

    def frame(self) -> bytes:
        return message_frame(self.id, self.body, self.attempts, self.timestamp)

    def __repr__(self) -> str:
        return f"<FakeMessage {self.id!r} attempts={self.attempts} body={self.body[:40]!r}>"


class _ProtocolViolation(Exception):
    """The client sent something the fake cannot parse; answered with an error and closed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# -------------------------------------------------------------------- session
class Session:
    """One accepted client connection and everything it sent (see the module docstring)."""

    def __init__(self, server: "FakeNsqd", sock: socket.socket, address: Tuple[str, int], index: int) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        self.index = index
        self.magic: Optional[bytes] = None
        self.raw = bytearray()
        self.received: List[Command] = []
        self.identify: Optional[Dict[str, Any]] = None
        self.auth_secret: Optional[bytes] = None
        self.subscribed = False
        self.topic: Optional[str] = None
        self.channel: Optional[str] = None
        self.closing = False  # after CLS
        self.rdy = 0
        self.in_flight: Dict[bytes, FakeMessage] = {}
        self.queued: Deque[FakeMessage] = collections.deque()
        self.delivered: List[FakeMessage] = []
        self.finished: List[bytes] = []
        self.requeued: List[Tuple[bytes, int]] = []
        self.touched: List[bytes] = []
        self.errors_sent: List[bytes] = []
        #: True from accept until the session's socket is closed
        self.connected = True
        #: True once the fake read EOF (the client closed or shut down its side)
        self.client_closed = False
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self._abort = False
        self._closed_by_server = False
        self._thread = threading.Thread(target=self._run, name=f"fake_nsqd-session-{index}", daemon=True)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<Session #{self.index} {state} rdy={self.rdy} in_flight={len(self.in_flight)} commands={len(self.received)}>"

    # ------------------------------------------------------------- records
    @property
    def commands(self) -> List[bytes]:
        with self.server._cond:
            return [c.line for c in self.received]

    # ------------------------------------------------------------- sending
    def send_raw(self, data: Union[bytes, str]) -> None:
        """Send bytes as they are. Raises ConnectionError when the socket is gone."""
        data = _b(data)
        with self._send_lock:
            if not self.connected:
                raise ConnectionError(f"fake nsqd session #{self.index} is closed")
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionError(f"fake nsqd session #{self.index}: send failed: {exc}") from exc

    def send_response(self, data: Union[bytes, str, dict]) -> None:
        """Send a response frame (a dict is sent as JSON)."""
        self.send_raw(response(data).data)

    def send_error(self, text: Union[bytes, str]) -> None:
        """Send an error frame (this does not close; follow with close_client() for a fatal one)."""
        self.errors_sent.append(_b(text))
        self.send_raw(error_frame(text))

    def send_heartbeat(self) -> None:
        """Send the ``_heartbeat_`` response frame."""
        self.send_raw(response_frame(HEARTBEAT))

    def send_message(
        self,
        body: Union[bytes, str],
        attempts: int = 1,
        id: Optional[Union[bytes, str]] = None,
        timestamp: Optional[int] = None,
    ) -> FakeMessage:
        """Send a message frame now, whatever the RDY count; it is counted in flight. Returns it."""
        msg = self.server._new_message(body, attempts, id, timestamp)
        with self.server._cond:
            self.in_flight[msg.id] = msg
            self.delivered.append(msg)
            self.server._cond.notify_all()
        self.send_raw(msg.frame())
        return msg

    def enqueue(self, body: Union[bytes, str], attempts: int = 1, id: Optional[Union[bytes, str]] = None) -> FakeMessage:
        """Queue a message for this session only, delivered when its RDY count allows."""
        msg = self.server._new_message(body, attempts, id, None)
        with self.server._cond:
            self.queued.append(msg)
            self.server._pump_locked()
        return msg

    def close_client(self, abort: bool = False) -> None:
        """Close the connection: by default shut down our side (the client reads every byte
        sent so far, then EOF); ``abort=True`` resets it (RST). Returns at once; use
        :meth:`FakeNsqd.wait_disconnected` to wait."""
        self._closed_by_server = True
        if abort:
            self._abort = True
            how = socket.SHUT_RD  # wakes our reader, which closes with SO_LINGER 0
        else:
            how = socket.SHUT_WR
        with self._send_lock:
            try:
                self.sock.shutdown(how)
            except OSError:
                pass

    # ------------------------------------------------------------- reading
    def _recv_more(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.raw += data
        self._buf += data
        return True

    def _read_exact(self, n: int) -> Optional[bytes]:
        while len(self._buf) < n:
            if not self._recv_more():
                return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_line(self) -> Optional[bytes]:
        while True:
            index = self._buf.find(b"\n")
            if index >= 0:
                line = bytes(self._buf[:index])
                del self._buf[: index + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > MAX_LINE:
                raise _ProtocolViolation(f"E_INVALID command line longer than {MAX_LINE} bytes")
            if not self._recv_more():
                return None

    def _run(self) -> None:
        server = self.server
        try:
            self.magic = self._read_exact(4)
            if self.magic is None:
                self.client_closed = not self._abort and not server._stopping
                return
            if self.magic != MAGIC_V2:
                self._send_quiet(error_frame(b"E_BAD_PROTOCOL client sent an invalid magic"))
                return
            while True:
                line = self._read_line()
                if line is None:
                    self.client_closed = not self._abort and not server._stopping
                    return
                body = None
                name = line.split(b" ", 1)[0].decode("ascii", "replace")
                if name in BODY_COMMANDS:
                    size_bytes = self._read_exact(4)
                    if size_bytes is None:
                        self.client_closed = not self._abort and not server._stopping
                        return
                    (size,) = struct.unpack(">l", size_bytes)
                    if size < 0 or size > MAX_BODY:
                        raise _ProtocolViolation(f"E_BAD_BODY {name} body size {size} is invalid")
                    body = self._read_exact(size)
                    if body is None:
                        self.client_closed = not self._abort and not server._stopping
                        return
                command = Command(line, body, self)
                if not self._handle(command):
                    return
        except _ProtocolViolation as exc:
            self._send_quiet(error_frame(exc.text))
        except OSError:
            pass
        finally:
            self._close_socket()
            with server._cond:
                self.connected = False
                server._cond.notify_all()

    def _send_quiet(self, data: bytes) -> None:
        try:
            self.send_raw(data)
        except ConnectionError:
            pass

    def _close_socket(self) -> None:
        with self._send_lock:
            try:
                if self._abort:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.sock.close()
            except OSError:
                pass

    def _handle(self, command: Command) -> bool:
        """Apply the command, answer it, record it. False when the connection must end."""
        server = self.server
        with server._cond:
            default = server._apply_locked(self, command)
            answer = server._scripted_answer_locked(command.name)
        if answer is DEFAULT:
            answer = default
        keep_open = self._send_answer(command, answer, default)
        with server._cond:
            self.received.append(command)
            server.received.append(command)
            server._pump_locked()
            server._cond.notify_all()
        return keep_open

    def _send_answer(self, command: Command, answer: Answer, default: Answer) -> bool:
        if answer is DEFAULT:
            answer = default
        if answer is None:
            return True
        if callable(answer) and not isinstance(answer, _Reply):
            return self._send_answer(command, answer(self, command), default)
        if isinstance(answer, (list, tuple)):
            for item in answer:
                if not self._send_answer(command, item, default):
                    return False
            return True
        if isinstance(answer, (bytes, bytearray, str)):
            answer = response(answer)
        if isinstance(answer, _Close):
            if answer.abort:
                self._abort = True
                return False
            self._closed_by_server = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            # keep reading until the client closes too, so nothing it sends is lost
            return True
        if isinstance(answer, _Frame):
            if answer.data[4:8] == b"\x00\x00\x00\x01":
                self.errors_sent.append(answer.data[8:])
            try:
                self.send_raw(answer.data)
            except ConnectionError:
                return False
            return True
        raise TypeError(f"fake nsqd: cannot send answer {answer!r} to {command!r}")


# --------------------------------------------------------------------- server
class FakeNsqd:
    """The scripted fake nsqd. See the module docstring for the whole API.

    :param identify_response: merged over nsqd's default IDENTIFY response
        (``server.identify_response`` is a plain dict you may change before the client connects)
    :param auth_response: the JSON answer to AUTH
    :param strict: check RDY/FIN/REQ/TOUCH/CLS/SUB like nsqd (error frames) instead of accepting anything
    :param redeliver_requeued: on REQ, put the message back on the queue with attempts + 1
    """

    def __init__(
        self,
        identify_response: Optional[Dict[str, Any]] = None,
        auth_response: Optional[Dict[str, Any]] = None,
        *,
        strict: bool = True,
        redeliver_requeued: bool = False,
    ) -> None:
        self.identify_response: Dict[str, Any] = dict(DEFAULT_IDENTIFY_RESPONSE)
        if identify_response:
            self.identify_response.update(identify_response)
        self.auth_response: Dict[str, Any] = dict(auth_response if auth_response is not None else DEFAULT_AUTH_RESPONSE)
        self.strict = strict
        self.redeliver_requeued = redeliver_requeued
        self.sessions: List[Session] = []
        self.received: List[Command] = []
        self.published: List[Tuple[str, bytes, Optional[int]]] = []
        self.queued: Deque[FakeMessage] = collections.deque()
        self._cond = threading.Condition(threading.RLock())
        self._answers: Dict[str, Answer] = {}
        self._one_shot: Dict[str, Deque[Answer]] = collections.defaultdict(collections.deque)
        self._ids = itertools.count(1)
        self._rr = 0
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._stopping = False
        self.host = "127.0.0.1"
        self.port = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "FakeNsqd":
        """Listen on 127.0.0.1 (a free port: ``server.port``) and accept in a background thread."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.05)  # accept polls, so stop() never depends on waking a blocked accept
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"fake_nsqd-accept-{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every session and join every thread (raises if one is stuck)."""
        self._stopping = True
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        with self._cond:
            sessions = list(self.sessions)
        for session in sessions:
            session._closed_by_server = True
            try:
                session.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        stuck = []
        for session in sessions:
            session._thread.join(timeout)
            if session._thread.is_alive():
                stuck.append(session._thread.name)
        if self._accept_thread is not None and self._accept_thread.is_alive():
            stuck.append(self._accept_thread.name)
        if stuck:
            raise RuntimeError(f"fake nsqd threads did not stop: {stuck}")

    def __enter__(self) -> "FakeNsqd":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                sock, address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._stopping:
                    sock.close()
                    return
                session = Session(self, sock, address, len(self.sessions))
                self.sessions.append(session)
                session._thread.start()
                self._cond.notify_all()

    # -------------------------------------------------------------- records
    @property
    def lock(self) -> Any:
        """The server's (reentrant) lock: hold it to read several records consistently."""
        return self._cond

    @property
    def session(self) -> Session:
        """The most recent session. Raises FakeNsqdTimeout when no client ever connected."""
        with self._cond:
            if not self.sessions:
                raise FakeNsqdTimeout("no client has connected to the fake nsqd")
            return self.sessions[-1]

    @property
    def commands(self) -> List[bytes]:
        """Every command line received, all sessions, in arrival order."""
        with self._cond:
            return [c.line for c in self.received]

    @property
    def bodies(self) -> List[bytes]:
        """The bodies of every command that has one, in arrival order."""
        with self._cond:
            return [c.body for c in self.received if c.body is not None]

    @property
    def finished(self) -> List[bytes]:
        with self._cond:
            return [i for s in self.sessions for i in s.finished]

    @property
    def requeued(self) -> List[Tuple[bytes, int]]:
        with self._cond:
            return [r for s in self.sessions for r in s.requeued]

    # ------------------------------------------------------------ scripting
    def set_answer(self, name: str, answer: Answer, times: Optional[int] = None) -> None:
        """Answer command *name* (``"PUB"``, ``"IDENTIFY"``, ...) with *answer*.

        ``times=None`` replaces the answer for good (``DEFAULT`` restores the default);
        ``times=n`` queues a one-shot answer used for the next *n* such commands before
        falling back to the permanent one.
        """
        name = name.upper()
        with self._cond:
            if times is None:
                if answer is DEFAULT:
                    self._answers.pop(name, None)
                else:
                    self._answers[name] = answer
            else:
                for _ in range(times):
                    self._one_shot[name].append(answer)

    def reset_answers(self) -> None:
        """Forget every set_answer()."""
        with self._cond:
            self._answers.clear()
            self._one_shot.clear()

    def _scripted_answer_locked(self, name: str) -> Answer:
        queue = self._one_shot.get(name)
        if queue:
            return queue.popleft()
        return self._answers.get(name, DEFAULT)

    # ------------------------------------------------- nsqd's state machine
    def _apply_locked(self, session: Session, command: Command) -> Answer:
        """Apply *command* to the session state; return nsqd's default answer."""
        name, args = command.name, command.args
        if name == "IDENTIFY":
            try:
                session.identify = command.json()
            except ValueError:
                return [error("E_BAD_BODY IDENTIFY failed to decode JSON body"), close()]
            if session.identify.get("feature_negotiation"):
                return response(self.identify_response)
            return ok()
        if name == "AUTH":
            session.auth_secret = command.body
            return response(self.auth_response)
        if name == "SUB":
            if self.strict and (session.subscribed or len(args) != 2):
                return [error("E_INVALID cannot SUB in current state"), close()]
            session.subscribed = True
            session.topic = args[0].decode("utf-8", "replace") if args else None
            session.channel = args[1].decode("utf-8", "replace") if len(args) > 1 else None
            return ok()
        if name in ("PUB", "DPUB"):
            topic = args[0].decode("utf-8", "replace") if args else ""
            defer = int(args[1]) if name == "DPUB" and len(args) > 1 and args[1].isdigit() else None
            self.published.append((topic, command.body or b"", defer))
            return ok()
        if name == "MPUB":
            topic = args[0].decode("utf-8", "replace") if args else ""
            try:
                bodies = command.messages
            except struct.error:
                return [error("E_BAD_BODY MPUB failed to read message bodies"), close()]
            self.published.extend((topic, body, None) for body in bodies)
            return ok()
        if name == "RDY":
            try:
                count = int(args[0])
            except (IndexError, ValueError):
                return [error(f"E_INVALID RDY could not parse count {args!r}"), close()]
            if session.closing:
                return None  # nsqd ignores RDY while closing
            max_rdy = int(self.identify_response.get("max_rdy_count", 2500))
            if self.strict and not session.subscribed:
                return [error("E_INVALID cannot RDY in current state"), close()]
            if self.strict and not 0 <= count <= max_rdy:
                return [error(f"E_INVALID RDY count {count} out of range 0-{max_rdy}"), close()]
            session.rdy = count
            return None
        if name in ("FIN", "REQ", "TOUCH"):
            message_id = args[0] if args else b""
            known = message_id in session.in_flight
            if name == "FIN":
                if known:
                    del session.in_flight[message_id]
                session.finished.append(message_id)
            elif name == "REQ":
                try:
                    ms = int(args[1])
                except (IndexError, ValueError):
                    return [error(f"E_INVALID REQ could not parse timeout {args!r}"), close()]
                msg = session.in_flight.pop(message_id, None)
                session.requeued.append((message_id, ms))
                if msg is not None and self.redeliver_requeued:
                    self.queued.append(FakeMessage(msg.id, msg.body, msg.attempts + 1))
            else:
                session.touched.append(message_id)
            if self.strict and not known:
                return error(f"E_{name}_FAILED {name} {message_id.decode('ascii', 'replace')} failed ID not in flight")
            return None
        if name == "CLS":
            if self.strict and (not session.subscribed or session.closing):
                return [error("E_INVALID cannot CLS in current state"), close()]
            session.closing = True
            session.rdy = 0
            return response(b"CLOSE_WAIT")
        if name == "NOP":
            return None
        return [error(f"E_INVALID invalid command {command.line[:40]!r}"), close()]

    def _new_message(self, body: Union[bytes, str], attempts: int, id: Optional[Union[bytes, str]], timestamp: Optional[int]) -> FakeMessage:
        if id is None:
            message_id = b"%016x" % next(self._ids)
        else:
            message_id = _b(id)
            if len(message_id) != 16:
                raise ValueError(f"a message id must be 16 bytes, not {message_id!r}")
        return FakeMessage(message_id, _b(body), attempts, timestamp)

    def _pump_locked(self) -> None:
        """Deliver queued messages to sessions whose RDY count allows (round robin)."""
        for session in self.sessions:
            while session.queued and self._ready_for(session):
                self._deliver_locked(session, session.queued.popleft())
        while self.queued:
            ready = [s for s in self.sessions if self._ready_for(s)]
            if not ready:
                return
            session = ready[self._rr % len(ready)]
            self._rr += 1
            self._deliver_locked(session, self.queued.popleft())

    @staticmethod
    def _ready_for(session: Session) -> bool:
        return (
            session.connected
            and not session._closed_by_server
            and session.subscribed
            and not session.closing
            and len(session.in_flight) < session.rdy
        )

    def _deliver_locked(self, session: Session, msg: FakeMessage) -> None:
        session.in_flight[msg.id] = msg
        session.delivered.append(msg)
        try:
            session.send_raw(msg.frame())
        except ConnectionError:
            del session.in_flight[msg.id]
            session.delivered.pop()
            self.queued.appendleft(msg)
        self._cond.notify_all()

    # ---------------------------------------------- pushing (newest session)
    def enqueue(self, body: Union[bytes, str], attempts: int = 1, id: Optional[Union[bytes, str]] = None) -> FakeMessage:
        """Queue a message for whichever session has RDY room (like a channel in nsqd). Returns it."""
        msg = self._new_message(body, attempts, id, None)
        with self._cond:
            self.queued.append(msg)
            self._pump_locked()
        return msg

    def send_message(
        self,
        body: Union[bytes, str],
        attempts: int = 1,
        id: Optional[Union[bytes, str]] = None,
        timestamp: Optional[int] = None,
    ) -> FakeMessage:
        """Send a message frame to the newest session now, whatever its RDY (see Session.send_message)."""
        return self.session.send_message(body, attempts, id, timestamp)

    def send_response(self, data: Union[bytes, str, dict]) -> None:
        self.session.send_response(data)

    def send_error(self, text: Union[bytes, str]) -> None:
        self.session.send_error(text)

    def send_heartbeat(self) -> None:
        self.session.send_heartbeat()

    def send_raw(self, data: Union[bytes, str]) -> None:
        self.session.send_raw(data)

    def close_client(self, abort: bool = False) -> None:
        self.session.close_client(abort)

    # -------------------------------------------------------------- waiting
    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        """Wait until ``predicate()`` (called with the server lock held) is true."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise FakeNsqdTimeout(f"fake nsqd: timed out after {timeout}s waiting for {what}; {self._describe_locked()}")

    def wait_for_command(
        self,
        prefix: Union[bytes, str],
        timeout: float = 5.0,
        count: int = 1,
        session: Optional[Session] = None,
    ) -> Command:
        """Wait until *count* commands starting with *prefix* arrived (from *session*, or any); return the count-th."""
        prefix = _b(prefix)
        found: List[Command] = []

        def matched() -> bool:
            source = session.received if session is not None else self.received
            found[:] = [c for c in source if c.line.startswith(prefix)]
            return len(found) >= count

        self.wait_until(matched, timeout, f"{count} x {prefix!r}")
        return found[count - 1]

    def wait_for_commands(self, n: int, timeout: float = 5.0, session: Optional[Session] = None) -> List[bytes]:
        """Wait until at least *n* commands arrived (from *session*, or any); return all command lines."""
        source = session.received if session is not None else self.received
        self.wait_until(lambda: len(source) >= n, timeout, f"{n} commands")
        with self._cond:
            return [c.line for c in source]

    def wait_connected(self, timeout: float = 5.0, count: int = 1) -> Session:
        """Wait until *count* connections were accepted in total; return the count-th session."""
        self.wait_until(lambda: len(self.sessions) >= count, timeout, f"{count} connection(s)")
        with self._cond:
            return self.sessions[count - 1]

    def wait_disconnected(self, session: Optional[Session] = None, timeout: float = 5.0) -> Session:
        """Wait until *session* (default: the newest) is closed on both sides; return it."""
        target = session if session is not None else self.session
        self.wait_until(lambda: not target.connected, timeout, f"session #{target.index} to close")
        return target

    def _describe_locked(self) -> str:
        lines = [c.line[:60] for c in self.received[-20:]]
        return f"{len(self.sessions)} session(s), {len(self.received)} command(s), last: {lines}"


@pytest.fixture
def fake_nsqd() -> Iterator[FakeNsqd]:
    """A started :class:`FakeNsqd` with default answers, stopped (threads joined) after the test."""
    server = FakeNsqd()
    server.start()
    try:
        yield server
    finally:
        server.stop()

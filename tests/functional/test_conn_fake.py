"""AsyncConn against the scripted fake nsqd: exact events, exact bytes, every fault.

Runs on the backend named by NSQ_SYNC_BACKEND (tests/conftest.py monkey-patches
the process for gevent). No sleeps for synchronization: every wait is on an
event, a condition or a Future, with a timeout.
"""

from __future__ import annotations

import gc
import logging
import struct
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from nsq_sync import AsyncConn, Message, WorkerPool
from nsq_sync.backends import get_backend
from nsq_sync.errors import TimeoutError as NsqTimeoutError
from nsq_sync.errors import (
    AlreadyRespondedError,
    AuthRequiredError,
    BadTopicError,
    ConfigError,
    ConnectError,
    ConnectionClosedError,
    FinFailedError,
    IdentifyFailedError,
    InvalidError,
    ProtocolError,
    PubFailedError,
    SendError,
    StaleConnectionError,
    TLSError,
)
from nsq_sync.protocol import commands
from nsq_sync.testing import wait_until

try:  # tests/functional as a package, or (the default rootdir layout) on sys.path
    from .fake_nsqd import (
        DEFAULT,
        FakeNsqd,
        FakeNsqdTimeout,
        close,
        error,
        fake_nsqd,  # noqa: F401 - the fixture
        frame,
        message_frame,
        ok,
        raw,
        response,
    )
except ImportError:
    from fake_nsqd import (  # type: ignore[no-redef]
        DEFAULT,
        FakeNsqd,
        FakeNsqdTimeout,
        close,
        error,
        fake_nsqd,  # noqa: F401 - the fixture
        frame,
        message_frame,
        ok,
        raw,
        response,
    )

WAIT = 5.0
ALL_EVENTS = (
    "connect",
    "identify",
    "identify_response",
    "auth",
    "auth_response",
    "ready",
    "response",
    "heartbeat",
    "message",
    "error",
    "close",
    "backoff",
    "resume",
    "continue",
)
#: the events of the handshake; whether handshake frames also reach ``response`` listeners
#: (pynsq: yes) is left out of these assertions on purpose
HANDSHAKE = ("connect", "identify", "identify_response", "auth", "auth_response", "ready", "error", "close")
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nBad Request"


# ------------------------------------------------------------------ helpers
class Recorder:
    """Records every event of a connection, in order, and lets the test wait for them."""

    def __init__(self, conn: AsyncConn, names=ALL_EVENTS) -> None:
        self.events: List[Tuple[str, Dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._callbacks = {}
        for name in names:
            callback = self._make(name)
            self._callbacks[name] = callback
            conn.on(name, callback)

    def _make(self, name: str) -> Callable[..., None]:
        def callback(**kwargs: Any) -> None:
            with self._cond:
                self.events.append((name, kwargs))
                self._cond.notify_all()

        return callback

    def names(self, include=None) -> List[str]:
        with self._cond:
            return [n for n, _ in self.events if include is None or n in include]

    def of(self, name: str) -> List[Dict[str, Any]]:
        with self._cond:
            return [kw for n, kw in self.events if n == name]

    def wait(self, name: str, count: int = 1, timeout: float = WAIT) -> Dict[str, Any]:
        with self._cond:
            ok_ = self._cond.wait_for(lambda: len([1 for n, _ in self.events if n == name]) >= count, timeout)
            if not ok_:
                raise AssertionError(f"no {count} x {name!r} event within {timeout}s; events: {[n for n, _ in self.events]}")
            return [kw for n, kw in self.events if n == name][count - 1]


def live_tasks(backend: str) -> List[str]:
    """Names of live nsq_sync threads, or greenlets under gevent."""
    names = [t.name for t in threading.enumerate() if "nsq_sync" in t.name and t.is_alive()]
    if backend == "gevent":
        import gevent

        names += [g.name for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and not g.dead and "nsq_sync" in (g.name or "")]
    return sorted(names)


def assert_no_leak(backend: str, before: List[str], timeout: float = 3.0) -> None:
    """nsq_sync's own tasks end by themselves once the connection is closed (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        leaked = sorted(set(live_tasks(backend)) - set(before))
        if not leaked:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"nsq_sync tasks still running after close: {leaked}")
        _yield(0.01)


def _yield(seconds: float) -> None:
    # polls the thread list only (never used to wait for the peer); gevent.sleep under gevent
    time.sleep(seconds)


def wait_future(future: "Future[Any]", timeout: float = WAIT) -> Any:
    return future.result(timeout)


def wait_exception(future: "Future[Any]", timeout: float = WAIT) -> BaseException:
    exc = future.exception(timeout)
    assert exc is not None, f"future resolved with {future.result()!r}"
    return exc


@pytest.fixture
def server(fake_nsqd: FakeNsqd) -> FakeNsqd:  # noqa: F811 - fixture imported above
    return fake_nsqd


@pytest.fixture
def make_conn(server: FakeNsqd, backend: str) -> Iterator[Callable[..., AsyncConn]]:
    conns: List[AsyncConn] = []

    def make(**kwargs: Any) -> AsyncConn:
        kwargs.setdefault("backend", backend)
        conn = AsyncConn(server.host, server.port, **kwargs)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close(timeout=2)


@pytest.fixture
def tasks_before(backend: str) -> List[str]:
    return live_tasks(backend)


def ready_conn(make_conn: Callable[..., AsyncConn], server: FakeNsqd, subscribe: bool = False, **kwargs: Any):
    conn = make_conn(**kwargs)
    events = Recorder(conn)
    conn.connect()
    server.wait_for_command("IDENTIFY")
    if subscribe:
        assert conn.subscribe("topic", "channel") == b"OK"
        server.wait_for_command("SUB topic channel")
    return conn, events


def assert_fault(
    conn: AsyncConn,
    events: Recorder,
    backend: str,
    before: List[str],
    error_type: type,
    match: str = "",
) -> BaseException:
    """One error event of *error_type*, then exactly one close; no task left behind."""
    events.wait("close")
    assert conn.wait_closed(WAIT)
    errors = events.of("error")
    assert len(errors) == 1, errors
    exc = errors[0]["error"]
    assert isinstance(exc, error_type), repr(exc)
    assert errors[0]["conn"] is conn
    assert match.lower() in str(exc).lower(), str(exc)
    names = events.names()
    assert names.index("error") < names.index("close")
    assert names.count("close") == 1
    assert conn.closed() and not conn.connected()
    assert conn.error is exc
    assert_no_leak(backend, before)
    conn.close(timeout=1)  # idempotent after the fact
    assert events.names().count("close") == 1
    return exc


# ---------------------------------------------------------------- handshake
def test_a_handshake_answer_trickled_byte_by_byte_times_out(server: FakeNsqd, make_conn) -> None:
    # Each recv got its byte within the timeout, so connect() waited as long as the peer
    # trickled (for ever, for a hostile one): the whole answer must come within the timeout.
    stop = threading.Event()

    def trickle(session: Any, command: Any) -> Any:
        session.send_raw(struct.pack(">ll", 1004, 0))  # a response frame of 1,000 bytes...
        for _ in range(100):  # ...that comes a byte every 0.1 s (10 s in all)
            if stop.wait(0.1) or not session.connected:
                break
            try:
                session.send_raw(b"x")
            except ConnectionError:
                break
        return None

    server.set_answer("IDENTIFY", trickle)
    conn = make_conn(timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError, match="came in part"):
            conn.connect()
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()


@pytest.mark.parametrize(
    "answer, match",
    [
        (b"{" + b'"padding": "' + b"x" * 70_000 + b'"}', "more than 65536 bytes in answer to IDENTIFY"),
        (b"[" * 20_000 + b"]" * 20_000, "IDENTIFY response is not JSON"),  # (nested too deep: RecursionError)
    ],
    ids=["oversized", "nested-too-deep"],
)
def test_a_handshake_answer_too_big_or_too_deep_is_a_protocol_error(server: FakeNsqd, make_conn, answer: bytes, match: str) -> None:
    server.set_answer("IDENTIFY", response(answer))
    conn = make_conn()
    with pytest.raises(ProtocolError, match=match):
        conn.connect()
    assert conn.identify_response is None and not conn.connected()


def test_handshake_events_and_wire(server: FakeNsqd, make_conn, tasks_before) -> None:
    server.identify_response["max_rdy_count"] = 123
    conn = make_conn(heartbeat_interval=5, client_id="cid", hostname="host.example", user_agent="ua/1")
    events = Recorder(conn)
    assert conn.connect() is conn
    assert conn.connected()
    ident = server.wait_for_command("IDENTIFY")

    assert events.names(HANDSHAKE) == ["connect", "identify", "identify_response", "ready"]
    kwargs = [kw for name, kw in events.events if name in HANDSHAKE]
    assert kwargs[0] == {"conn": conn}
    assert kwargs[1] == {"conn": conn, "data": ident.json()}
    assert kwargs[2] == {"conn": conn, "data": server.identify_response}
    assert kwargs[3] == {"conn": conn}

    session = server.session
    assert session.magic == b"  V2"
    assert bytes(session.raw) == b"  V2IDENTIFY\n" + struct.pack(">l", len(ident.body)) + ident.body
    assert server.commands == [b"IDENTIFY"]
    data = ident.json()
    assert data == {
        "client_id": "cid",
        "hostname": "host.example",
        "user_agent": "ua/1",
        "feature_negotiation": True,
        "heartbeat_interval": 5000,
        "output_buffer_size": 16384,
        "output_buffer_timeout": 250,
        "tls_v1": False,
        "snappy": False,
        "deflate": False,
        "deflate_level": 6,
        "sample_rate": 0,
    }
    assert "msg_timeout" not in data
    assert conn.max_rdy_count == 123
    assert conn.identify_response == server.identify_response


def test_identify_defaults_and_msg_timeout(server: FakeNsqd, make_conn) -> None:
    import socket as socket_module

    conn = make_conn(msg_timeout=2.5, output_buffer_size=-1, output_buffer_timeout=0, sample_rate=10)
    conn.connect()
    data = server.wait_for_command("IDENTIFY").json()
    hostname = socket_module.gethostname()
    assert data["hostname"] == hostname
    assert data["client_id"] == hostname.split(".")[0]
    assert data["user_agent"].startswith("nsq_sync/")
    assert data["heartbeat_interval"] == 30000
    assert data["msg_timeout"] == 2500
    assert data["output_buffer_size"] == -1
    assert data["output_buffer_timeout"] == 0
    assert data["sample_rate"] == 10
    assert data["feature_negotiation"] is True


def test_plain_ok_identify_response(server: FakeNsqd, make_conn) -> None:
    server.set_answer("IDENTIFY", ok())
    conn = make_conn()
    events = Recorder(conn)
    conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "ready"]
    assert conn.identify_response == {}
    assert conn.max_rdy_count == 2500
    assert conn.connected()


def test_plain_ok_identify_response_with_tls_asked_fails_before_anything_else(server: FakeNsqd, make_conn) -> None:
    # A plain OK negotiates nothing: going on would publish in clear text what was meant for TLS.
    server.set_answer("IDENTIFY", ok())
    conn = make_conn(tls_v1=True, auth_secret="never-in-clear")
    events = Recorder(conn)
    with pytest.raises(TLSError, match="plain OK"):
        conn.connect()
    assert "ready" not in events.names()
    assert conn.closed()
    server.wait_disconnected()
    assert server.commands == [b"IDENTIFY"]


@pytest.mark.parametrize("answer", ["plain OK", "JSON without it"])
@pytest.mark.parametrize("codec", ["snappy", "deflate"])
def test_compression_not_offered_goes_on_uncompressed_and_says_so(server: FakeNsqd, make_conn, caplog, answer: str, codec: str) -> None:
    if answer == "plain OK":
        server.set_answer("IDENTIFY", ok())
    else:
        server.identify_response[codec] = False
    conn = make_conn(**{codec: True})
    with caplog.at_level("WARNING", logger="nsq_sync.conn"):
        conn.connect()
    assert [r.getMessage() for r in caplog.records if r.name == "nsq_sync.conn"] == [
        f"{codec} was asked for but {conn.id} does not offer it; the connection is not compressed"
    ]
    assert conn.request_wait(commands.pub("t", b"plain"), timeout=5) == b"OK"
    assert server.wait_for_command("PUB").body == b"plain"  # it went out uncompressed, and nsqd read it


def test_subscribe_without_heartbeats_is_refused_before_sending(server: FakeNsqd, make_conn) -> None:
    conn = make_conn(heartbeat_interval=-1)
    conn.connect()
    with pytest.raises(ConfigError, match="heartbeat_interval=-1"):
        conn.subscribe("t", "c")
    # Nothing was sent, and the connection still publishes.
    assert conn.request_wait(commands.pub("t", b"x"), timeout=5) == b"OK"
    server.wait_for_command("PUB t")  # (the fake answers before it records: see fake_nsqd)
    assert server.commands == [b"IDENTIFY", b"PUB t"]


def test_auth_required_without_secret(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    server.identify_response["auth_required"] = True
    conn = make_conn()
    events = Recorder(conn)
    with pytest.raises(AuthRequiredError):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "identify_response", "error", "close"]
    assert isinstance(events.of("error")[0]["error"], AuthRequiredError)
    assert events.of("error")[0]["conn"] is conn
    assert events.of("close") == [{"conn": conn}]
    assert conn.closed()
    server.wait_disconnected()
    assert server.commands == [b"IDENTIFY"]
    assert_no_leak(backend, tasks_before)
    conn.close(timeout=1)
    assert events.names().count("close") == 1


def test_auth_with_secret(server: FakeNsqd, make_conn) -> None:
    server.identify_response["auth_required"] = True
    server.auth_response = {"identity": "me", "identity_url": "http://x", "permission_count": 2}
    conn = make_conn(auth_secret="s3cret")
    events = Recorder(conn)
    conn.connect()
    auth = server.wait_for_command("AUTH")
    assert auth.line == b"AUTH" and auth.body == b"s3cret"
    assert server.session.auth_secret == b"s3cret"
    assert server.commands == [b"IDENTIFY", b"AUTH"]
    assert events.names(HANDSHAKE) == ["connect", "identify", "identify_response", "auth", "auth_response", "ready"]
    assert events.of("auth") == [{"conn": conn, "data": b"s3cret"}]
    assert events.of("auth_response") == [{"conn": conn, "data": server.auth_response}]
    assert conn.auth_response == server.auth_response


def test_auth_secret_not_sent_when_not_required(server: FakeNsqd, make_conn) -> None:
    conn = make_conn(auth_secret=b"unused")
    events = Recorder(conn)
    conn.connect()
    server.wait_for_command("IDENTIFY")
    conn.subscribe("t", "c")
    assert server.wait_for_commands(2) == [b"IDENTIFY", b"SUB t c"]
    assert "auth" not in events.names()


def test_handshake_error_frame(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    server.set_answer("IDENTIFY", [error("E_IDENTIFY_FAILED cannot enable both deflate and snappy"), close()])
    conn = make_conn()
    events = Recorder(conn)
    with pytest.raises(IdentifyFailedError) as info:
        conn.connect()
    assert info.value.fatal and "both deflate and snappy" in str(info.value)
    assert events.names().count("close") == 1 and events.names().count("error") == 1
    # The socket is closed now, not when the garbage collector frees the connection (the
    # error's traceback keeps it alive): reconnect loops against such an nsqd hold no fds.
    assert conn._raw_sock.fileno() == -1
    assert_no_leak(backend, tasks_before)


def test_auth_failure_error_frame(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    from nsq_sync.errors import AuthFailedError

    server.identify_response["auth_required"] = True
    server.set_answer("AUTH", [error("E_AUTH_FAILED AUTH failed"), close()])
    conn = make_conn(auth_secret="wrong")
    events = Recorder(conn)
    with pytest.raises(AuthFailedError):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "identify_response", "auth", "error", "close"]
    assert_no_leak(backend, tasks_before)


def test_no_identify_answer_times_out(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    from nsq_sync.errors import ConnectError

    server.set_answer("IDENTIFY", None)
    conn = make_conn(timeout=0.5)
    events = Recorder(conn)
    started = time.monotonic()
    with pytest.raises(ConnectError, match="timed out"):
        conn.connect()
    assert time.monotonic() - started < 3
    assert events.names(HANDSHAKE) == ["connect", "identify", "error", "close"]
    server.wait_disconnected()
    assert_no_leak(backend, tasks_before)


# ---------------------------------------------------------------- heartbeat
def test_heartbeat_answered_with_nop(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_heartbeat()
    assert server.wait_for_command("NOP").line == b"NOP"
    assert events.wait("heartbeat") == {"conn": conn}
    assert server.commands == [b"IDENTIFY", b"NOP"]
    assert events.of("response") == []  # _heartbeat_ is not an ordinary response


def test_heartbeat_during_handshake_is_answered(server: FakeNsqd, make_conn) -> None:
    server.set_answer("IDENTIFY", [response(b"_heartbeat_"), DEFAULT])
    conn = make_conn()
    events = Recorder(conn)
    conn.connect()
    server.wait_for_command("NOP")
    assert server.commands == [b"IDENTIFY", b"NOP"]
    assert events.names(HANDSHAKE) == ["connect", "identify", "identify_response", "ready"]


def test_heartbeat_coalesced_with_identify_response_is_answered(server: FakeNsqd, make_conn) -> None:
    identify = response(server.identify_response).data
    server.set_answer("IDENTIFY", raw(identify + response(b"_heartbeat_").data))  # one segment
    conn = make_conn()
    conn.connect()
    server.wait_for_command("NOP", timeout=2)


# ------------------------------------------------------------------- faults
def test_garbage_frame_type(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_raw(frame(7, b"garbage"))
    assert_fault(conn, events, backend, tasks_before, ProtocolError, "unknown frame type 7")


def test_garbage_bytes(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_raw(b"\xde\xad\xbe\xef random garbage that is no frame")
    assert_fault(conn, events, backend, tasks_before, ProtocolError, "frame size")


def test_negative_frame_size(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_raw(struct.pack(">ll", -5, 0))
    assert_fault(conn, events, backend, tasks_before, ProtocolError, "bad frame size -5")


def test_frame_larger_than_max_frame_size(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server, max_frame_size=4096)
    # only the header: the client must refuse before waiting for 1 MiB that never comes
    server.send_raw(struct.pack(">ll", 1024 * 1024, 0))
    exc = assert_fault(conn, events, backend, tasks_before, ProtocolError, "limit of 4096")
    assert "max_frame_size" in str(exc)


def test_frame_of_exactly_max_frame_size_is_accepted(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server, max_frame_size=4096)
    server.send_raw(frame(0, b"x" * 4092))  # size field = 4096
    assert events.wait("response")["data"] == b"x" * 4092
    assert conn.connected()


def test_http_response_during_handshake(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    server.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    conn = make_conn()
    events = Recorder(conn)
    with pytest.raises(ProtocolError, match="HTTP port"):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "error", "close"]
    assert isinstance(events.of("error")[0]["error"], ProtocolError)
    assert_no_leak(backend, tasks_before)


@pytest.mark.parametrize("abort", [False, True], ids=["fin", "rst"])
def test_a_close_on_identify_by_a_peer_that_is_no_tls_server_stays_a_close(server: FakeNsqd, make_conn, abort: bool) -> None:
    # A close without a word on IDENTIFY is asked whether it came from a TLS server (nsqd's
    # HTTPS port does that: test_tls_real.py). Another peer's (a proxy with no backend, an
    # nsqd stopping) stays a close, which may pass: a Writer waits for it as before.
    server.set_answer("IDENTIFY", close(abort=abort))
    conn = make_conn()
    with pytest.raises((ConnectionClosedError, ConnectError)) as info:
        conn.connect()
    assert not isinstance(info.value, ProtocolError) and "HTTPS" not in str(info.value), repr(info.value)
    # the question went to the same address, as a TLS ClientHello (the fake answers E_BAD_PROTOCOL)
    server.wait_until(lambda: any(s.magic and s.magic[:1] == b"\x16" for s in server.sessions), WAIT, "the TLS question")


def test_http_response_detected_whatever_max_frame_size(server: FakeNsqd, make_conn) -> None:
    server.set_answer("IDENTIFY", raw(HTTP_400))  # an HTTP server that keeps the connection open
    conn = make_conn(max_frame_size=2**31 - 1, timeout=1.0)
    with pytest.raises(ProtocolError, match="HTTP port"):
        conn.connect()


@pytest.mark.parametrize(
    "answer, shown, said",
    [
        (HTTP_400, repr(HTTP_400[:48]) + "...", "is this nsqd's HTTP port instead of its TCP port?"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", repr(b"SSH-2.0-OpenSSH_9.6\r\n"), "exceeds the limit"),
        # nsqlookupd's TCP port: a bare size and error, no frame type (nsqd frames its own)
        (struct.pack(">l", 14) + b"E_BAD_PROTOCOL", repr(struct.pack(">l", 14) + b"E_BAD_PROTOCOL"), "is this nsqlookupd's TCP port instead of nsqd's?"),
    ],
    ids=["http", "ssh-banner", "nsqlookupd-tcp"],
)
def test_a_handshake_answer_that_is_not_nsq_says_who_sent_what(server: FakeNsqd, make_conn, answer: bytes, shown: str, said: str) -> None:
    # The decoder's error alone ("frame size 1397966893 exceeds the limit ...") does not say
    # what answered: the address, the step and the first bytes received do.
    server.set_answer("IDENTIFY", [raw(answer), close()])
    conn = make_conn()
    with pytest.raises(ProtocolError) as info:
        conn.connect()
    message = str(info.value)
    assert message.startswith(f"{server.host}:{server.port} answered IDENTIFY with {shown}, not NSQ's protocol: "), message
    assert said in message, message


def test_http_response_after_ready(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_raw(HTTP_400)
    assert_fault(conn, events, backend, tasks_before, ProtocolError, "HTTP port")


def test_close_in_the_middle_of_a_frame(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    whole = message_frame(b"0123456789abcdef", b"a body that will be cut")
    server.send_raw(whole[:20])
    server.close_client()
    assert_fault(conn, events, backend, tasks_before, ConnectionClosedError, "closed the connection")
    server.wait_disconnected()
    assert events.of("message") == []


def test_server_resets_connection(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.close_client(abort=True)
    assert_fault(conn, events, backend, tasks_before, ConnectionClosedError)


def test_stale_connection_without_heartbeats(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server, heartbeat_interval=1)
    started = time.monotonic()
    events.wait("error", timeout=8)
    elapsed = time.monotonic() - started
    exc = assert_fault(conn, events, backend, tasks_before, StaleConnectionError, "stale")
    assert isinstance(exc, ConnectionClosedError)
    assert 1.5 <= elapsed <= 4.5, elapsed
    server.wait_disconnected()


@pytest.mark.parametrize("writer", ["reader task", "caller"])
def test_peer_that_stops_reading_is_closed_after_the_staleness_limit(server: FakeNsqd, make_conn, backend, tasks_before, writer: str) -> None:
    """A write that makes no progress for two heartbeat intervals closes the connection.

    The fake answers the first PUB and stops reading at the second, so the bytes behind it
    fill the socket buffers and a write blocks. With "reader task", the reader flushes 38
    megabyte PUBs queued behind the first answer, and nobody is left to notice that nothing
    arrives either; with "caller", a thread writes a 20 MB PUB with send(). Either way the
    connection used to hang until TCP gave up.
    """
    release = threading.Event()
    queued = threading.Event()  # the first answer waits until everything is queued behind it
    seen: List[int] = []

    def answer(session: Any, command: Any) -> Any:
        seen.append(1)
        if len(seen) == 1:
            queued.wait(10)
        else:
            release.wait(30)  # stop reading
        return ok()

    server.set_answer("PUB", answer)
    conn, events = ready_conn(make_conn, server, heartbeat_interval=1)  # stale after 2 s
    body = b"x" * 1_000_000
    sender_error: List[BaseException] = []
    try:
        first = conn.request(commands.pub("t", body))
        if writer == "reader task":
            futures = [conn.request(commands.pub("t", body)) for _ in range(39)]  # queued behind the first
            queued.set()  # so the reader flushes all 38 MB in one write once the answer comes
        else:
            queued.set()
            assert first.result(timeout=WAIT) == b"OK"
            futures = [conn.request(commands.pub("t", body))]  # sent at once; the fake stops reading
            server.wait_until(lambda: len(seen) == 2, what="the second PUB")

            def send_big() -> None:
                try:  # one 20 MB command: the fake, let go at the end, has one command to parse
                    conn.send(commands.pub("t", b"x" * 20_000_000))
                except BaseException as exc:  # noqa: B036 - kept for the assertion below
                    sender_error.append(exc)

            sender = threading.Thread(target=send_big, daemon=True)
            sender.start()
        began = time.monotonic()
        # (the kernel takes a few more bytes now and then for a while: the limit is on progress)
        events.wait("close", timeout=30)
        # (the reader task no longer writes a socket without room itself: a flush task does, and
        # reports the stall, unless the reader, still reading, sees the silence first: here both
        # limits are 2 s)
        exc = assert_fault(conn, events, backend, tasks_before, (SendError, StaleConnectionError))
        if isinstance(exc, SendError):
            assert "stopped reading" in str(exc), repr(exc)
        took = time.monotonic() - began
        assert took < 10, f"closed after {took:.1f}s; the staleness limit is 2 s"
        assert first.result(timeout=1) == b"OK"
        for future in futures:
            assert isinstance(future.exception(timeout=WAIT), ConnectionClosedError) or future.exception() is exc
        if writer == "caller":
            sender.join(WAIT)
            assert not sender.is_alive() and sender_error, "send() of 20 MB to a peer that reads nothing returned"
            assert sender_error[0] is exc or isinstance(sender_error[0], ConnectionClosedError), repr(sender_error[0])
    finally:
        queued.set()
        release.set()


@pytest.mark.parametrize("caller", ["request", "request_wait"])
def test_a_caller_does_not_write_for_others_to_a_peer_that_stops_reading(server: FakeNsqd, make_conn, backend, tasks_before, caller: str) -> None:
    """The peer stops reading (its session blocks at a NOP); then 20 MB, more than the socket
    buffers take. A Future's request() returns at once (it wrote until the stall limit first,
    4 s here), a request_wait(timeout=1) raises TimeoutError at about 1 s (it wrote until the
    stall limit too). A flush task goes on writing and closes the connection as stalled; the
    request fails, it never succeeds."""
    release = threading.Event()
    stopped = threading.Event()

    def stop_reading(session: Any, command: Any) -> None:
        stopped.set()
        release.wait(30)

    server.set_answer("NOP", stop_reading)
    conn, events = ready_conn(make_conn, server, heartbeat_interval=2)  # stall limit 4 s
    data = commands.pub("t", b"x" * 20_000_000)
    try:
        conn.send(b"NOP\n")
        assert stopped.wait(WAIT)
        began = time.monotonic()
        if caller == "request":
            future = conn.request(data)
        else:
            with pytest.raises(NsqTimeoutError):
                conn.request_wait(data, timeout=1.0)
        took = time.monotonic() - began
        assert took < (1.0 if caller == "request" else 2.0), took
        assert conn.wait_closed(30)
        assert_fault(conn, events, backend, tasks_before, (SendError, StaleConnectionError))
        if caller == "request":
            assert isinstance(future.exception(timeout=WAIT), ConnectionClosedError), future.exception()
    finally:
        release.set()


def test_heartbeats_keep_connection_fresh(server: FakeNsqd, make_conn) -> None:
    # three heartbeats ~0.8 s apart span more than 2 x heartbeat_interval: no stale close
    conn, events = ready_conn(make_conn, server, heartbeat_interval=1)
    for count in range(1, 4):
        server.send_heartbeat()
        server.wait_for_command("NOP", count=count)
        events.wait("heartbeat", count=count)
        time.sleep(0.8)  # pacing (wall time must pass), not synchronization
    assert conn.connected()
    assert events.of("error") == []


def test_invalid_json_identify_response(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    server.set_answer("IDENTIFY", response(b"{not json"))
    conn = make_conn()
    events = Recorder(conn)
    with pytest.raises(ProtocolError, match="not JSON"):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "error", "close"]
    assert_no_leak(backend, tasks_before)


def test_identify_response_not_an_object(server: FakeNsqd, make_conn) -> None:
    server.set_answer("IDENTIFY", response(b"[1, 2]"))
    conn = make_conn()
    with pytest.raises(ProtocolError, match="not a JSON object"):
        conn.connect()


def test_server_closes_during_handshake(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    server.set_answer("IDENTIFY", close())
    conn = make_conn()
    events = Recorder(conn)
    with pytest.raises(ConnectionClosedError, match="during IDENTIFY"):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "error", "close"]
    assert_no_leak(backend, tasks_before)


def test_message_frame_shorter_than_header(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_raw(frame(2, b"x" * 25))
    exc = assert_fault(conn, events, backend, tasks_before, ProtocolError, "26-byte header")
    assert "25 bytes" in str(exc)
    assert conn.in_flight == 0


def test_fatal_error_frame(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_error("E_INVALID cannot FIN in current state")
    exc = assert_fault(conn, events, backend, tasks_before, InvalidError, "cannot FIN")
    assert exc.fatal is True
    assert exc.code == "E_INVALID"
    assert exc.text == "cannot FIN in current state"
    server.wait_disconnected()  # the client closed without waiting for nsqd to


def test_error_frame_text_is_bounded_and_escaped_in_the_error_and_the_log(server: FakeNsqd, make_conn, caplog) -> None:
    # an E_PUB_FAILED with a newline forged a "CRITICAL ..." line in the WARNING the
    # connection logs, and 8 MB of text went whole into the exception
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", None)
    future = conn.request(commands.pub("t", b"m"))
    server.wait_for_command("PUB t")
    with caplog.at_level(logging.DEBUG, logger="nsq_sync.conn"):
        server.send_error("E_PUB_FAILED boom\nCRITICAL forged line " + "x" * 1_000_000)
        exc = wait_exception(future)
        events.wait("close")
    assert isinstance(exc, PubFailedError) and exc.code == "E_PUB_FAILED"
    assert exc.text.startswith("boom\\nCRITICAL forged line xxx") and exc.text.endswith(" more characters)")
    assert "\n" not in str(exc) and len(str(exc)) < 600
    logged = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.conn" and "E_PUB_FAILED" in r.getMessage()]
    assert logged, [r.getMessage()[:200] for r in caplog.records]
    for line in logged:
        assert "\n" not in line and len(line) < 1000


def test_non_fatal_error_frame_keeps_connection(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    server.send_error("E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
    exc = events.wait("error")["error"]
    assert isinstance(exc, FinFailedError)
    assert exc.fatal is False
    assert exc.code == "E_FIN_FAILED"
    # still alive: a heartbeat round trip works
    server.send_heartbeat()
    server.wait_for_command("NOP")
    events.wait("heartbeat")
    assert conn.connected()
    assert events.of("close") == []
    assert server.session.connected


def test_non_fatal_error_does_not_fail_pending_request(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", None)
    future = conn.request(commands.pub("t", b"m"))
    server.wait_for_command("PUB t")
    server.send_error("E_TOUCH_FAILED TOUCH 0123456789abcdef failed")
    events.wait("error")
    assert not future.done()
    server.send_response(b"OK")
    assert wait_future(future) == b"OK"


# ------------------------------------------------------------ requests/responses
def test_requests_resolve_in_order(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", lambda session, command: response(b"OK " + command.body))
    futures = [conn.request(commands.pub("t", b"m%d" % i)) for i in range(5)]
    assert [wait_future(f) for f in futures] == [b"OK m%d" % i for i in range(5)]
    server.wait_for_command("PUB", count=5)  # the fake records a command after answering it
    assert server.commands[1:] == [b"PUB t"] * 5
    assert server.bodies[1:] == [b"m%d" % i for i in range(5)]
    assert [p[:2] for p in server.published] == [("t", b"m%d" % i) for i in range(5)]
    assert conn.pending_requests == 0
    events.wait("response", count=5)  # events run on the control lane, after the Futures resolve
    assert [kw["data"] for kw in events.of("response")] == [b"OK m%d" % i for i in range(5)]


def test_plain_ok_for_pub_mpub_dpub(server: FakeNsqd, make_conn) -> None:
    conn, _ = ready_conn(make_conn, server)
    futures = [
        conn.request(commands.pub("t", b"one")),
        conn.request(commands.mpub("t", [b"a", b"bb"])),
        conn.request(commands.dpub("t", 1500, b"later")),
    ]
    assert [wait_future(f) for f in futures] == [b"OK"] * 3
    mpub = server.wait_for_command("MPUB")
    server.wait_for_command("DPUB")
    assert mpub.messages == [b"a", b"bb"]
    assert server.commands == [b"IDENTIFY", b"PUB t", b"MPUB t", b"DPUB t 1500"]
    assert server.published == [("t", b"one", None), ("t", b"a", None), ("t", b"bb", None), ("t", b"later", 1500)]


def test_error_frame_fails_first_pending_request(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", None)
    first = conn.request(commands.pub("t", b"1"))
    second = conn.request(commands.pub("t", b"2"))  # queued behind the unanswered first (Nagle)
    server.wait_for_command("PUB", count=1)
    server.send_error('E_BAD_TOPIC PUB topic name "t" is not valid')  # nsqd: error frame, then close
    server.close_client()
    exc = wait_exception(first)
    assert isinstance(exc, BadTopicError) and exc.fatal
    assert "is not valid" in str(exc)
    second_exc = wait_exception(second)
    assert isinstance(second_exc, ConnectionClosedError)
    assert second_exc.unprocessed is True  # it came after a fatal error: nsqd never ran it
    server.wait_disconnected()
    assert server.published == [("t", b"1", None)]  # the second never left
    # a fatal error frame is reported once and closes the connection
    assert_fault(conn, events, backend, tasks_before, BadTopicError)
    with pytest.raises(ConnectionClosedError):
        conn.request(commands.pub("t", b"3"))


def test_subscribe_error_raises_typed(server: FakeNsqd, make_conn) -> None:
    conn, _ = ready_conn(make_conn, server)
    server.set_answer("SUB", [error("E_BAD_CHANNEL SUB channel name \"c\" is not valid"), close()])
    from nsq_sync.errors import BadChannelError

    with pytest.raises(BadChannelError):
        conn.subscribe("t", "c")


def test_pending_requests_fail_when_server_closes(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", None)
    futures = [conn.request(commands.pub("t", b"m%d" % i)) for i in range(5)]
    server.wait_for_command("PUB", count=1)  # the other four wait for its answer (Nagle)
    assert conn.pending_requests == 5
    server.close_client()
    for future in futures:
        exc = wait_exception(future)
        assert isinstance(exc, ConnectionClosedError), repr(exc)
        assert "before nsqd answered" in str(exc)
    assert conn.pending_requests == 0
    assert_fault(conn, events, backend, tasks_before, ConnectionClosedError)


def test_requests_behind_an_unanswered_one_leave_together_after_its_answer(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    server.set_answer("PUB", None, times=1)  # the first waits until we answer it by hand
    first = conn.request(commands.pub("t", b"m0"))
    server.wait_for_command("PUB", count=1)
    rest = [conn.request(commands.pub("t", b"m%d" % i)) for i in range(1, 6)]
    # Queued, not written: nothing but the first has reached the server.
    assert server.published == [("t", b"m0", None)]
    assert not any(f.done() for f in rest)
    server.session.send_response("OK")  # the first answer: its reader sends the rest in one write
    assert first.result(5) == b"OK"
    assert [f.result(5) for f in rest] == [b"OK"] * 5
    assert server.published == [("t", b"m%d" % i, None) for i in range(6)]
    raw = server.session.raw
    tail = b"".join(commands.pub("t", b"m%d" % i) for i in range(1, 6))
    assert raw.endswith(tail)  # in call order, back to back


# ------------------------------------------------------------------ messages
@pytest.fixture
def sub_conn(make_conn, server: FakeNsqd):
    """A subscribed connection whose message events are collected in a list; it sent RDY
    *rdy* (a connection that gets more messages than its highest RDY ends: see
    test_more_messages_than_rdy_end_the_connection)."""

    def make(rdy: int = 100, **kwargs: Any):
        conn, events = ready_conn(make_conn, server, subscribe=True, **kwargs)
        if rdy:
            conn.send_rdy(rdy)
            server.wait_for_command(f"RDY {rdy}")
        return conn, events

    return make


def test_more_messages_than_rdy_make_nsqd_forget_the_oldest_and_the_connection_goes_on(server: FakeNsqd, sub_conn, caplog: Any) -> None:
    # nsqd goes past RDY only after a channel empty, where it forgets every message in flight
    # and sends RDY new ones: the oldest beyond RDY are no longer counted, their answers are
    # not sent (nsqd would refuse them), and the connection goes on. It ended with a
    # ProtocolError ("nsqd never does"), and what it had read came again after a reconnect.
    conn, events = sub_conn(rdy=2)
    for i in range(2):
        server.send_message(b"m%d" % i)
    events.wait("message", count=2)
    with caplog.at_level(logging.WARNING, logger="nsq_sync.conn"):
        server.send_message(b"after the empty")
        events.wait("message", count=3)
    m0, m1, m2 = [kw["message"] for kw in events.of("message")]
    assert conn.in_flight == 2
    assert [m0.finish(), m1.finish(), m2.finish()] == [False, True, True]
    server.wait_for_command("FIN", count=2)
    assert [c for c in server.commands if c.startswith(b"FIN")] == [b"FIN " + m1.id, b"FIN " + m2.id]
    assert conn.connected() and conn.in_flight == 0 and events.of("error") == []
    assert any("no longer counts 1 earlier ones" in r.getMessage() for r in caplog.records)


def test_a_peer_flooding_past_rdy_is_held_to_rdy_messages_in_flight(server: FakeNsqd, sub_conn) -> None:
    # A peer that ignores RDY: the oldest are forgotten as the new ones come, so what this
    # connection holds stays at RDY (it filled memory without bound before the RDY check).
    conn, events = sub_conn(rdy=2)
    for i in range(200):
        server.send_message(b"m%d" % i)
    events.wait("message", count=2)
    # The last message comes to the listener after its read's bookkeeping (the forgetting);
    # the NOP alone is no sign of it: a heartbeat read with messages is answered before they
    # are counted.
    wait_until(lambda: b"m199" in {kw["message"].body for kw in events.of("message")}, WAIT, message="m199 delivered")
    assert conn.in_flight == 2 and conn.connected()
    newest = {kw["message"].body for kw in events.of("message") if not kw["message"].has_responded()}
    assert newest <= {b"m198", b"m199"}


def finish_all_and_stay_connected(server: FakeNsqd, conn: AsyncConn, events: "Recorder", count: int) -> None:
    """*count* messages arrived and were finished, and the connection took none of it for a fault."""
    events.wait("message", count=count)
    for kw in events.of("message"):
        kw["message"].finish()
    server.wait_for_command("FIN", count=count)
    assert conn.connected() and events.of("error") == []


def test_lowering_rdy_keeps_the_messages_already_in_flight(server: FakeNsqd, sub_conn) -> None:
    # RDY 5, five messages, then RDY 1: nsqd may have sent all five before it saw the RDY 1,
    # and a RDY written with send() (pynsq code sends nsq.ready(n) itself) counts as well.
    conn, events = sub_conn(rdy=0)
    conn.send(b"NOP\nRDY 5\n")
    server.wait_for_command("RDY 5")
    conn.send_rdy(1)
    server.wait_for_command("RDY 1")
    for i in range(5):
        server.send_message(b"m%d" % i)
    finish_all_and_stay_connected(server, conn, events, 5)


def test_messages_nsqd_may_have_timed_out_are_not_counted(server: FakeNsqd, sub_conn) -> None:
    # A handler slower than msg_timeout: nsqd times its message out, counts it no more, and
    # sends another while the first is still here. With a 1 s msg_timeout no message here is
    # surely still in flight at nsqd, so three with RDY 1 are no fault.
    server.identify_response["msg_timeout"] = 1000
    conn, events = sub_conn(rdy=1, msg_timeout=1)
    for i in range(3):
        server.send_message(b"m%d" % i)
    finish_all_and_stay_connected(server, conn, events, 3)


def test_a_message_on_a_connection_that_never_sent_rdy_ends_it(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    # A Writer's connection: nsqd sends it no message, ever (before, each one stayed in flight
    # for good, and a flood of them filled memory).
    conn, events = ready_conn(make_conn, server)
    server.send_message(b"unasked")
    assert_fault(conn, events, backend, tasks_before, ProtocolError, match="it was never sent RDY")


def test_message_event_and_finish(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    sent = server.send_message(b"hello", attempts=3, timestamp=1234567890123)
    got = events.wait("message")
    assert got["conn"] is conn
    msg = got["message"]
    assert isinstance(msg, Message)
    assert msg.id == sent.id and len(msg.id) == 16
    assert msg.body == b"hello"
    assert msg.attempts == 3
    assert msg.timestamp == 1234567890123
    assert conn.in_flight == 1
    assert not msg.has_responded()

    msg.finish()
    assert events.names(("resume", "backoff", "continue")) == ["resume"]
    assert events.of("resume") == [{"conn": conn}]
    assert conn.in_flight == 0
    assert msg.has_responded()
    assert server.wait_for_command("FIN").line == b"FIN " + sent.id
    assert server.session.in_flight == {}

    with pytest.raises(AlreadyRespondedError):
        msg.finish()
    with pytest.raises(AlreadyRespondedError):
        msg.requeue()
    with pytest.raises(AlreadyRespondedError):
        msg.touch()
    assert conn.in_flight == 0
    # nothing more was written: a heartbeat's NOP is the next command after FIN
    server.send_heartbeat()
    server.wait_for_command("NOP")
    assert server.commands[-2:] == [b"FIN " + sent.id, b"NOP"]


def test_answers_after_the_connection_ended_are_reported_not_raised(server: FakeNsqd, sub_conn, caplog: pytest.LogCaptureFixture) -> None:
    # pynsq's finish()/requeue()/touch() never raise for a connection that is gone (nsqd delivers
    # the message again by itself): code answering later from its own thread (a batcher) died of
    # the ConnectionClosedError nsq_sync raised, and nothing answered the messages after it.
    conn, events = sub_conn()
    first = server.send_message(b"one")
    server.send_message(b"two")
    server.send_message(b"three")
    messages = [events.wait("message", count=n)["message"] for n in (1, 2, 3)]
    assert messages[0].id == first.id
    server.close_client()
    events.wait("close")
    with caplog.at_level(logging.WARNING, logger="nsq_sync.conn"):
        assert messages[0].touch() is False
        assert not messages[0].has_responded()  # a lost touch is no answer
        assert messages[0].finish() is False
        assert messages[0].has_responded()  # ...a lost finish is (pynsq's meaning): not answered twice
        with pytest.raises(AlreadyRespondedError):
            messages[0].requeue()
        assert messages[1].requeue(delay=0) is False
        assert messages[2].finish() is False
    lost = [r for r in caplog.records if "answer(s) not sent" in r.getMessage()]
    assert len(lost) == 1 and "1 answer(s)" in lost[0].getMessage(), "one warning, then counted for the next one"
    # A Reader (any owner) takes the report instead.
    reported: List[Any] = []
    conn._lost_answers = lambda message, error: reported.append((message, type(error)))
    conn._lost_tally = type(conn._lost_tally)(10.0)
    fresh = Message(b"0" * 16, b"x", 0, 1, conn)
    assert fresh.finish() is False
    assert reported == [(fresh, ConnectionClosedError)]


def test_attempts_decoded_unsigned(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    server.send_message(b"x", attempts=40000)
    msg = events.wait("message")["message"]
    assert msg.attempts == 40000
    msg.finish()


def test_requeue_default_delay_and_backoff(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn(requeue_delay=2)
    sent = server.send_message(b"x", attempts=3)
    msg = events.wait("message")["message"]
    msg.requeue()
    assert events.names(("resume", "backoff", "continue")) == ["backoff"]
    assert events.of("backoff") == [{"conn": conn}]
    assert server.wait_for_command("REQ").line == b"REQ %s 6000" % sent.id
    assert conn.in_flight == 0
    assert server.session.requeued == [(sent.id, 6000)]


def test_time_left_follows_nsqds_timeouts_touches_and_cap(server: FakeNsqd, sub_conn, monkeypatch) -> None:
    server.identify_response.update(msg_timeout=60000, max_msg_timeout=90000)
    conn, events = sub_conn()
    assert conn.message_timeouts == (60.0, 90.0)
    before = time.monotonic()
    server.send_message(b"long job")
    msg = events.wait("message")["message"]
    left = msg.time_left()
    assert 60.0 - (time.monotonic() - before) <= left <= 60.0
    # When the connection read it, by its own clock. (Worked back from time_left() and a later
    # clock read, it was off by the microseconds between them: once 11 us, over approx's 10 us.)
    arrived = msg._arrived
    assert before <= arrived <= time.monotonic()
    # Move the message's clock instead of waiting: 50 s in, a touch gives 60 s more, but only
    # up to 90 s from delivery (nsqd's max_msg_timeout): 40 s.
    now = [arrived + 50.0]
    monkeypatch.setattr("nsq_sync.message._clock", lambda: now[0])
    assert msg.time_left() == pytest.approx(10.0)
    msg.touch()
    assert server.wait_for_command("TOUCH").line == b"TOUCH %s" % msg.id
    assert msg.time_left() == pytest.approx(40.0)
    now[0] = arrived + 95.0
    assert msg.time_left() == pytest.approx(-5.0)  # past it: nsqd has given it to someone else
    # Early touches restart the 60 s from the touch.
    now[0] = arrived + 10.0
    msg.touch()
    assert msg.time_left() == pytest.approx(60.0)
    msg.finish()


def test_time_left_unknown_without_negotiation_or_connection(server: FakeNsqd, sub_conn) -> None:
    assert Message(b"0" * 16, b"made by hand", 0, 1).time_left() is None
    server.set_answer("IDENTIFY", ok())  # a plain OK: nsqd's timeouts are unknown
    conn, events = sub_conn()
    assert conn.message_timeouts is None
    server.send_message(b"x")
    msg = events.wait("message")["message"]
    assert msg.time_left() is None
    msg.finish()


def test_requeue_delay_capped_by_max_requeue_delay(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn(requeue_delay=90, max_requeue_delay=100)
    sent = server.send_message(b"x", attempts=5)
    events.wait("message")["message"].requeue()
    assert server.wait_for_command("REQ").line == b"REQ %s 100000" % sent.id


def test_requeue_without_backoff(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    sent = server.send_message(b"x", attempts=2)
    msg = events.wait("message")["message"]
    msg.requeue(delay=0, backoff=False)
    assert events.names(("resume", "backoff", "continue")) == ["continue"]
    assert server.wait_for_command("REQ").line == b"REQ %s 0" % sent.id
    with pytest.raises(AlreadyRespondedError):
        msg.requeue(delay=0, backoff=False)


def test_requeue_explicit_delay_and_time_ms(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    a = server.send_message(b"a")
    b = server.send_message(b"b")
    events.wait("message", count=2)
    msgs = {kw["message"].id: kw["message"] for kw in events.of("message")}
    msgs[a.id].requeue(delay=1.5)
    msgs[b.id].requeue(time_ms=250)
    server.wait_for_command("REQ", count=2)
    assert server.commands[-2:] == [b"REQ %s 1500" % a.id, b"REQ %s 250" % b.id]


def test_in_flight_counts_and_touch(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    sent = [server.send_message(b"m%d" % i) for i in range(3)]
    events.wait("message", count=3)
    assert conn.in_flight == 3
    msgs = [kw["message"] for kw in events.of("message")]
    assert [m.id for m in msgs] == [s.id for s in sent]
    msgs[0].touch()
    assert server.wait_for_command("TOUCH").line == b"TOUCH " + sent[0].id
    assert conn.in_flight == 3
    msgs[0].finish()
    assert conn.in_flight == 2
    msgs[1].requeue(backoff=False)
    assert conn.in_flight == 1
    msgs[2].finish()
    assert conn.in_flight == 0
    server.wait_for_command("FIN", count=2)
    assert server.session.in_flight == {}
    assert server.session.errors_sent == []


def test_send_rdy(server: FakeNsqd, make_conn) -> None:
    server.identify_response["max_rdy_count"] = 100
    conn, events = ready_conn(make_conn, server, subscribe=True)
    assert conn.max_rdy_count == 100
    conn.send_rdy(5)
    assert server.wait_for_command("RDY").line == b"RDY 5"
    assert (conn.rdy, conn.last_rdy) == (5, 5)
    with pytest.raises(ConfigError) as info:
        conn.send_rdy(101)
    assert info.value.param == "rdy"
    assert (conn.rdy, conn.last_rdy) == (5, 5)
    with pytest.raises(ConfigError):
        conn.send_rdy(-1)
    conn.send_rdy(100)
    conn.send_rdy(0)
    server.wait_for_command("RDY", count=3)
    assert server.commands == [b"IDENTIFY", b"SUB topic channel", b"RDY 5", b"RDY 100", b"RDY 0"]
    assert server.session.rdy == 0
    assert server.session.errors_sent == []


def test_fake_delivers_under_rdy_control(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn(rdy=0)
    queued = [server.enqueue(b"q%d" % i) for i in range(3)]
    conn.send_rdy(1)
    first = events.wait("message")["message"]
    assert first.id == queued[0].id
    server.wait_until(lambda: len(server.session.delivered) == 1)
    assert len(server.queued) == 2
    first.finish()
    second = events.wait("message", count=2)["message"]
    assert second.id == queued[1].id
    second.finish()
    third = events.wait("message", count=3)["message"]
    third.finish()
    server.wait_for_command("FIN", count=3)
    assert server.finished == [q.id for q in queued]
    assert conn.in_flight == 0


def test_slow_handler_does_not_block_heartbeats(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    entered = threading.Event()
    release = threading.Event()

    def slow(conn: AsyncConn, message: Message) -> None:
        entered.set()
        assert release.wait(WAIT)
        message.finish()

    conn.on("message", slow)
    sent = server.send_message(b"slow")
    assert entered.wait(WAIT)
    for count in range(1, 4):
        server.send_heartbeat()
    server.wait_for_command("NOP", count=3)
    events.wait("heartbeat", count=3)
    assert not release.is_set()
    assert conn.in_flight == 1
    release.set()
    assert server.wait_for_command("FIN").line == b"FIN " + sent.id
    assert server.commands[2:] == [b"RDY 100", b"NOP", b"NOP", b"NOP", b"FIN " + sent.id]


# ------------------------------------------------------------------- closing
def test_graceful_close_waits_for_close_wait_and_in_flight(server: FakeNsqd, sub_conn, backend, tasks_before) -> None:
    conn, events = sub_conn(rdy=0)
    conn.send_rdy(1)
    entered = threading.Event()
    release = threading.Event()

    def handler(conn: AsyncConn, message: Message) -> None:
        entered.set()
        assert release.wait(WAIT)
        message.finish()

    conn.on("message", handler)
    sent = server.send_message(b"in flight")
    assert entered.wait(WAIT)

    server.set_answer("CLS", None)  # CLOSE_WAIT comes when the test says so
    closer = threading.Thread(target=conn.close, kwargs={"timeout": WAIT}, name="test-closer")
    closer.start()
    try:
        server.wait_for_command("CLS")
        assert closer.is_alive()  # waits for CLOSE_WAIT and for the message in flight
        assert conn.connected()
    finally:
        release.set()
    assert server.wait_for_command("FIN").line == b"FIN " + sent.id  # answered on the closing connection
    assert closer.is_alive()  # still no CLOSE_WAIT
    assert conn.connected()
    server.send_response(b"CLOSE_WAIT")
    closer.join(WAIT)
    assert not closer.is_alive()
    server.wait_disconnected()  # the fake has read everything the client sent
    assert server.commands == [b"IDENTIFY", b"SUB topic channel", b"RDY 1", b"CLS", b"FIN " + sent.id]
    events.wait("response", count=2)
    assert [kw["data"] for kw in events.of("response")] == [b"OK", b"CLOSE_WAIT"]
    assert conn.closed()
    assert conn.wait_closed(WAIT)
    events.wait("close")
    assert events.names().count("close") == 1
    assert events.of("error") == []
    assert events.names(("resume",)) == ["resume"]
    server.wait_disconnected()
    # close() once more, and from two threads at once: still one close event
    conn.close(timeout=1)
    threads = [threading.Thread(target=conn.close, kwargs={"timeout": 1}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert events.names().count("close") == 1
    assert_no_leak(backend, tasks_before)


def test_answers_are_held_for_at_most_half_the_rdy_window(server: FakeNsqd, sub_conn) -> None:
    """The FINs of a read wait for the read's last message to start, but no more than half
    the RDY count of them: then they leave, so nsqd refills the window meanwhile. Here the
    third of four messages (one read, one worker, RDY 4) finishes only once nsqd has the
    first two FINs; held until the fourth started, they would never come."""
    conn, events = sub_conn()
    ids = [b"%016d" % i for i in range(4)]
    seen_by_third: List[int] = []

    def handler(conn: AsyncConn, message: Message) -> None:
        if message.id == ids[2]:
            server.wait_for_command("FIN", count=2)
            seen_by_third.append(sum(1 for c in server.commands if c.startswith(b"FIN ")))
        message.finish()

    conn.on("message", handler)
    conn.send_rdy(4)
    server.wait_for_command("RDY 4")
    server.send_raw(b"".join(message_frame(i, b"x") for i in ids))
    server.wait_for_command("FIN", count=4)
    assert seen_by_third == [2]
    assert [c for c in server.commands if c.startswith(b"FIN ")] == [b"FIN " + i for i in ids]
    assert conn.in_flight == 0


@pytest.mark.parametrize("answer", ["finish", "requeue"])
def test_an_answer_held_back_is_not_held_up_by_a_slow_handler(server: FakeNsqd, make_conn, backend, answer) -> None:
    """Answers wait for the read's last message to start (coalescing), but not behind a
    handler that takes long: one worker, three messages in one read, the second handler
    runs until nsqd has the first message's answer. Held until the third message started,
    that answer would wait for the slow handler (with slow handlers: past msg_timeout, and
    nsqd would deliver a message already handled again)."""
    pool = WorkerPool(1, backend=backend)
    try:
        conn, _events = ready_conn(make_conn, server, subscribe=True, worker_pool=pool)
        ids = [b"%016d" % i for i in range(3)]
        verb = b"FIN" if answer == "finish" else b"REQ"
        saw_first_answer: List[bool] = []

        def handler(conn: AsyncConn, message: Message) -> None:
            if message.id == ids[0]:
                getattr(message, answer)()
                return
            if message.id == ids[1]:
                try:
                    server.wait_for_command(verb + b" " + ids[0], timeout=WAIT)
                    saw_first_answer.append(True)
                except FakeNsqdTimeout:
                    saw_first_answer.append(False)
            message.finish()

        conn.on("message", handler)
        conn.send_rdy(10)  # (answers are held for up to half of it: 5)
        server.wait_for_command("RDY 10")
        server.send_raw(b"".join(message_frame(i, b"x") for i in ids))
        server.wait_for_command("FIN " + ids[2].decode())
        assert saw_first_answer == [True]
        lines = [c for c in server.commands if c.startswith((b"FIN ", b"REQ "))]
        assert [line.split(b" ")[:2] for line in lines] == [[verb, ids[0]], [b"FIN", ids[1]], [b"FIN", ids[2]]]
        assert conn.in_flight == 0
    finally:
        pool.close(wait=False)


def test_graceful_close_with_nsqd_silent_after_cls_ends_soon_after_the_last_answer(server: FakeNsqd, sub_conn) -> None:
    # A stopped or hung nsqd never confirms CLS: close() waited its whole timeout (30 s with
    # a review's SIGSTOPped nsqd) although every handler had answered after 0.5 s. Now it
    # waits CLS_GRACE_SECONDS once nothing is left to answer; the FIN is written first.
    conn, events = sub_conn(rdy=1)
    release = threading.Event()

    def handler(conn: AsyncConn, message: Message) -> None:
        assert release.wait(WAIT)
        message.finish()

    conn.on("message", handler)
    sent = server.send_message(b"in flight")
    server.set_answer("CLS", None)  # never confirmed
    closer = threading.Thread(target=conn.close, kwargs={"timeout": 120}, name="test-closer")
    closer.start()
    try:
        server.wait_for_command("CLS")
        assert closer.is_alive()  # the message in flight holds it
    finally:
        release.set()
    assert server.wait_for_command("FIN").line == b"FIN " + sent.id
    closer.join(WAIT)  # (well within its timeout)
    assert not closer.is_alive()
    server.wait_disconnected()
    assert server.commands[-2:] == [b"CLS", b"FIN " + sent.id]


def test_close_wait_between_finish_and_its_write_loses_no_fin(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn()
    entered = threading.Event()
    release = threading.Event()
    outcome: List[BaseException] = []

    def handler(conn: AsyncConn, message: Message) -> None:
        entered.set()
        assert release.wait(WAIT)
        try:
            message.finish()
        except BaseException as exc:
            outcome.append(exc)

    def on_resume(conn: AsyncConn) -> None:
        # runs inside finish(): in_flight is already 0, FIN not yet written. CLOSE_WAIT arrives now.
        server.send_response(b"CLOSE_WAIT")
        conn.wait_closed(1.0)  # a correct close() waits for the FIN instead of closing under it

    conn.on("message", handler)
    conn.on("resume", on_resume)
    sent = server.send_message(b"x")
    assert entered.wait(WAIT)
    server.set_answer("CLS", None)
    closer = threading.Thread(target=conn.close, kwargs={"timeout": WAIT}, name="test-closer")
    closer.start()
    server.wait_for_command("CLS")
    release.set()
    closer.join(WAIT)
    server.wait_disconnected()
    assert outcome == []
    assert server.commands[-1] == b"FIN " + sent.id


def test_concurrent_close_sends_one_cls_and_one_close_event(server: FakeNsqd, sub_conn, backend, tasks_before) -> None:
    conn, events = sub_conn(rdy=0)
    barrier = threading.Barrier(2)

    def closer() -> None:
        barrier.wait(WAIT)
        conn.close(timeout=WAIT)

    threads = [threading.Thread(target=closer, name=f"test-closer-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    server.wait_disconnected()
    assert conn.wait_closed(WAIT)
    events.wait("close")
    assert server.commands == [b"IDENTIFY", b"SUB topic channel", b"CLS"]
    assert events.names().count("close") == 1
    assert events.of("error") == []
    assert server.session.errors_sent == []
    assert_no_leak(backend, tasks_before)


def test_close_unsubscribed_is_immediate(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn, events = ready_conn(make_conn, server)
    conn.close(timeout=WAIT)
    assert conn.closed()
    server.wait_disconnected()
    assert server.commands == [b"IDENTIFY"]  # no CLS before SUB (nsqd: fatal E_INVALID)
    events.wait("close")
    assert events.names().count("close") == 1
    assert events.of("error") == []
    assert_no_leak(backend, tasks_before)


def test_close_from_message_handler_returns_promptly(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn(close_timeout=3)
    took: List[float] = []
    done = threading.Event()

    def handler(conn: AsyncConn, message: Message) -> None:
        started = time.monotonic()
        try:
            conn.close()
        finally:
            took.append(time.monotonic() - started)
            done.set()

    conn.on("message", handler)
    server.send_message(b"x")
    assert done.wait(WAIT)
    assert took[0] < 1.5, f"close() inside the handler took {took[0]:.1f}s"


def test_close_before_connect(make_conn) -> None:
    conn = make_conn()
    events = Recorder(conn)
    conn.close()
    conn.close()
    assert events.names() == ["close"]
    assert conn.closed()


class _SlowConnect:
    """The test's backend, with a TCP connect that waits for *release* (slow DNS, SYN retries)."""

    def __init__(self, backend: str, connecting: threading.Event, release: threading.Event) -> None:
        self._inner = get_backend(backend)
        self.name = self._inner.name
        self._connecting, self._release = connecting, release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create_connection(self, address: Any, timeout: Any) -> Any:
        self._connecting.set()
        assert self._release.wait(WAIT)
        return self._inner.create_connection(address, timeout)


def test_close_while_connect_runs_in_another_thread_closes_the_connection(server: FakeNsqd, backend, tasks_before) -> None:
    # close() before connect() has a socket: connect() must not go on to a live connection
    # that nothing closes (it did: no close event, and a second close() hung).
    connecting, release = threading.Event(), threading.Event()
    conn = AsyncConn(server.host, server.port, backend=_SlowConnect(backend, connecting, release))
    events = Recorder(conn)
    outcome: List[Any] = []

    def connect() -> None:
        try:
            outcome.append(conn.connect())
        except Exception as exc:
            outcome.append(exc)

    connector = threading.Thread(target=connect, name="test-connect")
    connector.start()
    assert connecting.wait(WAIT)
    closer = threading.Thread(target=conn.close, args=(WAIT,), name="test-close")
    closer.start()
    server.wait_until(lambda: conn._closing, what="close() called")
    release.set()
    connector.join(WAIT)
    closer.join(WAIT)
    assert not closer.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosedError), outcome
    assert "closed while connect() ran" in str(outcome[0])
    assert events.names() == ["close"]  # no connect (nothing was sent), no error: our own close
    assert conn.closed() and conn.wait_closed(0) and conn.error is None
    assert server.received == []
    assert_no_leak(backend, tasks_before)


def test_close_from_a_handshake_listener_is_not_an_error(server: FakeNsqd, make_conn, backend, tasks_before) -> None:
    conn = make_conn()
    events = Recorder(conn)
    conn.on("identify", lambda conn, data: conn.close())
    with pytest.raises(ConnectionClosedError, match="closed while connect"):
        conn.connect()
    assert events.names(HANDSHAKE) == ["connect", "identify", "close"]
    assert conn.error is None and conn.closed()
    assert_no_leak(backend, tasks_before)


def test_close_listeners_run_when_the_shared_pool_closed_first(server: FakeNsqd, make_conn, backend) -> None:
    pool = WorkerPool(2, backend=backend)
    conn, events = ready_conn(make_conn, server, worker_pool=pool)
    events.wait("ready")
    pool.close(wait=True, timeout=WAIT)
    conn.close(WAIT)
    assert conn.wait_closed(WAIT)
    assert events.names()[-1:] == ["close"]  # ("close" fires exactly once, pool or no pool)


def test_wait_closed_from_a_close_listener_run_outside_the_pool_raises(server: FakeNsqd, make_conn, backend) -> None:
    # With the shared pool closed first, close listeners run in the closing task: a
    # wait_closed() there would wait for itself (it blocked close() for its whole timeout).
    pool = WorkerPool(2, backend=backend)
    conn, events = ready_conn(make_conn, server, worker_pool=pool)
    seen: List[Any] = []

    def on_close(conn: AsyncConn) -> None:
        try:
            seen.append(conn.wait_closed(WAIT))
        except RuntimeError as exc:
            seen.append(exc)

    conn.on("close", on_close)
    pool.close(wait=True, timeout=WAIT)
    conn.close(WAIT)
    assert conn.wait_closed(WAIT)
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError), seen


def test_wait_closed_from_an_event_listener_raises_instead_of_waiting_for_itself(server: FakeNsqd, make_conn) -> None:
    conn, events = ready_conn(make_conn, server)
    seen: List[Any] = []

    def on_error(conn: AsyncConn, error: Exception) -> None:
        try:
            seen.append(conn.wait_closed(WAIT))
        except RuntimeError as exc:
            seen.append(exc)

    conn.on("error", on_error)
    server.send_error("E_INVALID cannot FIN in current state")  # fatal: error, then close
    events.wait("close")
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError), seen
    assert "listen to 'close'" in str(seen[0])
    assert conn.wait_closed(WAIT)


def test_close_times_out_with_message_in_flight(server: FakeNsqd, sub_conn, backend, tasks_before) -> None:
    conn, events = sub_conn()
    sent = server.send_message(b"never finished")
    events.wait("message")
    started = time.monotonic()
    conn.close(timeout=0.5)
    assert time.monotonic() - started < 3
    assert conn.closed()
    events.wait("close")
    server.wait_disconnected()
    assert server.commands[-1] == b"CLS"
    assert sent.id in server.session.in_flight  # nsqd would redeliver it
    assert_no_leak(backend, tasks_before)


# ---------------------------------------------------------------- writes
def test_queued_large_publishes_are_not_joined_into_one_send(server: FakeNsqd, make_conn) -> None:
    # Joining every queued command into one send copied the whole backlog at once: 300
    # pub_async of 1 MB took the peak RSS from 312 to 520-555 MB. Sends join at most
    # JOIN_MAX_BYTES (a bigger command goes alone), in order.
    from nsq_sync import conn as conn_module

    conn, events = ready_conn(make_conn, server)
    sizes: List[int] = []
    send = conn._send_some

    def recording(data: Any) -> int:
        sizes.append(len(data))
        return send(data)

    bodies = [bytes([65 + i]) * (conn_module.JOIN_MAX_BYTES // 3) for i in range(7)] + [b"big" * conn_module.JOIN_MAX_BYTES, b"small"]
    with conn._write_lock:  # (queued while a write is under way, as under load)
        conn._send_some = recording
        futures = [conn.request(commands.pub("t", body)) for body in bodies]
        assert sizes == []
    conn._flush()
    assert [wait_future(f) for f in futures] == [b"OK"] * len(bodies)
    server.wait_for_command("PUB t", count=len(bodies))  # (the fake records a command after answering it)
    assert [body for _, body, _ in server.published] == bodies  # whole and in order
    assert max(sizes) == len(commands.pub("t", bodies[7]))  # the big one alone
    assert all(size <= conn_module.JOIN_MAX_BYTES for size in sizes if size != max(sizes))
    assert sum(sizes) == sum(len(commands.pub("t", body)) for body in bodies)


def test_write_coalescing_keeps_order_across_threads(server: FakeNsqd, sub_conn) -> None:
    conn, events = sub_conn(rdy=1000)
    total, n_threads = 1000, 8
    sent = [server.send_message(b"m%d" % i) for i in range(total)]
    events.wait("message", count=total, timeout=10)
    msgs = [kw["message"] for kw in events.of("message")]
    assert [m.id for m in msgs] == [s.id for s in sent]
    assert conn.in_flight == total

    slices = [msgs[i::n_threads] for i in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    failures: List[BaseException] = []

    def finisher(batch: List[Message]) -> None:
        try:
            barrier.wait(WAIT)
            for m in batch:
                m.finish()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=finisher, args=(s,), name=f"test-fin-{i}") for i, s in enumerate(slices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert failures == []
    server.wait_for_command("FIN", count=total, timeout=10)
    fins = [c for c in server.commands if c.startswith(b"FIN ")]
    assert len(fins) == total
    ids = [c[4:] for c in fins]
    assert sorted(ids) == sorted(s.id for s in sent)
    assert len(set(ids)) == total
    # each thread's FINs arrive in the order that thread wrote them
    position = {message_id: index for index, message_id in enumerate(ids)}
    for batch in slices:
        order = [position[m.id] for m in batch]
        assert order == sorted(order)
    assert conn.in_flight == 0
    assert server.session.in_flight == {}
    assert server.session.errors_sent == []
    assert events.names().count("resume") == total


# ------------------------------------------------------------ the fake itself
def test_fake_sessions_per_connection(server: FakeNsqd, make_conn) -> None:
    first = make_conn()
    first.connect()
    second = make_conn()
    second.connect()
    s1 = server.wait_connected(count=1)
    s2 = server.wait_connected(count=2)
    server.wait_for_command("IDENTIFY", session=s2)
    assert s1 is not s2 and server.session is s2
    second.close(timeout=1)
    server.wait_disconnected(s2)
    assert s1.connected and not s2.connected and s2.client_closed
    s1.send_heartbeat()
    server.wait_for_command("NOP", session=s1)
    assert s1.commands == [b"IDENTIFY", b"NOP"]
    assert s2.commands == [b"IDENTIFY"]
    # a reconnect is a new session
    third = make_conn()
    third.connect()
    assert server.wait_connected(count=3) is server.sessions[2]
    server.wait_for_command("IDENTIFY", count=3)
    assert server.commands.count(b"IDENTIFY") == 3


def test_fake_rejects_bad_magic() -> None:
    import socket

    with FakeNsqd() as server:
        sock = socket.create_connection(server.address, timeout=WAIT)
        try:
            sock.sendall(b"  V1")
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        assert data == frame(1, b"E_BAD_PROTOCOL client sent an invalid magic")
        assert server.session.magic == b"  V1"
        server.wait_disconnected()


# --------------------------------------------------------------------------- bad input: refused before anything is sent


@pytest.mark.parametrize("timeout, error", [("1", TypeError), (True, TypeError), (-1, ConfigError), (float("nan"), ConfigError), (float("inf"), ConfigError), (86401.0, ConfigError)])
def test_bad_request_wait_timeout_sends_nothing_and_keeps_the_connection(server: FakeNsqd, make_conn, timeout, error) -> None:
    conn = make_conn()
    conn.connect()
    assert conn.request_wait(commands.pub("t", b"lead"), 5) == b"OK"  # the caller reads its own answer
    with pytest.raises(error, match="timeout"):
        conn.request_wait(commands.pub("t", b"never"), timeout)
    # Nothing went out, and the read token was not kept: both kinds of request still work.
    assert conn.request_wait(commands.pub("t", b"after"), 5) == b"OK"
    assert conn.request(commands.pub("t", b"future")).result(5) == b"OK"
    server.wait_for_command(b"PUB", count=3)  # (the fake records a command after answering it)
    assert [c.body for c in server.received if c.name == "PUB"] == [b"lead", b"after", b"future"]


def test_empty_command_is_refused_and_later_answers_stay_matched(server: FakeNsqd, make_conn) -> None:
    conn = make_conn()
    conn.connect()
    for empty in (b"", bytearray(), memoryview(b"")):
        with pytest.raises(ConfigError, match="empty command"):
            conn.request(empty)
        with pytest.raises(ConfigError, match="empty command"):
            conn.request_wait(empty, 5)
    assert conn.pending_requests == 0
    assert conn.request(commands.pub("t", b"x")).result(5) == b"OK"


def test_request_with_something_else_than_a_future(server: FakeNsqd, make_conn) -> None:
    conn = make_conn()
    conn.connect()
    with pytest.raises(TypeError, match="future must be"):
        conn.request(commands.pub("t", b"never"), future="x")  # type: ignore[arg-type]
    assert conn.pending_requests == 0
    assert conn.request(commands.pub("t", b"x")).result(5) == b"OK"
    server.wait_for_command(b"PUB")  # (the fake records a command after answering it)
    assert [c.body for c in server.received if c.name == "PUB"] == [b"x"]


@pytest.mark.parametrize("timeout, error", [("5", TypeError), (-1, ConfigError), (float("nan"), ConfigError)])
def test_bad_subscribe_timeout_sends_no_sub(server: FakeNsqd, make_conn, timeout, error) -> None:
    conn = make_conn()
    conn.connect()
    with pytest.raises(error, match="timeout"):
        conn.subscribe("t", "c", timeout=timeout)
    assert conn.subscribe("t", "c", timeout=5) == b"OK"  # a second SUB would be fatal: the first never went
    server.wait_for_command(b"SUB")  # (the fake records a command after answering it)
    assert [c.line for c in server.received if c.name == "SUB"] == [b"SUB t c"]

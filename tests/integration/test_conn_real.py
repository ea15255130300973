"""AsyncConn against a real nsqd v1.3.0: handshake, consuming, answering, closing, errors, AUTH.

Every connection is made with ``backend=backend`` so the suite checks both the
thread backend and (with NSQ_SYNC_BACKEND=gevent, in its own monkey-patched
process) the gevent backend. Nothing here is mocked: the assertions are about
what nsqd really sends and what it records in ``/stats``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest

import nsq_sync
from nsq_sync.protocol import commands
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import AuthServer, NsqdProcess, wait_until

from conn_helpers import Events, host_port  # noqa: E402  (tests/support, on sys.path via conftest)

TIMEOUT = 10.0


# --------------------------------------------------------------------------
# helpers


def publish(conn: nsq_sync.AsyncConn, topic: str, body: bytes) -> None:
    assert conn.request(commands.pub(topic, body)).result(5) == b"OK"


def consumer(
    make_conn: Callable[..., nsq_sync.AsyncConn], address: str, topic: str, channel: str, rdy: int = 1, **kwargs: Any
) -> Tuple[nsq_sync.AsyncConn, "queue.Queue[nsq_sync.Message]"]:
    """A subscribed connection whose messages land in a queue (nobody answers them)."""
    conn = make_conn(address, **kwargs)
    inbox: "queue.Queue[nsq_sync.Message]" = queue.Queue()
    conn.on("message", lambda conn, message: inbox.put(message))
    assert conn.subscribe(topic, channel) == b"OK"
    conn.send_rdy(rdy)
    return conn, inbox


def channel_stats(nsqd: NsqdProcess, topic: str, channel: str) -> Dict[str, Any]:
    stats = nsqd.channel_stats(topic, channel)
    assert stats is not None, f"nsqd has no channel {topic}/{channel}"
    return stats


def wait_channel(nsqd: NsqdProcess, topic: str, channel: str, **expected: int) -> Dict[str, Any]:
    """Poll /stats until every given channel counter has the expected value; return the stats."""
    last: Dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = channel_stats(nsqd, topic, channel)
        return all(last.get(key) == value for key, value in expected.items())

    try:
        wait_until(check, timeout=TIMEOUT, message=f"channel {topic}/{channel} to reach {expected}")
    except TimeoutError:
        raise AssertionError(f"channel {topic}/{channel} never reached {expected}; last stats: {last}") from None
    return last


# --------------------------------------------------------------------------
# handshake


def test_identify_response_and_handshake_event_order(nsqd: NsqdProcess, backend: str) -> None:
    host, port = host_port(nsqd.tcp_address)
    conn = nsq_sync.AsyncConn(
        host,
        port,
        backend=backend,
        heartbeat_interval=5,
        msg_timeout=30,
        output_buffer_size=8192,
        output_buffer_timeout=100,
        sample_rate=10,
    )
    events = Events(conn, "connect", "identify", "identify_response", "auth", "ready", "error", "close")
    try:
        assert conn.connect() is conn
        assert conn.connected()
        assert events.names() == ["connect", "identify", "identify_response", "ready"]
        for _name, kwargs in events.log:
            assert kwargs["conn"] is conn
        assert set(events.of("connect")[0]) == {"conn"}
        assert set(events.of("ready")[0]) == {"conn"}

        sent = events.of("identify")[0]["data"]
        assert sent["feature_negotiation"] is True
        assert sent["heartbeat_interval"] == 5000  # seconds at the API, ms on the wire
        assert sent["msg_timeout"] == 30000
        assert sent["output_buffer_size"] == 8192
        assert sent["output_buffer_timeout"] == 100
        assert sent["sample_rate"] == 10
        assert sent["user_agent"] == nsq_sync.conn.DEFAULT_USER_AGENT

        data = events.of("identify_response")[0]["data"]
        assert data is conn.identify_response
        assert data["max_rdy_count"] == 2500
        assert conn.max_rdy_count == 2500
        assert data["version"] == "1.3.0"
        assert data["msg_timeout"] == 30000  # msg_timeout=30 (s) -> 30000 ms, echoed by nsqd
        assert data["max_msg_timeout"] == 900000
        assert data["output_buffer_size"] == 8192
        assert data["output_buffer_timeout"] == 100
        assert data["sample_rate"] == 10
        assert data["tls_v1"] is False and data["snappy"] is False and data["deflate"] is False
        assert data["auth_required"] is False

        # nsqd does not echo heartbeat_interval (see the heartbeat test) and keeps the sample
        # rate and user agent per client: check them in the subscribed client's stats entry.
        conn.subscribe("identify_topic", "ch")
        client = wait_until(lambda: _client_stats(nsqd), message="the client in nsqd's /stats")
        assert client["user_agent"] == nsq_sync.conn.DEFAULT_USER_AGENT
        assert client["sample_rate"] == 10
        assert client["client_id"] == conn.hostname.split(".")[0]
    finally:
        conn.close(timeout=5)
    assert conn.wait_closed(5)
    assert events.count("close") == 1
    assert events.count("error") == 0


def _client_stats(nsqd: NsqdProcess) -> Any:
    for topic in nsqd.stats().get("topics") or []:
        for channel in topic.get("channels") or []:
            for client in channel.get("clients") or []:
                return client
    return None


def test_heartbeats_answered_and_slow_handler_keeps_connection(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    topic, channel = "heartbeat_topic", "ch"
    conn = make_conn(nsqd.tcp_address, heartbeat_interval=1)
    events = Events(conn, "heartbeat", "error", "close")
    finished = threading.Event()
    handler_errors: List[BaseException] = []
    heartbeats_during: List[int] = []

    def slow_handler(conn: nsq_sync.AsyncConn, message: nsq_sync.Message) -> None:
        try:
            before = events.count("heartbeat")
            time.sleep(3.5)  # the behaviour under test: a handler blocking for > 3 heartbeat intervals
            heartbeats_during.append(events.count("heartbeat") - before)
            message.finish()
        except BaseException as exc:  # pragma: no cover - reported below
            handler_errors.append(exc)
        finally:
            finished.set()

    conn.on("message", slow_handler)
    wait_until(lambda: events.count("heartbeat") >= 2, timeout=TIMEOUT, message="two heartbeat events")
    for kwargs in events.of("heartbeat"):
        assert kwargs == {"conn": conn}

    conn.subscribe(topic, channel)
    conn.send_rdy(1)
    publisher = make_conn(nsqd.tcp_address)
    publish(publisher, topic, b"slow")
    assert finished.wait(TIMEOUT)
    assert handler_errors == []
    assert heartbeats_during and heartbeats_during[0] >= 2, "the reader must keep answering heartbeats"
    assert conn.connected()
    stats = wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0)
    assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0
    assert events.count("error") == 0
    assert events.count("close") == 0


def test_raised_nsqd_limits_are_usable_once_set(backend: str) -> None:
    """An nsqd started with raised --max-* flags takes what nsqd's defaults refuse, once
    nsq_sync.set_nsqd_limits says so."""
    proc = NsqdProcess(extra_args=["--max-msg-timeout=1h", "--max-req-timeout=3h", "--max-heartbeat-interval=2m"])
    previous = nsq_sync.set_nsqd_limits(max_msg_timeout=3600, max_req_timeout=3 * 3600, max_heartbeat_interval=120)
    try:
        with started(proc):
            conn = nsq_sync.AsyncConn(*host_port(proc.tcp_address), backend=backend, msg_timeout=1800, heartbeat_interval=90)
            try:
                conn.connect()
                assert conn.identify_response["msg_timeout"] == 1_800_000  # nsqd took it
                assert conn.request_wait(commands.dpub("limits", 2 * 3600 * 1000, b"in two hours"), TIMEOUT) == b"OK"
                assert proc.topic_stats("limits")["message_count"] == 1
            finally:
                conn.close(2)
    finally:
        nsq_sync.set_nsqd_limits(**previous)


def test_deflate_messages_expanding_past_one_reads_limit_arrive_whole(make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    """Two 10 MiB bodies of zeros: a few KiB of deflate stream each, so one read expands past
    the per-read limit (DEFLATE_READ_LIMIT) and the rest waits in the layer. The reader task
    must take it from there, not wait on the socket for bytes that never come."""
    proc = NsqdProcess(extra_args=["--max-msg-size=33554432"])
    with started(proc):
        topic, channel = "deflate_big", "ch"
        bodies = [b"\0" * (10 * 1024 * 1024) + b"one", b"\0" * (10 * 1024 * 1024) + b"two"]
        publisher = make_conn(proc.tcp_address)
        for body in bodies:
            publish(publisher, topic, body)
        conn, inbox = consumer(make_conn, proc.tcp_address, topic, channel, rdy=2, deflate=True, max_frame_size=32 * 1024 * 1024)
        assert conn.identify_response["deflate"] is True
        got = [inbox.get(timeout=TIMEOUT), inbox.get(timeout=TIMEOUT)]
        assert sorted(m.body for m in got) == sorted(bodies)
        for message in got:
            message.finish()


def test_no_heartbeats_means_no_sub_and_we_refuse_it_first(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(nsqd.tcp_address, heartbeat_interval=-1)
    with pytest.raises(nsq_sync.ConfigError, match="heartbeat_interval=-1"):
        conn.subscribe("noheartbeat", "ch")
    publish(conn, "noheartbeat", b"still open")  # nothing was sent; the connection works
    with pytest.raises(nsq_sync.ConfigError, match="heartbeat_interval=-1"):
        nsq_sync.Reader("noheartbeat", "ch", lambda m: None, nsqd_tcp_addresses=nsqd.tcp_address, heartbeat_interval=-1)
    # Why: nsqd itself refuses the SUB, fatally (sent here by hand, past the check).
    with pytest.raises(nsq_sync.InvalidError, match="heartbeats disabled"):
        conn.request(commands.sub("noheartbeat", "ch")).result(TIMEOUT)
    assert conn.wait_closed(TIMEOUT)


# --------------------------------------------------------------------------
# consuming


def test_sub_rdy_receive_finish(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    topic, channel = "fin_topic", "ch"
    conn, inbox = consumer(make_conn, nsqd.tcp_address, topic, channel, rdy=1)
    assert conn.rdy == 1 and conn.last_rdy == 1
    publisher = make_conn(nsqd.tcp_address)
    sent_at = time.time_ns()
    publish(publisher, topic, b"hello \x00\xff world")

    message = inbox.get(timeout=TIMEOUT)
    assert isinstance(message, nsq_sync.Message)
    assert isinstance(message.id, bytes) and len(message.id) == 16
    assert message.attempts == 1
    assert message.body == b"hello \x00\xff world"
    assert abs(message.timestamp - sent_at) < 5 * 10**9, "timestamp is nanoseconds since the epoch"
    assert conn.in_flight == 1
    assert channel_stats(nsqd, topic, channel)["in_flight_count"] == 1

    message.finish()
    assert message.has_responded()
    assert conn.in_flight == 0
    stats = wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0)
    assert stats["message_count"] == 1
    assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0
    with pytest.raises(nsq_sync.AlreadyRespondedError):
        message.finish()
    assert inbox.empty()


def test_requeue_redelivers_same_id_with_attempts_2(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    topic, channel = "req_topic", "ch"
    conn, inbox = consumer(make_conn, nsqd.tcp_address, topic, channel, rdy=1)
    events = Events(conn, "backoff", "continue", "resume")
    publish(make_conn(nsqd.tcp_address), topic, b"again")

    first = inbox.get(timeout=TIMEOUT)
    assert first.attempts == 1
    first.requeue(delay=0)
    assert events.names() == ["backoff"]
    second = inbox.get(timeout=TIMEOUT)
    assert second.id == first.id
    assert second.attempts == 2
    assert second.body == b"again"
    second.finish()
    assert events.names() == ["backoff", "resume"]
    stats = wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0)
    assert stats["requeue_count"] == 1
    assert stats["message_count"] == 1


def test_touch_keeps_message_and_untouched_one_is_redelivered(
    nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]
) -> None:
    topic, channel = "touch_topic", "ch"
    conn, inbox = consumer(make_conn, nsqd.tcp_address, topic, channel, rdy=2, msg_timeout=1)
    assert conn.identify_response is not None and conn.identify_response["msg_timeout"] == 1000
    publisher = make_conn(nsqd.tcp_address)
    publish(publisher, topic, b"touched")
    publish(publisher, topic, b"control")

    deliveries: List[nsq_sync.Message] = [inbox.get(timeout=TIMEOUT), inbox.get(timeout=TIMEOUT)]
    received_at = time.monotonic()
    touched = next(m for m in deliveries if m.body == b"touched")
    control = next(m for m in deliveries if m.body == b"control")
    control_left = control.time_left()
    assert control_left is not None and 0.5 < control_left <= 1.0

    # nsqd v1.3.0 scans in-flight timeouts only on channels its queueScanLoop knows, and it
    # refreshes that list every 5 s (QueueScanRefreshInterval, not a flag): on a fresh channel
    # the first timeout can take up to ~6 s. Keep touching until the control message timed out
    # and then for 1.5 s more (> msg_timeout) so the scanner had its chance at the touched one.
    redelivered_at = None
    while True:
        time.sleep(0.5)  # the behaviour under test: touching every half msg_timeout
        touched.touch()
        while True:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            deliveries.append(message)
            if message.id == control.id and redelivered_at is None:
                redelivered_at = time.monotonic()
                message.finish()
        now = time.monotonic()
        if redelivered_at is not None and now - received_at >= 2.5 and now - redelivered_at >= 1.5:
            break
        if now - received_at > 15:
            break
    touched.finish()
    assert redelivered_at is not None, f"the untouched message was not redelivered: {deliveries}"
    assert 0.9 <= redelivered_at - received_at <= 7.5
    assert redelivered_at - received_at >= control_left - 0.05  # time_left() was no promise nsqd broke
    assert touched.time_left() > 0  # touched every half second
    assert [m.attempts for m in deliveries if m.id == control.id] == [1, 2]
    # Give a redelivery of the touched message a chance to show up: it must not.
    with pytest.raises(queue.Empty):
        while True:
            message = inbox.get(timeout=0.3)
            deliveries.append(message)
            if message.id == touched.id:
                break
    assert [m.id for m in deliveries].count(touched.id) == 1, "a touched message must not be redelivered"
    stats = wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0)
    assert stats["timeout_count"] == 1
    assert stats["requeue_count"] == 0


# --------------------------------------------------------------------------
# closing


def test_graceful_close_with_message_in_flight(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    topic, channel = "close_topic", "ch"
    conn = make_conn(nsqd.tcp_address)
    events = Events(conn, "close", "error")
    close_wait = threading.Event()
    started = threading.Event()
    handled = threading.Event()
    handler_errors: List[BaseException] = []

    def on_response(conn: nsq_sync.AsyncConn, data: bytes) -> None:
        if data == b"CLOSE_WAIT":
            close_wait.set()

    def handler(conn: nsq_sync.AsyncConn, message: nsq_sync.Message) -> None:
        started.set()
        try:
            # Still working on it when close() sends CLS; answer only after nsqd's CLOSE_WAIT.
            assert close_wait.wait(TIMEOUT), "no CLOSE_WAIT while the message was in flight"
            message.finish()
        except BaseException as exc:
            handler_errors.append(exc)
        finally:
            handled.set()

    conn.on("response", on_response)
    conn.on("message", handler)
    conn.subscribe(topic, channel)
    conn.send_rdy(1)
    publish(make_conn(nsqd.tcp_address), topic, b"in flight at close")
    assert started.wait(TIMEOUT)
    assert conn.in_flight == 1

    began = time.monotonic()
    conn.close(timeout=TIMEOUT)
    assert time.monotonic() - began < TIMEOUT - 1, "close() must return once the message is answered"
    assert handled.is_set() and close_wait.is_set()
    assert handler_errors == []
    assert conn.wait_closed(5)
    assert conn.closed()
    assert events.count("close") == 1
    assert events.count("error") == 0
    conn.close(timeout=1)  # again: a no-op, no second close event
    assert events.count("close") == 1
    stats = wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0)
    assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0, "the message was FINed, not requeued"
    wait_until(lambda: not channel_stats(nsqd, topic, channel)["clients"], timeout=TIMEOUT, message="the client to leave")


# --------------------------------------------------------------------------
# errors


def test_bad_input_is_caught_before_sending(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(nsqd.tcp_address)
    events = Events(conn, "error", "close")
    with pytest.raises(nsq_sync.ConfigError) as info:
        conn.subscribe("bad topic!", "ch")
    assert info.value.param == "topic"
    with pytest.raises(nsq_sync.ConfigError):
        conn.subscribe("good", "bad channel!")
    assert conn.pending_requests == 0
    assert conn.connected()

    conn.subscribe("good_topic", "ch")
    with pytest.raises(nsq_sync.ConfigError) as info:
        conn.send_rdy(3000)
    assert "2500" in str(info.value)
    assert conn.rdy == 0
    conn.send_rdy(1)
    # The connection is still healthy: a message arrives and can be finished.
    inbox: "queue.Queue[nsq_sync.Message]" = queue.Queue()
    conn.on("message", lambda conn, message: inbox.put(message))
    publish(make_conn(nsqd.tcp_address), "good_topic", b"x")
    inbox.get(timeout=TIMEOUT).finish()
    wait_channel(nsqd, "good_topic", "ch", in_flight_count=0, depth=0)
    assert events.count("error") == 0 and events.count("close") == 0


def test_close_after_rejected_subscribe_is_clean(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(nsqd.tcp_address)
    events = Events(conn, "error", "close")
    with pytest.raises(nsq_sync.ConfigError):
        conn.subscribe("bad topic!", "ch")
    conn.close(timeout=5)
    assert conn.wait_closed(5)
    assert [kwargs["error"] for kwargs in events.of("error")] == []
    assert events.count("close") == 1


def test_second_sub_is_fatal_invalid(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(nsqd.tcp_address)
    events = Events(conn, "error", "close")
    assert conn.subscribe("twice", "ch") == b"OK"
    with pytest.raises(nsq_sync.ConfigError, match="already subscribed"):
        conn.subscribe("twice", "ch2")  # refused here, nothing sent: the reason follows
    assert conn.connected()
    with pytest.raises(nsq_sync.InvalidError) as info:
        conn.request(commands.sub("twice", "ch2")).result(TIMEOUT)  # past the check, by hand
    error = info.value
    assert isinstance(error, nsq_sync.ServerError)
    assert error.code == "E_INVALID" and error.fatal
    assert "SUB" in error.text
    assert conn.wait_closed(TIMEOUT)
    assert conn.closed()
    errors = [kwargs["error"] for kwargs in events.of("error")]
    assert errors and errors[0] is error
    assert all(kwargs["conn"] is conn for kwargs in events.of("error"))
    assert events.count("close") == 1
    with pytest.raises(nsq_sync.ConnectionClosedError):
        conn.send_rdy(1)


def test_http_port_is_detected(nsqd: NsqdProcess, backend: str) -> None:
    host, port = host_port(nsqd.http_address)
    conn = nsq_sync.AsyncConn(host, port, backend=backend, timeout=5.0)
    events = Events(conn, "error", "close")
    began = time.monotonic()
    with pytest.raises(nsq_sync.ProtocolError) as info:
        conn.connect()
    assert time.monotonic() - began < 4.0, "must not wait for a timeout"
    assert "HTTP port" in str(info.value)
    assert conn.closed()
    assert events.count("close") == 1
    assert isinstance(events.of("error")[0]["error"], nsq_sync.ProtocolError)


# --------------------------------------------------------------------------
# AUTH


def test_auth_allowed_secret(auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    secret = "s3cret-allowed-7f1c"
    auth_server.set_secret(secret, identity="alice", identity_url="https://example.invalid/alice")
    conn = make_conn(auth_nsqd.tcp_address, connect=False, auth_secret=secret)
    events = Events(conn, "identify_response", "auth", "auth_response", "ready", "error")
    conn.connect()
    assert events.names() == ["identify_response", "auth", "auth_response", "ready"]
    assert events.of("identify_response")[0]["data"]["auth_required"] is True
    assert events.of("auth")[0]["data"] == secret.encode()
    response = events.of("auth_response")[0]["data"]
    assert response["identity"] == "alice"
    assert response["identity_url"] == "https://example.invalid/alice"
    assert response["permission_count"] == 1
    assert conn.auth_response == response
    assert auth_server.requests == [secret]

    inbox: "queue.Queue[nsq_sync.Message]" = queue.Queue()
    conn.on("message", lambda conn, message: inbox.put(message))
    conn.subscribe("auth_topic", "ch")
    conn.send_rdy(1)
    publish(conn, "auth_topic", b"authorized")
    message = inbox.get(timeout=TIMEOUT)
    assert message.body == b"authorized"
    message.finish()
    wait_channel(auth_nsqd, "auth_topic", "ch", in_flight_count=0, depth=0)
    assert events.count("error") == 0


def test_auth_response_is_what_nsqd_sent(auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    auth_server.set_secret("exact-keys")
    conn = make_conn(auth_nsqd.tcp_address, auth_secret="exact-keys")
    assert conn.auth_response is not None
    assert set(conn.auth_response) == {"identity", "identity_url", "permission_count"}


def test_auth_denied_secret(auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(auth_nsqd.tcp_address, connect=False, auth_secret="not-known-to-the-auth-server")
    events = Events(conn, "auth", "auth_response", "ready", "error", "close")
    with pytest.raises(nsq_sync.ServerError) as info:
        conn.connect()
    # nsqd v1.3.0 turns the auth server's 403 into E_AUTH_FAILED (not E_UNAUTHORIZED).
    assert type(info.value) is nsq_sync.AuthFailedError
    assert info.value.code == "E_AUTH_FAILED" and info.value.fatal
    assert events.names() == ["auth", "error", "close"]
    assert events.of("error")[0]["error"] is info.value
    assert conn.closed()
    assert auth_server.requests == ["not-known-to-the-auth-server"]


def test_auth_required_but_no_secret(auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(auth_nsqd.tcp_address, connect=False)
    events = Events(conn, "auth", "ready", "error", "close")
    with pytest.raises(nsq_sync.AuthRequiredError) as info:
        conn.connect()
    assert "auth_secret" in str(info.value)
    assert events.names() == ["error", "close"]
    assert conn.closed()
    assert auth_server.requests == []


def test_auth_permission_limited_to_topic(auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    auth_server.set_secret("limited", topic="allowed.*", permissions=("publish",))
    conn = make_conn(auth_nsqd.tcp_address, auth_secret="limited")
    events = Events(conn, "error", "close")
    publish(conn, "allowed.topic", b"fine")
    future = conn.request(commands.pub("other", b"refused"))
    with pytest.raises(nsq_sync.UnauthorizedError) as info:
        future.result(5)
    assert info.value.code == "E_UNAUTHORIZED" and info.value.fatal
    assert "other" in info.value.text
    assert conn.wait_closed(TIMEOUT)
    assert events.of("error")[0]["error"] is info.value
    assert events.count("close") == 1
    assert auth_nsqd.topic_depth("allowed.topic") == 1
    assert auth_nsqd.topic_stats("other") is None


def test_auth_secret_never_shown(
    auth_server: AuthServer, auth_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good, bad = "GoodSecretValue-91ab", "BadSecretValue-77cd"
    auth_server.set_secret(good, topic="allowed.*", permissions=("publish",))
    conn = make_conn(auth_nsqd.tcp_address, auth_secret=good)
    shown = [repr(conn), str(conn)]
    publish(conn, "allowed.x", b"x")
    with pytest.raises(nsq_sync.UnauthorizedError) as unauthorized:
        conn.request(commands.pub("other", b"x")).result(5)
    shown.append(str(unauthorized.value))
    conn.wait_closed(TIMEOUT)
    shown.append(repr(conn))

    denied = make_conn(auth_nsqd.tcp_address, connect=False, auth_secret=bad)
    with pytest.raises(nsq_sync.AuthFailedError) as failed:
        denied.connect()
    shown += [repr(denied), str(failed.value), repr(failed.value)]
    with pytest.raises(nsq_sync.ConfigError) as config:
        nsq_sync.AsyncConn("127.0.0.1", 4150, auth_secret=12345)  # type: ignore[arg-type]
    shown.append(str(config.value))

    # The test's stand-in auth server (nsq_sync.testing) logs its request line; that is the
    # remote service, not the client library, so only the library's records are checked.
    records = [r for r in caplog.records if not r.name.startswith("nsq_sync.testing")]
    assert any(r.name.startswith("nsq_sync") for r in records), "expected some library log records"
    for text in shown + [r.getMessage() for r in records] + [str(r.exc_info) for r in records if r.exc_info]:
        assert good not in text and bad not in text, text


def test_in_flight_after_server_side_timeout(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    topic, channel = "timeout_topic", "ch"
    conn, inbox = consumer(make_conn, nsqd.tcp_address, topic, channel, rdy=1, msg_timeout=1)
    publish(make_conn(nsqd.tcp_address), topic, b"left alone")
    first = inbox.get(timeout=TIMEOUT)
    # Not answered: nsqd times it out after 1 s (up to ~6 s on a fresh channel, see the TOUCH test).
    again = inbox.get(timeout=TIMEOUT)
    assert again.id == first.id and again.attempts == 2
    again.finish()
    wait_channel(nsqd, topic, channel, in_flight_count=0, depth=0, timeout_count=1)
    assert conn.in_flight == 0
    began = time.monotonic()
    conn.close(timeout=5)
    assert time.monotonic() - began < 2

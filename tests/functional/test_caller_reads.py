"""AsyncConn.request_wait: the calling thread reads its own answer (the read token).

A blocking request on an unsubscribed connection takes the read token when it is
free, sends and reads its answer itself; when the reader task holds the token the
request falls back to a Future and the reader task parks once nothing is pending,
so the next caller leads. These tests check who reads, that a parked reader still
wakes for what nobody else reads (Futures, heartbeats, a close by nsqd), FIFO
matching across a timeout, failures while a caller leads, and nsqd's deflate flush
marker arriving on its own (the pre-send check must not block on it).

Runs on the backend named by NSQ_SYNC_BACKEND (tests/conftest.py monkey-patches
the process for gevent). No sleeps for synchronization: waits are on events,
Futures, the fake's records, or ``wait_until`` polling an internal flag.
"""

from __future__ import annotations

import builtins
import collections
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

import nsq_sync.conn
from nsq_sync import AsyncConn
from nsq_sync.errors import BadTopicError, ConnectionClosedError, SendError, TimeoutError
from nsq_sync.protocol import commands
from nsq_sync.testing import wait_until
from nsq_sync.transport.compression import DeflateStream

from conn_helpers import Events  # noqa: E402  (tests/support, on sys.path via tests/conftest.py)

try:  # tests/functional as a package, or (the default rootdir layout) on sys.path
    from .fake_nsqd import DEFAULT_IDENTIFY_RESPONSE, NOTHING, FakeNsqd, close, error, fake_nsqd, ok, raw, response, response_frame  # noqa: F401
except ImportError:
    from fake_nsqd import DEFAULT_IDENTIFY_RESPONSE, NOTHING, FakeNsqd, close, error, fake_nsqd, ok, raw, response, response_frame  # type: ignore[no-redef]  # noqa: F401

WAIT = 5.0
#: a PARK_SECONDS no test reaches: a parked reader task then only wakes when woken
LONG_PARK = 30.0
HEARTBEAT = b"_heartbeat_"
SYNC_MARKER = b"\x00\x00\xff\xff"


# ------------------------------------------------------------------ helpers
@pytest.fixture
def server(fake_nsqd: FakeNsqd) -> FakeNsqd:  # noqa: F811 - fixture imported above
    return fake_nsqd


@pytest.fixture
def make_conn(backend: str) -> Iterator[Callable[..., AsyncConn]]:
    conns: List[AsyncConn] = []

    def make(host: str, port: int, **kwargs: Any) -> AsyncConn:
        kwargs.setdefault("backend", backend)
        conn = AsyncConn(host, port, **kwargs)
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close(timeout=2)


@pytest.fixture(params=["request_wait", "quick_request"])
def ask(request: Any) -> Callable[..., bytes]:
    """A caller's blocking request: AsyncConn.request_wait, or _quick_request (a Writer's
    publish: request_wait's fast path written out, with the same answers and errors)."""
    if request.param == "request_wait":
        return lambda conn, data, timeout, strict=True: conn.request_wait(data, timeout=timeout)

    def quick(conn: AsyncConn, data: bytes, timeout: float, strict: bool = True) -> bytes:
        """Busy (read just now), so the fast path applies where it can (the thread backend);
        there, with the read token free, it must not fall back to request_wait (the hand-off
        to a reader task that reads), whatever the outcome."""
        fell_back: List[bytes] = []
        token_free = not conn._read_token.locked()
        request_wait = conn.request_wait
        conn.request_wait = lambda data, timeout=None: fell_back.append(data) or request_wait(data, timeout)  # type: ignore[method-assign]
        conn.last_recv_timestamp = time.time()
        try:
            return conn._quick_request(data, float(timeout))
        finally:
            del conn.request_wait
            if strict and conn._recv_slice is not None and token_free:
                assert fell_back == [], "the quick request went request_wait's way"

    return quick


class FrameLog:
    """Wraps ``conn._handle_frames``: who handled which frames (the reader task or the test's thread)."""

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn
        self.records: List[Tuple[bool, object, List[Tuple[int, bytes]]]] = []
        self._lock = threading.Lock()
        original = conn._handle_frames

        def handle_frames(frames: List[Any]) -> None:
            frames = list(frames)
            with self._lock:
                self.records.append((conn._is_reader_task(), conn.backend.current(), [(t, bytes(p)) for t, p in frames]))
            return original(frames)

        conn._handle_frames = handle_frames  # type: ignore[method-assign]

    def readers_of(self, payload: bytes) -> List[Tuple[bool, object]]:
        """(by the reader task?, current task) for each frame with this payload, in order."""
        with self._lock:
            return [(by_reader, who) for by_reader, who, frames in self.records for _, p in frames if p == payload]

    def clear(self) -> None:
        with self._lock:
            self.records.clear()


def connect(make_conn: Callable[..., AsyncConn], server: FakeNsqd, **kwargs: Any) -> AsyncConn:
    conn = make_conn(server.host, server.port, **kwargs)
    conn.connect()
    server.wait_for_command("IDENTIFY")
    return conn


def park_reader(conn: AsyncConn, server: FakeNsqd) -> int:
    """Publish until the reader task parks: a request_wait that finds the reader task
    reading falls back to a Future, and the reader task then parks. Returns the number
    of PUBs it took (normally 1; the reader task can read the answer before the caller
    asked to lead, then one more round is needed)."""
    wait_until(conn._read_token.locked, WAIT, message="the reader task to hold the read token")
    for attempt in range(1, 4):
        assert conn.request_wait(commands.pub("t", b"park-%d" % attempt), timeout=WAIT) == b"OK"
        try:
            # _parked is set before the reader task lets go of the token: wait for both
            wait_until(lambda: conn._parked and not conn._read_token.locked(), 1.0, message="the reader task to park")
        except builtins.TimeoutError:
            continue
        server.wait_for_command("PUB", count=attempt)
        return attempt
    raise AssertionError("the reader task never parked")


def published(server: FakeNsqd) -> List[bytes]:
    with server.lock:
        return [body for _, body, _ in server.published]


# ------------------------------------------- 1. callers read their answers
def test_serial_request_wait_read_by_the_caller(server: FakeNsqd, make_conn, monkeypatch) -> None:
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    log = FrameLog(conn)
    parks = park_reader(conn, server)
    # the first answer (the request found the reader task reading) was read by the reader task
    assert log.readers_of(b"OK")[0][0] is True
    log.clear()

    me = conn.backend.current()
    fast: List[object] = []  # what each fast-path exchange returned (b"OK": the whole publish)
    exchange = conn._exchange

    def counted(data: bytes, budget: object, deadline: object) -> object:
        fast.append(exchange(data, budget, deadline))
        return fast[-1]

    conn._exchange = counted  # type: ignore[method-assign]
    count = 30
    for i in range(count):
        assert conn.request_wait(commands.pub("t", b"m%d" % i), timeout=5) == b"OK"
        assert conn._parked, f"the reader task left its park at request {i}"
    server.wait_for_command("PUB", count=parks + count)
    assert published(server) == [b"park-%d" % n for n in range(1, parks + 1)] + [b"m%d" % i for i in range(count)]
    readers = log.readers_of(b"OK")
    # Each answer was read by this thread: whole in the fast path (no frame handling; the
    # thread backend's, for a connection read within the last few ms), or as a frame.
    assert len(readers) + fast.count(b"OK") == count, (readers, fast)
    assert all(not by_reader and who is me for by_reader, who in readers), readers
    if conn._recv_slice is not None:
        assert fast.count(b"OK") >= count - 1, fast  # (the first follows the park: idle for a moment)
    assert conn.pending_requests == 0
    assert conn.connected()



# ------------------------------------------ 1b. a Writer's lane (no reader task)
def connect_lane(make_conn: Callable[..., AsyncConn], server: FakeNsqd) -> AsyncConn:
    conn = make_conn(server.host, server.port)
    conn._lane = True  # as Writer._lane_loop makes them
    conn.connect()
    server.wait_for_command("IDENTIFY")
    assert conn._reader is None  # nobody reads but the publish holding the lane
    return conn


def pub_commands(server: FakeNsqd) -> List[bytes]:
    return [c for c in server.commands if c.startswith((b"PUB", b"NOP"))]


def test_lane_publishes_read_their_own_answers(server: FakeNsqd, make_conn) -> None:
    server.set_answer("PUB", lambda session, command: response(b"ack:" + command.body))
    conn = connect_lane(make_conn, server)
    for i in range(20):
        assert conn._lane_request(commands.pub("t", b"m%d" % i), 5.0) == b"ack:m%d" % i
    server.reset_answers()
    for i in range(20):  # plain OKs: the fast path where it applies; the same answers either way
        assert conn._lane_request(commands.pub("t", b"o%d" % i), 5.0) == b"OK"
    server.wait_for_command("PUB", count=40)
    assert published(server) == [b"m%d" % i for i in range(20)] + [b"o%d" % i for i in range(20)]
    assert conn.pending_requests == 0 and conn.connected()


def cut_reads(real: Any, reads: List[str]) -> List[Tuple[str, Callable[[bytearray], int]]]:
    """Stand-ins for a plain connection's one read (``_lane_recv_into``, ``_quick_recv_into``), each noting its name
    in *reads*: "part" reads the OK frame's size only (the rest stays queued in the socket),
    "slice" reads nothing (the kernel's recv slice ended first)."""

    def four_bytes(buffer: bytearray) -> int:
        reads.append("part")
        return real(memoryview(buffer)[:4])

    def slice_ended(buffer: bytearray) -> int:
        reads.append("slice")
        raise BlockingIOError(11, "Resource temporarily unavailable")

    return [("part", four_bytes), ("slice", slice_ended)]


def test_lane_answer_in_pieces_or_after_a_recv_slice_is_still_its_own(server: FakeNsqd, make_conn) -> None:
    """The lane's one read brings part of the OK frame, or nothing (the kernel's recv slice
    ended first): the publish reads on for the rest, and the next one starts clean."""
    conn = connect_lane(make_conn, server)
    assert conn._lane_request(commands.pub("t", b"first"), 5.0) == b"OK"
    # Without a kernel recv slice (gevent) there is no inline read: every publish below goes
    # through request_wait, and must land the same.
    inline = conn._recv_slice is not None
    assert (conn._lane_recv_into is not None) is inline
    real = conn._lane_recv_into
    reads: List[str] = []
    for name, fake in cut_reads(real, reads):
        conn._lane_recv_into = fake if inline else None
        assert conn._lane_request(commands.pub("t", name.encode()), 5.0) == b"OK"
        assert conn._lane_clean is inline and conn.pending_requests == 0
        conn._lane_recv_into = real
        assert conn._lane_request(commands.pub("t", b"after-" + name.encode()), 5.0) == b"OK"
    assert reads == (["part", "slice"] if inline else [])
    server.wait_for_command("PUB", count=5)
    assert published(server) == [b"first", b"part", b"after-part", b"slice", b"after-slice"]
    assert conn.connected()


def test_lane_heartbeat_read_with_an_answer_is_answered(server: FakeNsqd, make_conn) -> None:
    conn = connect_lane(make_conn, server)
    events = Events(conn, "heartbeat", "error")
    assert conn._lane_request(commands.pub("t", b"first"), 5.0) == b"OK"
    # the heartbeat and the answer in one read: not the OK frame alone, so the frames are handled
    server.set_answer("PUB", raw(response_frame(HEARTBEAT) + response_frame(b"OK")), times=1)
    assert conn._lane_request(commands.pub("t", b"second"), 5.0) == b"OK"
    server.wait_for_command("NOP")
    events.wait("heartbeat")
    assert conn._lane_request(commands.pub("t", b"third"), 5.0) == b"OK"
    server.wait_for_command("PUB", count=3)
    assert pub_commands(server) == [b"PUB t", b"PUB t", b"NOP", b"PUB t"]
    assert events.of("error") == [] and conn.connected()


def test_idle_lane_reads_a_waiting_heartbeat_before_publishing(server: FakeNsqd, make_conn) -> None:
    conn = connect_lane(make_conn, server)
    assert conn._lane_request(commands.pub("t", b"first"), 5.0) == b"OK"
    server.session.send_heartbeat()
    wait_until(lambda: conn._data_waiting(0), WAIT, message="the heartbeat to arrive")
    conn.last_recv_timestamp -= 1.0  # idle for a second (without waiting one)
    assert conn._lane_request(commands.pub("t", b"second"), 5.0) == b"OK"
    server.wait_for_command("PUB", count=2)
    assert pub_commands(server) == [b"PUB t", b"NOP", b"PUB t"]  # the heartbeat was answered first


def test_idle_lane_closed_by_nsqd_refuses_the_publish_unsent(server: FakeNsqd, make_conn) -> None:
    conn = connect_lane(make_conn, server)
    assert conn._lane_request(commands.pub("t", b"first"), 5.0) == b"OK"
    server.close_client()
    wait_until(lambda: conn._data_waiting(0), WAIT, message="nsqd's close to arrive")
    conn.last_recv_timestamp -= 1.0
    with pytest.raises(ConnectionClosedError) as info:
        conn._lane_request(commands.pub("t", b"late"), 5.0)
    assert info.value.unprocessed is True  # never sent: the Writer re-sends it elsewhere for free
    assert conn.closed() and conn.wait_closed(WAIT)
    assert published(server) == [b"first"]


def test_lane_publish_gets_the_server_error(server: FakeNsqd, make_conn) -> None:
    conn = connect_lane(make_conn, server)
    assert conn._lane_request(commands.pub("t", b"first"), 5.0) == b"OK"
    server.set_answer("PUB", [error("E_BAD_TOPIC PUB topic name is not valid"), close()], times=1)
    with pytest.raises(BadTopicError):
        conn._lane_request(commands.pub("t", b"refused"), 5.0)
    assert conn.wait_closed(WAIT) and conn.closed()


# ------------------------------- 1c. a Writer's publish on its first connection
def parked(make_conn: Callable[..., AsyncConn], server: FakeNsqd, monkeypatch: Any) -> Tuple[AsyncConn, int]:
    """A connection whose reader task parked (a publishing caller leads), as a serial
    publisher leaves a Writer's first connection; and the PUBs that took."""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)  # (a stalled test machine: still busy)
    conn = connect(make_conn, server)
    return conn, park_reader(conn, server)


def general_calls(conn: AsyncConn) -> List[bytes]:
    """Records each request that _quick_request hands to request_wait (its general path)."""
    calls: List[bytes] = []
    request_wait = conn.request_wait

    def counted(data: bytes, timeout: Optional[float] = None) -> bytes:
        calls.append(bytes(data))
        return request_wait(data, timeout)

    conn.request_wait = counted  # type: ignore[method-assign]
    return calls


def test_quick_requests_read_their_own_answers_on_the_fast_path(server: FakeNsqd, make_conn, monkeypatch) -> None:
    conn, parks = parked(make_conn, server, monkeypatch)
    log = FrameLog(conn)
    general = general_calls(conn)
    count = 30
    for i in range(count):
        assert conn._quick_request(commands.pub("t", b"q%d" % i), 5.0) == b"OK"
        assert conn._parked, f"the reader task left its park at request {i}"
    server.wait_for_command("PUB", count=parks + count)
    assert published(server)[parks:] == [b"q%d" % i for i in range(count)]
    if conn._recv_slice is not None:
        # Thread backend: each OK read whole by this thread, no frame handled, no request_wait
        assert general == [] and log.readers_of(b"OK") == [], (general, log.records)
        assert conn._quick_recv_into is not None
    else:
        assert len(general) == count  # gevent: request_wait, every time
    assert conn.pending_requests == 0 and conn.connected()


def test_quick_request_answers_other_than_ok_go_through_the_reading_loop(server: FakeNsqd, make_conn, monkeypatch) -> None:
    """An answer other than nsqd's OK frame (here an echo of the body), one in pieces, or one
    that comes after a recv slice passed: each caller still gets its own, in order."""
    conn, parks = parked(make_conn, server, monkeypatch)
    server.set_answer("PUB", lambda session, command: response(b"ack:" + command.body))
    for i in range(5):
        assert conn._quick_request(commands.pub("t", b"e%d" % i), 5.0) == b"ack:e%d" % i
    server.reset_answers()
    inline = conn._recv_slice is not None
    assert (conn._quick_recv_into is not None) is inline
    real = conn._quick_recv_into
    reads: List[str] = []
    for name, fake in cut_reads(real, reads):
        conn._quick_recv_into = fake if inline else None
        assert conn._quick_request(commands.pub("t", name.encode()), 5.0) == b"OK"
        assert conn.pending_requests == 0 and conn._decoder.buffered == 0
        conn._quick_recv_into = real
        assert conn._quick_request(commands.pub("t", b"after-" + name.encode()), 5.0) == b"OK"
    assert reads == (["part", "slice"] if inline else [])
    server.wait_for_command("PUB", count=parks + 9)
    assert published(server)[parks:] == [b"e%d" % i for i in range(5)] + [b"part", b"after-part", b"slice", b"after-slice"]
    assert conn.connected()


def test_quick_request_heartbeat_read_with_its_answer_is_answered(server: FakeNsqd, make_conn, monkeypatch) -> None:
    conn, parks = parked(make_conn, server, monkeypatch)
    events = Events(conn, "heartbeat", "error")
    # the heartbeat and the answer in one read: not the OK frame alone, so the frames are handled
    server.set_answer("PUB", raw(response_frame(HEARTBEAT) + response_frame(b"OK")), times=1)
    assert conn._quick_request(commands.pub("t", b"second"), 5.0) == b"OK"
    server.wait_for_command("NOP")
    events.wait("heartbeat")
    assert conn._quick_request(commands.pub("t", b"third"), 5.0) == b"OK"
    server.wait_for_command("PUB", count=parks + 2)
    assert pub_commands(server)[parks:] == [b"PUB t", b"NOP", b"PUB t"]
    assert events.of("error") == [] and conn.connected()


def test_idle_quick_request_reads_a_waiting_heartbeat_before_publishing(server: FakeNsqd, make_conn, monkeypatch) -> None:
    """Idle for longer than IDLE_CHECK_SECONDS: the publish goes request_wait's general way,
    which reads what came meanwhile first (the heartbeat, answered before the PUB goes out)."""
    conn, parks = parked(make_conn, server, monkeypatch)
    general = general_calls(conn)
    server.session.send_heartbeat()
    wait_until(lambda: conn._data_waiting(0), WAIT, message="the heartbeat to arrive")
    conn.last_recv_timestamp -= 100.0  # idle (IDLE_CHECK_SECONDS is 60 here)
    assert conn._quick_request(commands.pub("t", b"second"), 5.0) == b"OK"
    server.wait_for_command("PUB", count=parks + 1)
    assert pub_commands(server)[parks:] == [b"NOP", b"PUB t"]
    # (the general path with the read token held: no hand-off; gevent: request_wait)
    assert general == ([] if conn._recv_slice is not None else [commands.pub("t", b"second")])


def test_quick_request_stands_aside_while_another_thread_writes(server: FakeNsqd, make_conn, monkeypatch) -> None:
    """The write lock taken (a flush task finishing another write): nothing is sent by the
    fast path; request_wait's general path queues the command for the holder of the write
    lock to send."""
    conn, parks = parked(make_conn, server, monkeypatch)
    general = general_calls(conn)
    assert conn._write_lock.acquire(False)
    outcome: List[Any] = []
    caller = threading.Thread(target=lambda: outcome.append(conn._quick_request(commands.pub("t", b"behind"), 5.0)))
    try:
        caller.start()
        wait_until(lambda: conn._writes, WAIT, message="the publish to queue behind the write")
        assert published(server)[parks:] == []  # not sent while another write is under way
    finally:
        conn._write_lock.release()
    conn._flush(1.0)  # what the holder of the write lock does after its own write: drain the queue
    caller.join(WAIT)
    assert outcome == [b"OK"] and len(general) == (0 if conn._recv_slice is not None else 1)
    assert published(server)[parks:] == [b"behind"]


def test_fast_path_failing_to_flush_others_still_reads_its_own_answer(server: FakeNsqd, make_conn, monkeypatch, ask) -> None:
    """A request another thread queued while the fast path wrote is flushed by the fast path
    (the writer drains the queue); when that flush fails, the fast path's own command is
    already out and it must still read its answer, not raise and leave the answer to be
    matched with someone else's request."""
    from nsq_sync.errors import SendError

    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    park_reader(conn, server)
    real_send = conn._send_some

    def send_then_someone_queues(data: bytes) -> int:
        sent = real_send(data)
        conn._writes.append(b"NOP\n")  # as if another thread queued while we held the write lock
        return sent

    def failing_flush(budget: object = None) -> None:
        conn._writes.clear()
        raise SendError("write failed (simulated)")

    monkeypatch.setattr(conn, "_send_some", send_then_someone_queues)
    monkeypatch.setattr(conn, "_flush", failing_flush)
    conn.last_recv_timestamp = time.time()  # busy: the fast path applies (thread backend; gevent takes the general path, which must cope too)
    assert ask(conn, commands.pub("t", b"mine"), 5) == b"OK"
    assert conn.pending_requests == 0

# ------------------------------------------------- 2. a Future wakes it
def test_many_threads_each_get_their_own_answer(server: FakeNsqd, make_conn) -> None:
    """Threads publishing at once mix every path: one reads for itself, the others wait on a
    lock while the reader task (or that thread) reads, and requests queue behind unanswered
    ones. Each must get the answer to its own command: the fake answers with the body."""
    server.set_answer("PUB", lambda session, command: response(b"ack:" + command.body))
    conn = connect(make_conn, server)
    threads_n, per_thread = 8, 40
    results: List[Tuple[bytes, bytes]] = []
    errors: List[BaseException] = []
    lock = threading.Lock()

    def publisher(index: int) -> None:
        try:
            for i in range(per_thread):
                body = b"t%d-m%d" % (index, i)
                answer = conn.request_wait(commands.pub("t", body), timeout=WAIT)
                with lock:
                    results.append((body, answer))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 4)
    assert not errors, errors
    assert len(results) == threads_n * per_thread
    assert all(answer == b"ack:" + body for body, answer in results), [r for r in results if r[1] != b"ack:" + r[0]][:5]
    assert conn.pending_requests == 0


def test_fast_path_among_futures_takes_only_its_own_ok(server: FakeNsqd, make_conn) -> None:
    """Blocking publishes (answered OK, so the fast path applies) race with Futures other
    threads add (answered with their body). An OK read by the fast path must be its own:
    a Future resolved with OK, or a blocking call given someone's body, is a mismatch."""
    server.set_answer("PUB", lambda session, command: response(b"ack:" + command.body) if command.body.startswith(b"a") else ok())
    conn = connect(make_conn, server)
    per_thread = 150
    blocking: List[bytes] = []
    futures_made: List[Tuple[bytes, Any]] = []
    errors: List[BaseException] = []
    lock = threading.Lock()
    fast: List[object] = []
    exchange = conn._exchange

    def counted(data: bytes, budget: object, deadline: object) -> object:
        result = exchange(data, budget, deadline)
        fast.append(result)
        return result

    conn._exchange = counted  # type: ignore[method-assign]

    def blocking_publisher(index: int) -> None:
        try:
            for i in range(per_thread):
                answer = conn.request_wait(commands.pub("t", b"b%d-%d" % (index, i)), timeout=WAIT)
                with lock:
                    blocking.append(answer)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def future_publisher(index: int) -> None:
        try:
            for i in range(per_thread):
                body = b"a%d-%d" % (index, i)
                future = conn.request(commands.pub("t", body))
                with lock:
                    futures_made.append((body, future))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=blocking_publisher, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=future_publisher, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 4)
    assert not errors, errors
    assert blocking == [b"OK"] * (3 * per_thread)
    wrong = [(body, f.result(WAIT)) for body, f in futures_made if f.result(WAIT) != b"ack:" + body]
    assert not wrong and len(futures_made) == 3 * per_thread, wrong[:5]
    assert conn.pending_requests == 0
    if conn._recv_slice is not None:
        assert fast.count(b"OK") > 0, "the fast path never ran: this test checks nothing of it"


def test_parked_reader_wakes_for_a_future(server: FakeNsqd, make_conn, monkeypatch) -> None:
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    parks = park_reader(conn, server)
    log = FrameLog(conn)
    assert conn._parked
    started = time.monotonic()
    future = conn.request(commands.pub("t", b"async"))
    assert future.result(2) == b"OK"  # parked for LONG_PARK: only the wake can explain this
    assert time.monotonic() - started < 2
    assert [by_reader for by_reader, _ in log.readers_of(b"OK")] == [True]
    server.wait_for_command("PUB", count=parks + 1)
    assert published(server)[-1] == b"async"
    # and blocking requests still work afterwards
    assert conn.request_wait(commands.pub("t", b"after"), timeout=5) == b"OK"
    server.wait_for_command("PUB", count=parks + 2)
    assert published(server)[-2:] == [b"async", b"after"]


# -------------------------------------- 3. heartbeats while parked and idle
def test_parked_idle_reader_answers_heartbeat(server: FakeNsqd, make_conn) -> None:
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    parks = park_reader(conn, server)
    log = FrameLog(conn)
    commands_before = server.commands
    server.session.send_heartbeat()
    server.wait_for_command("NOP", timeout=nsq_sync.conn.PARK_SECONDS + 2)
    events.wait("heartbeat")
    assert server.commands == commands_before + [b"NOP"]  # no publish was needed
    assert len([c for c in server.commands if c.startswith(b"PUB")]) == parks
    assert [by_reader for by_reader, _ in log.readers_of(HEARTBEAT)] == [True]
    assert conn.connected()


# ------------------------------------------- 4. nsqd closes a parked, idle connection
def test_parked_idle_reader_sees_close(server: FakeNsqd, make_conn) -> None:
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    parks = park_reader(conn, server)
    server.close_client()
    started = time.monotonic()
    assert conn.wait_closed(nsq_sync.conn.PARK_SECONDS + 2)
    assert time.monotonic() - started < nsq_sync.conn.PARK_SECONDS + 2
    assert len(events.of("close")) == 1
    assert [type(kw["error"]) for kw in events.of("error")] == [ConnectionClosedError]
    assert conn.closed()
    with pytest.raises(ConnectionClosedError) as info:
        conn.request_wait(commands.pub("t", b"late"), timeout=5)
    assert info.value.unprocessed is True
    server.wait_disconnected()
    assert len(events.of("close")) == 1
    assert published(server) == [b"park-%d" % n for n in range(1, parks + 1)]


def test_close_seen_by_the_pre_send_check(server: FakeNsqd, make_conn, monkeypatch) -> None:
    # The parked reader task does not wake (LONG_PARK): the caller's check before sending
    # must read nsqd's close and refuse to send.
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", -1)
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    parks = park_reader(conn, server)
    server.close_client()
    assert conn.backend.wait_readable(conn._raw_sock, WAIT)  # the FIN arrived (nothing read)
    assert conn._parked and conn.connected()
    with pytest.raises(ConnectionClosedError) as info:
        conn.request_wait(commands.pub("t", b"never"), timeout=5)
    assert info.value.unprocessed is True
    assert conn.wait_closed(WAIT)
    assert len(events.of("close")) == 1
    server.wait_disconnected()
    assert published(server) == [b"park-%d" % n for n in range(1, parks + 1)]
    assert b"never" not in bytes(server.session.raw)


def queued_behind_an_unanswered_pub(make_conn: Callable[..., AsyncConn], server: FakeNsqd, count: int) -> Tuple[AsyncConn, Future, List[Future]]:
    """A connection with one PUB sent that nsqd does not answer, and *count* requests queued
    behind it (Nagle's rule): (the connection, the sent one's Future, the queued ones')."""
    conn = connect(make_conn, server)
    server.set_answer("PUB", NOTHING, times=1)
    first = conn.request(commands.pub("t", b"sent"))
    server.wait_for_command("PUB")
    return conn, first, [conn.request(commands.pub("t", b"queued %d" % n)) for n in range(count)]


def test_requests_queued_behind_an_answer_fail_as_unprocessed_when_the_connection_ends(server: FakeNsqd, make_conn) -> None:
    # While one request waits for its answer, later ones are only queued (Nagle's rule, see
    # AsyncConn._request). When the connection ends first, those never left: they fail with
    # unprocessed=True, which the Writer re-sends elsewhere for free. They failed as "may or may
    # not have run" (9 of 10 publishes of a gevent web worker, after its hub was blocked past two
    # heartbeat intervals, in a user review). The one sent may have run.
    conn, first, queued = queued_behind_an_unanswered_pub(make_conn, server, 3)
    server.close_client()
    assert conn.wait_closed(WAIT)
    assert isinstance(first.exception(WAIT), ConnectionClosedError) and first.exception().unprocessed is False
    for future in queued:
        assert isinstance(future.exception(WAIT), ConnectionClosedError) and future.exception().unprocessed is True
    assert b"queued" not in bytes(server.session.raw)


def test_requests_in_a_send_the_socket_refuses_fail_as_unprocessed(server: FakeNsqd, make_conn) -> None:
    # A send that fails (EPIPE, ECONNRESET: nsqd had closed) took no byte: the requests in it,
    # and those queued after it, fail with unprocessed=True.
    conn, first, queued = queued_behind_an_unanswered_pub(make_conn, server, 2)

    def refused(data: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    conn._send_some = refused
    with pytest.raises(SendError):
        conn.send(commands.nop())  # (a NOP, as the reader task sends for a heartbeat: the whole queue goes with it)
    assert conn.wait_closed(WAIT)
    assert first.exception(WAIT).unprocessed is False
    assert [future.exception(WAIT).unprocessed for future in queued] == [True, True]


def test_blocking_requests_that_time_out_while_queued_are_never_sent(server: FakeNsqd, make_conn, monkeypatch) -> None:
    # Callers waiting for an answer another task reads (here the test holds the read token, as
    # a reader stuck on a stalled nsqd would): the first request went out, the later ones queue
    # behind its answer. When their timeouts pass they leave the queue: never sent later.
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    parks = park_reader(conn, server)
    server.set_answer("PUB", NOTHING, times=1)
    conn._read_token.acquire()
    outcomes: List[Any] = []

    def call(body: bytes) -> None:
        try:
            outcomes.append(conn.request_wait(commands.pub("t", body), timeout=0.3))
        except TimeoutError as exc:
            outcomes.append(exc)

    # The first caller waits for its answer only once its own write ended: until then its
    # flush loop also sends whatever was queued behind it (harmless: those wait for their
    # answers), and the queued ones below must come after it (a race seen once in a CI run).
    waiting = threading.Event()
    wait = nsq_sync.conn._WaitedAnswer.wait

    def noted_wait(self: Any, timeout: Any) -> bool:
        waiting.set()
        return wait(self, timeout)

    monkeypatch.setattr(nsq_sync.conn._WaitedAnswer, "wait", noted_wait)
    try:
        first = threading.Thread(target=call, args=(b"sent",))
        first.start()
        server.wait_for_command("PUB", count=parks + 1)
        assert waiting.wait(WAIT)
        queued = [threading.Thread(target=call, args=(b"queued %d" % n,)) for n in range(3)]
        for thread in queued:
            thread.start()
        for thread in [first, *queued]:
            thread.join(WAIT)
        assert [type(outcome) for outcome in outcomes] == [TimeoutError] * 4
        assert conn.pending_requests == 1 and not conn._writes  # (only the sent one's answer is awaited)
    finally:
        conn._read_token.release()
    server.send_response(b"OK")  # the stalled answer, at last
    assert conn.request_wait(commands.pub("t", b"after"), timeout=WAIT) == b"OK"
    assert published(server)[parks:] == [b"sent", b"after"]


# --------------------------------------------- 5. close while a caller leads
def test_close_while_caller_leads(server: FakeNsqd, make_conn, monkeypatch, ask) -> None:
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    parks = park_reader(conn, server)
    server.set_answer("PUB", [NOTHING, close()], times=1)  # no answer, then nsqd closes
    assert conn._parked and not conn._read_token.locked()  # the token is free: this caller leads
    started = time.monotonic()
    with pytest.raises(ConnectionClosedError) as info:
        ask(conn, commands.pub("t", b"lost"), 5)
    assert time.monotonic() - started < 2, "the close was not seen promptly"
    assert info.value.unprocessed is False  # sent: it may have run
    assert conn.wait_closed(WAIT)
    assert len(events.of("close")) == 1
    server.wait_for_command("PUB", count=parks + 1)
    assert published(server)[-1] == b"lost"


# ----------------------------------------------- 6. timeout, then FIFO matching
@pytest.mark.parametrize("late", ["before_second", "with_second"])
def test_timeout_keeps_answers_in_order(server: FakeNsqd, make_conn, monkeypatch, late: str, ask) -> None:
    """A timed-out request keeps its place: its late answer is consumed for it.

    ``with_second``: the late OK arrives right before the second's answer, after the second
    PUB (the decisive FIFO check: dropping the timed-out waiter hands the OK to the second).
    ``before_second``: the late OK arrives while nobody waits (the woken reader task reads it).
    """
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "RECV_SLICE_SECONDS", 0.05)  # (below the timeout: the quick request's fast path applies)
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    parks = park_reader(conn, server)
    server.set_answer("PUB", NOTHING, times=1)  # the first goes unanswered (for now)
    if late == "before_second":
        server.set_answer("PUB", response(b"second"), times=1)
    else:  # the late OK and the second's answer arrive together, after the second PUB
        server.set_answer("PUB", [ok(), response(b"second")], times=1)

    assert conn._parked and not conn._read_token.locked()  # the first request leads
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        ask(conn, commands.pub("t", b"first"), 0.2)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 2, elapsed
    assert conn.connected()
    server.wait_for_command("PUB", count=parks + 1)
    if late == "before_second":
        server.session.send_response(b"OK")  # the first's answer, too late for its caller

    # the late OK belongs to the first request: the second must get its own answer (the
    # reader task, woken for the late one, may be reading: then the hand-off, not strict)
    assert ask(conn, commands.pub("t", b"second"), 5, strict=False) == b"second"
    assert ask(conn, commands.pub("t", b"third"), 5, strict=False) == b"OK"
    assert conn.pending_requests == 0
    server.wait_for_command("PUB", count=parks + 3)
    assert published(server)[parks:] == [b"first", b"second", b"third"]
    assert conn.connected()
    assert events.of("error") == []


def test_a_caller_reads_in_kernel_timed_slices_until_its_deadline(server: FakeNsqd, make_conn, monkeypatch, backend: str, ask) -> None:
    """Thread backend: a caller waiting for its answer recvs at once on the blocking socket,
    which the kernel wakes every RECV_SLICE_SECONDS with no data (SO_RCVTIMEO). Slices that
    pass empty neither end the wait early nor count as a stale connection; the deadline
    still holds, and the late answer keeps its place. (gevent polls, as every path did.)"""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "RECV_SLICE_SECONDS", 0.05)
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close")
    parks = park_reader(conn, server)
    if backend == "thread":
        assert conn._recv_slice == 0.05
        raw = conn._raw_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
        seconds, micros = struct.unpack("ll", raw)
        assert seconds == 0 and 50000 <= micros < 60000  # (the kernel rounds up to its tick)
    else:
        assert conn._recv_slice is None
    server.set_answer("PUB", NOTHING, times=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        ask(conn, commands.pub("t", b"unanswered"), 0.4)  # eight slices
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2, elapsed
    assert conn.connected() and events.of("error") == [] and events.of("close") == []
    server.session.send_response(b"OK")  # the late answer: consumed for the timed-out request
    server.set_answer("PUB", response(b"next"), times=1)
    assert ask(conn, commands.pub("t", b"next"), 5, strict=False) == b"next"  # (the reader task may read: see above)
    assert published(server)[parks:] == [b"unanswered", b"next"]


# ------------------------------------------- 7. fatal error answering a led request
def test_fatal_error_answering_led_request(server: FakeNsqd, make_conn, monkeypatch, ask) -> None:
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    events = Events(conn, "error", "close", "heartbeat")
    park_reader(conn, server)
    server.set_answer("PUB", [error("E_BAD_TOPIC PUB topic name 'x' is not valid"), close()], times=1)
    assert conn._parked and not conn._read_token.locked()
    started = time.monotonic()
    with pytest.raises(BadTopicError) as info:
        ask(conn, commands.pub("t", b"bad"), 5)
    assert time.monotonic() - started < 2
    assert info.value.fatal
    assert conn.wait_closed(WAIT)
    assert conn.closed()
    errors = events.of("error")
    assert [type(kw["error"]) for kw in errors] == [BadTopicError]
    assert len(events.of("close")) == 1
    assert conn.error is errors[0]["error"]
    with pytest.raises(ConnectionClosedError) as after:
        # (not strict: the ending reader task may still hold the read token for a moment)
        ask(conn, commands.pub("t", b"after"), 5, strict=False)
    assert after.value.unprocessed is True


@pytest.mark.parametrize("with_handler", [True, False])
def test_fatal_error_future_behind_led_request(server: FakeNsqd, make_conn, monkeypatch, with_handler: bool) -> None:
    """A Future queued behind a led request that fails fatally never ran: it goes to
    unprocessed_handler (or fails with unprocessed=True); the led caller gets the error."""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    conn = connect(make_conn, server)
    park_reader(conn, server)
    handed: List[Tuple[AsyncConn, Future]] = []
    if with_handler:
        conn.unprocessed_handler = lambda c, f: handed.append((c, f))
    arrived = threading.Event()
    release = threading.Event()

    def answer_after_release(session: Any, command: Any) -> Any:
        arrived.set()
        assert release.wait(WAIT)
        return [error("E_BAD_TOPIC PUB topic name 'x' is not valid"), close()]

    server.set_answer("PUB", answer_after_release, times=1)
    outcome: List[BaseException] = []

    def lead() -> None:
        try:
            conn.request_wait(commands.pub("t", b"led"), timeout=WAIT)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            outcome.append(exc)

    leader = threading.Thread(target=lead, name="test-leader")
    leader.start()
    try:
        assert arrived.wait(WAIT)  # the leader sent its PUB, holding the read token
        assert conn._read_token.locked()
        behind = conn.request(commands.pub("t", b"behind"))
    finally:
        release.set()
        leader.join(WAIT)
    assert not leader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BadTopicError), outcome
    assert conn.wait_closed(WAIT)
    if with_handler:
        assert handed == [(conn, behind)]
        assert behind.command == commands.pub("t", b"behind")  # type: ignore[attr-defined]
        assert behind.unprocessed is True  # type: ignore[attr-defined]
        assert not behind.done()  # the handler owns it now
    else:
        exc = behind.exception(WAIT)
        assert isinstance(exc, ConnectionClosedError), exc
        assert exc.unprocessed is True


# ------------------------------------------------------------- 8. deflate
IDENTIFY_RESPONSE_DEFLATE = dict(DEFAULT_IDENTIFY_RESPONSE, deflate=True)
BODY_COMMANDS = (b"IDENTIFY", b"AUTH", b"PUB", b"DPUB", b"MPUB")


def sync_flushed(compressor: Any, data: bytes) -> bytes:
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def split_commands(buf: bytearray) -> List[Tuple[bytes, Optional[bytes]]]:
    """Take every complete command (line, body or None) off the front of *buf*."""
    out: List[Tuple[bytes, Optional[bytes]]] = []
    while True:
        end = buf.find(b"\n")
        if end < 0:
            return out
        line = bytes(buf[:end])
        if line.split(b" ", 1)[0] in BODY_COMMANDS:
            if len(buf) < end + 5:
                return out
            (size,) = struct.unpack(">l", bytes(buf[end + 1 : end + 5]))
            if len(buf) < end + 5 + size:
                return out
            body: Optional[bytes] = bytes(buf[end + 5 : end + 5 + size])
            del buf[: end + 5 + size]
        else:
            body = None
            del buf[: end + 1]
        out.append((line, body))


class DeflateNsqd:
    """Just enough nsqd with deflate: IDENTIFY, then a compressed OK per PUB, sent in two
    parts: the frame (everything but the sync-flush marker), then, once the test says its
    caller got the answer, the 4-byte marker ``00 00 ff ff`` alone."""

    FEATURE = "deflate"
    ANSWER = IDENTIFY_RESPONSE_DEFLATE

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.host, self.port = self.listener.getsockname()[:2]
        self.bodies: List[bytes] = []
        self.lines: List[bytes] = []
        self.problems: List[str] = []
        self.answered = threading.Event()  # set by the test: the caller got the OK
        self.marker_sent = threading.Event()  # set here: the lone marker went out
        self.conn: Optional[socket.socket] = None
        self.thread = threading.Thread(target=self._run, name="test-deflate-nsqd", daemon=True)
        self.thread.start()

    def _read_exact(self, sock: socket.socket, buf: bytearray, n: int) -> bytes:
        while len(buf) < n:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            buf += data
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _accept(self) -> Optional[socket.socket]:
        self.listener.settimeout(WAIT)
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            self.problems.append(f"accept: {exc}")
            return None
        self.conn = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(WAIT * 2)
        return sock

    def _identify(self, sock: socket.socket, raw: bytearray, feature: str, answer: dict) -> bool:
        """The magic and IDENTIFY (which must ask for *feature*), answered with *answer*."""
        if self._read_exact(sock, raw, 4) != b"  V2":
            self.problems.append("bad magic")
            return False
        while b"\n" not in raw:
            raw += sock.recv(65536)
        line = self._read_exact(sock, raw, raw.index(b"\n") + 1)
        if line != b"IDENTIFY\n":
            self.problems.append(f"expected IDENTIFY, got {line!r}")
            return False
        (size,) = struct.unpack(">l", self._read_exact(sock, raw, 4))
        identify = json.loads(self._read_exact(sock, raw, size))
        if identify.get(feature) is not True:
            self.problems.append(f"client did not ask for {feature}: {identify}")
        sock.sendall(response_frame(json.dumps(answer).encode()))
        return True

    def _run(self) -> None:
        sock = self._accept()
        if sock is None:
            return
        raw = bytearray()
        try:
            if not self._identify(sock, raw, self.FEATURE, self.ANSWER):
                return
            decompress = self._start(sock)
            buf = bytearray(decompress(bytes(raw)))
            while True:
                for line, body in split_commands(buf):
                    self.lines.append(line)
                    if not line.startswith(b"PUB "):
                        continue
                    self.bodies.append(body or b"")
                    if not self._answer(sock):
                        return
                data = sock.recv(65536)
                if not data:
                    return
                buf += decompress(data)
        except EOFError:
            self.problems.append("the client closed during the handshake")
        except OSError as exc:
            self.problems.append(f"socket: {exc!r}")
        finally:
            sock.close()

    def _start(self, sock: socket.socket) -> Callable[[bytes], bytes]:
        """After IDENTIFY: set up the codec, send the upgrade's OK; return the decompressor."""
        self._compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._shadow = zlib.decompressobj(-15)  # what the client's decompressor has seen
        handshake_ok = sync_flushed(self._compressor, response_frame(b"OK"))
        self._shadow.decompress(handshake_ok)
        sock.sendall(handshake_ok)
        return zlib.decompressobj(-15).decompress

    def _answer(self, sock: socket.socket) -> bool:
        """Answer one PUB; False ends the session."""
        ok_frame = response_frame(b"OK")
        data = sync_flushed(self._compressor, ok_frame)
        first, marker = data[:-4], data[-4:]
        if marker != SYNC_MARKER:
            self.problems.append(f"no sync-flush marker at the end: {data!r}")
        # the first part alone must decode the whole frame (else the test proves nothing)
        if self._shadow.decompress(first) != ok_frame or self._shadow.decompress(marker) != b"":
            self.problems.append(f"the first part {first!r} does not decode to the whole frame")
        sock.sendall(first)
        if not self.answered.wait(WAIT):
            self.problems.append(f"the caller never got the answer to PUB #{len(self.bodies)}")
            return False
        self.answered.clear()
        sock.sendall(marker)
        self.marker_sent.set()
        return True

    def stop(self) -> None:
        self.answered.set()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(WAIT)
        self.listener.close()


def _serving(server: "DeflateNsqd") -> Iterator[Any]:
    try:
        yield server
    finally:
        server.stop()
    assert not server.thread.is_alive()


@pytest.fixture
def deflate_nsqd() -> Iterator[DeflateNsqd]:
    yield from _serving(DeflateNsqd())


def test_split_marker_precondition() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    frame = response_frame(b"OK")
    data = sync_flushed(compressor, frame)
    assert data.endswith(SYNC_MARKER)
    assert zlib.decompressobj(-15).decompress(data[:-4]) == frame  # a fresh decompressor


def publish_behind_lone_markers(conn: AsyncConn, server: DeflateNsqd, count: int, prefix: bytes, timeout: float) -> None:
    """*count* PUBs through *server*, which sends each answer's sync-flush marker alone once
    the caller has the answer; each is answered within *timeout*. Then close, and check that
    the server took every body and saw nothing wrong."""
    for i in range(count):
        started = time.monotonic()
        assert conn.request_wait(commands.pub("t", prefix + b"%d" % i), timeout=timeout) == b"OK", i
        assert time.monotonic() - started < timeout, i
        server.answered.set()
        assert server.marker_sent.wait(WAIT), i
        server.marker_sent.clear()
    assert conn.connected()
    conn.close(timeout=2)
    server.thread.join(WAIT)
    assert server.problems == []
    assert server.bodies == [prefix + b"%d" % i for i in range(count)]


def test_deflate_marker_alone_does_not_block_caller(deflate_nsqd: DeflateNsqd, make_conn, monkeypatch) -> None:
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", -1)  # every request_wait checks before sending
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)  # callers lead from the 2nd request on
    empty_reads = [0]
    original_read_some = DeflateStream.read_some

    def counting_read_some(self: DeflateStream, size: int) -> Optional[bytes]:
        out = original_read_some(self, size)
        if out == b"":
            empty_reads[0] += 1
        return out

    monkeypatch.setattr(DeflateStream, "read_some", counting_read_some)
    # heartbeat_interval=1: a read that blocks waiting for more would end as stale after 2 s
    conn = make_conn(deflate_nsqd.host, deflate_nsqd.port, deflate=True, heartbeat_interval=1)
    conn.connect()
    assert isinstance(conn._stream, DeflateStream)
    count = 50
    publish_behind_lone_markers(conn, deflate_nsqd, count, b"d", timeout=2)
    # the lone markers were met by reads that decoded to nothing (at least the callers' checks)
    assert empty_reads[0] >= count - 2, empty_reads[0]


def test_deflate_answer_behind_a_lone_marker_stays_on_the_fast_path(deflate_nsqd: DeflateNsqd, make_conn, monkeypatch) -> None:
    """nsqd writes a deflate answer's sync-flush marker in a write of its own (Go's flate
    writer byte-aligns the stored block's header with a flush of its own). When a caller's
    read took the answer before its marker came, the next caller's one read meets the marker
    alone, which decodes to nothing: it reads on for its answer, on the fast path (the
    thread backend's). Before, it left for the general path each time (a sixth of serial
    deflate publishes against a real nsqd)."""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)  # callers lead from the 2nd request on
    # (the fast path is for a connection read within IDLE_CHECK_SECONDS: the hand-offs with the
    # server thread between requests must not take it off that path on a loaded machine)
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", LONG_PARK)
    general: List[object] = []
    fast: List[object] = []
    not_ok = AsyncConn._not_ok
    read_own_answer = AsyncConn._read_own_answer

    def counted(self: AsyncConn, chunk: Any, error: Optional[BaseException] = None) -> Any:
        general.append(None if chunk is None else bytes(chunk))
        return not_ok(self, chunk, error)

    def counted_reads(self: AsyncConn, *args: Any) -> Any:
        fast.append(read_own_answer(self, *args))
        return fast[-1]

    monkeypatch.setattr(AsyncConn, "_not_ok", counted)
    monkeypatch.setattr(AsyncConn, "_read_own_answer", counted_reads)
    conn = make_conn(deflate_nsqd.host, deflate_nsqd.port, deflate=True)
    conn.connect()
    assert isinstance(conn._stream, DeflateStream)
    count = 30
    publish_behind_lone_markers(conn, deflate_nsqd, count, b"f", timeout=5)
    if conn._recv_slice is not None:
        # every answer after the first (read by the reader task) came whole from one caller's
        # reads on the fast path: none went the general way with a lone marker read (b"")
        assert fast.count(b"OK") >= count - 1, fast
        assert general == [], general


class FakeInner:
    """A stream below DeflateStream that hands out given chunks and counts reads."""

    def __init__(self, chunks: List[bytes]) -> None:
        self.chunks = collections.deque(chunks)
        self.calls = 0

    def read_some(self, size: int) -> Optional[bytes]:
        self.calls += 1
        return self.chunks.popleft() if self.chunks else None

    def recv(self, size: int) -> bytes:
        self.calls += 1
        return self.chunks.popleft() if self.chunks else b""

    def pending(self) -> bool:
        return False


def test_deflate_read_some_marker_alone_reads_once() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    one, two = response_frame(b"OK"), response_frame(b"second")
    first = sync_flushed(compressor, one)
    second = sync_flushed(compressor, two)
    assert first.endswith(SYNC_MARKER)
    inner = FakeInner([first[:-4], first[-4:], second])
    stream = DeflateStream(inner)
    assert stream.read_some(65536) == one
    assert inner.calls == 1
    assert stream.read_some(65536) == b""  # the marker alone: nothing yet, and no second read
    assert inner.calls == 2
    assert stream.read_some(65536) == two
    assert inner.calls == 3
    assert stream.read_some(65536) is None  # end of stream
    assert inner.calls == 4


class EmptyThenOk:
    """A compressed stream as the fast path meets it: a read that decoded to nothing (a lone
    sync-flush marker), then the OK frame."""

    def __init__(self) -> None:
        self.reads = 0

    def read_some(self, size: int) -> bytes:
        self.reads += 1
        return b"" if self.reads == 1 else response_frame(b"OK")

    def pending(self) -> bool:
        return False


@pytest.mark.parametrize("left, reads", [(None, 2), (5.0, 2), (0.5, 1)])
def test_a_second_read_only_when_the_deadline_leaves_a_recv_slice(left: Optional[float], reads: int) -> None:
    """After a read that decoded to nothing the fast path reads once more, which may wait a
    whole recv slice: only when the caller's deadline leaves one. Otherwise the request's
    waiter goes back to the reading loop, which polls until the deadline."""
    conn = AsyncConn("127.0.0.1", 4150)
    conn._recv_slice = 1.0
    stream = EmptyThenOk()
    conn._stream = stream
    deadline = None if left is None else time.monotonic() + left
    answer = conn._read_own_answer(deadline)
    assert stream.reads == reads
    if reads == 2:
        assert answer == b"OK"
        assert conn.pending_requests == 0
    else:
        assert answer.__class__ is not bytes and not answer.done()  # the waiter, for the loop
        assert conn.pending_requests == 1


def test_deflate_read_some_leading_bytes() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    frame = response_frame(b"OK")
    data = sync_flushed(compressor, frame)
    inner = FakeInner([SYNC_MARKER])
    stream = DeflateStream(inner, 6, data[:-4])
    assert stream.pending()
    assert stream.read_some(65536) == frame
    assert inner.calls == 0  # the bytes read past the upgrade point come first
    assert not stream.pending()
    assert stream.read_some(65536) == b""
    assert inner.calls == 1


# ------------------------------------------------------------- 9. snappy chunks in two writes
IDENTIFY_RESPONSE_SNAPPY = dict(DEFAULT_IDENTIFY_RESPONSE, snappy=True)
SPLIT_PAUSE = 0.02  # between a chunk's header and its data: long enough for a reader to wake in between


class SnappyNsqd(DeflateNsqd):
    """Just enough nsqd with snappy: IDENTIFY, then an OK per PUB written as nsqd's snappy
    writer does, in two parts (the 8-byte chunk header, then the data), with a pause
    between them so that a reader woken by the header alone would read it alone."""

    FEATURE = "snappy"
    ANSWER = IDENTIFY_RESPONSE_SNAPPY

    def _start(self, sock: socket.socket) -> Callable[[bytes], bytes]:
        import snappy

        self._compressor = snappy.StreamCompressor()
        sock.sendall(self._compressor.add_chunk(response_frame(b"OK")))  # with the stream identifier
        return snappy.StreamDecompressor().decompress

    def _answer(self, sock: socket.socket) -> bool:
        chunk = self._compressor.add_chunk(response_frame(b"OK"))
        sock.sendall(chunk[:8])
        time.sleep(SPLIT_PAUSE)
        sock.sendall(chunk[8:])
        return True


@pytest.fixture
def snappy_nsqd() -> Iterator[SnappyNsqd]:
    yield from _serving(SnappyNsqd())


def test_snappy_reader_wakes_only_for_whole_chunks(snappy_nsqd: SnappyNsqd, make_conn, monkeypatch) -> None:
    from nsq_sync.transport.compression import SNAPPY_SMALLEST_CHUNK, SnappyStream

    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)  # callers lead from the 2nd request on
    raw_reads: List[int] = []
    conn = make_conn(snappy_nsqd.host, snappy_nsqd.port, snappy=True, heartbeat_interval=1)
    conn.connect()
    assert isinstance(conn._stream, SnappyStream)
    assert conn._raw_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == SNAPPY_SMALLEST_CHUNK
    stream_class = type(conn._stream.inner)
    original = stream_class.read_some

    def recording_read_some(self: Any, size: int) -> Any:
        out = original(self, size)
        if out is not None:
            raw_reads.append(len(out))
        return out

    monkeypatch.setattr(stream_class, "read_some", recording_read_some)
    count = 10
    for i in range(count):
        assert conn.request_wait(commands.pub("t", b"s%d" % i), timeout=2) == b"OK", i
    assert conn.connected()
    conn.close(timeout=2)
    snappy_nsqd.thread.join(WAIT)
    assert snappy_nsqd.problems == []
    assert snappy_nsqd.bodies == [b"s%d" % i for i in range(count)]
    # every answer came in one read of its whole chunk (18 bytes), never its header alone
    assert raw_reads and 8 not in raw_reads, raw_reads
    assert raw_reads.count(18) >= count, raw_reads


class SnappyNsqdShortTail(SnappyNsqd):
    """Answers with a long chunk (a 300-byte response) whose last 5 bytes come after a pause:
    what a TCP segment boundary does to a long chunk on a real network."""

    TAIL = 5

    def _answer(self, sock: socket.socket) -> bool:
        chunk = self._compressor.add_chunk(response_frame(b"OK" + b"." * 298))
        sock.sendall(chunk[: -self.TAIL])
        time.sleep(SPLIT_PAUSE)
        sock.sendall(chunk[-self.TAIL :])
        return True


def test_snappy_chunk_whose_last_bytes_come_late_is_read_when_they_come(make_conn) -> None:
    """The low-water mark follows the chunk held back: 5 bytes short of its end, a reader
    waits for 5, not 9 (with 9, the answer waited for nsqd's next write: a heartbeat, 30 s on)."""
    for server in _serving(SnappyNsqdShortTail()):
        conn = make_conn(server.host, server.port, snappy=True)  # (heartbeats every 30 s)
        conn.connect()
        for i in range(3):
            assert conn.request_wait(commands.pub("t", b"s%d" % i), timeout=5) == b"OK" + b"." * 298, i
        assert conn._raw_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 9  # between chunks again
        conn.close(timeout=2)
        server.thread.join(WAIT)
        assert server.problems == []


def own_reads(conn: AsyncConn) -> List[float]:
    """Records each read a fast path makes through the stream (AsyncConn._read_own_answer)."""
    calls: List[float] = []
    read_own_answer = conn._read_own_answer

    def counted(deadline: Any, clock: Any = time.monotonic) -> Any:
        calls.append(clock())
        return read_own_answer(deadline, clock)

    conn._read_own_answer = counted  # type: ignore[method-assign]
    return calls


def test_quick_requests_over_snappy_take_the_ok_chunk_as_it_comes(snappy_nsqd: SnappyNsqd, make_conn, monkeypatch) -> None:
    """Snappy's framing sends nsqd's OK as one uncompressed chunk of 18 bytes that never
    change (the fake writes its header and its data apart, as nsqd does): on the thread
    backend _quick_request reads them from the socket into the stream's buffer and knows
    the answer without the snappy layer; under gevent it goes through request_wait."""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)  # callers lead from the 2nd request on
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)  # (a stalled test machine: not idle)
    conn = make_conn(snappy_nsqd.host, snappy_nsqd.port, snappy=True, heartbeat_interval=1)
    conn.connect()
    assert conn.request_wait(commands.pub("t", b"first"), timeout=2) == b"OK"
    general, through_layer = general_calls(conn), own_reads(conn)
    count = 10
    for i in range(count):
        assert conn._quick_request(commands.pub("t", b"s%d" % i), 5.0) == b"OK", i
    if conn._recv_slice is not None:
        assert conn._quick_ok == nsq_sync.conn._SNAPPY_OK_CHUNK and conn._quick_snappy is not None
        assert general == [] and through_layer == [], (general, through_layer)
    else:
        assert len(general) == count
    assert conn.connected()
    conn.close(timeout=2)
    snappy_nsqd.thread.join(WAIT)
    assert snappy_nsqd.problems == []
    assert snappy_nsqd.bodies == [b"first"] + [b"s%d" % i for i in range(count)]


def test_quick_request_over_snappy_reads_any_other_answer_through_the_layer(monkeypatch, make_conn) -> None:
    """An answer other than the OK chunk (a 300-byte one whose last 5 bytes come late): the
    bytes read go to the snappy layer, which reads on for the rest of the chunk."""
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)
    for server in _serving(SnappyNsqdShortTail()):
        conn = make_conn(server.host, server.port, snappy=True)
        conn.connect()
        assert conn.request_wait(commands.pub("t", b"first"), timeout=5) == b"OK" + b"." * 298
        through_layer = own_reads(conn)
        for i in range(3):
            assert conn._quick_request(commands.pub("t", b"s%d" % i), 5.0) == b"OK" + b"." * 298, i
        assert len(through_layer) == (3 if conn._recv_slice is not None else 0)
        assert conn.connected() and conn.pending_requests == 0
        conn.close(timeout=2)
        server.thread.join(WAIT)
        assert server.problems == []
        assert server.bodies == [b"first", b"s0", b"s1", b"s2"]


class SnappyNsqdPrefixed(SnappyNsqd):
    """Answers each PUB with its OK chunk in one write, after the bytes the test put in
    ``prefix`` (sent once)."""

    def __init__(self) -> None:
        self.prefix = b""
        super().__init__()

    def _answer(self, sock: socket.socket) -> bool:
        prefix, self.prefix = self.prefix, b""
        sock.sendall(prefix + self._compressor.add_chunk(response_frame(b"OK")))
        return True


@pytest.mark.parametrize("held_by", ["chunk reader", "layer"])
def test_quick_request_over_snappy_stands_aside_while_part_of_a_chunk_is_held(monkeypatch, make_conn, held_by: str) -> None:
    """The first bytes of a chunk are held: by the chunk reader (a read that ended inside the
    chunk) or by the layer, not decoded yet (bytes read past the upgrade point). The bytes that
    come next belong to that chunk, so the request goes request_wait's general way, and the
    heartbeat completed ahead of the answer is answered."""
    from nsq_sync.transport.compression import masked_crc32c

    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", LONG_PARK)
    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)
    frame = response_frame(HEARTBEAT)
    chunk = b"\x01" + (4 + len(frame)).to_bytes(3, "little") + masked_crc32c(frame).to_bytes(4, "little") + frame
    for server in _serving(SnappyNsqdPrefixed()):
        conn = make_conn(server.host, server.port, snappy=True)
        conn.connect()
        events = Events(conn, "heartbeat")
        assert conn.request_wait(commands.pub("t", b"first"), timeout=5) == b"OK"
        assert conn._quick_request(commands.pub("t", b"second"), 5.0) == b"OK"  # (sets up the quick read)
        direct: List[int] = []
        real = conn._quick_recv_into
        if real is not None:  # (the thread backend; under gevent every request goes request_wait's way)

            def counted(buffer: bytearray) -> int:
                direct.append(len(buffer))
                return real(buffer)

            conn._quick_recv_into = counted
        reader = conn._stream._decompressor
        if held_by == "layer":
            conn._stream._hold(chunk[:12])
        else:
            reader._rest = chunk[:12]
        server.prefix = chunk[12:]  # (the reader task parked: nobody reads)
        assert conn._quick_request(commands.pub("t", b"third"), 5.0) == b"OK"
        assert direct == [] and reader._rest == b"" and not conn._stream.pending()
        assert conn._quick_request(commands.pub("t", b"fourth"), 5.0) == b"OK"  # clean again: the quick read
        assert len(direct) == (1 if real is not None else 0)
        assert events.names() == ["heartbeat"]
        wait_until(lambda: b"NOP" in server.lines, WAIT, message="the heartbeat answered")
        assert conn.connected() and conn.pending_requests == 0
        conn.close(timeout=2)
        server.thread.join(WAIT)
        assert server.problems == []
        assert server.bodies == [b"first", b"second", b"third", b"fourth"]


def test_plain_and_deflate_sockets_keep_the_default_low_mark(deflate_nsqd: DeflateNsqd, make_conn) -> None:
    conn = make_conn(deflate_nsqd.host, deflate_nsqd.port, deflate=True, heartbeat_interval=1)
    conn.connect()
    # a deflate answer may be shorter than 9 bytes: only snappy may wait for more
    assert conn._raw_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    deflate_nsqd.answered.set()

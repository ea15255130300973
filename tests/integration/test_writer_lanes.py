"""Writer lanes against a real nsqd v1.3.0: extra connections for threads that publish at once.

When a blocking publish finds the Writer's connection being read by another publishing
thread, it publishes on a lane (a connection of its own, opened on demand up to
``max_connections_per_nsqd``) instead of waiting for that thread to hand its answer over.
These tests check what nsqd itself sees (its /stats: producer connections, publish counts,
depths) and what a consumer reads back. Lanes are a thread-backend feature: under gevent
the same tests check that none is opened.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

from nsq_sync import AsyncConn, Writer
from nsq_sync.errors import BadMessageError, ConfigError
from nsq_sync.protocol import commands
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import NsqdProcess, wait_until
from forking import in_child  # tests/support

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

THREADS = 8


@pytest.fixture
def writers(backend: str) -> Iterator[Any]:
    made: List[Writer] = []

    def make(address: str, **kwargs: Any) -> Writer:
        kwargs.setdefault("backend", backend)
        writer = Writer(address, **kwargs)
        made.append(writer)
        assert writer.wait_connected(5)
        return writer

    yield make
    for writer in made:
        writer.close(5)


def producers(nsqd: NsqdProcess) -> List[Dict[str, Any]]:
    """The client connections nsqd counts as publishers (its /stats)."""
    return list(nsqd.stats().get("producers") or [])


def pub_counts(nsqd: NsqdProcess, topic: str) -> List[int]:
    """Per producer connection, how many publishes nsqd took for *topic*."""
    counts = []
    for producer in producers(nsqd):
        for entry in producer.get("pub_counts") or []:
            if entry["topic"] == topic:
                counts.append(entry["count"])
    return counts


def publish_from_threads(writer: Writer, topic: str, per_thread: int, threads: int = THREADS) -> List[bytes]:
    """Every thread publishes its own bodies, all starting at once; returns the bodies (all answered OK)."""
    start = threading.Barrier(threads)
    answers: List[Any] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            try:
                answer = writer.pub(topic, b"t%d-%d" % (index, i))
            except BaseException as exc:  # reported below, with the body
                answer = exc
            with lock:
                answers.append(answer)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    failures = [a for a in answers if a != b"OK"]
    assert not failures and len(answers) == threads * per_thread, failures[:5]
    return [b"t%d-%d" % (n, i) for n in range(threads) for i in range(per_thread)]


def read_back(nsqd: NsqdProcess, topic: str, count: int, backend: str) -> List[bytes]:
    host, port = nsqd.tcp_address.rsplit(":", 1)
    bodies: List[bytes] = []
    done = threading.Event()
    conn = AsyncConn(host, int(port), backend=backend)

    def on_message(conn: AsyncConn, message: Any) -> None:
        bodies.append(bytes(message.body))
        message.finish()
        if len(bodies) >= count:
            done.set()

    conn.on("message", on_message)
    conn.connect()
    try:
        conn.subscribe(topic, "check", timeout=5)
        conn.send_rdy(1000)
        assert done.wait(30), f"read {len(bodies)} of {count}"
    finally:
        conn.close(5)
    return bodies


def lanes(writer: Writer) -> List[AsyncConn]:
    return [lane for node in writer._nodes for lane in node.lanes]


def lanes_expected(backend: str, nsqd: NsqdProcess) -> bool:
    """True on the thread backend. Under gevent (no lanes there, by design) this checks that
    threads publishing at once open none and all their publishes land, and the caller's
    lane-specific checks end there."""
    if backend == "thread":
        return True
    with Writer(nsqd.tcp_address, backend=backend) as writer:
        assert writer.wait_connected(5)
        bodies = publish_from_threads(writer, "nolanes", per_thread=100)
        assert lanes(writer) == [] and writer._max_lanes == 0
        assert pub_counts(nsqd, "nolanes") == [len(bodies)]  # (while connected: /stats lists open connections)
    return False


def test_threads_publishing_at_once_use_lanes_and_each_message_lands_once(nsqd: NsqdProcess, writers, backend: str) -> None:
    nsqd.create_channel("lanes", "check")
    writer = writers(nsqd.tcp_address)
    bodies = publish_from_threads(writer, "lanes", per_thread=250)
    counts = pub_counts(nsqd, "lanes")
    assert sum(counts) == len(bodies)
    if backend == "thread":
        # nsqd took the publishes on several connections of this one Writer
        assert 2 <= len(counts) <= writer.max_connections_per_nsqd, counts
        assert len(lanes(writer)) == len(counts) - 1
    else:
        assert counts == [len(bodies)] and lanes(writer) == []  # greenlets: no lanes
    found = read_back(nsqd, "lanes", len(bodies), backend)
    assert sorted(found) == sorted(bodies)  # each exactly once


def test_one_thread_never_opens_a_lane(nsqd: NsqdProcess, writers) -> None:
    writer = writers(nsqd.tcp_address)
    for i in range(300):
        assert writer.pub("single", b"s%d" % i) == b"OK"
    futures = [writer.pub_async("single", b"a%d" % i) for i in range(300)]
    assert all(f.result(10) == b"OK" for f in futures)
    assert writer.mpub("single", [b"m1", b"m2"]) == b"OK"
    assert lanes(writer) == []
    assert pub_counts(nsqd, "single") == [602]


@pytest.mark.parametrize("limit", [None, 1])
def test_one_thread_reads_its_own_answers_on_the_quick_path(nsqd: NsqdProcess, writers, backend: str, monkeypatch, limit: Any) -> None:
    """One thread publishing one message at a time: on the thread backend pub() sends and
    reads nsqd's OK itself on the first connection (AsyncConn._quick_request), with lanes
    allowed or not; request_wait's general path only while the reader task still reads (the
    first publish). Under gevent every publish takes request_wait. Each lands once."""
    import nsq_sync.conn

    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)  # (a stalled test machine: not idle)
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", 30.0)  # (nor a reader task taking reading back)
    general: List[bytes] = []
    request_wait = AsyncConn.request_wait

    def counted(self: AsyncConn, data: bytes, timeout: Any = None) -> bytes:
        general.append(bytes(data))
        return request_wait(self, data, timeout)

    monkeypatch.setattr(AsyncConn, "request_wait", counted)
    nsqd.create_channel("quick", "check")
    writer = writers(nsqd.tcp_address, **({} if limit is None else {"max_connections_per_nsqd": limit}))
    bodies = [b"q%d" % i for i in range(300)]
    for body in bodies:
        assert writer.pub("quick", body) == b"OK"
    if backend == "thread":
        assert len(general) <= 2, len(general)
    else:
        assert len(general) == len(bodies)
    if limit == 1 or backend != "thread":
        assert pub_counts(nsqd, "quick") == [len(bodies)]
    else:
        # (A first publish that meets the reader task parking, still holding the token, may
        # open a lane, as in test_one_thread_never_opens_a_lane; nothing else does.)
        assert len(lanes(writer)) <= 1 and sum(pub_counts(nsqd, "quick")) == len(bodies)
    assert sorted(read_back(nsqd, "quick", len(bodies), backend)) == sorted(bodies)


def test_snappy_publishes_read_nsqds_ok_chunk_on_the_quick_path(nsqd: NsqdProcess, writers, backend: str, monkeypatch) -> None:
    """nsqd v1.3.0 sends each OK on a snappy connection as the 18 bytes _quick_request knows
    (an uncompressed chunk of the OK frame): on the thread backend no publish after the
    first reads through the snappy layer. Each lands once."""
    import nsq_sync.conn

    monkeypatch.setattr(nsq_sync.conn, "IDLE_CHECK_SECONDS", 60.0)  # (a stalled test machine: not idle)
    monkeypatch.setattr(nsq_sync.conn, "PARK_SECONDS", 30.0)
    through_layer: List[Any] = []
    read_own_answer = AsyncConn._read_own_answer

    def counted(self: AsyncConn, *args: Any) -> Any:
        through_layer.append(args)
        return read_own_answer(self, *args)

    monkeypatch.setattr(AsyncConn, "_read_own_answer", counted)
    nsqd.create_channel("snappy-quick", "check")
    writer = writers(nsqd.tcp_address, snappy=True, max_connections_per_nsqd=1)
    bodies = [b"s%d" % i for i in range(300)]
    for body in bodies:
        assert writer.pub("snappy-quick", body) == b"OK"
    if backend == "thread":
        assert len(through_layer) <= 1, len(through_layer)
        (conn,) = writer.conns.values()
        assert conn._quick_ok == nsq_sync.conn._SNAPPY_OK_CHUNK
    assert pub_counts(nsqd, "snappy-quick") == [len(bodies)]
    assert sorted(read_back(nsqd, "snappy-quick", len(bodies), backend)) == sorted(bodies)


@pytest.mark.parametrize("limit", [1, 3])
def test_max_connections_per_nsqd_caps_the_connections(nsqd: NsqdProcess, writers, limit: int) -> None:
    writer = writers(nsqd.tcp_address, max_connections_per_nsqd=limit)
    bodies = publish_from_threads(writer, "capped", per_thread=200)
    counts = pub_counts(nsqd, "capped")
    assert sum(counts) == len(bodies)
    assert 1 <= len(counts) <= limit, counts
    assert len(lanes(writer)) <= limit - 1


@pytest.mark.parametrize("threads", [2, 3])
def test_lanes_never_outnumber_the_publishing_threads(nsqd: NsqdProcess, writers, backend: str, threads: int) -> None:
    if not lanes_expected(backend, nsqd):
        return
    writer = writers(nsqd.tcp_address)  # the limit (16) is far above the demand
    bodies = publish_from_threads(writer, "demand", per_thread=400, threads=threads)
    counts = pub_counts(nsqd, "demand")
    assert sum(counts) == len(bodies)
    # at most one lane per publishing thread, besides the first connection
    assert 1 <= len(counts) <= threads + 1, counts
    assert len(lanes(writer)) <= threads


@pytest.mark.parametrize("bad", [0, 65, -1, 2.5, "4", None, True])
def test_bad_max_connections_per_nsqd_is_refused_before_connecting(nsqd: NsqdProcess, bad: Any) -> None:
    with pytest.raises((ConfigError, TypeError)) as info:
        Writer(nsqd.tcp_address, max_connections_per_nsqd=bad)
    assert "max_connections_per_nsqd" in str(info.value)
    assert producers(nsqd) == []  # nothing was opened


def test_unused_lanes_close_before_nsqd_would_and_come_back(nsqd: NsqdProcess, writers, backend: str) -> None:
    if not lanes_expected(backend, nsqd):
        return
    # nsqd closes a connection that sent nothing for two heartbeat intervals (2 s here); a lane
    # has no reader task to answer heartbeats, so the Writer closes it after one idle second.
    writer = writers(nsqd.tcp_address, heartbeat_interval=1)
    publish_from_threads(writer, "idle", per_thread=200)
    opened = lanes(writer)
    assert opened, "8 threads publishing at once opened no lane"
    wait_until(lambda: not lanes(writer), timeout=5, message="the unused lanes to close")
    for lane in opened:
        assert lane.closed() and lane.error is None, lane.error  # closed by us, not by nsqd
    wait_until(lambda: len(producers(nsqd)) == 1, timeout=5, message="nsqd to see only the first connection")
    first = next(iter(writer.conns.values()))
    assert first.connected()
    # contention again: lanes open again, and everything lands
    publish_from_threads(writer, "idle", per_thread=200)
    assert lanes(writer)
    assert nsqd.topic_depth("idle") == 2 * THREADS * 200


def test_lanes_stay_up_under_heartbeats_while_busy(nsqd: NsqdProcess, writers, backend: str) -> None:
    if not lanes_expected(backend, nsqd):
        return
    writer = writers(nsqd.tcp_address, heartbeat_interval=1)
    stop = time.monotonic() + 3.5  # more than three heartbeats reach every lane mid-stream
    count = 0
    first_lanes = None
    while time.monotonic() < stop:
        publish_from_threads(writer, "beats", per_thread=50)
        count += THREADS * 50
        if first_lanes is None and lanes(writer):
            first_lanes = list(lanes(writer))
    assert first_lanes, "no lane opened"
    assert all(lane.connected() for lane in first_lanes)  # none was closed as silent by nsqd
    assert nsqd.topic_depth("beats") == count


def test_fatal_error_on_a_lane_closes_only_that_lane(nsqd: NsqdProcess, writers, backend: str) -> None:
    if not lanes_expected(backend, nsqd):
        return
    with started(NsqdProcess(extra_args=["--max-msg-size=1024"])) as small:
        writer = writers(small.tcp_address, max_msg_size=None)  # no local check: nsqd refuses
        node = writer._nodes[0]
        writer._calls.extend([None, None])  # as if two publishes were under way: one lane wanted
        try:
            assert writer._lane(node) is None  # none yet: this opens one
            wait_until(lambda: node.free, timeout=5, message="a lane to open")
        finally:
            del writer._calls[:2]
        lane = writer._lane(node)
        assert lane is not None and lane._reader is None  # a lane has no reader task
        with pytest.raises(BadMessageError):
            lane._lane_request(commands.pub("fatal", b"x" * 2000), 5.0)
        writer._lane_back(lane)
        assert lane.closed() and lane not in node.lanes and lane not in node.free
        first = next(iter(writer.conns.values()))
        assert first.connected()
        assert writer.pub("fatal", b"fine") == b"OK"
        assert small.topic_depth("fatal") == 1


def test_close_closes_every_lane(nsqd: NsqdProcess, backend: str) -> None:
    writer = Writer(nsqd.tcp_address, backend=backend)
    assert writer.wait_connected(5)
    publish_from_threads(writer, "closing", per_thread=200)
    opened = lanes(writer)
    if backend == "thread":
        assert opened, "8 threads publishing opened no lane"  # (gevent has none: nothing to close)
    writer.close(5)
    assert all(lane.closed() for lane in opened)
    wait_until(lambda: producers(nsqd) == [], timeout=5, message="nsqd to see every connection closed")


def test_forked_child_publishes_on_its_own_connections(nsqd: NsqdProcess, writers, backend: str) -> None:
    writer = writers(nsqd.tcp_address)
    publish_from_threads(writer, "forklanes", per_thread=100)
    parent_lanes = lanes(writer)

    def child() -> Dict[str, Any]:
        publish_from_threads(writer, "forklanes", per_thread=50)
        mine = lanes(writer)
        return {"parent_lanes_kept": any(lane in parent_lanes for lane in mine), "lanes": len(mine)}

    report = in_child(child)
    assert report.get("parent_lanes_kept") is False, report
    # the parent's lanes were not touched by the child
    assert all(lane.connected() for lane in parent_lanes)
    publish_from_threads(writer, "forklanes", per_thread=50)
    assert nsqd.topic_depth("forklanes") == THREADS * (100 + 50 + 50)


def test_tls_writer_opens_no_lanes_and_loses_nothing(tls_nsqd: NsqdProcess, tls_files: Any, writers) -> None:
    # A lane's reads are bounded by the kernel's receive timeout, which a TLS socket does not
    # use: over TLS the Writer keeps to one connection per nsqd, and publishing from many
    # threads works as before (answers handed over between threads).

    writer = writers(tls_nsqd.tcp_address, tls_v1=True, tls_options={"ca_certs": tls_files.ca_cert})
    bodies = publish_from_threads(writer, "tlslanes", per_thread=100)
    assert lanes(writer) == []
    wait_until(lambda: len(producers(tls_nsqd)) == 1, timeout=5, message="nsqd to see one connection")
    assert pub_counts(tls_nsqd, "tlslanes") == [len(bodies)]

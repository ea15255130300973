"""Faults against real nsqd/nsqlookupd v1.3.0 (issue #6): broker restarts, SIGKILL, SIGSTOP,
nsqlookupd outages, a TCP path that is cut, stalled or delayed mid-frame, and handler faults.

Every test is bounded (pytest-timeout 60 s, every wait has a deadline) and stops by itself.
Waits are on conditions (``wait_until`` polls against a deadline, or events/futures); the only
fixed durations are faults whose length *is* the behaviour (how long nsqd stays frozen, how
long a path stays stalled). Each test prints one ``[fault]`` line with what it measured
(run with ``-s`` to see them).

The TCP proxy lives in tests/support/tcp_proxy.py (one select-loop thread, loopback only).
Every client is made with ``backend=backend``; NSQ_SYNC_BACKEND=gevent runs the same tests on
greenlets in a monkey-patched process.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from nsq_sync import AsyncConn, Message, Reader, Writer
from nsq_sync.backoff import ExponentialBackoff
from nsq_sync.errors import (
    AlreadyRespondedError,
    BadMessageError,
    ClosedError,
    ConfigError,
    ConnectionClosedError,
    Error,
    SendError,
    StaleConnectionError,
)
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import LocalCluster, NsqdProcess, NsqlookupdProcess, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from fake_nsqd import FakeNsqd, message_frame  # noqa: E402
from tcp_proxy import Link, TcpProxy  # noqa: E402
from tasks import live_tasks, split  # noqa: E402

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.slow,
    # an exception escaping a library thread fails the test
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

TOPIC = "faults"
CHANNEL = "ch"
#: every message on disk, synced after each write: survives SIGKILL (see test_writer_real.py)
DURABLE_ARGS = ["--mem-queue-size=0", "--sync-every=1"]
FAST_BACKOFF = ExponentialBackoff(multiplier=0.01, max_duration=0.1)


# =========================================================================== helpers
def report(name: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\n[fault] {name}: {shown}")


class Clients:
    """Makes Readers/Writers on the backend under test and closes every one after the test."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.readers: List[Reader] = []
        self.writers: List[Writer] = []

    def reader(self, handler: Callable[[Message], Any], topic: str = TOPIC, channel: str = CHANNEL, reconnect_base: float = 0.2, **kwargs: Any) -> Reader:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("backoff_strategy", FAST_BACKOFF)
        kwargs.setdefault("max_backoff_duration", 0.1)
        kwargs.setdefault("requeue_delay", 0)
        reader = Reader(topic, channel, handler, **kwargs)
        reader.reconnect_base = reconnect_base
        reader.reconnect_cap = 2.0
        self.readers.append(reader)
        return reader

    def writer(self, addresses: Any, **kwargs: Any) -> Writer:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("reconnect_interval", 0.1)
        kwargs.setdefault("max_reconnect_interval", 0.5)
        writer = Writer(addresses, **kwargs)
        self.writers.append(writer)
        return writer

    def close(self) -> None:
        for reader in self.readers:
            reader.close(5)
            assert reader.join(10), f"{reader!r} did not finish closing"
        for writer in self.writers:
            writer.close(5)


@pytest.fixture
def clients(backend: str) -> Iterator[Clients]:
    before = set(live_tasks())
    made = Clients(backend)
    try:
        yield made
    finally:
        made.close()
    # no thread/greenlet of ours is left behind (they end by themselves, bounded)
    deadline = time.monotonic() + 5
    while True:
        leaked = sorted(set(live_tasks()) - before)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling the task list only
    assert not leaked, f"tasks still running after close: {leaked}"


class Seen:
    """What a handler saw: count per body, attempts per body; thread-safe."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.counts: collections.Counter = collections.Counter()
        self.max_attempts: Dict[bytes, int] = {}
        self.times: Dict[bytes, float] = {}

    def handler(self, message: Message) -> bool:
        self.add(message)
        return True

    def add(self, message: Message) -> None:
        with self.cond:
            body = message.body
            self.counts[body] += 1
            self.max_attempts[body] = max(self.max_attempts.get(body, 0), message.attempts)
            self.times.setdefault(body, time.monotonic())
            self.cond.notify_all()

    def bodies(self) -> Set[bytes]:
        with self.cond:
            return set(self.counts)

    def total(self) -> int:
        with self.cond:
            return sum(self.counts.values())

    def duplicates(self) -> int:
        with self.cond:
            return sum(n - 1 for n in self.counts.values() if n > 1)

    def wait_total(self, count: int, timeout: float = 20.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: sum(self.counts.values()) >= count, timeout):
                raise AssertionError(f"handler saw {sum(self.counts.values())} messages, expected >= {count} within {timeout}s")

    def wait_bodies(self, wanted: Set[bytes], timeout: float = 20.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: wanted <= set(self.counts), timeout):
                missing = wanted - set(self.counts)
                raise AssertionError(f"{len(missing)} of {len(wanted)} bodies never reached the handler within {timeout}s, e.g. {sorted(missing)[:5]}")


class Publishers:
    """*threads* threads calling ``writer.pub`` with unique bodies until stop(); records every outcome."""

    def __init__(self, writer: Writer, threads: int = 4, tag: str = "p", topic: str = TOPIC, timeout: Optional[float] = None) -> None:
        self.writer = writer
        self.topic = topic
        self.tag = tag.encode()
        self.timeout = timeout
        self.cond = threading.Condition()
        self.ok: List[Tuple[bytes, float, float]] = []
        self.failed: List[Tuple[bytes, BaseException, float, float]] = []
        self.in_progress: Dict[int, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"publisher-{i}") for i in range(threads)]

    def start(self) -> "Publishers":
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, index: int) -> None:
        seq = 0
        while not self._stop.is_set():
            body = b"%s-%d-%06d" % (self.tag, index, seq)
            seq += 1
            began = time.monotonic()
            with self.cond:
                self.in_progress[index] = began
            try:
                answer = self.writer.pub(self.topic, body, timeout=self.timeout)
            except BaseException as exc:  # recorded and checked by the test
                with self.cond:
                    self.failed.append((body, exc, began, time.monotonic()))
                    del self.in_progress[index]
                    self.cond.notify_all()
                # a failing publish returns at once when nothing is connected: do not spin
                self._stop.wait(0.01)
            else:
                with self.cond:
                    assert answer == b"OK", answer
                    self.ok.append((body, began, time.monotonic()))
                    del self.in_progress[index]
                    self.cond.notify_all()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        assert not [t.name for t in self._threads if t.is_alive()], "a publisher thread is blocked"

    def ok_count(self) -> int:
        with self.cond:
            return len(self.ok)

    def ok_bodies(self) -> Set[bytes]:
        with self.cond:
            return {body for body, _, _ in self.ok}

    def wait_ok(self, count: int, timeout: float = 20.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.ok) >= count, timeout):
                raise AssertionError(f"{len(self.ok)} OK publishes, expected >= {count} within {timeout}s; failures: {self.failure_kinds()}")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"publishers: {what} not reached within {timeout}s; ok={len(self.ok)} failures={self.failure_kinds()}")

    def failure_kinds(self) -> Dict[str, int]:
        return dict(collections.Counter(type(exc).__name__ for _, exc, _, _ in self.failed))

    def longest_call(self) -> float:
        with self.cond:
            spans = [end - start for _, start, end in self.ok] + [end - start for _, _, start, end in self.failed]
        return max(spans, default=0.0)

    def untyped_failures(self) -> List[BaseException]:
        with self.cond:
            return [exc for _, exc, _, _ in self.failed if not isinstance(exc, Error)]


def prepare(nsqd: NsqdProcess, bodies: List[bytes], topic: str = TOPIC, channel: str = CHANNEL) -> None:
    """Create the channel (so nothing waits in the topic), then publish *bodies* over HTTP."""
    nsqd.create_channel(topic, channel)
    for start in range(0, len(bodies), 1000):
        nsqd.mpublish(topic, bodies[start : start + 1000])


def drained(nsqd: NsqdProcess, topic: str = TOPIC, channel: str = CHANNEL) -> bool:
    stats = nsqd.channel_stats(topic, channel) or {}
    return (stats.get("depth"), stats.get("in_flight_count"), stats.get("deferred_count")) == (0, 0, 0)


def read_back(nsqd: NsqdProcess, topic: str, backend: str, at_least: int, channel: str = "readback", timeout: float = 20.0) -> List[bytes]:
    """Subscribe a fresh channel and read what nsqd holds for *topic*: at least *at_least* messages
    (or whatever came within *timeout*, so the caller's assertion names what is missing), then on
    until the channel is drained (nsqd moves the topic's backlog into a new channel asynchronously,
    so "drained" alone could be seen before the first message arrives)."""
    host, port = split(nsqd.tcp_address)
    bodies: List[bytes] = []
    cond = threading.Condition()

    def on_message(conn: AsyncConn, message: Message) -> None:
        with cond:
            bodies.append(message.body)
            cond.notify_all()
        message.finish()

    conn = AsyncConn(host, port, backend=backend)
    conn.on("message", on_message)
    conn.connect()
    try:
        conn.subscribe(topic, channel)
        conn.send_rdy(min(2500, conn.max_rdy_count))
        with cond:
            cond.wait_for(lambda: len(bodies) >= at_least, timeout)
        wait_until(
            lambda: nsqd.topic_depth(topic) == 0 and drained(nsqd, topic, channel),
            timeout=timeout,
            interval=0.02,
            message=f"{topic}/{channel} drained",
        )
        with cond:
            return list(bodies)
    finally:
        conn.close(5)


# ---------------------------------------------------------------- wire parsing
_BODY_COMMANDS = (b"IDENTIFY", b"AUTH", b"PUB", b"MPUB", b"DPUB")


def server_frames(data: bytes) -> Tuple[List[Tuple[int, bytes]], int]:
    """Split what nsqd sent into (frame_type, payload); also return the bytes of a trailing partial frame."""
    frames: List[Tuple[int, bytes]] = []
    offset = 0
    while len(data) - offset >= 8:
        size, frame_type = struct.unpack_from(">ll", data, offset)
        if len(data) - offset - 4 < size:
            break
        frames.append((frame_type, data[offset + 8 : offset + 4 + size]))
        offset += 4 + size
    return frames, len(data) - offset


def client_commands(data: bytes) -> List[bytes]:
    """Command lines the client sent (bodies skipped); a trailing partial command is left out."""
    assert data[:4] == b"  V2", data[:16]
    offset, lines = 4, []
    while True:
        newline = data.find(b"\n", offset)
        if newline < 0:
            return lines
        line = data[offset:newline]
        offset = newline + 1
        if line.split(b" ", 1)[0] in _BODY_COMMANDS:
            if len(data) - offset < 4:
                return lines
            (size,) = struct.unpack_from(">l", data, offset)
            if len(data) - offset - 4 < size:
                return lines
            offset += 4 + size
        lines.append(line)


def delivered_ids(link: Link) -> List[bytes]:
    frames, _ = server_frames(link.sent_down)
    return [payload[10:26] for frame_type, payload in frames if frame_type == 2]


def answered_ids(link: Link, verb: bytes) -> List[bytes]:
    return [line.split(b" ")[1] for line in client_commands(link.sent_up) if line.startswith(verb + b" ")]


def ok_frames(link: Link) -> int:
    frames, _ = server_frames(link.sent_down)
    return sum(1 for frame_type, payload in frames if frame_type == 0 and payload == b"OK")


def assert_one_answer_per_delivery(links: List[Link]) -> Tuple[int, int]:
    """On every link: no message id answered (FIN/REQ) twice, and only ids delivered on that link.

    Returns (FINs, REQs) over all links.
    """
    fins = reqs = 0
    for link in links:
        delivered = collections.Counter(delivered_ids(link))
        fin = answered_ids(link, b"FIN")
        req = answered_ids(link, b"REQ")
        answers = collections.Counter(fin + req)
        over = {i: (n, delivered[i]) for i, n in answers.items() if n > delivered[i]}
        assert not over, f"{link!r}: ids answered more often than delivered on this link (answers, deliveries): {over}"
        fins += len(fin)
        reqs += len(req)
    return fins, reqs


def cut_mid_frame(proxy: TcpProxy, link: Link, abort: bool) -> None:
    """Cut *link* so that the client's stream ends inside a frame (never on a frame boundary)."""
    proxy.stall("down")  # freeze what the client has got, so the frame boundary can be computed
    _, partial = server_frames(link.sent_down)
    # already inside a frame: cut now; on a boundary: let 5 bytes of the next frame through first
    proxy.cut_after(0 if partial else 5, "down", abort=abort, link=link)
    proxy.resume()


# =========================================================================== 1. SIGTERM restart
@pytest.mark.parametrize("down_s", [0.0, 2.0], ids=["restart", "down-2s"])
@pytest.mark.parametrize("discovery", ["lookupd", "direct"])
def test_sigterm_restart_while_reader_consumes_and_writer_publishes(nsq_cluster: LocalCluster, clients: Clients, discovery: str, down_s: float) -> None:
    victim, survivor = nsq_cluster.nsqds
    for nsqd in nsq_cluster.nsqds:
        nsqd.create_channel(TOPIC, CHANNEL)
    seen = Seen()
    if discovery == "lookupd":
        nsq_cluster.wait_for_producers(TOPIC, 2)
        reader = clients.reader(seen.handler, lookupd_http_addresses=nsq_cluster.lookupd_http_addresses, lookupd_poll_interval=0.5, max_in_flight=20)
    else:
        reader = clients.reader(seen.handler, nsqd_tcp_addresses=nsq_cluster.nsqd_tcp_addresses, max_in_flight=20)
    reader.start()
    writer = clients.writer(nsq_cluster.nsqd_tcp_addresses, retries=2, publish_timeout=5)
    assert writer.wait_connected(10, count=2)
    wait_until(lambda: len(reader.conns) == 2, timeout=10, message="the Reader on both nsqd")
    old_reader_conn = reader.conns[victim.tcp_address]
    old_writer_conn = writer.conns[victim.tcp_address]

    pubs = Publishers(writer, threads=4).start()
    try:
        pubs.wait_ok(300)
        seen.wait_total(200)
        ok_at_stop = pubs.ok_count()
        stop_began = time.monotonic()
        victim.stop()  # SIGTERM: nsqd flushes its queues and in-flight messages to disk
        stopped = time.monotonic()
        if down_s:
            time.sleep(down_s)  # how long nsqd stays down is the fault itself
        victim.start()  # same ports, same data directory
        up = time.monotonic()
        outage_ok = pubs.ok_count() - ok_at_stop

        def reader_back() -> bool:
            conn = reader.conns.get(victim.tcp_address)
            return conn is not None and conn is not old_reader_conn and conn.connected()

        def writer_back() -> bool:
            conn = writer.conns.get(victim.tcp_address)
            return conn is not None and conn is not old_writer_conn and conn.connected()

        wait_until(reader_back, timeout=20, interval=0.005, message="the Reader to reconnect to the restarted nsqd")
        reader_recovery = time.monotonic() - up
        wait_until(writer_back, timeout=20, interval=0.005, message="the Writer to reconnect to the restarted nsqd")
        writer_recovery = time.monotonic() - up
        pubs.wait_ok(pubs.ok_count() + 300)
    finally:
        pubs.stop()

    assert not pubs.untyped_failures(), pubs.untyped_failures()[:5]
    assert old_reader_conn.closed() and old_writer_conn.closed()
    # every publish that returned OK is consumed at least once after recovery
    seen.wait_bodies(pubs.ok_bodies(), timeout=30)
    for nsqd in nsq_cluster.nsqds:
        wait_until(lambda: drained(nsqd), timeout=15, message=f"{nsqd!r} drained")
    published = pubs.ok_bodies() | {body for body, _, _, _ in pubs.failed}
    assert seen.bodies() <= published, "the handler saw a body nobody published"
    report(
        f"SIGTERM restart ({discovery}, down {down_s}s)",
        nsqd_down_s=stopped - stop_began,
        restart_s=up - stopped,
        reader_reconnect_after_up_s=reader_recovery,
        writer_reconnect_after_up_s=writer_recovery,
        ok=pubs.ok_count(),
        ok_while_victim_down=outage_ok,
        failed=pubs.failure_kinds(),
        consumed=seen.total(),
        duplicates=seen.duplicates(),
        longest_pub_s=pubs.longest_call(),
    )


# =========================================================================== 2. SIGKILL under a Writer
def test_sigkill_writer_fails_pending_at_once_and_keeps_every_acknowledged_publish(clients: Clients, backend: str) -> None:
    with started(NsqdProcess(extra_args=DURABLE_ARGS)) as nsqd, TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        writer = clients.writer(proxy.address, retries=0, publish_timeout=1.0)
        assert writer.wait_connected(5)
        pubs = Publishers(writer, threads=8).start()
        try:
            pubs.wait_ok(500)
            killed_at = time.monotonic()
            nsqd.kill()

            def failed_after_kill() -> List[Tuple[bytes, BaseException, float, float]]:
                return [f for f in pubs.failed if f[3] >= killed_at]

            pubs.wait(lambda: bool(failed_after_kill()), 5, "a failure after the kill")
            detection = min(end for _, _, _, end in failed_after_kill()) - killed_at
            # every publish that was in progress at the kill returned (failed or OK) promptly
            pubs.wait(lambda: not [s for s in pubs.in_progress.values() if s <= killed_at], 3, "publishes in progress at the kill to return")
            all_returned = time.monotonic() - killed_at
            with pubs.cond:
                spanning = [f for f in pubs.failed if f[2] <= killed_at]
                ok_at_kill = len(pubs.ok)
            # nsqd down: publishes fail with a typed error within their timeout (no failover target)
            pubs.wait(lambda: len(pubs.failed) >= len(spanning) + 8, 10, "failures while nsqd is down")
            nsqd.start()
            up = time.monotonic()
            pubs.wait(lambda: any(start >= up for _, start, _ in pubs.ok), 15, "an OK publish after the restart")
            reconnect = min(end for _, start, end in pubs.ok if start >= up) - up
            pubs.wait_ok(pubs.ok_count() + 200)
        finally:
            pubs.stop()

        assert not pubs.untyped_failures(), pubs.untyped_failures()[:5]
        kinds = {type(exc).__name__ for _, exc, _, _ in spanning}
        # the publishes pending at the kill: each one failed with a connection error (never OK)
        assert all(isinstance(exc, (ConnectionClosedError, SendError)) for _, exc, _, _ in spanning), kinds
        assert spanning, "no publish was pending at the kill (8 threads publishing?)"
        # nothing was reported OK that nsqd did not answer: every OK publish matches an OK frame nsqd sent
        frames_ok = sum(ok_frames(link) for link in proxy.links)
        assert pubs.ok_count() <= frames_ok, (pubs.ok_count(), frames_ok)
        # with --mem-queue-size=0 --sync-every=1 every acknowledged publish is still there after the restart
        found = read_back(nsqd, TOPIC, backend, pubs.ok_count())
        missing = pubs.ok_bodies() - set(found)
        assert not missing, f"{len(missing)} acknowledged publishes lost, e.g. {sorted(missing)[:5]}"
        assert set(found) <= pubs.ok_bodies() | {body for body, _, _, _ in pubs.failed}
        report(
            "SIGKILL nsqd under a Writer",
            detection_s=detection,
            all_pending_returned_s=all_returned,
            pending_failed_at_kill=len(spanning),
            reconnect_after_restart_s=reconnect,
            ok_before_kill=ok_at_kill,
            ok_total=pubs.ok_count(),
            ok_frames_on_wire=frames_ok,
            failed=pubs.failure_kinds(),
            found_after_restart=len(found),
            failed_but_landed=len(set(found) - pubs.ok_bodies()),
        )


# =========================================================================== 3. SIGSTOP
def test_sigstop_longer_than_two_heartbeats_is_detected_and_recovered(nsqd: NsqdProcess, clients: Clients) -> None:
    nsqd.create_channel(TOPIC, CHANNEL)
    seen = Seen()
    # msg_timeout=1: what nsqd had in flight on the frozen connection (in its output buffer, or
    # half written) comes back after ~1 s (+ nsqd's scan) instead of 60 s
    reader = clients.reader(seen.handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=20, heartbeat_interval=1, timeout=1, msg_timeout=1)
    reader.start()
    writer = clients.writer(nsqd.tcp_address, publish_timeout=1.0, heartbeat_interval=1, timeout=1)
    assert writer.wait_connected(5)
    wait_until(lambda: nsqd.tcp_address in reader.conns, timeout=10, message="the Reader connected")
    old_reader_conn = reader.conns[nsqd.tcp_address]
    old_writer_conn = writer.conns[nsqd.tcp_address]

    pubs = Publishers(writer, threads=2).start()
    try:
        pubs.wait_ok(100)
        seen.wait_total(50)
        frozen_at = time.monotonic()
        nsqd.pause()
        try:
            assert old_reader_conn.wait_closed(6), "the Reader's connection to a frozen nsqd was not closed"
            reader_detect = time.monotonic() - frozen_at
            assert old_writer_conn.wait_closed(6), "the Writer's connection to a frozen nsqd was not closed"
            writer_detect = time.monotonic() - frozen_at
            # the freeze lasts longer than two heartbeat intervals: time itself is the fault here
            remaining = 3.5 - (time.monotonic() - frozen_at)
            if remaining > 0:
                time.sleep(remaining)
            ok_during = [b for b, start, _ in pubs.ok if start > frozen_at + 0.1]
        finally:
            nsqd.resume()
        resumed = time.monotonic()

        def reader_back() -> bool:
            conn = reader.conns.get(nsqd.tcp_address)
            return conn is not None and conn is not old_reader_conn and conn.connected()

        wait_until(reader_back, timeout=20, interval=0.005, message="the Reader back on the resumed nsqd")
        reader_recovery = time.monotonic() - resumed
        pubs.wait(lambda: any(start >= resumed for _, start, _ in pubs.ok), 15, "an OK publish after SIGCONT")
        writer_recovery = min(end for _, start, end in pubs.ok if start >= resumed) - resumed
        pubs.wait_ok(pubs.ok_count() + 100)
    finally:
        pubs.stop()

    assert isinstance(old_reader_conn.error, StaleConnectionError), repr(old_reader_conn.error)
    assert isinstance(old_writer_conn.error, StaleConnectionError), repr(old_writer_conn.error)
    # stale after two heartbeat intervals (2 s), not much later
    assert reader_detect < 3.5 and writer_detect < 3.5, (reader_detect, writer_detect)
    assert not ok_during, f"{len(ok_during)} publishes reported OK while nsqd was frozen"
    assert not pubs.untyped_failures(), pubs.untyped_failures()[:5]
    # no publish blocked longer than its timeout (plus the stale close and scheduling)
    assert pubs.longest_call() < 3.0, pubs.longest_call()
    seen.wait_bodies(pubs.ok_bodies(), timeout=30)
    report(
        "SIGSTOP nsqd 3.5 s (heartbeat 1 s)",
        reader_stale_detected_s=reader_detect,
        writer_stale_detected_s=writer_detect,
        reader_reconnect_after_sigcont_s=reader_recovery,
        writer_first_ok_after_sigcont_s=writer_recovery,
        longest_pub_s=pubs.longest_call(),
        failed=pubs.failure_kinds(),
        duplicates=seen.duplicates(),
    )


# =========================================================================== 4. nsqlookupd down
def _lookupd_failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.name == "nsq_sync.reader" and "lookupd" in r.getMessage() and "query failed" in r.getMessage())


def _await_discovery(nsqds: List[NsqdProcess], lookupd: NsqlookupdProcess, count: int, connected: Callable[[], bool], timeout: float = 20.0) -> Tuple[float, float]:
    """Wait until *lookupd* lists *count* producers of TOPIC and *connected()* is true.

    Returns the monotonic times at which each was first seen (polled every 20 ms). nsqd
    re-registers with a lookupd that came back on its next lookupd command (a 15 s ping, or a
    topic/channel change): a new topic every 0.2 s nudges it, so the wait stays short.
    """
    registered_at = connected_at = None
    next_nudge = 0.0
    nudges = 0
    deadline = time.monotonic() + timeout
    while registered_at is None or connected_at is None:
        now = time.monotonic()
        assert now < deadline, f"after {timeout}s: registered={registered_at is not None} connected={connected_at is not None}"
        if connected_at is None and connected():
            connected_at = now
        if registered_at is None:
            try:
                if len(lookupd.lookup(TOPIC)) >= count:
                    registered_at = now
            except Exception:
                pass
            if registered_at is None and now >= next_nudge:
                for nsqd in nsqds:
                    nsqd.create_topic(f"nudge{nudges}")
                nudges += 1
                next_nudge = now + 0.2
        time.sleep(0.02)  # polling lookupd and the Reader's connection set, against the deadline above
    return registered_at, connected_at


class StuckPublishers:
    """4 threads, each one 4 MB MPUB (under nsqd's 5 MiB --max-body-size) through a path whose
    way up is stalled: 16 MB cannot all fit in the socket buffers, so some publish blocks in
    its write while the others wait behind it. Records each outcome and how long it took."""

    BODY = [b"x" * 1_000_000] * 4

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.outcomes: List[Any] = []
        self.took: List[float] = []
        self.threads = [threading.Thread(target=self._publish, name=f"test-mpub-{i}") for i in range(4)]
        for thread in self.threads:
            thread.start()

    def _publish(self) -> None:
        began = time.monotonic()
        try:
            self.outcomes.append(self.writer.mpub(TOPIC, self.BODY))
        except Exception as exc:
            self.outcomes.append(exc)
        self.took.append(time.monotonic() - began)

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a publish stuck in its write still hangs"


def stalled_writer(proxy: TcpProxy, clients: Clients, publish_timeout: float) -> Writer:
    """A Writer through *proxy*, connected and with one publish done; then the path up stalls."""
    writer = clients.writer(proxy.address, publish_timeout=publish_timeout)
    assert writer.wait_connected(5)
    assert writer.pub(TOPIC, b"before") == b"OK"
    proxy.stall("up")
    return writer


def test_a_publish_stuck_in_its_write_fails_after_about_its_timeout(nsqd: NsqdProcess, clients: Clients) -> None:
    """nsqd stops taking bytes: a publish blocked in its write fails after about its
    publish_timeout without progress (1 s here), not after two heartbeat intervals (60 s),
    and the Writer publishes again once the path is back."""
    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        writer = stalled_writer(proxy, clients, publish_timeout=1.0)
        conn = writer._connected[0]
        pubs = StuckPublishers(writer)
        pubs.join(30)
        # (a publish gives up at its timeout; the write it left goes on in a flush task, which
        # closes the connection once it made no progress for publish_timeout)
        assert conn.wait_closed(10)
        proxy.resume()
        # (b"OK": a publish whose bytes got through before the stall took hold)
        assert all(outcome == b"OK" or isinstance(outcome, (SendError, ConnectionClosedError, TimeoutError)) for outcome in pubs.outcomes), pubs.outcomes
        assert max(pubs.took) < 10, pubs.took  # (60 s, two heartbeat intervals, without the bound)
        assert isinstance(conn.error, SendError) and "no progress writing" in str(conn.error), repr(conn.error)
        wait_until(lambda: writer.pub(TOPIC, b"after") == b"OK", timeout=10, message="a publish on a new connection")


def test_close_is_bounded_while_a_publish_is_stuck_in_its_write(nsqd: NsqdProcess, clients: Clients) -> None:
    """A publish blocked in its write holds the connection's write lock. close(1) closes the
    socket under it after its timeout instead of waiting for that write (until the stall is
    detected: two heartbeat intervals, 60 s here); every publish fails, typed, none hangs."""
    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        writer = stalled_writer(proxy, clients, publish_timeout=120)
        conn = writer._connected[0]
        pubs = StuckPublishers(writer)
        wait_until(lambda: conn._write_lock.locked() and len(conn._writes) > 0, timeout=30, interval=0.01,
                   message="a publish blocked in its write while another waits behind it")
        began = time.monotonic()
        writer.close(1.0)
        closed_after = time.monotonic() - began
        pubs.join(10)
    assert closed_after < 10, closed_after  # (60 s without the bound)
    # (ClosedError: a publish that began after close() did; b"OK": one whose bytes got through
    # before the proxy's stall took hold, as in the test above)
    assert len(pubs.outcomes) == 4, pubs.outcomes
    assert all(outcome == b"OK" or isinstance(outcome, (SendError, ConnectionClosedError, ClosedError)) for outcome in pubs.outcomes), pubs.outcomes


def test_close_with_large_async_publishes_queued_to_a_frozen_nsqd_is_bounded(nsqd: NsqdProcess, clients: Clients) -> None:
    """nsqd frozen (SIGSTOP) with four 4 MB mpub_async queued, more than the socket buffers take:
    close(1) returns within about its timeout (it took 20-60 s: its final drain wrote everything
    queued, each send bounded only by publish_timeout, restarted by any progress). The publishes
    it could not send fail: ClosedError for those never started (they did not land),
    ConnectionClosedError for those sent or cut short (unknown); nothing succeeds."""
    writer = clients.writer(nsqd.tcp_address)  # publish_timeout 10
    assert writer.wait_connected(5)
    nsqd.pause()
    try:
        futures = [writer.mpub_async(TOPIC, StuckPublishers.BODY) for _ in range(4)]
        began = time.monotonic()
        writer.close(1.0)
        took = time.monotonic() - began
        errors = [future.exception(5) for future in futures]
    finally:
        nsqd.resume()
    report("close with 16 MB queued to a frozen nsqd", close_s=took, errors=[type(e).__name__ for e in errors])
    assert took < 5, took
    assert all(isinstance(error, (ClosedError, ConnectionClosedError)) for error in errors), errors
    # never started: the last ones queued, after every one that may have gone out
    unknown = [not isinstance(error, ClosedError) for error in errors]
    assert unknown == sorted(unknown, reverse=True), errors
    # what ClosedError says did not land did not: at most the others' messages reach nsqd
    wait_until(lambda: nsqd.topic_stats(TOPIC) is not None or sum(unknown) == 0, timeout=10, message="nsqd answers again")
    stats = nsqd.topic_stats(TOPIC)
    assert (stats["message_count"] if stats else 0) <= 4 * sum(unknown), (stats, errors)


def test_publishes_to_a_frozen_nsqd_honour_their_timeouts(nsqd: NsqdProcess, clients: Clients) -> None:
    """nsqd frozen (SIGSTOP) and 4 MB publishes, more than the socket buffers take. Blocking
    mpub(timeout=1) from three threads each fail with TimeoutError at about 1 s (the one that
    wrote the others' queued bytes took 30 s), mpub_async(timeout=1) returns at once (it wrote
    for 10 s first) and its Future fails by its timeout; the connection closes as stalled
    about publish_timeout (2 s) after the write's last progress (the count restarted with each
    send() that took a few bytes: several times the limit)."""
    writer = clients.writer(nsqd.tcp_address, publish_timeout=2.0)
    assert writer.wait_connected(5)
    conn = writer._connected[0]
    nsqd.pause()
    try:
        outcomes: List[Any] = []
        took: List[float] = []

        def publish() -> None:
            began = time.monotonic()
            try:
                outcomes.append(writer.mpub(TOPIC, StuckPublishers.BODY, timeout=1.0))
            except Exception as exc:
                outcomes.append(exc)
            took.append(time.monotonic() - began)

        threads = [threading.Thread(target=publish, name=f"test-mpub-{i}") for i in range(3)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        returned: List[float] = []
        futures = []
        for _ in range(2):
            began = time.monotonic()
            futures.append(writer.mpub_async(TOPIC, StuckPublishers.BODY, timeout=1.0))
            returned.append(time.monotonic() - began)
        async_errors = [future.exception(10) for future in futures]
        closed = conn.wait_closed(10)
        stalled_after = time.monotonic() - started
    finally:
        nsqd.resume()
    report("publishes to a frozen nsqd", blocking_s=max(took), async_return_s=max(returned), stall_closed_s=stalled_after)
    assert len(outcomes) == 3 and all(isinstance(outcome, TimeoutError) for outcome in outcomes), outcomes
    assert max(took) < 2.5, took
    assert max(returned) < 0.5, returned
    assert all(isinstance(error, (TimeoutError, ConnectionClosedError)) for error in async_errors), async_errors
    assert closed and isinstance(conn.error, SendError) and "no progress writing" in str(conn.error), repr(conn.error)
    # the write's last progress came before the blocking publishes timed out (1 s): closed as
    # stalled 2 s after it
    assert stalled_after < 1 + 2 + 1.5, (stalled_after, took)


@contextlib.contextmanager
def _lookupd_down_and_its_nsqd() -> Iterator[Tuple[NsqlookupdProcess, NsqdProcess]]:
    """An nsqlookupd started once, then stopped (its ports kept for its next start()), and an
    nsqd running that registers with it once it is up."""
    with started(NsqlookupdProcess()) as lookupd:
        lookupd.stop()
        with started(NsqdProcess(lookupd_tcp_addresses=[lookupd.tcp_address])) as nsqd:
            yield lookupd, nsqd


def test_lookupd_down_at_start_reader_retries_discovery(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    with _lookupd_down_and_its_nsqd() as (lookupd, nsqd):
        bodies = [b"at-start-%d" % i for i in range(100)]
        prepare(nsqd, bodies)
        seen = Seen()
        reader = clients.reader(seen.handler, lookupd_http_addresses=[lookupd.http_address], lookupd_poll_interval=0.3, max_in_flight=10)
        reader.start()
        wait_until(lambda: _lookupd_failures(caplog) >= 3, timeout=10, message="three failed lookupd polls")
        assert reader.conns == {} and not reader.closed
        lookupd.start()
        up = time.monotonic()
        registered, found = _await_discovery([nsqd], lookupd, 1, lambda: nsqd.tcp_address in reader.conns)
        seen.wait_bodies(set(bodies))
        report(
            "nsqlookupd down at start",
            failed_polls_before=_lookupd_failures(caplog),
            lookupd_up_to_nsqd_registered_s=registered - up,
            lookupd_up_to_reader_connected_s=found - up,
        )


def test_lookupd_starting_after_the_reader_is_asked_again_within_seconds_not_a_poll_interval(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    # docker-compose start-up order, default lookupd_poll_interval (60 s): the Reader's first
    # poll failed and the next came a whole interval (plus jitter) later, so nothing was
    # consumed for over a minute although nsqlookupd was up a moment after the Reader.
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    with _lookupd_down_and_its_nsqd() as (lookupd, nsqd):
        bodies = [b"late-lookupd-%d" % i for i in range(20)]
        prepare(nsqd, bodies)
        seen = Seen()
        reader = clients.reader(seen.handler, lookupd_http_addresses=[lookupd.http_address], max_in_flight=10)
        assert reader.lookupd_poll_interval == 60
        reader.start()
        wait_until(lambda: reader.stats()["lookupd"][0]["failed_queries"] == 1, timeout=10, message="the first poll to fail")
        lookupd.start()
        up = time.monotonic()
        registered, found = _await_discovery([nsqd], lookupd, 1, lambda: nsqd.tcp_address in reader.conns)
        seen.wait_bodies(set(bodies))
        first = min(seen.times.values())
        (health,) = reader.stats()["lookupd"]
        report(
            "nsqlookupd up after the Reader (poll interval 60 s)",
            queries=health["queries"],
            lookupd_up_to_nsqd_registered_s=registered - up,
            lookupd_up_to_reader_connected_s=found - up,
            lookupd_up_to_first_message_s=first - up,
        )
        # retries 1 s and 2 s (x 1.3 at most) after the failure; the second covers a first
        # answer that came before nsqd had registered
        assert found - up < 6, found - up
        assert health["failed_queries"] == 0 and health["producers"] == 1 and "connection refused" in health["last_error"]
        assert 2 <= health["queries"] <= 3


def test_lookupd_down_during_run_keeps_connections_and_finds_new_nodes(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    with started(LocalCluster(nsqd_count=1)) as cluster:
        first = cluster.nsqds[0]
        prepare(first, [b"first-%d" % i for i in range(50)])
        cluster.wait_for_producers(TOPIC, 1)
        seen = Seen()
        reader = clients.reader(seen.handler, lookupd_http_addresses=cluster.lookupd_http_addresses, lookupd_poll_interval=0.3, max_in_flight=10)
        reader.start()
        seen.wait_total(50)
        conn = reader.conns[first.tcp_address]

        cluster.lookupd.stop()
        down = time.monotonic()
        failures_before = _lookupd_failures(caplog)
        wait_until(lambda: _lookupd_failures(caplog) >= failures_before + 3, timeout=10, message="three failed lookupd polls")
        # the existing connection is kept and keeps delivering
        assert reader.conns.get(first.tcp_address) is conn and conn.connected()
        during = [b"during-%d" % i for i in range(50)]
        first.mpublish(TOPIC, during)
        seen.wait_bodies(set(during))

        with started(NsqdProcess(lookupd_tcp_addresses=cluster.lookupd_tcp_addresses)) as second:
            late = [b"second-%d" % i for i in range(50)]
            prepare(second, late)  # cannot register yet
            cluster.lookupd.start()
            up = time.monotonic()
            registered, found = _await_discovery([first, second], cluster.lookupd, 2, lambda: second.tcp_address in reader.conns)
            seen.wait_bodies(set(late))
            assert reader.conns.get(first.tcp_address) is conn, "the connection to the first nsqd was replaced"
            report(
                "nsqlookupd down during a run",
                lookupd_down_s=up - down,
                failed_polls=_lookupd_failures(caplog) - failures_before,
                lookupd_up_to_registered_s=registered - up,
                lookupd_up_to_new_node_connected_s=found - up,
            )


def _lookupd_queries(reader: Reader) -> int:
    (health,) = reader.stats()["lookupd"]
    return int(health["queries"])


@contextlib.contextmanager
def _discovered_and_consuming(clients: Clients, seen: Seen) -> Iterator[Tuple[NsqlookupdProcess, NsqdProcess, Reader]]:
    """One nsqlookupd, one nsqd registered with it, and a Reader polling it every 30 s (plus
    jitter) that has consumed a first batch from that nsqd."""
    with started(NsqlookupdProcess()) as lookupd, started(NsqdProcess(lookupd_tcp_addresses=[lookupd.tcp_address], extra_args=DURABLE_ARGS)) as nsqd:
        first = [b"before-%d" % i for i in range(20)]
        prepare(nsqd, first)
        wait_until(lambda: lookupd.lookup(TOPIC), timeout=10, message="nsqd registered with nsqlookupd")
        reader = clients.reader(seen.handler, lookupd_http_addresses=[lookupd.http_address], lookupd_poll_interval=30, max_in_flight=10)
        reader.start()
        seen.wait_bodies(set(first))
        yield lookupd, nsqd, reader


def _lose(reader: Reader, nsqd: NsqdProcess, cause: Callable[[], Any]) -> int:
    """Run *cause*, which ends the Reader's connection to *nsqd*, and wait for the early query
    that close triggers; returns the number of queries so far."""
    old = reader.conns[nsqd.tcp_address]
    queries = _lookupd_queries(reader)
    cause()
    wait_until(old.closed, timeout=10, message="the connection to close")
    wait_until(lambda: _lookupd_queries(reader) > queries, timeout=10, message="the early query after the close")
    return _lookupd_queries(reader)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_discovered_nsqd_back_from_a_restart_is_found_again_within_seconds_not_a_poll_interval(clients: Clients, how: str) -> None:
    # User review, nsqd down ~2 s: the close triggered one query while nsqd was still down
    # (nsqlookupd no longer listed it), the next came a whole poll interval later: consuming
    # resumed 61-70 s after nsqd was back (lookupd_poll_interval 60 s). Here 30 s.
    seen = Seen()
    with _discovered_and_consuming(clients, seen) as (lookupd, nsqd, reader):
        queries = _lose(reader, nsqd, getattr(nsqd, how))
        assert nsqd.tcp_address not in reader.conns  # (that query found it down)
        nsqd.start()  # same ports and data directory; it registers with nsqlookupd as it starts
        up = time.monotonic()
        after = [b"after-%d" % i for i in range(20)]
        nsqd.mpublish(TOPIC, after)
        wait_until(lambda: nsqd.tcp_address in reader.conns, timeout=15, message="the Reader to find the restarted nsqd")
        found = time.monotonic()
        seen.wait_bodies(set(after))
        report(f"discovered nsqd back ({how}, poll interval 30 s)", up_to_connected_s=found - up, up_to_first_after_s=min(seen.times[b] for b in after) - up, queries_since_the_early_one=_lookupd_queries(reader) - queries)
        # retries 1, 2, 4 s (x 1.3 at most) after the early query
        assert found - up < 6, found - up
        assert _lookupd_queries(reader) - queries <= 3


def test_a_discovered_nsqd_whose_first_connect_failed_is_tried_again_within_seconds_not_a_poll_interval(clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    # User review: a Reader's first attempt to an nsqd it found through nsqlookupd failed (nsqd
    # frozen 2 s as the Reader started: the handshake timed out; or restarting at that moment),
    # and the nsqd was tried again only at the next poll: consuming began 60-78 s later (poll
    # interval 60 s). (A refused attempt: test_reader_fake.py, a schedule started once.)
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    seen = Seen()
    with started(NsqlookupdProcess()) as lookupd, started(NsqdProcess(lookupd_tcp_addresses=[lookupd.tcp_address], extra_args=DURABLE_ARGS)) as nsqd:
        bodies = [b"first-connect-%d" % i for i in range(20)]
        prepare(nsqd, bodies)
        wait_until(lambda: lookupd.lookup(TOPIC), timeout=10, message="nsqd registered with nsqlookupd")
        reader = clients.reader(seen.handler, lookupd_http_addresses=[lookupd.http_address], max_in_flight=10)
        assert reader.lookupd_poll_interval == 60
        nsqd.pause()  # nsqlookupd still lists it; its kernel accepts connections, nothing answers
        reader.start()
        failure = f"{reader.name}: cannot consume from {nsqd.tcp_address}"
        wait_until(lambda: any(r.getMessage().startswith(failure) for r in caplog.records), timeout=10, message="the first attempt to time out")
        nsqd.resume()
        up = time.monotonic()
        wait_until(lambda: nsqd.tcp_address in reader.conns, timeout=15, message="the Reader to connect to the nsqd")
        found = time.monotonic()
        seen.wait_bodies(set(bodies))
        report("discovered nsqd frozen at the first connect (poll interval 60 s)", up_to_connected_s=found - up, queries=_lookupd_queries(reader))
        # the early query right after the failure, then retries 1, 2 s (x 1.3 at most)
        assert found - up < 6, found - up
        assert _lookupd_queries(reader) <= 4


def test_after_a_topic_delete_new_messages_are_consumed_within_seconds_not_a_poll_interval(clients: Clients) -> None:
    # User review: deleting the topic makes nsqd close its consumers and unregister the topic
    # from nsqlookupd; new messages re-create it, but the Reader asked once right after the
    # close and then waited the poll interval: new messages waited 62 s (interval 60 s).
    seen = Seen()
    with _discovered_and_consuming(clients, seen) as (lookupd, nsqd, reader):
        def delete() -> None:
            status, body = nsqd.http_request("POST", f"/topic/delete?topic={TOPIC}")
            assert status == 200, body

        queries = _lose(reader, nsqd, delete)
        assert not lookupd.lookup(TOPIC)
        fresh = [b"fresh-%d" % i for i in range(20)]
        nsqd.mpublish(TOPIC, fresh)  # re-creates the topic; nsqd registers it again
        published = time.monotonic()
        seen.wait_bodies(set(fresh), timeout=15)
        took = min(seen.times[b] for b in fresh) - published
        report("topic deleted (poll interval 30 s)", published_to_first_consumed_s=took, queries_since_the_early_one=_lookupd_queries(reader) - queries)
        assert took < 6, took
        assert _lookupd_queries(reader) - queries <= 3


# =========================================================================== 5. TCP path faults (proxy)
@pytest.mark.parametrize("abort", [True, False], ids=["rst", "fin"])
def test_path_cut_mid_frame_reader_recovers_without_loss_or_double_answer(nsqd: NsqdProcess, clients: Clients, abort: bool) -> None:
    bodies = [b"cut-%05d-" % i + b"x" * 100 for i in range(3000)]
    prepare(nsqd, bodies)
    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        seen = Seen()
        reader = clients.reader(seen.handler, nsqd_tcp_addresses=proxy.address, max_in_flight=10, heartbeat_interval=1, msg_timeout=1)
        reader.start()
        seen.wait_total(300)
        first = proxy.links[0]
        old_conn = reader.conns[proxy.address]
        cut_at = time.monotonic()
        cut_mid_frame(proxy, first, abort)
        proxy.wait_closed(first)
        assert old_conn.wait_closed(5)
        detection = time.monotonic() - cut_at
        _, partial = server_frames(first.sent_down)
        assert partial > 0, "the cut did not fall inside a frame"
        proxy.wait_links(2)
        wait_until(lambda: proxy.address in reader.conns and reader.conns[proxy.address] is not old_conn, timeout=10, interval=0.005, message="reconnected")
        recovery = time.monotonic() - cut_at
        # every message is consumed at least once (in-flight ones on the dead link come back after msg_timeout)
        seen.wait_bodies(set(bodies), timeout=40)
        wait_until(lambda: drained(nsqd), timeout=15, message="channel drained")
        fins, reqs = assert_one_answer_per_delivery(proxy.links)
        assert isinstance(old_conn.error, ConnectionClosedError), repr(old_conn.error)
        report(
            f"path cut mid-frame ({'RST' if abort else 'FIN'})",
            detection_s=detection,
            reconnected_s=recovery,
            error=type(old_conn.error).__name__,
            partial_frame_bytes=partial,
            fins=fins,
            reqs=reqs,
            duplicates=seen.duplicates(),
        )


@pytest.mark.parametrize("new_connections", [False, True], ids=["old-path", "whole-path"])
def test_path_stalled_is_detected_as_stale_and_recovers(nsqd: NsqdProcess, clients: Clients, new_connections: bool) -> None:
    nsqd.create_channel(TOPIC, CHANNEL)
    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        seen = Seen()
        reader = clients.reader(seen.handler, nsqd_tcp_addresses=proxy.address, max_in_flight=10, heartbeat_interval=1, timeout=1, msg_timeout=1)
        reader.start()
        writer = clients.writer(proxy.address, publish_timeout=1.0, heartbeat_interval=1, timeout=1)
        assert writer.wait_connected(5)
        wait_until(lambda: proxy.address in reader.conns, timeout=10, message="the Reader connected")
        old_reader_conn = reader.conns[proxy.address]
        old_writer_conn = writer.conns[proxy.address]
        pubs = Publishers(writer, threads=2).start()
        try:
            pubs.wait_ok(100)
            stalled_at = time.monotonic()
            proxy.stall(new_connections=new_connections)
            assert old_reader_conn.wait_closed(6) and old_writer_conn.wait_closed(6)
            detection = time.monotonic() - stalled_at
            if new_connections:
                # the whole path is dead: handshakes time out until it comes back (time is the fault)
                remaining = 4.0 - (time.monotonic() - stalled_at)
                if remaining > 0:
                    time.sleep(remaining)
                proxy.resume()
            healed = time.monotonic()
            wait_until(
                lambda: proxy.address in reader.conns and reader.conns[proxy.address] is not old_reader_conn,
                timeout=15,
                interval=0.005,
                message="the Reader on a new connection",
            )
            reader_recovery = time.monotonic() - healed
            pubs.wait(lambda: any(start >= healed for _, start, _ in pubs.ok), 15, "an OK publish on the new path")
            writer_recovery = min(end for _, start, end in pubs.ok if start >= healed) - healed
            pubs.wait_ok(pubs.ok_count() + 100)
        finally:
            pubs.stop()
        assert isinstance(old_reader_conn.error, StaleConnectionError), repr(old_reader_conn.error)
        assert isinstance(old_writer_conn.error, StaleConnectionError), repr(old_writer_conn.error)
        assert detection < 3.5, detection
        assert not pubs.untyped_failures()
        assert pubs.longest_call() < 3.0, pubs.longest_call()
        frames_ok = sum(ok_frames(link) for link in proxy.links)
        assert pubs.ok_count() <= frames_ok
        seen.wait_bodies(pubs.ok_bodies(), timeout=30)
        assert_one_answer_per_delivery(proxy.links)
        report(
            f"path stalled ({'new connections too' if new_connections else 'existing connections'})",
            stale_detected_s=detection,
            reader_reconnect_s=reader_recovery,
            writer_first_ok_s=writer_recovery,
            longest_pub_s=pubs.longest_call(),
            failed=pubs.failure_kinds(),
            duplicates=seen.duplicates(),
        )


@pytest.mark.parametrize("stall_s", [0.6, 3.0])
def test_stream_stalled_in_the_middle_of_a_large_message(nsqd: NsqdProcess, clients: Clients, stall_s: float) -> None:
    """Bytes stop in the middle of a 200 KB message frame: shorter than 2 heartbeats, the frame
    completes intact on the same connection; longer, the connection is stale and the message comes back."""
    bodies = [bytes([65 + i]) * 200_000 for i in range(3)]
    prepare(nsqd, bodies)
    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        seen = Seen()
        gate = threading.Event()
        got_first = threading.Event()

        def handler(message: Message) -> bool:
            seen.add(message)
            if not got_first.is_set():
                got_first.set()
                gate.wait(10)  # RDY 1: nsqd sends nothing more until this one is answered
            return True

        reader = clients.reader(handler, nsqd_tcp_addresses=proxy.address, max_in_flight=1, heartbeat_interval=1, timeout=1, msg_timeout=2)
        reader.start()
        assert got_first.wait(10)
        link = proxy.links[0]
        conn = reader.conns[proxy.address]
        # the stream is idle (a heartbeat at most): hold it 100 KB into the next 200 KB message frame
        proxy.stall_after(100_000, "down", link=link)
        gate.set()
        wait_until(lambda: link.down.stalled, timeout=10, interval=0.005, message="the stream held mid-frame")
        held_at = time.monotonic()
        frames, partial = server_frames(link.sent_down)
        assert partial > 0, "not held inside a frame"
        time.sleep(stall_s)  # the stall duration is the behaviour under test
        proxy.resume()
        seen.wait_bodies(set(bodies), timeout=30)
        if stall_s < 2.0:
            assert reader.conns.get(proxy.address) is conn and conn.connected(), "a short stall dropped the connection"
            assert len(proxy.links) == 1
            assert seen.duplicates() == 0
        else:
            assert conn.closed() and isinstance(conn.error, StaleConnectionError), repr(conn.error)
            assert len(proxy.links) >= 2
        assert all(body in bodies for body in seen.bodies())  # every body arrived intact
        wait_until(lambda: drained(nsqd), timeout=15, message="drained")
        assert_one_answer_per_delivery(proxy.links)
        report(
            f"stream held mid-frame {stall_s}s",
            partial_frame_bytes=partial,
            same_connection=len(proxy.links) == 1,
            error=type(conn.error).__name__ if conn.error else None,
            delivered_after_s=time.monotonic() - held_at,
        )


def test_path_delay_keeps_connections_and_loses_nothing(nsqd: NsqdProcess, clients: Clients) -> None:
    nsqd.create_channel(TOPIC, CHANNEL)
    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        seen = Seen()
        reader = clients.reader(seen.handler, nsqd_tcp_addresses=proxy.address, max_in_flight=50, heartbeat_interval=1, timeout=2)
        reader.start()
        writer = clients.writer(proxy.address, publish_timeout=5.0, heartbeat_interval=1, timeout=2)
        assert writer.wait_connected(5)
        wait_until(lambda: proxy.address in reader.conns, timeout=10, message="the Reader connected")
        proxy.set_delay(0.3)  # 0.3 s each way, on every chunk (frames split across chunks too)
        began = time.monotonic()
        pubs = Publishers(writer, threads=16).start()
        try:
            pubs.wait_ok(50, timeout=30)
            # longer than two heartbeat intervals under delay: nothing may be taken for stale
            wait_until(lambda: time.monotonic() - began > 3.0, timeout=10, interval=0.05, message="3 s under delay")
        finally:
            pubs.stop()
        seen.wait_bodies(pubs.ok_bodies(), timeout=30)
        with pubs.cond:
            latencies = sorted(end - start for _, start, end in pubs.ok)
        # The Reader's connection and the Writer's first one stay up. Sixteen threads also make
        # the Writer open lanes (extra connections, see Writer); it closes the ones left unused.
        assert not proxy.links[0].closed and not proxy.links[1].closed, f"a connection was dropped under delay: {proxy.links}"
        assert not pubs.failed, pubs.failure_kinds()
        assert latencies[0] >= 0.55, latencies[0]  # really delayed both ways
        report("path delayed 0.3 s each way", ok=pubs.ok_count(), min_pub_s=latencies[0], median_pub_s=latencies[len(latencies) // 2], duplicates=seen.duplicates())


@pytest.mark.parametrize("retries", [0, 1])
def test_path_cut_in_the_middle_of_a_pub_body(nsqd: NsqdProcess, clients: Clients, backend: str, retries: int) -> None:
    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        writer = clients.writer(proxy.address, retries=retries, publish_timeout=5)
        assert writer.pub(TOPIC, b"before") == b"OK"
        big = b"B" * 100_000
        proxy.cut_after(50_000, "up")  # the PUB line and half of the body reach nsqd, then RST
        began = time.monotonic()
        if retries:
            assert writer.pub(TOPIC, big) == b"OK"  # re-sent on a new connection: nsqd never had it
            outcome = "OK after re-send"
        else:
            with pytest.raises((ConnectionClosedError, SendError)) as info:
                writer.pub(TOPIC, big)
            outcome = type(info.value).__name__
        elapsed = time.monotonic() - began
        assert writer.pub(TOPIC, b"after") == b"OK"
        expected = [b"before", big, b"after"] if retries else [b"before", b"after"]
        found = read_back(nsqd, TOPIC, backend, len(expected))
        assert sorted(found) == sorted(expected), [len(b) for b in found]
        report(f"path cut mid-PUB body (retries={retries})", outcome=outcome, elapsed_s=elapsed, links=len(proxy.links))


def test_path_cut_in_the_middle_of_a_fin_redelivers_once(nsqd: NsqdProcess, clients: Clients) -> None:
    bodies = [b"fin-%d" % i for i in range(20)]
    prepare(nsqd, bodies)
    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        seen = Seen()
        target = bodies[5]
        cut_done = threading.Event()

        def handler(message: Message) -> bool:
            seen.add(message)
            if message.body == target and not cut_done.is_set():
                proxy.cut_after(3, "up")  # "FIN" then RST: nsqd never sees the id
                cut_done.set()
            return True

        reader = clients.reader(handler, nsqd_tcp_addresses=proxy.address, max_in_flight=1, msg_timeout=1)
        reader.start()
        seen.wait_bodies(set(bodies), timeout=30)
        # nsqd redelivers the target after msg_timeout (its scan may take ~6 s on a new channel)
        with seen.cond:
            assert seen.cond.wait_for(lambda: seen.counts[target] >= 2, 20), "the message whose FIN was cut never came back"
        wait_until(lambda: drained(nsqd), timeout=15, message="drained")
        assert_one_answer_per_delivery(proxy.links)
        assert seen.max_attempts[target] >= 2
        report("path cut mid-FIN", target_deliveries=seen.counts[target], attempts=seen.max_attempts[target], links=len(proxy.links))


# =========================================================================== 6. handler faults
def test_handler_exceptions_requeue_and_the_pool_stays_usable(nsqd: NsqdProcess, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    bodies = [b"exc-%03d" % i for i in range(150)]
    prepare(nsqd, bodies)
    seen = Seen()

    def handler(message: Message) -> bool:
        seen.add(message)
        index = int(message.body.split(b"-")[1])
        if index % 3 == 0 and message.attempts == 1:
            raise RuntimeError("handler failure for the test")
        if index % 5 == 0 and message.attempts == 1:
            raise ValueError("another failure")
        return True

    caplog.set_level(logging.ERROR, logger="nsq_sync")
    reader = clients.reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=20, concurrency=4)
    reader.start()
    seen.wait_bodies(set(bodies), timeout=30)
    failing = {b for b in bodies if int(b.split(b"-")[1]) % 3 == 0 or int(b.split(b"-")[1]) % 5 == 0}
    with seen.cond:
        assert seen.cond.wait_for(lambda: all(seen.counts[b] >= 2 for b in failing), 30)
    wait_until(lambda: drained(nsqd), timeout=15, message="drained")
    stats = reader.stats()
    assert stats["messages_requeued"] >= len(failing)
    assert stats["messages_finished"] >= len(bodies)
    tracebacks = [r for r in caplog.records if r.exc_info and "handler raised" in r.getMessage()]
    assert len(tracebacks) >= len(failing)
    channel = nsqd.channel_stats(TOPIC, CHANNEL) or {}
    report("handler exceptions", failing=len(failing), requeued=stats["messages_requeued"], requeue_count_nsqd=channel.get("requeue_count"))


def test_handler_that_never_returns_is_redelivered_and_workers_stay_usable(nsqd: NsqdProcess, clients: Clients) -> None:
    others = [b"ok-%03d" % i for i in range(60)]
    prepare(nsqd, [b"stuck"] + others)  # RDY 3: "stuck" and the next two arrive in one read
    seen = Seen()
    release = threading.Event()
    stuck_started = threading.Event()

    def handler(message: Message) -> bool:
        seen.add(message)
        if message.body == b"stuck" and message.attempts == 1:
            stuck_started.set()
            release.wait(45)  # "never" returns within the test, bounded so the worker ends
        return True

    reader = clients.reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=3, concurrency=3, msg_timeout=1)
    reader.start()
    try:
        assert stuck_started.wait(10)
        began = time.monotonic()

        def others_done() -> bool:
            stats = nsqd.channel_stats(TOPIC, CHANNEL) or {}
            # every other message handled AND finished at nsqd; at most the stuck one in flight
            return set(others) <= seen.bodies() and stats.get("depth") == 0 and stats.get("in_flight_count", 9) <= 1

        try:
            wait_until(others_done, timeout=20, interval=0.05, message="the other messages finished while one handler is stuck")
        finally:
            stats = nsqd.channel_stats(TOPIC, CHANNEL) or {}
            report(
                "handler that never returns",
                others_handled=len(set(others) & seen.bodies()),
                nsqd_depth=stats.get("depth"),
                nsqd_in_flight=stats.get("in_flight_count"),
                nsqd_timeouts=stats.get("timeout_count"),
                elapsed_s=time.monotonic() - began,
            )
        with seen.cond:  # nsqd redelivers the stuck one after msg_timeout (its scan: up to ~6 s)
            assert seen.cond.wait_for(lambda: seen.counts[b"stuck"] >= 2, 20), "nsqd never redelivered the stuck message"
        redelivered = time.monotonic() - began
        conn = reader.conns[nsqd.tcp_address]
        more = [b"more-%d" % i for i in range(20)]
        nsqd.mpublish(TOPIC, more)
        seen.wait_bodies(set(more), timeout=20)  # the workers left still serve the channel
        wait_until(lambda: drained(nsqd), timeout=15, message="drained while the handler is still stuck")
    finally:
        release.set()
    # the stuck copy finally returns: its FIN is late (E_FIN_FAILED, not fatal); the connection stays
    after = [b"after-%d" % i for i in range(10)]
    nsqd.mpublish(TOPIC, after)
    seen.wait_bodies(set(after), timeout=20)
    assert reader.conns.get(nsqd.tcp_address) is conn and conn.connected()
    report("handler that never returns: stuck message redelivered", redelivered_after_s=redelivered, attempts=seen.max_attempts[b"stuck"])


def test_handler_raising_a_base_exception_does_not_stall_the_rest_of_its_batch(backend: str) -> None:
    """Deterministic on the fake nsqd: five message frames in ONE write are one read, one batch."""
    handled: List[bytes] = []
    with FakeNsqd(strict=False) as fake:

        def handler(message: Message) -> bool:
            handled.append(message.body)
            if message.body == b"first":
                raise SystemExit("handler exits")  # not an Exception: the Reader does not catch it
            return True

        reader = Reader(TOPIC, CHANNEL, handler, nsqd_tcp_addresses=f"{fake.host}:{fake.port}", max_in_flight=10, concurrency=1, backend=backend)
        try:
            reader.start()
            fake.wait_for_command("RDY")
            bodies = [b"first", b"m1", b"m2", b"m3", b"m4"]
            fake.send_raw(b"".join(message_frame(b"%016d" % i, body) for i, body in enumerate(bodies)))
            try:
                fake.wait_until(lambda: sum(1 for c in fake.received if c.name == "FIN") >= 4, timeout=3, what="4 FINs")
                fins = 4
            except AssertionError:
                fins = sum(1 for c in fake.received if c.name == "FIN")
            report("handler raising SystemExit in a batch of 5", handled=len(handled), fins_sent=fins)
            assert handled == bodies, f"handlers ran for {handled} only"
            assert fins == 4, f"{fins} FINs reached nsqd for the 4 messages answered OK"
        finally:
            reader.close(2)


def test_close_is_bounded_with_a_handler_that_never_returns(nsqd: NsqdProcess, clients: Clients) -> None:
    prepare(nsqd, [b"forever"])
    release = threading.Event()
    entered = threading.Event()

    def handler(message: Message) -> bool:
        entered.set()
        release.wait(30)
        return True

    reader = clients.reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=1)
    reader.start()
    try:
        assert entered.wait(10)
        began = time.monotonic()
        reader.close(2)
        took = time.monotonic() - began
    finally:
        release.set()
    assert took < 6, f"close(2) took {took:.1f}s with a handler that never returns"
    report("close() with a handler that never returns", close_s=took)


@pytest.mark.parametrize("mode", ["finish-twice", "finish-then-false", "requeue-then-finish", "two-threads"])
def test_handler_answers_twice_only_one_answer_reaches_nsqd(nsqd: NsqdProcess, clients: Clients, mode: str) -> None:
    bodies = [b"twice-%d" % i for i in range(30)]
    prepare(nsqd, bodies)
    errors: List[BaseException] = []
    lock = threading.Lock()
    seen = Seen()

    def second(call: Callable[[], None]) -> None:
        try:
            call()
        except AlreadyRespondedError as exc:
            with lock:
                errors.append(exc)

    def handler(message: Message) -> Any:
        seen.add(message)
        if mode == "finish-twice":
            message.finish()
            second(message.finish)
            return True
        if mode == "finish-then-false":
            message.finish()
            return False  # already answered: the Reader must not requeue it
        if mode == "requeue-then-finish":
            if message.attempts == 1:
                message.requeue(delay=0, backoff=False)
                second(message.finish)
                return None
            return True
        message.enable_async()
        barrier = threading.Barrier(2)

        def race() -> None:
            barrier.wait(5)
            second(message.finish)

        racers = [threading.Thread(target=race, name=f"racer-{i}") for i in range(2)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(5)
        return None

    with TcpProxy(split(nsqd.tcp_address), record=True) as proxy:
        reader = clients.reader(handler, nsqd_tcp_addresses=proxy.address, max_in_flight=5, concurrency=2)
        reader.start()
        seen.wait_bodies(set(bodies), timeout=20)
        wait_until(lambda: drained(nsqd), timeout=15, message="drained")
        fins, reqs = assert_one_answer_per_delivery(proxy.links)
    stats = nsqd.channel_stats(TOPIC, CHANNEL) or {}
    expected_reqs = len(bodies) if mode == "requeue-then-finish" else 0
    assert reqs == expected_reqs and fins == len(bodies), (fins, reqs)
    assert stats.get("requeue_count") == expected_reqs
    expected_errors = 0 if mode == "finish-then-false" else len(bodies)
    assert len(errors) == expected_errors, len(errors)  # every second answer raised AlreadyRespondedError
    report(f"handler answers twice ({mode})", fins_on_wire=fins, reqs_on_wire=reqs, already_responded_errors=len(errors))


# =========================================================================== 7. oversize publish
def test_oversize_publish_fails_alone_not_the_publishes_behind_it(clients: Clients) -> None:
    with started(NsqdProcess(extra_args=["--max-msg-size=1024"])) as nsqd, TcpProxy(split(nsqd.tcp_address)) as proxy:
        # max_msg_size=None: the Writer's own check would refuse the body; nsqd's refusal is under test
        writer = clients.writer(proxy.address, retries=0, publish_timeout=5, max_msg_size=None)
        assert writer.pub(TOPIC, b"warm") == b"OK"
        proxy.stall("up")  # hold the client's bytes so that nsqd gets all of them at once, in order
        oversize = writer.pub_async(TOPIC, b"x" * 2000)
        behind = [writer.pub_async(TOPIC, b"small-%02d" % i) for i in range(50)]  # pipelined on the same connection
        proxy.resume()
        error = oversize.exception(10)
        assert isinstance(error, BadMessageError), repr(error)
        outcomes = collections.Counter("OK" if f.exception(10) is None else type(f.exception()).__name__ for f in behind)
        landed = nsqd.topic_depth(TOPIC)
        report("oversize PUB with 50 publishes behind it", oversize_error=type(error).__name__, behind=dict(outcomes), depth_after=landed)
        assert outcomes == {"OK": 50}, f"valid publishes failed because of another publish's oversize body: {dict(outcomes)} (nsqd depth {landed}: they never landed)"


def test_oversize_publish_gets_the_typed_rejection_while_more_is_written(clients: Clients) -> None:
    """nsqd rejects the body and resets the connection while the client still writes publishes
    behind it: the write fails, but the E_BAD_MESSAGE frame already received must still be read."""
    with started(NsqdProcess(extra_args=["--max-msg-size=1024"])) as nsqd:
        writer = clients.writer(nsqd.tcp_address, retries=0, publish_timeout=5, max_msg_size=None)
        assert writer.pub(TOPIC, b"warm") == b"OK"
        oversize = writer.pub_async(TOPIC, b"x" * 2000)
        behind = [writer.pub_async(TOPIC, b"small-%03d" % i) for i in range(300)]
        error = oversize.exception(10)
        outcomes = collections.Counter("OK" if f.exception(10) is None else type(f.exception()).__name__ for f in behind)
        report("oversize PUB, 300 written behind it", oversize_error=repr(error)[:120], behind=dict(outcomes))
        assert isinstance(error, BadMessageError), repr(error)
        assert "Errno" not in str(error)


def test_oversize_publish_is_refused_before_sending(nsqd: NsqdProcess, clients: Clients) -> None:
    """The Writer knows nsqd's default limits: an oversize body is a ConfigError and nothing is sent."""
    writer = clients.writer(nsqd.tcp_address, retries=0, publish_timeout=5)
    assert writer.pub(TOPIC, b"warm") == b"OK"
    for call in (
        lambda: writer.pub(TOPIC, b"x" * (1024 * 1024 + 1)),
        lambda: writer.pub_async(TOPIC, b"x" * (1024 * 1024 + 1)),
        lambda: writer.mpub(TOPIC, [b"ok", b"x" * (1024 * 1024 + 1)]),
        lambda: writer.mpub(TOPIC, [b"y" * (1024 * 1024)] * 6),
    ):
        with pytest.raises(ConfigError):
            call()
    assert nsqd.topic_depth(TOPIC) == 1
    assert writer.pub(TOPIC, b"after") == b"OK"


def test_a_reader_behind_a_backlog_keeps_one_read_offer_per_connection_and_drops_a_closed_ones(nsqd: NsqdProcess, clients: Clients) -> None:
    """Thread backend: after each read the reader task offers the next one to whichever worker
    runs out of work. Behind a backlog no worker does, and the offers piled up (about 100 a
    second, for as long as the backlog lasted), each holding its connection: a connection cut
    meanwhile stayed in memory with its 256 KiB read buffer and its messages. One offer per
    connection now, withdrawn when it closes."""
    nsqd.create_channel(TOPIC, CHANNEL)
    nsqd.mpublish(TOPIC, [b"m%d" % n for n in range(4000)])
    handled = itertools.count(1)
    milestones = {200: threading.Event(), 400: threading.Event()}

    def handler(message: Message) -> bool:
        time.sleep(0.002)  # (work: the four workers stay behind the backlog)
        count = next(handled)
        if count in milestones:
            milestones[count].set()
        return True

    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        reader = clients.reader(handler, nsqd_tcp_addresses=proxy.address, max_in_flight=50, concurrency=4)
        reader.start()
        assert milestones[200].wait(30)
        lane = reader._pool.messages
        first = next(iter(reader.conns.values()))
        assert len(lane._lead_jobs) <= 1, f"{len(lane._lead_jobs)} read offers queued for one connection"
        proxy.cut()
        # (wait_closed, not "not connected": the state changes before the close withdraws the offer)
        assert first.wait_closed(10), "the cut connection did not close"
        assert first not in lane._lead_jobs, "a closed connection is still offered for reading"
        wait_until(lambda: any(conn is not first for conn in reader.conns.values()), timeout=10, message="a new connection")
        assert milestones[400].wait(30)
        assert first not in lane._lead_jobs
        assert len(lane._lead_jobs) <= 1, f"{len(lane._lead_jobs)} read offers queued for one connection"


@pytest.mark.parametrize("compression", ["deflate", "snappy"])
def test_a_compressed_write_that_times_out_part_way_is_never_sent_again(nsqd: NsqdProcess, clients: Clients, compression: str) -> None:
    """A compressed stream is written whole; its write timing out after part of a command
    went out was taken for "no room yet" and the whole command compressed and sent again
    behind the cut first copy: nsqd stored a body with the next command's bytes in it, or the
    message twice, or refused the stream. It is a stall now: the connection goes, the
    publish fails typed, and nsqd stores nothing of it."""
    import random
    import socket

    topic = f"whole_{compression}"
    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        writer = clients.writer(proxy.address, publish_timeout=1.0, max_msg_size=None, **{compression: True})
        assert writer.wait_connected(5)
        assert writer.pub(topic, b"warm") == b"OK"
        conn = writer._connected[0]
        link = proxy.links[0]
        conn._raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # (the write stops early)
        body = random.Random(7).randbytes(1_000_000)  # incompressible: about as long on the wire
        given: List[int] = []
        sendall = conn._stream.sendall

        def counted(data: Any) -> None:
            given.append(len(data))
            sendall(data)

        conn._stream.sendall = counted
        proxy.stall("up")
        outcome: List[Any] = []
        publisher = threading.Thread(target=lambda: outcome.append(_outcome_of(lambda: writer.pub(topic, body))), name="test-pub")
        publisher.start()
        publisher.join(30)
        assert not publisher.is_alive()
        assert isinstance(outcome[0], (SendError, ConnectionClosedError, TimeoutError)), outcome  # (the publish's timeout and the stall limit are both 1 s)
        assert conn.wait_closed(10)
        assert isinstance(conn.error, SendError) and "no progress writing" in str(conn.error), repr(conn.error)
        assert [size for size in given if size > len(body)] == [len(body) + len(f"PUB {topic}\n") + 4], given  # compressed once
        proxy.resume()  # nsqd gets the cut first copy, then the end of the stream
        proxy.wait_closed(link)
    stats = nsqd.topic_stats(topic)
    assert stats is not None and stats["message_count"] == 1, stats  # only "warm"


def _outcome_of(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:
        return exc


@pytest.mark.parametrize("compression", ["deflate", "snappy"])
def test_close_is_bounded_with_a_large_compressed_write_to_an_nsqd_not_reading(nsqd: NsqdProcess, compression: str, backend: str) -> None:
    """A compressed (or TLS) stream is written whole, so close()'s final write of a large
    request queued behind an unanswered one could not stop at the deadline between slices:
    close(1) waited for the stall limit, two heartbeat intervals (10 s here, 60 s by default).
    The socket is now closed under that write at the deadline; both requests fail as
    connection errors (their outcome unknown)."""
    import random
    import socket

    from nsq_sync.protocol import commands

    with TcpProxy(split(nsqd.tcp_address)) as proxy:
        conn = AsyncConn("127.0.0.1", proxy.port, heartbeat_interval=5, backend=backend, **{compression: True})
        conn.connect()
        try:
            assert conn.request(commands.pub(TOPIC, b"warm")).result(5) == b"OK"
            conn._raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            proxy.stall("up")
            first = conn.request(commands.pub(TOPIC, b"x"))  # written; its answer never comes
            second = conn.request(commands.pub(TOPIC, random.Random(1).randbytes(1_000_000)))  # queued behind it
            assert len(conn._writes) == 1
            began = time.monotonic()
            conn.close(1.0)
            took = time.monotonic() - began
            assert took < 5, f"close(1.0) took {took:.1f} s"  # (10 s, the stall limit, before)
            for future in (first, second):
                assert isinstance(future.exception(5), ConnectionClosedError), future.exception(0)
        finally:
            conn.close(1.0)

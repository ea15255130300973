"""Reader against real nsqd/nsqlookupd v1.3.0: discovery, volume, failures, slow handlers,
topology changes, max_in_flight, SIGTERM and a clean close.

Every Reader is made with ``backend=backend`` (thread, or gevent when the suite runs with
NSQ_SYNC_BACKEND=gevent in its own monkey-patched process). Assertions are about what nsqd
records in ``/stats`` and what the handlers saw.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List

import pytest

from nsq_sync.backoff import ExponentialBackoff
from nsq_sync.pytest_plugin import started
from nsq_sync.reader import Reader
from nsq_sync.testing import LocalCluster, NsqdProcess, wait_until

TOPIC = "reader_topic"
CHANNEL = "reader_channel"
TIMEOUT = 30.0


# ------------------------------------------------------------------ helpers
def live_tasks() -> List[str]:
    """Names of nsq_sync threads and greenlets still running."""
    names = [t.name for t in threading.enumerate() if "nsq_sync" in t.name and t.is_alive()]
    try:
        import gevent
    except ImportError:  # pragma: no cover
        return names
    for obj in gc.get_objects():
        if isinstance(obj, gevent.Greenlet) and not obj.dead and "nsq_sync" in str(getattr(obj, "name", "")):
            names.append(obj.name)
    return names


def prepare(nsqd: NsqdProcess, bodies: List[bytes], topic: str = TOPIC, channel: str = CHANNEL) -> None:
    """Create the channel (so nothing waits in the topic), then publish *bodies*."""
    nsqd.create_channel(topic, channel)
    for start in range(0, len(bodies), 2000):
        chunk = bodies[start : start + 2000]
        if chunk:
            nsqd.mpublish(topic, chunk)


def channel(nsqd: NsqdProcess, topic: str = TOPIC, name: str = CHANNEL) -> Dict[str, Any]:
    stats = nsqd.channel_stats(topic, name)
    assert stats is not None, f"{nsqd!r} has no channel {topic}/{name}"
    return stats


def drained(nsqd: NsqdProcess, topic: str = TOPIC) -> bool:
    stats = channel(nsqd, topic)
    return stats["depth"] == 0 and stats["in_flight_count"] == 0 and stats["deferred_count"] == 0


class Recorder:
    """Thread-safe record of what a handler saw; ``done`` is set when ``expected`` distinct bodies arrived."""

    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.bodies: Counter = Counter()
        self.expected = expected
        self.done = threading.Event()

    def add(self, body: bytes) -> None:
        with self.lock:
            self.bodies[body] += 1
            if len(self.bodies) >= self.expected:
                self.done.set()

    def wait(self, timeout: float = TIMEOUT) -> None:
        assert self.done.wait(timeout), f"got {len(self.bodies)} of {self.expected} distinct messages"


def _on(topic: str) -> Callable[..., Reader]:
    """make_reader's *cls* for a Reader of *topic* instead of TOPIC."""

    def make(_topic: str, channel: str, *args: Any, **kwargs: Any) -> Reader:
        return Reader(topic, channel, *args, **kwargs)

    return make


@pytest.fixture
def make_reader(backend: str) -> Iterator[Callable[..., Reader]]:
    readers: List[Reader] = []

    def make(*args: Any, cls: type = Reader, **kwargs: Any) -> Reader:
        kwargs.setdefault("backend", backend)
        reader = cls(TOPIC, CHANNEL, *args, **kwargs)
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close(10)
        assert reader.join(15)
    assert live_tasks() == []


# ----------------------------------------------------- (1) volume via lookupd
@pytest.mark.slow
def test_ten_thousand_messages_across_two_nsqd_found_through_lookupd(nsq_cluster: LocalCluster, make_reader: Callable[..., Reader]) -> None:
    count = 10_000
    bodies = [b"msg-%05d" % i for i in range(count)]
    for index, nsqd in enumerate(nsq_cluster.nsqds):
        prepare(nsqd, bodies[index::2])
    nsq_cluster.wait_for_producers(TOPIC, 2)
    seen = Recorder(count)
    reader = make_reader(
        lambda m: seen.add(m.body),
        lookupd_http_addresses=nsq_cluster.lookupd_http_addresses,
        max_in_flight=50,
        concurrency=8,
    )
    reader.start()
    seen.wait(60)
    stats = reader.stats()
    assert len(stats["connections"]) == 2
    assert max(c["rdy"] for c in stats["connections"]) <= 25
    reader.close()
    assert set(seen.bodies) == set(bodies)
    assert sum(seen.bodies.values()) == count  # no duplicates
    stats = reader.stats()
    assert stats["messages_finished"] == count and stats["messages_requeued"] == 0
    for nsqd in nsq_cluster.nsqds:
        wait_until(lambda: drained(nsqd), 10, message="channel drained")
        assert channel(nsqd)["message_count"] == count // 2


def test_stats_show_each_lookupd_answering_or_failing(nsq_cluster: LocalCluster, make_reader: Callable[..., Reader]) -> None:
    """stats()["lookupd"]: per nsqlookupd, its queries, failures in a row, last success and
    error, and how many nsqd it listed: an alert can fire on discovery that stopped working."""
    for nsqd in nsq_cluster.nsqds:
        nsqd.create_topic(TOPIC)
    nsq_cluster.wait_for_producers(TOPIC, 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there once the socket is closed
    live = nsq_cluster.lookupd_http_addresses[0]
    reader = make_reader(lambda m: None, lookupd_http_addresses=[live, dead], lookupd_poll_interval=0.1, lookupd_request_timeout=2)
    before = time.time()
    reader.start()

    def health() -> Dict[str, Dict[str, Any]]:
        return {entry["address"]: entry for entry in reader.stats()["lookupd"]}

    wait_until(lambda: health()[dead]["failed_queries"] >= 2 and health()[live]["queries"] >= 2, TIMEOUT, message="both lookupds asked twice")
    report = health()
    assert [entry["address"] for entry in reader.stats()["lookupd"]] == [live, dead]  # in the order given
    assert report[live]["failed_queries"] == 0 and report[live]["last_error"] is None
    assert report[live]["producers"] == 2
    assert before <= report[live]["last_success"] <= time.time()
    assert report[dead]["last_success"] is None and report[dead]["producers"] is None
    assert report[dead]["failed_queries"] == report[dead]["queries"]  # every query failed, in a row
    assert dead in report[dead]["last_error"]
    wait_until(lambda: len(reader.conns) == 2, TIMEOUT, message="both nsqd found through the live lookupd")
    assert make_reader(lambda m: None, nsqd_tcp_addresses=nsq_cluster.nsqd_tcp_addresses).stats()["lookupd"] == []


#: a name no resolver knows (RFC 2606): an nsqd announcing it is one a consumer cannot reach,
#: as with a Kubernetes pod name announced to consumers outside the cluster
UNRESOLVABLE = "nsqd-0.nsqd.default.svc.cluster.local.invalid"


def test_an_nsqd_announcing_an_address_this_host_cannot_resolve_is_in_stats_and_the_warning_says_so(
    nsq_cluster: LocalCluster, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: stats() showed one healthy connection while 50 messages sat for 90 s on an
    # nsqd whose --broadcast-address the consumer could not resolve; the warning did not say
    # where the address came from.
    good = nsq_cluster.nsqds[0]
    bad = nsq_cluster.add_nsqd(extra_args=[f"--broadcast-address={UNRESOLVABLE}"])
    good.create_topic(TOPIC)
    prepare(bad, [b"stuck-%d" % i for i in range(5)])
    nsq_cluster.wait_for_producers(TOPIC, 2)
    announced = f"{UNRESOLVABLE}:{bad.tcp_address.rsplit(':', 1)[1]}"
    (lookupd,) = nsq_cluster.lookupd_http_addresses
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    reader = make_reader(lambda m: None, lookupd_http_addresses=[lookupd], lookupd_poll_interval=0.5)
    reader.start()
    wait_until(lambda: reader.stats()["unreachable"] and reader.conns, TIMEOUT, message="the unreachable nsqd in stats()")
    stats = reader.stats()
    assert [c["address"] for c in stats["connections"]] == [good.tcp_address]
    (entry,) = stats["unreachable"]
    assert (entry["address"], entry["lookupd"]) == (announced, lookupd) and entry["failed_attempts"] >= 1, entry
    assert f"cannot connect to {announced}" in entry["last_error"], entry
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{reader.name}: cannot consume from {announced}: "))
    assert f"; nsqlookupd {lookupd} announced this address as that nsqd's broadcast address and TCP port: check that nsqd's --broadcast-address" in warning, warning
    assert channel(bad)["depth"] == 5  # (what the entry is about: messages nobody consumes)


def test_a_misspelled_topic_is_warned_about_and_the_end_of_it_said(
    nsq_cluster: LocalCluster, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: a Reader of "order" (the topic is "orders") logged only its INFO "starting"
    # line in 45 s; stats() showed no connection and no failed lookupd query.
    nsqd = nsq_cluster.nsqds[0]
    nsqd.publish(TOPIC, b"for the real topic")
    nsq_cluster.wait_for_producers(TOPIC, 1)
    typo = TOPIC[:-1]
    (lookupd,) = nsq_cluster.lookupd_http_addresses
    got = threading.Event()
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    reader = make_reader(lambda m: got.set(), cls=_on(typo), lookupd_http_addresses=[lookupd], lookupd_poll_interval=0.2)
    reader.no_producers_warn_after = 0.5
    reader.start()

    def said(what: str) -> List[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and what in r.getMessage()]

    wait_until(lambda: said("nothing to consume from for"), TIMEOUT, message="the warning")
    (warning,) = said("nothing to consume from for")
    assert f"nsqlookupd {lookupd} list no nsqd for topic {typo!r}. No nsqd has topic {typo!r} registered: a misspelled topic" in warning, warning
    stats = reader.stats()
    assert stats["connections"] == [] and stats["lookupd"][0]["failed_queries"] == 0 and stats["no_producers_since"] is not None
    nsqd.publish(typo, b"published after all")  # (nsqd registers the topic with nsqlookupd)
    assert got.wait(TIMEOUT)
    wait_until(lambda: said("with nothing to consume from"), TIMEOUT, message="the end said")
    assert said("with nothing to consume from")[0].startswith(f"{reader.name}: nsqlookupd {lookupd} lists 1 nsqd for it again, after ")
    assert reader.stats()["no_producers_since"] is None


# ----------------------------------------- (2) failures, retries, giving up
def test_failing_messages_come_back_with_more_attempts_then_are_given_up(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    good = [b"good-%d" % i for i in range(15)]
    bad = [b"bad-%d" % i for i in range(5)]
    prepare(nsqd, good + bad)
    lock = threading.Lock()
    attempts: Dict[bytes, List[int]] = {}
    given_up: Dict[bytes, int] = {}
    finished = threading.Event()

    def handler(message: Any) -> bool:
        with lock:
            attempts.setdefault(message.body, []).append(message.attempts)
        if message.body.startswith(b"bad"):
            raise RuntimeError("cannot process " + message.body.decode())
        return True

    class Recording(Reader):
        def giving_up(self, message: Any) -> None:
            with lock:
                given_up[message.body] = message.attempts
                if len(given_up) == len(bad):
                    finished.set()

    reader = make_reader(
        handler,
        cls=Recording,
        nsqd_tcp_addresses=nsqd.tcp_address,
        max_in_flight=5,
        max_tries=3,
        requeue_delay=0,
        backoff_strategy=ExponentialBackoff(multiplier=0.01, max_duration=0.05),
    )
    reader.start()
    assert finished.wait(TIMEOUT)
    wait_until(lambda: len([b for b in attempts if b.startswith(b"good")]) == len(good), 10, message="good messages")
    for body in bad:
        assert attempts[body] == [1, 2, 3]
        assert given_up[body] == 4
    for body in good:
        assert attempts[body] == [1]
    wait_until(lambda: drained(nsqd), 10, message="channel drained")
    stats = reader.stats()
    assert stats["messages_given_up"] == 5
    assert stats["messages_requeued"] == 15  # 5 bad messages x 3 failed attempts
    assert channel(nsqd)["requeue_count"] == 15
    # Whether the last results of the run were failures depends on delivery order: the
    # level still up then steps down one success at a time, so a few more good messages end it.
    more = [b"more-%d" % i for i in range(20)]  # more successes than failures can have raised the level
    nsqd.mpublish(TOPIC, more)
    wait_until(lambda: not reader.stats()["backing_off"], 10, message="backoff to end")


# ------------------------------------------- (3) slow handler vs heartbeats
def test_handler_slower_than_three_heartbeats_keeps_the_connection(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    prepare(nsqd, [b"slow"])
    beats = []
    closes = []
    done = threading.Event()
    never = threading.Event()

    class Watching(Reader):
        def heartbeat(self, conn: Any) -> None:
            beats.append(time.monotonic())

    def handler(message: Any) -> bool:
        never.wait(3.3)  # the handler's "work": 3+ heartbeat intervals (heartbeat_interval=1)
        done.set()
        return True

    reader = make_reader(handler, cls=Watching, nsqd_tcp_addresses=nsqd.tcp_address, heartbeat_interval=1)
    reader.start()
    wait_until(lambda: reader.conns, 10, message="a connection")
    (conn,) = reader.conns.values()
    conn.on("close", lambda conn: closes.append(conn))
    assert done.wait(TIMEOUT)
    wait_until(lambda: drained(nsqd), 10, message="message finished")
    assert len(beats) >= 2
    assert closes == [] and conn.connected()
    assert list(reader.conns.values()) == [conn]
    assert reader.stats()["messages_finished"] == 1
    assert channel(nsqd)["timeout_count"] == 0


def test_a_busy_consumer_reads_on_its_worker(nsqd: NsqdProcess, make_reader: Callable[..., Reader], backend: str, monkeypatch: Any) -> None:
    """Thread backend: once a worker has run a read's messages it reads the next itself
    (no hand-off from the reader task per read); gevent keeps reading on the reader greenlet."""
    from nsq_sync import conn as conn_module

    monkeypatch.setattr(conn_module, "LEAD_WAIT_SECONDS", 5.0)  # more messages always come: never give up
    led = []
    original = conn_module.AsyncConn._lead_read

    def lead_read(self: Any) -> bool:
        read = original(self)
        led.append(read)
        return read

    monkeypatch.setattr(conn_module.AsyncConn, "_lead_read", lead_read)
    count = 3000
    bodies = [b"busy-%05d" % i for i in range(count)]
    prepare(nsqd, bodies)
    seen = Recorder(count)
    reader = make_reader(lambda m: seen.add(m.body), nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=200)
    reader.start()
    seen.wait()
    reader.close()
    assert sum(seen.bodies.values()) == count and set(seen.bodies) == set(bodies)
    assert reader.stats()["messages_finished"] == count
    wait_until(lambda: drained(nsqd), 10, message="channel drained")
    assert (sum(led) > 0) == (backend == "thread"), led[:20]


def test_a_worker_stuck_in_a_handler_hands_reading_back(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """The worker that was reading blocks in a handler: the reader task takes reading back
    and a spare worker runs everything behind it, while the handler is still blocked."""
    others = [b"other-%04d" % i for i in range(500)]
    prepare(nsqd, [b"block"] + others)
    entered = threading.Event()
    release = threading.Event()
    seen = Recorder(len(others))

    def handler(message: Any) -> bool:
        if message.body == b"block":
            entered.set()
            assert release.wait(TIMEOUT)
        else:
            seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=20, concurrency=4)
    reader.start()
    try:
        assert entered.wait(TIMEOUT)
        seen.wait()
        assert not release.is_set()
        assert set(seen.bodies) == set(others)
    finally:
        release.set()
    wait_until(lambda: drained(nsqd), 10, message="channel drained")
    assert reader.stats()["messages_finished"] == len(others) + 1


def test_a_finished_message_is_not_redelivered_while_a_slow_handler_runs(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """One worker, msg_timeout 1 s: a quick message, then one whose handler runs until nsqd
    has counted the quick one finished (up to 10 s), then a third. The quick message's FIN
    may be held back for the others of its read, but not for the slow handler: nsqd has it
    at once, and delivers nothing twice."""
    prepare(nsqd, [b"quick", b"slow", b"last"])
    seen = Recorder(3)
    finished_during_slow: List[int] = []

    def finished() -> int:  # FINs nsqd counted (per client in /stats)
        return sum(client["finish_count"] for client in channel(nsqd)["clients"])

    def handler(message: Any) -> bool:
        if message.body == b"slow":
            try:
                wait_until(lambda: finished() >= 1, 10, message="the quick message's FIN at nsqd")
            finally:
                finished_during_slow.append(finished())
        seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=10, concurrency=1, msg_timeout=1)
    reader.start()
    seen.wait()
    wait_until(lambda: drained(nsqd), 10, message="channel drained")
    assert finished_during_slow == [1]
    assert seen.bodies == Counter({b"quick": 1, b"slow": 1, b"last": 1})
    stats = channel(nsqd)
    assert stats["timeout_count"] == 0 and stats["requeue_count"] == 0 and finished() == 3


#: topics of the tests that need nsqd to time messages out (scanning_nsqd)
BUSY_TOPIC = "reader_busy_topic"
HUNG_TOPIC = "reader_hung_topic"
KEPT_TOPIC = "reader_kept_topic"
PICKED_TOPIC = "reader_picked_topic"


@pytest.fixture(scope="module")
def scanning_nsqd(backend: str) -> Iterator[NsqdProcess]:
    """An nsqd that times messages out in the channels of BUSY_TOPIC, HUNG_TOPIC, KEPT_TOPIC and PICKED_TOPIC.

    nsqd looks for timed-out messages only in the channels it listed at its last refresh of
    the list, every 5 s (QueueScanRefreshInterval, not a flag): a fresh nsqd times nothing
    out for 5 s. So the channels are made first, then a probe message is left unanswered
    in a channel made after them, until nsqd delivers it again: from then on nsqd scans them
    all. (One nsqd for the module: that wait is paid once.)"""
    with started(NsqdProcess()) as nsqd:
        for topic in (BUSY_TOPIC, HUNG_TOPIC, KEPT_TOPIC, PICKED_TOPIC):
            nsqd.create_channel(topic, CHANNEL)
        prepare(nsqd, [b"probe"], topic="reader_scan_probe")
        attempts: List[int] = []

        def probe(message: Any) -> bool:
            attempts.append(message.attempts)
            if message.attempts == 1:
                message.enable_async()  # (left to time out)
            return True

        reader = Reader("reader_scan_probe", CHANNEL, probe, nsqd_tcp_addresses=nsqd.tcp_address, msg_timeout=1, backend=backend)
        reader.start()
        try:
            wait_until(lambda: reader.stats()["messages_finished"] == 1, TIMEOUT, message="nsqd timed the probe out")
        finally:
            reader.close(10)
        assert reader.join(15) and attempts == [1, 2]
        yield nsqd


def behind_one_worker(
    nsqd: NsqdProcess, make_reader: Callable[..., Reader], topic: str, bodies: List[bytes], handler_seconds: float, max_in_flight: int
) -> Dict[str, Any]:
    """Consume *bodies* from *topic* with one worker, handlers of *handler_seconds* and
    msg_timeout 1 s; assert that each ran once and nsqd timed none out; the Reader's stats()."""
    prepare(nsqd, bodies, topic=topic)
    seen = Recorder(len(bodies))

    def handler(message: Any) -> bool:
        time.sleep(handler_seconds)  # (the handler's work)
        seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=max_in_flight, concurrency=1, msg_timeout=1, cls=_on(topic))
    reader.start()
    seen.wait()
    wait_until(lambda: drained(nsqd, topic), TIMEOUT, message="channel drained")
    assert (seen.bodies, channel(nsqd, topic)["timeout_count"]) == (Counter({body: 1 for body in bodies}), 0)
    return reader.stats()


def test_messages_waiting_for_a_busy_worker_are_touched_and_run_once(scanning_nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """Prefetch deeper than one worker gets through within msg_timeout (a review's repro,
    scaled down): 6 in flight, 1 worker, 0.3 s handlers, msg_timeout 1 s. The fifth and
    sixth waited 1.2 and 1.5 s for the worker: nsqd timed them out and delivered them
    again, and messages ran twice. Messages waiting for a worker are touched while the
    worker gets through the others, so nsqd times nothing out and every message runs once."""
    nsqd = scanning_nsqd
    bodies = [b"job-%d" % n for n in range(8)]
    stats = behind_one_worker(nsqd, make_reader, BUSY_TOPIC, bodies, handler_seconds=0.3, max_in_flight=6)
    assert (stats["messages_expired"], stats["messages_received"], stats["messages_finished"]) == (0, len(bodies), len(bodies))
    assert stats["messages_touched_queued"] >= 3


def test_a_message_that_waited_for_the_worker_has_its_whole_msg_timeout_to_run(scanning_nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """Handlers of 0.7 x msg_timeout (1 s) behind one worker, 4 in flight: the fourth waits
    2.1 s. Waiting messages are touched every half msg_timeout, so a handler could start with
    half of it gone, and nsqd timed it out while it ran: messages ran twice (a chaos review:
    14 of 30). A message that waited is touched as the worker picks it up, so each handler
    has the whole msg_timeout: every message runs once and nsqd times nothing out."""
    nsqd = scanning_nsqd
    bodies = [b"job-%d" % n for n in range(4)]
    stats = behind_one_worker(nsqd, make_reader, PICKED_TOPIC, bodies, handler_seconds=0.7, max_in_flight=4)
    assert stats["messages_received"] == stats["messages_finished"] == len(bodies) and stats["messages_fin_failed"] == 0


def test_auto_touch_keeps_a_message_in_flight_through_a_job_longer_than_msg_timeout(
    scanning_nsqd: NsqdProcess, make_reader: Callable[..., Reader], quick_auto_touch: Callable[[], None]
) -> None:
    """One call that outlasts msg_timeout (1 s) two and a half times, inside
    ``message.auto_touch()``: nsqd times nothing out, the message runs once and its FIN is
    accepted. (Without it nsqd delivers the message again after 1 s: the fixture's probe.)"""
    nsqd = scanning_nsqd
    prepare(nsqd, [b"long job"], topic=KEPT_TOPIC)
    seen = Recorder(1)
    keepers: List[Any] = []

    def handler(message: Any) -> bool:
        keeper = message.auto_touch()  # (every 0.5 s: half of msg_timeout)
        keepers.append(keeper)
        with keeper:
            time.sleep(2.5)  # (the long job: one blocking call)
        seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=1, msg_timeout=1, cls=_on(KEPT_TOPIC))
    reader.start()
    seen.wait()
    wait_until(lambda: drained(nsqd, KEPT_TOPIC), TIMEOUT, message="channel drained")
    stats = reader.stats()
    assert (seen.bodies, channel(nsqd, KEPT_TOPIC)["timeout_count"], len(keepers)) == (Counter({b"long job": 1}), 0, 1)
    assert stats["messages_received"] == stats["messages_finished"] == 1 and stats["messages_fin_failed"] == 0
    assert keepers[0].touches >= 4


def test_messages_waiting_behind_a_hung_worker_are_not_touched_for_good(scanning_nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """The only worker hangs: the messages waiting for it are not kept touched (they would
    be held here for as long as the handler hangs). nsqd times them out again and again
    (here it sends them back to this Reader, which skips the old copies), and once the
    worker is freed every message runs."""
    nsqd = scanning_nsqd
    bodies = [b"job-%d" % n for n in range(4)]
    prepare(nsqd, bodies, topic=HUNG_TOPIC)
    release = threading.Event()
    hung: List[bytes] = []
    seen = Recorder(len(bodies))

    def handler(message: Any) -> bool:
        if not hung:
            hung.append(message.body)
            assert release.wait(TIMEOUT)
        seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=4, concurrency=1, msg_timeout=1, cls=_on(HUNG_TOPIC))
    reader.start()
    try:
        # Two rounds of nsqd's timeouts: by then touching has stopped (no handler started
        # for msg_timeout), and it stays stopped while the next round comes.
        wait_until(lambda: reader.stats()["messages_received"] >= 2 * len(bodies), TIMEOUT, message="nsqd's timeouts, twice")
        touched = reader.stats()["messages_touched_queued"]
        received = reader.stats()["messages_received"]
        wait_until(lambda: reader.stats()["messages_received"] >= received + len(bodies), TIMEOUT, message="another round")
        assert reader.stats()["messages_touched_queued"] == touched
        assert touched <= 2 * (len(bodies) - 1)  # (at most twice each, before the hang showed)
        assert channel(nsqd, HUNG_TOPIC)["timeout_count"] >= 2 * len(bodies)
    finally:
        release.set()
    seen.wait()
    wait_until(lambda: drained(nsqd, HUNG_TOPIC), TIMEOUT, message="channel drained")
    assert set(seen.bodies) == set(bodies)


def test_late_answers_across_an_nsqd_restart_are_reported_and_the_consumer_goes_on(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """docs/reader.md's batcher: messages taken with enable_async() and answered later from
    another thread. nsqd restarts while five are held: their finish() has no connection left.
    It returned nothing in pynsq; here it raised ConnectionClosedError, which killed the batcher
    thread, and the messages delivered after the reconnect were never answered."""
    import queue

    bodies = [b"held-%d" % n for n in range(5)]
    prepare(nsqd, bodies)
    work: "queue.Queue[Any]" = queue.Queue()

    def handle(message: Any) -> None:
        message.enable_async()
        work.put(message)

    reader = make_reader(handle, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=10)
    reader.start()
    held = [work.get(timeout=TIMEOUT) for _ in bodies]
    nsqd.restart()  # a graceful stop keeps the messages in flight: they come again
    again = [work.get(timeout=TIMEOUT) for _ in bodies]  # on the new connection: the old one is over
    assert sorted(m.body for m in again) == bodies
    assert [m.finish() for m in held] == [False] * 5  # lost with their connection: said, not raised
    assert all(m.has_responded() for m in held)
    assert [m.finish() for m in again] == [True] * 5
    nsqd.publish(TOPIC, b"after")
    late = work.get(timeout=TIMEOUT)
    assert late.body == b"after" and late.finish() is True
    wait_until(lambda: drained(nsqd), TIMEOUT, message="channel drained")


def test_emptying_the_channel_while_handlers_hold_messages_keeps_the_connection(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """/channel/empty (nsqadmin's "Empty Channel") while five messages are held: nsqd forgets
    every message in flight and sends RDY new ones at once. The connection took that for a
    peer ignoring RDY and closed ("nsqd never does"); the new messages it had read came
    again after the reconnect (a user review: 5 drops in 5 empties with 0.5 s handlers)."""
    import queue

    from nsq_sync import NsqdHTTPClient

    old = [b"old-%d" % n for n in range(5)]
    new = [b"new-%d" % n for n in range(5)]
    prepare(nsqd, old)
    held: "queue.Queue[Any]" = queue.Queue()
    seen = Recorder(len(new))

    def handler(message: Any) -> Any:
        if message.body.startswith(b"old"):
            message.enable_async()
            held.put(message)
            return None
        seen.add(message.body)
        return True

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=5)
    reader.start()
    kept = [held.get(timeout=TIMEOUT) for _ in old]
    NsqdHTTPClient(nsqd.http_address).empty_channel(TOPIC, CHANNEL)
    nsqd.mpublish(TOPIC, new)
    assert seen.done.wait(TIMEOUT), seen.bodies
    wait_until(lambda: drained(nsqd), TIMEOUT, message="channel drained")
    assert [m.finish() for m in kept] == [False] * 5  # nsqd forgot them: nothing is sent
    assert seen.bodies == Counter({body: 1 for body in new})
    stats = reader.stats()
    assert stats["messages_received"] == 10 and stats["in_flight"] == 0  # nothing came twice
    clients = channel(nsqd)["clients"]
    assert len(clients) == 1 and clients[0]["finish_count"] == 5  # the same connection throughout


# ------------------------------------------------ (4) a new nsqd mid-run
@pytest.mark.slow
def test_nsqd_added_mid_run_is_discovered_and_consumed(nsq_cluster: LocalCluster, make_reader: Callable[..., Reader]) -> None:
    first = [b"first-%d" % i for i in range(20)]
    for nsqd in nsq_cluster.nsqds:
        prepare(nsqd, first[: len(first) // 2] if nsqd is nsq_cluster.nsqds[0] else first[len(first) // 2 :])
    nsq_cluster.wait_for_producers(TOPIC, 2)
    seen = Recorder(20)
    reader = make_reader(lambda m: seen.add(m.body), lookupd_http_addresses=nsq_cluster.lookupd_http_addresses, max_in_flight=10, lookupd_poll_interval=0.5)
    reader.start()
    seen.wait()
    third = nsq_cluster.add_nsqd()
    late = [b"late-%d" % i for i in range(10)]
    prepare(third, late)
    nsq_cluster.wait_for_producers(TOPIC, 3)
    seen.done.clear()
    seen.expected = 30
    seen.wait()
    assert set(late) <= set(seen.bodies)
    assert third.tcp_address in reader.conns
    wait_until(lambda: drained(third), 10, message="third nsqd drained")


# ------------------------------------------- (5) an nsqd killed mid-run
@pytest.mark.slow
def test_killed_nsqd_other_keeps_flowing_and_restarted_one_is_consumed(nsq_cluster: LocalCluster, make_reader: Callable[..., Reader]) -> None:
    victim, survivor = nsq_cluster.nsqds
    for nsqd in (victim, survivor):
        prepare(nsqd, [b"%s-before-%d" % (nsqd.tcp_address.encode(), i) for i in range(10)])
    nsq_cluster.wait_for_producers(TOPIC, 2)
    seen = Recorder(20)
    reader = make_reader(lambda m: seen.add(m.body), lookupd_http_addresses=nsq_cluster.lookupd_http_addresses, max_in_flight=10, lookupd_poll_interval=0.5)
    reader.start()
    seen.wait()
    wait_until(lambda: len(reader.conns) == 2, 10, message="two connections")

    victim.kill()
    wait_until(lambda: victim.tcp_address not in reader.conns, 10, message="the killed connection to go")
    during = [b"during-%d" % i for i in range(50)]
    prepare(survivor, during)
    seen.done.clear()
    seen.expected = 70
    seen.wait()

    victim.restart()
    after = [b"after-restart-%d" % i for i in range(10)]
    prepare(victim, after)
    seen.done.clear()
    seen.expected = 80
    seen.wait()
    assert set(after) <= set(seen.bodies)
    wait_until(lambda: victim.tcp_address in reader.conns, 10, message="reconnected to the restarted nsqd")
    for nsqd in (victim, survivor):
        wait_until(lambda: drained(nsqd), 10, message="drained")


# --------------------------------- (6) max_in_flight 1 over 3 connections
@pytest.mark.slow
def test_max_in_flight_1_over_three_nsqd_never_runs_two_handlers(nsq_cluster: LocalCluster, make_reader: Callable[..., Reader]) -> None:
    nsq_cluster.add_nsqd()
    total = 0
    for index, nsqd in enumerate(nsq_cluster.nsqds):
        prepare(nsqd, [b"%d-%d" % (index, i) for i in range(8)])
        total += 8
    lock = threading.Lock()
    running = 0
    peak = 0
    seen = Recorder(total)
    pause = threading.Event()

    def handler(message: Any) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        pause.wait(0.005)  # a little work, so overlapping handlers would be caught
        with lock:
            running -= 1
        seen.add(message.body)
        return True

    reader = make_reader(
        handler,
        nsqd_tcp_addresses=nsq_cluster.nsqd_tcp_addresses,
        max_in_flight=1,
        concurrency=4,
        low_rdy_idle_timeout=0.3,
        rdy_redistribute_interval=0.1,
    )
    reader.start()
    seen.wait(TIMEOUT)
    assert peak == 1
    assert len(reader.conns) == 3
    assert reader.stats()["total_rdy"] <= 1
    for nsqd in nsq_cluster.nsqds:
        wait_until(lambda: drained(nsqd), 10, message="drained")


# --------------------------------------------- (7) SIGTERM to Reader.run()
RUN_SCRIPT = r"""
import json, os, sys, threading
if os.environ.get("NSQ_SYNC_BACKEND") == "gevent":
    from gevent import monkey
    monkey.patch_all()
from nsq_sync.reader import Reader

def handler(message):
    os.write(1, b"got\n")  # one write: lines from several workers never interleave
    threading.Event().wait(0.02)
    return True

reader = Reader(sys.argv[1], sys.argv[2], handler, nsqd_tcp_addresses=sys.argv[3], max_in_flight=5,
                backend=os.environ.get("NSQ_SYNC_BACKEND", "thread"))
reader.run()
print("stats " + json.dumps(reader.stats()), flush=True)
"""


def test_sigterm_to_reader_run_exits_0_after_a_graceful_drain(nsqd: NsqdProcess, backend: str) -> None:
    published = 300
    prepare(nsqd, [b"m-%d" % i for i in range(published)])
    env = dict(os.environ, NSQ_SYNC_BACKEND=backend)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, TOPIC, CHANNEL, nsqd.tcp_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for _ in range(10):  # consuming has started
            assert proc.stdout.readline().strip() == b"got"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    stats_line = [line for line in out.splitlines() if line.startswith(b"stats ")]
    assert stats_line, out
    stats = json.loads(stats_line[0][len(b"stats ") :])
    assert stats["closed"] and stats["in_flight"] == 0
    chan = channel(nsqd)
    assert chan["in_flight_count"] == 0
    assert chan["clients"] == []
    finished = stats["messages_finished"]
    assert finished >= 10
    assert chan["depth"] + chan["deferred_count"] + finished == published
    assert chan["depth"] + chan["deferred_count"] > 0  # SIGTERM really arrived mid-run


# ------------------------------------------- (8) nothing left after close()
def test_after_close_no_task_is_left_and_nothing_reconnects(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    prepare(nsqd, [b"one"])
    seen = Recorder(1)
    reader = make_reader(lambda m: seen.add(m.body), nsqd_tcp_addresses=nsqd.tcp_address)
    reader.reconnect_base = 0.05  # reconnect attempts would come fast
    reader.start()
    seen.wait()
    nsqd.kill()
    wait_until(lambda: not reader.conns, 10, message="connection to go")
    wait_until(lambda: reader._direct_failures.get(nsqd.tcp_address, 0) >= 2, 10, message="reconnect attempts")
    reader.close()
    assert reader.join(0)
    assert live_tasks() == []
    assert not reader._reconnect_timers and not reader._connecting and not reader._tasks
    nsqd.restart()
    nsqd.create_channel(TOPIC, CHANNEL)
    # Absence check: give a would-be reconnect 20x its delay to show up.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert channel(nsqd)["clients"] == []
        time.sleep(0.1)
    assert live_tasks() == []


def test_batching_until_is_starved_makes_batches_as_large_as_pynsqs(nsqd: NsqdProcess, make_reader: Callable[..., Reader]) -> None:
    """pynsq's batching pattern (keep each message with enable_async(), answer them all once
    is_starved()) with RDY 10 and one worker: batches of 9 (85% of 10, rounded up), as pynsq
    makes. is_starved() counts messages handed to the handler and not answered; before, the
    ones still queued for the worker counted too, so the first handler of each read found
    the connection starved and batches were of 1 or 2 messages."""
    total = 90
    prepare(nsqd, [b"%d" % n for n in range(total)])
    lock = threading.Lock()  # (one worker here; the lock is for the test's own draining below)
    batch: List[Any] = []
    sizes: List[int] = []
    draining = threading.Event()

    def handler(message: Any) -> None:
        message.enable_async()
        with lock:
            batch.append(message)
            if reader.is_starved() or draining.is_set():
                sizes.append(len(batch))
                for held in batch:
                    held.finish()
                del batch[:]

    reader = make_reader(handler, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=10, concurrency=1)
    reader.start()
    try:
        wait_until(lambda: sum(sizes) >= total - 10, TIMEOUT, message="most messages answered in batches")
        with lock:
            seen = list(sizes)
        assert all(size <= 10 for size in seen), seen
        assert sum(1 for size in seen if size >= 8) >= 0.8 * len(seen), seen
    finally:
        with lock:
            draining.set()
            for held in batch:
                held.finish()
            del batch[:]
    wait_until(lambda: drained(nsqd), TIMEOUT, message="channel drained")

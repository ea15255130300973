"""Reader against the scripted fake nsqd: exact command sequences for RDY, FIN, REQ, backoff, close.

No sleeps: every wait is on what the client sent (the fake's wait_* helpers) or on an
Event set by a handler. Each test closes its Readers and checks no task is left.
"""

from __future__ import annotations

import gc
import http.server
import json
import logging
import select
import selectors
import socket
import struct
import threading
import time
import warnings
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from fake_nsqd import FakeNsqd, error, fake_nsqd  # noqa: F401 - fixture
from fake_nsqd import close as closing
from tcp_proxy import TcpProxy

from nsq_sync.backoff import ExponentialBackoff
from nsq_sync.errors import ClosedError, ConfigError, SendError
from nsq_sync.reader import Reader
from nsq_sync.testing import wait_until

TOPIC = "topic"
CHANNEL = "channel"
WAIT = 10.0


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


def address(server: FakeNsqd) -> str:
    return f"{server.host}:{server.port}"


def lines(server: FakeNsqd, session: Any = None) -> List[bytes]:
    source = session.received if session is not None else server.received
    with server._cond:
        return [c.line for c in source]


def rdy_values(commands: List[bytes]) -> List[int]:
    return [int(c.split()[1]) for c in commands if c.startswith(b"RDY ")]


@pytest.fixture
def make_reader(backend: str) -> Iterator[Callable[..., Reader]]:
    readers: List[Reader] = []

    def make(servers: Any, handler: Optional[Callable[..., Any]] = None, cls: type = Reader, **kwargs: Any) -> Reader:
        if isinstance(servers, FakeNsqd):
            servers = [servers]
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("backoff_strategy", ExponentialBackoff(multiplier=0.05, max_duration=1))
        reader = cls(TOPIC, CHANNEL, handler, nsqd_tcp_addresses=[address(s) for s in servers], **kwargs)
        reader.reconnect_base = 0.02
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close(5)
        assert reader.join(10)
    assert live_tasks() == []


# ------------------------------------------------------------- (a) success
def test_success_identify_sub_rdy_then_fin_per_message(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    seen: List[bytes] = []
    reader = make_reader(fake_nsqd, lambda m: seen.append(m.body), max_in_flight=3)
    reader.start()
    fake_nsqd.wait_for_command("RDY")
    ids = [fake_nsqd.enqueue(b"m%d" % i).id for i in range(3)]
    fake_nsqd.wait_for_command("FIN", count=3, timeout=WAIT)
    commands = lines(fake_nsqd)
    assert commands[:3] == [b"IDENTIFY", b"SUB topic channel", b"RDY 3"]
    assert sorted(commands[3:]) == sorted(b"FIN " + i for i in ids)
    assert sorted(seen) == [b"m0", b"m1", b"m2"]
    # A message leaves the client's in-flight count once its FIN is written.
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="in_flight 0")
    stats = reader.stats()
    assert (stats["messages_received"], stats["messages_finished"], stats["messages_requeued"]) == (3, 3, 0)
    assert stats["total_rdy"] == 3
    assert stats["connections"][0]["address"] == address(fake_nsqd)
    reader.close()
    assert lines(fake_nsqd)[6:] == [b"CLS"]
    fake_nsqd.wait_disconnected()


def test_every_way_of_finishing_counts_once_and_fires_resume_once(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # The handler's return is counted by the Reader itself, every other FIN by the connection's
    # report to its owner: each FIN counts once in messages_finished, and a "resume" listener of
    # the user's on the Reader's connection hears of every one.
    parked: List[Any] = []
    pending: List[futures.Future] = []

    def handler(message: Any) -> Any:
        how = message.body
        if how == b"finish":
            message.finish()
            return None
        if how == b"async":
            message.enable_async()
            parked.append(message)
            return None
        if how == b"future":
            pending.append(futures.Future())
            return pending[-1]
        return True if how == b"true" else None

    reader = make_reader(fake_nsqd, handler, max_in_flight=5)
    reader.start()
    fake_nsqd.wait_for_command("RDY 5")
    conn = next(iter(reader.conns.values()))
    resumed: List[Any] = []
    conn.on("resume", lambda conn: resumed.append(conn))
    sent = [fake_nsqd.enqueue(body) for body in (b"none", b"true", b"finish", b"async", b"future")]
    wait_until(lambda: len(parked) == 1 and len(pending) == 1, WAIT, message="the async and future handlers returned")
    fake_nsqd.wait_for_command("FIN", count=3, timeout=WAIT)
    finisher = threading.Thread(target=parked[0].finish)
    finisher.start()
    finisher.join(WAIT)
    pending[0].set_result(None)
    fake_nsqd.wait_for_command("FIN", count=5, timeout=WAIT)
    assert sorted(c for c in lines(fake_nsqd) if c.startswith(b"FIN ")) == sorted(b"FIN " + m.id for m in sent)
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="in_flight 0")
    assert reader.stats()["messages_finished"] == 5
    assert resumed == [conn] * 5


def test_finishes_on_a_connection_that_closed_stay_counted(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # Each connection counts its FINs; the Reader keeps the count of one that closed.
    reader = make_reader(fake_nsqd, lambda m: None, max_in_flight=2)
    reader.start()
    first = fake_nsqd.wait_connected(timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 2", session=first, timeout=WAIT)
    for body in (b"a", b"b"):
        fake_nsqd.enqueue(body)
    fake_nsqd.wait_for_command("FIN", count=2, session=first, timeout=WAIT)
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="in_flight 0")
    assert reader.stats()["messages_finished"] == 2
    fake_nsqd.close_client()
    fake_nsqd.wait_disconnected(first)
    second = fake_nsqd.wait_connected(count=2, timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 2", session=second, timeout=WAIT)
    fake_nsqd.enqueue(b"c")
    fake_nsqd.wait_for_command("FIN", session=second, timeout=WAIT)
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="in_flight 0")
    stats = reader.stats()
    assert (stats["messages_received"], stats["messages_finished"]) == (3, 3)
    assert len(stats["connections"]) == 1


def test_identify_carries_conn_kwargs(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    reader = make_reader(fake_nsqd, lambda m: True, heartbeat_interval=5, user_agent="test-agent/1", msg_timeout=30)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    identify = fake_nsqd.session.identify
    assert identify["heartbeat_interval"] == 5000
    assert identify["user_agent"] == "test-agent/1"
    assert identify["msg_timeout"] == 30000


# ------------------------------------------------------ (b) failure/backoff
@pytest.mark.parametrize("success", ["returned", "finish() in the handler"])
def test_failure_backs_off_then_tests_with_rdy_1_and_recovers(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], success: str) -> None:
    # The success that ends backoff is counted on either path: the Reader's own FIN after the
    # handler returned (inline in _on_message) or the connection's report of a FIN sent by the
    # handler itself (_owner_finished).
    answers = iter([False, True])

    def handler(message: Any) -> Any:
        ok = next(answers)
        if ok and success != "returned":
            message.finish()
            return None
        return ok

    reader = make_reader(fake_nsqd, handler, max_in_flight=3, backoff_strategy=ExponentialBackoff(multiplier=0.2))
    reader.start()
    fake_nsqd.wait_for_command("RDY 3")
    first = fake_nsqd.enqueue(b"fails")
    fake_nsqd.wait_for_command("REQ")
    assert reader.stats()["backing_off"] is True
    second = fake_nsqd.enqueue(b"succeeds")  # the fake delivers it only once RDY allows
    fake_nsqd.wait_for_command("FIN", timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 3", count=2, timeout=WAIT)
    commands = lines(fake_nsqd)
    # backoff fires before the REQ is written (pynsq's order), so RDY 0 precedes the REQ;
    # a FIN is written before resume fires, so the full RDY follows the FIN that freed a slot.
    assert commands == [
        b"IDENTIFY",
        b"SUB topic channel",
        b"RDY 3",
        b"RDY 0",
        b"REQ " + first.id + b" 90000",
        b"RDY 1",
        b"FIN " + second.id,
        b"RDY 3",
    ]
    rdy0 = fake_nsqd.wait_for_command("RDY 0")
    rdy1 = fake_nsqd.wait_for_command("RDY 1")
    assert rdy1.time - rdy0.time >= 0.19  # the level-1 interval: multiplier * 2**0
    assert fake_nsqd.session.delivered[-1].id == second.id
    assert reader.stats()["backing_off"] is False and reader.backoff_level == 0


def test_failures_during_a_window_count_once_and_level_steps_down(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    """Three failures in flight together raise the level once; two levels need two successes."""
    release = threading.Event()
    outcomes: Dict[bytes, bool] = {b"f1": False, b"f2": False, b"f3": False}

    def handler(message: Any) -> bool:
        if message.body in outcomes:
            release.wait(WAIT)
            return outcomes[message.body]
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=3, backoff_strategy=ExponentialBackoff(multiplier=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 3")
    for body in (b"f1", b"f2", b"f3"):
        fake_nsqd.enqueue(body)
    fake_nsqd.wait_until(lambda: len(fake_nsqd.session.in_flight) == 3, WAIT, "3 in flight")
    release.set()
    fake_nsqd.wait_for_command("REQ", count=3, timeout=WAIT)
    assert reader.backoff_level == 1
    # Test message: fails -> level 2; then two successes bring it back.
    fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
    outcomes[b"f4"] = False
    fake_nsqd.enqueue(b"f4")
    fake_nsqd.wait_for_command("REQ", count=4, timeout=WAIT)
    assert reader.backoff_level == 2
    fake_nsqd.wait_for_command("RDY 1", count=2, timeout=WAIT)
    fake_nsqd.enqueue(b"ok1")
    fake_nsqd.wait_for_command("FIN", timeout=WAIT)
    # The FIN may reach nsqd before the resume event (which steps the level down) has run.
    fake_nsqd.wait_until(lambda: reader.backoff_level == 1, WAIT, "level 1 after a success")
    fake_nsqd.wait_for_command("RDY 1", count=3, timeout=WAIT)
    fake_nsqd.enqueue(b"ok2")
    fake_nsqd.wait_for_command("FIN", count=2, timeout=WAIT)
    fake_nsqd.wait_until(lambda: reader.backoff_level == 0, WAIT, "level 0 after two successes")
    fake_nsqd.wait_for_command("RDY 3", count=2, timeout=WAIT)  # (written once the Reader let go of its lock)
    after_first_failure = lines(fake_nsqd)[3:]
    assert rdy_values(after_first_failure) == [0, 1, 0, 1, 0, 1, 3]


def test_backoff_windows_say_whether_a_failure_or_the_recovery_opened_them(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: while recovering after a success the Reader logged WARNING "backing off for
    # 2.000s (level 2)", the line a failure writes. A failure (entering backoff, or a level
    # up) stays a WARNING; a step down is an INFO that says so.
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    answers = iter([False, False, True, True])
    reader = make_reader(fake_nsqd, lambda m: next(answers), backoff_strategy=ExponentialBackoff(multiplier=0.05))
    reader.start()
    for number in range(4):
        # (each after the RDY 1 of the window before: one sent sooner could come inside it)
        fake_nsqd.wait_for_command("RDY 1", count=number + 1, timeout=WAIT)
        fake_nsqd.enqueue(b"m%d" % number)
    fake_nsqd.wait_for_command("FIN", count=2, timeout=WAIT)
    wait_until(lambda: reader.backoff_level == 0, WAIT, message="backoff over")
    name = reader.name
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "backing off" in r.getMessage() or "recovering" in r.getMessage()]
    assert said == [
        ("WARNING", f"{name}: backing off for 0.050s (level 1) after a failed message (requeued with backoff): RDY 0 on every connection"),
        ("WARNING", f"{name}: backing off for 0.100s (level 2) after a failed message (requeued with backoff): RDY 0 on every connection"),
        ("INFO", f"{name}: recovering from backoff: a message succeeded, level down to 1; pausing 0.050s before the next test (RDY 0 on every connection)"),
    ], said
    # (The level reads 0 a moment before that line is logged, under the Reader's lock: waited for.)
    wait_until(lambda: any(r.getMessage() == f"{name}: backoff complete; resuming full RDY" for r in list(caplog.records)), WAIT, message="backoff complete logged")


def test_a_fin_whose_write_fails_still_counts_toward_leaving_backoff(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # The FIN was queued (and counted) before its write failed: a success, as on every
    # other way of finishing, so the backoff level steps down.
    answers = iter([False, True])
    reader = make_reader(fake_nsqd, lambda m: next(answers), max_in_flight=3, backoff_strategy=ExponentialBackoff(multiplier=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 3")
    fake_nsqd.enqueue(b"fails")
    fake_nsqd.wait_for_command("REQ")
    assert reader.backoff_level == 1
    fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
    conn = next(iter(reader.conns.values()))
    real = conn._finish_message
    failed: List[bytes] = []

    def finish_then_fail(message: Any, notify_owner: bool = True) -> None:
        real(message, notify_owner)
        failed.append(message.body)
        raise SendError("the write failed (test)")

    conn._finish_message = finish_then_fail  # type: ignore[method-assign]
    fake_nsqd.enqueue(b"succeeds")
    wait_until(lambda: reader.backoff_level == 0, WAIT, message="the success counted")
    assert failed == [b"succeeds"]
    assert reader.stats()["messages_finished"] == 1


# ---------------------------------------------- (c) requeue without backoff
def test_requeue_without_backoff_never_sends_rdy_0(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    def handler(message: Any) -> None:
        if message.body == b"again":
            message.requeue(delay=0, backoff=False)

    reader = make_reader(fake_nsqd, handler, max_in_flight=2)
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    again = fake_nsqd.enqueue(b"again")
    fake_nsqd.wait_for_command("REQ")
    done = fake_nsqd.enqueue(b"done")
    fake_nsqd.wait_for_command("FIN")
    assert lines(fake_nsqd) == [b"IDENTIFY", b"SUB topic channel", b"RDY 2", b"REQ " + again.id + b" 0", b"FIN " + done.id]
    fake_nsqd.wait_until(lambda: reader.stats()["messages_finished"] == 1, WAIT, "the finish counted")  # (counted after the FIN is queued)
    stats = reader.stats()
    assert stats["backing_off"] is False and stats["messages_requeued"] == 1 and stats["messages_finished"] == 1


def test_fins_and_reqs_nsqd_refuses_are_taken_out_of_finished_and_requeued(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # messages_finished counted every FIN sent, also one nsqd refused (E_FIN_FAILED: it had
    # timed the message out and delivers it again, where it is finished, and counted, twice).
    def handler(message: Any) -> None:
        if message.body == b"req":
            message.requeue(delay=0, backoff=False)

    def counts() -> Tuple[Any, ...]:
        stats = reader.stats()
        return tuple(stats.get(key) for key in ("messages_received", "messages_finished", "messages_fin_failed", "messages_requeued", "messages_req_failed"))

    fake_nsqd.set_answer("FIN", error("E_FIN_FAILED FIN failed ID not in flight"), times=1)
    fake_nsqd.set_answer("REQ", error("E_REQ_FAILED REQ failed ID not in flight"), times=1)
    reader = make_reader(fake_nsqd, handler, max_in_flight=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    for body in (b"fin", b"req", b"fin", b"req"):  # the first FIN and the first REQ are refused
        fake_nsqd.enqueue(body)
    fake_nsqd.wait_for_command("FIN", count=2)
    fake_nsqd.wait_for_command("REQ", count=2)
    wait_until(lambda: counts() == (4, 1, 1, 1, 1), WAIT, message="the refusals counted apart")
    reader.close(WAIT)
    assert counts() == (4, 1, 1, 1, 1)  # (kept once the connection is gone)


# ------------------------------------ (d) disconnect while backing off, reconnect
def test_disconnect_during_backoff_reconnects_without_rdy_above_1(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    answers = iter([False, True])
    reader = make_reader(fake_nsqd, lambda m: next(answers), max_in_flight=2, backoff_strategy=ExponentialBackoff(multiplier=0.5))
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    fake_nsqd.enqueue(b"fails")
    fake_nsqd.wait_for_command("REQ")
    first = fake_nsqd.session
    fake_nsqd.close_client()
    fake_nsqd.wait_disconnected(first)
    second = fake_nsqd.wait_connected(count=2, timeout=WAIT)
    fake_nsqd.wait_for_command("SUB", session=second, timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 1", session=second, timeout=WAIT)
    ok = fake_nsqd.enqueue(b"succeeds")
    fake_nsqd.wait_for_command("FIN", session=second, timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 2", session=second, timeout=WAIT)
    assert lines(fake_nsqd, second) == [b"IDENTIFY", b"SUB topic channel", b"RDY 1", b"FIN " + ok.id, b"RDY 2"]
    assert rdy_values(lines(fake_nsqd, first)) == [2, 0]
    assert reader.backoff_level == 0


# ------------------------------------------------ (e) backoff disabled
def test_max_backoff_duration_0_never_throttles(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    reader = make_reader(fake_nsqd, lambda m: m.body != b"bad", max_in_flight=4, max_backoff_duration=0)
    reader.start()
    fake_nsqd.wait_for_command("RDY 4")
    for _ in range(5):
        fake_nsqd.enqueue(b"bad")
    fake_nsqd.wait_for_command("REQ", count=5, timeout=WAIT)
    fake_nsqd.enqueue(b"good")
    fake_nsqd.wait_for_command("FIN", timeout=WAIT)
    assert rdy_values(lines(fake_nsqd)) == [4]
    stats = reader.stats()
    assert stats["backing_off"] is False and stats["messages_requeued"] == 5 and stats["total_rdy"] == 4


# ------------------------------- (f) max_in_flight 1 across 3 connections
def test_max_in_flight_1_over_3_connections_total_rdy_never_above_1(make_reader: Callable[..., Reader]) -> None:
    servers = [FakeNsqd().start() for _ in range(3)]
    lock = threading.Lock()
    rdy: Dict[int, int] = {}
    sums: List[int] = []

    def track(session: Any, command: Any) -> Any:
        # Called after the fake applied the command: session.rdy is what nsqd now holds.
        with lock:
            rdy[id(session)] = session.rdy
            sums.append(sum(rdy.values()))
        # NOTHING, not DEFAULT: the fake cannot send a DEFAULT that resolves to "no answer".
        return None

    running = 0
    peak = 0
    count_lock = threading.Lock()

    def handler(message: Any) -> bool:
        nonlocal running, peak
        with count_lock:
            running += 1
            peak = max(peak, running)
        with count_lock:
            running -= 1
        return True

    try:
        for server in servers:
            server.set_answer("RDY", track)
            server.set_answer("CLS", lambda s, c: (track(s, c), b"CLOSE_WAIT")[1])
            for i in range(3):
                server.enqueue(b"%d" % i)
        reader = make_reader(servers, handler, max_in_flight=1, low_rdy_idle_timeout=0.2, rdy_redistribute_interval=0.05)
        reader.start()
        for server in servers:
            server.wait_for_command("FIN", count=3, timeout=WAIT)
        assert max(sums) == 1
        assert peak == 1
        servers[0].wait_until(lambda: reader.stats()["messages_finished"] == 9, WAIT, "9 finishes counted")  # (counted after each FIN is queued)
        reader.close()
        # RDY is taken back only from a connection that had it for low_rdy_idle_timeout
        # without a message (never right after it was handed out).
        for server in servers:
            for session in server.sessions:
                granted_at = None
                for command in list(session.received):
                    if command.line == b"RDY 1":
                        granted_at = command.time
                    elif command.name == "FIN":
                        granted_at = command.time
                    elif command.line == b"RDY 0" and granted_at is not None:
                        assert command.time - granted_at >= 0.18, session.received
                        granted_at = None
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------- (g) pause and resume
def test_set_max_in_flight_0_pauses_everywhere_and_restores(make_reader: Callable[..., Reader]) -> None:
    servers = [FakeNsqd().start() for _ in range(2)]
    try:
        reader = make_reader(servers, lambda m: True, max_in_flight=4)
        reader.start()
        for server in servers:
            server.wait_for_command("RDY 2", timeout=WAIT)
        reader.set_max_in_flight(0)
        for server in servers:
            server.wait_for_command("RDY 0", timeout=WAIT)
        held = servers[0].enqueue(b"while paused")
        assert servers[0].queued and not servers[0].session.in_flight
        reader.set_max_in_flight(5)
        for server in servers:
            server.wait_for_command("RDY 2", count=2, timeout=WAIT)
        servers[0].wait_for_command("FIN " + held.id.decode(), timeout=WAIT)
        # The first connection may have had RDY 4 while it was alone; then 2, 0, 2.
        for server in servers:
            assert rdy_values(lines(server))[-3:] == [2, 0, 2]
        assert reader.max_in_flight == 5
        reader.set_max_in_flight(1)  # two connections, one slot: only one keeps RDY 1
        # Which one keeps RDY 1 is not fixed, so poll both fakes rather than wait on one.
        wait_until(lambda: servers[0].session.rdy + servers[1].session.rdy == 1, WAIT, message="total RDY 1")
        assert sorted(rdy_values(lines(s))[-1] for s in servers) == [0, 1]
        with pytest.raises(ConfigError):
            reader.set_max_in_flight(-1)
        reader.close()
    finally:
        for server in servers:
            server.stop()


def test_a_rdy_write_that_blocks_holds_up_no_other_connection(make_reader: Callable[..., Reader]) -> None:
    """One nsqd stops reading (the path up stalls, the socket's send buffer is full): a RDY
    for it waits on a task of its own, while the Reader's decisions for the other connection,
    and stats(), go on. (RDY was written under the Reader's lock, so one stuck socket held
    every connection's RDY and every stats() call until the stall was detected.)"""
    servers = [FakeNsqd().start() for _ in range(2)]
    try:
        with TcpProxy((servers[0].host, servers[0].port)) as proxy:
            reader = make_reader([proxy, servers[1]], lambda m: True, max_in_flight=4)
            reader.start()
            for server in servers:
                server.wait_for_command("RDY 2", timeout=WAIT)
            stuck = next(st.conn for st in reader._conns.values() if st.address == address(proxy))
            proxy.stall("up")
            # Fill the socket's buffers with NOPs (harmless to nsqd) until it has no room (a
            # small send buffer: the fake reads the NOPs one line at a time once resumed).
            sock = stuck._raw_sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            plain = getattr(sock, "_sock", sock)  # (gevent's socket would wait for room instead)
            sent = 0
            while True:
                for chunk in (b"NOP\n" * 1024, b"NOP\n" * 16, b"NOP\n"):
                    while True:
                        try:
                            count = plain.send(chunk, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        assert count % 4 == 0, "a NOP was cut in two"  # (writes of whole NOPs fill whole NOPs)
                        sent += count
                # Full once no room comes back (acks of what the proxy's buffer took free some).
                if not select.select([], [plain], [], 0.2)[1]:
                    break
            assert sent > 0
            setter = threading.Thread(target=reader.set_max_in_flight, args=(6,), name="test-set-mif")
            setter.start()
            setter.join(WAIT)
            assert not setter.is_alive(), "set_max_in_flight() waited for the stuck socket"
            servers[1].wait_for_command("RDY 3", timeout=WAIT)
            assert stuck.rdy == 3  # decided; a task of its own waits to write it behind the NOPs
            # The Reader's lock is free: the next decision reaches the other connection.
            setter = threading.Thread(target=reader.set_max_in_flight, args=(8,), name="test-set-mif-2")
            setter.start()
            setter.join(WAIT)
            assert not setter.is_alive(), "set_max_in_flight() waited for the stuck socket"
            servers[1].wait_for_command("RDY 4", timeout=WAIT)
            assert reader.stats()["max_in_flight"] == 8
            proxy.resume()
            servers[0].wait_for_command("RDY 4", timeout=WAIT)
            reader.close()
    finally:
        for server in servers:
            server.stop()


# ------------------------------------------------- (h) giving up
def test_giving_up_after_max_tries_finishes_without_calling_the_handler(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    handled: List[bytes] = []
    given_up: List[Any] = []

    class GivingUp(Reader):
        def giving_up(self, message: Any) -> None:
            given_up.append((message.body, message.attempts))

    reader = make_reader(fake_nsqd, lambda m: handled.append(m.body), cls=GivingUp, max_tries=2, max_in_flight=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    last_try = fake_nsqd.enqueue(b"last try", attempts=2)
    fake_nsqd.wait_for_command("FIN")
    too_many = fake_nsqd.enqueue(b"too many", attempts=3)
    fake_nsqd.wait_for_command("FIN", count=2)
    assert handled == [b"last try"]
    assert given_up == [(b"too many", 3)]
    assert lines(fake_nsqd)[3:] == [b"FIN " + last_try.id, b"FIN " + too_many.id]
    assert reader.stats()["messages_given_up"] == 1


def test_default_giving_up_logs_a_warning_without_the_body(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    reader = make_reader(fake_nsqd, lambda m: True, max_tries=1, name="billing-worker")
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    sent = fake_nsqd.enqueue(b"secret-body", attempts=2)
    fake_nsqd.wait_for_command("FIN")
    records = [r for r in caplog.records if "giving up" in r.getMessage()]
    assert len(records) == 1 and "secret-body" not in records[0].getMessage()
    # SRE review: it named the message otherwise than the Reader's other lines (id=b'...'), and
    # with a name= of its own neither the topic/channel nor the nsqd: both are said now.
    assert records[0].getMessage() == (
        f"billing-worker: giving up on <Message id={sent.id.decode()} attempts=2 size=11> from {address(fake_nsqd)} "
        f"({TOPIC}/{CHANNEL}): delivered more than max_tries (1) times; finishing it"
    )


def test_validate_message_false_finishes_without_processing(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    handled: List[bytes] = []

    class Validating(Reader):
        def preprocess_message(self, message: Any) -> Any:
            return message.body.upper()

        def validate_message(self, message: Any) -> bool:
            return message != b"INVALID"

    reader = make_reader(fake_nsqd, lambda m: handled.append(m.body), cls=Validating)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    fake_nsqd.enqueue(b"invalid")
    fake_nsqd.wait_for_command("FIN")
    fake_nsqd.enqueue(b"valid")
    fake_nsqd.wait_for_command("FIN", count=2)
    assert handled == [b"valid"]  # process_message gets the original message, as in pynsq


# ------------------------------------------------- (i) exceptions
def test_exception_in_handler_requeues_with_backoff_and_logs_the_traceback(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="nsq_sync.reader")

    def handler(message: Any) -> None:
        raise ValueError("boom")

    reader = make_reader(fake_nsqd, handler, max_in_flight=2, backoff_strategy=ExponentialBackoff(multiplier=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    msg = fake_nsqd.enqueue(b"x")
    fake_nsqd.wait_for_command("REQ")
    assert lines(fake_nsqd)[3:5] == [b"RDY 0", b"REQ " + msg.id + b" 90000"]
    records = [r for r in caplog.records if r.exc_info and r.name == "nsq_sync.reader"]
    assert len(records) == 1
    assert records[0].exc_info[0] is ValueError and "Traceback" in caplog.text and "boom" in caplog.text


class _TimeLimit(BaseException):
    """What gevent.Timeout is: a BaseException by design, raised by a handler's own time limit."""


def test_a_base_exception_that_is_no_exit_is_a_handler_failure(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # A gevent.Timeout out of a handler used to be taken for an exit: REQ 0 without backoff and
    # re-raised, so the message came straight back and used up max_tries within a second.
    caplog.set_level(logging.ERROR, logger="nsq_sync.reader")
    calls: List[bytes] = []

    def handler(message: Any) -> bool:
        calls.append(message.body)
        if message.body == b"slow":
            raise _TimeLimit("0.05 seconds")
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=2, concurrency=1, backoff_strategy=ExponentialBackoff(multiplier=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    slow = fake_nsqd.enqueue(b"slow")
    fake_nsqd.wait_for_command("REQ")
    assert lines(fake_nsqd)[3:5] == [b"RDY 0", b"REQ " + slow.id + b" 90000"]  # with the delay, and backoff
    records = [r for r in caplog.records if r.exc_info and r.name == "nsq_sync.reader"]
    assert len(records) == 1 and records[0].exc_info[0] is _TimeLimit
    # The worker lives on: the next message is handled (once the backoff lets one in).
    fast = fake_nsqd.enqueue(b"fast")
    fake_nsqd.wait_for_command("FIN", timeout=WAIT)
    assert b"FIN " + fast.id in lines(fake_nsqd) and calls[-1] == b"fast"


class _OtherFuture:
    """A future of another executor than concurrent.futures (gevent's thread pool, loky):
    add_done_callback and result, no common base class."""

    def __init__(self) -> None:
        self._callbacks: List[Callable[[Any], Any]] = []
        self._outcome: Any = None

    def add_done_callback(self, callback: Callable[[Any], Any]) -> None:
        self._callbacks.append(callback)

    def result(self, timeout: Any = None) -> Any:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def complete(self, outcome: Any) -> None:
        self._outcome = outcome
        for callback in self._callbacks:
            callback(self)


def test_a_returned_future_of_another_executor_answers_when_it_completes(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # It was finished at once, before its work ran (and whatever that work then did).
    pending: Dict[bytes, _OtherFuture] = {}

    def handler(message: Any) -> Any:
        pending[message.body] = _OtherFuture()
        return pending[message.body]

    reader = make_reader(fake_nsqd, handler, max_in_flight=2, backoff_strategy=ExponentialBackoff(multiplier=0.05, max_duration=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    good, bad = fake_nsqd.enqueue(b"good"), fake_nsqd.enqueue(b"bad")
    wait_until(lambda: len(pending) == 2, WAIT, message="2 handlers returned")
    assert lines(fake_nsqd)[3:] == []  # nothing answered before the futures complete
    pending[b"bad"].complete(RuntimeError("the work failed"))
    fake_nsqd.wait_for_command("REQ")
    pending[b"good"].complete(None)
    fake_nsqd.wait_for_command("FIN")
    answered = [c for c in lines(fake_nsqd) if c.startswith((b"FIN ", b"REQ "))]
    assert answered[0].startswith(b"REQ " + bad.id + b" ") and not answered[0].endswith(b" 0")
    assert answered[1] == b"FIN " + good.id


# ------------------------------------------------- (j) enable_async
def test_enable_async_answers_later_from_another_thread(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    parked: List[Any] = []

    def handler(message: Any) -> Any:
        if message.body == b"async":
            message.enable_async()
            parked.append(message)
            return None
        return True

    # One worker: the async handler's return is followed by the next message on the same worker.
    reader = make_reader(fake_nsqd, handler, max_in_flight=2, concurrency=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    later = fake_nsqd.enqueue(b"async")
    sync = fake_nsqd.enqueue(b"sync")
    fake_nsqd.wait_for_command("FIN")
    assert lines(fake_nsqd)[3:] == [b"FIN " + sync.id]  # nothing was sent for the async one
    finisher = threading.Thread(target=parked[0].finish)
    finisher.start()
    finisher.join(WAIT)
    fake_nsqd.wait_for_command("FIN", count=2)
    assert lines(fake_nsqd)[3:] == [b"FIN " + sync.id, b"FIN " + later.id]
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="in_flight 0")


def test_a_returned_future_answers_the_message_when_it_completes(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # pynsq's handlers may return a Future: the message waits for it, FIN or REQ by its outcome.
    pending: Dict[bytes, futures.Future] = {}

    def handler(message: Any) -> Any:
        future: futures.Future = futures.Future()
        pending[message.body] = future
        return future

    reader = make_reader(fake_nsqd, handler, max_in_flight=4, backoff_strategy=ExponentialBackoff(multiplier=0.05, max_duration=0.05))
    reader.start()
    fake_nsqd.wait_for_command("RDY 4")
    msgs = {body: fake_nsqd.enqueue(body) for body in (b"ok", b"false", b"raises", b"cancelled")}
    wait_until(lambda: len(pending) == 4, WAIT, message="4 handlers returned")
    assert lines(fake_nsqd)[3:] == []  # nothing answered before the futures complete
    pending[b"ok"].set_result(None)
    fake_nsqd.wait_for_command("FIN")
    pending[b"false"].set_result(False)
    pending[b"raises"].set_exception(RuntimeError("the work failed"))
    pending[b"cancelled"].cancel()
    fake_nsqd.wait_for_command("REQ", count=3)
    answered = [c for c in lines(fake_nsqd) if c.startswith((b"FIN ", b"REQ "))]
    assert answered[0] == b"FIN " + msgs[b"ok"].id
    assert sorted(c.split()[1] for c in answered[1:]) == sorted(msgs[b].id for b in (b"false", b"raises", b"cancelled"))
    assert all(c.startswith(b"REQ ") and not c.endswith(b" 0") for c in answered[1:])  # with the automatic delay


def test_a_returned_coroutine_requeues_the_message_and_logs_an_error(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # An async def behind a wrapper gets past check_message_handler; its coroutine never runs here.
    ran: List[bytes] = []

    async def handle(message: Any) -> bool:
        ran.append(message.body)
        return True

    reader = make_reader(fake_nsqd, lambda message: handle(message), max_in_flight=1)
    with caplog.at_level(logging.ERROR, logger="nsq_sync.reader"), warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "coroutine was never awaited" either: it is closed)
        reader.start()
        fake_nsqd.wait_for_command("RDY 1")
        msg = fake_nsqd.enqueue(b"x")
        req = fake_nsqd.wait_for_command("REQ")
        gc.collect()
    assert req.line.startswith(b"REQ " + msg.id)
    assert ran == [] and not any(c.startswith(b"FIN ") for c in lines(fake_nsqd))
    assert any("never awaits" in r.getMessage() and "coroutine" in r.getMessage() for r in caplog.records)


def test_a_falsy_result_finishes_the_message_and_warns_once(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # pynsq requeued any falsy result (`return cursor.rowcount` that saved nothing); here only
    # False does. The difference must not be silent.
    results = iter([0, "", True])
    reader = make_reader(fake_nsqd, lambda message: next(results), max_in_flight=1)
    with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
        reader.start()
        fake_nsqd.wait_for_command("RDY 1")
        msgs = [fake_nsqd.enqueue(b"%d" % i) for i in range(3)]
        fake_nsqd.wait_for_command("FIN", count=3)
    assert [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"REQ"))] == [b"FIN " + m.id for m in msgs]
    warned = [r.getMessage() for r in caplog.records if "only False requeues" in r.getMessage()]
    assert len(warned) == 1 and "returned 0" in warned[0], warned


def test_messages_read_before_the_connection_died_still_run_and_are_warned_about_once(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # nsqd crashed with messages still queued for a worker. They still run: nsqd may not
    # deliver them again (a crash loses its in-flight messages; an ephemeral channel goes with
    # its last client), and at-least-once allows a duplicate, never a loss. Their answers
    # cannot be sent; that is said once, not once per message (505 warnings for one crash).
    started, release = threading.Event(), threading.Event()
    handled: List[bytes] = []

    def handler(message: Any) -> bool:
        handled.append(message.body)
        started.set()
        release.wait(WAIT)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=5, concurrency=1)
    with caplog.at_level(logging.WARNING):
        reader.start()
        fake_nsqd.wait_for_command("RDY 5")
        for i in range(5):
            fake_nsqd.enqueue(b"%d" % i)
        assert started.wait(WAIT)
        wait_until(lambda: reader.stats()["in_flight"] == 5, WAIT, message="5 arrived")
        fake_nsqd.session.close_client()
        fake_nsqd.wait_disconnected()
        wait_until(lambda: any("still go to handlers" in r.getMessage() for r in caplog.records), WAIT, message="the warning")
        release.set()
        wait_until(lambda: len(handled) == 5, WAIT, message="all 5 handled")
        reader.close(WAIT)
    assert handled == [b"%d" % i for i in range(5)]
    told = [r.getMessage() for r in caplog.records if "still go to handlers" in r.getMessage()]
    assert len(told) == 1 and " 4 messages" in told[0], told
    failed = [r.getMessage() for r in caplog.records if "could not" in r.getMessage()]
    assert len(failed) == 1 and "5 answers could not be sent" not in failed[0], failed  # (one summary, not one per message)


def holding_handler(held: bytes) -> Tuple[Callable[[Any], bool], List[bytes], threading.Event]:
    """A handler that records every body it sees and holds the one equal to *held* until the
    returned event is set; (handler, the bodies seen, the event)."""
    release = threading.Event()
    handled: List[bytes] = []

    def handler(message: Any) -> bool:
        handled.append(message.body)
        if message.body == held:
            release.wait(WAIT)
        return True

    return handler, handled, release


def test_a_copy_nsqd_timed_out_and_sent_again_runs_once(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # A handler slower than msg_timeout: nsqd delivers the waiting message again (same id)
    # while the first copy still waits for a worker. Only the newer copy runs, and it is said.
    handler, handled, release = holding_handler(b"slow")
    reader = make_reader(fake_nsqd, handler, max_in_flight=5, concurrency=1)
    with caplog.at_level(logging.WARNING):
        reader.start()
        fake_nsqd.wait_for_command("RDY 5")
        fake_nsqd.send_message(b"slow")
        wait_until(lambda: handled == [b"slow"], WAIT, message="the slow one runs")
        first = fake_nsqd.send_message(b"waiting")
        fake_nsqd.send_message(b"waiting", attempts=2, id=first.id)  # (nsqd's timeout redelivery)
        wait_until(lambda: any("delivered them again" in r.getMessage() for r in caplog.records), WAIT, message="the warning")
        release.set()
        fake_nsqd.wait_for_command("FIN", count=2)
    assert handled == [b"slow", b"waiting"]
    fins = [c for c in lines(fake_nsqd) if c.startswith(b"FIN")]
    assert len(fins) == 2 and fins.count(b"FIN " + first.id) == 1  # (the slow one's, and the new copy's)


def test_a_running_copy_nsqd_replaced_is_not_answered_and_does_not_raise(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # The first copy's handler outlives msg_timeout and touches too late: the newer copy runs
    # and finishes; the old one's touch(), requeue() and finish() return False and send
    # nothing. They raised AlreadyRespondedError, which killed a batcher thread answering
    # late (docs/reader.md's enable_async() pattern) after one slow save: nothing was saved
    # from then on.
    first_running, release = threading.Event(), threading.Event()
    seen: List[Any] = []

    def handler(message: Any) -> bool:
        if message.attempts == 1:
            first_running.set()
            release.wait(WAIT)
            for answer in (message.touch, message.requeue, message.finish):
                try:
                    seen.append(answer())
                except Exception as exc:
                    seen.append(exc)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=2, concurrency=2)
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    first = fake_nsqd.send_message(b"job")
    assert first_running.wait(WAIT)
    fake_nsqd.send_message(b"job", attempts=2, id=first.id)
    fake_nsqd.wait_for_command("FIN")  # the newer copy's
    release.set()
    wait_until(lambda: len(seen) == 3, WAIT, message="the old copy's answers")
    assert seen == [False, False, False]
    assert [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"REQ", b"TOUCH"))] == [b"FIN " + first.id]
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="nothing in flight")


def test_refused_answers_and_redeliveries_are_warned_about_with_counts_of_their_own(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # Both warnings shared one rate limit and one count: after a redelivery was warned about,
    # an E_FIN_FAILED within LATE_WARNING_SECONDS was only logged at debug level, and later
    # counts mixed the two ("26 such" E_FIN_FAILED with 21 messages finished).
    handler, _, release = holding_handler(b"slow")
    reader = make_reader(fake_nsqd, handler, max_in_flight=5, concurrency=1)
    with caplog.at_level(logging.WARNING):
        reader.start()
        try:
            fake_nsqd.wait_for_command("RDY 5")
            fake_nsqd.send_message(b"slow")
            first = fake_nsqd.send_message(b"waiting")
            fake_nsqd.send_message(b"waiting", attempts=2, id=first.id)
            wait_until(lambda: any("delivered them again (1 since" in r.getMessage() for r in caplog.records), WAIT, message="the redelivery warning")
            fake_nsqd.send_error("E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
            wait_until(lambda: any("E_FIN_FAILED" in r.getMessage() for r in caplog.records), WAIT, message="the refused answer's warning")
        finally:
            release.set()
        fake_nsqd.wait_for_command("FIN", count=2)
    refused = [r.getMessage() for r in caplog.records if "E_FIN_FAILED" in r.getMessage()]
    assert len(refused) == 1 and "(1 such since the last warning)" in refused[0], refused


def test_messages_that_waited_for_a_worker_past_msg_timeout_are_dropped_unrun(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # With every worker busy longer than msg_timeout, nsqd times out the messages waiting
    # here and sends others (or the same again): those copies ran later anyway (work done
    # twice, FIN refused), and piled up without bound while a handler hung (95 held after
    # 20 s with max_in_flight 5 and msg_timeout 1 s, in a user review against real nsqd).
    fake_nsqd.identify_response["msg_timeout"] = 50  # ms
    handler, handled, release = holding_handler(b"hung")
    reader = make_reader(fake_nsqd, handler, max_in_flight=3, concurrency=1)
    with caplog.at_level(logging.WARNING):
        reader.start()
        try:
            fake_nsqd.wait_for_command("RDY 3")
            fake_nsqd.send_message(b"hung")
            wait_until(lambda: handled == [b"hung"], WAIT, message="the hung handler runs")
            fake_nsqd.send_message(b"waiting 1")
            fake_nsqd.send_message(b"waiting 2")
            wait_until(lambda: reader.stats()["messages_received"] == 3, WAIT, message="both waiting")
            # Their msg_timeout passes: nsqd would now time them out and send more. (Waiting
            # messages are touched while a handler started within msg_timeout, as the hung
            # one did when they came: once that is msg_timeout ago no touch goes out, and the
            # last one's time is up a msg_timeout later. So twice msg_timeout, and a margin.)
            time.sleep(0.12)
            fake_nsqd.send_message(b"after the timeout")  # a 4th in flight with RDY 3: nsqd timed some out
            wait_until(lambda: reader.stats()["messages_expired"] == 2, WAIT, message="the two stale ones dropped")
            assert reader.stats()["in_flight"] == 2  # the hung one and the newest
            assert any("2 messages waited for a worker longer than msg_timeout" in r.getMessage() for r in caplog.records)
        finally:
            release.set()
        fake_nsqd.wait_for_command("FIN", count=2)
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="nothing in flight")
    assert handled == [b"hung", b"after the timeout"]
    assert len([c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"REQ"))]) == 2


def behind_a_slow_handler(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], msg_timeout_ms: int = 1000
) -> Tuple[Reader, Any, List[bytes], threading.Event]:
    """A started Reader (max_in_flight 3, one worker, msg_timeout 1 s unless told) whose worker
    holds the message b"slow": (the Reader, that message, the bodies handled, the event that
    releases it). Messages sent next wait for the worker."""
    fake_nsqd.identify_response["msg_timeout"] = msg_timeout_ms
    handler, handled, release = holding_handler(b"slow")
    reader = make_reader(fake_nsqd, handler, max_in_flight=3, concurrency=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 3")
    slow = fake_nsqd.send_message(b"slow")
    wait_until(lambda: handled == [b"slow"], WAIT, message="the slow one runs")
    return reader, slow, handled, release


def test_a_message_waiting_for_a_busy_worker_is_touched_before_its_answer(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # Prefetch deeper than the workers get through within msg_timeout: a message that waited
    # for the worker half its msg_timeout (while the handler before it started less than
    # msg_timeout ago) is touched, so nsqd does not time it out and deliver it again. The
    # running message is not the Reader's to touch, and the TOUCH leaves before the FIN.
    caplog.set_level(logging.WARNING)
    reader, slow, handled, release = behind_a_slow_handler(fake_nsqd, make_reader)
    try:
        waiting = fake_nsqd.send_message(b"waiting")
        assert fake_nsqd.wait_for_command("TOUCH").line == b"TOUCH " + waiting.id
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN", count=2)
    sent = [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"TOUCH"))]
    assert [c for c in sent if c.startswith(b"FIN")] == [b"FIN " + slow.id, b"FIN " + waiting.id]
    assert sent[0] == b"TOUCH " + waiting.id and sent[-1] == b"FIN " + waiting.id
    # (touched again only if the release was slow: at the next half msg_timeout, or as the
    # worker picked it up a tenth of msg_timeout after the touch)
    assert set(sent) - {b"FIN " + slow.id, b"FIN " + waiting.id} == {b"TOUCH " + waiting.id}
    assert handled == [b"slow", b"waiting"]
    assert reader.stats()["messages_touched_queued"] == len(sent) - 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_a_message_that_waited_for_the_worker_is_touched_as_its_handler_starts(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # msg_timeout 2 s. A message that waited 0.4 s for the worker (more than a tenth of
    # msg_timeout, less than the half after which waiting messages are touched) is touched as
    # the worker picks it up, before its handler runs: the handler gets the whole msg_timeout,
    # not what the wait left of it (a handler could start with half of it gone, and one of
    # 0.7 x msg_timeout ran twice). The TOUCH follows the FIN it waited behind, once.
    caplog.set_level(logging.WARNING)
    reader, slow, handled, release = behind_a_slow_handler(fake_nsqd, make_reader, msg_timeout_ms=2000)
    waited = fake_nsqd.send_message(b"waited")
    try:
        time.sleep(0.4)  # (the wait itself: nothing to await, the message must wait)
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN", count=2)
    sent = [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"TOUCH"))]
    assert sent == [b"FIN " + slow.id, b"TOUCH " + waited.id, b"FIN " + waited.id]
    assert handled == [b"slow", b"waited"]
    assert reader.stats()["messages_touched_queued"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_a_message_picked_up_at_once_is_not_touched(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # msg_timeout 2 s, one worker, 50 messages of a quick handler: none waits a tenth of
    # msg_timeout, so no TOUCH is sent (the pick-up touch costs nothing on the usual path).
    fake_nsqd.identify_response["msg_timeout"] = 2000  # ms
    reader = make_reader(fake_nsqd, lambda message: True, max_in_flight=50, concurrency=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 50")
    for n in range(50):
        fake_nsqd.send_message(b"quick-%d" % n)
    fake_nsqd.wait_for_command("FIN", count=50)
    assert not [c for c in lines(fake_nsqd) if c.startswith(b"TOUCH")]
    assert reader.stats()["messages_touched_queued"] == 0


def refuse_the_touch(fake_nsqd: FakeNsqd, message: Any) -> None:
    """Wait for *message*'s TOUCH and answer it as nsqd does for a message it no longer has in flight."""
    assert fake_nsqd.wait_for_command("TOUCH").line == b"TOUCH " + message.id
    fake_nsqd.send_error(b"E_TOUCH_FAILED TOUCH %s failed ID not in flight" % message.id)


def test_a_waiting_message_whose_touch_nsqd_refuses_does_not_run(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # E_TOUCH_FAILED: nsqd no longer has the waiting message in flight here (it timed it out, or
    # the channel was emptied). Run later, it ran twice (or ran though emptied) and its FIN was
    # refused; now it leaves the in-flight count at once and does not run.
    caplog.set_level(logging.WARNING)
    reader, slow, handled, release = behind_a_slow_handler(fake_nsqd, make_reader)
    try:
        refused = fake_nsqd.send_message(b"refused")
        kept = fake_nsqd.send_message(b"kept")
        refuse_the_touch(fake_nsqd, refused)
        wait_until(lambda: reader.stats()["in_flight"] == 2, WAIT, message="the refused one out of the in-flight count")
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN", count=2)
    wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="nothing in flight")
    assert handled == [b"slow", b"kept"]
    answers = [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"REQ"))]
    assert answers == [b"FIN " + slow.id, b"FIN " + kept.id], answers
    assert any("E_TOUCH_FAILED" in r.getMessage() for r in caplog.records)


def test_a_running_message_whose_touch_nsqd_refuses_is_not_answered(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # The handler's own touch() refused: nsqd would refuse its FIN too. finish() returns False
    # and sends nothing, as for a copy nsqd delivered again.
    release = threading.Event()
    finished: List[Any] = []

    def handler(message: Any) -> None:
        assert message.touch() is True
        release.wait(2 * WAIT)  # (longer than the test waits for the in-flight count)
        finished.append(message.finish())

    reader = make_reader(fake_nsqd, handler, max_in_flight=1)
    reader.start()
    try:
        fake_nsqd.wait_for_command("RDY 1")
        message = fake_nsqd.send_message(b"long job")
        refuse_the_touch(fake_nsqd, message)
        wait_until(lambda: reader.stats()["in_flight"] == 0, WAIT, message="the refused one out of the in-flight count")
    finally:
        release.set()
    wait_until(lambda: finished, WAIT, message="the handler's finish()")
    assert finished == [False]
    fake_nsqd.send_message(b"next")  # (its FIN is the first answer: none was sent before it)
    assert fake_nsqd.wait_for_command("FIN").line.startswith(b"FIN ") and not [c for c in lines(fake_nsqd) if c == b"FIN " + message.id]


def test_a_waiting_message_is_not_touched_past_max_msg_timeout(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # nsqd never extends a message past max_msg_timeout from its delivery: a TOUCH that
    # cannot gain anything is not sent. msg_timeout 1 s, max_msg_timeout 1.2 s: the touch at
    # half a second reaches that cap, and the one due another half second later is not sent.
    fake_nsqd.identify_response.update(msg_timeout=1000, max_msg_timeout=1200)
    handler, handled, release = holding_handler(b"slow")
    reader = make_reader(fake_nsqd, handler, max_in_flight=3, concurrency=1)
    reader.start()
    try:
        fake_nsqd.wait_for_command("RDY 3")
        fake_nsqd.send_message(b"slow")
        wait_until(lambda: handled == [b"slow"], WAIT, message="the slow one runs")
        waiting = fake_nsqd.send_message(b"waiting")
        assert fake_nsqd.wait_for_command("TOUCH").line == b"TOUCH " + waiting.id
        time.sleep(0.8)  # (past the next touch's time: nothing to wait for, it must not come)
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN", count=2)
    assert [c for c in lines(fake_nsqd) if c.startswith(b"TOUCH")] == [b"TOUCH " + waiting.id]
    assert reader.stats()["messages_touched_queued"] == 1


def test_a_silent_nsqd_is_found_stale_while_a_message_waits_for_a_worker(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: Any) -> None:
    # With RDY under 4 and a message waiting for the worker, the reader task reads with the
    # deadline of the next touch (msg_timeout 60 s here): it must still close a connection
    # that has been silent for two heartbeat intervals.
    handler, handled, release = holding_handler(b"hung")
    reader = make_reader(fake_nsqd, handler, max_in_flight=2, concurrency=1, heartbeat_interval=1)
    with caplog.at_level(logging.WARNING):
        reader.start()
        try:
            fake_nsqd.wait_for_command("RDY 2")
            session = fake_nsqd.session
            fake_nsqd.send_message(b"hung")
            wait_until(lambda: handled == [b"hung"], WAIT, message="the hung handler runs")
            fake_nsqd.send_message(b"waiting")
            fake_nsqd.wait_disconnected(session, timeout=WAIT)
            wait_until(lambda: any("stale" in r.getMessage() for r in caplog.records), WAIT, message="the stale connection's warning")
        finally:
            release.set()


# ------------------------------------------------- (k) graceful close
def test_close_sends_cls_and_waits_for_the_running_handler(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    started = threading.Event()
    release = threading.Event()

    def handler(message: Any) -> bool:
        started.set()
        release.wait(WAIT)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    msg = fake_nsqd.enqueue(b"slow")
    assert started.wait(WAIT)
    closer = threading.Thread(target=reader.close, args=(WAIT,))
    closer.start()
    fake_nsqd.wait_for_command("CLS")
    assert fake_nsqd.session.connected and not reader.join(0)
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive() and reader.join(0)
    session = fake_nsqd.wait_disconnected()
    assert lines(fake_nsqd)[3:] == [b"CLS", b"FIN " + msg.id]
    assert session.client_closed
    assert live_tasks() == []


def test_close_requeues_messages_no_worker_has_started(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    started = threading.Event()
    release = threading.Event()

    def handler(message: Any) -> bool:
        started.set()
        release.wait(WAIT)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=3, concurrency=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 3")
    msgs = [fake_nsqd.enqueue(b"%d" % i) for i in range(3)]
    fake_nsqd.wait_until(lambda: len(fake_nsqd.session.in_flight) == 3, WAIT, "3 in flight")
    assert started.wait(WAIT)
    wait_until(lambda: reader.stats()["in_flight"] == 3, WAIT, message="3 arrived")
    assert reader.stats()["messages_received"] == 3  # counted on arrival, not when a worker starts one
    closer = threading.Thread(target=reader.close, args=(WAIT,))
    closer.start()
    # The two waiting for the busy worker go back while its handler still runs: nsqd can give
    # them to another consumer now, not after the handler (or, past the timeout, msg_timeout).
    fake_nsqd.wait_for_command("REQ", count=2)
    assert not release.is_set() and closer.is_alive()
    assert lines(fake_nsqd)[3] == b"CLS"
    assert sorted(lines(fake_nsqd)[4:]) == sorted(b"REQ " + m.id + b" 0" for m in msgs[1:])
    release.set()
    closer.join(WAIT)
    assert lines(fake_nsqd)[6:] == [b"FIN " + msgs[0].id]
    assert reader.stats()["backing_off"] is False
    assert reader.stats()["messages_received"] == 3


def test_close_past_its_timeout_still_requeues_the_waiting_and_returns_in_time(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # 20 workers stuck in handlers past the close timeout, 10 messages waiting for them:
    # close(0.5) requeues the 10, leaves the 20 to nsqd's timeout, and returns within about
    # its timeout (its workers' joins share one deadline; they took 0.1 s or more each).
    release = threading.Event()
    stuck = threading.Semaphore(0)

    def handler(message: Any) -> bool:
        stuck.release()
        release.wait(WAIT)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=30, concurrency=20)
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 30")
        msgs = [fake_nsqd.enqueue(b"%d" % i) for i in range(30)]
        for _ in range(20):
            assert stuck.acquire(timeout=WAIT)
        started = time.monotonic()
        reader.close(0.5)
        took = time.monotonic() - started
        requeued = [c for c in lines(fake_nsqd) if c.startswith(b"REQ ")]
        assert len(requeued) == 10 and all(c.endswith(b" 0") for c in requeued)
        assert {c.split()[1] for c in requeued} < {m.id for m in msgs}
        assert not any(c.startswith(b"FIN ") for c in lines(fake_nsqd))
        assert took < 1.5, f"close(0.5) took {took:.2f} s"  # (2.5 s and more before: 20 joins of 0.1 s)
    finally:
        release.set()
        wait_until(lambda: live_tasks() == [], WAIT, message="the stuck workers end")


def test_close_where_no_new_thread_can_start_still_drains(fake_nsqd: FakeNsqd, backend: str) -> None:
    # CPython 3.12.0-3.12.1 refuse new threads once the interpreter is finalizing, which is when
    # the atexit hook closes Readers: close() raised there, and the messages stayed in flight
    # until nsqd's timeout. The connections are then closed in the closing thread.
    from nsq_sync.backends import get_backend

    class NoCloserThreads:
        def __init__(self) -> None:
            self._inner = get_backend(backend)
            self.name = self._inner.name

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def spawn(self, fn: Any, *args: Any, name: str = "") -> Any:
            if "-close-" in name:
                raise RuntimeError("can't create new thread at interpreter shutdown")
            return self._inner.spawn(fn, *args, name=name)

    started, release = threading.Event(), threading.Event()

    def handler(message: Any) -> bool:
        started.set()
        release.wait(WAIT)
        return True

    reader = Reader(TOPIC, CHANNEL, handler, nsqd_tcp_addresses=address(fake_nsqd), backend=NoCloserThreads(), max_in_flight=2, concurrency=1)
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 2")
        msgs = [fake_nsqd.enqueue(b"a"), fake_nsqd.enqueue(b"b")]
        assert started.wait(WAIT)
        closer = threading.Thread(target=reader.close, args=(WAIT,), name="test-close")
        closer.start()
        fake_nsqd.wait_for_command("REQ")  # the one waiting for the worker goes back at once
        release.set()
        closer.join(WAIT)
        assert not closer.is_alive() and reader.join(0)
        assert lines(fake_nsqd)[3:] == [b"CLS", b"REQ " + msgs[1].id + b" 0", b"FIN " + msgs[0].id]
    finally:
        release.set()
        reader.close(WAIT)


def test_close_from_inside_a_handler_does_not_deadlock(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    holder: List[Reader] = []

    def handler(message: Any) -> bool:
        holder[0].close(WAIT)  # returns at once: the shutdown runs in the background
        return True

    reader = make_reader(fake_nsqd, handler)
    holder.append(reader)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    msg = fake_nsqd.enqueue(b"x")
    assert reader.join(WAIT)
    fake_nsqd.wait_for_command("CLS")
    fake_nsqd.wait_for_command("FIN")
    fake_nsqd.wait_disconnected()
    # The shutdown runs in its own task, so CLS and the handler's FIN may come in either order.
    assert sorted(lines(fake_nsqd)[3:]) == [b"CLS", b"FIN " + msg.id]


# ---------------------------------------------------- lifecycle, misc
def test_close_is_idempotent_and_stops_everything(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.start()
    reader.start()  # idempotent
    fake_nsqd.wait_for_command("RDY 1")
    reader.close()
    reader.close()
    assert reader.join(0) and reader.closed
    assert live_tasks() == []
    with pytest.raises(ClosedError):
        reader.start()
    with pytest.raises(ClosedError):
        reader.connect_to_nsqd("127.0.0.1", fake_nsqd.port)
    assert len(fake_nsqd.sessions) == 1


def test_run_in_a_thread_returns_after_close(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    reader = make_reader(fake_nsqd, lambda m: True)
    runner = threading.Thread(target=reader.run, name="test-runner")
    runner.start()
    fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
    assert runner.is_alive()
    reader.close()
    runner.join(WAIT)
    assert not runner.is_alive()
    fake_nsqd.wait_for_command("CLS")


def test_close_before_start(make_reader: Callable[..., Reader], fake_nsqd: FakeNsqd) -> None:
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.close()
    assert reader.join(0)
    assert fake_nsqd.sessions == []


def test_direct_address_reconnects_after_the_server_closes(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    reader = make_reader(fake_nsqd, lambda m: True, max_in_flight=2)
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    fake_nsqd.close_client()
    second = fake_nsqd.wait_connected(count=2, timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 2", session=second, timeout=WAIT)
    msg = fake_nsqd.enqueue(b"after reconnect")
    fake_nsqd.wait_for_command("FIN " + msg.id.decode(), timeout=WAIT)


def test_a_closed_connection_is_logged_before_the_reconnect_it_schedules(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: "reconnecting to X in 0.77s (attempt 1)" came before "connection to X closed".
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.reconnect_base = 30.0  # (one reconnect line only)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    fake_nsqd.close_client()
    wait_until(lambda: any("reconnecting to" in r.getMessage() for r in caplog.records), WAIT, message="a reconnect scheduled")
    said = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.reader" and ("closed" in r.getMessage() or "reconnecting" in r.getMessage())]
    assert [m.split(address(fake_nsqd))[0] for m in said] == [f"{reader.name}: connection to ", f"{reader.name}: reconnecting to "], said


def _recovered(caplog: pytest.LogCaptureFixture, what: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and what in r.getMessage()]


def test_a_connection_back_after_warned_failures_is_said_at_warning_level(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: failures are WARNINGs, recoveries were INFO, so a log kept from WARNING up
    # always ended on the failure. The connection coming back after a warned failure is a
    # WARNING too, with how long it was down and the attempts it took; a first connect is not.
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    assert _recovered(caplog, "connected to") == []  # (the first connect: INFO "subscribed to")
    fake_nsqd.set_answer("IDENTIFY", [error("E_INVALID not now"), closing()], times=2)  # two attempts refused
    went = time.monotonic()
    fake_nsqd.close_client()
    fake_nsqd.wait_connected(count=4, timeout=WAIT)
    fake_nsqd.wait_for_command("RDY 1", session=fake_nsqd.sessions[3], timeout=WAIT)
    took = time.monotonic() - went
    (line,) = _recovered(caplog, "connected to")
    name, where = reader.name, address(fake_nsqd)
    assert line.startswith(f"{name}: reconnected to {where} after ") and line.endswith(f" s down (3 attempts); subscribed to {TOPIC}/{CHANNEL}"), line
    assert 0 < float(line.split(" after ")[1].split(" s ")[0]) <= took + 0.1, (line, took)
    # Said once: the next close and reconnect (at once) is one more, with 1 attempt.
    fake_nsqd.close_client()
    fake_nsqd.wait_for_command("RDY 1", session=fake_nsqd.wait_connected(count=5, timeout=WAIT), timeout=WAIT)
    wait_until(lambda: len(_recovered(caplog, "connected to")) == 2, WAIT, message="the second reconnection said")
    assert _recovered(caplog, "connected to")[1].endswith(" s down (1 attempt); subscribed to topic/channel")


def test_an_nsqd_that_failed_its_first_attempts_says_when_it_is_connected(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    fake_nsqd.set_answer("IDENTIFY", [error("E_INVALID not now"), closing()], times=1)
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1", session=fake_nsqd.wait_connected(count=2, timeout=WAIT), timeout=WAIT)
    wait_until(lambda: _recovered(caplog, "connected to"), WAIT, message="the connection said")
    (line,) = _recovered(caplog, "connected to")
    assert line.startswith(f"{reader.name}: connected to {address(fake_nsqd)} after ") and " s of failed attempts (2 attempts); " in line, line


def test_a_lookupd_answering_again_after_warned_failures_is_said_at_warning_level(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    failures = [(500, b'{"message":"INTERNAL_ERROR"}'), (500, b'{"message":"INTERNAL_ERROR"}')]
    lookupd = _Lookupd([_producer(fake_nsqd)], failures=failures)
    reader = _quick_retry_reader(lookupd, backend)
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        failed = [r for r in caplog.records if r.levelno == logging.WARNING and "query failed" in r.getMessage()]
        assert len(failed) == 2, failed
        wait_until(lambda: _recovered(caplog, "answered again"), WAIT, message="the answer said")
        (line,) = _recovered(caplog, "answered again")
        assert line.startswith(f"{reader.name}: lookupd {lookupd.address} answered again after ") and line.endswith(" s failing (2 failed queries)"), line
        wait_until(lambda: lookupd.requests >= 5, WAIT, message="more polls")
        assert len(_recovered(caplog, "answered again")) == 1  # (once per run of failures)
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_unreachable_direct_address_is_retried_with_backoff(make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    server = FakeNsqd()
    server.port = port
    server.host = "127.0.0.1"
    reader = make_reader(server, lambda m: True)
    reader.start()

    def delays() -> List[str]:
        return [r.getMessage() for r in caplog.records if "reconnecting to" in r.getMessage()]

    wait_until(lambda: len(delays()) >= 3, WAIT, message="3 reconnect attempts")
    assert "attempt 1" in delays()[0] and "attempt 3" in delays()[2]
    # Monitoring sees the nsqd that is down (it saw an empty list, so "connected" never alerted).
    (entry,) = reader.stats()["connections"]
    assert entry["address"] == f"127.0.0.1:{port}" and entry["connected"] is False and entry["failed_attempts"] >= 3, entry
    # ... since when, and why (it had only the count: the reason was in the log alone)
    assert entry["down_since"] is not None and time.time() - WAIT <= entry["down_since"] <= time.time(), entry
    assert "refused" in entry["last_error"].lower(), entry
    reader.close()
    assert reader.stats()["connections"] == []
    count = len(delays())
    assert reader.join(0) and len(delays()) == count


def test_stats_say_since_when_and_why_a_direct_nsqd_is_down(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # Connected: no down_since, no last_error. Its connection lost and every new handshake
    # refused: since the loss, and the refusal nsqd sent (the log alone said why).
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    (entry,) = reader.stats()["connections"]
    assert (entry["connected"], entry["down_since"], entry["last_error"]) == (True, None, None), entry
    fake_nsqd.set_answer("IDENTIFY", error("E_BAD_BODY IDENTIFY refused here"))
    lost = time.time()
    fake_nsqd.close_client()
    wait_until(lambda: "E_BAD_BODY" in (reader.stats()["connections"][0]["last_error"] or ""), WAIT, message="a refused reconnect")
    (entry,) = reader.stats()["connections"]
    assert entry["connected"] is False and "IDENTIFY refused here" in entry["last_error"], entry
    assert lost - 1 <= entry["down_since"] <= time.time(), entry  # (since the loss, not the latest attempt)


def test_a_direct_nsqds_down_record_outlasts_the_cap_on_discovered_ones(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The records of nsqd the Reader cannot reach are capped (MAX_LOOKUPD_PRODUCERS, like the
    # answers they come from): churn of discovered nsqd evicted a direct one's too, and its
    # stats() entry lost since when and why it is down. The oldest discovered one goes instead.
    import nsq_sync.reader

    monkeypatch.setattr(nsq_sync.reader, "MAX_LOOKUPD_PRODUCERS", 3, raising=False)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses="127.0.0.1:1", lookupd_http_addresses="127.0.0.1:2", backend=backend,
    )  # fmt: skip
    try:
        with reader._lock:  # (not started: attempts recorded as a failing connect records them)
            reader._attempt_failed_locked("127.0.0.1:1", ConnectionRefusedError("refused"))
            for port in range(10, 15):
                reader._attempt_failed_locked(f"127.0.0.1:{port}", ConnectionRefusedError("refused"))
            kept = list(reader._down)
        assert kept == ["127.0.0.1:1", "127.0.0.1:13", "127.0.0.1:14"], kept
        (entry,) = reader.stats()["connections"]
        assert entry["address"] == "127.0.0.1:1" and entry["last_error"] == "refused" and entry["down_since"] is not None, entry
    finally:
        reader.close(5)


def test_a_direct_nsqd_is_retried_at_least_every_15_seconds(make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture) -> None:
    # SRE review (real nsqd 1.3.0): with the cap at 60 s, after a 60 s outage the next attempt
    # came 47 s after nsqd was back (393 messages waiting). pynsq and go-nsq retry a direct
    # nsqd every 15 s: the delay, however many attempts failed, is now at most that.
    caplog.set_level(logging.INFO, logger="nsq_sync.reader")
    assert Reader.reconnect_cap == 15.0
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # (bound, not listening: a connection is refused)
    server = FakeNsqd()
    server.host, server.port = refusing.getsockname()
    try:
        reader = make_reader(server, lambda m: True)
        reader.reconnect_base = 100.0  # (the doubling is past the cap from the first failure)
        reader.start()
        wait_until(lambda: any("reconnecting to" in r.getMessage() for r in caplog.records), WAIT, message="a reconnect scheduled")
        (line,) = [r.getMessage() for r in caplog.records if "reconnecting to" in r.getMessage()]
        delay = float(line.split(" in ", 1)[1].split("s ", 1)[0])
        assert 15.0 * 0.7 <= delay <= 15.0, line  # (jitter shortens it by up to 30%)
    finally:
        refusing.close()


def test_new_connection_gets_its_share_without_exceeding_the_total(make_reader: Callable[..., Reader]) -> None:
    first, second = FakeNsqd().start(), FakeNsqd().start()
    try:
        reader = make_reader(first, lambda m: True, max_in_flight=10)
        reader.start()
        first.wait_for_command("RDY 10")
        reader.connect_to_nsqd(second.host, second.port)
        first.wait_for_command("RDY 5", timeout=WAIT)
        second.wait_for_command("RDY 5", timeout=WAIT)
        # The new connection got its share only after the old one was lowered.
        lowered = first.wait_for_command("RDY 5")
        raised = second.wait_for_command("RDY 5")
        assert raised.time >= lowered.time
        assert set(reader.conns) == {address(first), address(second)}
    finally:
        first.stop()
        second.stop()


def test_max_rdy_count_caps_rdy(make_reader: Callable[..., Reader]) -> None:
    server = FakeNsqd(identify_response={"max_rdy_count": 3}).start()
    try:
        reader = make_reader(server, lambda m: True, max_in_flight=10)
        reader.start()
        server.wait_for_command("RDY 3")
        assert rdy_values(lines(server)) == [3]
    finally:
        server.stop()


def capped_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if "RDY is capped" in r.getMessage()]


def test_max_rdy_count_warning_only_for_a_capped_share_and_once_per_value(make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture) -> None:
    # It compared max_rdy_count with the whole max_in_flight, once per address: with two nsqd
    # at max_rdy_count 8 and max_in_flight 10 (shares of 5, nothing capped) it warned for each,
    # and again for every new address under churn.
    roomy = [FakeNsqd(identify_response={"max_rdy_count": 8}).start() for _ in range(2)]
    tight = [FakeNsqd(identify_response={"max_rdy_count": 3}).start() for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            reader = make_reader(roomy, lambda m: True, max_in_flight=10)
            reader.start()
            for server in roomy:
                server.wait_for_command("RDY 5")
            assert capped_warnings(caplog) == []
            other = make_reader(tight[0], lambda m: True, max_in_flight=10)
            other.start()
            tight[0].wait_for_command("RDY 3")
            other.connect_to_nsqd("127.0.0.1", tight[1].port)  # a new address, the same cap
            tight[1].wait_for_command("RDY 3")
            wait_until(lambda: other.stats()["total_rdy"] == 6, WAIT, message="RDY 3 on both")
        said = capped_warnings(caplog)
        assert len(said) == 1 and "max_rdy_count 3" in said[0] and "(10 of 10)" in said[0], said
    finally:
        for server in roomy + tight:
            server.stop()


def test_answers_lost_to_a_failed_write_are_counted_not_warned_one_by_one(make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture) -> None:
    # A reset connection fails the first FIN written with SendError: that was one warning per
    # message, where a ConnectionClosedError was counted in one warning every 10 s.
    from nsq_sync import Message
    from nsq_sync.errors import SendError

    server = FakeNsqd().start()
    try:
        reader = make_reader(server, lambda m: True)
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            for n in range(3):
                reader._not_answered(Message(b"%016d" % n, b"x", 0, 1), SendError("write to nsqd failed: [Errno 104] Connection reset by peer"))
        said = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.reader"]
        assert len(said) == 1 and "1 answers could not be sent" in said[0], said
    finally:
        server.stop()


def test_is_starved(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    release = threading.Event()
    reader = make_reader(fake_nsqd, lambda m: release.wait(WAIT), max_in_flight=2)
    reader.start()
    fake_nsqd.wait_for_command("RDY 2")
    assert not reader.is_starved()
    fake_nsqd.enqueue(b"1")
    fake_nsqd.enqueue(b"2")
    fake_nsqd.wait_until(lambda: len(fake_nsqd.session.in_flight) == 2, WAIT, "2 in flight")
    # The client counts in-flight when its reader task decodes the frames.
    wait_until(reader.is_starved, WAIT, message="is_starved()")
    release.set()
    fake_nsqd.wait_for_command("FIN", count=2)
    wait_until(lambda: not reader.is_starved(), WAIT, message="not starved")


def test_heartbeat_hook_is_called(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    beats = threading.Event()

    class Beating(Reader):
        def heartbeat(self, conn: Any) -> None:
            beats.set()

    reader = make_reader(fake_nsqd, lambda m: True, cls=Beating)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    fake_nsqd.send_heartbeat()
    fake_nsqd.wait_for_command("NOP")
    assert beats.wait(WAIT)


def test_heartbeats_start_no_worker_when_the_hook_is_not_overridden(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # A many-consumer review: the first heartbeat started a control worker per Reader (40
    # idle Readers, 40 threads more) only to call heartbeat(), which does nothing by default.
    # (Two heartbeats: the first one's hand-off is made before the second is read.)
    reader = make_reader(fake_nsqd, lambda m: True)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    for _ in range(2):
        fake_nsqd.send_heartbeat()
    fake_nsqd.wait_for_command("NOP", count=2)
    assert reader._pool.control._live == 0


# ---------------------------------------------------- lookupd discovery
class _Lookupd:
    """A minimal nsqlookupd /lookup endpoint serving a fixed producer list.

    *failures*: ``(status, body)`` answers for the first requests, in order, before the real
    one. ``listening=False``: the port is bound but refuses connections (an nsqlookupd not
    started yet) until :meth:`listen`. ``times``: when each request came (monotonic).
    ``producers`` may be a function of the request's number (1 for the first) instead.
    """

    def __init__(
        self, producers: Any, payload: Any = None, failures: Sequence[Tuple[int, bytes]] = (), listening: bool = True
    ) -> None:
        self.producers = producers
        self.requests = 0
        self.times: List[float] = []
        failing = list(failures)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.times.append(time.monotonic())
                outer.requests += 1
                if failing:
                    status, body = failing.pop(0)
                else:
                    producers = outer.producers(outer.requests) if callable(outer.producers) else outer.producers
                    answer = {"channels": [], "producers": producers} if payload is None else payload
                    status, body = 200, json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()  # (bound, not listening: a connection is refused)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread: Optional[threading.Thread] = None
        if listening:
            self.listen()

    def listen(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-lookupd")
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(WAIT)
        self.server.server_close()


def test_a_lookupd_answer_over_16_mib_is_a_failed_query(fake_nsqd: FakeNsqd, backend: str) -> None:
    # What an answer may hold is not the client's to trust: the Reader reads at most
    # LOOKUPD_ANSWER_MAX of it (HTTPClient's own default is 64 MiB) and asks again later.
    from nsq_sync.reader import LOOKUPD_ANSWER_MAX

    producer = {"broadcast_address": fake_nsqd.host, "tcp_port": fake_nsqd.port, "http_port": 1}
    lookupd = _Lookupd([], payload={"channels": [], "producers": [producer], "padding": "x" * LOOKUPD_ANSWER_MAX})
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=[lookupd.address], lookupd_poll_interval=60, backend=backend)
    try:
        reader.start()
        wait_until(lambda: reader.stats()["lookupd"][0]["failed_queries"] == 1, WAIT, message="the query to fail")
        assert "max_response_size" in reader.stats()["lookupd"][0]["last_error"]
        assert reader.conns == {} and fake_nsqd.sessions == []
    finally:
        reader.close(WAIT)
        lookupd.stop()


def test_lookupd_discovery_tries_the_next_lookupd_on_failure(fake_nsqd: FakeNsqd, backend: str) -> None:
    lookupd = _Lookupd([{"broadcast_address": fake_nsqd.host, "tcp_port": fake_nsqd.port, "http_port": 1}])
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    reader = Reader(
        TOPIC,
        CHANNEL,
        lambda m: True,
        lookupd_http_addresses=[dead_address, f"http://{lookupd.address}/lookup"],
        lookupd_poll_interval=60,
        backend=backend,
    )
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)  # found on the first poll, whichever lookupd came first
        assert lookupd.requests == 1
        # A closed connection triggers an early re-query (not the 60 s poll).
        fake_nsqd.close_client()
        second = fake_nsqd.wait_connected(count=2, timeout=WAIT)
        fake_nsqd.wait_for_command("RDY 1", session=second, timeout=WAIT)
        assert lookupd.requests >= 2
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_lookupd_producer_without_a_usable_address_does_not_hide_the_others(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # one entry without tcp_port used to fail the whole answer (KeyError): no nsqd was found
    lookupd = _Lookupd([
        {"broadcast_address": "127.0.0.1", "http_port": 4151},
        {"broadcast_address": fake_nsqd.host, "tcp_port": fake_nsqd.port, "http_port": 1},
    ])
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=backend)
    try:
        with caplog.at_level(logging.WARNING):
            reader.start()
            fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        skipped = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.httpapi.lookupd"]
        assert len(skipped) == 1 and "skipped 1 of 2 producers" in skipped[0]
        assert not [r for r in caplog.records if "query failed" in r.getMessage()]
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_close_does_not_wait_for_a_request_to_a_hung_lookupd(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    # An nsqlookupd that accepts and never answers: close(0.5) took the request's whole
    # timeout more (10 s here), and the request's failure was logged after "closed".
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: List[socket.socket] = []
    came = threading.Event()

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        accepted.append(conn)
        came.set()

    acceptor = threading.Thread(target=accept, name="hung-lookupd")
    acceptor.start()
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True,
        lookupd_http_addresses=f"127.0.0.1:{listener.getsockname()[1]}",
        lookupd_request_timeout=10, lookupd_poll_interval=60, backend=backend,
    )  # fmt: skip
    try:
        reader.start()
        assert came.wait(WAIT), "the Reader did not ask the lookupd"
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            began = time.monotonic()
            reader.close(0.5)
            took = time.monotonic() - began
            assert took < 5, f"close(0.5) took {took:.1f} s"  # (10.5 s before: the request's timeout)
            for conn in accepted:
                conn.close()  # the request fails now, after close(): quietly
            reader._lookupd_task.join(WAIT)
        assert not [r for r in caplog.records if "query failed" in r.getMessage()]
    finally:
        reader.close(1)
        listener.close()
        acceptor.join(WAIT)
        for conn in accepted:
            conn.close()
    assert live_tasks() == []


def test_addresses_tried_once_are_not_remembered_for_ever(backend: str) -> None:
    # nsqlookupd lists new addresses on every deploy (pods): the set of addresses whose first
    # attempt ended only grew, by one entry per address ever seen.
    lookupd = _Lookupd([])
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=backend)
    reader.reconnect_base = 30.0
    try:
        reader.start()
        wait_until(lambda: lookupd.requests >= 1, WAIT, message="the first poll")
        for round_ in range(15):
            ports = []
            for _ in range(10):  # addresses nobody listens on: each attempt is refused at once
                probe = socket.socket()
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
                probe.close()
            lookupd.producers = [{"broadcast_address": "127.0.0.1", "tcp_port": port, "http_port": 1} for port in ports]
            reader.query_lookupd()
            wait_until(lambda: not reader._connecting, WAIT, message="the attempts to end")
        assert len(reader._tried) <= 64 + 10, len(reader._tried)  # (150 addresses tried)
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


class _SpawnSpy:
    """The backend under test, recording the Reader's connection attempt tasks: how many were
    spawned, how many run at once (and the most that did). ``refuse`` (part of a task name)
    makes the next spawn of a connect task with that name raise RuntimeError, as
    ``threading.Thread.start()`` does once no thread can be created."""

    def __init__(self, backend: str, refuse: Optional[str] = None) -> None:
        from nsq_sync.backends import get_backend

        self._inner = get_backend(backend)
        self.name = self._inner.name
        self.refuse = refuse
        self.refused = threading.Event()
        self.spawned = 0
        self.running = 0
        self.peak = 0
        self._count = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def spawn(self, fn: Any, *args: Any, name: str = "") -> Any:
        if "-connect-" not in name:
            return self._inner.spawn(fn, *args, name=name)
        with self._count:
            if self.refuse is not None and self.refuse in name:
                self.refuse = None
                self.refused.set()
                raise RuntimeError("can't start new thread")
            self.spawned += 1

        def attempt(*args: Any) -> Any:
            with self._count:
                self.running += 1
                self.peak = max(self.peak, self.running)
            try:
                return fn(*args)
            finally:
                with self._count:
                    self.running -= 1

        return self._inner.spawn(attempt, *args, name=name)


class _Tarpit:
    """Listening sockets that never accept and never answer: the kernel completes each TCP
    handshake (the backlog holds it) and the client's IDENTIFY waits there unread, like an
    nsqd that is stuck or hostile. After release() every connection, waiting or new, is reset
    at once. (The ports stay taken until close(): a connection to a freed ephemeral port may
    be given that very port and meet itself, a TCP self-connect, which then waits too.)"""

    def __init__(self, ports: int) -> None:
        self.listeners: List[socket.socket] = []
        for _ in range(ports):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            self.listeners.append(listener)
        self.producers = [{"broadcast_address": "127.0.0.1", "tcp_port": s.getsockname()[1], "http_port": 1} for s in self.listeners]
        self._released = False
        self._closed = False
        self._resetter: Optional[threading.Thread] = None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for listener in self.listeners:
            listener.setblocking(False)
        self._resetter = threading.Thread(target=self._reset_all, name="tarpit-reset", daemon=True)
        self._resetter.start()

    def _reset_all(self) -> None:
        with selectors.DefaultSelector() as waiting:
            for listener in self.listeners:
                waiting.register(listener, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in waiting.select(0.05):  # (the timeout only to see close())
                    while True:
                        try:
                            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                        except OSError:  # (BlockingIOError: none waiting)
                            break
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        conn.close()  # RST

    def close(self) -> None:
        self.release()
        self._closed = True
        if self._resetter is not None:
            self._resetter.join(WAIT)
        for listener in self.listeners:
            listener.close()


def _connect_tasks() -> int:
    return sum(1 for name in live_tasks() if "-connect-" in name)


def test_a_lookupd_answer_of_many_nsqd_that_never_answer_starts_at_most_max_connect_attempts(backend: str) -> None:
    # A hostile (or just huge) answer decided how many threads and sockets the Reader opened:
    # one task per producer listed, all at once (2,000 tarpit nsqd: 865 threads blocked).
    tarpit = _Tarpit(200)
    lookupd = _Lookupd(tarpit.producers)
    spy = _SpawnSpy(backend)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60,
        backend=spy, timeout=30,  # (the handshake waits 30 s for an answer: stuck for the whole test)
    )  # fmt: skip
    bound = 32  # the default max_connect_attempts
    try:
        reader.start()  # (its first poll at once, the next one in 60 s or more)

        def filled() -> bool:
            running = _connect_tasks()
            assert running <= bound, f"{running} connect tasks at once"
            return running == bound and spy.running == bound  # (greenlets: spawned, and running)

        wait_until(filled, WAIT, message=f"{bound} connect tasks")
        # All stuck in their handshake: nothing ends, so nothing more may start (the 200
        # producers were queued under one hold of the lock, before the first attempt started).
        assert (spy.spawned, spy.peak) == (bound, bound)
        assert reader.stats()["connections"] == [] and reader.conns == {} and lookupd.requests == 1
        # The nsqd go away: each attempt fails, and the next queued one starts in its slot
        # (the task that ends starts it as its last act: for a moment one more task is alive).
        # nsqlookupd goes first: the failed attempts start the lost-nsqd schedule, whose early
        # queries would list the 200 again and queue them anew (counted here as more spawns).
        lookupd.stop()
        tarpit.release()

        def drained() -> bool:
            assert _connect_tasks() <= bound + 1
            return spy.spawned == 200 and _connect_tasks() == 0

        wait_until(drained, WAIT, message="all 200 attempts to end")
        assert spy.peak <= bound + 1, spy.peak
        with reader._lock:
            assert not reader._connecting and not reader._queued
        began = time.monotonic()
        reader.close(5)
        assert time.monotonic() - began < 2.0
    finally:
        tarpit.close()  # (first: attempts stuck in it would hold up close())
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_close_does_not_start_or_wait_for_queued_connect_attempts(backend: str) -> None:
    tarpit = _Tarpit(60)
    lookupd = _Lookupd(tarpit.producers)
    spy = _SpawnSpy(backend)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60,
        backend=spy, timeout=2,
    )  # fmt: skip
    try:
        reader.start()
        wait_until(lambda: spy.running == 32, WAIT, message="32 attempts running")
        assert spy.spawned == 32  # (28 queued)
        began = time.monotonic()
        reader.close(5)  # waits for the 32 handshakes (they see the Reader closing when they end)
        took = time.monotonic() - began
        assert took < 2 + 1.5, f"close() took {took:.1f} s"  # not 28 more attempts after those
        assert spy.spawned == 32 and _connect_tasks() == 0
        assert reader.query_lookupd() == [] and spy.spawned == 32
    finally:
        tarpit.close()  # (first: attempts stuck in it would hold up close())
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_a_newer_lookupd_answer_drops_queued_attempts_to_nsqd_it_no_longer_lists(fake_nsqd: FakeNsqd, backend: str) -> None:
    tarpit = _Tarpit(6)
    lookupd = _Lookupd(tarpit.producers)
    spy = _SpawnSpy(backend)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60,
        backend=spy, timeout=30, max_connect_attempts=2,
    )  # fmt: skip
    try:
        reader.start()
        wait_until(lambda: spy.running == 2, WAIT, message="2 attempts running")  # (the first poll's)
        # The nsqd listed before are gone; only fake_nsqd is listed now. It waits for a slot
        # (the 2 attempts in progress are stuck), and the 4 queued before it are dropped.
        lookupd.producers = [{"broadcast_address": fake_nsqd.host, "tcp_port": fake_nsqd.port, "http_port": 1}]
        reader.query_lookupd()
        with reader._lock:
            assert list(reader._queued) == [address(fake_nsqd)]
        tarpit.release()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        wait_until(lambda: _connect_tasks() == 0, WAIT, message="the attempts to end")
        assert spy.spawned == 3 and list(reader.conns) == [address(fake_nsqd)]
    finally:
        tarpit.close()  # (first: attempts stuck in it would hold up close())
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


@pytest.mark.parametrize("found", ["lookupd", "nsqd_tcp_addresses"])
def test_a_connect_task_that_cannot_start_leaves_no_address_stuck_connecting(
    fake_nsqd: FakeNsqd, backend: str, found: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The address was marked connecting before the spawn, and a spawn that raised ("can't
    # start new thread") left it so: never tried again. The exception also ended the poll
    # (or start()) before the producers after it were tried.
    target = address(fake_nsqd)
    spy = _SpawnSpy(backend, refuse=f"-connect-{target}")
    lookupd = _Lookupd([{"broadcast_address": fake_nsqd.host, "tcp_port": fake_nsqd.port, "http_port": 1}])
    if found == "lookupd":
        reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=spy)
    else:
        reader = Reader(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses=target, backend=spy)
        reader.reconnect_base = 0.02
    try:
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            reader.start()
            assert spy.refused.wait(WAIT)
            with reader._lock:  # (taken once the refused spawn's section is over)
                assert target not in reader._connecting and target not in reader._queued
            if found == "lookupd":
                assert reader.conns == {} and spy.spawned == 0
                reader.query_lookupd()  # the next poll tries it again
            # (nsqd_tcp_addresses: tried again after a reconnect delay)
            fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        assert list(reader.conns) == [target]
        warned = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
        assert len(warned) == 1 and f"could not start 1 connection attempt(s), to {target}: RuntimeError" in warned[0], warned
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_a_lookupd_answer_is_used_up_to_max_lookupd_producers(backend: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import nsq_sync.reader

    monkeypatch.setattr(nsq_sync.reader, "MAX_LOOKUPD_PRODUCERS", 3, raising=False)
    tarpit = _Tarpit(5)
    lookupd = _Lookupd(tarpit.producers)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60,
        backend=backend, timeout=30,
    )  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            reader.start()
            used = reader.query_lookupd()
        assert used == [("127.0.0.1", p["tcp_port"]) for p in tarpit.producers[:3]]
        with reader._lock:
            assert sorted(reader._connecting) == sorted(f"127.0.0.1:{p['tcp_port']}" for p in tarpit.producers[:3])
        assert reader.stats()["lookupd"][0]["producers"] == 5  # (what it listed)
        assert any("lists 5 producers; using the first 3" in r.getMessage() for r in caplog.records)
    finally:
        tarpit.close()  # (first: attempts stuck in it would hold up close())
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


@pytest.mark.parametrize("payload", [[1, 2], {"channels": []}], ids=["a list", "no producers key"])
def test_lookupd_answer_of_the_wrong_shape_is_that_lookupd_failing(backend: str, caplog: pytest.LogCaptureFixture, payload: Any) -> None:
    # it used to be read as "no producers" without a word (the next lookupd was not asked)
    lookupd = _Lookupd([], payload=payload)
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=backend)
    try:
        with caplog.at_level(logging.WARNING, logger="nsq_sync.reader"):
            assert reader.query_lookupd() == []
        (failed,) = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.reader"]
        assert f"lookupd {lookupd.address} query failed: HTTP 200: not an nsqlookupd /lookup answer" in failed
        assert lookupd.requests == 1
    finally:
        reader.close(5)
        lookupd.stop()


# ------------------------------------------- lookupd: asking again after a failed poll
def _producer(server: FakeNsqd) -> Dict[str, Any]:
    return {"broadcast_address": server.host, "tcp_port": server.port, "http_port": 1}


def _gaps(times: List[float]) -> List[float]:
    return [round(later - earlier, 3) for earlier, later in zip(times, times[1:])]


def test_a_lookupd_down_when_the_reader_starts_is_asked_again_within_seconds(fake_nsqd: FakeNsqd, backend: str) -> None:
    # docker-compose start-up order: nsqlookupd came up 1 s after the Reader, whose first poll
    # had failed, and the next poll came a whole lookupd_poll_interval later (60-78 s): nothing
    # was consumed for over a minute.
    lookupd = _Lookupd([_producer(fake_nsqd)], listening=False)
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=backend)
    try:
        reader.start()
        wait_until(lambda: reader.stats()["lookupd"][0]["failed_queries"] == 1, WAIT, message="the first query to fail")
        failed = time.monotonic()
        lookupd.listen()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        took = time.monotonic() - failed
        assert took < 1.3 + 1.5, took  # the retry: lookupd_retry_base (1 s) x (1 + 0.3 jitter) after the failure
        (health,) = reader.stats()["lookupd"]
        assert lookupd.requests == 1
        assert (health["queries"], health["failed_queries"], health["producers"]) == (2, 0, 1)
        assert health["last_success"] is not None and "connection refused" in health["last_error"]
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def _quick_retry_reader(lookupd: "_Lookupd", backend: str) -> Reader:
    """A Reader polling *lookupd* every 1 s without jitter, retrying failed polls from 0.1 s."""
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=1.0, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.lookupd_retry_base = 0.1
    return reader


def test_failed_lookupd_polls_are_retried_sooner_each_time_longer_until_one_answers(fake_nsqd: FakeNsqd, backend: str) -> None:
    # An HTTP error, a body that is not JSON and one that is no /lookup answer are failed
    # queries alike. The retries wait lookupd_retry_base (lowered here), then twice as long
    # each time; after an answer the polls are lookupd_poll_interval apart again.
    failures = [(500, b'{"message":"INTERNAL_ERROR"}'), (200, b"<html>starting</html>"), (200, b"[1, 2]")]
    lookupd = _Lookupd([_producer(fake_nsqd)], failures=failures)
    reader = _quick_retry_reader(lookupd, backend)
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)  # found by the fourth query
        (health,) = reader.stats()["lookupd"]
        assert (health["queries"], health["failed_queries"], health["producers"]) == (4, 0, 1)
        assert "not an nsqlookupd /lookup answer" in health["last_error"]
        wait_until(lambda: lookupd.requests >= 6, WAIT, message="two polls after the answer")
        gaps = _gaps(lookupd.times[:6])
        for gap, want in zip(gaps, [0.1, 0.2, 0.4, 1.0, 1.0]):
            assert want * 0.9 <= gap < want + 0.4, gaps
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_after_a_failed_lookupd_poll_answers_listing_no_nsqd_keep_the_quicker_schedule(fake_nsqd: FakeNsqd, backend: str) -> None:
    # nsqlookupd keeps its registrations in memory: one back from an outage lists no nsqd until
    # they register again, at their next ping (15 s). Its first answer (TOPIC_NOT_FOUND, or an
    # empty list) ended the retries, and the nsqd were found a whole poll interval later.
    failures = [
        (500, b'{"message":"INTERNAL_ERROR"}'),
        (404, b'{"message":"TOPIC_NOT_FOUND"}'),
        (200, b'{"channels":[],"producers":[]}'),
    ]
    lookupd = _Lookupd([_producer(fake_nsqd)], failures=failures)
    reader = _quick_retry_reader(lookupd, backend)
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        (health,) = reader.stats()["lookupd"]
        assert (health["queries"], health["failed_queries"], health["producers"]) == (4, 0, 1)
        assert "INTERNAL_ERROR" in health["last_error"]  # (the empty answers were answers)
        wait_until(lambda: lookupd.requests >= 5, WAIT, message="a poll after the answer")
        gaps = _gaps(lookupd.times[:5])
        for gap, want in zip(gaps, [0.1, 0.2, 0.4, 1.0]):
            assert want * 0.9 <= gap < want + 0.4, gaps
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


@pytest.mark.parametrize("dead", [False, True], ids=["one lookupd listing no nsqd", "a dead lookupd and one that answers"])
def test_a_poll_that_gets_an_answer_waits_the_whole_poll_interval(fake_nsqd: FakeNsqd, backend: str, dead: bool) -> None:
    # Only a poll in which no nsqlookupd answered is retried sooner: an answer listing no nsqd
    # is an answer, and a dead lookupd whose turn comes is followed, in the same poll, by one
    # that answers (the dead one is asked at most once a poll, as before).
    healthy = _Lookupd([_producer(fake_nsqd)] if dead else [])
    lookupds = [healthy] + ([_Lookupd([], listening=False)] if dead else [])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=[lookupd.address for lookupd in lookupds],
        lookupd_poll_interval=0.5, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.lookupd_retry_base = 0.02  # (a poll taken for a failed one would come 0.02 s later)
    try:
        reader.start()
        wait_until(lambda: healthy.requests >= 5, WAIT, message="five polls")
        stats = {health["address"]: health for health in reader.stats()["lookupd"]}
        polls = healthy.requests
        assert min(_gaps(healthy.times)) >= 0.45, _gaps(healthy.times)
        assert stats[healthy.address]["failed_queries"] == 0
        if dead:
            assert fake_nsqd.sessions and reader.conns
            refused = stats[lookupds[1].address]
            assert 1 <= refused["queries"] <= polls + 1 and refused["failed_queries"] == refused["queries"], (refused, polls)
    finally:
        reader.close(5)
        for lookupd in lookupds:
            lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_close_ends_the_wait_before_a_lookupd_retry(backend: str) -> None:
    lookupd = _Lookupd([], listening=False)
    reader = Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, lookupd_poll_interval=60, backend=backend)
    reader.lookupd_retry_base = 30.0
    try:
        reader.start()
        wait_until(lambda: reader.stats()["lookupd"][0]["failed_queries"] == 1, WAIT, message="the first query to fail")
        began = time.monotonic()
        reader.close(5)
        assert reader.join(5)
        took = time.monotonic() - began
        assert took < 2, took  # (the retry was 30 s away)
        assert live_tasks() == []  # the lookupd task too
        assert reader.stats()["lookupd"][0]["queries"] == 1
    finally:
        reader.close(1)
        lookupd.stop()


# ------------------------------- lookupd: asking again after a discovered nsqd was lost
def _times_after(lookupd: "_Lookupd", began: float) -> List[float]:
    return [at for at in list(lookupd.times) if at > began]


def test_after_discovered_nsqd_are_lost_lookupd_is_asked_again_sooner_on_one_schedule(fake_nsqd: FakeNsqd, backend: str) -> None:
    # User review (real nsqd): the close triggered one query, which came while nsqd was still
    # down (not listed), and the next came a whole poll interval later. Now the failed-poll
    # schedule runs (lookupd_retry_base, doubling) until the interval is reached; two nsqd
    # lost at once share it (no more queries than for one).
    second = FakeNsqd().start()
    lookupd = _Lookupd([_producer(fake_nsqd), _producer(second)])
    reader = _quick_retry_reader(lookupd, backend)
    try:
        reader.start()
        wait_until(lambda: len(reader.conns) == 2, WAIT, message="both nsqd connected")
        polled = lookupd.requests
        wait_until(lambda: lookupd.requests > polled, WAIT, message="a poll")  # (the next is a whole interval away)
        lookupd.producers = []  # restarting: nsqlookupd no longer lists them
        lost = time.monotonic()
        fake_nsqd.close_client()
        second.close_client()
        wait_until(lambda: not reader.conns, WAIT, message="both connections gone")
        wait_until(lambda: len(_times_after(lookupd, lost)) >= 7, WAIT, message="seven polls after the close")
        gaps = _gaps(_times_after(lookupd, lost)[:7])
        # after the query the closes triggered: 0.1, 0.2, 0.4, 0.8 s, then (1.6 s would pass
        # the interval) every lookupd_poll_interval again
        for gap, want in zip(gaps, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
            assert want * 0.9 <= gap < want + 0.4, gaps
    finally:
        reader.close(5)
        lookupd.stop()
        second.stop()
    assert reader.join(10) and live_tasks() == []


def test_once_the_lost_nsqd_is_connected_again_lookupd_is_polled_every_interval_again(fake_nsqd: FakeNsqd, backend: str) -> None:
    lookupd = _Lookupd([_producer(fake_nsqd)])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=2.0, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.lookupd_retry_base = 0.1
    try:
        reader.start()
        wait_until(lambda: len(reader.conns) == 1, WAIT, message="connected")
        lookupd.producers = []
        lost = time.monotonic()
        fake_nsqd.close_client()
        wait_until(lambda: len(_times_after(lookupd, lost)) >= 2, WAIT, message="the query the close triggered and a retry")
        lookupd.producers = [_producer(fake_nsqd)]  # back (registered again)
        listed = time.monotonic()
        wait_until(lambda: len(reader.conns) == 1, WAIT, message="connected again")
        back = time.monotonic()
        assert back - listed < 0.2 + 0.4 + 0.5, back - listed  # the next retry (0.2 s) found it, not the next poll (2 s)
        wait_until(lambda: len(_times_after(lookupd, back)) >= 2, WAIT, message="two polls after the reconnection")
        later = _times_after(lookupd, back)
        assert later[1] - later[0] >= 1.8, _gaps(_times_after(lookupd, lost))  # (at most one retry was on its way)
        assert len(_times_after(lookupd, lost)) <= 2 + 2 + 2, _gaps(_times_after(lookupd, lost))
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def reader_of_a_refusing_discovered_nsqd(backend: str, poll_interval: float) -> Tuple[Reader, Any, socket.socket, int]:
    """A Reader (not started) whose fake nsqlookupd lists one nsqd that refuses every connection:
    (the Reader, the lookupd, the bound socket that refuses, its port). Close all three after."""
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # (bound, not listening: a connection is refused)
    port = refusing.getsockname()[1]
    lookupd = _Lookupd([{"broadcast_address": "127.0.0.1", "tcp_port": port, "http_port": 1}])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=poll_interval, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.lookupd_retry_base = 0.1
    return reader, lookupd, refusing, port


def test_a_failed_first_attempt_to_a_discovered_nsqd_starts_the_quicker_schedule_once(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    # User review (real nsqd 1.3.0): an nsqd the Reader found through lookupd but whose first
    # connection attempt failed (restarting, or frozen through the handshake, at that moment)
    # was tried again only at the next poll, 60-78 s later. The failure now starts the
    # lost-nsqd schedule like a lost connection; an nsqd lookupd keeps listing that refuses
    # every attempt starts it once (not at every failure: no poll every second for it).
    reader, lookupd, refusing, port = reader_of_a_refusing_discovered_nsqd(backend, poll_interval=2.0)
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    try:
        reader.start()
        wait_until(lambda: lookupd.requests >= 9, WAIT + 5, message="nine polls")
        gaps = _gaps(lookupd.times[:9])
        # the failure right after the first poll asks again 1 s after it (an early query waits
        # that long after the last one), then 0.1 ... 1.6 s, every answer listing the nsqd and
        # every attempt refused, none restarting the schedule; then (3.2 s would pass the
        # interval) every lookupd_poll_interval. Before: every 2 s from the first poll on.
        for gap, want in zip(gaps, [1.0, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]):
            assert want * 0.9 <= gap < want + 0.4, gaps
        refused = [r for r in caplog.records if r.getMessage().startswith(f"{reader.name}: cannot consume from 127.0.0.1:{port}")]
        assert lookupd.requests - 1 <= len(refused) <= lookupd.requests, (len(refused), lookupd.requests)  # one attempt per answer
        assert reader.conns == {}
    finally:
        reader.close(5)
        lookupd.stop()
        refusing.close()
    assert reader.join(10) and live_tasks() == []


def _schedule_lines(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and ("still not connected" in r.getMessage() or "has not listed" in r.getMessage() or "lost nsqd" in r.getMessage())]


def test_the_quicker_polls_for_an_nsqd_never_connected_do_not_call_it_lost_or_unlisted(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    # SRE review: "a lost nsqd is not connected again" was said of one never connected, and
    # "lookupd has not listed ['...'] again; back to polling" of one every answer listed.
    reader, lookupd, refusing, port = reader_of_a_refusing_discovered_nsqd(backend, poll_interval=0.4)
    caplog.set_level(logging.DEBUG, logger="nsq_sync.reader")
    try:
        reader.start()
        wait_until(lambda: any("back to polling" in line for line in _schedule_lines(caplog)), WAIT, message="the end of the quicker polls")
        lines = _schedule_lines(caplog)
        assert lines and all(f"127.0.0.1:{port} (not connected yet; listed, " in line for line in lines), lines
        assert not any("lost" in line or "not listed" in line for line in lines), lines
    finally:
        reader.close(5)
        lookupd.stop()
        refusing.close()
    assert reader.join(10) and live_tasks() == []


def test_the_quicker_polls_ending_in_the_poll_that_lists_the_lost_nsqd_again_say_so(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The schedule's last poll is the one whose answer lists the lost nsqd again: it is being
    # connected to as the end of the schedule is said, which said lookupd had not listed it.
    listed_from = [0]  # (set once the connection is lost: the request that lists it again)

    def producers(request: int) -> List[Dict[str, Any]]:
        return [_producer(fake_nsqd)] if not listed_from[0] or request >= listed_from[0] else []

    lookupd = _Lookupd(producers)
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=0.4, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.lookupd_retry_base = 0.1
    caplog.set_level(logging.DEBUG, logger="nsq_sync.reader")
    try:
        reader.start()
        wait_until(lambda: reader.conns, WAIT, message="connected")
        polled = lookupd.requests
        wait_until(lambda: lookupd.requests > polled, WAIT, message="a poll")  # (the next is a whole interval away)
        # the query the close triggers, then 0.1 and 0.2 s later: the third is the schedule's last
        listed_from[0] = lookupd.requests + 3
        fake_nsqd.close_client()
        wait_until(lambda: lookupd.requests >= listed_from[0] and reader.conns, WAIT, message="connected again")
        lines = _schedule_lines(caplog)
        assert not any("has not listed" in line or "not listed" in line and "back to polling" in line for line in lines), lines
        assert lines and all(f"{address(fake_nsqd)} (connection lost; " in line for line in lines), lines
        if "back to polling" in lines[-1]:  # (not said if the connection came first: nothing was waited for)
            assert lines[-1].endswith(f"still not connected: {address(fake_nsqd)} (connection lost; listed, connecting)"), lines
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


# ------------------------------------- lookupd: a Reader with nothing to consume from
def _nothing_warnings(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "nothing to consume from for" in r.getMessage()]


def _ended(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "with nothing to consume from" in r.getMessage()]


def test_a_reader_whose_lookupd_lists_no_nsqd_says_so_after_a_while_and_when_it_ends(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review (real nsqlookupd, a misspelled topic): 45 s with only the INFO "starting"
    # line, every "lookupd ... lists []" a DEBUG, stats() with no connection and no failed
    # query. A WARNING now says so once it has lasted no_producers_warn_after (at least two
    # polls: a consumer started before any producer is normal a while), then at most every
    # no_producers_warn_every; a WARNING says when it ends.
    lookupd = _Lookupd([])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=0.1, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.no_producers_warn_after = 0.5
    reader.no_producers_warn_every = 1.0
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    try:
        began = time.time()
        reader.start()
        wait_until(lambda: reader.stats()["no_producers_since"] is not None, WAIT, message="the first answer")
        assert began <= reader.stats()["no_producers_since"] <= time.time()
        wait_until(lambda: len(_nothing_warnings(caplog)) >= 2, WAIT, message="the warning, twice")
        first, second = _nothing_warnings(caplog)[:2]
        assert first.created - began >= 0.5 and second.created - first.created >= 1.0, (first.created - began, second.created - first.created)
        assert first.getMessage().startswith(f"{reader.name}: nothing to consume from for ")
        assert first.getMessage().endswith(
            f" s: no connection, and nsqlookupd {lookupd.address} list no nsqd for topic {TOPIC!r}. No nsqd has topic "
            f"{TOPIC!r} registered: a misspelled topic, or no producer has published to it yet (or the nsqd that had it "
            "are down); said again every 1 s while it lasts"
        ), first.getMessage()
        assert reader.stats()["connections"] == [] and reader.stats()["lookupd"][0]["failed_queries"] == 0
        lookupd.producers = [_producer(fake_nsqd)]  # a producer published: nsqd registered the topic
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        wait_until(lambda: _ended(caplog), WAIT, message="the end said")
        (line,) = _ended(caplog)
        assert line.startswith(f"{reader.name}: nsqlookupd {lookupd.address} lists 1 nsqd for it again, after "), line
        assert line.endswith(f" s with nothing to consume from (topic {TOPIC!r})"), line
        assert reader.stats()["no_producers_since"] is None
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == [] and reader.stats()["no_producers_since"] is None


def test_a_reader_whose_only_nsqd_is_gone_from_lookupd_says_so_and_when_it_is_back(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review: its only nsqd killed for 60 s: one WARNING "connection closed", then silence.
    lookupd = _Lookupd([_producer(fake_nsqd)])
    reader = _quick_retry_reader(lookupd, backend)
    reader.lookupd_poll_interval = 0.2
    reader.no_producers_warn_after = 0.5
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    try:
        reader.start()
        wait_until(lambda: reader.conns, WAIT, message="connected")
        assert reader.stats()["no_producers_since"] is None
        lookupd.producers = []  # killed: nsqlookupd dropped its registrations with its connection
        fake_nsqd.close_client()
        wait_until(lambda: _nothing_warnings(caplog), WAIT, message="the warning")
        assert reader.stats()["no_producers_since"] is not None and _ended(caplog) == []
        lookupd.producers = [_producer(fake_nsqd)]
        wait_until(lambda: reader.conns and _ended(caplog), WAIT, message="connected again")
        reconnected = [r.getMessage() for r in caplog.records if "reconnected to" in r.getMessage()]
        assert len(reconnected) == 1 and reconnected[0].endswith(" s down (1 attempt); subscribed to topic/channel"), reconnected
        assert reader.stats()["no_producers_since"] is None
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


def test_nothing_to_consume_from_is_not_warned_about_while_connected_to_a_direct_nsqd(fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    lookupd = _Lookupd([])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address, nsqd_tcp_addresses=address(fake_nsqd),
        lookupd_poll_interval=0.05, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    reader.no_producers_warn_after = 0.3  # (the first answers may come before the connection)
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    try:
        reader.start()
        fake_nsqd.wait_for_command("RDY 1", timeout=WAIT)
        wait_until(lambda: lookupd.requests >= 12, WAIT, message="polls past the warning's delay")
        assert _nothing_warnings(caplog) == [] and reader.stats()["no_producers_since"] is None
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


# -------------------------------- lookupd: nsqd it lists that the Reader cannot reach
UNRESOLVABLE = "nsqd-0.nsqd.default.svc.cluster.local.invalid"  # (.invalid: never resolves, RFC 2606)


def test_a_listed_nsqd_that_cannot_be_reached_is_in_stats_and_its_warning_says_where_it_came_from(
    fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # SRE review (real nsqd 1.3.0, --broadcast-address a Kubernetes name the consumer cannot
    # resolve): stats() showed one healthy connection while 50 messages sat on the other nsqd
    # for 90 s, and the warning did not say where the address came from.
    bad = f"{UNRESOLVABLE}:4150"
    lookupd = _Lookupd([_producer(fake_nsqd), {"broadcast_address": UNRESOLVABLE, "tcp_port": 4150, "http_port": 4151}])
    reader = Reader(
        TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses=lookupd.address,
        lookupd_poll_interval=0.5, lookupd_poll_jitter=0, backend=backend,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    began = time.time()
    try:
        reader.start()
        wait_until(lambda: reader.stats()["unreachable"] and reader.conns, WAIT, message="the unreachable nsqd in stats()")
        stats = reader.stats()
        assert [c["address"] for c in stats["connections"]] == [address(fake_nsqd)]
        (entry,) = stats["unreachable"]
        assert (entry["address"], entry["lookupd"]) == (bad, lookupd.address) and entry["failed_attempts"] >= 1, entry
        assert began <= entry["since"] <= time.time() and f"cannot connect to {bad}" in entry["last_error"], entry
        warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{reader.name}: cannot consume from {bad}: "))
        assert warning.endswith(
            f"; nsqlookupd {lookupd.address} announced this address as that nsqd's broadcast address and TCP port: check "
            "that nsqd's --broadcast-address (default: its hostname), which must be one this host can resolve and reach"
        ), warning
        # Each answer listing it is one more attempt; it goes once lookupd no longer lists it.
        wait_until(lambda: reader.stats()["unreachable"][0]["failed_attempts"] >= 2, WAIT, message="a second failed attempt")
        lookupd.producers = [_producer(fake_nsqd)]
        wait_until(lambda: reader.stats()["unreachable"] == [], WAIT, message="the nsqd no longer listed to leave stats()")
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == [] and reader.stats()["unreachable"] == []


def test_a_listed_nsqd_leaves_the_unreachable_ones_once_connected(fake_nsqd: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    fake_nsqd.set_answer("IDENTIFY", [error("E_INVALID not now"), closing()], times=2)
    lookupd = _Lookupd([_producer(fake_nsqd)])
    reader = _quick_retry_reader(lookupd, backend)
    caplog.set_level(logging.WARNING, logger="nsq_sync.reader")
    try:
        reader.start()
        wait_until(lambda: reader.stats()["unreachable"], WAIT, message="the refused nsqd in stats()")
        (entry,) = reader.stats()["unreachable"]
        assert entry["address"] == address(fake_nsqd) and "E_INVALID" in entry["last_error"], entry
        fake_nsqd.wait_for_command("RDY 1", session=fake_nsqd.wait_connected(count=3, timeout=WAIT), timeout=WAIT)
        wait_until(lambda: reader.conns, WAIT, message="connected")
        assert reader.stats()["unreachable"] == []
        # It answered, so it was reachable: where the address came from, but no DNS/routing hint.
        warning = next(r.getMessage() for r in caplog.records if "cannot consume from" in r.getMessage())
        assert warning.endswith(f"; nsqlookupd {lookupd.address} announced this address as that nsqd's broadcast address"), warning
    finally:
        reader.close(5)
        lookupd.stop()
    assert reader.join(10) and live_tasks() == []


# ------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({}, "nsqd_tcp_addresses"),
        ({"nsqd_tcp_addresses": "nohostport"}, "nsqd_tcp_addresses"),
        ({"nsqd_tcp_addresses": ["127.0.0.1:0"]}, "nsqd_tcp_addresses"),
        ({"nsqd_tcp_addresses": [b"127.0.0.1:4150"]}, "nsqd_tcp_addresses"),
        ({"lookupd_http_addresses": "ftp://x:1"}, "lookupd_http_addresses"),
        ({"nsqd_tcp_addresses": "h:1", "max_in_flight": -1}, "max_in_flight"),
        ({"nsqd_tcp_addresses": "h:1", "max_tries": -1}, "max_tries"),
        ({"nsqd_tcp_addresses": "h:1", "lookupd_poll_jitter": 2}, "lookupd_poll_jitter"),
        ({"nsqd_tcp_addresses": "h:1", "concurrency": 0}, "concurrency"),
        ({"nsqd_tcp_addresses": "h:1", "max_backoff_duration": -1}, "max_backoff_duration"),
        ({"nsqd_tcp_addresses": "h:1", "heartbeat_interval": 0.5}, "heartbeat_interval"),
        ({"nsqd_tcp_addresses": "h:1", "worker_pool": None}, "worker_pool"),
    ],
)
def test_bad_config_raises_config_error_naming_the_parameter(kwargs: Dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError) as info:
        Reader(TOPIC, CHANNEL, lambda m: True, **kwargs)
    assert info.value.param == param


def test_arguments_after_the_handler_are_keyword_only() -> None:
    # pynsq's positional order (name fourth, then the addresses) must not be misread as ours:
    # Reader("t", "c", handler, None, ["127.0.0.1:4150"]) took the nsqd address for nsqlookupd.
    with pytest.raises(TypeError):
        Reader(TOPIC, CHANNEL, lambda m: True, None, ["127.0.0.1:4150"])  # type: ignore[misc]


def test_a_disabled_attribute_that_is_no_method_is_left_alone() -> None:
    class Flagged(Reader):
        disabled = False  # (an attribute of the subclass's own, not pynsq's method)

    reader = Flagged(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses="127.0.0.1:4150")  # (no TypeError)
    assert reader.disabled is False
    reader.close()


def test_a_result_whose_truth_value_raises_still_finishes(fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader]) -> None:
    # A numpy array or a DataFrame returned by a handler: bool() raises. The message finishes,
    # as any non-False result does, instead of staying in flight until nsqd times it out.
    class Ambiguous:
        def __bool__(self) -> bool:
            raise ValueError("the truth value of an array with more than one element is ambiguous")

    reader = make_reader(fake_nsqd, lambda message: Ambiguous(), max_in_flight=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    msg = fake_nsqd.enqueue(b"x")
    fake_nsqd.wait_for_command("FIN")
    assert [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"REQ"))] == [b"FIN " + msg.id]


def test_a_subclass_with_pynsqs_disabled_is_refused() -> None:
    class Paused(Reader):
        def disabled(self) -> bool:
            return True

    with pytest.raises(TypeError, match="set_max_in_flight"):
        Paused(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses="127.0.0.1:4150")


def test_bad_names_and_unknown_kwargs() -> None:
    with pytest.raises(ConfigError) as info:
        Reader("bad topic", CHANNEL, lambda m: True, nsqd_tcp_addresses="h:1")
    assert info.value.param == "topic"
    with pytest.raises(ConfigError) as info:
        Reader(TOPIC, "", lambda m: True, nsqd_tcp_addresses="h:1")
    assert info.value.param == "channel"
    with pytest.raises(TypeError, match="no_such_option"):
        Reader(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses="h:1", no_such_option=1)
    with pytest.raises(TypeError):
        Reader(TOPIC, CHANNEL, "not callable", nsqd_tcp_addresses="h:1")  # type: ignore[arg-type]
    reader = Reader(TOPIC, CHANNEL, nsqd_tcp_addresses=["h:1", "[::1]:4150"])
    assert reader.nsqd_tcp_addresses == ["h:1", "[::1]:4150"]
    with pytest.raises(ConfigError) as info:
        reader.start()  # neither a handler nor process_message()
    assert info.value.param == "message_handler"
    reader.close()


# ------------------------------------------------------------ Message.auto_touch()
def touching_reader(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], interval: float, body: bytes, inside: Callable[[Any], None] = lambda message: None
) -> Tuple[Reader, Any, List[Any], threading.Event]:
    """A started Reader (max_in_flight 1) whose handler runs ``inside(message)`` within
    ``message.auto_touch(interval)`` and then waits for the returned event, and *body* sent
    to it: (the Reader, that message as the fake sent it, the keep-alives the handler used, the event)."""
    keepers: List[Any] = []
    release = threading.Event()

    def handler(message: Any) -> bool:
        keeper = message.auto_touch(interval)
        keepers.append(keeper)
        with keeper:
            inside(message)
            assert release.wait(2 * WAIT)
        return True

    reader = make_reader(fake_nsqd, handler, max_in_flight=1)
    reader.start()
    fake_nsqd.wait_for_command("RDY 1")
    return reader, fake_nsqd.send_message(body), keepers, release


def test_auto_touch_touches_while_the_block_runs_and_never_after_the_answer(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], quick_auto_touch: Callable[[], None]
) -> None:
    # A block longer than msg_timeout: TOUCH every interval while it runs, none once it ended
    # (the FIN is the last word on the message).
    fake_nsqd.identify_response["msg_timeout"] = 1000  # ms
    _, message, keepers, release = touching_reader(fake_nsqd, make_reader, 0.2, b"long job")
    try:
        fake_nsqd.wait_for_command("TOUCH", count=3)
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN")
    quick_auto_touch()
    sent = [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"TOUCH"))]
    assert sent[-1] == b"FIN " + message.id
    assert set(sent[:-1]) == {b"TOUCH " + message.id} and len(sent) - 1 == keepers[0].touches >= 3


def test_auto_touch_stops_with_a_warning_at_max_msg_timeout(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], quick_auto_touch: Callable[[], None], caplog: Any
) -> None:
    # nsqd keeps a message in flight at most max_msg_timeout from delivery, touched or not:
    # with msg_timeout 1 s and max_msg_timeout 1.5 s, the touches at 0.3 and 0.6 s gain
    # time; one at 0.9 s would gain nothing (1.6 s is past the cap), so touching stops there
    # and a warning says when nsqd times the message out.
    caplog.set_level(logging.WARNING)
    fake_nsqd.identify_response.update(msg_timeout=1000, max_msg_timeout=1500)  # ms
    _, message, keepers, release = touching_reader(fake_nsqd, make_reader, 0.3, b"too long a job")
    try:
        wait_until(lambda: any("max_msg_timeout" in r.getMessage() for r in caplog.records), WAIT, message="the warning")
        quick_auto_touch()
        touches = [c for c in lines(fake_nsqd) if c.startswith(b"TOUCH")]
    finally:
        release.set()
    fake_nsqd.wait_for_command("FIN")
    assert touches == [b"TOUCH " + message.id] * 2 and keepers[0].touches == 2
    warning = next(r.getMessage() for r in caplog.records if "max_msg_timeout" in r.getMessage())
    assert "auto_touch() stops" in warning and "1.5 s" in warning, warning


def test_auto_touch_stops_once_the_message_is_answered_inside_the_block(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], quick_auto_touch: Callable[[], None]
) -> None:
    fake_nsqd.identify_response["msg_timeout"] = 1000  # ms

    def inside(message: Any) -> None:
        fake_nsqd.wait_for_command("TOUCH")
        assert message.finish() is True

    reader, message, keepers, release = touching_reader(fake_nsqd, make_reader, 0.2, b"answered early", inside)
    try:
        fake_nsqd.wait_for_command("FIN")
        quick_auto_touch()  # (while the block still runs)
    finally:
        release.set()
    wait_until(lambda: reader.stats()["messages_finished"] == 1, WAIT, message="the finish counted")
    assert [c for c in lines(fake_nsqd) if c.startswith((b"FIN", b"TOUCH"))] == [b"TOUCH " + message.id, b"FIN " + message.id]
    assert keepers[0].touches == 1


def test_auto_touch_stops_quietly_when_the_connection_ends(
    fake_nsqd: FakeNsqd, make_reader: Callable[..., Reader], quick_auto_touch: Callable[[], None], caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync.message")
    fake_nsqd.identify_response["msg_timeout"] = 1000  # ms

    def inside(message: Any) -> None:
        fake_nsqd.wait_for_command("TOUCH")
        fake_nsqd.close_client()
        wait_until(lambda: message._responder.state != "CONNECTED", WAIT, message="the connection ended")

    _, _, keepers, release = touching_reader(fake_nsqd, make_reader, 0.2, b"connection lost", inside)
    try:
        wait_until(lambda: keepers, WAIT, message="the block entered")
        quick_auto_touch()
    finally:
        release.set()
    assert keepers[0].touches == 1
    assert not [r for r in caplog.records if r.name == "nsq_sync.message"], caplog.records  # (the Reader says the connection ended)


def test_close_waits_one_second_of_grace_for_all_stuck_attempts_not_one_each(backend: str) -> None:
    # Chaos review: connection attempts stuck in their handshake (an nsqd that accepts and never
    # answers) were joined one after another, each with up to 1 s past close()'s timeout:
    # close(0.5) took 4.5 s with 4 of them. The grace is one second for them all.
    tarpit = _Tarpit(4)
    addresses = [f"127.0.0.1:{p['tcp_port']}" for p in tarpit.producers]
    reader = Reader(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses=addresses, timeout=8, max_in_flight=4, backend=backend)
    try:
        reader.start()
        wait_until(lambda: _connect_tasks() == 4, WAIT, message="four attempts waiting in their handshake")
        began = time.monotonic()
        reader.close(0.5)
        took = time.monotonic() - began
    finally:
        tarpit.close()  # (resets them: the attempts end)
    assert took < 0.5 + 1.0 + 0.5, took  # (4 x 1 s of grace before)
    assert reader.join(WAIT)
    # (the attempts still in their handshake end on their own, within the connection timeout)
    wait_until(lambda: live_tasks() == [], WAIT, message="the stuck attempts ended")

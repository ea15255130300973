"""RDY moving between connections never lets the total exceed max_in_flight on the servers,
with latency too; the backoff test's RDY 1 goes where messages are.

nsqd applies a RDY only when it reads it, and messages it sent under the old value may still be
on their way: a lowered RDY counts as used until the connection's round trip (measured at SUB)
has passed, not a fixed 0.1 s, and whichever pass looks. The fakes answer SUB late to stand
for a slow network; the checks model an nsqd that applies RDY that much late.

No sleeps where an event can be awaited: waits are on what a fake received (the SUB answers are
held back on purpose, to make the round trip the Reader measures).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator, List, Tuple

from fake_nsqd import DEFAULT, FakeNsqd
from tasks import live_tasks

from nsq_sync.backoff import ExponentialBackoff
from nsq_sync.reader import Reader
from nsq_sync.testing import wait_until

WAIT = 10.0
ROUND_TRIP = 0.3


class RdyLog:
    """Every RDY the fakes applied, in order: (time, fake index, value)."""

    def __init__(self, servers: List[FakeNsqd]) -> None:
        self.lock = threading.Lock()
        self.entries: List[Tuple[float, int, int]] = []
        for index, server in enumerate(servers):
            server.set_answer("RDY", self._track(index))

    def _track(self, index: int) -> Any:
        def track(session: Any, command: Any) -> None:
            with self.lock:
                self.entries.append((time.monotonic(), index, session.rdy))
            return None  # no answer to RDY, as nsqd

        return track

    def values(self, index: int) -> List[int]:
        with self.lock:
            return [value for _, i, value in self.entries if i == index]

    def honoured_peak(self, late: float) -> int:
        """The highest total an nsqd that applies each RDY *late* seconds after it arrived
        (and whose messages sent under the old value arrive as late) may have in flight:
        at each RDY, per fake the last value older than *late* or any value newer than that."""
        with self.lock:
            entries = list(self.entries)
        peak = 0
        for now, _, _ in entries:
            total = 0
            for index in {i for _, i, _ in entries}:
                mine = [(t, v) for t, i, v in entries if i == index and t <= now]
                older = [v for t, v in mine if t <= now - late]
                newer = [v for t, v in mine if t > now - late]
                total += max(older[-1:] + newer, default=0)
            peak = max(peak, total)
        return peak


@contextlib.contextmanager
def closed_after(reader: Reader, servers: List[FakeNsqd]) -> Iterator[None]:
    """Run the block, then close the Reader gracefully (joined); on any exit stop the fakes."""
    try:
        yield
        reader.close(5)
        assert reader.join(WAIT)
    finally:
        reader.close(1)
        for server in servers:
            server.stop()


def late_sub(delay: float) -> Any:
    """A SUB answer that takes *delay* seconds: the round trip the Reader measures."""
    pause = threading.Event()

    def answer(session: Any, command: Any) -> Any:
        pause.wait(delay)
        return DEFAULT

    return answer


def test_a_lowered_rdy_is_counted_for_the_measured_round_trip_before_another_connection_gets_it(backend: str) -> None:
    servers = [FakeNsqd().start() for _ in range(3)]
    log = RdyLog(servers)
    for server in servers:
        server.set_answer("SUB", late_sub(ROUND_TRIP))
    reader = Reader(
        "topic", "channel", lambda m: True,
        nsqd_tcp_addresses=[f"127.0.0.1:{servers[0].port}"],
        backend=backend,
        max_in_flight=2,
        low_rdy_idle_timeout=60,  # no redistribution by the periodic pass during the test
        rdy_redistribute_interval=60,
    )  # fmt: skip
    with closed_after(reader, servers):
        reader.start()
        servers[0].wait_for_command("RDY 2", timeout=WAIT)
        # Two more connections, one after the other: the first lowers RDY 2 to 1 on the old
        # one, the second comes a moment later (a pass that must not count that RDY as 1 yet).
        reader.connect_to_nsqd("127.0.0.1", servers[1].port)
        reader.connect_to_nsqd("127.0.0.1", servers[2].port)
        lowered = servers[0].wait_for_command("RDY 1", timeout=WAIT)
        wait_until(lambda: 1 in log.values(1) + log.values(2), WAIT, message="RDY 1 on a new connection")
        raised = min(t for t, i, v in log.entries if i in (1, 2) and v == 1)
        # The capacity RDY 1 freed went elsewhere only after a round trip to its nsqd (and more).
        assert raised - lowered.time >= ROUND_TRIP, log.entries
        assert log.honoured_peak(ROUND_TRIP) <= 2, log.entries
        assert reader.stats()["total_rdy"] == 2
    assert live_tasks() == []


def test_connections_found_together_get_their_shares_at_once(backend: str) -> None:
    """The nsqd_tcp_addresses of start(): no connection is given all of max_in_flight because
    it subscribed first, to be lowered (and the others kept waiting) as the rest come."""
    servers = [FakeNsqd().start() for _ in range(3)]
    log = RdyLog(servers)
    servers[0].set_answer("SUB", late_sub(0.2))  # (the last to subscribe: no order is relied on)
    reader = Reader(
        "topic", "channel", lambda m: True,
        nsqd_tcp_addresses=[f"127.0.0.1:{s.port}" for s in servers],
        backend=backend,
        max_in_flight=6,
    )  # fmt: skip
    with closed_after(reader, servers):
        reader.start()
        for server in servers:
            server.wait_for_command("RDY 2", timeout=WAIT)
        for index in range(3):
            assert log.values(index) == [2], log.entries


def test_a_first_attempt_that_fails_hands_its_share_to_the_others(backend: str) -> None:
    servers = [FakeNsqd().start() for _ in range(2)]
    gone = FakeNsqd().start()
    refused = gone.port
    gone.stop()  # nobody listens there any more: that attempt is refused
    reader = Reader(
        "topic", "channel", lambda m: True,
        nsqd_tcp_addresses=[f"127.0.0.1:{s.port}" for s in servers] + [f"127.0.0.1:{refused}"],
        backend=backend,
        max_in_flight=6,
    )  # fmt: skip
    reader.reconnect_base = 30.0  # (no second attempt during the test)
    with closed_after(reader, servers):
        reader.start()
        for server in servers:
            server.wait_for_command("RDY 3", timeout=WAIT)
        assert reader.stats()["total_rdy"] == 6


# ------------------------------------------------------- the backoff test's RDY 1
def backoff_reader(servers: List[FakeNsqd], handler: Any, backend: str, **kwargs: Any) -> Reader:
    kwargs.setdefault("low_rdy_idle_timeout", 60)
    return Reader(
        "topic", "channel", handler,
        nsqd_tcp_addresses=[f"127.0.0.1:{s.port}" for s in servers],
        backend=backend,
        max_in_flight=len(servers),
        backoff_strategy=ExponentialBackoff(multiplier=0.05, max_duration=1),
        **kwargs,
    )  # fmt: skip


def test_the_backoff_test_goes_to_the_connection_that_had_messages(backend: str) -> None:
    """Messages on one nsqd of four: every test RDY 1 of the backoff goes there (a random
    connection's nsqd, with nothing, would keep it low_rdy_idle_timeout before it moved)."""
    servers = [FakeNsqd().start() for _ in range(4)]
    log = RdyLog(servers)
    results = iter([False, False])  # level 1, 2, then successes down to 0: three tests at least

    def handler(message: Any) -> bool:
        return next(results, True)

    reader = backoff_reader(servers, handler, backend)
    with closed_after(reader, servers):
        reader.start()
        for server in servers:
            server.wait_for_command("RDY 1", timeout=WAIT)
        for index in range(10):  # (a message may come, and count for nothing, inside a window)
            servers[0].enqueue(b"m%d" % index)
        servers[0].wait_for_command("REQ", timeout=WAIT)
        with log.lock:
            start = len(log.entries)
        strays: List[Any] = []

        def over() -> bool:
            with log.lock:
                elsewhere = [entry for entry in log.entries[start:] if entry[1] != 0 and entry[2] == 1]
            level = reader.backoff_level  # (read after: once at 0 it stays there, no failure follows)
            if elsewhere and level > 0:
                strays.extend(elsewhere)  # a test RDY 1 on an nsqd without messages
                return True
            return level == 0 and len(servers[0].finished) >= 2

        wait_until(over, WAIT, message="backoff over, or a test on an nsqd without messages")
        assert strays == [], log.entries
        with log.lock:
            tests = [entry for entry in log.entries[start:] if entry[1] == 0 and entry[2] == 1]
        assert len(tests) >= 3, log.entries


def test_a_backoff_test_found_idle_does_not_come_back_before_every_other_was_tried(backend: str) -> None:
    """The test's nsqd runs dry: the test moves, and not back to one already found idle in this
    backoff episode while another is left to try (the first goes where the failure came from)."""
    servers = [FakeNsqd().start() for _ in range(4)]
    log = RdyLog(servers)
    results = iter([False])
    reader = backoff_reader(servers, lambda m: next(results, True), backend, low_rdy_idle_timeout=0.1, rdy_redistribute_interval=0.05)
    with closed_after(reader, servers):
        reader.start()
        for server in servers:
            server.wait_for_command("RDY 1", timeout=WAIT)
        servers[0].enqueue(b"fails")
        servers[0].wait_for_command("REQ", timeout=WAIT)
        with log.lock:
            start = len(log.entries)

        def tests() -> List[int]:
            with log.lock:
                return [i for _, i, v in log.entries[start:] if v == 1]

        wait_until(lambda: len(tests()) >= 4, WAIT, message="four backoff tests")
        assert tests()[0] == 0, log.entries
        assert sorted(tests()[:4]) == [0, 1, 2, 3], log.entries
        for server in servers:
            server.enqueue(b"ok")
        wait_until(lambda: reader.backoff_level == 0, WAIT, message="a success ends the backoff")

"""The Reader's RDY bookkeeping with hundreds of nsqd (tests/support/many_nsqd.py: one thread
serves them all): each connection that comes or goes costs O(1), not a pass over every
connection (discovering N nsqd was O(N^2) under the Reader's lock: 2N full passes), and the
sum of RDY the servers see never exceeds max_in_flight, with fair shares at the end.

Counts, not timings: how many full passes (``Reader._apply_rdy_locked``) ran, and how many
connections they looked at. No sleeps: the fakes' waits are on a condition their loop
notifies, the Reader's connection set on one its changes notify.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, List

import pytest
from many_nsqd import ManyNsqd
from tasks import live_tasks

from nsq_sync.reader import Reader

WAIT = 30.0
N = 300


class PassCounter:
    """Counts the Reader's full RDY passes and the connections each one looked at."""

    def __init__(self, reader: Reader) -> None:
        self.passes = 0
        self.visits = 0
        inner = reader._apply_rdy_locked

        def counted(revoke: bool = False) -> None:
            self.passes += 1
            self.visits += len(reader._conns)
            inner(revoke)

        reader._apply_rdy_locked = counted  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"<{self.passes} passes, {self.visits} connections visited>"


class ConnSet:
    """Wakes a waiter on each connection the Reader registers or forgets."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.changed = threading.Condition()
        # (_on_conn_close is taken from the instance when a connection is made: before start())
        for name in ("_register_locked", "_on_conn_close"):
            setattr(reader, name, self._notifying(getattr(reader, name)))

    def _notifying(self, inner: Any) -> Any:
        def notify(*args: Any, **kwargs: Any) -> None:
            inner(*args, **kwargs)
            with self.changed:
                self.changed.notify_all()

        return notify

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.reader._conns) == count, WAIT), f"{len(self.reader._conns)} connections, not {count}"


@pytest.fixture
def servers() -> Iterator[ManyNsqd]:
    server = ManyNsqd(N).start()
    try:
        yield server
    finally:
        server.stop()


def make_reader(servers: ManyNsqd, backend: str, max_in_flight: int) -> Reader:
    reader = Reader(
        "topic", "channel", lambda m: True,
        nsqd_tcp_addresses=servers.addresses,
        max_in_flight=max_in_flight,
        backend=backend,
        rdy_redistribute_interval=60,  # (no periodic pass during the test)
        low_rdy_idle_timeout=60,
    )  # fmt: skip
    reader.reconnect_base = 30.0  # (an nsqd gone is not tried again during the test)
    reader.conn_set = ConnSet(reader)  # type: ignore[attr-defined]
    return reader


@contextlib.contextmanager
def running(reader: Reader) -> Iterator[Reader]:
    """*reader* started; closed and joined when the block ends, leaving no task behind."""
    try:
        reader.start()
        yield reader
        reader.close(WAIT)
        assert reader.join(WAIT)
    finally:
        reader.close(1)
    assert live_tasks() == []


def assert_never_over(servers: ManyNsqd, max_in_flight: int) -> None:
    """The fakes never saw more RDY in total than max_in_flight, nor a bad command."""
    status = servers.status()
    assert status["peak_total_rdy"] <= max_in_flight and not status["bad"], status


def expected_rdy(connections: int, max_in_flight: int) -> List[int]:
    """Every connection's RDY once settled: an equal share, or RDY 1 on max_in_flight of them."""
    if connections <= max_in_flight:
        return [max_in_flight // connections] * connections
    return [0] * (connections - max_in_flight) + [1] * max_in_flight


def settled(servers: ManyNsqd, reader: Reader, connections: int, max_in_flight: int) -> Dict[int, int]:
    """Wait until the Reader has *connections* registered and the fakes see the settled RDY;
    return the fakes' RDY by port."""
    reader.conn_set.wait_for(connections)  # type: ignore[attr-defined]
    total = sum(expected_rdy(connections, max_in_flight))
    servers.wait_until(lambda s: s["subscribed"] == connections and s["total_rdy"] == total, timeout=WAIT)
    return servers.rdy_by_port()


@pytest.mark.parametrize("max_in_flight", [1000, 100], ids=["shares", "subset"])
def test_discovering_hundreds_of_nsqd_takes_one_rdy_pass_not_one_per_connection(servers: ManyNsqd, backend: str, max_in_flight: int) -> None:
    reader = make_reader(servers, backend, max_in_flight)
    counter = PassCounter(reader)
    with running(reader):
        rdy = settled(servers, reader, N, max_in_flight)
        # The first connection's pass; every later one is decided alone (it was 2N passes,
        # N*N connections visited: 600 and ~90,000 here).
        assert counter.passes <= 3 and counter.visits <= 3 * N, counter
        assert sorted(rdy.values()) == expected_rdy(N, max_in_flight)
        assert_never_over(servers, max_in_flight)
        assert reader.stats()["total_rdy"] == sum(expected_rdy(N, max_in_flight))


@pytest.mark.parametrize("max_in_flight", [1000, 100], ids=["shares", "subset"])
def test_hundreds_of_nsqd_going_away_leave_fair_shares_within_max_in_flight(servers: ManyNsqd, backend: str, max_in_flight: int) -> None:
    reader = make_reader(servers, backend, max_in_flight)
    with running(reader):
        settled(servers, reader, N, max_in_flight)
        counter = PassCounter(reader)
        servers.close_ports(servers.ports[: N - 100])  # 200 go at once (the RDY 1s of a subset among them)
        rdy = settled(servers, reader, 100, max_in_flight)
        assert sorted(rdy.values()) == expected_rdy(100, max_in_flight)
        assert_never_over(servers, max_in_flight)
        if max_in_flight == 1000:
            # Shares go 3 -> 10 in 7 steps: a pass at each (at most), none for the closes
            # in between (it was one per close: 200).
            assert counter.passes <= 50, counter


@pytest.mark.parametrize("max_in_flight", [1000, 100], ids=["shares", "subset"])
def test_hundreds_of_first_attempts_failing_hand_their_shares_to_the_others(servers: ManyNsqd, backend: str, max_in_flight: int) -> None:
    servers.close_ports(servers.ports[:100])  # those attempts are refused
    reader = make_reader(servers, backend, max_in_flight)
    counter = PassCounter(reader)
    with running(reader):
        rdy = settled(servers, reader, N - 100, max_in_flight)
        assert sorted(rdy.values()) == expected_rdy(N - 100, max_in_flight)
        assert_never_over(servers, max_in_flight)
        if max_in_flight == 1000:
            # Held-back shares of 3 become 5 as the refusals come (3 -> 4 -> 5: a pass at
            # each, at most); it was a pass per connection and per attempt ending: 500.
            assert counter.passes <= 50, counter

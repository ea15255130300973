"""Writer.stats(): what was published, what failed and why, and the state of each nsqd (against
the fake nsqd). Before, a Writer exposed nothing but ``conns``."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import pytest
from fake_nsqd import FakeNsqd, close, error, ok
from wsgi_servers import free_port

from nsq_sync.errors import BadTopicError, ConnectionClosedError, NoConnectionsError, TimeoutError
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
NO_FAILURES = {"timeout": 0, "server_error": 0, "no_connection": 0, "connection_closed": 0, "closed": 0, "other": 0}


def failed(**counts: int) -> Dict[str, int]:
    return {**NO_FAILURES, **counts}


def test_stats_count_published_and_failed_publishes_by_kind(fake: FakeNsqd, backend: str) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WAIT)
    try:
        assert writer.wait_connected(WAIT)
        stats = writer.stats()
        assert stats["published"] == 0 and stats["failed"] == NO_FAILURES and stats["closed"] is False
        assert stats["connections"] == [
            {"address": f"{fake.host}:{fake.port}", "connected": True, "down_since": None, "failed_attempts": 0, "last_error": None, "lanes": 0}
        ]
        # OK answers, blocking (pub, mpub: one each) and async
        writer.pub("t", b"a")
        writer.mpub("t", [b"b", b"c"])
        futures = [writer.pub_async("t", b"d"), writer.pub_async("t", b"e")]
        done = threading.Event()
        writer.pub("t", b"f", callback=lambda conn, data: done.set())
        assert [f.result(WAIT) for f in futures] == [b"OK", b"OK"] and done.wait(WAIT)
        assert writer.stats()["published"] == 5 and writer.stats()["failed"] == NO_FAILURES

        # nsqd's error: blocking, and async (the connection fails it: its Future is the publish's)
        fake.set_answer("PUB", [error("E_BAD_TOPIC PUB topic name is not valid"), close()], times=2)
        with pytest.raises(BadTopicError):
            writer.pub("t", b"g")
        assert writer.wait_connected(WAIT)
        wait_until(lambda: writer.conns and list(writer.conns.values())[0].connected(), timeout=WAIT)
        with pytest.raises(BadTopicError):
            writer.pub_async("t", b"h").result(WAIT)
        assert writer.stats()["failed"] == failed(server_error=2)

        # no answer within the timeout: a blocking publish and an async one (queued behind the
        # first, it is never sent); nsqd's late OK to the first counts as published: it stored it
        gate = threading.Event()
        fake.set_answer("PUB", lambda session, command: ok() if gate.wait(WAIT) else None, times=1)
        assert writer.wait_connected(WAIT)
        with pytest.raises(TimeoutError):
            writer.pub("t", b"i", timeout=0.2)
        with pytest.raises(TimeoutError):
            writer.pub_async("t", b"j", timeout=0.2).result(WAIT)
        assert writer.stats()["failed"] == failed(server_error=2, timeout=2)
        gate.set()
        wait_until(lambda: writer.stats()["published"] == 6, timeout=WAIT)

        # the connection closes before the answer: blocking, then async
        fake.set_answer("PUB", close(), times=1)
        with pytest.raises(ConnectionClosedError):
            writer.pub("t", b"k")
        assert writer.wait_connected(WAIT)
        wait_until(lambda: writer.conns and list(writer.conns.values())[0].connected(), timeout=WAIT)
        fake.set_answer("PUB", close(), times=1)
        with pytest.raises(ConnectionClosedError):
            writer.pub_async("t", b"l").result(WAIT)
        stats = writer.stats()
        assert stats["failed"] == failed(server_error=2, timeout=2, connection_closed=2), stats
        assert stats["published"] == 6, stats
        assert writer.wait_connected(WAIT)
        assert writer.pub("t", b"m") == b"OK"
        assert writer.stats()["published"] == 7
        # the latest connection error is kept after the reconnect
        assert writer.stats()["connections"][0]["last_error"].startswith("ConnectionClosedError: "), writer.stats()
    finally:
        writer.close(WAIT)
    assert writer.stats()["closed"] is True and writer.stats()["published"] == 7


def test_stats_of_an_nsqd_that_cannot_be_reached(backend: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    before = time.time()
    writer = Writer(address, backend=backend, publish_timeout=0.2, reconnect_interval=0.01, max_reconnect_interval=0.05)
    try:
        with pytest.raises(NoConnectionsError):
            writer.pub("t", b"x")
        with pytest.raises(NoConnectionsError):
            writer.pub_async("t", b"y").result(WAIT)
        wait_until(lambda: writer.stats()["connections"][0]["failed_attempts"] >= 3, timeout=WAIT)
        stats = writer.stats()
        assert stats["published"] == 0 and stats["failed"] == failed(no_connection=2), stats
        (node,) = stats["connections"]
        assert node["address"] == address and node["connected"] is False and node["lanes"] == 0, node
        assert before <= node["down_since"] <= time.time(), node
        assert node["last_error"].startswith("ConnectError: cannot connect to "), node
    finally:
        writer.close(1)


@pytest.mark.parametrize("threads", [4])
def test_stats_count_publishes_on_lanes_too(fake: FakeNsqd, backend: str, threads: int) -> None:
    """Many threads publishing (lanes on the thread backend, the fast path of pub()): every OK counts."""
    writer = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WAIT)
    each = 200
    errors: List[Any] = []

    def publish() -> None:
        try:
            for _ in range(each):
                writer.pub("t", b"x")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        assert writer.wait_connected(WAIT)
        workers = [threading.Thread(target=publish) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT * 3)
        assert not errors
        stats = writer.stats()
        assert stats["published"] == threads * each == len(fake.published), stats
        assert stats["failed"] == NO_FAILURES
    finally:
        writer.close(WAIT)
    # the lanes closed with the Writer: their answers still count
    assert writer.stats()["published"] == threads * each and writer.stats()["connections"][0]["lanes"] == 0

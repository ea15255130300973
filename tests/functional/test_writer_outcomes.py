"""What a publish that could not complete says about its message, against the fake nsqd.

The error type is the application's answer to "did it land?" (docs/writer.md): NoConnectionsError
says it never left, ConnectionClosedError and TimeoutError that it may have, ClosedError that
close() ended the wait. Each case below used to give the wrong one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator, List, Tuple

import pytest
from fake_nsqd import FakeNsqd, close
from wsgi_servers import free_port

from nsq_sync.errors import ClosedError, ConnectionClosedError, NoConnectionsError
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


def vanish_at_pub(fake: FakeNsqd) -> None:
    """The fake takes the PUB in, then goes away for good: it closes the connection without
    answering and refuses every connection from then on (an nsqd that crashed after reading)."""

    def vanish(session: Any, command: Any) -> Any:
        fake._stopping = True
        fake._listener.close()  # type: ignore[union-attr]
        return close()

    fake.set_answer("PUB", vanish)


def refused_address() -> str:
    """A loopback address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@contextlib.contextmanager
def writer_to_vanishing_nsqd(backend: str, publish_timeout: float) -> Iterator[Tuple[FakeNsqd, Writer]]:
    """A connected Writer with retries=1 to a fake nsqd that vanishes at the first PUB."""
    fake = FakeNsqd().start()
    vanish_at_pub(fake)
    writer = Writer(f"127.0.0.1:{fake.port}", retries=1, publish_timeout=publish_timeout, backend=backend)
    try:
        assert writer.wait_connected(WAIT)
        yield fake, writer
    finally:
        writer.close(1)
        fake.stop()


def test_a_retry_that_finds_no_connection_keeps_the_unknown_outcome(backend: str) -> None:
    # With retries=1, the retry of a PUB nsqd had read found no connection and raised
    # NoConnectionsError ("it never left"): an application spooling those re-sends, and
    # duplicates, what nsqd may have stored.
    with writer_to_vanishing_nsqd(backend, publish_timeout=2) as (fake, writer):
        with pytest.raises(ConnectionClosedError) as info:
            writer.pub("t", b"read by nsqd")
        assert not getattr(info.value, "unprocessed", False)
        assert fake.published == [("t", b"read by nsqd", None)]


def test_close_ends_an_async_retry_with_the_unknown_outcome(backend: str) -> None:
    # The retry of a PUB nsqd had read waits for a connection; close() ended it with
    # NoConnectionsError ("it never left").
    with writer_to_vanishing_nsqd(backend, publish_timeout=30) as (fake, writer):
        future = writer.pub_async("t", b"read by nsqd")
        wait_until(lambda: writer._parked, WAIT, message="the retry to wait for a connection")
        writer.close(0.5)
        assert isinstance(future.exception(WAIT), ConnectionClosedError), repr(future.exception())
        assert fake.published == [("t", b"read by nsqd", None)]


def test_close_ends_publishes_waiting_for_a_connection_with_closed_error(backend: str) -> None:
    # They failed with NoConnectionsError "within the timeout" (the blocking one a second into
    # its 30 s): close() ended their wait, which is what ClosedError says.
    writer = Writer(refused_address(), publish_timeout=30, backend=backend)
    outcomes: List[Any] = []
    waiting = threading.Event()

    def blocking() -> None:
        waiting.set()
        try:
            outcomes.append(writer.pub("t", b"blocking"))
        except Exception as exc:
            outcomes.append(exc)

    publisher = threading.Thread(target=blocking, name="test-pub")
    try:
        future = writer.pub_async("t", b"async")
        called: List[Any] = []
        writer.pub("t", b"callback", callback=lambda conn, data: called.append(data))
        publisher.start()
        assert waiting.wait(WAIT)
        # The blocking publish is waiting for a connection (counted, past close()'s check),
        # not still to start: one that starts after close() fails at once, another path.
        wait_until(lambda: len(writer._calls) == 1, WAIT, message="the blocking publish to wait")
        started = time.monotonic()
        writer.close(0.5)
        publisher.join(WAIT)
        assert not publisher.is_alive() and time.monotonic() - started < 5
        assert isinstance(outcomes[0], ClosedError), repr(outcomes[0])
        assert isinstance(future.exception(WAIT), ClosedError), repr(future.exception())
        assert not isinstance(future.exception(), NoConnectionsError)
        wait_until(lambda: called, WAIT, message="the callback")
        assert isinstance(called[0], ClosedError), repr(called[0])
    finally:
        writer.close(0.1)
        publisher.join(WAIT)


def test_wait_connected_for_more_nodes_than_are_connected_does_not_spin(backend: str) -> None:
    # With one nsqd connected and count=2, it waited on an event that stays set while any node
    # is connected: it returned at once, and the loop took a whole CPU until the timeout.
    fake = FakeNsqd().start()
    writer = Writer([f"127.0.0.1:{fake.port}", refused_address()], backend=backend)
    try:
        assert writer.wait_connected(WAIT)
        cpu, began = time.process_time(), time.monotonic()
        assert writer.wait_connected(1.0, count=2) is False
        cpu, elapsed = time.process_time() - cpu, time.monotonic() - began
        assert elapsed >= 0.95, elapsed
        assert cpu < 0.5 * elapsed, f"{cpu:.2f}s of CPU in a {elapsed:.2f}s wait"
    finally:
        writer.close(1)
        fake.stop()


def test_wait_connected_after_close_raises_closed_error(backend: str) -> None:
    # It waited for ever (a closed Writer never connects again); with a timeout, the whole timeout.
    writer = Writer(refused_address(), backend=backend)
    writer.close(0.1)
    result: List[Any] = []

    def wait() -> None:
        try:
            result.append(writer.wait_connected())
        except Exception as exc:
            result.append(exc)

    waiter = threading.Thread(target=wait, name="test-wait-connected", daemon=True)
    waiter.start()
    waiter.join(WAIT)
    assert not waiter.is_alive(), "wait_connected() after close() never returned"
    assert isinstance(result[0], ClosedError), repr(result[0])


@pytest.mark.parametrize("retries", [0, 1])
def test_publishes_that_time_out_before_they_are_written_are_never_sent(retries: int, backend: str) -> None:
    # nsqd stalls (a SIGSTOP, a long GC or fsync) on the first publish: the ones after it queue
    # behind its answer (Nagle's rule) and time out. They stayed queued, without bound (37,239
    # of 1 KB, 144 MB, in a review), and were all sent once nsqd answered again: stored after
    # their TimeoutError, twice for a caller that retried it. Now they leave the queue unsent.
    # (Blocking callers: tests/functional/test_caller_reads.py.)
    from fake_nsqd import NOTHING

    fake = FakeNsqd().start()
    writer = Writer(f"127.0.0.1:{fake.port}", publish_timeout=0.3, max_connections_per_nsqd=1, retries=retries, backend=backend)
    try:
        assert writer.wait_connected(WAIT)
        fake.set_answer("PUB", NOTHING, times=1)
        outcomes: List[Any] = []
        writer.pub("t", b"stalled", callback=lambda conn, data: outcomes.append(data))
        fake.wait_for_command("PUB")
        for n in range(5):
            writer.pub("t", b"queued %d" % n, callback=lambda conn, data: outcomes.append(data))
        wait_until(lambda: len(outcomes) == 6, WAIT, message="every callback")
        assert [type(outcome).__name__ for outcome in outcomes] == ["TimeoutError"] * 6
        fake.send_response(b"OK")  # nsqd resumes: the stalled publish's answer comes at last
        assert writer.pub("t", b"after") == b"OK"
        assert [body for _, body, _ in fake.published] == [b"stalled", b"after"]
    finally:
        writer.close(1)
        fake.stop()

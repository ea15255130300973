"""Writer.close() racing publishes, and a Ctrl-C in the middle of one, against the fake nsqd.

* two close() calls at once (the application's and run()'s or atexit's): the second waits for
  the first one's drain instead of closing the connection under the publish it waits for;
* pub_async racing close(): every Future resolves (one parked after the housekeeping task
  stopped used to stay pending for ever);
* KeyboardInterrupt while a publish waits for its answer reaches the caller as itself (it was
  turned into ConnectionClosedError, which a loop that retries on connection errors ignores),
  and the connection it cut goes: the next publish uses a fresh one;
* a retry parked after close() fails with its sent attempt's error, not ClosedError.

No sleeps: the fake holds the PUB answer until the test releases it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from concurrent import futures
from typing import Any, List

import pytest
from fake_nsqd import DEFAULT, FakeNsqd

from nsq_sync.errors import ClosedError
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


def hold_next_pub(fake: FakeNsqd) -> "tuple[threading.Event, threading.Event]":
    holding, release = threading.Event(), threading.Event()

    def held(session: Any, command: Any) -> Any:
        holding.set()
        release.wait(WAIT)
        return DEFAULT

    fake.set_answer("PUB", held, times=1)
    return holding, release


def test_two_closes_at_once_both_wait_for_the_publish(fake: FakeNsqd, writer: Writer) -> None:
    holding, release = hold_next_pub(fake)
    outcome: List[Any] = []
    publisher = threading.Thread(target=lambda: outcome.append(writer.pub("t", b"in flight")), name="test-pub")
    publisher.start()
    assert holding.wait(WAIT)
    # The second close() waits on _close_done: note when it does, then let nsqd answer.
    second_waits = threading.Event()
    done = writer._close_done

    class Spy:
        def wait(self, timeout: Any = None) -> bool:
            second_waits.set()
            return done.wait(timeout)

        def set(self) -> None:
            done.set()

    writer._close_done = Spy()  # type: ignore[assignment]
    closers = [threading.Thread(target=writer.close, args=(WAIT,), name=f"test-close-{i}") for i in range(2)]
    for closer in closers:
        closer.start()
    assert second_waits.wait(WAIT)
    assert publisher.is_alive() and outcome == []  # both closes are under way, nothing was cut
    release.set()
    publisher.join(WAIT)
    for closer in closers:
        closer.join(WAIT)
        assert not closer.is_alive()
    assert outcome == [b"OK"]
    assert [body for _, body, _ in fake.published] == [b"in flight"]


def test_async_publishes_racing_close_all_resolve(backend: str) -> None:
    with socket.socket() as probe:  # a port nothing listens on: every publish parks
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for _ in range(5):
        writer = Writer(f"127.0.0.1:{port}", backend=backend, publish_timeout=WAIT, reconnect_interval=0.05)
        submitted: List[futures.Future] = []
        go = threading.Barrier(2)

        def submit() -> None:
            go.wait(WAIT)
            for i in range(300):
                try:
                    submitted.append(writer.pub_async("t", b"%d" % i))
                except ClosedError:
                    return

        submitter = threading.Thread(target=submit, name="test-submit")
        submitter.start()
        go.wait(WAIT)
        writer.close(0)
        submitter.join(WAIT)
        _, pending = futures.wait(submitted, WAIT)
        assert not pending, f"{len(pending)} of {len(submitted)} publishes never resolved"
        for future in submitted:
            assert isinstance(future.exception(), ClosedError), repr(future.exception())  # (close() ended them all, well within publish_timeout)


def test_ctrl_c_during_a_publish_reaches_the_caller_and_loses_no_answer_order(fake: FakeNsqd, writer: Writer, backend: str) -> None:
    assert threading.current_thread() is threading.main_thread()  # (signals go to the main thread)
    first = writer._connected[0]
    assert writer.pub("t", b"before") == b"OK"  # (the reader task parks: the next caller reads its own answer)
    holding, release = hold_next_pub(fake)
    if backend == "gevent":
        import gevent

        main = gevent.getcurrent()
        hub = gevent.get_hub()

    def interrupt() -> None:
        if not holding.wait(WAIT):
            return
        if backend == "gevent":
            # A signal's KeyboardInterrupt goes to whichever greenlet runs its handler; the
            # hub hands one it catches to the main greenlet, as this does.
            hub.loop.run_callback(main.throw, KeyboardInterrupt())
        else:
            os.kill(os.getpid(), signal.SIGINT)  # (Python runs the handler in the main thread)

    interrupter = threading.Thread(target=interrupt, name="test-ctrl-c")
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.pub("t", b"cut short")
    finally:
        interrupter.join(WAIT)
    if first.state == "CONNECTED" and first.error is None:
        # Interrupted while another task read for it: the stream is whole, the answer still
        # comes, and goes to the abandoned publish, not to the next one.
        release.set()
        assert writer.pub("t", b"after") == b"OK"
        assert writer._connected[0] is first
        assert [body for _, body, _ in fake.published] == [b"before", b"cut short", b"after"]
    else:
        # Interrupted in its own exchange (in its read, or just as its write returned): what
        # nsqd sends next cannot be matched any more, so the connection goes, and the next
        # publish opens a fresh one. The interruption is the reason it reports, not the end
        # of the stream it caused.
        release.set()
        wait_until(lambda: first.state == "DISCONNECTED", WAIT, message="the interrupted connection to close")
        assert re.search("KeyboardInterrupt interrupted a (read|write)", str(first.error)), repr(first.error)
        assert writer.pub("t", b"after", timeout=WAIT) == b"OK"
        assert writer._connected[0] is not first
        assert fake.published[-1][1] == b"after"


def test_a_retry_parked_after_close_keeps_its_sent_attempts_error(fake: FakeNsqd, writer: Writer) -> None:
    """A pub_async retry (run by a worker after an attempt nsqd may have run failed) that finds
    the Writer closed and no housekeeper left fails itself, with the sent attempt's error: a
    ClosedError would say the message never left, and the caller might publish it twice."""
    from concurrent.futures import Future

    from nsq_sync.errors import ConnectionClosedError
    from nsq_sync.protocol import commands

    writer.close(WAIT)
    assert writer._housekeeper is None and not writer._connected
    outer: "Future[bytes]" = Future()
    outer.set_running_or_notify_cancel()
    sent_attempt = ConnectionClosedError("connection to nsqd closed before it answered")
    outer.unknown = sent_attempt  # type: ignore[attr-defined]  # (what _attempt's done() records)
    writer._attempt(commands.pub("t", b"retried"), 1e18, 0, outer, None)
    assert outer.exception(WAIT) is sent_attempt
    # Without an earlier sent attempt it is the close that stopped it.
    never_sent: "Future[bytes]" = Future()
    never_sent.set_running_or_notify_cancel()
    writer._attempt(commands.pub("t", b"parked"), 1e18, 0, never_sent, None)
    assert isinstance(never_sent.exception(WAIT), ClosedError)

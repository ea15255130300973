"""Writer.close()/wait_connected()/join() with bad arguments, against the fake nsqd.

close(math.nan) while a pub_async waited for its answer used to be accepted and skip the
drain: the connection was closed at once and the publish failed "closed before nsqd
answered" (close(5) returns it b"OK"). A bad timeout must be refused before close() changes
anything, so the publish still lands and a later good close() drains it.

No sleeps: the fake holds the PUB answer until the test releases it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Iterator, List, Tuple

import pytest
from bad_input import check_named
from fake_nsqd import DEFAULT, FakeNsqd

from nsq_sync.errors import ClosedError, ConfigError, TimeoutError
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("timeout,error", [(NAN, ConfigError), (-1, ConfigError), (INF, ConfigError), ("x", TypeError), (True, TypeError)], ids=repr)
def test_close_with_a_bad_timeout_keeps_a_waiting_publish(fake: FakeNsqd, writer: Writer, timeout: Any, error: type) -> None:
    holding, release = threading.Event(), threading.Event()

    def held(session: Any, command: Any) -> Any:
        holding.set()
        assert release.wait(WAIT)
        return DEFAULT

    fake.set_answer("PUB", held, times=1)
    future = writer.pub_async("t", b"waiting", timeout=WAIT)
    assert holding.wait(WAIT), "the PUB did not reach the fake"
    try:
        with pytest.raises(error) as info:
            writer.close(timeout)
        check_named(info.value, "timeout")
        assert not future.done(), f"the publish was settled by a refused close(): {future.exception()!r}"
    finally:
        release.set()
    assert future.result(WAIT) == b"OK"
    assert writer.pub("t", b"after") == b"OK"  # still open: no ClosedError
    writer.close(WAIT)
    assert [body for _, body, _ in fake.published] == [b"waiting", b"after"]
    with pytest.raises(ClosedError):
        writer.pub_async("t", b"closed")


def test_good_close_drains_a_waiting_publish(fake: FakeNsqd, writer: Writer) -> None:
    # The behaviour a refused close() must not lose: close(timeout) waits for the answer.
    holding, release = threading.Event(), threading.Event()
    fake.set_answer("PUB", lambda session, command: (holding.set(), release.wait(WAIT), DEFAULT)[-1], times=1)
    future = writer.pub_async("t", b"drained", timeout=WAIT)
    assert holding.wait(WAIT)
    closer = threading.Thread(target=writer.close, args=(WAIT,), name="test-close")
    closer.start()
    release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert future.result(0) == b"OK"


def test_connected_writer_refuses_bad_wait_connected_and_join_arguments(writer: Writer) -> None:
    bad: List[Any] = [
        (lambda: writer.wait_connected(NAN), ConfigError, "timeout"),
        (lambda: writer.wait_connected("1"), TypeError, "timeout"),
        (lambda: writer.wait_connected(0.1, count=0), ConfigError, "count"),  # returned True
        (lambda: writer.wait_connected(0.1, count=-5), ConfigError, "count"),  # returned True
        (lambda: writer.wait_connected(0.1, count="1"), TypeError, "count"),
        (lambda: writer.wait_connected(0.1, count=None), TypeError, "count"),
        (lambda: writer.wait_connected(0.1, count=2), ConfigError, "count"),
        (lambda: writer.join(NAN), ConfigError, "timeout"),
        (lambda: writer.join("1"), TypeError, "timeout"),
    ]
    for call, error, param in bad:
        with pytest.raises(error) as info:
            call()
        check_named(info.value, param)
    assert writer.wait_connected(0) is True
    assert writer.wait_connected(WAIT, count=1) is True
    assert writer.pub("t", b"still fine") == b"OK"


def test_a_fatal_error_frame_for_one_publish_reconnects_at_once(fake: FakeNsqd, backend: str) -> None:
    # nsqd closes after E_BAD_MESSAGE (a body over its --max-msg-size): it is up, so the Writer
    # replaces the connection now. It waited reconnect_interval (jittered, doubling), and
    # every other thread's publish failed or waited meanwhile.
    from fake_nsqd import close, error

    from nsq_sync.errors import BadMessageError

    writer = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WAIT, reconnect_interval=60, max_msg_size=None)
    try:
        assert writer.wait_connected(WAIT)
        for round_ in range(3):
            fake.set_answer("PUB", [error("E_BAD_MESSAGE PUB message too big 200 > 100"), close()], times=1)
            with pytest.raises(BadMessageError):
                writer.pub("t", b"x" * 200)
            fake.wait_connected(count=round_ + 2, timeout=WAIT)  # a new connection, not in 60 s
            assert writer.pub("t", b"small") == b"OK"
        assert [body for _, body, _ in fake.published if body == b"small"] == [b"small"] * 3
    finally:
        writer.close(WAIT)


@pytest.fixture
def silent_pair(backend: str) -> Iterator[Tuple[Writer, FakeNsqd]]:
    """A Writer (publish_timeout 0.3 s) on two fakes, the second of which takes PUBs and never
    answers until the test ends (a hung nsqd: SIGSTOP, a blackholed network)."""
    good, hung = FakeNsqd().start(), FakeNsqd().start()
    release = threading.Event()

    def silent(session: Any, command: Any) -> Any:
        assert release.wait(WAIT)
        return DEFAULT

    writer = Writer([f"{good.host}:{good.port}", f"{hung.host}:{hung.port}"], backend=backend, publish_timeout=0.3)
    try:
        assert writer.wait_connected(WAIT, count=2)
        hung.set_answer("PUB", silent)
        yield writer, good
    finally:
        release.set()
        writer.close(WAIT)
        good.stop()
        hung.stop()


def test_a_silent_nsqd_is_passed_over_once_a_publish_timed_out_on_it(silent_pair: Tuple[Writer, FakeNsqd]) -> None:
    # Every other publish went to the hung one and waited out publish_timeout, until the
    # staleness limit (60 s) closed its connection.
    writer, good = silent_pair
    timeouts = 0
    for i in range(40):
        try:
            writer.pub("t", b"%d" % i)
        except TimeoutError:
            timeouts += 1
    assert timeouts == 1, f"{timeouts} publishes waited out their timeout"
    assert len(good.published) == 39


def test_a_wall_clock_step_back_does_not_shut_a_healthy_nsqd_out(backend: str) -> None:
    # A publish timed out on b, then the wall clock went back 100 s (NTP, a VM restore): every
    # byte b sends is stamped "before" the timeout. b must not be passed over for 100 s.
    a, b = FakeNsqd().start(), FakeNsqd().start()
    writer = Writer([f"{a.host}:{a.port}", f"{b.host}:{b.port}"], backend=backend, publish_timeout=WAIT)
    try:
        assert writer.wait_connected(WAIT, count=2)
        late = next(conn for conn in writer._connected if conn.port == b.port)
        late._timed_out_at = time.time() + 100.0  # (the timeout's stamp, from before the step back)
        for i in range(20):
            assert writer.pub("t", b"%d" % i) == b"OK"
        assert len(b.published) >= 5, f"{len(b.published)} of 20 reached b"
    finally:
        writer.close(WAIT)
        a.stop()
        b.stop()


def test_a_silent_nsqd_is_passed_over_by_async_publishes_too(silent_pair: Tuple[Writer, FakeNsqd]) -> None:
    # The same for pub_async(): its timeout (found by the housekeeping task) marks the connection.
    writer, _ = silent_pair
    for i in range(4):  # round robin: one of the first two goes to the silent one
        if isinstance(writer.pub_async("t", b"probe").exception(WAIT), TimeoutError):
            break
    else:
        raise AssertionError("no publish went to the silent nsqd")
    outcomes = [writer.pub_async("t", b"%d" % i).exception(WAIT) for i in range(20)]
    assert outcomes == [None] * 20, outcomes

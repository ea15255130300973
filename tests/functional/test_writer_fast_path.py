"""Writer.pub's fast path: a blocking publish on a free lane, against the fake nsqd.

Once lanes are open (extra connections of a Writer, thread backend: see
test_writer_lanes.py), pub() takes a free one in a straight line of code and gives it
back after nsqd's OK. These tests check that the straight line keeps what the general
path does: where the publish goes, what each failure raises or retries, close() waiting
for a publish under way, a lane closed while free, and the count of publishes under way.
Under gevent there are no lanes: the tests check that the fast path is off and the
publish still lands.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, List

import pytest
from fake_nsqd import FakeNsqd, close, error

from nsq_sync.protocol import commands
from nsq_sync.errors import ClosedError, ConfigError, ConnectionClosedError, PubFailedError, TimeoutError
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


@pytest.fixture
def writers(fake: FakeNsqd, backend: str) -> Iterator[Any]:
    made: List[Writer] = []

    def make(**kwargs: Any) -> Writer:
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("publish_timeout", WAIT)
        writer = Writer(f"{fake.host}:{fake.port}", **kwargs)
        made.append(writer)
        assert writer.wait_connected(WAIT)
        return writer

    yield make
    for writer in made:
        writer.close(WAIT)


def with_one_lane(writer: Writer, fake: FakeNsqd, *topics: str) -> Any:
    """Open one lane (as a publish finding the first connection busy does) and return it, or
    None under gevent (no lanes: the fast path is off). The fast path takes topics already
    checked once (their command line is cached): *topics* are, here, without a publish."""
    for topic in topics:
        commands.pub(topic, b"checked")
    if writer._max_lanes == 0:
        assert writer._fast_free is None
        return None
    open_lanes(writer, 1)
    assert writer._fast_free is writer._nodes[0].free
    fake.wait_connected(count=2)
    return writer._nodes[0].free[0]


def open_lanes(writer: Writer, count: int) -> None:
    """Have *count* lanes open and free, as *count* publishes under way that find the first
    connection busy get them (thread backend)."""
    node = writer._nodes[0]
    held: List[Any] = []
    writer._calls.extend([None] * count)  # publishes under way: one lane wanted each
    try:
        while len(node.lanes) + node.growing < count:
            lane = writer._lane(node)  # a free one (held here), or None: one more opens
            if lane is not None:
                held.append(lane)
        wait_until(lambda: len(node.lanes) == count, timeout=WAIT, message=f"{count} lanes to open")
    finally:
        del writer._calls[:count]
        node.free.extend(held)
    wait_until(lambda: len(node.free) == count, timeout=WAIT, message=f"{count} lanes free")


def lane_session(fake: FakeNsqd) -> Any:
    return fake.sessions[1]


def pubs(session: Any) -> List[bytes]:
    """The bodies *session* was sent PUBs with (the fake records a command after answering
    it: callers wait for the count they expect first, see recorded)."""
    return [command.body for command in session.received if command.name == "PUB"]


def recorded(fake: FakeNsqd, count: int) -> None:
    """Wait until the fake has recorded *count* PUBs in all (each was answered before)."""
    fake.wait_until(lambda: sum(len(pubs(session)) for session in fake.sessions) >= count, WAIT, f"{count} PUBs")


def test_a_blocking_pub_goes_on_the_free_lane_and_gives_it_back(fake: FakeNsqd, writers) -> None:
    writer = writers()
    lane = with_one_lane(writer, fake, "fast")
    for i in range(5):
        assert writer.pub("fast", b"m%d" % i) == b"OK"
    recorded(fake, 5)
    if lane is None:
        assert pubs(fake.sessions[0]) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        return
    assert pubs(lane_session(fake)) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert pubs(fake.sessions[0]) == []  # the first connection carried none of them
    assert writer._nodes[0].free == [lane] and writer._calls == []


def test_what_the_fast_path_does_not_take_goes_the_general_way(fake: FakeNsqd, writers) -> None:
    writer = writers()
    lane = with_one_lane(writer, fake, "general")
    fast_path = writer._publish_blocking
    taken: List[bytes] = []

    def general(data: bytes, timeout: Any, failed: Any = None) -> bytes:
        taken.append(data.rsplit(b"\n", 1)[1][4:])
        return fast_path(data, timeout, failed)

    writer._publish_blocking = general  # type: ignore[method-assign]
    assert writer.pub("general", b"timeout", timeout=WAIT) == b"OK"  # an explicit timeout
    assert writer.pub("general", bytearray(b"bytearray")) == b"OK"  # not bytes
    with pytest.raises(ConfigError):
        writer.pub("general", b"")  # an empty body: refused the general way, before anything is sent
    done = threading.Event()
    assert writer.pub("general", b"callback", callback=lambda conn, data: done.set()) is None
    assert done.wait(WAIT)
    assert writer.pub("general", b"fast") == b"OK"
    recorded(fake, 4)
    assert taken == [b"timeout", b"bytearray"] + ([] if lane is not None else [b"fast"])  # (gevent: no fast path)
    if lane is not None:
        # blocking publishes take a free lane the general way too; a callback never does
        assert pubs(lane_session(fake)) == [b"timeout", b"bytearray", b"fast"]
        assert pubs(fake.sessions[0]) == [b"callback"] and writer._nodes[0].free == [lane]


def test_a_server_error_on_the_lane_is_raised_as_its_type_and_the_lane_dropped(fake: FakeNsqd, writers) -> None:
    writer = writers(retries=1)  # never a retry for what nsqd refused
    lane = with_one_lane(writer, fake, "refused")
    fake.set_answer("PUB", error("E_PUB_FAILED topic is exiting"), times=1)  # fatal, as nsqd sends it
    with pytest.raises(PubFailedError):
        writer.pub("refused", b"one")
    assert writer.pub("refused", b"two") == b"OK"
    recorded(fake, 2)
    assert writer._calls == []
    if lane is not None:
        assert pubs(lane_session(fake)) == [b"one"] and pubs(fake.sessions[0]) == [b"two"]
        assert lane.closed() and lane not in writer._nodes[0].lanes and lane not in writer._nodes[0].free


@pytest.mark.parametrize("retries", [0, 1])
def test_a_lane_closed_at_the_pub_fails_or_is_retried_as_retries_says(fake: FakeNsqd, writers, retries: int) -> None:
    writer = writers(retries=retries)
    lane = with_one_lane(writer, fake, "closing")
    fake.set_answer("PUB", lambda session, command: close() if session is not fake.sessions[0] else b"OK")
    if lane is None:
        return  # (no lane under gevent: the first connection's close is test_writer_outcomes')
    if retries:
        assert writer.pub("closing", b"again") == b"OK"
        recorded(fake, 2)
        assert pubs(fake.sessions[0]) == [b"again"]  # re-sent on the first connection
    else:
        with pytest.raises(ConnectionClosedError):
            writer.pub("closing", b"once")
        recorded(fake, 1)
        assert pubs(fake.sessions[0]) == []
    assert pubs(lane_session(fake)) == [b"again" if retries else b"once"]
    node = writer._nodes[0]
    wait_until(lambda: lane not in node.lanes, timeout=WAIT, message="the closed lane to be dropped")
    assert lane not in node.free and writer._calls == []


def test_a_lane_closed_while_free_is_dropped_and_the_publish_lands_unsent_elsewhere(fake: FakeNsqd, writers) -> None:
    writer = writers()  # retries=0: only a publish that never left may go elsewhere
    lane = with_one_lane(writer, fake, "dropped")
    if lane is None:
        return
    assert writer.pub("dropped", b"on the lane") == b"OK"  # (its last exchange left it clean)
    writer._close_lane(lane)  # as the Writer closes one (close(), an idle lane's task)
    lane.last_recv_timestamp = time.time() + 60  # as if it had just read: the lane's own fast path is open
    assert writer.pub("dropped", b"elsewhere") == b"OK"
    recorded(fake, 2)
    assert pubs(fake.sessions[0]) == [b"elsewhere"] and pubs(lane_session(fake)) == [b"on the lane"]
    assert lane not in writer._nodes[0].lanes and lane not in writer._nodes[0].free


def test_no_answer_on_the_lane_is_a_timeout_that_marks_the_first_connection(fake: FakeNsqd, writers) -> None:
    writer = writers(publish_timeout=0.5)
    lane = with_one_lane(writer, fake, "hung")
    if lane is None:
        return
    fake.set_answer("PUB", None, times=1)  # nothing: a hung nsqd
    first = writer._connected[0]
    with pytest.raises(TimeoutError) as info:
        writer.pub("hung", b"lost?")
    assert first.id in str(info.value) and "may or may not have landed" in str(info.value)
    assert first._timed_out_at > 0
    assert writer._calls == []


def test_close_waits_for_a_publish_under_way_on_a_lane_then_refuses_more(fake: FakeNsqd, writers) -> None:
    writer = writers()
    lane = with_one_lane(writer, fake, "closing")
    arrived, release = threading.Event(), threading.Event()

    def held(session: Any, command: Any) -> Any:
        arrived.set()
        return b"OK" if release.wait(WAIT) else None

    fake.set_answer("PUB", held, times=1)
    outcome: List[Any] = []
    publisher = threading.Thread(target=lambda: outcome.append(writer.pub("closing", b"under way")))
    publisher.start()
    assert arrived.wait(WAIT)
    assert writer._calls == [None]  # counted, so close() waits for it
    closer = threading.Thread(target=writer.close, args=(WAIT,))
    closer.start()
    wait_until(lambda: writer._closed, timeout=WAIT, message="close() to begin")
    assert closer.is_alive()  # waiting for the publish
    release.set()
    publisher.join(WAIT)
    closer.join(WAIT)
    assert outcome == [b"OK"] and not closer.is_alive()
    with pytest.raises(ClosedError):
        writer.pub("closing", b"after")
    assert [body for session in fake.sessions for body in pubs(session)] == [b"under way"]
    if lane is not None:
        assert pubs(lane_session(fake)) == [b"under way"] and lane.closed()


def test_many_threads_on_the_fast_path_lose_and_duplicate_nothing(fake: FakeNsqd, writers, backend: str) -> None:
    writer = writers()
    with_one_lane(writer, fake, "many")
    threads, per_thread = 6, 200
    start = threading.Barrier(threads)
    failures: List[Any] = []

    def run(index: int) -> None:
        start.wait()
        for i in range(per_thread):
            answer = writer.pub("many", b"%d-%d" % (index, i))
            if answer != b"OK":
                failures.append(answer)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT * 3)
    assert failures == []
    recorded(fake, threads * per_thread)
    landed = sorted(body for session in fake.sessions for body in pubs(session))
    assert landed == sorted(b"%d-%d" % (n, i) for n in range(threads) for i in range(per_thread))
    assert writer._calls == []
    node = writer._nodes[0]
    if backend == "thread":
        assert len(node.lanes) >= 2 and sorted(map(id, node.free)) == sorted(map(id, node.lanes))


def test_a_publish_finding_every_lane_held_opens_another(fake: FakeNsqd, writers) -> None:
    # Each thread that publishes at once gets a lane: the thread left on the first connection
    # would otherwise stay there (nobody else reads that connection, so it never looks contended).
    writer = writers()
    lane = with_one_lane(writer, fake, "held")
    if lane is None:
        return
    node = writer._nodes[0]
    held = node.free.pop()  # as a publish under way on it holds it
    writer._calls.append(None)
    try:
        assert writer.pub("held", b"first connection") == b"OK"
        wait_until(lambda: len(node.lanes) == 2, timeout=WAIT, message="a second lane to open")
    finally:
        writer._calls.pop()
        node.free.append(held)
    recorded(fake, 1)
    assert pubs(fake.sessions[0]) == [b"first connection"]
    assert len(node.free) == 2


def test_a_publish_timing_out_on_a_lane_closes_the_lanes_that_heard_nothing_since(fake: FakeNsqd, writers) -> None:
    # A lane has no reader task: nothing but its publishes would notice a hung nsqd or a stalled
    # path, and each publish taking it would wait out its whole timeout, for good.
    writer = writers(publish_timeout=1.0)
    if with_one_lane(writer, fake, "stall") is None:
        return
    node = writer._nodes[0]
    open_lanes(writer, 3)
    hung = threading.Event()

    def answer(session: Any, command: Any) -> Any:
        if command.body == b"hang":
            hung.set()
            return None  # never answered
        return b"OK"

    fake.set_answer("PUB", answer)
    hanging_on = node.free[-1]  # (the stack's top: the next publish takes it)
    outcome: List[Any] = []

    def hang() -> None:
        try:
            writer.pub("stall", b"hang")
        except TimeoutError as exc:
            outcome.append(exc)

    publisher = threading.Thread(target=hang)
    publisher.start()
    assert hung.wait(WAIT)
    answered_on = node.free[-1]
    assert writer.pub("stall", b"heard since") == b"OK"  # on another lane, after the hung one was sent
    silent = [lane for lane in node.free if lane is not answered_on]
    publisher.join(WAIT)
    assert len(outcome) == 1 and "may or may not have landed" in str(outcome[0])
    assert hanging_on.closed() and hanging_on not in node.lanes
    assert len(silent) == 1 and silent[0].closed() and silent[0] not in node.lanes  # heard nothing since
    assert answered_on.connected() and node.free == [answered_on] == node.lanes
    assert writer.pub("stall", b"after") == b"OK"
    recorded(fake, 3)

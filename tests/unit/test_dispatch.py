"""WorkerPool: where callbacks run, ordering, containment of errors, the concurrency bound, close()."""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from typing import Any

import pytest

from nsq_sync import dispatch
from nsq_sync.dispatch import WorkerPool
from nsq_sync.errors import ConfigError
from nsq_sync.testing import wait_until

WAIT = 10  # seconds; only a ceiling for failures, never used to synchronize

_names = itertools.count()


@pytest.fixture
def pool_name():
    return f"test-pool-{next(_names)}"


@pytest.fixture
def make_pool(pool_name):
    pools = []

    def make(concurrency=1):
        pool = WorkerPool(concurrency, backend="thread", name=pool_name)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(wait=True, timeout=WAIT)


def test_callbacks_run_off_the_calling_thread(make_pool):
    pool = make_pool()
    seen = {}
    done = threading.Event()

    def cb(lane):
        seen[lane] = (threading.current_thread(), pool.in_worker())
        if len(seen) == 2:
            done.set()

    pool.control.submit(cb, "control")
    pool.messages.submit(cb, "messages")
    assert done.wait(WAIT)
    me = threading.current_thread()
    for lane, (thread, in_worker) in seen.items():
        assert thread is not me, lane
        assert in_worker, lane
    assert seen["control"][0] is not seen["messages"][0]
    assert not pool.in_worker()


def test_submit_passes_any_arguments_and_submit_many_one_item_each(make_pool, caplog):
    """submit(fn, *args) queues fn(*args) whatever the count (none, one that is a tuple,
    several); submit_many(fn, items) calls fn(item). A failure is logged with fn's repr."""
    pool = make_pool()
    calls = []
    done = threading.Event()

    def record(*args):
        calls.append(args)

    def failing():
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="nsq_sync.dispatch"):
        pool.messages.submit(record)
        pool.messages.submit(record, (1, 2))
        pool.messages.submit(record, "a", "b", None)
        pool.messages.submit_many(record, [None, (3,), "c"])
        pool.messages.submit(failing)
        pool.messages.submit(done.set)
        assert done.wait(WAIT)
    assert calls == [(), ((1, 2),), ("a", "b", None), (None,), ((3,),), ("c",)]
    [record_] = [r for r in caplog.records if r.name == "nsq_sync.dispatch"]
    assert "failing" in record_.getMessage() and isinstance(record_.exc_info[1], ValueError)


def test_control_lane_runs_in_submission_order(make_pool):
    pool = make_pool(concurrency=4)
    order = []
    done = threading.Event()
    for i in range(200):
        pool.control.submit(order.append, i)
    pool.control.submit(done.set)
    assert done.wait(WAIT)
    assert order == list(range(200))
    assert pool.control.size == 1


def test_raising_callback_logged_and_lane_keeps_working(make_pool, caplog):
    pool = make_pool()
    after = {"control": threading.Event(), "messages": threading.Event()}

    def boom(lane):
        raise ValueError(f"boom in {lane}")

    with caplog.at_level(logging.ERROR, logger="nsq_sync.dispatch"):
        for lane_name in ("control", "messages"):
            lane = getattr(pool, lane_name)
            lane.submit(boom, lane_name)
            lane.submit(after[lane_name].set)
        assert after["control"].wait(WAIT)
        assert after["messages"].wait(WAIT)
    records = [r for r in caplog.records if r.name == "nsq_sync.dispatch"]
    texts = sorted(str(r.exc_info[1]) for r in records if r.exc_info)
    assert texts == ["boom in control", "boom in messages"]
    assert all(r.levelno == logging.ERROR for r in records)


def test_base_exception_in_callback_does_not_kill_worker(make_pool, caplog):
    pool = make_pool()
    done = threading.Event()

    def exit_():
        raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger="nsq_sync.dispatch"):
        pool.control.submit(exit_)
        pool.control.submit(done.set)
        assert done.wait(WAIT)
    assert any(r.exc_info and isinstance(r.exc_info[1], SystemExit) for r in caplog.records)


def test_concurrency_bound(make_pool):
    limit, total = 4, 20
    pool = make_pool(concurrency=limit)
    lock = threading.Lock()
    state = {"running": 0, "max": 0, "started": 0, "done": 0}
    limit_reached = threading.Event()
    fifth = threading.Event()
    release = threading.Event()
    all_done = threading.Event()

    def work(i):
        with lock:
            state["running"] += 1
            state["started"] += 1
            state["max"] = max(state["max"], state["running"])
            if state["running"] == limit:
                limit_reached.set()
            if state["started"] > limit and not release.is_set():
                fifth.set()
        assert release.wait(WAIT)
        with lock:
            state["running"] -= 1
            state["done"] += 1
            if state["done"] == total:
                all_done.set()

    for i in range(total):
        pool.messages.submit(work, i)
    assert limit_reached.wait(WAIT), state
    # negative check: no fifth callback starts while four are blocked (a bounded look, not synchronization)
    assert not fifth.wait(0.2), state
    assert state["max"] == limit
    assert pool.messages.size <= limit
    release.set()
    assert all_done.wait(WAIT), state
    assert state["max"] == limit
    assert state["done"] == total


def test_submit_many_runs_everything_within_the_bound(make_pool):
    pool = make_pool(concurrency=3)
    barrier = threading.Barrier(3, timeout=WAIT)
    results = []
    done = threading.Event()
    lock = threading.Lock()

    def work(item):
        barrier.wait()  # needs exactly 3 concurrent workers to pass each round
        with lock:
            results.append(item)
            if len(results) == 9:
                done.set()

    pool.messages.submit_many(work, list(range(9)))
    assert done.wait(WAIT)
    assert sorted(results) == list(range(9))
    assert pool.messages.size == 3


def test_slow_message_callback_does_not_delay_control(make_pool):
    pool = make_pool()
    release = threading.Event()
    message_started = threading.Event()
    message_done = threading.Event()
    control_ran = threading.Event()

    def slow_message():
        message_started.set()
        release.wait(WAIT)
        message_done.set()

    pool.messages.submit(slow_message)
    assert message_started.wait(WAIT)
    pool.control.submit(control_ran.set)
    assert control_ran.wait(WAIT)
    assert not message_done.is_set()
    release.set()
    assert message_done.wait(WAIT)


def test_close_runs_queued_work_and_joins_every_worker(pool_name):
    pool = WorkerPool(3, backend="thread", name=pool_name)
    threads = set()
    lock = threading.Lock()
    barrier = threading.Barrier(3, timeout=WAIT)
    count = [0]

    three_running = threading.Event()
    gate = threading.Event()

    def work(i):
        with lock:
            threads.add(threading.current_thread())
            count[0] += 1
        if i < 3:
            if barrier.wait() == 0:  # forces three message workers into existence
                three_running.set()
        if i == 3:
            gate.wait(WAIT)  # keeps work queued until close() is called

    for i in range(30):
        pool.messages.submit(work, i)
    for i in range(5):
        pool.control.submit(work, 100 + i)
    # (a closed lane starts no new workers, so let all three exist before closing)
    assert three_running.wait(WAIT)
    closer = threading.Thread(target=pool.close, kwargs={"wait": True, "timeout": WAIT})
    closer.start()
    gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert pool.closed
    assert count[0] == 35  # queued work ran before the workers stopped
    assert len(threads) >= 4  # 3 message workers + the control worker
    for thread in threads:
        assert not thread.is_alive(), thread.name
    alive = [t.name for t in threading.enumerate() if t.name.startswith(pool_name)]
    assert alive == []
    for task in pool.messages._tasks + pool.control._tasks:
        assert not task.is_alive()


def test_submit_after_close(make_pool):
    pool = make_pool()
    pool.close()
    with pytest.raises(RuntimeError):
        pool.messages.submit(print)
    with pytest.raises(RuntimeError):
        pool.control.submit(print)
    with pytest.raises(RuntimeError):
        pool.messages.submit_many(print, [1])
    pool.close()  # twice is fine


def test_close_from_inside_a_worker_does_not_deadlock(make_pool):
    pool = make_pool()
    closed = threading.Event()

    def close_me():
        pool.close(wait=True, timeout=WAIT)
        closed.set()

    pool.control.submit(close_me)
    assert closed.wait(WAIT)
    assert pool.closed


def test_workers_start_lazily(make_pool):
    pool = make_pool(concurrency=8)
    assert pool.control.size == 0 and pool.messages.size == 0
    done = threading.Event()
    pool.messages.submit(done.set)
    assert done.wait(WAIT)
    assert pool.messages.size == 1


@pytest.mark.parametrize("concurrency", [0, -1, "x", 1.5, True, None])
def test_bad_concurrency(concurrency):
    with pytest.raises(ConfigError) as info:
        WorkerPool(concurrency)
    assert info.value.param == "concurrency"
    assert isinstance(info.value, ValueError)


def test_bad_backend():
    with pytest.raises(ConfigError):
        WorkerPool(1, backend="nope")


def test_a_burst_of_quick_callbacks_does_not_wake_a_worker_per_item(make_pool):
    # A Reader's default concurrency is max_in_flight: a read of 200 messages must not
    # wake 200 threads (they would fight for the GIL and add milliseconds of latency).
    pool = make_pool(concurrency=200)
    done = threading.Event()
    counter = itertools.count(1)
    total = 200 * 20

    def work(_item):
        if next(counter) == total:
            done.set()

    for _ in range(20):
        pool.messages.submit_many(work, list(range(200)))
    assert done.wait(WAIT)
    assert pool.messages.size <= 20, pool.messages.size


def test_no_wakeup_is_lost_when_workers_go_to_sleep(make_pool):
    # Every item lands while the only worker is between "queue empty" and "asleep" or
    # already asleep; a lost wake-up would leave an item queued and time out here.
    pool = make_pool(concurrency=2)
    ran = threading.Event()
    for i in range(3000):
        ran.clear()
        pool.messages.submit(ran.set)
        assert ran.wait(WAIT), f"item {i} never ran"


def test_no_wakeup_is_lost_with_many_submitters(make_pool):
    pool = make_pool(concurrency=3)
    counter = itertools.count(1)
    total = 4 * 2000
    done = threading.Event()

    def work():
        if next(counter) == total:
            done.set()

    def submitter():
        for _ in range(2000):
            pool.messages.submit(work)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert done.wait(WAIT), f"{next(counter) - 1} of {total} ran"


def test_quick_callbacks_run_on_one_thread_without_waking_a_spare(make_pool, monkeypatch):
    # Threads: a spare joins only when no callback started for SPARE_AFTER_SECONDS while
    # work waits, or at once after a callback that ran SLOW_CALLBACK_SECONDS. With both
    # set far off, a burst of quick callbacks is run by one worker. (The slow rule is set
    # off too: on a loaded machine two quick callbacks in a row can be preempted past 1 ms
    # of wall time; the slow rule has tests of its own below.)
    monkeypatch.setattr(dispatch, "SPARE_AFTER_SECONDS", 30.0)
    monkeypatch.setattr(dispatch, "SLOW_CALLBACK_SECONDS", 30.0)
    pool = make_pool(concurrency=8)
    done = threading.Event()
    counter = itertools.count(1)
    threads = set()
    total = 200 * 20

    def work(_item):
        threads.add(threading.get_ident())
        if next(counter) == total:
            done.set()

    # One submit: a submit while every worker is busy rightly starts another worker, so
    # several submits would make this test depend on when the first worker gets the GIL.
    pool.messages.submit_many(work, list(range(total)))
    assert done.wait(WAIT)
    assert pool.messages.size == 1 and len(threads) == 1


def test_a_slow_callback_gets_a_spare_for_the_work_behind_it(make_pool):
    pool = make_pool(concurrency=3)
    entered = threading.Event()
    release = threading.Event()
    behind = threading.Event()

    def slow():
        entered.set()
        assert release.wait(WAIT)

    pool.messages.submit(slow)
    assert entered.wait(WAIT)
    pool.messages.submit(behind.set)
    try:
        assert behind.wait(WAIT), "the callback queued behind a slow one never ran"
        assert not release.is_set()
        assert pool.messages.size == 2
    finally:
        release.set()


def test_close_stops_the_watchdog_at_once(pool_name, monkeypatch):
    monkeypatch.setattr(dispatch, "SPARE_AFTER_SECONDS", 30.0)
    monkeypatch.setattr(dispatch, "WATCHDOG_PARK_SECONDS", 60.0)
    pool = WorkerPool(2, backend="thread", name=pool_name)
    done = threading.Event()
    pool.messages.submit_many(lambda last: last and done.set(), [False] * 50 + [True])
    assert done.wait(WAIT)
    watchdog = pool.messages._watchdog
    assert watchdog is not None and watchdog.is_alive()
    pool.close(wait=True, timeout=WAIT)
    assert not watchdog.is_alive()  # woken by close(), not left in a 30 s wait


def test_blocking_callbacks_fan_out_to_every_worker(make_pool):
    # Each callback returns only once 4 run at the same time: the lane must reach all 4
    # workers for every round (a stuck first callback brings the watchdog's spare, slow
    # ones wake spares at once).
    pool = make_pool(concurrency=4)
    barrier = threading.Barrier(4)
    done = threading.Event()
    counter = itertools.count(1)

    def blocking(_item):
        barrier.wait(WAIT)
        if next(counter) == 12:
            done.set()

    pool.messages.submit_many(blocking, list(range(12)))
    assert done.wait(WAIT)
    assert pool.messages.size == 4


def test_a_one_worker_lane_starts_no_watchdog(make_pool):
    # Work waiting behind a running callback on a lane that cannot grow: a watchdog there
    # could never add a worker, and only woke every few milliseconds for nothing.
    pool = make_pool(concurrency=1)
    release = threading.Event()
    started = threading.Semaphore(0)
    ran = []

    def work(item):
        if item == 0:
            started.release()
            release.wait(WAIT)
        ran.append(item)

    for lane in (pool.messages, pool.control):
        lane.submit_many(work, [0, 1, 2])  # the worker takes 0 with 1 and 2 waiting behind it
        assert started.acquire(timeout=WAIT)
    assert pool.messages._watchdog is None and pool.control._watchdog is None
    release.set()
    pool.close(wait=True, timeout=WAIT)
    assert sorted(ran) == [0, 0, 1, 1, 2, 2]


def test_close_joins_every_worker_within_one_timeout(make_pool):
    # 20 workers stuck in callbacks: close(timeout=0.3) gives up on them together, not 0.3 s each.
    pool = make_pool(concurrency=20)
    release = threading.Event()
    stuck = threading.Semaphore(0)

    def block(_):
        stuck.release()
        release.wait(WAIT)

    pool.messages.submit_many(block, list(range(20)))
    for _ in range(20):
        assert stuck.acquire(timeout=WAIT)
    try:
        began = time.monotonic()
        pool.close(wait=True, timeout=0.3)
        took = time.monotonic() - began
        assert took < 2.0, f"close(timeout=0.3) took {took:.1f} s"  # (6 s before: 20 joins of 0.3 s)
    finally:
        release.set()


def hold_the_only_worker(pool) -> threading.Event:
    """Start a callback on the pool's one message worker that runs until the returned event is
    set, so that what is submitted next stays queued."""
    running, release = threading.Event(), threading.Event()

    def first(_):
        running.set()
        release.wait(WAIT)

    pool.messages.submit_many(first, [None])
    assert running.wait(WAIT)
    return release


def test_take_removes_only_matching_items_and_keeps_the_order_of_the_rest(make_pool):
    pool = make_pool(concurrency=1)
    ran = []
    release = hold_the_only_worker(pool)
    pool.messages.submit_many(ran.append, list(range(10)))
    pool.messages.submit(ran.append, "call")  # (a submit() item is never taken)
    taken = pool.messages.take(lambda fn, item: item % 3 == 0)
    assert taken == [0, 3, 6, 9]
    release.set()
    pool.close(wait=True, timeout=WAIT)
    assert ran == [1, 2, 4, 5, 7, 8, "call"]


def test_peek_lists_matching_items_and_leaves_them_queued_and_last_began_follows_starts(make_pool):
    # (AsyncConn._touch_waiting: which messages wait, and whether the workers get through work)
    pool = make_pool(concurrency=1)
    ran = []
    release = hold_the_only_worker(pool)
    began = pool.messages.last_began
    pool.messages.submit_many(ran.append, list(range(6)))
    pool.messages.submit(ran.append, "call")  # (a submit() item is never listed)
    assert pool.messages.peek(lambda fn, item: item % 2 == 0) == [0, 2, 4]
    assert pool.messages.last_began == began  # (nothing started meanwhile)
    release.set()
    pool.close(wait=True, timeout=WAIT)
    assert ran == [0, 1, 2, 3, 4, 5, "call"]
    assert pool.messages.last_began > began


def test_take_after_close_takes_nothing(make_pool):
    # Workers may be taking their stop marks: items set aside by take() then put back could be
    # left to no worker. Closed, take() leaves the queue alone (it all runs before the stops).
    pool = make_pool(concurrency=1)
    running, release = threading.Event(), threading.Event()
    ran = []

    def work(item):
        if item == 0:
            running.set()
            release.wait(WAIT)
        ran.append(item)

    pool.messages.submit_many(work, [0, 1, 2])
    assert running.wait(WAIT)
    pool.close(wait=False)
    assert pool.messages.take(lambda fn, item: True) == []
    release.set()
    pool.close(wait=True, timeout=WAIT)
    assert ran == [0, 1, 2]


def test_a_submit_racing_close_either_raises_or_runs(pool_name):
    # The closed check and the append are one step under the lane's lock: an item is never
    # queued behind the workers' stop marks, accepted and then never run.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (switch threads as often as possible: the race is a few bytecodes wide)
    try:
        for _ in range(300):
            pool = WorkerPool(1, backend="thread", name=pool_name)
            ran = []
            pool.control.submit(ran.append, -1)
            accepted = []
            go = threading.Event()

            def produce():
                go.wait(WAIT)
                for i in range(100):
                    try:
                        pool.control.submit(ran.append, i)
                    except RuntimeError:
                        return
                    accepted.append(i)

            producer = threading.Thread(target=produce)
            producer.start()
            go.set()
            pool.close(wait=True, timeout=WAIT)
            producer.join(WAIT)
            assert set(accepted) <= set(ran), f"accepted and never run: {sorted(set(accepted) - set(ran))}"
    finally:
        sys.setswitchinterval(interval)


class _NoThreadsAfter:
    """The thread backend, refusing new threads after *allowed*, as CPython 3.12.0-3.12.1 do
    once the interpreter is finalizing (atexit hooks run then)."""

    def __init__(self, allowed: int) -> None:
        from nsq_sync.backends import get_backend

        self._inner = get_backend("thread")
        self.name = "thread"
        self.allowed = allowed

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def spawn(self, fn, *args, **kwargs):
        if self.allowed <= 0:
            raise RuntimeError("can't create new thread at interpreter shutdown")
        self.allowed -= 1
        return self._inner.spawn(fn, *args, **kwargs)


def test_a_lane_that_cannot_start_more_workers_runs_everything_on_those_it_has(pool_name):
    # A spawn failing inside the busy loop killed the worker that asked for a spare, with
    # the rest of the queue in it.
    backend = _NoThreadsAfter(1)
    pool = WorkerPool(4, backend=backend, name=pool_name)
    ran = []
    all_ran = threading.Event()
    slow = threading.Event()

    def work(item):
        if item == 0:
            slow.wait(0.01)  # (a slow callback: the worker asks for a spare at once)
        ran.append(item)
        if len(ran) == 20:
            all_ran.set()

    try:
        pool.messages.submit_many(work, list(range(20)))
        assert all_ran.wait(WAIT), f"{len(ran)} of 20 ran"
        assert sorted(ran) == list(range(20))
        assert pool.messages.size == 1
    finally:
        backend.allowed = 10
        pool.close(wait=True, timeout=WAIT)


def test_idle_workers_end_down_to_one_and_the_lane_grows_again(pool_name, monkeypatch):
    # A burst fans out to every worker; idle afterwards, they ended only at close(), so a
    # Reader held max_in_flight threads for good (1,104 threads for 20 Readers in a review).
    monkeypatch.setattr(dispatch, "IDLE_WORKER_SECONDS", 0.2)
    pool = WorkerPool(4, backend="thread", name=pool_name)
    try:
        for _ in range(2):
            barrier = threading.Barrier(4)
            done = threading.Semaphore(0)

            def blocking(_item):
                barrier.wait(WAIT)
                done.release()

            pool.messages.submit_many(blocking, [0, 1, 2, 3])
            for _ in range(4):
                assert done.acquire(timeout=WAIT)
            assert pool.messages.size == 4
            threads = lambda: [t for t in threading.enumerate() if t.name.startswith(f"{pool_name}-worker-") and "watchdog" not in t.name]
            wait_until(lambda: len(threads()) == 1, WAIT, message="the idle workers end")  # (no event for a thread's end)
            assert pool.messages.size == 1
    finally:
        pool.close(wait=True, timeout=WAIT)


def _burst_with_slow_callbacks(pool, monkeypatch, slow_items, total=200):
    """Run *total* quick callbacks in one submit; those in *slow_items* move the lane's clock
    on by a second, so they look slow to it whatever the machine's load. Return the threads used."""
    monkeypatch.setattr(dispatch, "SPARE_AFTER_SECONDS", 30.0)  # (the watchdog stays out of it)
    monkeypatch.setattr(dispatch, "SLOW_CALLBACK_SECONDS", 0.5)
    offset = [0.0]
    real = dispatch._monotonic
    monkeypatch.setattr(dispatch, "_monotonic", lambda: real() + offset[0])
    done = threading.Event()
    counter = itertools.count(1)
    threads = set()

    def work(item):
        threads.add(threading.get_ident())
        if item in slow_items:
            offset[0] += 1.0
        if next(counter) == total:
            done.set()

    pool.messages.submit_many(work, list(range(total)))
    assert done.wait(WAIT)
    return threads


def test_one_slow_callback_in_a_quick_burst_does_not_start_a_spare(make_pool, monkeypatch):
    # A quick callback the OS or the GIL held up past SLOW_CALLBACK_SECONDS (common with
    # nsqd on the same cores) started a spare that then fought the first worker for the GIL
    # for the rest of the burst (the consume benchmark started one in 6 of 10 runs).
    pool = make_pool(concurrency=8)
    threads = _burst_with_slow_callbacks(pool, monkeypatch, {50})
    assert len(threads) == 1 and pool.messages.size == 1


def test_slow_callbacks_in_a_row_start_a_spare_at_once(make_pool, monkeypatch):
    pool = make_pool(concurrency=8)
    _burst_with_slow_callbacks(pool, monkeypatch, {50, 51})
    assert pool.messages.size == 2


# ------------------------------------------------------------ call_refusal
def test_call_refusal_says_why_and_caches_by_code() -> None:
    assert dispatch.call_refusal(lambda conn, data: None, 2) is None
    assert "missing a required argument" in (dispatch.call_refusal(lambda conn, data: None, 1) or "")
    assert "too many positional arguments" in (dispatch.call_refusal(lambda data: None, 2) or "")
    assert dispatch.call_refusal(print, 2) is None  # (a builtin: accepted)

    def make() -> Any:
        return lambda data: None  # (a new function each time, one code object)

    dispatch._refusals.clear()
    for _ in range(100):
        assert dispatch.call_refusal(make(), 2) is not None
    assert len(dispatch._refusals) == 1

    class Handler:
        def handle(self, conn: Any, data: Any) -> None:
            pass

    assert dispatch.call_refusal(Handler().handle, 2) is None  # (self is bound)
    assert dispatch.call_refusal(Handler().handle, 3) is not None
    assert len(dispatch._refusals) == 3  # (bound methods of one function share its entries too)
    dispatch.call_refusal(Handler().handle, 2)
    assert len(dispatch._refusals) == 3

"""LightFuture behaves as concurrent.futures.Future, including under races, across a fork
and without reference cycles, and makes no condition for a Future nobody waits on."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, List

import pytest

from nsq_sync import lightfuture
from nsq_sync.lightfuture import LightFuture
from nsq_sync.testing import wait_until

KINDS = [cf.Future, LightFuture]


def later(fn: Callable[[], Any]) -> threading.Thread:
    """Run *fn* on a daemon thread, started now."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", KINDS)
def test_result_and_exception_as_the_base_class(kind: type) -> None:
    ok = kind()
    assert not ok.done() and not ok.running() and not ok.cancelled()
    ok.set_result(b"OK")
    assert ok.done() and ok.result() == b"OK" and ok.result(0) == b"OK" and ok.exception() is None

    failed = kind()
    error = ValueError("boom")
    failed.set_exception(error)
    assert failed.done() and failed.exception() is error
    with pytest.raises(ValueError, match="boom"):
        failed.result()

    pending = kind()
    with pytest.raises(cf.TimeoutError):
        pending.result(0.01)
    with pytest.raises(cf.TimeoutError):
        pending.exception(0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_outcome_is_refused_and_the_first_kept(kind: type) -> None:
    future = kind()
    future.set_result(1)
    with pytest.raises(cf.InvalidStateError):
        future.set_result(2)
    with pytest.raises(cf.InvalidStateError):
        future.set_exception(ValueError("late"))
    assert future.result() == 1

    failed = kind()
    failed.set_exception(KeyError("first"))
    with pytest.raises(cf.InvalidStateError):
        failed.set_result(3)
    assert isinstance(failed.exception(), KeyError)


@pytest.mark.parametrize("kind", KINDS)
def test_running_and_cancel(kind: type) -> None:
    future = kind()
    assert future.cancel() and future.cancelled()
    with pytest.raises(cf.CancelledError):
        future.result()
    running = kind()
    assert running.set_running_or_notify_cancel() and running.running()
    assert not running.cancel()
    assert LightFuture(running=True).running()


@pytest.mark.parametrize("kind", KINDS)
def test_done_callbacks_before_and_after(kind: type, caplog: pytest.LogCaptureFixture) -> None:
    seen: List[Any] = []
    future = kind()
    future.add_done_callback(lambda f: seen.append(("before", f.result())))
    future.add_done_callback(lambda f: 1 / 0)  # logged, the others still run
    future.set_result(7)
    future.add_done_callback(lambda f: seen.append(("after", f.result())))
    assert seen == [("before", 7), ("after", 7)]
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.add_done_callback(lambda f: {}["missing"])
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)


def waits_on(future: cf.Future) -> bool:
    """Whether a thread waits in *future*'s condition now (a LightFuture's condition is looked
    at without creating it)."""
    cond = future._cond if isinstance(future, LightFuture) else future._condition
    return cond is not None and bool(cond._waiters)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["result", "exception", "wait"])
def test_a_thread_waiting_before_the_answer_is_woken(kind: type, how: str) -> None:
    future = kind()
    outcome: List[Any] = []

    def wait_for_it() -> None:
        if how == "result":
            outcome.append(future.result(10))
        elif how == "exception":
            outcome.append(future.exception(10))
        else:
            outcome.append(cf.wait([future], timeout=10).done)

    waiter = later(wait_for_it)
    wait_until(lambda: waits_on(future) or any(getattr(w, "event", None) for w in future._waiters), timeout=5)
    began = time.monotonic()
    future.set_result(b"OK")
    waiter.join(5)
    assert outcome == [{"result": b"OK", "exception": None, "wait": {future}}[how]]
    assert time.monotonic() - began < 5  # woken by the answer, not by its 10 s timeout

    failing = kind()
    later(lambda: (wait_until(lambda: waits_on(failing), timeout=5), failing.set_exception(ConnectionError("gone"))))
    with pytest.raises(ConnectionError):
        failing.result(10)


@pytest.mark.parametrize("kind", KINDS)
def test_wait_and_as_completed(kind: type) -> None:
    futures = [kind() for _ in range(5)]
    futures[0].set_result(0)  # one done before wait() looks

    def answer_rest() -> None:
        for i, future in enumerate(futures[1:], 1):
            future.set_result(i)

    later(answer_rest)
    done, not_done = cf.wait(futures, timeout=5)
    assert done == set(futures) and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=5)) == [0, 1, 2, 3, 4]

    first = [kind(), kind()]
    later(lambda: first[1].set_result("second"))
    done, not_done = cf.wait(first, timeout=5, return_when=cf.FIRST_COMPLETED)
    assert done == {first[1]} and not_done == {first[0]}


def test_wrap_future_in_asyncio() -> None:
    future = LightFuture(running=True)

    async def main() -> Any:
        later(lambda: future.set_result(b"OK"))
        return await asyncio.wrap_future(future)

    assert asyncio.run(main()) == b"OK"


def test_no_condition_for_a_future_nobody_waits_on() -> None:
    """The point of LightFuture: made, answered, read and called back without a condition."""
    seen: List[bytes] = []
    future = LightFuture(running=True)
    future.add_done_callback(lambda f: seen.append(f.result()))
    future.set_result(b"OK")
    assert future.done() and future.result() == b"OK" and future.exception() is None
    assert seen == [b"OK"]
    assert future._cond is None
    # A wait before the answer makes one, and the answer then notifies through it.
    waited = LightFuture()
    with pytest.raises(cf.TimeoutError):
        waited.result(0.001)
    assert waited._cond is not None
    waited.set_result(1)
    assert waited.result() == 1


def test_every_outcome_reaches_every_waiter_under_races() -> None:
    """Threads answer futures while others wait on them every way there is (result(),
    wait(), a done-callback): each waiter sees the one outcome, each callback runs once,
    and of two racing answers exactly one wins."""
    rounds = 300
    futures = [LightFuture(running=True) for _ in range(rounds)]
    calls = [0] * rounds
    winners = [0] * rounds
    lock = threading.Lock()
    start = threading.Barrier(5)
    results: List[Any] = [None] * rounds
    waited: List[Any] = [None] * rounds

    def count_call(i: int) -> Callable[[cf.Future], None]:
        def callback(future: cf.Future) -> None:
            with lock:
                calls[i] += 1

        return callback

    def answer(value: str) -> None:
        start.wait(5)
        for i, future in enumerate(futures):
            try:
                future.set_result(value)
            except cf.InvalidStateError:
                continue
            with lock:
                winners[i] += 1

    def add_callbacks() -> None:
        start.wait(5)
        for i, future in enumerate(futures):
            future.add_done_callback(count_call(i))

    def read_results() -> None:
        start.wait(5)
        for i, future in enumerate(futures):
            results[i] = future.result(5)

    def wait_each() -> None:
        start.wait(5)
        for i, future in enumerate(futures):
            done, _ = cf.wait([future], timeout=5)
            waited[i] = next(iter(done)).result()

    threads = [later(lambda: answer("a")), later(lambda: answer("b")), later(add_callbacks), later(read_results), later(wait_each)]
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert winners == [1] * rounds
    assert calls == [1] * rounds
    assert results == [f.result() for f in futures] == waited
    assert set(results) <= {"a", "b"}


class _Checked(LightFuture):
    """Asserts the rule of lightfuture's docstring on every change: while there is no
    condition, state changes and done-callback appends happen under _guard; once there is
    one, under the condition."""

    def __init__(self) -> None:
        super().__init__()
        self._done_callbacks = _CheckedList(self)
        self.__dict__["_ready"] = True

    def held(self) -> bool:
        cond = self.__dict__.get("_cond")
        if cond is None:
            return lightfuture._guard.locked()
        return cond._is_owned()

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_ready") and name in ("_state", "_result", "_exception", "_cond"):
            if name == "_cond":
                assert lightfuture._guard.locked(), "condition installed outside _guard"
            else:
                assert self.held(), f"{name} changed outside the lock that orders it"
        object.__setattr__(self, name, value)


class _CheckedList(list):
    def __init__(self, future: _Checked) -> None:
        super().__init__()
        self.future = future

    def append(self, item: Any) -> None:
        assert self.future.held(), "done-callback appended outside the lock that orders it"
        super().append(item)


def test_changes_happen_under_the_lock_that_orders_them() -> None:
    quick = _Checked()
    quick.add_done_callback(lambda f: None)
    quick.set_result(1)
    assert quick._cond is None
    failed = _Checked()
    failed.add_done_callback(lambda f: None)
    failed.set_exception(ValueError("x"))

    slow = _Checked()
    with pytest.raises(cf.TimeoutError):
        slow.result(0.001)  # installs the condition
    slow.add_done_callback(lambda f: None)
    slow.set_result(2)
    assert slow.result() == 2
    cancelled = _Checked()
    assert cancelled.cancel()
    running = _Checked()
    assert running.set_running_or_notify_cancel()
    running.set_exception(KeyError("y"))


def test_a_raised_outcome_leaves_no_reference_cycle() -> None:
    """result() raising a failed Future's exception: the traceback holds result()'s frame,
    which must not hold the Future (every failed publish would wait for the cyclic GC)."""
    gc.disable()
    try:
        for waited in (False, True):
            future = LightFuture()
            if waited:
                with pytest.raises(cf.TimeoutError):
                    future.result(0.001)  # the base class's path raises it below
            future.set_exception(ValueError("failed"))
            with pytest.raises(ValueError):
                future.result()
            ref = weakref.ref(future)
            del future
            assert ref() is None, f"a cycle keeps the Future (waited={waited})"
    finally:
        gc.enable()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # (the point of the test)
def test_a_child_forked_while_another_thread_held_the_guard_completes_futures() -> None:
    """Another thread of the parent holds _guard (it is inside a Future's change of state) at
    the instant of the fork: the child must not inherit it held, or its first publish hangs."""
    held, release = threading.Event(), threading.Event()

    def hold_the_guard() -> None:
        with lightfuture._guard:
            held.set()
            release.wait(10)

    holder = later(hold_the_guard)
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: complete and read one, then leave at once
        try:
            child = LightFuture()
            child.add_done_callback(lambda f: None)
            child.set_result(b"OK")
            os._exit(0 if child.result() == b"OK" else 1)
        finally:
            os._exit(2)
    release.set()
    holder.join(5)
    statuses: List[int] = []
    reaper = later(lambda: statuses.append(os.waitpid(pid, 0)[1]))
    reaper.join(10)
    if reaper.is_alive():
        os.kill(pid, 9)
        reaper.join(5)
        pytest.fail("the child hung on the guard it inherited held")
    assert os.WIFEXITED(statuses[0]) and os.WEXITSTATUS(statuses[0]) == 0

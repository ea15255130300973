"""The timer task (nsq_sync.timers._Scheduler): order, cancellation, and the idle exit that
Message.auto_touch()'s shared task uses. Waits are on events the callbacks set."""

from __future__ import annotations

import threading
from typing import List

from nsq_sync.backends import get_backend
from nsq_sync.testing import wait_until
from nsq_sync.timers import _Scheduler


def test_callbacks_run_in_due_order_and_cancelled_ones_never() -> None:
    scheduler = _Scheduler(get_backend("thread"), "test-timers")
    scheduler.start()
    ran: List[str] = []
    done = threading.Event()
    try:
        scheduler.call_later(0.06, lambda: (ran.append("last"), done.set()))
        scheduler.call_later(0.02, ran.append, "first")
        scheduler.call_later(0.04, ran.append, "cancelled").cancel()
        assert done.wait(5)
    finally:
        scheduler.stop()
        scheduler.join(5)
    assert ran == ["first", "last"] and not scheduler.task.is_alive()


def test_an_idle_scheduler_ends_its_task_and_the_next_timer_starts_another() -> None:
    scheduler = _Scheduler(get_backend("thread"), "test-idle-timers", idle_exit=0.05)
    assert scheduler.task is None  # (no task before the first timer)
    fired = threading.Event()
    scheduler.call_later(0.0, fired.set)
    first = scheduler.task
    assert first is not None and fired.wait(5)
    wait_until(lambda: scheduler.task is None, 5, message="the idle task ended")
    first.join(5)
    assert not first.is_alive()
    # A cancelled timer does not keep the task: it ends as if the heap were empty.
    scheduler.call_later(60, fired.set).cancel()
    wait_until(lambda: scheduler.task is None, 5, message="the task ended despite the cancelled timer")
    fired.clear()
    scheduler.call_later(0.0, fired.set)
    assert fired.wait(5) and scheduler.task is not first

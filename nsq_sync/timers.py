"""Run callbacks at a due time, on one task (a thread or a greenlet) per scheduler.

A Reader keeps one for its timers (reconnects, backoff windows, RDY redistribution); the
keep-alive of :meth:`Message.auto_touch` shares one per process and backend.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from typing import Any, Callable, List, Optional, Tuple

from .backends import Backend

logger = logging.getLogger("nsq_sync.reader")  # (where these timers always logged)


class _Timer:
    __slots__ = ("when", "seq", "fn", "args", "cancelled")

    def __init__(self, when: float, seq: int, fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "_Timer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class _Scheduler:
    """One task that runs callbacks at their due time; call_later from any thread.

    Callbacks run in the scheduler task, one at a time, and must not block for long.

    With *idle_exit* (seconds), the task starts with the first call_later and ends once no
    timer has been due for that long; the next call_later starts another. Without it, the
    owner calls start() and stop().
    """

    def __init__(self, backend: Backend, name: str, idle_exit: Optional[float] = None) -> None:
        self._backend = backend
        self._name = name
        self._lock = backend.lock()
        self._wake = backend.event()
        self._heap: List[_Timer] = []
        self._seq = itertools.count()
        self._stopped = False
        self._idle_exit = idle_exit
        self.task: Any = None

    def start(self) -> None:
        with self._lock:
            if self.task is not None or self._stopped:
                return
            self.task = self._backend.spawn(self._run, name=self._name)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> _Timer:
        timer = _Timer(time.monotonic() + max(0.0, delay), next(self._seq), fn, args)
        with self._lock:
            if self._stopped:
                timer.cancelled = True
                return timer
            heapq.heappush(self._heap, timer)
            earliest = self._heap[0] is timer
            if self.task is None and self._idle_exit is not None:
                self.task = self._backend.spawn(self._run, name=self._name)
        if earliest:
            self._wake.set()
        return timer

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for timer in self._heap:
                timer.cancelled = True
            self._heap.clear()
        self._wake.set()

    def join(self, timeout: Optional[float]) -> None:
        task = self.task
        if task is not None and not _is_current(self._backend, task):
            task.join(timeout)

    def _run(self) -> None:
        idle_exit = self._idle_exit
        while True:
            due: List[_Timer] = []
            with self._lock:
                if self._stopped:
                    return
                # Cleared under the lock: a call_later after this point sets it again.
                self._wake.clear()
                now = time.monotonic()
                heap = self._heap
                while heap and (heap[0].when <= now or heap[0].cancelled):
                    timer = heapq.heappop(heap)
                    if not timer.cancelled:
                        due.append(timer)
                timeout = (heap[0].when - now) if heap else idle_exit
            if not due:
                if not self._wake.wait(timeout) and idle_exit is not None:
                    with self._lock:
                        if not self._heap and not self._wake.is_set():
                            self.task = None  # (under the lock: call_later starts another)
                            return
                continue
            for timer in due:
                if timer.cancelled or self._stopped:
                    continue
                try:
                    timer.fn(*timer.args)
                except Exception:
                    logger.exception("%s: timer callback %r raised", self._name, timer.fn)


def _is_current(backend: Backend, task: Any) -> bool:
    current = backend.current()
    return task is current or getattr(task, "_greenlet", None) is current

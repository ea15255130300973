"""The worker pool that runs callbacks, so a connection's reader never runs user code.

A :class:`WorkerPool` has two lanes:

* ``control``: one worker, strictly ordered: lifecycle events (close, error,
  heartbeat, response, ...), so they never wait behind slow message handlers;
* ``messages``: up to ``concurrency`` workers for ``message`` listeners.

Workers start lazily, when work arrives and none is idle, and stop on
:meth:`WorkerPool.close`. A callback's exception is logged with its
traceback and contained. The queues are unbounded on purpose: nsqd never has
more than RDY messages in flight per connection, so RDY bounds them.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Union

from .backends import Backend, get_backend
from .errors import ConfigError

__all__ = ["WorkerPool", "Lane"]

logger = logging.getLogger(__name__)

_STOP = object()


class Lane:
    """A FIFO of callables served by up to ``workers`` tasks."""

    def __init__(self, backend: Backend, workers: int, name: str) -> None:
        self._backend = backend
        self._max = workers
        self._name = name
        self._queue = backend.queue()
        self._lock = backend.lock()
        self._tasks: List[Any] = []
        self._idle = 0
        self._closed = False
        self._local_ids: set = set()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises RuntimeError once the lane is closed."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        self._queue.put((fn, args))
        if self._idle == 0 and len(self._tasks) < self._max:
            self._maybe_spawn()

    def submit_many(self, fn: Callable[[Any], Any], items: List[Any]) -> None:
        """Queue ``fn(item)`` for each item; wakes as many workers as there are items."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed")
        put = self._queue.put
        for item in items:
            put((fn, (item,)))
        if self._idle < len(items) and len(self._tasks) < self._max:
            self._maybe_spawn(len(items) - self._idle)

    def _maybe_spawn(self, wanted: int = 1) -> None:
        with self._lock:
            while wanted > 0 and len(self._tasks) < self._max and not self._closed:
                index = len(self._tasks)
                self._idle += 1  # counted idle until it takes its first item
                self._tasks.append(self._backend.spawn(self._run, name=f"{self._name}-{index}"))
                wanted -= 1

    def _run(self) -> None:
        queue = self._queue
        get, get_nowait, empty = queue.get, queue.get_nowait, self._backend.Empty
        lock = self._lock
        self._local_ids.add(id(self._backend.current()))
        counted_idle = True  # the spawner counted this worker idle
        while True:
            if counted_idle:
                item = get()
                with lock:
                    self._idle -= 1
                counted_idle = False
            else:
                try:
                    item = get_nowait()  # busy: no idle bookkeeping, no locks
                except empty:
                    with lock:
                        self._idle += 1
                    counted_idle = True
                    continue
            if item is _STOP:
                return
            # Work still queued and nobody idle: start a helper, so items never wait
            # behind a slow callback while the lane has room for more workers.
            if not self._idle and len(self._tasks) < self._max and queue.qsize() > 0:
                self._maybe_spawn()
            fn, args = item
            try:
                fn(*args)
            except Exception:
                logger.exception("callback %r raised", fn)
            except BaseException:  # a worker must not die silently (gevent GreenletExit, SystemExit)
                logger.exception("callback %r raised a BaseException; worker goes on", fn)

    def in_worker(self) -> bool:
        """True when called from one of this lane's workers."""
        return id(self._backend.current()) in self._local_ids

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Run what is queued, then stop every worker; with *wait*, join them (not from inside a worker)."""
        with self._lock:
            if self._closed:
                tasks = list(self._tasks)
            else:
                self._closed = True
                tasks = list(self._tasks)
                for _ in tasks:
                    self._queue.put(_STOP)
        if wait and not self.in_worker():
            for task in tasks:
                task.join(timeout)

    @property
    def size(self) -> int:
        """How many workers are running."""
        return len(self._tasks)


class WorkerPool:
    """Where callbacks run: an ordered ``control`` lane and a ``messages`` lane of *concurrency* workers.

    One pool may serve many connections (a Reader shares one across its connections).
    Raises ConfigError when concurrency is not a positive int.
    """

    def __init__(self, concurrency: int = 1, backend: Union[str, Backend, None] = None, name: str = "nsq_sync") -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError("concurrency", concurrency, "must be an int >= 1")
        self.backend = get_backend(backend)
        self.concurrency = concurrency
        self.control = Lane(self.backend, 1, f"{name}-control")
        self.messages = Lane(self.backend, concurrency, f"{name}-worker")

    def in_worker(self) -> bool:
        """True when called from one of this pool's workers."""
        return self.control.in_worker() or self.messages.in_worker()

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Finish queued callbacks, stop the workers and (with *wait*) join them."""
        self.messages.close(wait, timeout)
        self.control.close(wait, timeout)

    @property
    def closed(self) -> bool:
        return self.control._closed

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

import collections
import itertools
import logging
from time import monotonic as _monotonic
from types import FunctionType, MethodType
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from .backends import Backend, get_backend
from .errors import ConfigError

__all__ = ["WorkerPool", "Lane"]

logger = logging.getLogger(__name__)

_STOP = object()
_NO_ARG = object()  # the second half of a queued _Call


#: call_refusal's answers, by function code (or callable object) and argument count
_refusals: Dict[Any, Optional[str]] = {}
_REFUSALS_MAX = 4096


def call_refusal(fn: Callable[..., Any], nargs: int) -> Optional[str]:
    """Why *fn* cannot be called with *nargs* positional arguments (the TypeError that
    ``inspect.signature(fn).bind`` raises, as text), or None when it can or its signature is
    unknown (some builtins and C callables).

    Cached, so that checking a callback on every call costs a dict lookup: a plain function
    (or a method of one) by its code object, defaults and argument count, so lambdas made
    anew for each call share one entry; any other callable by itself when hashable."""
    extra = 0
    target: Any = fn
    if fn.__class__ is MethodType:
        target, extra = fn.__func__, 1  # type: ignore[attr-defined]
    if target.__class__ is FunctionType and "__wrapped__" not in target.__dict__ and "__signature__" not in target.__dict__:
        kwdefaults = target.__kwdefaults__
        key: Any = (target.__code__, len(target.__defaults__ or ()), tuple(kwdefaults) if kwdefaults else None, nargs + extra)
    else:
        key = (fn, nargs)
    try:
        return _refusals[key]
    except KeyError:
        pass
    except TypeError:  # (an unhashable callable: checked each time)
        key = None
    import inspect  # (here: importing it costs 1.4 MB of RSS, and most programs never get this far)

    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        refusal = None
    else:
        try:
            signature.bind(*([None] * (nargs + extra)))
            refusal = None
        except TypeError as exc:
            refusal = str(exc)
    if key is not None:
        if len(_refusals) >= _REFUSALS_MAX:
            _refusals.clear()
        _refusals[key] = refusal
    return refusal


class _Call:
    """A queued ``fn(*args)`` (Lane.submit); submit_many queues ``(fn, item)`` pairs, which
    the workers call as ``fn(item)``: one tuple and no argument unpacking per message."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], args: Tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> None:
        self.fn(*self.args)

    def __repr__(self) -> str:
        return repr(self.fn)


#: threads: a spare worker joins when work waited this long with no callback starting
SPARE_AFTER_SECONDS = 0.005
#: the watchdog thread parks after this long with nothing to watch
WATCHDOG_PARK_SECONDS = 0.1
#: two callbacks in a row that ran this long wake a spare at once when work waits (threads)
SLOW_CALLBACK_SECONDS = 0.001
#: a worker asleep this long with nothing to do ends (down to one per lane): a burst's workers
#: (up to concurrency, max_in_flight by default) do not hold their threads for good
IDLE_WORKER_SECONDS = 60.0


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else _monotonic() + timeout


def _left(deadline: Optional[float]) -> Optional[float]:
    """Seconds to *deadline* (never negative); None for no deadline."""
    return None if deadline is None else max(0.0, deadline - _monotonic())


class Lane:
    """A FIFO of callables served by up to ``workers`` tasks.

    Waking is one at a time: a submit wakes (or starts) a worker only when none is free.
    A spare joins when work waits and no worker is free: under gevent at once (a
    greenlet switch is cheap); on threads at once after two callbacks in a row that ran at
    least SLOW_CALLBACK_SECONDS, otherwise only once no callback has started for
    SPARE_AFTER_SECONDS, checked by a watchdog thread that runs while the lane is busy.
    A burst of quick callbacks is run by one worker instead of waking threads that fight
    for the GIL (on CPython each wake-up costs more than a quick callback), while slow
    or stuck callbacks still fan out to every worker, a few milliseconds apart, so
    nothing waits long behind them.
    """

    def __init__(self, backend: Backend, workers: int, name: str) -> None:
        self._backend = backend
        self._max = workers
        self._name = name
        self._items: Deque[Any] = collections.deque()
        self._numbers = itertools.count()  # worker names
        self._lock = backend.lock()
        self._tasks: List[Any] = []  # every worker started (ended ones included until the next start)
        self._live = 0  # workers running
        self._can_grow = workers > 0  # self._live < workers, kept for the busy loop
        self._sleepers: List[Any] = []  # wake handles of sleeping workers, most recent last
        self._free = 0  # workers awake and not running a callback (woken ones included)
        self._closed = False
        self._local_ids: set = set()
        # Connections whose next read an idle worker may do (AsyncConn._lead_read), each once
        # (_lead_offered): while every worker is busy, a reader task offers after each read.
        self._lead_jobs: Deque[Any] = collections.deque()
        self._lead_offered: set = set()
        self._started = 0  # callbacks started (the watchdog's sign of progress)
        #: monotonic time the latest callback started (set by whichever worker started it):
        #: while work waits, how a connection tells workers getting through it from hung ones
        #: (AsyncConn._touch_waiting)
        self.last_began = _monotonic()
        self._eager = getattr(backend, "name", "") != "thread"
        self._watchdog: Any = None
        self._watch_parked = False
        self._watch_wake = self._wake_handle()

    def _wake_handle(self) -> Any:
        make = getattr(self._backend, "wake", None)
        if make is not None:
            return make()
        lock = self._backend.lock()  # (a backend of your own without wake())
        lock.acquire()
        return lock

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; raises RuntimeError once the lane is closed."""
        entry = (_Call(fn, args), _NO_ARG)
        with self._lock:  # under the lock: a worker deciding to sleep has either seen the item or is not free
            if self._closed:  # (checked with the append under the lock: never queued behind the stops)
                raise RuntimeError(f"{self._name} is closed")
            self._items.append(entry)
            self._wake_locked()

    def submit_many(self, fn: Callable[[Any], Any], items: List[Any]) -> None:
        """Queue ``fn(item)`` for each item (one worker is woken; more join as needed)."""
        entries = [(fn, item) for item in items]
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._items.extend(entries)
            self._wake_locked()

    def take(self, match: Callable[[Any, Any], bool]) -> List[Any]:
        """Remove the queued ``fn(item)`` pairs (submit_many) for which ``match(fn, item)`` is
        true and return their items, in queue order; nothing else moves. A worker popping
        meanwhile may run one of the others first (the lane never promised an order between
        workers), but every item is either taken here or run, never both."""
        items = self._items
        kept: List[Any] = []
        taken: List[Any] = []
        with self._lock:  # (a worker deciding to sleep waits for the kept items to be back)
            if self._closed:
                # Workers may be taking their stop marks: one could end while the items
                # before its mark were set aside here, and leave them to no one. What is
                # queued runs before the stops anyway.
                return taken
            for _ in range(len(items)):
                try:
                    entry = items.popleft()
                except IndexError:  # a worker took the rest
                    break
                if entry is not _STOP and entry[1] is not _NO_ARG and match(entry[0], entry[1]):
                    taken.append(entry[1])
                else:
                    kept.append(entry)
            items.extendleft(reversed(kept))
        return taken

    def peek(self, match: Callable[[Any, Any], bool]) -> List[Any]:
        """The items of the queued ``fn(item)`` pairs (submit_many) for which ``match(fn, item)``
        is true, in queue order, left queued (a worker may start any of them meanwhile)."""
        with self._lock:
            return [entry[1] for entry in self._items if entry is not _STOP and entry[1] is not _NO_ARG and match(entry[0], entry[1])]

    def offer_lead(self, conn: Any) -> None:
        """Let the next worker that runs out of work call ``conn._lead_read()`` before it sleeps.

        A connection already waiting for a worker is not queued again: while handlers are
        behind (a backlog), no worker runs out of work, the reader task reads for itself
        after each short park, and offered again after every read; the queue grew by about
        100 entries a second for as long as the backlog lasted."""
        offered = self._lead_offered
        if conn in offered:
            return
        offered.add(conn)
        self._lead_jobs.append(conn)

    def withdraw_lead(self, conn: Any) -> None:
        """Forget *conn*'s offer: its connection ended. (Kept, it held the closed connection,
        its read buffer and its messages until a worker ran out of work.)"""
        if conn in self._lead_offered:
            self._lead_offered.discard(conn)
            try:
                self._lead_jobs.remove(conn)
            except ValueError:
                pass  # a worker took it meanwhile

    def _wake_locked(self) -> None:
        # Caller holds the lock. Wake a sleeper, or start a worker, unless one is free.
        if self._free or self._closed:
            return
        if self._sleepers:
            self._free += 1
            self._sleepers.pop().release()
        elif self._live < self._max:
            try:
                task = self._backend.spawn(self._run, name=f"{self._name}-{next(self._numbers)}")
            except RuntimeError:
                # No new thread (CPython 3.12.0-3.12.1 start none once the interpreter is
                # finalizing, where atexit hooks close Readers): the workers already there go on.
                if not self._live:
                    raise
                return
            self._free += 1
            self._live += 1
            if len(self._tasks) >= self._max:
                self._tasks = [other for other in self._tasks if other.is_alive()]  # (retired ones)
            self._tasks.append(task)
            self._can_grow = self._live < self._max

    def _run(self) -> None:
        items = self._items
        popleft = items.popleft
        lock = self._lock
        self._local_ids.add(id(self._backend.current()))
        handle = self._wake_handle()  # held: acquiring it again sleeps until a waker releases it
        while True:
            # Free (counted in _free): take an item, or go to sleep.
            try:
                item = popleft()
            except IndexError:
                if self._lead_jobs:
                    # Read for a connection whose reader task parked: messages it reads
                    # queue here, and this worker (still counted free) runs them next.
                    try:
                        conn = self._lead_jobs.popleft()
                    except IndexError:
                        continue
                    self._lead_offered.discard(conn)  # (before the read: it may offer again)
                    try:
                        conn._lead_read()
                    except Exception:
                        logger.exception("reading for %r raised", conn)
                    continue
                with lock:
                    if items:
                        continue
                    self._free -= 1
                    if self._closed:
                        self._live -= 1
                        return
                    self._sleepers.append(handle)
                if handle.acquire(timeout=IDLE_WORKER_SECONDS):
                    continue  # the waker counted us free again
                with lock:
                    if handle in self._sleepers and self._live > 1:
                        # Idle for IDLE_WORKER_SECONDS and nobody woke us: end.
                        self._sleepers.remove(handle)
                        self._live -= 1
                        self._can_grow = True
                        self._local_ids.discard(id(self._backend.current()))
                        return
                # A waker took us from the sleepers and releases the handle (it counted us
                # free), or this is the lane's last worker: sleep on.
                handle.acquire()
                continue
            with lock:
                self._free -= 1
                if items and not self._free:
                    self._need_spare_locked()  # so nothing queued waits long behind this callback
            # Busy: run items back to back without touching the free count. One clock read
            # per callback: its end is the next one's start.
            began = _monotonic()
            slow_run = 0  # consecutive callbacks that ran SLOW_CALLBACK_SECONDS
            while True:
                if item is _STOP:
                    with lock:
                        self._live -= 1
                    return
                fn, arg = item
                self._started += 1  # (a lost increment under a race still shows progress)
                self.last_began = began
                try:
                    if arg is _NO_ARG:
                        fn()
                    else:
                        fn(arg)
                except Exception:
                    logger.exception("callback %r raised", fn)
                except BaseException:  # a worker must not die silently (gevent GreenletExit, SystemExit)
                    logger.exception("callback %r raised a BaseException; worker goes on", fn)
                try:
                    item = popleft()
                except IndexError:
                    break
                ended = _monotonic()
                # Two in a row: one quick callback that the OS or the GIL held up past 1 ms
                # (often, with nsqd on the same cores) is not a sign of slow handlers, and a
                # spare started for it contends for the GIL with this worker from then on.
                slow_run = slow_run + 1 if ended - began >= SLOW_CALLBACK_SECONDS else 0
                slow = slow_run >= 2
                began = ended
                if items and not self._free and (self._sleepers or self._can_grow):
                    # After a slow callback (I/O-bound handlers) a spare joins at once, so a
                    # backlog fans out to every worker; after a quick one the watchdog decides.
                    if slow or self._eager or self._watch_parked or self._watchdog is None:
                        with lock:  # (otherwise the watchdog is watching: skip the lock)
                            if items and not self._free:
                                if slow:
                                    self._wake_locked()
                                else:
                                    self._need_spare_locked()
            with lock:
                self._free += 1

    def _need_spare_locked(self) -> None:
        # Caller holds the lock; work waits and no worker is free.
        if not self._can_grow and not self._sleepers:
            return  # every worker is running a callback: nothing to add (a one-worker lane)
        if self._eager:
            self._wake_locked()
        elif self._watchdog is None:
            if not self._closed:
                try:
                    self._watchdog = self._backend.spawn(self._watch, name=f"{self._name}-watchdog")
                except RuntimeError:
                    pass  # (no new thread at interpreter shutdown: _wake_locked)
        elif self._watch_parked:
            self._watch_parked = False
            self._watch_wake.release()

    def _watch(self) -> None:
        """Threads: add a spare worker when work waits, no worker is free and no callback
        started for SPARE_AFTER_SECONDS; park after a quiet while."""
        items = self._items
        wake = self._watch_wake  # held; released to park-wake us, or by close()
        quiet = 0.0
        while not self._closed:
            if items and not self._free and (self._can_grow or self._sleepers):
                quiet = 0.0
                seen = self._started
                wake.acquire(timeout=SPARE_AFTER_SECONDS)  # early only at close
                if self._started == seen and items and not self._free:
                    with self._lock:
                        if items and not self._free:
                            self._wake_locked()
                continue
            if quiet >= WATCHDOG_PARK_SECONDS:
                with self._lock:
                    if self._closed or (items and not self._free):
                        continue
                    self._watch_parked = True
                wake.acquire()  # released by _need_spare_locked or close()
                quiet = 0.0
                continue
            wake.acquire(timeout=SPARE_AFTER_SECONDS)  # early only at close
            quiet += SPARE_AFTER_SECONDS

    def in_worker(self) -> bool:
        """True when called from one of this lane's workers."""
        return id(self._backend.current()) in self._local_ids

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Run what is queued, then stop every worker; with *wait*, join them (not from inside a
        worker), all of them within *timeout* in total (None: no limit)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                for _ in self._tasks:
                    self._items.append(_STOP)
                # Sleepers wake to take the stops (and whatever is queued before them).
                while self._sleepers:
                    self._free += 1
                    self._sleepers.pop().release()
                self._lead_jobs.clear()
                self._lead_offered.clear()
                if self._watchdog is not None:
                    self._watch_parked = False
                    try:
                        self._watch_wake.release()  # ends a park or a periodic wait now
                    except RuntimeError:
                        pass  # already released: the watchdog sees _closed next
            tasks = list(self._tasks)
            if self._watchdog is not None:
                tasks.append(self._watchdog)
        if wait and not self.in_worker():
            deadline = _deadline(timeout)
            for task in tasks:
                task.join(_left(deadline))

    @property
    def size(self) -> int:
        """How many workers are running."""
        return self._live


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
        """Finish queued callbacks, stop the workers and (with *wait*) join them, within
        *timeout* in total (None: no limit)."""
        deadline = _deadline(timeout)
        self.messages.close(wait, timeout)
        self.control.close(wait, _left(deadline))

    @property
    def closed(self) -> bool:
        return self.control._closed

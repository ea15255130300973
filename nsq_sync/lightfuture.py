"""A :class:`concurrent.futures.Future` that builds its condition only when someone waits.

``concurrent.futures.Future`` creates a ``threading.Condition`` (and the ``RLock`` in it) for
every instance and takes it for every call, ``done()`` included. A publish's Future is mostly
answered before anyone asks for it: with 100 publishes outstanding from one thread, the
condition's creation, its lock and its notify were about a third of the client's CPU per
publish (``perf``, CPython 3.13). :class:`LightFuture` creates the condition on first use
(``result()`` or ``exception()`` before the answer, ``concurrent.futures.wait``,
``as_completed``, ``cancel()``, ``set_running_or_notify_cancel()``, ``repr()``); until then a
short lock shared by every LightFuture orders the changes of state, and reading the state
(``done()``, ``running()``, ``cancelled()``, a finished one's outcome) takes no lock at all.

The rule that keeps it correct: while a LightFuture has no condition, its state changes and
its done-callbacks are appended under ``_guard``; the condition is installed under ``_guard``
too, and from then on the base class's methods run as they are. So a waiter that installed the
condition either sees the final state, or the change comes later and takes the condition's
path (it notifies). The stdlib's module functions (``wait``, ``as_completed``) only use
``_condition``, ``_waiters`` and ``_state``, which keep their meaning.

Only attribute stores and a list append run under ``_guard`` (the condition is built before
it is taken): no Python code that a signal handler or a finalizer could interrupt to take it
again, and nothing that switches greenlets. A forked child gets a fresh ``_guard`` (the
parent's may have been held by another thread at the fork).
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, Callable, Optional


def _native_lock() -> Any:
    """A lock of the OS (held for a few bytecodes, never across a wait, so a greenlet and a
    thread may share it even after gevent patched the process)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original("_thread", "allocate_lock")()
    return _thread.allocate_lock()


_guard = _native_lock()


def _fresh_guard_in_child() -> None:
    global _guard
    _guard = _native_lock()


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_fresh_guard_in_child)

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_CANCELLED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED))
_LOGGER = logging.getLogger("concurrent.futures")


class LightFuture(Future):  # type: ignore[type-arg]
    """A Future (same API, same semantics) that is cheap to make, complete and read."""

    def __init__(self, running: bool = False) -> None:  # (no super().__init__: it makes the condition)
        self._cond: Optional[threading.Condition] = None
        self._state = RUNNING if running else PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._waiters: list = []
        self._done_callbacks: list = []

    @property  # type: ignore[override]
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            new = threading.Condition()  # (built outside _guard: see the module's docstring)
            with _guard:
                cond = self._cond
                if cond is None:
                    cond = self._cond = new
        return cond

    def done(self) -> bool:
        return self._state in _DONE

    def running(self) -> bool:
        return self._state == RUNNING

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def result(self, timeout: Optional[float] = None) -> Any:
        try:
            if self._state == FINISHED:
                error = self._exception
                if not error:  # (as the base class tests it)
                    return self._result
                raise error
            return super().result(timeout)
        finally:
            # No reference cycle through a raised exception's traceback, which holds this frame.
            self = None  # type: ignore[assignment]
            error = None

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:  # type: ignore[override]
        with _guard:
            cond = self._cond
            if cond is None and self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        if cond is not None:
            super().add_done_callback(fn)
            return
        try:
            fn(self)
        except Exception:
            _LOGGER.exception("exception calling callback for %r", self)  # (as the base class does)

    def _finish(self, result: Any, exception: Optional[BaseException]) -> bool:
        """The change to FINISHED while there is no condition (True: done here, callbacks to
        run); False when there is one, for the base class's method to make it."""
        with _guard:
            if self._cond is not None:
                return False
            state = self._state
            if state not in _DONE:
                self._result = result
                self._exception = exception
                self._state = FINISHED
                return True
        raise InvalidStateError(f"{state}: {self!r}")  # (repr takes _guard: not under it)

    def set_result(self, result: Any) -> None:
        if not self._finish(result, None):
            super().set_result(result)
        elif self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if not self._finish(None, exception):
            super().set_exception(exception)
        elif self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

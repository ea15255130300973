"""The event registry behind ``on``/``off``/``trigger`` (pynsq's EventedMixin, thread-safe).

Listeners are kept as tuples replaced on every change (copy on write), so
firing never takes a lock and never sees a half-updated list.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Tuple

from .errors import DuplicateListenerError, InvalidListenerError

__all__ = ["EventedMixin", "EVENTS"]

logger = logging.getLogger(__name__)

#: The events AsyncConn fires (``continue`` is pynsq's undocumented requeue-without-backoff event).
EVENTS = (
    "connect",
    "close",
    "error",
    "identify",
    "identify_response",
    "auth",
    "auth_response",
    "heartbeat",
    "ready",
    "message",
    "response",
    "backoff",
    "resume",
    "continue",
)

Listener = Callable[..., Any]


class EventedMixin:
    """``on(name, callback)``, ``off(name, callback)`` and ``trigger(name, *args, **kwargs)``."""

    def __init__(self) -> None:
        self._listeners: Dict[str, Tuple[Listener, ...]] = {}
        # A plain lock is fine under gevent too: nothing blocks while holding it.
        self._listeners_lock = threading.Lock()

    def on(self, name: str, callback: Listener) -> None:
        """Listen for the named event with *callback*.

        Raises DuplicateListenerError when *callback* already listens to *name*,
        TypeError when it is not callable.
        """
        if not callable(callback):
            raise TypeError(f"callback for {name!r} must be callable, not {type(callback).__name__}")
        with self._listeners_lock:
            current = self._listeners.get(name, ())
            if callback in current:
                raise DuplicateListenerError(f"{callback!r} already listens to {name!r}")
            self._listeners[name] = current + (callback,)

    def off(self, name: str, callback: Listener) -> None:
        """Stop *callback* listening for the named event. Raises InvalidListenerError if it was not listening."""
        with self._listeners_lock:
            current = self._listeners.get(name, ())
            if callback not in current:
                raise InvalidListenerError(f"{callback!r} does not listen to {name!r}")
            remaining = tuple(cb for cb in current if cb != callback)
            if remaining:
                self._listeners[name] = remaining
            else:
                del self._listeners[name]

    def trigger(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Call every listener of *name* now, in this thread, in the order they were added.

        An exception from a listener propagates to the caller, as in pynsq.
        """
        for callback in self._listeners.get(name, ()):
            callback(*args, **kwargs)

    def _fire(self, name: str, **kwargs: Any) -> None:
        """Like trigger, but a listener's exception is logged and the rest still run."""
        for callback in self._listeners.get(name, ()):
            try:
                callback(**kwargs)
            except Exception:
                logger.exception("listener %r for %r raised", callback, name)

    def has_listeners(self, name: str) -> bool:
        return bool(self._listeners.get(name))

"""The event registry behind ``on``/``off``/``trigger`` (pynsq's EventedMixin, thread-safe).

Listeners are kept as tuples replaced on every change (copy on write), so
firing never takes a lock and never sees a half-updated list.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Tuple

from .errors import DuplicateListenerError, InvalidListenerError

__all__ = [
    "EventedMixin",
    "EVENTS",
    "CONNECT",
    "CLOSE",
    "ERROR",
    "IDENTIFY",
    "IDENTIFY_RESPONSE",
    "AUTH",
    "AUTH_RESPONSE",
    "HEARTBEAT",
    "READY",
    "MESSAGE",
    "RESPONSE",
    "BACKOFF",
    "RESUME",
    "CONTINUE",
]

logger = logging.getLogger(__name__)

# pynsq's constants for the events (``nsq.event.MESSAGE``): ``nsq_sync.event`` is this module.
CONNECT = "connect"
CLOSE = "close"
ERROR = "error"
IDENTIFY = "identify"
IDENTIFY_RESPONSE = "identify_response"
AUTH = "auth"
AUTH_RESPONSE = "auth_response"
HEARTBEAT = "heartbeat"
READY = "ready"
MESSAGE = "message"
RESPONSE = "response"
BACKOFF = "backoff"
RESUME = "resume"
CONTINUE = "continue"

#: The events AsyncConn fires (``continue`` is pynsq's undocumented requeue-without-backoff event).
EVENTS = (CONNECT, CLOSE, ERROR, IDENTIFY, IDENTIFY_RESPONSE, AUTH, AUTH_RESPONSE, HEARTBEAT, READY, MESSAGE, RESPONSE, BACKOFF, RESUME, CONTINUE)

#: pynsq names nsq_sync has no event for, and what to use instead
_NOT_FIRED = {
    "DATA": "nsq_sync fires no event per frame read; listen to 'message', 'response' or 'heartbeat'",
    "FINISH": "a Message has no events in nsq_sync; an AsyncConn fires 'resume' after a FIN",
    "REQUEUE": "a Message has no events in nsq_sync; an AsyncConn fires 'backoff' or 'continue' after a REQ",
    "TOUCH": "a Message has no events in nsq_sync; touch() returns whether the TOUCH was sent",
}


def __getattr__(name: str) -> Any:
    hint = _NOT_FIRED.get(name)
    if hint is not None:
        raise AttributeError(f"nsq_sync.events has no {name} (pynsq's {name.lower()!r} event): {hint}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Listener = Callable[..., Any]


class EventedMixin:
    """``on(name, callback)``, ``off(name, callback)`` and ``trigger(name, *args, **kwargs)``."""

    #: the events the class fires itself (None: any name, as pynsq's mixin): listening to
    #: another name logs a warning once per name, most likely a typo ("mesage")
    fired_events: Any = None

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
            late = name in self._fired_once
        fired = self.fired_events
        if fired is not None and name not in fired:
            _warn_unfired(type(self).__name__, name, fired)
        if late:
            self._late_listener(name, callback)

    #: names of events that fire once and have fired (see _mark_fired); class-level empty
    #: default, replaced per instance by the first _mark_fired
    _fired_once: Any = frozenset()

    def _mark_fired(self, *names: str) -> Dict[str, Tuple[Listener, ...]]:
        """Record that the named once-only events have fired and return their listeners, taken
        in the same step: a listener added from then on goes to _late_listener instead (never both)."""
        with self._listeners_lock:
            self._fired_once = self._fired_once | frozenset(names)
            return {name: self._listeners.get(name, ()) for name in names}

    def _late_listener(self, name: str, callback: Listener) -> None:
        """Called by on() for a listener added after its once-only event fired (see _mark_fired)."""

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


_warned_unfired: set = set()


def _warn_unfired(owner: str, name: Any, fired: Any) -> None:
    key = (owner, name)
    if key in _warned_unfired:
        return
    _warned_unfired.add(key)  # (a race may log it twice: harmless)
    logger.warning(
        "%s.on(%r): %s never fires that event itself (it fires %s); the listener runs only on "
        "trigger(%r). Said once per name",
        owner, name, owner, ", ".join(fired), name,
    )  # fmt: skip

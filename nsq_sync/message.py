"""The message a handler receives. It answers through a small responder interface, not a connection."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Protocol, Tuple

if TYPE_CHECKING:
    from .timers import _Scheduler, _Timer

from .errors import AlreadyRespondedError, ConfigError, ConfigTypeError, ConnectionClosedError, SendError

#: what finish()/requeue()/touch() report instead of raising: no connection left to answer on
_LOST = (ConnectionClosedError, SendError)

__all__ = ["Message", "Responder"]

logger = logging.getLogger(__name__)

_MAX_MS = 2**31 - 1  # REQ's timeout must fit nsqd's int32 parse
_clock = time.monotonic  # (a test may move it)


class Responder(Protocol):
    """What a Message needs from whoever delivered it (AsyncConn implements it)."""

    def _finish_message(self, message: "Message", notify_owner: bool = True) -> None: ...

    def _requeue_message(self, message: "Message", time_ms: int, backoff: bool) -> None: ...

    def _touch_message(self, message: "Message", budget: Optional[float] = None) -> None: ...

    # Optional: ``_answer_lost(message, error)`` reports an answer whose connection is gone
    # (the three methods above raise ConnectionClosedError for it).

    #: (msg_timeout, max_msg_timeout) in seconds as nsqd negotiated them, or None if unknown
    message_timeouts: Optional[Tuple[float, float]]


class Message:
    """A message from nsqd: ``id`` (16 bytes), ``body`` (bytes), ``timestamp`` (ns), ``attempts`` (first delivery is 1).

    Answer it exactly once with :meth:`finish` or :meth:`requeue`; :meth:`touch` asks nsqd
    for more time. A Reader answers for the handler (finish on True/None, requeue on
    False or an exception) unless the handler calls :meth:`enable_async`.
    """

    # (_superseded is set only on a copy nsqd replaced by delivering it again: read with getattr)
    __slots__ = ("id", "body", "timestamp", "attempts", "_responder", "_async", "_responded", "_arrived", "_touched", "_superseded", "__weakref__", "__dict__")

    # (annotations without values: the slots above hold the attributes)
    id: bytes
    body: bytes
    timestamp: int
    attempts: int

    def __init__(self, id: bytes, body: bytes, timestamp: int, attempts: int, responder: Optional[Responder] = None) -> None:
        self.id = id
        self.body = body
        self.timestamp = timestamp
        self.attempts = attempts
        self._responder = responder
        self._async = False
        self._responded = False
        # _arrived (monotonic, set by the connection that read it) and _touched (set by touch())
        # stay unset otherwise: time_left() is rare, construction is every message's path.

    def enable_async(self) -> None:
        """Take over answering this message: the Reader will not finish or requeue it for you."""
        self._async = True

    def is_async(self) -> bool:
        return self._async

    def has_responded(self) -> bool:
        """True once finish() or requeue() was called and accepted (also one lost with its
        connection), and for a copy nsqd no longer holds (delivered again, dropped unrun past
        msg_timeout, or forgotten after a channel empty): it must not be answered."""
        return self._responded

    def _need_responder(self) -> Responder:
        if self._responder is None:
            raise ConfigError("message", self, "was not delivered by a connection, so it cannot be answered")
        return self._responder

    def finish(self) -> bool:
        """Send FIN: the message is done. True once the FIN is on its way.

        False when the connection it came on is gone (or its write failed, which closes it):
        nsqd delivers the message again by itself. As in pynsq this is not an exception (a
        thread answering batches later would die of it); it is logged, or counted by the
        Reader that owns the connection. Also False, sending nothing, for a copy nsqd no
        longer counts as in flight: one it timed out (msg_timeout passed) and delivered again
        on the same connection (the newer copy is the one to answer), or one in flight when
        the channel was emptied. Raises AlreadyRespondedError if the message was already
        finished or requeued.
        """
        responder = self._need_responder()
        try:
            responder._finish_message(self)
        except _LOST as exc:
            return self._lost(responder, exc, answered=True)
        except AlreadyRespondedError as exc:
            return self._replaced(exc)
        return True

    def requeue(self, delay: Optional[float] = None, backoff: bool = True, time_ms: Optional[int] = None) -> bool:
        """Send REQ: nsqd delivers the message again after *delay* seconds.

        With no delay (None or pynsq's -1) the delay is ``requeue_delay * attempts``, capped by
        ``max_requeue_delay``. ``time_ms`` is pynsq's spelling in milliseconds. ``backoff=False``
        requeues without making a Reader back off. True once the REQ is on its way, False when
        the connection is gone or nsqd delivered the message again (see :meth:`finish`). Raises
        AlreadyRespondedError, ConfigError for a delay out of range (negative, not finite, too
        long), ConfigTypeError (a ConfigError and a TypeError) for one of the wrong type (a
        string, a bool; a float for time_ms) and for a *backoff* that is not True or False.
        Nothing is sent when it raises: the message is still unanswered.
        """
        responder = self._need_responder()
        if backoff is not True and backoff is not False:
            # (bool() of it used to decide: backoff="no" backed off, and was taken for an answer)
            raise ConfigTypeError("backoff", backoff, f"must be True or False, not {type(backoff).__name__}")
        if time_ms is not None and time_ms != -1:
            if isinstance(time_ms, bool) or not isinstance(time_ms, int):
                raise ConfigTypeError("time_ms", time_ms, f"must be an int, not {type(time_ms).__name__} (milliseconds from 0 to {_MAX_MS}, or -1 for automatic)")
            if not 0 <= time_ms <= _MAX_MS:
                raise ConfigError("time_ms", time_ms, f"must be an int from 0 to {_MAX_MS} (or -1 for automatic)")
            ms = time_ms
        elif delay is None or delay == -1:
            ms = -1
        else:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                raise ConfigTypeError("delay", delay, f"must be a number of seconds, not {type(delay).__name__} (from 0 to {_MAX_MS // 1000}, or None for automatic)")
            if not 0 <= delay <= _MAX_MS / 1000:
                raise ConfigError("delay", delay, f"must be a number of seconds from 0 to {_MAX_MS // 1000} (or None for automatic)")
            ms = int(round(delay * 1000))
        try:
            responder._requeue_message(self, ms, backoff)
        except _LOST as exc:
            return self._lost(responder, exc, answered=True)
        except AlreadyRespondedError as exc:
            return self._replaced(exc)
        return True

    def touch(self) -> bool:
        """Send TOUCH: reset nsqd's timeout for this message. True once it is on its way, False
        when the connection is gone or nsqd delivered the message again (see :meth:`finish`).
        Raises AlreadyRespondedError after finish/requeue."""
        return self._touch(None)

    def _touch(self, budget: Optional[float]) -> bool:
        """touch(); *budget*: seconds the write may wait for room in the socket (None: until
        done), past which a flush task of the connection's writes the rest."""
        now = _clock()
        responder = self._need_responder()
        try:
            responder._touch_message(self, budget)
        except _LOST as exc:
            return self._lost(responder, exc, answered=False)
        except AlreadyRespondedError as exc:
            return self._replaced(exc)
        self._touched = now
        return True

    def auto_touch(self, interval: Optional[float] = None) -> "_AutoTouch":
        """Keep the message in flight while a block of code runs, however long it takes::

            with message.auto_touch():
                run_the_long_job(message.body)   # one call, longer than msg_timeout

        Every *interval* seconds (default: half the connection's ``msg_timeout``) the message is
        touched, from one task shared by the process, not from the block's thread. Touching
        stops when the block ends, when the message is answered, when its connection ends, and
        once nsqd's ``max_msg_timeout`` (its ``--max-msg-timeout``, 15 minutes by default) since
        delivery is reached: no TOUCH extends a message past that, so a warning says when nsqd
        will time it out. A hung block therefore holds the message for at most
        ``max_msg_timeout``. The first TOUCH goes when *interval* has passed since the message
        arrived or was last touched, at once if that is already the case.

        Raises ConfigError for an interval that is not above 0.1 s and below ``msg_timeout``
        (ConfigTypeError for one that is not a number) and for a message that no connection
        delivered, before anything is touched.
        """
        responder = self._need_responder()
        msg_timeout = self._msg_timeout(responder)
        if interval is None:
            interval = msg_timeout / 2
        elif isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise ConfigTypeError("interval", interval, f"must be a number of seconds, not {type(interval).__name__}")
        elif not (math.isfinite(interval) and 0.1 <= interval < msg_timeout):
            raise ConfigError("interval", interval, f"must be a number of seconds from 0.1 to below msg_timeout ({msg_timeout:g} s), or None for half of it")
        return _AutoTouch(self, responder, float(interval))

    @staticmethod
    def _msg_timeout(responder: Responder) -> float:
        timeouts = getattr(responder, "message_timeouts", None)
        if timeouts is not None:
            return float(timeouts[0])
        return float(getattr(responder, "msg_timeout", None) or 60.0)  # (nsqd's default)

    def _lost(self, responder: Responder, error: Exception, answered: bool) -> bool:
        """An answer (or touch) with no connection left to carry it: reported, not raised.
        A lost finish or requeue still counts as the answer (pynsq's has_responded()), so
        nobody answers the message a second time."""
        if answered:
            self._responded = True
        report = getattr(responder, "_answer_lost", None)
        if report is not None:
            report(self, error)
        return False

    def _replaced(self, error: AlreadyRespondedError) -> bool:
        """An answer (or touch) for a copy that nsqd timed out and delivered again on the
        same connection: nothing is sent, and it is no exception, for the same reason as a
        lost one (a batcher answering late would die of it). The newer copy is the one to
        answer; the connection already warned that nsqd delivered messages again. Any other
        AlreadyRespondedError (answered twice) is raised."""
        if not getattr(self, "_superseded", False):
            raise error
        logger.debug("%s", error)
        return False

    def time_left(self) -> Optional[float]:
        """Seconds until nsqd gives up on this message and delivers it again, unless it is
        answered or touched first (negative once that time has passed); None when unknown
        (a message not read by a connection, or an nsqd that negotiated nothing).

        nsqd allows ``msg_timeout`` from delivery or from the last :meth:`touch`, but never
        more than ``max_msg_timeout`` from delivery in all; both come from the IDENTIFY answer.
        The clock starts when the message was read, a little after nsqd started its own (by
        up to the output buffer timeout), so keep a margin.
        """
        arrived = getattr(self, "_arrived", None)
        timeouts = getattr(self._responder, "message_timeouts", None)
        if arrived is None or timeouts is None:
            return None
        msg_timeout, max_msg_timeout = timeouts
        start = getattr(self, "_touched", arrived)
        return min(start + msg_timeout, arrived + max_msg_timeout) - _clock()

    def __repr__(self) -> str:
        # The id as nsqd writes it (16 hex digits, no b''): greppable in nsqd's logs, and the
        # same in every line that names a message.
        return f"<Message id={self.id.decode('ascii', 'backslashreplace')} attempts={self.attempts} size={len(self.body)}>"


#: the schedulers of auto_touch(), one per backend and process (a forked child starts its own)
_touchers: Dict[Tuple[str, int], "_Scheduler"] = {}
TOUCHER_IDLE_SECONDS = 10.0  # the shared task ends after this long with no message to touch


class _AutoTouch:
    """The context manager of :meth:`Message.auto_touch`."""

    __slots__ = ("message", "_responder", "interval", "_timer", "_active", "touches")

    def __init__(self, message: Message, responder: Responder, interval: float) -> None:
        self.message = message
        self._responder = responder
        self.interval = interval
        self._timer: Optional["_Timer"] = None
        self._active = False
        self.touches = 0  # TOUCHes sent by this keep-alive

    def __enter__(self) -> Message:
        self._active = True
        message = self.message
        start = getattr(message, "_touched", getattr(message, "_arrived", None))
        delay = self.interval if start is None else start + self.interval - _clock()
        self._timer = self._scheduler().call_later(delay, self._tick)
        return message

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        timer = self._timer
        if timer is not None:
            timer.cancel()

    def _scheduler(self) -> "_Scheduler":
        from .backends import get_backend
        from .timers import _Scheduler

        backend = getattr(self._responder, "backend", None) or get_backend(None)
        key = (backend.name, os.getpid())
        scheduler = _touchers.get(key)
        if scheduler is None:
            scheduler = _touchers.setdefault(key, _Scheduler(backend, "nsq_sync-auto-touch", idle_exit=TOUCHER_IDLE_SECONDS))
        return scheduler

    def _tick(self) -> None:
        # In the shared task: touch, unless there is nothing (more) to gain; then come back.
        message = self.message
        if not self._active or message._responded:
            return
        timeouts = getattr(self._responder, "message_timeouts", None)
        arrived = getattr(message, "_arrived", None)
        if timeouts is not None and arrived is not None:
            msg_timeout, max_msg_timeout = timeouts
            now = _clock()
            if getattr(message, "_touched", arrived) + msg_timeout >= arrived + max_msg_timeout:
                logger.warning(
                    "%r has been in flight for most of nsqd's max_msg_timeout (%g s, its --max-msg-timeout), which no "
                    "TOUCH extends: auto_touch() stops, and nsqd times the message out in %.1f s and delivers it again",
                    message,
                    max_msg_timeout,
                    arrived + max_msg_timeout - now,
                )
                return
        try:
            # (budget 0: a connection whose socket has no room must not hold up the others' touches)
            touched = message._touch(0.0)
        except Exception as exc:  # answered meanwhile (AlreadyRespondedError), or the connection failed
            logger.debug("auto_touch() of %r stops: %s", message, exc)
            return
        if not touched:
            return  # the connection is gone, or nsqd delivered the message again
        self.touches += 1
        if self._active:
            self._timer = self._scheduler().call_later(self.interval, self._tick)

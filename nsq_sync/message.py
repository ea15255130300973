"""The message a handler receives. It answers through a small responder interface, not a connection."""

from __future__ import annotations

import logging
import time
from typing import Optional, Protocol, Tuple

from .errors import AlreadyRespondedError, ConfigError, ConfigTypeError, ConnectionClosedError, SendError

#: what finish()/requeue()/touch() report instead of raising: no connection left to answer on
_LOST = (ConnectionClosedError, SendError)

__all__ = ["Message", "Responder"]

logger = logging.getLogger(__name__)

_MAX_MS = 2**31 - 1  # REQ's timeout must fit nsqd's int32 parse
_clock = time.monotonic  # (a test may move it)


class Responder(Protocol):
    """What a Message needs from whoever delivered it (AsyncConn implements it)."""

    def _finish_message(self, message: "Message") -> None: ...

    def _requeue_message(self, message: "Message", time_ms: int, backoff: bool) -> None: ...

    def _touch_message(self, message: "Message") -> None: ...

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
        now = _clock()
        responder = self._need_responder()
        try:
            responder._touch_message(self)
        except _LOST as exc:
            return self._lost(responder, exc, answered=False)
        except AlreadyRespondedError as exc:
            return self._replaced(exc)
        self._touched = now
        return True

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
        return f"<Message id={self.id!r} attempts={self.attempts} size={len(self.body)}>"

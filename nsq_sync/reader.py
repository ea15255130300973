"""Reader: a consumer of one topic/channel across many nsqd, with pynsq's API and rules.

Where things run
    * connection attempts: short-lived background tasks (never the caller of start()), at
      most ``max_connect_attempts`` (default 32) at once per Reader; more wait in a FIFO
      queue (an nsqlookupd answer listing thousands of nsqd that never answer took a thread
      and a socket each);
    * each connection's reader task only reads and hands messages to the Reader's ONE
      :class:`~nsq_sync.dispatch.WorkerPool` (``concurrency`` workers, shared by every
      connection), so a slow handler never starves heartbeats;
    * timers (backoff windows, RDY redistribution, reconnect delays, RDY settling): one
      scheduler task per Reader that sleeps until the next due time;
    * nsqlookupd polling: one discovery task (HTTP requests block, so not on the scheduler);
      after a poll in which no nsqlookupd answered it asks again sooner (from
      ``lookupd_retry_base``, doubling, never later than ``lookupd_poll_interval``), until
      an answer lists some nsqd (one back from an outage lists none until they register),
      and on the same schedule after a discovered nsqd's connection closed or an attempt
      to one failed, until that nsqd is connected again (one schedule per Reader, restarted
      by a new loss; failed attempts start it once per nsqd until it is connected);
    * ``backoff``/``resume``/``continue`` events fire synchronously in the thread that
      answers a message (a handler worker, or your thread for ``enable_async()``).

RDY (all decisions under one Reader lock; writes happen under it too, and are
skipped when the value is unchanged)
    * the sum of RDY over all connections never exceeds ``max_in_flight``, and a
      connection never gets more than its ``max_rdy_count``;
    * with ``n <= max_in_flight`` connections each gets ``max_in_flight // n``; with more
      connections than that, RDY 1 goes to a subset and a periodic redistribution takes
      it back from connections idle for ``low_rdy_idle_timeout`` (or holding it for
      ``low_rdy_timeout`` while others wait) and hands it to the connection that has
      waited longest;
    * raising is budgeted against ``sum(max(held, in_flight))``, where *held* is the RDY
      sent or, after a lowering, the higher value nsqd may still be honouring: it is
      counted until ``rdy_settle_delay`` plus ``rdy_settle_rtts`` round trips of that
      connection (measured at SUB) have passed, whichever decision looks (a settle timer
      re-runs the decision then; an answered message re-arms it while capacity is
      short). This keeps the server-side total within ``max_in_flight`` even though RDY
      changes on different sockets may be applied by nsqd in any order, and messages sent
      under the old value are still on the wire (pynsq #177 / PR #254);
    * connection attempts started together (the direct addresses at start(), the producers
      of one lookupd answer) have their shares held back for them until each attempt ends,
      so the first to subscribe does not get all of max_in_flight, to give it back later;
      an attempt still queued (max_connect_attempts already running) counts as under way;
    * a connection that registers or goes, or an attempt that ends, costs O(1) while the
      share stays the same (thousands of nsqd in one lookupd answer); a pass over every
      connection runs when the share changes, at most one per 10x the last one's duration.

Backoff (global, like pynsq and go-nsq): a failure outside a backoff window raises the
level and opens a window (RDY 0 everywhere) of ``strategy.calculate(level)`` seconds;
when it ends, RDY 1 goes to ONE connection (one whose nsqd had messages lately, and never
one found idle as the test earlier in the episode while another is left); the next result
counts (success: level down, back to full RDY at level 0; failure: level up), results
inside a window do not.
``requeue(backoff=False)`` is neutral. ``max_backoff_duration=0`` disables backoff.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import weakref
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from . import lifecycle
from .lifecycle import forget_parents_in_child, uwsgi_state
from .backends import Backend, get_backend
from .addresses import address_key as _address_key
from .addresses import Addresses, parse_addresses
from .backoff import ExponentialBackoff, exponential_delay
from .conn import NO_HEARTBEAT_SUB, AsyncConn, WarningTally
from .dispatch import WorkerPool, call_refusal
from .errors import AlreadyRespondedError, ClosedError, ConfigError, ConnectError, ConnectionClosedError, Error, HTTPError, SendError
from .message import Message
from .timers import _Scheduler, _Timer, _is_current
from .protocol.identify import check_number, check_timeout
from .protocol.names import check_channel, check_topic

__all__ = ["Reader"]


if TYPE_CHECKING:  # imported lazily: http.client and email cost memory most consumers never use
    from .httpapi import LookupdClient

logger = logging.getLogger(__name__)

MessageHandler = Callable[[Message], Any]

#: started Readers, for the at-fork hook below
_live_readers: "weakref.WeakSet[Reader]" = weakref.WeakSet()


forget_parents_in_child(_live_readers)

#: keyword arguments the Reader sets itself on every AsyncConn
_RESERVED_CONN_KWARGS = frozenset({"host", "port", "backend", "worker_pool"})
_CONN_PARAMS = frozenset(
    name for name, p in inspect.signature(AsyncConn.__init__).parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD
)
_MAX_LEVEL = 10_000
#: producers of one nsqlookupd answer the Reader uses (the first ones; the rest are ignored
#: with a warning): what an answer may list is not the client's to trust
MAX_LOOKUPD_PRODUCERS = 10_000
#: bytes of one nsqlookupd answer the Reader reads (MAX_LOOKUPD_PRODUCERS take about 2.5 MB)
LOOKUPD_ANSWER_MAX = 16 * 1024 * 1024
#: the highest max_connect_attempts a Reader takes
MAX_CONNECT_ATTEMPTS = 10_000
#: the most handler workers a Reader takes, and the cap of the default (max_in_flight)
MAX_CONCURRENCY = 100_000
#: a full RDY pass that a connection coming or going needs runs at most once per this many
#: times the last pass's duration (see Reader._rdy_soon_locked): at most ~1/_PASS_GAP of the
#: time in such passes however many connections come and go at once
_PASS_GAP = 10
#: the hooks a subclass may override; each is called and its result used at once
_HOOKS = ("process_message", "preprocess_message", "validate_message", "giving_up", "heartbeat")


# ----------------------------------------------------------------- helpers
def _as_list(value: object, param: str) -> List[object]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise ConfigError(param, value, 'must be a "host:port" string or a list of them')
    return list(value)


def _never_runs(fn: object) -> Optional[str]:
    """What *fn* is if calling it only creates an object (a coroutine, a generator) that
    someone would have to await or iterate: "a coroutine function" etc., else None.

    Looks at *fn* itself (functions, methods, functools.partial) and, for other callable
    objects, at their class's ``__call__``."""
    targets = [fn]
    if not isinstance(fn, type):  # calling a class makes an instance: its __call__ is not run
        targets.append(getattr(type(fn), "__call__", None))
    asyncio = sys.modules.get("asyncio")  # (its markers, e.g. AsyncMock's, exist only once it is loaded)
    for target in targets:
        if inspect.iscoroutinefunction(target) or (asyncio is not None and asyncio.iscoroutinefunction(target)):
            return "a coroutine function (async def)"
        if _is_tornado_coroutine(target):
            # (its wrapper makes a Future first, which needs an event loop: the body never runs)
            return "a Tornado coroutine (@tornado.gen.coroutine)"
        if inspect.isasyncgenfunction(target):
            return "an async generator function"
        if inspect.isgeneratorfunction(target):
            return "a generator function"
    return None


#: AsyncConn's counters that Reader.stats() adds up over its connections, closed ones included:
#: messages received, finished (FINs queued), dropped unrun past msg_timeout (expired),
#: TOUCHed while waiting for a worker, and FINs and REQs nsqd refused
_CONN_TOTALS = ("_received_total", "_finished_total", "_expired_total", "_touched_total", "_fin_failed_total", "_req_failed_total")


def _announced(lookupd: str, exc: BaseException) -> str:
    """What to add to the warning about a failed attempt to an nsqd *lookupd* listed: where
    the address came from, and, when it could not be reached at all, where to look (an nsqd
    announces its --broadcast-address, by default its hostname: a name only its own network
    resolves, a Kubernetes pod's, or an address not routable from the consumer)."""
    said = f"nsqlookupd {lookupd} announced this address as that nsqd's broadcast address"
    if isinstance(exc, ConnectError):
        said += " and TCP port: check that nsqd's --broadcast-address (default: its hostname), which must be one this host can resolve and reach"
    return said


def _is_tornado_coroutine(fn: object) -> bool:
    """Whether *fn* (or the function a functools.partial wraps) is marked by
    ``@tornado.gen.coroutine``, as ``tornado.gen.is_coroutine_function`` tells (without
    importing tornado). Bound methods pass attribute reads on to their function."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    try:
        return getattr(fn, "__tornado_coroutine__", False) is True
    except Exception:  # (an object whose __getattr__ raises something else)
        return False


def check_message_handler(message_handler: object) -> None:
    """Raise TypeError naming message_handler unless it is a plain callable: not a coroutine,
    async generator or generator function (nor an object whose ``__call__`` is one), whose
    messages would be finished without their body ever running, and one that can be called
    with one positional argument (the message) where its signature says so."""
    if not callable(message_handler):
        raise TypeError(f"message_handler must be callable, not {type(message_handler).__name__}")
    kind = _never_runs(message_handler)
    if kind is not None:
        raise TypeError(
            f"message_handler must be a plain function, not {kind}: nsq_sync calls handlers in worker "
            "threads/greenlets and never awaits or iterates what they return, so every message would be "
            "finished unprocessed; use a plain def function (run async code inside it if needed)"
        )
    refusal = call_refusal(message_handler, 1)  # (None also when it has no signature to check: some C callables)
    if refusal is not None:
        # Every message would fail with this TypeError, be requeued and come back, until given up.
        raise TypeError(f"message_handler must take one positional argument, the message; {message_handler!r} cannot ({refusal})")


class _Counter:
    """A count bumped from many threads without a lock.

    ``next()`` of an :func:`itertools.count` is one C call that the GIL (or gevent's single
    thread) never splits, and its repr shows the next value without taking it.
    """

    __slots__ = ("_count", "bump")

    def __init__(self) -> None:
        self._count = itertools.count()
        self.bump = self._count.__next__

    @property
    def value(self) -> int:
        return int(repr(self._count)[6:-1])


def _is_future_like(result: Any) -> bool:
    """A future of another kind than concurrent.futures.Future: add_done_callback and result."""
    return callable(getattr(result, "add_done_callback", None)) and callable(getattr(result, "result", None))


def _is_gevent_result(result: Any) -> bool:
    """A gevent Greenlet or AsyncResult (or another object with rawlink, ready and get)."""
    return callable(getattr(result, "rawlink", None)) and callable(getattr(result, "ready", None)) and callable(getattr(result, "get", None))


class _GeventOutcome:
    """A ready Greenlet or AsyncResult as a future's ``result()``: its value, or its exception
    raised, as is a killed Greenlet's GreenletExit (its value)."""

    __slots__ = ("_ready",)

    def __init__(self, ready: Any) -> None:
        self._ready = ready

    def result(self) -> Any:
        value = self._ready.get(block=False)
        if isinstance(value, BaseException):
            raise value
        return value


def _is_exit(exc: BaseException) -> bool:
    """SystemExit, KeyboardInterrupt or a greenlet's kill (GreenletExit): the process or the
    task is ending. Any other BaseException out of a handler is the handler failing."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt, GeneratorExit)):
        return True
    greenlet = sys.modules.get("greenlet")
    exit_class = getattr(greenlet, "GreenletExit", None)
    return exit_class is not None and isinstance(exc, exit_class)


class _ConnState:
    """What the Reader keeps per registered connection (under the Reader's lock)."""

    __slots__ = ("conn", "address", "last_held", "rdy_since", "rtt", "ceiling", "ceiling_until", "plan_gen")

    def __init__(self, conn: AsyncConn, address: str, rtt: float = 0.0) -> None:
        now = time.monotonic()
        self.conn = conn
        self.address = address
        self.last_held = now  # when it last lost RDY (or registered): who waited longest goes first
        self.rdy_since = now  # when RDY last went from 0 to > 0
        self.rtt = rtt  # seconds from SUB to its answer: the connection's measured round trip
        # After a lowered RDY: the highest RDY nsqd may still be honouring (messages it sent
        # under it may still be on the wire), until ceiling_until (time.monotonic()).
        self.ceiling = 0
        self.ceiling_until = 0.0
        self.plan_gen = -1  # the Reader's _plan_gen when its capacity was counted in the plan

    def held(self, now: float) -> int:
        """The most messages nsqd may put in flight here: the RDY sent, or a higher one sent
        before it that nsqd may not have applied the lowering of yet (forgotten once due)."""
        ceiling = self.ceiling
        if ceiling and now >= self.ceiling_until:
            self.ceiling = ceiling = 0
        rdy = self.conn.rdy
        return ceiling if ceiling > rdy else rdy

    def used(self, now: float) -> int:
        """Capacity this connection uses: what nsqd may hold here, or what is in flight if more."""
        held = self.held(now)
        in_flight = self.conn.in_flight
        return held if held > in_flight else in_flight


class _Down:
    """An nsqd the Reader is not connected to since a failure it warned about: its connection
    closed, or an attempt to connect to it failed (kept under the Reader's lock until it is
    connected again, for the line that says so and for stats()["unreachable"])."""

    __slots__ = ("since", "wall_since", "attempts", "last_error", "was_connected", "listed")

    def __init__(self, was_connected: bool) -> None:
        self.since = time.monotonic()
        self.wall_since = time.time()
        self.attempts = 0  # connection attempts that failed since
        self.last_error: Optional[str] = None
        self.was_connected = was_connected  # its connection closed (else: never connected since first tried)
        self.listed = True  # (found through nsqlookupd) the latest answer lists it


class _NoProducers:
    """A Reader using nsqlookupd with nothing to consume from: no connection, and the answers
    list no nsqd for the topic (under the Reader's lock, until either changes)."""

    __slots__ = ("since", "wall_since", "asked", "warned_at")

    def __init__(self) -> None:
        self.since = time.monotonic()
        self.wall_since = time.time()
        self.asked: Dict[str, None] = {}  # the lookupd that answered so, in order
        self.warned_at: Optional[float] = None  # time.monotonic() of the last warning


class _RdyLock:
    """The Reader's lock (used as ``with``). RDY commands decided under it are only queued on
    their connections (_set_rdy), and written once it is released: a write can block (an
    nsqd that stopped reading, its buffers full, until the stall is detected), and it must
    not hold up the decisions for every other connection. Order on each connection holds:
    whatever is queued after the RDY (the REQ that started a backoff) leaves after it."""

    __slots__ = ("_lock", "unsent")

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.unsent: List[AsyncConn] = []

    def __enter__(self) -> "_RdyLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        unsent = self.unsent
        if not unsent:
            self._lock.release()
            return
        self.unsent = []
        self._lock.release()
        for conn in unsent:
            try:
                conn._flush_soon()  # (a socket with no room gets a task of its own to wait on)
            except Error:
                pass  # the connection is closing; its close event tells the Reader


class Reader:
    """Consume *topic*/*channel* from nsqd, found directly and/or through nsqlookupd.

    :param topic: the topic (1-64 chars of ``[.a-zA-Z0-9_-]``, optionally ``#ephemeral``)
    :param channel: the channel (same rules)
    :param message_handler: ``handler(message)``; True or None -> FIN, False -> REQ with
        backoff, an exception -> REQ with backoff (traceback logged); after
        ``message.enable_async()`` your code answers later, from any thread. A plain
        callable: a coroutine (``async def``) or generator function is refused (TypeError)
    :param nsqd_tcp_addresses: ``"host:port"``, a (host, port) pair (int port), or a list or
        tuple of them; reconnected with exponential backoff and jitter until close()
    :param lookupd_http_addresses: ``"host:port"``/``"http://host:port"`` or a list;
        polled one per tick, round-robin, trying the next on failure
    :param max_in_flight: messages in flight over all connections (0 starts paused)
    :param max_tries: attempts after which :meth:`giving_up` gets the message and it is
        FINed (0: unlimited)
    :param max_backoff_duration: seconds; cap of a backoff window (0 disables backoff)
    :param lookupd_poll_interval: seconds between lookupd polls (first poll at once); after a
        poll in which every lookupd failed, the next comes sooner: ``lookupd_retry_base``
        (1 s), doubled per poll in a row that failed or, after a failure, found no nsqd, at
        most this interval (jitter added too); likewise after the connection to an nsqd
        found through lookupd closed, or an attempt to one failed, until it is connected
        again or the delay has doubled up to this interval
    :param lookupd_poll_jitter: each poll waits ``interval * (1 + jitter * random())``
    :param low_rdy_idle_timeout: seconds without a message after which a connection's
        RDY may be handed to another (when connections outnumber max_in_flight)
    :param concurrency: handler workers, 1 to MAX_CONCURRENCY (100,000); default:
        max_in_flight, at least 1 and at most MAX_CONCURRENCY
    :param name: used in logs and task names (default ``"topic:channel"``)
    :param lookupd_connect_timeout: kept for pynsq compatibility; the HTTP client uses
        one limit for a whole request (connecting, sending, reading the answer), the larger of the two
    :param lookupd_request_timeout: seconds for one lookupd request
    :param backend: "thread", "gevent" or None (auto)
    :param close_timeout: default seconds :meth:`close` waits for in-flight messages
    :param backoff_strategy: an object with ``calculate(level) -> seconds`` (see
        :mod:`nsq_sync.backoff`); default ``ExponentialBackoff(1.0, max_backoff_duration)``
    :param rdy_redistribute_interval: seconds between RDY redistribution passes
    :param low_rdy_timeout: seconds after which a connection holding RDY 1 gives it up
        to a waiting one even if it is busy (go-nsq's option; only when connections
        outnumber max_in_flight)
    :param max_connect_attempts: connection attempts in progress at once, 1 to 10,000 (one
        task each); more wait in a FIFO queue and start as attempts end (default 32)
    :param conn_kwargs: passed to every :class:`~nsq_sync.conn.AsyncConn` (timeout,
        heartbeat_interval, tls_v1, snappy, auth_secret, msg_timeout, ...)

    Raises ConfigError (a ValueError naming the parameter) for a bad value, TypeError for
    an unknown keyword argument or a value of the wrong type.
    """

    #: first reconnect delay (seconds) for a direct nsqd address; doubles per failure
    reconnect_base: float = 1.0
    #: longest reconnect delay (seconds): pynsq and go-nsq retry a direct nsqd every 15 s, and
    #: a longer cap left an nsqd back after a minute's outage unused for up to as long again
    reconnect_cap: float = 15.0
    #: seconds before polling nsqlookupd again after a poll in which none answered; doubles
    #: per poll in a row that failed or, after a failure, found no nsqd; never more than
    #: ``lookupd_poll_interval`` (jitter added to either). The same schedule runs after the
    #: connection to an nsqd found through nsqlookupd closed, or an attempt to one failed,
    #: until it is connected again
    lookupd_retry_base: float = 1.0
    #: seconds a Reader using nsqlookupd may have nothing to consume from (no connection, and
    #: the answers list no nsqd for the topic) before a WARNING says so, and at least two
    #: ``lookupd_poll_interval``: a consumer started before any producer is normal a while
    no_producers_warn_after: float = 60.0
    #: seconds between repeats of that WARNING while it lasts
    no_producers_warn_every: float = 600.0
    #: seconds a lowered RDY is given to reach nsqd, and the messages nsqd sent under the
    #: higher value to arrive, before the capacity it frees is handed out: this plus
    #: ``rdy_settle_rtts`` times the connection's round trip (measured at SUB)
    rdy_settle_delay: float = 0.1
    #: round trips added to ``rdy_settle_delay`` (one is the least: the RDY going up, the
    #: last messages sent under the old value coming down; the rest is a margin for jitter)
    rdy_settle_rtts: float = 2.0

    def __init__(
        self,
        topic: str,
        channel: str,
        message_handler: Optional[MessageHandler] = None,
        *,
        nsqd_tcp_addresses: Optional[Addresses] = None,
        lookupd_http_addresses: Union[None, str, Iterable[str]] = None,
        max_in_flight: int = 1,
        max_tries: int = 5,
        max_backoff_duration: float = 128,
        lookupd_poll_interval: float = 60,
        lookupd_poll_jitter: float = 0.3,
        low_rdy_idle_timeout: float = 10,
        concurrency: Optional[int] = None,
        name: Optional[str] = None,
        lookupd_connect_timeout: float = 1,
        lookupd_request_timeout: float = 2,
        backend: Union[None, str, Backend] = None,
        close_timeout: float = 30,
        backoff_strategy: Any = None,
        rdy_redistribute_interval: float = 5,
        low_rdy_timeout: float = 30,
        max_connect_attempts: int = 32,
        **conn_kwargs: Any,
    ) -> None:
        # Keywords first, as Python itself reports an unknown one before the call runs: a
        # misspelled nsqd_tcp_addresse= is named as such, not taken for no address at all.
        unknown = sorted(set(conn_kwargs) - _CONN_PARAMS)
        if unknown:
            raise TypeError(f"Reader() got unexpected keyword argument(s) {', '.join(map(repr, unknown))} (not AsyncConn parameters either)")
        reserved = sorted(set(conn_kwargs) & _RESERVED_CONN_KWARGS)
        if reserved:
            raise ConfigError(reserved[0], conn_kwargs[reserved[0]], "is set by the Reader for each connection")
        self.topic = check_topic(topic)
        self.channel = check_channel(channel)
        if message_handler is not None:
            check_message_handler(message_handler)
        if callable(inspect.getattr_static(type(self), "disabled", None)):
            raise TypeError(
                f"{type(self).__name__}.disabled(): pynsq's deprecated pause switch is not supported, and nothing "
                "would call it (the Reader would consume while it says disabled); pause with "
                "reader.set_max_in_flight(0) and resume with set_max_in_flight(n)"
            )
        for hook in _HOOKS:
            kind = _never_runs(getattr(type(self), hook))
            if kind is not None:
                raise TypeError(
                    f"{type(self).__name__}.{hook} must be a plain method, not {kind}: nsq_sync calls it in "
                    "worker threads/greenlets and never awaits or iterates what it returns"
                )
        self.message_handler = message_handler

        direct: Dict[str, Tuple[str, int]] = {}
        for host, port in parse_addresses(nsqd_tcp_addresses, "nsqd_tcp_addresses"):
            direct[_address_key(host, port)] = (host, port)

        check_number("lookupd_connect_timeout", lookupd_connect_timeout, 0.001, 3600)
        check_number("lookupd_request_timeout", lookupd_request_timeout, 0.001, 3600)
        lookupd_timeout = float(max(lookupd_connect_timeout, lookupd_request_timeout))
        lookupds: List[Tuple[str, LookupdClient]] = []
        for address in _as_list(lookupd_http_addresses, "lookupd_http_addresses"):
            if not isinstance(address, str):
                raise ConfigError("lookupd_http_addresses", address, 'must be "host:port" or "http://host:port" strings')
            try:
                from .httpapi import LookupdClient

                # (it drops pynsq's "/lookup"; an answer over LOOKUPD_ANSWER_MAX is a failed query;
                # queries a poll interval apart gain nothing from a kept connection)
                client = LookupdClient(address, timeout=lookupd_timeout, max_response_size=LOOKUPD_ANSWER_MAX, keep_alive=False)
            except ConfigError as exc:
                # exc.value is already redacted (no credentials from the URL)
                raise ConfigError("lookupd_http_addresses", exc.value, exc.reason) from None
            except TypeError as exc:
                raise ConfigError("lookupd_http_addresses", "<redacted>", str(exc)) from None
            if address not in [a for a, _ in lookupds]:
                lookupds.append((address, client))
        if not direct and not lookupds:
            raise ConfigError("nsqd_tcp_addresses", nsqd_tcp_addresses, "give nsqd_tcp_addresses or lookupd_http_addresses (or both)")

        check_number("max_in_flight", max_in_flight, 0, 2**31 - 1, integer=True)
        check_number("max_tries", max_tries, 0, 65535, integer=True)
        check_number("max_backoff_duration", max_backoff_duration, 0, 3600)
        check_number("lookupd_poll_interval", lookupd_poll_interval, 0.001, 86400)
        check_number("lookupd_poll_jitter", lookupd_poll_jitter, 0, 1)
        check_number("low_rdy_idle_timeout", low_rdy_idle_timeout, 0.001, 3600)
        check_number("low_rdy_timeout", low_rdy_timeout, 0.001, 3600)
        check_number("close_timeout", close_timeout, 0, 3600)
        check_number("rdy_redistribute_interval", rdy_redistribute_interval, 0.001, 3600)
        check_number("max_connect_attempts", max_connect_attempts, 1, MAX_CONNECT_ATTEMPTS, integer=True)
        if concurrency is None:
            concurrency = min(max(1, max_in_flight), MAX_CONCURRENCY)
        check_number("concurrency", concurrency, 1, MAX_CONCURRENCY, integer=True)
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError("name", name, "must be a non-empty string")
        if backoff_strategy is None:
            backoff_strategy = ExponentialBackoff(1.0, max_backoff_duration)
        elif not callable(getattr(backoff_strategy, "calculate", None)):
            raise TypeError("backoff_strategy must have a calculate(level) -> seconds method")

        self._backend = get_backend(backend)
        # Eager validation: AsyncConn checks every value in its constructor (no I/O, no task).
        AsyncConn("127.0.0.1", 4150, backend=self._backend, **conn_kwargs)
        if conn_kwargs.get("heartbeat_interval") == -1:
            # Not worth a connection attempt: nsqd closes every one at SUB, and it would retry forever.
            raise ConfigError("heartbeat_interval", -1, NO_HEARTBEAT_SUB)

        self.name = name or f"{self.topic}:{self.channel}"
        self.max_tries = max_tries
        self.max_backoff_duration = float(max_backoff_duration)
        self.lookupd_poll_interval = float(lookupd_poll_interval)
        self.lookupd_poll_jitter = float(lookupd_poll_jitter)
        self.low_rdy_idle_timeout = float(low_rdy_idle_timeout)
        self.low_rdy_timeout = float(low_rdy_timeout)
        self.lookupd_connect_timeout = lookupd_connect_timeout
        self.lookupd_request_timeout = lookupd_request_timeout
        self.rdy_redistribute_interval = float(rdy_redistribute_interval)
        self.close_timeout = float(close_timeout)
        self.concurrency = concurrency
        self.max_connect_attempts = max_connect_attempts
        self.backoff_strategy = backoff_strategy
        self.nsqd_tcp_addresses = [_address_key(h, p) for h, p in direct.values()]
        self.lookupd_http_addresses = [a for a, _ in lookupds]
        self._conn_kwargs = dict(conn_kwargs)
        self._max_in_flight = max_in_flight
        self._random = random.Random()

        self._backend_choice = backend  # None: chosen again at start() (see _primitives)
        self._primitives(self._backend)
        self._conns: Dict[str, _ConnState] = {}
        self._connecting: Dict[str, Optional[AsyncConn]] = {}  # attempts in progress (at most max_connect_attempts)
        # Attempts waiting for one of those slots, oldest first (insertion order): address ->
        # (host, port, first), *first* when the address had never been tried as it was queued
        # (its share is held back for it, see _first_attempts_locked). _queued_first counts those.
        self._queued: Dict[str, Tuple[str, int, bool]] = {}
        self._queued_first = 0
        self._direct = direct
        self._direct_failures: Dict[str, int] = {}
        #: why the latest attempt to connect to (and subscribe at) each nsqd failed, until one
        #: succeeds (nsq-sync tail tells a refusal from an outage with it)
        self._connect_errors: Dict[str, BaseException] = {}
        self._reconnect_timers: Dict[str, _Timer] = {}
        self._tasks: Dict[int, Any] = {}
        self._task_ids = itertools.count()
        lookupds_shuffled = list(lookupds)
        self._random.shuffle(lookupds_shuffled)
        self._lookupds = lookupds_shuffled
        self._lookupd_index = 0
        self._lookupd_task: Any = None
        #: answers from any lookupd so far, and those listing some nsqd (how a poll went)
        self._lookupd_answers = 0
        self._lookupd_found = 0
        #: nsqd found through lookupd whose connection closed (not by close()) and that are not
        #: connected again yet: while there are some, lookupd is asked again sooner; and
        #: whether one was lost since the discovery task last looked (restarts that schedule)
        self._lookupd_lost: Set[str] = set()
        self._lookupd_lost_new = False
        #: discovered nsqd that have started that schedule (a lost connection, or a failed
        #: connection attempt) since they were last connected: a failed attempt starts it only
        #: for an address not in here, so an nsqd lookupd keeps listing that cannot be reached
        #: costs one schedule, not one per poll (an ordered set, oldest first, bounded)
        self._lookupd_hurried: Dict[str, None] = {}
        #: nsqd not connected since a failure warned about (a closed connection, failed
        #: attempts), oldest first, at most MAX_LOOKUPD_PRODUCERS: see _Down
        self._down: Dict[str, _Down] = {}
        #: nsqd found through lookupd -> the lookupd whose answer listed it last: those of the
        #: latest answer, and earlier ones with an attempt still under way (for the lines
        #: about an nsqd that cannot be reached, and stats()["unreachable"])
        self._listed_by: Dict[str, str] = {}
        #: set while there is nothing to consume from (see _NoProducers; stats()["no_producers_since"])
        self._no_producers: Optional[_NoProducers] = None
        #: lookupd address -> time.monotonic() of the first failure of the current run of
        #: failed queries (for the line that says when it answers again)
        self._lookupd_failing: Dict[str, float] = {}
        #: per lookupd address, how its queries went (stats()["lookupd"]); changed under _lock
        self._lookupd_health: Dict[str, Dict[str, Any]] = {
            address: {"address": address, "queries": 0, "failed_queries": 0, "last_success": None, "last_error": None, "producers": None}
            for address, _ in lookupds
        }
        self._started = False
        self._closing = False
        self._pid = os.getpid()  # the process that may start it (see _forget_parent)
        self._forked_from: Optional[int] = None
        self._close_task: Any = None
        self._run_waker: Optional[socket.socket] = None
        self._signalled: Optional[int] = None

        # backoff and RDY state (under _lock)
        self._level = 0
        self._window = False
        self._window_gen = 0
        self._window_timer: Optional[_Timer] = None
        self._test_addr: Optional[str] = None
        self._test_idle: set = set()  # found idle as the backoff test during this backoff episode
        self._test_last_idle: Optional[str] = None
        self._episode_since = 0.0  # time.time() the backoff level last went from 0 to 1
        self._test_since = 0.0
        self._deficit = False
        self._settle_timer: Optional[_Timer] = None
        self._tick_timer: Optional[_Timer] = None
        self._warned_max_rdy: set = set()  # max_rdy_count values warned about (_warn_capped_locked)
        self._tried: set = set()  # addresses whose first connection attempt has ended (see _first_attempts_locked)
        self._connecting_first: set = set()  # the addresses in _connecting that are not in _tried
        # The decision of the last full RDY pass, while it holds (see _added_locked): with
        # thousands of nsqd, a pass over every connection per connection registered, closed
        # or failed to connect made discovering N of them O(N^2) under the lock.
        self._plan_valid = False
        self._plan_gen = 0  # bumped by each full pass; a _ConnState.plan_gen equal to it is counted
        self._plan_share = 0  # max_in_flight // count (every connection's RDY), or 0: RDY 1 to a subset
        self._plan_budget = 0  # capacity no connection uses: a lower bound (what is counted only shrinks)
        self._plan_slots = 0  # with a subset: RDY 1s not handed out
        self._plan_waiting = 0  # with a subset: counted connections left at RDY 0
        self._pass_at = float("-inf")  # time.monotonic() the last full pass began
        self._pass_cost = 0.0  # and how long it took

        # stats: bumped once per message from many workers, so no lock (see _Counter)
        # The validation hooks run only when a subclass overrides one (a hot path otherwise).
        cls = type(self)
        self._hooked = cls.validate_message is not Reader.validate_message or cls.preprocess_message is not Reader.preprocess_message
        # No hook overridden: a message goes straight to message_handler (read at each call,
        # so set_message_handler() and assigning message_handler still take effect).
        self._plain = not self._hooked and cls.process_message is Reader.process_message
        #: each _CONN_TOTALS counter, added up over connections since closed (under _lock)
        self._gone = dict.fromkeys(_CONN_TOTALS, 0)
        self._warned_falsy = False  # a handler returned 0, "" or the like (_answer_later)
        self._unanswered = WarningTally(10.0)  # answers lost with their connection (_not_answered)
        self._requeued = _Counter()
        self._given_up = _Counter()

        lifecycle.register(self)
        lifecycle.hold(self)  # until close(): nsq_sync.run() starts it even if nobody keeps it

    # ================================================================ public
    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, max_in_flight: int) -> None:
        """``reader.max_in_flight = n`` (pynsq code assigns it) is :meth:`set_max_in_flight`."""
        self.set_max_in_flight(max_in_flight)

    @property
    def total_rdy(self) -> int:
        """The RDY counts of every connection added up (pynsq's attribute; also in :meth:`stats`)."""
        with self._lock:
            states = list(self._conns.values())
        return sum(st.conn.rdy for st in states)

    @property
    def backoff_level(self) -> int:
        """0 when not backing off."""
        return self._level

    @property
    def conns(self) -> Dict[str, AsyncConn]:
        """The registered (subscribed) connections by ``"host:port"`` (pynsq's attribute)."""
        with self._lock:
            return {address: st.conn for address, st in self._conns.items()}

    @property
    def closed(self) -> bool:
        """True once close() was called (or, in a forked child, when the parent had started it)."""
        self._forget_parent()
        return self._closing

    def _primitives(self, backend: Backend) -> None:
        """The locks, events, worker pool and timer task of *backend*, none started yet."""
        self._backend = backend
        self._lock = _RdyLock(backend.lock())  # every RDY/backoff/connection-set decision
        self._pool = WorkerPool(self.concurrency, backend, name=f"nsq_sync-{self.name}")
        self._scheduler = _Scheduler(backend, f"nsq_sync-{self.name}-timers")
        self._lookupd_wake = backend.event()
        self._stop_event = backend.event()
        self._closed_event = backend.event()

    def _choose_backend_again(self) -> None:
        """start() of a Reader whose backend was chosen automatically, before gevent patched the
        process (gunicorn -k gevent --preload: made at import in the master, started in a
        worker that patched after the fork). Its thread locks would block the hub of the
        greenlets spawned from now on: it takes gevent's, while nothing has started yet."""
        if self._backend_choice is not None or self._started or self._closing:
            return
        backend = get_backend(None)
        if backend is not self._backend:
            logger.info("%s: gevent patched the process after the Reader was made; using greenlets", self.name)
            self._primitives(backend)

    def _forget_parent(self) -> None:
        """In a forked child: a Reader the parent started belongs to the parent.

        Its connections, tasks and messages in flight stay there; the child closes only its
        copies of the sockets (no CLS, no shutdown, which would end the parent's connections)
        and treats the Reader as closed. Under gevent copies of the parent's greenlets may live
        on in the child: the stop flags end their loops, and reads on the closed copies end
        theirs. A Reader never started is simply the child's. Runs from the at-fork hook, and
        at the start of start(), close(), set_max_in_flight() and ``closed`` (a no-op in the
        process that owns it), for uWSGI, which forks in C without the hook. No lock taken: a
        parent thread may have held it at the fork.
        """
        if self._pid == os.getpid():
            return
        parent, self._pid = self._pid, os.getpid()
        if not self._started or self._forked_from is not None:
            return
        self._forked_from = parent
        self._closing = True
        lifecycle.release(self)
        self._stop_event.set()
        self._lookupd_wake.set()
        for state in list(self._conns.values()):
            stream = state.conn._stream
            if stream is not None:
                stream.close()  # our copy of the fd only
        self._closed_event.set()

    def _refuse_closed(self) -> ClosedError:
        if self._forked_from is not None:
            return ClosedError(
                f"{self.name}: started in process {self._forked_from}, which forked this one; a Reader's "
                "connections stay in the process that started it: create the Reader in this process"
            )
        return ClosedError(f"{self.name}: the Reader was closed")

    def set_message_handler(self, message_handler: MessageHandler) -> None:
        """Set the handler (pynsq's method). Raises TypeError (the handler is left unchanged)
        when it is not callable, or is a coroutine, async generator or generator function."""
        check_message_handler(message_handler)
        self.message_handler = message_handler

    def start(self) -> None:
        """Start connecting (in background tasks) and polling nsqlookupd; returns at once.

        Idempotent. Raises ClosedError after close(), ConfigError when there is neither a
        message_handler nor an overridden process_message().
        """
        if self.message_handler is None and type(self).process_message is Reader.process_message:
            raise ConfigError("message_handler", None, "give a message_handler or override process_message()")
        self._forget_parent()
        self._choose_backend_again()
        with self._lock:
            if self._closing:
                raise self._refuse_closed()
            if self._started:
                return
            self._started = True
            _live_readers.add(self)
            self._scheduler.start()
            self._tick_timer = self._scheduler.call_later(self.rdy_redistribute_interval, self._redistribute_tick)
            if self._lookupds:
                self._lookupd_task = self._backend.spawn(self._lookupd_loop, name=f"nsq_sync-{self.name}-lookupd")
        if uwsgi_state()[1]:
            logger.warning(
                "%s: started in uWSGI's master process, which forks the workers in C: the Reader's "
                "connections stay in the master, and a worker forked while one of its threads holds "
                "the GIL hangs. Start Readers in the workers (uWSGI --lazy-apps, or a postfork hook)",
                self.name,
            )
        logger.info(
            "%s: starting (nsqd %s, lookupd %s, max_in_flight %d)",
            self.name,
            self.nsqd_tcp_addresses or "-",
            self.lookupd_http_addresses or "-",
            self._max_in_flight,
        )
        self._connect_many([(address, host, port) for address, (host, port) in list(self._direct.items())])

    def run(self) -> None:
        """start(), block until close() is called or SIGINT/SIGTERM arrives, then close gracefully.

        Signal handlers are installed only in the main thread (and restored before the
        drain, so a second signal interrupts it the usual way). Raises like start().
        """
        self.start()
        receiver, waker = socket.socketpair()
        waker.setblocking(False)
        previous: Dict[int, Any] = {}
        try:
            self._run_waker = waker
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    try:
                        previous[signum] = signal.signal(signum, self._on_signal)
                    except ValueError:  # not the interpreter's main thread after all
                        break
            while not self._closing and self._signalled is None:
                try:
                    receiver.recv(64)
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    continue
        finally:
            self._run_waker = None
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            receiver.close()
            waker.close()
        if self._signalled is not None:
            logger.info("%s: got signal %d; closing", self.name, self._signalled)
            self.close()
        self.join()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop gracefully; idempotent, safe from any thread (and from a handler).

        Stops discovery, reconnects and timers; sends CLS on every connection (nsqd stops
        delivering), requeues messages still queued for a worker, waits up to *timeout*
        (default ``close_timeout``) for running handlers to answer and the connections to
        close, then stops the worker pool and joins every task. Called from inside one of
        the Reader's own tasks (a handler, a hook) it starts the shutdown in the background
        and returns; use :meth:`join` elsewhere to wait. Raises ConfigError for a bad timeout.
        """
        if timeout is None:
            timeout = self.close_timeout
        check_timeout(timeout)
        self._forget_parent()  # (in a forked child: then closed at once, nothing of its own to drain)
        with self._lock:
            first = not self._closing
            self._closing = True
            started = self._started
            if first:
                self._cancel_timers_locked()
        lifecycle.release(self)
        self._poke_run()
        if not first:
            if not self._in_own_task():
                self.join(timeout)
            return
        self._stop_event.set()
        self._scheduler.stop()
        self._lookupd_wake.set()
        if not started:
            self._pool.close(wait=False)
            self._closed_event.set()
            return
        logger.info("%s: closing", self.name)
        if self._in_own_task():
            self._close_task = self._backend.spawn(self._shutdown, float(timeout), name=f"nsq_sync-{self.name}-close")
            return
        self._shutdown(float(timeout))

    def join(self, timeout: Optional[float] = None) -> bool:
        """Block until close() has finished; True if it did within *timeout*.

        Raises ConfigError (TypeError for a non-number) naming ``timeout`` for a bad one.
        """
        if timeout is not None:
            check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._closed_event.wait(timeout):
            return False
        task = self._close_task
        if task is not None and not _is_current(self._backend, task) and not self._in_own_task():
            # The background shutdown has finished its work; let its task end too.
            task.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return True

    def set_max_in_flight(self, max_in_flight: int) -> None:
        """Change max_in_flight at runtime: 0 pauses (RDY 0 everywhere), a positive value redistributes.

        Raises TypeError/ConfigError for a value that is not an int >= 0, ClosedError after close().
        """
        check_number("max_in_flight", max_in_flight, 0, 2**31 - 1, integer=True)
        self._forget_parent()
        with self._lock:
            if self._closing:
                raise self._refuse_closed()
            self._max_in_flight = max_in_flight
            logger.info("%s: max_in_flight set to %d", self.name, max_in_flight)
            self._apply_rdy_locked()

    def is_starved(self) -> bool:
        """True when some connection has messages in flight >= 85% of its last RDY (the guide's rule).

        Use it to flush batches: while starved, nsqd sends nothing more. As in pynsq, messages
        count once their handler was called (not while they wait for a worker) until answered.
        """
        with self._lock:
            conns = [st.conn for st in self._conns.values()]
        return any(conn.is_starved() for conn in conns)  # (each takes its connection's lock: not under ours)

    def stats(self) -> Dict[str, Any]:
        """Counters and per-connection state, for monitoring.

        Keys: ``messages_received``, ``messages_finished`` (FINs sent, less those nsqd
        refused: nsqd answers a FIN only when it fails, so one sent a moment ago counts until
        its refusal arrives), ``messages_requeued`` (REQs sent, less those refused),
        ``messages_given_up`` (also FINed, so counted in finished), ``messages_expired``
        (dropped unrun: they waited for a worker longer than msg_timeout, so nsqd had timed
        them out and delivers them again; old copies nsqd sent again and messages dropped
        after a channel empty count in messages_received only), ``messages_fin_failed`` and
        ``messages_req_failed`` (FINs and REQs nsqd refused with E_FIN_FAILED, E_REQ_FAILED:
        it had timed the message out, or the channel was emptied, and delivers it again or
        dropped it; not in finished or requeued), ``messages_touched_queued``
        (TOUCHes the Reader sent for messages that waited for a worker, so that nsqd did not
        time them out: while they waited, and as a worker picked up one that waited more than
        a tenth of msg_timeout; see docs/tuning.md), ``in_flight``,
        ``max_in_flight``, ``total_rdy``, ``backoff_level``, ``backing_off``, ``closed`` and
        ``connections``: a list of dicts with ``address``, ``rdy``, ``in_flight``,
        ``connected``, ``max_rdy_count``, ``last_msg_timestamp``, ``failed_attempts``,
        ``down_since`` and ``last_error``; a direct nsqd (``nsqd_tcp_addresses``) that is not
        connected is listed with ``connected`` False, its failed connection attempts in a
        row, since when it is down (time.time(): its connection closed, or the first attempt
        failed; None before that) and the last error (None when it closed without one).
        ``lookupd``: a list of dicts, one per nsqlookupd in ``lookupd_http_addresses``, with
        ``address``, ``queries`` (so far), ``failed_queries`` (in a row: 0 after a success),
        ``last_success`` (time.time() of its last answer, or None), ``last_error`` (the
        latest failure, kept after a success; None if it never failed) and ``producers``
        (how many nsqd its last answer listed, or None). ``unreachable``: the nsqd found
        through lookupd that it still lists but the Reader cannot connect to (a wrong
        ``--broadcast-address``, say), one dict each with ``address``, ``lookupd`` (the one
        that listed it), ``since`` (time.time() it was last connected, or first tried),
        ``failed_attempts`` (since then) and ``last_error``; an entry goes once connected,
        or once lookupd no longer lists it. ``no_producers_since``: time.time() since when
        the Reader has had no connection while the nsqlookupd answers listed no nsqd for the
        topic (a misspelled topic, no producer yet, or every nsqd that had it down), else None.
        """
        requeued, given_up = self._requeued.value, self._given_up.value
        with self._lock:
            states = list(self._conns.values())
            # Read before the totals: a FIN meanwhile shows in both in_flight and finished,
            # never in neither (each connection counts it under the lock that updates in_flight).
            flights = [st.conn.in_flight for st in states]
            level, window = self._level, self._window
            # Counted by each connection: received on arrival (a message still waiting for a
            # worker counts); finished as its FIN is queued (under the lock that takes it out of
            # in_flight); FINs and REQs nsqd refused as the refusal comes (they were counted
            # as finished or requeued when sent: nsqd answers only a failure)
            totals = {name: gone + sum(getattr(st.conn, name) for st in states) for name, gone in self._gone.items()}
            received, expired, touched = totals["_received_total"], totals["_expired_total"], totals["_touched_total"]
            finished = totals["_finished_total"]
            fin_failed, req_failed = totals["_fin_failed_total"], totals["_req_failed_total"]
            # A direct nsqd that is down (or not connected yet) is listed too, so that an alert
            # on "connected": False can fire (its max_rdy_count and last_msg_timestamp: None).
            # (with since when, and the last error, once an attempt failed or its connection closed)
            down = [] if self._closing else [
                (address, self._direct_failures.get(address, 0), self._down.get(address))
                for address in self._direct if address not in self._conns
            ]  # fmt: skip
            lookupds = [dict(health) for health in self._lookupd_health.values()]
            # Found through lookupd, listed still, never connected since its attempts failed:
            # missing from "connections", where a healthy one showed while messages sat there.
            unreachable = [] if self._closing else [
                {
                    "address": address, "lookupd": self._listed_by.get(address), "since": down.wall_since,
                    "failed_attempts": down.attempts, "last_error": down.last_error,
                }
                for address, down in self._down.items()
                if down.attempts and down.listed and address not in self._direct
            ]  # fmt: skip
            nothing = self._no_producers
            no_producers_since = None if nothing is None or self._closing else nothing.wall_since
        connections = [
            {
                "address": st.address,
                "rdy": st.conn.rdy,
                "in_flight": in_flight,
                "connected": st.conn.connected(),
                "max_rdy_count": st.conn.max_rdy_count,
                "last_msg_timestamp": st.conn.last_msg_timestamp,
                "failed_attempts": 0,
                "down_since": None,
                # (closed, and not yet taken off the list by its close event: why)
                "last_error": None if st.conn.error is None or st.conn.connected() else str(st.conn.error),
            }
            for st, in_flight in zip(states, flights)
        ]
        connections += [
            {
                "address": address, "rdy": 0, "in_flight": 0, "connected": False, "max_rdy_count": None,
                "last_msg_timestamp": None, "failed_attempts": failed,
                "down_since": None if gone is None else gone.wall_since, "last_error": None if gone is None else gone.last_error,
            }
            for address, failed, gone in down
        ]  # fmt: skip
        return {
            "topic": self.topic,
            "channel": self.channel,
            "name": self.name,
            "messages_received": received,
            "messages_finished": finished - fin_failed,
            "messages_requeued": requeued - req_failed,
            "messages_given_up": given_up,
            "messages_expired": expired,
            "messages_fin_failed": fin_failed,
            "messages_req_failed": req_failed,
            "messages_touched_queued": touched,
            "in_flight": sum(c["in_flight"] for c in connections),
            "max_in_flight": self._max_in_flight,
            "total_rdy": sum(c["rdy"] for c in connections),
            "backoff_level": level,
            "backing_off": bool(level or window),
            "closed": self._closing,
            "connections": connections,
            "lookupd": lookupds,
            "unreachable": unreachable,
            "no_producers_since": no_producers_since,
        }

    def connect_to_nsqd(self, host: str, port: int) -> None:
        """Connect (in the background) to one more nsqd; it is kept and reconnected like
        ``nsqd_tcp_addresses``. Starts the Reader if needed. Does nothing if already connected.

        Raises ConfigError for a bad host/port, ClosedError after close().
        """
        if not isinstance(host, str) or not host:
            raise ConfigError("host", host, "must be a non-empty string")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError("port", port, "must be an int between 1 and 65535")
        if self.closed:
            raise self._refuse_closed()
        address = _address_key(host, port)
        with self._lock:
            self._direct.setdefault(address, (host, port))
        if not self._started:
            self.start()  # connects every direct address, this one included
        else:
            self._connect(address, host, port)

    def query_lookupd(self) -> List[Tuple[str, int]]:
        """Ask the next nsqlookupd (round-robin; on failure the next one, each at most once)
        for the topic's producers and connect to those not connected yet.

        Returns the producers found (``[]`` if every lookupd failed; failures are logged,
        not raised).
        """
        count = len(self._lookupds)
        for _ in range(count):
            if self._closing:
                return []
            with self._lock:
                index = self._lookupd_index
                self._lookupd_index = (index + 1) % count
            address, client = self._lookupds[index]
            try:
                producers = client.producers(self.topic)
            except HTTPError as exc:  # unreachable, a non-2xx answer, or not a /lookup answer
                (logger.debug if self._closing else logger.warning)("%s: lookupd %s query failed: %s", self.name, address, exc)
                self._lookupd_outcome(address, error=str(exc))
                continue
            except Exception as exc:  # unexpected: this lookupd fails all the same, with the traceback
                logger.warning("%s: lookupd %s query failed: %s: %s", self.name, address, type(exc).__name__, exc, exc_info=True)
                self._lookupd_outcome(address, error=f"{type(exc).__name__}: {exc}")
                continue
            self._lookupd_outcome(address, producers=len(producers))
            if self._closing:
                return []  # (an answer that came in after close(): nothing to connect to)
            if len(producers) > MAX_LOOKUPD_PRODUCERS:
                logger.warning(
                    "%s: lookupd %s lists %d producers; using the first %d (MAX_LOOKUPD_PRODUCERS)",
                    self.name, address, len(producers), MAX_LOOKUPD_PRODUCERS,
                )  # fmt: skip
                producers = producers[:MAX_LOOKUPD_PRODUCERS]
            logger.debug("%s: lookupd %s lists %s", self.name, address, producers)
            listed = [(_address_key(host, port), host, port) for host, port in producers]
            self._lookupd_listed(address, [key for key, _, _ in listed])
            self._connect_many(listed, answer=True)
            return producers
        return []

    def _lookupd_listed(self, lookupd: str, addresses: List[str]) -> None:
        """Bookkeeping for an answer of *lookupd* listing *addresses* ("host:port"), before they
        are connected to: which lookupd announced each nsqd, and the nsqd that cannot be
        reached that it no longer lists (out of stats()["unreachable"]; one never connected is
        forgotten), and whether the Reader has nothing to consume from (a WARNING once it has
        lasted no_producers_warn_after). O(listed) once per poll, never per message."""
        with self._lock:
            if self._closing:
                return
            said = None
            if addresses:
                said = self._no_producers_end_locked(f"nsqlookupd {lookupd} lists {len(addresses)} nsqd for it again")
            elif not self._conns:  # (connected: to an nsqd_tcp_addresses entry)
                said = self._no_producers_step_locked(lookupd)
            listed = set(addresses)
            by = self._listed_by
            for address in [a for a in by if a not in listed and a not in self._connecting and a not in self._queued]:
                del by[address]
            for address in addresses:
                by[address] = lookupd
            for address, down in list(self._down.items()):
                if address in self._direct:
                    continue
                if address in listed:
                    down.listed = True
                elif down.was_connected:
                    down.listed = False  # (kept: its reconnection is said when it comes back)
                else:
                    del self._down[address]
        if said is not None:
            logger.warning(*said)

    def _no_producers_step_locked(self, lookupd: str) -> Optional[Tuple[Any, ...]]:
        """An answer of *lookupd* listed no nsqd and the Reader has no connection: the warning
        (logger.warning arguments) once that has lasted long enough, and every
        no_producers_warn_every while it lasts; else None."""
        now = time.monotonic()
        state = self._no_producers
        if state is None:
            state = self._no_producers = _NoProducers()
        state.asked[lookupd] = None
        lasted = now - state.since
        if lasted < max(self.no_producers_warn_after, 2.0 * self.lookupd_poll_interval):
            return None
        if state.warned_at is not None and now - state.warned_at < self.no_producers_warn_every:
            return None
        state.warned_at = now
        return (
            "%s: nothing to consume from for %.0f s: no connection, and nsqlookupd %s list no nsqd for topic %r. No nsqd "
            "has topic %r registered: a misspelled topic, or no producer has published to it yet (or the nsqd that had "
            "it are down); said again every %.0f s while it lasts",
            self.name, lasted, ", ".join(state.asked), self.topic, self.topic, self.no_producers_warn_every,
        )  # fmt: skip

    def _no_producers_end_locked(self, how: str) -> Optional[Tuple[Any, ...]]:
        """Something to consume from again (*how*): the line that says so if the warning was
        given (at its level, so a log kept from WARNING up does not end on it), else None."""
        state = self._no_producers
        if state is None:
            return None
        self._no_producers = None
        if state.warned_at is None:
            return None
        took = time.monotonic() - state.since
        return "%s: %s, after %.0f s with nothing to consume from (topic %r)", self.name, how, took, self.topic

    def _lookupd_outcome(self, address: str, producers: Optional[int] = None, error: Optional[str] = None) -> None:
        """Record one query of *address* for stats(): *producers* listed, or the *error* it failed with."""
        back = None
        with self._lock:
            health = self._lookupd_health[address]
            health["queries"] += 1
            if error is None:
                failing = self._lookupd_failing.pop(address, None)
                if failing is not None:
                    back = (time.monotonic() - failing, health["failed_queries"])
                self._lookupd_answers += 1
                self._lookupd_found += 1 if producers else 0
                health["failed_queries"] = 0
                health["last_success"] = time.time()
                health["producers"] = producers
            else:
                health["failed_queries"] += 1
                health["last_error"] = error
                if not self._closing:  # (its failures were warned about)
                    self._lookupd_failing.setdefault(address, time.monotonic())
        if back is not None and not self._closing:
            # At the level of the failures it ends: a log kept from WARNING up does not end on them.
            logger.warning("%s: lookupd %s answered again after %.1f s failing (%d failed queries)", self.name, address, *back)

    # --------------------------------------------------------- user hooks
    def process_message(self, message: Message) -> Any:
        """Handle one message; the default calls ``message_handler(message)``.

        Return True/None to FIN, False to REQ (with backoff); raise to REQ with backoff.
        """
        return self.message_handler(message)  # type: ignore[misc]

    def preprocess_message(self, message: Message) -> Message:
        """Hook run before validate_message(); its result goes to validate_message() only."""
        return message

    def validate_message(self, message: Message) -> bool:
        """Hook: return False to FIN the message without processing it."""
        return True

    def giving_up(self, message: Message) -> None:
        """Hook called when ``0 < max_tries < message.attempts``; the message is FINed afterwards.

        The default logs a warning (the message as the Reader's other lines name it, its
        topic/channel and nsqd; never the body).
        """
        conn = getattr(message, "_responder", None)
        logger.warning(
            "%s: giving up on %r from %s (%s/%s): delivered more than max_tries (%d) times; finishing it",
            self.name, message, getattr(conn, "id", "an unknown nsqd"), self.topic, self.channel, self.max_tries,
        )  # fmt: skip

    def heartbeat(self, conn: AsyncConn) -> None:
        """Hook called after each heartbeat nsqd sends on *conn* (already answered with NOP)."""

    # ===================================================== message handling
    def _on_message(self, conn: AsyncConn, message: Message) -> None:
        if self._closing:
            # close() started: do not begin new work; hand it back at once.
            self._answer(message, None)
            return
        try:
            if 0 < self.max_tries < message.attempts:
                self._give_up(message)
                return
            if self._plain:
                result = self.message_handler(message)  # type: ignore[misc]
            else:
                if self._hooked and not self.validate_message(self.preprocess_message(message)):
                    logger.debug("%s: message %r from %s failed validation; finishing it", self.name, message, conn.id)
                    self._answer(message, True)
                    return
                result = self.process_message(message)
        except BaseException as exc:
            if _is_exit(exc):
                # SystemExit, KeyboardInterrupt, a greenlet's kill: not the message's fault. Hand
                # it back at once (no backoff) rather than leave it in flight until nsqd's timeout.
                if not message.has_responded():
                    self._answer(message, None)
                raise
            # An exception, or another BaseException (a gevent.Timeout, one by design, that the
            # handler's own time limit on a call raised): the handler failed.
            logger.exception("%s: handler raised for %r from %s; requeueing it", self.name, message, conn.id)
            if not message.has_responded():
                self._answer(message, False)
            return
        if message._async or message._responded:
            return
        if result is False:
            self._answer(message, False)
            return
        if result is not True and result is not None and self._answer_later(message, result):
            return
        try:  # _answer(message, True) and _on_finished, inlined: this is every consumed message's path
            message._responder._finish_message(message, False)  # type: ignore[union-attr]  # delivered: has a connection
        except Error as exc:
            self._not_answered(message, exc)
            if isinstance(exc, AlreadyRespondedError) or not message._responded:
                return  # not ours to count: answered already, or its connection had ended
            # Queued (and counted by the connection), then its write failed: a success all the
            # same, as the FIN of any other path is (_on_finished).
        if self._level or self._deficit:
            self._result(True)

    def _answer_later(self, message: Message, result: Any) -> bool:
        """A handler's result that is not an answer yet; False for any other (then it finishes).

        A ``concurrent.futures.Future`` answers the message when it completes, as pynsq does
        with a Future its handlers return: FIN, or REQ if it raised, was cancelled or gave
        False. An awaitable (say, the coroutine of an ``async def`` behind a wrapper that hid
        it from check_message_handler) never runs here: the message is requeued, not finished
        unprocessed, and the mistake logged.
        """
        if not self._warned_falsy and self._is_falsy(result):
            self._warned_falsy = True
            logger.warning(
                "%s: the handler returned %r: that finishes the message (only False requeues it; pynsq "
                "requeued any falsy result). Return False to requeue; this is said once",
                self.name,
                result,
            )
        if isinstance(result, futures.Future):
            message.enable_async()
            result.add_done_callback(functools.partial(self._future_done, message))
            return True
        if _is_future_like(result):
            # Another executor's future (gevent's thread pool, loky, dask...): the same. gevent's
            # run their callbacks in the hub, where an answer must not wait for a lock: those
            # answer from a greenlet of their own.
            message.enable_async()
            done = functools.partial(self._future_done, message)
            if self._backend.name == "gevent":
                spawn = self._backend.spawn
                result.add_done_callback(lambda future: spawn(done, future))
            else:
                result.add_done_callback(done)
            return True
        if _is_gevent_result(result):
            # A Greenlet or an AsyncResult (gnsq-style code spawns the work and returns it): the
            # same, when it is ready. It was finished at once, and work that failed later lost
            # its message. rawlink callbacks run in the hub: the answer goes from a greenlet.
            message.enable_async()
            spawn = self._backend.spawn
            result.rawlink(lambda ready: spawn(self._gevent_done, message, ready))
            return True
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # (no "never awaited" warning on top of our error)
            logger.error(
                "%s: the handler returned %s for %r; nsq_sync never awaits it, so the message is "
                "requeued. Use a plain def handler (run async code inside it if needed)",
                self.name,
                type(result).__name__,
                message,
            )
            self._answer(message, False)
            return True
        return False

    @staticmethod
    def _is_falsy(result: Any) -> bool:
        """A result pynsq would have taken for a failure: 0, "", an empty container. Never
        raises (a numpy array's or a DataFrame's truth value does: that is not falsy here)."""
        if isinstance(result, futures.Future) or inspect.isawaitable(result) or _is_future_like(result) or _is_gevent_result(result):
            return False  # (a dead Greenlet is falsy)
        try:
            return not result
        except Exception:
            return False

    def _future_done(self, message: Message, future: "futures.Future[Any]", what: str = "future") -> None:
        """The handler's future (or what has its ``result()``) ended: FIN, or REQ if it raised,
        was cancelled or gave False."""
        if message._responded:
            return
        try:
            ok = future.result() is not False
        except BaseException as exc:  # (CancelledError included)
            logger.error("%s: the handler's %s failed for %r; requeueing it", self.name, what, message, exc_info=exc)
            ok = False
        self._answer(message, ok)

    def _gevent_done(self, message: Message, ready: Any) -> None:
        """_future_done for a Greenlet or AsyncResult; a killed Greenlet failed too."""
        self._future_done(message, _GeventOutcome(ready), type(ready).__name__)  # type: ignore[arg-type]

    def _hand_back(self, messages: List[Message]) -> None:
        """A connection closing gracefully took back its messages still waiting for a worker:
        requeue them at once (no backoff) rather than leave them in flight on nsqd until
        handlers that run past the close timeout end, or until msg_timeout."""
        for message in messages:
            self._answer(message, None)

    def _answer(self, message: Message, ok: Optional[bool]) -> None:
        """FIN (ok), REQ with backoff (not ok) or REQ at once without backoff (None)."""
        try:
            if ok:
                message._responder._finish_message(message)  # type: ignore[union-attr]  # delivered: has a connection
            elif ok is None:
                message.requeue(delay=0, backoff=False)
            else:
                message.requeue()
        except Error as exc:
            self._not_answered(message, exc)

    def _not_answered(self, message: Message, exc: Error) -> None:
        if isinstance(exc, AlreadyRespondedError):
            return  # answered concurrently (enable_async code raced the handler's return)
        if isinstance(exc, (ConnectionClosedError, SendError)):
            # Its connection ended, or its write failed, which ends it (the connection and
            # _on_conn_close say so): nsqd, if it still
            # holds the message, delivers it again. Expected while closing; otherwise counted
            # and said at most every 10 s, not once per message read before the end.
            logger.debug("%s: could not answer %r: %s", self.name, message, exc)
            if self._closing:
                return
            due = self._unanswered.add(1)
            if due:
                logger.warning("%s: %d answers could not be sent (their connection had ended) since the last warning; the last: %r: %s", self.name, due, message, exc)
        else:
            logger.warning("%s: could not answer %r: %s", self.name, message, exc)

    def _give_up(self, message: Message) -> None:
        self._given_up.bump()
        try:
            self.giving_up(message)
        except Exception:
            logger.exception("%s: giving_up() raised for %r", self.name, message)
        if not message._responded:
            self._answer(message, True)

    # ----------------------------------------- answer events (caller's thread)
    def _on_finished(self, conn: AsyncConn) -> None:
        # Each connection's _owner_finished: a FIN queued by any path but _on_message's own
        # (the connection counts them all).
        if self._level == 0 and not self._deficit:
            return  # the common case: nothing to decide
        self._result(True)

    def _on_backoff(self, conn: AsyncConn) -> None:
        self._requeued.bump()
        if self.max_backoff_duration <= 0 and not self._deficit:
            return
        self._result(False)

    def _on_continue(self, conn: AsyncConn) -> None:
        self._requeued.bump()
        if self._deficit:
            self._result(None)

    def _result(self, success: Optional[bool]) -> None:
        """One message answered: success (FIN), failure (REQ with backoff) or neutral."""
        with self._lock:
            if self._closing:
                return
            if success is None or self._window or self.max_backoff_duration <= 0:
                # Neutral, or inside a backoff window (only one result per window counts).
                if self._deficit:
                    self._schedule_settle_locked()
                return
            if success:
                if self._level == 0:
                    if self._deficit:
                        self._schedule_settle_locked()
                    return
                self._level -= 1
                if self._level == 0:
                    logger.info("%s: backoff complete; resuming full RDY", self.name)
                    self._test_addr = None
                    self._test_idle.clear()
                    self._test_last_idle = None
                    self._apply_rdy_locked()
                else:
                    self._start_window_locked(failed=False)
            else:
                if self._level == 0:
                    self._level = 1
                    self._episode_since = time.time()
                    self._test_idle.clear()
                    self._test_last_idle = None
                elif self._level < _MAX_LEVEL:
                    try:
                        current = self._nominal(self._level)
                        grows = current < self.max_backoff_duration and self._nominal(self._level + 1) > current
                    except Exception:
                        logger.exception("%s: backoff_strategy raised; keeping backoff level %d", self.name, self._level)
                        grows = False
                    if grows:
                        self._level += 1
                self._start_window_locked(failed=True)

    def _nominal(self, level: int) -> float:
        strategy = self.backoff_strategy
        nominal = getattr(strategy, "nominal", None)
        return float(nominal(level) if callable(nominal) else strategy.calculate(level))

    def _start_window_locked(self, failed: bool) -> None:
        """Open a backoff window at the current level: after a failure (*failed*: entering
        backoff or going up a level, a WARNING), or as a step of the recovery (a success
        lowered the level, still above 0: an INFO, nothing is failing)."""
        try:
            interval = float(self.backoff_strategy.calculate(self._level))
        except Exception:
            logger.exception("%s: backoff_strategy.calculate(%d) raised; using max_backoff_duration", self.name, self._level)
            interval = self.max_backoff_duration
        interval = max(0.0, min(interval, self.max_backoff_duration))
        self._window = True
        self._window_gen += 1
        self._test_addr = None
        self._deficit = False
        self._plan_valid = False
        if self._window_timer is not None:
            self._window_timer.cancel()
        for st in self._conns.values():
            self._set_rdy(st, 0)
        if failed:
            logger.warning(
                "%s: backing off for %.3fs (level %d) after a failed message (requeued with backoff): RDY 0 on every connection",
                self.name, interval, self._level,
            )  # fmt: skip
        else:
            logger.info(
                "%s: recovering from backoff: a message succeeded, level down to %d; pausing %.3fs before the next test (RDY 0 on every connection)",
                self.name, self._level, interval,
            )  # fmt: skip
        self._window_timer = self._scheduler.call_later(interval, self._end_window, self._window_gen)

    def _end_window(self, generation: int) -> None:
        with self._lock:
            if self._closing or not self._window or generation != self._window_gen:
                return
            self._window = False
            self._window_timer = None
            logger.info("%s: backoff window over (level %d); testing with RDY 1 on one connection", self.name, self._level)
            self._apply_rdy_locked()

    # ============================================================ RDY logic
    def _set_rdy(self, st: _ConnState, value: int) -> bool:
        conn = st.conn
        if value > conn.max_rdy_count:
            value = conn.max_rdy_count
        previous = conn.rdy
        if previous == value or not conn.connected():
            return False
        now = time.monotonic()
        held = st.held(now)
        try:
            conn._queue_rdy(value)  # sent once the lock is released (see _RdyLock)
        except Error as exc:
            logger.debug("%s: RDY %d on %s failed: %s", self.name, value, conn.id, exc)
            return False
        self._lock.unsent.append(conn)
        logger.debug("%s: RDY %d on %s (was %d)", self.name, value, conn.id, previous)
        if value < previous:
            # Until nsqd has read this RDY it may go on sending under the higher value, and
            # what it sent under it may still be on the way: count that value a while longer
            # (the RDY's way up, the messages' way down, and a margin).
            st.ceiling = held
            st.ceiling_until = now + self.rdy_settle_delay + self.rdy_settle_rtts * st.rtt
        if previous == 0:
            st.rdy_since = now
        if value == 0:
            st.last_held = now
        return True

    def _first_attempts_locked(self) -> int:
        """Connection attempts under way to addresses never tried before (found together: the
        nsqd_tcp_addresses at start(), the producers of one lookupd answer). Their shares are
        held back for them, rather than all of max_in_flight going to the first to connect and
        being taken back, a settle delay at a time, as the others come. Attempts still
        queued (max_connect_attempts running) count: they belong to the same group, and
        starting one then changes no share."""
        return self._queued_first + len(self._connecting_first)

    def _apply_rdy_locked(self, revoke: bool = False) -> None:
        """Bring every connection's RDY to what the current mode wants (call under _lock):
        a full pass, over every connection.

        *revoke* (the periodic pass) also takes RDY back from idle or long-holding
        connections when connections outnumber max_in_flight (or in a backoff test).
        """
        self._deficit = False
        self._plan_valid = False
        if self._closing:
            return
        began = time.monotonic()
        self._pass_at = began
        self._decide_rdy_locked(revoke)
        self._pass_cost = time.monotonic() - began

    def _decide_rdy_locked(self, revoke: bool) -> None:
        states = [st for st in self._conns.values() if st.conn.connected()]
        max_in_flight = self._max_in_flight
        if max_in_flight == 0 or self._window:
            for st in states:
                self._set_rdy(st, 0)
            return
        if self._level > 0:
            if states:
                self._apply_test_rdy_locked(states, revoke)
            return

        count = len(states) + self._first_attempts_locked()
        if not count:
            return
        # (No connection yet, attempts under way: nothing to do, but the plan that the first
        # to register, and attempts failing before it, are decided by without a pass.)
        if count <= max_in_flight:
            per_conn = max_in_flight // count
            targets = {st.address: per_conn for st in states}
        else:
            per_conn = 0
            targets = self._subset_targets(states, max_in_flight, revoke)
        for st in states:
            share = targets[st.address]
            target = min(share, st.conn.max_rdy_count)
            if share > target:
                self._warn_capped_locked(st, share)
            if st.conn.rdy > target:
                self._set_rdy(st, target)
        # Capacity in use: a lowering frees nothing until nsqd has had time to apply it
        # (_ConnState.held), whichever pass looks.
        now = time.monotonic()
        gen = self._plan_gen = self._plan_gen + 1
        used = 0
        for st in states:
            used += st.used(now)
            st.plan_gen = gen
        budget = max_in_flight - used
        deficit = False
        for st in sorted(states, key=lambda s: s.last_held):
            conn = st.conn
            target = min(targets[st.address], conn.max_rdy_count)
            if target <= conn.rdy:
                continue
            base = st.used(now)  # counted already: raising up to it costs nothing
            value = min(target, base + budget) if budget > 0 else min(target, base)
            if value > conn.rdy and self._set_rdy(st, value) and value > base:
                budget -= value - base
            if conn.rdy < target:
                deficit = True
        self._deficit = deficit
        if deficit:
            self._settle_later_locked(states, now)
            return
        # Every connection has its target: this decision holds for the connections that come
        # and go until the share changes (_added_locked, _removed_locked: no pass over all).
        self._plan_valid = True
        self._plan_share = per_conn
        self._plan_budget = budget  # (max_in_flight minus the capacity counted now)
        if not per_conn:
            self._plan_slots = max_in_flight - sum(targets.values())
            self._plan_waiting = sum(1 for st in states if st.conn.rdy == 0)

    def _subset_targets(self, states: List[_ConnState], max_in_flight: int, revoke: bool) -> Dict[str, int]:
        """More connections than max_in_flight: RDY 1 on at most max_in_flight of them."""
        now_wall = time.time()
        now = time.monotonic()
        holders = sorted((st for st in states if st.conn.rdy > 0), key=lambda s: s.conn.last_msg_timestamp, reverse=True)
        waiting = [st for st in states if st.conn.rdy == 0]
        keep: List[_ConnState] = []
        for st in holders:
            if revoke and waiting:
                # Idle since its last message or since it got RDY, whichever is later: a
                # connection that was just handed RDY has not had its chance yet.
                held = now - st.rdy_since
                quiet = min(now_wall - st.conn.last_msg_timestamp, held)
                idle = quiet > self.low_rdy_idle_timeout and st.conn.in_flight == 0
                hogging = held > self.low_rdy_timeout
                if idle or hogging:
                    logger.debug("%s: taking RDY back from %s (%s)", self.name, st.address, "idle" if idle else "held too long")
                    continue
            keep.append(st)
        keep = keep[:max_in_flight]
        targets = {st.address: 0 for st in states}
        for st in keep:
            targets[st.address] = 1
        slots = max_in_flight - len(keep)
        if slots > 0:
            for st in sorted(waiting, key=lambda s: s.last_held)[:slots]:
                targets[st.address] = 1
        return targets

    def _apply_test_rdy_locked(self, states: List[_ConnState], revoke: bool) -> None:
        """After a backoff window: RDY 1 on exactly one connection until a result arrives."""
        test = self._conns.get(self._test_addr) if self._test_addr else None
        if test is not None and not test.conn.connected():
            test = None
        # (A test still waiting for its RDY 1, capacity being short, has not had its chance.)
        if test is not None and revoke and len(states) > 1 and test.conn.rdy > 0 and test.conn.in_flight == 0:
            last = max(test.conn.last_msg_timestamp, self._test_since)
            if time.time() - last > self.low_rdy_idle_timeout:
                # Its nsqd has nothing for us: let another connection test instead, and not
                # this one again in this backoff episode while there is another to try.
                logger.debug("%s: backoff test connection %s is idle; moving the test", self.name, test.address)
                self._set_rdy(test, 0)
                self._test_idle.add(test.address)
                self._test_last_idle = test.address
                test = None
        for st in states:
            if st is not test and st.conn.rdy > 0:
                self._set_rdy(st, 0)
        if test is None:
            test = self._choose_test_locked(states)
            self._test_addr = test.address
        if test.conn.rdy >= 1:
            if test.conn.rdy > 1:
                self._set_rdy(test, 1)
            return
        now = time.monotonic()
        used = 0
        for st in states:
            used += st.used(now)
        if test.used(now) < 1 and used + 1 > self._max_in_flight:
            # The RDY just taken back elsewhere (or messages still in flight) hold the capacity.
            self._deficit = True
            self._settle_later_locked(states, now)
            return
        if self._set_rdy(test, 1):
            self._test_since = time.time()

    def _choose_test_locked(self, states: List[_ConnState]) -> _ConnState:
        """Where the backoff test's RDY 1 goes: at random among the connections whose nsqd had
        messages for us lately (some in flight, or one received in this backoff episode or
        within low_rdy_idle_timeout before it), else among the others; never to one found idle
        as the test in this episode while there is another to try."""
        untried = [st for st in states if st.address not in self._test_idle]
        if not untried:
            # Every connection was found idle in this episode: start over, the last one last.
            self._test_idle.clear()
            untried = [st for st in states if st.address != self._test_last_idle] or states
        since = self._episode_since - self.low_rdy_idle_timeout
        recent = [
            st for st in untried if st.conn.in_flight > 0 or (st.conn._received_total > 0 and st.conn.last_msg_timestamp >= since)
        ]
        return self._random.choice(recent or untried)

    def _settle_later_locked(self, states: List[_ConnState], now: float) -> None:
        """Capacity is short: decide again once the first lowering still counted is due."""
        due = [st.ceiling_until for st in states if st.ceiling and st.ceiling_until > now]
        if due:
            self._schedule_settle_locked(min(due))

    def _schedule_settle_locked(self, when: Optional[float] = None) -> None:
        """Run _apply_rdy_locked again at *when* (time.monotonic()), or after the settle delay."""
        now = time.monotonic()
        if when is None:
            when = now + min(self.rdy_settle_delay, self.rdy_redistribute_interval)
        timer = self._settle_timer
        if timer is not None and not timer.cancelled:
            if timer.when <= when:
                return
            timer.cancel()
        self._settle_timer = self._scheduler.call_later(when - now, self._settle)

    def _settle(self) -> None:
        with self._lock:
            self._settle_timer = None
            self._apply_rdy_locked()

    def _redistribute_tick(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._apply_rdy_locked(revoke=True)
            self._tick_timer = self._scheduler.call_later(self.rdy_redistribute_interval, self._redistribute_tick)

    # ------------------------------------------------ the connection set changes
    # A connection registers or goes, an attempt ends: with thousands of nsqd (one lookupd
    # answer) a full pass for each made discovering N of them O(N^2) under the lock (4,000:
    # 28-41 s of CPU, benchmarks/rdy_scale.py). Instead the last full pass's decision is kept while it holds: the share
    # it computed (max_in_flight // count, or RDY 1 to a subset) is still the one the count
    # gives, and it left no connection short (no deficit). Then no other connection's target
    # changes, and only the one that came or went needs a decision, taken against
    # _plan_budget: a lower bound of the capacity nobody uses, since what a connection is
    # counted for only shrinks between RDY changes (ceilings lapse; nsqd sends no more than
    # the RDY it honours), each RDY raised here is taken from it, and a connection that goes
    # gives back what it used. Anything else (another share, capacity short, a subset's RDY
    # freed while others wait for one) takes a full pass: at once, or, when one ran less
    # than _PASS_GAP times its duration ago, then (a burst of such events, one pass).

    def _all_zero_locked(self) -> bool:
        """RDY 0 on every connection (closing, paused, a backoff window): a connection that
        comes has it already; the pass that ends this decides."""
        return self._closing or not self._max_in_flight or self._window

    def _plan_holds_locked(self) -> bool:
        if not self._plan_valid or self._closing or self._level or self._window:
            return False
        count = len(self._conns) + self._first_attempts_locked()
        max_in_flight = self._max_in_flight
        return count > 0 and (max_in_flight // count if count <= max_in_flight else 0) == self._plan_share

    def _added_locked(self, st: _ConnState) -> None:
        """*st* registered: its RDY as the last full pass would give it, if its decision holds."""
        if self._all_zero_locked():
            return
        if self._plan_holds_locked() and st.conn.connected():
            share = self._plan_share
            if not share:  # RDY 1 to a subset of the connections
                if self._plan_slots <= 0:
                    # None left: it waits, as a full pass would leave it (it waited least).
                    st.plan_gen = self._plan_gen
                    self._plan_waiting += 1
                    return
                if not self._plan_waiting:
                    share = 1  # (one waiting longer would come first: a full pass, below)
            if share:
                target = min(share, st.conn.max_rdy_count)
                if share > target:
                    self._warn_capped_locked(st, share)
                if 0 < target <= self._plan_budget and self._set_rdy(st, target):
                    st.plan_gen = self._plan_gen
                    self._plan_budget -= target
                    if not self._plan_share:
                        self._plan_slots -= 1
                    return
        self._rdy_soon_locked()

    def _removed_locked(self, st: _ConnState) -> None:
        """*st* left the connection set: what it used is free; a full pass only if that changes a share."""
        if self._all_zero_locked():
            return
        if self._plan_holds_locked() and st.plan_gen == self._plan_gen:
            freed = st.used(time.monotonic())
            if self._plan_share or st.conn.rdy == 0 or not self._plan_waiting:
                if not self._plan_share:
                    if st.conn.rdy == 0:
                        self._plan_waiting -= 1
                    else:
                        self._plan_slots += 1  # (nobody waits for it)
                self._plan_budget += freed
                return
        self._rdy_soon_locked()

    def _count_changed_locked(self) -> None:
        """Attempts held back for were added or ended: a full pass if that changes the share."""
        if not self._all_zero_locked() and not self._plan_holds_locked():
            self._rdy_soon_locked()

    def _rdy_soon_locked(self) -> None:
        """A full pass: now, or once _PASS_GAP times the last one's duration has passed since
        it began (at most rdy_settle_delay): events in a burst share one."""
        self._plan_valid = False
        due = self._pass_at + min(self.rdy_settle_delay, _PASS_GAP * self._pass_cost)
        if time.monotonic() >= due:
            self._apply_rdy_locked()
        else:
            self._schedule_settle_locked(due)

    # ========================================================== connections
    def _connect(self, address: str, host: str, port: int) -> None:
        """Start a background connection attempt unless connected, connecting or closing."""
        self._connect_many([(address, host, port)])

    def _connect_many(self, targets: Iterable[Tuple[str, str, int]], answer: bool = False) -> None:
        """_connect for each of *targets*, all of them under one hold of the lock: each is
        counted as connecting before any can register (see _first_attempts_locked).

        Each goes to the back of the queue of attempts (unless connected, connecting or
        queued already), which starts them while fewer than max_connect_attempts run.
        *answer*: *targets* are a lookupd answer; queued attempts to discovered nsqd it no
        longer lists are dropped (the nsqd is gone; it is queued again if listed again)."""
        with self._lock:
            if self._closing or not self._started:
                return
            dropped = False
            if answer and self._queued:
                targets = list(targets)
                listed = {address for address, _, _ in targets}
                for address in [a for a in self._queued if a not in listed and a not in self._direct]:
                    self._unqueue_locked(address)
                    dropped = True
            for address, host, port in targets:
                if address in self._conns or address in self._connecting or address in self._queued:
                    continue
                timer = self._reconnect_timers.pop(address, None)
                if timer is not None:
                    timer.cancel()
                first = address not in self._tried
                self._queued[address] = (host, port, first)
                self._queued_first += first
            self._start_queued_locked()
            if dropped:
                self._count_changed_locked()  # (shares held back for them go to the connections there are)

    def _unqueue_locked(self, address: str) -> Tuple[str, int]:
        host, port, first = self._queued.pop(address)
        self._queued_first -= first
        return host, port

    def _start_queued_locked(self) -> None:
        """Start queued attempts, oldest first, while fewer than max_connect_attempts run.

        A task that cannot be started (RuntimeError "can't start new thread") is that attempt
        failing: the address leaves the queue (a direct one gets a reconnect, a discovered one
        comes back with the next lookupd answer listing it, asked sooner: _connect_failed_locked)."""
        limit = self.max_connect_attempts
        failed: List[Tuple[str, BaseException]] = []
        while self._queued and len(self._tasks) < limit and not self._closing:
            address = next(iter(self._queued))
            host, port = self._unqueue_locked(address)  # (never queued while connected or connecting)
            self._connecting[address] = None
            if address not in self._tried:
                self._connecting_first.add(address)
            task_id = next(self._task_ids)
            try:
                self._tasks[task_id] = self._backend.spawn(
                    self._connect_task, task_id, address, host, port, name=f"nsq_sync-{self.name}-connect-{address}"
                )
            except Exception as exc:
                self._not_connecting_locked(address)
                self._attempt_failed_locked(address, exc)
                failed.append((address, exc))
                self._connect_failed_locked(address)
                self._attempt_ended_locked(address)
        if failed:
            address, exc = failed[0]
            logger.warning(
                "%s: could not start %d connection attempt(s), to %s%s: %s: %s; tried again on the next "
                "lookupd answer listing them (nsqd_tcp_addresses: after a reconnect delay)",
                self.name, len(failed), address, f" and {len(failed) - 1} more" if len(failed) > 1 else "",
                type(exc).__name__, exc,
            )  # fmt: skip

    def _not_connecting_locked(self, address: str) -> None:
        self._connecting.pop(address, None)
        self._connecting_first.discard(address)

    def _attempt_ended_locked(self, address: str) -> None:
        """An attempt to *address* ended (or could not start): if it was the first, the share
        held back for it (_first_attempts_locked) goes to the connections there are."""
        if address in self._tried:
            return
        self._tried.add(address)
        if len(self._tried) > 2 * (len(self._conns) + len(self._direct)) + 64:
            # Under churn (new addresses on every deploy) it would only grow: keep
            # the addresses still in use. One forgotten and seen again has its next
            # attempt counted as a first, a share held back for one connect time.
            # (Looked up one by one: the queue may hold thousands of addresses.)
            in_use = (self._conns, self._connecting, self._direct, self._reconnect_timers, self._queued)
            self._tried = {a for a in self._tried if any(a in where for where in in_use)}
        if address not in self._conns:
            # (Registered, it was counted as a connection from then on, not as an attempt:
            # the share did not change. Not registered: one attempt fewer to hold back for.)
            self._count_changed_locked()

    def _connect_task(self, task_id: int, address: str, host: str, port: int) -> None:
        conn: Optional[AsyncConn] = None
        try:
            try:
                conn = AsyncConn(host, port, backend=self._backend, worker_pool=self._pool, **self._conn_kwargs)
                conn.owner = self.name  # (its log lines say which consumer: several may share an nsqd)
                conn.on("message", self._on_message)
                conn._hand_back = self._hand_back
                conn._lost_answers = self._not_answered  # (late answers from enable_async code)
                conn._owned = True  # (_on_conn_close reports the close)
                conn._owner_finished = self._on_finished  # (not a "resume" listener: see _on_message)
                conn.on("backoff", self._on_backoff)
                conn.on("continue", self._on_continue)
                conn.on("close", self._on_conn_close)
                if self._heartbeat_hooked():
                    # (else a heartbeat would start a control worker per Reader to call a
                    # hook that does nothing: 40 idle Readers, 40 threads more)
                    conn.on("heartbeat", self._on_heartbeat)
                with self._lock:
                    if self._closing:
                        return
                    self._connecting[address] = conn
                logger.debug("%s: connecting to %s", self.name, address)
                conn.connect()
                rtt = 0.0
                if not self._closing:
                    sent = time.monotonic()
                    conn.subscribe(self.topic, self.channel)
                    rtt = time.monotonic() - sent  # (how long a lowered RDY is counted: _set_rdy)
            except Exception as exc:
                self._connect_errors[address] = exc
                if conn is not None and conn.connected():
                    conn.close(0)
                announced = None
                with self._lock:
                    self._not_connecting_locked(address)
                    if not self._closing:
                        self._attempt_failed_locked(address, exc)
                        if address not in self._direct:
                            announced = self._listed_by.get(address)
                if not self._closing:
                    if announced is None:
                        logger.warning("%s: cannot consume from %s: %s", self.name, address, exc)
                    else:
                        logger.warning("%s: cannot consume from %s: %s; %s", self.name, address, exc, _announced(announced, exc))
                    self._connect_failed(address)
                return
            with self._lock:
                self._not_connecting_locked(address)
                registered = not self._closing and conn.connected() and address not in self._conns
                if registered:
                    self._register_locked(address, conn, rtt)
            if not registered:
                conn.close(1.0)
                if not self._closing:
                    self._connect_failed(address)
        finally:
            with self._lock:
                self._not_connecting_locked(address)
                self._tasks.pop(task_id, None)
                self._start_queued_locked()  # (this slot is free: the next queued attempt)
                self._attempt_ended_locked(address)

    def _register_locked(self, address: str, conn: AsyncConn, rtt: float = 0.0) -> None:
        st = self._conns[address] = _ConnState(conn, address, rtt)
        self._lookupd_lost.discard(address)
        self._lookupd_hurried.pop(address, None)
        self._direct_failures.pop(address, None)
        self._connect_errors.pop(address, None)
        ended = self._no_producers_end_locked(f"connected to {address}")
        if ended is not None:
            logger.warning(*ended)
        down = self._down.pop(address, None)
        if down is None:
            logger.info("%s: subscribed to %s on %s", self.name, f"{self.topic}/{self.channel}", address)
        else:
            # After a failure said at WARNING (its connection closed, attempts failed): the end
            # is said at that level too, so that a log kept from WARNING up does not end on it.
            took, attempts = time.monotonic() - down.since, down.attempts + 1
            logger.warning(
                "%s: %s %s after %.1f s %s (%d attempt%s); subscribed to %s/%s",
                self.name, "reconnected to" if down.was_connected else "connected to", address, took,
                "down" if down.was_connected else "of failed attempts", attempts, "" if attempts == 1 else "s",
                self.topic, self.channel,
            )  # fmt: skip
        self._added_locked(st)

    def _warn_capped_locked(self, st: _ConnState, share: int) -> None:
        """A connection's share of max_in_flight is over its nsqd's max_rdy_count: said once per
        max_rdy_count value (per address, it came again with every new address under churn)."""
        cap = st.conn.max_rdy_count
        if cap in self._warned_max_rdy:
            return
        self._warned_max_rdy.add(cap)
        logger.warning(
            "%s: %s has max_rdy_count %d, below its share of max_in_flight (%d of %d): RDY is capped there",
            self.name, st.address, cap, share, self._max_in_flight,
        )

    def _connect_failed(self, address: str) -> None:
        with self._lock:
            self._connect_failed_locked(address)

    def _connect_failed_locked(self, address: str) -> None:
        if self._closing:
            return
        if address not in self._direct:
            # lookupd-discovered: it is tried again when lookupd lists it again, asked sooner
            # than the poll interval as after a lost connection (nsqd restarting, or frozen
            # through the handshake, when the Reader first found it): see _lookupd_loop
            if self._lookupds and address not in self._lookupd_lost and self._lookupd_hurry_locked(address):
                self._lookupd_lost.add(address)
                self._lookupd_lost_new = True
                self._lookupd_wake.set()
            return
        attempt = self._direct_failures.get(address, 0) + 1
        self._direct_failures[address] = attempt
        self._schedule_reconnect_locked(address, attempt)

    def _went_down_locked(self, address: str, error: Optional[str]) -> None:
        """The connection to *address* closed (warned about): down from now until connected again."""
        self._down.pop(address, None)
        down = self._down[address] = _Down(was_connected=True)
        down.last_error = error
        self._forget_oldest_down_locked()

    def _attempt_failed_locked(self, address: str, exc: BaseException) -> _Down:
        """An attempt to connect to *address* failed (warned about): counted in its _Down."""
        down = self._down.get(address)
        if down is None:
            down = self._down[address] = _Down(was_connected=False)
            self._forget_oldest_down_locked()
        down.attempts += 1
        down.last_error = str(exc) or type(exc).__name__
        down.listed = True  # (a discovered nsqd is tried when an answer lists it)
        return down

    def _forget_oldest_down_locked(self) -> None:
        """Bounded like the answers it comes from: past MAX_LOOKUPD_PRODUCERS, the oldest
        discovered one goes. A direct nsqd's record stays (stats() shows since when and why
        it is down): there are only as many of those as nsqd_tcp_addresses."""
        if len(self._down) > MAX_LOOKUPD_PRODUCERS:
            direct = self._direct
            for address in self._down:
                if address not in direct:
                    del self._down[address]
                    return

    def _schedule_reconnect_locked(self, address: str, attempt: int) -> None:
        delay = exponential_delay(attempt, self.reconnect_base, self.reconnect_cap, rand=self._random.random)
        old = self._reconnect_timers.get(address)
        if old is not None:
            old.cancel()
        self._reconnect_timers[address] = self._scheduler.call_later(delay, self._reconnect, address)
        logger.info("%s: reconnecting to %s in %.2fs (attempt %d)", self.name, address, delay, attempt)

    def _reconnect(self, address: str) -> None:
        with self._lock:
            self._reconnect_timers.pop(address, None)
            target = self._direct.get(address)
        if target is not None:
            self._connect(address, *target)

    def _on_conn_close(self, conn: AsyncConn) -> None:
        address = _address_key(conn.host, conn.port)
        with self._lock:
            st = self._conns.get(address)
            if st is None or st.conn is not conn:
                return  # never registered: the connect task handled it
            del self._conns[address]
            for name in _CONN_TOTALS:
                self._gone[name] += getattr(conn, name)
            if self._test_addr == address:
                self._test_addr = None
            if self._closing:
                return
            # (Said before the reconnect it schedules is: under the lock, as that line is.)
            logger.warning("%s: connection to %s closed%s", self.name, address, f": {conn.error}" if conn.error is not None else "")
            self._went_down_locked(address, None if conn.error is None else str(conn.error))
            self._removed_locked(st)
            if address in self._direct:
                attempt = self._direct_failures.get(address, 0) + 1
                self._direct_failures[address] = attempt
                self._schedule_reconnect_locked(address, attempt)
            elif self._lookupds:
                # discovered: it comes back only through a lookupd answer listing it, and
                # right after the close it is usually not listed yet (nsqd restarting, or
                # a deleted topic not re-created): see _lookupd_loop
                self._lookupd_lost.add(address)
                self._lookupd_lost_new = True
                self._lookupd_hurry_locked(address)
        if self._lookupds:
            self._lookupd_wake.set()  # re-query early: it may be back, or gone for good

    def _lookupd_hurry_locked(self, address: str) -> bool:
        """Mark *address* (discovered) as having started the lost-nsqd schedule since it was
        last connected; False if it had already: a failed attempt to it then starts nothing
        (an nsqd listed but unreachable, or refusing, is not a reason to poll every second).
        Bounded: past MAX_LOOKUPD_PRODUCERS addresses the oldest is forgotten."""
        if address in self._lookupd_hurried:
            return False
        self._lookupd_hurried[address] = None
        if len(self._lookupd_hurried) > MAX_LOOKUPD_PRODUCERS:
            del self._lookupd_hurried[next(iter(self._lookupd_hurried))]
        return True

    def _on_heartbeat(self, conn: AsyncConn) -> None:
        self.heartbeat(conn)

    def _heartbeat_hooked(self) -> bool:
        """heartbeat() does something: a subclass's, or one set on the instance."""
        return type(self).heartbeat is not Reader.heartbeat or "heartbeat" in vars(self)

    # ============================================================ discovery
    def _lookupd_loop(self) -> None:
        min_gap = min(1.0, self.lookupd_poll_interval)
        last = float("-inf")
        woken = False  # the last wait ended early (a connection closed), not by its delay
        failed = 0  # polls in a row in which no lookupd answered (or, after those, none listed an nsqd)
        lost = 0  # polls since a discovered nsqd's connection closed, while one is not back
        while not self._closing:
            gap = time.monotonic() - last
            if woken and gap < min_gap and self._stop_event.wait(min_gap - gap):
                break  # an early re-query right after a poll waits a little; close() wakes us
            self._lookupd_wake.clear()
            last = time.monotonic()
            with self._lock:
                answers, found = self._lookupd_answers, self._lookupd_found
                new_loss, self._lookupd_lost_new = self._lookupd_lost_new, False
            try:
                self.query_lookupd()
            except Exception:
                logger.exception("%s: lookupd query crashed", self.name)
            if self._closing:
                break
            with self._lock:
                answered, listed = self._lookupd_answers != answers, self._lookupd_found != found
                lost = self._lookupd_lost_step(lost, new_loss)
                waiting = self._describe_lost_locked() if lost and logger.isEnabledFor(logging.DEBUG) else ""
            # An nsqlookupd back from an outage knows no nsqd until they register again (at
            # their next ping, up to 15 s later): its first answers list none, so after failed
            # polls, an answer listing no nsqd does not end the quicker schedule.
            failed = 0 if listed or (answered and not failed) else failed + 1
            delay = self._lookupd_delay(min(failed, lost) if failed and lost else failed or lost)
            if failed:
                logger.debug("%s: no lookupd answered or listed an nsqd (%d polls in a row since a failure); asking again in %.1f s", self.name, failed, delay)
            elif lost:
                logger.debug("%s: still not connected: %s (%d polls since); asking lookupd again in %.1f s", self.name, waiting, lost, delay)
            woken = self._lookupd_wake.wait(delay)

    def _lookupd_lost_step(self, lost: int, new_loss: bool) -> int:
        """The lost-nsqd schedule's step after a poll (0: none), under _lock.

        A discovered nsqd whose connection closed comes back only through a lookupd answer
        listing it, and the poll a close triggers comes too early: a restarting nsqd is
        down or not registered yet (it registers as it starts), a deleted topic is listed
        again only once something re-creates it. So while one is not connected again,
        lookupd is asked again after 1, 2, 4 ... s like after a failed poll; one schedule
        for every loss (a loss since the last poll restarts it), given up when the delay
        would reach the poll interval (an nsqd gone for good costs a few more queries)."""
        if not self._lookupd_lost:
            return 0
        lost = 1 if new_loss else lost + 1
        if self.lookupd_retry_base * 2.0 ** min(lost - 1, 40) >= self.lookupd_poll_interval:
            if logger.isEnabledFor(logging.DEBUG):
                # (An nsqd this poll's answer lists is being connected to as this is said: the
                # line says so, rather than that lookupd has not listed it again.)
                logger.debug(
                    "%s: back to polling lookupd every %.1f s (%d polls since the loss or failure); still not connected: %s",
                    self.name, self.lookupd_poll_interval, lost, self._describe_lost_locked(),
                )  # fmt: skip
            self._lookupd_lost.clear()
            return 0
        return lost

    def _describe_lost_locked(self, most: int = 5) -> str:
        """The nsqd of the lost-nsqd schedule, for its DEBUG lines: each one's connection lost,
        or never made since it was first tried, and whether the latest answer lists it (an
        attempt under way, or failing) or not. The first *most* of them."""
        parts = []
        for address in sorted(self._lookupd_lost)[:most]:
            down = self._down.get(address)
            what = "" if down is None else "connection lost; " if down.was_connected else "not connected yet; "
            if address in self._connecting or address in self._queued:
                where = "listed, connecting"
            elif address in self._listed_by:
                where = "listed, its attempts failing"
            else:
                where = "not listed"
            parts.append(f"{address} ({what}{where})")
        more = len(self._lookupd_lost) - most
        return ", ".join(parts) + (f" and {more} more" if more > 0 else "")

    def _lookupd_delay(self, failed: int) -> float:
        """Seconds until the next poll after *failed* polls in a row in which no lookupd answered
        (or, after such polls, none listed an nsqd), or *failed* polls since a lost nsqd
        (_lookupd_lost_step); 0: the whole interval."""
        interval = self.lookupd_poll_interval
        if failed:
            # 1, 2, 4, ... s: a lookupd that was down (starting after its consumers) is found
            # again within about as long as it was down, not a whole interval later.
            interval = min(interval, self.lookupd_retry_base * 2.0 ** min(failed - 1, 40))
        return interval * (1.0 + self.lookupd_poll_jitter * self._random.random())

    # ============================================================= shutdown
    def _cancel_timers_locked(self) -> None:
        for timer in [self._window_timer, self._settle_timer, self._tick_timer, *self._reconnect_timers.values()]:
            if timer is not None:
                timer.cancel()
        self._reconnect_timers.clear()
        # Queued attempts never start now (close() waits only for those in progress).
        self._queued.clear()
        self._queued_first = 0

    def _in_own_task(self) -> bool:
        if self._pool.in_worker():
            return True
        backend = self._backend
        return any(
            task is not None and _is_current(backend, task) for task in (self._scheduler.task, self._lookupd_task)
        )

    def _shutdown(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        try:
            with self._lock:
                conns = [st.conn for st in self._conns.values()]
            # Connections still in their handshake are closed by their own connect task
            # (bounded by the connection timeout), which sees the Reader closing.
            # CLS -> CLOSE_WAIT -> in-flight answered -> close, on every connection in parallel.
            closers = []
            inline = []
            for conn in conns:
                try:
                    closers.append(self._backend.spawn(self._close_conn, conn, timeout, name=f"nsq_sync-{self.name}-close-{conn.id}"))
                except RuntimeError:
                    # CPython 3.12.0-3.12.1 start no thread once the interpreter is finalizing,
                    # where the atexit hook closes Readers: close here, one after another.
                    inline.append(conn)
            for conn in inline:
                self._close_conn(conn, remaining())
            # One second of grace past the timeout for all of them together, not each: joined one
            # after another, every connection attempt stuck in its handshake added up to 1 s
            # (close(0.5) took 4.5 s with 4 of them, in a chaos review).
            def graced() -> float:
                return max(0.0, deadline + 1.0 - time.monotonic())

            for task in closers:
                task.join(graced())
            with self._lock:
                tasks = list(self._tasks.values())
            for task in tasks:
                task.join(graced())
            self._pool.close(wait=True, timeout=max(0.1, remaining()))
            self._scheduler.join(max(0.1, remaining()))
            if self._lookupd_task is not None:
                # Within close()'s own timeout: a request to a hung nsqlookupd cannot be cut
                # short, and a close(timeout) that waited for it took up to its timeout more
                # (10 s). Its thread ends when the request does; the answer is ignored.
                self._lookupd_task.join(max(0.1, remaining()))
            leftover = [st.conn.id for st in self._conns.values()] if self._conns else []
            if leftover:
                logger.debug("%s: connections still registered after close: %s", self.name, leftover)
            logger.info("%s: closed", self.name)
        finally:
            self._closed_event.set()

    def _close_conn(self, conn: AsyncConn, timeout: float) -> None:
        try:
            conn.close(timeout)
        except Exception:
            logger.exception("%s: closing %s failed", self.name, conn.id)

    # =============================================================== signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        # A signal handler must not take locks: set a flag and poke the socket run() waits on.
        self._signalled = signum
        self._poke_run()

    def _poke_run(self) -> None:
        waker = self._run_waker
        if waker is not None:
            try:
                waker.send(b"\0")
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<Reader {self.name} conns={len(self._conns)} max_in_flight={self._max_in_flight} level={self._level}>"

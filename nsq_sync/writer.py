"""Writer: publish that blocks until nsqd answers OK, from any thread, across several nsqd.

Each nsqd address has a node task that connects, waits while the connection
lives, and reconnects with exponential backoff and jitter after it closes.
Publishing picks a connected node round-robin; answers are matched in order
per connection (AsyncConn.request), so many threads pipeline on one socket.
A publish is reported OK only when nsqd said OK; when a connection goes, every
publish still waiting on it fails with ConnectionClosedError (or is re-sent on
another node when ``retries`` allows).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import sys
import time
import weakref
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union, overload

from .addresses import Addresses, address_key, parse_addresses
from .backends import Backend, gevent_patched, get_backend
from .backoff import exponential_delay
from .conn import AsyncConn
from .dispatch import WorkerPool, call_refusal
from .errors import (
    AuthFailedError,
    AuthRequiredError,
    ClosedError,
    Error,
    ConfigError,
    ConnectionClosedError,
    HandshakeRefusedError,
    DPubFailedError,
    MPubFailedError,
    NoConnectionsError,
    ProtocolError,
    PubFailedError,
    SendError,
    ServerError,
    TimeoutError,
    TLSError,
)
from .lifecycle import forget_parents_in_child, register, uwsgi_state
from .lightfuture import LightFuture
from .protocol import commands
from .protocol.commands import MAX_BODY_SIZE as _MAX_BODY_SIZE, MessageBody, _PUB_HEADS as _pub_heads, _pack_size
from .protocol.identify import check_number, check_timeout

__all__ = ["Writer"]

logger = logging.getLogger(__name__)

Callback = Callable[[Optional[AsyncConn], Any], Any]
#: what mpub() takes: an iterable of bodies, or one bytes-like body (a list of one, as pynsq's
#: Writer.mpub; a str is refused at run time, which no annotation can say: it is an Iterable[str])
MessageBodies = Union[Iterable[MessageBody], bytes, bytearray, memoryview]
_RETRYABLE = (ConnectionClosedError, SendError)
#: nsqd's answers to a publish it did not store (nsqd v1.3.0, protocol_v2.go: Topic.PutMessage
#: or PutMessages failed, because the topic is exiting, deleted or nsqd shutting down, or its
#: backend write failed, a full disk). Fatal: nsqd closes the connection. The message is safe
#: to send to another nsqd (an MPUB whose disk write failed part way may have stored the
#: messages before that one: at-least-once, as for any retry). Not E_BAD_TOPIC, E_BAD_MESSAGE
#: or E_BAD_BODY: the publish itself is wrong, and another nsqd would refuse it too.
_NOT_STORED = (PubFailedError, MPubFailedError, DPubFailedError)
#: seconds an nsqd that answered one of _NOT_STORED is passed over while another is connected
PASS_OVER_SECONDS = 1.0
#: a node's reconnect after a fatal error frame is logged as a warning at most this often
#: (the others at debug, counted in the next warning): a full disk closes one connection per publish
FATAL_CLOSE_WARN_SECONDS = 30.0
#: a node waiting out its reconnect delay tries again when a publish waits for a connection
#: (see Writer._hurry), but no sooner than this after its previous attempt began
HURRY_GAP_SECONDS = 0.5
#: while an nsqd stays unreachable, a warning says so at most this often (the first failed
#: attempt of an outage is a warning; the attempts in between are logged at debug)
STILL_DOWN_WARN_SECONDS = 60.0
#: entries in a deadline queue (FIFO or heap) before the answered ones anywhere in it are swept
#: out (one unanswered publish at the head holds the rest); the next sweep waits for twice as many
_SWEEP_AT = 4096
#: how many async publishes are kept before the answered ones at the head are let go
_FIFO_YOUNG = 128


_live_writers: "weakref.WeakSet[Writer]" = weakref.WeakSet()

#: this process's id, kept current by the at-fork hook below (os.getpid() is a system call
#: and every publish compares it); where there is no register_at_fork there is no fork either
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


forget_parents_in_child(_live_writers, first=_update_pid)


def _body_size(data: bytes) -> int:
    """Bytes after a command's line and 4-byte size prefix (PUB/MPUB/DPUB)."""
    return len(data) - data.index(b"\n") - 5


def _settle(future: "Future[Any]", result: Any = None, error: Optional[BaseException] = None) -> bool:
    """Resolve *future* unless something (a timeout, an answer) already did; whether this did."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except futures.InvalidStateError:
        return False
    return True


class _PublishFuture(LightFuture):
    """The Future of an async publish (pub_async(), callback=), made running: its failure
    counts in Writer.stats() once, whoever sets it (the Writer, or the connection for one sent
    directly). A retry's attempt on a connection is another Future (its failure is not the
    publish's)."""

    def __init__(self) -> None:
        super().__init__(running=True)


#: Writer.stats()'s kinds of failed publishes
FAILURE_KINDS = ("timeout", "server_error", "no_connection", "connection_closed", "closed", "other")


def _failure_kind(error: BaseException) -> str:
    """Which of FAILURE_KINDS a publish that failed with *error* counts as."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, NoConnectionsError):  # (a SendError: first)
        return "no_connection"
    if isinstance(error, (ConnectionClosedError, SendError)):
        return "connection_closed"
    if isinstance(error, ServerError):
        return "server_error"
    if isinstance(error, ClosedError):
        return "closed"
    return "other"


#: a lane nobody published on for this long (or half a heartbeat interval, if shorter) is
#: closed; it comes back when threads contend again
LANE_IDLE_SECONDS = 60.0


def _refusal(error: BaseException, authed_before: bool) -> bool:
    """Whether a failed connect() is a refusal that waiting will not fix (see Writer._refused).

    - an error frame in the handshake: nsqd refused this client's settings or credentials
      (E_UNAUTHORIZED: the auth server granted nothing; E_INVALID: nsqd requires TLS before
      AUTH; E_BAD_BODY: an IDENTIFY setting out of nsqd's range). E_AUTH_FAILED only if
      nsqd never accepted this Writer's secret: nsqd v1.3.0 answers the same bytes, "E_AUTH_FAILED
      AUTH failed", for a secret its auth server refused and for an auth server it could not
      reach or that failed (it logs the reason and keeps it from the client). On first contact
      a wrong secret is the likely reading; once the secret was accepted, an outage is, and a
      publish then waits for the auth server to come back, as before;
    - AuthRequiredError: nsqd requires AUTH and no secret was given;
    - a TLSError of this client's own making (TLS asked for and nsqd offers none) or from
      OpenSSL refusing the handshake: nsqd's certificate not trusted or not for this host, an
      alert (nsqd wants a client certificate). Not one caused by the network (a timeout, a
      reset, an EOF in the middle of the handshake): those may pass;
    - a ProtocolError: the peer answered the handshake with bytes that are not NSQ's protocol
      (an HTTP response from nsqd's HTTP port, nsqlookupd's unframed E_BAD_PROTOCOL, another
      service's banner, a frame type or size nsqd never sends, an IDENTIFY or AUTH answer that
      is not the JSON nsqd sends; a close on IDENTIFY by a peer that answers TLS, as nsqd's
      HTTPS port closes: see AsyncConn._tls_port): the address is not nsqd's TCP port, or what
      listens there is not nsqd. The network does not make these: what it breaks ends the
      handshake with a timeout (ConnectError) or a close (ConnectionClosedError), which may pass.
    """
    if isinstance(error, AuthFailedError):
        return not authed_before
    if isinstance(error, (ServerError, AuthRequiredError, ProtocolError)):
        return True
    if isinstance(error, TLSError):
        cause = error.__cause__
        if cause is None:
            return True
        ssl = sys.modules.get("ssl")
        return (
            ssl is not None
            and isinstance(cause, ssl.SSLError)
            and not isinstance(cause, (ssl.SSLEOFError, ssl.SSLSyscallError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError))
        )
    return False


def _why_refused(refusals: Sequence[Optional[BaseException]]) -> str:
    """Why every nsqd refused (each of *refusals* one for which _refusal is true), in words."""
    not_nsq = [isinstance(refused, ProtocolError) for refused in refusals]
    if all(not_nsq):
        return "every address answered the connection's handshake with something other than NSQ's protocol (is each one an nsqd TCP port?)"
    if any(not_nsq):
        return ("the handshake with every nsqd was refused (credentials or TLS, by nsqd or by this client: an untrusted "
                "certificate) or answered with something other than NSQ's protocol")
    return "the handshake with every nsqd was refused (credentials or TLS, by nsqd or by this client: an untrusted certificate)"


class _Node:
    __slots__ = (
        "host", "port", "conn", "task", "attempts", "last_error", "refused", "authed", "started", "ended", "lanes", "free", "growing", "grow_after",
        "pass_until", "warned_at", "quiet_closes", "wake", "tried_at", "down_since", "down_at", "failures", "down_warned_at",
        "ever_connected",
    )

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.conn: Optional[AsyncConn] = None
        self.task: Any = None
        self.attempts = 0
        self.last_error: Optional[BaseException] = None
        #: the error of the latest attempt to connect if it was a refusal (see _refusal); None
        #: before the first attempt ends, once one succeeds, or after a failure that may pass
        self.refused: Optional[BaseException] = None
        #: nsqd accepted this Writer's AUTH secret on a connection before
        self.authed = False
        #: attempts to connect begun, and ended (whatever the outcome; counted after refused
        #: is set): which attempts a wait_connected() may end early on (see there)
        self.started = 0
        self.ended = 0
        #: extra connections for blocking publishes that would otherwise wait for another
        #: thread's read (see Writer._lane): all of them (replaced, never changed in place)...
        self.lanes: List[AsyncConn] = []
        #: ...and the ones no publish holds (a stack: list.pop and append are atomic)
        self.free: List[AsyncConn] = []
        #: lanes being opened
        self.growing = 0
        self.grow_after = 0.0
        #: time.monotonic() until which _pick passes this node over (it answered a publish
        #: with one of _NOT_STORED), 0.0 if never
        self.pass_until = 0.0
        #: when a close after a fatal error frame was last logged as a warning, and how many
        #: were logged at debug since (see FATAL_CLOSE_WARN_SECONDS)
        self.warned_at: Optional[float] = None
        self.quiet_closes = 0
        #: set to end the node task's reconnect delay early, or the next one (Writer._hurry,
        #: close()); made by Writer._start with the backend's event
        self.wake: Any = None
        #: when the node task's latest attempt to connect began
        self.tried_at = 0.0
        #: since when it has had no connection (time.time(), and time.monotonic() for durations):
        #: its connection closed, or its first attempt to connect failed; None while connected
        #: (or before the first attempt ends)
        self.down_since: Optional[float] = None
        self.down_at = 0.0
        #: attempts to connect that failed since it was last connected (or since the start)
        self.failures = 0
        #: when the latest warning that it cannot be reached was logged (time.monotonic()), None
        #: when none was in this outage (see Writer._log_failed_attempt)
        self.down_warned_at: Optional[float] = None
        #: it was connected once: back after an outage, it is "reconnected"
        self.ever_connected = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _conn_params() -> frozenset:
    """AsyncConn's keyword parameters (from its code object: inspect is a costly import)."""
    code = AsyncConn.__init__.__code__
    return frozenset(code.co_varnames[3 : code.co_argcount + code.co_kwonlyargcount])  # (after self, host, port)


class Writer:
    """A producer over one or more nsqd.

    :param nsqd_tcp_addresses: "host:port", a (host, port) pair (int port), or a list or tuple of
        them; a tuple of strings is several addresses
    :param publish_timeout: default seconds a blocking publish waits (for a connection and the answer)
    :param retries: how many times a publish is re-sent on another node when its connection
        broke, or when nsqd answered that it did not store it (E_PUB_FAILED, E_MPUB_FAILED,
        E_DPUB_FAILED; never one nsqd refused as wrong, E_BAD_*). A re-sent message may be
        published twice if the first connection died after nsqd took it: at-least-once.
    :param max_msg_size: bytes; a bigger message is refused locally with ConfigError (nsqd's
        --max-msg-size, default 1 MiB; None skips the check). nsqd's own refusal is fatal and
        takes every publish pipelined behind it on the connection down with it.
    :param max_body_size: bytes; the same for a whole MPUB body (nsqd's --max-body-size, 5 MiB)
    :param reconnect_interval: first reconnect delay in seconds; doubles up to ``max_reconnect_interval``
    :param concurrency: workers of the messages lane of the Writer's pool; publish callbacks run
        on its control lane (one worker, in order), so this does not change how they run
    :param max_connections_per_nsqd: connections a Writer may open to one nsqd (1..64). The first
        carries every publish as long as the calling thread finds it free; when another thread's
        blocking publish is using it, extra connections (*lanes*) open, so a blocking publish
        reads its own answer instead of waiting for another thread to hand it over (the cost that
        bounds many threads on one connection). Lanes open while threads contend (no more than
        the threads publishing at that moment), blocking publishes take a free one first, and
        they close after half a heartbeat interval unused (at most a minute). Async publishes
        stay on the first connection (one order on the wire). Set it to at least the number of
        threads that publish at the same time: those beyond it wait for hand-offs again (with 8
        threads, 4 connections were no faster than 1). 1 turns lanes off. Thread backend, plain or compressed TCP only: greenlets
        hand answers over cheaply, and TLS has no kernel-timed reads.
    :param backend: "thread", "gevent" or None (auto)
    :param conn_kwargs: passed to every :class:`AsyncConn` (timeout, tls_v1, snappy, auth_secret, ...)

    Raises ConfigError for a bad address or parameter, TypeError for an unknown keyword.
    """

    def __init__(
        self,
        nsqd_tcp_addresses: Addresses,
        *,
        publish_timeout: float = 10.0,
        retries: int = 0,
        max_msg_size: Optional[int] = 1024 * 1024,
        max_body_size: Optional[int] = 5 * 1024 * 1024,
        reconnect_interval: float = 1.0,
        max_reconnect_interval: float = 60.0,
        concurrency: int = 1,
        max_connections_per_nsqd: int = 16,
        name: Optional[str] = None,
        backend: Union[None, str, Backend] = None,
        **conn_kwargs: Any,
    ) -> None:
        # Keywords first, as Python itself reports an unknown one before the call runs (a
        # misspelled keyword is named as such, whatever else is wrong).
        if "worker_pool" in conn_kwargs:
            raise TypeError("Writer() manages its own worker_pool")
        unknown = sorted(set(conn_kwargs) - _conn_params())
        if unknown:
            # (AsyncConn would name itself: the caller wrote Writer(...))
            raise TypeError(f"Writer() got unexpected keyword argument(s) {', '.join(map(repr, unknown))} (not AsyncConn parameters either)")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError("name", name, "must be a non-empty string")
        addresses = parse_addresses(nsqd_tcp_addresses)
        if not addresses:
            raise ConfigError("nsqd_tcp_addresses", nsqd_tcp_addresses, "needs at least one address")
        check_number("publish_timeout", publish_timeout, 0.001, 86400)
        check_number("retries", retries, 0, 1000, integer=True)
        for param, value in (("max_msg_size", max_msg_size), ("max_body_size", max_body_size)):
            if value is not None:
                check_number(param, value, 1, 2**31 - 1, integer=True)
        check_number("reconnect_interval", reconnect_interval, 0.001, 3600)
        check_number("max_reconnect_interval", max_reconnect_interval, 0.001, 3600)
        check_number("max_connections_per_nsqd", max_connections_per_nsqd, 1, 64, integer=True)
        # Validate every connection parameter now (raises TypeError/ConfigError), not in a background task.
        AsyncConn(addresses[0][0], addresses[0][1], backend=backend, **conn_kwargs)
        self.name = name or "nsq_sync.Writer"
        #: what log lines start with: the name given, else nothing (the logger's name,
        #: nsq_sync.writer, says it already, and each line names the nsqd it is about)
        self._log_prefix = f"{name}: " if name else ""
        self.publish_timeout = float(publish_timeout)
        self.retries = retries
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size
        self.reconnect_interval = float(reconnect_interval)
        self.max_reconnect_interval = float(max_reconnect_interval)
        self.concurrency = concurrency
        self.max_connections_per_nsqd = max_connections_per_nsqd
        self._conn_kwargs = conn_kwargs
        self.backend = get_backend(backend)
        self._backend_choice = backend  # None: chosen again after a fork (see _after_fork)
        self._addresses = addresses
        #: the nsqd addresses as "host:port" (pynsq's attribute; changing it changes nothing)
        self.nsqd_tcp_addresses = [address_key(host, port) for host, port in addresses]
        self._closed = False
        # uWSGI forks in C (see lifecycle.uwsgi_state): no at-fork hook updates _pid there, so
        # a Writer reads the process id on every use; and one made in the master starts
        # nothing (no thread of ours there at the fork) until its first use, in the worker.
        self._uwsgi, defer = uwsgi_state()
        self._start_locks: Dict[int, Any] = {}  # per process id (see _check_pid)
        #: a blocking publish checks whether gevent patched the process after this Writer
        #: chose threads, and warns once (see _warn_patched_late); False once warned, or when
        #: the backend was not chosen automatically as threads
        self._check_late_patch = backend is None and self.backend.name == "thread"
        self._start(defer)
        register(self)
        _live_writers.add(self)

    # ------------------------------------------------------------- lifecycle
    def _start(self, defer: bool = False) -> None:
        backend = self.backend
        self._lock = backend.lock()
        self._changed = backend.event()  # set whenever a node connects (wakes publishers waiting)
        # Set, and replaced by a fresh one, whenever a node's attempt to connect ends (connected,
        # failed or refused): a publish waiting for a connection takes the current one before
        # it looks at the nodes, and wakes for the outcome of the attempts under way.
        self._attempted = backend.event()
        self._stopping = backend.event()
        self._idle = backend.event()  # set when close() waits and nothing is outstanding
        self._draining = False
        # One entry per publish under way (blocking, or a submit not yet in the deadline
        # queues): list.append and pop are atomic, so publishers count themselves without a
        # lock, which 8 threads publishing would contend for. close() waits for it to empty.
        self._calls: List[None] = []
        self._rr = 0
        # Writer.stats(): failed publishes by kind (under _stats_lock: failures are rare), and the
        # answers read on connections that are gone (the live ones count their own)
        self._stats_lock = backend.lock()
        self._failed = dict.fromkeys(FAILURE_KINDS, 0)
        self._gone_answered = 0
        self.pool = WorkerPool(self.concurrency, backend, name=self.name)
        # Lanes (see _lane) spare OS threads the hand-off of an answer read by another
        # thread; greenlets hand over cheaply, and their hub reads every socket anyway.
        self._max_lanes = self.max_connections_per_nsqd - 1 if getattr(backend, "name", "") == "thread" else 0
        self._lane_tasks: List[Any] = []
        self._nodes = [_Node(host, port) for host, port in self._addresses]
        for node in self._nodes:
            node.wake = backend.event()
        # pub()'s fast path (thread backend): the free lanes it takes one from, else the one
        # connection. One nsqd only (several are taken round-robin, by _publish_blocking),
        # and not in uWSGI (whose forks leave _pid stale: see _begin). None: no fast path.
        self._fast_free: Optional[List[AsyncConn]] = (
            self._nodes[0].free if getattr(backend, "name", "") == "thread" and len(self._nodes) == 1 and not self._uwsgi else None
        )
        # Replaced, never changed in place (under the lock): _pick reads it without the lock.
        self._connected: List[AsyncConn] = []
        self._parked: Any = collections.deque()
        # Async publishes until answered or timed out, for the housekeeping task (timeouts) and
        # close() (drain). Deadlines usually come in order (one timeout for all): those go in a
        # FIFO, cheap to add to and to trim; a shorter timeout than the last one's goes in a heap.
        self._fifo: Deque[Tuple[float, Future]] = collections.deque()
        self._fifo_sweep = _SWEEP_AT
        self._deadlines: List[Tuple[float, int, Future]] = []
        self._heap_sweep = _SWEEP_AT
        self._seq = itertools.count()
        self._wake = backend.event()
        self._close_done = backend.event()  # the first close() has finished
        self._housekeeper: Any = None
        #: when the housekeeping task looks next anyway: an earlier deadline has to wake it
        self._housekeeper_due = float("inf")
        if defer:
            logger.info("%sWriter made in uWSGI's master process; connecting on first use, in the worker", self._log_prefix)
        else:
            for node in self._nodes:
                node.task = backend.spawn(self._node_loop, node, name=f"nsq_sync-writer-{node.address}")
        # Set last: a publisher that sees this process's id (_begin, without a lock) finds
        # everything above in place; until then it waits in _check_pid for this start. 0 (no
        # process's id) when deferred: the first use anywhere starts it.
        self._pid = 0 if defer else os.getpid()

    def _check_pid(self) -> None:
        """Start afresh when this process is not the one that started the connections (a
        forked child, or a Writer whose start was deferred); a closed Writer stays closed."""
        if self._pid == os.getpid():
            return
        # Not self._lock: a forked child may have inherited it held. One lock per process,
        # made in that process (setdefault is atomic): one inherited from the parent may be
        # a real thread lock in a child that gevent has patched since (gunicorn -k gevent
        # --preload), where two greenlets blocking on it would block the whole hub.
        with self._start_locks.setdefault(os.getpid(), self.backend.lock()):
            if self._pid == os.getpid():
                return  # another thread of this process got here first
            if self._closed:
                self._forget_parent()
                return
            self._after_fork()

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's sockets and tasks without touching the parent's connections.

        Runs right after fork (os.register_at_fork) and again, harmlessly, at the child's first use.
        Under gevent the parent's greenlets live on in the child: the stop flag ends their loops and
        closing our copies of the sockets ends their reads, so they never take the parent's answers.
        """
        self._stopping.set()
        self._wake.set()
        for node in self._nodes:
            if node.wake is not None:
                node.wake.set()  # (ends its reconnect delay: it sees _stopping)
            for conn in [node.conn] + node.lanes:
                if conn is not None and conn._stream is not None:
                    conn._stream.close()  # our copy of the fd only; no shutdown, the parent keeps its socket
            node.conn = None
            node.task = None
            node.lanes = []
            node.free = []
            node.growing = 0
        self._lane_tasks = []
        self._fast_free = None
        self._connected = []  # the parent's, which this process cannot use

    def _after_fork(self) -> None:
        if self._backend_choice is None:
            # Chosen again: a worker may have been monkey-patched by gevent after the fork
            # (gunicorn -k gevent --preload), and thread primitives would block its hub.
            self.backend = get_backend(None)
        if self._pid:
            logger.info("%sforked (pid %d); opening fresh connections", self._log_prefix, os.getpid())
        else:
            logger.info("%sfirst use (pid %d); connecting", self._log_prefix, os.getpid())
        self._forget_parent()
        self._start()

    def _new_conn(self, node: _Node) -> AsyncConn:
        """A connection to *node*, not connected yet (the first one, or a lane)."""
        conn = AsyncConn(node.host, node.port, backend=self.backend, worker_pool=self.pool, **self._conn_kwargs)
        conn.unprocessed_handler = self._resend_unprocessed
        conn._request_failed = self._request_failed
        conn.owner = self.name  # (its log lines say which Writer)
        conn._writer_node = node  # type: ignore[attr-defined]
        conn._owned = True  # (_node_loop reports the close)
        # A publish stuck writing to an nsqd that stopped reading fails after about its
        # timeout, not after two heartbeat intervals (floored: a tiny timeout must not close
        # connections over a short pause of a busy nsqd).
        conn._send_stall_limit = max(1.0, self.publish_timeout)
        if type(self).heartbeat is not Writer.heartbeat:
            conn.on("heartbeat", self.heartbeat)  # (a lane's heartbeats too: read by its publishes)
        return conn

    def heartbeat(self, conn: AsyncConn) -> None:
        """Hook called after each heartbeat nsqd sends on *conn* (already answered with NOP);
        override it in a subclass, as with pynsq's Writer, to watch connections."""

    def _node_loop(self, node: _Node) -> None:
        while not self._stopping.is_set():
            conn = self._new_conn(node)
            node.started += 1
            node.tried_at = time.monotonic()
            try:
                conn.connect()
            except Exception as exc:
                node.attempts += 1
                node.last_error = exc
                node.refused = exc if _refusal(exc, node.authed) else None
                node.failures += 1
                if node.down_since is None:
                    node.down_since, node.down_at = time.time(), time.monotonic()
                node.ended += 1
                delay = exponential_delay(node.attempts, self.reconnect_interval, self.max_reconnect_interval)
                self._log_failed_attempt(node, exc, delay)
                self._attempt_ended()
                self._backoff(node, delay)
                continue
            node.attempts = 0
            node.refused = None
            node.ended += 1
            node.wake.clear()  # (a hurry for the attempt that just succeeded)
            if conn.auth_response is not None:
                node.authed = True
            # Checked under the lock close() sets _stopping under: either close() sees this
            # connection in node.conn, or this sees _stopping and closes it here.
            with self._lock:
                stopping = self._stopping.is_set()
                if not stopping:
                    node.conn = conn
                    self._connected = self._connected + [conn]
                    self._changed.set()
            if stopping:
                conn.close()
                break
            self._attempt_ended()
            self._log_connected(node)
            node.failures = 0
            node.down_since = node.down_warned_at = None
            node.ever_connected = True
            conn.wait_closed()
            with self._lock:
                node.conn = None
                self._gone_answered += conn._answered_total
                if conn.error is not None and not self._stopping.is_set():
                    node.last_error = conn.error
                if conn in self._connected:
                    self._connected = [other for other in self._connected if other is not conn]
                if not self._connected:
                    self._changed.clear()
            if not self._stopping.is_set():
                if isinstance(conn.error, ServerError):
                    # nsqd closed it after a fatal error frame for one command (E_BAD_MESSAGE for
                    # a body over its --max-msg-size, ...): it is up and answering, so reconnect
                    # now; waiting out a backoff failed every other thread's publishes meanwhile.
                    # (No loop: such a close takes a command of the caller's each time.)
                    if isinstance(conn.error, _NOT_STORED):
                        self._pass_over(node)  # (the publishes that were queued behind it are re-sent elsewhere)
                    self._log_fatal_close(node, conn.error)
                    continue
                node.attempts += 1
                node.down_since, node.down_at = time.time(), time.monotonic()
                delay = exponential_delay(node.attempts, self.reconnect_interval, self.max_reconnect_interval)
                logger.warning("%sconnection to %s closed (%s); reconnecting in %s", self._log_prefix, node.address, conn.error, self._when_next(node, delay))
                self._backoff(node, delay)

    def _when_next(self, node: _Node, delay: float) -> str:
        """When *node*'s next attempt to connect begins, for a log line: after *delay*, or
        sooner while publishes wait for a connection (see _hurry; not for a refused node)."""
        if node.refused is not None:
            return f"{delay:.1f}s"
        return f"{delay:.1f}s, or every {HURRY_GAP_SECONDS:g}s while publishes wait for a connection"

    def _log_failed_attempt(self, node: _Node, error: BaseException, delay: float) -> None:
        """Log a failed attempt to connect to *node*: a warning for the first of an outage, then
        one at most every STILL_DOWN_WARN_SECONDS saying how long and how many attempts; the
        others at debug. The same whether publishes are waiting (attempts every
        HURRY_GAP_SECONDS) or not (the backoff delay)."""
        now = time.monotonic()
        if node.down_warned_at is None:
            node.down_warned_at = now
            logger.warning("%scannot connect to %s (%s); retrying in %s", self._log_prefix, node.address, error, self._when_next(node, delay))
        elif now - node.down_warned_at >= STILL_DOWN_WARN_SECONDS:
            node.down_warned_at = now
            logger.warning(
                "%sstill cannot connect to %s: down %.0fs, %d failed attempt(s), last error: %s; retrying in %s",
                self._log_prefix, node.address, now - node.down_at, node.failures, error, self._when_next(node, delay),
            )
        else:
            logger.debug("%scannot connect to %s (%s; attempt %d); retrying in %s", self._log_prefix, node.address, error, node.failures, self._when_next(node, delay))

    def _log_connected(self, node: _Node) -> None:
        """Log a connection to *node*: a warning when it ends an outage, which was warned about
        (the close, or the first failed attempt: see _log_failed_attempt), else at info."""
        if node.down_since is None:
            logger.info("%sconnected to %s", self._log_prefix, node.address)
            return
        logger.warning(
            "%s%s %s after %.1fs (%d failed attempt(s))", self._log_prefix, "reconnected to" if node.ever_connected else "connected to",
            node.address, time.monotonic() - node.down_at, node.failures,
        )

    def _backoff(self, node: _Node, delay: float) -> bool:
        """Wait out *node*'s reconnect delay, or less when a publish waiting for a connection
        hurries it (see _hurry): then the next attempt begins HURRY_GAP_SECONDS after the
        previous one did (or when the delay ends, if sooner), or at once. Returns whether it was hurried. close() ends the wait."""
        wake = node.wake
        due = time.monotonic() + delay
        hurried = wake.wait(delay) and not self._stopping.is_set()
        if hurried:
            # (never later than the delay would have ended: a short reconnect_interval)
            gap = min(node.tried_at + HURRY_GAP_SECONDS, due) - time.monotonic()
            if gap > 0:
                self._stopping.wait(gap)
        wake.clear()  # (a hurry from here on is for the next delay)
        return bool(hurried)

    def _hurry(self) -> None:
        """A publish (or wait_connected()) waits for a connection: each node waiting out its
        reconnect delay tries again soon (at most every HURRY_GAP_SECONDS), rather than after
        a delay that has grown, doubling, while nsqd was down. Not a node whose handshake was
        refused (credentials, TLS: waiting for someone to fix that, it keeps its backoff)."""
        for node in self._nodes:
            # (a node not connected: in its delay, or about to begin it; set before it does,
            # the delay ends at once. A node connecting clears it when the attempt succeeds.)
            if node.conn is None and node.refused is None:
                node.wake.set()

    def _log_fatal_close(self, node: _Node, error: BaseException) -> None:
        """Log a close after a fatal error frame: a warning at most every FATAL_CLOSE_WARN_SECONDS
        per node, the others at debug (an nsqd with a full disk closes the connection on every
        publish, and each is reconnected at once)."""
        now = time.monotonic()
        if node.warned_at is not None and now - node.warned_at < FATAL_CLOSE_WARN_SECONDS:
            node.quiet_closes += 1
            logger.debug("%sconnection to %s closed (%s); reconnecting", self._log_prefix, node.address, error)
            return
        more = f" ({node.quiet_closes} more such closes since the last warning)" if node.quiet_closes else ""
        node.warned_at = now
        node.quiet_closes = 0
        logger.warning("%sconnection to %s closed (%s); reconnecting%s", self._log_prefix, node.address, error, more)

    @staticmethod
    def _pass_over(node: _Node) -> None:
        """*node* answered a publish with one of _NOT_STORED: _pick passes it over for a while,
        as long as another nsqd is connected."""
        node.pass_until = time.monotonic() + PASS_OVER_SECONDS

    def _not_stored_retry(self, conn: AsyncConn, retries: int, deadline: float) -> bool:
        """A publish on *conn* was answered with one of _NOT_STORED: its nsqd is passed over,
        and whether the publish goes to another nsqd (retries left, time left, and another
        nsqd connected)."""
        node = conn._writer_node  # type: ignore[attr-defined]
        self._pass_over(node)
        return retries > 0 and time.monotonic() < deadline and any(
            other._writer_node is not node and other.state == "CONNECTED" for other in self._connected  # type: ignore[attr-defined]
        )

    def _attempt_ended(self) -> None:
        """A node's attempt to connect ended (its state is updated): wake the publishes waiting
        for a connection (see _attempted), and the housekeeping task (parked publishes)."""
        with self._lock:
            attempted, self._attempted = self._attempted, self.backend.event()
        attempted.set()
        self._wake.set()

    def _refused(self) -> Optional[HandshakeRefusedError]:
        """The error a publish waiting for a connection fails with at once, or None to wait on.

        Only when the latest attempt to connect to every nsqd ended in a refusal (see _refusal):
        a Writer still making its first attempts, an nsqd connected, one reconnecting after a
        success (whose latest attempt succeeded), or one that is merely unreachable or slow
        (may come up) each keep the publish waiting, up to its timeout, as before. The nodes
        go on trying in the background with their backoff: a connection that succeeds ends
        the refusal. Reads the nodes without the lock (each attribute read is atomic).
        """
        first = self._refusal_cause()
        if first is None:
            return None
        why = _why_refused([node.refused for node in self._nodes])
        error = HandshakeRefusedError(
            f"no connection to any of {[n.address for n in self._nodes]}: {why}, so this publish does not wait; "
            f"{self.name} keeps reconnecting in the background" + self._last_errors()
        )
        error.__cause__ = first
        error.__suppress_context__ = True
        return error

    def _refusal_cause(self) -> Optional[BaseException]:
        """The first node's refusal when every node's latest attempt was refused, else None."""
        first: Optional[BaseException] = None
        for node in self._nodes:
            refused = node.refused
            if refused is None:
                return None
            if first is None:
                first = refused
        return first

    def _fail(self, future: "Future[Any]", error: BaseException) -> None:
        """Fail *future* with *error* unless it is done already; counted when it is a publish's."""
        if _settle(future, error=error) and future.__class__ is _PublishFuture:
            self._count_failure(error)

    def _request_failed(self, waiter: Any, error: BaseException) -> None:
        """A connection failed a request (see AsyncConn._request_failed): counted when it is an
        async publish sent directly (a blocking one counts where it raises, a retry's attempt
        where its publish fails)."""
        if waiter.__class__ is _PublishFuture:
            self._count_failure(error)

    def _count_failure(self, error: BaseException) -> None:
        kind = _failure_kind(error)
        with self._stats_lock:
            self._failed[kind] += 1

    def stats(self) -> Dict[str, Any]:
        """Counters and the state of each nsqd, for monitoring (see docs/writer.md).

        ``published``: nsqd's OK answers to this Writer's publishes (one per PUB, MPUB or DPUB,
        late ones to publishes that had timed out included); ``failed``: the publishes that
        failed, blocking and async, by kind (``timeout``, ``server_error``, ``no_connection``,
        ``connection_closed``, ``closed``, ``other``); ``closed``; ``connections``: one dict per
        nsqd address with ``address``, ``connected``, ``down_since`` (time.time() since when it
        has had no connection, None while connected), ``failed_attempts`` (attempts to connect
        that failed since it was last connected), ``last_error`` (the latest connect failure or
        connection error, as a string, kept after a success; None if none) and ``lanes`` (extra
        connections open, see max_connections_per_nsqd). Counts start at 0 in each process.
        """
        with self._lock:
            published = self._gone_answered
            connections = []
            for node in self._nodes:
                conn = node.conn
                published += sum(other._answered_total for other in ([conn] if conn is not None else []) + node.lanes)
                error = node.last_error
                connections.append({
                    "address": node.address,
                    "connected": conn is not None and conn.connected(),
                    "down_since": node.down_since,
                    "failed_attempts": node.failures,
                    "last_error": None if error is None else f"{type(error).__name__}: {error}",
                    "lanes": len(node.lanes),
                })
        with self._stats_lock:
            failed = dict(self._failed)
        return {"name": self.name, "published": published, "failed": failed, "closed": self._closed, "connections": connections}

    @property
    def conns(self) -> Dict[str, AsyncConn]:
        """The connected AsyncConns by "host:port" (pynsq's attribute)."""
        with self._lock:
            return {conn.id: conn for conn in self._connected}

    def wait_connected(self, timeout: Optional[float] = None, count: int = 1) -> bool:
        """Block until at least *count* nodes are connected; False on timeout.

        With a *timeout*, False before it too, as soon as every nsqd refused an attempt to
        connect made during the wait (see _refused: credentials, TLS, not NSQ's protocol), as
        a publish raises HandshakeRefusedError: waiting would not help. An nsqd already
        refused when the wait begins is given its next attempt, so after fixing the cause a
        wait_connected() waits for that attempt. Without a timeout it waits until connected.

        *timeout*: seconds (0..86400) or None (no limit). *count*: int from 1 to the number of
        nsqd addresses. Raises ConfigError/TypeError naming the parameter for anything else,
        ClosedError once the Writer is closed (before or during the wait).
        """
        if timeout is not None:
            check_timeout(timeout)
        nodes = len(self._nodes)
        try:
            check_number("count", count, 1, nodes, integer=True)
        except ConfigError:
            raise ConfigError("count", count, f"must be from 1 to {nodes} (the number of nsqd addresses this Writer has)") from None
        self._check_pid()  # (a forked child's or a deferred Writer's connections start now)
        deadline = None if timeout is None else time.monotonic() + timeout
        # Per node, the attempt whose refusal counts (its number in node.ended): the one under
        # way or next, or, for a node refused already, the first to begin after this point (one
        # under way may have been refused before the cause was fixed). Read in this order: a
        # failed attempt sets refused before it counts itself ended.
        watched = self._nodes
        counted: List[int] = []
        for node in watched:
            ended = node.ended
            counted.append(node.started + 1 if node.refused is not None else ended + 1)
        while True:
            # (taken before looking: an attempt that ends after this sets it. Not _changed,
            # which stays set while any node is connected: with fewer than *count*, a wait on
            # it returned at once, and this loop spun on a CPU until the timeout.)
            attempted = self._attempted
            if self._stopping.is_set():
                raise ClosedError(f"{self.name} is closed")  # (it would never connect again)
            with self._lock:
                if sum(1 for conn in self._connected if conn.connected()) >= count:
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if deadline is not None and all(node.ended >= first and node.refused is not None for node, first in zip(watched, counted)):
                return False  # every nsqd refused an attempt made during the wait
            self._hurry()
            # (at most 50 ms: a close() does not set it)
            attempted.wait(0.05 if remaining is None else min(remaining, 0.05))

    def close(self, timeout: Optional[float] = None) -> None:
        """Wait for pending publishes (up to *timeout*, default publish_timeout), then close every connection.

        Publishing afterwards raises ClosedError. Idempotent. Raises ConfigError (TypeError for a
        non-number) naming ``timeout`` for a bad *timeout*, before closing anything.
        """
        if timeout is None:
            timeout = self.publish_timeout
        check_timeout(timeout)
        if self._pid != os.getpid():
            # Forked and never used here: nothing of ours to drain, and the sockets are the parent's.
            self._forget_parent()
            self._closed = True
            self._stopping = self.backend.event()
            self._stopping.set()
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            already = self._closed
            self._closed = True
            self._draining = True
        # After _draining is set: a publish ending from here on sees it (see _end).
        if not self._calls:
            self._idle.set()
        if already:
            # Another close() drains (run() or atexit, and the application's own): wait for
            # it rather than close the connections under the publishes it waits for.
            if self._close_done.wait(max(0.0, deadline - time.monotonic())):
                return
        try:
            self._close(deadline, already)
        finally:
            self._close_done.set()

    def _close(self, deadline: float, already: bool) -> None:
        if not already:
            self._idle.wait(max(0.0, deadline - time.monotonic()))  # blocking publishes, and submits under way
            with self._lock:
                waiting = [entry[1] for entry in self._fifo] + [entry[2] for entry in self._deadlines]
            futures.wait(waiting, max(0.0, deadline - time.monotonic()))  # async ones
        with self._lock:  # (see _node_loop)
            self._stopping.set()
        self._wake.set()
        for node in self._nodes:
            node.wake.set()  # (ends a reconnect delay: the node task sees _stopping)
        for node in self._nodes:
            if node.conn is not None:
                node.conn.close(max(0.1, deadline - time.monotonic()))
            for lane in node.lanes:
                self._close_lane(lane, max(0.1, deadline - time.monotonic()))
        for task in [node.task for node in self._nodes] + self._lane_tasks:
            if task is not None:
                task.join(max(0.1, deadline - time.monotonic()))
        housekeeper = self._housekeeper
        if housekeeper is not None:
            self._wake.set()
            housekeeper.join(max(0.1, deadline - time.monotonic()))
        self._fail_parked()
        self.pool.close(wait=True, timeout=max(0.1, deadline - time.monotonic()))

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait up to *timeout* seconds (0..86400; None: no limit) for each node's task, which
        ends after close(). Raises ConfigError/TypeError naming ``timeout`` for a bad one."""
        if timeout is not None:
            check_timeout(timeout)
        for node in self._nodes:
            if node.task is not None:
                node.task.join(timeout)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Writer {[n.address for n in self._nodes]} connected={len(self._connected)}>"

    # ------------------------------------------------------------ publishing
    # (The overloads say what pub/mpub/dpub return, b"OK" or None with a callback; they are
    # declarations for type checkers only, and the definition after them is the method.)
    @overload
    def pub(self, topic: str, msg: MessageBody, callback: None = None, timeout: Optional[float] = None) -> bytes: ...
    @overload
    def pub(self, topic: str, msg: MessageBody, callback: Callback, timeout: Optional[float] = None) -> None: ...
    def pub(self, topic: str, msg: MessageBody, callback: Optional[Callback] = None, timeout: Optional[float] = None) -> Optional[bytes]:
        """Publish one message.

        Without *callback*: block until nsqd answers and return its answer (b"OK"). Raises the
        E_* ServerError class nsqd answered with, ConnectionClosedError when the connection
        went before the answer, TimeoutError when *timeout* passed (the outcome is then unknown),
        NoConnectionsError when no nsqd was reachable in time (its subclass HandshakeRefusedError
        at once when every nsqd refused the connection's handshake, AUTH or TLS, or answered it with
        something other than NSQ's protocol: not nsqd's TCP port), ClosedError after close(),
        ConfigError/TypeError for a bad topic or body (before anything is sent).
        With *callback*: return at once; ``callback(conn, data)`` runs on the worker pool with
        the answer or the exception as data (pynsq's convention).
        """
        free = self._fast_free
        if free is not None and callback is None and timeout is None and msg.__class__ is bytes and topic.__class__ is str:
            # The fast path: a blocking publish on a free lane, or on the one connection when
            # no lanes are open (one thread publishing), in one straight line. Threads
            # publishing at once contend for the GIL, and each microsecond of Python here cost
            # 11,000-20,000 publishes a second with 8 threads (docs/architecture.md). The same
            # steps as _pub_command, _begin, _publish_blocking, _lane_back and _end, without
            # the calls; any failure goes on in _publish_blocking as that of a first attempt.
            head = _pub_heads.get(topic)
            size = len(msg)
            limit = self.max_msg_size
            if head is not None and limit is not None and 0 < size <= limit and size <= _MAX_BODY_SIZE and self._pid == _pid:
                lane = None
                if free:  # (tested first: one publishing thread has no lanes, and an IndexError per publish costs more)
                    try:
                        lane = free.pop()
                    except IndexError:
                        pass  # another thread took the last one
                if lane is not None:
                    # (No state check: a lane that closed while free has _lane_clean unset, so
                    # its _lane_request checks and fails the publish unsent, re-sent elsewhere.)
                    conn = lane
                    request = lane._lane_request
                else:
                    connected = self._connected
                    conn = connected[0] if len(connected) == 1 else None
                    # (_publish_blocking's choice: a lane when another thread reads the connection,
                    # or lanes are open; and its warning when gevent patched after this Writer began)
                    if conn is None or conn._read_token.locked() or conn._writer_node.lanes or (self._check_late_patch and "gevent.monkey" in sys.modules):  # type: ignore[attr-defined]
                        request = None
                    else:
                        request = conn._quick_request
                if request is not None:
                    calls = self._calls
                    calls.append(None)  # (counted before the check: see _begin)
                    if self._closed:
                        if lane is not None:
                            free.append(lane)
                        self._end()
                        raise ClosedError(f"{self.name} is closed")
                    data = head + _pack_size(size) + msg
                    timeout = self.publish_timeout
                    deadline = time.monotonic() + timeout
                    try:
                        answer = request(data, timeout)
                    except Exception as exc:
                        return self._publish_blocking(data, None, (deadline, exc, lane, conn))  # (gives a lane back)
                    except BaseException:
                        if lane is not None:
                            self._lane_back(lane)
                        self._end()
                        raise
                    # A lane goes back without _lane_back's checks: one that closes meanwhile
                    # fails its next publish unsent (see above), and is dropped when that one
                    # gives it back.
                    if lane is not None:
                        free.append(lane)
                    calls.pop()
                    if not calls and self._draining:
                        self._idle.set()
                    return answer
        data = self._pub_command(topic, msg)
        if callback is None:
            return self._publish_blocking(data, timeout)
        return self._publish(data, callback, timeout)

    def _pub_command(self, topic: str, msg: Any) -> bytes:
        """PUB's bytes, checked. The common case is encoded here, without commands.pub and
        _checked: a topic already checked (its command line is cached) and a bytes body within
        max_msg_size. Anything else goes the general way, which says what is wrong."""
        if msg.__class__ is bytes and topic.__class__ is str:
            head = _pub_heads.get(topic)
            size = len(msg)
            limit = self.max_msg_size
            if head is not None and limit is not None and 0 < size <= limit and size <= _MAX_BODY_SIZE:
                return head + _pack_size(size) + msg
        return self._checked(commands.pub(topic, msg), topic)

    @overload
    def mpub(self, topic: str, msgs: MessageBodies, callback: None = None, timeout: Optional[float] = None) -> bytes: ...
    @overload
    def mpub(self, topic: str, msgs: MessageBodies, callback: Callback, timeout: Optional[float] = None) -> None: ...
    def mpub(self, topic: str, msgs: MessageBodies, callback: Optional[Callback] = None, timeout: Optional[float] = None) -> Optional[bytes]:
        """Publish several messages atomically (MPUB); same contract as :meth:`pub`. Zero messages
        is a ConfigError. One bytes-like body is taken as a list of one, as pynsq does (a str is
        refused: iterating it would publish each character)."""
        data = self._mpub_command(topic, msgs)
        if callback is None:
            return self._publish_blocking(data, timeout)
        return self._publish(data, callback, timeout)

    @overload
    def dpub(self, topic: str, delay_ms: int, msg: MessageBody, callback: None = None, timeout: Optional[float] = None) -> bytes: ...
    @overload
    def dpub(self, topic: str, delay_ms: int, msg: MessageBody, callback: Callback, timeout: Optional[float] = None) -> None: ...
    def dpub(
        self, topic: str, delay_ms: int, msg: MessageBody, callback: Optional[Callback] = None, timeout: Optional[float] = None
    ) -> Optional[bytes]:
        """Publish one message delivered after *delay_ms* (0..3,600,000); same contract as :meth:`pub`."""
        return self._publish(self._checked(commands.dpub(topic, delay_ms, msg), topic), callback, timeout)

    def pub_async(self, topic: str, msg: MessageBody, timeout: Optional[float] = None) -> "Future[bytes]":
        """Publish without blocking; the Future resolves to b"OK" or fails with the error :meth:`pub` would raise."""
        return self._submit(self._pub_command(topic, msg), timeout)

    def mpub_async(self, topic: str, msgs: MessageBodies, timeout: Optional[float] = None) -> "Future[bytes]":
        """:meth:`mpub` returning a Future."""
        return self._submit(self._mpub_command(topic, msgs), timeout)

    def _mpub_command(self, topic: str, msgs: MessageBodies) -> bytes:
        """MPUB's bytes, checked; one bytes-like body is a list of one (pynsq's Writer.mpub)."""
        if isinstance(msgs, (bytes, bytearray, memoryview)):
            msgs = [msgs]
        return self._checked_multi(*commands.mpub_parts(topic, msgs))

    def dpub_async(self, topic: str, delay_ms: int, msg: MessageBody, timeout: Optional[float] = None) -> "Future[bytes]":
        """:meth:`dpub` returning a Future."""
        return self._submit(self._checked(commands.dpub(topic, delay_ms, msg), topic), timeout)

    def _checked(self, data: bytes, topic: str) -> bytes:
        """Refuse, before sending, what nsqd would refuse with a fatal error that fails
        every publish pipelined behind it on the connection (sizes as nsqd's defaults;
        set max_msg_size/max_body_size to your nsqd's, or None to skip the check)."""
        if self.max_msg_size is not None:
            body_size = _body_size(data)
            if body_size > self.max_msg_size:
                raise ConfigError("msg", f"<{body_size} bytes>", f"exceeds max_msg_size ({self.max_msg_size} bytes, nsqd's --max-msg-size)")
        return data

    def _checked_multi(self, data: bytes, body_size: int, sizes: List[int]) -> bytes:
        """:meth:`_checked` for MPUB (what :func:`commands.mpub_parts` returns): the whole body
        against max_body_size, each message against max_msg_size."""
        limit = self.max_body_size
        if limit is not None and body_size > limit:
            raise ConfigError("msgs", f"<{body_size} bytes>", f"MPUB body exceeds max_body_size ({limit} bytes, nsqd's --max-body-size)")
        limit = self.max_msg_size
        # No message is larger than all of them together: the common case needs no max().
        if limit is not None and body_size - 4 - 4 * len(sizes) > limit:
            largest = max(sizes)
            if largest > limit:
                raise ConfigError("msgs", f"<a message of {largest} bytes>", f"exceeds max_msg_size ({limit} bytes, nsqd's --max-msg-size)")
        return data

    def _publish(self, data: bytes, callback: Optional[Callback], timeout: Optional[float]) -> Optional[bytes]:
        if callback is not None:
            if not callable(callback):
                raise TypeError(f"callback must be callable, not {type(callback).__name__}")
            refusal = call_refusal(callback, 2)  # (cached: a dict lookup per publish)
            if refusal is not None:
                # (it would fail on the worker pool, after the publish: a one-argument Tornado-style callback)
                raise TypeError(
                    f"callback must take two positional arguments, as the Writer calls callback(conn, data) "
                    f"(pynsq's convention); {callback!r} cannot ({refusal}); nothing was published"
                )
            future = self._submit(data, timeout)
            future.add_done_callback(lambda f: self._run_callback(callback, f))
            return None
        return self._publish_blocking(data, timeout)

    def _begin(self, timeout: Optional[float]) -> float:
        if timeout is None:
            timeout = self.publish_timeout
        else:
            check_timeout(timeout)
        if self._pid != (os.getpid() if self._uwsgi else _pid):
            self._check_pid()
        # Counted first, then the check: close() sets _closed before it looks at _calls, so
        # either this sees _closed or close() sees this publish and waits for it.
        self._calls.append(None)
        if self._closed:
            self._end()
            raise ClosedError(f"{self.name} is closed")
        return time.monotonic() + timeout

    def _end(self) -> None:
        calls = self._calls
        calls.pop()
        if not calls and self._draining:
            self._idle.set()

    def _pick(self, avoid: Optional[AsyncConn] = None) -> Optional[AsyncConn]:
        """Round-robin over open connections, preferring one other than *avoid*, than one
        that has sent nothing since a publish timed out on it (its nsqd looks hung), and than
        one to an nsqd that did not store a publish in the last PASS_OVER_SECONDS.

        No lock: _connected is a list that is replaced, never changed in place, so this
        reads a consistent one; two threads racing on the counter only skew the rotation.
        """
        connected = self._connected
        count = len(connected)
        if count == 1:
            conn = connected[0]
            return conn if conn.state == "CONNECTED" else None
        if not count:
            return None
        self._rr = start = (self._rr + 1) % count
        fallback = None
        for step in range(count):
            conn = connected[(start + step) % count]
            if conn.state != "CONNECTED":
                continue
            until = conn._writer_node.pass_until
            if (
                conn is avoid
                or (until and until > time.monotonic())  # (it did not store a publish just now)
                or (conn._timed_out_at > conn.last_recv_timestamp and self._still_silent(conn))
            ):
                if fallback is None or fallback is avoid:
                    fallback = conn
                continue
            return conn
        return fallback

    @staticmethod
    def _still_silent(conn: AsyncConn) -> bool:
        """Within the staleness limit of the timeout on *conn* (past it, the connection would
        have been closed if nsqd were still silent). False too if the wall clock went back
        since (both times are time.time(): last_recv_timestamp is pynsq's attribute)."""
        since = time.time() - conn._timed_out_at
        return 0 <= since < (getattr(conn, "_stale_after", None) or 60.0)

    def _wait_for_conn(self, deadline: float, avoid: Optional[AsyncConn] = None) -> AsyncConn:
        """A connection to publish on, waiting for one up to *deadline*. Raises ClosedError once
        the Writer closes, NoConnectionsError at the deadline, HandshakeRefusedError at once
        when every nsqd refused its latest handshake (see _refused)."""
        while True:
            attempted = self._attempted  # (before looking: an attempt that ends after this sets it)
            conn = self._pick(avoid)
            if conn is not None:
                return conn
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                raise self._unsent_error()
            refused = self._refused()
            if refused is not None:
                raise refused
            self._hurry()
            if self._changed.is_set():
                # A connection just closed and its node has not noticed yet.
                self.backend.sleep(min(remaining, 0.005))
            else:
                attempted.wait(min(remaining, 0.25))

    def _last_errors(self) -> str:
        """Why each node is not connected (its last connect or connection error), for error messages."""
        errors = []
        for node in self._nodes:
            error = node.conn.error if node.conn is not None and node.conn.error else node.last_error
            if error is not None:
                errors.append(f"{node.address}: {type(error).__name__}: {error}")
        return f" (last errors: {'; '.join(errors)})" if errors else ""

    def _publish_blocking(
        self, data: bytes, timeout: Optional[float], failed: Optional[Tuple[float, Exception, Optional[AsyncConn], AsyncConn]] = None
    ) -> bytes:
        """Publish *data* and wait for the answer (see pub). *failed*: pub's fast path already
        began this publish (counted, see _begin) and its attempt raised: (deadline, the
        exception, the lane, still held, or None, the connection it used). It is handled as any
        attempt's failure: retried or raised, and the lane given back."""
        if failed is None:
            if self._check_late_patch and "gevent.monkey" in sys.modules:
                self._warn_patched_late()  # (before _begin: a warning made an error leaves nothing counted)
            deadline = self._begin(timeout)
        else:
            deadline = failed[0]
        try:
            retries = self.retries
            avoid: Optional[AsyncConn] = None
            unknown: Optional[BaseException] = None  # a sent attempt's failure, outcome unknown
            not_stored: Optional[BaseException] = None  # an nsqd's answer that it did not store it
            while True:
                lane: Optional[AsyncConn] = None
                if failed is not None:
                    # The fast path's lane, and its first connection, as if the attempt had gone through it.
                    lane = failed[2]
                    conn = failed[3] if lane is None else lane._writer_node.conn or lane  # type: ignore[attr-defined]
                else:
                    connected = self._connected
                    if len(connected) == 1 and avoid is None and connected[0].state == "CONNECTED":
                        conn = connected[0]  # (_pick's one-connection case, inline: the path of many threads)
                    else:
                        try:
                            conn = self._wait_for_conn(deadline, avoid)
                        except (NoConnectionsError, ClosedError):
                            if unknown is None and not_stored is None:
                                raise
                            # A retry that found no connection: the sent attempt's error, which says
                            # the outcome is unknown, not one that says the message never left (or
                            # else nsqd's own answer that it did not store it).
                            raise (unknown or not_stored) from None
                    if self._max_lanes and (conn._parked and conn._read_token.locked() or conn._writer_node.lanes):  # type: ignore[attr-defined]
                        # Another publishing thread reads this connection (its reader task is
                        # parked): publish on a lane of our own rather than wait for that thread
                        # to hand our answer over. (A reader task that holds the token itself
                        # parks after one hand-off: that is no reason to open a connection.)
                        # Or lanes are open, and pub() found none free: threads hold them all,
                        # and this one would be the one left on the first connection.
                        lane = self._lane(conn._writer_node)  # type: ignore[attr-defined]
                try:
                    if failed is not None:
                        exc, failed = failed[1], None
                        sent_at = time.time() - (time.monotonic() - (deadline - self.publish_timeout))  # (when the fast path sent it)
                        raise exc  # (handled below as this attempt's failure)
                    if lane is not None:
                        sent_at = time.time()
                        return lane._lane_request(data, max(0.0, deadline - time.monotonic()))
                    # The calling thread reads the answer itself when it can (no hand-off).
                    return conn._quick_request(data, max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    # Passed over by _pick while it stays silent (a hung or blackholed nsqd),
                    # not only after the staleness limit (two heartbeat intervals) closes it.
                    conn._timed_out_at = time.time()
                    if lane is not None:
                        self._lane_timed_out(lane, sent_at)
                    raise TimeoutError(f"no answer from {conn.id} within the timeout; the publish may or may not have landed") from None
                except _NOT_STORED as exc:
                    # nsqd did not store it (the topic is being deleted, its disk is full):
                    # safe to send to another nsqd, which retries allow. That nsqd is passed
                    # over for a while by every publish (its connection closes and reconnects
                    # at once; a full disk would fail every publish sent there).
                    if not self._not_stored_retry(conn, retries, deadline):
                        raise
                    retries -= 1
                    avoid = conn
                    not_stored = exc
                    logger.info("%s%s did not store a publish (%s); re-sending on another node", self._log_prefix, conn.id, exc)
                except _RETRYABLE as exc:
                    if getattr(exc, "unprocessed", False):
                        # nsqd never ran it (nothing was sent, or it came after a fatal error):
                        # safe, and free, to send it elsewhere.
                        avoid = conn
                        continue
                    if time.monotonic() >= deadline:
                        raise
                    if retries <= 0:
                        raise
                    retries -= 1
                    avoid = conn
                    unknown = exc
                    logger.info("%spublish failed on %s; re-sending on another node", self._log_prefix, conn.id)
                finally:
                    if lane is not None:
                        self._lane_back(lane)
        except Error as exc:
            self._count_failure(exc)
            raise
        finally:
            self._end()

    # ------------------------------------------------------------------ lanes
    def _lane(self, node: _Node) -> Optional[AsyncConn]:
        """A free lane to *node*, taken for one publish (give it back with _lane_back); None
        when there is none, in which case one opens in the background if the limit allows."""
        free = node.free
        while True:
            try:
                lane = free.pop()
            except IndexError:
                break
            if lane.state == "CONNECTED":
                return lane
            self._drop_lane(node, lane)
        # Open lanes for the publishes under way that have none, several at once: a burst of
        # threads gets its lanes within one connect time rather than one after another. One
        # each, the one reading the first connection too: pub() takes a free lane first, and
        # the first connection, whose reader task hands over answers, is slower than a lane.
        wanted = min(self._max_lanes, len(self._calls))
        if node.growing + len(node.lanes) < wanted and time.monotonic() >= node.grow_after:
            with self._lock:
                if self._stopping.is_set() or node.growing + len(node.lanes) >= wanted:
                    return None
                node.growing += 1
                self._lane_tasks = [task for task in self._lane_tasks if task.is_alive()] + [
                    self.backend.spawn(self._lane_loop, node, name=f"nsq_sync-writer-lane-{node.address}")
                ]
        return None

    def _lane_timed_out(self, lane: AsyncConn, sent_at: float) -> None:
        """A publish sent on *lane* at *sent_at* (time.time()) went unanswered for its timeout:
        close the lane, and the free lanes to the same nsqd that have read nothing since. A lane
        has no reader task, so nobody else notices a hung nsqd or a stalled path on it: every
        publish taking one would wait out its whole timeout, for good (the first connection's
        reader task finds it stale and reconnects; lanes reopen on demand)."""
        node: _Node = lane._writer_node  # type: ignore[attr-defined]
        suspects = [lane]
        for other in list(node.free):
            if other.last_recv_timestamp < sent_at:
                try:
                    node.free.remove(other)
                except ValueError:
                    continue  # taken meanwhile: that publish finds out for itself
                suspects.append(other)
        for suspect in suspects:
            self._drop_lane(node, suspect)
            self._close_lane(suspect, 0.1)
        logger.info("%sa publish timed out on a lane to %s; closed %d lane(s) that heard nothing since", self._log_prefix, node.address, len(suspects))

    def _lane_back(self, lane: AsyncConn) -> None:
        node: _Node = lane._writer_node  # type: ignore[attr-defined]
        if lane.state == "CONNECTED" and lane in node.lanes:
            node.free.append(lane)
        else:
            self._drop_lane(node, lane)

    def _drop_lane(self, node: _Node, lane: AsyncConn) -> None:
        with self._lock:
            if lane in node.lanes:
                node.lanes = [other for other in node.lanes if other is not lane]
                self._gone_answered += lane._answered_total  # (dropped once: nobody publishes on it any more)

    def _lane_loop(self, node: _Node) -> None:
        """Open one lane to *node*, keep it while it is used, close it after a period unused (see below)."""
        lane = self._new_conn(node)
        lane._lane = True  # no reader task: the publish holding it reads (AsyncConn._lane_request)
        try:
            lane.connect()
        except Exception as exc:
            logger.info("%scannot open another connection to %s (%s)", self._log_prefix, node.address, exc)
            with self._lock:
                node.grow_after = time.monotonic() + self.reconnect_interval
                node.growing -= 1
            return
        if lane._recv_slice is None:
            # Not a native socket (TLS, or a platform without SO_RCVTIMEO): a read could not
            # be bounded by the publish's deadline without a reader task. No lanes here.
            with self._lock:
                node.growing -= 1
                self._max_lanes = 0
            self._close_lane(lane)
            return
        with self._lock:
            node.growing -= 1
            stopping = self._stopping.is_set()
            if not stopping:
                node.lanes = node.lanes + [lane]
        if stopping:
            self._close_lane(lane)  # (not under the lock: a close waits for nsqd)
            return
        node.free.append(lane)
        logger.debug("%sopened lane %d to %s", self._log_prefix, len(node.lanes), node.address)
        # Without a reader task nobody answers nsqd's heartbeats while the lane sits unused,
        # and nsqd closes a connection silent for two heartbeat intervals: a lane unused
        # for a whole period closes first (unused for one to two periods).
        heartbeat = float(lane.heartbeat_interval)
        period = LANE_IDLE_SECONDS if heartbeat <= 0 else min(LANE_IDLE_SECONDS, heartbeat / 2)
        # Used means read from: a lane has no reader task, so only its publishes read (and
        # each answer they read sets last_recv_timestamp).
        seen = lane.last_recv_timestamp
        while not lane.wait_closed(period):
            if lane.last_recv_timestamp != seen:
                seen = lane.last_recv_timestamp
                continue
            try:
                node.free.remove(lane)  # unused for a whole period, and nobody took it meanwhile
            except ValueError:
                continue  # in use right now
            self._drop_lane(node, lane)
            self._close_lane(lane)
            return
        self._drop_lane(node, lane)

    def _close_lane(self, lane: AsyncConn, timeout: float = 1.0) -> None:
        """Close a lane nobody holds (it has no reader task to see the close through)."""
        lane.close(timeout)
        if not lane.closed():
            lane._on_disconnect(None)

    def _patched_late(self) -> bool:
        """gevent monkey-patched this process after this Writer chose OS threads (in this
        process: a forked child chooses again at its first use, see _after_fork)."""
        return self._backend_choice is None and self.backend.name == "thread" and gevent_patched() and self._pid == os.getpid()

    def _warn_patched_late(self) -> None:
        """A blocking publish on a Writer that gevent patched the process under: it still
        works (its answer comes from the Writer's OS threads or the calling greenlet's own
        read), but while it waits for nsqd the caller may read the OS-level socket itself,
        which holds up every greenlet of the hub until the answer (up to the timeout). Said
        once: a refusal would break programs that work today, at the cost of those stalls."""
        if self._backend_choice is not None or self.backend.name != "thread":
            self._check_late_patch = False  # (chosen again after a fork: gevent)
            return
        if not self._patched_late():
            return
        self._check_late_patch = False
        logger.warning(
            "%sthe Writer to %s was created before gevent monkey-patched this process, so it runs on OS threads: a blocking publish "
            "from a greenlet can stop every other greenlet until nsqd answers (up to its timeout, %gs by default), and "
            "pub_async() and callback= raise ConfigError. Create Writers after gevent.monkey.patch_all(), "
            "or start the program with python -m gevent.monkey",
            self._log_prefix, ", ".join(self.nsqd_tcp_addresses), self.publish_timeout,
        )

    def _submit(self, data: bytes, timeout: Optional[float]) -> "Future[bytes]":
        if self._patched_late():
            # Made before gevent patched the process (in this process: a forked child, as a
            # gunicorn -k gevent --preload worker, chooses again in _begin and goes on):
            # its Future, made now with gevent's locks, would be completed by one of the
            # Writer's OS threads, which cannot wake the hub waiting in result(): a hang.
            raise ConfigError(
                "backend", None,
                f"{self.name} was created before gevent monkey-patched this process, so it runs on OS threads, "
                "whose answers cannot wake a greenlet waiting on a Future (and callbacks would run outside the hub): create Writers after "
                "gevent.monkey.patch_all(), or start the program with python -m gevent.monkey",
            )
        deadline = self._begin(timeout)
        try:
            future: "Optional[Future[bytes]]" = None
            if not self.retries:
                # Common case: the connection's own Future is the caller's, no second one.
                conn = self._pick()
                if conn is not None:
                    future = _PublishFuture()
                    try:
                        conn.request(data, future)
                    except ConnectionClosedError:
                        future = None
                    else:
                        future.conn = conn  # type: ignore[attr-defined]
                        future.sent = True  # type: ignore[attr-defined]
            if future is None:
                future = _PublishFuture()
                self._attempt(data, deadline, self.retries, future, None)
        except BaseException:
            self._end()
            raise
        # From here on close() drains it through the deadline queues, not _calls:
        # no done-callback per publish.
        with self._lock:
            fifo = self._fifo
            if not fifo or deadline >= fifo[-1][0]:
                fifo.append((deadline, future))
                if len(fifo) > _FIFO_YOUNG:
                    # Answers come in order, so the oldest are usually answered by now: let them
                    # go while they are young (an answered Future kept for its deadline's sake is
                    # garbage the collector walks again and again: 30% of the cost of a publish).
                    while fifo and fifo[0][1].done():
                        fifo.popleft()
                if len(fifo) >= self._fifo_sweep:
                    # One publish unanswered for long (parked, or on a slow node) holds the
                    # answered ones behind it: drop those.
                    self._fifo = fifo = collections.deque(entry for entry in fifo if not entry[1].done())
                    self._fifo_sweep = max(_SWEEP_AT, 2 * len(fifo))
            else:
                heap = self._deadlines
                heapq.heappush(heap, (deadline, next(self._seq), future))
                if len(heap) >= self._heap_sweep:
                    self._deadlines = heap = [entry for entry in heap if not entry[2].done()]
                    heapq.heapify(heap)
                    self._heap_sweep = max(_SWEEP_AT, 2 * len(heap))
            wake = deadline < self._housekeeper_due
        self._end()  # (after the queues have it: close() looks there once _calls is empty)
        if wake:
            self._wake_housekeeper()
        return future

    def _attempt(self, data: bytes, deadline: float, retries: int, outer: "Future[bytes]", avoid: Optional[AsyncConn]) -> None:
        if outer.done():
            return  # timed out meanwhile
        conn = self._pick(avoid)
        if conn is None:
            # Nothing connected: park it; the housekeeping task sends it when a node connects.
            with self._lock:
                self._parked.append((data, deadline, retries, outer, avoid))
            self._wake_housekeeper()
            return
        outer.conn = conn  # type: ignore[attr-defined]
        try:
            inner = conn.request(data)
        except ConnectionClosedError:
            with self._lock:
                self._parked.append((data, deadline, retries, outer, conn))
            self._wake_housekeeper()
            return
        outer.sent = True  # type: ignore[attr-defined]
        outer.inner = inner  # type: ignore[attr-defined]  # (abandoned with it at its timeout: see _housekeeping)

        def done(f: "Future[bytes]") -> None:
            exc = f.exception()
            if exc is None:
                _settle(outer, f.result())
            elif isinstance(exc, _NOT_STORED):
                if self._not_stored_retry(conn, retries, deadline):
                    # (not unknown: nsqd said it did not store it; see _publish_blocking)
                    try:
                        self.pool.control.submit(self._attempt, data, deadline, retries - 1, outer, conn)
                    except RuntimeError:
                        self._fail(outer, exc)
                else:
                    self._fail(outer, exc)
            elif isinstance(exc, _RETRYABLE) and (retries > 0 or getattr(exc, "unprocessed", False)) and time.monotonic() < deadline:
                # Runs on the connection's reader: re-send from a worker instead.
                left = retries if getattr(exc, "unprocessed", False) else retries - 1
                if not getattr(exc, "unprocessed", False):
                    outer.unknown = exc  # type: ignore[attr-defined]  # (it may have landed: see _unsent_error)
                try:
                    self.pool.control.submit(self._attempt, data, deadline, left, outer, conn)
                except RuntimeError:
                    self._fail(outer, exc)
            else:
                self._fail(outer, exc)

        inner.add_done_callback(done)

    def _resend_unprocessed(self, conn: AsyncConn, future: "Future[bytes]") -> None:
        """A fatal error on *conn* came before this publish, so nsqd never ran it: send it
        again elsewhere on the same Future (runs on the reader: hand it to a worker)."""
        try:
            self.pool.control.submit(self._resend, conn, future)
        except RuntimeError:
            self._fail(future, ConnectionClosedError(f"connection to {conn.id} closed before nsqd answered"))

    def _resend(self, failed: AsyncConn, future: "Future[bytes]") -> None:
        deadline = time.monotonic() + self.publish_timeout
        avoid: Optional[AsyncConn] = failed
        while not future.done():
            try:
                conn = self._wait_for_conn(deadline, avoid)
                conn.request(future.command, future)  # type: ignore[attr-defined]
                future.conn = conn  # type: ignore[attr-defined]
                return
            except ConnectionClosedError:
                avoid = None
                if time.monotonic() >= deadline:
                    self._fail(future, ConnectionClosedError(f"connection to {failed.id} closed before nsqd answered"))
                    return
            except Error as exc:
                self._fail(future, exc)
                return

    def _wake_housekeeper(self) -> None:
        with self._lock:
            orphans = self._housekeeper is None and self._stopping.is_set()
            if self._housekeeper is None and not orphans:
                self._housekeeper = self.backend.spawn(self._housekeeping, name="nsq_sync-writer-housekeeping")
        if orphans:
            # Parked by a publish that raced close(): nobody is left to send it.
            self._fail_parked()
        self._wake.set()

    def _fail_parked(self) -> None:
        with self._lock:
            parked = list(self._parked)
            self._parked.clear()
        for item in parked:
            # (a retry parked here may follow an attempt nsqd got: then that attempt's error)
            self._fail(item[3], self._unsent_error(item[3]))

    def _unsent_error(self, future: "Optional[Future[bytes]]" = None) -> BaseException:
        """Why a publish waiting for a connection fails: the unknown outcome of an earlier
        attempt nsqd may have run (an async retry's *future* that found no connection must not
        say "never sent"), ClosedError when close() ended the wait, else NoConnectionsError."""
        unknown = getattr(future, "unknown", None)
        if unknown is not None:
            return unknown  # type: ignore[no-any-return]
        if self._stopping.is_set():
            return ClosedError(f"{self.name} was closed before the publish could be sent")
        return self._refused() or NoConnectionsError(f"no connection to any of {[n.address for n in self._nodes]} within the timeout" + self._last_errors())

    def _housekeeping(self) -> None:
        """One task per Writer: fails async publishes at their deadline and sends parked ones when a node connects."""
        while True:
            now = time.monotonic()
            expired: List[Future] = []
            resend: List[Tuple[Any, ...]] = []
            refused = self._refusal_cause() is not None  # (parked publishes fail at once, as blocking ones do)
            with self._lock:
                heap = self._deadlines
                while heap and (heap[0][0] <= now or heap[0][2].done()):
                    expired.append(heapq.heappop(heap)[2])
                fifo = self._fifo
                while fifo and (fifo[0][0] <= now or fifo[0][1].done()):
                    expired.append(fifo.popleft()[1])
                if self._parked and (self._connected or self._stopping.is_set() or refused):
                    resend = list(self._parked)
                    self._parked.clear()
                else:
                    still = collections.deque()
                    for item in self._parked:
                        (still if item[1] > now else resend).append(item)
                    self._parked = still
                # Look again at the first deadline, and at least every second (parked publishes).
                next_due = min([now + 1.0] + [queue[0][0] for queue in (heap, fifo) if queue])
                self._housekeeper_due = next_due
                idle = not heap and not fifo and not self._parked
            timed_out = set()
            for future in expired:
                if future.done():
                    continue
                if getattr(future, "sent", False):
                    conn = getattr(future, "conn", None)
                    if conn is not None:
                        conn._timed_out_at = time.time()  # (passed over while silent: see _pick)
                        timed_out.add(conn)
                    inner = getattr(future, "inner", None)
                    if inner is not None:
                        inner.abandoned = True  # (with retries, the connection's Future is another)
                    self._fail(future, TimeoutError("no answer from nsqd within the timeout; the publish may or may not have landed"))
                else:
                    self._fail(future, self._unsent_error(future))
            for conn in timed_out:
                # Those still queued behind an unanswered publish (a stalled nsqd) leave the
                # queue: sent once nsqd answers again, they landed after their TimeoutError.
                if conn._writes:
                    conn._withdraw_abandoned()
            for data, deadline, retries, outer, avoid in resend:
                if outer.done():
                    continue
                if self._stopping.is_set() or time.monotonic() >= deadline:
                    self._fail(outer, self._unsent_error(outer))
                    continue
                if refused and not self._connected:
                    refusal = self._refused()
                    if refusal is not None:
                        self._fail(outer, getattr(outer, "unknown", None) or refusal)
                        continue
                self._attempt(data, deadline, retries, outer, avoid)
            if self._parked and not self._connected and not self._stopping.is_set():
                self._hurry()  # (parked publishes wait for a connection)
            if self._stopping.is_set() and idle:
                with self._lock:
                    if not self._parked:
                        # (under the lock: a publish parked from now on finds no housekeeper
                        # and fails itself, see _wake_housekeeper)
                        self._housekeeper = None
                        return
                continue
            self._wake.wait(max(0.0, next_due - time.monotonic()))
            self._wake.clear()

    def _run_callback(self, callback: Callback, future: "Future[bytes]") -> None:
        conn = getattr(future, "conn", None)
        exc = future.exception()
        payload: Any = exc if exc is not None else future.result()
        try:
            self.pool.control.submit(callback, conn, payload)
        except RuntimeError:
            logger.warning("%sWriter closed; publish callback %r not run", self._log_prefix, callback)

"""AsyncConn: one connection to nsqd, pynsq's API over a blocking socket.

Threads of control around one connection:

* the caller of :meth:`AsyncConn.connect` runs the whole handshake and fires the
  handshake events (connect, identify, identify_response, auth, auth_response,
  ready) in its own thread, in order;
* then one reader task (thread or greenlet) reads in large chunks outside any
  lock, decodes frames, answers heartbeats with NOP, matches responses to
  waiting requests, and hands every event to the worker pool. It never runs a
  listener itself, so a slow handler cannot starve heartbeats;
* any thread may write. Writes are queued on a deque and one writer at a time
  drains it with a single ``sendall`` of everything queued (FINs that become
  ready together leave in one segment); the queue keeps the wire order equal to
  the call order;
* callbacks fired by your own calls (``backoff``/``resume``/``continue`` from
  finish/requeue) run in your thread before the command is written, as in pynsq.
"""

from __future__ import annotations

import collections
import functools
import logging
import socket
import struct
import sys
import time
from concurrent import futures
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

from . import __about__
from .addresses import check_host
from .backends import Backend, get_backend
from .dispatch import WorkerPool
from .errors import (
    AlreadyRespondedError,
    AuthRequiredError,
    ConfigError,
    ConnectError,
    ClosedError,
    ConnectionClosedError,
    Error,
    ProtocolError,
    SendError,
    ServerError,
    StaleConnectionError,
    TLSError,
    TimeoutError,
    error_from_frame,
)
from .events import EVENTS, EventedMixin
from .lightfuture import LightFuture
from .message import Message
from .protocol import commands
from .protocol.constants import (
    CLOSE_WAIT,
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    MAX_RDY_COUNT_DEFAULT,
)
from .protocol.frames import FrameDecoder
from .protocol.limits import limit, limit_note
from .protocol.identify import MAX_WAIT_SECONDS, build_identify, check_number, check_timeout, parse_identify_response, parse_json_object
from .transport.compression import DeflateStream, SnappyStream, masked_crc32c
from .transport.tcp import SocketStream

if TYPE_CHECKING:  # ssl is imported only when TLS is used (it costs ~3 MB)
    import ssl
else:

    class _LazySSL:
        """The name ``ssl`` in this module's annotations (``tls_options: ssl.SSLContext``):
        ``typing.get_type_hints()`` evaluates them here, as Sphinx, typer or pydantic do,
        and failed with NameError. The module loads on the first attribute looked up."""

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)  # (inspect, mock, doctest probing: not a reason to load ssl)
            import ssl as module

            return getattr(module, name)

    ssl = _LazySSL()

__all__ = ["AsyncConn", "INIT", "CONNECTING", "CONNECTED", "DISCONNECTED", "DEFAULT_USER_AGENT"]

logger = logging.getLogger(__name__)

INIT = "INIT"
CONNECTING = "CONNECTING"
CONNECTED = "CONNECTED"
DISCONNECTED = "DISCONNECTED"

DEFAULT_USER_AGENT = f"nsq_sync/{__about__.__version__}"
#: bytes asked of each read. Reads go into one buffer kept per connection (read_some):
#: a plain ``recv(256 KiB)`` allocates the whole size first, and that allocation cost
#: ~12 us per read, five times the recv of a small answer.
READ_SIZE = 256 * 1024
#: a parked reader task reads again after this long without a caller reading (see _read_loop)
PARK_SECONDS = 0.25
#: a caller about to publish on a connection nobody read for this long looks for news first
IDLE_CHECK_SECONDS = 0.005
#: how long an idle pool worker reading a consumer's connection waits for data before it
#: hands reading back to the reader task (see _lead_read)
LEAD_WAIT_SECONDS = 0.002
#: a consumer's parked reader task reads again after this long without a worker reading
LEAD_PARK_SECONDS = 0.005
#: an answer held back for messages still waiting for a worker (see _queue_answer_locked)
#: leaves after at most about twice this long, whatever the handlers in between take
ANSWER_HOLD_SECONDS = 0.005
#: a message that waited for a worker longer than this share of msg_timeout since it arrived
#: (or was last touched) is touched as a worker picks it up (see _touch_picked_up)
PICKUP_TOUCH_SHARE = 0.1
#: thread backend, plain TCP: the kernel ends a blocking recv after this long with no data
#: (SO_RCVTIMEO), so a caller with a deadline reads at once instead of polling first
RECV_SLICE_SECONDS = 1.0
#: bytes a handshake step's answer (IDENTIFY, AUTH, an upgrade's OK) may take: nsqd's are under
#: a kilobyte; a peer sending megabytes (kept in identify_response) is refused
HANDSHAKE_ANSWER_MAX = 64 * 1024
#: how many of the first bytes of a handshake answer that is not NSQ's protocol its ProtocolError shows
HANDSHAKE_SHOWN = 48
#: plain TCP: one send waits at most this long for room in the socket (thread backend: the
#: kernel's SO_SNDTIMEO; gevent: a wait for writability in _send_rest). Only a write the socket cannot take at
#: once gets there: it then goes on in slices, so a caller with a deadline stops at its
#: deadline and a write's stall is counted from its last progress (see _send_rest)
SEND_SLICE_SECONDS = 0.05
#: queued commands are joined into one send up to this many bytes (a bigger one goes alone):
#: a join copies, and a backlog of large publishes was copied whole
JOIN_MAX_BYTES = 256 * 1024
#: a graceful close waits this long for CLOSE_WAIT once nothing is left to answer (nsqd hung),
#: looking every CLS_POLL_SECONDS (see _wait_close_wait)
CLS_GRACE_SECONDS = 1.0
CLS_POLL_SECONDS = 0.05
#: at most one warning this often about each of: answers nsqd refused because it had timed the
#: message out (E_FIN_FAILED, E_REQ_FAILED, E_TOUCH_FAILED), copies it delivered again, messages
#: dropped unrun past msg_timeout, and messages it no longer counts; each counted between warnings
LATE_WARNING_SECONDS = 10.0
_NOTHING = object()  # _read_before: the deadline passed with no data
_OK_FRAME = b"\x00\x00\x00\x06\x00\x00\x00\x00OK"  # size 6, FRAME_TYPE_RESPONSE, OK
#: the same in snappy's framing: an uncompressed chunk (type 1, length 4 + 10), its masked CRC-32C
_SNAPPY_OK_CHUNK = b"\x01\x0e\x00\x00" + masked_crc32c(_OK_FRAME).to_bytes(4, "little") + _OK_FRAME
#: how the commands nsqd answers through the pending queue begin (see _fail_unsent)
_REQUESTS = frozenset((b"PUB ", b"MPUB", b"DPUB", b"SUB "))
#: how long a caller whose timeout passed waits for the write lock to take its request out of
#: the queue (AsyncConn._withdraw_abandoned): another such caller's look, not a stalled write
WITHDRAW_WAIT_SECONDS = 0.01


#: what _warn_once said already, process-wide
_warned: set = set()


def _warn_once(key: str, text: str) -> None:
    """Log a configuration warning once per process (a Reader makes one connection per nsqd)."""
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s", text)


#: the events connect() fires, in order, before it returns
HANDSHAKE_EVENTS = ("connect", "identify", "identify_response", "auth", "auth_response", "ready")


def _warn_handshake_over(name: str, conn_id: str) -> None:
    _warn_once(
        "late handshake listener",
        f"AsyncConn.on({name!r}) on {conn_id} after connect() returned: the handshake events "
        f"({', '.join(HANDSHAKE_EVENTS)}) fire during connect(), so this listener will not run (a late "
        "'ready' listener runs once only while the connection is open); add listeners before "
        "connect() (pynsq code: move the on() calls above conn.connect()). Said once",
    )


class AsyncConn(EventedMixin):
    """A connection to one nsqd, with pynsq's parameters, events and on/off/trigger.

    :param host: the host to connect to
    :param port: the TCP port
    :param timeout: seconds for the TCP connect and each handshake step (after it, reads and
        writes are bounded by ``max(2 * heartbeat_interval, timeout)``)
    :param heartbeat_interval: seconds, 1..60, or -1 to disable (nsqd then refuses SUB, so
        subscribe() raises ConfigError first)
    :param requeue_delay: seconds; an automatic requeue waits ``requeue_delay * attempts``
    :param tls_v1: upgrade to TLS after IDENTIFY
    :param tls_options: an ``ssl.SSLContext`` or a dict (ca_certs, certfile, keyfile, cert_reqs, check_hostname)
    :param snappy: snappy compression (needs python-snappy)
    :param deflate: deflate compression
    :param deflate_level: 1..9 (nsqd caps it at its --max-deflate-level)
    :param user_agent: sent in IDENTIFY
    :param output_buffer_size: bytes nsqd buffers before writing to us, 64..65536, -1 off, 0 default
    :param output_buffer_timeout: ms nsqd waits before flushing, 25..30000, 0 default, -1 no timer
        (then only a full buffer flushes: for low latency use 25 or output_buffer_size=-1)
    :param sample_rate: 0..99 percent of messages to receive (0: all)
    :param auth_secret: sent with AUTH when nsqd requires it (never logged)
    :param msg_timeout: seconds nsqd waits for an answer to a message before redelivering it
    :param backend: "thread", "gevent", or None (gevent when the socket module is monkey-patched)
    :param worker_pool: the :class:`~nsq_sync.dispatch.WorkerPool` that runs callbacks
        (shareable); by default the connection makes its own with one message worker
    :param client_id: sent in IDENTIFY (default: the short host name)
    :param hostname: sent in IDENTIFY (default: socket.gethostname())
    :param max_requeue_delay: seconds; cap of the automatic requeue delay
    :param max_frame_size: bytes; a bigger frame from the server is a ProtocolError
    :param close_timeout: seconds close() waits for CLOSE_WAIT and in-flight messages

    Raises ConfigError (a ValueError naming the parameter) for any out-of-range value.
    """

    fired_events = EVENTS  # (on() warns once about any other name: a typo)

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 1.0,
        heartbeat_interval: float = 30,
        requeue_delay: float = 90,
        tls_v1: bool = False,
        tls_options: Union[None, ssl.SSLContext, Mapping[str, Any]] = None,
        snappy: bool = False,
        deflate: bool = False,
        deflate_level: int = 6,
        user_agent: str = DEFAULT_USER_AGENT,
        output_buffer_size: int = 16384,
        output_buffer_timeout: int = 250,
        sample_rate: int = 0,
        auth_secret: Union[None, str, bytes] = None,
        msg_timeout: Optional[float] = None,
        *,
        backend: Union[None, str, Backend] = None,
        worker_pool: Optional[WorkerPool] = None,
        client_id: Optional[str] = None,
        hostname: Optional[str] = None,
        max_requeue_delay: float = 900,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        close_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if not isinstance(host, str) or not host:
            raise ConfigError("host", host, "must be a non-empty string")
        check_host("host", host, host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError("port", port, "must be an int between 1 and 65535")
        check_number("timeout", timeout, 0.001, 3600)
        for name, delay in (("requeue_delay", requeue_delay), ("max_requeue_delay", max_requeue_delay)):
            try:
                check_number(name, delay, 0, limit("max_req_timeout"))  # (nsqd would cut a longer REQ delay to it)
            except ConfigError as exc:
                raise ConfigError(name, delay, exc.reason + limit_note("max_req_timeout")) from None
        check_number("max_frame_size", max_frame_size, 1024, 2**31 - 1, integer=True)
        check_number("close_timeout", close_timeout, 0, 3600)
        if not isinstance(user_agent, str):
            raise ConfigError("user_agent", user_agent, "must be a string")
        if auth_secret is not None and not isinstance(auth_secret, (str, bytes)):
            raise ConfigError("auth_secret", "<hidden>", "must be str or bytes")
        if auth_secret is not None and not auth_secret:
            raise ConfigError("auth_secret", "<hidden>", "must not be empty")
        if isinstance(auth_secret, str):
            try:
                auth_secret = auth_secret.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError("auth_secret", "<hidden>", "is a str that cannot be encoded as UTF-8 (lone surrogates); pass bytes") from None
        for name, value in (("client_id", client_id), ("hostname", hostname)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, value, "must be a non-empty string")
        for name, value in (("tls_v1", tls_v1), ("snappy", snappy), ("deflate", deflate)):
            if not isinstance(value, bool):
                raise ConfigError(name, value, "must be True or False")
        if tls_options is not None and not isinstance(tls_options, Mapping) and type(tls_options).__name__ != "SSLContext":
            raise ConfigError("tls_options", tls_options, "must be an ssl.SSLContext or a dict of options")
        hostname = hostname if hostname is not None else socket.gethostname()
        # Eager: every IDENTIFY value is checked here, not by a fatal E_BAD_BODY later.
        if client_id is None:
            client_id = hostname.split(".")[0]
        self._identify_data = build_identify(
            client_id=client_id,
            hostname=hostname,
            user_agent=user_agent,
            heartbeat_interval=heartbeat_interval,
            output_buffer_size=output_buffer_size,
            output_buffer_timeout=output_buffer_timeout,
            tls_v1=tls_v1,
            snappy=snappy,
            deflate=deflate,
            deflate_level=deflate_level,
            sample_rate=sample_rate,
            msg_timeout=msg_timeout,
        )
        # Checked even without tls_v1, so a typo in tls_options never goes unnoticed.
        if tls_v1 or tls_options is not None:
            from .transport.tls import make_ssl_context

            self._ssl_context = make_ssl_context(tls_options)
            if not tls_v1:
                _warn_once(
                    "tls_options",
                    "tls_options were given but tls_v1 is False: connections are NOT encrypted (pass tls_v1=True to use them)",
                )
        else:
            self._ssl_context = None
        if snappy:
            from .transport.compression import snappy_available

            if not snappy_available():
                raise ConfigError("snappy", snappy, "python-snappy is not installed; pip install 'nsq_sync[snappy]'")

        self.host = host
        self.port = port
        self.timeout = float(timeout)
        self.heartbeat_interval = heartbeat_interval
        self.requeue_delay = requeue_delay
        self.max_requeue_delay = max_requeue_delay
        self.tls_v1 = tls_v1
        self.tls_options = tls_options
        self.snappy = snappy
        self.deflate = deflate
        self.deflate_level = deflate_level
        self.user_agent = user_agent
        self.output_buffer_size = output_buffer_size
        self.output_buffer_timeout = output_buffer_timeout
        self.sample_rate = sample_rate
        self.msg_timeout = msg_timeout
        self.close_timeout = close_timeout
        self.hostname = hostname
        self.client_id = client_id
        self.max_frame_size = max_frame_size
        self._auth_secret = auth_secret

        self.backend = get_backend(backend)
        self._signal = getattr(self.backend, "signal", None) or self._held_lock
        if worker_pool is not None and not isinstance(worker_pool, WorkerPool):
            raise ConfigError("worker_pool", worker_pool, "must be a nsq_sync WorkerPool")
        self._own_pool = worker_pool is None
        self._pool = worker_pool
        self.state = INIT
        self.in_flight = 0
        self._inflight: Dict[bytes, Message] = {}
        self._queued = 0  # messages handed to the worker pool and not yet started
        self._received_total = 0  # messages nsqd delivered here, counted on arrival (Reader.stats)
        self._expired_total = 0  # messages taken back unrun: they waited past msg_timeout (_drop_stale)
        #: FINs and REQs nsqd refused (E_FIN_FAILED, E_REQ_FAILED: it had timed the message out, so
        #: the answer did nothing), counted as they arrive (Reader.stats)
        self._fin_failed_total = 0
        self._req_failed_total = 0
        #: FINs queued (_finish_message), counted under the lock that takes the message out of
        #: in_flight: a Reader's stats never show one gone from in_flight and not finished
        self._finished_total = 0
        self._touched_total = 0  # TOUCHes sent for messages that waited for a worker (_touch_waiting, _touch_picked_up)
        #: answers to requests (nsqd's OK to a PUB, MPUB, DPUB or SUB), counted by the one reading
        #: them (Writer.stats)
        self._answered_total = 0
        #: set by an owner (a Writer): called with a request's waiter and the error after the
        #: connection failed it (an error frame, the connection's end, a close before it was sent)
        self._request_failed: Optional[Callable[[Any, BaseException], None]] = None
        #: no message waiting for a worker is due a TOUCH before this (monotonic; see _touch_waiting)
        self._touch_due = 0.0
        #: the worker pool's message lane, once messages were handed to it (its clock: _deliver)
        self._lane: Any = None
        #: a message picked up this long (s) after it arrived or was last touched is touched
        #: first (_touch_picked_up); set from the msg_timeout nsqd negotiated
        self._pickup_touch_after = PICKUP_TOUCH_SHARE * float(msg_timeout or 60.0)
        #: answers nsqd refused (E_FIN_FAILED...), and copies it replaced by delivering them
        #: again, and messages that waited for a worker past msg_timeout, each warned about at
        #: most every LATE_WARNING_SECONDS with its own count
        self._late = WarningTally(LATE_WARNING_SECONDS)
        self._redelivered = WarningTally(LATE_WARNING_SECONDS)
        self._expired = WarningTally(LATE_WARNING_SECONDS)
        self._forgotten = WarningTally(LATE_WARNING_SECONDS)  # (nsqd went past RDY: _forget_oldest_locked)
        #: answers to messages whose connection had ended (_answer_lost): the owner's report
        #: (a Reader sets it), else counted here and warned about at most every 10 s
        self._lost_answers: Optional[Callable[[Message, Error], None]] = None
        self._lost_tally = WarningTally(10.0)
        #: set by an owner (the Reader): at a graceful close, called with the messages still
        #: queued for a worker (taken back from the pool: their listeners will not run)
        self._hand_back: Optional[Callable[[List[Message]], None]] = None
        #: set by an owner (the Reader): called with this connection after each FIN is queued,
        #: before the "resume" listeners (its way out of backoff). The owner's own hot path
        #: finishes with _finish_message(message, False) and decides inline: a listener call
        #: less per consumed message.
        self._owner_finished: Optional[Callable[[AsyncConn], None]] = None
        self._hold_max = 1  # answers held back at most: half the RDY count (see _queue_answer_locked)
        self._held_head: Optional[bytes] = None  # the first write queued when the reader task last looked...
        self._held_seen = 0.0  # ...and when (see _read_holding)
        self._quiet_since: Optional[float] = None  # _read_holding's first read that found nothing
        self.rdy = 0
        self.last_rdy = 0
        #: the highest RDY this connection ever sent: an honest nsqd never has more messages in
        #: flight here (see _beyond_rdy_locked)
        self._rdy_peak = 0
        self.max_rdy_count = MAX_RDY_COUNT_DEFAULT
        self.last_recv_timestamp = time.time()
        self.last_msg_timestamp = time.time()
        self.identify_response: Optional[Dict[str, Any]] = None
        #: (msg_timeout, max_msg_timeout) in seconds from the IDENTIFY answer, for Message.time_left
        self.message_timeouts: Optional[Tuple[float, float]] = None
        self.auth_response: Optional[Dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        #: set by the Reader that owns this connection (pynsq keeps per-connection Reader state here)
        self.rdy_timeout: Any = None
        #: ``handler(conn, future)`` for requests nsqd provably never ran because a fatal error
        #: came before them; the Writer re-sends them elsewhere on the same Future (``future.command``).
        #: Without a handler they fail with ConnectionClosedError whose ``unprocessed`` is True.
        self.unprocessed_handler: Any = None

        self._stream: Any = None
        self._raw_sock: Optional[socket.socket] = None
        self._decoder = FrameDecoder(max_frame_size)
        self._decoder.build_messages(Message, self)
        self._lock = self.backend.lock()  # counters, responded flags, pending requests
        self._write_lock = self.backend.lock()  # held by the one task draining the write queue
        self._writes: Deque[bytes] = collections.deque()
        self._pending: Deque[Future] = collections.deque()
        self._reader: Any = None
        self._read_token = self.backend.lock()  # whoever holds it is the only one reading
        self._read_ended = False
        self._want_lead = False  # a blocking request waited on the reader task
        self._parked = False  # the reader task leaves reading to the callers
        self._last_led = 0.0
        self._wake_reader = self.backend.event()
        # Thread backend: after a read of messages the reader task parks and the pool worker
        # that runs out of work reads next (no thread hand-off per read; see _lead_read).
        self._workers_lead = getattr(self.backend, "name", "") == "thread"
        self._lead_offered = False
        self._blocking = False  # a blocking socket after the handshake: reads poll first (see _handshake)
        self._recv_slice: Optional[float] = None  # set when the kernel bounds each recv (see _handshake)
        #: a Writer's lane (see _lane_request): no reader task; whoever holds the lane reads
        self._lane = False
        self._lane_clean = False  # _lane_request: the last exchange left nothing pending or buffered
        #: _lane_request on plain TCP: the socket's recv_into and the stream's buffer (one
        #: read without SocketStream.read_some's call, view and pending check)
        self._lane_recv_into: Optional[Any] = None
        self._lane_buffer: Optional[bytearray] = None
        #: _quick_request's own read, set at its first call: the socket's recv_into and the
        #: stream's buffer, nsqd's OK as it arrives (plain, or in snappy's framing), and the
        #: snappy layer's chunk reader (its reads bypass the layer: see _quick_request)
        self._quick_recv_into: Optional[Any] = None
        self._quick_buffer: Optional[bytearray] = None
        self._quick_ok = _OK_FRAME
        self._quick_snappy: Optional[Any] = None
        self._quick_set = False  # no direct read, ever (deflate): _quick_read_setup looked once
        self._tls: Optional[Any] = None  # the TLSStream under any compression layer, once upgraded
        self._write_stall: Optional[SendError] = None  # set when a write timed out (see _write_failed)
        #: seconds a write may make no progress before the connection closes: the staleness
        #: limit (two heartbeat intervals), or this when an owner set it lower before connect()
        self._send_stall_limit: Optional[float] = None
        self._send_stall_after: Optional[float] = None
        #: one send of the bytes given, returning how many the socket took: on plain TCP a send
        #: that waits at most SEND_SLICE_SECONDS for room (set in _handshake), else the stream's
        #: sendall (all of it, or an error)
        self._send_some: Callable[[Any], int] = self._send_whole
        #: _send_some never waits for room (gevent): _send_rest waits with this, a slice at a time
        self._send_wait: Optional[Callable[[float], Any]] = None
        self._partial: Any = None  # the rest of a command cut short, first in _writes (see _requeue)
        self._stalled_since: Optional[float] = None  # last progress of a write handed on unfinished
        self._close_at: Optional[float] = None  # close()'s final drain: writers stop here (_send_rest)
        self._deferred = False  # requests queued behind an unanswered one (see _request)
        self._subscribed = False
        self._closing = False
        self._connecting: Any = None  # the task running connect(), while it runs
        self._close_firer: Any = None  # the task running close listeners outside the pool (wait_closed)
        #: a Reader's or Writer's connection: they report its end with their own warning, so
        #: the connection logs it at DEBUG (one line per outage, not two)
        self._owned = False
        #: a label its log lines start with ("orders:billing: 10.0.0.1:4150: ..."), so that the
        #: consumers or producers of one process on the same nsqd can be told apart: a Reader sets
        #: its name, a Writer its name; None: the address alone. Log lines only (not id, errors)
        self.owner: Optional[str] = None
        #: time.time() of a caller's timeout waiting for an answer here (set by a Writer): while
        #: nothing arrived since (last_recv_timestamp older), the nsqd looks hung
        self._timed_out_at = 0.0
        self._close_fired = False
        self._close_wait = self.backend.event()
        self._drained = self.backend.event()
        self._closed_event = self.backend.event()

    # ------------------------------------------------------------------ state
    @property
    def id(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _log_prefix(self) -> str:
        """What this connection's log lines start with: its owner's label and ": ", or nothing."""
        return f"{self.owner}: " if self.owner else ""

    @property
    def _log_id(self) -> str:
        """The connection in a log line: "host:port", after its owner's label (see owner)."""
        return f"{self.owner}: {self.id}" if self.owner else self.id

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<AsyncConn {self.host}:{self.port} state={self.state} rdy={self.rdy} in_flight={self.in_flight}>"

    def connected(self) -> bool:
        return self.state == CONNECTED

    def connecting(self) -> bool:
        return self.state == CONNECTING

    def closed(self) -> bool:
        return self.state in (INIT, DISCONNECTED)

    def is_starved(self) -> bool:
        """The guide's rule: messages in flight reached 85% of the last RDY.

        Counted as in pynsq, where a handler runs as soon as its message is read: messages
        handed to listeners and not answered, not those still queued for a worker (with a
        batching handler and concurrency=1 the first of a read would see them all)."""
        with self._lock:  # (the reader task counts a read's messages in both at once)
            handed = self.in_flight - self._queued
        return handed > 0 and handed >= (self.last_rdy * 0.85)

    @property
    def worker_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(1, self.backend, name=f"nsq_sync-{self.id}")
        return self._pool

    # -------------------------------------------------------------- handshake
    def connect(self) -> "AsyncConn":
        """Connect and run the whole handshake; returns self once ``ready`` has fired.

        Raises ConnectError (TCP connect failed or timed out, or a timeout during the
        handshake), TLSError, AuthRequiredError, a ServerError subclass for an error
        frame, ProtocolError for an unparseable answer. On failure ``error`` and
        ``close`` fire and the connection is closed. A close() while it runs (from another
        thread, or a connect/identify/auth listener) makes it raise ConnectionClosedError;
        only ``close`` fires then.
        """
        if self.state != INIT:
            raise ConfigError("state", self.state, "connect() can be called once, on a new connection")
        self.state = CONNECTING
        self._connecting = self.backend.current()
        try:
            self._handshake()
            with self._lock:  # (a close() from now on finds the reader task to join)
                self._connecting = None
                closed = self._closing
                if not closed and not self._lane:
                    self._reader = self.backend.spawn(self._read_loop, name=f"nsq_sync-reader-{self.id}")
            if closed:
                raise self._closed_while_connecting()
        except BaseException as exc:
            with self._lock:
                self._connecting = None
                closed = self._closing
            if closed and isinstance(exc, Exception):
                # close() was called meanwhile (from another thread, or from a connect,
                # identify or auth listener): whatever cut the handshake short is our own doing.
                error: BaseException = exc if isinstance(exc, ConnectionClosedError) else self._closed_while_connecting()
            else:
                error = self._translate_handshake_error(exc)
                self.error = error
            self._teardown_socket()
            if self._stream is not None:
                self._stream.close()  # now: the error's traceback keeps this object alive for a while
            self.state = DISCONNECTED
            self._fail_pending(error)
            if not closed:
                self._fire("error", conn=self, error=error)
            self._fire_close_sync()
            if self._own_pool and self._pool is not None:
                self._pool.close(wait=False)
            if error is exc:
                raise
            raise error from exc
        return self

    def _closed_while_connecting(self) -> ConnectionClosedError:
        return ConnectionClosedError(f"the connection to {self.id} was closed while connect() ran")

    def _translate_handshake_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, Error):
            return exc
        ssl = sys.modules.get("ssl")
        if ssl is not None and isinstance(exc, ssl.SSLError):
            return TLSError(f"TLS handshake with {self.id} failed: {exc}")
        if isinstance(exc, socket.timeout):
            return ConnectError(f"timed out after {self.timeout}s during the handshake with {self.id}")
        if isinstance(exc, OSError):
            return ConnectError(f"cannot connect to {self.id}: {exc}")
        return exc

    def _handshake(self) -> None:
        try:
            sock = self.backend.create_connection((self.host, self.port), self.timeout)
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.id}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - not every socket family has it
            pass
        sock.settimeout(self.timeout)
        with self._lock:  # a close() from here on shuts this socket; one before, we see
            closed = self._closing
            if not closed:
                self._raw_sock = sock
                self._stream = SocketStream(sock)
        if closed:
            sock.close()
            raise self._closed_while_connecting()
        self._stream.sendall(MAGIC_V2)
        self.state = CONNECTED
        self._fire("connect", conn=self)

        identify = dict(self._identify_data)
        self._fire("identify", conn=self, data=identify)
        self._stream.sendall(commands.identify(identify))
        response = parse_identify_response(self._read_response("IDENTIFY"))
        if response is None:
            # A plain OK: a server that negotiates nothing. Going on without the TLS that was
            # asked for would send every body in clear text (and the AUTH secret, if asked).
            if self.tls_v1:
                raise TLSError(f"tls_v1 was asked for but {self.id} answered IDENTIFY without negotiating features (a plain OK)")
            self._warn_not_offered({})
            self.identify_response = {}
        else:
            self.identify_response = response
            if "msg_timeout" in response:
                timeout = response["msg_timeout"] / 1000.0
                self.message_timeouts = (timeout, response.get("max_msg_timeout", 0) / 1000.0 or timeout)
                self._pickup_touch_after = max(PICKUP_TOUCH_SHARE * timeout, ANSWER_HOLD_SECONDS)
            self.max_rdy_count = int(response.get("max_rdy_count", MAX_RDY_COUNT_DEFAULT))
            self._fire("identify_response", conn=self, data=response)
            if self.tls_v1 and response.get("tls_v1"):
                self._upgrade_tls()
                self._expect_ok("TLS upgrade")
            elif self.tls_v1:
                raise TLSError(f"tls_v1 was asked for but {self.id} has no TLS configured")
            if self.snappy and response.get("snappy"):
                self._stream = SnappyStream(self._stream, leading=self._decoder.take_unconsumed())
                self._expect_ok("snappy upgrade")
                if self._tls is None:
                    self._wake_for_whole_chunks()
            elif self.deflate and response.get("deflate"):
                self._stream = DeflateStream(self._stream, response.get("deflate_level", self.deflate_level), self._decoder.take_unconsumed())
                self._expect_ok("deflate upgrade")
            else:
                self._warn_not_offered(response)
            if response.get("auth_required"):
                if not self._auth_secret:
                    raise AuthRequiredError(f"{self.id} requires AUTH but no auth_secret was given")
                if self._tls is None:
                    # nsqd may ask for AUTH without offering TLS (or without tls_v1 asked
                    # for): nsqd's protocol has no other way, so the secret goes as it is.
                    _warn_once(
                        "auth_in_clear",
                        f"{self.id} requires AUTH on a connection without TLS: the auth secret is sent in clear text "
                        "(configure TLS on nsqd and pass tls_v1=True to encrypt it)",
                    )
                self._fire("auth", conn=self, data=self._auth_secret)
                self._stream.sendall(commands.auth(self._auth_secret))
                self.auth_response = parse_json_object(self._read_response("AUTH"), "AUTH")
                self._fire("auth_response", conn=self, data=self.auth_response)
        # From here on the reader owns reads; the socket timeout is the staleness limit.
        self._stale_after = self._read_timeout()
        # A plain socket becomes blocking: every read first waits for data with poll (with the
        # staleness limit, or a caller's deadline), so the timeout Python would otherwise
        # check with a poll of its own before each recv and send is not needed. TLS keeps its
        # own waits (its socket is non-blocking), bounded by the same limit.
        self._blocking = isinstance(self._raw_sock, socket.socket) and not self.tls_v1
        native = self._blocking and self._workers_lead and sys.platform != "win32"
        # A write that makes no progress for the staleness limit (nsqd stopped reading) fails
        # and closes the connection (_write_failed). The reader task may be the writer (it
        # flushes requests queued behind an answer), and then nobody else would notice. The
        # kernel bounds a native socket's sends (SO_SNDTIMEO); a gevent socket keeps its own
        # timeout (its reads only start once data is there, so it bounds the writes' waits).
        # An owner whose callers wait less may bound a write's stall more tightly (a Writer:
        # its publish_timeout, see _send_stall_limit); TLS keeps the staleness limit, which
        # its stream timeout also applies to reads.
        stall = self._stale_after
        limit = self._send_stall_limit
        if limit is not None and (stall is None or limit < stall) and self._blocking:
            stall = limit
        self._send_stall_after = stall
        cooperative = self._blocking and getattr(self.backend, "name", "") == "gevent"
        self._stream.settimeout(stall if cooperative else self._stale_after if not self._blocking else None)
        # Plain TCP writes in slices (_send_some, SEND_SLICE_SECONDS): a write the socket cannot
        # take at once goes on in _send_rest, which counts the stall from the last progress and
        # lets a caller with a deadline hand the rest on. A compressed stream keeps whole writes,
        # each send bounded by the stall limit (its bytes cannot be cut and queued again).
        plain = self._stream.__class__ is SocketStream
        if cooperative and plain:
            # gevent's send waits for room with the socket's own timeout (its timeout argument
            # only says whether to wait at all): it sends without waiting, and _send_rest waits
            # for room a slice at a time
            self._send_some = functools.partial(self._raw_sock.send, timeout=0.0)  # type: ignore[union-attr]
            self._send_wait = functools.partial(self.backend.wait_writable, self._raw_sock)
        if native:
            if plain or stall is not None:
                try:
                    self._raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_SLICE_SECONDS if plain else stall))
                    if plain:
                        self._send_some = self._raw_sock.send  # type: ignore[union-attr]
                except (OSError, AttributeError, struct.error):
                    pass  # unbounded writes: the reader task's staleness check still shuts them down
            # A caller waiting for its answer (request_wait) then recvs at once, without a
            # poll before it: one syscall less per publish, about 10% of a serial publish's
            # time. Its deadline is checked between slices, and its last part polled.
            try:
                self._raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(RECV_SLICE_SECONDS))
                self._recv_slice = RECV_SLICE_SECONDS
            except (OSError, AttributeError, struct.error):
                pass  # no slices: a caller polls first, as every other reader does
        self._wait_data = functools.partial(self.backend.wait_readable, self._raw_sock)
        make_waiter = getattr(self.backend, "readable_waiter", None)
        if make_waiter is not None:
            try:
                self._wait_data = make_waiter(self._raw_sock)
            except (TypeError, ValueError, OSError):
                pass  # not a real socket (tests): the generic wait does
        # (taken with the mark: a ready listener added from now on is _late_listener's, never both)
        for callback in self._mark_fired(*HANDSHAKE_EVENTS)["ready"]:
            self._call_listener("ready", callback)

    def _call_listener(self, name: str, callback: Callable[..., Any]) -> None:
        try:
            callback(conn=self)
        except Exception:
            logger.exception("%slistener %r for %r on %s raised", self._log_prefix, callback, name, self.id)

    def _late_listener(self, name: str, callback: Callable[..., Any]) -> None:
        """on() for a handshake event after connect() returned. In pynsq connect() only starts
        the handshake, so listeners added right after it still see every handshake event; here
        they have all fired. A late ``ready`` listener (pynsq code subscribes in it) is called
        once on the control lane, as if it had been added in time; any other is warned about."""
        if name == "ready" and self.state == CONNECTED:
            try:
                self.worker_pool.control.submit(self._fire_late_ready, callback)
                return
            except RuntimeError:
                pass  # (the pool is closed: so is the connection)
        _warn_handshake_over(name, self.id)

    def _fire_late_ready(self, callback: Callable[..., Any]) -> None:
        if self.state == CONNECTED and callback in self._listeners.get("ready", ()):  # (not off() meanwhile)
            self._call_listener("ready", callback)

    def _warn_not_offered(self, response: Dict[str, Any]) -> None:
        """Compression asked for and not offered: the connection goes on uncompressed (as
        pynsq's and go-nsq's do), and says so once."""
        for name in ("snappy", "deflate"):
            if getattr(self, name) and not response.get(name):
                logger.warning("%s%s was asked for but %s does not offer it; the connection is not compressed", self._log_prefix, name, self.id)

    def _wake_for_whole_chunks(self) -> None:
        """Snappy over plain TCP: let the kernel wake a reader only once a chunk can be whole.

        nsqd writes each snappy chunk in two parts: its 8-byte header (type, length,
        checksum), then its data. A reader that wakes between the two reads the header
        alone, decodes nothing, and sleeps again until the data comes: a second wake-up for
        20-40% of the answers when publishing one at a time. No chunk nsqd writes is
        shorter than 9 bytes, so SO_RCVLOWAT=9 spares that wake-up (blocking recv, poll and
        epoll all honour it; a read with a timeout, and the end of the stream, still return
        fewer bytes). Inside a chunk (a read that ended in its middle) the mark is what can
        complete it, if less: a fixed 9 left a chunk 1-8 bytes short until nsqd sent more.
        """
        sock = self._raw_sock
        stream = self._stream
        if not isinstance(sock, socket.socket) or not hasattr(socket, "SO_RCVLOWAT") or not hasattr(stream, "follow_lowat"):
            return

        def set_lowat(count: int) -> None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
            except OSError:
                pass  # not settable here (some platforms): every partial chunk wakes the reader

        stream.follow_lowat(set_lowat)

    def _read_timeout(self) -> Optional[float]:
        if self.heartbeat_interval == -1:
            return None
        return max(2 * float(self.heartbeat_interval), self.timeout)

    def _upgrade_tls(self) -> None:
        if self._decoder.buffered:
            raise ProtocolError(f"{self.id} sent data before the TLS handshake")
        assert self._ssl_context is not None and self._raw_sock is not None
        import ssl

        from .transport.tls import TLSStream

        try:
            tls_sock = self._ssl_context.wrap_socket(self._raw_sock, server_hostname=self.host, do_handshake_on_connect=False)
            tls_sock.settimeout(self.timeout)
            tls_sock.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(f"TLS certificate of {self.id} was not accepted: {exc.verify_message or exc}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise TLSError(f"TLS handshake with {self.id} failed: {exc}") from exc
        self._raw_sock = tls_sock
        self._stream = self._tls = TLSStream(tls_sock, self.backend.wait_readable, self.backend.wait_writable, self.backend.lock(), self.timeout)

    def _read_frame(self, what: str):
        # One frame at a time: bytes after it may belong to the next layer (TLS, compression).
        # The whole answer within the timeout (each recv's own timeout does not bound a peer
        # that trickles a byte at a time), and no larger than any handshake answer can be.
        decoder = self._decoder
        deadline = time.monotonic() + self.timeout
        received = 0
        head = b""  # the answer's first bytes, shown when they are not NSQ's protocol
        while True:
            try:
                frames = decoder.feed(b"", 1) if decoder.buffered else []
            except ProtocolError as exc:
                raise self._not_nsq(what, head, exc) from None
            if not frames:
                if time.monotonic() >= deadline:
                    raise ConnectError(f"timed out after {self.timeout}s waiting for the answer to {what} from {self.id} (it came in part)")
                try:
                    data = self._stream.recv(READ_SIZE)
                except ConnectionResetError:
                    if not received and self._tls_port(what):
                        raise self._not_nsq_tls(what) from None
                    raise
                if not data:
                    if not received and self._tls_port(what):
                        raise self._not_nsq_tls(what)
                    raise ConnectionClosedError(f"{self.id} closed the connection during {what}")
                received += len(data)
                if received > HANDSHAKE_ANSWER_MAX:
                    raise ProtocolError(f"{self.id} sent more than {HANDSHAKE_ANSWER_MAX} bytes in answer to {what}; nsqd's are far smaller")
                if len(head) <= HANDSHAKE_SHOWN:
                    head += bytes(data[: HANDSHAKE_SHOWN + 1 - len(head)])
                try:
                    frames = decoder.feed(data, 1)
                except ProtocolError as exc:
                    raise self._not_nsq(what, head, exc) from None
            for frame_type, payload in frames:
                if frame_type == FRAME_TYPE_RESPONSE and payload == HEARTBEAT:
                    self._stream.sendall(commands.nop())
                    continue
                # nsqd answers each handshake step before anything else can arrive.
                return frame_type, payload

    def _not_nsq(self, what: str, head: bytes, exc: ProtocolError) -> ProtocolError:
        """The frame decoder's *exc* for an answer to a handshake step that is not NSQ's
        protocol, saying who sent it and its first bytes (*head*): the commonest cause is an
        address that is not nsqd's TCP port, and those bytes say what answered instead."""
        shown = ""
        if head:
            shown = " with " + repr(head[:HANDSHAKE_SHOWN]) + ("..." if len(head) > HANDSHAKE_SHOWN else "")
        hint = ""
        if head[4:6] == b"E_" and len(head) >= 8:
            # nsqlookupd's TCP port answers a magic it does not speak with a bare size and
            # "E_BAD_PROTOCOL", no frame type (nsqd frames its errors)
            hint = ": an error without a frame type, as nsqlookupd sends; is this nsqlookupd's TCP port instead of nsqd's?"
        return type(exc)(f"{self.id} answered {what}{shown}, not NSQ's protocol: {exc}{hint}")

    def _tls_port(self, what: str) -> bool:
        """Whether the peer that closed the connection on *what* without a byte of answer is a
        TLS server (one more connection to it, with a ClientHello, within the timeout).

        A TLS server, nsqd's HTTPS port above all (nsqd --https-address), reads NSQ's magic
        and IDENTIFY as a TLS record header that makes no sense and closes without a word:
        before, that was a ConnectionClosedError, which may pass, so a Writer's publish waited
        out its whole publish_timeout. Only on the first step (IDENTIFY, before any TLS of our
        own): a close there by anything else (a proxy with no backend, an nsqd shutting down)
        stays a ConnectionClosedError.
        """
        if what != "IDENTIFY" or self._tls is not None or self._closing:
            return False
        try:
            from .transport.tls import answers_tls
        except ImportError:  # pragma: no cover - a Python without ssl
            return False
        try:
            sock = self.backend.create_connection((self.host, self.port), self.timeout)
        except OSError:
            return False
        return answers_tls(sock, self.timeout)

    def _not_nsq_tls(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"{self.id} closed the connection on {what} without answering, and answers a TLS handshake: it speaks TLS, "
            "not NSQ's protocol; is this nsqd's HTTPS port instead of its TCP port?"
        )

    def _read_response(self, what: str) -> bytes:
        frame_type, payload = self._read_frame(what)
        if frame_type == FRAME_TYPE_ERROR:
            raise error_from_frame(payload)
        if frame_type != FRAME_TYPE_RESPONSE:
            raise ProtocolError(f"expected a response to {what} from {self.id}, got frame type {frame_type}")
        return payload

    def _expect_ok(self, what: str) -> None:
        payload = self._read_response(what)
        if payload != b"OK":
            raise ProtocolError(f"expected OK after {what} from {self.id}, got {payload[:64]!r}")

    # ----------------------------------------------------------------- reader
    # Reading the socket is a token (``_read_token``): whoever holds it is the only one
    # reading. Usually that is the reader task. A blocking request on a connection that is
    # not subscribed (Writer.pub, mpub) may take the token itself when it is free and read
    # its own answer (request_wait): no hand-off from the reader task to the caller, which
    # on CPython costs more than the round trip. When a blocking request found the reader
    # task holding the token, the reader task parks once nothing is pending, so the next
    # caller finds the token free. A parked reader task wakes for requests nobody else
    # waits on (pub_async, callbacks), when a caller leaves answers pending, at close, and
    # when no caller has read for PARK_SECONDS (heartbeats, a close by nsqd).
    def _read_loop(self) -> None:
        token = self._read_token
        try:
            with token:
                if self._decoder.buffered and not self._read_ended:
                    # Frames that came with the last handshake answer (a heartbeat at most).
                    try:
                        self._handle_frames(self._decoder.feed(b""))
                    except BaseException as exc:
                        self._end_reading(exc)
                        return
            while True:
                token.acquire()
                try:
                    if self._read_ended:
                        return
                    park = self._should_park()
                    if not park:
                        if not self._queued:
                            self._read_once(None)
                        elif self._hold_max > 1 or self._writes:
                            self._read_holding()
                        else:
                            # (With RDY under 4 no answer is ever held back: a read with a
                            # 5 ms deadline would only cost a timer per message.)
                            self._read_waiting()
                finally:
                    token.release()
                if park:
                    self._park()
        except _ReadEnded:
            return
        except BaseException as exc:  # pragma: no cover - _read_once reports its own failures
            with token:
                if not self._read_ended:
                    self._end_reading(exc)

    def _read_holding(self) -> None:
        """The reader task's read while messages wait for a worker: answers may be held back
        for them (_queue_answer_locked) while the worker that would send them runs a handler
        of any length. So it reads with a short deadline, and sends what has been held since
        its last look: no finished message's FIN waits for another message's handler (nor,
        with handlers slower than msg_timeout, for nsqd to deliver it again)."""
        now = time.monotonic()
        if now >= self._touch_due:
            self._touch_waiting(now)
        try:
            head = self._writes[0]
        except IndexError:
            head = None
        if head is not None and head is self._held_head:
            if now - self._held_seen >= ANSWER_HOLD_SECONDS:
                self._held_head = None
                try:
                    self._flush(0.0)
                except Error:
                    pass  # the write side failed; the read below meets the close
        else:
            self._held_head, self._held_seen = head, now
        if self._read_once(now + ANSWER_HOLD_SECONDS):
            return
        # Silent since (about) then: stale after the limit (monotonic: a step of the wall
        # clock must not close a healthy connection).
        quiet = self._quiet_since
        if quiet is None:
            self._quiet_since = now
            return
        self._end_if_stale(quiet)

    def _end_if_stale(self, quiet: float) -> None:
        """After a read that got nothing: end reading (StaleConnectionError) when the
        connection has been silent since *quiet* for the staleness limit."""
        stale = self._stale_after
        if stale is not None and not self._closing and time.monotonic() - quiet >= stale:
            self._end_reading(self._stale_error())
            raise _ReadEnded()

    def _read_waiting(self) -> None:
        """The reader task's read while messages wait for a worker and no answer is held back
        for them: it wakes by the time the oldest of them is due a TOUCH (_touch_waiting), or
        when the connection went silent for the staleness limit."""
        now = time.monotonic()
        if now >= self._touch_due:
            self._touch_waiting(now)
        deadline = self._touch_due
        quiet = self._quiet_since
        stale = self._stale_after
        if stale is not None and not self._closing:
            deadline = min(deadline, (now if quiet is None else quiet) + stale)
        if self._read_once(deadline):
            return
        if quiet is None:
            self._quiet_since = quiet = now  # (nothing came since this read began)
        self._end_if_stale(quiet)

    def _touch_waiting(self, now: float) -> None:
        """TOUCH this connection's messages that have waited for a worker for a quarter of
        msg_timeout or more since they arrived or were last touched, so that nsqd does not time
        them out while the workers get through the messages before them (prefetch deeper than
        the workers clear within msg_timeout); called by the holder of the read token once
        _touch_due passed, which this sets again.

        Only while the workers make progress: a callback started on the lane within the last
        msg_timeout, as it does at least that often when handlers finish within msg_timeout.
        When every worker is stuck (a hung handler), nothing is touched, so nsqd times the
        waiting messages out and _drop_stale takes them back as before: touching them would
        hold them here for good. Nor is a message touched past nsqd's max_msg_timeout (a
        TOUCH cannot extend it), or once its time is up by our clock (nsqd has timed it out,
        and delivers it again). The TOUCHes are queued under the lock that FIN and REQ take,
        so none follows an answer to its message (nsqd would refuse it: E_TOUCH_FAILED).

        Costs nothing per message: a scan of the queued work when the earliest due time
        passed, at most every msg_timeout/4 while touching (everything older than that is
        touched at once) and every msg_timeout/4 while the workers are stuck.
        """
        timeouts = self._timeouts()
        msg_timeout = timeouts[0]
        quarter = max(msg_timeout / 4, ANSWER_HOLD_SECONDS)  # (a peer's msg_timeout of 0 must not spin the reader)
        lane = self.worker_pool.messages
        if now - lane.last_began >= msg_timeout or self.state != CONNECTED:
            self._touch_due = now + quarter  # stuck (or closed): look again later
            return
        deliver = self._deliver
        waiting = lane.peek(lambda fn, message: fn == deliver)
        due = now + 2 * quarter  # (messages arriving later are due later)
        touches = []
        with self._lock:
            if self.state != CONNECTED:
                waiting = []  # (closed meanwhile: nothing to send)
            for message in waiting:
                if message._responded:
                    continue  # replaced by a newer copy, or forgotten (channel emptied)
                if not self._touch_gains(message, now, timeouts):
                    continue  # too late (nsqd timed it out), or nothing to gain (max_msg_timeout)
                start = getattr(message, "_touched", message._arrived)
                if now - start >= quarter:
                    message._touched = now
                    touches.append(b"TOUCH %s\n" % message.id)
                elif start + 2 * quarter < due:
                    due = start + 2 * quarter
            if touches:
                self._writes.append(b"".join(touches))
                self._touched_total += len(touches)
        self._touch_due = due
        if touches:
            try:
                self._flush(0.0)  # (no room: a flush task writes them; the reader goes on reading)
            except Error:
                pass  # the write side failed; the next read meets the close

    def _read_once(self, deadline: Optional[float], own: bool = False) -> bool:
        """One recv and its frames, by the holder of the read token.

        With a *deadline* (a caller reading its own answer), wait for data until then and
        return False if none came. Without one (the reader task), the stream's timeout is
        the staleness limit. Raises _ReadEnded once the connection is over (reported here).
        *own*: a publisher reads for its own answer (see the except below).
        """
        try:
            pending = self._stream.pending()
            if deadline is not None and not pending:
                data = self._read_before(deadline)
                if data is _NOTHING:
                    return False
            else:
                if not pending and self._blocking and not self._wait_data(self._stale_after):
                    if self._closing:
                        return False
                    raise self._stale_error()
                try:
                    data = self._stream.read_some(READ_SIZE)
                except socket.timeout:
                    if self._closing or deadline is not None:
                        return False
                    raise self._stale_error() from None
            if data is None:
                raise _Closed()
        except BaseException as exc:
            if own and isinstance(exc, getattr(self.backend, "thrown_at_waits", ())):
                # A gevent.Timeout around one request's pub(), or its greenlet killed (a web
                # server's request timeout): thrown in where it waited for data, so nothing was
                # read and the connection is whole. Only this caller stops waiting; its answer,
                # and the other callers', are read by the next reader (request_wait hands over).
                # Ending the connection here failed every publish pipelined on it.
                raise
            self._end_reading(exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit, GreenletExit: the connection is ended, the caller gets it
            raise _ReadEnded() from None
        self._process(data)
        return True

    def _process(self, data: Any) -> None:
        """The frames of *data* (b"" when a read completed nothing yet), read by the holder of
        the read token. Raises _ReadEnded once the connection is over (reported here)."""
        try:
            self.last_recv_timestamp = time.time()
            self._quiet_since = None  # (see _read_holding)
            if data:
                self._handle_frames(self._decoder.feed(data))
                if self._deferred:
                    self._send_deferred()
        except BaseException as exc:
            self._end_reading(exc)
            if not isinstance(exc, Exception):
                raise
            raise _ReadEnded() from None

    def _read_before(self, deadline: float) -> Any:
        """One read of what comes before *deadline*; _NOTHING when the deadline passed first.

        With _recv_slice (the kernel ends a blocking recv after that long without data) it
        recvs at once and checks the deadline between slices, polling only for the last
        part; otherwise it polls first.
        """
        slice_seconds = self._recv_slice
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _NOTHING
            if slice_seconds is None or remaining < slice_seconds:
                if not self._wait_data(remaining):
                    return _NOTHING
                tls = self._tls
                if tls is not None:
                    tls.deadline = deadline  # the rest of a TLS record may come late, or never
                try:
                    return self._stream.read_some(READ_SIZE)
                except socket.timeout:  # (TLS: the rest of a record did not come in time; OpenSSL keeps the part)
                    return _NOTHING
                finally:
                    if tls is not None:
                        tls.deadline = None
            try:
                return self._stream.read_some(READ_SIZE)
            except BlockingIOError:
                continue  # a slice with no data (EAGAIN from SO_RCVTIMEO)

    def _stale_error(self) -> StaleConnectionError:
        return StaleConnectionError(f"no data from {self.id} for {self._stale_after}s (two heartbeat intervals); closing it as stale")

    def _send_deferred(self) -> None:
        # Requests queued behind an answer that just came (see _request). Cleared before the
        # flush: a request deferred meanwhile either gets flushed here or keeps the flag set
        # for the answer it waits behind.
        self._deferred = False
        try:
            self._flush(0.0)  # (no room: a flush task writes them; the reader goes on reading)
        except Error:
            pass  # the write side is shut; the next read meets nsqd's close

    def _end_reading(self, exc: BaseException) -> None:
        """The connection is over: report it once (caller holds the read token)."""
        error: Optional[BaseException]
        if isinstance(exc, _Closed):
            # The end of the stream after _abort shut it: the reason _abort recorded (a stalled
            # or interrupted write) is the one to report, not the end it caused.
            error = None if self._closing else self._write_stall or self.error or ConnectionClosedError(f"{self.id} closed the connection")
        elif isinstance(exc, _FatalFrame):
            error = exc
        elif self._closing and isinstance(exc, (OSError, ValueError, SendError)):
            error = None  # our own close() shut the socket under the reader (or under its NOP)
        elif isinstance(exc, Error):
            error = exc
        elif isinstance(exc, OSError):
            # After _abort the peer may answer our shutdown with a reset: the reason _abort
            # recorded (a failed, stalled or interrupted write) is still the one to report.
            error = self._write_stall or self.error or ConnectionClosedError(f"connection to {self.id} failed: {exc}")
        elif not isinstance(exc, Exception):
            error = None if self._closing else self._interrupted(exc, "a read")
        else:
            logger.error("%sreader of %s crashed", self._log_prefix, self.id, exc_info=exc)
            error = ConnectionClosedError(f"reader of {self.id} crashed: {exc!r}")
        self._read_ended = True
        self._wake_reader.set()
        self._on_disconnect(error)

    def _should_park(self) -> bool:
        with self._lock:
            if self._closing:
                return False
            if self._lead_offered or (self._want_lead and not self._pending and not self._subscribed):
                self._want_lead = self._lead_offered = False
                self._parked = True
                self._wake_reader.clear()
                return True
            return False

    def _lead_read(self) -> bool:
        """Read once in place of the parked reader task (an idle pool worker calls this).

        Waits at most LEAD_WAIT_SECONDS for data. Returns True when it read something; the
        next idle worker is then offered the next read, so a busy consumer's reads, message
        handling and answers run on one worker thread without waking another. When nothing
        came, or someone else reads, the reader task takes over again. A worker stuck in a
        slow handler leads nothing: the reader task wakes after LEAD_PARK_SECONDS without a
        read and reads itself, so messages and heartbeats never wait behind a handler.
        """
        token = self._read_token
        if self._closing or self._read_ended or not token.acquire(False):
            return False
        self._last_led = time.monotonic()  # the parked reader task sees someone reading
        read = False
        try:
            if not self._read_ended:
                read = self._read_once(time.monotonic() + LEAD_WAIT_SECONDS)
        except _ReadEnded:
            pass  # reported by _read_once; the reader task is woken below
        finally:
            token.release()
            with self._lock:
                self._last_led = time.monotonic()
            if read and not self._closing:
                self.worker_pool.messages.offer_lead(self)
            else:
                self._wake_reader.set()
        return read

    def _park(self) -> None:
        wake = self._wake_reader
        # A consumer's reader task takes reading back soon when no worker read meanwhile
        # (the leading worker may be in a slow handler, and messages or heartbeats wait).
        limit = LEAD_PARK_SECONDS if self._subscribed else PARK_SECONDS
        while True:
            woken = wake.wait(limit)
            with self._lock:
                if woken or self._closing or self._read_ended or time.monotonic() - self._last_led >= limit:
                    self._parked = False
                    wake.clear()
                    return

    def request_wait(self, data: bytes, timeout: Optional[float] = None) -> bytes:
        """Write a command nsqd answers (PUB, MPUB, DPUB) and block until the answer.

        When nobody else is reading the connection, the calling thread reads the answer
        itself. Returns the answer (b"OK"). Raises the ServerError nsqd answered with,
        ConnectionClosedError when the connection closed (``unprocessed`` is True when
        nsqd provably never ran it, so sending it elsewhere is safe), TimeoutError when
        *timeout* passed first (the command may or may not have run).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"request_wait() takes command bytes, not {type(data).__name__}")
        if timeout is not None and not (timeout.__class__ is float and 0.0 <= timeout <= MAX_WAIT_SECONDS):
            check_timeout(timeout)  # (before anything is sent or the read token taken)
        if not data:
            raise ConfigError("data", data, "is an empty command")
        token = self._read_token
        if self._subscribed:
            return self._wait(self.request(data), timeout)
        if not token.acquire(False):
            # Someone else reads: wait for the answer on the backend's signal, a lock created
            # held (a Future's condition costs several times more, and this is the path of
            # many threads publishing).
            waiter = _WaitedAnswer(self._signal())
            self._request(data, waiter, lead=True)  # (no room to write: a flush task writes it)
            if not waiter.wait(timeout):
                waiter.abandoned = True
                if self._writes:
                    self._withdraw_abandoned()
                raise TimeoutError(f"no answer from {self.id} within {timeout}s; the command may or may not have run")
            if waiter.error is not None:
                raise waiter.error
            return waiter.value  # type: ignore[return-value]
        deadline = None if timeout is None else time.monotonic() + timeout
        answer: Any = None
        try:
            slice_seconds = self._recv_slice
            if slice_seconds is not None and (timeout is None or timeout >= slice_seconds) and time.time() - self.last_recv_timestamp <= IDLE_CHECK_SECONDS:
                # (a deadline within the first recv slice is kept by the general path's poll)
                answer = self._exchange(data, timeout, deadline)
                if answer.__class__ is bytes:
                    return answer  # (the finally below still runs)
            if answer is None:
                answer = _Answer()
                self._send_for_answer(data, answer, timeout)
            self._read_until_done(answer, deadline)
        except _ReadEnded:
            pass  # reported; the answer holds the reason
        finally:
            token.release()
            if answer.__class__ is bytes:
                # Fast path: no lock. A request another thread added meanwhile waits on a
                # parked reader task, which has to read it.
                self._last_led = time.monotonic()
                if self._parked and self._pending:
                    self._wake_reader.set()
            else:
                self._token_handed_back()
        return self._outcome(answer, timeout)

    def _token_handed_back(self) -> None:
        """After a caller that read for its own answer let go of the read token (the general
        path): note the time, which a parked reader task checks, and wake that task when
        requests are pending that nobody else will read."""
        with self._lock:
            self._last_led = time.monotonic()
            wake = self._parked and bool(self._pending)
        if wake:
            self._wake_reader.set()

    def _outcome(self, answer: "_Answer", timeout: Optional[float]) -> bytes:
        """What a caller that read for its own *answer* returns (the answer) or raises (nsqd's
        error, the connection's end, or TimeoutError when the answer is still to come)."""
        if answer.value is not None:
            return answer.value
        if answer.error is not None:
            raise answer.error
        raise TimeoutError(f"no answer from {self.id} within {timeout}s; the command may or may not have run")

    def _send_for_answer(self, data: bytes, answer: "_Answer", budget: Optional[float]) -> None:
        """request_wait's general path: queue *answer* and send *data* (the caller holds the read
        token), writing for at most *budget* seconds once the socket has no room (see _flush)."""
        if self._read_ended:
            raise self._not_sent()
        if time.time() - self.last_recv_timestamp > IDLE_CHECK_SECONDS and self._data_waiting(0):
            # Idle for a while: read what came meanwhile first (a heartbeat, or nsqd's
            # close, which is better seen before a publish goes out on a dead connection).
            try:
                self._read_once(None)
            except _ReadEnded:
                raise self._not_sent() from None
        write_lock = self._write_lock
        with self._lock:
            if self.state != CONNECTED:
                raise self._not_sent()
            self._pending.append(answer)
            # Nothing queued and nobody writing: send it here, without the queue. Taking the
            # write lock under the lock that orders requests keeps any request queued after
            # this one behind it on the wire (its sender finds the write lock held).
            direct = not self._writes and write_lock.acquire(False)
            if not direct:
                self._writes.append(data)
        try:
            if direct:
                try:
                    try:
                        sent = self._send_some(data)
                    except (BlockingIOError, socket.timeout):
                        sent = 0  # no room for a whole send slice
                    if sent != len(data):
                        self._queue_rest(data, sent)  # (sent on by _flush below)
                except (OSError, ValueError) as exc:
                    self._write_failed(exc)
                except BaseException as exc:
                    self._write_interrupted(exc)
                    raise
                finally:
                    write_lock.release()
                if self._writes:
                    self._flush(budget)  # queued while we wrote: we are its drainer
            else:
                self._flush(budget)
        except Error:
            pass  # write side shut: the read below meets nsqd's close

    def _exchange(self, data: bytes, budget: Optional[float], deadline: Optional[float]) -> Any:
        """request_wait's fast path: the caller holds the read token of a busy, healthy
        connection (native socket, read within IDLE_CHECK_SECONDS). With nothing else
        pending or queued it sends *data* itself and reads once (see _read_own_answer for a
        second read, within *deadline*, on the monotonic clock); when what it read is exactly
        nsqd's OK frame the answer is b"OK", with no waiter, lock or frame decoding (about
        a third of a publish's Python time, and with several threads publishing, time every
        other thread waits for the GIL). Otherwise it returns the request's _Answer, first
        in the pending queue, for request_wait's general loop to finish (what was read
        already went through the decoder), or None when it stood aside without sending.
        """
        write_lock = self._write_lock
        if not write_lock.acquire(False):
            return None
        # The write lock first, then the checks: a request another thread adds from here on
        # is written after this one (its sender finds the write lock held), so its answer
        # comes after ours; one added before is in _pending or _writes, and we stand aside.
        cut = None
        try:
            if self._pending or self._writes or self._deferred or self.state != CONNECTED or self._decoder.buffered or self._stream.pending() or self._listeners.get("response"):
                return None  # the general path
            try:
                sent = self._send_some(data)
            except (BlockingIOError, socket.timeout):
                sent = 0  # no room for a whole send slice
            except (OSError, ValueError) as exc:
                return self._send_failed(exc)
            except BaseException as exc:
                self._write_interrupted(exc)
                raise
            if sent != len(data):
                # The socket took only part (or none) of it: the rest goes first in the queue,
                # written below within the budget, then by a flush task (see _flush).
                cut = self._first_pending()
                self._queue_rest(data, sent)
        finally:
            write_lock.release()
        if self._writes:
            try:
                self._flush(budget)  # queued while we wrote: we are its drainer
            except Error:
                pass  # the write side is shut (ours went out before): the read meets the close
        if cut is not None:
            return cut  # (request_wait's reading loop waits for it until the deadline)
        return self._read_own_answer(deadline)

    def _first_pending(self) -> "_Answer":
        """A waiter for a command sent ahead of every pending one: its answer comes first."""
        answer = _Answer()
        with self._lock:
            self._pending.appendleft(answer)
        return answer

    def _send_failed(self, exc: BaseException) -> "_Answer":
        """The fast paths' write of their command failed (part of it may have gone out): its
        waiter, which the read after meets the close and fails."""
        answer = self._first_pending()
        try:
            self._write_failed(exc)
        except Error:
            pass
        return answer

    def _read_own_answer(self, deadline: Optional[float], clock: Callable[[], float] = time.monotonic) -> Any:
        """The fast paths' read after sending their command ahead of every pending one (one
        more when a compressed read decoded to nothing and *deadline*, on *clock*, leaves
        a recv slice for it: a read waits up to one).

        b"OK" when the bytes read are exactly nsqd's OK frame; otherwise the command's
        waiter, first in the pending queue, with what was read handled (or the end of the
        connection reported, which fails the waiter), for a reading loop to finish.
        """
        try:
            chunk = self._stream.read_some(READ_SIZE)
            if not chunk and chunk is not None and (deadline is None or deadline - clock() >= self._recv_slice):  # type: ignore[operator]
                # Compressed bytes that completed nothing (b""; a plain read is never empty, and
                # this test costs it one truth check, not a memoryview comparison). nsqd writes
                # a deflate answer's sync-flush marker in a write of its own; when the last
                # caller's read took the answer before it, the marker comes alone first (about
                # 1 serial publish in 6).
                # A snappy chunk can come cut too. The answer is still to come: one more read
                # (only one: a peer sending nothing but empty blocks meets the deadline checks;
                # none when the deadline is nearer than a slice: the reading loop polls for it).
                chunk = self._stream.read_some(READ_SIZE)
        except BlockingIOError:
            chunk = b""  # a recv slice passed without the answer: the reading loop waits on
        except BaseException as exc:
            answer = self._not_ok(None, exc)
            if not isinstance(exc, Exception):
                raise
            return answer
        if chunk == _OK_FRAME and not self._stream.pending():
            self.last_recv_timestamp = time.time()
            self._answered_total += 1  # (its caller holds the read token, or the lane)
            return b"OK"
        return self._not_ok(chunk)

    def _not_ok(self, chunk: Any, error: Optional[BaseException] = None) -> "_Answer":
        """The fast paths' read brought something else than the OK frame: *chunk* (b"" for
        nothing yet, None for the end of the connection, with the *error* that ended it).
        Returns the command's waiter, first in the pending queue, with *chunk* handled."""
        answer = self._first_pending()
        if chunk is None:
            self._end_reading(error or _Closed())  # fails the answer too
        elif chunk:
            try:
                self._process(chunk)
            except _ReadEnded:
                pass  # reported; the answer holds the reason
        return answer

    def _lane_request(self, data: bytes, timeout: float) -> bytes:
        """A publish on a Writer's lane: one caller at a time uses the connection, which has no
        reader task, so the caller sends and reads with nothing to coordinate (no read token,
        no write lock). Same answers and errors as :meth:`request_wait`.

        While the lane is busy (read within IDLE_CHECK_SECONDS) and its last exchange left
        nothing behind, one send and one read whose bytes are exactly nsqd's OK frame make
        the whole publish (a compressed stream may take a second read: see _read_own_answer).
        Anything else (a heartbeat, an error, a partial read, an idle lane, which may hold a
        heartbeat or nsqd's close) goes through request_wait.
        """
        began = time.time()
        if self._lane_clean and began - self.last_recv_timestamp <= IDLE_CHECK_SECONDS and timeout >= self._recv_slice:  # type: ignore[operator]
            try:
                sent = self._send_some(data)
            except (BlockingIOError, socket.timeout):
                sent = 0  # no room for a whole send slice
            except (OSError, ValueError) as exc:
                sent = -1
                answer: Any = self._send_failed(exc)
            except BaseException as exc:
                self._write_interrupted(exc)
                raise
            if sent != len(data):
                if sent >= 0:
                    # The socket took only part of it: the rest goes first in the queue, written
                    # within the timeout, then by a flush task (see _flush).
                    answer = self._first_pending()
                    self._queue_rest(data, sent)
                    try:
                        self._flush(timeout)
                    except Error:
                        pass  # the write side is shut: the read meets the close
            else:
                recv_into = self._lane_recv_into
                if recv_into is None:
                    answer = self._read_own_answer(began + timeout, time.time)
                    if answer.__class__ is bytes:
                        return answer  # type: ignore[no-any-return]
                else:
                    # _read_own_answer, inline: the lane's buffer is nobody else's.
                    buffer = self._lane_buffer
                    try:
                        count = recv_into(buffer)
                    except BlockingIOError:
                        answer = self._not_ok(b"")  # a recv slice passed: _finish_answer waits on
                    except BaseException as exc:
                        answer = self._not_ok(None, exc)
                        if not isinstance(exc, Exception):
                            raise
                    else:
                        if count == 10 and buffer.startswith(_OK_FRAME):  # type: ignore[union-attr]
                            self.last_recv_timestamp = time.time()
                            self._answered_total += 1  # (the lane's one caller)
                            return b"OK"
                        answer = self._not_ok(memoryview(buffer)[:count] if count else None)  # type: ignore[arg-type]
            self._lane_clean = False
            value = self._finish_answer(answer, timeout - (time.time() - began))
        else:
            value = self.request_wait(data, timeout)
        stream = self._stream
        self._lane_clean = (
            self._recv_slice is not None and self.state == CONNECTED and not self._pending and not self._writes
            and not self._write_lock.locked() and not self._decoder.buffered and not stream.pending()
        )  # (the fast path writes without the write lock: not while a flush task finishes a write)
        if self._lane_clean and self._lane_buffer is None and stream.__class__ is SocketStream and stream._buffer is not None:
            # The stream's own buffer (its reads have ended with this lane's caller).
            self._lane_recv_into, self._lane_buffer = stream._recv_into, stream._buffer
        return value

    def _quick_request(self, data: bytes, timeout: float) -> bytes:
        """request_wait for a Writer's publish on a connection with a reader task (checked
        command bytes, a float *timeout*): the same answers and errors.

        request_wait's fast path (_exchange, _read_own_answer) is written out here, and on
        plain TCP reads as a lane does (_lane_request: one recv into the stream's buffer):
        one Python call where request_wait makes seven. Snappy over plain TCP reads the
        same way, and only bytes other than the OK chunk go through the snappy layer
        (_quick_read_setup). The caller takes the read token
        and the write lock of a busy connection (read within IDLE_CHECK_SECONDS) with
        nothing pending, queued or buffered, sends, and reads; the answer is b"OK" when the
        bytes read are exactly nsqd's OK frame. Anything else goes request_wait's general
        way with the token still held: before sending, _send_for_answer; after, the reading
        loop. (Deadlines on the wall clock, as the lane's: a clock step during a publish
        moves its timeout by as much.)
        """
        recv_into = self._quick_recv_into
        if recv_into is None and not self._quick_set:
            if self._recv_slice is None:
                return self.request_wait(data, timeout)  # (gevent, TLS: reads poll first)
            recv_into = self._quick_read_setup()
        snappy = self._quick_snappy
        token = self._read_token
        if not token.acquire(False):
            return self.request_wait(data, timeout)  # someone else reads: the hand-off
        answer: Any = None
        try:
            began = time.time()
            write_lock = self._write_lock
            sent = -1  # (nothing sent)
            if began - self.last_recv_timestamp <= IDLE_CHECK_SECONDS and timeout >= self._recv_slice and write_lock.acquire(False):  # type: ignore[operator]
                # The write lock first, then the checks (see _exchange; the decoder's buffer read
                # directly: its `buffered` property is a call more per publish).
                try:
                    if not (
                        self._pending or self._writes or self._deferred or self.state != CONNECTED or self._read_ended
                        or self._decoder._buf or self._listeners.get("response")
                        or ((recv_into is None or snappy is not None) and self._stream.pending())
                        or (snappy is not None and snappy._rest)
                    ):
                        try:
                            sent = self._send_some(data)
                        except (BlockingIOError, socket.timeout):
                            sent = 0  # no room for a whole send slice
                        except (OSError, ValueError) as exc:
                            answer = self._send_failed(exc)  # (the read meets the close: no flush)
                        except BaseException as exc:
                            self._write_interrupted(exc)
                            raise
                        if 0 <= sent < len(data):
                            # The rest goes first in the queue, written below (see _exchange).
                            answer = self._first_pending()
                            self._queue_rest(data, sent)
                finally:
                    write_lock.release()
            if sent < 0 and answer is None:
                # Idle (what came meanwhile is read first), or not alone: request_wait's general path.
                answer = _Answer()
                self._send_for_answer(data, answer, timeout)
            else:
                if sent >= 0 and self._writes:
                    try:
                        self._flush(timeout)  # queued while we wrote: we are its drainer
                    except Error:
                        pass  # the write side is shut (ours went out before): the read meets the close
                if answer is not None:
                    pass  # sent in part, or the send failed: the reading loop below
                elif recv_into is None:
                    answer = self._read_own_answer(began + timeout, time.time)  # compressed
                else:
                    buffer = self._quick_buffer
                    try:
                        count = recv_into(buffer)
                    except BlockingIOError:
                        answer = self._not_ok(b"")  # a recv slice passed: the reading loop waits on
                    except BaseException as exc:
                        answer = self._not_ok(None, exc)
                        if not isinstance(exc, Exception):
                            raise
                    else:
                        ok = self._quick_ok
                        if count == len(ok) and buffer.startswith(ok):  # type: ignore[union-attr]
                            self.last_recv_timestamp = time.time()
                            self._answered_total += 1  # (its caller holds the read token)
                            answer = b"OK"
                        elif snappy is None or not count:
                            answer = self._not_ok(memoryview(buffer)[:count] if count else None)  # type: ignore[arg-type]
                        else:
                            # Compressed bytes that are not the OK chunk: the layer decodes them
                            # as its next read (and reads once more for a chunk they cut).
                            self._stream._hold(bytes(memoryview(buffer)[:count]))  # type: ignore[union-attr]
                            answer = self._read_own_answer(began + timeout, time.time)
            if answer.__class__ is not bytes:
                self._read_until_done(answer, time.monotonic() + max(0.0, timeout - (time.time() - began)))
        except _ReadEnded:
            pass  # reported; the answer holds the reason
        finally:
            token.release()
            if answer.__class__ is bytes:  # (as in request_wait: see there)
                self._last_led = time.monotonic()
                if self._parked and self._pending:
                    self._wake_reader.set()
            else:
                self._token_handed_back()
        if answer.__class__ is bytes:
            return answer  # type: ignore[no-any-return]
        return self._outcome(answer, timeout)

    def _quick_read_setup(self) -> Optional[Any]:
        """_quick_request's look-up, on plain TCP or snappy over plain TCP, until it finds the
        socket stream's own buffer: read into it (whoever holds the read token reads into it),
        and know nsqd's OK as it arrives. Snappy's framing sends a 10-byte answer as one
        uncompressed chunk whose checksum is that of the OK frame: 18 bytes that never change.
        None (read through the stream) for anything else; deflate, whose bytes depend on all
        before them, is looked at once (_quick_set)."""
        stream: Any = self._stream
        if stream.__class__ is SnappyStream:
            inner = stream.inner
            if inner.__class__ is SocketStream and inner._buffer is not None:
                self._quick_ok = _SNAPPY_OK_CHUNK
                self._quick_snappy = stream._decompressor
                self._quick_buffer = inner._buffer
                self._quick_recv_into = inner._recv_into
        elif stream.__class__ is SocketStream:
            if stream._buffer is not None:  # (made by the stream's first read: until then, looked up again)
                self._quick_buffer = stream._buffer
                self._quick_recv_into = stream._recv_into
        else:
            self._quick_set = True
        return self._quick_recv_into

    def _read_until_done(self, answer: "_Answer", deadline: Optional[float]) -> None:
        """Read, as the holder of the read token, until *answer* is done or *deadline* passed.
        Raises _ReadEnded once the connection is over (reported, and the answer failed)."""
        while not answer.done():
            if deadline is None:
                self._read_once(None, True)  # waits with the staleness limit, as the reader task does
                continue
            until = deadline if self._stale_after is None else min(deadline, time.monotonic() + self._stale_after)
            if self._read_once(until, True):
                continue
            if time.monotonic() < deadline:
                self._end_reading(self._stale_error())  # silent for the staleness limit
            break

    def _finish_answer(self, answer: "_Answer", timeout: float) -> bytes:
        """_lane_request after its fast path: read (the lane's caller is its only reader) until *answer* is done."""
        token = self._read_token
        token.acquire()
        try:
            self._read_until_done(answer, time.monotonic() + max(0.0, timeout))
        except _ReadEnded:
            pass  # reported; the answer holds the reason
        finally:
            token.release()
        return self._outcome(answer, timeout)

    def _held_lock(self) -> Any:
        """A backend without signal(): a lock of its own, taken at once."""
        lock = self.backend.lock()
        lock.acquire()
        return lock

    def _data_waiting(self, timeout: Optional[float]) -> bool:
        return self._stream.pending() or self._wait_data(timeout)

    def _not_sent(self) -> ConnectionClosedError:
        error = ConnectionClosedError(f"connection to {self.id} is closed" + (f": {self.error}" if self.error else ""))
        error.unprocessed = True  # type: ignore[attr-defined]
        return error

    def _handle_frames(self, frames: List[Any]) -> None:
        """Act on the frames of one read, then hand its messages (decoded by the decoder) to the workers."""
        close_wait = False
        registry = self._listeners
        for frame_type, payload in frames:
            if frame_type == FRAME_TYPE_RESPONSE:
                if payload == HEARTBEAT:
                    self._write(commands.nop(), 0.0)  # (no room: a flush task writes it; the reader goes on reading)
                    self._emit("heartbeat", conn=self)
                    continue
                if payload == CLOSE_WAIT:
                    close_wait = True  # set below, once the messages before it are in flight
                else:
                    with self._lock:
                        waiter = self._pending.popleft() if self._pending else None
                    if waiter is not None:
                        self._answered_total += 1  # (one reader at a time: the read token's holder)
                        try:
                            waiter.set_result(payload)
                        except futures.InvalidStateError:
                            pass  # a publish timeout failed it first
                if registry.get("response"):  # (every publish's answer passes here)
                    self._emit("response", conn=self, data=payload)
            else:
                error = error_from_frame(payload)
                if error.fatal:
                    with self._lock:
                        # nsqd closes after a fatal error: take no more requests from here on,
                        # before anyone waiting learns of the failure and retries on us.
                        self.state = DISCONNECTED
                        waiter = self._pending.popleft() if self._pending else None
                        # nsqd runs commands in order and closes after a fatal one: the rest never ran.
                        for behind in self._pending:
                            behind.unprocessed = True  # type: ignore[attr-defined]
                        handler = self.unprocessed_handler
                        resend = [f for f in self._pending if not getattr(f, "led", False)] if handler is not None else []
                        if resend:
                            # Callers reading their own answers re-send themselves (request_wait).
                            led = [f for f in self._pending if getattr(f, "led", False)]
                            self._pending.clear()
                            self._pending.extend(led)
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(error)
                        if self._request_failed is not None:
                            self._request_failed(waiter, error)
                    for future in resend:
                        handler(self, future)  # type: ignore[misc]
                    # (a Reader's or Writer's: its close warning gives the error; a Writer
                    # against a full disk got one such close per publish, 954 lines in 5 s)
                    (logger.debug if self._owned else logger.warning)("%s: %s", self._log_id, error)
                else:
                    # E_FIN_FAILED & co.: almost always a message nsqd had timed out (its handler
                    # outlived msg_timeout), so it was or will be processed twice.
                    if error.code == "E_FIN_FAILED":
                        self._fin_failed_total += 1  # (one reader at a time: the read token's holder)
                    elif error.code == "E_REQ_FAILED":
                        self._req_failed_total += 1
                    elif error.code == "E_TOUCH_FAILED":
                        self._forget_untouched(error.text)
                    due = self._late.add(1)
                    if due:
                        logger.warning(
                            "%s: %s (%d such since the last warning): nsqd timed the message out before its answer came, "
                            "and delivers it again (touch() long jobs or raise msg_timeout), or the channel was emptied",
                            self._log_id, error, due,
                        )
                    else:
                        logger.debug("%s: %s", self._log_id, error)
                self._emit("error", conn=self, error=error)
                if error.fatal:
                    self.error = error
                    # nsqd closes after a fatal error; stop reading now rather than wait for it.
                    raise _FatalFrame(error)
        decoder = self._decoder
        messages = decoder.messages
        if messages:
            decoder.messages = []
            # In flight by id: a message nsqd timed out and delivered again replaces its old copy.
            inflight = self._inflight
            listeners = self._listeners.get("message")
            arrived = time.monotonic()  # (Message.time_left)
            superseded = 0
            with self._lock:
                known = inflight.get
                for message in messages:
                    old = known(message.id)
                    if old is not None:
                        # nsqd timed the old copy out and sent it again: the old one can no longer
                        # be answered, and must not run (again) if it still waits for a worker.
                        old._responded = old._superseded = True
                        superseded += 1
                        del inflight[message.id]  # (the new copy goes last: in flight by arrival, see _forget_oldest_locked)
                    inflight[message.id] = message
                    message._arrived = arrived
                self.in_flight = len(inflight)
                self._received_total += len(messages)
                stale = len(inflight) > self._rdy_peak
                beyond = self._beyond_rdy_locked(arrived) if stale else None
                forgotten = self._forget_oldest_locked(beyond, arrived) if beyond is not None and self._rdy_peak else 0
                if forgotten:
                    messages = [message for message in messages if not message._responded]  # (a flood in one read)
                if listeners and (beyond is None or forgotten):
                    queued = self._queued
                    self._queued = queued + len(messages)
            if beyond is not None and not forgotten:
                # Never sent RDY (a Writer's connection): no message is ever due here.
                raise ProtocolError(f"{self.id} sent {beyond} messages, and it was never sent RDY; nsqd never does: closing the connection")
            self.last_msg_timestamp = self.last_recv_timestamp
            if forgotten:
                due = self._forgotten.add(forgotten)
                if due:
                    logger.warning(
                        "%s: nsqd sent more messages than RDY (%d) allows, so it no longer counts %d earlier ones in flight "
                        "here (since the last warning): the channel was emptied (nsqd then forgets every message in flight), "
                        "or a peer that is not nsqd ignores RDY. Those not started yet are dropped, and the others' answers "
                        "are not sent (nsqd would refuse them)",
                        self._log_id, self._rdy_peak, due,
                    )
            if superseded:
                due = self._redelivered.add(superseded)
                if due:
                    logger.warning(
                        "%s: nsqd timed out messages still in flight here and delivered them again (%d since the last "
                        "warning); copies not started yet are skipped; touch() long jobs or raise msg_timeout",
                        self._log_id, due,
                    )
            if listeners and (stale or superseded) and queued:
                # nsqd timed out or forgot messages here (more in flight than RDY allows, or a
                # copy sent again): those still waiting for a worker go.
                self._drop_stale(arrived)
            if listeners:
                # One work item per message, never a batch per worker: a handler that never
                # returns must not hold up the messages read with it.
                self._lane = lane = self.worker_pool.messages
                lane.submit_many(self._deliver, messages)
                if self._workers_lead and self._is_reader_task():
                    self._lead_offered = True  # the reader task parks (see _should_park)
                    lane.offer_lead(self)
            else:
                logger.warning("%s: %d messages arrived with no 'message' listener; nsqd redelivers them after msg_timeout", self._log_id, len(messages))
        if close_wait:
            # nsqd sends nothing after CLOSE_WAIT: a graceful close now waits for exactly
            # the messages counted above (they came before it, maybe in this same read).
            self._close_wait.set()

    def _drop_stale(self, now: float) -> None:
        """Take back from the worker pool this connection's messages that still wait for a
        worker but that nsqd timed out (read at least msg_timeout before *now*) or replaced
        with a copy sent again. nsqd delivers them again by itself (maybe already did), so
        running them would do the work twice, with answers nsqd refuses. Without this, while
        every worker is busy for longer than msg_timeout (a hung handler: waiting messages are
        touched only while the workers make progress, see _touch_waiting), nsqd sends RDY
        messages every msg_timeout and their copies pile up here without bound.

        Called only after nsqd showed that it timed messages out here, and safe in any case:
        the clock starts when a message was read, after nsqd started its own, so a message
        is never taken back before nsqd's deadline for it passed. (After a touch, the clock
        restarts when the TOUCH is queued, a little before nsqd gets it: a message taken back
        in between is not run here, and nsqd delivers it once more, a moment later.)
        """
        timeouts = self._timeouts()
        deliver, expiry = self._deliver, self._expiry

        def stale(fn: Any, message: Message) -> bool:
            # (touched while it waited: from the last touch, see the docstring)
            return fn == deliver and (message._responded or expiry(message, timeouts) <= now)

        taken = self.worker_pool.messages.take(stale)
        if not taken:
            return
        expired = 0
        with self._lock:
            self._queued -= len(taken)
            inflight = self._inflight
            for message in taken:
                if message._responded:
                    continue  # replaced: its newer copy is in flight (and counted) instead
                expired += 1
                message._responded = message._superseded = True
                if inflight.get(message.id) is message:
                    del inflight[message.id]
            self.in_flight = len(inflight)
            self._expired_total += expired
            flush = not self._queued and self._writes
        if flush:
            self._flush_quietly()
        due = self._expired.add(expired) if expired else 0
        if due:
            logger.warning(
                "%s: %d messages waited for a worker longer than msg_timeout (since the last warning) and were "
                "dropped unrun: nsqd has timed them out and delivers them again. No worker started a message for "
                "msg_timeout (so waiting messages were not touched): look for a hung handler, or raise concurrency",
                self._log_id, due,
            )

    def _forget_oldest_locked(self, excess: int, now: float) -> int:
        """nsqd sent *excess* more messages than RDY allows with every earlier one still in
        flight: it no longer counts the oldest *excess* of them. nsqd does that when the
        channel is emptied (/channel/empty, nsqadmin's "Empty Channel": it forgets every
        message in flight, then sends RDY new ones); a peer that ignores RDY looks the same.
        Those oldest leave the in-flight count and are marked answered: the ones still
        waiting for a worker are dropped (_drop_stale: an emptied channel's messages were
        meant to go, and a peer flooding past RDY must not fill memory), the running ones'
        answers are not sent (nsqd would refuse them). Returns how many were forgotten."""
        inflight = self._inflight
        timeouts = self._timeouts()
        oldest = []
        for message in inflight.values():  # (by arrival: a copy sent again goes last)
            if len(oldest) >= excess:
                break
            if self._is_live(message, now, timeouts):
                oldest.append(message)
        for message in oldest:
            message._responded = message._superseded = True
            del inflight[message.id]
        self.in_flight = len(inflight)
        return len(oldest)

    def _forget_untouched(self, text: str) -> None:
        """nsqd refused a TOUCH (``TOUCH <id> failed ...``): it no longer counts that message in
        flight here. It timed it out (and delivers it again, here or to another consumer), or
        the channel was emptied. The message leaves the in-flight count and is marked answered,
        as a copy delivered again is: still waiting for a worker, it does not run (it ran
        twice, or ran though emptied); running, its answers are not sent (nsqd refuses them).

        The error names the message nsqd has now, never a later copy: one sent again on this
        connection is in flight again, and its TOUCH would pass; so the copy after a refusal
        comes after it on the stream, and _handle_frames takes errors before messages."""
        words = text.split(None, 2)
        if len(words) < 2 or words[0] != "TOUCH":
            return
        message_id = words[1].encode("ascii", "replace")
        with self._lock:
            message = self._inflight.pop(message_id, None)
            if message is None:
                return
            message._responded = message._superseded = True
            self.in_flight = len(self._inflight)

    def _timeouts(self) -> Tuple[float, float]:
        """(msg_timeout, max_msg_timeout) in seconds: as nsqd negotiated them, else as asked."""
        return self.message_timeouts or (float(self.msg_timeout or 60.0),) * 2

    @staticmethod
    def _expiry(message: Message, timeouts: Tuple[float, float]) -> float:
        """When nsqd times *message* out, by our clock (*timeouts*: _timeouts()): msg_timeout
        after it was read or last touched, and at most max_msg_timeout after it was read."""
        msg_timeout, max_msg_timeout = timeouts
        arrived = message._arrived
        return min(getattr(message, "_touched", arrived) + msg_timeout, arrived + max_msg_timeout)

    @staticmethod
    def _touch_gains(message: Message, now: float, timeouts: Tuple[float, float]) -> bool:
        """A TOUCH of *message* at *now* would extend its time at nsqd: its _expiry() has not
        passed by our clock (else nsqd timed it out, and would refuse the TOUCH) and is short of
        max_msg_timeout from its arrival (which no TOUCH extends)."""
        expiry = AsyncConn._expiry(message, timeouts)
        return now < expiry < message._arrived + timeouts[1]

    @staticmethod
    def _is_live(message: Message, now: float, timeouts: Tuple[float, float]) -> bool:
        """Surely still in flight at nsqd at *now*: its _expiry() is more than a margin for
        network and timer delays away."""
        return AsyncConn._expiry(message, timeouts) - now > 2.0

    def _beyond_rdy_locked(self, now: float) -> Optional[int]:
        """How many more messages are in flight here than the highest RDY this connection
        ever sent, or None when there are no more than that once those that nsqd may have
        timed out are left aside (it counts them no more and sends others: a handler slower
        than msg_timeout).

        An honest nsqd exceeds RDY only after a channel empty (see _forget_oldest_locked); a
        peer that does otherwise (a broken or hostile server, or a Writer's connection,
        which sends no RDY) would fill memory without bound. Only messages surely still in
        flight at nsqd are counted: touched or read less than msg_timeout ago by a margin
        for network and timer delays.
        """
        is_live, timeouts = self._is_live, self._timeouts()
        live = sum(1 for message in self._inflight.values() if is_live(message, now, timeouts))
        if live <= self._rdy_peak:
            return None
        return live - self._rdy_peak if self._rdy_peak else live

    def _deliver(self, message: Message) -> None:
        # Waited for a worker? The lane's clock says when its latest callback began (no
        # clock read of our own); checked before the flush below, which may wait for room.
        if self._lane.last_began - message._arrived > self._pickup_touch_after:
            self._touch_picked_up(message)
        lock = self._lock  # acquire/release, not `with`: see _finish_message
        lock.acquire()
        try:
            self._queued -= 1
            flush = not self._queued and self._writes
        finally:
            lock.release()
        if flush:
            # The last queued message starts: write the answers held back for it now,
            # so none waits behind this handler (see _respond).
            self._flush_quietly()
        if message._responded:
            # Timed out by nsqd and delivered again while it waited here (_handle_frames):
            # the new copy runs, this one would only run twice.
            return
        for callback in self._listeners.get("message", ()):
            try:
                callback(conn=self, message=message)
            except Exception:
                logger.exception("%smessage listener %r raised for %r on %s", self._log_prefix, callback, message, self.id)

    def _touch_picked_up(self, message: Message) -> None:
        """A worker picks up *message*, which arrived more than _pickup_touch_after ago: unless
        it was touched since then, TOUCH it before its handler runs, so the handler has its
        whole msg_timeout, not what the wait left of it. (_touch_waiting touches waiting
        messages only every half msg_timeout: a handler could start with half of it gone,
        and one longer than that ran twice.) Not past nsqd's max_msg_timeout (nothing to
        gain), nor once its time is up by our clock (nsqd timed it out: its E_TOUCH_FAILED
        would only come back). Queued under the lock FIN and REQ take, like every TOUCH.

        The caller's test used the lane's clock: with several workers, the latest start of
        any of them, so a wait can look longer (a TOUCH more) or, rarely, shorter by the
        milliseconds another worker took to record its start. Here the clock is read."""
        now = time.monotonic()
        timeouts = self._timeouts()
        with self._lock:
            if message._responded or self.state != CONNECTED:
                return
            if now - getattr(message, "_touched", message._arrived) <= self._pickup_touch_after:
                return  # touched lately while it waited (_touch_waiting, under this lock)
            if not self._touch_gains(message, now, timeouts):
                return
            message._touched = now
            self._writes.append(b"TOUCH %s\n" % message.id)
            self._touched_total += 1
        try:
            self._flush(0.0)  # (no room: a flush task writes it; the handler starts at once)
        except Error:
            pass  # the connection is closing; the reader reports it

    def _take_queued(self) -> List[Message]:
        """Take this connection's messages still queued for a worker back from the pool (their
        listeners will not run) and return them; answers held back for them go out now."""
        deliver = self._deliver
        taken = self.worker_pool.messages.take(lambda fn, item: fn == deliver)
        if not taken:
            return taken
        with self._lock:
            self._queued -= len(taken)
            flush = not self._queued and self._writes
        if flush:
            self._flush_quietly()
        return taken

    def _emit(self, name: str, **kwargs: Any) -> None:
        """Hand an event to the control lane of the worker pool (never run listeners on the reader)."""
        if self._listeners.get(name):
            try:
                self.worker_pool.control.submit(self._fire, name, kwargs)
            except RuntimeError:
                logger.debug("%s: worker pool closed; %s event dropped", self._log_id, name)

    def _fire(self, name: str, kwargs: Optional[Dict[str, Any]] = None, **kw: Any) -> None:  # type: ignore[override]
        super()._fire(name, **(kwargs if kwargs is not None else kw))

    # ---------------------------------------------------------------- writing
    def send(self, data: bytes) -> None:
        """Write raw command bytes (from :mod:`nsq_sync.protocol` helpers); thread-safe.

        Raises ConnectionClosedError if the connection is not open, SendError if the write failed.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"send() takes bytes, not {type(data).__name__}")
        if data[:4] == b"SUB ":
            self._subscribed = True
        if b"RDY " in data:
            self._note_raw_rdy(bytes(data))
        self._write(bytes(data))

    def _note_raw_rdy(self, data: bytes) -> None:
        """RDY commands written with send() (pynsq code sends ``nsq.ready(n)`` itself) count
        towards the RDY peak too. (A body that happens to hold such a line only raises it:
        the check becomes laxer, never wrong.)"""
        for line in data.split(b"\n"):
            if line[:4] == b"RDY ":
                try:
                    value = int(line[4:])
                except ValueError:
                    continue
                if value > self._rdy_peak:
                    self._rdy_peak = value

    def _write(self, data: bytes, budget: Optional[float] = None) -> None:
        """Queue *data* and flush, writing for at most *budget* seconds once the socket has no room (see _flush)."""
        self._queue(data)
        self._flush(budget)

    def _queue(self, data: bytes) -> None:
        """Queue *data* for the next flush (ConnectionClosedError when not connected)."""
        if self.state != CONNECTED:
            raise ConnectionClosedError(f"connection to {self.id} is {self.state.lower()}")
        self._writes.append(data)

    def _flush(self, budget: Optional[float] = None) -> None:
        # One task at a time drains the queue with a single send of everything in it.
        # Whoever appended after the drainer's last look finds the lock free and drains.
        # *budget*: seconds this caller may go on writing once the socket has no room (None:
        # until done, or stalled for the stall limit). Past it the rest stays queued, first,
        # and a flush task of its own finishes it (_hand_off): a publish with a deadline, a
        # pub_async (0: at once) or the reader never drain a stalled socket for everybody.
        writes = self._writes
        lock = self._write_lock
        while writes:
            if not lock.acquire(False):
                return  # the holder drains our bytes before it lets go (it looks again after)
            try:
                left = self._send_queued(budget)
            except (OSError, ValueError, Error) as exc:
                self._write_failed(exc)
            finally:
                lock.release()
            if left:
                self._hand_off()
                return

    def _flush_soon(self) -> None:
        """_flush, unless the socket has no room for a byte right now (nsqd stopped reading, or
        is slow to): then a task of its own waits to write, not the caller (a Reader that
        must go on deciding RDY for its other connections, see reader._RdyLock)."""
        if not self._writes:
            return
        sock = self._raw_sock
        try:
            room = sock is None or self.backend.wait_writable(sock, 0)
        except (OSError, ValueError):
            room = True  # closed under us: _flush reports it
        if room:
            self._flush()
        else:
            self.backend.spawn(self._flush_quietly, name=f"nsq_sync-flush-{self.id}")

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except Error:
            pass  # the connection is closing; the reader reports it

    def _hand_off(self) -> None:
        """A writer with a budget left bytes queued (the socket had no room): a task of its own
        finishes them, bounded by the stall limit. Not once close() drains: that takes them."""
        if self._close_at is None:
            try:
                self.backend.spawn(self._flush_quietly, name=f"nsq_sync-flush-{self.id}")
            except RuntimeError:  # pragma: no cover - no new threads (interpreter shutdown)
                self._flush_quietly()

    def _write_failed(self, exc: BaseException) -> None:
        """A write failed (the caller holds the write lock): close the connection, raise SendError
        (ConnectionClosedError when the connection had failed first)."""
        self._writes.clear()
        if isinstance(exc, (BlockingIOError, socket.timeout, _WholeWriteStalled)):  # (SO_SNDTIMEO, or the stream's timeout)
            # nsqd took nothing for the staleness limit: it is gone or wedged, and nothing it
            # might still send matters. Shut both ways, so the reader ends now and reports this.
            error = self._write_stall = SendError(f"no progress writing to {self.id} for {self._send_stall_after}s: nsqd stopped reading; closing the connection")
            self._abort(error, reading_too=True)
        elif self.error is not None or self.state != CONNECTED:
            # The connection failed first (its socket shut under this write): say so.
            raise ConnectionClosedError(f"connection to {self.id} closed" + (f": {self.error}" if self.error else "")) from exc
        else:
            error = SendError(f"write to {self.id} failed: {exc}")
            self._abort(error)
        raise error from exc

    def _send_queued(self, budget: Optional[float] = None) -> bool:
        """Send everything queued, a batch per send (the caller holds the write lock). True when
        *budget* (see _flush) passed with bytes left: they are queued again, first."""
        writes = self._writes
        send = self._send_some
        while writes:
            batch = [writes.popleft() for _ in range(len(writes))]
            if len(batch) == 1:
                data = batch[0]
            else:
                if sum(map(len, batch)) > JOIN_MAX_BYTES:
                    batch = self._cut_batch(batch)
                data = batch[0] if len(batch) == 1 else b"".join(batch)
            sent = -1
            try:
                try:
                    sent = send(data)
                except (BlockingIOError, socket.timeout):
                    sent = 0  # no room for a whole send slice
                if sent != len(data):
                    if sent:
                        self._stalled_since = None  # progress: a stall counts from here
                    rest = self._send_rest(memoryview(data)[sent:], budget)
                    if rest:
                        self._requeue(batch, rest)
                        return True
            except BaseException as exc:
                if sent < 0 and isinstance(exc, OSError) and send != self._send_whole:
                    # The socket refused the send (EPIPE, ECONNRESET: nsqd had closed): no
                    # byte of it went out (a send that took some returns their count), and
                    # nothing after it. (A stream written whole may have sent part.)
                    self._mark_unsent(batch + list(writes))
                writes.clear()
                self._write_interrupted(exc)
                raise
        return False

    def _cut_batch(self, batch: List[Any]) -> List[Any]:
        """The first commands of *batch* up to JOIN_MAX_BYTES (at least one); the rest go back
        to the front of the queue, for the next send. One join of a whole backlog of large
        publishes copied all of it at once (300 pub_async of 1 MB: 300 MB more at the peak)."""
        size = 0
        for index, command in enumerate(batch):
            size += len(command)
            if size > JOIN_MAX_BYTES:
                cut = max(index, 1)
                break
        else:  # pragma: no cover - only called when the whole batch is over the limit
            return batch
        self._writes.extendleft(reversed(batch[cut:]))
        return batch[:cut]

    def _send_whole(self, data: Any) -> int:
        """_send_some of a stream written whole (TLS, compression, a socket without send slices).

        Its sendall can time out (SO_SNDTIMEO is the stall limit there, or the stream's own
        timeout) after part of the command went out, and the compressor has taken all of it:
        nothing can be sent again. That is a stall that ends the connection, never "no room"
        to retry: a second copy behind a cut first one corrupted the stream (a body published
        with the next command's bytes in it, or published twice)."""
        try:
            self._stream.sendall(data)
        except (BlockingIOError, socket.timeout) as exc:
            raise _WholeWriteStalled(f"a whole write timed out: {exc}") from exc
        return len(data)

    def _send_rest(self, view: memoryview, budget: Optional[float]) -> memoryview:
        """The part of a write the socket did not take at once (the caller holds the write
        lock, or the lane): sent a slice at a time. Returns what is left when *budget* seconds
        passed first, or close()'s deadline (empty once all went). Raises socket.timeout when
        nothing went out for the stall limit, counted from the last progress (of this write,
        or of the one handed on to this writer unfinished)."""
        send = self._send_some
        wait = self._send_wait
        stall = self._send_stall_after
        now = time.monotonic()
        since = self._stalled_since or now
        deadline = None if budget is None else now + budget
        while view:
            close_at = self._close_at
            if (deadline is not None and now >= deadline) or (close_at is not None and now >= close_at):
                self._stalled_since = since
                return view
            try:
                count = send(view)
            except (BlockingIOError, socket.timeout):
                count = 0  # a slice without room
            if not count and wait is not None:
                wait(SEND_SLICE_SECONDS)
            now = time.monotonic()
            if count:
                view = view[count:]
                since = now
            elif stall is not None and now - since >= stall:
                self._stalled_since = None
                raise socket.timeout("no progress writing for the stall limit")
        self._stalled_since = None
        return view

    def _requeue(self, batch: List[Any], rest: memoryview) -> None:
        """Queue *rest*, the unsent end of *batch*, first again (the caller holds the write
        lock): the commands not started stay whole, the one cut short becomes _partial."""
        left = len(rest)
        first = len(batch)
        while first and len(batch[first - 1]) <= left:
            first -= 1
            left -= len(batch[first])
        writes = self._writes
        writes.extendleft(reversed(batch[first:]))  # not started: whole, as queued
        if left:
            self._partial = rest[:left]
            writes.appendleft(self._partial)

    def _queue_rest(self, data: Any, sent: int) -> None:
        """A command written directly, of which the socket took *sent* bytes: the rest goes
        first in the queue (the caller holds the write lock, or the lane)."""
        if sent:
            data = self._partial = memoryview(data)[sent:]
        self._writes.appendleft(data)

    def _fail_unsent(self) -> None:
        """close() gave up on what is queued (the caller holds the write lock): the requests
        that never started fail with ClosedError (not sent: nothing landed); the one cut short,
        and those sent, fail with ConnectionClosedError (unknown) when the connection goes."""
        writes = self._writes
        count = len(self._requests_in(list(writes)))
        writes.clear()
        with self._lock:
            unsent = [self._pending.pop() for _ in range(min(count, len(self._pending)))]
        for waiter in unsent:
            error = ClosedError(f"{self.id} was closed before the command was sent (nsqd did not get it)")
            error.unprocessed = True  # type: ignore[attr-defined]
            try:
                if not waiter.done():
                    waiter.set_exception(error)
                    if self._request_failed is not None:
                        self._request_failed(waiter, error)
            except futures.InvalidStateError:
                pass  # a publish timeout failed it first

    def request(self, data: bytes, future: "Optional[Future[bytes]]" = None) -> "Future[bytes]":
        """Write a command that nsqd answers (PUB, MPUB, DPUB, SUB) and return a Future of the answer.

        Answers are matched to requests in order. The Future fails with the ServerError
        for an error frame, or ConnectionClosedError when the connection goes before the
        answer. Do not mix with raw send() of answered commands on the same connection.
        To block for the answer, :meth:`request_wait` is cheaper than ``request().result()``.
        """
        if future is not None and not callable(getattr(future, "set_result", None)):
            raise TypeError(f"future must be a concurrent.futures.Future, not {type(future).__name__}")
        if isinstance(data, (bytes, bytearray, memoryview)) and not data:
            raise ConfigError("data", data, "is an empty command")  # (nothing to answer: every later answer would go to the wrong request)
        return self._request(data, future)

    def _request(self, data: bytes, future: "Optional[Future[bytes]]", lead: bool = False) -> "Future[bytes]":
        """Queue a request and its waiter. *lead*: its caller would read answers itself (a
        blocking request that found the token taken), so the reader task parks once nothing
        is pending (set in the same locked step that queues the request). The caller writes
        only what the socket takes at once (a Future's caller returns at once): a flush task
        writes the rest (see _flush)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"request() takes command bytes, not {type(data).__name__}")
        if future is None:
            future = LightFuture(running=True)
        future.command = data  # type: ignore[attr-defined]  # kept for a re-send (see unprocessed_handler)
        with self._lock:
            if self.state != CONNECTED:
                error = ConnectionClosedError(f"connection to {self.id} is {self.state.lower()}")
                error.unprocessed = True  # type: ignore[attr-defined]  # nothing was sent
                raise error
            # Nagle's rule for requests: while an earlier one waits for its answer, a new
            # one is only queued; whoever reads that answer sends everything queued in one
            # write (_read_once). A burst of pub_async leaves in a few large writes instead
            # of one per message, and it waits at most one round trip.
            defer = bool(self._pending)
            self._pending.append(future)
            # Queue the bytes under the same lock, so wire order equals waiter order.
            self._writes.append(data)
            if defer:
                # Set after the bytes are queued: a reader that sees it (after popping the
                # answer we queued behind, which needs this lock) flushes our bytes too.
                self._deferred = True
            if lead:
                self._want_lead = True
            wake = self._parked
        if wake:
            self._wake_reader.set()  # nobody else will read the answer
        if not defer:
            try:
                self._flush(0.0)
            except Error:
                pass  # the Future carries the failure (failed by _abort)
        return future

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def subscribe(self, topic: str, channel: str, timeout: Optional[float] = None) -> bytes:
        """SUB and wait for OK. Raises BadTopicError/BadChannelError etc. from nsqd, TimeoutError."""
        data = commands.sub(topic, channel)  # validates the names before anything changes
        if timeout is not None:
            check_timeout(timeout)
        if self.heartbeat_interval == -1:
            raise ConfigError("heartbeat_interval", -1, NO_HEARTBEAT_SUB)
        if self._subscribed:
            raise ConfigError("channel", f"{topic}/{channel}", "this connection already subscribed: nsqd allows one SUB per connection and closes it over a second (nothing was sent; open another connection)")
        self._subscribed = True
        future = self.request(data)
        return self._wait(future, timeout if timeout is not None else self.timeout * 5)

    def _wait(self, future: "Future[bytes]", timeout: Optional[float]) -> bytes:
        try:
            return future.result(timeout)
        except futures.TimeoutError:
            if future.done():
                raise
            raise TimeoutError(f"no answer from {self.id} within {timeout}s") from None

    def send_rdy(self, value: int) -> None:
        """Send RDY *value* (0..max_rdy_count) and record it in ``rdy``/``last_rdy``.

        Raises ConfigError when *value* is out of range or the connection has not subscribed
        (nsqd would close it), ConnectionClosedError when not connected.
        """
        self._queue_rdy(value)
        self._flush()

    def _queue_rdy(self, value: int) -> None:
        """:meth:`send_rdy` without the write: RDY *value* is queued, and leaves with the next
        flush (a Reader flushes once it let go of its lock, see reader._RdyLock)."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.max_rdy_count:
            raise ConfigError("rdy", value, f"must be an int between 0 and max_rdy_count ({self.max_rdy_count}) of {self.id}")
        if not self._subscribed and self.state == CONNECTED:
            raise ConfigError("rdy", value, "sent before subscribe(): nsqd closes the connection over a RDY on a connection that has not subscribed (nothing was sent)")
        if value > self._rdy_peak:
            self._rdy_peak = value  # (before it is written: messages it allows come after)
        self._queue(commands.rdy(value))
        self.rdy = value
        self.last_rdy = value
        self._hold_max = max(1, value // 2)

    # ----------------------------------------------------- message responses
    def _respond(self, message: Message, data: bytes, event: str) -> None:
        """Answer *message* with *data* (a REQ) after its *event* listeners ran.

        A REQ is queued after its "backoff"/"continue" listeners, so the RDY 0 of a backoff
        they start reaches nsqd no later than the REQ that caused it (pynsq's order).
        """
        with self._lock:
            self._check_answerable_locked(message)
            message._responded = True
        self._fire_answer(event)
        with self._lock:
            if self.state != CONNECTED:
                self._inflight.pop(message.id, None)
                self.in_flight = len(self._inflight)
                raise self._answer_closed(message)
            hold, drained = self._queue_answer_locked(message, data)
        self._after_answer(hold, drained)

    def _finish_message(self, message: Message, notify_owner: bool = True) -> None:
        # The consumer's hot path, so _respond's steps are inlined here under one lock. The
        # FIN is queued before the owner and the "resume" listeners hear of it: a RDY they send
        # (leaving backoff) follows the FIN that freed its in-flight slot. Coalescing: see
        # _queue_answer_locked. notify_owner=False: the owner (_owner_finished) calls, and
        # does what it would have done itself, once this returns.
        data = b"FIN %s\n" % message.id
        # An explicit acquire/release in try/finally costs 50-115 ns less than `with lock:`
        # (CPython 3.9-3.13), twice per consumed message with _deliver's.
        lock = self._lock
        lock.acquire()
        try:
            if message._responded or self.state != CONNECTED:
                self._check_answerable_locked(message)  # raises
            message._responded = True
            self._writes.append(data)
            inflight = self._inflight
            inflight.pop(message.id, None)
            self.in_flight = in_flight = len(inflight)
            self._finished_total += 1
            closing = self._closing
            hold = self._queued > 0 and not closing and len(self._writes) < self._hold_max
            # Drained only once CLOSE_WAIT came: messages nsqd sent before it may still be
            # unread, and in_flight touches 0 in between (see _graceful_close).
            drained = closing and in_flight <= 0 and self._close_wait.is_set()
        finally:
            lock.release()
        if notify_owner and self._owner_finished is not None:
            try:
                self._owner_finished(self)
            except Exception:
                logger.exception("%sthe owner's handling of a FIN on %s raised", self._log_prefix, self.id)
        for callback in self._listeners.get("resume", ()):
            try:
                callback(conn=self)
            except Exception:
                logger.exception("%slistener %r for %r on %s raised", self._log_prefix, callback, "resume", self.id)
        if not hold:
            self._after_answer(False, drained)

    def _answer_lost(self, message: Message, error: Error) -> None:
        """finish()/requeue()/touch() of a message whose connection is gone (Message._lost):
        the owner's report (a Reader counts them), else a warning at most every 10 s."""
        owner = self._lost_answers
        if owner is not None:
            owner(message, error)
            return
        due = self._lost_tally.add(1)
        if due:
            logger.warning("%s: %d answer(s) not sent since the last warning (the connection had ended; nsqd delivers those messages again); the last: %s", self._log_id, due, error)

    def _check_answerable_locked(self, message: Message) -> None:
        if message._responded:
            raise _already_answered(message)
        if self.state != CONNECTED:
            raise self._answer_closed(message)

    def _answer_closed(self, message: Message) -> ConnectionClosedError:
        return ConnectionClosedError(f"connection to {self.id} is {self.state.lower()}; nsqd will redeliver {message!r}")

    def _fire_answer(self, event: str) -> None:
        for callback in self._listeners.get(event, ()):
            try:
                callback(conn=self)
            except Exception:
                logger.exception("%slistener %r for %r on %s raised", self._log_prefix, callback, event, self.id)

    def _queue_answer_locked(self, message: Message, data: bytes) -> Tuple[bool, bool]:
        """Queue *data*, the answer to *message*; return (hold it back, the last in flight answered while closing).

        FIN/REQ coalescing: while more delivered messages wait for a worker, an answer is
        only queued; the worker that starts the last of them (_deliver), or the next
        answer after it, writes them all in one send. Queued under the same lock that
        counts waiting messages, so no answer is ever left behind; and the reader task
        sends what sat queued for ANSWER_HOLD_SECONDS (_read_holding), so no answer waits
        for the handlers that run before the last message starts. At most half the RDY
        count is held: then they leave, and nsqd refills that half of the window while the
        rest of the read is handled (7% more messages/s plain, 8% with deflate, with
        max_in_flight 200). _finish_message has these steps inlined (a call less per
        consumed message): change both together.
        """
        self._writes.append(data)
        inflight = self._inflight
        inflight.pop(message.id, None)
        self.in_flight = in_flight = len(inflight)
        if self._closing:
            return False, in_flight <= 0 and self._close_wait.is_set()
        return self._queued > 0 and len(self._writes) < self._hold_max, False

    def _after_answer(self, hold: bool, drained: bool) -> None:
        try:
            if not hold:
                self._flush()
        finally:
            if drained:
                self._drained.set()

    def _requeue_message(self, message: Message, time_ms: int, backoff: bool) -> None:
        if time_ms < 0:
            time_ms = int(min(self.requeue_delay * message.attempts, self.max_requeue_delay) * 1000)
        self._respond(message, b"REQ %s %d\n" % (message.id, time_ms), "backoff" if backoff else "continue")

    def _touch_message(self, message: Message, budget: Optional[float] = None) -> None:
        with self._lock:  # (the lock FIN and REQ take: a TOUCH from another thread never follows the answer)
            if message._responded:
                raise _already_answered(message)
            self._queue(b"TOUCH %s\n" % message.id)
        self._flush(budget)

    # ---------------------------------------------------------------- closing
    def close(self, timeout: Optional[float] = None) -> None:
        """Close the connection; ``close`` fires exactly once.

        A subscribed connection closes gracefully: CLS, wait for CLOSE_WAIT and for every
        in-flight message to be answered (up to *timeout*, default ``close_timeout``), then
        close the socket. Safe to call more than once and from any thread or callback.
        Raises ConfigError (TypeError for a non-number) naming ``timeout`` for a bad one,
        before closing anything.
        """
        if timeout is None:
            timeout = self.close_timeout
        check_timeout(timeout)
        if self.state == INIT:
            self.state = DISCONNECTED
            self._fire_close_sync()
            return
        with self._lock:
            already = self._closing
            self._closing = True
            connecting = self._connecting
        if already:
            if not self.worker_pool.in_worker():
                self._join(timeout)
            return
        if connecting is not None:
            # connect() is running: its handshake fails on the shut socket (or sees _closing
            # before it has one, or after it is done) and closes the connection, raising
            # ConnectionClosedError. Wait for that, unless this is that task (a listener).
            self._teardown_socket()
            if connecting is not self.backend.current():
                self._closed_event.wait(timeout)
            return
        if self._pool is not None and self._pool.messages.in_worker() and self._subscribed and self.state == CONNECTED:
            # Called from a message handler: the drain waits for handlers, maybe this one,
            # so it runs on a task of its own and close() returns at once.
            self.backend.spawn(self._graceful_close, timeout, name=f"nsq_sync-close-{self.id}")
            return
        self._graceful_close(timeout)

    def _graceful_close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.state == CONNECTED and self._subscribed:
            try:
                self._write(commands.cls(), max(0.0, deadline - time.monotonic()))  # (no room: a flush task writes it)
                if not self._wait_close_wait(deadline):
                    logger.warning(
                        "%s: nsqd did not confirm CLS within the close timeout (%gs), or %gs after the last answer; closing "
                        "anyway (nsqd will redeliver what is in flight)", self._log_id, timeout, CLS_GRACE_SECONDS,
                    )
                if self._hand_back is not None and self._queued:
                    self._hand_back(self._take_queued())
                with self._lock:
                    if self.in_flight <= 0:
                        self._drained.set()
                if not self._drained.wait(max(0.0, deadline - time.monotonic())):
                    logger.warning("%s: closing with %d messages still in flight (nsqd will redeliver them)", self._log_id, self.in_flight)
            except Error:
                pass
        self._flush_all(deadline)
        self._teardown_socket()
        self._join(max(0.1, deadline - time.monotonic()))

    def _wait_close_wait(self, deadline: float) -> bool:
        """Wait for nsqd's CLOSE_WAIT, until *deadline*, or CLS_GRACE_SECONDS after nothing
        is left to answer here (nothing in flight, queued or unwritten). An nsqd that answers
        does so within a round trip; one that does not (stopped, hung) held close() up for its
        whole timeout after the last handler had finished. Closing then loses nothing: nsqd
        reads the answers already written, and a message it sent that was never read comes
        back after its msg_timeout (nsqd takes nothing back at a close), as after any close.
        False when CLOSE_WAIT did not come."""
        wait = self._close_wait.wait
        idle_since = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                return self._close_wait.is_set()
            if self.in_flight > 0 or self._queued or self._writes:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= CLS_GRACE_SECONDS:
                return self._close_wait.is_set()
            if wait(min(deadline - now, CLS_POLL_SECONDS)):
                return True

    def _flush_all(self, deadline: float) -> None:
        """Write everything queued, after any writer in progress (used before closing).

        Waits for the write lock, unlike _flush: a writer in progress may have taken the
        last FIN off the queue and not sent it yet, and shutting the socket under it would
        fail that FIN. But not past *deadline* (the close's timeout, at least 0.1 s): a
        write nsqd stopped taking (its buffers full) would hold close() up until the stall
        is detected. From here on every plain TCP write stops at the deadline (_send_rest),
        so a flush task in the middle of one lets go within a send slice and what is left
        is failed here: requests never started with ClosedError (they did not land), the one
        cut short and those sent with ConnectionClosedError when the socket closes (unknown).
        A compressed or TLS stream writes whole: closing the socket under it ends it.
        """
        if self.state != CONNECTED:
            return
        self._close_at = max(deadline, time.monotonic() + 0.1)
        lock = self._write_lock
        if not lock.acquire(True, max(0.1, deadline - time.monotonic()) + 2 * SEND_SLICE_SECONDS):
            logger.warning("%s: a write in progress made no progress within the close timeout (nsqd is not reading); closing under it", self._log_id)
            return
        done = None
        if self._writes and self._send_some == self._send_whole:
            # A stream written whole (TLS, compression) cannot stop at the deadline between
            # slices: its sendall waits up to the stall limit (two heartbeat intervals for a
            # consumer). A watcher closes the socket under it at the deadline instead.
            done = self.backend.event()
            try:
                self.backend.spawn(self._cut_at, done, self._close_at, name=f"nsq_sync-close-{self.id}")
            except RuntimeError:  # pragma: no cover - no new threads (interpreter shutdown)
                done = None
        try:
            if self._send_queued(max(0.0, self._close_at - time.monotonic())):
                logger.warning("%s: nsqd took too little of the last writes within the close timeout (it is not reading); closing with them unsent", self._log_id)
                self._fail_unsent()
        except (OSError, ValueError, Error) as exc:
            logger.debug("%s: final write failed: %s", self._log_id, exc)
        finally:
            if done is not None:
                done.set()
            lock.release()

    def _cut_at(self, done: Any, deadline: float) -> None:
        """_flush_all's watcher for a stream written whole: close the socket under the final
        write if it is still going at *deadline* (its requests then fail as the socket closes:
        ConnectionClosedError, the outcome unknown)."""
        if done.wait(max(0.0, deadline - time.monotonic())):
            return
        logger.warning("%s: nsqd took too little of the last writes within the close timeout (it is not reading); closing under them", self._log_id)
        self._teardown_socket()

    def _join(self, timeout: float) -> None:
        reader = self._reader
        if reader is not None and self.backend.current() is not reader and not self._is_reader_task():
            reader.join(timeout)
        if self._own_pool and self._pool is not None and not self._pool.in_worker():
            self._closed_event.wait(timeout)
            self._pool.close(wait=True, timeout=timeout)

    def _is_reader_task(self) -> bool:
        reader = self._reader
        current = self.backend.current()
        return reader is current or getattr(reader, "_greenlet", None) is current

    def _interrupted(self, exc: BaseException, what: str) -> ConnectionClosedError:
        return ConnectionClosedError(f"{type(exc).__name__} interrupted {what} on {self.id}; the connection is closed (a command or an answer may be cut in two)")

    def _write_interrupted(self, exc: BaseException) -> None:
        """A KeyboardInterrupt (or SystemExit, GreenletExit) in the middle of a write: part of
        a command may be on the wire, and nsqd would read the next one as its rest. The
        connection goes (both ways: pending answers fail now); the caller re-raises *exc*."""
        if not isinstance(exc, Exception):
            self._abort(self._interrupted(exc, "a write"), reading_too=True)

    def _abort(self, error: BaseException, reading_too: bool = False) -> None:
        """Stop writing because of *error* (a failed write); the reader reports the close.

        Only the write side is shut: whatever nsqd already sent (often the E_* error frame
        that explains the failure) is still read, and the reader ends at nsqd's close or,
        for a peer that stopped reading, at the staleness timeout. With *reading_too* both
        sides are shut, so the reader ends at once (nothing nsqd might still send matters).
        """
        if self.error is None:
            self.error = error
        stream = self._stream
        if stream is not None:
            stream.shutdown(write_only=not reading_too)
        self._wake_reader.set()  # a parked reader task must see the close

    def _teardown_socket(self) -> None:
        self._lane_clean = False  # (a Writer's free lane: its next publish checks the state, unsent)
        self._wake_reader.set()
        stream = self._stream
        if stream is not None:
            stream.shutdown()
        elif self._raw_sock is not None:
            try:
                self._raw_sock.close()
            except OSError:
                pass

    def _on_disconnect(self, error: Optional[BaseException]) -> None:
        reported = False
        if isinstance(error, _FatalFrame):
            error, reported = error.error, True
        if error is None and not self._closing and self.error is not None:
            error = self.error
        with self._lock:
            self.state = DISCONNECTED
        self._lane_clean = False
        if self._stream is not None:
            self._stream.shutdown()  # wakes a writer blocked on a peer that stopped reading
            self._stream.close()
        if self._workers_lead and self._pool is not None:
            self._pool.messages.withdraw_lead(self)  # nothing more to read here
        queued = self._queued
        if queued and error is not None:
            # They still go to their handlers: nsqd may deliver them again (a duplicate), or
            # not at all (it crashed, or the channel was ephemeral), so dropping them here
            # could lose them. Their answers cannot be sent; said once here, not per message.
            logger.warning(
                "%s: %d messages read before the connection ended still go to handlers; their answers cannot be sent, "
                "and nsqd, if it still holds them, delivers them again", self._log_id, queued,
            )
        self._close_wait.set()
        self._drained.set()
        lock = self._write_lock
        if lock.acquire(False):  # (not while a writer is in the middle of a send: what it took may be on the wire)
            try:
                self._mark_unsent(list(self._writes))
            finally:
                lock.release()
        self._fail_pending(error)
        if error is not None:
            self.error = error
            if not reported:
                (logger.debug if self._owned else logger.warning)("%s: %s", self._log_id, error)
                self._emit("error", conn=self, error=error)
        self._emit_close()

    def _withdraw_abandoned(self) -> int:
        """Take the requests nobody waits for any more out of the queue, while their bytes are
        still unwritten: a blocking caller's whose timeout passed (``abandoned``), or a Future
        already settled (a Writer's publish timeout). Returns how many. nsqd never gets them.

        Kept, they went out once nsqd answered again: behind a stalled nsqd (SIGSTOP, a long GC
        or fsync), every publish queued behind the first unanswered one timed out, stayed queued
        (37,239 of them, 144 MB, in a review) and was stored when nsqd resumed, so a caller that
        retried on TimeoutError stored it twice. Not while a writer is in the middle of a send
        (the write lock is held past WITHDRAW_WAIT_SECONDS): what it took may be on the wire;
        the next timeout looks again. (Callers timing out together wait for each other that
        long at most: each one's look takes microseconds.)
        """
        lock = self._write_lock
        if not lock.acquire(True, WITHDRAW_WAIT_SECONDS):
            return 0
        try:
            with self._lock:
                writes, pending = self._writes, self._pending
                requests = self._requests_in(list(writes))
                count = min(len(requests), len(pending))  # (the unsent requests: the last pending, in order)
                waiters = list(pending)
                dropped = [
                    (index, waiter) for index, waiter in zip(requests[len(requests) - count:], waiters[len(waiters) - count:])
                    if waiter.done() or getattr(waiter, "abandoned", False)
                ]
                if not dropped:
                    return 0
                indices = {index for index, _ in dropped}
                gone = {id(waiter) for _, waiter in dropped}
                kept = [data for index, data in enumerate(writes) if index not in indices]
                writes.clear()
                writes.extend(kept)
                pending.clear()
                pending.extend(waiter for waiter in waiters if id(waiter) not in gone)
                return len(dropped)
        finally:
            lock.release()

    def _requests_in(self, queued: List[Any]) -> List[int]:
        """Where in *queued* (commands never written, in order) the requests are: their waiters
        are the last that many pending ones, in the same order (each request is queued with its
        bytes). The rest of a command begun (_partial, first) is none: its request went out."""
        first = 1 if queued and queued[0] is self._partial else 0
        return [index for index in range(first, len(queued)) if bytes(queued[index][:4]) in _REQUESTS]

    def _mark_unsent(self, queued: List[Any]) -> None:
        """*queued*, commands never written (the caller holds the write lock): the requests
        among them are the last of the pending ones (each is queued with its bytes, in order),
        and fail as ``unprocessed`` when the connection goes, so the Writer sends them again at
        once, and may: nsqd never saw them. Not as "may or may not have run". They are the
        requests queued behind an answer (Nagle's rule, see _request), waiting for room in the
        socket, or in a send the socket refused."""
        count = len(self._requests_in(queued))
        if count:
            with self._lock:
                pending = list(self._pending)
            for future in pending[max(0, len(pending) - count):]:
                future.unprocessed = True

    def _fail_pending(self, error: Optional[BaseException]) -> None:
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
        for future in pending:
            if not future.done():
                failure = ConnectionClosedError(f"connection to {self.id} closed before nsqd answered" + (f": {error}" if error else ""))
                #: True when nsqd provably never ran the command (it came after a fatal error), so re-sending it is safe
                failure.unprocessed = getattr(future, "unprocessed", False)  # type: ignore[attr-defined]
                future.set_exception(failure)
                if self._request_failed is not None:
                    self._request_failed(future, failure)

    def _emit_close(self) -> None:
        with self._lock:
            if self._close_fired:
                return
            self._close_fired = True
        if self._listeners.get("close"):
            try:
                self.worker_pool.control.submit(self._fire_close_final)
                return
            except RuntimeError:
                # The pool is closed (a shared one, closed first): the listeners still run,
                # here, as they would have on the pool ("close" fires exactly once).
                self._close_firer = self.backend.current()
                try:
                    self._fire_close_final()
                finally:
                    self._close_firer = None
                return
        self._closed_event.set()
        if self._own_pool and self._pool is not None:
            self._pool.close(wait=False)

    def _fire_close_final(self) -> None:
        try:
            self._fire("close", conn=self)
        finally:
            self._closed_event.set()
            if self._own_pool and self._pool is not None:
                self._pool.close(wait=False)

    def _fire_close_sync(self) -> None:
        with self._lock:
            if self._close_fired:
                return
            self._close_fired = True
        self._close_firer = self.backend.current()
        try:
            self._fire("close", conn=self)
        finally:
            self._close_firer = None
        self._closed_event.set()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the connection is closed and its ``close`` listeners ran; False on timeout.

        Raises RuntimeError when called from a listener of an event other than ``message``
        before that (those run one at a time, and the ``close`` listeners would wait for it),
        or from a ``close`` listener itself; ConfigError (TypeError for a non-number) naming
        ``timeout`` for a bad one.
        """
        if timeout is not None:
            check_timeout(timeout)
        if not self._closed_event.is_set() and (
            (self._pool is not None and self._pool.control.in_worker()) or (self._close_firer is not None and self._close_firer is self.backend.current())
        ):
            raise RuntimeError(
                f"wait_closed() called from a {self.id} event listener would wait for itself: the close "
                "listeners run after it, on the same worker; listen to 'close' instead"
            )
        return self._closed_event.wait(timeout)


class _WholeWriteStalled(OSError):
    """A write of a stream written whole (TLS, compression) timed out, maybe part way: fatal
    for the connection (see AsyncConn._send_whole). Not a BlockingIOError or socket.timeout,
    which the slice writers take for "no room yet" and retry."""


class WarningTally:
    """A count of like events, warned about at most every *every* seconds, with the count
    since the last warning (not a warning per event, which floods a log in an outage)."""

    __slots__ = ("every", "count", "said")

    def __init__(self, every: float) -> None:
        self.every = every
        self.count = 0
        self.said = float("-inf")

    def add(self, n: int) -> int:
        """Count *n* more; the count to warn about now (then it starts again), else 0."""
        self.count += n
        now = time.monotonic()
        if now - self.said < self.every:
            return 0
        due, self.count, self.said = self.count, 0, now
        return due


def _already_answered(message: Message) -> AlreadyRespondedError:
    if getattr(message, "_superseded", False):  # (set only on a replaced copy: see _handle_frames)
        return AlreadyRespondedError(
            f"{message!r} can no longer be answered: nsqd timed it out and delivered it again "
            "(touch() long jobs or raise msg_timeout)"
        )
    return AlreadyRespondedError(f"{message!r} was already answered")


class _Answer:
    """The waiter of a request whose caller reads the answer itself (request_wait).

    Takes the place of a Future in the pending queue at a fraction of its cost: only the
    reading thread ever sets it, and that is the thread that waits for it.
    """

    __slots__ = ("value", "error", "unprocessed", "command", "abandoned")
    #: never handed to unprocessed_handler: the caller re-sends it itself
    led = True

    def __init__(self) -> None:
        self.value: Optional[bytes] = None
        self.error: Optional[BaseException] = None
        self.unprocessed = False
        #: its caller's timeout passed (see AsyncConn._withdraw_abandoned)
        self.abandoned = False

    def done(self) -> bool:
        return self.value is not None or self.error is not None

    def set_result(self, value: bytes) -> None:
        if self.error is None:
            self.value = value

    def set_exception(self, error: BaseException) -> None:
        self.error = error


class _WaitedAnswer(_Answer):
    """An :class:`_Answer` whose caller waits for another task to read it: *held* (a lock
    created held, the backend's ``signal()``) is released when the answer (or the failure)
    is set."""

    __slots__ = ("_done",)

    def __init__(self, held: Any) -> None:
        super().__init__()
        self._done = held

    def set_result(self, value: bytes) -> None:
        if self.value is None and self.error is None:
            self.value = value
            self._done.release()

    def set_exception(self, error: BaseException) -> None:
        if self.value is None and self.error is None:
            self.error = error
            self._done.release()

    def wait(self, timeout: Optional[float]) -> bool:
        # Setters hold the read token, so they never race each other.
        if timeout is None:
            self._done.acquire()
            return True
        return self._done.acquire(True, max(0.0, timeout)) or self.done()


#: why a connection without heartbeats cannot subscribe
NO_HEARTBEAT_SUB = "nsqd refuses SUB (a fatal E_INVALID that closes the connection) when heartbeats are disabled; a consumer needs them"


def _timeval(seconds: float) -> bytes:
    """*seconds* as the struct timeval of SO_RCVTIMEO/SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class _Closed(Exception):
    """Internal: the peer closed the connection (recv returned nothing)."""


class _ReadEnded(Exception):
    """Internal: reading is over; the end was reported by whoever read last."""


class _FatalFrame(Exception):
    """Internal: a fatal error frame ended the read loop (already reported)."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error

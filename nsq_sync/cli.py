"""The ``nsq-sync`` command: demo, worker, pub, tail, stats, topic, channel, cluster.

Exit codes: 0 success; 1 the job ran but failed (messages lost, a publish
failed); 2 bad arguments (a bad topic name, a handler that does not import; ``tail``'s
default channel refused on a topic whose backlog it would take and delete, or whose backlog it
could not check);
3 a broker could not be reached or started; 4 refused: every nsqd ``pub`` publishes to refused
its connection's handshake (the AUTH secret, or TLS: an untrusted certificate, TLS required or
missing) or answered it with something other than NSQ's protocol (an address that is not nsqd's
TCP port, such as its HTTP port), which retrying with the same settings will not fix, and for
``stats``, ``topic`` and ``channel`` an address that is not an HTTP API (a TCP port) or TLS
failing; 130 interrupted (Ctrl-C, or
SIGTERM/SIGHUP during ``demo``, which stops its brokers first, or ``pub``, which closes its
Writer first, or ``tail -n N`` before N messages were printed). ``worker``,
``tail`` (without ``-n``, or once N were printed) and ``cluster`` treat SIGINT and SIGTERM as the
normal way to stop and exit 0. ``tail --timeout``: fewer than N messages in time is 1 (3 when not
subscribed to any nsqd by then); without ``-n``, a stop (0). tail's backlog check that cannot be
made because a broker is down or hung is 3, for a reason the command line must fix 2.

When the reader of stdout or stderr leaves (EPIPE: ``| head -1``), a command stops, cleans up
and exits without a word: 0 for ``tail`` and ``cluster``, which run until stopped and for which
that is one more way to stop; 141 (128 + SIGPIPE, what a shell reports for a program SIGPIPE
killed) for ``demo``, ``pub``, ``stats``, ``topic`` and ``channel``, whose report did not get through, unless they failed: a
failure (1, 2, 3, 4, 130) keeps its own exit code, which says more.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import secrets
import select
import signal
import stat
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the status a shell shows for a program SIGPIPE killed

_REEXEC_MARK = "NSQ_SYNC_CLI_GEVENT"

logger = logging.getLogger("nsq_sync.cli")


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


class Unavailable(Exception):
    """A broker could not be reached or started (exit code 3)."""


class Refused(Exception):
    """Every nsqd refused the handshake (credentials or TLS), or is not nsqd's TCP port (exit code 4)."""


class Failed(Exception):
    """The job ran but failed part-way (exit code 1); the message says where and what was done."""


class OutputGone(Exception):
    """The reader of *stream* (stdout or stderr) left: a write failed with EPIPE, or the pipe
    was seen without a reader. The command stops and cleans up on the way out; main() then
    ends quietly (the exit codes in the module docstring)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(getattr(stream, "name", "output"))
        self.stream = stream


#: the commands for which their output's reader leaving is a normal stop (exit 0): they run
#: until stopped, and `| head -1` is how a script takes the first of what they print (not of
#: `tail --channel NAME`: lines in the pipe that head did not read are finished; -n N is the way)
_STOPPED_BY_OUTPUT_END = ("tail", "cluster")


# ------------------------------------------------------------------ helpers
def _check_topic(value: str) -> str:
    from .protocol.names import valid_topic_name

    if not valid_topic_name(value):
        raise argparse.ArgumentTypeError(f"bad topic name {value!r}: use 1-64 characters of [.a-zA-Z0-9_-], optionally ending in #ephemeral")
    return value


def _check_channel(value: str) -> str:
    from .protocol.names import valid_channel_name

    if not valid_channel_name(value):
        raise argparse.ArgumentTypeError(f"bad channel name {value!r}: use 1-64 characters of [.a-zA-Z0-9_-], optionally ending in #ephemeral")
    return value


def _check_address(value: str) -> List[str]:
    """An argparse type: one host:port, or several joined by commas (as an environment variable
    holding a list often is); the library checks each further."""
    parts = [part.strip() for part in value.split(",")]
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            if "@" in value:  # (a URL's user:password: not echoed to the terminal or a log)
                raise argparse.ArgumentTypeError("bad address <redacted: it holds credentials>: use host:port, with no user or password")
            raise argparse.ArgumentTypeError(f"bad address {part!r} in {value!r}: use host:port, or host:port,host:port" if len(parts) > 1 else f"bad address {value!r}: use host:port")
    return parts


def _number_text(value: float) -> str:
    """*value* for --help, exactly: 2,147,483,647; 86,400; 0.001."""
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return f"{int(value):,}"


def _readable_file(value: str) -> str:
    """An argparse type: a file that exists and can be read (a TLS certificate or key),
    checked before anything starts; what is in it is checked by _connection_settings."""
    if not value:
        raise argparse.ArgumentTypeError("an empty file name")
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"no such file: {value!r}")
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a file")
    if not os.access(value, os.R_OK):
        raise argparse.ArgumentTypeError(f"{value!r} cannot be read (permission denied)")
    return value


def _int_range(low: int, high: Optional[int] = None, param: Optional[str] = None) -> Callable[[str], int]:
    """An argparse type: a whole number from *low* to *high* (no upper bound for None);
    *param* names the library parameter it becomes, in the error message. Its ``allowed``
    (the range, for --help: see _HelpFormatter) is made from the same bounds as the check."""
    note = f" (the Reader's {param})" if param else ""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:  # also a string of more digits than int() converts
            raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a whole number") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{value[:40]!r} must be at least {low}{note}")
        if high is not None and number > high:
            raise argparse.ArgumentTypeError(f"{value[:40]!r} must be at most {high}{note}")
        return number

    parse.__name__ = "whole number"
    parse.allowed = f"{_number_text(low)}..{_number_text(high)}" if high is not None else f"{_number_text(low)} or more"  # type: ignore[attr-defined]
    parse.metavar = "N"  # type: ignore[attr-defined]
    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: seconds, a finite number from *low* to *high* (``allowed``, for
    --help, made from the same bounds)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a number of seconds") from None
        if not low <= number <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"{value[:40]!r} must be a number of seconds from {low:g} to {high:g}")
        return number

    parse.__name__ = "seconds"
    parse.allowed = f"{_number_text(low)}..{_number_text(high)}"  # type: ignore[attr-defined]
    parse.metavar = "SECONDS"  # type: ignore[attr-defined]
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """--help of a command: each number option shows its range and default, taken from the
    check argparse runs (``allowed`` of _int_range/_seconds) and from the option's default,
    so that the help and the check cannot disagree: ``--max-in-flight N  ... (1..2,147,483,647,
    default 200)``. Its metavar is N or SECONDS unless the option names one."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        allowed = getattr(action.type, "allowed", None)
        if allowed is None:
            return text
        if action.default is not None and action.default is not argparse.SUPPRESS:
            allowed = f"{allowed}, default {_number_text(action.default)}"
        return f"{text} ({allowed})" if text else f"({allowed})"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return getattr(action.type, "metavar", None) or super()._get_default_metavar_for_optional(action)


_positive_int = _int_range(1)

#: option ranges (checked by argparse, before anything starts)
MAX_DEMO_COUNT = 100_000_000  # the demo keeps a flag (a byte, allocated up front) and a latency per message
MAX_DEMO_THREADS = 1000
MAX_DEMO_BATCH = 100_000
MAX_DEMO_BODY_SIZE = 1024 * 1024 - 64  # under nsqd's default --max-msg-size (1 MiB)
MAX_CLUSTER_NSQD = 100
#: where pub and tail connect when given no address: nsqd's default TCP address
DEFAULT_NSQD_TCP_ADDRESS = "127.0.0.1:4150"
MAX_TIMEOUT = 86400.0
#: worker --close-timeout: the drain must end before the process manager's SIGKILL (Kubernetes
#: sends it 30 s after SIGTERM by default; the Reader's own default, 30 s, ends just after that)
WORKER_CLOSE_TIMEOUT = 25.0
MAX_IN_FLIGHT = 2**31 - 1  # the Reader's range
MAX_CONCURRENCY = 100_000  # the Reader's range (nsq_sync.reader.MAX_CONCURRENCY; not imported: --help stays light)
MAX_TRIES = 65535  # the Reader's range
#: worker --msg-timeout: nsqd refuses an IDENTIFY msg_timeout under 1 s or above its
#: --max-msg-timeout, 900 s by default (the library's check, nsq_sync.protocol.limits)
MIN_MSG_TIMEOUT = 1.0
MAX_MSG_TIMEOUT = 900.0
#: worker --requeue-delay: nsqd cuts a REQ delay to its --max-req-timeout, 3600 s by default
#: (the library's range for requeue_delay)
MAX_REQUEUE_DELAY = 3600.0
MAX_BACKOFF_DURATION = 3600.0  # the Reader's range
MAX_MSG_SIZE = 2**31 - 1  # the Writer's range for max_msg_size
DEFAULT_MAX_MSG_SIZE = 1024 * 1024  # the Writer's default: nsqd's default --max-msg-size
#: where the AUTH secret may come from instead of --auth-secret, which every user of the
#: machine can read in `ps` (the environment is readable only by the same user and root)
AUTH_SECRET_ENV = "NSQ_SYNC_AUTH_SECRET"
#: what stops the commands that run until stopped (and the brokers they started): Ctrl-C,
#: SIGTERM, and SIGHUP (the terminal closed; the brokers run in sessions of their own, so
#: nothing else would stop them)
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_MPUB_BODY_LIMIT = 5 * 1024 * 1024  # nsqd's default --max-body-size, what the demo's brokers use
#: tail's backlog check (before its ephemeral channel subscribes): every HTTP request of it
#: within this many seconds, each within BACKLOG_CHECK_REQUEST_TIMEOUT
BACKLOG_CHECK_TIMEOUT = 3.0
BACKLOG_CHECK_REQUEST_TIMEOUT = 1.0
#: tail's stop: how long the line being written may take to get out (a slow output, not a
#: stalled one) before tail gives its message back all the same, and then how long its
#: Reader's close may take (every message is answered by then: only a handler still stuck in
#: its write is waited for, in vain). The Reader's default, 30 s, is what tail used to wait.
TAIL_WRITE_GRACE = 1.0
TAIL_CLOSE_TIMEOUT = 1.0


#: a demo body's sequence number and send time: "%010d|<19-digit time_ns>|"
DEMO_BODY_HEADER = 31


def _demo_body(seq: int, padding: bytes) -> bytes:
    return b"%010d|%d|%s" % (seq, time.time_ns(), padding)


def _demo_padding(body_size: int) -> bytes:
    """What fills a demo body up to *body_size* bytes (nothing below the header's size)."""
    return b"." * max(0, body_size - DEMO_BODY_HEADER)


def _percentile(sorted_values: List[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * (len(sorted_values) - 1)))))
    return sorted_values[index]


def _print(text: str, stream: Any, end: str = "\n") -> None:
    """print(*text*) to *stream* and flush, a reader that left raised as OutputGone; nothing
    for a stream the command was started without (``>&-``: None)."""
    if stream is None:
        return
    try:
        print(text, file=stream, end=end, flush=True)
    except BrokenPipeError:
        raise OutputGone(stream) from None


def _say(text: str) -> None:
    """A line on stderr, for main()'s last word: a stderr whose reader left is made quiet and
    the line dropped, so the exit code (the failure's own) still gets through."""
    try:
        _print(text, sys.stderr)
    except OutputGone:
        _quiet_broken(sys.stderr)


class _Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._last = 0.0

    def update(self, sent: int, received: int, elapsed: float, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        width = 30
        done = int(width * received / self.total) if self.total else width
        bar = "#" * done + "-" * (width - done)
        rate_in = received / elapsed if elapsed > 0 else 0.0
        rate_out = sent / elapsed if elapsed > 0 else 0.0
        _print(f"\r[{bar}] sent {sent:>8,} ({rate_out:>9,.0f}/s)  received {received:>8,} ({rate_in:>9,.0f}/s)", sys.stderr, end="")

    def finish(self) -> None:
        if self.enabled:
            _print("", sys.stderr)


def _start_cluster(nsqd_count: int) -> Any:
    from .testing import BrokerNotFoundError, LocalCluster

    try:
        cluster = LocalCluster(nsqd_count=nsqd_count)
        cluster.start()
    except BrokerNotFoundError as exc:
        raise Unavailable(str(exc)) from exc
    except Exception as exc:
        raise Unavailable(f"could not start the local NSQ cluster: {exc}") from exc
    return cluster


# --------------------------------------------------------------------- demo
class _Interrupt:
    """SIGINT/SIGTERM handling for a command that cleans up itself: the first signal sets a
    flag the command polls (then it raises KeyboardInterrupt: exit 130 after cleaning up);
    a second one raises KeyboardInterrupt at once. While *defer* is False the first signal
    raises at once too (pub between messages: its read of stdin may wait for ever).

    *output*, a stream the command prints its result on at the end, is polled too: when it is
    a pipe that lost its reader, check() raises OutputGone (the demo stops then, not after a
    run nobody will read the result of)."""

    def __init__(self, defer: bool = True, output: Any = None) -> None:
        self.event = threading.Event()
        self.defer = defer
        self._previous: Dict[int, Any] = {}
        self._output = output
        self._output_gone = _pipe_reader_gone(output) if output is not None else None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.event.is_set() or not self.defer:
            raise KeyboardInterrupt
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        if self._output_gone is not None and self._output_gone():
            raise OutputGone(self._output)

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _prepare_demo_topic(cluster: Any, topic: str, channel: str, timeout: float, interrupt: _Interrupt) -> None:
    """Create the topic and channel on every nsqd and wait until nsqlookupd lists them all,
    so the Reader finds every nsqd on its first lookupd query (no discovery delay in the numbers)."""
    from .httpapi import LookupdClient, NsqdHTTPClient

    for address in cluster.nsqd_http_addresses:
        client = NsqdHTTPClient(address)
        client.create_topic(topic)
        client.create_channel(topic, channel)
    lookupd = LookupdClient(cluster.lookupd_http_addresses[0])
    deadline = time.monotonic() + timeout
    wanted = len(cluster.nsqd_tcp_addresses)
    while len(lookupd.producers(topic)) < wanted:
        interrupt.check()
        if time.monotonic() > deadline:
            logger.warning("nsqlookupd does not list %s on every nsqd after %.0fs; going on", topic, timeout)
            return
        time.sleep(0.01)


def _wait_subscribed(reader: Any, count: int, timeout: float, interrupt: _Interrupt) -> None:
    """Wait until *reader* is subscribed on *count* connections (or *timeout* passed)."""
    deadline = time.monotonic() + timeout
    while len(reader.conns) < count:
        interrupt.check()
        if time.monotonic() > deadline:
            logger.warning("the Reader is subscribed to %d of %d nsqd after %.0fs; publishing anyway", len(reader.conns), count, timeout)
            return
        time.sleep(0.01)


def cmd_demo(args: argparse.Namespace) -> int:
    """Local cluster -> Writer (several threads) -> Reader via nsqlookupd; count and time everything.

    The topic and channel are created on every nsqd, and the Reader is subscribed to all of
    them, before the first message is published and before the clock starts: the rates and
    latencies measure the client and the brokers, not nsqlookupd's polling.
    """
    import nsq_sync

    count = args.count
    padding = _demo_padding(args.body_size)
    if args.batch > 1:
        # MPUB: 4-byte count, then a 4-byte size before each body (checked before the brokers start)
        mpub_size = 4 + min(args.batch, count) * (4 + len(_demo_body(count, padding)))
        if mpub_size > _MPUB_BODY_LIMIT:
            raise UsageError(
                f"--batch {args.batch} x --body-size {args.body_size} makes MPUB bodies of {mpub_size} bytes, "
                f"over nsqd's default --max-body-size ({_MPUB_BODY_LIMIT}); use a smaller --batch"
            )
    topic = f"demo.{os.getpid()}.{int(time.time())}"
    channel = "demo"
    nsqd_count = 2
    progress = _Progress(count, enabled=sys.stderr.isatty() and not args.quiet)
    if not args.json and not args.quiet:
        _print(f"nsq-sync demo: {count:,} messages of {args.body_size} bytes, {args.threads} publishing threads, "
               f"max_in_flight {args.max_in_flight}, backend {args.backend}", sys.stderr)
    seen = bytearray(count)
    latencies: List[float] = []
    state: Dict[str, Any] = {"sent": 0, "received": 0, "duplicates": 0, "acknowledged": 0, "publish_errors": 0, "published_at": 0.0}
    lock = threading.Lock()
    all_received = threading.Event()
    stop_publishing = threading.Event()
    timed_out = False

    def handler(message: Any) -> bool:
        seq_text, _, sent_ns = message.body.partition(b"|")
        seq = int(seq_text)
        latency = (time.time_ns() - int(sent_ns.split(b"|", 1)[0])) / 1e9
        with lock:
            if seen[seq]:
                state["duplicates"] += 1
            else:
                seen[seq] = 1
                state["received"] += 1
                latencies.append(latency)
                if state["received"] == count:
                    all_received.set()
        return True

    with _Interrupt(output=sys.stdout) as interrupt:
        cluster = _start_cluster(nsqd_count)
        writer = reader = None
        threads: List[threading.Thread] = []
        try:
            interrupt.check()
            if not args.json and not args.quiet:
                _print(f"cluster: nsqlookupd http {cluster.lookupd_http_addresses[0]}, nsqd tcp {', '.join(cluster.nsqd_tcp_addresses)}", sys.stderr)
            setup_timeout = min(args.timeout, 30.0)
            _prepare_demo_topic(cluster, topic, channel, setup_timeout, interrupt)
            writer = nsq_sync.Writer(cluster.nsqd_tcp_addresses, backend=args.backend, publish_timeout=30)
            reader = nsq_sync.Reader(
                topic,
                channel,
                message_handler=handler,
                lookupd_http_addresses=cluster.lookupd_http_addresses,
                lookupd_poll_interval=1,
                max_in_flight=args.max_in_flight,
                concurrency=args.concurrency,
                backend=args.backend,
            )
            reader.start()
            _wait_subscribed(reader, nsqd_count, setup_timeout, interrupt)
            writer.wait_connected(setup_timeout, count=nsqd_count)
            started = time.monotonic()
            per_thread = [count // args.threads + (1 if i < count % args.threads else 0) for i in range(args.threads)]
            offsets = [sum(per_thread[:i]) for i in range(args.threads)]
            batch = args.batch

            def publish(first: int, n: int) -> None:
                seq = first
                end = first + n
                while seq < end and not stop_publishing.is_set():
                    top = min(end, seq + batch)
                    bodies = [_demo_body(i, padding) for i in range(seq, top)]
                    with lock:
                        state["sent"] += len(bodies)
                    try:
                        if len(bodies) == 1:
                            writer.pub(topic, bodies[0])
                        else:
                            writer.mpub(topic, bodies)
                        with lock:
                            state["acknowledged"] += len(bodies)
                    except nsq_sync.Error as exc:
                        if not stop_publishing.is_set():
                            logger.error("publish failed: %s", exc)
                        with lock:
                            state["publish_errors"] += len(bodies)
                    seq = top
                with lock:
                    # When this thread's last publish was answered (the main loop only looks
                    # every 50 ms: a short run's rate would be off by that much).
                    state["published_at"] = max(state["published_at"], time.monotonic())

            threads = [
                threading.Thread(target=publish, args=(offsets[i], per_thread[i]), name=f"demo-pub-{i}", daemon=True)
                for i in range(args.threads)
            ]
            for thread in threads:
                thread.start()
            publishing = True
            publish_elapsed = 0.0
            while True:
                interrupt.check()
                if publishing and not any(t.is_alive() for t in threads):
                    publishing = False
                    publish_elapsed = state["published_at"] - started
                elapsed = time.monotonic() - started
                progress.update(state["acknowledged"], state["received"], elapsed)
                if not publishing and (state["received"] >= state["acknowledged"] or all_received.is_set()):
                    break
                if elapsed > args.timeout:
                    timed_out = True
                    logger.error("timed out after %.3gs (--timeout) waiting for messages%s", elapsed, "; publishing had not finished" if publishing else "")
                    break
                all_received.wait(0.05)
            total_elapsed = time.monotonic() - started
            progress.update(state["acknowledged"], state["received"], total_elapsed, force=True)
            progress.finish()
            if publishing:
                publish_elapsed = total_elapsed
        finally:
            stop_publishing.set()
            if reader is not None:
                reader.close()
            if writer is not None:
                writer.close(5.0)
            for thread in threads:
                thread.join(5.0)
            cluster.close()

    with lock:
        counts = dict(state)
        latencies.sort()
    # The demo ends early only at --timeout: what has not arrived by then may be late, not lost.
    unreceived = max(0, counts["acknowledged"] - counts["received"])
    lost = 0 if timed_out else unreceived
    summary = {
        "backend": args.backend,
        "sent": counts["sent"],
        "acknowledged": counts["acknowledged"],
        "publish_errors": counts["publish_errors"],
        "received": counts["received"],
        "duplicates": counts["duplicates"],
        "lost": lost,
        "timed_out": timed_out,
        "unreceived": unreceived,
        "publish_rate": round(counts["acknowledged"] / publish_elapsed, 1) if publish_elapsed else 0.0,
        "consume_rate": round(counts["received"] / total_elapsed, 1) if total_elapsed else 0.0,
        "elapsed_s": round(total_elapsed, 3),
        "latency_ms": {name: round(_percentile(latencies, q) * 1000, 2) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
    }
    ok = not timed_out and lost == 0 and counts["publish_errors"] == 0 and counts["acknowledged"] == count and counts["received"] == count
    try:
        if args.json:
            _print(json.dumps(summary), sys.stdout)
        else:
            lat = summary["latency_ms"]
            _print(
                f"sent {summary['sent']:,}  acknowledged {summary['acknowledged']:,}  received {summary['received']:,}  "
                f"duplicates {summary['duplicates']:,}  "
                + (f"unreceived {unreceived:,} (timed out)" if timed_out else f"lost {lost:,}")
                + f"  publish errors {summary['publish_errors']:,}\n"
                f"publish {summary['publish_rate']:,.0f} msg/s  consume {summary['consume_rate']:,.0f} msg/s  "
                f"in {summary['elapsed_s']:.2f}s\n"
                f"latency publish->receive ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}",
                sys.stdout,
            )
    except OutputGone as exc:
        if ok:
            raise
        _quiet_broken(exc.stream)  # (a failed run says so by its exit code, 1, all the same)
    return EXIT_OK if ok else EXIT_FAILED


# ------------------------------------------------------------------- worker
def _load_handler(path: str) -> Callable[[Any], Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"handler {path!r} must look like module:function")
    if os.getcwd() not in sys.path:
        # Last: a file here (an ssl.py, a json.py) must not shadow a module the library imports.
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"cannot import module {module_name!r} for handler {path!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no {attr!r} (handler {path!r})") from None
    if not callable(target):
        raise UsageError(f"handler {path!r} is not callable")
    from .reader import check_message_handler

    try:
        check_message_handler(target)
    except TypeError as exc:
        raise UsageError(f"handler {path!r}: {exc}") from None
    return target


def _flat(values: Optional[List[List[str]]]) -> List[str]:
    """The addresses of a repeatable option that takes several at a time (None: not given)."""
    return [address for value in values or [] for address in value]


def _addresses(args: argparse.Namespace, default_nsqd: Optional[str] = None) -> Dict[str, Any]:
    # (each option's value is a list: _check_address splits host:port,host:port)
    nsqd = _flat(args.nsqd_tcp_address)
    lookupd = _flat(getattr(args, "lookupd_http_address", None))
    if not nsqd and not lookupd:
        if default_nsqd is None:
            raise UsageError("give at least one --nsqd-tcp-address or --lookupd-http-address")
        nsqd = [default_nsqd]
    return {"nsqd_tcp_addresses": nsqd or None, "lookupd_http_addresses": lookupd or None}


#: the --tls-* options that set up TLS (besides --tls itself), and their argparse names
_TLS_OPTIONS = (("--tls-ca-file", "tls_ca_file"), ("--tls-cert-file", "tls_cert_file"), ("--tls-key-file", "tls_key_file"),
                ("--tls-insecure-skip-verify", "tls_insecure_skip_verify"))


def _tls_given(args: argparse.Namespace) -> List[str]:
    """The --tls-* options given, by name (for messages)."""
    return [option for option, dest in _TLS_OPTIONS if getattr(args, dest)]


def _tls_context(args: argparse.Namespace, given: List[str]) -> Tuple[Dict[str, Any], Any]:
    """tls_options from the --tls-* options, and the SSLContext they make, built now so that a
    file OpenSSL refuses is a UsageError before anything connects; so are a key without its
    certificate and --tls-insecure-skip-verify with --tls-ca-file. (TCP and HTTPS alike.)"""
    if args.tls_key_file and not args.tls_cert_file:
        raise UsageError("--tls-key-file needs --tls-cert-file, the certificate it is the key of")
    if args.tls_insecure_skip_verify and args.tls_ca_file:
        raise UsageError("--tls-insecure-skip-verify verifies nothing, so --tls-ca-file would not be used: give one of them")
    import ssl

    from .errors import ConfigError
    from .transport.tls import make_ssl_context

    files = (("ca_certs", args.tls_ca_file), ("certfile", args.tls_cert_file), ("keyfile", args.tls_key_file))
    options: Dict[str, Any] = {key: value for key, value in files if value}
    if args.tls_insecure_skip_verify:
        options["cert_reqs"] = ssl.CERT_NONE
    try:
        return options, make_ssl_context(options)
    except ConfigError as exc:
        raise UsageError(f"cannot use {', '.join(given) or 'the TLS settings'}: {exc.reason}") from None


def _connection_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The Reader's or Writer's TLS and AUTH parameters from --tls* and --auth-secret (or
    $NSQ_SYNC_AUTH_SECRET), checked before anything connects or a handler is imported: a TLS
    option without --tls, a key without its certificate, a certificate file OpenSSL refuses,
    or an empty secret is a UsageError."""
    settings: Dict[str, Any] = {}
    given = _tls_given(args)
    if given and not args.tls:
        # (the library would only warn: the options of a TLS that is not used)
        raise UsageError(f"{given[0]} needs --tls: without it the connection is not encrypted")
    if args.tls:
        options, _ = _tls_context(args, given)  # (the connections build it again: here, the files are read up front)
        settings.update(tls_v1=True, tls_options=options)
    secret, source = args.auth_secret, "--auth-secret"
    if secret is None:
        secret, source = os.environ.get(AUTH_SECRET_ENV), AUTH_SECRET_ENV
    if secret is not None:
        if not secret:
            raise UsageError(f"{source} is empty: give the secret, or {'leave the option out' if source.startswith('-') else 'unset it'}")
        settings["auth_secret"] = os.fsencode(secret)  # (the bytes given, whatever the locale)
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a user's handler function as a long-lived consumer; SIGTERM drains."""
    import nsq_sync

    # (checked before the user's module is imported, and runs its code)
    addresses = _addresses(args)
    connection = _connection_settings(args)
    handler = _load_handler(args.handler)
    reader = nsq_sync.Reader(
        args.topic,
        args.channel,
        message_handler=handler,
        max_in_flight=args.max_in_flight,
        concurrency=args.concurrency,
        max_tries=args.max_tries,
        max_backoff_duration=args.max_backoff_duration,
        close_timeout=args.close_timeout,
        requeue_delay=args.requeue_delay,
        backend=args.backend,
        **addresses,
        **connection,
        **({"msg_timeout": args.msg_timeout} if args.msg_timeout is not None else {}),
    )
    stop = threading.Event()
    if args.verbose:
        threading.Thread(target=_report_rates, args=(reader, stop), name="nsq-sync-rates", daemon=True).start()
    try:
        reader.run()
    finally:
        stop.set()
    return EXIT_OK


#: worker -v: seconds between lines of rates while nothing changes (one every second otherwise)
RATES_IDLE_SECONDS = 60.0


def _report_rates(reader: Any, stop: threading.Event) -> None:
    """worker -v: a line of rates every second while something changes (messages received,
    finished or requeued, in flight, connections), and at most every RATES_IDLE_SECONDS while
    nothing does (an idle worker said the same line every second: 60 a minute per pod)."""
    last = reader.stats()
    last_time = time.monotonic()
    logged_at: Optional[float] = None
    logged = ""
    while not stop.wait(1.0):
        now = reader.stats()
        now_time = time.monotonic()
        span = now_time - last_time
        counts = {key: now.get(f"messages_{key}", 0) - last.get(f"messages_{key}", 0) for key in ("received", "finished", "requeued")}
        line = "%s:%s: received %.0f/s finished %.0f/s requeued %.0f/s in flight %s connections %d" % (
            now.get("topic", reader.topic), now.get("channel", reader.channel),
            counts["received"] / span, counts["finished"] / span, counts["requeued"] / span,
            now.get("in_flight", 0), sum(1 for c in now.get("connections", ()) if c["connected"]),
        )
        # (messages moving, or a line that says something new: the drop to 0/s once, too)
        if logged_at is None or any(counts.values()) or line != logged or now_time - logged_at >= RATES_IDLE_SECONDS:
            logger.info("%s", line)
            logged_at, logged = now_time, line
        last, last_time = now, now_time


# ---------------------------------------------------------------- pub, tail
def cmd_pub(args: argparse.Namespace) -> int:
    """Publish messages from the command line or stdin lines, waiting for each OK.

    Every way out says how many messages nsqd had confirmed, a failure also the line or
    argument that failed; SIGINT/SIGTERM/SIGHUP stop it (exit 130) like a failure does, with
    the Writer closed."""
    import nsq_sync

    # The exact bytes given: argv as the OS passed it (os.fsencode undoes Python's decoding,
    # surrogate escapes included), stdin read as bytes; nothing is decoded or re-encoded.
    if "-" in args.messages and len(args.messages) > 1:
        # (it would be published as a message "-", and stdin ignored)
        raise UsageError(
            f"'-' (read the messages from stdin) must be the only message argument, not one of {len(args.messages)}: "
            "give the messages as arguments or one per line on stdin, not both (a message '-' goes on a line of stdin)"
        )
    if args.messages == ["-"] or not args.messages:
        what = "line"
        if sys.stdin is None:  # (started with stdin closed: `<&-`)
            raise UsageError("stdin is closed: give the messages as arguments, or one per line on stdin")
        stdin = getattr(sys.stdin, "buffer", None)  # None when something replaced sys.stdin with a text stream
        lines: Any = stdin if stdin is not None else (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
        bodies: Any = (line.rstrip(b"\n") for line in lines)
    else:
        what = "argument"
        bodies = [os.fsencode(message) for message in args.messages]
        empty = next((number for number, body in enumerate(bodies, 1) if not body), None)
        if empty is not None:  # (nsqd refuses an empty body; "$UNSET" would publish nothing, silently)
            raise UsageError(f"argument {empty} is empty: nsqd refuses empty messages (empty lines of stdin are skipped)")
    addresses = _addresses(args, default_nsqd=DEFAULT_NSQD_TCP_ADDRESS)
    if not addresses["nsqd_tcp_addresses"]:
        raise UsageError("pub needs --nsqd-tcp-address")
    connection = _connection_settings(args)
    writer: Any = None
    published = 0
    number = 0  # of the line or argument being published (1-based)

    def done() -> str:
        return f"published {published} message(s) to {args.topic}"

    def unavailable(exc: BaseException) -> Exception:
        # (every nsqd refused the handshake, or is not nsqd: exit 4, not 3, as trying again later will not help)
        cls = Refused if isinstance(exc, nsq_sync.HandshakeRefusedError) else Unavailable
        return cls(f"{what} {number}: {exc}; {done()} before {what} {number}")

    try:
        with _Interrupt(defer=False) as interrupt:
            sent = False  # the message may be with nsqd: stopped now, its answer is unknown
            try:
                # (made with the handlers in place: a signal once it connects ends pub with exit 130)
                writer = nsq_sync.Writer(addresses["nsqd_tcp_addresses"], backend=args.backend, publish_timeout=args.timeout,
                                         max_msg_size=args.max_msg_size or None, **connection)
                for number, body in enumerate(bodies, 1):
                    if not body:
                        continue
                    deadline = time.monotonic() + args.timeout
                    # Waiting for a connection sends nothing: a signal stops it at once (within
                    # 50 ms: the flag is polled, as under gevent a handler that raised would run
                    # in the hub, which reports it as an error before passing it on).
                    interrupt.defer = True
                    while not writer.wait_connected(max(0.0, min(0.05, deadline - time.monotonic()))):
                        interrupt.check()
                        refused = writer._refused()  # (every nsqd refused: at once, not at --timeout)
                        if refused is not None:
                            raise unavailable(refused)
                        if time.monotonic() >= deadline:
                            raise unavailable(writer._unsent_error())
                    interrupt.check()
                    # A signal now waits for nsqd's answer (a second one does not), so the count is exact.
                    sent = True
                    try:
                        writer.pub(args.topic, body, timeout=max(0.001, deadline - time.monotonic()))
                    except nsq_sync.NoConnectionsError as exc:
                        # (the connection went before the message was sent: nothing was)
                        sent = False
                        interrupt.check()  # (a signal that came while the publish waited for a new one)
                        raise unavailable(exc) from exc
                    except nsq_sync.Error as exc:
                        # (a ConfigError here is this message's, a body over max_msg_size: the job
                        # failed part-way, not its arguments)
                        raise Failed(f"{what} {number}: {type(exc).__name__}: {exc}; {done()} before {what} {number}") from exc
                    published += 1
                    interrupt.defer = sent = False
                    interrupt.check()
            except KeyboardInterrupt:
                unknown = f"; nsqd's answer to {what} {number} is unknown" if sent else ""
                raise KeyboardInterrupt(f"{done()}{unknown}") from None
    finally:
        if writer is not None:
            writer.close()
    if not args.quiet:
        _print(done(), sys.stderr)
    return EXIT_OK


#: what tail's backlog check could not ask: (what and why, whether it is down or hung, whether
#: the address was guessed)
_Unchecked = List[Tuple[str, bool, bool]]


def _backlog_request_timeout(deadline: float, what: str, unchecked: _Unchecked, guess: bool = False) -> Optional[float]:
    """The timeout of the backlog check's next request to *what*, or None (noted in
    *unchecked*: brokers that do not answer used the time up) when the check's
    BACKLOG_CHECK_TIMEOUT is over."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        unchecked.append((f"{what}: not asked, the check's {BACKLOG_CHECK_TIMEOUT:g}s were over", True, guess))
        return None
    return min(BACKLOG_CHECK_REQUEST_TIMEOUT, remaining)


def _failure_reason(exc: BaseException) -> str:
    """*exc* in a few words, for the backlog check's message: an HTTPError without its URL
    (the address is named already)."""
    from .errors import HTTPError

    if isinstance(exc, HTTPError):
        return f"HTTP {exc.status}: {exc.message}" if exc.status else exc.message
    return str(exc) or type(exc).__name__


def _http_failure_kind(exc: BaseException) -> str:
    """"unavailable" (exit 3), "refused" (exit 4) or "failed" (exit 1) for an HTTP request
    that raised *exc*. No answer (status 0) from a server that is down, hung or not found by
    name is nothing the command line can fix: try again later (exit 3). The other failures
    without an answer (TLS, a port that closes HTTP requests unanswered: a TCP port given for
    the HTTP one) are the address's or the settings' (exit 4)."""
    import socket

    from .errors import HTTPError

    if isinstance(exc, HTTPError) and exc.status == 0:
        unreachable = exc.timed_out or isinstance(exc.__cause__, (ConnectionRefusedError, socket.gaierror))
        return "unavailable" if unreachable else "refused"
    return "failed"


def _nsqd_http_targets(args: argparse.Namespace, addresses: Dict[str, Any], deadline: float,
                       unchecked: _Unchecked) -> List[Tuple[str, Optional[str]]]:
    """The nsqd HTTP addresses tail's backlog check asks, each with the --nsqd-tcp-address it
    was guessed from (None for an address known: given, or listed by nsqlookupd): every nsqd
    nsqlookupd lists for the topic (its broadcast address and real HTTP port), and
    --nsqd-http-address, else each --nsqd-tcp-address's port + 1 (nsqd's convention; not for
    an nsqd nsqlookupd listed already). What cannot be asked goes to *unchecked*, with the
    reason."""
    from .addresses import address_key
    from .errors import Error, HTTPError
    from .httpapi import LookupdClient

    targets: Dict[str, Optional[str]] = {}
    listed = set()  # the TCP addresses of the nsqd nsqlookupd listed

    def add(address: str, guessed_from: Optional[str] = None) -> None:
        if address not in targets or guessed_from is None:  # (known beats guessed)
            targets[address] = guessed_from

    for address in addresses["lookupd_http_addresses"] or []:
        timeout = _backlog_request_timeout(deadline, f"nsqlookupd {address}", unchecked)
        if timeout is None:
            continue
        try:
            answer = LookupdClient(address, timeout=timeout).lookup(args.topic)
        except HTTPError as exc:
            if exc.status != 404 or exc.message != "TOPIC_NOT_FOUND":
                unchecked.append((f"nsqlookupd {address}: {_failure_reason(exc)}", _http_failure_kind(exc) == "unavailable", False))
            continue  # (TOPIC_NOT_FOUND: no nsqd has registered the topic, so none holds a backlog of it)
        except Error as exc:
            unchecked.append((f"nsqlookupd {address}: {_failure_reason(exc)}", False, False))
            continue
        for producer in answer["producers"]:
            host = producer.get("broadcast_address") if isinstance(producer, dict) else None
            port = producer.get("http_port") if isinstance(producer, dict) else None
            if isinstance(host, str) and host and isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
                add(address_key(host, port))
                tcp_port = producer.get("tcp_port")
                if isinstance(tcp_port, int) and not isinstance(tcp_port, bool):
                    listed.add(address_key(host, tcp_port))
            else:
                unchecked.append((f"nsqlookupd {address}: a producer without a usable broadcast_address and http_port", False, False))
    given = [address for value in getattr(args, "nsqd_http_address", None) or [] for address in value]
    for address in given:
        add(address)
    if not given:
        for address in addresses["nsqd_tcp_addresses"] or []:
            host, _, port = address.rpartition(":")
            if address in listed:
                continue
            if int(port) < 65535:
                add(f"{host}:{int(port) + 1}", address)
            else:
                unchecked.append((f"nsqd {address}: no HTTP port to guess (TCP port + 1)", False, True))
    return list(targets.items())


def _guess_is_wrong(client: Any, tcp_address: str) -> Optional[str]:
    """Why the HTTP API at *client* (TCP port + 1, a guess) is not that of the nsqd at
    *tcp_address*, or None when it is: its /info must be an nsqd's whose TCP port is that one,
    or one whose own HTTP port is its TCP port + 1 (the convention holds there too, as behind a
    port mapping: 14150->4150, 14151->4151). Otherwise port + 1 may be anything, another nsqd's
    HTTP API too, and its stats would say nothing about this nsqd's topic."""
    info = client.info()
    tcp_port, http_port = info.get("tcp_port"), info.get("http_port")
    if not all(isinstance(port, int) and not isinstance(port, bool) for port in (tcp_port, http_port)):
        return "it is not an nsqd's HTTP API"
    if tcp_port != int(tcp_address.rpartition(":")[2]) and http_port != tcp_port + 1:
        return f"it is the HTTP API of another nsqd (TCP port {tcp_port})"
    return None


def _check_backlog(args: argparse.Namespace, addresses: Dict[str, Any]) -> None:
    """Refuse (exit 2) to subscribe tail's ephemeral channel where the topic has no channel
    but holds messages: as the topic's first channel it would take that backlog, and nsqd
    deletes an ephemeral channel, with every message in it, when its last client leaves.
    A check that cannot be made is refused too, as going on would lose such a backlog all the
    same: exit 3 (Unavailable) when every HTTP API it could not ask is down or hung, exit 2
    when the command line has to change (no HTTP API at a guessed port, or one that is not
    nsqd's or nsqlookupd's).
    At most BACKLOG_CHECK_TIMEOUT seconds in all."""
    from .errors import Error
    from .httpapi import NsqdHTTPClient

    deadline = time.monotonic() + BACKLOG_CHECK_TIMEOUT
    unchecked: _Unchecked = []
    backlog: List[str] = []
    for address, guessed_from in _nsqd_http_targets(args, addresses, deadline, unchecked):
        what = f"nsqd HTTP {address}, guessed as TCP port + 1 of {guessed_from}" if guessed_from else f"nsqd HTTP {address}"
        guess = guessed_from is not None
        timeout = _backlog_request_timeout(deadline, what, unchecked, guess)
        if timeout is None:
            continue
        try:
            if guessed_from:
                wrong = _guess_is_wrong(NsqdHTTPClient(address, timeout=timeout), guessed_from)
                if wrong is not None:
                    unchecked.append((f"{what}: {wrong}", False, True))
                    continue
                timeout = _backlog_request_timeout(deadline, what, unchecked, guess)
                if timeout is None:
                    continue
            stats = NsqdHTTPClient(address, timeout=timeout).topic_stats(args.topic)  # (its shape checked: HTTPError)
            depth = int(stats.get("depth") or 0) if stats else 0
            channels = len(stats["channels"]) if stats else 0
        except (Error, TypeError, ValueError) as exc:  # (TypeError, ValueError: a depth that is no number)
            # Down or hung (exit 3, try again later), but nothing listening at a guessed port is
            # the guess's fault: the command line has to name nsqd's HTTP API (exit 2).
            down = _http_failure_kind(exc) == "unavailable" and not (guess and "connection refused" in str(exc))
            unchecked.append((f"{what}: {_failure_reason(exc)}", down, guess))
            continue
        logger.info("backlog check: topic %s on nsqd HTTP %s: %s", args.topic, address,
                    f"{channels} channel(s), depth {depth}" if stats else "not there yet")
        if stats and not channels and depth > 0:
            backlog.append(f"{depth} on nsqd HTTP {address}")
    if backlog:
        raise UsageError(
            f"topic {args.topic!r} has no channel yet and holds messages ({', '.join(backlog)}): tail's own "
            "channel (ephemeral) would be its first channel and take them all, and nsqd deletes it, with every "
            "message tail does not print, when tail exits. Give --channel NAME to read through a channel that "
            "stays, or --take-backlog to go ahead anyway"
        )
    if unchecked:
        texts = [text for text, _, _ in unchecked]
        shown = "; ".join(texts[:3]) + (f"; and {len(texts) - 3} more" if len(texts) > 3 else "")
        what = f"could not check whether topic {args.topic!r} holds messages that no channel has taken yet ({shown})"
        risk = "tail's own channel (ephemeral) would take them and lose them when tail exits"
        ways_on = "--channel NAME to read through a channel that stays, or --take-backlog to go ahead anyway"
        if all(down for _, down, _ in unchecked):
            # Down or hung brokers, not the command line: exit 3, as pub's for the same nsqd;
            # nothing was subscribed, so trying again later loses nothing.
            raise Unavailable(f"{what}; nothing was consumed: {risk}. Try again once it answers, or give {ways_on}")
        if any(guess for _, down, guess in unchecked if not down):
            fix = ("Give --nsqd-http-address HOST:PORT (nsqd's HTTP API) or --lookupd-http-address HOST:PORT so that "
                   "tail can check")
        else:
            fix = "Check that --nsqd-http-address and --lookupd-http-address name nsqd's and nsqlookupd's HTTP APIs"
        raise UsageError(f"{what}; {risk}. {fix}, {ways_on}")


def cmd_tail(args: argparse.Namespace) -> int:
    """Print messages of a topic as they arrive (an ephemeral channel by default)."""
    import nsq_sync

    if sys.stdout is None:  # (started with stdout closed: `>&-`)
        raise UsageError("stdout is closed: tail prints the messages there (redirect it to a file or a pipe)")
    # Random, not the pid: in containers every tail may be PID 1, and two tails sharing a
    # channel would each print half of the messages.
    channel = args.channel or f"tail-{secrets.token_hex(6)}#ephemeral"
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None  # (the backlog check's time included)
    remaining = [args.n] if args.n else None
    # Never more in flight than tail still has to print: what it does not print goes back
    # with one more attempt (nsqd counts every delivery).
    max_in_flight = [args.max_in_flight if args.n is None else min(args.max_in_flight, args.n)]
    done = threading.Event()
    output = _LineWriter(sys.stdout, off_hub=args.backend == "gevent")
    lock = threading.Lock()
    #: one handler writes at a time (whole lines, in order); the others wait for their turn
    #: here, not inside a write, so that the stop can tell them to give their messages back
    turn = threading.Condition(lock)
    writing: List[Any] = []  # the message whose line is being written (at most one); under lock
    write_errors: List[OSError] = []
    printed = [0]  # lines written whole
    stopped_by: List[str] = []  # "signal" or "timeout", when one of them ended the wait

    def hold(value: int) -> None:
        """Lower the Reader's max_in_flight to *value* (0: RDY 0 on every connection); under *lock*."""
        if value >= max_in_flight[0]:
            return
        max_in_flight[0] = value
        try:
            reader.set_max_in_flight(value)
        except nsq_sync.Error:
            pass  # (closing: it takes nothing more anyway)

    def give_back(message: Any) -> None:
        """Requeue *message* now, unless it was answered already; under *lock*."""
        # Not shown: back to nsqd at once, for the channel's other consumers (a handler's
        # False would defer it by requeue_delay x attempts, 90 s and more, and back off).
        # RDY 0 first: given back while tail still has RDY, it would come straight back to
        # tail, again and again, one more attempt each time, until a Reader gave it up.
        hold(0)
        if not message.has_responded():
            message.requeue(delay=0, backoff=False)

    def handler(message: Any) -> None:
        # tail answers every message itself, under *lock*: the stop may give back a message
        # whose write is stuck, and the Reader must not finish it afterwards.
        message.enable_async()
        with turn:
            while True:
                # (the output is gone, -n was reached or is being reached, or a signal came)
                if done.is_set() or (remaining is not None and remaining[0] <= 0):
                    return give_back(message)
                if not writing:
                    break
                turn.wait()
            if remaining is not None:
                remaining[0] -= 1
            writing.append(message)
        error = output.write(message.body + b"\n")  # (outside the lock: it may block for good)
        with turn:
            writing.clear()
            turn.notify()
            if message.has_responded():
                return None  # given back by the stop, which did not wait for this write to end
            if error is None:
                printed[0] += 1
            if error is not None:
                # The reading end of the pipe closed (`| head -1`): stop quietly, as cat does; any
                # other error (a full disk) stops with exit 1. The message goes back to nsqd (it
                # was not shown) instead of failing again and again.
                if not isinstance(error, BrokenPipeError):
                    write_errors.append(error)
                if remaining is not None:
                    remaining[0] += 1
                done.set()
                turn.notify_all()
                return give_back(message)
            if remaining is not None:
                hold(remaining[0])  # (RDY 0 once the N-th is printed, before anything is given back)
                if remaining[0] == 0:
                    done.set()
                    turn.notify_all()
            message.finish()
        return None

    def give_back_held() -> None:
        """The stop: every message tail holds goes back now, the one whose line is being
        written too if its write does not end within TAIL_WRITE_GRACE (the output is stalled:
        a pipe nobody reads). Otherwise the Reader's close would wait for that write as for any
        handler, close_timeout (30 s), while nsqd kept every message tail held in flight."""
        with turn:
            done.set()
            hold(0)
            turn.notify_all()  # (the handlers waiting for their turn give theirs back)
            turn.wait_for(lambda: not writing, TAIL_WRITE_GRACE)
            for message in writing:
                give_back(message)

    addresses = _addresses(args, default_nsqd=DEFAULT_NSQD_TCP_ADDRESS)
    connection = _connection_settings(args)
    reader = nsq_sync.Reader(
        args.topic, channel, message_handler=handler, max_in_flight=max_in_flight[0], backend=args.backend,
        lookupd_poll_interval=args.lookupd_poll_interval,
        # never gives a message up (FIN: gone for every consumer of a named channel); tail
        # only gives back, and the consumers that get them next decide
        max_tries=0,
        # with more nsqd than -n allows in flight, RDY moves on from an idle nsqd within a
        # second or two, not the Reader's 10 s: tail waits for the first message there is
        low_rdy_idle_timeout=1.0, rdy_redistribute_interval=1.0,
        **addresses,
        **connection,
    )
    if args.channel is None and not args.take_backlog:
        try:
            _check_backlog(args, addresses)
        except BaseException:
            reader.close()
            raise
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda *_: (stopped_by.append("signal"), done.set()))
    reader.start()
    output_gone = _pipe_reader_gone(sys.stdout)
    connected = False  # subscribed to some nsqd when the wait ended
    subscribed = [False]  # ever, so far
    refused: Optional[str] = None  # every nsqd refused tail: why
    try:
        while not done.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))):
            if output_gone():
                break  # (`| head -1`: head left while no message came to notice it)
            if not addresses.get("lookupd_http_addresses"):
                # (the nsqd given are all there is: every one refused, waiting will not help, as for pub)
                refused = _tail_refused(reader, subscribed, list(reader._direct))
                if refused is not None:
                    break
            if deadline is not None and time.monotonic() >= deadline:
                stopped_by.append("timeout")
                break
        connected = bool(reader.conns)
        if not connected and refused is None and stopped_by == ["timeout"]:
            refused = _tail_refused(reader, subscribed)  # (through nsqlookupd: those it listed and tail tried)
    finally:
        # The usual handlers first: a second Ctrl-C interrupts a drain that waits on a hung nsqd.
        for signum, handler_ in previous.items():
            signal.signal(signum, handler_)
        try:
            give_back_held()
        finally:
            reader.close(TAIL_CLOSE_TIMEOUT)
    if write_errors or output.broken:
        _quiet_broken(sys.stdout)
    if write_errors:
        error = write_errors[0]
        raise Failed(f"write error: {error.strerror or error}")
    if refused is not None and not output.broken:
        # (exit 4, as pub: a script that retries on 3, nsqd down, should not retry this)
        printed_what = f"printed {printed[0]}" + (f" of {args.n}" if args.n is not None else "") + f" message(s) of {args.topic}"
        raise Refused(f"not subscribed to any nsqd: {refused}; {printed_what}")
    if args.n is not None and printed[0] < args.n and not output.broken and stopped_by:
        # -n N promised N lines: a stop before them is not a success (a CI smoke test
        # "pub, then tail -n 1" must not pass with nothing printed)
        count = f"printed {printed[0]} of {args.n} message(s) of {args.topic}"
        if stopped_by[0] == "signal":
            raise KeyboardInterrupt(count)
        if not connected:
            raise Unavailable(f"not subscribed to any nsqd after {args.timeout:g}s (--timeout): none reachable, "
                              f"or none has the topic for nsqlookupd; {count}")
        raise Failed(f"timed out after {args.timeout:g}s (--timeout): {count}")
    return EXIT_OK


def _tail_refused(reader: Any, subscribed: List[bool], every: Optional[List[str]] = None) -> Optional[str]:
    """Why tail cannot subscribe anywhere, when the latest attempt to each nsqd it tried (or to
    each of *every*) was refused in a way retrying will not fix (see writer._refusal: the AUTH
    secret, TLS, not nsqd's TCP port, SUB refused), else None. *subscribed*: [whether tail was
    ever subscribed], updated here (an E_AUTH_FAILED after that may be the auth server down)."""
    from .writer import _refusal, _why_refused

    if reader.conns:
        subscribed[0] = True
        return None
    errors = dict(reader._connect_errors)
    addresses = every if every is not None else list(errors)
    if not addresses or any(address not in errors for address in addresses):
        return None
    refusals = [errors[address] for address in addresses]
    if not all(_refusal(error, subscribed[0]) for error in refusals):
        return None
    last = "; ".join(f"{address}: {type(error).__name__}: {error}" for address, error in zip(addresses, refusals))
    return f"{_why_refused(refusals)} (last errors: {last})"


# ------------------------------------------------------- stats, topic, channel
#: where stats, topic and channel ask when given no address: nsqd's default HTTP address
DEFAULT_NSQD_HTTP_ADDRESS = "127.0.0.1:4151"
DEFAULT_HTTP_TIMEOUT = 5.0
#: what ``topic ACTION`` and ``channel ACTION`` do, in the past tense, and what goes with it
_ADMIN_ACTIONS: Dict[str, Tuple[str, Dict[str, str]]] = {
    "create": ("created", {"topic": "", "channel": ""}),
    "delete": ("deleted", {"topic": ", with its channels and every message in them", "channel": ", with every message in it"}),
    "empty": ("emptied", {"topic": ": its own queue (not its channels')",
                          "channel": ": every message in it, in flight and deferred ones too"}),
    "pause": ("paused", {"topic": ": no message moves on to its channels until unpaused",
                         "channel": ": no message goes to its consumers until unpaused"}),
    "unpause": ("unpaused", {"topic": "", "channel": ""}),
}
_ADMIN_HELP = {
    "topic": "create: on each nsqd (idempotent); delete: the topic, its channels and their messages; empty: the topic's own "
             "queue, not its channels'; pause/unpause: stop/resume moving messages on to its channels",
    "channel": "create: on each nsqd that has the topic (idempotent); delete: the channel and its messages; empty: every "
               "message in it, in flight and deferred too; pause/unpause: stop/resume delivering to its consumers",
}


class _Problems:
    """What an HTTP command could not do, each with the exit code it calls for; raise() ends
    the command with the worst: 1 (an answer that is an error), then 4 (not an HTTP API that
    answers: a TCP port, TLS), then 3 (down, hung, not found by name: a retry may do)."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []  # (kind, text)

    def add(self, what: str, exc: BaseException) -> None:
        self.items.append((_http_failure_kind(exc), f"{what}: {_failure_reason(exc)}"))

    def raise_(self, done: str = "") -> None:
        if not self.items:
            return
        kinds = {kind for kind, _ in self.items}
        text = "; ".join(text for _, text in self.items) + (f" ({done})" if done else "")
        if "failed" in kinds:
            raise Failed(text)
        if "refused" in kinds:
            raise Refused(text)
        raise Unavailable(text)


def _nsqd_http_addresses(args: argparse.Namespace, problems: _Problems) -> List[str]:
    """The nsqd HTTP APIs to ask: every --nsqd-http-address, and every nsqd each
    --lookupd-http-address lists (its broadcast address and HTTP port); 127.0.0.1:4151 when
    neither option is given. A nsqlookupd that cannot be asked goes to *problems*; when no nsqd
    is left to ask, the command ends (exit 3, or the problem's own code)."""
    from .errors import ConfigError, Error
    from .httpapi import LookupdClient, nsqd_http_address

    given = _flat(args.nsqd_http_address)
    lookupds = _flat(args.lookupd_http_address)
    if not given and not lookupds:
        given = [DEFAULT_NSQD_HTTP_ADDRESS]
    targets: Dict[str, None] = dict.fromkeys(given)
    for address in lookupds:
        try:
            nodes = LookupdClient(address, timeout=args.timeout, ssl_context=_tls_for(address, args)).nodes()
        except Error as exc:
            problems.add(f"nsqlookupd {address}", exc)
            continue
        for node in nodes:
            try:
                targets.setdefault(nsqd_http_address(node))
            except ConfigError:
                problems.items.append(("failed", f"nsqlookupd {address}: an nsqd without a usable broadcast_address and http_port"))
    if not targets:
        problems.raise_()
        raise Unavailable(f"no nsqd to ask: nsqlookupd {', '.join(lookupds)} lists none")
    return list(targets)


def _https_context(args: argparse.Namespace) -> Any:
    """The SSLContext for the https:// addresses of an HTTP command (stats, topic, channel), from
    its --tls-* options; None without them (the system's CAs). Checked before anything is asked:
    a key without its certificate, a CA file with --tls-insecure-skip-verify, a file OpenSSL
    refuses, or options with no https:// address to use them on is a UsageError."""
    given = _tls_given(args)
    if not given:
        return None
    if not any(_is_https(address) for address in _flat(args.nsqd_http_address) + _flat(args.lookupd_http_address)):
        # (nsqlookupd lists each nsqd's plain HTTP port: an option would go unused, and the
        # traffic unencrypted, without a word)
        raise UsageError(f"{given[0]} is for https:// addresses, and none is given: use --nsqd-http-address https://HOST:PORT (nsqd's --https-address)")
    return _tls_context(args, given)[1]


def _is_https(address: str) -> bool:
    return address[:8].lower() == "https://"


def _tls_for(address: str, args: argparse.Namespace) -> Any:
    """The ssl_context argument of an HTTP client of *address* (only an https:// one takes one)."""
    return getattr(args, "https_context", None) if _is_https(address) else None


def _nsqd_client(address: str, args: argparse.Namespace) -> Any:
    from .httpapi import NsqdHTTPClient

    return NsqdHTTPClient(address, timeout=args.timeout, ssl_context=_tls_for(address, args))


def _count(stats: Dict[str, Any], key: str) -> Optional[int]:
    value = stats.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


#: stats's columns: (JSON key and nsqd's field, heading)
_STATS_COLUMNS = (("depth", "DEPTH"), ("in_flight_count", "IN-FLIGHT"), ("deferred_count", "DEFERRED"),
                  ("client_count", "CLIENTS"), ("message_count", "MESSAGES"), ("requeue_count", "REQUEUES"),
                  ("timeout_count", "TIMEOUTS"))
#: the columns a topic's own row has (the others are its channels': "-", null)
_TOPIC_COLUMNS = ("depth", "message_count")


def _stats_totals(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per topic or channel, its numbers added up over the nsqd that have it:
    ``nsqd_count`` of them, ``paused_count`` paused there (``paused``: on every one)."""
    totals: Dict[Tuple[str, Optional[str]], Dict[str, Any]] = {}
    for row in rows:
        total = totals.get((row["topic"], row["channel"]))
        if total is None:
            totals[(row["topic"], row["channel"])] = total = {
                "topic": row["topic"], "channel": row["channel"], **{key: row[key] for key, _ in _STATS_COLUMNS},
                "paused": row["paused"], "nsqd_count": 1, "paused_count": int(row["paused"])}
            continue
        for key, _ in _STATS_COLUMNS:
            if row[key] is not None:
                total[key] = row[key] + (total[key] or 0)
        total["nsqd_count"] += 1
        total["paused_count"] += int(row["paused"])
        total["paused"] = total["paused_count"] == total["nsqd_count"]
    return [{"nsqd": None, **total} for total in totals.values()]


def cmd_stats(args: argparse.Namespace) -> int:
    """Depth, in flight, deferred, clients, messages, requeues and timeouts of each topic and
    channel on each nsqd (its /stats), as a table or JSON; what could not be asked ends it with 3 (or 1, 4) after the
    rest is printed."""
    from .errors import Error

    args.https_context = _https_context(args)
    problems = _Problems()
    rows: List[Dict[str, Any]] = []
    for address in _nsqd_http_addresses(args, problems):
        try:
            stats = _nsqd_client(address, args).stats(topic=args.topic, include_clients=False, include_mem=False)
        except Error as exc:
            problems.add(f"nsqd HTTP {address}", exc)
            continue
        for topic in stats["topics"]:
            if args.topic is not None and topic["topic_name"] != args.topic:
                continue
            if args.channel is None:
                rows.append({"nsqd": address, "topic": topic["topic_name"], "channel": None,
                             **{key: _count(topic, key) if key in _TOPIC_COLUMNS else None for key, _ in _STATS_COLUMNS},
                             "paused": bool(topic.get("paused"))})
            for channel in topic["channels"]:
                if args.channel is not None and channel["channel_name"] != args.channel:
                    continue
                rows.append({"nsqd": address, "topic": topic["topic_name"], "channel": channel["channel_name"],
                             **{key: _count(channel, key) for key, _ in _STATS_COLUMNS}, "paused": bool(channel.get("paused"))})
    if args.total:
        rows = _stats_totals(rows)
    rows.sort(key=lambda row: (row["topic"], row["channel"] is not None, row["channel"] or "", row["nsqd"]))
    if args.json:
        _print(json.dumps(rows), sys.stdout)
    elif rows:
        def cell(value: Any) -> str:
            return "-" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

        def paused(row: Dict[str, Any]) -> str:
            if args.total and 0 < row["paused_count"] < row["nsqd_count"]:
                return f"{row['paused_count']} of {row['nsqd_count']}"
            return "yes" if row["paused"] else "no"

        headings = ["TOPIC", "CHANNEL", *(heading for _, heading in _STATS_COLUMNS), "PAUSED",
                    "NSQD" if not args.total else "ON"]
        table = [[row["topic"], row["channel"] or "-", *(cell(row[key]) for key, _ in _STATS_COLUMNS), paused(row),
                  row["nsqd"] if not args.total else f"{row['nsqd_count']} nsqd"] for row in rows]
        widths = [max(len(line[i]) for line in [headings, *table]) for i in range(len(headings))]
        numeric = range(2, 2 + len(_STATS_COLUMNS))
        for line in [headings, *table]:
            _print("  ".join(text.rjust(width) if i in numeric else text.ljust(width)
                             for i, (text, width) in enumerate(zip(line, widths))).rstrip(), sys.stdout)
    elif not problems.items:
        what = f"topic {args.topic!r}" if args.topic is not None else "topic"
        if args.channel is not None:
            what = f"channel {args.channel!r}" + (f" of topic {args.topic!r}" if args.topic is not None else "")
        _print(f"no {what} on the nsqd asked", sys.stderr)
    problems.raise_()
    return EXIT_OK


def _forget_in_lookupds(lookupds: List[str], kind: str, names: List[str], target: str, args: argparse.Namespace,
                        problems: _Problems) -> List[str]:
    """After a delete on every nsqd: take the topic (channel) out of each nsqlookupd's registry,
    as nsqadmin does. nsqd unregisters only itself as a producer, and nsqlookupd went on listing
    the topic and its channels (to nsqadmin, ``/topics``, ``/channels``). Only when every nsqd
    was asked: one that still has it registers it again anyway. Returns the nsqlookupd where it
    was (and is no longer)."""
    from .errors import Error
    from .httpapi import LookupdClient

    forgotten: List[str] = []
    for address in lookupds:
        client = LookupdClient(address, timeout=args.timeout, ssl_context=_tls_for(address, args))
        try:
            listed = client.channels(names[0]) if kind == "channel" else client.topics()
            if names[-1] not in listed:
                _print(f"{target} is not in nsqlookupd HTTP {address}'s registry", sys.stdout)
                continue
            getattr(client, f"delete_{kind}")(*names)
        except Error as exc:
            problems.add(f"nsqlookupd HTTP {address}", exc)
            continue
        forgotten.append(address)
        _print(f"removed {target} from nsqlookupd HTTP {address}'s registry", sys.stdout)
    return forgotten


def cmd_admin(args: argparse.Namespace) -> int:
    """topic/channel create, delete, empty, pause, unpause on each nsqd; one line on stdout per
    nsqd saying what was done there. A topic or channel an nsqd does not have is skipped there
    (said on stdout), and is exit 1 when no nsqd has it."""
    from .errors import Error, HTTPError

    kind = args.command
    verb, consequence = _ADMIN_ACTIONS[args.action]
    names = [args.topic] if kind == "topic" else [args.topic, args.channel]
    target = f"topic {args.topic!r}" if kind == "topic" else f"channel {args.channel!r} of topic {args.topic!r}"
    args.https_context = _https_context(args)
    problems = _Problems()
    addresses = _nsqd_http_addresses(args, problems)
    done: List[str] = []
    missing: List[str] = []
    unknown: List[str] = []
    for address in addresses:
        try:
            getattr(_nsqd_client(address, args), f"{args.action}_{kind}")(*names)
        except HTTPError as exc:
            if exc.status == 404 and exc.message in ("TOPIC_NOT_FOUND", "CHANNEL_NOT_FOUND"):
                absent = f"topic {args.topic!r}" if exc.message == "TOPIC_NOT_FOUND" else target
                missing.append(absent)
                _print(f"{absent} is not on nsqd HTTP {address}: nothing {verb} there", sys.stdout)
                continue
            problems.add(f"nsqd HTTP {address}", exc)
            if exc.status == 0 and exc.message.startswith("timed out"):
                unknown.append(address)  # (sent, perhaps: a hung nsqd may still carry it out)
            continue
        except Error as exc:
            problems.add(f"nsqd HTTP {address}", exc)
            continue
        done.append(address)
        _print(f"{verb} {target} on nsqd HTTP {address}{consequence[kind]}", sys.stdout)
    summary = f"{verb} on {len(done)} of {len(addresses)} nsqd"
    if unknown:
        summary += f"; perhaps on {len(unknown)} more, which did not answer in time but may still carry it out"
    lookupds = _flat(args.lookupd_http_address)
    if args.action == "delete" and lookupds and not problems.items:
        done += _forget_in_lookupds(lookupds, kind, names, target, args, problems)
    problems.raise_(summary)
    if not done:
        hint = "; create it first: nsq-sync topic create" if kind == "channel" and args.action == "create" else ""
        raise Failed(f"{missing[0] if len(set(missing)) == 1 else target} is not on any nsqd asked ({len(addresses)}): nothing {verb}{hint}")
    return EXIT_OK


_POLLERR = getattr(select, "POLLERR", 8)  # (Linux's values, where gevent's select lacks them)
_POLLHUP = getattr(select, "POLLHUP", 16)


def _pipe_reader_gone(out: Any) -> Callable[[], bool]:
    """A check that *out*, a pipe, lost its reader (poll reports POLLERR on its write end);
    always False for anything else, or where poll is missing."""
    try:
        fd = out.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return lambda: False
        poll_class: Any = getattr(select, "poll", None)
        if "gevent" in sys.modules:  # (monkey-patching removes or replaces select.poll)
            from .backends.gevent import native_poll

            poll_class = native_poll
        poller = poll_class()
        poller.register(fd, _POLLERR)
    except (AttributeError, OSError, ValueError, TypeError):
        return lambda: False

    def gone() -> bool:
        try:
            return any(events & (_POLLERR | _POLLHUP) for _, events in poller.poll(0))
        except OSError:
            return False

    return gone


class _LineWriter:
    """Writes tail's lines straight to the file descriptor of *stream*, not through Python's
    buffered stdout: a write that blocks for good (a pipe nobody reads) then holds no lock
    the interpreter needs at exit (stdout's, which it takes to flush it: a fatal error with
    the writing thread still blocked), and nothing is left in a buffer to fail at exit.
    *off_hub* (gevent): each write runs in gevent's threadpool, so that a blocked write blocks
    a native thread and not the hub, which must go on running the signal's stop."""

    def __init__(self, stream: Any, off_hub: bool = False) -> None:
        stream.flush()  # (nothing should be there; whatever is goes first)
        self.broken = False  # a write failed with EPIPE
        self._stream: Any = None
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is the last two)
            # A stdout replaced in-process (an embedding program, a test's capture): through it.
            self._stream = getattr(stream, "buffer", stream)
        self._write: Callable[[int, bytes], int] = os.write
        if off_hub:
            from .backends.gevent import write_off_hub

            self._write = write_off_hub

    def write(self, data: bytes) -> Optional[OSError]:
        """Write all of *data*; the error that stopped it, or None."""
        try:
            if self._stream is not None:
                self._stream.write(data)
                self._stream.flush()
            else:
                while data:
                    data = data[self._write(self.fd, data):]
        except OSError as exc:
            self.broken = self.broken or isinstance(exc, BrokenPipeError)
            return exc
        return None


def _quiet_broken(stream: Any) -> None:
    """Point *stream*'s file descriptor at /dev/null, as the Python docs advise after EPIPE:
    Python would report the failed write again ("Exception ignored ...", exit 120) when it
    flushes the stream at exit, and a log line would fail the same way."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):  # (no stream, or one without a descriptor)
        pass


def cmd_cluster(args: argparse.Namespace) -> int:
    """Run nsqlookupd + N nsqd in the foreground until Ctrl-C, SIGTERM, SIGHUP or the reader
    of its output leaving (exit 0 each time); the brokers stop with it."""
    stop = threading.Event()
    # Installed before the brokers start: a signal while they start stops them cleanly too
    # (they run in their own sessions, so nothing else would).
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in _STOP_SIGNALS}
    try:
        cluster = _start_cluster(args.nsqd)
    except BaseException:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        raise
    try:
        info = {
            "lookupd_http_addresses": cluster.lookupd_http_addresses,
            "lookupd_tcp_addresses": cluster.lookupd_tcp_addresses,
            "nsqd_tcp_addresses": cluster.nsqd_tcp_addresses,
            "nsqd_http_addresses": cluster.nsqd_http_addresses,
        }
        if args.json:
            _print(json.dumps(info), sys.stdout)
        else:
            _print(
                f"nsqlookupd http: {' '.join(info['lookupd_http_addresses'])}  tcp: {' '.join(info['lookupd_tcp_addresses'])}\n"
                f"nsqd tcp:  {' '.join(info['nsqd_tcp_addresses'])}\n"
                f"nsqd http: {' '.join(info['nsqd_http_addresses'])}\n"
                "Ctrl-C stops the cluster.",
                sys.stdout,
            )
        # `nsq-sync cluster | head -1`: head has its line and left, and as nothing more is
        # written no EPIPE would ever tell; the pipe is watched instead.
        output_gone = _pipe_reader_gone(sys.stdout) if sys.stdout is not None else (lambda: False)
        while not stop.wait(0.2):
            if output_gone():
                break
    finally:
        cluster.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


# ------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    from .__about__ import __version__

    parser = argparse.ArgumentParser(
        prog="nsq-sync",
        description="The synchronous NSQ client's command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  nsq-sync demo -n 10000                       # local cluster, publish + consume, summary\n"
            "  nsq-sync cluster                             # nsqlookupd + 2 nsqd until Ctrl-C\n"
            f"  nsq-sync pub --topic events hello world      # two messages to {DEFAULT_NSQD_TCP_ADDRESS}\n"
            "  nsq-sync tail --topic events -n 2            # print two messages and exit\n"
            "  nsq-sync worker tasks:handle --topic events --channel work --lookupd-http-address 127.0.0.1:4161\n"
            "  nsq-sync stats --lookupd-http-address 127.0.0.1:4161   # depth, in flight, clients on every nsqd\n"
            "  nsq-sync topic delete events --nsqd-http-address 127.0.0.1:4151\n"
            "  nsq-sync channel empty events archive --lookupd-http-address 127.0.0.1:4161\n"
            "\nexit codes: 0 ok, 1 failed (lost messages, publish errors), 2 bad arguments, 3 broker unavailable,\n"
            "  4 refused by nsqd (credentials or TLS: AUTH secret, certificate; or not nsqd's TCP port), 130 interrupted"
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (rates once a second for worker)")
    parser.add_argument("--version", action="version", version=f"nsq-sync {__version__}")
    # -v is accepted after the command too (nsq-sync worker -v ...); SUPPRESS keeps a -v given
    # before the command from being reset by the subcommand's default. Each command's help
    # says what it logs.
    def verbose_parent(also: str = "") -> argparse.ArgumentParser:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help=f"log at INFO on stderr instead of WARNING{also}")
        return common
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter))
    sub.required = True

    def backend_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backend", choices=("thread", "gevent"), default="thread", help="concurrency backend (default: thread)")

    def connection_args(p: argparse.ArgumentParser) -> None:
        tls = p.add_argument_group("TLS and AUTH (see docs/tls-and-auth.md)")
        tls.add_argument("--tls", action="store_true", help="connect to nsqd with TLS (tls_v1), verifying its certificate and name")
        tls.add_argument("--tls-ca-file", type=_readable_file, metavar="FILE", help="CA certificates (PEM) to verify nsqd with, instead of the system's")
        tls.add_argument("--tls-cert-file", type=_readable_file, metavar="FILE", help="client certificate (PEM), for an nsqd that asks for one; may hold its key too")
        tls.add_argument("--tls-key-file", type=_readable_file, metavar="FILE", help="the client certificate's key (PEM), unless --tls-cert-file holds it")
        tls.add_argument("--tls-insecure-skip-verify", action="store_true",
                         help="do not verify nsqd's certificate or name: anyone in between can read and change the traffic")
        tls.add_argument("--auth-secret", metavar="SECRET",
                         help=f"the secret AUTH sends, for an nsqd with --auth-http-address; every user of the machine can read it in ps: "
                              f"prefer ${AUTH_SECRET_ENV}, read when this option is not given")

    def address_args(p: argparse.ArgumentParser, default: str, lookupd: bool = True) -> None:
        """*default*: what the help says is used when no address is given."""
        p.add_argument("--nsqd-tcp-address", action="append", type=_check_address, metavar="HOST:PORT",
                       help=f"nsqd TCP address (repeatable, or comma-separated); {default}")
        if lookupd:
            p.add_argument("--lookupd-http-address", action="append", type=_check_address, metavar="HOST:PORT",
                           help="nsqlookupd HTTP address (repeatable, or comma-separated), to find the nsqd that have the topic")

    demo = sub.add_parser("demo", parents=[verbose_parent()], help="publish and consume through a local cluster and report", epilog="example: nsq-sync demo -n 100000 --json")
    demo.add_argument("-n", "--count", type=_int_range(1, MAX_DEMO_COUNT), default=100_000, help="messages to send")
    demo.add_argument("--threads", type=_int_range(1, MAX_DEMO_THREADS), default=4, help="publishing threads")
    demo.add_argument("--batch", type=_int_range(1, MAX_DEMO_BATCH), default=50, help="messages per MPUB; 1 publishes each with PUB")
    demo.add_argument("--body-size", type=_int_range(1, MAX_DEMO_BODY_SIZE), default=100, help="bytes per message")
    demo.add_argument("--max-in-flight", type=_int_range(1, MAX_IN_FLIGHT), default=200, help="the Reader's max_in_flight")
    demo.add_argument("--concurrency", type=_int_range(1, MAX_CONCURRENCY), default=8, help="handler workers")
    demo.add_argument("--timeout", type=_seconds(0.001, MAX_TIMEOUT), default=300.0, help="give up after this many seconds")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    backend_arg(demo)
    demo.set_defaults(func=cmd_demo)

    worker = sub.add_parser("worker", parents=[verbose_parent(", and a line of rates (received, finished, requeued per second): every second while messages move, at most once a minute while it says the same")], help="run module:function as a consumer (SIGTERM drains)",
                            epilog="example: nsq-sync worker tasks:handle --topic events --channel work --lookupd-http-address 127.0.0.1:4161")
    worker.add_argument("handler", help="module:function taking a Message; return True/None to finish, False to requeue")
    worker.add_argument("--topic", required=True, type=_check_topic, help="the topic to consume")
    worker.add_argument("--channel", required=True, type=_check_channel, help="the channel to consume it through (workers sharing one share its messages)")
    address_args(worker, "at least one of it or --lookupd-http-address")
    worker.add_argument("--max-in-flight", type=_int_range(1, MAX_IN_FLIGHT), default=1, help="the Reader's max_in_flight")
    worker.add_argument("--concurrency", type=_int_range(1, MAX_CONCURRENCY), default=None,
                        help="handler workers; by default as many as --max-in-flight, up to the most allowed")
    worker.add_argument("--max-tries", type=_int_range(0, MAX_TRIES, "max_tries"), default=5, help="attempts before giving up; 0: unlimited")
    worker.add_argument("--close-timeout", type=_seconds(0, 3600), default=WORKER_CLOSE_TIMEOUT,
                        help="on SIGTERM/SIGINT, how long running handlers may take to finish; the default stays below a 30 s kill timeout, as Kubernetes' default")
    worker.add_argument("--msg-timeout", type=_seconds(MIN_MSG_TIMEOUT, MAX_MSG_TIMEOUT), default=None,
                        help="how long nsqd waits for a message's answer before it delivers the message again; "
                             "by default nsqd's --msg-timeout (60 s); at most nsqd's default --max-msg-timeout")
    worker.add_argument("--requeue-delay", type=_seconds(0, MAX_REQUEUE_DELAY), default=90.0,
                        help="a failed message comes back after this times its attempts, at most 900 s")
    worker.add_argument("--max-backoff-duration", type=_seconds(0, MAX_BACKOFF_DURATION), default=128.0,
                        help="the longest pause after failures (1, 2, 4 ... s); 0: no backoff")
    backend_arg(worker)
    connection_args(worker)
    worker.set_defaults(func=cmd_worker)

    pub = sub.add_parser("pub", parents=[verbose_parent()], help="publish messages (arguments, or stdin lines with -)", epilog="example: printf 'a\\nb\\n' | nsq-sync pub --topic events -")
    pub.add_argument("--topic", required=True, type=_check_topic, help="the topic to publish to")
    address_args(pub, f"default {DEFAULT_NSQD_TCP_ADDRESS}", lookupd=False)
    pub.add_argument("--timeout", type=_seconds(0.001, MAX_TIMEOUT), default=10.0,
                     help="how long to wait for nsqd, per message; not when every nsqd refused the AUTH secret or TLS settings, "
                          "or answered as something other than nsqd (its HTTP port): exit 4 at once")
    pub.add_argument("--max-msg-size", type=_int_range(0, MAX_MSG_SIZE), default=DEFAULT_MAX_MSG_SIZE,
                     help="bytes; a bigger message is refused before it is sent (exit 1): set it to your nsqd's --max-msg-size; "
                          "0 leaves the check to nsqd")
    pub.add_argument("-q", "--quiet", action="store_true",
                     help="no count on stderr after a success (a failure or a stop still says how many were published)")
    pub.add_argument("messages", nargs="*", help="message bodies; '-' or none reads stdin lines")
    backend_arg(pub)
    connection_args(pub)
    pub.set_defaults(func=cmd_pub)

    tail = sub.add_parser("tail", parents=[verbose_parent()], help="print messages as they arrive", epilog="example: nsq-sync tail --topic events --lookupd-http-address 127.0.0.1:4161 -n 10")
    tail.add_argument("--topic", required=True, type=_check_topic, help="the topic to print")
    tail.add_argument("--channel", type=_check_channel, default=None, help="default: an ephemeral channel of its own")
    address_args(tail, f"default {DEFAULT_NSQD_TCP_ADDRESS} when no --lookupd-http-address is given")
    tail.add_argument("-n", type=_positive_int, default=None,
                      help="exit after N messages (by default, run until stopped); on a channel that stays, the way to take "
                           "the first N: | head -N loses the lines it leaves in the pipe")
    tail.add_argument("--timeout", type=_seconds(0.001, MAX_TIMEOUT), default=None,
                      help="stop after this many seconds; with -n N, fewer than N messages by then is exit 1 (exit 3 if not "
                           "subscribed to any nsqd), without -n a stop (exit 0); by default, no limit")
    tail.add_argument("--max-in-flight", type=_int_range(1, MAX_IN_FLIGHT), default=200, help="messages nsqd may send before tail answers")
    tail.add_argument("--lookupd-poll-interval", type=_seconds(0.001, MAX_TIMEOUT), default=5.0, help="how often to ask nsqlookupd for the topic's nsqd")
    tail.add_argument("--take-backlog", action="store_true",
                      help="with the default channel, skip the backlog check: subscribe even to a topic that has no channel and "
                           "holds messages, or where the check cannot be made (its first channel takes them, and nsqd deletes "
                           "tail's ephemeral one, with them, when tail exits)")
    tail.add_argument("--nsqd-http-address", action="append", type=_check_address, metavar="HOST:PORT",
                      help="nsqd HTTP address(es) for the backlog check (default: each --nsqd-tcp-address's port + 1, if that "
                           "nsqd answers there; not needed with --lookupd-http-address, which gives each nsqd's)")
    backend_arg(tail)
    connection_args(tail)
    tail.set_defaults(func=cmd_tail)

    def http_address_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nsqd-http-address", action="append", type=_check_address, metavar="HOST:PORT",
                       help=f"nsqd HTTP address (repeatable, or comma-separated; https://HOST:PORT for nsqd's --https-address); "
                            f"default {DEFAULT_NSQD_HTTP_ADDRESS} when no --lookupd-http-address is given")
        p.add_argument("--lookupd-http-address", action="append", type=_check_address, metavar="HOST:PORT",
                       help="nsqlookupd HTTP address (repeatable, or comma-separated): every nsqd it lists, at the HTTP port it registered")
        p.add_argument("--timeout", type=_seconds(0.001, MAX_TIMEOUT), default=DEFAULT_HTTP_TIMEOUT,
                       help="how long each HTTP request may take (no answer: exit 3)")
        https = p.add_argument_group("HTTPS, for https:// addresses (see docs/tls-and-auth.md)")
        https.add_argument("--tls-ca-file", type=_readable_file, metavar="FILE", help="CA certificates (PEM) to verify the server with, instead of the system's")
        https.add_argument("--tls-cert-file", type=_readable_file, metavar="FILE",
                           help="client certificate (PEM), for an nsqd whose --tls-client-auth-policy asks for one; may hold its key too")
        https.add_argument("--tls-key-file", type=_readable_file, metavar="FILE", help="the client certificate's key (PEM), unless --tls-cert-file holds it")
        https.add_argument("--tls-insecure-skip-verify", action="store_true",
                           help="do not verify the server's certificate or name: anyone in between can read and change the traffic")

    stats = sub.add_parser("stats", parents=[verbose_parent()], help="depth, in flight, deferred, clients, requeues and timeouts of topics and channels",
                           epilog="example: nsq-sync stats --lookupd-http-address 127.0.0.1:4161 --topic events")
    stats.add_argument("--topic", type=_check_topic, default=None, help="only this topic (by default, every topic)")
    stats.add_argument("--channel", type=_check_channel, default=None,
                       help="only the channels of this name (of --topic, or of every topic), without the topics' own rows")
    http_address_args(stats)
    stats.add_argument("--total", action="store_true",
                       help="one row per topic and channel, added up over the nsqd that have it, instead of one per nsqd")
    stats.add_argument("--json", action="store_true", help="print one JSON list of rows instead of a table")
    stats.set_defaults(func=cmd_stats)

    for kind, names in (("topic", "TOPIC"), ("channel", "TOPIC CHANNEL")):
        admin = sub.add_parser(kind, parents=[verbose_parent()], help=f"create, delete, empty, pause or unpause a {kind} on each nsqd",
                               epilog=f"example: nsq-sync {kind} create events{' archive' if kind == 'channel' else ''} "
                                      "--lookupd-http-address 127.0.0.1:4161")
        admin.add_argument("action", choices=tuple(_ADMIN_ACTIONS), metavar="ACTION", help=f"{'|'.join(_ADMIN_ACTIONS)}: {_ADMIN_HELP[kind]}")
        admin.add_argument("topic", type=_check_topic, metavar="TOPIC", help="the topic" + (" of the channel" if kind == "channel" else ""))
        if kind == "channel":
            admin.add_argument("channel", type=_check_channel, metavar="CHANNEL", help="the channel")
        http_address_args(admin)
        admin.set_defaults(func=cmd_admin)

    cluster = sub.add_parser("cluster", parents=[verbose_parent()], help="run a local nsqlookupd + nsqd cluster in the foreground", epilog="example: nsq-sync cluster --nsqd 3")
    cluster.add_argument("--nsqd", type=_int_range(1, MAX_CLUSTER_NSQD), default=2, help="how many nsqd")
    cluster.add_argument("--json", action="store_true", help="print the addresses as JSON")
    cluster.set_defaults(func=cmd_cluster)
    return parser


def _maybe_reexec_gevent(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """--backend gevent: restart under gevent's monkey-patching runner, before sockets and threads exist.

    Decided from the parsed arguments, not argv's words: argparse takes an abbreviation
    (``--back gevent``) too, and a message body may read ``--backend gevent``."""
    if getattr(args, "backend", None) != "gevent" or os.environ.get(_REEXEC_MARK) or "gevent.monkey" in sys.modules and _patched():
        return
    if importlib.util.find_spec("gevent") is None:
        raise UsageError("--backend gevent needs gevent: pip install 'nsq_sync[gevent]'")
    env = dict(os.environ, **{_REEXEC_MARK: "1"})
    _flush_standard_streams()  # (None: started with it closed; the command itself says so)
    os.execve(sys.executable, [sys.executable, "-m", "gevent.monkey", "--module", "nsq_sync", *argv], env)


def _patched() -> bool:
    from .backends import gevent_patched

    return gevent_patched()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # (argparse itself ignores a reader of --help that left)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _maybe_reexec_gevent(args, argv)
        return int(args.func(args) or 0)
    except OutputGone as exc:
        _quiet_broken(exc.stream)
        return EXIT_OK if args.command in _STOPPED_BY_OUTPUT_END else EXIT_BROKEN_PIPE
    except UsageError as exc:
        _say(f"nsq-sync: error: {exc}")
        return EXIT_USAGE
    except Unavailable as exc:
        _say(f"nsq-sync: unavailable: {exc}")
        return EXIT_UNAVAILABLE
    except Refused as exc:
        _say(f"nsq-sync: refused: {exc}")
        return EXIT_REFUSED
    except Failed as exc:
        _say(f"nsq-sync: failed: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        _say(f"nsq-sync: interrupted: {exc}" if str(exc) else "nsq-sync: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        from .errors import ConfigError, Error, HandshakeRefusedError, NoConnectionsError

        if isinstance(exc, ConfigError):
            _say(f"nsq-sync: error: {exc}")
            return EXIT_USAGE
        if isinstance(exc, HandshakeRefusedError):
            _say(f"nsq-sync: refused: {exc}")
            return EXIT_REFUSED
        if isinstance(exc, NoConnectionsError):
            _say(f"nsq-sync: unavailable: {exc}")
            return EXIT_UNAVAILABLE
        if isinstance(exc, Error):
            _say(f"nsq-sync: failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        raise


def _flush_standard_streams() -> None:
    """Flush stdout and stderr; one whose reader left is made quiet."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:
            _quiet_broken(stream)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

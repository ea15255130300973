"""Run real NSQ brokers (``nsqd``, ``nsqlookupd``) from tests.

This module is public: use it to test your own handlers against a real broker.
It depends only on the Python standard library (and on the NSQ binaries).

Quick start::

    from nsq_sync.testing import NsqdProcess

    def test_my_handler():
        with NsqdProcess() as nsqd:            # random free ports, temp data dir
            nsqd.publish("orders", b"hello")   # via nsqd's HTTP API
            run_my_consumer(nsqd.tcp_address)  # "127.0.0.1:PORT"
            assert nsqd.topic_depth("orders") == 0

With pytest, the fixtures ``nsqd``, ``nsqlookupd`` and ``nsq_cluster`` from
:mod:`nsq_sync.pytest_plugin` do the same for you.

Binaries
    The processes run the real ``nsqd``/``nsqlookupd`` executables, which are
    looked up by :func:`find_binary`: first in ``$NSQ_SYNC_BIN_DIR``, then in
    ``<nsq_sync checkout>/.cache/nsq-1.3.0/bin`` (built by
    ``bash .ci/build-brokers``), then on ``PATH``. The test suite is pinned to
    NSQ v1.3.0.

All brokers listen on 127.0.0.1 only, on ports picked by the kernel (port 0);
the real ports are read from the broker's log lines
(``TCP: listening on 127.0.0.1:41234``) and kept across :meth:`restart`.

Brokers never outlive the process that started them: at a normal exit ``atexit``
kills them; if the process dies otherwise (SIGTERM, SIGKILL, ``os._exit``), a
watchdog process started with the first broker kills them and removes their
temporary data directories (see docs/testing.md).

gevent: the module only uses ``threading``, ``subprocess``, ``socket`` and
``time`` through their module attributes, and imports ``ssl``/``urllib``/
``http`` lazily, so it works under ``gevent.monkey.patch_all()`` even when it
was imported before patching.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
    Union,
)

from .addresses import parse_address
from .errors import ConfigError
from .protocol.identify import check_number

if TYPE_CHECKING:  # pragma: no cover - imported lazily at runtime (gevent)
    import http.server
    import ssl

__all__ = [
    "NSQ_VERSION",
    "BIN_DIR_ENV",
    "BrokerNotFoundError",
    "BrokerStartError",
    "BrokerHTTPError",
    "TLSFilesError",
    "find_binary",
    "wait_until",
    "NsqlookupdProcess",
    "NsqdProcess",
    "LocalCluster",
    "TLSFiles",
    "make_tls_files",
    "AuthServer",
]

logger = logging.getLogger(__name__)

#: The NSQ release this package is tested against.
NSQ_VERSION = "1.3.0"
#: Environment variable naming a directory that holds ``nsqd``/``nsqlookupd``.
BIN_DIR_ENV = "NSQ_SYNC_BIN_DIR"
#: Where ``bash .ci/build-brokers`` puts the binaries in an nsq_sync checkout.
_REPO_BIN_DIR = Path(__file__).resolve().parent.parent / ".cache" / f"nsq-{NSQ_VERSION}" / "bin"

LOCALHOST = "127.0.0.1"
#: what executables' names end with on this platform (Windows: nsqd.exe)
_EXE_SUFFIX = ".exe" if os.name == "nt" else ""

_StrPath = Union[str, "os.PathLike[str]"]
_P = TypeVar("_P", bound="_BrokerProcess")
_T = TypeVar("_T")


# --------------------------------------------------------------------------
# errors


class BrokerNotFoundError(RuntimeError):
    """An NSQ broker binary (``nsqd``/``nsqlookupd``) could not be found."""


class BrokerStartError(RuntimeError):
    """A broker process exited, or did not become ready, while starting."""


class BrokerHTTPError(RuntimeError):
    """A broker's HTTP API answered with an unexpected status."""

    def __init__(self, message: str, status: int, body: bytes) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class TLSFilesError(RuntimeError):
    """Test certificates could not be made (``openssl`` missing or failing)."""


# --------------------------------------------------------------------------
# helpers


def find_binary(name: str) -> str:
    """Return the path of the NSQ executable ``name`` (e.g. ``"nsqd"``).

    Looks in ``$NSQ_SYNC_BIN_DIR``, then in ``<checkout>/.cache/nsq-1.3.0/bin``
    (relative to this file's package's parent directory, if it exists), then
    on ``PATH``. On Windows ``name + ".exe"`` is looked for too.

    Raises:
        BrokerNotFoundError: the executable is in none of those places; the
            message explains how to get it.
    """
    searched: List[str] = []
    env_dir = os.environ.get(BIN_DIR_ENV)
    names = [name]
    if _EXE_SUFFIX and not name.lower().endswith(_EXE_SUFFIX):
        names.append(name + _EXE_SUFFIX)
    if env_dir:
        for candidate in (Path(env_dir) / n for n in names):
            if _is_executable(candidate):
                return str(candidate)
        searched.append(f"${BIN_DIR_ENV} = {env_dir}: {_bin_dir_problem(Path(env_dir), names)}")
    else:
        searched.append(f"${BIN_DIR_ENV} (not set)")
    for candidate in (_REPO_BIN_DIR / n for n in names):
        if _is_executable(candidate):
            return str(candidate)
    searched.append(f"{_REPO_BIN_DIR} (checkout cache)")
    on_path = shutil.which(name)
    if on_path:
        return on_path
    searched.append("PATH")
    raise BrokerNotFoundError(
        f"NSQ broker executable {name!r} (NSQ v{NSQ_VERSION}) not found.\n"
        "Searched:\n"
        + "".join(f"  - {s}\n" for s in searched)
        + "To get nsqd and nsqlookupd v" + NSQ_VERSION + ":\n"
        "  * in an nsq_sync checkout (needs Go >= 1.17 and the Go module proxy):\n"
        "        bash .ci/build-brokers\n"
        "    which builds them into .cache/nsq-" + NSQ_VERSION + "/bin/ where they are found automatically;\n"
        "  * elsewhere, build them with Go from a module that requires\n"
        "    github.com/nsqio/nsq v" + NSQ_VERSION + " (copy .ci/brokers from the nsq_sync repo):\n"
        "        cd .ci/brokers && go build -o DIR/ github.com/nsqio/nsq/apps/nsqd "
        "github.com/nsqio/nsq/apps/nsqlookupd\n"
        "    (`go install github.com/nsqio/nsq/apps/nsqd@v" + NSQ_VERSION + "` does NOT work: nsq's go.mod\n"
        "    has a replace directive), or download a release from\n"
        "    https://github.com/nsqio/nsq/releases/tag/v" + NSQ_VERSION + ";\n"
        f"  * then put them on PATH, or set {BIN_DIR_ENV}=DIR."
        + (
            f"\n${BIN_DIR_ENV} is set but does not lead to {' or '.join(map(repr, names))}: point it at the directory that holds\n"
            f"nsqd and nsqlookupd (in a checkout, the .cache/nsq-{NSQ_VERSION}/bin that bash .ci/build-brokers\n"
            "prints last), or unset it. See docs/testing.md, 'How the broker executables are found'."
            if env_dir
            else ""
        )
    )


def _bin_dir_problem(directory: Path, names: Sequence[str]) -> str:
    """Why *directory* ($NSQ_SYNC_BIN_DIR) gave none of *names*, for BrokerNotFoundError."""
    where = "" if directory.is_absolute() else f" (relative to the current directory: {Path.cwd() / directory})"
    wanted = " or ".join(map(repr, names))
    if not directory.exists():
        return f"the directory does not exist{where}"
    if not directory.is_dir():
        return f"not a directory{where}"
    for candidate in (directory / n for n in names):
        if candidate.is_dir():
            return f"{str(candidate)!r} is a directory, not the executable{where}"
        if candidate.exists():
            return f"{str(candidate)!r} is not executable (chmod +x it){where}"
    try:
        entries = sorted(entry.name for entry in directory.iterdir())
    except OSError as exc:
        return f"cannot list it ({exc}){where}"
    shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    return f"no {wanted} in it (it holds: {shown}){where}"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(str(path), os.X_OK)


def wait_until(
    predicate: Callable[[], _T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> _T:
    """Call ``predicate`` until it returns a truthy value, and return that value.

    Exceptions raised by ``predicate`` propagate.

    Raises:
        TimeoutError: ``predicate`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def _http_request(
    url: str,
    method: str = "GET",
    body: Optional[bytes] = None,
    timeout: float = 5.0,
    ssl_context: Optional["ssl.SSLContext"] = None,
) -> Tuple[int, bytes]:
    """Do one HTTP request, ignoring any proxy settings; HTTP errors are returned.

    Raises:
        OSError: connection-level failures (``urllib.error.URLError`` etc.).
    """
    import urllib.error
    import urllib.request

    handlers: List[Any] = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        finally:
            exc.close()


def _split_host_port(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# processes still running at interpreter exit are killed; owned temp dirs removed. Each
# with the id of the process that made it: a forked child (os.fork, then a normal exit)
# must not kill its parent's brokers or delete their data.
_RUNNING: Dict[int, Tuple["subprocess.Popen[bytes]", int]] = {}
_OWNED_DIRS: Dict[str, int] = {}


@atexit.register
def _cleanup_at_exit() -> None:
    pid = os.getpid()
    for proc, owner in list(_RUNNING.values()):
        if owner != pid:
            continue
        try:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            _watch("-pid", proc.pid)
        except Exception:  # pragma: no cover - best effort at exit
            pass
    for path, owner in list(_OWNED_DIRS.items()):
        if owner == pid:
            shutil.rmtree(path, ignore_errors=True)
            _watch("-dir", path)


# atexit does not run when the process dies otherwise (SIGTERM, SIGKILL, os._exit). For
# that, the first broker a process starts also starts one watchdog: a small Python process
# in its own session that reads a pipe from this process. Every broker pid and owned temp
# dir is announced on the pipe ("+pid"/"+dir") and withdrawn once stopped or removed
# ("-pid"/"-dir"). When this process ends, however it ends, the kernel closes the pipe; at
# end of file the watchdog kills the brokers still announced and removes the dirs. On Linux
# it holds a pidfd per broker, so a pid reused after the broker was reaped is never hit.
_WATCHDOG_SCRIPT = r"""
import errno, json, os, select, shutil, signal, sys, time
for name in ("SIGINT", "SIGHUP"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
pids, dirs = {}, set()
for line in sys.stdin.buffer:
    try:
        op, arg = json.loads(line)
    except ValueError:
        continue
    if op == "+pid":
        handle = None
        if hasattr(os, "pidfd_open"):
            try:
                handle = os.pidfd_open(arg)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    continue  # already gone
                # e.g. ENOSYS (a kernel before 5.3): signal the pid instead
        pids[arg] = handle
    elif op == "-pid":
        handle = pids.pop(arg, None)
        if handle is not None:
            os.close(handle)
    elif op == "+dir":
        dirs.add(arg)
    elif op == "-dir":
        dirs.discard(arg)
kill = getattr(signal, "SIGKILL", signal.SIGTERM)
for pid, handle in pids.items():
    try:
        if handle is not None:
            signal.pidfd_send_signal(handle, kill)
        else:
            os.kill(pid, kill)
    except OSError:
        pass
deadline = time.monotonic() + 5.0
for pid, handle in pids.items():
    while time.monotonic() < deadline:
        if handle is not None:
            if select.select([handle], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            continue
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.05)
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""

# _watchdog_lock is held across Popen, which yields under gevent: it is made on first use
# (after any monkey-patching); _watchdog_guard, held only to make it, never yields.
_watchdog_guard = threading.Lock()
_watchdog_lock: Optional[threading.Lock] = None
_watchdog_fd: Optional[int] = None  # write end of the pipe the watchdog reads
_watchdog_proc: Optional["subprocess.Popen[bytes]"] = None
_watchdog_failed = False


def _start_watchdog() -> Optional[int]:
    """Start this process's watchdog (lock held); the pipe's write end, None if it cannot run."""
    global _watchdog_fd, _watchdog_proc, _watchdog_failed
    python = sys.executable
    if not python or not re.match(r"(python|pypy)", os.path.basename(python).lower()):
        # embedded interpreter (uWSGI & co.): sys.executable is not a Python to run
        logger.info("no broker watchdog: sys.executable %r is not a Python interpreter", python)
        _watchdog_failed = True
        return None
    read_end, write_end = os.pipe()  # both close-on-exec: brokers started later do not hold it
    try:
        _watchdog_proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _WATCHDOG_SCRIPT],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.path.abspath(os.sep),
            start_new_session=True,  # no Ctrl-C / group kill reaches it: it outlives this process
        )
    except OSError as exc:
        os.close(write_end)
        logger.warning("no broker watchdog (%s): brokers are only killed at a normal exit", exc)
        _watchdog_failed = True
        return None
    finally:
        os.close(read_end)
    _watchdog_fd = write_end
    return write_end


def _watch(op: str, arg: Union[int, str]) -> None:
    """Tell this process's watchdog ``op`` (``+pid``, ``-pid``, ``+dir``, ``-dir``) ``arg``;
    the first ``+`` starts it. Best effort: without a watchdog only atexit cleans up."""
    global _watchdog_failed, _watchdog_lock, _watchdog_fd
    with _watchdog_guard:
        if _watchdog_lock is None:
            _watchdog_lock = threading.Lock()
        lock = _watchdog_lock
    with lock:
        fd = _watchdog_fd
        if fd is None:
            if op.startswith("-") or _watchdog_failed:
                return
            fd = _start_watchdog()
            if fd is None:
                return
        try:
            os.write(fd, json.dumps([op, arg]).encode() + b"\n")
        except OSError as exc:  # the watchdog died (EPIPE)
            logger.warning("broker watchdog gone (%s): brokers are only killed at a normal exit", exc)
            _watchdog_failed = True
            _watchdog_fd = None
            os.close(fd)


def _watchdog_after_fork() -> None:
    # The child must not keep its parent's pipe open (the watchdog would not see the
    # parent die) nor write to it; brokers it starts get a watchdog of its own.
    global _watchdog_fd, _watchdog_proc, _watchdog_failed, _watchdog_lock, _watchdog_guard
    _watchdog_guard, _watchdog_lock = threading.Lock(), None
    fd, _watchdog_fd, _watchdog_proc, _watchdog_failed = _watchdog_fd, None, None, False
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog_after_fork)


# --------------------------------------------------------------------------
# argument checks: bad values fail when the object is made, not at start()


def _string_list(param: str, value: object) -> List[str]:
    """*value* as a list of str; a lone str (which would become its characters) is a TypeError."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{param} must be a list of strings, not a single {type(value).__name__}: write [{value!r}]")
    if not isinstance(value, Iterable):
        raise TypeError(f"{param} must be a list of strings, not {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{param} must hold only strings, not {type(item).__name__} ({item!r})")
    return items


def _optional_path(param: str, value: object) -> Optional[str]:
    """None, or a non-empty str/os.PathLike path as a str."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{param} must be a str or os.PathLike path, not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{param} must be a str path, not {type(path).__name__}")
    if not path:
        raise ConfigError(param, value, "must be a non-empty path")
    return path


def _check_start_timeout(start_timeout: object) -> float:
    return float(check_number("start_timeout", start_timeout, 0.001, 86400))


# --------------------------------------------------------------------------
# broker processes

_LISTEN_RE = re.compile(r"\b(TCP|HTTP|HTTPS): listening on (\S+)")
# --log-level values that hide the INFO "listening on" lines the ports are read from
_QUIET_LOG_LEVELS = ("warn", "error", "fatal")
_START_MARKER = "---- nsq_sync.testing: starting "
# the FATAL line of a broker whose port is taken: "... listen tcp 127.0.0.1:4151: bind: address already in use"
_IN_USE_RE = re.compile(r"listen tcp (\S+): bind: address already in use")
_RETRY_PAUSE = 0.1  # between start attempts while a known port is in use
_LATE_LINES = 1.0  # how long, past the deadline, listening lines may still be on their way


class _BrokerProcess:
    """Common machinery for :class:`NsqdProcess` and :class:`NsqlookupdProcess`."""

    binary_name = ""

    def __init__(
        self,
        extra_args: Iterable[str] = (),
        *,
        binary: Optional[str] = None,
        start_timeout: float = 10.0,
        max_log_lines: int = 5000,
    ) -> None:
        self.host: str = LOCALHOST
        self.extra_args: List[str] = _string_list("extra_args", extra_args)
        self.binary = _optional_path("binary", binary)
        self.start_timeout = _check_start_timeout(start_timeout)
        self.tcp_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.https_port: Optional[int] = None
        self._ports_fixed = False
        self._owner_pid: Optional[int] = None  # the process that started the broker (see _forked)
        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._reader: Optional[threading.Thread] = None
        self._log: Deque[str] = collections.deque(maxlen=max_log_lines)
        self._cond = threading.Condition()
        self._listening: Dict[str, str] = {}
        self._reader_done = True
        self._paused = False
        self._wanted = False  # started, and not stopped or killed since (see LocalCluster)

    # ---- subclass hooks

    def _build_args(self) -> List[str]:
        raise NotImplementedError

    def _expected_listeners(self) -> Set[str]:
        return {"TCP", "HTTP"}

    def _prepare(self) -> None:
        """Called before each spawn (e.g. to create the data dir)."""

    def _log_level_args(self) -> List[str]:
        """``["--log-level=info"]`` if ``extra_args`` sets a level that hides INFO lines.

        The ports are learned from the INFO ``listening on`` lines, so a quieter level is
        overridden by a later flag (the last one wins) rather than failing every start.
        """
        level = None
        args = self.extra_args
        for index, arg in enumerate(args):
            name, equals, value = arg.lstrip("-").partition("=")
            if name == "log-level":
                level = value if equals else (args[index + 1] if index + 1 < len(args) else None)
        if level is not None and level.lower() in _QUIET_LOG_LEVELS:
            return ["--log-level=info"]
        return []

    # ---- public properties

    @property
    def pid(self) -> Optional[int]:
        """PID of the most recently started process (None if never started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process is alive (also while paused)."""
        return self._proc is not None and self._poll(self._proc) is None

    @property
    def returncode(self) -> Optional[int]:
        """Exit status of the last process, None while running or never started."""
        return self._poll(self._proc) if self._proc is not None else None

    def _poll(self, proc: "subprocess.Popen[bytes]") -> Optional[int]:
        status = proc.poll()
        if status is not None:
            self._released(proc)
        return status

    def _released(self, proc: "subprocess.Popen[bytes]") -> None:
        """``proc`` has exited and is reaped: withdraw it from the exit cleanup and the
        watchdog (which must not signal its pid once it may be reused)."""
        entry = _RUNNING.get(id(self))
        if entry is not None and entry[0] is proc:
            del _RUNNING[id(self)]
            _watch("-pid", proc.pid)

    @property
    def tcp_address(self) -> str:
        """``"127.0.0.1:PORT"`` of the TCP listener.

        Raises:
            RuntimeError: the process was never started.
        """
        return f"{self.host}:{self._require_port(self.tcp_port)}"

    @property
    def http_address(self) -> str:
        """``"127.0.0.1:PORT"`` of the HTTP listener.

        Raises:
            RuntimeError: the process was never started.
        """
        return f"{self.host}:{self._require_port(self.http_port)}"

    def _require_port(self, port: Optional[int]) -> int:
        if port is None:
            raise RuntimeError(f"{self!r} has not been started yet")
        return port

    def http_url(self, path: str = "/") -> str:
        """``http://127.0.0.1:PORT`` + ``path``.

        Raises:
            RuntimeError: the process was never started.
        """
        return f"http://{self.http_address}{path}"

    def log_text(self, last: Optional[int] = None) -> str:
        """The broker's captured stdout/stderr (bounded), optionally only the ``last`` lines."""
        with self._cond:
            lines = list(self._log)
        if last is not None:
            lines = lines[-last:]
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<{type(self).__name__} pid={self.pid} tcp={self.tcp_port} "
            f"http={self.http_port} {state}>"
        )

    # ---- lifecycle

    def start(self: _P) -> _P:
        """Start the broker and wait until it answers ``GET /ping``; no-op if running.

        The first start uses kernel-assigned ports; later starts reuse them. While one
        of them is still in use (the old socket, another process), the start is retried
        until ``start_timeout``.

        Raises:
            BrokerNotFoundError: the executable cannot be found, or the explicit
                ``binary`` is missing or not an executable file.
            BrokerStartError: the process exited or did not become ready within
                ``start_timeout`` seconds (the message contains its log tail), or one of
                its known ports stayed in use by another process (the message names it).
        """
        if self.running:
            return self
        binary = self._executable()
        deadline = time.monotonic() + self.start_timeout
        retried = False
        taken: Optional[str] = None  # log of the latest attempt that found a port in use
        while True:
            self._prepare()
            args = [binary] + self._build_args()
            try:
                self._spawn(args)
                self._wait_listening(deadline)
                self._wait_ready(deadline)
            except BrokerStartError as exc:
                current = self._current_log()
                self.kill()
                if self._ports_fixed and _IN_USE_RE.search(current):
                    taken = current
                    # the old socket / another process still holds the port: retry while
                    # there is time for another attempt, never past the deadline
                    if deadline - time.monotonic() > _RETRY_PAUSE:
                        logger.info("%s: port still in use, retrying", self.binary_name)
                        time.sleep(_RETRY_PAUSE)
                        continue
                    raise self._port_taken_error(taken) from None
                if taken is not None:  # the last attempt ran out of time; the ones before met a taken port
                    raise self._port_taken_error(taken, str(exc).split("\n", 1)[0]) from None
                silent = current.count("\n") == 0  # not a line of output: a stuck start, try once more
                if self._ports_fixed and silent and not retried:
                    retried = True
                    deadline = time.monotonic() + self.start_timeout
                    logger.info("%s: printed nothing while starting, retrying", self.binary_name)
                    time.sleep(_RETRY_PAUSE)
                    continue
                raise
            except BaseException:
                self.kill()
                raise
            break
        self._ports_fixed = True
        self._wanted = True
        logger.info("started %r", self)
        return self

    def _executable(self) -> str:
        """The explicit ``binary``, checked, or :func:`find_binary`'s answer.

        Raises:
            BrokerNotFoundError: ``binary`` is missing or not an executable file.
        """
        if self.binary is None:
            return find_binary(self.binary_name)
        path = Path(self.binary)
        if not _is_executable(path):
            problem = (
                "does not exist" if not path.exists()
                else "is not a file" if not path.is_file()
                else "is not executable"
            )  # fmt: skip
            raise BrokerNotFoundError(f"{self.binary_name} executable binary={self.binary!r} {problem}")
        return self.binary

    def _spawn(self, args: List[str]) -> None:
        with self._cond:
            self._listening = {}
            self._log.append(_START_MARKER + " ".join(args))
            self._reader_done = False
        logger.debug("spawning %s", args)
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # keep Ctrl-C in the terminal from killing brokers before teardown
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as exc:  # removed or chmod-ed since the check
            raise BrokerNotFoundError(f"cannot run {self.binary_name} executable {args[0]!r}: {exc}") from None
        except OSError as exc:  # e.g. ENOEXEC: not a program for this system
            raise BrokerStartError(f"cannot run {self.binary_name} executable {args[0]!r}: {exc}") from None
        self._proc = proc
        self._paused = False
        self._owner_pid = os.getpid()
        _RUNNING[id(self)] = (proc, self._owner_pid)
        _watch("+pid", proc.pid)
        reader = threading.Thread(
            target=self._read_output,
            args=(proc,),
            name=f"{self.binary_name}-{proc.pid}-log",
            daemon=True,
        )
        self._reader = reader
        reader.start()

    def _read_output(self, proc: "subprocess.Popen[bytes]") -> None:
        stream = proc.stdout
        assert stream is not None
        prefix = f"{self.binary_name}[{proc.pid}]"
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                logger.debug("%s %s", prefix, line)
                match = _LISTEN_RE.search(line)
                with self._cond:
                    self._log.append(line)
                    if match:
                        self._listening[match.group(1)] = match.group(2)
                        self._cond.notify_all()
        except (OSError, ValueError):  # pipe closed under us
            pass
        finally:
            with self._cond:
                self._reader_done = True
                self._cond.notify_all()

    def _current_log(self) -> str:
        """Log lines since the most recent start."""
        with self._cond:
            lines = list(self._log)
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith(_START_MARKER):
                return "\n".join(lines[index:])
        return "\n".join(lines)

    def _port_taken_error(self, log: str, last: Optional[str] = None) -> BrokerStartError:
        """The error for a restart whose known port stayed in use (``log``: that attempt's)."""
        match = _IN_USE_RE.search(log)
        assert match is not None
        port = _split_host_port(match.group(1))[1]
        names = {self.tcp_port: "TCP", self.http_port: "HTTP", self.https_port: "HTTPS"}
        reason = (
            f"could not start within {self.start_timeout:g}s: its {names.get(port, 'known')} "
            f"port {port} is in use by another process (address already in use)"
        )
        if last:
            reason += f"; the last attempt: {last}"
        return self._start_error(reason, log)

    def _start_error(self, reason: str, log: Optional[str] = None) -> BrokerStartError:
        lines = (self._current_log() if log is None else log).splitlines()
        if len(lines) > 50:  # keep the head too: flag errors come before the usage text
            lines = lines[:15] + [f"... ({len(lines) - 45} lines omitted) ..."] + lines[-30:]
        log = "\n".join(lines)
        return BrokerStartError(f"{self.binary_name} {reason}\n--- log ---\n{log}")

    def _listeners_by(self, deadline: float) -> Dict[str, str]:
        """The listening lines seen once all expected ones are, the process ended, or ``deadline``."""
        expected = self._expected_listeners()
        proc = self._proc
        assert proc is not None
        with self._cond:
            while not expected.issubset(self._listening):
                if self._reader_done and proc.poll() is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            return dict(self._listening)

    def _wait_listening(self, deadline: float) -> None:
        expected = self._expected_listeners()
        proc = self._proc
        assert proc is not None
        listening = self._listeners_by(deadline)
        if not expected.issubset(listening) and proc.poll() is None and self._ports_fixed:
            if self._known_ports_answer():
                # Something serves on the known ports. This broker logs its listening lines
                # before it serves, so they may only be late (a loaded machine); if they do
                # not come, the answer is from another process that took the port.
                listening = self._listeners_by(time.monotonic() + _LATE_LINES)
                if not expected.issubset(listening) and proc.poll() is None:
                    raise self._start_error(
                        f"did not report {sorted(expected - set(listening))} listeners within "
                        f"{self.start_timeout:g}s, and port {self.http_port} answers /ping: another "
                        "process serves on its port"
                    )
        if not expected.issubset(listening):
            if proc.poll() is not None:
                try:
                    proc.wait(1)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
                self._join_reader()
                raise self._start_error(f"exited with status {proc.returncode} while starting")
            raise self._start_error(
                f"did not report {sorted(expected - set(listening))} listeners "
                f"within {self.start_timeout:g}s"
            )
        self.tcp_port = _split_host_port(listening["TCP"])[1]
        self.http_port = _split_host_port(listening["HTTP"])[1]
        if "HTTPS" in listening:
            self.https_port = _split_host_port(listening["HTTPS"])[1]

    def _known_ports_answer(self) -> bool:
        try:
            status, body = _http_request(self.http_url("/ping"), timeout=1.0)
        except OSError:
            return False
        return self._ping_ok(status, body)

    def _ping_ok(self, status: int, body: bytes) -> bool:
        return status == 200 and body.strip() == b"OK"

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        last = "no answer"
        url = self.http_url("/ping")
        while True:
            try:
                status, body = _http_request(url, timeout=1.0)
                if self._ping_ok(status, body):
                    return
                last = f"HTTP {status} {body[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            if proc.poll() is not None:
                self._join_reader()
                raise self._start_error(f"exited with status {proc.returncode} while starting")
            if time.monotonic() >= deadline:
                raise self._start_error(
                    f"did not answer GET {url} within {self.start_timeout:g}s (last: {last})"
                )
            time.sleep(0.02)

    def _join_reader(self, timeout: float = 5.0) -> None:
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)
        proc = self._proc
        if proc is not None and proc.stdout is not None and (reader is None or not reader.is_alive()):
            try:
                proc.stdout.close()
            except OSError:  # pragma: no cover
                pass

    def _forked(self) -> bool:
        """True in a process forked from the one that started the broker: the broker, its
        output pipe and its data are the parent's, and stop()/kill()/close() leave them be."""
        return self._owner_pid not in (None, os.getpid())

    def _send(self, sig: Optional[int]) -> None:
        """Send ``sig`` to a running broker; None: kill it (SIGKILL, or Windows' TerminateProcess)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if sig is None:
                proc.kill()
            else:
                proc.send_signal(sig)
        except ProcessLookupError:  # exited meanwhile
            pass

    def _posix_signal(self, name: str, method: str) -> int:
        sig = getattr(signal, name, None)
        if sig is None:
            raise NotImplementedError(
                f"{method}() needs {name}, which this platform ({sys.platform}) lacks: "
                "pause() and resume() are POSIX-only"
            )
        return int(sig)

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Stop the broker: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.

        Idempotent: does nothing if not running. A paused broker is resumed so
        it can shut down cleanly (nsqd then persists its in-memory messages).
        Returns the exit status (None if never started): 0 after a clean shutdown, -15
        when SIGTERM came before nsqd handled it. NSQ's service wrapper (go-svc) starts
        the servers and only then asks for SIGTERM, so a stop right after :meth:`start`
        can end the process at once, without the shutdown that persists messages.
        """
        proc = self._proc
        if proc is None or self._forked():
            return None
        self._wanted = False
        if proc.poll() is None:
            self._send(signal.SIGTERM)
            if self._paused:
                self._send(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s pid %s ignored SIGTERM for %.1fs; killing it", self.binary_name, proc.pid, timeout
                )
                self._send(None)
                proc.wait(10)
            if proc.returncode == -signal.SIGTERM:
                logger.warning("%s pid %s ended by SIGTERM before it handled it (stopped right after it started): no clean shutdown", self.binary_name, proc.pid)
            else:
                logger.info("stopped %s pid %s (status %s)", self.binary_name, proc.pid, proc.returncode)
        self._paused = False
        self._released(proc)
        self._join_reader()
        return proc.returncode

    def kill(self) -> Optional[int]:
        """SIGKILL the broker (Windows: TerminateProcess; no graceful shutdown) and reap it; idempotent.

        Returns the exit status (None if never started).
        """
        proc = self._proc
        if proc is None or self._forked():
            return None
        self._wanted = False
        if proc.poll() is None:
            self._send(None)
            proc.wait(10)
        self._paused = False
        self._released(proc)
        self._join_reader()
        return proc.returncode

    def pause(self) -> None:
        """Freeze the broker with SIGSTOP (sockets stay open, nothing answers). POSIX only.

        Raises:
            NotImplementedError: the platform has no SIGSTOP (Windows).
            RuntimeError: the broker is not running.
        """
        sigstop = self._posix_signal("SIGSTOP", "pause")
        self._posix_signal("SIGCONT", "pause")  # stop() and resume() need it to continue
        if not self.running:
            raise RuntimeError(f"cannot pause {self!r}: not running")
        self._send(sigstop)
        self._paused = True
        # SIGSTOP lands asynchronously: return only once the kernel shows it stopped,
        # so nothing sent after pause() can still be answered.
        stat = f"/proc/{self.pid}/stat"
        if os.path.exists(stat):
            def stopped() -> bool:
                try:
                    with open(stat) as handle:
                        return handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
                except OSError:
                    return True
            wait_until(stopped, timeout=5.0, message=f"{self!r} to stop")

    def resume(self) -> None:
        """Continue a broker frozen by :meth:`pause` (SIGCONT). POSIX only.

        Raises:
            NotImplementedError: the platform has no SIGCONT (Windows).
            RuntimeError: the broker is not running.
        """
        sigcont = self._posix_signal("SIGCONT", "resume")
        if not self.running:
            raise RuntimeError(f"cannot resume {self!r}: not running")
        self._send(sigcont)
        self._paused = False

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.running

    def restart(self: _P, timeout: float = 10.0) -> _P:
        """:meth:`stop` (graceful), then :meth:`start` on the same ports and data.

        Raises:
            BrokerNotFoundError, BrokerStartError: as :meth:`start`.
        """
        self.stop(timeout)
        return self.start()

    def close(self) -> None:
        """Stop the broker and release resources it owns (e.g. a temp data dir)."""
        self.stop()

    def __enter__(self: _P) -> _P:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- HTTP API helpers

    def http_request(
        self, method: str, path: str, body: Optional[bytes] = None, timeout: float = 5.0
    ) -> Tuple[int, bytes]:
        """Send an HTTP request to the broker's API; returns ``(status, body)``.

        Non-2xx statuses are returned, not raised.

        Raises:
            OSError: connection failures (e.g. the broker is stopped or paused).
            RuntimeError: the broker was never started.
        """
        return _http_request(self.http_url(path), method=method, body=body, timeout=timeout)

    def _api(self, method: str, path: str, body: Optional[bytes] = None) -> bytes:
        status, data = self.http_request(method, path, body)
        if status != 200:
            raise BrokerHTTPError(
                f"{self.binary_name} {method} {path} -> HTTP {status}: {data[:500]!r}", status, data
            )
        return data

    def _api_json(self, method: str, path: str, body: Optional[bytes] = None) -> Any:
        return json.loads(self._api(method, path, body) or b"null")


class NsqlookupdProcess(_BrokerProcess):
    """A real ``nsqlookupd`` on 127.0.0.1 with kernel-assigned TCP/HTTP ports.

    ``extra_args`` are appended verbatim to the command line (later flags win);
    a ``--log-level`` of ``warn``, ``error`` or ``fatal`` is followed by
    ``--log-level=info``: the ports are read from INFO log lines.

    Raises:
        TypeError: ``extra_args`` is a str (not a list of them) or holds a non-str;
            ``binary`` is not a path.
        ConfigError: ``start_timeout`` is not from 0.001 to 86400 seconds.
    """

    binary_name = "nsqlookupd"

    def __init__(
        self,
        extra_args: Iterable[str] = (),
        *,
        binary: Optional[str] = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(extra_args, binary=binary, start_timeout=start_timeout)

    def _build_args(self) -> List[str]:
        return [
            f"--tcp-address={self.host}:{self.tcp_port or 0}",
            f"--http-address={self.host}:{self.http_port or 0}",
            f"--broadcast-address={self.host}",
        ] + self.extra_args + self._log_level_args()

    def nodes(self) -> List[Dict[str, Any]]:
        """The producers (nsqd nodes) registered with this lookupd (``GET /nodes``).

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: lookupd unreachable.
        """
        return list(self._api_json("GET", "/nodes").get("producers") or [])

    def lookup(self, topic: str) -> List[Dict[str, Any]]:
        """The producers of ``topic`` (``GET /lookup``); ``[]`` if the topic is unknown.

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: lookupd unreachable.
        """
        import urllib.parse

        status, data = self.http_request("GET", "/lookup?" + urllib.parse.urlencode({"topic": topic}))
        if status == 404:
            return []
        if status != 200:
            raise BrokerHTTPError(f"nsqlookupd /lookup -> HTTP {status}: {data[:500]!r}", status, data)
        return list(json.loads(data).get("producers") or [])

    def topics(self) -> List[str]:
        """All topics known to this lookupd (``GET /topics``).

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: lookupd unreachable.
        """
        return list(self._api_json("GET", "/topics").get("topics") or [])


_node_ids = itertools.count(random.randrange(1024))


class NsqdProcess(_BrokerProcess):
    """A real ``nsqd`` on 127.0.0.1 with kernel-assigned ports and its own data dir.

    Args:
        lookupd_tcp_addresses: ``"host:port"`` of nsqlookupds to register with.
        extra_args: appended verbatim to the command line (later flags win),
            e.g. ``["--mem-queue-size=0", "--auth-http-address=127.0.0.1:9"]``;
            a ``--log-level`` of ``warn``, ``error`` or ``fatal`` is followed by
            ``--log-level=info``: the ports are read from INFO log lines.
        data_path: data directory; by default a temp dir is created on first
            start and removed by :meth:`close` / leaving the ``with`` block.
            It is kept across :meth:`restart`, so queued messages survive.
        tls_cert, tls_key: server certificate/key; enables TLS on the TCP
            protocol and an HTTPS listener (``https_port``).
        tls_root_ca: CA file nsqd uses to verify client certificates.
        binary: explicit path of the nsqd executable (default: :func:`find_binary`).
        start_timeout: seconds to wait for ``/ping`` on each start.

    Each instance gets its own ``--node-id`` (unless ``extra_args`` sets one)
    so message IDs from several local nsqds do not collide.

    Raises:
        TypeError: ``extra_args``/``lookupd_tcp_addresses`` is a str (not a list of
            them) or holds a non-str; a path or ``binary`` is not a str/os.PathLike.
        ConfigError (a ValueError): only one of ``tls_cert``/``tls_key`` given,
            ``tls_root_ca`` without them, a lookupd address that is not
            ``"host:port"``, an empty path, ``start_timeout`` not from 0.001 to 86400.
    """

    binary_name = "nsqd"

    def __init__(
        self,
        lookupd_tcp_addresses: Iterable[str] = (),
        extra_args: Iterable[str] = (),
        data_path: Optional[_StrPath] = None,
        tls_cert: Optional[_StrPath] = None,
        tls_key: Optional[_StrPath] = None,
        tls_root_ca: Optional[_StrPath] = None,
        *,
        binary: Optional[str] = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(extra_args, binary=binary, start_timeout=start_timeout)
        addresses = _string_list("lookupd_tcp_addresses", lookupd_tcp_addresses)
        for address in addresses:
            parse_address(address, "lookupd_tcp_addresses")
        cert = _optional_path("tls_cert", tls_cert)
        key = _optional_path("tls_key", tls_key)
        root_ca = _optional_path("tls_root_ca", tls_root_ca)
        path = _optional_path("data_path", data_path)
        if (cert is None) != (key is None):
            missing = "tls_key" if key is None else "tls_cert"
            raise ConfigError(missing, None, "tls_cert and tls_key must be given together")
        if root_ca is not None and cert is None:
            raise ConfigError("tls_root_ca", root_ca, "needs tls_cert and tls_key (nsqd uses it only with TLS)")
        self.lookupd_tcp_addresses: List[str] = addresses
        self.tls_cert = cert
        self.tls_key = key
        self.tls_root_ca = root_ca
        self.data_path: Optional[str] = path
        self._owns_data_path = False
        self.node_id: int = next(_node_ids) % 1024

    def _prepare(self) -> None:
        if self.data_path is None:
            self.data_path = tempfile.mkdtemp(prefix="nsq_sync-nsqd-")
            self._owns_data_path = True
            _OWNED_DIRS[self.data_path] = os.getpid()
            _watch("+dir", self.data_path)
        else:
            os.makedirs(self.data_path, exist_ok=True)

    def _expected_listeners(self) -> Set[str]:
        expected = {"TCP", "HTTP"}
        if self.tls_cert:
            expected.add("HTTPS")
        return expected

    def _build_args(self) -> List[str]:
        assert self.data_path is not None
        args = [
            f"--tcp-address={self.host}:{self.tcp_port or 0}",
            f"--http-address={self.host}:{self.http_port or 0}",
            f"--broadcast-address={self.host}",
            f"--data-path={self.data_path}",
        ]
        if not any(a.lstrip("-").split("=", 1)[0] == "node-id" for a in self.extra_args):
            args.append(f"--node-id={self.node_id}")
        if self.tls_cert:
            args += [
                f"--https-address={self.host}:{self.https_port or 0}",
                f"--tls-cert={self.tls_cert}",
                f"--tls-key={self.tls_key}",
            ]
            if self.tls_root_ca:
                args.append(f"--tls-root-ca-file={self.tls_root_ca}")
        args += [f"--lookupd-tcp-address={a}" for a in self.lookupd_tcp_addresses]
        return args + self.extra_args + self._log_level_args()

    @property
    def https_address(self) -> Optional[str]:
        """``"127.0.0.1:PORT"`` of the HTTPS listener, None without TLS."""
        return f"{self.host}:{self.https_port}" if self.https_port else None

    def _ping_ok(self, status: int, body: bytes) -> bool:
        # with --tls-required=true the plain HTTP port answers every request with
        # 403 {"message": "TLS_REQUIRED", "https_port": N}: the server is up.
        return super()._ping_ok(status, body) or (status == 403 and b"TLS_REQUIRED" in body)

    def close(self) -> None:
        """Stop nsqd and remove the temp data dir if this object created it."""
        self.stop()
        if self._owns_data_path and self.data_path and not self._forked():
            shutil.rmtree(self.data_path, ignore_errors=True)
            _OWNED_DIRS.pop(self.data_path, None)
            _watch("-dir", self.data_path)
            self.data_path = None
            self._owns_data_path = False

    def http_request(
        self, method: str, path: str, body: Optional[bytes] = None, timeout: float = 5.0
    ) -> Tuple[int, bytes]:
        """Send an HTTP request to nsqd's API; returns ``(status, body)``.

        If nsqd runs with ``--tls-required=true`` the request is retried on the
        HTTPS port without certificate verification and without a client
        certificate (so it fails with ``--tls-client-auth-policy=require-verify``).

        Raises:
            OSError: connection failures (e.g. nsqd is stopped or paused).
            RuntimeError: nsqd was never started.
        """
        status, data = super().http_request(method, path, body, timeout)
        if status == 403 and b"TLS_REQUIRED" in data and self.https_port:
            import ssl

            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            url = f"https://{self.host}:{self.https_port}{path}"
            return _http_request(url, method, body, timeout, ssl_context=context)
        return status, data

    # ---- convenience wrappers around nsqd's HTTP API

    def publish(self, topic: str, body: bytes, defer_ms: Optional[int] = None) -> None:
        """Publish one message through ``POST /pub`` (creates the topic).

        Raises:
            BrokerHTTPError: nsqd refused it. OSError: nsqd unreachable.
        """
        import urllib.parse

        params: Dict[str, Any] = {"topic": topic}
        if defer_ms is not None:
            params["defer"] = int(defer_ms)
        self._api("POST", "/pub?" + urllib.parse.urlencode(params), body)

    def mpublish(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish several messages at once through ``POST /mpub?binary=true``.

        Raises:
            BrokerHTTPError: nsqd refused them. OSError: nsqd unreachable.
        """
        import urllib.parse

        payload = struct.pack(">i", len(bodies)) + b"".join(
            struct.pack(">i", len(b)) + b for b in bodies
        )
        self._api("POST", "/mpub?" + urllib.parse.urlencode({"topic": topic, "binary": "true"}), payload)

    def create_topic(self, topic: str) -> None:
        """Create ``topic`` (``POST /topic/create``).

        Raises:
            BrokerHTTPError: nsqd refused it. OSError: nsqd unreachable.
        """
        import urllib.parse

        self._api("POST", "/topic/create?" + urllib.parse.urlencode({"topic": topic}))

    def create_channel(self, topic: str, channel: str) -> None:
        """Create ``topic`` (if needed) and ``channel`` on it.

        Raises:
            BrokerHTTPError: nsqd refused it. OSError: nsqd unreachable.
        """
        import urllib.parse

        self.create_topic(topic)  # /channel/create answers 404 TOPIC_NOT_FOUND otherwise
        self._api(
            "POST", "/channel/create?" + urllib.parse.urlencode({"topic": topic, "channel": channel})
        )

    def stats(self, topic: Optional[str] = None, channel: Optional[str] = None) -> Dict[str, Any]:
        """nsqd's ``GET /stats?format=json`` as a dict (optionally filtered).

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: nsqd unreachable.
        """
        import urllib.parse

        params = {"format": "json"}
        if topic is not None:
            params["topic"] = topic
        if channel is not None:
            params["channel"] = channel
        return dict(self._api_json("GET", "/stats?" + urllib.parse.urlencode(params)))

    def topic_stats(self, topic: str) -> Optional[Dict[str, Any]]:
        """The stats entry of ``topic``, None if nsqd does not know it.

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: nsqd unreachable.
        """
        for entry in self.stats(topic=topic).get("topics") or []:
            if entry.get("topic_name") == topic:
                return dict(entry)
        return None

    def channel_stats(self, topic: str, channel: str) -> Optional[Dict[str, Any]]:
        """The stats entry of ``channel`` on ``topic``, None if unknown.

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: nsqd unreachable.
        """
        entry = self.topic_stats(topic)
        for chan in (entry or {}).get("channels") or []:
            if chan.get("channel_name") == channel:
                return dict(chan)
        return None

    def topic_depth(self, topic: str) -> int:
        """Messages waiting in ``topic`` itself (memory + disk); 0 if unknown.

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: nsqd unreachable.
        """
        entry = self.topic_stats(topic)
        return int(entry["depth"]) if entry else 0

    def channel_depth(self, topic: str, channel: str) -> int:
        """Messages waiting in ``channel`` (not counting in-flight/deferred); 0 if unknown.

        Raises:
            BrokerHTTPError: unexpected HTTP status. OSError: nsqd unreachable.
        """
        entry = self.channel_stats(topic, channel)
        return int(entry["depth"]) if entry else 0


# --------------------------------------------------------------------------
# cluster


class LocalCluster:
    """One ``nsqlookupd`` plus ``nsqd_count`` ``nsqd`` registered with it.

    ``nsqd_args``/``lookupd_args`` are extra command-line flags for every nsqd
    / the lookupd. :meth:`start` returns once every nsqd shows up in the
    lookupd's ``/nodes``.

    Raises:
        TypeError: ``nsqd_count`` is not an int; ``nsqd_args``/``lookupd_args`` is a
            str (not a list of them) or holds a non-str.
        ConfigError: ``nsqd_count`` not from 0 to 1000, ``start_timeout`` not from
            0.001 to 86400 seconds.
    """

    def __init__(
        self,
        nsqd_count: int = 2,
        nsqd_args: Iterable[str] = (),
        lookupd_args: Iterable[str] = (),
        *,
        start_timeout: float = 10.0,
    ) -> None:
        check_number("nsqd_count", nsqd_count, 0, 1000, integer=True)
        self.nsqd_args: List[str] = _string_list("nsqd_args", nsqd_args)
        lookupd_args = _string_list("lookupd_args", lookupd_args)
        self.start_timeout = _check_start_timeout(start_timeout)
        self.nsqd_count = nsqd_count
        self.lookupd = NsqlookupdProcess(lookupd_args, start_timeout=start_timeout)
        self.nsqds: List[NsqdProcess] = []

    @property
    def nsqd_tcp_addresses(self) -> List[str]:
        """``"host:port"`` of every nsqd's TCP listener."""
        return [n.tcp_address for n in self.nsqds]

    @property
    def nsqd_http_addresses(self) -> List[str]:
        """``"host:port"`` of every nsqd's HTTP listener."""
        return [n.http_address for n in self.nsqds]

    @property
    def lookupd_http_addresses(self) -> List[str]:
        """``["host:port"]`` of the lookupd's HTTP listener (what consumers poll)."""
        return [self.lookupd.http_address]

    @property
    def lookupd_tcp_addresses(self) -> List[str]:
        """``["host:port"]`` of the lookupd's TCP listener (what nsqd registers with)."""
        return [self.lookupd.tcp_address]

    def start(self) -> "LocalCluster":
        """Start the lookupd and the nsqds; wait until all are registered.

        After :meth:`stop` (or with some nsqds stopped), starts again the lookupd and
        every nsqd of :attr:`nsqds` that is not running, on their ports and data, then
        adds nsqds up to ``nsqd_count``.

        Raises:
            BrokerNotFoundError, BrokerStartError: a broker could not start
                (everything already started is stopped again).
            TimeoutError: the nsqds did not register within ``start_timeout``.
        """
        try:
            self.lookupd.start()
            for nsqd in self.nsqds:
                if not nsqd.running:
                    nsqd.start()
                    self._wait_registered(nsqd)
            while len(self.nsqds) < self.nsqd_count:
                self.add_nsqd()
        except BaseException:
            self.close()
            raise
        return self

    def _require_lookupd(self, what: str) -> None:
        if not self.lookupd.running:
            raise RuntimeError(f"cannot {what}: the cluster's nsqlookupd is not running (start() the cluster)")

    def _wait_registered(self, nsqd: NsqdProcess) -> None:
        wait_until(
            lambda: any(p.get("tcp_port") == nsqd.tcp_port for p in self.lookupd.nodes()),
            timeout=self.start_timeout,
            message=f"{nsqd!r} to register with nsqlookupd",
        )

    def add_nsqd(self, extra_args: Iterable[str] = ()) -> NsqdProcess:
        """Start one more nsqd registered with the lookupd and return it.

        Waits until the lookupd lists it in ``/nodes``. It joins :attr:`nsqds` only
        then: one that fails is closed (its temp data dir removed) and left out.

        Raises:
            TypeError: ``extra_args`` is a str (not a list of them) or holds a non-str.
            RuntimeError: the cluster's lookupd is not running.
            BrokerNotFoundError, BrokerStartError: nsqd could not start.
            TimeoutError: it did not register within ``start_timeout``.
        """
        extra = _string_list("extra_args", extra_args)
        self._require_lookupd("add an nsqd")
        nsqd = NsqdProcess(
            lookupd_tcp_addresses=self.lookupd_tcp_addresses,
            extra_args=self.nsqd_args + extra,
            start_timeout=self.start_timeout,
        )
        try:
            nsqd.start()
            self._wait_registered(nsqd)
        except BaseException:
            nsqd.close()
            raise
        self.nsqds.append(nsqd)
        return nsqd

    def wait_for_producers(
        self, topic: Optional[str] = None, count: Optional[int] = None, timeout: float = 10.0
    ) -> List[Dict[str, Any]]:
        """Poll the lookupd until exactly ``count`` producers are registered.

        With ``topic``, counts the producers of that topic (``/lookup``),
        otherwise all nodes (``/nodes``). ``count`` defaults to the number of
        the cluster's nsqds started and not stopped or killed since: one that
        crashed still counts, so the wait fails rather than pass without it.
        Returns the producer dicts.

        Raises:
            RuntimeError: the cluster's lookupd is not running.
            TimeoutError: the count was not reached within ``timeout`` seconds.
        """
        self._require_lookupd("wait for producers")
        wanted = count if count is not None else sum(1 for n in self.nsqds if n._wanted)
        seen: List[Dict[str, Any]] = []

        def check() -> bool:
            nonlocal seen
            seen = self.lookupd.lookup(topic) if topic is not None else self.lookupd.nodes()
            return len(seen) == wanted

        try:
            wait_until(check, timeout=timeout, message="producers")
        except TimeoutError:
            what = f"topic {topic!r}" if topic is not None else "/nodes"
            crashed = [n for n in self.nsqds if n._wanted and not n.running]
            raise TimeoutError(
                f"expected {wanted} producers for {what} within {timeout:g}s, lookupd has "
                f"{len(seen)}: {[(p.get('broadcast_address'), p.get('tcp_port')) for p in seen]}"
                + "".join(f"; nsqd pid {n.pid} exited with status {n.returncode}" for n in crashed)
            ) from None
        return seen

    def stop(self) -> None:
        """Stop every nsqd, then the lookupd (idempotent)."""
        for nsqd in self.nsqds:
            nsqd.stop()
        self.lookupd.stop()

    def close(self) -> None:
        """:meth:`stop`, and remove the nsqds' temp data dirs."""
        for nsqd in self.nsqds:
            nsqd.close()
        self.lookupd.close()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# TLS test certificates


class TLSFiles(NamedTuple):
    """Paths (str) of the PEM files made by :func:`make_tls_files`."""

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _openssl(openssl: str, *args: str, cwd: str) -> None:
    proc = subprocess.run(
        [openssl, *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if proc.returncode != 0:
        raise TLSFilesError(
            f"`openssl {' '.join(args)}` failed with status {proc.returncode}:\n"
            + proc.stderr.decode("utf-8", "replace")
        )


def _san_for(hostname: str) -> str:
    import ipaddress

    entries = ["IP:127.0.0.1", "DNS:localhost"]
    try:
        ipaddress.ip_address(hostname)
        extra = f"IP:{hostname}"
    except ValueError:
        extra = f"DNS:{hostname}"
    if extra not in entries:
        entries.insert(0, extra)
    return ",".join(entries)


def make_tls_files(directory: _StrPath, hostname: str = LOCALHOST) -> TLSFiles:
    """Create a throw-away CA, a server and a client certificate in ``directory``.

    The server certificate (CN ``hostname``) has subjectAltName
    ``IP:127.0.0.1, DNS:localhost`` (+ ``hostname``) and extendedKeyUsage
    serverAuth; the client certificate (CN ``nsq_sync-test-client``) has
    clientAuth. Both are signed by the CA (RSA 2048, SHA-256). Uses the
    ``openssl`` command-line tool.

    Raises:
        TLSFilesError: ``openssl`` is not on PATH or one of its commands failed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TLSFilesError(
            "the `openssl` command-line tool is needed to make test certificates but was not "
            "found on PATH; install it (e.g. `apt-get install openssl`)"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cwd = str(out)
    files = TLSFiles(
        ca_cert=str(out / "ca.pem"),
        server_cert=str(out / "server.pem"),
        server_key=str(out / "server.key"),
        client_cert=str(out / "client.pem"),
        client_key=str(out / "client.key"),
    )
    ca_key = str(out / "ca.key")
    _openssl(
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
        "-keyout", ca_key, "-out", files.ca_cert, "-subj", "/CN=nsq_sync test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=cwd,
    )  # fmt: skip
    leaves = [
        ("server", files.server_cert, files.server_key, hostname, "serverAuth", _san_for(hostname)),
        ("client", files.client_cert, files.client_key, "nsq_sync-test-client", "clientAuth", None),
    ]
    for name, cert, key, common_name, usage, san in leaves:
        csr = str(out / f"{name}.csr")
        ext_file = out / f"{name}.ext"
        ext_lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        if san:
            ext_lines.append(f"subjectAltName={san}")
        ext_file.write_text("\n".join(ext_lines) + "\n")
        _openssl(
            openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256",
            "-keyout", key, "-out", csr, "-subj", f"/CN={common_name}",
            cwd=cwd,
        )  # fmt: skip
        _openssl(
            openssl, "x509", "-req", "-in", csr, "-CA", files.ca_cert, "-CAkey", ca_key,
            "-set_serial", str(random.getrandbits(63) | 1), "-days", "825", "-sha256",
            "-extfile", str(ext_file), "-out", cert,
            cwd=cwd,
        )  # fmt: skip
        os.unlink(csr)
        ext_file.unlink()
    return files


# --------------------------------------------------------------------------
# nsqd auth server


class AuthServer:
    """A tiny nsqd auth server (``--auth-http-address``) on 127.0.0.1.

    nsqd v1.3.0 calls ``GET /auth?remote_ip=..&tls=true|false&secret=..&common_name=..``
    and expects HTTP 200 with JSON::

        {"ttl": 3600, "identity": "...", "identity_url": "...",
         "authorizations": [{"topic": ".*", "channels": [".*"],
                             "permissions": ["subscribe", "publish"]}]}

    ``ttl`` must be > 0 and permissions only ``subscribe``/``publish``, or
    nsqd rejects the answer. Topic and channel patterns are Go regexps that
    are NOT anchored (``"foo"`` also matches ``"xfoox"``) and a *publish* is
    checked against the channel patterns with channel ``""``, so a rule that
    grants publish needs a channel pattern matching the empty string (``.*``).

    Unknown secrets get HTTP 403 (nsqd then answers the client ``E_AUTH_FAILED``);
    a 200 with no authorizations makes nsqd answer ``E_UNAUTHORIZED``.

    ``secrets`` pre-registers secrets with full access (see :meth:`set_secret`);
    a lone str (not a list of them) is a TypeError.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._responses: Dict[str, Tuple[int, Any]] = {}
        #: every secret nsqd asked about, in order (including unknown ones)
        self.requests: List[str] = []
        #: the full query parameters of every request, in order
        self.request_params: List[Dict[str, str]] = []
        self._server: Optional["http.server.ThreadingHTTPServer"] = None
        self._thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None
        for secret in _string_list("secrets", secrets):
            self.set_secret(secret)

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, the value for nsqd's ``--auth-http-address``.

        Raises:
            RuntimeError: the server is not started.
        """
        if self.port is None:
            raise RuntimeError("AuthServer is not started")
        return f"{LOCALHOST}:{self.port}"

    def set_secret(
        self,
        secret: str,
        ttl: int = 3600,
        topic: str = ".*",
        permissions: Sequence[str] = ("subscribe", "publish"),
        channels: Sequence[str] = (".*",),
        identity: str = "nsq_sync-test-user",
        identity_url: str = "https://example.invalid/nsq_sync-test-user",
    ) -> None:
        """Allow ``secret`` with a single authorization rule (replaces earlier settings)."""
        self.set_authorizations(
            secret,
            [{"topic": topic, "channels": list(channels), "permissions": list(permissions)}],
            ttl=ttl,
            identity=identity,
            identity_url=identity_url,
        )

    def set_authorizations(
        self,
        secret: str,
        authorizations: Sequence[Mapping[str, Any]],
        ttl: int = 3600,
        identity: str = "nsq_sync-test-user",
        identity_url: str = "https://example.invalid/nsq_sync-test-user",
    ) -> None:
        """Answer ``secret`` with these authorization rules (dicts with
        ``topic``, ``channels``, ``permissions``); an empty list is allowed."""
        body = {
            "ttl": ttl,
            "identity": identity,
            "identity_url": identity_url,
            "authorizations": [dict(a) for a in authorizations],
        }
        self.set_response(secret, body)

    def set_response(self, secret: str, body: Any, status: int = 200) -> None:
        """Answer ``secret`` with an arbitrary status and body (JSON-encoded
        unless ``bytes``), e.g. to test how nsqd treats malformed answers."""
        with self._lock:
            self._responses[secret] = (status, body)

    def revoke(self, secret: str) -> None:
        """Forget ``secret``: later requests for it get 403 (no-op if unknown)."""
        with self._lock:
            self._responses.pop(secret, None)

    def _answer(self, params: Dict[str, str]) -> Tuple[int, bytes]:
        secret = params.get("secret", "")
        with self._lock:
            self.requests.append(secret)
            self.request_params.append(params)
            response = self._responses.get(secret)
        if response is None:
            # Deliberately not JSON: for a 403 nsqd tries to decode
            # {"https_port": N} and retry over HTTPS; a non-JSON body makes it
            # fail straight away (the client gets E_AUTH_FAILED either way).
            return 403, b"forbidden: unknown secret"
        status, body = response
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return status, data

    def start(self) -> "AuthServer":
        """Start serving in a background thread; no-op if already started.

        The first start binds a kernel-assigned port; a start after
        :meth:`stop` binds the same port again (nsqd keeps the address).

        Raises:
            OSError: the port cannot be bound.
        """
        if self._server is not None:
            return self
        import http.server

        self._server = http.server.ThreadingHTTPServer(
            (LOCALHOST, self.port or 0), _make_auth_handler(self)
        )
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"nsq_sync-auth-{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        logger.info("AuthServer listening on %s", self.address)
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); nsqd's auth queries then fail to connect.

        ``address`` keeps the old port and :meth:`start` reuses it.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "AuthServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _make_auth_handler(owner: AuthServer) -> type:
    import http.server
    import urllib.parse

    class AuthHandler(http.server.BaseHTTPRequestHandler):
        server_version = "nsq_sync-auth/1"
        # HTTP/1.0: one request per connection, so a stopped server cannot keep
        # answering nsqd on a kept-alive connection
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/auth":
                status, data = 404, b"not found"
            else:
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                status, data = owner._answer({k: v[0] for k, v in query.items()})
            self.send_response(status)
            content_type = "application/json" if data[:1] in (b"{", b"[") else "text/plain"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("auth server: " + format, *args)

    return AuthHandler

"""Greenlets: the only module of nsq_sync that imports gevent."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, Optional, Tuple

import gevent
import gevent.event
import gevent.local
import gevent.lock
import gevent.queue
import gevent.select
import gevent.socket
from gevent.exceptions import InvalidSwitchError
from gevent.hub import Waiter
from gevent.monkey import get_original

_native_ident = get_original("_thread", "get_ident")
#: the OS poll, which monkey-patching removes from select (a poll with timeout 0 needs no
#: hub), or None where there is none
try:
    native_poll: Any = get_original("select", "poll")
except AttributeError:  # pragma: no cover - Windows
    native_poll = None
_native_write = get_original("os", "write")


def _write_or_error(fd: int, data: bytes) -> Any:
    try:
        return _native_write(fd, data)
    except OSError as exc:  # (returned: the threadpool would report it as an error of its own)
        return exc


def write_off_hub(fd: int, data: bytes) -> int:
    """os.write(*fd*, *data*) in gevent's threadpool: a write that blocks (a pipe nobody
    reads) blocks one native thread, while the hub and every other greenlet run on."""
    result = gevent.get_hub().threadpool.apply(_write_or_error, (fd, data))
    if isinstance(result, OSError):
        raise result
    return int(result)


_READY = object()  # what a watcher or a release switches a waiting greenlet with
_EXPIRED = object()  # what the timer switches it with


def _switched(waiter: Waiter, loop: Any, seconds: Optional[float]) -> bool:
    """Wait in *waiter* until something switches to it; True for _READY, False when
    *seconds* (None: no limit) passed first, timed by a bare loop timer closed on the way out."""
    timer = None
    if seconds is not None:
        timer = loop.timer(seconds)
        timer.start(waiter.switch, _EXPIRED, update=True)
    try:
        result = waiter.get()
    finally:
        if timer is not None:
            timer.close()
    if result is _READY:
        return True
    if result is _EXPIRED:
        return False
    raise InvalidSwitchError(f"invalid switch into a waiting greenlet: {result!r}")


class _Signal:
    """A lock created held, released once, acquired by one waiter: the wait for an answer
    read by another greenlet (see ``GeventBackend.signal``).

    A gevent Semaphore would do, but its timed acquire builds a gevent.Timeout, about 2 us
    of Python per wait; this waits in a Waiter with a bare loop timer instead.
    """

    __slots__ = ("_hub", "_released", "_waiter")

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._released = False
        self._waiter: Optional[Waiter] = None

    def release(self) -> None:
        if self._released:
            raise RuntimeError("signal released twice")
        self._released = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            loop = self._hub.loop
            if _native_ident() == self._hub.thread_ident:
                loop.run_callback(waiter.switch, _READY)
            else:  # released from another OS thread (its own hub): wake ours
                loop.run_callback_threadsafe(waiter.switch, _READY)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._released:
            return True
        if not blocking:
            return False
        waiter = self._waiter = Waiter(self._hub)
        try:
            return _switched(waiter, self._hub.loop, None if timeout is None or timeout < 0 else timeout)
        finally:
            self._waiter = None


class _Wake(_Signal):
    """A lock created held that one greenlet acquires again and again, each time waiting for
    one release: the sleep of an idle pool worker (see ``GeventBackend.wake``).

    The same as a held gevent Semaphore, without the gevent.Timeout its timed acquire builds:
    a sleep and its wake-up cost 1.9 us instead of 4.4 (the default Reader, max_in_flight 1,
    puts a worker to sleep after every message). A release is kept until the next acquire
    takes it, also when it came after the timer ended the wait but before the waiter ran.
    """

    __slots__ = ()  # (_Signal's state: the hub, a release not taken yet, the waiter)

    def release(self) -> None:
        hub = self._hub
        if _native_ident() != hub.thread_ident:
            hub.loop.run_callback_threadsafe(self._release_here)  # (its state is the hub thread's)
            return
        self._release_here()

    def _release_here(self) -> None:
        if self._released:
            raise RuntimeError("wake handle released twice")
        self._released = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._hub.loop.run_callback(waiter.switch, _READY)

    def acquire(self, blocking: bool = True, timeout: Optional[float] = -1) -> bool:
        if not self._released:
            if not blocking:
                return False
            waiter = self._waiter = Waiter(self._hub)
            try:
                _switched(waiter, self._hub.loop, None if timeout is None or timeout < 0 else timeout)
            finally:
                self._waiter = None
            if not self._released:
                return False
        self._released = False
        return True


class _GreenletTask:
    __slots__ = ("_greenlet",)

    def __init__(self, greenlet: "gevent.Greenlet") -> None:
        self._greenlet = greenlet

    def join(self, timeout: Optional[float] = None) -> None:
        self._greenlet.join(timeout)

    def is_alive(self) -> bool:
        return not self._greenlet.dead


class GeventBackend:
    """Runs tasks as greenlets; gevent's event, lock, queue and socket."""

    name = "gevent"
    Empty = gevent.queue.Empty
    #: exceptions that reach a greenlet only where it waits (thrown in by the hub: a
    #: gevent.Timeout's expiry, Greenlet.kill), never between two statements as a signal's
    #: KeyboardInterrupt can: one that stops a wait for data leaves nothing half read
    thrown_at_waits: Tuple[type, ...] = (gevent.Timeout, gevent.GreenletExit)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "") -> _GreenletTask:
        greenlet = gevent.spawn(fn, *args)
        if name:
            greenlet.name = name
        return _GreenletTask(greenlet)

    def event(self) -> gevent.event.Event:
        return gevent.event.Event()

    def lock(self) -> Any:
        return gevent.lock.Semaphore()

    def rlock(self) -> Any:
        return gevent.lock.RLock()

    def signal(self) -> _Signal:
        """A lock created held, for one waiter and one release: an answer's wait."""
        return _Signal(gevent.get_hub())

    def wake(self) -> _Wake:
        """A lock created held, acquired again and again by one waiter, each time after one
        release: an idle worker's sleep."""
        return _Wake(gevent.get_hub())

    def queue(self) -> Any:
        return gevent.queue.SimpleQueue()

    def sleep(self, seconds: float) -> None:
        gevent.sleep(seconds)

    def local(self) -> Any:
        return gevent.local.local()

    def current(self) -> object:
        return gevent.getcurrent()

    def create_connection(self, address: Tuple[str, int], timeout: Optional[float]) -> socket.socket:
        # A numeric address needs no resolver. gevent's default resolver runs getaddrinfo on
        # its thread pool, and many connections opened at once (Readers and Writers starting
        # together) were seen to stall there for 10 s and more; an IP literal skips it.
        host, port = address
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            return gevent.socket.create_connection(address, timeout=timeout)
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_readable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        readable, _, _ = gevent.select.select([sock], [], [], timeout)
        return bool(readable)

    def wait_writable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        _, writable, _ = gevent.select.select([], [sock], [], timeout)
        return bool(writable)

    def readable_waiter(self, sock: socket.socket) -> Callable[[Optional[float]], bool]:
        """``wait(timeout) -> bool`` for one socket, reusing one io watcher (a hot path:
        select() builds and tears down watchers on every call)."""
        hub = gevent.get_hub()
        loop = hub.loop
        watcher = loop.io(sock.fileno(), 1)

        def wait(timeout: Optional[float]) -> bool:
            # gevent.socket.wait would do, but its timeout is a gevent.Timeout (about 2 us
            # of Python per wait, and the reader task waits before every read).
            if timeout is not None and timeout <= 0:
                return bool(gevent.select.select([sock], [], [], 0)[0])
            waiter = Waiter(hub)
            watcher.start(waiter.switch, _READY)
            try:
                return _switched(waiter, loop, timeout)
            finally:
                watcher.stop()

        return wait

    def __repr__(self) -> str:
        return "<GeventBackend>"

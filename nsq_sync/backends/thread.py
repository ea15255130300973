"""OS threads: the default backend."""

from __future__ import annotations

import queue
import select
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional, Tuple

#: what nsq_sync's threads block: every signal but those a fault raises in the thread that
#: caused it (a SIGSEGV blocked there kills the process without faulthandler's traceback)
_ASYNC_SIGNALS = (
    frozenset(signal.valid_signals())
    - {getattr(signal, name) for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGTRAP", "SIGSYS") if hasattr(signal, name)}
    if hasattr(signal, "pthread_sigmask")
    else frozenset()
)


_HAS_POLL = hasattr(select, "poll")
_READ = (select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR) if _HAS_POLL else 0
_WRITE = (select.POLLOUT | select.POLLHUP | select.POLLERR) if _HAS_POLL else 0


def _poll(sock: socket.socket, writing: bool, timeout: Optional[float]) -> bool:
    if not _HAS_POLL:  # pragma: no cover - Windows
        if writing:
            return bool(select.select([], [sock], [], timeout)[1])
        return bool(select.select([sock], [], [], timeout)[0])
    poller = select.poll()
    poller.register(sock, _WRITE if writing else _READ)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0))


class ThreadBackend:
    """Runs tasks as daemon threads; primitives from :mod:`threading` and :mod:`queue`."""

    name = "thread"
    Empty = queue.Empty
    #: (see GeventBackend: a thread is never interrupted only where it waits)
    thrown_at_waits: Tuple[type, ...] = ()

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "") -> threading.Thread:
        thread = threading.Thread(target=fn, args=args, name=name or None, daemon=True)
        if _ASYNC_SIGNALS:
            # Started with the process's asynchronous signals blocked (a thread inherits its
            # creator's mask), so the OS hands SIGTERM & co. to the application's threads.
            # Python runs its handlers in the main thread anyway; a C-level handler does not:
            # uWSGI's, run in one of our threads, finalized Python there, and the worker hung
            # until uWSGI killed it 60 s later (SIGTERM sent to the whole process group).
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
            try:
                thread.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        else:  # pragma: no cover - Windows
            thread.start()
        return thread

    def event(self) -> threading.Event:
        return threading.Event()

    def lock(self) -> Any:
        return threading.Lock()

    def rlock(self) -> Any:
        return threading.RLock()

    def signal(self) -> Any:
        """A lock created held, for one waiter and one release: an answer's wait."""
        lock = threading.Lock()
        lock.acquire()
        return lock

    def wake(self) -> Any:
        """A lock created held, acquired again and again by one waiter, each time after one
        release: an idle worker's sleep."""
        lock = threading.Lock()
        lock.acquire()
        return lock

    def queue(self) -> "queue.SimpleQueue[Any]":
        return queue.SimpleQueue()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def local(self) -> threading.local:
        return threading.local()

    def current(self) -> object:
        return threading.current_thread()

    def create_connection(self, address: Tuple[str, int], timeout: Optional[float]) -> socket.socket:
        return socket.create_connection(address, timeout=timeout)

    # poll, not select: select refuses file descriptors above FD_SETSIZE (1024), which a
    # busy process reaches. Readable includes hang-up and error, so the recv that follows
    # reports them.
    def wait_readable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        return _poll(sock, False, timeout)

    def wait_writable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        return _poll(sock, True, timeout)

    def readable_waiter(self, sock: socket.socket) -> Callable[[Optional[float]], bool]:
        """``wait(timeout) -> bool`` for one socket, reusing one poll object (a hot path)."""
        if not _HAS_POLL:  # pragma: no cover - Windows
            return lambda timeout: _poll(sock, False, timeout)
        poller = select.poll()
        poller.register(sock, _READ)
        poll = poller.poll

        def wait(timeout: Optional[float]) -> bool:
            return bool(poll(None if timeout is None else max(0.0, timeout) * 1000.0))

        return wait

    def __repr__(self) -> str:
        return "<ThreadBackend>"

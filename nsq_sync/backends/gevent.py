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
        watcher = hub.loop.io(sock.fileno(), 1)
        expired = socket.timeout("timed out")

        def wait(timeout: Optional[float]) -> bool:
            if timeout is not None and timeout <= 0:
                return bool(gevent.select.select([sock], [], [], 0)[0])
            try:
                gevent.socket.wait(watcher, timeout, expired, hub)
            except socket.timeout:
                return False
            return True

        return wait

    def __repr__(self) -> str:
        return "<GeventBackend>"

"""The small interface nsq_sync needs from a concurrency model.

A backend gives: spawn a task, events, locks, an unbounded FIFO queue, sleep,
TCP connect and a readiness wait. :mod:`.thread` implements it with OS threads,
:mod:`.gevent` with greenlets; nothing else in nsq_sync imports gevent.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Protocol, Tuple


class Task(Protocol):
    def join(self, timeout: Optional[float] = None) -> None: ...

    def is_alive(self) -> bool: ...


class Backend(Protocol):
    name: str
    #: exception raised by ``queue().get(timeout=...)`` when nothing arrived
    Empty: type

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "") -> Task: ...

    def event(self) -> Any: ...

    def lock(self) -> Any: ...

    def rlock(self) -> Any: ...

    def queue(self) -> Any: ...

    def sleep(self, seconds: float) -> None: ...

    def local(self) -> Any: ...

    def current(self) -> object: ...

    def create_connection(self, address: Tuple[str, int], timeout: Optional[float]) -> socket.socket: ...

    def wait_readable(self, sock: socket.socket, timeout: Optional[float]) -> bool: ...

    def wait_writable(self, sock: socket.socket, timeout: Optional[float]) -> bool: ...

    # Optional, looked up with getattr (a backend object of your own may leave them out):
    #   readable_waiter(sock) -> wait(timeout) -> bool: wait_readable for one socket, set up once
    #   signal() -> a lock created held: release() once, acquire([blocking, timeout]) by one waiter
    #   wake() -> a lock created held, acquired again and again by one waiter, each time after
    #     one release() (a pool worker's sleep)

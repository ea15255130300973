"""OS threads: the default backend."""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from typing import Any, Callable, Optional, Tuple


class ThreadBackend:
    """Runs tasks as daemon threads; primitives from :mod:`threading` and :mod:`queue`."""

    name = "thread"
    Empty = queue.Empty

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "") -> threading.Thread:
        thread = threading.Thread(target=fn, args=args, name=name or None, daemon=True)
        thread.start()
        return thread

    def event(self) -> threading.Event:
        return threading.Event()

    def lock(self) -> Any:
        return threading.Lock()

    def rlock(self) -> Any:
        return threading.RLock()

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

    def wait_readable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        readable, _, _ = select.select([sock], [], [], timeout)
        return bool(readable)

    def wait_writable(self, sock: socket.socket, timeout: Optional[float]) -> bool:
        _, writable, _ = select.select([], [sock], [], timeout)
        return bool(writable)

    def __repr__(self) -> str:
        return "<ThreadBackend>"

"""Helpers shared by the AsyncConn suites (test_conn_real, test_tls_real, test_caller_reads)."""

from __future__ import annotations

import functools
import threading
from typing import Any, Dict, List, Tuple

import nsq_sync


def host_port(address: str) -> Tuple[str, int]:
    """"host:port" -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


class Events:
    """Records every firing of the named events of one connection, in order, thread-safely."""

    def __init__(self, conn: nsq_sync.AsyncConn, *names: str) -> None:
        self._cond = threading.Condition()
        self.log: List[Tuple[str, Dict[str, Any]]] = []
        for name in names:
            conn.on(name, functools.partial(self._record, name))

    def _record(self, name: str, **kwargs: Any) -> None:
        with self._cond:
            self.log.append((name, kwargs))
            self._cond.notify_all()

    def names(self) -> List[str]:
        with self._cond:
            return [name for name, _ in self.log]

    def of(self, name: str) -> List[Dict[str, Any]]:
        with self._cond:
            return [kwargs for n, kwargs in self.log if n == name]

    def count(self, name: str) -> int:
        return len(self.of(name))

    def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until *name* fired *count* times; AssertionError after *timeout*."""
        with self._cond:
            if not self._cond.wait_for(lambda: sum(1 for n, _ in self.log if n == name) >= count, timeout):
                raise AssertionError(f"no {count} x {name!r} within {timeout}s: {[n for n, _ in self.log]}")

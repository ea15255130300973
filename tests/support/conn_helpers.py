"""Helpers shared by the AsyncConn integration suites (test_conn_real, test_tls_real)."""

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
        self._lock = threading.Lock()
        self.log: List[Tuple[str, Dict[str, Any]]] = []
        for name in names:
            conn.on(name, functools.partial(self._record, name))

    def _record(self, name: str, **kwargs: Any) -> None:
        with self._lock:
            self.log.append((name, kwargs))

    def names(self) -> List[str]:
        with self._lock:
            return [name for name, _ in self.log]

    def of(self, name: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [kwargs for n, kwargs in self.log if n == name]

    def count(self, name: str) -> int:
        return len(self.of(name))

"""Helpers shared by the fault and security suites."""

from __future__ import annotations

import gc
import threading
from typing import List, Tuple


def split(address: str) -> Tuple[str, int]:
    """"host:port" -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def live_tasks() -> List[str]:
    """nsq_sync threads, and greenlets under gevent, still running."""
    names = [t.name for t in threading.enumerate() if "nsq_sync" in t.name and t.is_alive()]
    try:
        import gevent
    except ImportError:  # pragma: no cover
        return names
    for obj in gc.get_objects():
        if isinstance(obj, gevent.Greenlet) and not obj.dead and "nsq_sync" in str(getattr(obj, "name", "")):
            names.append(str(obj.name))
    return names

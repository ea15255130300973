"""Concurrency backends: ``"thread"`` (default) or ``"gevent"``.

:func:`get_backend` resolves a name, a backend object, or None. None picks
gevent when the socket module has been monkey-patched by gevent, else threads.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401  (see below)
import sys
from typing import Any, Dict, Union

from ..errors import ConfigError
from .base import Backend
from .thread import ThreadBackend

__all__ = ["Backend", "ThreadBackend", "get_backend", "gevent_patched"]

# Loaded here, by the importing thread, rather than by the first getaddrinfo() in a
# background connect task (CPython encodes a host name with the idna codec, importing it on
# first use). A process that forks while a thread of it is importing a module leaves that
# module's import lock held in the child for good, and the child's first connect then hangs:
# gunicorn --preload forks its workers right after importing the app, while a module-level
# Writer of the master is connecting (seen: a worker hung in about 1 start of 10). With this,
# connecting imports nothing (tests/integration/test_fork_safety.py).
_cache: Dict[str, Any] = {}


def gevent_patched() -> bool:
    """True when gevent has monkey-patched the socket module in this process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched("socket"))
    except Exception:  # pragma: no cover - very old gevent
        return False


def get_backend(backend: Union[str, Backend, None] = None) -> Backend:
    """Return the backend named by *backend* ("thread", "gevent"), the object itself, or the auto choice for None.

    Raises ConfigError for an unknown name or when "gevent" is asked for and gevent is not installed.
    """
    if backend is None:
        backend = "gevent" if gevent_patched() else "thread"
    if not isinstance(backend, str):
        if not hasattr(backend, "spawn"):
            raise ConfigError("backend", backend, "must be 'thread', 'gevent', None or a backend object")
        return backend
    cached = _cache.get(backend)
    if cached is not None:
        return cached
    if backend == "thread":
        instance: Any = ThreadBackend()
    elif backend == "gevent":
        try:
            from .gevent import GeventBackend
        except ImportError as exc:
            raise ConfigError("backend", backend, "gevent is not installed; pip install 'nsq_sync[gevent]'") from exc
        if not gevent_patched():
            # Blocking waits (Future.result, Event.wait) would block the whole hub and deadlock.
            raise ConfigError(
                "backend", backend,
                "needs gevent's monkey-patching: call gevent.monkey.patch_all() first (or run under python -m gevent.monkey)",
            )
        instance = GeventBackend()
    else:
        raise ConfigError("backend", backend, "must be 'thread', 'gevent', None or a backend object")
    _cache[backend] = instance
    return instance


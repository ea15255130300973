"""Concurrency backends: ``"thread"`` (default) or ``"gevent"``.

:func:`get_backend` resolves a name, a backend object, or None. None picks
gevent when gevent has monkey-patched the process (socket and threading), threads when it
has patched nothing, and raises ConfigError for a process it patched only in part.
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
    return _patched("socket")


def _patched(module: str) -> bool:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched(module))
    except Exception:  # pragma: no cover - very old gevent
        return False


def _check_threading_patched(backend: Any) -> None:
    """gevent patched the socket module but not threading (``patch_all(thread=False)``,
    ``patch_socket()`` alone): neither backend works there. Greenlets would block the hub in
    every wait on a threading primitive (a publish Future's result(), nsq_sync.run()), and
    threads would use gevent sockets bound to another thread's hub."""
    if not _patched("threading"):
        raise ConfigError(
            "backend", backend,
            "gevent has monkey-patched socket but not threading in this process, and nsq_sync works with "
            "neither: patch both (gevent.monkey.patch_all() with its default thread=True, before "
            "creating Readers and Writers), or none",
        )


def get_backend(backend: Union[str, Backend, None] = None) -> Backend:
    """Return the backend named by *backend* ("thread", "gevent"), the object itself, or the auto choice for None.

    Raises ConfigError for an unknown name or when "gevent" is asked for and gevent is not installed.
    """
    if backend is None:
        if gevent_patched():
            _check_threading_patched(None)
            backend = "gevent"
        else:
            backend = "thread"
    if not isinstance(backend, str):
        if not hasattr(backend, "spawn"):
            raise ConfigError("backend", backend, "must be 'thread', 'gevent', None or a backend object")
        return backend
    if backend == "thread" and gevent_patched():
        # (threads there are greenlets on gevent sockets: with threading unpatched, nsq_sync's
        # waits blocked the hub, pub() timed out on publishes nsqd stored, a Reader never subscribed)
        _check_threading_patched(backend)
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
        _check_threading_patched(backend)
        instance = GeventBackend()
    else:
        raise ConfigError("backend", backend, "must be 'thread', 'gevent', None or a backend object")
    _cache[backend] = instance
    return instance


"""``nsq_sync.run()``: block until SIGINT/SIGTERM, then close every Reader and Writer gracefully.

Readers and Writers register themselves here when created, so ``run()`` finds them the way
pynsq's ``nsq.run()`` does: weakly, except that a Reader is held until it is closed. Also what they share about
processes: the at-fork hook that makes a child drop what belongs to its parent, and uWSGI.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["register", "unregister", "clients", "run", "stop"]

logger = logging.getLogger(__name__)

_clients: "weakref.WeakSet[Any]" = weakref.WeakSet()
#: Readers not closed yet, held strongly: pynsq code makes Readers without keeping them
#: (``Reader(...)`` in a set-up function, then ``nsq.run()``), and Tornado's IOLoop held them
#: until they ran. A Writer is held by its own connection tasks from the start.
_held: "set[Any]" = set()
_stop = threading.Event()
_signalled = False


def forget_parents_in_child(live: "weakref.WeakSet[Any]", first: Optional[Callable[[], None]] = None) -> None:
    """Register an at-fork hook: in a forked child, call *first*, then ``_forget_parent()`` on
    every object in *live* (it drops what belongs to the parent, without touching the parent's
    connections). Python runs no such hook where a C program forks (uWSGI): the objects check
    the process id on use as well."""

    def hook() -> None:
        if first is not None:
            first()
        for client in list(live):
            try:
                client._forget_parent()
            except Exception:  # pragma: no cover - never let a fork hook raise
                logger.exception("resetting %r after fork failed", client)

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=hook)


def uwsgi_state() -> Tuple[bool, bool]:
    """(running inside uWSGI, this is uWSGI's master process with workers still to fork).

    uWSGI forks its workers in C, after importing the application in the master unless
    --lazy-apps is set: Python's at-fork hooks do not run, and a thread running in the master
    can hold the GIL at the instant of the fork, which hangs the worker for good.
    """
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return False, False
    try:
        return True, bool(uwsgi.worker_id() == 0 and uwsgi.masterpid() == os.getpid())
    except Exception:  # not the real thing (or too old to tell)
        return True, False


def _on_signal(signum: int, frame: Any) -> None:
    global _signalled
    _signalled = True


def register(client: Any) -> None:
    """Remember *client* (anything with ``close()``) for :func:`run` to close."""
    _clients.add(client)


def unregister(client: Any) -> None:
    _clients.discard(client)


def hold(client: Any) -> None:
    """Keep *client* alive without a reference of the application's, until :func:`release`."""
    _held.add(client)


def release(client: Any) -> None:
    _held.discard(client)


def clients() -> List[Any]:
    """The live registered clients, Readers first (so consumers drain before producers close)."""
    items = list(_clients)
    items.sort(key=lambda c: 0 if _is_reader(c) else 1)
    return items


def _is_reader(client: Any) -> bool:
    # A Reader is what has process_message (subclasses included, as pynsq's users write them).
    return hasattr(client, "process_message")


def _is_closed(client: Any) -> bool:
    closed = getattr(client, "closed", None)  # Reader: a property (it also notices a fork)
    if isinstance(closed, bool):
        return closed
    return bool(getattr(client, "_closed", False))  # Writer


def _close_at_exit() -> None:
    """At interpreter exit, close every client still open, as close() would, Readers first.

    Background tasks die with the interpreter: a Writer's publishes made with pub_async() or a
    callback and still queued were lost, and a Reader's messages in flight (handled ones
    included, their FINs never sent) stayed there until nsqd's timeout and came again. Each
    close() waits at most its own timeout (publish_timeout, close_timeout); the Readers close
    together, then the Writers (_close_together).
    """
    readers, writers = _split([client for client in clients() if not _is_closed(client)])
    _close_together(readers, None)
    _close_together(writers, None)


def _split(items: List[Any]) -> Tuple[List[Any], List[Any]]:
    """(the Readers, the rest) of clients()' list."""
    return [client for client in items if _is_reader(client)], [client for client in items if not _is_reader(client)]


def _close_one(client: Any, timeout: Optional[float]) -> None:
    try:
        client.close(timeout) if timeout is not None else client.close()
    except Exception:  # (never let run() or an exit hook raise)
        logger.exception("closing %r failed", client)


def _close_together(items: List[Any], timeout: Optional[float]) -> None:
    """close() every client of *items* at the same time, each in a thread (a greenlet once
    gevent patched the process) of its own, the last in this one; return once all are done.

    One after another, a shutdown took the sum of the closes: a Reader draining its
    handlers held up the next one's, which went on taking messages meanwhile, so 30
    Readers with slow handlers could need up to 30 x close_timeout and outlast a
    container's grace period. Together it takes about as long as the slowest. Where no
    thread can start (CPython 3.12.0-3.12.1 at interpreter exit) they close in turn."""
    from .backends import get_backend

    tasks = []
    for client in items[:-1]:
        try:
            # (the library's own spawn: on threads, started with the asynchronous signals
            # blocked, as every task of ours, so a SIGTERM is never handled in one of them)
            task = get_backend(None).spawn(_close_one, client, timeout, name=f"nsq_sync-close-{getattr(client, 'name', 'client')}")
        except Exception:  # (no new thread at interpreter exit, or a half-patched process)
            _close_one(client, timeout)
            continue
        tasks.append(task)
    if items:
        _close_one(items[-1], timeout)
    for task in tasks:
        task.join()  # (each close() is bounded by its own timeout)


atexit.register(_close_at_exit)


def stop() -> None:
    """Make a running :func:`run` return as if it got SIGTERM.

    Called while no run() is under way, it makes the next run() return at once, after
    starting and closing the clients (as Tornado's ``IOLoop.stop()`` before ``start()``):
    a stop asked for while another thread is still on its way into run() is not lost.
    """
    _stop.set()


def run(timeout: Optional[float] = None) -> None:
    """Start every registered Reader, block until SIGINT or SIGTERM (or :func:`stop`), then close every Reader and Writer.

    Signal handlers are installed only when called from the main thread; the previous
    handlers are restored before returning. *timeout* bounds each close(). The Readers close
    together, then the Writers together, so the shutdown takes about as long as the slowest
    Reader's drain plus the slowest Writer's, however many there are.
    """
    global _signalled
    _signalled = False
    for client in clients():
        start = getattr(client, "start", None)
        if start is None or getattr(client, "closed", False) is True:
            continue
        try:
            start()  # Readers connect on start(), as pynsq's did when its IOLoop ran
        except Exception:
            logger.exception("starting %r failed", client)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Only a flag: taking a lock in a signal handler can deadlock the main thread.
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        while not _signalled and not _stop.wait(0.2):
            pass
        logger.info("stopping: closing %d clients", len(_clients))
    finally:
        _stop.clear()  # this run took the stop (a stop() asked before it started included)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    readers, writers = _split(clients())
    _close_together(readers, timeout)  # (first: their handlers may still publish while they drain)
    _close_together(writers, timeout)

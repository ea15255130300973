"""The thread backend's tasks leave process-directed signals to the application's threads."""

from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from nsq_sync.backends.thread import ThreadBackend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/task/<tid>/status (Linux)")


def _blocked(native_id: int) -> set:
    with open(f"/proc/{os.getpid()}/task/{native_id}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


def test_spawned_tasks_block_asynchronous_signals_but_not_faults() -> None:
    # uWSGI's C-level SIGTERM handler, run in one of nsq_sync's threads, finalized Python
    # there and the worker hung until uWSGI killed it 60 s later. Blocked in our threads, the
    # signal goes to the application's own (Python runs its handlers in the main thread anyway).
    seen = {}
    done = threading.Event()

    def task() -> None:
        seen["blocked"] = _blocked(threading.get_native_id())
        done.set()

    ThreadBackend().spawn(task, name="nsq_sync-test-signals").join(5)
    assert done.is_set()
    blocked = seen["blocked"]
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGALRM"):
        assert getattr(signal, name) in blocked, name
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"):
        assert getattr(signal, name) not in blocked, name  # (faulthandler's tracebacks still work there)
    # The caller's own mask is as it was.
    assert signal.SIGTERM not in _blocked(threading.get_native_id())

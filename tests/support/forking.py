"""Running a piece of a test in a forked child, for the fork tests of tests/integration.

The child never returns into pytest: it runs the given function, sends back its report as
JSON over a socket pair (cooperative under gevent's monkey-patching, so the child's hub keeps
running while it waits) and exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any, Callable, Dict, Tuple

import pytest


def wait_child(pid: int, timeout: float) -> int:
    """The exit code of child *pid*; killed, and the test failed, if it has not exited within *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child {pid} did not exit within {timeout}s")
        time.sleep(0.01)  # polling the child's exit, not synchronising


def fork_child(child: Callable[[socket.socket], Dict[str, Any]]) -> Tuple[int, socket.socket]:
    """Fork; the child runs ``child(its end of a socket pair)`` and reports (an exception is
    reported as ``{"error": repr}``). Returns (pid, the parent's end); see :func:`child_report`."""
    parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            parent_end.close()
            try:
                report = child(child_end)
            except BaseException as exc:
                report = {"error": repr(exc)}
            child_end.sendall(json.dumps(report).encode())
            child_end.close()
        finally:
            os._exit(0)
    child_end.close()
    return pid, parent_end


def child_report(pid: int, parent_end: socket.socket, timeout: float = 30) -> Dict[str, Any]:
    """Read the report of a child from :func:`fork_child` and reap it (it must exit 0)."""
    chunks = []
    parent_end.settimeout(timeout)
    try:
        while True:
            chunk = parent_end.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        parent_end.close()
    assert wait_child(pid, timeout) == 0
    return json.loads(b"".join(chunks))


def in_child(work: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Run ``work()`` in a forked child and return its report."""
    return child_report(*fork_child(lambda _end: work()))

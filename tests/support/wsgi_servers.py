"""A real WSGI server (uWSGI, gunicorn) in a subprocess of its own, for tests/integration.

The server runs in a new session, so stop() can kill its whole process group: workers
included, which a master killed alone (or hung) would leave behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from nsq_sync.testing import wait_until

REPO = Path(__file__).resolve().parents[2]


def server_binary(name: str) -> str:
    """The console script *name* next to this interpreter (or on PATH); a test failure when missing."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is a dependency of the integration tests: pip install -e '.[dev]'")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``argv`` (where ``{port}`` becomes a free port) run in *cwd*, with nsqd's address in the
    environment (NSQD_TCP_ADDRESS and NSQD_TCP_ADDRESSES) and no NSQ_SYNC_* variables."""

    def __init__(self, argv: List[str], cwd: Path, nsqd_address: str, log: Path, **env_extra: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NSQ_SYNC_")}
        env.update(NSQD_TCP_ADDRESS=nsqd_address, NSQD_TCP_ADDRESSES=nsqd_address, PYTHONPATH=str(REPO))
        env.update(env_extra)
        self.log = log
        self.name = Path(argv[0]).name
        self.proc = subprocess.Popen(
            [arg.replace("{port}", str(self.port)) for arg in argv],
            cwd=str(cwd), env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self._listening, timeout=20, message=f"{self.name} listening (log: {log})")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
            return True
        except OSError:
            return False

    def get(self, path: str, data: Optional[bytes] = None) -> Dict[str, Any]:
        """GET *path* (POST *data*) and the JSON answer; no proxy from the environment."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        try:
            with opener.open(request, timeout=15) as response:
                return json.loads(response.read())
        except OSError as exc:
            answer = exc.read().decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else ""
            pytest.fail(f"{'POST' if data is not None else 'GET'} {path}: {exc!r} {answer}; {self.name} log:\n{self.log_text()[-3000:]}")

    def stop(self, wait: float = 15) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to the whole process group."""
        self.proc.terminate()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)

"""Connecting imports nothing in a background task, against a real nsqd v1.3.0.

A process that forks while one of its threads is importing a module leaves that module's
import lock held in the child, whose first import of it then hangs for good. gunicorn
``--preload`` forks right after importing the app, while a module-level Writer of the master
may be connecting in its node task: a worker hung on its first publish in about 1 start of
10 (the first getaddrinfo() imported the idna codec there). nsq_sync now loads what connecting
needs when it is imported, so the connect tasks of a Writer and a Reader import nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsq_sync.testing import NsqdProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# A fresh interpreter: what this pytest process imported already would hide the imports.
SCRIPT = r"""
import json, sys, threading
import nsq_sync

address, compression = sys.argv[1], json.loads(sys.argv[2])
imports = []

def audit(event, args):
    if event == "import" and threading.current_thread() is not threading.main_thread():
        imports.append([threading.current_thread().name, args[0]])

sys.addaudithook(audit)
writer = nsq_sync.Writer([address], backend="thread", **compression)
assert writer.pub("imports", b"x", timeout=10) == b"OK"
got = threading.Event()
reader = nsq_sync.Reader("imports", "c", message_handler=lambda message: got.set(), nsqd_tcp_addresses=[address],
                         backend="thread", **compression)
reader.start()
assert got.wait(10), "no message"
reader.close(5)
writer.close()
print(json.dumps(imports))
"""


@pytest.mark.parametrize("compression", [{}, {"snappy": True}, {"deflate": True}], ids=["plain", "snappy", "deflate"])
def test_connecting_imports_nothing_in_background_tasks(nsqd: NsqdProcess, compression: dict) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQ_SYNC_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", SCRIPT, nsqd.tcp_address, json.dumps(compression)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []

"""A script that ends without close() loses nothing, against a real nsqd v1.3.0.

Background tasks die with the interpreter. Before, a script that published 1,000 messages with
pub_async() and ended got 2 of them into nsqd (20,000: 19,615); and a script that ended while
its Reader consumed left max_in_flight messages in flight until nsqd's timeout, handled ones
included (their FINs never left), to come again. Writers and Readers still open now close at
interpreter exit (atexit), as close() would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nsq_sync
from nsq_sync.testing import NsqdProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
if sys.argv[2] == "gevent":
    from gevent import monkey
    monkey.patch_all()
import nsq_sync

writer = nsq_sync.Writer([sys.argv[1]], backend=sys.argv[2])
assert writer.wait_connected(10)
for i in range(2000):
    writer.pub_async("atexit", b"m%d" % i)
writer.pub("atexit", b"with a callback", callback=lambda conn, data: None)
# the script ends here, without writer.close()
"""


def test_script_ending_without_close_loses_no_async_publish(nsqd: NsqdProcess, backend: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQ_SYNC_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", SCRIPT, nsqd.tcp_address, backend], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert nsqd.topic_depth("atexit") == 2001


READER_SCRIPT = r"""
import atexit, sys, threading, time
handled = []
# Registered before nsq_sync is imported, so it runs after nsq_sync's own exit hooks (LIFO):
# it reports what the handler had done by the time the Reader was closed.
atexit.register(lambda: print("handled", len(handled), flush=True))
if sys.argv[2] == "gevent":
    from gevent import monkey
    monkey.patch_all()
import nsq_sync

enough = threading.Event()

def handle(message):
    time.sleep(0.002)  # (a handler that takes a moment, so some are running at exit)
    handled.append(message.body)
    if len(handled) >= 100:
        enough.set()
    return True

reader = nsq_sync.Reader("readerexit", "c", message_handler=handle, nsqd_tcp_addresses=[sys.argv[1]],
                         max_in_flight=50, backend=sys.argv[2])
reader.start()
assert enough.wait(20), "fewer than 100 messages handled"
# the script ends here, without reader.close(), while messages are in flight
"""


def test_script_ending_while_its_reader_consumes_leaves_nothing_in_flight(nsqd: NsqdProcess, backend: str) -> None:
    writer = nsq_sync.Writer([nsqd.tcp_address], backend=backend)
    try:
        assert writer.mpub("readerexit", [b"m%d" % i for i in range(500)]) == b"OK"
    finally:
        writer.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQ_SYNC_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", READER_SCRIPT, nsqd.tcp_address, backend], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    handled = int(done.stdout.split("handled")[-1])
    channel = nsqd.stats(topic="readerexit")["topics"][0]["channels"][0]
    # every handled message was FINed, every other one handed back: none waits for nsqd's timeout
    assert channel["in_flight_count"] == 0, channel
    assert channel["depth"] == 500 - handled, (handled, channel)

"""A script that ends without Writer.close() loses nothing it published, against a real nsqd v1.3.0.

pub_async() and callback publishes are queued for background tasks, which die with the
interpreter. Before, a script that published 1,000 messages with pub_async() and ended got 2
of them into nsqd (20,000: 19,615). The Writer now closes at interpreter exit (atexit), sending
and waiting for what is still pending, within publish_timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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

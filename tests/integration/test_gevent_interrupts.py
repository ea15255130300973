"""A gevent.Timeout, or a kill, that stops one greenlet's publish, against a real nsqd.

Each case runs in a fresh, monkey-patched interpreter (it is run by the thread suite too).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsq_sync.testing import NsqdProcess

import gevent  # noqa: F401  (a dependency of the suite: never skipped)

ROOT = str(Path(__file__).resolve().parents[2])
TIMEOUT = 30.0

ONE_IMPATIENT_REQUEST = r"""
import sys
sys.path.insert(0, sys.argv[1])
from gevent import monkey
monkey.patch_all()
import os, signal, gevent, nsq_sync

address, pid, how = sys.argv[2], int(sys.argv[3]), sys.argv[4]
writer = nsq_sync.Writer(address, retries=0)
writer.pub("impatience", b"before")
conn = writer.conns[address]

def impatient():
    if how == "kill":
        return writer.pub("impatience", b"impatient")
    try:
        with gevent.Timeout(0.05):
            writer.pub("impatience", b"impatient")
    except gevent.Timeout:
        return "timed out"

def patient(n):
    return writer.pub("impatience", b"patient %d" % n)

os.kill(pid, signal.SIGSTOP)  # (nsqd answers nothing: the first greenlet waits, reading for everyone)
try:
    first = gevent.spawn(impatient)
    others = [gevent.spawn(patient, n) for n in range(5)]  # (queued behind it: it reads their answers)
    if how == "kill":
        while conn.pending_requests < 6:  # (all six sent or queued, the first one reading)
            gevent.sleep(0.001)
        first.kill()  # (a web server's request timeout)
    first.join()
finally:
    os.kill(pid, signal.SIGCONT)
gevent.joinall(others, raise_error=True)
print(first.value if how == "timeout" else type(first.value).__name__, [g.value.decode() for g in others], writer.conns.get(address) is conn)
writer.close()
"""


@pytest.mark.parametrize("how", ["timeout", "kill"])
def test_stopping_one_greenlets_publish_leaves_the_others_and_the_connection(how: str, nsqd: NsqdProcess) -> None:
    # The greenlet reading for everyone is stopped where it waits for nsqd's answer: nothing
    # was read, so the others' publishes go on (the next reader reads their answers) on the
    # same connection. It used to close the connection: every publish pipelined on it failed
    # with ConnectionClosedError, 10 of 10 in a user review.
    try:
        done = subprocess.run([sys.executable, "-c", ONE_IMPATIENT_REQUEST, ROOT, nsqd.tcp_address, str(nsqd.pid), how],
                              capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung; its stderr: {(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    first = "timed out" if how == "timeout" else "GreenletExit"
    assert done.stdout.decode().split("\n")[0] == f"{first} ['OK', 'OK', 'OK', 'OK', 'OK'] True"
    assert b"closed" not in done.stderr, done.stderr.decode(errors="replace")
    # the stopped one was sent before it was stopped: nsqd stored it too
    assert nsqd.topic_depth("impatience") == 7


GREENLET_RESULTS = r"""
import sys
sys.path.insert(0, sys.argv[1])
from gevent import monkey
monkey.patch_all()
import gevent, gevent.event, nsq_sync
from nsq_sync.testing import wait_until

seen = {}

def work(body, first):
    if body == b"raises" and first:
        raise ValueError("the work failed (expected)")
    if body == b"killed" and first:
        gevent.sleep(60)

def handler(message):
    first = message.attempts == 1
    seen.setdefault(message.body.decode(), []).append(message.attempts)
    if message.body == b"async":
        result = gevent.event.AsyncResult()
        gevent.spawn(result.set, not first)  # False the first time: requeue
        return result
    greenlet = gevent.spawn(work, message.body, first)
    if message.body == b"killed" and first:
        gevent.spawn(greenlet.kill)  # (before it ends)
    return greenlet

reader = nsq_sync.Reader("greenlets", "ch", handler, nsqd_tcp_addresses=[sys.argv[2]], max_in_flight=4,
                         requeue_delay=0, max_backoff_duration=0)
reader.start()
wait_until(lambda: reader.stats()["messages_finished"] == 4, 20, message="every message finished")
reader.close()
print(sorted(seen.items()), reader.stats()["messages_requeued"])
"""


def test_a_greenlet_or_asyncresult_a_handler_returns_answers_when_ready(nsqd: NsqdProcess) -> None:
    # gnsq-style code spawns the work and returns its Greenlet. The message was finished at
    # once, as for any other value: work that then failed lost its message. Now the answer
    # waits for it: FIN, or REQ when it raised, was killed or gave False (an AsyncResult too).
    for body in (b"ok", b"raises", b"killed", b"async"):
        nsqd.publish("greenlets", body)
    nsqd.create_channel("greenlets", "ch")
    try:
        done = subprocess.run([sys.executable, "-c", GREENLET_RESULTS, ROOT, nsqd.tcp_address], capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung; its stderr: {(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().split("\n")[0] == "[('async', [1, 2]), ('killed', [1, 2]), ('ok', [1]), ('raises', [1, 2])] 3"

"""gevent's monkey-patching done late, or in part, against a real nsqd.

Each case runs in a fresh interpreter (patching cannot be undone in this one). A hang is
the old failure of most of them: every script runs under a timeout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nsq_sync.testing import NsqdProcess

import gevent  # noqa: E402,F401  (a dependency of the suite: never skipped)

ROOT = str(Path(__file__).resolve().parents[2])
TIMEOUT = 30.0
PRELUDE = f"import sys; sys.path.insert(0, {ROOT!r})\n"


def run_script(script: str, *args: str) -> str:
    """Run *script* in a new interpreter; its stdout. A script that hangs fails the test."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", PRELUDE + script, *args], capture_output=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung (killed after {TIMEOUT}s); its stderr: {(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


PARTIAL = r"""
from gevent import monkey
monkey.patch_all(thread=False)  # socket patched, threading not
import nsq_sync
from nsq_sync.errors import ConfigError
for backend in (None, "gevent", "thread"):
    try:
        nsq_sync.Writer("127.0.0.1:4150", backend=backend)
    except ConfigError as exc:
        print(backend, exc.param, "thread=True" in str(exc))
    else:
        print(backend, "accepted")
"""


def test_a_process_patched_in_part_is_refused_with_a_config_error() -> None:
    # Auto-detection used to choose greenlets there, which then blocked the hub in every
    # wait on a threading primitive: pub_async(...).result() hung, nsq_sync.run() consumed nothing.
    # And "thread", asked for by name: accepted, a Writer's pub() timed out on publishes nsqd had
    # stored, and a Reader never subscribed, without a word.
    assert run_script(PARTIAL).split("\n")[:3] == ["None backend True", "gevent backend True", "thread backend True"]


READER_BEFORE_PATCH = r"""
import nsq_sync
received = []
reader = nsq_sync.Reader("late", "ch", lambda m: received.append(m.body) or True,
                         nsqd_tcp_addresses=sys.argv[1], max_in_flight=5)
from gevent import monkey
monkey.patch_all()  # as a gunicorn -k gevent worker does, after the app was imported
import gevent
reader.start()
deadline = 200
while len(received) < 3 and deadline:
    gevent.sleep(0.05)
    deadline -= 1
reader.close()
print(sorted(received), reader._backend.name, reader.stats()["messages_finished"])
"""


def test_a_reader_made_before_patching_and_started_after_uses_greenlets(nsqd: NsqdProcess) -> None:
    # Its thread locks, taken by greenlets, blocked the hub: the process hung at start().
    for body in (b"a", b"b", b"c"):
        nsqd.publish("late", body)
    assert run_script(READER_BEFORE_PATCH, nsqd.tcp_address).strip() == "[b'a', b'b', b'c'] gevent 3"


WRITER_BEFORE_PATCH = r"""
import nsq_sync
from nsq_sync.errors import ConfigError
writer = nsq_sync.Writer(sys.argv[1])
from gevent import monkey
monkey.patch_all()
try:
    writer.pub_async("late", b"x").result(3)
except ConfigError as exc:
    print("ConfigError", exc.param, "created before gevent" in str(exc))
writer.close()
"""


def test_pub_async_on_a_writer_made_before_patching_is_a_config_error(nsqd: NsqdProcess) -> None:
    # Its Future, completed by one of the Writer's OS threads, never woke the waiting greenlet:
    # result(3) hung past its own timeout.
    assert run_script(WRITER_BEFORE_PATCH, nsqd.tcp_address).strip() == "ConfigError backend True"
    assert nsqd.topic_depth("late") == 0  # refused before anything was sent


WRITER_BEFORE_PATCH_BLOCKING = r"""
import logging
import nsq_sync
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("nsq_sync.writer").addHandler(handler)
writer = nsq_sync.Writer(sys.argv[1])
writer.pub("late", b"before")  # a Writer that works before patching says nothing
from gevent import monkey
monkey.patch_all()
import gevent
answers = [greenlet.get() for greenlet in [gevent.spawn(writer.pub, "late", b"after %d" % i) for i in range(3)]]
writer.mpub("late", [b"m1", b"m2"])
writer.close()
warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
print(answers, len(warnings))
print(warnings[0] if warnings else "no warning")
"""


def test_blocking_publishes_on_a_writer_made_before_patching_land_and_warn_once(nsqd: NsqdProcess) -> None:
    # A greenlet's blocking publish may read the Writer's OS-level socket itself and hold up
    # every greenlet until nsqd answers: it used to do so silently.
    answers, warning = run_script(WRITER_BEFORE_PATCH_BLOCKING, nsqd.tcp_address).strip().split("\n")
    assert answers == "[b'OK', b'OK', b'OK'] 1"
    assert f"the Writer to {nsqd.tcp_address} was created before gevent monkey-patched this process" in warning
    assert "stop every other greenlet until nsqd answers" in warning
    assert "python -m gevent.monkey" in warning
    assert nsqd.topic_depth("late") == 6  # nothing lost


FORKED_THEN_PATCHED = r"""
import os
import nsq_sync
writer = nsq_sync.Writer(sys.argv[1])
writer.pub("forked", b"parent")  # the parent's connections and threads are up
pid = os.fork()
if pid == 0:  # the child: patched after the fork, as a gunicorn -k gevent --preload worker
    from gevent import monkey
    monkey.patch_all()
    try:
        answer = writer.pub_async("forked", b"child").result(10)
        print("child", answer, writer.backend.name, flush=True)
        writer.close()
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
writer.close()
print("parent", status)
"""


def test_pub_async_first_in_a_child_patched_after_the_fork_uses_greenlets(nsqd: NsqdProcess) -> None:
    # The refusal above came before the fork was noticed: in a gunicorn -k gevent --preload
    # worker whose first publish was pub_async(), the Writer made in the master raised
    # ConfigError where pub() would have chosen greenlets.
    out = run_script(FORKED_THEN_PATCHED, nsqd.tcp_address)
    assert out.split("\n")[:2] == ["child b'OK' gevent", "parent 0"], out
    assert nsqd.topic_depth("forked") == 2


GEVENT_POOL_FUTURE = r"""
from gevent import monkey
monkey.patch_all()
import gevent, gevent.threadpool
import nsq_sync
from nsq_sync.backoff import ExponentialBackoff
pool = gevent.threadpool.ThreadPoolExecutor(2)
attempts = []

def work(body, attempt):
    if attempt == 1:
        raise RuntimeError("the work failed")
    return True

def handler(message):
    attempts.append(message.attempts)
    return pool.submit(work, message.body, message.attempts)

reader = nsq_sync.Reader("pooled", "ch", handler, nsqd_tcp_addresses=sys.argv[1], max_in_flight=1,
                         requeue_delay=0, backoff_strategy=ExponentialBackoff(multiplier=0.01))
reader.start()
deadline = 400
while reader.stats()["messages_finished"] < 1 and deadline:
    gevent.sleep(0.05)
    deadline -= 1
stats = reader.stats()
reader.close()
print(attempts, stats["messages_finished"], stats["messages_requeued"])
"""


def test_a_future_of_gevents_thread_pool_answers_when_its_work_ends(nsqd: NsqdProcess) -> None:
    # It was finished at once: the work that then failed lost its message.
    nsqd.publish("pooled", b"job")
    assert run_script(GEVENT_POOL_FUTURE, nsqd.tcp_address).strip() == "[1, 2] 1 1"

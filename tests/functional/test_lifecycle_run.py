"""nsq_sync.run() against fake nsqd: it starts registered Readers (also one nobody keeps a
reference to, as pynsq's IOLoop kept them), and on stop() closes Readers (draining their
handlers) before Writers.

No sleeps: every wait is on what a fake received or on an Event set by the handler.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd, FakeNsqdTimeout
from tasks import live_tasks

import nsq_sync
from nsq_sync import lifecycle
from nsq_sync.errors import ClosedError
from nsq_sync.reader import Reader
from nsq_sync.writer import Writer

WAIT = 10.0


class PynsqStyleReader(Reader):
    """A subclass, as pynsq's users write them: still a Reader to run() (closed first)."""


@pytest.mark.parametrize("reader_class", [Reader, PynsqStyleReader], ids=["Reader", "subclass"])
def test_run_starts_readers_and_drains_them_before_closing_writers(backend: str, reader_class: type) -> None:
    _close_earlier_clients()
    consumed, produced = FakeNsqd().start(), FakeNsqd().start()
    handling, release = threading.Event(), threading.Event()
    answers: List[Any] = []

    def handler(message: Any) -> bool:
        # A consume-then-produce pipeline: publishes only once run() is already closing Readers.
        handling.set()
        assert release.wait(WAIT)
        try:
            answers.append(writer.pub("out", b"copy of " + message.body))
        except Exception as exc:  # ClosedError if the Writer were closed first
            answers.append(exc)
        return True

    runner = None
    try:
        reader = reader_class("topic", "channel", handler, nsqd_tcp_addresses=[f"127.0.0.1:{consumed.port}"], backend=backend)
        writer = Writer(f"127.0.0.1:{produced.port}", backend=backend)
        assert writer.wait_connected(WAIT)
        assert consumed.sessions == []  # registered, not started
        runner = threading.Thread(target=nsq_sync.run, kwargs={"timeout": WAIT}, name="test-run")
        runner.start()

        # run() started the Reader: it subscribed and receives messages.
        consumed.wait_for_command("RDY 1", timeout=WAIT)
        assert consumed.commands[:2] == [b"IDENTIFY", b"SUB topic channel"]
        msg = consumed.enqueue(b"m1")
        assert handling.wait(WAIT)

        lifecycle.stop()
        consumed.wait_for_command("CLS", timeout=WAIT)  # run() is closing the Reader...
        assert runner.is_alive() and not release.is_set()
        release.set()  # ...and the handler it waits for can still publish: Writers are not closed yet
        runner.join(WAIT)
        assert not runner.is_alive(), "run() did not return after stop()"

        assert answers == [b"OK"]
        assert produced.published == [("out", b"copy of m1", None)]
        assert consumed.finished == [msg.id]
        assert reader.closed and reader.join(0)
        consumed.wait_disconnected(timeout=WAIT)
        produced.wait_disconnected(timeout=WAIT)
        with pytest.raises(ClosedError):
            writer.pub("out", b"after run()")
        assert live_tasks() == []
    finally:  # on failure, leave no run() or client behind
        release.set()
        _stop_runner(runner)
        for client in lifecycle.clients():
            client.close(1)
        consumed.stop()
        produced.stop()


def test_run_closes_its_readers_together(backend: str) -> None:
    # A many-consumer review: run() closed one Reader after another, so one draining its
    # handlers held up the next one's close (which went on taking messages meanwhile), and
    # 10 Readers of 2 s handlers took 15 s to stop. Each handler here drains only once the
    # other Reader was told to stop (its CLS): closed in turn, the first one's handler waits
    # in vain for the CLS of a Reader not closed yet.
    _close_earlier_clients()
    fakes = [FakeNsqd().start(), FakeNsqd().start()]
    handling = [threading.Event(), threading.Event()]
    saw_other_stop: List[Any] = [None, None]

    def draining(me: int) -> Any:
        def handler(message: Any) -> bool:
            handling[me].set()
            try:
                fakes[1 - me].wait_for_command("CLS", timeout=WAIT / 2)
                saw_other_stop[me] = True
            except FakeNsqdTimeout:
                saw_other_stop[me] = False
            return True

        return handler

    runner = None
    try:
        readers = [
            Reader(f"topic{me}", "channel", draining(me), nsqd_tcp_addresses=[f"127.0.0.1:{fakes[me].port}"], backend=backend)
            for me in (0, 1)
        ]
        runner = threading.Thread(target=nsq_sync.run, kwargs={"timeout": WAIT}, name="test-run-together")
        runner.start()
        messages = []
        for me in (0, 1):
            fakes[me].wait_for_command("RDY 1", timeout=WAIT)
            messages.append(fakes[me].enqueue(b"slow"))
            assert handling[me].wait(WAIT)
        lifecycle.stop()
        runner.join(2 * WAIT)
        assert not runner.is_alive(), "run() did not return after stop()"
        assert saw_other_stop == [True, True]
        assert [fake.finished for fake in fakes] == [[messages[0].id], [messages[1].id]]
        assert all(reader.closed for reader in readers) and live_tasks() == []
    finally:
        _stop_runner(runner)
        for client in lifecycle.clients():
            client.close(1)
        for fake in fakes:
            fake.stop()


def _close_earlier_clients() -> None:
    """run() acts on every registered client that is alive (a Reader is held until closed):
    close what earlier tests left."""
    gc.collect()
    for client in lifecycle.clients():
        client.close(1)


def test_a_reader_nobody_keeps_is_started_by_run_and_let_go_once_closed(backend: str) -> None:
    # pynsq code makes its Readers in a set-up function and keeps no reference: Tornado's IOLoop
    # held them. A weakly registered Reader was collected at once, and run() consumed nothing.
    _close_earlier_clients()
    fake = FakeNsqd().start()
    handled = threading.Event()
    runner = None

    def setup() -> None:
        Reader("topic", "channel", lambda message: handled.set() or True, nsqd_tcp_addresses=[f"127.0.0.1:{fake.port}"], backend=backend)

    try:
        setup()
        gc.collect()
        readers = [client for client in lifecycle.clients() if isinstance(client, Reader)]
        assert len(readers) == 1, "the Reader nobody keeps is gone before run()"
        gone = weakref.ref(readers[0])
        del readers
        runner = threading.Thread(target=nsq_sync.run, kwargs={"timeout": WAIT}, name="test-run-unkept")
        runner.start()
        fake.wait_for_command("RDY 1", timeout=WAIT)
        msg = fake.enqueue(b"m1")
        assert handled.wait(WAIT)
        fake.wait_for_command(b"FIN " + msg.id, timeout=WAIT)
        lifecycle.stop()
        runner.join(WAIT)
        assert not runner.is_alive(), "run() did not return after stop()"
        assert fake.finished == [msg.id]
        # Closed: nothing of the library's holds it any longer.
        gc.collect()
        assert gone() is None, "a closed Reader is still held"
    finally:
        _stop_runner(runner)
        fake.stop()


def _stop_runner(runner: Any) -> None:
    """Cleanup: stop a run() still going (a stop() with none going would end the next test's)."""
    if runner is not None and runner.is_alive():
        lifecycle.stop()
        runner.join(WAIT)


def test_stop_asked_before_run_starts_is_kept_for_it(backend: str) -> None:
    # An application whose shutdown (a signal handler of its own, a test's teardown) comes
    # while the thread meant to call run() has not got there yet: run() must still return.
    _close_earlier_clients()
    fake = FakeNsqd().start()
    runner = None
    try:
        reader = Reader("topic", "channel", lambda message: True, nsqd_tcp_addresses=[f"127.0.0.1:{fake.port}"], backend=backend)
        lifecycle.stop()
        runner = threading.Thread(target=nsq_sync.run, kwargs={"timeout": WAIT}, name="test-run-stopped")
        runner.start()
        runner.join(WAIT)
        assert not runner.is_alive(), "a stop() asked before run() was lost: run() blocks"
        assert reader.closed  # started, then closed as on a signal

        # That run() took the stop: the next one runs until a stop() of its own.
        before = len(fake.sessions)
        again = Reader("topic", "channel", lambda message: True, nsqd_tcp_addresses=[f"127.0.0.1:{fake.port}"], backend=backend)
        runner = threading.Thread(target=nsq_sync.run, kwargs={"timeout": WAIT}, name="test-run-again")
        runner.start()
        fake.wait_until(lambda: any(b"RDY 1" in session.commands for session in fake.sessions[before:]), WAIT, "the second run() to start its Reader")
        assert runner.is_alive() and not again.closed
        lifecycle.stop()
        runner.join(WAIT)
        assert not runner.is_alive() and again.closed
    finally:
        _stop_runner(runner)
        for client in lifecycle.clients():
            client.close(1)
        fake.stop()

"""nsq_sync.run() against fake nsqd: it starts registered Readers, and on stop() closes
Readers (draining their handlers) before Writers.

No sleeps: every wait is on what a fake received or on an Event set by the handler.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd
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
    gc.collect()  # forget clients of earlier tests: run() acts on every live registered one
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
        lifecycle.stop()
        for client in lifecycle.clients():
            client.close(1)
        consumed.stop()
        produced.stop()

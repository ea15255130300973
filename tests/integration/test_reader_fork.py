"""A Reader and os.fork(), against a real nsqd v1.3.0, on the backend under test.

A Reader started in a process belongs to it: a forked child gets copies of its sockets and (under
gevent) of its greenlets, but must neither take the parent's messages nor end the parent's
connections. Before, the child saw a Reader that was not closed, start() and
set_max_in_flight() went through, and close() sent CLS and shut the shared socket down (the
parent lost its connection and its messages in flight), blocking for the whole timeout on
threads. A Reader never started is simply the child's.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest

import nsq_sync
from nsq_sync.errors import ClosedError
from nsq_sync.testing import NsqdProcess, wait_until
from forking import child_report, fork_child  # tests/support

pytestmark = pytest.mark.integration


@pytest.fixture
def clients(nsqd: NsqdProcess, backend: str) -> Iterator[Dict[str, Any]]:
    got: List[bytes] = []
    lock = threading.Lock()

    def handle(message: nsq_sync.Message) -> bool:
        with lock:
            got.append(message.body)
        return True

    writer = nsq_sync.Writer([nsqd.tcp_address], backend=backend)
    made: List[nsq_sync.Reader] = []

    def reader(topic: str) -> nsq_sync.Reader:
        made.append(nsq_sync.Reader(topic, "c", message_handler=handle, nsqd_tcp_addresses=[nsqd.tcp_address],
                                    max_in_flight=50, backend=backend))
        return made[-1]

    yield {"writer": writer, "got": got, "reader": reader}
    for r in made:
        r.close(5)
    writer.close()


def test_forked_child_neither_takes_nor_ends_the_parents_connection(clients: Dict[str, Any]) -> None:
    writer, got = clients["writer"], clients["got"]
    reader = clients["reader"]("forked")
    reader.start()
    writer.pub("forked", b"before")
    wait_until(lambda: got == [b"before"], message="the first message")
    (conn,) = reader.conns.values()
    port = conn._raw_sock.getsockname()[1]

    def child(channel: socket.socket) -> Dict[str, Any]:
        # First leave the Reader alone, as most children do, while the parent publishes: this
        # child (and, under gevent, its hub with the copied greenlets) lives on meanwhile.
        before = len(got)
        channel.sendall(b"r")
        channel.recv(1)  # the parent has every message
        report: Dict[str, Any] = {"taken": len(got) - before, "closed": reader.closed}
        for name, call in (("start", reader.start), ("set_max_in_flight", lambda: reader.set_max_in_flight(5))):
            try:
                call()
                report[name] = "no error"
            except ClosedError as exc:
                report[name] = str(exc)
        started = time.monotonic()
        reader.close(5)
        report["close_seconds"] = time.monotonic() - started
        return report

    pid, channel = fork_child(child)
    assert channel.recv(1) == b"r"
    for i in range(20):
        writer.pub("forked", b"after-%d" % i)
    wait_until(lambda: len(got) == 21, message="the 20 messages published while the child lived")
    channel.sendall(b"d")
    report = child_report(pid, channel)

    assert report["closed"] is True, report
    for name in ("start", "set_max_in_flight"):
        assert "forked this one" in report[name] and "create the Reader in this process" in report[name], report
    assert report["close_seconds"] < 1.0, report  # nothing of the child's to drain
    assert report["taken"] == 0, report  # nothing in the child read the parent's socket
    assert sorted(got) == sorted([b"before"] + [b"after-%d" % i for i in range(20)])
    # the parent's connection lived on: no CLS, no shutdown from the child
    (after,) = reader.conns.values()
    assert after is conn and after.state == "CONNECTED" and after._raw_sock.getsockname()[1] == port
    assert reader.stats()["messages_finished"] == 21


def test_reader_never_started_is_the_childs(clients: Dict[str, Any], nsqd: NsqdProcess) -> None:
    writer, got = clients["writer"], clients["got"]
    reader = clients["reader"]("forkfresh")
    writer.pub("forkfresh", b"for the child")

    def child(channel: socket.socket) -> Dict[str, Any]:
        reader.start()
        wait_until(lambda: got == [b"for the child"], message="the child's message")
        reader.close(5)
        return {"got": [body.decode() for body in got], "finished": reader.stats()["messages_finished"]}

    pid, channel = fork_child(child)
    assert child_report(pid, channel) == {"got": ["for the child"], "finished": 1}
    assert got == []  # the parent never started it
    assert nsqd.stats(topic="forkfresh")["topics"][0]["channels"][0]["depth"] == 0

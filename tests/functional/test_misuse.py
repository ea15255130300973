"""Calls in the wrong order or state get a typed error and cost nothing: no command nsqd
would close the connection over goes out, and no message is left in flight."""

from __future__ import annotations

from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd

from nsq_sync import AsyncConn, ClosedError, ConfigError, ConfigTypeError
from nsq_sync.protocol import commands
from nsq_sync.reader import Reader

WAIT = 10.0


@pytest.fixture
def server() -> Any:
    fake = FakeNsqd().start()
    yield fake
    fake.stop()


def test_second_subscribe_is_refused_and_messages_in_flight_stay_answerable(server: FakeNsqd, backend: str) -> None:
    conn = AsyncConn(server.host, server.port, backend=backend)
    received: List[Any] = []
    conn.on("message", lambda conn, message: received.append(message))
    try:
        conn.connect()
        conn.subscribe("t", "c", timeout=WAIT)
        conn.send_rdy(1)
        server.send_message(b"in flight")
        server.wait_until(lambda: received, what="the message")
        with pytest.raises(ConfigError, match="already subscribed"):
            conn.subscribe("t", "c2", timeout=WAIT)
        received[0].finish()  # nsqd would have closed the connection over a second SUB
        server.wait_for_command("FIN", timeout=WAIT)
        assert [c for c in server.commands if c.startswith(b"SUB")] == [b"SUB t c"]
        assert conn.connected()
    finally:
        conn.close(2)


def test_rdy_before_subscribe_is_refused(server: FakeNsqd, backend: str) -> None:
    conn = AsyncConn(server.host, server.port, backend=backend)
    try:
        conn.connect()
        with pytest.raises(ConfigError, match="before subscribe"):
            conn.send_rdy(1)
        assert conn.rdy == 0
        assert conn.request_wait(commands.pub("t", b"still open"), WAIT) == b"OK"
        assert not any(c.startswith(b"RDY") for c in server.commands)
    finally:
        conn.close(2)


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_handler_raising_base_exception_hands_the_message_back_at_once(server: FakeNsqd, backend: str, exc: type) -> None:
    handled: List[bytes] = []

    def handler(message: Any) -> bool:
        handled.append(message.body)
        if message.body == b"first" and message.attempts == 1:
            raise exc("from the handler")
        return True

    server.enqueue(b"first")
    server.enqueue(b"second")
    reader = Reader("t", "c", handler, nsqd_tcp_addresses=f"{server.host}:{server.port}", backend=backend, max_in_flight=1)
    try:
        reader.start()
        req = server.wait_for_command("REQ", timeout=WAIT)
        assert req.line.endswith(b" 0")  # at once, not after nsqd's message timeout
        server.wait_until(lambda: handled.count(b"second") == 1, timeout=WAIT, what="the next message")
        assert reader.backoff_level == 0  # not the message's fault: no backoff
    finally:
        reader.close(2)


def test_set_max_in_flight_after_close(server: FakeNsqd, backend: str) -> None:
    reader = Reader("t", "c", lambda m: True, nsqd_tcp_addresses=f"{server.host}:{server.port}", backend=backend)
    reader.close(1)
    with pytest.raises(ClosedError):
        reader.set_max_in_flight(7)
    assert reader.max_in_flight == 1


@pytest.mark.parametrize("bad", ["no", "False", 0, 1, None, 0.0], ids=repr)
def test_requeue_with_a_backoff_that_is_not_a_bool_is_refused_and_the_message_stays_answerable(server: FakeNsqd, backend: str, bad: Any) -> None:
    # requeue(backoff="no") took bool("no"): a REQ with backoff went out (the Reader backed off)
    # and the message counted as answered, so the corrected call after it was refused.
    outcomes: List[Any] = []

    def handler(message: Any) -> None:
        try:
            message.requeue(delay=0, backoff=bad)
        except Exception as exc:
            outcomes.append(exc)
        outcomes.append(message.has_responded())
        outcomes.append(message.requeue(delay=0, backoff=False))  # the corrected call: still possible

    server.enqueue(b"once")
    reader = Reader("t", "c", handler, nsqd_tcp_addresses=f"{server.host}:{server.port}", backend=backend, max_in_flight=1)
    try:
        reader.start()
        req = server.wait_for_command("REQ", timeout=WAIT)
        server.wait_until(lambda: len(outcomes) == 3, timeout=WAIT, what="the handler's calls")
        error, responded, corrected = outcomes
        assert isinstance(error, ConfigTypeError) and isinstance(error, TypeError), repr(error)
        assert error.param == "backoff" and error.value == bad and "True or False" in str(error), str(error)
        assert responded is False and corrected is True
        assert req.line.endswith(b" 0")
        assert [c for c in server.commands if c.startswith((b"REQ", b"FIN"))] == [req.line]  # one answer, the corrected one
        assert reader.backoff_level == 0  # backoff=False was what went out
        assert reader.stats()["messages_requeued"] == 1
    finally:
        reader.close(2)

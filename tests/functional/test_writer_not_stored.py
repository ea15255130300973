"""E_PUB_FAILED, E_MPUB_FAILED, E_DPUB_FAILED: nsqd did not store the publish, against the fake nsqd.

nsqd v1.3.0 answers them when Topic.PutMessage(s) failed (the topic is exiting: being deleted,
or nsqd shutting down; or the backend write failed: a full disk), and closes the connection
(they are fatal). Another nsqd may store the message: with ``retries`` the Writer sends it there,
and passes over the nsqd that refused it for a while. E_BAD_TOPIC, E_BAD_MESSAGE and E_BAD_BODY
say the publish itself is wrong: never re-sent.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, List, Tuple

import pytest
from fake_nsqd import FakeNsqd, close, error

from nsq_sync.errors import BadMessageError, BadTopicError, DPubFailedError, MPubFailedError, PubFailedError
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0

NOT_STORED = {
    "PUB": ("E_PUB_FAILED PUB failed exiting", PubFailedError),
    "MPUB": ("E_MPUB_FAILED MPUB failed write /data/t.diskqueue.000002.dat: no space left on device", MPubFailedError),
    "DPUB": ("E_DPUB_FAILED DPUB failed exiting", DPubFailedError),
}


def publish(writer: Writer, command: str, body: bytes) -> Any:
    if command == "PUB":
        return writer.pub("t", body)
    if command == "MPUB":
        return writer.mpub("t", [body, body + b"+"])
    return writer.dpub("t", 5, body)


@contextlib.contextmanager
def two_nsqd(backend: str, command: str, text: str, **kwargs: Any) -> Iterator[Tuple[List[Any], FakeNsqd, Writer]]:
    """A Writer to two fakes: *bad* answers every *command* with the error *text* and closes
    the connection (as nsqd does), *good* stores it. Yields the commands *bad* refused (each
    listed before its answer goes out: the fake's own record comes after), *good*, the Writer."""
    bad = FakeNsqd().start()
    good = FakeNsqd().start()
    refused: List[Any] = []

    def refuse(session: Any, received: Any) -> Any:
        refused.append(received)
        return [error(text), close()]

    bad.set_answer(command, refuse)
    writer = Writer([f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"], backend=backend, **kwargs)
    try:
        assert writer.wait_connected(WAIT, count=2)
        yield refused, good, writer
    finally:
        writer.close(1)
        bad.stop()
        good.stop()


@pytest.mark.parametrize("command", ["PUB", "MPUB", "DPUB"])
def test_a_publish_nsqd_did_not_store_is_sent_to_another_nsqd(backend: str, command: str) -> None:
    # It raised PubFailedError & co. whatever `retries` said, with a healthy second nsqd.
    text, _ = NOT_STORED[command]
    with two_nsqd(backend, command, text, retries=1) as (refused, good, writer):
        sent = []
        for i in range(20):  # (round-robin: the bad nsqd gets one of the first publishes)
            body = b"m%d" % i
            assert publish(writer, command, body) == b"OK"
            sent.append(body)
            if refused:
                break
        assert refused, "the bad nsqd got no publish"
        stored = [entry[1] for entry in good.published]
        if command == "MPUB":
            assert stored == [b for body in sent for b in (body, body + b"+")]
        else:
            assert stored == sent  # each exactly once, the refused one included


def test_an_async_publish_nsqd_did_not_store_is_sent_to_another_nsqd(backend: str) -> None:
    text, _ = NOT_STORED["PUB"]
    with two_nsqd(backend, "PUB", text, retries=1) as (refused, good, writer):
        sent = []
        for i in range(20):
            body = b"a%d" % i
            assert writer.pub_async("t", body).result(WAIT) == b"OK"
            sent.append(body)
            if refused:
                break
        assert refused, "the bad nsqd got no publish"
        assert [entry[1] for entry in good.published] == sent


@pytest.mark.parametrize("command", ["PUB", "MPUB", "DPUB"])
def test_without_retries_the_error_is_raised_as_before(backend: str, command: str) -> None:
    text, exc_type = NOT_STORED[command]
    with two_nsqd(backend, command, text, retries=0) as (refused, good, writer):
        for i in range(20):
            try:
                publish(writer, command, b"m%d" % i)
            except exc_type:
                break
        else:
            pytest.fail("no publish went to the bad nsqd")
        assert len(refused) == 1


@pytest.mark.parametrize(
    "text, exc_type",
    [("E_BAD_TOPIC PUB topic name \"t\" is not valid", BadTopicError), ("E_BAD_MESSAGE PUB message too big 2 > 1", BadMessageError)],
)
def test_a_publish_nsqd_refused_as_wrong_is_not_retried(backend: str, text: str, exc_type: type) -> None:
    # The caller's fault: another nsqd would refuse it too, so retries are not spent on it.
    with two_nsqd(backend, "PUB", text, retries=3) as (refused, good, writer):
        for i in range(20):
            try:
                writer.pub("t", b"m%d" % i)
            except exc_type:
                break
        else:
            pytest.fail("no publish went to the bad nsqd")
        assert len(refused) == 1
        assert [entry[1] for entry in good.published] == [b"m%d" % j for j in range(i)]


def test_an_nsqd_that_did_not_store_a_publish_is_passed_over_for_a_while(backend: str) -> None:
    # It reconnects at once (nsqd is up), and round-robin sent every other publish back to it: a
    # full disk failed half of them (or spent a retry on each), and closed a connection per publish.
    text, _ = NOT_STORED["PUB"]
    with two_nsqd(backend, "PUB", text, retries=0) as (refused, good, writer):
        for i in range(20):
            try:
                writer.pub("t", b"m%d" % i)
            except PubFailedError:
                break
        else:
            pytest.fail("no publish went to the bad nsqd")
        assert writer.wait_connected(WAIT, count=2)  # (reconnected at once: nsqd answered)
        for j in range(20):
            assert writer.pub("t", b"after%d" % j) == b"OK"
        assert len(refused) == 1
        assert [entry[1] for entry in good.published][-20:] == [b"after%d" % j for j in range(20)]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def closes(self) -> List[logging.LogRecord]:
        return [r for r in self.records if "closed (E_PUB_FAILED" in r.getMessage()]


def test_reconnects_after_each_not_stored_publish_log_one_warning(backend: str) -> None:
    # One nsqd with a full disk: each publish fails and closes the connection, and each close
    # logged a WARNING (about 950 in 5 s against a real nsqd).
    handler = Records()
    logger = logging.getLogger("nsq_sync.writer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    conn_records = Records()  # the connection's own line for each error frame: DEBUG, the Writer says it
    conn_logger = logging.getLogger("nsq_sync.conn")
    conn_logger.addHandler(conn_records)
    fake = FakeNsqd().start()
    fake.set_answer("PUB", [error(NOT_STORED["PUB"][0]), close()])
    writer = Writer(f"127.0.0.1:{fake.port}", backend=backend)
    try:
        for i in range(5):
            assert writer.wait_connected(WAIT)
            fake.wait_connected(count=i + 1, timeout=WAIT)
            with pytest.raises(PubFailedError):
                writer.pub("t", b"m%d" % i)
            with handler.changed:
                assert handler.changed.wait_for(lambda: len(handler.closes()) > i, WAIT), [r.getMessage() for r in handler.records]
        closes = handler.closes()
        assert [r.levelno for r in closes] == [logging.WARNING] + [logging.DEBUG] * 4
        assert [r.getMessage() for r in conn_records.records if r.levelno >= logging.WARNING and "E_PUB_FAILED" in r.getMessage()] == []
    finally:
        writer.close(1)
        fake.stop()
        logger.removeHandler(handler)
        logger.setLevel(level)
        conn_logger.removeHandler(conn_records)

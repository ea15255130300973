"""What the Writer's log lines look like (the logger is nsq_sync.writer)."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
from fake_nsqd import FakeNsqd
from tcp_proxy import TcpProxy

from nsq_sync import writer as writer_module
from nsq_sync.errors import ConnectionClosedError, NoConnectionsError
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


class Lines(logging.Handler):
    """nsq_sync.writer's records, formatted as logging.basicConfig(format="%(name)s: %(message)s") would."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.lines: List[str] = []
        self.connected = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if "connected to" in record.getMessage():
            self.connected.set()


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("nsq_sync.writer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("name", [None, "orders-writer"])
def test_a_log_line_names_the_writer_only_when_it_was_given_a_name(backend: str, lines: Lines, name: Optional[str]) -> None:
    # By default it read "nsq_sync.writer: nsq_sync.Writer: connected to ...": the name said
    # again what the logger's name says.
    fake = FakeNsqd().start()
    writer = Writer(f"127.0.0.1:{fake.port}", name=name, backend=backend)
    try:
        assert lines.connected.wait(WAIT)
    finally:
        writer.close(1)
        fake.stop()
    prefix = "" if name is None else f"{name}: "
    assert f"nsq_sync.writer: {prefix}connected to 127.0.0.1:{fake.port}" in lines.lines


class Records(logging.Handler):
    """nsq_sync.writer's records as (level name, message), with a condition to wait on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[Tuple[str, str]] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append((record.levelname, record.getMessage()))
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[List[Tuple[str, str]]], bool], timeout: float = WAIT) -> List[Tuple[str, str]]:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.records), timeout), self.records[-20:]
            return list(self.records)

    def warnings(self) -> List[str]:
        with self.changed:
            return [text for level, text in self.records if level == "WARNING"]


@pytest.fixture
def records(monkeypatch: pytest.MonkeyPatch) -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("nsq_sync.writer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    monkeypatch.setattr(writer_module, "STILL_DOWN_WARN_SECONDS", STILL_DOWN, raising=False)  # (absent before it existed)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


#: STILL_DOWN_WARN_SECONDS in these tests (60 s in production)
STILL_DOWN = 0.5


def failed_attempts(records: List[Tuple[str, str]], address: str) -> int:
    return sum(1 for _, text in records if text.startswith((f"cannot connect to {address}", f"still cannot connect to {address}")))


@pytest.mark.parametrize("load", ["idle", "publishing"])
def test_an_unreachable_nsqd_is_warned_about_at_its_first_failure_then_at_most_every_interval_then_when_it_is_back(
    backend: str, records: Records, load: str
) -> None:
    """An nsqd that stays unreachable: one warning at the first failed attempt, then a "still
    cannot connect" warning at most every STILL_DOWN_WARN_SECONDS, with how long and how many
    attempts, the attempts in between at debug; one warning when it is back. The same whether
    publishes wait for a connection or not. Before, an idle Writer warned at every attempt (its
    backoff), and a publishing one at the first only, then nothing for the whole outage while it
    logged at debug a "retrying in" delay it did not keep (waiting publishes hurry the attempts)."""
    fake = FakeNsqd().start()
    proxy = TcpProxy(fake.address)
    proxy.reject_new = True  # (accepts, then resets: nsqd looks down)
    proxy.start()
    address = proxy.address
    writer = Writer(address, backend=backend, reconnect_interval=0.02, max_reconnect_interval=0.05, publish_timeout=0.3)
    stop = threading.Event()
    published: List[bytes] = []

    def publish() -> None:
        while not stop.is_set():
            try:
                published.append(writer.pub("t", b"x"))
            except (NoConnectionsError, ConnectionClosedError):
                pass  # (nsqd "down", or the cut below)

    publisher = threading.Thread(target=publish, daemon=True) if load == "publishing" else None
    try:
        if publisher is not None:
            publisher.start()
        began = time.monotonic()
        seen = records.wait_for(lambda r: sum(1 for _, text in r if text.startswith(f"still cannot connect to {address}")) >= 2)
        elapsed = time.monotonic() - began
        attempts = failed_attempts(seen, address)
        warned = [text for level, text in seen if level == "WARNING"]
        assert warned[0].startswith(f"cannot connect to {address} ("), warned
        assert "; retrying in " in warned[0] and f"or every {writer_module.HURRY_GAP_SECONDS:g}s while publishes wait for a connection" in warned[0], warned
        still = [text for text in warned if text.startswith("still cannot connect")]
        assert len(warned) == 1 + len(still), warned
        # at most one per STILL_DOWN seconds, while many more attempts failed (logged at debug)
        assert len(still) <= 1 + elapsed / STILL_DOWN, (elapsed, warned)
        assert attempts > 2 * len(warned), (attempts, warned)
        quiet = [text for level, text in seen if level == "DEBUG" and address in text]
        assert quiet and all(text.startswith(f"cannot connect to {address} (") and "; attempt " in text for text in quiet), quiet[:3]
        counts = [int(re.search(r": down [0-9]+s, ([0-9]+) failed attempt\(s\), last error: ", text).group(1)) for text in still]
        assert counts == sorted(counts) and counts[0] >= 2, still

        proxy.reject_new = False
        seen = records.wait_for(lambda r: any(text.startswith(f"connected to {address} after ") for _, text in r))
        back = [text for level, text in seen if text.startswith(f"connected to {address} after ")]
        assert [level for level, text in seen if text == back[0]] == ["WARNING"]
        assert back[0].endswith(" failed attempt(s))"), back
        assert int(re.search(r"after [0-9.]+s \(([0-9]+) failed", back[0]).group(1)) >= counts[-1], back

        # A connection that closes: a warning, and one when it is back.
        before = len(records.warnings())
        proxy.cut()
        seen = records.wait_for(lambda r: any(text.startswith(f"reconnected to {address} after ") for _, text in r[before:]))
        later = records.warnings()[before:]
        assert later[0].startswith(f"connection to {address} closed (") and "; reconnecting in " in later[0], later
        assert any(text.startswith(f"reconnected to {address} after ") for text in later), later
    finally:
        stop.set()
        if publisher is not None:
            publisher.join(WAIT)
        writer.close(1)
        proxy.stop()
        fake.stop()

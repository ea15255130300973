"""What the Writer's log lines look like (the logger is nsq_sync.writer)."""

from __future__ import annotations

import logging
import threading
from typing import Iterator, List, Optional

import pytest
from fake_nsqd import FakeNsqd

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

"""Fixtures shared by the functional tests of the Writer against the scripted fake nsqd."""

from __future__ import annotations

from typing import Iterator

import pytest
from fake_nsqd import FakeNsqd

from nsq_sync.writer import Writer

#: seconds the Writer fixture waits (connect, publish timeout, close)
WRITER_WAIT = 10.0


@pytest.fixture
def fake() -> Iterator[FakeNsqd]:
    server = FakeNsqd().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def writer(fake: FakeNsqd, backend: str) -> Iterator[Writer]:
    """A Writer connected to ``fake``, publish_timeout WRITER_WAIT, closed after the test."""
    made = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WRITER_WAIT)
    assert made.wait_connected(WRITER_WAIT)
    try:
        yield made
    finally:
        made.close(WRITER_WAIT)

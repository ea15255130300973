"""Shared by the bad-input suites: does an error name the parameter, and a Writer connected to
a fake nsqd whose received publishes can be listed (nothing may reach it for bad input)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, List

from nsq_sync import Writer
from nsq_sync.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from fake_nsqd import FakeNsqd  # noqa: E402

PUBLISHING = ("PUB", "MPUB", "DPUB")


def check_named(exc: BaseException, param: str) -> None:
    """The error names *param*: ConfigError.param, or the TypeError's message."""
    if isinstance(exc, ConfigError):
        assert exc.param == param, f"ConfigError names {exc.param!r}, expected {param!r}: {exc}"
    else:
        assert isinstance(exc, TypeError), repr(exc)
        assert param in str(exc), f"TypeError does not name {param!r}: {exc}"


def serving_fake() -> Iterator[FakeNsqd]:
    """For a fixture: a fake nsqd, stopped afterwards."""
    with FakeNsqd() as server:
        yield server


def connected_writer(fake: FakeNsqd, backend: str = "thread") -> Iterator[Writer]:
    """For a fixture: a Writer connected to *fake*, closed afterwards."""
    made = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=5)
    assert made.wait_connected(5)
    fake.wait_for_command("IDENTIFY")
    yield made
    made.close(5)


def published(fake: FakeNsqd) -> List[bytes]:
    """The command lines of every publish *fake* received."""
    with fake.lock:
        return [c.line for c in fake.received if c.name in PUBLISHING]

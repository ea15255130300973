"""``nsq-sync -v worker``'s line of rates (cli._report_rates), driven by a scripted Reader and
clock: a line every second while messages move or the line changes, at most every RATES_IDLE_SECONDS while
nothing does, each naming topic:channel. Before, an idle worker logged the same line every
second (60 a minute per pod), and no line said which topic and channel."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import pytest

from nsq_sync import cli


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Ticks:
    """The stop Event: each wait() is one second of the clock, and *script* runs at each tick."""

    def __init__(self, clock: Clock, script: List[Any]) -> None:
        self.clock, self.script, self.tick = clock, script, 0

    def wait(self, timeout: float) -> bool:
        if self.tick >= len(self.script):
            return True
        self.clock.now += timeout
        self.script[self.tick]()
        self.tick += 1
        return False


class ScriptedReader:
    topic, channel = "orders", "billing"

    def __init__(self) -> None:
        self.counts: Dict[str, int] = {"received": 0, "finished": 0, "requeued": 0}
        self.in_flight = 0
        self.connected = 1

    def stats(self) -> Dict[str, Any]:
        return {"topic": self.topic, "channel": self.channel, "in_flight": self.in_flight,
                **{f"messages_{key}": value for key, value in self.counts.items()},
                "connections": [{"connected": True}] * self.connected}


def run(monkeypatch: pytest.MonkeyPatch, caplog: Any, reader: ScriptedReader, script: List[Any]) -> List[str]:
    clock = Clock()
    monkeypatch.setattr(cli.time, "monotonic", clock.monotonic)
    caplog.set_level(logging.INFO, logger="nsq_sync.cli")
    cli._report_rates(reader, Ticks(clock, script))  # type: ignore[arg-type]
    return [r.getMessage() for r in caplog.records if r.name == "nsq_sync.cli"]


def nothing() -> None:
    pass


def test_an_idle_worker_logs_its_rates_once_then_at_most_every_idle_interval(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    idle = int(getattr(cli, "RATES_IDLE_SECONDS", 60.0))  # (60 s: before, there was none)
    lines = run(monkeypatch, caplog, ScriptedReader(), [nothing] * (2 * idle + 30))
    assert lines == ["orders:billing: received 0/s finished 0/s requeued 0/s in flight 0 connections 1"] * 3, lines


def test_a_busy_worker_logs_every_second_and_a_change_at_once(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    reader = ScriptedReader()

    def receive() -> None:
        reader.counts["received"] += 5
        reader.counts["finished"] += 4
        reader.counts["requeued"] += 1

    def disconnect() -> None:
        reader.connected = 0

    def hold() -> None:
        reader.in_flight = 3

    lines = run(monkeypatch, caplog, reader, [nothing, receive, receive, nothing, nothing, disconnect, nothing, hold, nothing])
    assert lines == [
        "orders:billing: received 0/s finished 0/s requeued 0/s in flight 0 connections 1",
        "orders:billing: received 5/s finished 4/s requeued 1/s in flight 0 connections 1",
        "orders:billing: received 5/s finished 4/s requeued 1/s in flight 0 connections 1",
        "orders:billing: received 0/s finished 0/s requeued 0/s in flight 0 connections 1",  # (the drop, once)
        "orders:billing: received 0/s finished 0/s requeued 0/s in flight 0 connections 0",
        "orders:billing: received 0/s finished 0/s requeued 0/s in flight 3 connections 0",
    ], lines

"""A busy connection does not keep RDY forever (go-nsq #179): with more connections than
max_in_flight, RDY held for ``low_rdy_timeout`` is taken back even though the connection
is not idle, and handed to the connection that waited, never over max_in_flight in total.

No sleeps: every wait is on what a fake received or on an Event set by the handler.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List

from fake_nsqd import FakeNsqd
from tasks import live_tasks

from nsq_sync.reader import Reader

WAIT = 10.0
LOW_RDY_TIMEOUT = 0.3


def test_rdy_held_past_low_rdy_timeout_by_a_busy_connection_goes_to_the_waiting_one(backend: str) -> None:
    servers = [FakeNsqd().start() for _ in range(2)]
    lock = threading.Lock()
    rdy: Dict[int, int] = {}
    sums: List[int] = []

    def track(session: Any, command: Any) -> None:
        # Called after the fake applied the RDY: session.rdy is what this nsqd now holds.
        with lock:
            rdy[id(session)] = session.rdy
            sums.append(sum(rdy.values()))
        return None  # no answer to RDY, as nsqd

    busy, release = threading.Event(), threading.Event()
    handled: List[bytes] = []

    def handler(message: Any) -> bool:
        handled.append(message.body)
        if not busy.is_set():
            busy.set()
            assert release.wait(WAIT)  # the first message stays in flight: its connection is busy
        return True

    for index, server in enumerate(servers):
        server.set_answer("RDY", track)
        server.enqueue(b"%d" % index)  # delivered as soon as that connection gets RDY 1
    reader = Reader(
        "topic", "channel", handler,
        nsqd_tcp_addresses=[f"127.0.0.1:{s.port}" for s in servers],
        backend=backend,
        max_in_flight=1,
        low_rdy_timeout=LOW_RDY_TIMEOUT,
        low_rdy_idle_timeout=60,  # longer than the test: the idle path cannot take RDY away
        rdy_redistribute_interval=0.05,
    )  # fmt: skip
    try:
        reader.start()
        assert busy.wait(WAIT)
        first = int(handled[0])
        holder, waiter = servers[first], servers[1 - first]
        waiter.wait_for_command("SUB", timeout=WAIT)
        assert b"RDY 1" not in waiter.commands

        # Busy (a message in flight, a message just received) yet RDY is taken back after low_rdy_timeout.
        granted = holder.wait_for_command("RDY 1", timeout=WAIT)
        revoked = holder.wait_for_command("RDY 0", timeout=WAIT)
        assert revoked.time - granted.time >= LOW_RDY_TIMEOUT - 0.05
        assert reader.stats()["in_flight"] == 1
        # While that message is unanswered it still uses the one slot: the waiter gets nothing yet.
        assert b"RDY 1" not in waiter.commands
        release.set()
        holder.wait_for_command("FIN", timeout=WAIT)
        waiter.wait_for_command("RDY 1", timeout=WAIT)
        waiter.wait_for_command("FIN", timeout=WAIT)
        assert handled == [b"%d" % first, b"%d" % (1 - first)]
        with lock:
            assert sums and max(sums) == 1, sums
        reader.close(5)
        assert reader.join(WAIT)
        with lock:
            assert max(sums) == 1, sums
        assert live_tasks() == []
    finally:
        release.set()
        reader.close(1)
        for server in servers:
            server.stop()

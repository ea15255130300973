"""What ported pynsq code reads or overrides on a Reader or Writer, against the fake nsqd:
``Writer.heartbeat(conn)`` (a hook pynsq's Writer calls on every heartbeat),
``Writer.nsqd_tcp_addresses`` and ``Reader.total_rdy``.

No sleeps: each wait is on what the fake received or on an Event the hook sets.
"""

from __future__ import annotations

import threading
from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd

from nsq_sync import AsyncConn, Reader, Writer
from nsq_sync.testing import wait_until

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


def test_writer_heartbeat_hook_runs_for_each_heartbeat(fake: FakeNsqd, backend: str) -> None:
    seen: List[Any] = []
    beat = threading.Event()

    class Watched(Writer):
        def heartbeat(self, conn: AsyncConn) -> None:
            seen.append(conn)
            beat.set()

    writer = Watched(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WAIT)
    try:
        assert writer.wait_connected(WAIT)
        assert writer.nsqd_tcp_addresses == [f"{fake.host}:{fake.port}"]
        fake.send_heartbeat()
        fake.wait_for_command("NOP", timeout=WAIT)
        assert beat.wait(WAIT), "Writer.heartbeat() was not called"
        fake.send_heartbeat()
        fake.wait_for_command("NOP", timeout=WAIT, count=2)
        wait_until(lambda: len(seen) == 2, WAIT, message="the hook for the second heartbeat")
        conn = writer.conns[f"{fake.host}:{fake.port}"]
        assert seen == [conn, conn]
        # A Writer that does not override it registers no listener at all.
        plain = Writer(f"{fake.host}:{fake.port}", backend=backend, publish_timeout=WAIT)
        try:
            assert plain.wait_connected(WAIT)
            assert all(not conn._listeners.get("heartbeat") for conn in plain.conns.values())
        finally:
            plain.close(WAIT)
    finally:
        writer.close(WAIT)


def test_reader_total_rdy_adds_up_every_connection(backend: str) -> None:
    servers = [FakeNsqd().start(), FakeNsqd().start()]
    reader = Reader("topic", "channel", lambda message: True, nsqd_tcp_addresses=[f"127.0.0.1:{s.port}" for s in servers], max_in_flight=10, backend=backend)
    try:
        assert reader.total_rdy == 0  # not started
        reader.start()
        for server in servers:
            server.wait_for_command("RDY", timeout=WAIT)
        wait_until(lambda: reader.total_rdy == sum(server.session.rdy for server in servers) > 0, WAIT, message="the RDY both fakes got")
        assert reader.total_rdy == reader.stats()["total_rdy"]
    finally:
        reader.close(WAIT)
        for server in servers:
            server.stop()

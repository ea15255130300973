"""A connection's log lines name its owner (AsyncConn.owner): with several Readers, or Readers
and Writers, of one process on the same nsqd, a warning of nsq_sync.conn says which one it is
about. Before, it named only host:port ("127.0.0.1:4150: E_FIN_FAILED ... (1 such since the
last warning)"), the same for every consumer there. AsyncConn.id does not change."""

from __future__ import annotations

import logging
from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd, close, error  # (the fake fixture: conftest.py)

from nsq_sync.conn import AsyncConn
from nsq_sync.errors import BadTopicError
from nsq_sync.reader import Reader
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0


def conn_warnings(caplog: Any) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nsq_sync.conn" and r.levelno >= logging.WARNING]


def test_two_readers_on_one_nsqd_each_have_their_own_name_in_their_connections_log_lines(fake: FakeNsqd, backend: str, caplog: Any) -> None:
    address = f"{fake.host}:{fake.port}"
    readers = [Reader("orders", channel, lambda m: True, nsqd_tcp_addresses=[address], backend=backend) for channel in ("billing", "audit")]
    named = Reader("orders", "ship", lambda m: True, nsqd_tcp_addresses=[address], backend=backend, name="shipper")
    readers.append(named)
    caplog.set_level(logging.WARNING, logger="nsq_sync.conn")
    try:
        for reader in readers:
            reader.start()
        fake.wait_for_command("RDY 1", count=3)
        sessions = {}
        for session in list(fake.sessions):
            sub = [line for line in session.commands if line.startswith(b"SUB ")]
            sessions[sub[0].split()[2].decode()] = session
        assert sorted(sessions) == ["audit", "billing", "ship"]
        for channel in ("audit", "billing", "ship"):
            sessions[channel].send_error("E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
        wait_until(lambda: len([w for w in conn_warnings(caplog) if "E_FIN_FAILED" in w]) == 3, WAIT, message="three warnings")
        refused = sorted(w for w in conn_warnings(caplog) if "E_FIN_FAILED" in w)
        assert [w.split(": E_FIN_FAILED")[0] for w in refused] == [f"orders:audit: {address}", f"orders:billing: {address}", f"shipper: {address}"], refused
        for reader in readers:
            (conn,) = reader.conns.values()
            assert conn.owner == reader.name and conn.id == address == str(conn)
    finally:
        for reader in readers:
            reader.close(5)


def test_a_writers_connections_log_lines_carry_its_name(fake: FakeNsqd, backend: str, caplog: Any) -> None:
    address = f"{fake.host}:{fake.port}"
    caplog.set_level(logging.DEBUG, logger="nsq_sync.conn")
    writer = Writer(address, backend=backend, name="orders-writer", publish_timeout=WAIT)
    try:
        assert writer.wait_connected(WAIT)
        (conn,) = writer.conns.values()
        assert conn.owner == "orders-writer" and conn.id == address
        fake.set_answer("PUB", [error("E_BAD_TOPIC PUB topic name is not valid"), close()], times=1)
        with pytest.raises(BadTopicError):
            writer.pub("t", b"x")
        # (the connection logs the error after it failed the publish: the caller may be first)
        def bad_topic_lines() -> List[str]:
            return [r.getMessage() for r in caplog.records if r.name == "nsq_sync.conn" and "E_BAD_TOPIC" in r.getMessage()]

        wait_until(bad_topic_lines, WAIT, message="the connection's line")
        logged = bad_topic_lines()
        assert logged and all(line.startswith(f"orders-writer: {address}: E_BAD_TOPIC") for line in logged), logged
    finally:
        writer.close(WAIT)


def test_a_connection_of_its_own_logs_its_address_alone(fake: FakeNsqd, backend: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync.conn")
    conn = AsyncConn(fake.host, fake.port, backend=backend)
    assert conn.owner is None
    conn.connect()
    try:
        fake.send_error("E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
        wait_until(lambda: any("E_FIN_FAILED" in w for w in conn_warnings(caplog)), WAIT, message="the warning")
        assert [w for w in conn_warnings(caplog) if "E_FIN_FAILED" in w][0].startswith(f"{fake.host}:{fake.port}: E_FIN_FAILED")
    finally:
        conn.close(1)

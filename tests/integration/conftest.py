"""Fixtures shared by the integration suites."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

import nsq_sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from conn_helpers import host_port  # noqa: E402


@pytest.fixture
def make_conn(backend: str) -> Iterator[Callable[..., nsq_sync.AsyncConn]]:
    """``make_conn(address, connect=True, **kwargs)``: an AsyncConn on this backend, closed afterwards."""
    made: List[nsq_sync.AsyncConn] = []

    def factory(address: str, connect: bool = True, **kwargs: Any) -> nsq_sync.AsyncConn:
        host, port = host_port(address)
        conn = nsq_sync.AsyncConn(host, port, backend=backend, **kwargs)
        made.append(conn)
        if connect:
            conn.connect()
        return conn

    yield factory
    for conn in made:
        conn.close(timeout=5)


@pytest.fixture
def writer_factory(backend: str) -> Iterator[Callable[..., nsq_sync.Writer]]:
    """``writer_factory(addresses, **kwargs)``: a Writer on this backend reconnecting quickly
    (0.1-0.5 s), closed afterwards."""
    made: List[nsq_sync.Writer] = []

    def make(addresses: Any, **kwargs: Any) -> nsq_sync.Writer:
        kwargs.setdefault("backend", backend)
        kwargs.setdefault("reconnect_interval", 0.1)
        kwargs.setdefault("max_reconnect_interval", 0.5)
        writer = nsq_sync.Writer(addresses, **kwargs)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        writer.close(5)

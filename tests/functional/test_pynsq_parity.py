"""What ported pynsq code reads or overrides on a Reader or Writer, against the fake nsqd:
``Writer.heartbeat(conn)`` (a hook pynsq's Writer calls on every heartbeat),
``Writer.nsqd_tcp_addresses`` and ``Reader.total_rdy``; ``conn.connect()`` then
``conn.on("ready", ...)`` (pynsq's connect() returns before the handshake); publish callbacks that cannot
take ``(conn, data)``; ``reader.max_in_flight = n``.

No sleeps: each wait is on what the fake received or on an Event the hook sets.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, List

import pytest
from fake_nsqd import FakeNsqd

from nsq_sync import AsyncConn, Reader, Writer, subscribe
from nsq_sync import conn as conn_module
from nsq_sync.errors import ClosedError, ConfigError
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


# ------------------------------------------------- on("ready") after connect() (pynsq's order)
def test_a_ready_listener_added_after_connect_runs_once_and_can_subscribe(fake: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """pynsq's connect() only starts the handshake, so ``conn.connect(); conn.on("ready", f)``
    works there. Here the handshake is over when connect() returns: the late listener is called
    once, on the control lane, with the same keyword (before, it never ran and nothing was ever
    subscribed: the program hung)."""
    conn = AsyncConn(fake.host, fake.port, backend=backend)
    early: List[Any] = []
    conn.on("ready", lambda conn: early.append(conn))
    calls: List[Any] = []
    subscribed = threading.Event()

    def on_ready(**kwargs: Any) -> None:
        calls.append((kwargs, conn.worker_pool.control.in_worker()))
        kwargs["conn"].send(subscribe("topic", "channel"))
        kwargs["conn"].send_rdy(1)
        subscribed.set()

    try:
        conn.connect()
        assert early == [conn]  # (added in time: called by connect(), once)
        conn.on("ready", on_ready)
        fake.wait_for_command("SUB topic channel", timeout=WAIT)
        fake.wait_for_command("RDY 1", timeout=WAIT)
        assert subscribed.wait(WAIT)
        assert calls == [({"conn": conn}, True)]  # (run by a control-lane worker)
        assert early == [conn]
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    finally:
        conn.close(timeout=WAIT)


def test_a_late_ready_listener_on_a_closed_connection_and_other_late_handshake_listeners_warn_once(
    fake: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conn_module, "_warned", set())
    conn = AsyncConn(fake.host, fake.port, backend=backend)
    calls: List[str] = []
    try:
        conn.connect()
        conn.on("identify_response", lambda conn, data: calls.append("identify_response"))
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert "AsyncConn.on('identify_response')" in warnings[0] and "after connect() returned" in warnings[0]
        assert "add listeners before connect()" in warnings[0] and "move the on() calls above conn.connect()" in warnings[0]
        conn.on("connect", lambda conn: calls.append("connect"))
        assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1  # (once per process)
    finally:
        conn.close(timeout=WAIT)
    monkeypatch.setattr(conn_module, "_warned", set())
    caplog.clear()
    conn.on("ready", lambda conn: calls.append("ready"))  # closed: it will not run, and says so
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "AsyncConn.on('ready')" in warnings[0], warnings
    conn.worker_pool.close()  # (runs anything queued on its lanes: nothing was)
    assert calls == []


def test_ready_listeners_added_before_connect_warn_nothing(fake: FakeNsqd, backend: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conn_module, "_warned", set())
    conn = AsyncConn(fake.host, fake.port, backend=backend)
    seen: List[str] = []
    for name in ("connect", "identify", "identify_response", "ready"):
        conn.on(name, lambda name=name, **kwargs: seen.append(name))
    try:
        conn.connect()
        assert seen == ["connect", "identify", "identify_response", "ready"]
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    finally:
        conn.close(timeout=WAIT)


# ------------------------------------------------- publish callbacks that cannot take (conn, data)
class _Callbacks:
    def good(self, conn: Any, data: Any) -> None:
        pass

    def one(self, data: Any) -> None:
        pass

    def __call__(self, conn: Any, data: Any) -> None:
        pass


def _good(conn: Any, data: Any, extra: int = 1) -> None:
    pass


WRONG_CALLBACKS = [
    ("Tornado-style one argument", lambda data: None),
    ("no argument", lambda: None),
    ("three arguments", lambda conn, data, more: None),
    ("keyword-only data", lambda conn, *, data: None),
    ("bound method taking data only", _Callbacks().one),
    ("partial that takes one more", functools.partial(lambda conn, data, more: None)),
]
RIGHT_CALLBACKS = [
    ("function", lambda conn, data: None),
    ("*args", lambda *args: None),
    ("extra argument with a default", _good),
    ("bound method", _Callbacks().good),
    ("object with __call__", _Callbacks()),
    ("partial", functools.partial(lambda tag, conn, data: None, "tag")),
]


@pytest.mark.parametrize("callback", [c[1] for c in WRONG_CALLBACKS], ids=[c[0] for c in WRONG_CALLBACKS])
def test_a_publish_callback_that_cannot_take_conn_and_data_is_refused_before_sending(fake: FakeNsqd, writer: Writer, callback: Any) -> None:
    """``pub(topic, msg, callback)`` calls ``callback(conn, data)`` on the worker pool. One that
    cannot take them (a Tornado-style ``callback(data)``) used to be accepted: the message was
    published and the callback failed later on the pool with a logged TypeError. Now refused at
    the call, nothing sent."""
    for publish in (
        lambda: writer.pub("t", b"x", callback),
        lambda: writer.mpub("t", [b"x", b"y"], callback),
        lambda: writer.dpub("t", 1000, b"x", callback),
    ):
        with pytest.raises(TypeError, match=r"callback must take two positional arguments, as the Writer calls callback\(conn, data\)") as info:
            publish()
        assert "nothing was published" in str(info.value)
    done = threading.Event()
    assert writer.pub("t", b"good", lambda conn, data: done.set()) is None
    assert done.wait(WAIT)
    assert [body for _, body, _ in fake.published] == [b"good"]


@pytest.mark.parametrize("callback", [c[1] for c in RIGHT_CALLBACKS], ids=[c[0] for c in RIGHT_CALLBACKS])
def test_publish_callbacks_that_take_conn_and_data_are_accepted(fake: FakeNsqd, writer: Writer, callback: Any) -> None:
    assert writer.pub("t", b"a", callback) is None
    assert writer.mpub("t", [b"b"], callback) is None
    assert writer.dpub("t", 0, b"c", callback) is None
    wait_until(lambda: len(fake.published) == 3, WAIT, message="three publishes")


# ------------------------------------------------- reader.max_in_flight = n (pynsq assigns it)
def test_assigning_max_in_flight_sets_it_as_set_max_in_flight_does(fake: FakeNsqd, backend: str) -> None:
    """pynsq code writes ``reader.max_in_flight = 10``; it raised "property has no setter"."""
    reader = Reader("topic", "channel", lambda message: True, nsqd_tcp_addresses=f"{fake.host}:{fake.port}", max_in_flight=4, backend=backend)
    try:
        reader.start()
        fake.wait_for_command("RDY 4", timeout=WAIT)
        reader.max_in_flight = 0
        fake.wait_for_command("RDY 0", timeout=WAIT)
        reader.max_in_flight = 7
        fake.wait_for_command("RDY 7", timeout=WAIT)
        assert reader.max_in_flight == 7 and reader.stats()["max_in_flight"] == 7
        with pytest.raises(ConfigError):
            reader.max_in_flight = -1
        assert reader.max_in_flight == 7
    finally:
        reader.close(WAIT)
    with pytest.raises(ClosedError):
        reader.max_in_flight = 3

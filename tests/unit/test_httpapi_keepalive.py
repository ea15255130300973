"""HTTP keep-alive in nsq_sync.httpapi: kept connections, and what happens when the server
closes one, the process forks, or the client is closed.

The server here is a small HTTP/1.1 server on a raw socket, so each test decides exactly when a
connection closes and can tell connections apart (the client's port per request).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable, List, Optional, Tuple

import pytest

from nsq_sync.errors import ConfigError, HTTPError
from nsq_sync.httpapi import NsqdHTTPClient
from nsq_sync.httpapi import base as http_base

WAIT = 10.0

# What the server does with one request on a connection: "answer", "answer-close" (answer,
# then close the connection), "drop" (close without answering).
Action = str


class KeepAliveServer:
    """Answers every request ``OK`` over HTTP/1.1 keep-alive; *plan(n)* picks the action for
    the n-th request (0-based, across connections). Records (client port, method, path)."""

    def __init__(self, plan: Optional[Callable[[int], Action]] = None) -> None:
        self.plan = plan or (lambda n: "answer")
        self.requests: List[Tuple[int, str, str]] = []
        self.closed_ports: List[int] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._threads: List[threading.Thread] = []
        self._conns: List[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, peer[1]), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, port: int) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                with self._changed:
                    n = len(self.requests)
                    self.requests.append((port, method, path))
                    self._changed.notify_all()
                action = self.plan(n)
                if action == "drop":
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK")
                if action == "answer-close":
                    return
        except OSError:
            return
        finally:
            conn.close()
            with self._changed:
                self.closed_ports.append(port)
                self._changed.notify_all()

    def wait_closed(self, port: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: port in self.closed_ports, WAIT)

    def ports(self) -> List[int]:
        with self._lock:
            return [port for port, _, _ in self.requests]

    def stop(self) -> None:
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(WAIT)


@pytest.fixture
def make_server():
    made: List[KeepAliveServer] = []

    def make(plan: Optional[Callable[[int], Action]] = None) -> KeepAliveServer:
        server = KeepAliveServer(plan)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def test_requests_share_one_kept_connection(make_server):
    server = make_server()
    with NsqdHTTPClient(server.address, timeout=WAIT) as client:
        assert [client.pub("t", b"x") for _ in range(5)] == ["OK"] * 5
        assert client.ping()
    ports = server.ports()
    assert len(ports) == 6 and len(set(ports)) == 1
    assert server.accepted == 1


def test_keep_alive_false_opens_a_connection_per_request(make_server):
    server = make_server()
    client = NsqdHTTPClient(server.address, timeout=WAIT, keep_alive=False)
    for _ in range(3):
        client.pub("t", b"x")
    assert len(set(server.ports())) == 3
    assert client.keep_alive is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_keep_alive_must_be_a_bool(value):
    with pytest.raises(ConfigError, match="keep_alive") as info:
        NsqdHTTPClient("127.0.0.1:4151", keep_alive=value)
    assert isinstance(info.value, TypeError)


def test_a_connection_the_server_closed_while_kept_is_not_used(make_server):
    # The server closes after its first answer (nsqd restarting, a proxy's idle limit): the
    # next POST, which is never sent twice, goes out on a new connection and succeeds.
    server = make_server(lambda n: "answer-close" if n == 0 else "answer")
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    client.pub("t", b"first")
    first = server.ports()[0]
    assert server.wait_closed(first)
    assert client.pub("t", b"second") == "OK"
    ports = server.ports()
    assert len(ports) == 2 and ports[1] != first
    client.close()


def test_get_is_sent_again_when_the_kept_connection_closes_as_it_goes_out(make_server):
    # The server reads the second request on the kept connection and closes it without an
    # answer: a GET changes nothing, so it goes again on a new connection.
    server = make_server(lambda n: "drop" if n == 1 else "answer")
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    assert client.ping()
    assert client.ping()
    ports = server.ports()
    assert len(ports) == 3
    assert ports[0] == ports[1] != ports[2]
    client.close()


def test_post_is_not_sent_again_when_the_kept_connection_closes_as_it_goes_out(make_server):
    # The same for a publish: the server may have taken it, so it is not sent twice; the
    # caller gets HTTPError(0) and decides. The client goes on working.
    server = make_server(lambda n: "drop" if n == 1 else "answer")
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    client.pub("t", b"one")
    with pytest.raises(HTTPError) as info:
        client.pub("t", b"two")
    assert info.value.status == 0 and not info.value.timed_out
    assert len(server.ports()) == 2
    assert client.pub("t", b"three") == "OK"
    ports = server.ports()
    assert len(ports) == 3 and ports[2] != ports[0]
    client.close()


def test_close_closes_the_kept_connection_and_the_client_still_works(make_server):
    server = make_server()
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    client.pub("t", b"x")
    kept = server.ports()[0]
    client.close()
    assert server.wait_closed(kept)
    assert client.keep_alive is False
    client.pub("t", b"y")
    client.pub("t", b"z")
    ports = server.ports()
    assert len(set(ports)) == 3


def test_a_connection_idle_too_long_is_not_used(make_server, monkeypatch):
    server = make_server()
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    client.pub("t", b"x")
    monkeypatch.setattr(http_base, "KEEP_IDLE_SECONDS", -1.0)
    client.pub("t", b"y")
    first, second = server.ports()
    assert first != second
    assert server.wait_closed(first)
    client.close()


def test_threads_sharing_a_client_each_get_a_connection_and_at_most_a_few_are_kept(make_server):
    server = make_server()
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    barrier = threading.Barrier(8)
    errors: List[BaseException] = []

    def publish() -> None:
        try:
            barrier.wait(WAIT)
            for _ in range(20):
                assert client.pub("t", b"x") == "OK"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert not errors
    assert len(server.requests) == 160
    assert len(client._idle) <= http_base.MAX_IDLE_CONNECTIONS
    client.close()
    assert not client._idle


def _gevent_patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.skipif(_gevent_patched(), reason="the test server's greenlets would be forked along and answer the child")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # (the test server's thread: a prefork server's case)
def test_a_forked_child_does_not_use_its_parents_kept_connection(make_server):
    server = make_server()
    client = NsqdHTTPClient(server.address, timeout=WAIT)
    client.pub("t", b"parent")
    parent_port = server.ports()[0]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: publish, say which way it went, and leave at once
        code = 1
        try:
            code = 0 if client.pub("t", b"child") == "OK" else 2
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"\x00"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert client.pub("t", b"parent again") == "OK"
    ports = server.ports()
    assert len(ports) == 3
    assert ports[1] != parent_port  # the child opened its own
    assert ports[2] == parent_port  # the parent's kept connection was left intact
    client.close()

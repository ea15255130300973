"""The gevent backend connects to an IP address without a resolver.

gevent's default resolver runs getaddrinfo on a thread pool; many connections opened at once
were seen to stall there for 10 s and more. These run without monkey-patching: gevent's own
sockets cooperate with its hub in the main thread.
"""

from __future__ import annotations

import socket

import gevent._socketcommon
import gevent.socket
import pytest

from nsq_sync.backends.gevent import GeventBackend


def _no_resolver(*args, **kwargs):
    raise AssertionError(f"the resolver was asked for {args!r}")


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server
    server.close()


def test_ip_address_connects_without_the_resolver(monkeypatch, listener) -> None:
    monkeypatch.setattr(gevent.socket, "getaddrinfo", _no_resolver)
    monkeypatch.setattr(gevent._socketcommon, "getaddrinfo", _no_resolver)
    port = listener.getsockname()[1]
    sock = GeventBackend().create_connection(("127.0.0.1", port), 2.0)
    try:
        accepted, peer = listener.accept()
        assert peer == sock.getsockname()
        accepted.close()
    finally:
        sock.close()


def test_host_name_still_resolves(monkeypatch, listener) -> None:
    asked = []
    real = gevent.socket.getaddrinfo

    def recording(host, *args, **kwargs):
        asked.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(gevent.socket, "getaddrinfo", recording)
    port = listener.getsockname()[1]
    sock = GeventBackend().create_connection(("localhost", port), 2.0)
    try:
        assert "localhost" in asked
        listener.accept()[0].close()
    finally:
        sock.close()


def test_refused_ip_connect_raises_and_closes(listener) -> None:
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there any more
    with pytest.raises(OSError):
        GeventBackend().create_connection(("127.0.0.1", port), 2.0)

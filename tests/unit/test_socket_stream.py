"""SocketStream: a write's timeout bounds each wait for progress, not the whole write."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from nsq_sync.transport.tcp import SocketStream

TIMEOUT = 0.3


def small_pair() -> "tuple[socket.socket, socket.socket]":
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return writer, reader


def start_slow_reader(sock: socket.socket, received: bytearray, until: int = 0) -> threading.Thread:
    """Read *sock* 8 KiB at a time, 10 ms apart, into *received* (up to *until* bytes, or EOF)."""

    def read_slowly() -> None:
        while not until or len(received) < until:
            chunk = sock.recv(8192)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.01)  # pacing: the write must outlast its timeout to test anything

    thread = threading.Thread(target=read_slowly, daemon=True)
    thread.start()
    return thread


def test_slow_but_steady_reader_gets_everything_even_past_the_timeout() -> None:
    writer, reader = small_pair()
    stream = SocketStream(writer)
    stream.settimeout(TIMEOUT)
    data = bytes(range(256)) * 2000  # 512,000 bytes
    received = bytearray()
    thread = start_slow_reader(reader, received, len(data))
    began = time.monotonic()
    stream.sendall(data)
    took = time.monotonic() - began
    thread.join(10)
    assert bytes(received) == data
    assert took > TIMEOUT, f"the write took {took:.2f}s: too fast to show anything (make the reader slower)"
    writer.close()
    reader.close()


def test_write_without_progress_fails_after_the_timeout() -> None:
    writer, reader = small_pair()
    stream = SocketStream(writer)
    stream.settimeout(TIMEOUT)
    began = time.monotonic()
    with pytest.raises(socket.timeout):
        stream.sendall(b"x" * 1_000_000)  # nobody reads
    assert TIMEOUT <= time.monotonic() - began < 5
    writer.close()
    reader.close()


def test_without_timeout_sendall_is_the_sockets() -> None:
    writer, reader = socket.socketpair()
    stream = SocketStream(writer)
    stream.settimeout(None)
    assert stream.sendall == writer.sendall
    stream.sendall(b"abc")
    assert reader.recv(3) == b"abc"
    writer.close()
    reader.close()


@pytest.mark.parametrize("layer", ["deflate", "snappy"])
def test_a_compression_layer_writes_through_the_bounded_sendall(layer: str) -> None:
    from nsq_sync.transport.compression import DeflateStream, SnappyStream

    def layered(sock: socket.socket) -> object:
        inner = SocketStream(sock)
        stream = DeflateStream(inner) if layer == "deflate" else SnappyStream(inner)
        stream.settimeout(TIMEOUT)  # after the layer is made, as AsyncConn does
        return stream

    writer, reader = small_pair()
    began = time.monotonic()
    with pytest.raises(socket.timeout):
        layered(writer).sendall(os.urandom(600_000))  # nobody reads
    assert TIMEOUT <= time.monotonic() - began < 5
    writer.close()
    reader.close()

    writer, reader = small_pair()
    received = bytearray()
    thread = start_slow_reader(reader, received)
    data = os.urandom(600_000)  # incompressible: at least as many bytes go out
    began = time.monotonic()
    layered(writer).sendall(data)
    took = time.monotonic() - began
    writer.close()
    thread.join(10)
    assert len(received) >= len(data)
    assert took > TIMEOUT, f"the write took {took:.2f}s: too fast to show anything"
    reader.close()

"""DeflateStream and SnappyStream over an in-memory inner stream: round trips, chunking, leading bytes, interop."""

from __future__ import annotations

import json
import os
import random
import struct
import zlib

import pytest

from nsq_sync.errors import IntegrityError
from nsq_sync.transport.compression import DeflateStream, SnappyStream, snappy_available

import snappy  # noqa: E402  (python-snappy is a test dependency: never skipped)


class FakeInner:
    """An in-memory stream: recv() hands out *incoming* in chunks, sendall() records *sent*."""

    def __init__(self, incoming: bytes = b"", chunk=None, seed: int = 0):
        self.incoming = bytearray(incoming)
        self.sent = bytearray()
        self.chunk = chunk  # None: as much as asked; int: at most that; "random": 1..97
        self.rng = random.Random(seed)
        self.recv_sizes = []
        self.timeouts = []
        self.closed = False
        self.shut = False
        self.sock = object()

    def feed(self, data: bytes) -> None:
        self.incoming += data

    def recv(self, size: int) -> bytes:
        self.recv_sizes.append(size)
        n = size
        if self.chunk == "random":
            n = min(size, self.rng.randint(1, 97))
        elif self.chunk is not None:
            n = min(size, self.chunk)
        data = bytes(self.incoming[:n])
        del self.incoming[:n]
        return data

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def settimeout(self, timeout):
        self.timeouts.append(timeout)

    def shutdown(self, write_only=False):
        self.shut = "write" if write_only else True

    def close(self):
        self.closed = True


def make_writer(kind, inner):
    return DeflateStream(inner, level=6) if kind == "deflate" else SnappyStream(inner)


def make_reader(kind, inner, leading=b""):
    return DeflateStream(inner, leading=leading) if kind == "deflate" else SnappyStream(inner, leading=leading)


def read_all(stream, size=65536, limit=None):
    out = bytearray()
    while True:
        data = stream.recv(size)
        if not data:
            return bytes(out)
        out += data
        if limit is not None and len(out) >= limit:
            return bytes(out)


def read_exactly(stream, n, size=65536):
    out = bytearray()
    while len(out) < n:
        data = stream.recv(size)
        assert data, f"stream ended after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


def messages(seed=1, count=200):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            out.append(b"frame %d " % i * rng.randint(1, 20))
        elif kind == 1:
            out.append(rng.randbytes(rng.randint(1, 300)))
        else:
            out.append(b"x")
    return out


KINDS = ["deflate", "snappy"]


def compress_all(kind, parts):
    inner = FakeInner()
    writer = make_writer(kind, inner)
    for part in parts:
        writer.sendall(part)
    return bytes(inner.sent)


def test_snappy_available():
    assert snappy_available() is True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 1, 7, "random"], ids=["whole", "1-byte", "7-byte", "random"])
def test_round_trip_many_writes(kind, chunk):
    parts = messages()
    wire = compress_all(kind, parts)
    assert wire != b"".join(parts)
    reader = make_reader(kind, FakeInner(wire, chunk=chunk, seed=3))
    assert read_all(reader) == b"".join(parts)


@pytest.mark.parametrize("kind", KINDS)
def test_reads_of_one_byte_requested(kind):
    parts = messages(count=30)
    wire = compress_all(kind, parts)
    inner = FakeInner(wire)
    reader = make_reader(kind, inner)
    assert read_all(reader, size=1) == b"".join(parts)
    assert set(inner.recv_sizes) == {1}


@pytest.mark.parametrize("kind", KINDS)
def test_each_write_is_readable_at_once(kind):
    """Every write is flushed: the reader gets each message without waiting for later writes."""
    w_inner, r_inner = FakeInner(), FakeInner(chunk="random", seed=5)
    writer, reader = make_writer(kind, w_inner), make_reader(kind, r_inner)
    for part in messages(seed=9, count=60):
        writer.sendall(part)
        r_inner.feed(bytes(w_inner.sent))
        w_inner.sent.clear()
        assert read_exactly(reader, len(part)) == part


@pytest.mark.parametrize("kind", KINDS)
def test_large_payload(kind):
    payload = os.urandom(512 * 1024) + b"compressible " * (512 * 1024 // 13)
    assert len(payload) >= 1024 * 1024 - 16
    wire = compress_all(kind, [payload])
    reader = make_reader(kind, FakeInner(wire, chunk="random", seed=11))
    assert read_all(reader) == payload


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [0, 1, 2, 5, 17, 100, -1, None], ids=lambda s: f"split={s}")
def test_leading_bytes_honored(kind, split):
    parts = messages(seed=4, count=40)
    wire = compress_all(kind, parts)
    cut = len(wire) if split is None else (len(wire) - 1 if split == -1 else split)
    reader = make_reader(kind, FakeInner(wire[cut:], chunk="random", seed=2), leading=wire[:cut])
    assert read_all(reader) == b"".join(parts)


@pytest.mark.parametrize("kind", KINDS)
def test_end_of_stream(kind):
    assert make_reader(kind, FakeInner(b"")).recv(100) == b""


def test_deflate_interop_with_zlib():
    parts = messages(seed=6, count=50)
    wire = compress_all("deflate", parts)
    # raw deflate, no zlib header: what nsqd's compress/flate speaks
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(wire) == b"".join(parts)
    with pytest.raises(zlib.error):
        zlib.decompress(wire)
    compressor = zlib.compressobj(3, zlib.DEFLATED, -zlib.MAX_WBITS)
    foreign = b"".join(compressor.compress(p) + compressor.flush(zlib.Z_SYNC_FLUSH) for p in parts)
    assert read_all(DeflateStream(FakeInner(foreign, chunk=13))) == b"".join(parts)


@pytest.mark.parametrize("level", range(1, 10))
def test_deflate_levels(level):
    inner = FakeInner()
    DeflateStream(inner, level=level).sendall(b"abc" * 1000)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(inner.sent)) == b"abc" * 1000


def test_snappy_output_decodes_with_a_separate_decompressor():
    parts = messages(seed=8, count=80)
    wire = compress_all("snappy", parts)
    assert wire.startswith(b"\xff\x06\x00\x00sNaPpY")  # framing format stream identifier
    decompressor = snappy.StreamDecompressor()
    out = bytearray()
    for i in range(0, len(wire), 33):
        out += decompressor.decompress(wire[i : i + 33])
    assert bytes(out) == b"".join(parts)


def test_snappy_reads_a_separate_compressors_output():
    parts = messages(seed=12, count=80)
    compressor = snappy.StreamCompressor()
    foreign = b"".join(compressor.add_chunk(p) for p in parts)
    assert read_all(SnappyStream(FakeInner(foreign, chunk="random", seed=1))) == b"".join(parts)


@pytest.mark.parametrize("kind", KINDS)
def test_delegation(kind):
    inner = FakeInner()
    stream = make_writer(kind, inner)
    stream.settimeout(2.5)
    stream.shutdown()
    stream.close()
    assert inner.timeouts == [2.5] and inner.shut and inner.closed
    assert stream.sock is inner.sock


def test_corrupt_deflate_input_raises_integrity_error():
    reader = DeflateStream(FakeInner(b"\xff\xff\xff\xff not compressed at all" * 4))
    with pytest.raises(IntegrityError, match="corrupt deflate stream") as info:
        read_all(reader)
    assert isinstance(info.value.__cause__, zlib.error)


@pytest.mark.parametrize("size", [20, 5000], ids=["small read", "large read"])  # (our decoder, python-snappy's)
@pytest.mark.parametrize("damage", ["data", "checksum", "chunk type"])
def test_corrupt_snappy_input_raises_integrity_error_whatever_the_read_size(size, damage):
    # The same damage gives the same typed error whichever decoder the read's size picks.
    wire = bytearray(compress_all("snappy", [bytes(random.Random(size).getrandbits(8) for _ in range(size // 2)) * 2]))
    first = 10  # the first chunk after the 10-byte stream identifier
    if damage == "data":
        wire[-3] ^= 0xFF
    elif damage == "checksum":
        wire[first + 4] ^= 0xFF
    else:
        wire[first] = 0x05  # a reserved unskippable type
    reader = SnappyStream(FakeInner(bytes(wire)))
    with pytest.raises(IntegrityError):
        read_all(reader)


# --------------------------------------------------------------------------- upgrade handoff (no real socket)


def _frame(frame_type: int, data: bytes) -> bytes:
    return struct.pack(">lL", len(data) + 4, frame_type) + data


class _FakeSock:
    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.sent = bytearray()

    def setsockopt(self, *args):
        pass

    def settimeout(self, timeout):
        pass

    def sendall(self, data):
        self.sent += data

    def recv(self, size):
        return self.chunks.pop(0) if self.chunks else b""

    def shutdown(self, how):
        pass

    def close(self):
        pass


def _fake_backend(sock):
    from nsq_sync.backends.thread import ThreadBackend

    class Backend(ThreadBackend):
        def create_connection(self, address, timeout):
            return sock

    return Backend()


def _upgrade_wire(kind):
    response = _frame(0, json.dumps({"max_rdy_count": 2500, kind: True, "deflate_level": 6}).encode())
    ok = _frame(0, b"OK")
    if kind == "snappy":
        compressed = snappy.StreamCompressor().add_chunk(ok)
    else:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        compressed = compressor.compress(ok) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return response, compressed


def _connect(kind, chunks):
    from nsq_sync import AsyncConn

    conn = AsyncConn("127.0.0.1", 4150, backend=_fake_backend(_FakeSock(chunks)), **{kind: True})
    try:
        conn.connect()
        return conn.connected() or conn.state == "DISCONNECTED"  # the fake stream ends right after
    finally:
        conn.close(1)


@pytest.mark.parametrize("kind", KINDS)
def test_upgrade_with_response_and_compressed_ok_in_separate_reads(kind):
    response, compressed = _upgrade_wire(kind)
    assert _connect(kind, [response, compressed])


@pytest.mark.parametrize("kind", KINDS)
def test_upgrade_with_response_and_compressed_ok_in_one_read(kind):
    """Regression (fixed in 313f902): the compressed bytes read together with the IDENTIFY response must be
    handed to the new layer, not parsed as a frame header ('bad frame size -16384000' for snappy)."""
    response, compressed = _upgrade_wire(kind)
    assert _connect(kind, [response + compressed])


@pytest.mark.parametrize("kind", KINDS)
def test_upgrade_with_everything_in_one_byte_reads(kind):
    response, compressed = _upgrade_wire(kind)
    wire = response + compressed
    assert _connect(kind, [wire[i : i + 1] for i in range(len(wire))])


@pytest.mark.parametrize("how", ["recv", "read_some"])
def test_a_deflate_read_that_expands_enormously_comes_up_in_bounded_pieces(how):
    # 1 byte of compressed stream can become ~1,000: a 24 MiB body arrives in a few KiB. Each
    # call hands up at most DEFLATE_READ_LIMIT, and what is left waits in the layer (pending),
    # so nothing is lost and no read needs memory for the whole expansion.
    from nsq_sync.transport import compression

    body = b"\0" * (24 * 1024 * 1024) + b"end"
    wire = compress_all("deflate", [body])
    assert len(wire) < 64 * 1024
    inner = FakeInner(wire)
    inner.read_some = lambda size: inner.recv(size) or None
    inner.pending = lambda: bool(inner.incoming)
    reader = DeflateStream(inner)
    out = bytearray()
    pieces = 0
    while len(out) < len(body):
        piece = reader.recv(1 << 20) if how == "recv" else reader.read_some(1 << 20)
        assert piece, f"ended after {len(out)} bytes"
        assert len(piece) <= compression.DEFLATE_READ_LIMIT
        out += piece
        pieces += 1
        if len(out) < len(body):
            assert reader.pending()  # (the rest is held in the layer: a reader must not wait on the socket)
    assert bytes(out) == body and pieces >= 6
    assert not reader.pending() and reader.read_some(10) is None

"""SnappyFrameReader: the small-read path (decoded in Python) and the big-read path (python-snappy) agree."""

from __future__ import annotations

import random

import pytest

import snappy  # noqa: E402  (a test dependency: never skipped)

from nsq_sync.errors import IntegrityError  # noqa: E402
from nsq_sync.transport import compression  # noqa: E402
from nsq_sync.transport.compression import SNAPPY_SMALL_READ, SnappyFrameReader, masked_crc32c  # noqa: E402

IDENT = b"\xff\x06\x00\x00sNaPpY"


def reader():
    return SnappyFrameReader(snappy.StreamDecompressor(), snappy.uncompress)


def chunk(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + len(payload).to_bytes(3, "little") + payload


def uncompressed(data: bytes, crc=None) -> bytes:
    return chunk(1, (masked_crc32c(data) if crc is None else crc).to_bytes(4, "little") + data)


def compressed(data: bytes) -> bytes:
    return chunk(0, masked_crc32c(data).to_bytes(4, "little") + snappy.compress(data))


def test_crc_matches_python_snappy():
    wire = snappy.StreamCompressor().add_chunk(b"\x00\x00\x00\x06\x00\x00\x00\x00OK")
    assert wire[10:] == uncompressed(b"\x00\x00\x00\x06\x00\x00\x00\x00OK")


@pytest.mark.parametrize("size", [0, 1, 10, SNAPPY_SMALL_READ, SNAPPY_SMALL_READ + 1, 5000])
@pytest.mark.parametrize("build", [uncompressed, compressed])
def test_both_paths_decode(size, build):
    data = bytes(random.Random(size).randrange(4) for _ in range(size))
    r = reader()
    assert r.decompress(IDENT + build(data)) == data


def test_small_reads_skip_python_snappy(monkeypatch):
    calls = []
    r = reader()
    monkeypatch.setattr(r, "_stream", type("S", (), {"decompress": lambda self, d: calls.append(d) or b""})())
    ok = uncompressed(b"\x00\x00\x00\x06\x00\x00\x00\x00OK")
    assert r.decompress(IDENT + ok) == b"\x00\x00\x00\x06\x00\x00\x00\x00OK"
    for _ in range(3):
        assert r.decompress(ok) == b"\x00\x00\x00\x06\x00\x00\x00\x00OK"  # a checked chunk again
    assert r.decompress(ok[:5]) == b"" and r.decompress(ok[5:]) == b"\x00\x00\x00\x06\x00\x00\x00\x00OK"
    assert calls == []


def test_mixed_sizes_in_order_whatever_the_chunking():
    rng = random.Random(7)
    parts = [rng.randbytes(rng.choice([3, 10, 40, 300, 3000])) for _ in range(200)]
    wire = IDENT + b"".join((compressed if i % 2 else uncompressed)(p) for i, p in enumerate(parts))
    for seed in range(3):
        r, out, pos, rng2 = reader(), bytearray(), 0, random.Random(seed)
        while pos < len(wire):
            step = rng2.randint(1, 400)
            out += r.decompress(wire[pos : pos + step])
            pos += step
        assert bytes(out) == b"".join(parts)


def test_skippable_and_padding_chunks_are_skipped():
    r = reader()
    assert r.decompress(IDENT + chunk(0xFE, b"\x00" * 5) + chunk(0x80, b"meta") + uncompressed(b"hi")) == b"hi"


@pytest.mark.parametrize(
    "wire",
    [
        IDENT + uncompressed(b"hello", crc=1),  # bad checksum, uncompressed
        IDENT + chunk(0, (1).to_bytes(4, "little") + snappy.compress(b"hello")),  # bad checksum, compressed
        IDENT + chunk(0x02, b"abcd"),  # reserved unskippable
        IDENT + chunk(1, b"ab"),  # no room for the checksum
        chunk(0xFF, b"nOtSnAp"),  # bad stream identifier
    ],
    ids=["crc", "crc-compressed", "reserved", "short", "identifier"],
)
def test_bad_small_input_raises_integrity_error(wire):
    with pytest.raises(IntegrityError):
        reader().decompress(wire)


def test_a_corrupted_known_chunk_is_still_checked():
    r = reader()
    ok = uncompressed(b"\x00\x00\x00\x06\x00\x00\x00\x00OK")
    r.decompress(IDENT + ok)
    bad = ok[:-1] + b"L"
    with pytest.raises(IntegrityError):
        r.decompress(bad)


def test_known_chunk_memory_is_bounded():
    r = reader()
    r.decompress(IDENT)
    for i in range(compression._KNOWN_CHUNKS * 3):
        assert r.decompress(uncompressed(b"%d" % i)) == b"%d" % i
    assert len(r._known) <= compression._KNOWN_CHUNKS


def test_a_chunk_declared_longer_than_the_format_allows_is_refused_at_once():
    # A hostile peer declares a 16 MB chunk and trickles it: the reader held the growing
    # part and copied it again on every read (quadratic), for a chunk no decompressor takes.
    r = reader()
    assert r.decompress(IDENT) == b""
    largest = compression.SNAPPY_LARGEST_CHUNK
    assert r.decompress(bytes([1]) + largest.to_bytes(3, "little") + b"\x00" * 100) == b""  # (the largest allowed: held)
    r = reader()
    with pytest.raises(IntegrityError, match=f"a chunk of {largest + 1} bytes declared"):
        r.decompress(IDENT + bytes([0]) + (largest + 1).to_bytes(3, "little") + b"\x00" * 100)
    # The largest compressed chunk python-snappy makes (64 KiB of random data) is within it.
    data = random.Random(7).randbytes(65536)
    wire = compressed(data)
    assert len(wire) - 4 <= largest
    r = reader()
    assert r.decompress(IDENT + wire[:1000]) == b"" and r.decompress(wire[1000:]) == data

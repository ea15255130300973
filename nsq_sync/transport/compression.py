"""Deflate and snappy layers over another stream.

The reader alone uses the decompressor and writers (serialized by the caller's
write lock) alone use the compressor, so the two directions never share state.
Each layer starts with the bytes that were already read past the upgrade
point (``leading``), which belong to the compressed stream.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import ConfigError, IntegrityError


#: the most one read of a deflate stream hands up: one read of compressed bytes can expand about
#: 1,000 times, and no limit on frames helps if it all lands in memory first; the rest of such a
#: read waits in the layer (pending() is true) for the next call
DEFLATE_READ_LIMIT = 4 * 1024 * 1024


class _Layer:
    """A codec over the stream below. sendall and pending are bound per instance, straight
    to the layer below and the codec (pending once the bytes read past the upgrade point
    are used up), and the codec's calls are instance attributes: a publish waiting for its
    answer goes through each of them once, so every indirection is paid per message."""

    def __init__(self, inner: Any, leading: bytes, compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes]) -> None:
        self.inner = inner
        self._leading = leading
        self._compress = compress
        self._decompress = decompress
        self._bind_sendall()
        if not leading:
            self._leading_used()

    def _bind_sendall(self) -> None:
        inner_sendall = getattr(self.inner, "sendall", None)
        if inner_sendall is not None:  # (a minimal stream below, in tests, may have none)
            compress = self._compress

            def sendall(data: bytes) -> None:
                inner_sendall(compress(data))

            self.sendall = sendall  # type: ignore[method-assign]

    def _leading_used(self) -> None:
        inner_pending = getattr(self.inner, "pending", None)
        if inner_pending is not None:  # (a minimal stream below, in tests, may have none)
            self.pending = inner_pending  # type: ignore[method-assign]

    def _take_leading(self) -> bytes:
        raw, self._leading = self._leading, b""
        self._leading_used()
        return raw

    def _hold(self, raw: bytes) -> None:
        """Keep *raw* (read, not decoded yet) for the next call, which takes it before reading
        the layer below; pending() says so meanwhile."""
        self._leading = raw
        self.__dict__.pop("pending", None)  # (back to _Layer.pending, which looks at _leading)

    def recv(self, size: int) -> bytes:
        if self._leading:
            out = self._decompress(self._take_leading())
            if out:
                return out
        while True:
            raw = self.inner.recv(size)
            if not raw:
                return b""
            out = self._decompress(raw)
            if out:
                return out

    def read_some(self, size: int) -> Optional[bytes]:
        """One read of the layer below, decompressed: None at the end of the stream, b""
        when the bytes that came complete no output yet (nsqd's deflate flush marker can
        arrive on its own). Unlike recv, it never waits a second time."""
        if self._leading:
            return self._decompress(self._take_leading())
        raw = self.inner.read_some(size)
        if raw is None:
            return None
        return self._decompress(bytes(raw))  # the layer below may lend a reused buffer

    def sendall(self, data: bytes) -> None:  # replaced per instance in __init__
        self.inner.sendall(self._compress(data))

    def settimeout(self, timeout: Optional[float]) -> None:
        self.inner.settimeout(timeout)
        self._bind_sendall()  # the layer below may write differently with a timeout (SocketStream)

    def pending(self) -> bool:
        # The decompressors return all they can per call; only the bytes read past the
        # upgrade point, or the layer below, can hold data back.
        return bool(self._leading) or self.inner.pending()

    def shutdown(self, write_only: bool = False) -> None:
        self.inner.shutdown(write_only)

    def close(self) -> None:
        self.inner.close()

    @property
    def sock(self) -> Any:
        return self.inner.sock


class DeflateStream(_Layer):
    """Raw deflate (no zlib header), a sync flush after every write, as nsqd expects."""

    def __init__(self, inner: Any, level: int = 6, leading: bytes = b"") -> None:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        compress_part, flush = compressor.compress, compressor.flush
        sync = zlib.Z_SYNC_FLUSH

        def compress(data: bytes) -> bytes:
            return compress_part(data) + flush(sync)

        self._compressor = compressor
        decompressor = self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        decompress_part = decompressor.decompress
        hold = self._hold
        limit = DEFLATE_READ_LIMIT

        def decompress(data: bytes) -> bytes:
            try:
                out = decompress_part(data, limit)
            except zlib.error as exc:
                raise IntegrityError(f"corrupt deflate stream: {exc}") from exc
            if decompressor.unconsumed_tail:
                hold(decompressor.unconsumed_tail)
            return out

        super().__init__(inner, leading, compress, decompress)


class SnappyStream(_Layer):
    """Snappy framing format (what nsqd's golang/snappy reader and writer speak); needs python-snappy."""

    def __init__(self, inner: Any, leading: bytes = b"") -> None:
        try:
            import snappy
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("snappy", True, "python-snappy is not installed; pip install 'nsq_sync[snappy]'") from exc
        self._compressor = snappy.StreamCompressor()
        self._decompressor = SnappyFrameReader(snappy.StreamDecompressor(), snappy.uncompress)
        super().__init__(inner, leading, self._compressor.add_chunk, self._decompressor.decompress)
        self._set_lowat: Optional[Callable[[int], None]] = None
        self._lowat = 1

    def follow_lowat(self, set_lowat: Callable[[int], None]) -> None:
        """Plain TCP (AsyncConn._wake_for_whole_chunks): call *set_lowat* with the socket's
        receive low-water mark now (the handshake may have left part of a chunk) and
        whenever the fewest bytes that can complete a chunk change: 9 between chunks."""
        self._lowat = self._decompressor.least_missing()
        set_lowat(self._lowat)
        self._set_lowat = set_lowat

    def read_some(self, size: int) -> Optional[bytes]:
        out = super().read_some(size)
        set_lowat = self._set_lowat
        if set_lowat is not None:
            # A read can end inside a chunk (TCP cuts long ones), maybe fewer than 9 bytes
            # short of its end: the mark must not ask for more than that, or the reader
            # sleeps until nsqd sends something else (a heartbeat, 30 s on).
            lowat = self._decompressor.least_missing()
            if lowat != self._lowat:
                self._lowat = lowat
                set_lowat(lowat)
        return out


# --------------------------------------------------------------------------- snappy framing, read side
#
# python-snappy's StreamDecompressor (cramjam underneath, python-snappy >= 0.7) builds a
# fresh frame decoder for every call, with ~140 KB of zeroed buffers: 2.5 to 12 us per
# call whatever the input size (the memset shows when the allocator hands out used
# memory, as it does in a long-running process). nsqd answers each PUB with one 10-byte
# chunk, so the publisher paid that on every answer. The chunks are parsed here instead:
# a read whose complete chunks hold little data is decoded in Python (raw blocks through
# snappy.uncompress, CRC-32C from a table, and a chunk identical to one checked recently,
# such as nsqd's every "OK", is not checked again); a read with more data goes to the
# StreamDecompressor in one call, where its fixed cost is small next to the data.

_STREAM_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"
#: reads whose complete chunks hold at most this many bytes of data are decoded here
#: (the table CRC costs ~0.09 us a byte; the StreamDecompressor 2.5 to 12 us a call)
SNAPPY_SMALL_READ = 64
#: the shortest chunk nsqd writes: an 8-byte header and at least one byte of data
SNAPPY_SMALLEST_CHUNK = 9
#: the largest chunk the snappy framing format has for data (a compressed 64 KiB block at its worst,
#: 76,490 bytes, and its checksum); a longer one declared is refused before it is buffered
SNAPPY_LARGEST_CHUNK = 4 + 76490
_KNOWN_CHUNKS = 64  # small chunks remembered as checked (answers and heartbeats repeat)
_MAX_UNCOMPRESSED_CHUNK = 65536  # the framing format's limit on a chunk's data


def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """The framing format's checksum: CRC-32C (Castagnoli) of *data*, masked."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _uncompressed_length(data: bytes, start: int, end: int) -> int:
    """The varint a raw snappy block starts with (its uncompressed length); 0 if malformed."""
    result = shift = 0
    for index in range(start, min(end, start + 5)):
        byte = data[index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
    return 0  # left to snappy.uncompress to reject


class SnappyFrameReader:
    """Incremental reader of the snappy framing format, with StreamDecompressor's contract:
    ``decompress(data)`` returns the data of every chunk *data* completes, b"" while a
    chunk is incomplete. Reads with more than SNAPPY_SMALL_READ bytes of data go to
    *stream_decompressor* (python-snappy's); *uncompress* decodes one raw snappy block."""

    __slots__ = ("_rest", "_stream", "_uncompress", "_known")

    def __init__(self, stream_decompressor: Any, uncompress: Callable[[bytes], bytes]) -> None:
        self._rest = b""
        self._uncompress = uncompress
        self._stream = stream_decompressor
        self._known: Dict[bytes, bytes] = {}
        # It may see the first chunks only after this reader consumed the stream identifier.
        stream_decompressor.decompress(_STREAM_IDENTIFIER)

    def decompress(self, data: bytes) -> bytes:
        if self._rest:
            data = self._rest + data
        else:
            known = self._known.get(data)
            if known is not None:  # the read is one chunk checked before
                return known
        end = len(data)
        offset = 0
        size = 0  # bytes of data in the complete chunks
        while end - offset >= 4:
            length = data[offset + 1] | data[offset + 2] << 8 | data[offset + 3] << 16
            if end - offset - 4 < length:
                if length > SNAPPY_LARGEST_CHUNK:
                    # (buffering it would copy the held part again on every read, and no
                    # decompressor takes it once whole)
                    raise IntegrityError(f"corrupt snappy stream: a chunk of {length} bytes declared, more than the format allows ({SNAPPY_LARGEST_CHUNK})")
                break
            chunk_type = data[offset]
            if chunk_type == 0x01:
                size += length - 4
            elif chunk_type == 0x00:
                size += _uncompressed_length(data, offset + 8, offset + 4 + length)
            offset += 4 + length
        if offset == 0:
            self._rest = data
            return b""
        if offset < end:
            self._rest = data[offset:]
            data = data[:offset]
        else:
            self._rest = b""
        if size > SNAPPY_SMALL_READ:
            try:
                return self._stream.decompress(data)
            except Exception as exc:  # python-snappy's: OSError, ValueError, its UncompressError
                raise IntegrityError(f"corrupt snappy stream: {exc}") from exc
        return self._decode_small(data)

    def least_missing(self) -> int:
        """The fewest bytes that can complete the chunk held back (its size once its length
        is in; 9, the shortest chunk, less what is held, before), or 9 when none is."""
        held = len(self._rest)
        if not held:
            return SNAPPY_SMALLEST_CHUNK
        rest = self._rest
        if held >= 4:
            return max(1, min(SNAPPY_SMALLEST_CHUNK, 4 + (rest[1] | rest[2] << 8 | rest[3] << 16) - held))
        return SNAPPY_SMALLEST_CHUNK - held

    def _decode_small(self, data: bytes) -> bytes:
        out = []
        known = self._known
        offset = 0
        end = len(data)
        while offset < end:
            chunk_type = data[offset]
            length = data[offset + 1] | data[offset + 2] << 8 | data[offset + 3] << 16
            start = offset
            offset += 4 + length
            if chunk_type <= 0x01:
                chunk = data[start:offset]  # the whole read when it is one chunk: no copy
                piece = known.get(chunk)
                if piece is None:
                    piece = self._check(chunk_type, chunk)
                    if len(known) >= _KNOWN_CHUNKS:
                        known.clear()
                    known[chunk] = piece
                out.append(piece)
            elif chunk_type == 0xFF:
                if data[start:offset] != _STREAM_IDENTIFIER:
                    raise IntegrityError("bad snappy stream identifier")
            elif chunk_type < 0x80:
                raise IntegrityError(f"reserved unskippable snappy chunk type {chunk_type:#04x}")
            # 0x80-0xfe: skippable (0xfe is padding)
        return out[0] if len(out) == 1 else b"".join(out)

    def _check(self, chunk_type: int, chunk: bytes) -> bytes:
        """The data of one compressed (0) or uncompressed (1) chunk, its checksum verified."""
        if len(chunk) < 8:
            raise IntegrityError(f"snappy chunk of {len(chunk) - 4} bytes has no checksum")
        body = chunk[8:]
        try:
            piece = body if chunk_type == 0x01 else bytes(self._uncompress(body))
        except Exception as exc:  # python-snappy's UncompressError, or OSError
            raise IntegrityError(f"corrupt snappy chunk: {exc}") from exc
        if len(piece) > _MAX_UNCOMPRESSED_CHUNK:
            raise IntegrityError(f"snappy chunk of {len(piece)} bytes is over the framing format's limit")
        if masked_crc32c(piece) != int.from_bytes(chunk[4:8], "little"):
            raise IntegrityError("snappy chunk checksum mismatch")
        return piece


def snappy_available() -> bool:
    """True when python-snappy can be imported."""
    try:
        import snappy  # noqa: F401
    except ImportError:
        return False
    return True

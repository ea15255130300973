"""Deflate and snappy layers over another stream.

The reader alone uses the decompressor and writers (serialized by the caller's
write lock) alone use the compressor, so the two directions never share state.
Each layer starts with the bytes that were already read past the upgrade
point (``leading``), which belong to the compressed stream.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

from ..errors import ConfigError


class _Layer:
    def __init__(self, inner: Any, leading: bytes = b"") -> None:
        self.inner = inner
        self._leading = leading

    def _decompress(self, data: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compress(self, data: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def recv(self, size: int) -> bytes:
        if self._leading:
            raw, self._leading = self._leading, b""
            out = self._decompress(raw)
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
            raw, self._leading = self._leading, b""
            return self._decompress(raw)
        raw = self.inner.read_some(size)
        if raw is None:
            return None
        return self._decompress(bytes(raw))  # the layer below may lend a reused buffer

    def sendall(self, data: bytes) -> None:
        self.inner.sendall(self._compress(data))

    def settimeout(self, timeout: Optional[float]) -> None:
        self.inner.settimeout(timeout)

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
        super().__init__(inner, leading)
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)

    def _decompress(self, data: bytes) -> bytes:
        return self._decompressor.decompress(data)

    def _compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)


class SnappyStream(_Layer):
    """Snappy framing format (what nsqd's golang/snappy reader and writer speak); needs python-snappy."""

    def __init__(self, inner: Any, leading: bytes = b"") -> None:
        try:
            import snappy
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("snappy", True, "python-snappy is not installed; pip install 'nsq_sync[snappy]'") from exc
        super().__init__(inner, leading)
        self._compressor = snappy.StreamCompressor()
        self._decompressor = snappy.StreamDecompressor()

    def _decompress(self, data: bytes) -> bytes:
        return self._decompressor.decompress(data)

    def _compress(self, data: bytes) -> bytes:
        return self._compressor.add_chunk(data)


def snappy_available() -> bool:
    """True when python-snappy can be imported."""
    try:
        import snappy  # noqa: F401
    except ImportError:
        return False
    return True

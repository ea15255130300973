"""The ceiling: a minimal blocking-socket NSQ client, written for the benchmark only.

No library, no threads beyond what a scenario needs, no error recovery: magic,
IDENTIFY (feature negotiation, optional snappy/deflate), SUB + one standing
RDY, reads in 256 KiB chunks (into one buffer kept per connection), frames parsed
in place, and every FIN produced by one read leaves in one ``sendall``. Publishing is
PUB/MPUB and waiting for OK.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Meter,
    Pacer,
    current_rss_mb,
    latency_summary,
    load_spec,
    make_bodies,
    make_body,
    split_address,
    stamp_of,
    stamped_body,
)

READ_SIZE = 256 * 1024
_header = struct.Struct(">lL")
_size = struct.Struct(">l")
_pack_size = _size.pack
HEARTBEAT = b"_heartbeat_"


def _kept_buffer_recv(sock: socket.socket):
    """recv(size) through one buffer kept for the connection. sock.recv(size) allocates
    *size* bytes on every call; at 256 KiB glibc serves that with mmap, munmap and mremap or
    from the heap, depending on the heap's state (its mmap threshold moves with what was
    freed before), which moved a serial publisher's rate by up to 30% from one process to
    the next: not a ceiling. Copying what came out of the kept buffer costs next to nothing
    for an answer, and a fraction of the read for a consumer's full 256 KiB."""
    view = memoryview(bytearray(READ_SIZE))
    recv_into = sock.recv_into

    def recv(size: int) -> bytes:
        return bytes(view[: recv_into(view, min(size, READ_SIZE))])

    return recv


class MinimalConn:
    def __init__(self, address: str, compression: str = "none", output_buffer_timeout: int = 250) -> None:
        host, port = split_address(address)
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""
        self.send = sock.sendall
        self.recv = self._raw_recv = _kept_buffer_recv(sock)
        sock.sendall(b"  V2")
        identify = {
            "client_id": "minimal",
            "hostname": "minimal",
            "user_agent": "minimal-loop/1",
            "feature_negotiation": True,
            "heartbeat_interval": 30000,
            "output_buffer_timeout": output_buffer_timeout,
            "output_buffer_size": 16384,
            "snappy": compression == "snappy",
            "deflate": compression == "deflate",
            "deflate_level": 6,
        }
        body = json.dumps(identify).encode()
        sock.sendall(b"IDENTIFY\n" + _pack_size(len(body)) + body)
        ftype, data = self.read_frame()
        assert ftype == 0, data
        response = json.loads(data)
        if compression == "snappy":
            assert response.get("snappy"), response
            import snappy

            comp = snappy.StreamCompressor()
            decomp = snappy.StreamDecompressor()
            leftover, self.buf = self.buf, b""
            self._wrap(lambda d: comp.add_chunk(d), decomp.decompress, leftover)
        elif compression == "deflate":
            assert response.get("deflate"), response
            comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            decomp = zlib.decompressobj(-zlib.MAX_WBITS)
            leftover, self.buf = self.buf, b""
            self._wrap(lambda d: comp.compress(d) + comp.flush(zlib.Z_SYNC_FLUSH), decomp.decompress, leftover)
        if compression != "none":
            ftype, data = self.read_frame()
            assert (ftype, data) == (0, b"OK"), (ftype, data)

    def _wrap(self, compress, decompress, leftover: bytes) -> None:
        sendall = self.sock.sendall
        raw_recv = self._raw_recv
        pending = [decompress(leftover)] if leftover else []

        def send(data: bytes) -> None:
            sendall(compress(data))

        def recv(size: int) -> bytes:
            if pending:
                out = pending.pop()
                if out:
                    return out
            while True:
                raw = raw_recv(size)
                if not raw:
                    return b""
                out = decompress(raw)
                if out:
                    return out

        self.send = send
        self.recv = recv

    def read_frame(self):
        """One frame (type, data); heartbeats are answered and skipped."""
        while True:
            buf = self.buf
            while len(buf) < 8 or len(buf) < 4 + _size.unpack_from(buf)[0]:
                chunk = self.recv(READ_SIZE)
                if not chunk:
                    raise ConnectionError("nsqd closed the connection")
                buf += chunk
            size, ftype = _header.unpack_from(buf)
            data = buf[8 : 4 + size]
            self.buf = buf[4 + size :]
            if ftype == 0 and data == HEARTBEAT:
                self.send(b"NOP\n")
                continue
            if ftype == 1:
                raise RuntimeError(f"nsqd error: {data!r}")
            return ftype, data

    def read_oks(self, count: int) -> int:
        """Read *count* response frames (all must be OK); returns count."""
        got = 0
        buf = self.buf
        recv = self.recv
        while got < count:
            off = 0
            end = len(buf)
            while end - off >= 8:
                size, ftype = _header.unpack_from(buf, off)
                fend = off + 4 + size
                if fend > end:
                    break
                if ftype != 0:
                    raise RuntimeError(f"nsqd error: {buf[off + 8:fend]!r}")
                if size == 15 and buf[off + 8 : fend] == HEARTBEAT:
                    self.send(b"NOP\n")
                else:
                    got += 1
                off = fend
            buf = buf[off:]
            if got < count:
                chunk = recv(READ_SIZE)
                if not chunk:
                    raise ConnectionError("nsqd closed the connection")
                buf += chunk
        self.buf = buf
        return got

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def pub_cmd(topic: str, body: bytes) -> bytes:
    return b"PUB " + topic.encode() + b"\n" + _pack_size(len(body)) + body


def mpub_cmd(topic: str, bodies) -> bytes:
    parts = [b"".join(_pack_size(len(b)) + b for b in bodies)]
    payload = _pack_size(len(bodies)) + parts[0]
    return b"MPUB " + topic.encode() + b"\n" + _pack_size(len(payload)) + payload


def subscribe(conn: MinimalConn, topic: str, channel: str) -> None:
    conn.send(b"SUB %s %s\n" % (topic.encode(), channel.encode()))
    ftype, data = conn.read_frame()
    assert (ftype, data) == (0, b"OK"), (ftype, data)


def consume(conn: MinimalConn, n: int, mif: int, on_message=None) -> int:
    """Send RDY once, then read, FIN everything a read brought in one write, until n messages."""
    conn.send(b"RDY %d\n" % mif)
    recv = conn.recv
    send = conn.send
    unpack = _header.unpack_from
    buf = conn.buf
    count = 0
    while count < n:
        data = recv(READ_SIZE)
        if not data:
            raise ConnectionError("nsqd closed the connection")
        if buf:
            data = buf + data
        view = memoryview(data)
        off = 0
        end = len(data)
        out = []
        append = out.append
        while end - off >= 8:
            size, ftype = unpack(data, off)
            fend = off + 4 + size
            if fend > end:
                break
            if ftype == 2:
                if on_message is not None:
                    on_message(view[off + 34 : fend])
                append(b"FIN ")
                append(view[off + 18 : off + 34])
                append(b"\n")
                count += 1
            elif ftype == 0:
                if view[off + 8 : fend] == HEARTBEAT:
                    append(b"NOP\n")
            else:
                raise RuntimeError(f"nsqd error: {bytes(view[off + 8:fend])!r}")
            off = fend
        buf = data[off:] if off < end else b""
        if out:
            send(b"".join(out))
    conn.buf = buf
    return count


def main() -> None:
    spec = load_spec()
    scenario = spec["scenario"]
    address = spec["address"]
    topic = spec["topic"]
    n = spec["n"]
    size = spec["body_size"]
    compression = spec.get("compression", "none")
    obt = spec.get("output_buffer_timeout", 250)
    meter = Meter()

    if scenario == "rss":
        conn = MinimalConn(address)
        conn.send(pub_cmd(topic, make_body(size)))
        conn.read_oks(1)
        meter.begin()
        meter.end(1, rss_now_mb=current_rss_mb())
        return

    if scenario == "consume":
        conn = MinimalConn(address, compression, obt)
        meter.begin()
        subscribe(conn, topic, spec["channel"])
        count = consume(conn, n, spec["max_in_flight"])
        meter.end(count)
        conn.close()
        return

    if scenario == "latency":
        rate = spec["rate"]
        latencies = []
        sub = MinimalConn(address, compression, obt)
        pub = MinimalConn(address, compression, obt)
        now = time.perf_counter

        def on_message(body) -> None:
            latencies.append(now() - stamp_of(body))

        pacer = Pacer(rate, n)
        failure = []

        def publisher() -> None:
            try:
                pacer.start()
                while not pacer.done:
                    for _ in range(pacer.due()):
                        pub.send(pub_cmd(topic, stamped_body(size)))
                        pub.read_oks(1)
                        pacer.sent += 1
                    time.sleep(pacer.wait_time())
            except BaseException as exc:  # pragma: no cover - reported
                failure.append(exc)

        meter.begin()
        thread = threading.Thread(target=publisher, daemon=True)
        # subscribe first, so nothing waits in the channel before we read
        subscribe(sub, topic, spec["channel"])
        thread.start()
        count = consume(sub, n, spec["max_in_flight"], on_message)
        thread.join()
        if failure:
            raise failure[0]
        meter.end(count, **latency_summary(latencies))
        return

    conn = MinimalConn(address, compression, obt)
    if scenario == "pub_serial":
        bodies = make_bodies(n, size)
        cmds = [pub_cmd(topic, b) for b in bodies]
        send = conn.send
        read_oks = conn.read_oks
        meter.begin()
        for cmd in cmds:
            send(cmd)
            read_oks(1)
        meter.end(n)
    elif scenario == "pub_batch":
        # `window` PUBs written together, then wait for all their OKs (a round)
        window = spec["window"]
        bodies = make_bodies(n, size)
        meter.begin()
        for start in range(0, n, window):
            chunk = bodies[start : start + window]
            conn.send(b"".join(pub_cmd(topic, b) for b in chunk))
            conn.read_oks(len(chunk))
        meter.end(n)
    elif scenario == "pub_concurrent":
        # the ceiling for `concurrency` blocking publishers on one connection:
        # a sliding window of that many outstanding PUBs
        window = spec["concurrency"]

        def publish_all(chunk):
            count = len(chunk)
            if not count:
                return
            first = min(window, count)
            conn.send(b"".join(pub_cmd(topic, b) for b in chunk[:first]))
            sent = first
            acked = 0
            while acked < count:
                # read whatever OKs are there (at least one), refill the window
                got = conn.read_oks(1)
                got += _drain_oks(conn)
                acked += got
                refill = min(got, count - sent)
                if refill:
                    conn.send(b"".join(pub_cmd(topic, b) for b in chunk[sent : sent + refill]))
                    sent += refill

        bodies = make_bodies(n, size)
        publish_all(make_bodies(spec.get("warmup", 0), size))  # untimed (see run.py)
        meter.begin()
        publish_all(bodies)
        meter.end(n)
    elif scenario == "mpub":
        batch = spec["batch"]
        bodies = make_bodies(n, size)
        meter.begin()
        for start in range(0, n, batch):
            conn.send(mpub_cmd(topic, bodies[start : start + batch]))
            conn.read_oks(1)
        meter.end(n)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    conn.close()


def _drain_oks(conn: MinimalConn) -> int:
    """Count complete OK frames already buffered, without blocking."""
    got = 0
    buf = conn.buf
    off = 0
    end = len(buf)
    while end - off >= 8:
        size, ftype = _header.unpack_from(buf, off)
        fend = off + 4 + size
        if fend > end:
            break
        if ftype != 0:
            raise RuntimeError(f"nsqd error: {buf[off + 8:fend]!r}")
        if buf[off + 8 : fend] != HEARTBEAT:
            got += 1
        off = fend
    conn.buf = buf[off:]
    return got


if __name__ == "__main__":
    main()

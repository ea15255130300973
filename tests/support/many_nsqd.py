"""Many fake nsqd behind one thread: a consumer's view of a large cluster (no nsq_sync import).

``ManyNsqd(n)`` listens on *n* loopback ports and serves each connection the handful of
commands a Reader sends (magic, ``IDENTIFY``, ``SUB``, ``RDY``, ``FIN``/``REQ``/``TOUCH``,
``NOP``, ``CLS``) from ONE selector loop over non-blocking sockets, so thousands of "nsqd"
cost one thread and two sockets each, not a process (or a thread per session, as
``fake_nsqd.FakeNsqd``). It sends no messages: it is for the Reader's connection set and RDY
bookkeeping (``benchmarks/rdy_scale.py``, the RDY scaling tests).

What it keeps, as nsqd would see it (commands applied in the order the loop reads them)::

    server = ManyNsqd(300).start()
    server.addresses             # ["127.0.0.1:<port>", ...], one per fake nsqd
    server.producers             # the same as nsqlookupd /lookup lists them (the open ones)
    server.status()              # {"subscribed", "total_rdy", "peak_total_rdy", "sessions", ...}
    server.wait_until(lambda s: s["subscribed"] == 300 and s["total_rdy"] == 300, timeout=30)
    server.close_ports(server.ports[:100])  # those nsqd go away: connections closed, new ones refused
    server.rdy_by_port()         # {port: RDY} of the subscribed sessions
    server.stop()

``peak_total_rdy`` is the highest sum of RDY over every subscribed session the loop ever
saw: what a Reader's ``max_in_flight`` must bound on the server side.

Run as a script (``python many_nsqd.py N``), it serves N ports in its own process: it prints
one JSON line (``{"addresses": [...]}``), then answers each line it reads on stdin
(``status``, or ``close K``: :meth:`close_ports` of the first K ports) with a JSON line of
:meth:`status`, and exits at end of input. With
``--lookupd`` it also serves nsqlookupd's ``/lookup`` listing every port (``"lookupd"`` in
the first line). ``benchmarks/rdy_scale.py`` uses that, to keep the server's CPU out of
the measured process.

Works unchanged (as a greenlet) under gevent monkey-patching.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

MAGIC_V2 = b"  V2"
HEARTBEAT_EVERY = 10.0  # seconds (a client's default heartbeat_interval is 30)
IDENTIFY_RESPONSE: Dict[str, Any] = {
    "max_rdy_count": 2500,
    "version": "1.3.0",
    "max_msg_timeout": 900000,
    "msg_timeout": 60000,
    "tls_v1": False,
    "deflate": False,
    "deflate_level": 6,
    "max_deflate_level": 6,
    "snappy": False,
    "sample_rate": 0,
    "auth_required": False,
    "output_buffer_size": 16384,
    "output_buffer_timeout": 250,
}


def _frame(frame_type: int, data: bytes) -> bytes:
    return struct.pack(">ii", len(data) + 4, frame_type) + data


OK = _frame(0, b"OK")
CLOSE_WAIT = _frame(0, b"CLOSE_WAIT")
HEARTBEAT = _frame(0, b"_heartbeat_")


class _Session:
    __slots__ = ("sock", "inbuf", "outbuf", "magic", "subscribed", "rdy", "body_for", "port")

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.magic = False
        self.subscribed = False
        self.rdy = 0
        self.body_for: Optional[bytes] = None  # a command line whose body is still to come


class ManyNsqd:
    def __init__(self, ports: int, max_rdy_count: int = 2500) -> None:
        self._identify = json.dumps(dict(IDENTIFY_RESPONSE, max_rdy_count=max_rdy_count)).encode()
        self.listeners: List[socket.socket] = []
        for _ in range(ports):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.setblocking(False)
            self.listeners.append(listener)
        self.ports = [s.getsockname()[1] for s in self.listeners]
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.producers = [{"broadcast_address": "127.0.0.1", "tcp_port": port, "http_port": 1} for port in self.ports]
        self._sessions: Dict[int, _Session] = {}  # by fd
        self._cond = threading.Condition()
        self._subscribed = 0
        self._total_rdy = 0
        self._peak_total_rdy = 0
        self._accepted = 0
        self._rdy_commands = 0
        self._bad: List[str] = []
        self._stopping = False
        self._actions: List[Callable[[selectors.BaseSelector], None]] = []  # run by the loop
        self._waker_r, self._waker_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public
    def start(self) -> "ManyNsqd":
        self._thread = threading.Thread(target=self._loop, name="many_nsqd", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        try:
            self._waker_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        for listener in self.listeners:
            listener.close()
        self._waker_r.close()
        self._waker_w.close()

    def __enter__(self) -> "ManyNsqd":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def close_ports(self, ports: List[int], timeout: float = 10.0) -> None:
        """Those nsqd go away: their listeners close (a new connection is refused) and so do
        their sessions (the client reads the end of the stream). Returns once done."""
        done = threading.Event()
        gone = set(ports)

        def close(selector: selectors.BaseSelector) -> None:
            for listener in [s for s in self.listeners if s.getsockname()[1] in gone]:
                selector.unregister(listener)
                listener.close()
                self.listeners.remove(listener)
            # (nsqlookupd forgets an nsqd once its connection to it ends)
            self.producers = [p for p in self.producers if p["tcp_port"] not in gone]
            for session in [s for s in self._sessions.values() if s.port in gone]:
                self._drop(selector, session)
            done.set()

        with self._cond:
            self._actions.append(close)
        self._waker_w.send(b"x")
        if not done.wait(timeout):
            raise AssertionError("many_nsqd: close_ports was not applied")

    def rdy_by_port(self) -> Dict[int, int]:
        """The RDY of every subscribed session, by the port it came to."""
        with self._cond:
            return {s.port: s.rdy for s in self._sessions.values() if s.subscribed}

    def status(self) -> Dict[str, Any]:
        with self._cond:
            return {
                "sessions": len(self._sessions),
                "accepted": self._accepted,
                "subscribed": self._subscribed,
                "total_rdy": self._total_rdy,
                "peak_total_rdy": self._peak_total_rdy,
                "rdy_commands": self._rdy_commands,
                "bad": list(self._bad),
            }

    def wait_until(self, predicate: Callable[[Dict[str, Any]], bool], timeout: float = 10.0) -> Dict[str, Any]:
        """Block until predicate(status()) is true (woken by each change); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                status = self.status()
                if predicate(status):
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"many_nsqd: condition not met in {timeout}s: {status}")
                self._cond.wait(left)

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        selector = selectors.DefaultSelector()
        for listener in self.listeners:
            selector.register(listener, selectors.EVENT_READ, None)
        selector.register(self._waker_r, selectors.EVENT_READ, "wake")
        next_beat = time.monotonic() + HEARTBEAT_EVERY
        try:
            while not self._stopping:
                for key, events in selector.select(max(0.0, next_beat - time.monotonic())):
                    if key.data == "wake":
                        try:
                            self._waker_r.recv(4096)
                        except OSError:
                            pass
                        with self._cond:
                            actions, self._actions = self._actions, []
                        for action in actions:
                            action(selector)
                        continue
                    if key.data is None:
                        self._accept(selector, key.fileobj)  # type: ignore[arg-type]
                        continue
                    session: _Session = key.data
                    if events & selectors.EVENT_READ:
                        self._read(selector, session)
                    if events & selectors.EVENT_WRITE and session.sock.fileno() >= 0:
                        self._flush(selector, session)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_EVERY
                    for session in list(self._sessions.values()):
                        if session.subscribed:
                            self._send(selector, session, HEARTBEAT)
        finally:
            for session in list(self._sessions.values()):
                self._drop(selector, session)
            selector.close()

    def _accept(self, selector: selectors.BaseSelector, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(sock, listener.getsockname()[1])
            with self._cond:
                self._sessions[sock.fileno()] = session
                self._accepted += 1
            selector.register(sock, selectors.EVENT_READ, session)

    def _read(self, selector: selectors.BaseSelector, session: _Session) -> None:
        try:
            data = session.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, session)
            return
        session.inbuf += data
        with self._cond:
            changed = self._parse_locked(selector, session)
            if changed:
                self._cond.notify_all()

    def _parse_locked(self, selector: selectors.BaseSelector, session: _Session) -> bool:
        buf = session.inbuf
        changed = False
        if not session.magic:
            if len(buf) < 4:
                return False
            if bytes(buf[:4]) != MAGIC_V2:
                self._bad.append(f"port {session.port}: bad magic {bytes(buf[:4])!r}")
            del buf[:4]
            session.magic = True
        while True:
            if session.body_for is not None:
                if len(buf) < 4:
                    return changed
                size = struct.unpack(">i", buf[:4])[0]
                if len(buf) < 4 + size:
                    return changed
                body = bytes(buf[4 : 4 + size])
                del buf[: 4 + size]
                line, session.body_for = session.body_for, None
                self._command_locked(selector, session, line, body)
                changed = True
                continue
            end = buf.find(b"\n")
            if end < 0:
                return changed
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.split(b" ", 1)[0] in (b"IDENTIFY", b"AUTH"):
                session.body_for = line
                continue
            self._command_locked(selector, session, line, None)
            changed = True

    def _command_locked(self, selector: selectors.BaseSelector, session: _Session, line: bytes, body: Optional[bytes]) -> None:
        name, _, rest = line.partition(b" ")
        if name == b"IDENTIFY":
            wanted = json.loads(body or b"{}").get("feature_negotiation")
            self._send(selector, session, _frame(0, self._identify) if wanted else OK)
        elif name == b"SUB":
            if not session.subscribed:
                session.subscribed = True
                self._subscribed += 1
            self._send(selector, session, OK)
        elif name == b"RDY":
            count = int(rest)
            self._rdy_commands += 1
            if not session.subscribed:
                self._bad.append(f"port {session.port}: RDY before SUB")
            self._total_rdy += count - session.rdy
            session.rdy = count
            if self._total_rdy > self._peak_total_rdy:
                self._peak_total_rdy = self._total_rdy
        elif name == b"CLS":
            self._total_rdy -= session.rdy
            session.rdy = 0
            self._send(selector, session, CLOSE_WAIT)
        elif name in (b"NOP", b"FIN", b"REQ", b"TOUCH"):
            pass
        else:
            self._bad.append(f"port {session.port}: unexpected {line[:40]!r}")

    def _send(self, selector: selectors.BaseSelector, session: _Session, data: bytes) -> None:
        if not session.outbuf:
            try:
                sent = session.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # (its read sees the end)
            data = data[sent:]
            if not data:
                return
            selector.modify(session.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, session)
        session.outbuf += data

    def _flush(self, selector: selectors.BaseSelector, session: _Session) -> None:
        try:
            sent = session.sock.send(session.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        del session.outbuf[:sent]
        if not session.outbuf:
            selector.modify(session.sock, selectors.EVENT_READ, session)

    def _drop(self, selector: selectors.BaseSelector, session: _Session) -> None:
        try:
            selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        with self._cond:
            if self._sessions.pop(session.sock.fileno(), None) is not None:
                if session.subscribed:
                    self._subscribed -= 1
                self._total_rdy -= session.rdy
                session.rdy = 0
                self._cond.notify_all()
        session.sock.close()


def _serve_lookupd(server: ManyNsqd) -> str:
    """nsqlookupd's /lookup (any path) listing *server*'s producers, in a thread; returns "host:port"."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"channels": [], "producers": server.producers}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http_server.serve_forever, name="many_nsqd-lookupd", daemon=True).start()
    return f"127.0.0.1:{http_server.server_address[1]}"


def main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ports", type=int)
    parser.add_argument("--lookupd", action="store_true", help="serve nsqlookupd's /lookup listing every port")
    parser.add_argument("--max-rdy-count", type=int, default=2500)
    args = parser.parse_args(argv)
    server = ManyNsqd(args.ports, max_rdy_count=args.max_rdy_count).start()
    hello: Dict[str, Any] = {"addresses": server.addresses}
    if args.lookupd:
        hello["lookupd"] = _serve_lookupd(server)
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words == ["status"]:
            print(json.dumps(server.status()), flush=True)
        elif len(words) == 2 and words[0] == "close":  # close the first K ports; answers the status
            server.close_ports(server.ports[: int(words[1])])
            print(json.dumps(server.status()), flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Bad input to the protocol encoders, the pynsq-named helpers and the HTTP clients: each case
raised an untyped error (UnicodeEncodeError, a bare ValueError/TypeError/AttributeError) or was
accepted and sent something nsqd rejects or misreads. Now each raises ConfigError naming the
parameter (TypeError naming it for a wrong type) before anything is sent, and the client still
works afterwards (nothing lost).

"Nothing sent" is checked on the wire: the Writer publishes to the scripted fake nsqd, which
records every command; the HTTP clients talk to a local http.server that counts connections.
"""

from __future__ import annotations

import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

import nsq_sync
from nsq_sync import LookupdClient, NsqdHTTPClient, Writer
from nsq_sync.errors import ConfigError, IntegrityError
from nsq_sync.httpapi import HTTPClient
from nsq_sync.protocol import commands

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from bad_input import check_named, connected_writer, published, serving_fake  # noqa: E402
from fake_nsqd import FakeNsqd  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MSG_ID = b"0123456789abcdef"
SURROGATE = "ok \ud800 then more"  # a lone surrogate, e.g. from os.fsdecode of undecodable bytes


def raises_named(call: Callable[[], Any], error: type, param: str) -> BaseException:
    with pytest.raises(error) as info:
        call()
    check_named(info.value, param)
    return info.value


def collect(cases: List[Tuple[str, Callable[[], Any], type, str]]) -> List[str]:
    """Run every case; the list of those that did not raise *error* naming *param*."""
    failures = []
    for label, call, error, param in cases:
        try:
            raises_named(call, error, param)
        except BaseException as exc:  # AssertionError, pytest's Failed, or the wrong exception
            failures.append(f"{label}: {type(exc).__name__}: {exc}"[:300])
    return failures


# =========================================================================== 1. str bodies not encodable as UTF-8
ENCODER_SURROGATES: List[Tuple[str, Callable[[], Any], type, str]] = [
    ("commands.pub", lambda: commands.pub("t", SURROGATE), ConfigError, "body"),
    ("commands.mpub", lambda: commands.mpub("t", [b"a", SURROGATE]), ConfigError, "msgs[1]"),
    ("commands.mpub generator", lambda: commands.mpub("t", iter(["a", SURROGATE])), ConfigError, "msgs[1]"),
    ("commands.mpub_parts", lambda: commands.mpub_parts("t", [SURROGATE]), ConfigError, "msgs[0]"),
    ("commands.dpub", lambda: commands.dpub("t", 5, SURROGATE), ConfigError, "body"),
    ("commands.auth", lambda: commands.auth("\udcff"), ConfigError, "auth_secret"),
    ("commands.to_body", lambda: commands.to_body("\udcff", "whatever"), ConfigError, "whatever"),
    ("nsq_sync.pub", lambda: nsq_sync.pub("t", "\ud800"), ConfigError, "body"),
    ("nsq_sync.mpub", lambda: nsq_sync.mpub("t", ["\ud800"]), ConfigError, "msgs[0]"),
    ("nsq_sync.dpub", lambda: nsq_sync.dpub("t", 0, "\ud800"), ConfigError, "body"),
    ("nsq_sync.auth", lambda: nsq_sync.auth("\ud800"), ConfigError, "auth_secret"),
]


@pytest.mark.parametrize("call,error,param", [c[1:] for c in ENCODER_SURROGATES], ids=[c[0] for c in ENCODER_SURROGATES])
def test_str_not_encodable_as_utf8_is_a_config_error(call: Callable[[], Any], error: type, param: str) -> None:
    exc = raises_named(call, error, param)
    assert "not encodable as UTF-8" in str(exc) and "bytes" in str(exc), str(exc)


def test_auth_secret_not_encodable_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        commands.auth("s3cret\udcff")
    assert "s3cret" not in str(info.value) and "s3cret" not in repr(info.value.value)


def test_str_bodies_that_encode_still_work() -> None:
    assert commands.pub("t", "\u00e9") == b"PUB t\n\x00\x00\x00\x02\xc3\xa9"
    assert commands.auth("\u00e9") == b"AUTH\n\x00\x00\x00\x02\xc3\xa9"
    assert commands.mpub("t", ["\u00e9", b"z"]) == commands.mpub("t", [b"\xc3\xa9", b"z"])


# --------------------------------------------------------------------------- through the Writer: nothing reaches nsqd
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeNsqd]:
    yield from serving_fake()


@pytest.fixture(scope="module")
def writer(fake: FakeNsqd) -> Iterator[Writer]:
    yield from connected_writer(fake)


WRITER_SURROGATES: List[Tuple[str, Callable[[Writer], Any], str]] = [
    ("pub", lambda w: w.pub("t", SURROGATE), "body"),
    ("mpub", lambda w: w.mpub("t", [b"a", SURROGATE]), "msgs[1]"),
    ("dpub", lambda w: w.dpub("t", 10, SURROGATE), "body"),
    ("pub_async", lambda w: w.pub_async("t", SURROGATE), "body"),
    ("mpub_async", lambda w: w.mpub_async("t", [SURROGATE]), "msgs[0]"),
    ("dpub_async", lambda w: w.dpub_async("t", 10, SURROGATE), "body"),
]


@pytest.mark.parametrize("call,param", [c[1:] for c in WRITER_SURROGATES], ids=[c[0] for c in WRITER_SURROGATES])
def test_writer_refuses_str_not_encodable_before_sending(fake: FakeNsqd, writer: Writer, call: Callable[[Writer], Any], param: str) -> None:
    before = published(fake)
    raises_named(lambda: call(writer), ConfigError, param)
    assert published(fake) == before, "something was published for a bad call"
    conn = list(writer.conns.values())[0]
    assert conn.connected() and conn.pending_requests == 0
    # nothing lost: the connection still publishes
    assert writer.pub("t", "\u00e9 good") == b"OK"
    fake.wait_until(lambda: len(published(fake)) > len(before), what="the good PUB")
    assert published(fake)[len(before):] == [b"PUB t"]


# =========================================================================== 2. message ids
BAD_IDS = [
    "\u00e9" * 16,  # was sent as FIN ???????????????? (encode("ascii", "replace"))
    "0123456789abcd\u00e9f",
    "0123456789abcde\r",
    b"0123456789abcde\r",  # nsqd strips the \r: a 15-byte id, a fatal E_INVALID
    bytearray(b"0123456789abcde\r"),
    memoryview(b"\r123456789abcdef"),
    b"0123456789abcde\t",
    b"0123456789abcde\x00",
    b"0123456789abcde\x7f",
    b"0123456789abcde\xff",
    b"0123456789abcde ",
    b"0123456789abcde\n",
]


@pytest.mark.parametrize("message_id", BAD_IDS, ids=repr)
def test_message_ids_that_are_not_16_printable_ascii_characters_are_refused(message_id: Any) -> None:
    builders = [
        ("commands.fin", commands.fin),
        ("commands.touch", commands.touch),
        ("commands.req", lambda i: commands.req(i, 0)),
        ("nsq_sync.finish", nsq_sync.finish),
        ("nsq_sync.touch", nsq_sync.touch),
        ("nsq_sync.requeue", nsq_sync.requeue),
    ]
    failures = collect([(label, lambda b=build: b(message_id), ConfigError, "message_id") for label, build in builders])
    assert not failures, failures


@pytest.mark.parametrize(
    "message_id",
    [MSG_ID, MSG_ID.decode(), bytearray(MSG_ID), memoryview(MSG_ID), b"0123456789ABCDEF", b"!~0123456789-._/"],
    ids=repr,
)
def test_good_message_ids_are_sent_unchanged(message_id: Any) -> None:
    raw = bytes(message_id, "ascii") if isinstance(message_id, str) else bytes(message_id)
    assert commands.fin(message_id) == b"FIN %s\n" % raw
    assert commands.touch(message_id) == b"TOUCH %s\n" % raw
    assert commands.req(message_id, 5) == b"REQ %s 5\n" % raw


def test_fin_fast_path_takes_ids_as_nsqd_sends_them() -> None:
    # FIN is sent once per consumed message: an id of 16 hex digits in bytes is returned as is,
    # without the regex of the slow path.
    assert commands._message_id(MSG_ID) is MSG_ID
    for build in (commands.fin, commands.touch):
        with pytest.raises(TypeError, match="message id"):
            build(None)


# =========================================================================== 3. IDENTIFY data
IDENTIFY_BAD: List[Tuple[str, Callable[[], Any], type, str]] = [
    ("nan", lambda: nsq_sync.identify({"a": math.nan}), ConfigError, "data"),
    ("inf", lambda: nsq_sync.identify({"a": math.inf}), ConfigError, "data"),
    ("nested -inf", lambda: commands.identify({"a": [1, {"b": -math.inf}]}), ConfigError, "data"),
    ("str", lambda: nsq_sync.identify("abc"), TypeError, "data"),
    ("None", lambda: nsq_sync.identify(None), TypeError, "data"),
    ("list of pairs", lambda: commands.identify([("a", 1)]), TypeError, "data"),
    ("set value", lambda: commands.identify({"a": {1, 2}}), TypeError, "data"),
    ("bytes value", lambda: commands.identify({"a": b"x"}), TypeError, "data"),
    ("tuple key", lambda: commands.identify({(1, 2): 1}), TypeError, "data"),
]


@pytest.mark.parametrize("call,error,param", [c[1:] for c in IDENTIFY_BAD], ids=[c[0] for c in IDENTIFY_BAD])
def test_identify_refuses_data_that_is_not_json(call: Callable[[], Any], error: type, param: str) -> None:
    raises_named(call, error, param)


def test_identify_still_encodes_good_data() -> None:
    body = b'{"a":1.5,"b":"\\u00e9"}'
    assert commands.identify({"a": 1.5, "b": "\u00e9"}) == b"IDENTIFY\n" + len(body).to_bytes(4, "big") + body


# =========================================================================== 4. frame helpers
@pytest.mark.parametrize("data", [None, 5, "\x00\x00\x00\x00OK", [0, 0, 0, 0]], ids=repr)
def test_frame_helpers_name_data_for_a_wrong_type(data: Any) -> None:
    failures = collect(
        [
            ("decode_message", lambda: nsq_sync.decode_message(data), TypeError, "data"),
            ("unpack_response", lambda: nsq_sync.unpack_response(data), TypeError, "data"),
        ]
    )
    assert not failures, failures


def test_frame_helpers_take_any_bytes_like() -> None:
    frame = b"\x00\x00\x00\x00OK"
    for data in (frame, bytearray(frame), memoryview(frame)):
        assert nsq_sync.unpack_response(data) == (0, b"OK")
    message = (7).to_bytes(8, "big") + (2).to_bytes(2, "big") + MSG_ID + b"body"
    for data in (message, bytearray(message), memoryview(message)):
        decoded = nsq_sync.decode_message(data)
        assert (decoded.id, decoded.body, decoded.timestamp, decoded.attempts) == (MSG_ID, b"body", 7, 2)
    with pytest.raises(IntegrityError):
        nsq_sync.unpack_response(b"ab")


# =========================================================================== 5 and 6. HTTP clients
class CountingServer(ThreadingHTTPServer):
    """http.server on 127.0.0.1:0 answering 200 as nsqd would (``OK`` to /pub and /mpub, an empty
    body to other POSTs, ``{}`` to GETs); counts connections and requests."""

    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        self.requests: List[Tuple[str, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.requests.append((self.command, self.path, self.rfile.read(length) if length else b""))
                if self.command == "GET":
                    body = b"{}"
                else:
                    body = b"OK" if self.path.split("?")[0] in ("/pub", "/mpub") else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

        super().__init__(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


@pytest.fixture
def http_server() -> Iterator[CountingServer]:
    made = CountingServer()
    yield made
    made.close()


HTTP_CTOR_BAD: List[Tuple[Any, dict, str]] = [
    ("127.0.0.1:4151/\u00e9", {}, "address"),
    ("http://127.0.0.1:4151/caf\u00e9", {}, "address"),
    ("127.0.0.1:4151/a\x00", {}, "address"),
    ("127.0.0.1:4151/a\x7f", {}, "address"),
    ("http://[fe80::1%\u00e9]:4151", {}, "address"),
    ("127.0.0.1:4151", {"headers": {"X-Token": "\ud800"}}, "headers"),
    ("127.0.0.1:4151", {"headers": {"X-Token": "\u20ac"}}, "headers"),
    ("127.0.0.1:4151", {"headers": {"X-Token\n": "a"}}, "headers"),
    ("127.0.0.1:4151", {"headers": {"X-\u00e9": "a"}}, "headers"),
]


@pytest.mark.parametrize("address,kwargs,param", HTTP_CTOR_BAD, ids=[f"{a!r}-{k!r}"[:60] for a, k, _ in HTTP_CTOR_BAD])
def test_http_clients_refuse_what_http_client_cannot_send_at_construction(address: Any, kwargs: dict, param: str) -> None:
    for cls in (HTTPClient, NsqdHTTPClient, LookupdClient):
        raises_named(lambda: cls(address, **kwargs), ConfigError, param)


def test_header_value_that_is_refused_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        NsqdHTTPClient("127.0.0.1:4151", headers={"Authorization": "Bearer s3cret\u20ac"})
    assert "s3cret" not in str(info.value)


def test_latin1_header_values_and_ascii_paths_are_still_accepted(http_server: CountingServer) -> None:
    client = HTTPClient(f"http://{http_server.address}/prefix%C3%A9", headers={"X-Name": "caf\u00e9"})
    assert client.get_json("/x", {"q": "\u00e9"}) == {}
    assert http_server.requests == [("GET", "/prefix%C3%A9/x?q=%C3%A9", b"")]


def test_http_calls_refuse_bad_input_before_connecting(http_server: CountingServer) -> None:
    base = HTTPClient(http_server.address, timeout=2)
    nsqd = NsqdHTTPClient(http_server.address, timeout=2)
    lookupd = LookupdClient(http_server.address, timeout=2)
    cases: List[Tuple[str, Callable[[], Any], type, str]] = [
        # finding 1: bodies not encodable as UTF-8
        ("nsqd.pub surrogate", lambda: nsqd.pub("t", SURROGATE), ConfigError, "body"),
        ("nsqd.mpub surrogate", lambda: nsqd.mpub("t", [b"a", SURROGATE]), ConfigError, "bodies[1]"),
        ("nsqd.mpub text surrogate", lambda: nsqd.mpub("t", [SURROGATE], binary=False), ConfigError, "bodies[0]"),
        # finding 5: "$" matched before a trailing newline
        ("tombstone node newline", lambda: lookupd.tombstone_topic("t", "h:4151\n"), ConfigError, "node"),
        ("tombstone ipv6 node newline", lambda: lookupd.tombstone_topic("t", "[::1]:4151\n"), ConfigError, "node"),
        ("tombstone node non-ascii digits", lambda: lookupd.tombstone_topic("t", "h:\uff14\uff11\uff15\uff11"), ConfigError, "node"),
        # finding 6: request()'s own arguments
        ("method CRLF", lambda: base.request("GET\r\n", "/ping"), ConfigError, "method"),
        ("method with space", lambda: base.request("GET /x", "/ping"), ConfigError, "method"),
        ("method None", lambda: base.request(None, "/ping"), TypeError, "method"),
        ("params int", lambda: base.get_json("/stats", params=5), TypeError, "params"),
        ("params list", lambda: base.get_text("/stats", params=[("a", "b")]), TypeError, "params"),
        ("params surrogate", lambda: base.get_json("/stats", params={"topic": "\ud800"}), ConfigError, "params"),
        ("path non-ascii", lambda: base.get_json("/caf\u00e9"), ConfigError, "path"),
        ("path space", lambda: base.get_json("/a b"), ConfigError, "path"),
        ("path CRLF", lambda: base.get_json("/a\r\nX: y"), ConfigError, "path"),
        ("path None", lambda: base.get_json(None), TypeError, "path"),
        # a path without its leading "/" was glued to the port: "http://127.0.0.1:4151ping"
        ("path without /", lambda: base.get_text("ping"), ConfigError, "path"),
        ("path empty", lambda: base.request("GET", ""), ConfigError, "path"),
        ("url_for path without /", lambda: base.url_for("stats"), ConfigError, "path"),
        ("body str", lambda: base.post("/pub", {"topic": "t"}, "text"), TypeError, "body"),
        ("body int", lambda: base.post("/pub", {"topic": "t"}, 5), TypeError, "body"),  # was sent as 5 NUL bytes
        ("content_type CRLF", lambda: base.post("/pub", None, b"x", "text/plain\r\nX: y"), ConfigError, "content_type"),
        ("content_type non-latin-1", lambda: base.post("/pub", None, b"x", "text/\u20ac"), ConfigError, "content_type"),
        ("content_type int", lambda: base.post("/pub", None, b"x", 5), TypeError, "content_type"),
        ("url_for params int", lambda: base.url_for("/x", 5), TypeError, "params"),
    ]
    failures = collect(cases)
    assert not failures, failures
    assert http_server.connections == 0 and http_server.requests == [], (http_server.connections, http_server.requests)
    # nothing lost: the same clients still work
    assert nsqd.pub("t", "\u00e9") == "OK"
    lookupd.tombstone_topic("t", "h:4151")
    assert base.get_json("/stats", params={}) == {}
    assert [r[:2] for r in http_server.requests] == [("POST", "/pub?topic=t"), ("POST", "/topic/tombstone?topic=t&node=h%3A4151"), ("GET", "/stats")]
    assert http_server.requests[0][2] == "\u00e9".encode()

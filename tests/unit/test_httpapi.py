"""Unit tests for nsq_sync.httpapi against a real local http.server (no urllib mocks)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import pytest

from nsq_sync.errors import ConfigError, HTTPError
from nsq_sync.httpapi import (
    ACCEPT_V1,
    HTTPClient,
    LookupdClient,
    NSQDHTTPClient,
    NsqdHTTPClient,
)

V1_HEADERS = {"X-NSQ-Content-Type": "nsq; version=1.0"}


class Recorded:
    def __init__(self, method: str, path: str, query: Dict[str, List[str]], headers: Dict[str, str], body: bytes):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body

    def param(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[0] if values else None


# A route answers (status, headers, body bytes).
Reply = Tuple[int, Dict[str, str], bytes]


def json_reply(payload: Any, status: int = 200, v1: bool = True) -> Reply:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if v1:
        headers.update(V1_HEADERS)
    return status, headers, json.dumps(payload).encode()


def text_reply(text: str, status: int = 200, v1: bool = True) -> Reply:
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if v1:
        headers.update(V1_HEADERS)
    return status, headers, text.encode()


class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1:0 that records requests and answers from a route table."""

    def __init__(self) -> None:
        self.requests: List[Recorded] = []
        self.routes: Dict[Tuple[str, str], Callable[[Recorded], Reply]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                               {k: v for k, v in self.headers.items()}, body)
                outer.requests.append(rec)
                route = outer.routes.get((self.command, parts.path))
                if route is None:
                    status, headers, data = json_reply({"message": "NOT_FOUND"}, 404)
                else:
                    status, headers, data = route(rec)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def route(self, method: str, path: str, reply: Any) -> None:
        self.routes[(method, path)] = reply if callable(reply) else (lambda rec, r=reply: r)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = FakeServer()
    try:
        yield srv
    finally:
        srv.close()


def read_request_head(conn: socket.socket) -> bytes:
    """What a raw server reads of a request up to the end of its headers (b"" if the client
    hung up first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return b""
        data += chunk
    return data


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "address, scheme, host, port, base_url",
    [
        ("127.0.0.1:4151", "http", "127.0.0.1", 4151, "http://127.0.0.1:4151"),
        ("localhost:4161", "http", "localhost", 4161, "http://localhost:4161"),
        ("http://nsqd.example.com:4151", "http", "nsqd.example.com", 4151, "http://nsqd.example.com:4151"),
        ("http://nsqd.example.com:4151/", "http", "nsqd.example.com", 4151, "http://nsqd.example.com:4151"),
        ("HTTP://h:1", "http", "h", 1, "http://h:1"),
        ("https://h:4152", "https", "h", 4152, "https://h:4152"),
        ("https://h", "https", "h", 443, "https://h:443"),
        ("http://h", "http", "h", 80, "http://h:80"),
        ("[::1]:4151", "http", "::1", 4151, "http://[::1]:4151"),
        ("http://h:8080/nsq/", "http", "h", 8080, "http://h:8080/nsq"),
        ("my_host-1.local:65535", "http", "my_host-1.local", 65535, "http://my_host-1.local:65535"),
    ],
)
def test_address_parsing(address, scheme, host, port, base_url):
    c = HTTPClient(address)
    assert (c.scheme, c.host, c.port, c.base_url) == (scheme, host, port, base_url)
    assert c.address == base_url.split("://", 1)[1].split("/", 1)[0]
    assert repr(c) == f"HTTPClient({base_url!r})"


@pytest.mark.parametrize(
    "address",
    [
        "",
        "127.0.0.1",  # no port
        "127.0.0.1:",
        "host:0",
        "host:65536",
        "host:abc",
        "ftp://host:21",
        "tcp://host:4150",
        "host :4151",
        " host:4151",
        "http://:4151",
        ":4151",
        "host:4151?x=1",
        "http://host:4151/#frag",
        "[zz]:4151",
        "ho!st:4151",
        "::1:4151",
    ],
)
def test_bad_address_raises_config_error(address):
    with pytest.raises(ConfigError) as info:
        NsqdHTTPClient(address)
    assert info.value.param == "address"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("address", [
    "http://user:s3cret@host:4161",
    "http://admin:s3/cret@x:4161",  # fails the port parse first
    "http://user:s3cret pw@host:80",  # fails the whitespace check first
    "ftp://user:s3cret@host:21",  # fails the scheme check first
    "http://user:s3?cret@host:4161",
])
def test_address_with_credentials_is_rejected_without_echoing_them(address):
    with pytest.raises(ConfigError) as info:
        LookupdClient(address)
    assert info.value.param == "address"
    assert "s3" not in str(info.value) and "cret" not in str(info.value) and "s3" not in repr(info.value.value)


@pytest.mark.parametrize("address", ["a..b:4151", "." + "x" * 10 + ":4151", "x" * 64 + ".example:4151"])
def test_host_name_the_resolver_would_refuse_is_a_config_error(address):
    # (getaddrinfo's IDNA codec raised UnicodeError, untyped, on every request)
    with pytest.raises(ConfigError, match="not a valid name"):
        LookupdClient(address)


@pytest.mark.parametrize("address", ["127.0.0.1:4161,127.0.0.1:4162", "http://a:4161,b:4161", "a:4161;b:4161"])
def test_a_list_in_one_address_string_says_so(address):
    with pytest.raises(ConfigError, match="several addresses in one string"):
        LookupdClient(address)


@pytest.mark.parametrize("address", ["http://127.0.0.1:4161/lookup", "127.0.0.1:4161/lookup/", "http://127.0.0.1:4161"])
def test_lookupd_client_takes_pynsqs_lookup_url_as_the_base_address(address):
    # The same LOOKUPD setting works in a Reader (which always took it) and here.
    client = LookupdClient(address)
    assert client.base_url == "http://127.0.0.1:4161"


@pytest.mark.parametrize("address", [None, 4151, b"host:4151", ("host", 4151)])
def test_non_str_address_is_type_error(address):
    with pytest.raises(TypeError):
        HTTPClient(address)


# (1e10 and more passed, then every request failed with OverflowError from the socket layer)
@pytest.mark.parametrize("timeout", [0, -1, 0.0, float("nan"), float("inf"), "5", None, True, 86400.5, 1e10, 10**20])
def test_bad_timeout_raises_config_error(timeout):
    with pytest.raises(ConfigError) as info:
        HTTPClient("h:1", timeout=timeout)
    assert info.value.param == "timeout"


def test_timeout_accepts_int_and_float():
    assert HTTPClient("h:1", timeout=2).timeout == 2.0
    assert HTTPClient("h:1", timeout=0.25).timeout == 0.25
    assert HTTPClient("h:1", timeout=86400).timeout == 86400.0
    assert HTTPClient("h:1").timeout == 5.0


@pytest.mark.parametrize("size, exc", [(0, ConfigError), (-1, ConfigError), ("64", TypeError), (1.5, TypeError),
                                       (1e6, TypeError), (True, TypeError)])
def test_bad_max_response_size(size, exc):
    for cls in (HTTPClient, LookupdClient, NsqdHTTPClient):
        with pytest.raises(exc) as info:
            cls("h:1", max_response_size=size)
        if exc is ConfigError:
            assert info.value.param == "max_response_size"
        else:
            assert "max_response_size" in str(info.value)


def test_max_response_size_default_and_none():
    assert HTTPClient("h:1").max_response_size == 64 * 1024 * 1024
    assert LookupdClient("h:1", 2.0, None, None, 1000).max_response_size == 1000
    assert NsqdHTTPClient("h:1", max_response_size=None).max_response_size is None
    assert LookupdClient.from_url("http://h:1/lookup", max_response_size=1).max_response_size == 1


def test_ssl_context_rules():
    ctx = ssl.create_default_context()
    assert HTTPClient("https://h:1", ssl_context=ctx).scheme == "https"
    with pytest.raises(ConfigError) as info:
        HTTPClient("h:1", ssl_context=ctx)
    assert info.value.param == "ssl_context"
    with pytest.raises(TypeError):
        HTTPClient("https://h:1", ssl_context="yes")


def test_bad_headers():
    with pytest.raises(ConfigError) as info:
        HTTPClient("h:1", headers={"Authorization": "Bearer abc\r\nX-Evil: 1"})
    assert "abc" not in str(info.value)
    with pytest.raises(ConfigError):
        HTTPClient("h:1", headers={"Bad Name": "x"})
    with pytest.raises(TypeError):
        HTTPClient("h:1", headers={"X-Num": 1})
    with pytest.raises(TypeError):
        HTTPClient("h:1", headers=[("a", "b")])


def test_from_url():
    c = NsqdHTTPClient.from_url("https://h:4152", timeout=1.5)
    assert isinstance(c, NsqdHTTPClient)
    assert (c.scheme, c.address, c.timeout) == ("https", "h:4152", 1.5)
    with pytest.raises(ConfigError):
        NsqdHTTPClient.from_url("h:4151")


def test_alias():
    assert NSQDHTTPClient is NsqdHTTPClient
    assert issubclass(NsqdHTTPClient, HTTPClient)
    assert issubclass(LookupdClient, HTTPClient)


# ---------------------------------------------------------------- requests and responses


def test_accept_header_user_headers_and_info(server):
    server.route("GET", "/info", json_reply({"version": "1.3.0", "tcp_port": 4150}))
    c = NsqdHTTPClient(server.address, headers={"X-Trace": "abc"})
    assert c.info() == {"version": "1.3.0", "tcp_port": 4150}
    (rec,) = server.requests
    assert rec.method == "GET"
    assert rec.headers["Accept"] == ACCEPT_V1 == "application/vnd.nsq; version=1.0"
    assert rec.headers["X-Trace"] == "abc"


def test_path_prefix_is_prepended(server):
    server.route("GET", "/proxy/nsqd/ping", text_reply("OK", v1=False))
    c = NsqdHTTPClient(f"http://{server.address}/proxy/nsqd/")
    assert c.ping() is True
    assert server.requests[0].path == "/proxy/nsqd/ping"


def test_ping_plain_text_without_v1_header(server):
    # nsqd's /ping is plain text "OK" without X-NSQ-Content-Type
    server.route("GET", "/ping", text_reply("OK", v1=False))
    assert NsqdHTTPClient(server.address).ping() is True
    assert LookupdClient(server.address).ping() is True


def test_ping_unhealthy_raises_with_text(server):
    server.route("GET", "/ping", text_reply("NOK - failed to write to disk", 500, v1=False))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).ping()
    assert info.value.status == 500
    assert info.value.message == "NOK - failed to write to disk"
    assert info.value.url == f"http://{server.address}/ping"


def test_legacy_envelope_is_unwrapped(server):
    envelope = {"status_code": 200, "status_txt": "OK", "data": {"channels": ["c"], "producers": []}}
    server.route("GET", "/lookup", json_reply(envelope, v1=False))
    assert LookupdClient(server.address).lookup("t") == {"channels": ["c"], "producers": []}


def test_envelope_shape_is_kept_when_v1_header_present(server):
    # with X-NSQ-Content-Type the body is the payload, even if it looks like an envelope
    payload = {"status_code": 200, "status_txt": "OK", "data": 1}
    server.route("GET", "/info", json_reply(payload, v1=True))
    assert NsqdHTTPClient(server.address).get_json("/info") == payload


def test_partial_envelope_shape_is_not_unwrapped(server):
    payload = {"status_code": 200, "data": 1, "version": "x"}
    server.route("GET", "/info", json_reply(payload, v1=False))
    assert NsqdHTTPClient(server.address).info() == payload


def test_legacy_envelope_error_status(server):
    envelope = {"status_code": 500, "status_txt": "INTERNAL_ERROR", "data": None}
    server.route("GET", "/info", json_reply(envelope, status=200, v1=False))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).info()
    assert (info.value.status, info.value.message) == (500, "INTERNAL_ERROR")


def test_legacy_error_body_message(server):
    envelope = {"status_code": 404, "status_txt": "TOPIC_NOT_FOUND", "data": None}
    server.route("GET", "/lookup", json_reply(envelope, status=404, v1=False))
    c = LookupdClient(server.address)
    with pytest.raises(HTTPError) as info:
        c.lookup("nope")
    assert (info.value.status, info.value.message) == (404, "TOPIC_NOT_FOUND")
    assert c.producers("nope") == []


def test_error_json_becomes_http_error(server):
    server.route("POST", "/topic/delete", json_reply({"message": "TOPIC_NOT_FOUND"}, 404))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).delete_topic("missing")
    err = info.value
    assert err.status == 404
    assert err.message == "TOPIC_NOT_FOUND"
    assert err.url == f"http://{server.address}/topic/delete?topic=missing"
    assert "404" in str(err) and "TOPIC_NOT_FOUND" in str(err)


def test_error_plain_text_and_empty_body(server):
    server.route("GET", "/info", text_reply("gateway exploded", 502, v1=False))
    server.route("GET", "/stats", lambda rec: (503, {}, b""))
    c = NsqdHTTPClient(server.address)
    with pytest.raises(HTTPError) as info:
        c.info()
    assert (info.value.status, info.value.message) == (502, "gateway exploded")
    with pytest.raises(HTTPError) as info:
        c.stats()
    assert info.value.status == 503
    assert info.value.message == "Service Unavailable"


def test_long_error_text_is_truncated(server):
    server.route("GET", "/info", text_reply("x" * 5000, 500, v1=False))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).info()
    assert len(info.value.message) < 600


def test_huge_error_message_is_bounded_and_escaped(server):
    # a 404 with a 20 MB JSON "message" became a 20,971,641-character HTTPError, newlines and all
    message = "TOPIC_NOT_FOUND\nCRITICAL forged log line\x1b[0m" + "x" * (20 * 1024 * 1024)
    server.route("GET", "/lookup", json_reply({"message": message}, 404))
    with pytest.raises(HTTPError) as info:
        LookupdClient(server.address).producers("t")  # (not the TOPIC_NOT_FOUND that means [])
    err = info.value
    assert err.status == 404
    assert err.message.startswith("TOPIC_NOT_FOUND\\nCRITICAL forged log line\\x1b[0mxxx")
    assert err.message.endswith(" more characters)")
    for text in (err.message, str(err)):
        assert len(text) < 700
        assert "\n" not in text and "\x1b" not in text


def test_legacy_status_txt_and_plain_text_errors_are_escaped(server):
    server.route("GET", "/a", json_reply({"status_code": 500, "status_txt": "BAD\nCRITICAL x" * 1000, "data": None}, 500, v1=False))
    server.route("GET", "/b", json_reply({"status_code": 500, "status_txt": "BAD\rCRITICAL x" * 1000, "data": None}, 200, v1=False))
    server.route("GET", "/c", text_reply("oops\nCRITICAL forged", 502, v1=False))
    c = HTTPClient(server.address)
    for path, status, start in (("/a", 500, "BAD\\nCRITICAL x"), ("/b", 500, "BAD\\rCRITICAL x"),
                                ("/c", 502, "oops\\nCRITICAL forged")):
        with pytest.raises(HTTPError) as info:
            c.get_json(path)
        assert info.value.status == status
        assert info.value.message.startswith(start)
        assert "\n" not in str(info.value) and "\r" not in str(info.value) and len(str(info.value)) < 700


def test_unknown_route_404(server):
    with pytest.raises(HTTPError) as info:
        HTTPClient(server.address).get_json("/nope")
    assert (info.value.status, info.value.message) == (404, "NOT_FOUND")


def test_a_404_not_found_for_a_route_the_other_daemon_serves_hints_at_the_wrong_port(server):
    # a bare "HTTP 404: NOT_FOUND" did not say that the address was the other daemon's
    nsqd, lookupd = NsqdHTTPClient(server.address), LookupdClient(server.address)
    for call, route in ((lookupd.topics, "/topics"), (lambda: lookupd.lookup("t"), "/lookup"),
                        (lambda: lookupd.producers("t"), "/lookup"), (lookupd.nodes, "/nodes")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 404
        assert info.value.message == (f"NOT_FOUND (is this nsqd's HTTP port? every nsqlookupd serves {route}; "
                                      f"nsqlookupd's HTTP port is 4161 by default, nsqd's 4151)")
    for call, route in ((nsqd.stats, "/stats"), (lambda: nsqd.pub("t", b"x"), "/pub"),
                        (lambda: nsqd.get_json("/stats?format=json"), "/stats"), (lambda: nsqd.empty_channel("t", "c"), "/channel/empty")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.message == (f"NOT_FOUND (is this nsqlookupd's HTTP port? every nsqd serves {route}; "
                                      f"nsqd's HTTP port is 4151 by default, nsqlookupd's 4161)")
    # not certain, so no hint: a route both serve, another message, the generic client
    server.route("GET", "/lookup", json_reply({"message": "TOPIC_NOT_FOUND"}, 404))
    server.route("GET", "/topics", json_reply({"message": "NOT_FOUND"}, 500))
    for call, message in ((lambda: nsqd.create_topic("t"), "NOT_FOUND"), (lambda: lookupd.lookup("t"), "TOPIC_NOT_FOUND"),
                          (lookupd.topics, "NOT_FOUND"), (lambda: HTTPClient(server.address).get_json("/stats"), "NOT_FOUND")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.message == message


def test_nsqd_http_address_of_a_nodes_entry_brackets_ipv6(server):
    # f"{broadcast_address}:{http_port}" gave "::1:4151" for an IPv6 nsqd, which NsqdHTTPClient refuses
    from nsq_sync.httpapi import nsqd_http_address

    entries = [{"broadcast_address": "::1", "http_port": 4151, "tcp_port": 4150},
               {"broadcast_address": "nsqd-2.example", "http_port": 4251},
               {"broadcast_address": "10.0.0.3", "http_port": 4151},
               {"broadcast_address": "[fe80::1]", "http_port": 1}]
    server.route("GET", "/nodes", json_reply({"producers": entries}))
    addresses = [nsqd_http_address(node) for node in LookupdClient(server.address).nodes()]
    assert addresses == ["[::1]:4151", "nsqd-2.example:4251", "10.0.0.3:4151", "[fe80::1]:1"]
    assert [NsqdHTTPClient(a).host for a in addresses] == ["::1", "nsqd-2.example", "10.0.0.3", "fe80::1"]
    with pytest.raises(ConfigError):
        NsqdHTTPClient(f"{entries[0]['broadcast_address']}:{entries[0]['http_port']}")
    for bad in ({}, {"broadcast_address": "::1"}, {"broadcast_address": "h", "http_port": "4151"},
                {"broadcast_address": "h", "http_port": True}, {"broadcast_address": "h", "http_port": 0},
                {"broadcast_address": "", "http_port": 1}, {"broadcast_address": "a b", "http_port": 1},
                {"broadcast_address": "1:2:x", "http_port": 1}):
        with pytest.raises(ConfigError) as info:
            nsqd_http_address(bad)
        assert info.value.param == "producer"
    with pytest.raises(TypeError):
        nsqd_http_address("::1:4151")


def test_invalid_json_on_success(server):
    server.route("GET", "/info", text_reply("<html>", 200))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).info()
    assert info.value.status == 200
    assert "JSON" in info.value.message


def test_other_lookupd_404_is_not_swallowed_by_producers(server):
    server.route("GET", "/lookup", json_reply({"message": "NOT_FOUND"}, 404))
    with pytest.raises(HTTPError):
        LookupdClient(server.address).producers("t")


# ---------------------------------------------------------------- transport failures


def test_connection_refused_is_http_error_zero():
    port = free_port()
    c = NsqdHTTPClient(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(HTTPError) as info:
        c.ping()
    err = info.value
    assert err.status == 0
    assert "refused" in err.message
    assert err.url == f"http://127.0.0.1:{port}/ping"
    assert isinstance(err.__cause__, ConnectionRefusedError)
    assert err.timed_out is False


def test_timeout_is_http_error_zero():
    # a listening socket that never accepts: connect succeeds (backlog), no answer ever comes
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        c = LookupdClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(HTTPError) as info:
            c.topics()
        assert time.monotonic() - started < 3
        assert info.value.status == 0
        assert "timed out" in info.value.message
        assert isinstance(info.value.__cause__, (socket.timeout, TimeoutError))
        # a hung server is told from a down one without parsing the message
        assert info.value.timed_out is True
    finally:
        silent.close()


def test_http_error_timed_out_attribute_defaults_and_pickles():
    import pickle

    assert HTTPError(404, "TOPIC_NOT_FOUND", "http://h:1/x").timed_out is False
    assert HTTPError(0, "connection refused").timed_out is False  # (the old 2- and 3-argument forms)
    err = HTTPError(0, "timed out after 1s", "http://h:1/ping", timed_out=True)
    assert str(err) == "timed out after 1s (http://h:1/ping)"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.status, copy.message, copy.url, copy.timed_out) == (0, "timed out after 1s", "http://h:1/ping", True)


@pytest.fixture
def trickle():
    """``trickle(fast, slow, gap) -> address``: a server that answers one request with *fast*
    at once, then *slow* one byte every *gap* seconds, then closes (or stops when the client hangs up)."""
    stop = threading.Event()
    listeners: List[socket.socket] = []
    threads: List[threading.Thread] = []

    def serve(listener: socket.socket, fast: bytes, slow: bytes, gap: float) -> None:
        conn, _ = listener.accept()
        with conn:
            if not read_request_head(conn):
                return
            try:
                conn.sendall(fast)
                for i in range(len(slow)):
                    if stop.wait(gap):
                        return
                    conn.sendall(slow[i:i + 1])
            except OSError:
                return  # the client gave up

    def start(fast: bytes, slow: bytes, gap: float) -> str:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners.append(listener)
        thread = threading.Thread(target=serve, args=(listener, fast, slow, gap), daemon=True)
        thread.start()
        threads.append(thread)
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)
    for listener in listeners:
        listener.close()


TOPICS_BODY = b'{"topics": ["a"]}' + b" " * 43
TOPICS_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-NSQ-Content-Type: nsq; version=1.0\r\n"
               b"Content-Length: %d\r\n\r\n" % len(TOPICS_BODY))


@pytest.mark.parametrize("trickled", ["status line and headers", "body"])
def test_timeout_bounds_the_whole_request_not_each_read(trickle, trickled):
    # a byte every 50 ms: every read is quick, the whole answer takes 3 s or more
    # (it used to be read to the end: the timeout bounded each socket read only)
    if trickled == "body":
        address = trickle(TOPICS_HEAD, TOPICS_BODY, gap=0.05)
    else:
        address = trickle(b"", TOPICS_HEAD + TOPICS_BODY, gap=0.05)
    c = LookupdClient(address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(HTTPError) as info:
        c.topics()
    assert time.monotonic() - started < 1.5
    assert (info.value.status, info.value.message) == (0, "timed out after 0.5s")
    assert isinstance(info.value.__cause__, (socket.timeout, TimeoutError))


def test_an_answer_within_the_timeout_is_read_whole_even_when_slow_and_until_close(trickle):
    # a Connection: close answer without Content-Length: http.client closes the connection
    # before the body is read, which then runs to the end of the stream
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    address = trickle(head, TOPICS_BODY, gap=0.002)
    assert LookupdClient(address, timeout=5).topics() == ["a"]


@pytest.fixture
def flood():
    """``flood(head, total, chunked=False) -> (address, result)``: a server that answers one
    request with *head* then up to *total* bytes of body ("x" * 64 KiB at a time, as HTTP chunks
    when *chunked*), stopping when the client hangs up; ``result["sent"]`` is the body bytes it
    got out, ``result["done"]`` is set when it stops."""
    listeners: List[socket.socket] = []
    threads: List[threading.Thread] = []

    def serve(listener: socket.socket, head: bytes, total: int, chunked: bool, result: Dict[str, Any]) -> None:
        conn, _ = listener.accept()
        piece = b"x" * 65536
        if chunked:
            piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
        try:
            with conn:
                conn.settimeout(30)
                if not read_request_head(conn):
                    return
                conn.sendall(head)
                while result["sent"] < total:
                    conn.sendall(piece)
                    result["sent"] += 65536
                if chunked:
                    conn.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up
        finally:
            result["done"].set()

    def start(head: bytes, total: int, chunked: bool = False) -> Tuple[str, Dict[str, Any]]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listeners.append(listener)
        result: Dict[str, Any] = {"sent": 0, "done": threading.Event()}
        thread = threading.Thread(target=serve, args=(listener, head, total, chunked, result), daemon=True)
        thread.start()
        threads.append(thread)
        return f"127.0.0.1:{listener.getsockname()[1]}", result

    yield start
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


FLOOD = 256 * 1024 * 1024  # what the server would send; the client stops after about 1 MiB
FLOOD_HEADS = {
    "Content-Length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % FLOOD,
    "until close": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    "404 until close": b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("framing", list(FLOOD_HEADS))
def test_response_body_over_max_response_size_is_not_read(flood, framing):
    # a hostile nsqlookupd pushed the client to 1.26 GB within the Reader's 2 s lookupd timeout
    address, result = flood(FLOOD_HEADS[framing], FLOOD, chunked=framing == "chunked")
    c = LookupdClient(address, timeout=20, max_response_size=1024 * 1024)
    started = time.monotonic()
    with pytest.raises(HTTPError) as info:
        c.producers("t")
    assert time.monotonic() - started < 10
    err = info.value
    assert err.status == (404 if framing.startswith("404") else 200)
    assert err.url == f"http://{address}/lookup?topic=t"
    if framing == "Content-Length":
        assert err.message == (f"response body of {FLOOD} bytes (Content-Length) is over max_response_size "
                               f"({1024 * 1024} bytes); not read")
    else:
        assert err.message == f"response body is over max_response_size ({1024 * 1024} bytes); stopped reading"
    assert result["done"].wait(10)  # the client hung up: the server could not send it all
    assert result["sent"] < FLOOD // 2


def test_default_max_response_size_refuses_a_declared_huge_body(flood):
    # (the server declares 1 GiB but sends only 64 KiB: the client refuses before reading any)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (1 << 30)
    address, result = flood(head, 65536)
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(address, timeout=20).stats()
    assert info.value.status == 200
    assert "max_response_size (67108864 bytes)" in info.value.message


@pytest.mark.parametrize("content_length", [True, False])
def test_body_at_max_response_size_is_read_whole(trickle, content_length):
    head = TOPICS_HEAD if content_length else (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                              b"Connection: close\r\n\r\n")
    assert LookupdClient(trickle(head + TOPICS_BODY, b"", 0), max_response_size=len(TOPICS_BODY)).topics() == ["a"]
    assert LookupdClient(trickle(head + TOPICS_BODY, b"", 0), max_response_size=None).topics() == ["a"]
    with pytest.raises(HTTPError) as info:
        LookupdClient(trickle(head + TOPICS_BODY, b"", 0), max_response_size=len(TOPICS_BODY) - 1).topics()
    assert f"max_response_size ({len(TOPICS_BODY) - 1} bytes)" in info.value.message


def test_server_closing_without_answer_is_http_error_zero():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def accept_and_close() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=accept_and_close, daemon=True)
    t.start()
    try:
        with pytest.raises(HTTPError) as info:
            HTTPClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=2).info()
        assert info.value.status == 0
        # a clean close, not a reset (RemoteDisconnected is a ConnectionResetError: it was reported as one)
        assert info.value.message.startswith("server closed the connection without answering (is this an HTTP port?")
        assert isinstance(info.value.__cause__, http.client.RemoteDisconnected)
    finally:
        t.join(5)
        listener.close()


def test_dns_failure_is_http_error_zero():
    with pytest.raises(HTTPError) as info:
        HTTPClient("no-such-host.invalid:4151", timeout=2).ping()
    assert info.value.status == 0
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------- nsqd client requests


def test_pub_sends_body_and_topic(server):
    server.route("POST", "/pub", text_reply("OK"))
    c = NsqdHTTPClient(server.address)
    assert c.pub("events", b"\x00\x01binary") == "OK"
    assert c.pub("events", "héllo", defer_ms=1500) == "OK"
    assert c.pub("events", bytearray(b"ba")) == "OK"
    first, second, third = server.requests
    assert first.method == "POST" and first.param("topic") == "events"
    assert first.body == b"\x00\x01binary" and first.param("defer") is None
    assert second.body == "héllo".encode("utf-8") and second.param("defer") == "1500"
    assert third.body == b"ba"


def test_pub_ephemeral_topic_is_url_encoded(server):
    server.route("POST", "/pub", text_reply("OK"))
    NsqdHTTPClient(server.address).pub("t#ephemeral", b"x")
    assert server.requests[0].param("topic") == "t#ephemeral"


def test_mpub_binary_format(server):
    server.route("POST", "/mpub", text_reply("OK"))
    bodies = [b"a", b"line1\nline2", "ü"]
    assert NsqdHTTPClient(server.address).mpub("t", bodies) == "OK"
    (rec,) = server.requests
    assert rec.param("binary") == "true"
    expected = struct.pack(">i", 3)
    for b in (b"a", b"line1\nline2", "ü".encode()):
        expected += struct.pack(">i", len(b)) + b
    assert rec.body == expected


def test_mpub_text_format(server):
    server.route("POST", "/mpub", text_reply("OK"))
    NsqdHTTPClient(server.address).mpub("t", (b for b in [b"a", b"bc", "d"]), binary=False)
    (rec,) = server.requests
    assert rec.param("binary") is None
    assert rec.body == b"a\nbc\nd"


def test_stats_params_and_null_lists(server):
    payload = {
        "version": "1.3.0",
        "health": "OK",
        "topics": [{"topic_name": "t", "depth": 3, "channels": [{"channel_name": "c", "depth": 2, "clients": None}]}],
        "producers": None,
    }
    server.route("GET", "/stats", json_reply(payload))
    c = NsqdHTTPClient(server.address)
    stats = c.stats(topic="t", channel="c", include_clients=False)
    assert stats["producers"] == []
    # not asked for: nsqd's null means "not listed", not "no clients", so no "clients" key
    assert "clients" not in stats["topics"][0]["channels"][0]
    rec = server.requests[0]
    assert rec.param("format") == "json"
    assert rec.param("topic") == "t"
    assert rec.param("channel") == "c"
    assert rec.param("include_clients") == "false"
    assert c.topic_depth("t") == 3
    assert c.channel_depth("t", "c") == 2
    assert c.channel_stats("t", "c")["channel_name"] == "c"
    assert c.channel_stats("t", "other") is None
    assert c.channel_depth("t", "other") == 0
    assert c.topic_stats("other") is None
    assert c.topic_depth("other") == 0
    assert server.requests[1].param("include_clients") == "false"


def test_topic_stats_asks_for_the_clients_it_returns(server):
    # topic_stats() asked nsqd for no clients and turned the null it got into "clients": []
    def answer(rec):
        listed = rec.param("include_clients") == "true"
        channel = {"channel_name": "c", "depth": 0, "client_count": 1,
                   "clients": [{"client_id": "x"}] if listed else None}
        return json_reply({"topics": [{"topic_name": "t", "depth": 0, "channels": [channel]}]})

    server.route("GET", "/stats", answer)
    c = NsqdHTTPClient(server.address)
    assert c.topic_stats("t")["channels"][0]["clients"] == [{"client_id": "x"}]
    assert server.requests[-1].param("include_clients") == "true"
    assert c.channel_stats("t", "c")["clients"] == [{"client_id": "x"}]
    assert "clients" not in c.stats(include_clients=False)["topics"][0]["channels"][0]
    assert c.stats()["topics"][0]["channels"][0]["clients"] == [{"client_id": "x"}]
    # a client listed although not asked for is kept
    server.route("GET", "/stats", json_reply({"topics": [{"topic_name": "t", "channels": [
        {"channel_name": "c", "clients": [{"client_id": "y"}]}]}]}))
    assert c.stats(include_clients=False)["topics"][0]["channels"][0]["clients"] == [{"client_id": "y"}]


def test_stats_without_filters_sends_no_topic(server):
    server.route("GET", "/stats", json_reply({"topics": None, "producers": []}))
    assert NsqdHTTPClient(server.address).stats() == {"topics": [], "producers": []}
    rec = server.requests[0]
    assert "topic" not in rec.query and "channel" not in rec.query
    assert rec.param("include_clients") == "true"


@pytest.mark.parametrize(
    "payload, problem, quoted",
    [
        ([1, 2], "a JSON array, not an object", "[1, 2]"),  # was read as "no producers"
        ("proxy login", "a JSON string, not an object", '"proxy login"'),
        (None, "a JSON null, not an object", "null"),
        ({"channels": []}, "no 'producers' list", '{"channels": []}'),  # was read as "no producers"
        ({"channels": [], "producers": {"a": 1}}, "'producers' is a JSON object, not a list", '{"a": 1}'),  # was TypeError
        ({"channels": [], "producers": "127.0.0.1:4150"}, "'producers' is a JSON string, not a list", '"127.0.0.1:4150"'),
        ({"channels": "c1", "producers": []}, "'channels' is a JSON string, not a list", '"c1"'),
        ({"channels": ["c1", 5], "producers": []}, "'channels[1]' is a JSON number, not a string", "5"),
    ],
)
def test_lookup_answer_of_the_wrong_shape_is_http_error(server, payload, problem, quoted):
    server.route("GET", "/lookup", json_reply(payload))
    c = LookupdClient(server.address)
    for call in (c.lookup, c.producers):
        with pytest.raises(HTTPError) as info:
            call("t")
        assert (info.value.status, info.value.message) == (200, f"not an nsqlookupd /lookup answer: {problem}: {quoted}")
        assert info.value.url == f"http://{server.address}/lookup?topic=t"


# ---------------------------------------------------------------- answers of the wrong shape

STATS_METHODS = [
    ("stats", ()),
    ("topic_stats", ("t",)),
    ("topic_depth", ("t",)),
    ("channel_stats", ("t", "c")),
    ("channel_depth", ("t", "c")),
]


@pytest.mark.parametrize(
    "payload, problem, quoted",
    [
        ([1, 2, 3], "a JSON array, not an object", "[1, 2, 3]"),  # was AttributeError ('list' object has no attribute 'get')
        ("proxy login", "a JSON string, not an object", '"proxy login"'),
        ({"version": "1.3.0"}, "no 'topics' list", '{"version": "1.3.0"}'),  # was "no such topic"
        ({"topics": "abc"}, "'topics' is a JSON string, not a list", '"abc"'),
        ({"topics": [5, "x"]}, "'topics[0]' is a JSON number, not an object", "5"),  # was AttributeError
        ({"topics": [{"channels": []}]}, "no 'topics[0].topic_name' string", '{"channels": []}'),
        ({"topics": [{"topic_name": 7, "channels": []}]}, "'topics[0].topic_name' is a JSON number, not a string", "7"),
        ({"topics": [{"topic_name": "t"}]}, "no 'topics[0].channels' list", '{"topic_name": "t"}'),
        ({"topics": [{"topic_name": "t", "channels": {"c": {}}}]},
         "'topics[0].channels' is a JSON object, not a list", '{"c": {}}'),
        ({"topics": [{"topic_name": "t", "channels": [None]}]}, "'topics[0].channels[0]' is a JSON null, not an object", "null"),
        ({"topics": [{"topic_name": "t", "channels": [{"depth": 1}]}]},
         "no 'topics[0].channels[0].channel_name' string", '{"depth": 1}'),
        ({"topics": [{"topic_name": "t", "channels": [{"channel_name": "c", "depth": 1, "clients": "x"}]}]},
         "'topics[0].channels[0].clients' is a JSON string, not a list", '"x"'),
        ({"topics": [{"topic_name": "t", "channels": [{"channel_name": "c", "depth": 1, "clients": [1]}]}]},
         "'topics[0].channels[0].clients[0]' is a JSON number, not an object", "1"),
        ({"topics": [], "producers": 5}, "'producers' is a JSON number, not a list", "5"),
        ({"topics": [], "producers": ["h:4150"]}, "'producers[0]' is a JSON string, not an object", '"h:4150"'),
    ],
)
def test_nsqd_stats_answer_of_the_wrong_shape_is_http_error(server, payload, problem, quoted):
    server.route("GET", "/stats", json_reply(payload))
    c = NsqdHTTPClient(server.address)
    for method, args in STATS_METHODS:
        with pytest.raises(HTTPError) as info:
            getattr(c, method)(*args)
        assert (info.value.status, info.value.message) == (200, f"not an nsqd /stats answer: {problem}: {quoted}"), method
        assert info.value.url.startswith(f"http://{server.address}/stats?format=json")


@pytest.mark.parametrize(
    "depth, problem, quoted",
    [
        ("lots", "is a JSON string, not an integer", '"lots"'),  # was ValueError from int()
        (None, "is a JSON null, not an integer", "null"),  # was TypeError from int()
        (1.5, "is a JSON number, not an integer", "1.5"),  # was 1
        (True, "is a JSON boolean, not an integer", "true"),  # was 1
        (-1, "is negative", "-1"),
        ([3], "is a JSON array, not an integer", "[3]"),
    ],
)
def test_depth_that_is_not_a_count_is_http_error(server, depth, problem, quoted):
    channel = {"channel_name": "c", "depth": depth, "clients": []}
    topic = {"topic_name": "t", "depth": depth, "channels": [{"channel_name": "other", "depth": 0}, channel]}
    server.route("GET", "/stats", json_reply({"topics": [topic]}))
    c = NsqdHTTPClient(server.address)
    for call, field in ((lambda: c.topic_depth("t"), "topics[0].depth"),
                        (lambda: c.channel_depth("t", "c"), "topics[0].channels[1].depth")):
        with pytest.raises(HTTPError) as info:
            call()
        assert (info.value.status, info.value.message) == (200, f"not an nsqd /stats answer: '{field}' {problem}: {quoted}")
    # the stats dicts themselves are returned as nsqd sent them
    assert c.topic_stats("t")["depth"] == depth
    assert c.channel_stats("t", "c")["depth"] == depth


def test_missing_depth_is_http_error_not_zero(server):
    server.route("GET", "/stats", json_reply({"topics": [{"topic_name": "t", "channels": [{"channel_name": "c"}]}]}))
    c = NsqdHTTPClient(server.address)
    with pytest.raises(HTTPError) as info:
        c.topic_depth("t")  # was 0
    assert info.value.message == """not an nsqd /stats answer: no 'topics[0].depth' number: {"topic_name": "t", "channels": [{"channel_name": "c"}]}"""
    with pytest.raises(HTTPError) as info:
        c.channel_depth("t", "c")  # was 0
    assert info.value.message == """not an nsqd /stats answer: no 'topics[0].channels[0].depth' number: {"channel_name": "c"}"""


def test_stats_shape_errors_quote_a_bounded_escaped_piece_of_the_answer(server):
    server.route("GET", "/stats", json_reply({"topics": "x\nCRITICAL forged\x1b[0m" + "y" * 100_000}))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).topic_depth("t")
    message = info.value.message
    assert message.startswith("""not an nsqd /stats answer: 'topics' is a JSON string, not a list: "x\\nCRITICAL forged\\u001b[0myyy""")
    assert message.endswith(" more characters)")
    assert len(str(info.value)) < 400 and "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_an_answer_that_is_not_json_is_quoted(server):
    server.route("GET", "/stats", text_reply("<html>login page</html>\n" + "z" * 10_000))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).channel_depth("t", "c")
    assert info.value.status == 200
    assert info.value.message.startswith("response is not valid JSON (Expecting value: line 1 column 1 (char 0)): "
                                         "'<html>login page</html>\\nzzz")
    assert info.value.message.endswith(" more characters)'") and len(info.value.message) < 400


def test_json_nested_too_deeply_is_http_error(server):
    server.route("GET", "/info", text_reply("[" * 100_000))  # was RecursionError
    server.route("GET", "/stats", text_reply('{"topics": ' + "[" * 100_000))
    c = NsqdHTTPClient(server.address)
    for call in (c.info, lambda: c.get_json("/info"), c.stats, lambda: c.topic_depth("t")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 200
        assert info.value.message.startswith("response is not valid JSON (nested too deeply): ")
        assert len(info.value.message) < 400


@pytest.mark.parametrize("cls, server_name", [(NsqdHTTPClient, "nsqd"), (LookupdClient, "nsqlookupd"), (HTTPClient, "NSQ")])
def test_ping_and_info_answers_of_the_wrong_shape_are_http_errors(server, cls, server_name):
    server.route("GET", "/ping", text_reply("<html>login page</html>", v1=False))
    server.route("GET", "/info", json_reply([1, 2]))
    c = cls(server.address)
    with pytest.raises(HTTPError) as info:
        c.ping()  # was True
    assert (info.value.status, info.value.message) == (
        200, f"not an {server_name} /ping answer: expected 'OK', got '<html>login page</html>'")
    with pytest.raises(HTTPError) as info:
        c.info()  # was [1, 2]
    assert (info.value.status, info.value.message) == (200, f"not an {server_name} /info answer: a JSON array, not an object: [1, 2]")
    server.route("GET", "/info", json_reply({"error": "log in first"}))
    with pytest.raises(HTTPError) as info:
        c.info()
    assert info.value.message == f"""not an {server_name} /info answer: no 'version' string: {{"error": "log in first"}}"""
    server.route("GET", "/ping", text_reply("OK\n", v1=False))
    assert c.ping() is True


@pytest.mark.parametrize(
    "route, key, payload, problem, quoted",
    [
        ("/topics", "topics", {"topics": "abc"}, "'topics' is a JSON string, not a list", '"abc"'),  # was ['a', 'b', 'c']
        ("/topics", "topics", {"topics": [5, "x"]}, "'topics[0]' is a JSON number, not a string", "5"),
        ("/topics", "topics", {"topic": ["a"]}, "no 'topics' list", '{"topic": ["a"]}'),  # was []
        ("/topics", "topics", ["a"], "a JSON array, not an object", '["a"]'),  # was []
        ("/channels", "channels", {"channels": "c1"}, "'channels' is a JSON string, not a list", '"c1"'),  # was ['c', '1']
        ("/channels", "channels", {"channels": [{"name": "c"}]}, "'channels[0]' is a JSON object, not a string", '{"name": "c"}'),
        ("/channels", "channels", "login", "a JSON string, not an object", '"login"'),  # was []
        ("/nodes", "nodes", {"producers": 5}, "'producers' is a JSON number, not a list", "5"),  # was TypeError
        ("/nodes", "nodes", {"producers": ["h1:4150"]}, "'producers[0]' is a JSON string, not an object", '"h1:4150"'),
        ("/nodes", "nodes", {}, "no 'producers' list", "{}"),  # was []
    ],
)
def test_lookupd_list_answers_of_the_wrong_shape_are_http_errors(server, route, key, payload, problem, quoted):
    server.route("GET", route, json_reply(payload))
    c = LookupdClient(server.address)
    call = {"topics": c.topics, "channels": lambda: c.channels("t"), "nodes": c.nodes}[key]
    with pytest.raises(HTTPError) as info:
        call()
    assert (info.value.status, info.value.message) == (200, f"not an nsqlookupd {route} answer: {problem}: {quoted}")


def test_lookupd_null_lists_are_empty_lists(server):
    server.route("GET", "/topics", json_reply({"topics": None}))
    server.route("GET", "/nodes", json_reply({"producers": None}))
    c = LookupdClient(server.address)
    assert c.topics() == [] and c.nodes() == []


PUB_CALLS = [
    ("/pub", "message", lambda c: c.pub("t", b"x")),
    ("/pub", "message", lambda c: c.pub("t", "x", defer_ms=10)),
    ("/mpub", "messages", lambda c: c.mpub("t", [b"x", b"y"])),
    ("/mpub", "messages", lambda c: c.mpub("t", [b"x", b"y"], binary=False)),
]


@pytest.mark.parametrize("route, what, call", PUB_CALLS)
@pytest.mark.parametrize(
    "status, body, quoted",
    [
        (200, b"<html>login page</html>", "'<html>login page</html>'"),  # was returned as the result
        (200, b"", "an empty body"),
        (204, b"", "an empty body"),
        (200, b"{}", "'{}'"),
        (200, b"ok", "'ok'"),
        (202, b"OK, queued for review", "'OK, queued for review'"),
        (200, b"NOK\r\nX: y", "'NOK\\r\\nX: y'"),
    ],
)
def test_pub_and_mpub_answers_other_than_ok_are_http_errors(server, route, what, call, status, body, quoted):
    server.route("POST", route, lambda rec: (status, {}, body))
    with pytest.raises(HTTPError) as info:
        call(NsqdHTTPClient(server.address))
    assert (info.value.status, info.value.message) == (
        status, f"not an nsqd {route} answer, so the {what} may or may not have been published: expected 'OK', got {quoted}")
    assert info.value.url.startswith(f"http://{server.address}{route}?topic=t")
    assert len(server.requests) == 1  # (sent once, not retried)


@pytest.mark.parametrize("route, what, call", PUB_CALLS)
def test_pub_and_mpub_accept_ok_with_or_without_the_v1_header(server, route, what, call):
    for reply in (text_reply("OK"), text_reply("OK", v1=False), text_reply("OK\n")):
        server.route("POST", route, reply)
        assert call(NsqdHTTPClient(server.address)) == "OK"


def test_pub_quotes_a_bounded_piece_of_an_unexpected_answer(server):
    server.route("POST", "/pub", text_reply("<html>\n" + "x" * 1_000_000))
    with pytest.raises(HTTPError) as info:
        NsqdHTTPClient(server.address).pub("t", b"m")
    text = str(info.value)
    assert "may or may not have been published" in text
    assert info.value.message.endswith(" more characters)'")
    assert len(text) < 500 and "\n" not in text


ADMIN_CALLS = [
    (NsqdHTTPClient, "create_topic", ("t",), "nsqd /topic/create", "topic may or may not have been created"),
    (NsqdHTTPClient, "delete_topic", ("t",), "nsqd /topic/delete", "topic may or may not have been deleted"),
    (NsqdHTTPClient, "empty_topic", ("t",), "nsqd /topic/empty", "topic may or may not have been emptied"),
    (NsqdHTTPClient, "pause_topic", ("t",), "nsqd /topic/pause", "topic may or may not have been paused"),
    (NsqdHTTPClient, "unpause_topic", ("t",), "nsqd /topic/unpause", "topic may or may not have been unpaused"),
    (NsqdHTTPClient, "create_channel", ("t", "c"), "nsqd /channel/create", "channel may or may not have been created"),
    (NsqdHTTPClient, "delete_channel", ("t", "c"), "nsqd /channel/delete", "channel may or may not have been deleted"),
    (NsqdHTTPClient, "empty_channel", ("t", "c"), "nsqd /channel/empty", "channel may or may not have been emptied"),
    (NsqdHTTPClient, "pause_channel", ("t", "c"), "nsqd /channel/pause", "channel may or may not have been paused"),
    (NsqdHTTPClient, "unpause_channel", ("t", "c"), "nsqd /channel/unpause", "channel may or may not have been unpaused"),
    (LookupdClient, "create_topic", ("t",), "nsqlookupd /topic/create", "topic may or may not have been created"),
    (LookupdClient, "delete_topic", ("t",), "nsqlookupd /topic/delete", "topic may or may not have been deleted"),
    (LookupdClient, "create_channel", ("t", "c"), "nsqlookupd /channel/create", "channel may or may not have been created"),
    (LookupdClient, "delete_channel", ("t", "c"), "nsqlookupd /channel/delete", "channel may or may not have been deleted"),
    (LookupdClient, "tombstone_topic", ("t", "h:4151"), "nsqlookupd /topic/tombstone", "producer may or may not have been tombstoned"),
]


@pytest.mark.parametrize("cls, method, args, what, consequence", ADMIN_CALLS)
def test_admin_answers_other_than_an_empty_body_are_http_errors(server, cls, method, args, what, consequence):
    route = what.split(" ", 1)[1]
    server.route("POST", route, text_reply("<html>login page</html>"))
    c = cls(server.address)
    with pytest.raises(HTTPError) as info:
        getattr(c, method)(*args)  # was None
    assert (info.value.status, info.value.message) == (
        200, f"not an {what} answer, so the {consequence}: expected an empty body, got '<html>login page</html>'")
    # what nsqd and nsqlookupd answer: an empty body (or whitespace; or an old server's envelope)
    for reply in ((200, dict(V1_HEADERS), b""), (200, {}, b"\n"),
                  json_reply({"status_code": 200, "status_txt": "OK", "data": None}, v1=False)):
        server.route("POST", route, lambda rec, r=reply: r)
        assert getattr(c, method)(*args) is None
    # an old server's envelope with an error status is that error
    server.route("POST", route, json_reply({"status_code": 404, "status_txt": "TOPIC_NOT_FOUND", "data": None}, v1=False))
    with pytest.raises(HTTPError) as info:
        getattr(c, method)(*args)
    assert (info.value.status, info.value.message) == (404, "TOPIC_NOT_FOUND")
    # with the v1 header a body is not an envelope
    server.route("POST", route, json_reply({"status_code": 200, "status_txt": "OK", "data": None}))
    with pytest.raises(HTTPError) as info:
        getattr(c, method)(*args)
    assert info.value.status == 200 and info.value.message.startswith(f"not an {what} answer")


# ---------------------------------------------------------------- a query in the path


def test_params_are_added_to_a_query_in_the_path(server):
    server.route("POST", "/pub", text_reply("OK"))
    server.route("GET", "/stats", json_reply({"topics": []}))
    c = NsqdHTTPClient(server.address)
    # was sent as "/pub?topic=ht1?defer=1000": nsqd answered 400 INVALID_TOPIC
    assert c.post("/pub?topic=ht1", {"defer": 1000}, b"x") == "OK"
    # was "/stats?format=json?topic=ht1": nsqd answered its text format, "not valid JSON"
    assert c.get_json("/stats?format=json", {"topic": "ht1", "channel": None}) == {"topics": []}
    assert c.get_json("/stats?", {"topic": "ht1"}) == {"topics": []}
    assert c.get_json("/stats?format=json", {}) == {"topics": []}
    first, second, third, fourth = server.requests
    assert (first.path, first.query) == ("/pub", {"topic": ["ht1"], "defer": ["1000"]})
    assert (second.path, second.query) == ("/stats", {"format": ["json"], "topic": ["ht1"]})
    assert (third.path, third.query) == ("/stats", {"topic": ["ht1"]})
    assert (fourth.path, fourth.query) == ("/stats", {"format": ["json"]})
    assert c.url_for("/stats?format=json", {"topic": "t#x"}) == f"http://{server.address}/stats?format=json&topic=t%23x"
    with pytest.raises(HTTPError) as info:
        c.get_json("/nope?a=1", {"b": True})
    assert info.value.url == f"http://{server.address}/nope?a=1&b=true"


@pytest.mark.parametrize("params, param, value", [
    ({"topic": ["a", "b"]}, "params['topic']", ["a", "b"]),  # was sent as topic=%5B%27a%27...: its repr
    ({"defer": 1.5}, "params['defer']", 1.5),
    ({"topic": b"t"}, "params['topic']", b"t"),  # was topic=b%27t%27
    ({"topic": ("a",)}, "params['topic']", ("a",)),
    ({1: "a"}, "params", 1),  # a name that is not str was sent as "1"
    ({b"topic": "a"}, "params", b"topic"),
])
def test_a_param_of_the_wrong_type_is_refused_before_sending(server, params, param, value):
    from nsq_sync.errors import ConfigTypeError

    c = HTTPClient(server.address)
    for call in (lambda: c.url_for("/stats", params), lambda: c.get_json("/stats", params),
                 lambda: c.post("/pub", params, b"x"), lambda: c.request("GET", "/stats", params)):
        with pytest.raises(ConfigTypeError) as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ConfigError)
        assert (info.value.param, info.value.value) == (param, value)
    assert server.requests == []
    # what the type allows: str, int (not a float), bool, None (left out); an IntEnum is an int
    import enum

    class Level(enum.IntEnum):
        HIGH = 3

    class Format(str, enum.Enum):  # (str() of both is the member's name up to Python 3.10)
        JSON = "json"

    assert c.url_for("/x", {"a": "s", "b": 7, "c": False, "d": None, "e": Level.HIGH, "f": Format.JSON}) == (
        f"http://{server.address}/x?a=s&b=7&c=false&e=3&f=json"
    )


@pytest.mark.parametrize("path, params, twice", [
    ("/stats?format=json", {"format": "text"}, ["format"]),
    ("/stats?for%6Dat=json", {"format": "json"}, ["format"]),  # the same parameter, percent-encoded
    ("/pub?topic=a&defer=1", {"defer": 5, "topic": "b"}, ["defer", "topic"]),
    ("/pub?flag", {"flag": True}, ["flag"]),
])
def test_a_param_also_in_the_path_query_is_a_config_error(server, path, params, twice):
    c = HTTPClient(server.address)
    for call in (lambda: c.get_json(path, params), lambda: c.post(path, params, b"x"), lambda: c.url_for(path, params)):
        with pytest.raises(ConfigError) as info:
            call()  # was sent with the parameter twice: nsqd uses the first, silently
        assert (info.value.param, info.value.value) == ("params", twice)
        assert path in str(info.value)
    assert server.requests == []


@pytest.mark.parametrize("path", ["/ping#frag", "/stats?format=json#x", "/#"])
def test_a_fragment_in_the_path_is_a_config_error(server, path):
    server.route("GET", "/ping", text_reply("OK", v1=False))
    server.route("GET", "/stats", json_reply({}))
    c = HTTPClient(server.address)
    for call in (lambda: c.request("GET", path), lambda: c.get_json(path), lambda: c.url_for(path)):
        with pytest.raises(ConfigError) as info:
            call()  # was sent as is
        assert info.value.param == "path"
    assert server.requests == []


def test_lookup_null_lists_are_empty(server):
    server.route("GET", "/lookup", json_reply({"channels": None, "producers": None}))
    c = LookupdClient(server.address)
    assert c.lookup("t") == {"channels": [], "producers": []}
    assert c.producers("t") == []


def test_producer_entries_without_a_usable_address_are_skipped_with_one_warning(server, caplog):
    good = [{"broadcast_address": "h1", "tcp_port": 4150}, {"broadcast_address": "::1", "tcp_port": 5150}]
    bad = [
        {"broadcast_address": "127.0.0.1", "http_port": 4151},  # was KeyError 'tcp_port'
        {"broadcast_address": "127.0.0.1", "tcp_port": None},  # was TypeError
        {"broadcast_address": "127.0.0.1", "tcp_port": "4150"},
        {"broadcast_address": "127.0.0.1", "tcp_port": True},
        {"broadcast_address": "127.0.0.1", "tcp_port": 0},
        {"broadcast_address": "127.0.0.1", "tcp_port": 65536},
        {"tcp_port": 4150, "hostname": "x"},
        {"broadcast_address": "", "tcp_port": 4150},
        {"broadcast_address": None, "tcp_port": 4150},
        {"broadcast_address": "bad host!", "tcp_port": 4150},
        "127.0.0.1:4150",
    ]
    server.route("GET", "/lookup", json_reply({"channels": [], "producers": [good[0], *bad, good[1]]}))
    c = LookupdClient(server.address)
    with caplog.at_level("WARNING", logger="nsq_sync.httpapi.lookupd"):
        assert c.producers("t") == [("h1", 4150), ("::1", 5150)]
    (record,) = [r for r in caplog.records if r.name == "nsq_sync.httpapi.lookupd"]
    assert record.levelname == "WARNING"
    assert f"skipped {len(bad)} of {len(bad) + 2} producers of topic 't'" in record.getMessage()
    assert c.lookup("t")["producers"] == [good[0], *bad, good[1]]  # lookup() returns them as sent


@pytest.mark.parametrize(
    "method, args, path, params",
    [
        ("create_topic", ("t",), "/topic/create", {"topic": "t"}),
        ("delete_topic", ("t",), "/topic/delete", {"topic": "t"}),
        ("empty_topic", ("t",), "/topic/empty", {"topic": "t"}),
        ("pause_topic", ("t",), "/topic/pause", {"topic": "t"}),
        ("unpause_topic", ("t",), "/topic/unpause", {"topic": "t"}),
        ("create_channel", ("t", "c"), "/channel/create", {"topic": "t", "channel": "c"}),
        ("delete_channel", ("t", "c"), "/channel/delete", {"topic": "t", "channel": "c"}),
        ("empty_channel", ("t", "c"), "/channel/empty", {"topic": "t", "channel": "c"}),
        ("pause_channel", ("t", "c"), "/channel/pause", {"topic": "t", "channel": "c"}),
        ("unpause_channel", ("t", "c"), "/channel/unpause", {"topic": "t", "channel": "c"}),
    ],
)
def test_nsqd_admin_routes(server, method, args, path, params):
    server.route("POST", path, lambda rec: (200, dict(V1_HEADERS), b""))
    server.route("GET", "/info", json_reply({"version": "1.3.0", "tcp_port": 4150, "http_port": 4151}))
    client = NsqdHTTPClient(server.address)
    assert getattr(client, method)(*args) is None
    assert getattr(client, method)(*args) is None
    shared = path in ("/topic/create", "/topic/delete", "/channel/create", "/channel/delete")
    # the actions nsqlookupd serves too ask /info first, once per client (_check_nsqd)
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/info")] * shared + [("POST", path)] * 2
    rec = server.requests[-1]
    assert {k: v[0] for k, v in rec.query.items()} == params
    assert rec.body == b""


@pytest.mark.parametrize("method, args, what", [
    ("create_topic", ("t",), "topic was not created"),
    ("delete_topic", ("t",), "topic was not deleted"),
    ("create_channel", ("t", "c"), "channel was not created"),
    ("delete_channel", ("t", "c"), "channel was not deleted"),
])
def test_nsqd_admin_action_given_nsqlookupds_port_is_refused_before_sending(server, method, args, what):
    """nsqlookupd serves /topic/create and the like too (its registry): an NsqdHTTPClient given
    its port changed nsqlookupd's registry and no nsqd, without a word. Its /info (a version and
    nothing else) tells it from nsqd's, and the action is not sent."""
    server.route("GET", "/info", json_reply({"version": "1.3.0"}))
    with pytest.raises(HTTPError) as info:
        getattr(NsqdHTTPClient(server.address), method)(*args)
    assert info.value.status == 200
    assert f"not nsqd: its /info has no tcp_port, as nsqlookupd's, so the {what} (is this nsqlookupd's HTTP port?" in info.value.message
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/info")]


def test_nsqd_admin_action_goes_ahead_when_info_tells_nothing(server):
    """A proxy in front of nsqd that does not serve /info (404) does not stop the action."""
    server.route("POST", "/topic/create", lambda rec: (200, dict(V1_HEADERS), b""))
    client = NsqdHTTPClient(server.address)
    client.create_topic("t")
    client.create_topic("u")
    assert [(r.method, r.path) for r in server.requests] == [("GET", "/info"), ("POST", "/topic/create"), ("POST", "/topic/create")]


# ---------------------------------------------------------------- lookupd client requests


def test_lookupd_reads(server):
    server.route("GET", "/lookup", json_reply({
        "channels": ["c1"],
        "producers": [{"broadcast_address": "h1", "tcp_port": 4150, "http_port": 4151},
                      {"broadcast_address": "h2", "tcp_port": 5150, "http_port": 5151}],
    }))
    server.route("GET", "/topics", json_reply({"topics": ["a", "b"]}))
    server.route("GET", "/channels", json_reply({"channels": None}))
    server.route("GET", "/nodes", json_reply({"producers": [{"broadcast_address": "h1", "topics": ["a"]}]}))
    server.route("GET", "/info", json_reply({"version": "1.3.0"}))
    c = LookupdClient(server.address)
    assert c.lookup("a")["channels"] == ["c1"]
    assert c.producers("a") == [("h1", 4150), ("h2", 5150)]
    assert c.topics() == ["a", "b"]
    assert c.channels("a") == []
    assert c.nodes() == [{"broadcast_address": "h1", "topics": ["a"]}]
    assert c.info() == {"version": "1.3.0"}
    assert [r.path for r in server.requests] == ["/lookup", "/lookup", "/topics", "/channels", "/nodes", "/info"]
    assert all(r.method == "GET" for r in server.requests)
    assert server.requests[3].param("topic") == "a"


def test_lookupd_producers_topic_not_found(server):
    server.route("GET", "/lookup", json_reply({"message": "TOPIC_NOT_FOUND"}, 404))
    c = LookupdClient(server.address)
    with pytest.raises(HTTPError) as info:
        c.lookup("missing")
    assert (info.value.status, info.value.message) == (404, "TOPIC_NOT_FOUND")
    assert c.producers("missing") == []


@pytest.mark.parametrize(
    "method, args, path, params",
    [
        ("create_topic", ("t",), "/topic/create", {"topic": "t"}),
        ("delete_topic", ("t",), "/topic/delete", {"topic": "t"}),
        ("create_channel", ("t", "c"), "/channel/create", {"topic": "t", "channel": "c"}),
        ("delete_channel", ("t", "c"), "/channel/delete", {"topic": "t", "channel": "c"}),
        ("tombstone_topic", ("t", "h1:4151"), "/topic/tombstone", {"topic": "t", "node": "h1:4151"}),
        # nsqlookupd compares node with broadcast_address + ":" + http_port: IPv6 goes unbracketed
        ("tombstone_topic", ("t", "[::1]:4151"), "/topic/tombstone", {"topic": "t", "node": "::1:4151"}),
        ("tombstone_topic", ("t", "::1:4151"), "/topic/tombstone", {"topic": "t", "node": "::1:4151"}),
        ("tombstone_topic", ("t", "[fe80::1%eth0]:4151"), "/topic/tombstone", {"topic": "t", "node": "fe80::1%eth0:4151"}),
    ],
)
def test_lookupd_admin_routes(server, method, args, path, params):
    server.route("POST", path, lambda rec: (200, dict(V1_HEADERS), b""))
    assert getattr(LookupdClient(server.address), method)(*args) is None
    (rec,) = server.requests
    assert rec.method == "POST" and rec.path == path
    assert {k: v[0] for k, v in rec.query.items()} == params


# ---------------------------------------------------------------- bad input: nothing is sent


BAD_CALLS = [
    # (client class, method, args, kwargs, expected exception, ConfigError param or None)
    (NsqdHTTPClient, "pub", ("bad topic!", b"x"), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "pub", ("", b"x"), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "pub", ("t" * 65, b"x"), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "pub", (123, b"x"), {}, TypeError, None),
    (NsqdHTTPClient, "pub", ("t", b""), {}, ConfigError, "body"),
    (NsqdHTTPClient, "pub", ("t", ""), {}, ConfigError, "body"),
    (NsqdHTTPClient, "pub", ("t", 42), {}, TypeError, None),
    (NsqdHTTPClient, "pub", ("t", None), {}, TypeError, None),
    (NsqdHTTPClient, "pub", ("t", {"a": 1}), {}, TypeError, None),
    (NsqdHTTPClient, "pub", ("t", b"x"), {"defer_ms": -1}, ConfigError, "defer_ms"),
    (NsqdHTTPClient, "pub", ("t", b"x"), {"defer_ms": 1.5}, TypeError, None),
    (NsqdHTTPClient, "pub", ("t", b"x"), {"defer_ms": True}, TypeError, None),
    (NsqdHTTPClient, "mpub", ("t", []), {}, ConfigError, "bodies"),
    (NsqdHTTPClient, "mpub", ("t", iter([])), {}, ConfigError, "bodies"),
    (NsqdHTTPClient, "mpub", ("t", b"abc"), {}, TypeError, None),
    (NsqdHTTPClient, "mpub", ("t", "abc"), {}, TypeError, None),
    (NsqdHTTPClient, "mpub", ("t", 5), {}, TypeError, None),
    (NsqdHTTPClient, "mpub", ("t", [b"a", 1]), {}, TypeError, None),
    (NsqdHTTPClient, "mpub", ("t", [b"a", b""]), {}, ConfigError, "bodies[1]"),
    (NsqdHTTPClient, "mpub", ("t", [b"a", b"b\nc"]), {"binary": False}, ConfigError, "bodies[1]"),
    (NsqdHTTPClient, "mpub", ("bad/topic", [b"a"]), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "stats", (), {"topic": "bad topic"}, ConfigError, "topic"),
    (NsqdHTTPClient, "stats", (), {"channel": "bad!"}, ConfigError, "channel"),
    (NsqdHTTPClient, "create_topic", ("a:b",), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "delete_topic", ("a b",), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "empty_topic", ("",), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "pause_topic", ("é",), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "unpause_topic", (None,), {}, TypeError, None),
    (NsqdHTTPClient, "create_channel", ("t", "bad chan"), {}, ConfigError, "channel"),
    (NsqdHTTPClient, "delete_channel", ("bad t", "c"), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "empty_channel", ("t", ""), {}, ConfigError, "channel"),
    (NsqdHTTPClient, "pause_channel", ("t", "c" * 65), {}, ConfigError, "channel"),
    (NsqdHTTPClient, "unpause_channel", ("t", 7), {}, TypeError, None),
    (NsqdHTTPClient, "topic_depth", ("bad!",), {}, ConfigError, "topic"),
    (NsqdHTTPClient, "channel_stats", ("t", "bad!"), {}, ConfigError, "channel"),
    (NsqdHTTPClient, "channel_depth", ("bad!", "c"), {}, ConfigError, "topic"),
    (LookupdClient, "lookup", ("bad!",), {}, ConfigError, "topic"),
    (LookupdClient, "producers", ("bad!",), {}, ConfigError, "topic"),
    (LookupdClient, "channels", ("",), {}, ConfigError, "topic"),
    (LookupdClient, "create_topic", ("bad!",), {}, ConfigError, "topic"),
    (LookupdClient, "delete_topic", ("bad!",), {}, ConfigError, "topic"),
    (LookupdClient, "create_channel", ("t", "bad!"), {}, ConfigError, "channel"),
    (LookupdClient, "delete_channel", ("bad!", "c"), {}, ConfigError, "topic"),
    (LookupdClient, "tombstone_topic", ("t", "no-port"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "h:0"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "h:99999"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "h:1/x"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", ("h", 1)), {}, TypeError, None),
    (LookupdClient, "tombstone_topic", ("t", "[::zz]:4151"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "::zz:4151"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "[127.0.0.1]:4151"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "[::1]"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("t", "[]:4151"), {}, ConfigError, "node"),
    (LookupdClient, "tombstone_topic", ("bad!", "h:1"), {}, ConfigError, "topic"),
]


@pytest.mark.parametrize("cls, method, args, kwargs, exc, param", BAD_CALLS)
def test_bad_input_raises_before_any_request(server, cls, method, args, kwargs, exc, param):
    # every route answers OK, so only local validation can fail
    for m in ("GET", "POST"):
        for p in ("/pub", "/mpub", "/stats", "/lookup", "/channels", "/topic/create", "/topic/delete",
                  "/topic/empty", "/topic/pause", "/topic/unpause", "/topic/tombstone", "/channel/create",
                  "/channel/delete", "/channel/empty", "/channel/pause", "/channel/unpause"):
            server.route(m, p, json_reply({}))
    client = cls(server.address)
    with pytest.raises(exc) as info:
        getattr(client, method)(*args, **kwargs)
    if param is not None:
        assert info.value.param == param
    assert server.requests == []


def test_mpub_text_newline_error_does_not_echo_body(server):
    with pytest.raises(ConfigError) as info:
        NsqdHTTPClient(server.address).mpub("t", [b"secret-token\nmore"], binary=False)
    assert "secret-token" not in str(info.value)
    assert server.requests == []


# ---------------------------------------------------------------- logging


def test_no_bodies_or_headers_logged(server, caplog):
    server.route("POST", "/pub", text_reply("OK"))
    server.route("POST", "/topic/delete", json_reply({"message": "TOPIC_NOT_FOUND"}, 404))
    c = NsqdHTTPClient(server.address, headers={"Authorization": "Bearer hunter2"})
    with caplog.at_level("DEBUG", logger="nsq_sync.httpapi"):
        c.pub("t", b"very-private-payload")
        with pytest.raises(HTTPError):
            c.delete_topic("t")
    text = caplog.text
    assert "very-private-payload" not in text
    assert "hunter2" not in text
    assert all(r.levelname == "DEBUG" for r in caplog.records)


def test_client_shared_between_threads(server):
    server.route("POST", "/pub", text_reply("OK"))
    c = NsqdHTTPClient(server.address)
    errors: List[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                assert c.pub("t", f"{n}-{i}") == "OK"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert sorted(r.body for r in server.requests) == sorted(f"{n}-{i}".encode() for n in range(5) for i in range(10))


def test_early_413_answer_to_a_large_body_is_reported():
    # like nsqd: answer 413 as soon as the headers are in, never read the body, close
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_early() -> None:
        conn, _ = listener.accept()
        read_request_head(conn)
        body = b'{"message":"MSG_TOO_BIG"}'
        conn.sendall(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
                     b"X-NSQ-Content-Type: nsq; version=1.0\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.05)
        conn.close()  # unread body in the receive buffer -> RST to the sender

    t = threading.Thread(target=answer_early, daemon=True)
    t.start()
    try:
        c = NsqdHTTPClient(f"127.0.0.1:{listener.getsockname()[1]}", timeout=5)
        with pytest.raises(HTTPError) as info:
            c.pub("t", b"x" * (16 * 1024 * 1024))
        assert (info.value.status, info.value.message) == (413, "MSG_TOO_BIG")
    finally:
        t.join(5)
        listener.close()


GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import sys, socket
import gevent
from nsq_sync.httpapi import NsqdHTTPClient
assert socket.socket is gevent.socket.socket
c = NsqdHTTPClient(sys.argv[1], timeout=5)
jobs = [gevent.spawn(c.pub, "t", "g%d" % i) for i in range(5)]
gevent.joinall(jobs, timeout=10, raise_error=True)
print(sorted(j.value for j in jobs), c.ping())
"""


def test_works_under_gevent_monkey_patching(server):
    import os
    import subprocess
    import sys

    server.route("POST", "/pub", text_reply("OK"))
    server.route("GET", "/ping", text_reply("OK", v1=False))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, server.address], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['OK', 'OK', 'OK', 'OK', 'OK'] True"
    assert sorted(r.body for r in server.requests if r.path == "/pub") == [b"g%d" % i for i in range(5)]

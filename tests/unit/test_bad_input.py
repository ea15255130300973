"""Bad input at every public entry point (issue #6): wrong types, empty and oversize bodies, bad
names, out-of-range parameters. Each must raise a typed error naming the parameter
(ConfigError with ``.param``, or TypeError whose message names it) *before anything is sent*.

"Nothing sent" is checked on the wire: Writer and AsyncConn run against the scripted fake nsqd
(tests/functional/fake_nsqd.py), which records every command it receives; the HTTP clients point
at a loopback listener that counts connections. Everything else is pure (no I/O).

The deviations this file found first (2 GiB bodies raising struct.error, request() of non-bytes
shifting answers, NaN/inf/huge requeue delays, client_id/hostname/tls_options/snappy/tls_v1 types,
addresses with a scheme or spaces, Writer name) were fixed in 29ab245; their tests stay as
regression tests (the last part of this file).
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import nsq_sync
from nsq_sync import AsyncConn, LookupdClient, Message, NsqdHTTPClient, Reader, WorkerPool, Writer
from nsq_sync.errors import AlreadyRespondedError, ClosedError, ConfigError, ConfigTypeError, IntegrityError
from nsq_sync.protocol import commands

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from bad_input import PUBLISHING, check_named, connected_writer, published, serving_fake  # noqa: E402
from fake_nsqd import FakeNsqd  # noqa: E402

pytestmark = pytest.mark.timeout(60)

NAN, INF = math.nan, math.inf
MSG_ID = b"0123456789abcdef"
#: a body one byte over what the protocol's int32 size field can carry (calloc'd: no RSS cost)
TOO_BIG = 2**31


def raises_named(call: Callable[[], Any], error: type, param: str) -> BaseException:
    with pytest.raises(error) as info:
        result = call()
        for client in (result if isinstance(result, tuple) else (result,)):
            if hasattr(client, "close"):
                client.close()  # it was accepted after all: do not leave it running
    check_named(info.value, param)
    return info.value


# =========================================================================== constructors (no I/O)
BAD_CONN_KWARGS: List[Tuple[Dict[str, Any], type, str]] = [
    ({"timeout": 0}, ConfigError, "timeout"),
    ({"timeout": -1}, ConfigError, "timeout"),
    ({"timeout": NAN}, ConfigError, "timeout"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"heartbeat_interval": 0.5}, ConfigError, "heartbeat_interval"),
    ({"heartbeat_interval": 61}, ConfigError, "heartbeat_interval"),
    ({"heartbeat_interval": NAN}, ConfigError, "heartbeat_interval"),
    ({"heartbeat_interval": "30"}, TypeError, "heartbeat_interval"),
    ({"heartbeat_interval": True}, TypeError, "heartbeat_interval"),
    ({"output_buffer_size": 63}, ConfigError, "output_buffer_size"),
    ({"output_buffer_size": 65537}, ConfigError, "output_buffer_size"),
    ({"output_buffer_size": 1.5}, TypeError, "output_buffer_size"),
    ({"output_buffer_timeout": 24}, ConfigError, "output_buffer_timeout"),
    ({"output_buffer_timeout": 30001}, ConfigError, "output_buffer_timeout"),
    ({"sample_rate": -1}, ConfigError, "sample_rate"),
    ({"sample_rate": 100}, ConfigError, "sample_rate"),
    ({"deflate_level": 0}, ConfigError, "deflate_level"),
    ({"deflate_level": 10}, ConfigError, "deflate_level"),
    ({"msg_timeout": 0.5}, ConfigError, "msg_timeout"),
    ({"msg_timeout": 901}, ConfigError, "msg_timeout"),
    ({"msg_timeout": INF}, ConfigError, "msg_timeout"),
    ({"requeue_delay": -1}, ConfigError, "requeue_delay"),
    ({"max_requeue_delay": 3601}, ConfigError, "max_requeue_delay"),
    ({"max_frame_size": 100}, ConfigError, "max_frame_size"),
    ({"max_frame_size": 1.5}, TypeError, "max_frame_size"),
    ({"close_timeout": -1}, ConfigError, "close_timeout"),
    ({"tls_options": {"bogus": 1}}, ConfigError, "tls_options"),
    ({"tls_options": {"ca_certs": "/nonexistent/ca.pem"}}, ConfigError, "tls_options"),
    ({"tls_v1": True, "tls_options": {"certfile": "/nonexistent/cert.pem"}}, ConfigError, "tls_options"),
    ({"auth_secret": 12345}, ConfigError, "auth_secret"),
    ({"auth_secret": ""}, ConfigError, "auth_secret"),
    ({"auth_secret": "\udcff"}, ConfigError, "auth_secret"),
    ({"tls_options": {"cert_reqs": "x"}}, ConfigError, "tls_options"),
    ({"tls_options": {"ca_certs": 5}}, ConfigError, "tls_options"),
    ({"user_agent": b"agent"}, ConfigError, "user_agent"),
    ({"snappy": True, "deflate": True}, ConfigError, "deflate"),
    ({"backend": "nope"}, ConfigError, "backend"),
]


def _ids(cases: List[Tuple[Dict[str, Any], type, str]]) -> List[str]:
    return [",".join(f"{k}={v!r}"[:40] for k, v in kwargs.items()) for kwargs, _, _ in cases]


@pytest.mark.parametrize("kwargs,error,param", BAD_CONN_KWARGS, ids=_ids(BAD_CONN_KWARGS))
def test_asyncconn_writer_reader_refuse_bad_connection_parameters(kwargs: Dict[str, Any], error: type, param: str) -> None:
    raises_named(lambda: AsyncConn("127.0.0.1", 4150, **kwargs), error, param)
    raises_named(lambda: Writer("127.0.0.1:4150", **kwargs), error, param)
    raises_named(lambda: Reader("t", "c", lambda m: True, nsqd_tcp_addresses="127.0.0.1:4150", **kwargs), error, param)


ASYNCCONN_BAD: List[Tuple[Tuple[Any, Any], type, str]] = [
    (("", 4150), ConfigError, "host"),
    ((None, 4150), ConfigError, "host"),
    ((127001, 4150), ConfigError, "host"),
    (("a b", 4150), ConfigError, "host"),  # (a resolver error on every connect before)
    (("\uff11\uff12\uff17.\uff10.\uff10.\uff11", 4150), ConfigError, "host"),  # fullwidth 127.0.0.1: it resolved, a second key for one nsqd
    (("h\u00f4te.example", 4150), ConfigError, "host"),  # IDN: its xn-- form, please
    (("a" * 64 + ".example", 4150), ConfigError, "host"),  # a label over 63 characters
    ((".".join(["a" * 60] * 5), 4150), ConfigError, "host"),  # over 253 characters
    (("127.0.0.1,127.0.0.2", 4150), ConfigError, "host"),
    (("127.0.0.1:4150", 4150), ConfigError, "host"),
    (("127.0.0.1", 0), ConfigError, "port"),
    (("127.0.0.1", 65536), ConfigError, "port"),
    (("127.0.0.1", "4150"), ConfigError, "port"),
    (("127.0.0.1", True), ConfigError, "port"),
    (("127.0.0.1", 4150.0), ConfigError, "port"),
]


@pytest.mark.parametrize("args,error,param", ASYNCCONN_BAD, ids=[repr(a) for a, _, _ in ASYNCCONN_BAD])
def test_asyncconn_refuses_bad_host_and_port(args: Tuple[Any, Any], error: type, param: str) -> None:
    raises_named(lambda: AsyncConn(*args), error, param)


WRITER_BAD: List[Tuple[Tuple[Any, ...], Dict[str, Any], type, str]] = [
    ((None,), {}, ConfigError, "nsqd_tcp_addresses"),
    (([],), {}, ConfigError, "nsqd_tcp_addresses"),
    ((4150,), {}, ConfigError, "nsqd_tcp_addresses"),
    ((b"127.0.0.1:4150",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("localhost",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("127.0.0.1:0",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("127.0.0.1:65536",), {}, ConfigError, "nsqd_tcp_addresses"),
    ((":4150",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("[::1]",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("127.0.0.1: 4150",), {}, ConfigError, "nsqd_tcp_addresses"),
    (("127.0.0.1:+1",), {}, ConfigError, "nsqd_tcp_addresses"),
    ((["127.0.0.1:4150", 5],), {}, ConfigError, "nsqd_tcp_addresses"),
    (("127.0.0.1:4150",), {"publish_timeout": 0}, ConfigError, "publish_timeout"),
    (("127.0.0.1:4150",), {"publish_timeout": -1}, ConfigError, "publish_timeout"),
    (("127.0.0.1:4150",), {"publish_timeout": NAN}, ConfigError, "publish_timeout"),
    (("127.0.0.1:4150",), {"publish_timeout": INF}, ConfigError, "publish_timeout"),
    (("127.0.0.1:4150",), {"publish_timeout": "5"}, TypeError, "publish_timeout"),
    (("127.0.0.1:4150",), {"retries": -1}, ConfigError, "retries"),
    (("127.0.0.1:4150",), {"retries": 1001}, ConfigError, "retries"),
    (("127.0.0.1:4150",), {"retries": 1.5}, TypeError, "retries"),
    (("127.0.0.1:4150",), {"retries": True}, TypeError, "retries"),
    (("127.0.0.1:4150",), {"reconnect_interval": 0}, ConfigError, "reconnect_interval"),
    (("127.0.0.1:4150",), {"max_reconnect_interval": -1}, ConfigError, "max_reconnect_interval"),
    (("127.0.0.1:4150",), {"concurrency": 0}, ConfigError, "concurrency"),
    (("127.0.0.1:4150",), {"concurrency": "2"}, ConfigError, "concurrency"),
    (("127.0.0.1:4150",), {"worker_pool": None}, TypeError, "worker_pool"),
    (("127.0.0.1:4150",), {"no_such_option": 1}, TypeError, "no_such_option"),
]


@pytest.mark.parametrize("args,kwargs,error,param", WRITER_BAD, ids=[f"{a!r}-{k!r}"[:60] for a, k, _, _ in WRITER_BAD])
def test_writer_refuses_bad_addresses_and_parameters(args: Tuple[Any, ...], kwargs: Dict[str, Any], error: type, param: str) -> None:
    raises_named(lambda: Writer(*args, **kwargs), error, param)


def _reader(**kwargs: Any) -> Reader:
    kwargs.setdefault("nsqd_tcp_addresses", "127.0.0.1:4150")
    topic = kwargs.pop("topic", "t")
    channel = kwargs.pop("channel", "c")
    handler = kwargs.pop("handler", lambda m: True)
    return Reader(topic, channel, handler, **kwargs)


READER_BAD: List[Tuple[Dict[str, Any], type, str]] = [
    ({"topic": None}, TypeError, "topic"),
    ({"topic": 5}, TypeError, "topic"),
    ({"topic": ""}, ConfigError, "topic"),
    ({"topic": "a b"}, ConfigError, "topic"),
    ({"topic": "x" * 65}, ConfigError, "topic"),
    ({"topic": "t\n"}, ConfigError, "topic"),
    ({"topic": "t\u00f3pic"}, ConfigError, "topic"),
    ({"topic": "#ephemeral"}, ConfigError, "topic"),
    ({"topic": b"\xff\xfe"}, ConfigError, "topic"),
    ({"channel": None}, TypeError, "channel"),
    ({"channel": ""}, ConfigError, "channel"),
    ({"channel": "c/d"}, ConfigError, "channel"),
    ({"channel": "c" * 65}, ConfigError, "channel"),
    ({"handler": "not callable"}, TypeError, "message_handler"),
    ({"nsqd_tcp_addresses": None}, ConfigError, "nsqd_tcp_addresses"),
    ({"nsqd_tcp_addresses": 4150}, ConfigError, "nsqd_tcp_addresses"),
    ({"nsqd_tcp_addresses": b"127.0.0.1:4150"}, ConfigError, "nsqd_tcp_addresses"),
    ({"nsqd_tcp_addresses": "localhost"}, ConfigError, "nsqd_tcp_addresses"),
    ({"nsqd_tcp_addresses": ["127.0.0.1:4150", None]}, ConfigError, "nsqd_tcp_addresses"),
    ({"nsqd_tcp_addresses": "127.0.0.1:70000"}, ConfigError, "nsqd_tcp_addresses"),
    ({"lookupd_http_addresses": 4161}, ConfigError, "lookupd_http_addresses"),
    ({"lookupd_http_addresses": "ftp://127.0.0.1:4161"}, ConfigError, "lookupd_http_addresses"),
    ({"lookupd_http_addresses": "127.0.0.1"}, ConfigError, "lookupd_http_addresses"),
    ({"lookupd_http_addresses": [None]}, ConfigError, "lookupd_http_addresses"),
    ({"max_in_flight": -1}, ConfigError, "max_in_flight"),
    ({"max_in_flight": 2**31}, ConfigError, "max_in_flight"),
    ({"max_in_flight": 1.5}, TypeError, "max_in_flight"),
    ({"max_in_flight": "10"}, TypeError, "max_in_flight"),
    ({"max_in_flight": True}, TypeError, "max_in_flight"),
    ({"max_tries": -1}, ConfigError, "max_tries"),
    ({"max_tries": 65536}, ConfigError, "max_tries"),
    ({"max_backoff_duration": -1}, ConfigError, "max_backoff_duration"),
    ({"max_backoff_duration": 3601}, ConfigError, "max_backoff_duration"),
    ({"lookupd_poll_interval": 0}, ConfigError, "lookupd_poll_interval"),
    ({"lookupd_poll_interval": NAN}, ConfigError, "lookupd_poll_interval"),
    ({"lookupd_poll_jitter": -0.1}, ConfigError, "lookupd_poll_jitter"),
    ({"lookupd_poll_jitter": 1.1}, ConfigError, "lookupd_poll_jitter"),
    ({"low_rdy_idle_timeout": 0}, ConfigError, "low_rdy_idle_timeout"),
    ({"low_rdy_timeout": 0}, ConfigError, "low_rdy_timeout"),
    ({"rdy_redistribute_interval": 0}, ConfigError, "rdy_redistribute_interval"),
    ({"lookupd_connect_timeout": 0}, ConfigError, "lookupd_connect_timeout"),
    ({"lookupd_request_timeout": -1}, ConfigError, "lookupd_request_timeout"),
    ({"concurrency": 0}, ConfigError, "concurrency"),
    ({"concurrency": 1.5}, TypeError, "concurrency"),
    ({"max_connect_attempts": 0}, ConfigError, "max_connect_attempts"),
    ({"max_connect_attempts": 10_001}, ConfigError, "max_connect_attempts"),
    ({"max_connect_attempts": 2.0}, TypeError, "max_connect_attempts"),
    ({"name": ""}, ConfigError, "name"),
    ({"name": 123}, ConfigError, "name"),
    ({"close_timeout": -1}, ConfigError, "close_timeout"),
    ({"backoff_strategy": object()}, TypeError, "backoff_strategy"),
    ({"host": "127.0.0.1"}, ConfigError, "host"),
    ({"port": 4150}, ConfigError, "port"),
    ({"worker_pool": None}, ConfigError, "worker_pool"),
    ({"no_such_option": 1}, TypeError, "no_such_option"),
]


@pytest.mark.parametrize("kwargs,error,param", READER_BAD, ids=_ids(READER_BAD))
def test_reader_refuses_bad_names_addresses_and_parameters(kwargs: Dict[str, Any], error: type, param: str) -> None:
    raises_named(lambda: _reader(**kwargs), error, param)


# A misspelled keyword beside values that are wrong, or missing because of the typo itself: the
# keyword is reported (Python reports its own unknown keywords before the call runs). It used to
# be "ConfigError: nsqd_tcp_addresses=None: give nsqd_tcp_addresses or lookupd_http_addresses".
READER_TYPOS: List[Tuple[Tuple[Any, ...], Dict[str, Any], str]] = [
    (("t", "c", lambda m: True), {"nsqd_tcp_addresse": "127.0.0.1:4150"}, "nsqd_tcp_addresse"),
    (("t", "c", lambda m: True), {"lookupd_http_adresses": ["127.0.0.1:4161"]}, "lookupd_http_adresses"),
    (("t", "c", lambda m: True), {"nsqd_tcp_addresses": "no port", "max_in_fligth": 3}, "max_in_fligth"),
    (("bad topic", "c", 42), {"nsqd_tcp_addresses": "127.0.0.1:4150", "max_in_flight": -1, "io_loop": None}, "io_loop"),
]


@pytest.mark.parametrize("args,kwargs,typo", READER_TYPOS, ids=[t for _, _, t in READER_TYPOS])
def test_reader_reports_an_unknown_keyword_first(args: Tuple[Any, ...], kwargs: Dict[str, Any], typo: str) -> None:
    with pytest.raises(TypeError) as info:
        Reader(*args, **kwargs).close()
    assert not isinstance(info.value, ConfigError), info.value
    assert str(info.value).startswith("Reader() got unexpected keyword argument(s)"), info.value
    assert repr(typo) in str(info.value)


def test_reader_reports_a_reserved_keyword_before_the_addresses() -> None:
    raises_named(lambda: Reader("t", "c", lambda m: True, host="127.0.0.1"), ConfigError, "host")


WRITER_TYPOS: List[Tuple[Tuple[Any, ...], Dict[str, Any], str]] = [
    (("no port",), {"publish_timout": 3}, "publish_timout"),
    (([],), {"max_inflight": 5}, "max_inflight"),
    (("127.0.0.1:4150",), {"name": "", "retries": -1, "io_loop": None}, "io_loop"),
]


@pytest.mark.parametrize("args,kwargs,typo", WRITER_TYPOS, ids=[t for _, _, t in WRITER_TYPOS])
def test_writer_reports_an_unknown_keyword_first(args: Tuple[Any, ...], kwargs: Dict[str, Any], typo: str) -> None:
    with pytest.raises(TypeError) as info:
        Writer(*args, **kwargs).close()
    assert not isinstance(info.value, ConfigError), info.value
    assert str(info.value).startswith("Writer() got unexpected keyword argument(s)"), info.value
    assert repr(typo) in str(info.value)
    with pytest.raises(TypeError, match="worker_pool"):
        Writer(*args, worker_pool=None).close()


def test_reader_methods_refuse_bad_arguments() -> None:
    reader = _reader()
    try:
        raises_named(lambda: reader.set_max_in_flight(-1), ConfigError, "max_in_flight")
        raises_named(lambda: reader.set_max_in_flight("2"), TypeError, "max_in_flight")
        raises_named(lambda: reader.set_max_in_flight(True), TypeError, "max_in_flight")
        raises_named(lambda: reader.set_message_handler(42), TypeError, "message_handler")
        raises_named(lambda: reader.connect_to_nsqd("", 4150), ConfigError, "host")
        raises_named(lambda: reader.connect_to_nsqd(None, 4150), ConfigError, "host")
        raises_named(lambda: reader.connect_to_nsqd("127.0.0.1", 0), ConfigError, "port")
        raises_named(lambda: reader.connect_to_nsqd("127.0.0.1", "4150"), ConfigError, "port")
        raises_named(lambda: reader.close(-1), ConfigError, "timeout")
        raises_named(lambda: reader.close(NAN), ConfigError, "timeout")
        raises_named(lambda: reader.close("soon"), TypeError, "timeout")
        assert not reader.closed  # none of those closed it
        no_handler = Reader("t", "c", nsqd_tcp_addresses="127.0.0.1:4150")
        raises_named(no_handler.start, ConfigError, "message_handler")
        no_handler.close()
    finally:
        reader.close()
    with pytest.raises(ClosedError):
        reader.start()
    with pytest.raises(ClosedError):
        reader.connect_to_nsqd("127.0.0.1", 4150)


def test_worker_pool_refuses_bad_concurrency() -> None:
    for value in (0, -1, "2", 1.5, True):
        raises_named(lambda: WorkerPool(value), ConfigError, "concurrency")


# =========================================================================== Writer: nothing reaches nsqd
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeNsqd]:
    yield from serving_fake()


@pytest.fixture(scope="module")
def writer(fake: FakeNsqd) -> Iterator[Writer]:
    yield from connected_writer(fake)


NOT_CALLABLE = "not a callable"
PUBLISH_BAD: List[Tuple[str, Callable[[Writer], Any], type, str]] = [
    # topic: wrong type, bad names
    ("pub topic None", lambda w: w.pub(None, b"x"), TypeError, "topic"),
    ("pub topic int", lambda w: w.pub(7, b"x"), TypeError, "topic"),
    ("pub topic empty", lambda w: w.pub("", b"x"), ConfigError, "topic"),
    ("pub topic space", lambda w: w.pub("a b", b"x"), ConfigError, "topic"),
    ("pub topic 65 chars", lambda w: w.pub("x" * 65, b"x"), ConfigError, "topic"),
    ("pub topic newline", lambda w: w.pub("t\nPUB evil", b"x"), ConfigError, "topic"),
    ("pub topic non-ascii", lambda w: w.pub("t\u00f3pic", b"x"), ConfigError, "topic"),
    ("pub topic only #ephemeral", lambda w: w.pub("#ephemeral", b"x"), ConfigError, "topic"),
    ("pub topic non-ascii bytes", lambda w: w.pub(b"\xff", b"x"), ConfigError, "topic"),
    # body: wrong types, empty
    ("pub body None", lambda w: w.pub("t", None), TypeError, "body"),
    ("pub body int", lambda w: w.pub("t", 12), TypeError, "body"),
    ("pub body float", lambda w: w.pub("t", 1.5), TypeError, "body"),
    ("pub body list", lambda w: w.pub("t", [b"a"]), TypeError, "body"),
    ("pub body dict", lambda w: w.pub("t", {"a": 1}), TypeError, "body"),
    ("pub body object", lambda w: w.pub("t", object()), TypeError, "body"),
    ("pub body empty bytes", lambda w: w.pub("t", b""), ConfigError, "body"),
    ("pub body empty str", lambda w: w.pub("t", ""), ConfigError, "body"),
    ("pub body empty bytearray", lambda w: w.pub("t", bytearray()), ConfigError, "body"),
    ("pub body empty memoryview", lambda w: w.pub("t", memoryview(b"")), ConfigError, "body"),
    # mpub
    ("mpub empty list", lambda w: w.mpub("t", []), ConfigError, "msgs"),
    ("mpub empty generator", lambda w: w.mpub("t", iter([])), ConfigError, "msgs"),
    ("mpub single str", lambda w: w.mpub("t", "abc"), TypeError, "mpub"),
    ("mpub one empty body", lambda w: w.mpub("t", [b"a", b""]), ConfigError, "msgs[1]"),  # (which one)
    ("mpub one None body", lambda w: w.mpub("t", [b"a", None]), TypeError, "msgs[1]"),
    ("mpub bad topic", lambda w: w.mpub("bad topic", [b"a"]), ConfigError, "topic"),
    # dpub
    ("dpub delay -1", lambda w: w.dpub("t", -1, b"x"), ConfigError, "delay_ms"),
    ("dpub delay 3600001", lambda w: w.dpub("t", 3_600_001, b"x"), ConfigError, "delay_ms"),
    ("dpub delay float", lambda w: w.dpub("t", 1.5, b"x"), TypeError, "delay_ms"),
    ("dpub delay str", lambda w: w.dpub("t", "10", b"x"), TypeError, "delay_ms"),
    ("dpub delay bool", lambda w: w.dpub("t", True, b"x"), TypeError, "delay_ms"),
    ("dpub delay None", lambda w: w.dpub("t", None, b"x"), TypeError, "delay_ms"),
    ("dpub empty body", lambda w: w.dpub("t", 10, b""), ConfigError, "body"),
    # timeout and callback
    ("pub timeout -1", lambda w: w.pub("t", b"x", timeout=-1), ConfigError, "timeout"),
    ("pub timeout nan", lambda w: w.pub("t", b"x", timeout=NAN), ConfigError, "timeout"),
    ("pub timeout str", lambda w: w.pub("t", b"x", timeout="1"), TypeError, "timeout"),
    ("pub callback not callable", lambda w: w.pub("t", b"x", callback=NOT_CALLABLE), TypeError, "callback"),
    ("mpub callback not callable", lambda w: w.mpub("t", [b"x"], callback=NOT_CALLABLE), TypeError, "callback"),
    ("dpub callback not callable", lambda w: w.dpub("t", 5, b"x", callback=NOT_CALLABLE), TypeError, "callback"),
    # the Future-returning variants check the same things before returning
    ("pub_async bad topic", lambda w: w.pub_async("a b", b"x"), ConfigError, "topic"),
    ("pub_async empty body", lambda w: w.pub_async("t", b""), ConfigError, "body"),
    ("pub_async timeout -1", lambda w: w.pub_async("t", b"x", timeout=-1), ConfigError, "timeout"),
    ("mpub_async empty", lambda w: w.mpub_async("t", []), ConfigError, "msgs"),
    ("dpub_async delay -5", lambda w: w.dpub_async("t", -5, b"x"), ConfigError, "delay_ms"),
]


@pytest.mark.parametrize("call,error,param", [c[1:] for c in PUBLISH_BAD], ids=[c[0] for c in PUBLISH_BAD])
def test_writer_publish_refuses_bad_input_before_sending(fake: FakeNsqd, writer: Writer, call: Callable[[Writer], Any], error: type, param: str) -> None:
    before = published(fake)
    raises_named(lambda: call(writer), error, param)
    assert published(fake) == before, "something was published for a bad call"
    conn = list(writer.conns.values())[0]
    assert conn.connected() and conn.pending_requests == 0


def test_writer_still_publishes_after_every_bad_call(fake: FakeNsqd, writer: Writer) -> None:
    before = len(published(fake))
    assert writer.pub("t", b"good") == b"OK"
    fake.wait_until(lambda: len([c for c in fake.received if c.name in PUBLISHING]) > before, what="the good PUB")
    assert published(fake)[before:] == [b"PUB t"]


def test_writer_refuses_to_publish_after_close(fake: FakeNsqd) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread")
    writer.close()
    before = published(fake)
    for call in (lambda: writer.pub("t", b"x"), lambda: writer.pub_async("t", b"x"), lambda: writer.mpub("t", [b"x"], callback=lambda c, d: None)):
        with pytest.raises(ClosedError):
            call()
    assert published(fake) == before


def test_body_too_big_for_the_protocol_is_a_config_error(fake: FakeNsqd, writer: Writer) -> None:
    body = bytes(TOO_BIG)  # zero pages from calloc: no real memory
    offenders = []
    for label, call in [
        ("commands.pub", lambda: commands.pub("t", body)),
        ("nsq_sync.dpub", lambda: nsq_sync.dpub("t", 0, body)),
        ("Writer.pub", lambda: writer.pub("t", body)),
        ("Writer.mpub", lambda: writer.mpub("t", [body])),
        ("Writer.pub_async", lambda: writer.pub_async("t", body)),
    ]:
        try:
            call()
        except ConfigError as exc:
            if exc.param not in ("body", "msgs"):
                offenders.append(f"{label}: ConfigError names {exc.param!r}")
        except Exception as exc:
            offenders.append(f"{label}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
        else:
            offenders.append(f"{label}: accepted")
    assert not offenders, offenders


# =========================================================================== AsyncConn: nothing reaches nsqd
@pytest.fixture
def conn(fake: FakeNsqd) -> Iterator[AsyncConn]:
    made = AsyncConn(fake.host, fake.port, backend="thread")
    made.connect()
    yield made
    made.close(2)


def session_lines(fake: FakeNsqd, conn: AsyncConn) -> List[bytes]:
    port = conn._raw_sock.getsockname()[1]  # type: ignore[union-attr]
    with fake.lock:
        for session in fake.sessions:
            if session.address[1] == port:
                return [c.line for c in session.received]
    raise AssertionError("no fake session for this connection")


def test_asyncconn_methods_refuse_bad_arguments_before_sending(fake: FakeNsqd, conn: AsyncConn) -> None:
    fake.wait_until(lambda: bool(session_lines(fake, conn)), what="IDENTIFY")
    before = session_lines(fake, conn)
    raises_named(lambda: conn.send_rdy(-1), ConfigError, "rdy")
    raises_named(lambda: conn.send_rdy(conn.max_rdy_count + 1), ConfigError, "rdy")
    raises_named(lambda: conn.send_rdy("1"), ConfigError, "rdy")
    raises_named(lambda: conn.send_rdy(True), ConfigError, "rdy")
    raises_named(lambda: conn.send_rdy(1.0), ConfigError, "rdy")
    raises_named(lambda: conn.subscribe("bad topic", "c"), ConfigError, "topic")
    raises_named(lambda: conn.subscribe("t", ""), ConfigError, "channel")
    raises_named(lambda: conn.subscribe(None, "c"), TypeError, "topic")
    with pytest.raises(TypeError):
        conn.send(12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        conn.send(None)  # type: ignore[arg-type]
    assert conn.rdy == 0 and not conn._subscribed
    assert conn.subscribe("t", "c") == b"OK"  # still usable
    fake.wait_for_command("SUB t c")
    assert session_lines(fake, conn)[len(before):] == [b"SUB t c"]


def test_asyncconn_request_of_wrong_type_does_not_shift_answers(fake: FakeNsqd, conn: AsyncConn) -> None:
    for bad in ("PUB t\n", 12345):
        with pytest.raises(TypeError):
            conn.request(bad)  # type: ignore[arg-type]
    assert conn.pending_requests == 0, f"{conn.pending_requests} requests pending although nothing was sent"
    future = conn.request(commands.pub("t", b"after"))
    assert future.result(2) == b"OK"


class Responder:
    """Records what a Message asked its connection to send."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any]] = []

    def _finish_message(self, message: Message) -> None:
        self.calls.append(("FIN", None))
        message._responded = True

    def _requeue_message(self, message: Message, time_ms: int, backoff: bool) -> None:
        self.calls.append(("REQ", time_ms))
        message._responded = True

    def _touch_message(self, message: Message, budget: Optional[float] = None) -> None:
        if message._responded:
            raise AlreadyRespondedError("answered")
        self.calls.append(("TOUCH", None))


@pytest.mark.parametrize(
    "kwargs,error,param",
    [
        ({"delay": -2}, ConfigError, "delay"),
        ({"delay": "1"}, ConfigTypeError, "delay"),
        ({"delay": True}, ConfigTypeError, "delay"),
        ({"delay": [1]}, ConfigTypeError, "delay"),
        ({"time_ms": -3}, ConfigError, "time_ms"),
        ({"time_ms": 1.5}, ConfigTypeError, "time_ms"),
        ({"time_ms": "5"}, ConfigTypeError, "time_ms"),
        ({"time_ms": True}, ConfigTypeError, "time_ms"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_message_requeue_refuses_bad_delays_before_sending(kwargs: Dict[str, Any], error: type, param: str) -> None:
    responder = Responder()
    message = Message(MSG_ID, b"body", 0, 1, responder)
    raises_named(lambda: message.requeue(**kwargs), error, param)
    assert responder.calls == [] and not message.has_responded()


#: requeue() arguments of the wrong type, and of the right type out of range
REQUEUE_WRONG_TYPE = [{"delay": "5"}, {"delay": True}, {"delay": [1]}, {"delay": None, "time_ms": "5000"},
                      {"time_ms": 1.5}, {"time_ms": True}, {"time_ms": b"5"},
                      {"backoff": "no"}, {"backoff": 0}, {"backoff": 1}, {"backoff": "False", "delay": 5}]
REQUEUE_OUT_OF_RANGE = [{"delay": -2}, {"delay": NAN}, {"delay": 1e300}, {"time_ms": -3}, {"time_ms": 2**31}]


@pytest.mark.parametrize("kwargs", REQUEUE_WRONG_TYPE, ids=repr)
def test_message_requeue_wrong_type_is_caught_as_config_error_and_as_type_error(kwargs: Dict[str, Any]) -> None:
    """requeue(delay="5") raised a ConfigError only, where docs/errors.md says a value that is
    not a number is a TypeError (as the Reader's constructor raises): now it is both, so code
    written for either keeps working, and nothing is sent."""
    for caught in (ConfigError, TypeError, ValueError):
        responder = Responder()
        message = Message(MSG_ID, b"body", 0, 1, responder)
        try:
            message.requeue(**kwargs)
        except caught as exc:
            check_named(exc, next(k for k, v in kwargs.items() if v is not None))
        else:
            pytest.fail(f"requeue(**{kwargs!r}) raised nothing")
        assert responder.calls == [] and not message.has_responded()


@pytest.mark.parametrize("kwargs", REQUEUE_OUT_OF_RANGE, ids=repr)
def test_message_requeue_out_of_range_stays_a_config_error_only(kwargs: Dict[str, Any]) -> None:
    message = Message(MSG_ID, b"body", 0, 1, Responder())
    with pytest.raises(ConfigError) as info:
        message.requeue(**kwargs)
    assert not isinstance(info.value, TypeError), repr(info.value)


def test_message_requeue_refuses_non_finite_and_huge_delays() -> None:
    offenders = []
    for kwargs in ({"delay": NAN}, {"delay": INF}, {"delay": 1e300}, {"time_ms": 2**31}, {"time_ms": 2**63}):
        responder = Responder()
        message = Message(MSG_ID, b"body", 0, 1, responder)
        try:
            message.requeue(**kwargs)
        except ConfigError:
            continue
        except Exception as exc:
            offenders.append(f"{kwargs}: {type(exc).__name__}: {exc}")
        else:
            offenders.append(f"{kwargs}: sent REQ with time_ms={responder.calls[-1][1]}"[:120])
    assert not offenders, offenders


def test_message_answers_once_and_only_when_delivered() -> None:
    responder = Responder()
    message = Message(MSG_ID, b"body", 0, 1, responder)
    message.finish()
    with pytest.raises(AlreadyRespondedError):
        message.touch()
    undelivered = Message(MSG_ID, b"body", 0, 1)
    for action in (undelivered.finish, undelivered.requeue, undelivered.touch):
        raises_named(action, ConfigError, "message")


# =========================================================================== protocol helpers (pynsq names)
HELPERS_BAD: List[Tuple[str, Callable[[], Any], type, str]] = [
    ("ready(-1)", lambda: nsq_sync.ready(-1), ConfigError, "count"),
    ("ready(2**31)", lambda: nsq_sync.ready(2**31), ConfigError, "count"),
    ("ready('1')", lambda: nsq_sync.ready("1"), TypeError, "count"),
    ("finish(short id)", lambda: nsq_sync.finish(b"short"), ConfigError, "message_id"),
    ("finish(id with newline)", lambda: nsq_sync.finish(b"0123456789abcde\n"), ConfigError, "message_id"),
    ("finish(None)", lambda: nsq_sync.finish(None), TypeError, "message id"),
    ("touch(17 bytes)", lambda: nsq_sync.touch(MSG_ID + b"x"), ConfigError, "message_id"),
    ("requeue(id, -1)", lambda: nsq_sync.requeue(MSG_ID, -1), ConfigError, "time_ms"),
    ("requeue(id, '5')", lambda: nsq_sync.requeue(MSG_ID, "5"), TypeError, "time_ms"),
    ("auth(None)", lambda: nsq_sync.auth(None), TypeError, "auth_secret"),
    ("auth('')", lambda: nsq_sync.auth(""), ConfigError, "auth_secret"),
    ("subscribe(bad, c)", lambda: nsq_sync.subscribe("a b", "c"), ConfigError, "topic"),
    ("subscribe(t, None)", lambda: nsq_sync.subscribe("t", None), TypeError, "channel"),
    ("pub(t, None)", lambda: nsq_sync.pub("t", None), TypeError, "body"),
    ("pub(t, b'')", lambda: nsq_sync.pub("t", b""), ConfigError, "body"),
    ("mpub(t, [])", lambda: nsq_sync.mpub("t", []), ConfigError, "msgs"),
    ("dpub(t, -1, x)", lambda: nsq_sync.dpub("t", -1, b"x"), ConfigError, "delay_ms"),
    ("decode_message(short)", lambda: nsq_sync.decode_message(b"short"), IntegrityError, ""),
    ("unpack_response(2 bytes)", lambda: nsq_sync.unpack_response(b"ab"), IntegrityError, ""),
]


@pytest.mark.parametrize("call,error,param", [c[1:] for c in HELPERS_BAD], ids=[c[0] for c in HELPERS_BAD])
def test_protocol_helpers_refuse_bad_input(call: Callable[[], Any], error: type, param: str) -> None:
    with pytest.raises(error) as info:
        call()
    if param:
        check_named(info.value, param)


def test_name_checks_never_raise() -> None:
    for value in (None, 5, b"t", "", "a b", "x" * 65, object()):
        assert nsq_sync.valid_topic_name(value) is False or value == b"t"
        assert nsq_sync.valid_channel_name(value) is False or value == b"t"


# =========================================================================== HTTP clients: nothing sent
class CountingListener:
    """A loopback listener that counts the connections made to it (and closes them)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="counting-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.count += 1
            client.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    made = CountingListener()
    yield made
    made.close()


HTTP_CTOR_BAD: List[Tuple[Any, Dict[str, Any], type, str]] = [
    ("", {}, ConfigError, "address"),
    (None, {}, TypeError, "address"),
    (4151, {}, TypeError, "address"),
    ("127.0.0.1", {}, ConfigError, "address"),
    ("ftp://127.0.0.1:4151", {}, ConfigError, "address"),
    ("127.0.0.1:0", {}, ConfigError, "address"),
    ("127.0.0.1:99999", {}, ConfigError, "address"),
    ("http://127.0.0.1:4151/x?y=1", {}, ConfigError, "address"),
    ("127.0.0.1 :4151", {}, ConfigError, "address"),
    ("http://[zz]:4151", {}, ConfigError, "address"),
    ("127.0.0.1:4151", {"timeout": 0}, ConfigError, "timeout"),
    ("127.0.0.1:4151", {"timeout": -1}, ConfigError, "timeout"),
    ("127.0.0.1:4151", {"timeout": NAN}, ConfigError, "timeout"),
    ("127.0.0.1:4151", {"timeout": INF}, ConfigError, "timeout"),
    ("127.0.0.1:4151", {"timeout": "5"}, ConfigError, "timeout"),
    ("127.0.0.1:4151", {"headers": {"Bad Name": "x"}}, ConfigError, "headers"),
    ("127.0.0.1:4151", {"headers": {"X-Ok": "a\r\nInjected: 1"}}, ConfigError, "headers"),
    ("127.0.0.1:4151", {"headers": "X-Ok: 1"}, TypeError, "headers"),
    ("127.0.0.1:4151", {"ssl_context": "context"}, TypeError, "ssl_context"),
]


@pytest.mark.parametrize("address,kwargs,error,param", HTTP_CTOR_BAD, ids=[f"{a!r}-{k!r}"[:50] for a, k, _, _ in HTTP_CTOR_BAD])
def test_http_clients_refuse_bad_addresses_and_options(address: Any, kwargs: Dict[str, Any], error: type, param: str) -> None:
    for cls in (NsqdHTTPClient, LookupdClient):
        raises_named(lambda: cls(address, **kwargs), error, param)


def test_ssl_context_for_plain_http_is_refused() -> None:
    import ssl

    raises_named(lambda: NsqdHTTPClient("127.0.0.1:4151", ssl_context=ssl.create_default_context()), ConfigError, "ssl_context")


def test_http_client_calls_refuse_bad_input_before_sending(listener: CountingListener) -> None:
    nsqd = NsqdHTTPClient(f"127.0.0.1:{listener.port}", timeout=1)
    lookupd = LookupdClient(f"127.0.0.1:{listener.port}", timeout=1)
    cases: List[Tuple[str, Callable[[], Any], type, str]] = [
        ("pub topic None", lambda: nsqd.pub(None, b"x"), TypeError, "topic"),
        ("pub bad topic", lambda: nsqd.pub("a b", b"x"), ConfigError, "topic"),
        ("pub body None", lambda: nsqd.pub("t", None), TypeError, "body"),
        ("pub empty body", lambda: nsqd.pub("t", b""), ConfigError, "body"),
        ("pub 2 GiB body", lambda: nsqd.pub("t", bytes(TOO_BIG)), ConfigError, "body"),
        ("pub defer -1", lambda: nsqd.pub("t", b"x", defer_ms=-1), ConfigError, "defer_ms"),
        ("pub defer float", lambda: nsqd.pub("t", b"x", defer_ms=1.5), TypeError, "defer_ms"),
        ("pub defer bool", lambda: nsqd.pub("t", b"x", defer_ms=True), TypeError, "defer_ms"),
        ("mpub []", lambda: nsqd.mpub("t", []), ConfigError, "bodies"),
        ("mpub single bytes", lambda: nsqd.mpub("t", b"abc"), TypeError, "bodies"),
        ("mpub int", lambda: nsqd.mpub("t", 5), TypeError, "bodies"),
        ("mpub empty body", lambda: nsqd.mpub("t", [b"a", b""]), ConfigError, "bodies[1]"),
        ("mpub text newline", lambda: nsqd.mpub("t", [b"a\nb"], binary=False), ConfigError, "bodies[0]"),
        ("create_topic bad", lambda: nsqd.create_topic("x" * 65), ConfigError, "topic"),
        ("create_channel bad", lambda: nsqd.create_channel("t", "bad name"), ConfigError, "channel"),
        ("delete_channel None", lambda: nsqd.delete_channel("t", None), TypeError, "channel"),
        ("stats topic int", lambda: nsqd.stats(topic=5), TypeError, "topic"),
        ("lookup empty", lambda: lookupd.lookup(""), ConfigError, "topic"),
        ("producers bad", lambda: lookupd.producers("a b"), ConfigError, "topic"),
        ("channels int", lambda: lookupd.channels(5), TypeError, "topic"),
        ("tombstone bad node", lambda: lookupd.tombstone_topic("t", "node"), ConfigError, "node"),
        ("tombstone node port 0", lambda: lookupd.tombstone_topic("t", "h:0"), ConfigError, "node"),
        ("tombstone node int", lambda: lookupd.tombstone_topic("t", 5), TypeError, "node"),
    ]
    failures = []
    for label, call, error, param in cases:
        try:
            raises_named(call, error, param)
        except AssertionError as exc:  # pragma: no cover - reported all together
            failures.append(f"{label}: {exc}")
        except BaseException as exc:  # pragma: no cover
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    assert not failures, failures
    assert listener.count == 0, f"{listener.count} connections were made for bad calls"


# =========================================================================== values once accepted that should not be (fixed in 29ab245)
def test_identify_fields_of_the_wrong_type_are_refused_before_connecting() -> None:
    offenders = []
    for kwargs in ({"client_id": 123}, {"client_id": ["x"]}, {"hostname": 123}):
        try:
            AsyncConn("127.0.0.1", 4150, **kwargs)
        except ConfigError as exc:
            if exc.param != next(iter(kwargs)):
                offenders.append(f"{kwargs}: names {exc.param!r}")
        except TypeError as exc:
            if next(iter(kwargs)) not in str(exc):
                offenders.append(f"{kwargs}: TypeError without the name: {exc}")
        except Exception as exc:
            offenders.append(f"{kwargs}: {type(exc).__name__}: {exc}")
        else:
            offenders.append(f"{kwargs}: accepted")
    assert not offenders, offenders


def test_nsqd_addresses_with_a_scheme_or_spaces_are_refused() -> None:
    offenders = []
    for address in ("http://127.0.0.1:4150", "tcp://127.0.0.1:4150", " 127.0.0.1:4150", "127.0.0.1 :4150"):
        for label, make in (("Writer", lambda: Writer(address)), ("Reader", lambda: _reader(nsqd_tcp_addresses=address))):
            try:
                client = make()
            except ConfigError as exc:
                if exc.param != "nsqd_tcp_addresses":
                    offenders.append(f"{label}({address!r}) names {exc.param!r}")
            else:
                hosts = [n.host for n in getattr(client, "_nodes", [])] or list(getattr(client, "nsqd_tcp_addresses", []))
                client.close()
                if address.strip().startswith(("http", "tcp")) or label == "Writer":
                    offenders.append(f"{label}({address!r}) accepted as {hosts}")
    assert not offenders, offenders


def test_wrong_types_are_refused_and_named() -> None:
    offenders = []
    cases: List[Tuple[str, Callable[[], Any], str]] = [
        ("Writer(name=123)", lambda: Writer("127.0.0.1:4150", name=123), "name"),
        ("Writer(name='')", lambda: Writer("127.0.0.1:4150", name=""), "name"),
        ("AsyncConn(tls_options=123)", lambda: AsyncConn("127.0.0.1", 4150, tls_options=123), "tls_options"),
        ("AsyncConn(tls_options='x')", lambda: AsyncConn("127.0.0.1", 4150, tls_options="x"), "tls_options"),
        ("AsyncConn(snappy='no')", lambda: AsyncConn("127.0.0.1", 4150, snappy="no"), "snappy"),
        ("AsyncConn(tls_v1='yes')", lambda: AsyncConn("127.0.0.1", 4150, tls_v1="yes"), "tls_v1"),
        ("mpub('t', 123)", lambda: commands.mpub("t", 123), "msgs"),
        ("mpub('t', None)", lambda: commands.mpub("t", None), "msgs"),
    ]
    for label, call, param in cases:
        try:
            made = call()
        except (ConfigError, TypeError) as exc:
            try:
                check_named(exc, param)
            except AssertionError as why:
                offenders.append(f"{label}: {why}")
        except Exception as exc:
            offenders.append(f"{label}: {type(exc).__name__}: {exc}")
        else:
            if hasattr(made, "close"):
                made.close()
            offenders.append(f"{label}: accepted")
    assert not offenders, offenders


def test_tls_options_without_tls_v1_warn_once_that_nothing_is_encrypted(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import nsq_sync.conn as conn_module

    monkeypatch.setattr(conn_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="nsq_sync.conn"):
        for _ in range(3):  # (a Reader makes one connection per nsqd)
            AsyncConn("127.0.0.1", 4150, tls_options={"check_hostname": False})
        AsyncConn("127.0.0.1", 4150, tls_v1=True, tls_options={"check_hostname": False})
    warned = [r.getMessage() for r in caplog.records if "NOT encrypted" in r.getMessage()]
    assert warned == ["tls_options were given but tls_v1 is False: connections are NOT encrypted (pass tls_v1=True to use them)"]

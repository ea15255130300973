"""IDENTIFY body (nsqd's ranges, unit conversion), its response, and AsyncConn's constructor checks.

No connection is made: AsyncConn is only constructed.
"""

from __future__ import annotations

import json
import math
import ssl

import pytest

import nsq_sync
from nsq_sync import AsyncConn
from nsq_sync.errors import ConfigError, ProtocolError
from nsq_sync.protocol.identify import build_identify, check_number, parse_identify_response, parse_json_object

BASE = dict(client_id="cid", hostname="host.example", user_agent="test/1.0")


def build(**kwargs):
    return build_identify(**BASE, **kwargs)


# --------------------------------------------------------------------------- defaults and units

def test_defaults():
    data = build()
    assert data == {
        "client_id": "cid",
        "hostname": "host.example",
        "user_agent": "test/1.0",
        "feature_negotiation": True,
        "heartbeat_interval": 30000,
        "output_buffer_size": 16384,
        "output_buffer_timeout": 250,
        "tls_v1": False,
        "snappy": False,
        "deflate": False,
        "deflate_level": 6,
        "sample_rate": 0,
    }
    assert "msg_timeout" not in data
    json.dumps(data)  # serializable as is


@pytest.mark.parametrize(
    "seconds, ms",
    [(1, 1000), (60, 60000), (30, 30000), (1.5, 1500), (2.25, 2250), (59.9999, 60000), (-1, -1), (-1.0, -1)],
)
def test_heartbeat_interval_seconds_to_ms(seconds, ms):
    value = build(heartbeat_interval=seconds)["heartbeat_interval"]
    assert value == ms and type(value) is int


@pytest.mark.parametrize("value", [0, 0.5, 0.999, 60.001, 61, -2, -0.5, 3600, math.inf, -math.inf, math.nan])
def test_heartbeat_interval_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(heartbeat_interval=value)
    assert info.value.param == "heartbeat_interval"
    assert "heartbeat_interval" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("seconds, ms", [(1, 1000), (900, 900000), (60, 60000), (1.5, 1500), (0.0015 * 1000, 1500)])
def test_msg_timeout_seconds_to_ms(seconds, ms):
    value = build(msg_timeout=seconds)["msg_timeout"]
    assert value == ms and type(value) is int


@pytest.mark.parametrize("value", [0, 0.5, 900.5, 901, -1, math.nan])
def test_msg_timeout_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(msg_timeout=value)
    assert info.value.param == "msg_timeout"
    assert "msg_timeout" in str(info.value)


def test_msg_timeout_absent_when_none():
    assert "msg_timeout" not in build(msg_timeout=None)


@pytest.mark.parametrize("value", [64, 65536, 16384, -1, 0])
def test_output_buffer_size_ok(value):
    assert build(output_buffer_size=value)["output_buffer_size"] == value


@pytest.mark.parametrize("value", [63, 1, 65537, -2, 10**9])
def test_output_buffer_size_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(output_buffer_size=value)
    assert info.value.param == "output_buffer_size" and info.value.value == value
    assert "output_buffer_size" in str(info.value) and str(value) in str(info.value)


@pytest.mark.parametrize("value", [25, 30000, 250, -1, 0])
def test_output_buffer_timeout_ok(value):
    assert build(output_buffer_timeout=value)["output_buffer_timeout"] == value


@pytest.mark.parametrize("value", [24, 1, 30001, -2])
def test_output_buffer_timeout_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(output_buffer_timeout=value)
    assert info.value.param == "output_buffer_timeout" and str(value) in str(info.value)


@pytest.mark.parametrize("value", [0, 1, 50, 99])
def test_sample_rate_ok(value):
    assert build(sample_rate=value)["sample_rate"] == value


@pytest.mark.parametrize("value", [-1, 100, 1000])
def test_sample_rate_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(sample_rate=value)
    assert info.value.param == "sample_rate" and str(value) in str(info.value)


@pytest.mark.parametrize("value", range(1, 10))
def test_deflate_level_ok(value):
    assert build(deflate=True, deflate_level=value)["deflate_level"] == value


@pytest.mark.parametrize("value", [0, 10, -1])
def test_deflate_level_out_of_range(value):
    with pytest.raises(ConfigError) as info:
        build(deflate_level=value)
    assert info.value.param == "deflate_level" and str(value) in str(info.value)


def test_snappy_and_deflate_together():
    with pytest.raises(ConfigError) as info:
        build(snappy=True, deflate=True)
    assert info.value.param in ("snappy", "deflate")
    assert "snappy" in str(info.value) and "deflate" in str(info.value)


def test_flags_are_bools():
    data = build(tls_v1=1, snappy=1)
    assert data["tls_v1"] is True and data["snappy"] is True and data["deflate"] is False
    assert build(deflate=True)["deflate"] is True


NON_NUMBERS = [
    (param, value)
    for param in ("heartbeat_interval", "output_buffer_size", "output_buffer_timeout", "sample_rate", "deflate_level", "msg_timeout")
    for value in (True, False, "10", None, [1])
    if not (param == "msg_timeout" and value is None)  # None means the server default
]


@pytest.mark.parametrize("param, value", NON_NUMBERS, ids=[f"{p}={v!r}" for p, v in NON_NUMBERS])
def test_non_numbers_rejected(param, value):
    with pytest.raises((TypeError, ConfigError)) as info:
        build(**{param: value})
    assert param in str(info.value)


@pytest.mark.parametrize("param", ["output_buffer_size", "output_buffer_timeout", "sample_rate", "deflate_level"])
def test_integer_params_refuse_floats(param):
    with pytest.raises((TypeError, ConfigError)) as info:
        build(**{param: 64.0 if param.startswith("output") else 5.0})
    assert param in str(info.value)


def test_check_number():
    assert check_number("x", 5, 1, 10) == 5
    assert check_number("x", -1, 1, 10, allowed=(-1,)) == -1
    with pytest.raises(ConfigError) as info:
        check_number("x", 11, 1, 10, allowed=(-1,))
    assert "-1" in str(info.value) and "x=11" in str(info.value)
    with pytest.raises(TypeError):
        check_number("x", True, 0, 10)


# --------------------------------------------------------------------------- the response

def test_parse_ok():
    assert parse_identify_response(b"OK") is None


def test_parse_json_with_default_max_rdy_count():
    parsed = parse_identify_response(b'{"version":"1.3.0","snappy":true}')
    assert parsed == {"version": "1.3.0", "snappy": True, "max_rdy_count": 2500}


def test_parse_json_keeps_server_max_rdy_count():
    parsed = parse_identify_response(json.dumps({"max_rdy_count": 100, "auth_required": True}).encode())
    assert parsed["max_rdy_count"] == 100 and parsed["auth_required"] is True


@pytest.mark.parametrize("data", [b"", b"garbage", b"{", b"[1,2]", b'"OK"', b"42", b"\xff\xfe", b"null"], ids=repr)
def test_parse_garbage(data):
    with pytest.raises(ProtocolError):
        parse_identify_response(data)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_rdy_count", "abc"),
        ("max_rdy_count", None),
        ("max_rdy_count", -5),
        ("max_rdy_count", 2.5),
        ("max_rdy_count", True),
        ("msg_timeout", "60000"),
        ("msg_timeout", None),
        ("msg_timeout", -1),
        ("max_msg_timeout", [1]),
        ("deflate_level", 10),
        ("deflate_level", "x"),
    ],
)
def test_parse_rejects_fields_out_of_range(field, value):
    # A typed error naming the field, not a ValueError/TypeError from deep in connect(), and no
    # connection that can never send RDY (max_rdy_count <= 0).
    with pytest.raises(ProtocolError, match=f"field {field}="):
        parse_identify_response(json.dumps({field: value}).encode())


def test_parse_accepts_max_rdy_count_0():
    # nsqd --max-rdy-count=0 is a legal (publish-only) setting: its publishers must connect.
    assert parse_identify_response(b'{"max_rdy_count": 0}')["max_rdy_count"] == 0


def test_parse_accepts_what_nsqd_sends_without_deflate():
    answer = {"max_rdy_count": 2500, "version": "1.3.0", "max_msg_timeout": 900000, "msg_timeout": 60000, "tls_v1": False,
              "deflate": False, "deflate_level": 0, "max_deflate_level": 6, "snappy": False, "sample_rate": 0,
              "auth_required": False, "output_buffer_size": 16384, "output_buffer_timeout": 250}
    assert parse_identify_response(json.dumps(answer).encode()) == answer


def test_parse_json_object_for_auth():
    data = {"identity": "me", "identity_url": "http://auth", "permission_count": 2}
    assert parse_json_object(json.dumps(data).encode(), "AUTH") == data  # no max_rdy_count added
    with pytest.raises(ProtocolError, match="AUTH"):
        parse_json_object(b"OK", "AUTH")
    with pytest.raises(ProtocolError, match="AUTH"):
        parse_json_object(b"[]", "AUTH")


# --------------------------------------------------------------------------- AsyncConn constructor

def conn(**kwargs):
    params = dict(host="127.0.0.1", port=4150)
    params.update(kwargs)
    return AsyncConn(**params)


def test_valid_conn_makes_no_connection():
    c = conn(heartbeat_interval=5, msg_timeout=30, sample_rate=10, output_buffer_timeout=100, deflate=True, deflate_level=3)
    assert c.state == "INIT" and c.closed() and not c.connected()
    assert c._identify_data["heartbeat_interval"] == 5000
    assert c._identify_data["msg_timeout"] == 30000
    assert c._identify_data["deflate_level"] == 3
    assert c._stream is None and c._reader is None


def test_conn_keeps_every_parameter_but_the_secret_as_an_attribute():
    """docs/asyncconn.md: every constructor parameter except auth_secret is an attribute, as
    given; client_id and hostname with their defaults filled in (what IDENTIFY sends)."""
    import inspect

    given = dict(heartbeat_interval=5, msg_timeout=30, sample_rate=10, output_buffer_size=32768, output_buffer_timeout=100,
                 deflate=True, deflate_level=3, user_agent="ua/1", client_id="worker-7", hostname="box.example",
                 max_frame_size=4096, close_timeout=2.5, requeue_delay=12, max_requeue_delay=600, timeout=3.0)
    c = conn(**given)
    for name, value in given.items():
        assert getattr(c, name) == value, name
    assert c._identify_data["client_id"] == "worker-7" and c._identify_data["hostname"] == "box.example"
    named = set(inspect.signature(AsyncConn).parameters) - {"auth_secret", "kwargs", "backend", "worker_pool", "io_loop"}
    assert [name for name in named if not hasattr(c, name)] == []
    assert not hasattr(c, "auth_secret")
    default = conn(hostname="web-3.dc1.example")
    assert default.client_id == "web-3" == default._identify_data["client_id"]


BAD_CONN_VALUES = [
    ("host", ""),
    ("host", None),
    ("host", 123),
    ("port", 0),
    ("port", 65536),
    ("port", -1),
    ("port", "4150"),
    ("port", True),
    ("port", 4150.0),
    ("timeout", 0),
    ("timeout", -1.0),
    ("timeout", 10**6),
    ("heartbeat_interval", 0),
    ("heartbeat_interval", 0.5),
    ("heartbeat_interval", 61),
    ("sample_rate", 100),
    ("sample_rate", -1),
    ("deflate_level", 0),
    ("deflate_level", 10),
    ("msg_timeout", 0),
    ("msg_timeout", 901),
    ("output_buffer_size", 63),
    ("output_buffer_size", 65537),
    ("output_buffer_timeout", 24),
    ("output_buffer_timeout", 30001),
    ("requeue_delay", -1),
    ("max_requeue_delay", -1),
    ("max_frame_size", 10),
    ("close_timeout", -1),
    ("user_agent", 5),
    ("auth_secret", 12345),
    ("auth_secret", ""),
    ("auth_secret", b""),
    ("auth_secret", ["s3cr3t"]),
    ("worker_pool", "pool"),
    ("backend", "nope"),
]


@pytest.mark.parametrize("param, value", BAD_CONN_VALUES, ids=[f"{p}={v!r}" for p, v in BAD_CONN_VALUES])
def test_conn_bad_values(param, value):
    with pytest.raises(ConfigError) as info:
        conn(**{param: value})
    assert isinstance(info.value, ValueError)
    assert info.value.param == param
    assert param in str(info.value)
    if param != "auth_secret":
        assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "param, value",
    [("timeout", "1"), ("heartbeat_interval", "30"), ("sample_rate", 1.5), ("msg_timeout", "60"), ("heartbeat_interval", True)],
    ids=repr,
)
def test_conn_wrong_number_types(param, value):
    # check_number documents TypeError for non-numbers (ConfigError is for out-of-range values)
    with pytest.raises((TypeError, ConfigError)) as info:
        conn(**{param: value})
    assert param in str(info.value)


def test_conn_snappy_and_deflate():
    with pytest.raises(ConfigError):
        conn(snappy=True, deflate=True)


SECRET = "hunter2-very-secret-token"


@pytest.mark.parametrize("secret", [SECRET, SECRET.encode()], ids=["str", "bytes"])
def test_auth_secret_never_shown(secret):
    c = conn(auth_secret=secret)
    for text in (repr(c), str(c)):
        assert SECRET not in text
    # another parameter's error with a secret set: still not shown
    with pytest.raises(ConfigError) as info:
        conn(auth_secret=secret, sample_rate=500)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in repr(info.value.args)


@pytest.mark.parametrize("secret", [12345678, 3.14159, [SECRET], {"s": SECRET}], ids=lambda s: type(s).__name__)
def test_bad_auth_secret_type_not_shown(secret):
    with pytest.raises(ConfigError) as info:
        conn(auth_secret=secret)
    assert info.value.param == "auth_secret"
    assert str(secret) not in str(info.value) and SECRET not in str(info.value)
    assert info.value.value != secret


def test_unknown_tls_option_key():
    with pytest.raises(ConfigError) as info:
        conn(tls_v1=True, tls_options={"ca_certs": None, "bogus_key": 1})
    assert info.value.param == "tls_options"
    assert "bogus_key" in str(info.value)


def test_tls_options_unreadable_file():
    with pytest.raises(ConfigError) as info:
        conn(tls_v1=True, tls_options={"ca_certs": "/nonexistent/ca.pem"})
    assert info.value.param == "tls_options"


def test_tls_options_password_not_shown():
    with pytest.raises(ConfigError) as info:
        conn(tls_v1=True, tls_options={"certfile": "/nonexistent/c.pem", "password": "pw-" + SECRET})
    assert SECRET not in str(info.value)


def test_tls_context_passed_through():
    context = ssl.create_default_context()
    c = conn(tls_v1=True, tls_options=context)
    assert c._ssl_context is context


def test_backend_names():
    assert conn(backend="thread").backend.name == "thread"
    with pytest.raises(ConfigError) as info:
        conn(backend="nope")
    assert info.value.param == "backend" and "'nope'" in str(info.value)
    with pytest.raises(ConfigError):
        conn(backend=object())


def test_defaults_match_pynsq():
    c = conn()
    assert c.timeout == 1.0 and c.heartbeat_interval == 30 and c.requeue_delay == 90
    assert c.output_buffer_size == 16384 and c.output_buffer_timeout == 250 and c.sample_rate == 0
    assert c.max_rdy_count == 2500 and c.rdy == 0 and c.in_flight == 0
    assert c.id == "127.0.0.1:4150"
    assert c._identify_data["user_agent"].startswith("nsq_sync/")


def test_close_before_connect_fires_close_once():
    c = conn()
    seen = []
    c.on("close", lambda conn: seen.append(conn))
    c.close()
    c.close()
    assert seen == [c]
    assert c.state == "DISCONNECTED"
    assert isinstance(nsq_sync.AsyncConn, type)

"""Command encoders: exact bytes on the wire, and every argument check before a byte is produced."""

from __future__ import annotations

import json
import struct

import pytest

import nsq_sync
from nsq_sync.errors import ConfigError, Error
from nsq_sync.protocol import commands
from nsq_sync.protocol.constants import MAGIC_V2
from nsq_sync.protocol.names import check_channel, check_topic, valid_channel_name, valid_topic_name

MSG_ID = b"0123456789abcdef"  # 16 ASCII bytes, as nsqd sends them
assert len(MSG_ID) == 16


# --------------------------------------------------------------------------- byte-exact table

EXACT = [
    ("magic", lambda: commands.MAGIC_V2, b"  V2"),
    ("auth", lambda: commands.auth(b"secret"), b"AUTH\n\x00\x00\x00\x06secret"),
    ("auth str", lambda: commands.auth("s\u00e9"), b"AUTH\n\x00\x00\x00\x03s\xc3\xa9"),
    ("sub", lambda: commands.sub("topic", "channel"), b"SUB topic channel\n"),
    ("sub ephemeral", lambda: commands.sub("t#ephemeral", "c#ephemeral"), b"SUB t#ephemeral c#ephemeral\n"),
    ("sub all chars", lambda: commands.sub("a.b_c-D9", "Z.y-x_0"), b"SUB a.b_c-D9 Z.y-x_0\n"),
    ("pub", lambda: commands.pub("t", b"hello"), b"PUB t\n\x00\x00\x00\x05hello"),
    ("pub binary", lambda: commands.pub("t", b"\x00\n\xff"), b"PUB t\n\x00\x00\x00\x03\x00\n\xff"),
    ("pub 300", lambda: commands.pub("t", b"x" * 300), b"PUB t\n\x00\x00\x01\x2c" + b"x" * 300),
    ("pub 70000", lambda: commands.pub("t", b"y" * 70000), b"PUB t\n\x00\x01\x11\x70" + b"y" * 70000),
    ("pub bytearray", lambda: commands.pub("t", bytearray(b"ab")), b"PUB t\n\x00\x00\x00\x02ab"),
    ("pub memoryview", lambda: commands.pub("t", memoryview(b"ab")), b"PUB t\n\x00\x00\x00\x02ab"),
    (
        "mpub",
        lambda: commands.mpub("t", [b"a", b"bc"]),
        # outer size 15 = count(4) + (4+1) + (4+2); then count 2; then each size + body
        b"MPUB t\n\x00\x00\x00\x0f\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x02bc",
    ),
    ("mpub one", lambda: commands.mpub("t", [b"xyz"]), b"MPUB t\n\x00\x00\x00\x0b\x00\x00\x00\x01\x00\x00\x00\x03xyz"),
    (
        "mpub generator and str",
        lambda: commands.mpub("t", (b for b in ["\u00e9", b"z"])),
        b"MPUB t\n\x00\x00\x00\x0f\x00\x00\x00\x02\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x01z",
    ),
    ("dpub", lambda: commands.dpub("t", 1500, b"x"), b"DPUB t 1500\n\x00\x00\x00\x01x"),
    ("dpub 0", lambda: commands.dpub("t", 0, b"x"), b"DPUB t 0\n\x00\x00\x00\x01x"),
    ("dpub max", lambda: commands.dpub("t", 3_600_000, b"xy"), b"DPUB t 3600000\n\x00\x00\x00\x02xy"),
    ("rdy 0", lambda: commands.rdy(0), b"RDY 0\n"),
    ("rdy 2500", lambda: commands.rdy(2500), b"RDY 2500\n"),
    ("fin", lambda: commands.fin(MSG_ID), b"FIN 0123456789abcdef\n"),
    ("fin str id", lambda: commands.fin(MSG_ID.decode()), b"FIN 0123456789abcdef\n"),
    ("fin bytearray id", lambda: commands.fin(bytearray(MSG_ID)), b"FIN 0123456789abcdef\n"),
    ("req", lambda: commands.req(MSG_ID, 0), b"REQ 0123456789abcdef 0\n"),
    ("req 60000", lambda: commands.req(MSG_ID, 60000), b"REQ 0123456789abcdef 60000\n"),
    ("touch", lambda: commands.touch(MSG_ID), b"TOUCH 0123456789abcdef\n"),
    ("cls", lambda: commands.cls(), b"CLS\n"),
    ("nop", lambda: commands.nop(), b"NOP\n"),
]


@pytest.mark.parametrize("build, expected", [(b, e) for _, b, e in EXACT], ids=[n for n, _, _ in EXACT])
def test_exact_bytes(build, expected):
    assert build() == expected


def test_magic_constant():
    assert MAGIC_V2 == b"  V2"
    assert len(MAGIC_V2) == 4


def _split_identify(wire: bytes):
    assert wire.startswith(b"IDENTIFY\n")
    rest = wire[len(b"IDENTIFY\n") :]
    (size,) = struct.unpack(">l", rest[:4])
    body = rest[4:]
    assert size == len(body), "the 4-byte big-endian size counts the body's bytes exactly"
    return json.loads(body.decode("utf-8"))


def test_identify_wire_layout():
    data = {"client_id": "c", "hostname": "h.example", "feature_negotiation": True, "heartbeat_interval": 30000}
    wire = commands.identify(data)
    assert _split_identify(wire) == data


def test_identify_non_ascii_size_counts_bytes():
    data = {"client_id": "\u00e9\u4e2d\U0001f600", "user_agent": "x" * 400}
    wire = commands.identify(data)
    body = wire[len(b"IDENTIFY\n") + 4 :]
    assert struct.unpack(">l", wire[9:13])[0] == len(body) > 400
    assert _split_identify(wire) == data


def test_identify_exact_bytes_for_a_small_body():
    wire = commands.identify({})
    assert wire == b"IDENTIFY\n\x00\x00\x00\x02{}"


def test_mpub_outer_size_includes_count():
    bodies = [b"m%d" % i * (i + 1) for i in range(50)]
    wire = commands.mpub("topic", bodies)
    header = b"MPUB topic\n"
    assert wire.startswith(header)
    rest = wire[len(header) :]
    (outer,) = struct.unpack(">l", rest[:4])
    assert outer == len(rest) - 4 == 4 + sum(4 + len(b) for b in bodies)
    (count,) = struct.unpack(">l", rest[4:8])
    assert count == 50
    offset = 8
    decoded = []
    for _ in range(count):
        (n,) = struct.unpack(">l", rest[offset : offset + 4])
        decoded.append(rest[offset + 4 : offset + 4 + n])
        offset += 4 + n
    assert offset == len(rest)
    assert decoded == bodies


def test_str_body_encoded_as_utf8():
    text = "h\u00e9llo \u4e16\u754c"
    encoded = text.encode("utf-8")
    assert commands.pub("t", text) == b"PUB t\n" + struct.pack(">l", len(encoded)) + encoded
    assert commands.dpub("t", 5, text) == b"DPUB t 5\n" + struct.pack(">l", len(encoded)) + encoded
    assert commands.to_body(text) == encoded



def test_message_body_type_is_what_to_body_takes():
    """``MessageBody``, the annotation of every publishing call's body (Writer, NsqdHTTPClient,
    the helpers), names exactly the types the encoders accept: each of its members is encoded,
    and other candidates a caller might pass are refused."""
    import array
    import typing

    members = typing.get_args(commands.MessageBody)
    assert set(members) == {bytes, bytearray, memoryview, str}
    samples = {bytes: b"x", bytearray: bytearray(b"x"), memoryview: memoryview(b"x"), str: "x"}
    for member in members:
        assert commands.to_body(samples[member]) == b"x"
    for other in (1, 1.5, None, {"a": 1}, [b"x"], (b"x",), array.array("b", b"x"), object()):
        with pytest.raises(TypeError):
            commands.to_body(other)


# --------------------------------------------------------------------------- pynsq-named helpers

HELPERS = [
    ("identify", lambda: nsq_sync.identify({"a": 1}), lambda: commands.identify({"a": 1})),
    ("auth", lambda: nsq_sync.auth(b"pw"), lambda: b"AUTH\n\x00\x00\x00\x02pw"),
    ("subscribe", lambda: nsq_sync.subscribe("t", "c"), lambda: b"SUB t c\n"),
    ("ready", lambda: nsq_sync.ready(7), lambda: b"RDY 7\n"),
    ("finish", lambda: nsq_sync.finish(MSG_ID), lambda: b"FIN 0123456789abcdef\n"),
    ("requeue default", lambda: nsq_sync.requeue(MSG_ID), lambda: b"REQ 0123456789abcdef 0\n"),
    ("requeue", lambda: nsq_sync.requeue(MSG_ID, 2500), lambda: b"REQ 0123456789abcdef 2500\n"),
    ("requeue kw", lambda: nsq_sync.requeue(MSG_ID, time_ms=10), lambda: b"REQ 0123456789abcdef 10\n"),
    ("touch", lambda: nsq_sync.touch(MSG_ID), lambda: b"TOUCH 0123456789abcdef\n"),
    ("nop", lambda: nsq_sync.nop(), lambda: b"NOP\n"),
    ("pub", lambda: nsq_sync.pub("t", b"abc"), lambda: b"PUB t\n\x00\x00\x00\x03abc"),
    (
        "mpub",
        lambda: nsq_sync.mpub("t", [b"a", b"b"]),
        lambda: b"MPUB t\n\x00\x00\x00\x0e\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x01b",
    ),
    ("dpub", lambda: nsq_sync.dpub("t", 100, b"abc"), lambda: b"DPUB t 100\n\x00\x00\x00\x03abc"),
]


@pytest.mark.parametrize("helper, expected", [(h, e) for _, h, e in HELPERS], ids=[n for n, _, _ in HELPERS])
def test_pynsq_helpers(helper, expected):
    assert helper() == expected()


def test_helpers_validate_like_the_encoders():
    with pytest.raises(ConfigError):
        nsq_sync.subscribe("bad topic", "c")
    with pytest.raises(ConfigError):
        nsq_sync.pub("t", b"")
    with pytest.raises(TypeError):
        nsq_sync.mpub("t", b"abc")
    with pytest.raises(ConfigError):
        nsq_sync.dpub("t", -1, b"x")
    with pytest.raises(ConfigError):
        nsq_sync.finish(b"short")
    with pytest.raises(ConfigError):
        nsq_sync.ready(-1)


# --------------------------------------------------------------------------- names

BAD_NAMES = [
    "",
    "a" * 65,
    "a b",
    " a",
    "a\t",
    "t\u00f3pico",
    "\u4e2d",
    "#ephemeral",
    "a#ephemeral#ephemeral",
    "a#eph",
    "a#",
    "a/b",
    "a:b",
    "a*",
    "a\x00b",
    "a" * 55 + "#ephemeral",  # 65 in total
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_topic_rejected(name):
    assert not valid_topic_name(name)
    with pytest.raises(ConfigError) as info:
        commands.sub(name, "channel")
    assert info.value.param == "topic"
    assert "topic" in str(info.value)
    for build in (lambda: commands.pub(name, b"x"), lambda: commands.mpub(name, [b"x"]), lambda: commands.dpub(name, 0, b"x")):
        with pytest.raises(ConfigError):
            build()


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_channel_rejected(name):
    assert not valid_channel_name(name)
    with pytest.raises(ConfigError) as info:
        commands.sub("topic", name)
    assert info.value.param == "channel"
    assert "channel" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["a", "a" * 64, "a" * 54 + "#ephemeral", "a#ephemeral", ".", "-", "_", "A.b-C_9"],
    ids=lambda n: f"{n[:12]}..{len(n)}",
)
def test_good_names_accepted(name):
    assert valid_topic_name(name) and valid_channel_name(name)
    assert check_topic(name) == name
    assert check_channel(name) == name
    assert commands.sub(name, name) == b"SUB %s %s\n" % (name.encode(), name.encode())


def test_exactly_64_with_ephemeral_is_ok():
    name = "a" * 54 + "#ephemeral"
    assert len(name) == 64
    assert commands.pub(name, b"x").startswith(b"PUB " + name.encode() + b"\n")


@pytest.mark.parametrize("name", ["abc\n", "abc#ephemeral\n", "abc\r", "\nabc"], ids=repr)
def test_newline_in_name_rejected(name):
    """Regression (fixed in 313f902): a '$'-anchored regex let 'abc\\n' through, injecting a command."""
    assert not valid_topic_name(name) and not valid_channel_name(name)
    with pytest.raises(ConfigError):
        commands.sub(name, "channel")
    with pytest.raises(ConfigError):
        commands.sub("topic", name)
    with pytest.raises(ConfigError):
        commands.pub(name, b"x")


def test_bytes_names_are_decoded():
    assert commands.sub(b"t", b"c") == b"SUB t c\n"
    with pytest.raises(ConfigError):
        commands.sub(b"\xff", "c")


@pytest.mark.parametrize("name", [None, 123, ["t"]], ids=repr)
def test_non_string_name_type_error(name):
    with pytest.raises(TypeError):
        commands.sub(name, "c")
    with pytest.raises(TypeError):
        commands.sub("t", name)


# --------------------------------------------------------------------------- bodies

@pytest.mark.parametrize("body", [None, 123, 1.5, ["x"], {"a": 1}, object()], ids=lambda b: type(b).__name__)
def test_non_bytes_body_type_error(body):
    with pytest.raises(TypeError):
        commands.pub("t", body)
    with pytest.raises(TypeError):
        commands.dpub("t", 0, body)
    with pytest.raises(TypeError):
        commands.mpub("t", [b"ok", body])
    with pytest.raises(TypeError):
        nsq_sync.pub("t", body)


@pytest.mark.parametrize("body", [b"", "", bytearray(), memoryview(b"")], ids=lambda b: type(b).__name__)
def test_empty_body_config_error(body):
    builds = ((lambda: commands.pub("t", body), "body"), (lambda: commands.dpub("t", 0, body), "body"),
              (lambda: commands.mpub("t", [b"x", body]), "msgs[1]"))  # fmt: skip
    for build, param in builds:
        with pytest.raises(ConfigError) as info:
            build()
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, nsq_sync.Error)
        assert isinstance(info.value, Error)
        assert info.value.param == param


def test_mpub_empty_list():
    with pytest.raises(ConfigError) as info:
        commands.mpub("t", [])
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        commands.mpub("t", iter(()))
    with pytest.raises(ConfigError):
        nsq_sync.mpub("t", [])


@pytest.mark.parametrize("single", [b"abc", "abc", bytearray(b"abc"), memoryview(b"abc")], ids=lambda b: type(b).__name__)
def test_mpub_single_body_type_error(single):
    with pytest.raises(TypeError):
        commands.mpub("t", single)


def test_mpub_non_iterable_type_error():
    with pytest.raises(TypeError):
        commands.mpub("t", 5)


@pytest.mark.parametrize("delay", [-1, 3_600_001, 2**40])
def test_dpub_delay_out_of_range(delay):
    with pytest.raises(ConfigError) as info:
        commands.dpub("t", delay, b"x")
    assert info.value.param == "delay_ms"
    assert info.value.value == delay
    assert "delay_ms" in str(info.value) and str(delay) in str(info.value)


@pytest.mark.parametrize("delay", [True, 1.5, "10", None])
def test_dpub_delay_wrong_type(delay):
    with pytest.raises(TypeError):
        commands.dpub("t", delay, b"x")


def test_auth_bad_secrets():
    with pytest.raises(ConfigError):
        commands.auth(b"")
    with pytest.raises(TypeError):
        commands.auth(None)


# --------------------------------------------------------------------------- ids and counts

BAD_IDS = [b"0123456789abcde", b"0123456789abcdef0", b"", b"0123456789 bcdef", b"0123456789\nbcdef", "0123456789abcde"]


@pytest.mark.parametrize("message_id", BAD_IDS, ids=repr)
def test_bad_message_ids(message_id):
    for build in (commands.fin, commands.touch, lambda i: commands.req(i, 0), nsq_sync.finish, nsq_sync.touch, nsq_sync.requeue):
        with pytest.raises(ConfigError) as info:
            build(message_id)
        assert info.value.param == "message_id"


@pytest.mark.parametrize("message_id", [None, 12345, 1.0], ids=repr)
def test_message_id_wrong_type(message_id):
    with pytest.raises(TypeError):
        commands.fin(message_id)


@pytest.mark.parametrize("count", [-1, 2**31])
def test_rdy_out_of_range(count):
    with pytest.raises(ConfigError) as info:
        commands.rdy(count)
    assert info.value.param == "count"


@pytest.mark.parametrize("count", [True, 1.0, "1", None])
def test_rdy_wrong_type(count):
    with pytest.raises(TypeError):
        commands.rdy(count)


def test_req_negative_time():
    with pytest.raises(ConfigError) as info:
        commands.req(MSG_ID, -1)
    assert info.value.param == "time_ms"
    with pytest.raises(TypeError):
        commands.req(MSG_ID, 1.5)


def test_errors_before_any_bytes_are_produced():
    # A bad topic with a bad body: the encoder raises, nothing partial is returned.
    with pytest.raises((ConfigError, TypeError)):
        commands.pub("bad topic", 123)

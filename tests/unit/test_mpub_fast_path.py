"""MPUB encoding (commands.mpub_parts), the Writer's MPUB size limits, and Writer.pub's fast path.

mpub_parts has a fast path for a list of non-empty bytes, checked in C; everything else goes
through to_body one body at a time. Both must give the same bytes, and bad input the same typed
error (the first bad body's, in order). The Writer checks max_msg_size without max() when all the
messages together fit, so the limits are checked here at their edges, against the fake nsqd.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from nsq_sync import Writer
from nsq_sync.errors import ConfigError
from nsq_sync.protocol import commands

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from fake_nsqd import FakeNsqd  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def reference(topic: str, bodies: List[bytes]) -> bytes:
    """MPUB written out the plain way."""
    payload = struct.pack(">l", len(bodies)) + b"".join(struct.pack(">l", len(b)) + b for b in bodies)
    return b"MPUB %s\n" % topic.encode() + struct.pack(">l", len(payload)) + payload


class SubBytes(bytes):
    pass


@pytest.mark.parametrize(
    "bodies,expected",
    [
        ([b"a"], [b"a"]),
        ([b"a", b"bc", b"x" * 70000, b"x" * 70000, b"d" * 300], [b"a", b"bc", b"x" * 70000, b"x" * 70000, b"d" * 300]),
        ((b"a", b"bc"), [b"a", b"bc"]),
        (iter([b"a", "\u00e9"]), [b"a", b"\xc3\xa9"]),
        ([b"a", bytearray(b"bc"), memoryview(b"def"), "gh"], [b"a", b"bc", b"def", b"gh"]),
        ([SubBytes(b"sub"), b"x"], [b"sub", b"x"]),
        ([memoryview(b"abcd").cast("I")], [b"abcd"]),  # its len() is 1: the byte count is used
    ],
    ids=["one", "sizes", "tuple", "generator+str", "mixed types", "bytes subclass", "memoryview of ints"],
)
def test_mpub_parts_matches_the_plain_encoding(bodies: Any, expected: List[bytes]) -> None:
    data, body_size, sizes = commands.mpub_parts("t", bodies)
    assert data == reference("t", expected)
    assert sizes == [len(b) for b in expected]
    assert body_size == len(data) - len(b"MPUB t\n") - 4
    assert commands.mpub("t", expected) == data
    assert commands.mpub_sized("t", expected) == (data, max(sizes))


def test_mpub_parts_does_not_change_the_callers_list() -> None:
    bodies = [b"a", b"bc"]
    commands.mpub_parts("t", bodies)
    assert bodies == [b"a", b"bc"]


@pytest.mark.parametrize(
    "bodies,error,param",
    [
        ([b"a", b"", 5], ConfigError, "msgs[1]"),  # (the param names which message)
        ([b"a", 5, b""], TypeError, "msgs[1]"),
        ([b"", b"a"], ConfigError, "msgs[0]"),
        ([b"a", None], TypeError, "msgs[1]"),
        ([b"a", bytearray()], ConfigError, "msgs[1]"),
        ((b for b in [b"a", b""]), ConfigError, "msgs[1]"),
        ([], ConfigError, "msgs"),
    ],
)
def test_mpub_parts_first_bad_body_decides_the_error(bodies: Any, error: type, param: str) -> None:
    with pytest.raises(error) as info:
        commands.mpub_parts("t", bodies)
    if error is ConfigError:
        assert info.value.param == param  # type: ignore[attr-defined]
    else:
        assert param in str(info.value)


def test_mpub_topic_is_checked_before_the_bodies() -> None:
    with pytest.raises(ConfigError) as info:
        commands.mpub_parts("bad topic", [b""])
    assert info.value.param == "topic"
    with pytest.raises(TypeError, match="topic"):
        commands.mpub_parts(None, "abc")  # type: ignore[arg-type]
    assert commands.mpub(b"bytes_topic", [b"x"]).startswith(b"MPUB bytes_topic\n")


# ---------------------------------------------------------------- Writer limits, nothing sent
@pytest.fixture(scope="module")
def fake() -> Iterator[FakeNsqd]:
    with FakeNsqd() as server:
        yield server


def mpubs(fake: FakeNsqd) -> List[Any]:
    with fake.lock:
        return [c for c in fake.received if c.name == "MPUB"]


def test_writer_mpub_limits(fake: FakeNsqd) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread", publish_timeout=5, max_msg_size=10, max_body_size=60)
    try:
        assert writer.wait_connected(5)
        before = len(mpubs(fake))
        # One message over max_msg_size, even though the whole body is within max_body_size.
        with pytest.raises(ConfigError, match="max_msg_size") as info:
            writer.mpub("t", [b"a", b"x" * 11])
        assert info.value.param == "msgs"
        with pytest.raises(ConfigError, match="max_msg_size"):
            writer.mpub_async("t", [b"x" * 11])
        # The body over max_body_size: 4 + 5 * (4 + 10) = 74 bytes.
        with pytest.raises(ConfigError, match="max_body_size") as info:
            writer.mpub("t", [b"x" * 10] * 5)
        assert info.value.param == "msgs"
        assert len(mpubs(fake)) == before, "a refused MPUB was sent"
        # At the limits, and messages together larger than max_msg_size: all accepted.
        assert writer.mpub("t", [b"x" * 10] * 4) == b"OK"  # body 4 + 4 * 14 = 60
        assert writer.mpub("t", [b"y" * 10, b"z" * 5]) == b"OK"
        assert writer.mpub_async("t", [b"w" * 10, b"v"]).result(5) == b"OK"
        fake.wait_until(lambda: len(mpubs(fake)) == before + 3, what="three MPUBs")
        assert [c.messages for c in mpubs(fake)[before:]] == [[b"x" * 10] * 4, [b"y" * 10, b"z" * 5], [b"w" * 10, b"v"]]
    finally:
        writer.close(5)


def test_writer_mpub_of_one_bytes_body_is_a_list_of_one(fake: FakeNsqd) -> None:
    # pynsq's Writer.mpub wraps a single bytes-like body in a list; a str stays refused (taken
    # as a list it would publish one message per character).
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread", publish_timeout=5)
    try:
        assert writer.wait_connected(5)
        before = len(mpubs(fake))
        with pytest.raises(TypeError, match="not a single body"):
            writer.mpub("t", "text")
        with pytest.raises(TypeError, match="not a single body"):
            writer.mpub_async("t", "text")
        assert len(mpubs(fake)) == before
        assert writer.mpub("t", b"one") == b"OK"
        assert writer.mpub_async("t", bytearray(b"two")).result(5) == b"OK"
        assert writer.mpub("t", memoryview(b"three"), callback=lambda conn, data: None) is None
        fake.wait_until(lambda: len(mpubs(fake)) == before + 3, what="three MPUBs")
        assert [c.messages for c in mpubs(fake)[before:]] == [[b"one"], [b"two"], [b"three"]]
    finally:
        writer.close(5)


def test_writer_mpub_without_limits(fake: FakeNsqd) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread", publish_timeout=5, max_msg_size=None, max_body_size=None)
    try:
        assert writer.wait_connected(5)
        assert writer.mpub("t", [b"x" * 2_000_000, b"y"]) == b"OK"
    finally:
        writer.close(5)


# ---------------------------------------------------------------- Writer.pub's fast path
def pubs(fake: FakeNsqd) -> List[Any]:
    with fake.lock:
        return [c for c in fake.received if c.name == "PUB"]


def test_writer_pub_fast_path_sends_what_the_general_path_sends(fake: FakeNsqd) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread", publish_timeout=5, max_msg_size=10)
    try:
        assert writer.wait_connected(5)
        before = len(pubs(fake))
        topic = "pub_fast_path"
        assert topic not in commands._PUB_HEADS
        assert writer.pub(topic, b"first") == b"OK"  # general path: checks the topic, caches its line
        assert topic in commands._PUB_HEADS
        assert writer.pub(topic, b"x" * 10) == b"OK"  # fast path, at the limit
        assert writer.pub(topic, "caf\u00e9") == b"OK"  # a str body: general path
        assert writer.pub(topic, bytearray(b"ba")) == b"OK"
        assert writer.pub_async(topic, b"future").result(5) == b"OK"
        fake.wait_until(lambda: len(pubs(fake)) == before + 5, what="five PUBs")
        sent = pubs(fake)[before:]
        assert [c.args for c in sent] == [(topic.encode(),)] * 5
        assert [c.body for c in sent] == [b"first", b"x" * 10, "caf\u00e9".encode(), b"ba", b"future"]
        with fake.lock:
            wire = b"".join(session.raw for session in fake.sessions)
        assert commands.pub(topic, b"x" * 10) in wire
    finally:
        writer.close(5)


def test_writer_pub_fast_path_refuses_what_the_general_path_refuses(fake: FakeNsqd) -> None:
    writer = Writer(f"{fake.host}:{fake.port}", backend="thread", publish_timeout=5, max_msg_size=10)
    try:
        assert writer.wait_connected(5)
        topic = "pub_fast_path_refused"
        start = len(pubs(fake))
        assert writer.pub(topic, b"ok") == b"OK"  # the topic's line is cached from here on
        # (the fake records a command after answering it: wait for this one before counting)
        fake.wait_until(lambda: len(pubs(fake)) == start + 1, what="the first PUB")
        before = start + 1
        with pytest.raises(ConfigError, match="max_msg_size") as info:
            writer.pub(topic, b"x" * 11)
        assert info.value.param == "msg"
        with pytest.raises(ConfigError, match="empty"):
            writer.pub(topic, b"")
        with pytest.raises(ConfigError, match="max_msg_size"):
            writer.pub_async(topic, b"x" * 11)  # (futures and callbacks take the same path)
        with pytest.raises(ConfigError, match="max_msg_size"):
            writer.pub(topic, b"x" * 11, callback=lambda conn, data: None)
        writer.max_msg_size = 5  # changed after the Writer was made: honoured at once
        with pytest.raises(ConfigError, match="max_msg_size"):
            writer.pub(topic, b"x" * 6)
        with pytest.raises(ConfigError):
            writer.pub("bad topic!", b"x")  # never cached: the general path checks it
        assert len(pubs(fake)) == before, "a refused PUB was sent"
        writer.max_msg_size = None  # no local limit: the general path sends it
        assert writer.pub(topic, b"x" * 11) == b"OK"
        fake.wait_until(lambda: len(pubs(fake)) == before + 1, what="the unlimited PUB")
    finally:
        writer.close(5)

"""FrameDecoder, decode_message and unpack_response: any chunking, every bad size, bounded buffering."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsq_sync
from nsq_sync.errors import IntegrityError, ProtocolError
from nsq_sync.protocol.constants import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HTTP_SNIFF,
)
from nsq_sync.protocol.frames import FrameDecoder, RawMessage, decode_message, unpack_response

MSG_ID = b"0a1b2c3d4e5f6a7b"


def frame(frame_type: int, data: bytes) -> bytes:
    return struct.pack(">lL", len(data) + 4, frame_type) + data


def message_data(timestamp: int, attempts: int, message_id: bytes, body: bytes) -> bytes:
    return struct.pack(">qH", timestamp, attempts) + message_id + body


def feed_all(decoder: FrameDecoder, chunks):
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


# --------------------------------------------------------------------------- basic decoding

def test_response_frame():
    assert FrameDecoder().feed(frame(0, b"OK")) == [(FRAME_TYPE_RESPONSE, b"OK")]


def test_error_frame():
    data = b"E_BAD_TOPIC PUB topic name \"a b\" is not valid"
    assert FrameDecoder().feed(frame(1, data)) == [(FRAME_TYPE_ERROR, data)]


def test_message_frame():
    data = message_data(1_700_000_000_123_456_789, 3, MSG_ID, b"payload")
    frames = FrameDecoder().feed(frame(2, data))
    assert frames == [(FRAME_TYPE_MESSAGE, data)]
    raw = decode_message(frames[0][1])
    assert raw == RawMessage(1_700_000_000_123_456_789, 3, MSG_ID, b"payload")


def test_empty_response_frame_size_4():
    assert FrameDecoder().feed(struct.pack(">lL", 4, 0)) == [(0, b"")]


def test_several_frames_in_one_feed_and_types_are_bytes():
    stream = frame(0, b"OK") + frame(0, b"_heartbeat_") + frame(1, b"E_INVALID x") + frame(2, message_data(1, 1, MSG_ID, b"b"))
    frames = FrameDecoder().feed(stream)
    assert [t for t, _ in frames] == [0, 0, 1, 2]
    assert all(type(d) is bytes for _, d in frames)


def test_nothing_until_complete():
    decoder = FrameDecoder()
    wire = frame(0, b"CLOSE_WAIT")
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(wire[-1:]) == [(0, b"CLOSE_WAIT")]
    assert decoder.buffered == 0


def test_bytearray_and_memoryview_input():
    wire = frame(0, b"OK") + frame(0, b"X")
    assert FrameDecoder().feed(bytearray(wire)) == [(0, b"OK"), (0, b"X")]
    assert FrameDecoder().feed(memoryview(wire)) == [(0, b"OK"), (0, b"X")]


def test_empty_feed():
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\x00\x00")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 2


def test_frame_of_exactly_max_size_accepted():
    decoder = FrameDecoder(max_frame_size=4096)
    data = b"z" * (4096 - 4)
    assert decoder.feed(frame(0, data)) == [(0, data)]


# --------------------------------------------------------------------------- chunking

frame_st = st.one_of(
    st.tuples(st.sampled_from([0, 1]), st.binary(max_size=64)),
    st.builds(
        lambda ts, att, mid, body: (2, message_data(ts, att, mid, body)),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(0, 2**16 - 1),
        st.binary(min_size=16, max_size=16),
        st.binary(max_size=64),
    ),
)


def chunked(frames, data):
    """The wire bytes of *frames*, cut at points hypothesis draws from *data*."""
    stream = b"".join(frame(t, d) for t, d in frames)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=len(stream) + 1)))
    return [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(frame_st, min_size=1, max_size=8), data=st.data())
def test_any_chunking_yields_the_same_frames(frames, data):
    chunks = chunked(frames, data)
    decoder = FrameDecoder()
    assert feed_all(decoder, chunks) == [(t, bytes(d)) for t, d in frames]
    assert decoder.buffered == 0
    for t, d in frames:
        if t == 2:
            raw = decode_message(d)
            assert raw.id == d[10:26] and raw.body == d[26:]


def test_one_byte_feeds():
    frames = [(0, b"OK"), (2, message_data(5, 40000, MSG_ID, b"hello")), (1, b"E_FIN_FAILED nope"), (0, b"")]
    stream = b"".join(frame(t, d) for t, d in frames)
    decoder = FrameDecoder()
    got = feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))])
    assert got == frames


# --------------------------------------------------------------------------- message decoding

@pytest.mark.parametrize("attempts", [0, 1, 32767, 32768, 40000, 65535])
def test_attempts_unsigned_16_bit(attempts):
    raw = decode_message(message_data(0, attempts, MSG_ID, b"x"))
    assert raw.attempts == attempts


@pytest.mark.parametrize("timestamp", [0, 1, -1, 2**63 - 1, -(2**63), 1_700_000_000_000_000_000])
def test_timestamp_int64(timestamp):
    assert decode_message(message_data(timestamp, 1, MSG_ID, b"x")).timestamp == timestamp


def test_message_id_and_body():
    body = bytes(range(256)) * 4
    raw = decode_message(message_data(1, 1, MSG_ID, body))
    assert raw.id == MSG_ID and len(raw.id) == 16 and type(raw.id) is bytes
    assert raw.body == body and type(raw.body) is bytes


def test_message_with_empty_body():
    assert decode_message(message_data(1, 1, MSG_ID, b"")).body == b""


@pytest.mark.parametrize("size", [0, 10, 25])
def test_short_message_integrity_error(size):
    with pytest.raises(IntegrityError) as info:
        decode_message(b"\x00" * size)
    assert isinstance(info.value, ProtocolError)
    assert "26" in str(info.value)


def test_nsq_sync_decode_message_returns_message():
    msg = nsq_sync.decode_message(message_data(123, 40000, MSG_ID, b"body"))
    assert isinstance(msg, nsq_sync.Message)
    assert (msg.id, msg.body, msg.timestamp, msg.attempts) == (MSG_ID, b"body", 123, 40000)
    assert not msg.has_responded() and not msg.is_async()
    with pytest.raises(IntegrityError):
        nsq_sync.decode_message(b"short")


# --------------------------------------------------------------------------- unpack_response

def test_unpack_response():
    assert unpack_response(struct.pack(">l", 0) + b"OK") == (0, b"OK")
    assert unpack_response(struct.pack(">l", 1) + b"E_INVALID x") == (1, b"E_INVALID x")
    assert unpack_response(struct.pack(">l", 2)) == (2, b"")
    assert nsq_sync.unpack_response(struct.pack(">l", 0) + b"_heartbeat_") == (nsq_sync.FRAME_TYPE_RESPONSE, b"_heartbeat_")
    with pytest.raises(IntegrityError):
        unpack_response(b"\x00\x00\x00")


# --------------------------------------------------------------------------- bad sizes and types

@pytest.mark.parametrize("size", [0, 1, 2, 3, -1, -4, -(2**31)])
def test_bad_small_or_negative_size(size):
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">l", size))  # the size alone is enough to know
    assert str(size) in str(info.value)


def test_size_over_limit_fails_before_the_body_arrives():
    decoder = FrameDecoder(max_frame_size=4096)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">l", 4097))
    message = str(info.value)
    assert "4097" in message and "4096" in message and "max_frame_size" in message
    assert decoder.buffered <= 4 + 8


def test_size_over_limit_with_full_header_and_some_body():
    decoder = FrameDecoder(max_frame_size=4096)
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">lL", 4097, 0) + b"x" * 100)


def test_size_over_default_limit():
    decoder = FrameDecoder()
    assert decoder.max_frame_size == DEFAULT_MAX_FRAME_SIZE
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">l", DEFAULT_MAX_FRAME_SIZE + 1))


def test_header_bytes_one_at_a_time_over_limit():
    decoder = FrameDecoder(max_frame_size=4096)
    header = struct.pack(">l", 10**9)
    for b in header[:3]:
        assert decoder.feed(bytes([b])) == []
    with pytest.raises(ProtocolError):
        decoder.feed(header[3:])


@pytest.mark.parametrize("wire", [b"HTTP", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"], ids=["4 bytes", "response"])
def test_http_sniff(wire):
    assert struct.unpack(">l", b"HTTP")[0] == HTTP_SNIFF == 0x48545450
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire)
    assert "HTTP" in str(info.value) and "port" in str(info.value)


def test_http_sniff_after_valid_frames():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="HTTP"):
        decoder.feed(frame(0, b"OK") + b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("frame_type", [3, 7, 2**32 - 1])
def test_unknown_frame_type(frame_type):
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">lL", 6, frame_type) + b"xy")
    assert str(frame_type) in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [struct.pack(">l", -1), struct.pack(">l", 2), b"HTTP", struct.pack(">lL", 4, 7), struct.pack(">l", 2**31 - 1)],
    ids=["negative", "small", "http", "type7", "huge"],
)
def test_failed_decoder_refuses_more_input(bad):
    decoder = FrameDecoder(max_frame_size=4096)
    with pytest.raises(ProtocolError):
        decoder.feed(bad)
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(frame(0, b"OK"))
    with pytest.raises(ProtocolError):
        decoder.feed(b"")


def test_frames_before_an_error_in_the_same_chunk_are_lost_but_error_raised():
    # The decoder raises on the bad frame; the stream is unusable from then on.
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(frame(0, b"OK") + struct.pack(">l", -5))


# --------------------------------------------------------------------------- take_unconsumed

def test_take_unconsumed_returns_leftover():
    decoder = FrameDecoder()
    second = frame(0, b"second frame")
    assert decoder.feed(frame(0, b"OK") + second[:7]) == [(0, b"OK")]
    assert decoder.buffered == 7
    assert decoder.take_unconsumed() == second[:7]
    assert decoder.buffered == 0
    assert decoder.take_unconsumed() == b""
    assert decoder.feed(frame(0, b"X")) == [(0, b"X")]


def test_take_unconsumed_short_tail():
    decoder = FrameDecoder()
    assert decoder.feed(frame(0, b"OK") + b"\x00\x00") == [(0, b"OK")]
    assert decoder.take_unconsumed() == b"\x00\x00"


def test_take_unconsumed_after_buffered_frames():
    decoder = FrameDecoder()
    tail = frame(0, b"next")[:6]
    wire = frame(0, b"OK") + tail
    decoder.feed(wire[:3])
    assert decoder.feed(wire[3:]) == [(0, b"OK")]
    assert decoder.take_unconsumed() == tail


def test_handshake_feed_one_frame_leaves_compressed_bytes_unparsed():
    """Regression (fixed in 313f902): the IDENTIFY response and the first compressed bytes after it
    (the snappy stream header parses as size -16384000) can arrive in one recv; decoding one frame
    at a time must leave them for take_unconsumed()."""
    snappy_header = b"\xff\x06\x00\x00sNaPpY"
    decoder = FrameDecoder()
    frames = decoder.feed(frame(0, b'{"snappy":true}') + snappy_header, 1)
    assert frames == [(0, b'{"snappy":true}')]
    assert decoder.buffered == len(snappy_header)
    assert decoder.take_unconsumed() == snappy_header
    assert decoder.buffered == 0


def test_max_frames_keeps_the_rest_buffered():
    wire = frame(0, b"a") + frame(1, b"E_INVALID b") + frame(0, b"c") + frame(0, b"partial")[:5]
    decoder = FrameDecoder()
    assert decoder.feed(wire, 1) == [(0, b"a")]
    assert decoder.feed(b"", 1) == [(1, b"E_INVALID b")]
    assert decoder.feed(b"", 0) == [(0, b"c")]
    assert decoder.buffered == 5
    assert decoder.feed(frame(0, b"partial")[5:], 2) == [(0, b"partial")]
    assert decoder.buffered == 0


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(frame_st, min_size=1, max_size=6), max_frames=st.integers(1, 3))
def test_max_frames_then_drain_gives_every_frame(frames, max_frames):
    decoder = FrameDecoder()
    got = decoder.feed(b"".join(frame(t, d) for t, d in frames), max_frames)
    assert len(got) == min(max_frames, len(frames))
    while decoder.buffered:
        more = decoder.feed(b"", max_frames)
        assert more
        got += more
    assert got == [(t, bytes(d)) for t, d in frames]


# --------------------------------------------------------------------------- fuzz

SMALL_MAX = 4096

chunk_st = st.one_of(
    st.binary(max_size=300),
    # valid frames, so the fuzz reaches past the first header
    st.builds(lambda t, d: frame(t, d), st.integers(0, 2), st.binary(max_size=200)),
    # headers near the limits
    st.builds(lambda n: struct.pack(">l", n), st.sampled_from([-1, 0, 3, 4, 5, SMALL_MAX, SMALL_MAX + 1, HTTP_SNIFF, 2**31 - 1])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(chunk_st, max_size=20))
def test_fuzz_only_protocol_errors_and_bounded_buffer(chunks):
    decoder = FrameDecoder(max_frame_size=SMALL_MAX)
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
        except ProtocolError:
            assert decoder.buffered == 0  # a failed decoder keeps nothing
            with pytest.raises(ProtocolError):
                decoder.feed(b"")
            break
        for frame_type, data in frames:
            assert frame_type in (0, 1, 2)
            assert len(data) <= SMALL_MAX - 4
        assert decoder.buffered <= SMALL_MAX + 8


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000), cut=st.integers(1, 50))
def test_fuzz_fixed_chunk_size(data, cut):
    decoder = FrameDecoder(max_frame_size=SMALL_MAX)
    try:
        for i in range(0, len(data), cut):
            decoder.feed(data[i : i + cut])
            assert decoder.buffered <= SMALL_MAX + 8
    except ProtocolError:
        pass


def test_buffer_bounded_under_large_valid_frame_split():
    decoder = FrameDecoder(max_frame_size=SMALL_MAX)
    wire = frame(0, b"q" * (SMALL_MAX - 4))
    assert decoder.feed(wire[:-1]) == []
    assert decoder.buffered == len(wire) - 1 <= SMALL_MAX + 8
    assert decoder.feed(wire[-1:]) == [(0, b"q" * (SMALL_MAX - 4))]


def test_failed_decoder_does_not_keep_the_bad_chunk():
    """Regression (fixed in 313f902): a failed decoder used to keep the unparsed rest of the bad chunk."""
    decoder = FrameDecoder(max_frame_size=SMALL_MAX)
    with pytest.raises(ProtocolError):
        decoder.feed(b"\xff" * 10000)
    assert decoder.buffered == 0
    decoder = FrameDecoder(max_frame_size=SMALL_MAX)
    decoder.feed(b"\x00\x00")
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x01" + b"z" * 5000)
    assert decoder.buffered == 0


# --------------------------------------------------------------------------- build_messages (the consumer's path)
def _decoded(decoder: FrameDecoder, chunks):
    """Feed *chunks* (as memoryviews of a reused buffer, like the connection's reads); return (frames, messages)."""
    frames, messages = [], []
    scratch = bytearray(max((len(c) for c in chunks), default=0))
    for chunk in chunks:
        scratch[: len(chunk)] = chunk
        frames.extend(decoder.feed(memoryview(scratch)[: len(chunk)]))
        scratch[:] = b"\xee" * len(scratch)  # the next read overwrites the buffer: nothing may point into it
        messages.extend(decoder.messages)
        decoder.messages = []
    return frames, messages


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(frame_st, min_size=1, max_size=8), data=st.data())
def test_build_messages_any_chunking(frames, data):
    """Message frames become factory(id, body, timestamp, attempts, owner) in order; other frames are returned as before."""
    chunks = chunked(frames, data)
    decoder = FrameDecoder()
    owner = object()
    decoder.build_messages(lambda *args: args, owner)
    others, messages = _decoded(decoder, chunks)
    assert others == [(t, d) for t, d in frames if t != 2]
    expected = []
    for t, d in frames:
        if t == 2:
            raw = decode_message(d)
            expected.append((raw.id, raw.body, raw.timestamp, raw.attempts, owner))
    assert messages == expected
    assert all(type(m[1]) is bytes for m in messages) and all(type(f[1]) is bytes for f in others)
    assert decoder.buffered == 0


@pytest.mark.parametrize("size", [0, 1, 25])
def test_build_messages_short_message_frame_is_a_protocol_error(size):
    decoder = FrameDecoder()
    decoder.build_messages(lambda *args: args, None)
    with pytest.raises(ProtocolError, match=f"message frame of {size} bytes is shorter than its 26-byte header"):
        decoder.feed(frame(0, b"OK") + frame(2, b"m" * size))
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(frame(0, b"OK"))


def test_a_large_frame_in_many_chunks_is_buffered_not_reparsed():
    """While the first buffered frame is incomplete, a feed only appends (no copy of the whole buffer per chunk)."""
    body = bytes(range(256)) * 400
    wire = frame(0, b"OK") + frame(2, message_data(1, 2, MSG_ID, body)) + frame(0, b"after")
    decoder = FrameDecoder()
    decoder.build_messages(lambda *args: args, None)
    chunks = [wire[i : i + 1000] for i in range(0, len(wire), 1000)]
    assert decoder.feed(chunks[0]) == [(0, b"OK")]
    for chunk in chunks[1:-1]:
        assert decoder.feed(chunk) == [] and decoder.messages == []
    assert decoder.feed(chunks[-1]) == [(0, b"after")]
    assert decoder.messages == [(MSG_ID, body, 1, 2, None)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("over", [0, 1])
def test_build_messages_honours_max_frame_size(over):
    """The message fast path applies the same limit: a message frame of exactly max_frame_size
    is built, one byte more fails before its body arrives."""
    decoder = FrameDecoder(max_frame_size=4 + 26 + 10)
    decoder.build_messages(lambda *args: args, None)
    wire = frame(2, message_data(7, 1, MSG_ID, b"b" * (10 + over)))
    if over:
        with pytest.raises(ProtocolError, match="exceeds the limit of 40 bytes"):
            decoder.feed(wire[:8])
        assert decoder.buffered == 0
    else:
        assert decoder.feed(wire) == [] and decoder.messages == [(MSG_ID, b"b" * 10, 7, 1, None)]


def test_build_messages_keeps_a_partial_message_after_whole_ones():
    whole = frame(2, message_data(1, 1, MSG_ID, b"first"))
    second = frame(2, message_data(2, 1, MSG_ID[::-1], b"second"))
    decoder = FrameDecoder()
    decoder.build_messages(lambda *args: args, None)
    assert decoder.feed(whole + second[:20]) == []
    assert decoder.messages == [(MSG_ID, b"first", 1, 1, None)] and decoder.buffered == 20
    decoder.messages = []
    assert decoder.feed(second[20:]) == [] and decoder.messages == [(MSG_ID[::-1], b"second", 2, 1, None)]
    assert decoder.buffered == 0

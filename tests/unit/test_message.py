"""Message: delegation to its responder, requeue delay units, async flags."""

from __future__ import annotations

import pytest

from nsq_sync import Message
from nsq_sync import message as message_module
from nsq_sync.errors import AlreadyRespondedError, ConfigError, ConfigTypeError

MSG_ID = b"0123456789abcdef"


class FakeResponder:
    """Records calls; marks the message answered like AsyncConn does."""

    def __init__(self):
        self.calls = []

    def _finish_message(self, message):
        self.calls.append(("finish", message))
        message._responded = True

    def _requeue_message(self, message, time_ms, backoff):
        self.calls.append(("requeue", message, time_ms, backoff))
        message._responded = True

    def _touch_message(self, message, budget=None):
        self.calls.append(("touch", message))


class StrictResponder(FakeResponder):
    def _finish_message(self, message):
        if message._responded:
            raise AlreadyRespondedError("already")
        super()._finish_message(message)


@pytest.fixture
def responder():
    return FakeResponder()


def make(responder=None, attempts=1):
    return Message(MSG_ID, b"body", 1_700_000_000_000_000_000, attempts, responder)


def test_attributes():
    msg = make(attempts=3)
    assert (msg.id, msg.body, msg.timestamp, msg.attempts) == (MSG_ID, b"body", 1_700_000_000_000_000_000, 3)
    assert "attempts=3" in repr(msg) and "size=4" in repr(msg)


def test_repr_names_the_id_as_nsqd_writes_it():
    # SRE review: handler errors said id=b'18ac...' and giving-up lines 18ac...: one format now.
    assert repr(make(attempts=2)) == "<Message id=0123456789abcdef attempts=2 size=4>"
    assert "id=\\xff" in repr(Message(b"\xff" * 16, b"", 0, 1))  # (not an nsqd id: still shown)


def test_finish_delegates(responder):
    msg = make(responder)
    assert not msg.has_responded()
    msg.finish()
    assert responder.calls == [("finish", msg)]
    assert msg.has_responded()


def test_touch_delegates(responder):
    msg = make(responder)
    msg.touch()
    msg.touch()
    assert responder.calls == [("touch", msg), ("touch", msg)]
    assert not msg.has_responded()


@pytest.mark.parametrize(
    "kwargs, ms, backoff",
    [
        ({}, -1, True),
        ({"delay": None}, -1, True),
        ({"delay": -1}, -1, True),
        ({"delay": 0}, 0, True),
        ({"delay": 2.5}, 2500, True),
        ({"delay": 2}, 2000, True),
        ({"delay": 0.001}, 1, True),
        ({"delay": 60, "backoff": False}, 60000, False),
        ({"time_ms": 300}, 300, True),
        ({"time_ms": 0}, 0, True),
        ({"time_ms": -1}, -1, True),
        ({"time_ms": 300, "delay": 9}, 300, True),
        ({"backoff": False}, -1, False),
    ],
    ids=repr,
)
def test_requeue_delay_units(responder, kwargs, ms, backoff):
    msg = make(responder)
    msg.requeue(**kwargs)
    assert responder.calls == [("requeue", msg, ms, backoff)]
    assert type(responder.calls[0][2]) is int
    assert responder.calls[0][3] is backoff
    assert msg.has_responded()


def test_requeue_positional_delay(responder):
    msg = make(responder)
    msg.requeue(1.5, False)
    assert responder.calls == [("requeue", msg, 1500, False)]


@pytest.mark.parametrize("delay", [-0.5, -2, -1000])
def test_negative_delay(responder, delay):
    msg = make(responder)
    with pytest.raises(ConfigError) as info:
        msg.requeue(delay=delay)
    assert info.value.param == "delay"
    assert isinstance(info.value, ValueError)
    assert responder.calls == [] and not msg.has_responded()


@pytest.mark.parametrize("delay", ["5", True, [1]], ids=repr)
def test_bad_delay_type(responder, delay):
    with pytest.raises(ConfigError):
        make(responder).requeue(delay=delay)
    assert responder.calls == []


@pytest.mark.parametrize("time_ms", [-2, 1.5, "300", True], ids=repr)
def test_bad_time_ms(responder, time_ms):
    with pytest.raises(ConfigError) as info:
        make(responder).requeue(time_ms=time_ms)
    assert info.value.param == "time_ms"
    assert responder.calls == []


@pytest.mark.parametrize("action", ["finish", "requeue", "touch"])
def test_without_responder(action):
    msg = make()
    with pytest.raises(ConfigError) as info:
        getattr(msg, action)()
    assert info.value.param == "message"
    assert not msg.has_responded()


def test_async_flags(responder):
    msg = make(responder)
    assert not msg.is_async()
    msg.enable_async()
    assert msg.is_async()
    msg.enable_async()
    assert msg.is_async()
    assert not msg.has_responded()
    msg.finish()
    assert msg.has_responded() and msg.is_async()


def test_responder_errors_propagate():
    responder = StrictResponder()
    msg = make(responder)
    msg.finish()
    with pytest.raises(AlreadyRespondedError):
        msg.finish()
    assert responder.calls == [("finish", msg)]


def test_weakref_and_attributes_of_ones_own():
    """pynsq's Message takes any attribute (``msg.custom = 1``: code attaches its own data);
    it raised AttributeError here (__slots__ without __dict__). Its own fields stay slots."""
    import weakref

    msg = make()
    assert weakref.ref(msg)() is msg
    msg.custom = 1
    msg.trace = {"span": "abc"}
    assert (msg.custom, msg.trace) == (1, {"span": "abc"})
    assert vars(msg) == {"custom": 1, "trace": {"span": "abc"}}  # (body, id... are not in it)
    assert not vars(make())


@pytest.mark.parametrize("delay, ms", [(1.001, 1001), (1.005, 1005), (1.019, 1019)])
def test_requeue_delay_rounds_to_nearest_ms(responder, delay, ms):
    msg = make(responder)
    msg.requeue(delay=delay)
    assert responder.calls == [("requeue", msg, ms, True)]


# ------------------------------------------------------------------ auto_touch()
@pytest.mark.parametrize(
    "interval, error",
    [("1", ConfigTypeError), (True, ConfigTypeError), ([1], ConfigTypeError), (0, ConfigError), (-1, ConfigError),
     (0.05, ConfigError), (float("nan"), ConfigError), (float("inf"), ConfigError), (30, ConfigError), (45.5, ConfigError)],
)
def test_auto_touch_refuses_a_bad_interval_before_touching(responder, monkeypatch, interval, error):
    monkeypatch.setattr(message_module, "_touchers", {})
    responder.message_timeouts = (30.0, 900.0)  # (msg_timeout 30 s: the interval must be below it)
    msg = make(responder)
    with pytest.raises(error) as info:
        msg.auto_touch(interval)
    assert info.value.param == "interval"
    assert ("msg_timeout (30 s)" if error is ConfigError else "must be a number of seconds") in str(info.value)
    assert responder.calls == [] and message_module._touchers == {}  # (no task started either)


def test_auto_touch_of_a_message_no_connection_delivered_is_refused():
    with pytest.raises(ConfigError, match="not delivered by a connection"):
        make(None).auto_touch()


def test_auto_touch_defaults_to_half_of_msg_timeout(responder):
    responder.message_timeouts = (30.0, 900.0)
    assert make(responder).auto_touch().interval == 15.0
    del responder.message_timeouts
    responder.msg_timeout = 8
    assert make(responder).auto_touch().interval == 4.0  # (nsqd negotiated nothing: the asked one)
    responder.msg_timeout = None
    assert make(responder).auto_touch().interval == 30.0  # (nsqd's default, 60 s)

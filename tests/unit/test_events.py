"""EventedMixin: on/off/trigger (pynsq semantics), _fire containment, thread safety."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from nsq_sync.errors import DuplicateListenerError, Error, InvalidListenerError
from nsq_sync.events import EVENTS, EventedMixin


class Thing(EventedMixin):
    pass


@pytest.fixture
def thing():
    return Thing()


def test_listeners_called_in_order_with_args_and_kwargs(thing):
    calls = []
    thing.on("message", lambda *a, **k: calls.append(("first", a, k)))
    thing.on("message", lambda *a, **k: calls.append(("second", a, k)))
    thing.on("other", lambda *a, **k: calls.append(("other", a, k)))
    thing.trigger("message", 1, "two", conn=thing, message=b"m")
    assert calls == [
        ("first", (1, "two"), {"conn": thing, "message": b"m"}),
        ("second", (1, "two"), {"conn": thing, "message": b"m"}),
    ]


def test_many_listeners_keep_insertion_order(thing):
    calls = []
    callbacks = [lambda i=i: calls.append(i) for i in range(50)]
    for cb in callbacks:
        thing.on("e", cb)
    thing.trigger("e")
    assert calls == list(range(50))


def test_duplicate_listener(thing):
    def cb(**kw):
        pass

    thing.on("close", cb)
    with pytest.raises(DuplicateListenerError) as info:
        thing.on("close", cb)
    assert isinstance(info.value, Error)
    thing.on("error", cb)  # same callback, other event: fine
    calls = []
    thing.on("close", lambda **kw: calls.append(1))
    thing.trigger("close")
    assert calls == [1]  # cb was not added twice


def test_duplicate_bound_method(thing):
    class Handler:
        def __init__(self):
            self.n = 0

        def handle(self):
            self.n += 1

    h = Handler()
    thing.on("e", h.handle)
    with pytest.raises(DuplicateListenerError):
        thing.on("e", h.handle)  # a new bound-method object, equal to the first
    thing.trigger("e")
    assert h.n == 1
    thing.off("e", h.handle)
    thing.trigger("e")
    assert h.n == 1


def test_off(thing):
    calls = []

    def a():
        calls.append("a")

    def b():
        calls.append("b")

    thing.on("e", a)
    thing.on("e", b)
    thing.off("e", a)
    thing.trigger("e")
    assert calls == ["b"]


def test_off_unknown_listener(thing):
    with pytest.raises(InvalidListenerError) as info:
        thing.off("e", lambda: None)
    assert isinstance(info.value, Error)
    thing.on("e", print)
    with pytest.raises(InvalidListenerError):
        thing.off("e", len)
    with pytest.raises(InvalidListenerError):
        thing.off("other", print)


def test_off_of_last_listener(thing):
    calls = []

    def cb():
        calls.append(1)

    thing.on("e", cb)
    assert thing.has_listeners("e")
    thing.off("e", cb)
    assert not thing.has_listeners("e")
    thing.trigger("e")
    assert calls == []
    with pytest.raises(InvalidListenerError):
        thing.off("e", cb)
    thing.on("e", cb)  # can be added again
    thing.trigger("e")
    assert calls == [1]


def test_trigger_with_no_listeners(thing):
    thing.trigger("nothing-listens", 1, x=2)
    thing._fire("nothing-listens", x=2)
    assert not thing.has_listeners("nothing-listens")


def test_on_requires_callable(thing):
    with pytest.raises(TypeError):
        thing.on("e", "not callable")
    assert not thing.has_listeners("e")


def test_trigger_propagates_listener_exception(thing):
    calls = []

    def boom(**kw):
        raise RuntimeError("boom")

    thing.on("e", boom)
    thing.on("e", lambda **kw: calls.append("after"))
    with pytest.raises(RuntimeError, match="boom"):
        thing.trigger("e", x=1)
    assert calls == []  # pynsq: the exception stops the trigger


def test_fire_contains_exceptions_and_runs_the_rest(thing, caplog):
    calls = []

    def boom(**kw):
        calls.append("boom")
        raise RuntimeError("boom in listener")

    thing.on("e", lambda **kw: calls.append(("first", kw)))
    thing.on("e", boom)
    thing.on("e", lambda **kw: calls.append(("last", kw)))
    with caplog.at_level(logging.ERROR, logger="nsq_sync.events"):
        thing._fire("e", conn="c")
    assert calls == [("first", {"conn": "c"}), "boom", ("last", {"conn": "c"})]
    records = [r for r in caplog.records if r.name == "nsq_sync.events"]
    assert len(records) == 1
    assert records[0].exc_info and isinstance(records[0].exc_info[1], RuntimeError)


def test_listener_removing_itself_during_trigger(thing):
    calls = []

    def once():
        calls.append("once")
        thing.off("e", once)

    thing.on("e", once)
    thing.on("e", lambda: calls.append("other"))
    thing.trigger("e")
    thing.trigger("e")
    assert calls == ["once", "other", "other"]


def test_listener_added_during_trigger_runs_next_time(thing):
    calls = []

    def adder():
        calls.append("adder")
        thing.on("e", lambda: calls.append("new"))

    thing.on("e", adder)
    thing.trigger("e")
    assert calls == ["adder"]
    thing.off("e", adder)
    thing.trigger("e")
    assert calls == ["adder", "new"]


def test_events_list():
    for name in ("connect", "close", "error", "identify", "identify_response", "auth", "auth_response", "heartbeat", "ready", "message", "response", "backoff", "resume", "continue"):
        assert name in EVENTS


def test_thread_safety():
    thing = Thing()
    errors = []
    stop = threading.Event()
    rounds_done = threading.Barrier(9)
    fired = [0]

    def counter(**kw):
        fired[0] += 1

    thing.on("e", counter)

    def churn(index):
        try:
            callbacks = [lambda index=index, i=i, **kw: None for i in range(20)]
            for _ in range(100):
                for cb in callbacks:
                    thing.on("e", cb)
                for cb in reversed(callbacks):
                    thing.off("e", cb)
                time.sleep(0)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)
        finally:
            rounds_done.wait(timeout=30)

    def trigger():
        try:
            while not stop.is_set():
                thing.trigger("e", x=1)
                thing._fire("e", x=2)
                time.sleep(0)  # a yield, so greenlets interleave too under gevent monkey-patching
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    triggerer = threading.Thread(target=trigger)
    triggerer.start()
    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    rounds_done.wait(timeout=30)
    stop.set()
    triggerer.join(10)
    for t in threads:
        t.join(10)
    assert errors == []
    assert fired[0] > 0
    # every churned listener is gone; only the counter remains
    assert thing._listeners["e"] == (counter,)


def test_pynsq_event_constants_are_the_event_names():
    import nsq_sync
    from nsq_sync import event

    assert event is nsq_sync.event
    names = ["CONNECT", "CLOSE", "ERROR", "IDENTIFY", "IDENTIFY_RESPONSE", "AUTH", "AUTH_RESPONSE", "HEARTBEAT",
             "READY", "MESSAGE", "RESPONSE", "BACKOFF", "RESUME", "CONTINUE"]  # fmt: skip
    assert [getattr(event, name) for name in names] == [name.lower() for name in names]
    assert sorted(getattr(event, name) for name in names) == sorted(EVENTS)


@pytest.mark.parametrize("name", ["DATA", "FINISH", "REQUEUE", "TOUCH"])
def test_pynsq_events_nsq_sync_does_not_fire_say_what_to_use(name):
    from nsq_sync import event

    with pytest.raises(AttributeError, match=f"pynsq's '{name.lower()}' event"):
        getattr(event, name)


def test_asyncconn_warns_once_about_an_event_it_never_fires(caplog):
    from nsq_sync import AsyncConn

    conn = AsyncConn("127.0.0.1", 4150)
    caplog.set_level(logging.WARNING, logger="nsq_sync.events")
    name = "mesage-%d" % id(conn)  # (warned once per process and name)
    conn.on(name, lambda **kwargs: None)
    conn.on(name, lambda **kwargs: None)
    for known in EVENTS:
        conn.on(known, lambda **kwargs: None)
    warnings = [r.getMessage() for r in caplog.records if r.name == "nsq_sync.events"]
    assert len(warnings) == 1, warnings
    assert f"AsyncConn.on({name!r})" in warnings[0] and "message" in warnings[0]
    # The listener still works with trigger(), as in pynsq.
    calls = []
    conn.on(name, lambda **kwargs: calls.append(kwargs))
    conn.trigger(name, x=1)
    assert calls == [{"x": 1}]


def test_a_plain_evented_mixin_takes_any_name_without_a_warning(thing, caplog):
    caplog.set_level(logging.WARNING, logger="nsq_sync.events")
    thing.on("anything-at-all", lambda: None)
    assert not [r for r in caplog.records if r.name == "nsq_sync.events"]

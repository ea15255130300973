"""The gevent backend's hot waits: an answer's signal, an idle worker's wake handle and a
socket's readable wait.

All wait in a gevent Waiter with a bare loop timer instead of a gevent.Timeout. These run
without monkey-patching: greenlets in the main thread's hub, gevent's own sockets.
"""

from __future__ import annotations

import threading
import time

import gevent
import gevent.socket
import pytest
from gevent.exceptions import InvalidSwitchError

from nsq_sync.backends.gevent import GeventBackend
from nsq_sync.backends.thread import ThreadBackend


@pytest.fixture
def backend() -> GeventBackend:
    return GeventBackend()


@pytest.fixture
def pair():
    left, right = gevent.socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.mark.parametrize("make", [GeventBackend, ThreadBackend])
def test_signal_is_created_held(make) -> None:
    signal = make().signal()
    assert signal.acquire(False) is False
    signal.release()
    assert signal.acquire(True, 0.0) is True


def test_signal_released_before_the_wait_returns_at_once(backend) -> None:
    signal = backend.signal()
    signal.release()
    assert signal.acquire(True, 5.0) is True
    assert signal.acquire() is True


def test_signal_wakes_a_waiting_greenlet(backend) -> None:
    signal = backend.signal()
    waiting = gevent.spawn(signal.acquire, True, 5.0)
    gevent.sleep(0)  # the waiter is parked in the hub now
    assert not waiting.ready()
    signal.release()
    assert waiting.get(timeout=5) is True


def test_signal_wait_without_timeout(backend) -> None:
    signal = backend.signal()
    waiting = gevent.spawn(signal.acquire)
    gevent.sleep(0)
    signal.release()
    assert waiting.get(timeout=5) is True


def test_signal_times_out_and_a_late_release_disturbs_nobody(backend) -> None:
    signal = backend.signal()
    started = time.monotonic()
    assert signal.acquire(True, 0.05) is False
    assert time.monotonic() - started >= 0.04
    # The same greenlet goes on to wait for something else; the late release must not
    # switch into that wait.
    other = backend.signal()
    sleeper = gevent.spawn_later(0.05, other.release)
    signal.release()
    assert other.acquire(True, 5.0) is True
    sleeper.join()


@pytest.mark.parametrize("kind", ["signal", "wake"])
def test_released_twice_is_a_bug(backend, kind) -> None:
    lock = getattr(backend, kind)()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


@pytest.mark.parametrize("kind", ["signal", "wake"])
def test_released_from_another_os_thread(backend, kind) -> None:
    lock = getattr(backend, kind)()

    def release_once_parked() -> None:
        # Released only once the hub's greenlet waits in acquire() (a release before it is
        # the already-released path, not the cross-thread wake-up under test).
        deadline = time.monotonic() + 5.0
        while lock._waiter is None and time.monotonic() < deadline:
            time.sleep(0.001)
        lock.release()

    releaser = threading.Thread(target=release_once_parked)
    releaser.start()
    try:
        started = time.monotonic()
        assert lock.acquire(True, 5.0) is True
        assert time.monotonic() - started < 2.0  # woken by the release, not by the timeout
    finally:
        releaser.join()


def test_signal_refuses_a_stray_switch(backend) -> None:
    signal = backend.signal()
    waiting = gevent.spawn(signal.acquire, True, 5.0)
    gevent.sleep(0)
    gevent.get_hub().loop.run_callback(waiting.switch, "stray")
    with pytest.raises(InvalidSwitchError):
        waiting.get(timeout=5)


def test_signal_wait_can_be_killed(backend) -> None:
    signal = backend.signal()
    waiting = gevent.spawn(signal.acquire, True, 5.0)
    gevent.sleep(0)
    waiting.kill(block=True, timeout=5)
    assert waiting.dead
    signal.release()  # nobody waits any more: nothing to wake, nothing raised
    gevent.sleep(0)


@pytest.mark.parametrize("make", [GeventBackend, ThreadBackend])
def test_wake_is_created_held_and_takes_one_release_per_acquire(make) -> None:
    wake = make().wake()
    assert wake.acquire(False) is False
    for _ in range(3):
        wake.release()
        assert wake.acquire(True, 0.0 if make is ThreadBackend else 5.0) is True
        assert wake.acquire(False) is False  # the release was taken once


def test_wake_wakes_the_same_greenlet_again_and_again(backend) -> None:
    wake = backend.wake()
    woken = []

    def sleeper() -> None:
        for _ in range(3):
            woken.append(wake.acquire(True, 5.0))

    task = gevent.spawn(sleeper)
    for count in range(1, 4):
        gevent.sleep(0)  # the sleeper is parked in the hub now
        assert wake._waiter is not None
        wake.release()
        while len(woken) < count:
            gevent.sleep(0)
    task.get(timeout=5)
    assert woken == [True, True, True]


def test_wake_times_out_and_keeps_a_later_release(backend) -> None:
    wake = backend.wake()
    started = time.monotonic()
    assert wake.acquire(True, 0.05) is False
    assert time.monotonic() - started >= 0.04
    wake.release()
    assert wake.acquire(False) is True  # kept for the next acquire, not lost


def test_wake_release_racing_the_timer_is_not_lost(backend) -> None:
    # The release comes after the wait's timer is due but before the hub ran either: the
    # sleeper must come back with the release (True), whichever the hub runs first. A lost
    # release would leave a pool worker counted free while it sleeps.
    wake = backend.wake()
    waiting = gevent.spawn(wake.acquire, True, 0.002)
    gevent.sleep(0)
    assert wake._waiter is not None
    # A timer due before the sleeper's releases it; both are overdue once the hub runs
    # again, so the hub runs the release, then the sleeper's timer, in the same pass.
    releaser = gevent.get_hub().loop.timer(0.0005)
    releaser.start(wake.release)
    time.sleep(0.01)  # (blocks the hub)
    assert waiting.get(timeout=5) is True
    releaser.close()
    assert wake.acquire(False) is False
    gevent.sleep(0)  # (the hub runs the old waiter's scheduled switch, if still to come: it disturbs nobody)
    assert wake.acquire(True, 0.02) is False


def test_wake_wait_can_be_killed(backend) -> None:
    wake = backend.wake()
    waiting = gevent.spawn(wake.acquire, True, 5.0)
    gevent.sleep(0)
    waiting.kill(block=True, timeout=5)
    assert waiting.dead
    assert wake._waiter is None
    wake.release()  # kept for the next acquire
    assert wake.acquire(False) is True


def test_readable_wait_sees_data(backend, pair) -> None:
    left, right = pair
    wait = backend.readable_waiter(left)
    gevent.spawn_later(0.02, right.sendall, b"x")
    assert wait(5.0) is True
    assert left.recv(1) == b"x"


def test_readable_wait_times_out_then_works_again(backend, pair) -> None:
    left, right = pair
    wait = backend.readable_waiter(left)
    started = time.monotonic()
    assert wait(0.05) is False
    assert time.monotonic() - started >= 0.04
    right.sendall(b"y")
    assert wait(5.0) is True
    assert wait(None) is True  # still readable: returns at once
    assert left.recv(1) == b"y"


def test_readable_wait_zero_timeout_polls(backend, pair) -> None:
    left, right = pair
    wait = backend.readable_waiter(left)
    assert wait(0) is False
    right.sendall(b"z")  # a socketpair: readable as soon as sendall returns
    assert wait(0) is True


def test_readable_wait_lets_other_greenlets_run(backend, pair) -> None:
    left, right = pair
    wait = backend.readable_waiter(left)
    ran = []
    gevent.spawn(lambda: (ran.append(1), right.sendall(b"w")))
    assert wait(5.0) is True
    assert ran == [1]


def test_readable_wait_leaves_no_timer_behind(backend, pair) -> None:
    left, right = pair
    wait = backend.readable_waiter(left)
    right.sendall(b"v")
    loop = gevent.get_hub().loop
    before = loop.activecnt
    for _ in range(100):
        assert wait(30.0) is True
    assert loop.activecnt == before

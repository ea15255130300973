"""Backoff strategies and the reconnect delay (nsq_sync.backoff)."""

from __future__ import annotations

import itertools

import pytest

from nsq_sync.backoff import BackoffStrategy, BackoffTimer, ExponentialBackoff, FullJitterBackoff, exponential_delay
from nsq_sync.errors import ConfigError


# ------------------------------------------------------------ exponential
def test_exponential_doubles_from_the_multiplier_and_caps() -> None:
    strategy = ExponentialBackoff()
    assert [strategy.calculate(level) for level in range(0, 10)] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 128]


def test_exponential_multiplier_and_cap() -> None:
    strategy = ExponentialBackoff(multiplier=0.05, max_duration=0.3)
    assert [strategy.calculate(level) for level in (1, 2, 3, 4, 5)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
    assert strategy.nominal(3) == strategy.calculate(3)


def test_exponential_huge_level_does_not_overflow() -> None:
    assert ExponentialBackoff().calculate(100_000) == 128


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"multiplier": 0}, "multiplier"),
        ({"multiplier": -1}, "multiplier"),
        ({"multiplier": float("inf")}, "multiplier"),
        ({"max_duration": -1}, "max_duration"),
        ({"multiplier": True}, "multiplier"),
    ],
)
def test_exponential_rejects_bad_parameters(kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExponentialBackoff(**kwargs)
    assert info.value.param == param


def test_level_must_be_a_non_negative_int() -> None:
    with pytest.raises(ConfigError):
        ExponentialBackoff().calculate(-1)
    with pytest.raises(TypeError):
        ExponentialBackoff().calculate(1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------ full jitter
def test_full_jitter_scales_the_exponential_by_rand() -> None:
    values = itertools.cycle([0.0, 0.5, 0.999])
    strategy = FullJitterBackoff(multiplier=1.0, max_duration=10, rand=lambda: next(values))
    assert strategy.calculate(3) == 0.0
    assert strategy.calculate(3) == pytest.approx(2.0)
    assert strategy.calculate(3) == pytest.approx(3.996)
    assert strategy.calculate(10) < 10  # capped before the jitter
    assert strategy.nominal(3) == 4 and strategy.nominal(10) == 10
    assert strategy.calculate(0) == 0


def test_full_jitter_default_rand_stays_in_range() -> None:
    strategy = FullJitterBackoff(multiplier=1.0, max_duration=8)
    for level in range(1, 8):
        assert 0 <= strategy.calculate(level) < strategy.nominal(level) or strategy.nominal(level) == 0


def test_full_jitter_rejects_a_non_callable_rand() -> None:
    with pytest.raises(TypeError):
        FullJitterBackoff(rand=0.5)  # type: ignore[arg-type]


def test_strategies_are_backoff_strategies() -> None:
    assert isinstance(ExponentialBackoff(), BackoffStrategy)
    assert isinstance(FullJitterBackoff(), BackoffStrategy)
    assert isinstance(BackoffTimer(0, 1), BackoffStrategy)


# ------------------------------------------------ pynsq's BackoffTimer
def test_backoff_timer_is_additive_like_pynsq() -> None:
    timer = BackoffTimer(0, 128)
    assert timer.get_interval() == 0
    intervals = []
    for _ in range(3):
        timer.failure()
        intervals.append(round(timer.get_interval(), 3))
    # short unit 0.25*128/10 = 3.2, long unit 0.75*128/250 = 0.384
    assert intervals == [3.584, 7.168, 10.752]
    timer.success()
    assert timer.get_interval() == pytest.approx(7.168)
    timer.success()
    timer.success()
    timer.success()  # never below zero
    assert timer.get_interval() == 0
    assert timer.calculate(3) == pytest.approx(10.752)


def test_backoff_timer_short_part_caps_after_short_length_failures() -> None:
    timer = BackoffTimer(0, 128)
    for _ in range(11):
        timer.failure()
    assert timer.short_interval == pytest.approx(32)  # capped at ratio * span
    assert timer.get_interval() == pytest.approx(32 + 11 * 0.384)
    for _ in range(1000):
        timer.failure()
    assert timer.get_interval() == pytest.approx(128)
    assert timer.calculate(1000) == pytest.approx(128)
    timer.reset()
    assert timer.get_interval() == 0


def test_backoff_timer_min_interval_and_as_many_successes_as_failures() -> None:
    timer = BackoffTimer(1, 11, ratio=0.5, short_length=3, long_length=7)
    for _ in range(5):
        timer.failure()
    for _ in range(5):
        timer.success()
    assert timer.get_interval() == 1  # exactly min_interval: no float dust left
    assert timer.calculate(0) == 0


@pytest.mark.parametrize(
    "args, kwargs, param",
    [
        ((-1, 10), {}, "min_interval"),
        ((5, 1), {}, "max_interval"),
        ((0, 10), {"ratio": 1.5}, "ratio"),
        ((0, 10), {"short_length": 0}, "short_length"),
        ((0, 10), {"long_length": 1.5}, "long_length"),
    ],
)
def test_backoff_timer_rejects_bad_parameters(args: tuple, kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError) as info:
        BackoffTimer(*args, **kwargs)
    assert info.value.param == param


# ------------------------------------------------------ reconnect delay
def test_exponential_delay_without_jitter() -> None:
    assert [exponential_delay(a, 1.0, 60.0, jitter=0) for a in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_exponential_delay_jitter_only_shortens() -> None:
    assert exponential_delay(3, 1.0, 60.0, jitter=0.3, rand=lambda: 0.0) == 4.0
    assert exponential_delay(3, 1.0, 60.0, jitter=0.3, rand=lambda: 1.0) == pytest.approx(2.8)
    assert exponential_delay(3, 1.0, 60.0, jitter=0.3, rand=lambda: 0.5) == pytest.approx(3.4)
    assert exponential_delay(50, 1.0, 60.0, jitter=0.3, rand=lambda: 0.0) == 60.0  # never above the cap
    for _ in range(200):
        assert 0.7 * 8 <= exponential_delay(4, 1.0, 60.0) <= 8


def test_exponential_delay_large_attempt_and_zero_base() -> None:
    assert exponential_delay(10_000, 0.5, 30, jitter=0) == 30
    assert exponential_delay(5, 0, 30) == 0


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"base": -1}, ConfigError),
        ({"cap": -1}, ConfigError),
        ({"jitter": 1.5}, ConfigError),
        ({"jitter": -0.1}, ConfigError),
        ({"rand": None}, TypeError),
        ({"rand": None, "jitter": 0}, TypeError),  # (checked even when no random number is drawn)
        ({"rand": None, "attempt": 0}, TypeError),
    ],
)
def test_exponential_delay_rejects_bad_parameters(kwargs: dict, error: type) -> None:
    args = {"attempt": 1, "base": 1.0, "cap": 10.0}
    args.update(kwargs)
    match = "rand must be a callable" if "rand" in kwargs else None
    with pytest.raises(error, match=match):
        exponential_delay(**args)


def test_exponential_delay_attempt_must_be_int() -> None:
    with pytest.raises(TypeError):
        exponential_delay(1.0, 1, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        exponential_delay(True, 1, 10)

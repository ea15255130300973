"""Backoff policies: how long a Reader stays throttled, and how long to wait before reconnecting.

Two families live here:

* **consumer backoff strategies** (:class:`ExponentialBackoff`,
  :class:`FullJitterBackoff`, :class:`BackoffTimer`): a Reader keeps one global
  backoff *level* (0 = not backing off); a failed message raises it, a success
  lowers it, and ``strategy.calculate(level)`` gives the seconds to sit at RDY 0.
  Any object with a ``calculate(level) -> float`` method works; ``nominal(level)``
  (optional) gives the un-jittered value the Reader uses to decide when the level
  stops growing;
* **reconnect delays**: :func:`exponential_delay`, a plain function for retry loops
  (Reader reconnecting to a direct nsqd address, Writer reconnecting a node).

Randomness is injectable everywhere (``rand`` returning floats in [0, 1)), so tests
are deterministic. This module imports only the standard library and errors.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

from .errors import ConfigError

__all__ = [
    "BackoffStrategy",
    "ExponentialBackoff",
    "FullJitterBackoff",
    "BackoffTimer",
    "exponential_delay",
]

Rand = Callable[[], float]


def _check_seconds(param: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(param, value, "must be a number of seconds")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(param, value, "must be a finite number of seconds " + ("> 0" if positive else ">= 0"))
    return float(value)


def _check_fraction(param: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(param, value, "must be a number between 0 and 1")
    return float(value)


def _check_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int, not {type(level).__name__}")
    if level < 0:
        raise ConfigError("level", level, "must be >= 0")
    return level


def _check_rand(rand: object) -> Rand:
    if not callable(rand):
        raise TypeError(f"rand must be a callable returning a float in [0, 1), not {type(rand).__name__}")
    return rand  # type: ignore[return-value]


class BackoffStrategy:
    """Base class of the consumer backoff strategies (subclassing is optional: duck typing works).

    ``calculate(level)`` returns the backoff interval in seconds for a level >= 1 (0 for
    level 0). ``nominal(level)`` returns the deterministic interval the strategy is built
    around (equal to ``calculate`` unless the strategy adds randomness).
    """

    def calculate(self, level: int) -> float:  # pragma: no cover - abstract
        """Seconds to back off at *level*. Raises TypeError/ConfigError for a bad level."""
        raise NotImplementedError

    def nominal(self, level: int) -> float:
        """The interval without randomness (used to decide when the level stops growing)."""
        return self.calculate(level)


class ExponentialBackoff(BackoffStrategy):
    """go-nsq's exponential strategy: ``multiplier * 2 ** (level - 1)`` seconds, capped at *max_duration*.

    With the defaults the levels give 1, 2, 4, 8 ... 128 s. Raises ConfigError when
    *multiplier* is not > 0 or *max_duration* is negative.
    """

    def __init__(self, multiplier: float = 1.0, max_duration: float = 128) -> None:
        self.multiplier = _check_seconds("multiplier", multiplier, positive=True)
        self.max_duration = _check_seconds("max_duration", max_duration)

    def nominal(self, level: int) -> float:
        level = _check_level(level)
        if level == 0:
            return 0.0
        # 2 ** 1100 overflows a float; the cap is reached long before.
        exponent = min(level - 1, 1000)
        return min(self.max_duration, self.multiplier * (2.0**exponent))

    def calculate(self, level: int) -> float:
        """``multiplier * 2 ** (level - 1)`` capped at ``max_duration``; 0 for level 0."""
        return self.nominal(level)

    def __repr__(self) -> str:
        return f"ExponentialBackoff(multiplier={self.multiplier!r}, max_duration={self.max_duration!r})"


class FullJitterBackoff(ExponentialBackoff):
    """go-nsq's full-jitter strategy: a random duration in ``[0, exponential(level))``.

    *rand* (default :func:`random.random`) is called once per :meth:`calculate`.
    Raises ConfigError like :class:`ExponentialBackoff`, TypeError when *rand* is not callable.
    """

    def __init__(self, multiplier: float = 1.0, max_duration: float = 128, rand: Optional[Rand] = None) -> None:
        super().__init__(multiplier, max_duration)
        self.rand = _check_rand(rand if rand is not None else random.random)

    def calculate(self, level: int) -> float:
        """A uniformly random fraction of the exponential interval of *level* (0 for level 0)."""
        return self.nominal(level) * self.rand()

    def __repr__(self) -> str:
        return f"FullJitterBackoff(multiplier={self.multiplier!r}, max_duration={self.max_duration!r})"


class BackoffTimer(BackoffStrategy):
    """pynsq's additive backoff timer (``nsq.BackoffTimer``), same constructor and methods.

    The span ``max_interval - min_interval`` is split into a "short" part
    (``ratio`` of it, reached after ``short_length`` failures) and a "long" part (the
    rest, reached after ``long_length`` failures). Each :meth:`failure` adds one unit of
    each part, each :meth:`success` removes one; :meth:`get_interval` is
    ``min_interval`` plus both parts. With pynsq's Reader defaults (0, 128) consecutive
    failures give 3.58, 7.17, 10.75 ... s: linear growth, not exponential.

    As a Reader strategy, :meth:`calculate` gives the interval after *level* net failures
    from a reset timer (it does not touch the stateful counters).
    Raises ConfigError for negative intervals, ``max_interval < min_interval``, a ratio
    outside 0..1, or lengths < 1.
    """

    def __init__(
        self,
        min_interval: float,
        max_interval: float,
        ratio: float = 0.25,
        short_length: int = 10,
        long_length: int = 250,
    ) -> None:
        self.min_interval = _check_seconds("min_interval", min_interval)
        self.max_interval = _check_seconds("max_interval", max_interval)
        if self.max_interval < self.min_interval:
            raise ConfigError("max_interval", max_interval, f"must be >= min_interval ({min_interval})")
        self.ratio = _check_fraction("ratio", ratio)
        for param, value in (("short_length", short_length), ("long_length", long_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(param, value, "must be an int >= 1")
        self.short_length = short_length
        self.long_length = long_length
        span = self.max_interval - self.min_interval
        self.max_short_timer = span * self.ratio
        self.max_long_timer = span - self.max_short_timer
        self.short_unit = self.max_short_timer / short_length
        self.long_unit = self.max_long_timer / long_length
        self.short_interval = 0.0
        self.long_interval = 0.0

    # pynsq's stateful API
    def success(self) -> None:
        """One success: remove a unit from each part (never below zero)."""
        self.short_interval = max(0.0, self.short_interval - self.short_unit)
        self.long_interval = max(0.0, self.long_interval - self.long_unit)
        # Float error must not leave a sliver of backoff behind after as many successes as failures.
        if self.short_interval < self.short_unit * 1e-9:
            self.short_interval = 0.0
        if self.long_interval < self.long_unit * 1e-9:
            self.long_interval = 0.0

    def failure(self) -> None:
        """One failure: add a unit to each part (each capped at its maximum)."""
        self.short_interval = min(self.max_short_timer, self.short_interval + self.short_unit)
        self.long_interval = min(self.max_long_timer, self.long_interval + self.long_unit)

    def reset(self) -> None:
        """Back to no backoff."""
        self.short_interval = 0.0
        self.long_interval = 0.0

    def get_interval(self) -> float:
        """The current interval in seconds: ``min_interval`` plus both parts."""
        return self.min_interval + self.short_interval + self.long_interval

    # strategy API
    def calculate(self, level: int) -> float:
        """The interval after *level* failures from a reset timer (0 for level 0)."""
        level = _check_level(level)
        if level == 0:
            return 0.0
        short = self.short_unit * min(level, self.short_length)
        long = self.long_unit * min(level, self.long_length)
        return min(self.max_interval, self.min_interval + short + long)

    def __repr__(self) -> str:
        return f"BackoffTimer({self.min_interval!r}, {self.max_interval!r}, ratio={self.ratio!r})"


def exponential_delay(attempt: int, base: float, cap: float, jitter: float = 0.3, rand: Rand = random.random) -> float:
    """Delay in seconds before retry number *attempt* (1 = after the first failure).

    ``base * 2 ** (attempt - 1)`` capped at *cap*, then shortened by a random fraction
    of up to *jitter* (so the result lies in ``[d * (1 - jitter), d]`` and never exceeds
    *cap*; many clients retrying at once spread out). ``attempt <= 0`` gives 0.

    Raises TypeError when *attempt* is not an int or *rand* is not callable, ConfigError
    for a negative *base*/*cap* or a *jitter* outside 0..1.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        raise TypeError(f"attempt must be an int, not {type(attempt).__name__}")
    base = _check_seconds("base", base)
    cap = _check_seconds("cap", cap)
    jitter = _check_fraction("jitter", jitter)
    _check_rand(rand)
    if attempt <= 0:
        return 0.0
    delay = min(cap, base * (2.0 ** min(attempt - 1, 1000)))
    if jitter:
        delay *= 1.0 - jitter * rand()
    return max(0.0, delay)

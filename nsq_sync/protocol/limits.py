"""nsqd's configurable limits that nsq_sync checks values against before sending.

nsqd refuses an out-of-range IDENTIFY value or DPUB delay with a fatal error that closes the
connection (and fails every publish pipelined behind a DPUB), so the client checks first,
against nsqd's defaults. For a cluster started with other ``--max-*`` flags, tell nsq_sync once,
at start-up::

    nsq_sync.set_nsqd_limits(max_msg_timeout=3600, max_req_timeout=7200)

The setting is process-wide and applies to values checked after the call (connections made
earlier keep what they sent).
"""

from __future__ import annotations

from typing import Dict

from ..errors import ConfigError

__all__ = ["DEFAULT_NSQD_LIMITS", "nsqd_limits", "set_nsqd_limits", "limit", "limit_note"]

#: nsqd v1.3.0's defaults. Durations in seconds, sizes in bytes.
DEFAULT_NSQD_LIMITS: Dict[str, float] = {
    "max_heartbeat_interval": 60.0,  # --max-heartbeat-interval
    "max_msg_timeout": 900.0,  # --max-msg-timeout
    "max_req_timeout": 3600.0,  # --max-req-timeout (bounds a DPUB delay)
    "max_output_buffer_size": 65536,  # --max-output-buffer-size
    "min_output_buffer_timeout": 0.025,  # --min-output-buffer-timeout
    "max_output_buffer_timeout": 30.0,  # --max-output-buffer-timeout
}

#: ms values travel as ints that nsqd parses into 32 bits: no duration longer than this (24.8 days)
_LONGEST = (2**31 - 1) / 1000.0
_RANGES = {
    "max_heartbeat_interval": (1, _LONGEST),  # nsqd's smallest heartbeat interval is 1 s
    "max_msg_timeout": (1, _LONGEST),  # and its smallest message timeout
    "max_output_buffer_size": (64, 2**31 - 1),
}
_FLAGS = {name: "--" + name.replace("_", "-") for name in DEFAULT_NSQD_LIMITS}
_limits: Dict[str, float] = dict(DEFAULT_NSQD_LIMITS)


def nsqd_limits() -> Dict[str, float]:
    """The limits in force (a copy): seconds for durations, bytes for sizes."""
    return dict(_limits)


def set_nsqd_limits(**limits: float) -> Dict[str, float]:
    """Set the nsqd limits values are checked against (your nsqd's ``--max-*`` flags, with
    durations in seconds); names not given keep their value. Returns the previous limits, so
    ``set_nsqd_limits(**previous)`` restores them.

    Raises TypeError for an unknown name or a non-number, ConfigError for a value out of range
    (durations from 1 ms to 24.8 days, heartbeat interval and message timeout at least 1 s,
    buffer size at least 64 bytes; the minimum output buffer timeout at most the maximum).
    """
    global _limits
    unknown = sorted(set(limits) - set(DEFAULT_NSQD_LIMITS))
    if unknown:
        raise TypeError(f"set_nsqd_limits() got unknown limit(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEFAULT_NSQD_LIMITS)}")
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, not {type(value).__name__}")
        low, high = _RANGES.get(name, (0.001, _LONGEST))
        if not low <= value <= high:  # (NaN fails too)
            raise ConfigError(name, value, f"must be between {low} and {high}")
    if "max_output_buffer_size" in limits and not isinstance(limits["max_output_buffer_size"], int):
        raise TypeError("max_output_buffer_size must be an int (bytes)")
    new = dict(_limits, **limits)
    if new["min_output_buffer_timeout"] > new["max_output_buffer_timeout"]:
        raise ConfigError("min_output_buffer_timeout", new["min_output_buffer_timeout"], f"exceeds max_output_buffer_timeout ({new['max_output_buffer_timeout']})")
    previous, _limits = _limits, new  # replaced whole, never changed in place: readers see one or the other
    return dict(previous)


def limit(name: str) -> float:
    """One limit in force."""
    return _limits[name]


def limit_note(name: str) -> str:
    """How an out-of-range message names the limit behind it and the way to raise it."""
    value = _limits[name]
    if value == DEFAULT_NSQD_LIMITS[name]:
        return f" (nsqd's default {_FLAGS[name]}; for an nsqd started with another, nsq_sync.set_nsqd_limits({name}=...))"
    return f" ({_FLAGS[name]} as set by nsq_sync.set_nsqd_limits)"

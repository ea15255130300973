"""IDENTIFY: the request body (with nsqd's ranges checked here) and the response.

Units follow pynsq at the edge (seconds for heartbeat_interval and msg_timeout,
ms for output_buffer_timeout) and nsqd's on the wire (ms everywhere).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Union

from ..errors import ConfigError, ProtocolError
from .constants import MAX_RDY_COUNT_DEFAULT, OK
from .limits import limit, limit_note

__all__ = ["build_identify", "parse_identify_response", "parse_json_object", "check_number", "check_timeout", "MAX_WAIT_SECONDS"]


def check_number(param: str, value: object, low: float, high: float, *, allowed: tuple = (), integer: bool = False) -> Any:
    """Return *value* if it is a number within [low, high] or one of *allowed*, else raise.

    Raises TypeError for a non-number (bools are refused), ConfigError naming the parameter otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{param} must be a number, not {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"{param} must be an int, not {type(value).__name__}")
    if value in allowed:
        return value
    if not low <= value <= high:
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        raise ConfigError(param, value, f"must be between {low} and {high}{extra}")
    return value


#: the longest a wait's timeout may be (a day)
MAX_WAIT_SECONDS = 86400.0


def check_timeout(timeout: object) -> Any:
    """A wait's *timeout*: a number of seconds from 0 to a day (None is the caller's to allow)."""
    return check_number("timeout", timeout, 0, MAX_WAIT_SECONDS)


def _within_limit(param: str, value: object, low: Union[float, str], high: str, *, scale: float = 1, **kwargs: Any) -> Any:
    """check_number with bounds from the nsqd limits (a str names one; *scale* converts its
    seconds to the parameter's unit); an out-of-range message says how to raise the limit."""
    low_value = _plain(limit(low) * scale) if isinstance(low, str) else low
    high_value = _plain(limit(high) * scale)
    try:
        return check_number(param, value, low_value, high_value, **kwargs)
    except ConfigError as exc:
        below = isinstance(low, str) and value < low_value  # type: ignore[operator]
        raise ConfigError(param, value, exc.reason + limit_note(low if below else high)) from None  # type: ignore[arg-type]


def _plain(number: float) -> float:
    """900.0 -> 900, for messages."""
    return int(number) if float(number).is_integer() else number


def build_identify(
    *,
    client_id: str,
    hostname: str,
    user_agent: str,
    heartbeat_interval: float = 30,
    output_buffer_size: int = 16384,
    output_buffer_timeout: int = 250,
    tls_v1: bool = False,
    snappy: bool = False,
    deflate: bool = False,
    deflate_level: int = 6,
    sample_rate: int = 0,
    msg_timeout: Optional[float] = None,
) -> Dict[str, Any]:
    """Return the IDENTIFY JSON object, every value checked against nsqd's ranges.

    heartbeat_interval: seconds, 1..60 or -1 (disabled; nsqd then refuses SUB).
    output_buffer_size: bytes, 64..65536, -1 (off) or 0 (server default).
    output_buffer_timeout: ms, 25..30000, -1 (off) or 0 (server default).
    sample_rate: 0..99. deflate_level: 1..9. msg_timeout: seconds, 1..900, or None (server default).
    The upper bounds (and 25 ms) are nsqd's defaults, changed by :func:`set_nsqd_limits`.
    Raises ConfigError (a ValueError) naming the parameter, TypeError for non-numbers.
    """
    _within_limit("heartbeat_interval", heartbeat_interval, 1, "max_heartbeat_interval", allowed=(-1,))
    _within_limit("output_buffer_size", output_buffer_size, 64, "max_output_buffer_size", allowed=(-1, 0), integer=True)
    _within_limit("output_buffer_timeout", output_buffer_timeout, "min_output_buffer_timeout", "max_output_buffer_timeout", allowed=(-1, 0), integer=True, scale=1000)
    check_number("sample_rate", sample_rate, 0, 99, integer=True)
    check_number("deflate_level", deflate_level, 1, 9, integer=True)
    if msg_timeout is not None:
        _within_limit("msg_timeout", msg_timeout, 1, "max_msg_timeout")
    if snappy and deflate:
        raise ConfigError("deflate", deflate, "snappy and deflate cannot both be enabled")
    data: Dict[str, Any] = {
        "client_id": client_id,
        "hostname": hostname,
        "user_agent": user_agent,
        "feature_negotiation": True,
        "heartbeat_interval": -1 if heartbeat_interval == -1 else int(round(heartbeat_interval * 1000)),
        "output_buffer_size": output_buffer_size,
        "output_buffer_timeout": output_buffer_timeout,
        "tls_v1": bool(tls_v1),
        "snappy": bool(snappy),
        "deflate": bool(deflate),
        "deflate_level": deflate_level,
        "sample_rate": sample_rate,
    }
    if msg_timeout is not None:
        data["msg_timeout"] = int(round(msg_timeout * 1000))
    return data


def parse_identify_response(data: bytes) -> Optional[Dict[str, Any]]:
    """Parse the IDENTIFY answer: None for a plain ``OK`` (no negotiation), else the JSON object.

    ``max_rdy_count`` is filled with nsqd's default when missing. Raises ProtocolError for
    anything that is neither OK nor a JSON object, and for a field this client acts on that
    is out of range or of the wrong type: ``max_rdy_count`` (an int >= 0), ``msg_timeout``
    and ``max_msg_timeout`` (milliseconds, numbers >= 0), ``deflate_level`` (0-9).
    """
    if data == OK:
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (RecursionError: nested too deep)
        raise ProtocolError(f"IDENTIFY response is not JSON: {bytes(data[:64])!r}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"IDENTIFY response is not a JSON object: {bytes(data[:64])!r}")
    parsed.setdefault("max_rdy_count", MAX_RDY_COUNT_DEFAULT)
    for field, low, high, ints in _ANSWERED_RANGES:
        if field not in parsed:
            continue
        value = parsed[field]
        kinds = int if ints else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            raise ProtocolError(f"IDENTIFY response field {field}={value!r} is not {'an int' if ints else 'a number'} from {low} to {high}")
    return parsed


#: (field, lowest, highest, ints only): the IDENTIFY answer's fields AsyncConn acts on
_ANSWERED_RANGES = (
    ("max_rdy_count", 0, 2**63 - 1, True),  # (0: an nsqd started with --max-rdy-count=0 publishes only)
    ("msg_timeout", 0, 2**63 - 1, False),
    ("max_msg_timeout", 0, 2**63 - 1, False),
    ("deflate_level", 0, 9, True),  # (0 when deflate is not negotiated)
)


def parse_json_object(data: bytes, what: str) -> Dict[str, Any]:
    """Parse a JSON object answer (AUTH); raises ProtocolError naming *what* otherwise."""
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} response is not JSON: {bytes(data[:64])!r}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"{what} response is not a JSON object: {bytes(data[:64])!r}")
    return parsed

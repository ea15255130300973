"""Topic and channel names, checked before anything is sent.

nsqd accepts 1 to 64 characters of ``[.a-zA-Z0-9_-]``, optionally followed by
``#ephemeral`` (counted in the 64).
"""

from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = ["valid_topic_name", "valid_channel_name", "check_topic", "check_channel"]

_NAME = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?")


def _valid(name: object) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= 64 and _NAME.fullmatch(name) is not None


def valid_topic_name(topic: object) -> bool:
    """True when *topic* is a name nsqd accepts for a topic."""
    return _valid(topic)


def valid_channel_name(channel: object) -> bool:
    """True when *channel* is a name nsqd accepts for a channel."""
    return _valid(channel)


def _check(kind: str, name: object) -> str:
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(kind, name, "must be 1-64 characters of [.a-zA-Z0-9_-], optionally ending in #ephemeral") from None
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be str, not {type(name).__name__}")
    if not _valid(name):
        raise ConfigError(kind, name, "must be 1-64 characters of [.a-zA-Z0-9_-], optionally ending in #ephemeral")
    return name


def check_topic(topic: object) -> str:
    """Return *topic* as str, or raise :class:`ConfigError` (a ValueError) naming it; TypeError if not str/bytes."""
    return _check("topic", topic)


def check_channel(channel: object) -> str:
    """Return *channel* as str, or raise :class:`ConfigError` (a ValueError) naming it; TypeError if not str/bytes."""
    return _check("channel", channel)

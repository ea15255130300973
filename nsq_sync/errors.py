"""Every exception nsq_sync raises, rooted at :class:`Error` (pynsq's name).

The tree::

    Error
    ├── ConfigError (also ValueError)      a parameter out of range, named with its value
    │   └── ConfigTypeError (also TypeError)   a parameter of the wrong type
    ├── ProtocolError                      bytes from the peer that do not parse
    │   └── IntegrityError                 (pynsq's name for a frame that cannot be decoded)
    ├── ServerError                        an E_* error frame; .code, .text, .fatal
    │   └── InvalidError, BadTopicError, … one class per E_* code
    ├── TransportError                     the connection could not be used
    │   ├── ConnectError                   TCP connect failed or timed out
    │   ├── TLSError                       the TLS handshake failed
    │   ├── SendError                      a write failed (pynsq's name)
    │   │   └── NoConnectionsError         no nsqd reachable in time
    │   │       └── HandshakeRefusedError  every nsqd refused the handshake: failed at once
    │   └── ConnectionClosedError          closed before the answer came
    │       └── StaleConnectionError       no data for two heartbeat intervals
    ├── AuthRequiredError                  nsqd requires AUTH and no auth_secret was given
    ├── TimeoutError (also builtins.TimeoutError)
    ├── ClosedError                        the Reader/Writer/connection was closed by the user
    ├── DuplicateListenerError, InvalidListenerError   on()/off() misuse (pynsq's names)
    ├── AlreadyRespondedError              finish/requeue/touch after the message was answered
    └── HTTPError                          an nsqd/nsqlookupd HTTP request failed; .status, .message

This module imports nothing from nsq_sync, so every layer can use it (also for
:func:`peer_text`, which bounds and escapes a peer's text before it goes into an exception).
"""

from __future__ import annotations

import builtins
import re
from typing import Dict, Optional, Type

__all__ = [
    "Error",
    "ConfigError",
    "ConfigTypeError",
    "ProtocolError",
    "IntegrityError",
    "ServerError",
    "InvalidError",
    "BadProtocolError",
    "BadBodyError",
    "BadTopicError",
    "BadChannelError",
    "BadMessageError",
    "PubFailedError",
    "MPubFailedError",
    "DPubFailedError",
    "FinFailedError",
    "ReqFailedError",
    "TouchFailedError",
    "IdentifyFailedError",
    "SubFailedError",
    "AuthDisabledError",
    "AuthFailedError",
    "AuthFirstError",
    "AuthServerError",
    "UnauthorizedError",
    "TransportError",
    "ConnectError",
    "TLSError",
    "SendError",
    "ConnectionClosedError",
    "StaleConnectionError",
    "AuthRequiredError",
    "TimeoutError",
    "NoConnectionsError",
    "HandshakeRefusedError",
    "ClosedError",
    "HTTPError",
    "DuplicateListenerError",
    "InvalidListenerError",
    "AlreadyRespondedError",
    "error_from_frame",
    "SERVER_ERRORS",
]


class Error(Exception):
    """Root of every nsq_sync error (pynsq calls its root ``nsq.Error`` too)."""


class ConfigError(Error, ValueError):
    """A parameter is out of range or of the wrong shape.

    ``param`` names the parameter and ``value`` holds what was given, so the
    message can say both without the caller digging.
    """

    def __init__(self, param: str, value: object, reason: str) -> None:
        self.param = param
        self.value = value
        self.reason = reason
        super().__init__(f"{param}={value!r}: {reason}")

    def __reduce__(self):  # keep pickling working with the 3-argument constructor
        return (type(self), (self.param, self.value, self.reason))


class ConfigTypeError(ConfigError, TypeError):
    """A parameter of the wrong type (a string where a number goes, ``True``, a float where an
    int goes) where the check used to raise ConfigError: both, so that code catching either
    ``ConfigError``/``ValueError`` or ``TypeError`` sees it. ``param``, ``value`` and ``reason``
    as in :class:`ConfigError`."""


class ProtocolError(Error):
    """The peer sent bytes that are not valid NSQ (bad size, unknown frame, bad JSON)."""


class IntegrityError(ProtocolError):
    """A frame could not be decoded (pynsq's name, kept for code that catches it)."""


class ServerError(Error):
    """nsqd answered with an error frame.

    ``code`` is the ``E_*`` token, ``text`` the server's description, and
    ``fatal`` says whether nsqd closes the connection after it (every code but
    E_FIN_FAILED, E_REQ_FAILED and E_TOUCH_FAILED).
    """

    code: str = ""
    fatal: bool = True

    def __init__(self, text: str = "", code: Optional[str] = None) -> None:
        if code is not None:
            self.code = code
        self.text = text
        super().__init__(f"{self.code} {text}".strip())

    def __reduce__(self):
        return (type(self), (self.text, self.code))


class InvalidError(ServerError):
    code = "E_INVALID"


class BadProtocolError(ServerError):
    code = "E_BAD_PROTOCOL"


class BadBodyError(ServerError):
    code = "E_BAD_BODY"


class BadTopicError(ServerError):
    code = "E_BAD_TOPIC"


class BadChannelError(ServerError):
    code = "E_BAD_CHANNEL"


class BadMessageError(ServerError):
    code = "E_BAD_MESSAGE"


class PubFailedError(ServerError):
    code = "E_PUB_FAILED"


class MPubFailedError(ServerError):
    code = "E_MPUB_FAILED"


class DPubFailedError(ServerError):
    code = "E_DPUB_FAILED"


class FinFailedError(ServerError):
    code = "E_FIN_FAILED"
    fatal = False


class ReqFailedError(ServerError):
    code = "E_REQ_FAILED"
    fatal = False


class TouchFailedError(ServerError):
    code = "E_TOUCH_FAILED"
    fatal = False


class IdentifyFailedError(ServerError):
    code = "E_IDENTIFY_FAILED"


class SubFailedError(ServerError):
    code = "E_SUB_FAILED"


class AuthDisabledError(ServerError):
    code = "E_AUTH_DISABLED"


class AuthFailedError(ServerError):
    code = "E_AUTH_FAILED"


class AuthFirstError(ServerError):
    code = "E_AUTH_FIRST"


class AuthServerError(ServerError):
    code = "E_AUTH_ERROR"


class UnauthorizedError(ServerError):
    code = "E_UNAUTHORIZED"


SERVER_ERRORS: Dict[str, Type[ServerError]] = {
    cls.code: cls
    for cls in (
        InvalidError,
        BadProtocolError,
        BadBodyError,
        BadTopicError,
        BadChannelError,
        BadMessageError,
        PubFailedError,
        MPubFailedError,
        DPubFailedError,
        FinFailedError,
        ReqFailedError,
        TouchFailedError,
        IdentifyFailedError,
        SubFailedError,
        AuthDisabledError,
        AuthFailedError,
        AuthFirstError,
        AuthServerError,
        UnauthorizedError,
    )
}


#: the most characters of a peer's text (error frame, HTTP error message) kept in an exception
MAX_PEER_TEXT = 500


def peer_text(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """*text* from a peer made safe for exception messages and logs: at most *limit* characters
    (escapes included) followed by ``"... (N more characters)"`` when cut, and every character
    that is not printable (newline, CR, tab, other C0/C1 controls, DEL, line separators,
    bidirectional and other format controls, lone surrogates) escaped as :func:`repr` does
    (``\\n``, ``\\x1b``, ``\\u2028``). Ordinary printable Unicode is kept as is.
    """
    if len(text) <= limit and text.isprintable():
        return text
    kept = []  # (one piece per character of *text* kept)
    size = 0
    for char in text[:limit]:
        piece = char if char.isprintable() else repr(char)[1:-1]
        if size + len(piece) > limit:
            break
        kept.append(piece)
        size += len(piece)
    safe = "".join(kept)
    if len(kept) < len(text):
        safe += f"... ({len(text) - len(kept)} more characters)"
    return safe


# nsqd's codes are E_ and capitals; anything else is not taken as a code (it could be huge or hold a newline)
_CODE = re.compile(r"E_[A-Z0-9_]{1,64}").fullmatch


def error_from_frame(data: bytes) -> ServerError:
    """Turn the body of an error frame (``b"E_CODE description"``) into its typed exception.

    An unknown code still gives a :class:`ServerError` carrying that code (fatal, as
    nsqd closes on every error it does not list as non-fatal).  The text comes from the
    peer: it is bounded and escaped with :func:`peer_text` (in ``.text`` and the message).
    """
    text = bytes(data).decode("utf-8", "replace")
    code, _, rest = text.partition(" ")
    cls = SERVER_ERRORS.get(code)
    if cls is not None:
        return cls(peer_text(rest))
    if _CODE(code):
        return ServerError(peer_text(rest), code=code)
    return ServerError(peer_text(text), code="E_UNKNOWN")


class TransportError(Error):
    """The connection to a peer could not be used."""


class ConnectError(TransportError):
    """Connecting (TCP, or the whole handshake) failed or timed out."""


class TLSError(TransportError):
    """The TLS handshake failed (untrusted certificate, wrong host name, no TLS on the server)."""


class SendError(TransportError):
    """Writing to the connection failed; the connection is closed (pynsq's name)."""


class ConnectionClosedError(TransportError):
    """The connection closed before the operation could complete."""


class StaleConnectionError(ConnectionClosedError):
    """Nothing arrived for two heartbeat intervals, so the connection was closed."""


class AuthRequiredError(Error):
    """nsqd requires AUTH (``auth_required`` in the IDENTIFY response) and no auth_secret was given."""


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - deliberately pynsq-style name
    """An operation did not complete within its timeout."""


class NoConnectionsError(SendError):
    """No nsqd connection could be had within the timeout: nothing was sent. A SendError, as
    pynsq's "no open connections" is, so ported ``isinstance(data, SendError)`` checks see it."""


class HandshakeRefusedError(NoConnectionsError):
    """No nsqd connection can be had, and waiting would not help: the latest attempt to connect
    to every nsqd was refused during the handshake for a reason that looks permanent (nsqd
    refused the AUTH secret or had none, or refused the client's settings; nsqd's TLS
    certificate was not trusted, or TLS was asked for and nsqd has none; or what answered does
    not speak NSQ's protocol, as nsqd's HTTP and HTTPS ports do not: a ProtocolError). A publish raises it at
    once instead of at the end of its timeout; the Writer keeps reconnecting meanwhile, and
    publishes go through again once a connection succeeds. ``__cause__`` is the first nsqd's
    refusal (AuthFailedError, TLSError, ProtocolError, ...); the message names each nsqd and its error. A
    NoConnectionsError, so code catching that sees it too."""


class ClosedError(Error):
    """The object was closed with close(); it takes no more work."""


class HTTPError(Error):
    """An HTTP request to nsqd or nsqlookupd failed.

    ``status`` is the HTTP status (0 when no response arrived: refused, timed out,
    bad URL) and ``message`` is the server's ``{"message": ...}`` text or the
    transport failure.  ``timed_out`` is True when no (whole) answer arrived within the
    client's timeout (a hung or overloaded server, or a network that drops packets), False
    otherwise; for status 0 the clients raise it from the underlying exception, so
    ``__cause__`` tells the other failures apart (``ConnectionRefusedError``: nothing listens,
    ``socket.gaierror``: DNS, ``ssl.SSLError``: TLS, ``ConnectionResetError``, ...).
    """

    def __init__(self, status: int, message: str, url: str = "", timed_out: bool = False) -> None:
        self.status = status
        self.message = message
        self.url = url
        self.timed_out = bool(timed_out)
        where = f" ({url})" if url else ""
        super().__init__(f"HTTP {status}: {message}{where}" if status else f"{message}{where}")

    def __reduce__(self):
        return (type(self), (self.status, self.message, self.url, self.timed_out))


class DuplicateListenerError(Error):
    """on() was called twice with the same event name and callback (pynsq's name)."""


class InvalidListenerError(Error):
    """off() was called with a callback that is not listening to that event (pynsq's name)."""


class AlreadyRespondedError(Error):
    """finish(), requeue() or touch() on a message that was already finished or requeued."""

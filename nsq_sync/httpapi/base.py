"""A small JSON-over-HTTP client for the nsqd and nsqlookupd HTTP APIs.

Built only on :mod:`http.client` from the standard library, so it works
unchanged under gevent monkey-patching (the socket module it uses is the
patched one).  A client keeps the connections of requests that went well open
(HTTP keep-alive, at most MAX_IDLE_CONNECTIONS) for the next ones, and any number of
threads and greenlets can share one client: each request takes a connection of its own.

nsqd/nsqlookupd 1.x answer plain JSON (with the header
``X-NSQ-Content-Type: nsq; version=1.0``); servers older than 1.0 wrap the
payload as ``{"status_code": ..., "status_txt": ..., "data": ...}``.  The
client asks for the v1 format (``Accept: application/vnd.nsq; version=1.0``)
and unwraps the legacy envelope when a server answers with it anyway.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import select
import socket
import ssl
import threading
import time
import weakref
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type, TypeVar, Union
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..errors import ConfigError, ConfigTypeError, HTTPError, peer_text
from ..protocol.identify import MAX_WAIT_SECONDS

__all__ = ["HTTPClient", "HTTPResponse", "ACCEPT_V1", "AnswerShape"]

logger = logging.getLogger(__name__)

#: The Accept header nsqd/nsqlookupd use to choose the (unwrapped) v1 response format.
ACCEPT_V1 = "application/vnd.nsq; version=1.0"

_USER_AGENT = "nsq_sync (python http.client)"
_LEGACY_KEYS = frozenset(("status_code", "status_txt", "data"))
# fullmatch, not ^...$: "$" also matches before a trailing newline
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+").fullmatch
#: an HTTP token (RFC 9110): a header name or a method
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
#: the default max_response_size: nsqd's /stats with many clients can be several MB
DEFAULT_MAX_RESPONSE_SIZE = 64 * 1024 * 1024
_READ_CHUNK = 64 * 1024
#: connections a client keeps open for its next requests (HTTP keep-alive); more requests at
#: once each open one of their own, closed when done
MAX_IDLE_CONNECTIONS = 4
#: a kept connection unused for longer is closed instead of used: firewalls and load balancers
#: drop idle connections after a minute or more without telling either end, and a request sent
#: on one would wait out its whole timeout
KEEP_IDLE_SECONDS = 30.0
#: methods a request on a kept connection is sent again for, on a fresh connection, when the
#: server had closed the kept one (no answer at all): they change nothing on the server
_REPLAYABLE = frozenset(("GET", "HEAD"))
#: the most characters of an answer quoted in an HTTPError about its shape
_QUOTE_LIMIT = 200
#: what an admin action (the last part of its route) does, for "may or may not have been ..."
_ACTION_DONE = {"create": "created", "delete": "deleted", "empty": "emptied", "pause": "paused",
                "unpause": "unpaused", "tombstone": "tombstoned"}

ParamValue = Union[str, int, bool, None]
Params = Mapping[str, ParamValue]
Body = Union[bytes, bytearray, memoryview]

_C = TypeVar("_C", bound="HTTPClient")


def _parse_address(address: object) -> Tuple[str, str, int, str]:
    """Split *address* into (scheme, host, port, path_prefix) or raise ConfigError/TypeError."""
    if not isinstance(address, str):
        raise TypeError(f"address must be str, not {type(address).__name__}")

    # user:password@ would be a secret: an address with an "@" anywhere is never echoed back,
    # whichever check refuses it (a password may hold "/", "?", "#" or spaces).
    redacted = "<redacted>" if "@" in address else address

    def bad(reason: str, shown: object = redacted) -> ConfigError:
        return ConfigError("address", shown, reason)

    if not address:
        raise bad("must be 'host:port', 'http://host:port' or 'https://host:port'")
    if any(c.isspace() for c in address):
        raise bad("must not contain whitespace")

    if "://" in address:
        scheme = address.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise bad("scheme must be http or https")
        rest = address.split("://", 1)[1]
        explicit_scheme = True
    else:
        scheme, rest, explicit_scheme = "http", address, False

    # user:password@ would be a secret; never echo it back.
    netloc_end = len(rest)
    for sep in "/?#":
        idx = rest.find(sep)
        if idx != -1:
            netloc_end = min(netloc_end, idx)
    if "@" in rest[:netloc_end]:
        raise bad("credentials in the address are not supported; pass headers= instead", "<redacted>")
    if "," in rest[:netloc_end] or ";" in rest[:netloc_end]:
        raise bad("is several addresses in one string: give them as a list, e.g. ['a:4161', 'b:4161']")

    try:
        parts = urlsplit(f"{scheme}://{rest}")
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        # (the parser's message quotes the part it refused: maybe part of a password)
        raise bad(f"not a valid address ({exc})" if redacted is address else "not a valid address") from None

    if parts.query or parts.fragment or "?" in rest or "#" in rest:
        raise bad("must not contain a query string or fragment")
    if not (address.isascii() and address.isprintable()):
        # http.client sends the host and path as ASCII: every request would raise UnicodeEncodeError
        raise bad("must be printable ASCII (percent-encode other characters in the path)")
    if not host:
        raise bad("missing host")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise bad("bracketed host must be an IPv6 address") from None
    elif not _HOSTNAME(host):
        raise bad("host contains invalid characters")
    elif not all(0 < len(label) <= 63 for label in (host[:-1] if host.endswith(".") else host).split(".")):
        # (the resolver's IDNA codec would refuse it with a UnicodeError on every request)
        raise bad("host is not a valid name (an empty label, as in 'a..b', or one over 63 characters)")
    if port is None:
        if not explicit_scheme:
            raise bad("missing port (expected 'host:port')")
        port = 443 if scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise bad("port must be 1-65535")
    return scheme, host, port, parts.path.rstrip("/")


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError("timeout", timeout, "must be a positive number of seconds")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError("timeout", timeout, "must be a positive number of seconds")
    if timeout > MAX_WAIT_SECONDS:
        # (the socket layer refuses ~1e10 s and more with OverflowError, on every request)
        raise ConfigError("timeout", timeout, f"must be at most {MAX_WAIT_SECONDS:g} seconds (a day)")
    return float(timeout)


def _check_max_response_size(size: object) -> Optional[int]:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"max_response_size must be an int (bytes) or None, not {type(size).__name__}")
    if size < 1:
        raise ConfigError("max_response_size", size, "must be a positive number of bytes, or None for no limit")
    return size


def _read_body(resp: http.client.HTTPResponse, limit: Optional[int], url: str) -> bytes:
    """The whole body of *resp*, or HTTPError (with the response's status) once it is over *limit* bytes:
    at once when its Content-Length says so, else as soon as more than *limit* bytes have come."""
    if limit is None:
        return resp.read()
    if resp.length is not None and resp.length > limit:
        raise HTTPError(resp.status, f"response body of {resp.length} bytes (Content-Length) is over "
                                     f"max_response_size ({limit} bytes); not read", url)
    chunks = []
    size = 0
    while True:
        chunk = resp.read(min(_READ_CHUNK, limit + 1 - size))  # (never more than one byte over)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise HTTPError(resp.status, f"response body is over max_response_size ({limit} bytes); "
                                         f"stopped reading", url)
        chunks.append(chunk)


def _check_headers(headers: object) -> Dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping of str to str, not {type(headers).__name__}")
    checked: Dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("headers must be a mapping of str to str")
        if not _TOKEN(name):
            raise ConfigError("headers", name, "not a valid HTTP header name")
        # the value may be a secret (Authorization), so do not echo it
        _check_header_value("headers", name, value)
        checked[name] = value
    return checked


def _check_header_value(param: str, shown: object, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(param, shown, "header value must not contain CR, LF or NUL")
    try:
        value.encode("latin-1")  # what http.client sends header values as
    except UnicodeEncodeError:
        raise ConfigError(param, shown, "header value must be encodable as latin-1 (http.client sends it so)") from None


def _check_method(method: object) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be str, not {type(method).__name__}")
    if not _TOKEN(method):
        raise ConfigError("method", method, "must be an HTTP method such as 'GET' or 'POST'")
    return method


def _check_path(path: object) -> str:
    if not isinstance(path, str):
        raise TypeError(f"path must be str, not {type(path).__name__}")
    if not (path.isascii() and path.isprintable()) or " " in path:
        raise ConfigError("path", path, "must be printable ASCII without spaces (percent-encode other characters)")
    if not path.startswith("/"):
        # (it is appended to the base URL as is: "ping" would make "http://host:4151ping")
        raise ConfigError("path", path, "must start with '/', e.g. '/ping'")
    if "#" in path:
        # (a fragment is never sent to a server: http.client would send it as part of the path)
        raise ConfigError("path", path, "must not contain '#' (a fragment; percent-encode it as %23 in a value)")
    return path


def _encode_params(params: Optional[Params]) -> str:
    if params is None:
        return ""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of str to str/int/bool/None, not {type(params).__name__}")
    pairs = []
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigTypeError("params", key, f"a parameter name must be str, not {type(key).__name__}")
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            value = int.__repr__(value)  # (str() of an IntEnum is its name before Python 3.11)
        elif isinstance(value, str):
            value = str.__str__(value)  # (and of a str Enum, "Kind.A", up to 3.10)
        else:
            # (str() of a list, float or bytes would be sent as the value: "['a', 'b']", "b'x'")
            raise ConfigTypeError(f"params[{key!r}]", value,
                                  f"must be str, int, bool or None (left out), not {type(value).__name__}")
        pairs.append((key, value))
    try:
        return urlencode(pairs)
    except UnicodeEncodeError as exc:  # a lone surrogate: str is not encodable as UTF-8
        raise ConfigError("params", "<not UTF-8>", f"str is not encodable as UTF-8 ({exc.reason}); pass valid text") from None


def _path_and_query(path: object, params: Optional[Params]) -> str:
    """*path* (checked) with *params* added to its query: after a ``?`` in *path* with ``&``.

    A parameter both in *path*'s query and in *params* is a :class:`ConfigError` naming ``params``:
    sent twice, nsqd would use the first one and silently ignore the other.
    """
    path = _check_path(path)
    query = _encode_params(params)
    if not query:
        return path
    route, _, path_query = path.partition("?")
    if not path_query.strip("&"):
        return f"{route}?{query}"
    in_path = {key for key, _ in parse_qsl(path_query, keep_blank_values=True)}
    twice = [key for key, _ in parse_qsl(query, keep_blank_values=True) if key in in_path]
    if twice:
        raise ConfigError("params", sorted(set(twice)), f"also in the query of path {path!r}; give each parameter once")
    return f"{path}&{query}"


def _decode_text(body: bytes) -> str:
    return body.decode("utf-8", "replace")


def _is_legacy_envelope(payload: object) -> bool:
    return isinstance(payload, dict) and set(payload) == _LEGACY_KEYS


def json_kind(value: object) -> str:
    """The JSON name of the type of *value* (parsed JSON): ``object``, ``array``, ``string``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def quote_json(value: object) -> str:
    """*value* (parsed from an answer) as JSON for an error message: bounded and escaped with
    :func:`~nsq_sync.errors.peer_text`."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return f"<a JSON {json_kind(value)}>"
    return peer_text(text, _QUOTE_LIMIT)


def quote_body(body: bytes) -> str:
    """An answer's *body* for an error message: quoted, bounded and escaped with
    :func:`~nsq_sync.errors.peer_text` (``an empty body`` when there is none)."""
    if not body:
        return "an empty body"
    return f"'{peer_text(_decode_text(body), _QUOTE_LIMIT)}'"


def _error_message(body: bytes, reason: str) -> str:
    """The server's explanation of a failed request: JSON ``message``, legacy ``status_txt`` or the text,
    bounded and escaped with :func:`~nsq_sync.errors.peer_text` (it goes into exceptions and logs)."""
    text = _decode_text(body).strip()
    if text:
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):  # (RecursionError: deeply nested JSON)
            payload = None
        if isinstance(payload, dict):
            if isinstance(payload.get("message"), str):
                return peer_text(payload["message"])
            if _is_legacy_envelope(payload) and payload.get("status_txt"):
                return peer_text(str(payload["status_txt"]))
        return peer_text(text)
    return peer_text(reason) if reason else "no response body"


_NOT_HTTP_HINT = " (is this an HTTP port? nsqd's and nsqlookupd's TCP ports, 4150 and 4160 by default, close HTTP requests unanswered)"


def _transport_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, socket.timeout) or isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"could not resolve host ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc})"
    if isinstance(exc, ssl.CertificateError):
        return f"TLS certificate error ({exc})"
    # nsqd's and nsqlookupd's TCP ports take an HTTP request's first bytes for a bad protocol
    # magic and close, or reset: the commonest cause is that port given for the HTTP one.
    if isinstance(exc, http.client.RemoteDisconnected):  # (before its base class ConnectionResetError)
        return "server closed the connection without answering" + _NOT_HTTP_HINT
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer" + _NOT_HTTP_HINT
    if isinstance(exc, http.client.HTTPException):
        # (a bad status line or header is quoted in the exception: the peer's text)
        return f"bad HTTP response ({type(exc).__name__}: {peer_text(str(exc))})"
    return f"{type(exc).__name__}: {exc}"


def _time_left(deadline: float) -> float:
    """Seconds until *deadline* (a :func:`time.monotonic` time); socket.timeout once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


class _DeadlineReader(io.RawIOBase):
    """The response side of a :class:`_DeadlineSocket`: each receive gets only the time left."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """A connected socket as :mod:`http.client` uses it (``sendall``, ``makefile``, ``close``),
    giving every send and receive only the time left before the request's *deadline*.

    A socket timeout alone bounds each read: a server trickling its answer a byte at a time
    would hold a request for as long as it likes.  ``close()`` leaves the socket open (http.client
    closes the connection before reading a ``Connection: close`` body); :class:`_Connection`
    closes it once the request is over.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def set_deadline(self, deadline: float) -> None:
        """The next request's deadline, for a kept connection (keep-alive)."""
        self._deadline = deadline

    def sendall(self, data: Body) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._sock.settimeout(_time_left(self._deadline))
            view = view[self._sock.send(view):]

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        pass


class _Connection(http.client.HTTPConnection):
    """One request's connection, over TLS when given *context*: connecting, the TLS handshake,
    sending and each read get only the time left before *deadline*."""

    def __init__(self, host: str, port: int, timeout: float, deadline: float, context: Optional[ssl.SSLContext]) -> None:
        super().__init__(host, port, timeout=timeout)
        self._deadline = deadline
        self._tls_context = context
        self._raw: Optional[socket.socket] = None
        self.idle_since = 0.0  # when it was last kept for the next request (HTTPClient._give_back)
        if context is not None:
            self.default_port = 443  # (the Host header leaves out the default port, as HTTPSConnection does)

    def connect(self) -> None:
        self.timeout = _time_left(self._deadline)
        super().connect()
        raw = self.sock
        if self._tls_context is not None:
            raw.settimeout(_time_left(self._deadline))  # (bounds the whole handshake)
            raw = self._tls_context.wrap_socket(raw, server_hostname=self.host)
        self._raw = raw
        self.sock = _DeadlineSocket(raw, self._deadline)

    def discard(self) -> None:
        """Close the connection and its socket."""
        self.close()
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()

    def reuse(self, deadline: float) -> bool:
        """Ready this kept connection for a request due by *deadline*; False (and closed) when
        the server has closed it, or sent something nobody asked for, meanwhile, or it has been
        idle for more than KEEP_IDLE_SECONDS.

        Readable while no request is out means either; a connection that is still open shows
        nothing to read. (A server that closes it just as the request goes out is
        :meth:`HTTPClient.request`'s to handle.)
        """
        raw, sock = self._raw, self.sock
        if raw is None or not isinstance(sock, _DeadlineSocket) or time.monotonic() - self.idle_since > KEEP_IDLE_SECONDS:
            self.discard()
            return False
        try:
            if (isinstance(raw, ssl.SSLSocket) and raw.pending()) or _readable(raw):
                self.discard()
                return False
        except (OSError, ValueError):
            self.discard()
            return False
        self._deadline = deadline
        sock.set_deadline(deadline)
        return True

    @property
    def kept_open(self) -> bool:
        """The last answer left the connection open (no ``Connection: close``, body read whole)."""
        return self._raw is not None and self.sock is not None


def _readable(sock: socket.socket) -> bool:
    """Whether *sock* has bytes or an end of stream waiting, without waiting.

    ``select.poll`` where the (unpatched) platform has it: ``select.select`` cannot watch a
    descriptor over 1023. gevent's patched ``select`` module has only ``select``, which it
    serves from its own loop, without that limit.
    """
    poll = getattr(select, "poll", None)
    if poll is not None:
        poller = poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _close_idle(idle: List[_Connection]) -> None:
    """Close kept connections (a client's close(), or its finalizer when it is collected)."""
    while idle:
        try:
            conn = idle.pop()
        except IndexError:
            return
        conn.discard()


class HTTPResponse:
    """A completed HTTP exchange: ``status``, ``headers`` (case-insensitive) and raw ``body`` bytes."""

    __slots__ = ("status", "reason", "headers", "body", "url")

    def __init__(self, status: int, reason: str, headers: http.client.HTTPMessage, body: bytes, url: str) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.url = url

    @property
    def is_v1(self) -> bool:
        """True when the server marked the body as the v1 (unwrapped) format."""
        return self.headers.get("X-NSQ-Content-Type") is not None

    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return _decode_text(self.body)

    def json(self) -> Any:
        """The body parsed as JSON, with a pre-1.0 ``{"status_code","status_txt","data"}`` envelope unwrapped.

        Raises :class:`HTTPError` (with this response's status) when the body is not JSON,
        or when a legacy envelope carries a non-2xx ``status_code``.
        """
        try:
            payload = json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise HTTPError(self.status, f"response is not valid JSON ({why}): {quote_body(self.body)}", self.url) from exc
        if not self.is_v1 and _is_legacy_envelope(payload):
            code = payload.get("status_code")
            if isinstance(code, int) and not 200 <= code < 300:
                raise HTTPError(code, peer_text(str(payload.get("status_txt") or "request failed")), self.url)
            return payload["data"]
        return payload

    def __repr__(self) -> str:
        return f"<HTTPResponse {self.status} {self.url} ({len(self.body)} bytes)>"


class AnswerShape:
    """Checks of one 2xx answer against the shape a method documents (``what`` names the server
    and route, ``"nsqd /stats"``).

    Each failed check raises :class:`HTTPError` with the answer's status and URL and a message
    ``not an {what} answer: {problem}: {quote}``, where *problem* names the field (``'topics[0].depth'``)
    and *quote* is the offending value or body, bounded and escaped (:func:`quote_json`,
    :func:`quote_body`).  The field *path* arguments name fields in messages: ``"topics[0]"``.
    """

    __slots__ = ("resp", "what")

    def __init__(self, resp: HTTPResponse, what: str) -> None:
        self.resp = resp
        self.what = what

    def error(self, problem: str, quoted: str) -> HTTPError:
        return HTTPError(self.resp.status, f"not an {self.what} answer: {problem}: {quoted}", self.resp.url)

    def _wrong(self, path: str, value: object, expected: str) -> HTTPError:
        problem = f"a JSON {json_kind(value)}, not {expected}"
        # (no path: the whole answer, "a JSON array, not an object")
        return self.error(f"'{path}' is {problem}" if path else problem, quote_json(value))

    def obj(self, value: object, path: str = "") -> Dict[str, Any]:
        """*value* when it is a JSON object."""
        if not isinstance(value, dict):
            raise self._wrong(path, value, "an object")
        return value

    def list_field(self, obj: Dict[str, Any], key: str, prefix: str = "") -> List[Any]:
        """``obj[key]`` when it is a list; ``null`` becomes (and is stored as) ``[]``."""
        value = self.optional_list_field(obj, key, prefix)
        if value is None:
            raise self.error(f"no '{self._path(prefix, key)}' list", quote_json(obj))
        return value

    def optional_list_field(self, obj: Dict[str, Any], key: str, prefix: str = "") -> Optional[List[Any]]:
        """As :meth:`list_field`, but None (and *obj* left as it is) when *key* is missing."""
        if key not in obj:
            return None
        value = obj[key]
        if value is None:
            obj[key] = value = []  # (Go encodes an empty slice as null)
        elif not isinstance(value, list):
            raise self._wrong(self._path(prefix, key), value, "a list")
        return value

    @staticmethod
    def _path(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def items(self, values: List[Any], prefix: str, kind: type) -> None:
        """Every item of the list *values* (the field *prefix*) is a *kind* (dict or str)."""
        expected = "an object" if kind is dict else "a string"
        for i, value in enumerate(values):
            if not isinstance(value, kind):
                raise self._wrong(f"{prefix}[{i}]", value, expected)

    def str_field(self, obj: Dict[str, Any], key: str, prefix: str = "") -> str:
        """``obj[key]`` when it is a string."""
        path = self._path(prefix, key)
        if key not in obj:
            raise self.error(f"no '{path}' string", quote_json(obj))
        value = obj[key]
        if not isinstance(value, str):
            raise self._wrong(path, value, "a string")
        return value

    def count_field(self, obj: Dict[str, Any], key: str, prefix: str = "") -> int:
        """``obj[key]`` when it is an int >= 0 (a JSON number without a fraction or exponent)."""
        path = self._path(prefix, key)
        if key not in obj:
            raise self.error(f"no '{path}' number", quote_json(obj))
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(path, value, "an integer")
        if value < 0:
            raise self.error(f"'{path}' is negative", quote_json(value))
        return value

    def text_is(self, expected: bytes, consequence: str = "") -> None:
        """The body is *expected* (surrounding whitespace aside).  *consequence* says what the
        caller cannot know then (``"the message may or may not have been published"``)."""
        if self.resp.body.strip() != expected:
            raise self._unexpected_text(f"'{expected.decode()}'", consequence)

    def empty(self, consequence: str) -> None:
        """The body is empty (whitespace aside), as nsqd and nsqlookupd answer their admin actions;
        a pre-1.0 ``{"status_code", "status_txt", "data"}`` envelope with a 2xx status is taken too
        (a non-2xx one raises :class:`HTTPError` with its status and text)."""
        body = self.resp.body.strip()
        if not body:
            return
        if not self.resp.is_v1 and body.startswith(b"{"):
            try:
                payload = json.loads(body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                payload = None
            if _is_legacy_envelope(payload):
                self.resp.json()  # (raises for a non-2xx status_code)
                return
        raise self._unexpected_text("an empty body", consequence)

    def _unexpected_text(self, expected: str, consequence: str) -> HTTPError:
        so = f", so {consequence}" if consequence else ""
        return HTTPError(self.resp.status, f"not an {self.what} answer{so}: expected {expected}, got "
                                           f"{quote_body(self.resp.body)}", self.resp.url)


class HTTPClient:
    """A JSON HTTP client for one nsqd or nsqlookupd HTTP address.

    *address* is ``"host:port"`` (plain http), ``"http://host:port"`` or
    ``"https://host:port"`` (an IPv6 host goes in brackets, ``"[::1]:4151"``; a
    URL may carry a path prefix, e.g. for a reverse proxy).  ``https`` uses
    *ssl_context* or :func:`ssl.create_default_context`.  *timeout* (seconds)
    bounds each request as a whole: connecting, the TLS handshake, sending and
    reading the whole answer (a request still going when it passes fails with
    ``HTTPError(0, "timed out after ...")``).  *headers* are added to every
    request (they are never logged).  *max_response_size* (bytes, default 64 MiB; None for
    no limit) bounds the body read from any answer: a bigger one fails with
    ``HTTPError(status, "... over max_response_size (N bytes) ...")``, before reading when its
    Content-Length says so, else as soon as the limit is passed.  *keep_alive* (default True)
    keeps the connection of a request that went well open for the next one (at most
    MAX_IDLE_CONNECTIONS are kept); False opens and closes one per request.  :meth:`close`
    (or leaving a ``with`` block) closes the kept connections; the client still works after it,
    one connection per request.

    The address is checked here: a malformed one (including one with characters
    other than printable ASCII) raises :class:`ConfigError` naming ``address``
    (TypeError when it is not a str); a non-positive, non-numeric or over a day (86400 s)
    *timeout* raises :class:`ConfigError` naming ``timeout``; a header name that is not an
    HTTP token, or a value with CR/LF/NUL or not encodable as latin-1, raises
    :class:`ConfigError` naming ``headers``; a *max_response_size* below 1 raises
    :class:`ConfigError` naming it (TypeError when it is not an int or None).
    """

    #: the server's name in messages about an answer of the wrong shape
    _server = "NSQ"
    #: routes only this client's server serves: a 404 ``NOT_FOUND`` for one of them means the
    #: address is another server's, most likely the other daemon's (``_wrong_server_hint``)
    _own_routes: FrozenSet[str] = frozenset()
    _wrong_server_hint = ""

    def __init__(
        self,
        address: str,
        timeout: float = 5.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        headers: Optional[Mapping[str, str]] = None,
        max_response_size: Optional[int] = DEFAULT_MAX_RESPONSE_SIZE,
        keep_alive: bool = True,
    ) -> None:
        scheme, host, port, prefix = _parse_address(address)
        if not isinstance(keep_alive, bool):
            raise ConfigTypeError("keep_alive", keep_alive, "must be True or False")
        self._timeout = _check_timeout(timeout)
        self._max_response_size = _check_max_response_size(max_response_size)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        if ssl_context is not None and scheme != "https":
            raise ConfigError("ssl_context", ssl_context, f"given for a plain http address; use 'https://{host}:{port}'")
        self._scheme = scheme
        self._host = host
        self._port = port
        self._prefix = prefix
        self._ssl_context = ssl_context
        self._extra_headers = _check_headers(headers)
        host_part = f"[{host}]" if ":" in host else host
        self._address = f"{host_part}:{port}"
        self._base_url = f"{scheme}://{host_part}:{port}{prefix}"
        self._keep_alive = keep_alive
        # Kept connections, most recently used last. Taken and given back under the lock; a
        # forked child finds its parent's (pid) and closes its copies without using them.
        self._idle: List[_Connection] = []
        self._idle_lock = threading.Lock()
        self._idle_pid = os.getpid()
        self._finalizer = weakref.finalize(self, _close_idle, self._idle)

    @classmethod
    def from_url(cls: Type[_C], url: str, **kwargs: Any) -> _C:
        """Build a client from a full ``http://`` or ``https://`` URL; *kwargs* go to the constructor.

        Raises :class:`ConfigError` when *url* has no http/https scheme or is malformed.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be str, not {type(url).__name__}")
        if "://" not in url:
            raise ConfigError("address", url, "from_url needs a URL starting with http:// or https://")
        return cls(url, **kwargs)

    # -- properties -------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the server (IPv6 hosts in brackets)."""
        return self._address

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def scheme(self) -> str:
        """``"http"`` or ``"https"``."""
        return self._scheme

    @property
    def base_url(self) -> str:
        """The URL every request path is appended to, without a trailing slash."""
        return self._base_url

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def max_response_size(self) -> Optional[int]:
        """The most bytes of body read from an answer (None: no limit)."""
        return self._max_response_size

    @property
    def keep_alive(self) -> bool:
        """Whether connections are kept open for the next requests (False after :meth:`close`)."""
        return self._keep_alive

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r})"

    def close(self) -> None:
        """Close the connections kept open for the next requests. The client still works: from
        now on each request opens its own connection and closes it."""
        self._keep_alive = False
        with self._idle_lock:
            idle = self._idle[:]
            del self._idle[:]
        _close_idle(idle)

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- requests ---------------------------------------------------------

    def url_for(self, path: str, params: Optional[Params] = None) -> str:
        """The full URL a request for *path* with query *params* goes to (*params* are added to a
        query already in *path* with ``&``).

        Raises TypeError or :class:`ConfigError` for a bad *path* or *params*, as :meth:`request` does.
        """
        return f"{self._base_url}{_path_and_query(path, params)}"

    def _connection(self, deadline: float) -> _Connection:
        context = None
        if self._scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
        return _Connection(self._host, self._port, self._timeout, deadline, context)

    def _kept(self, deadline: float) -> Optional[_Connection]:
        """A kept connection still open, readied for a request due by *deadline*; None when there is none."""
        if not self._idle:
            return None
        inherited: List[_Connection] = []
        conn: Optional[_Connection] = None
        with self._idle_lock:
            if self._idle_pid != os.getpid():
                # A forked child: these connections are the parent's too, and an answer read
                # here would be missing there. Close the child's copies (the parent's stay open).
                inherited, self._idle[:] = self._idle[:], []
                self._idle_pid = os.getpid()
            elif self._idle:
                conn = self._idle.pop()
        _close_idle(inherited)
        while conn is not None:
            if conn.reuse(deadline):
                return conn
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
        return None

    def _give_back(self, conn: _Connection) -> None:
        """Keep *conn* for the next request when its answer left it open; else close it."""
        if self._keep_alive and conn.kept_open:
            with self._idle_lock:
                if self._keep_alive and self._idle_pid == os.getpid() and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                    return
        conn.discard()

    def _exchange(self, conn: _Connection, method: str, target: str, body: Optional[bytes],
                  headers: Dict[str, str], url: str) -> Tuple[int, str, http.client.HTTPMessage, bytes]:
        """Send the request on *conn* and read the whole answer (raises what http.client and the socket raise)."""
        try:
            conn.request(method, target, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as send_exc:
            # nsqd answers 413 for a too-big body without reading it and then closes the
            # connection, so the rest of a large body hits a closed socket.  The answer
            # is usually already in our receive buffer: read it, or report the send failure.
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise send_exc from None
        else:
            resp = conn.getresponse()
        data = _read_body(resp, self._max_response_size, url)
        return resp.status, resp.reason, resp.headers, data

    def request(
        self,
        method: str,
        path: str,
        params: Optional[Params] = None,
        body: Optional[Body] = None,
        content_type: Optional[str] = None,
    ) -> HTTPResponse:
        """Send one request and return the response when its status is 2xx.

        Raises :class:`HTTPError` with the HTTP status and the server's message
        (``{"message": ...}``, a legacy ``status_txt``, or the body text) for a
        non-2xx answer, with the answer's status when its body is over *max_response_size*,
        and ``HTTPError(0, reason)`` raised from the underlying
        exception when no (whole) answer arrived (refused, not done within the client's
        *timeout*, DNS, TLS, reset, closed without answering); its ``timed_out`` is True
        for the timeout, and its ``__cause__`` is the underlying exception
        (``ConnectionRefusedError``, ``socket.gaierror``, ``ssl.SSLError``, ...).
        *path* may carry a query (``"/stats?format=json"``): *params* are added to it with ``&``.
        Before connecting, a bad *method*, *path*, *params*, *body* or *content_type*
        raises TypeError or :class:`ConfigError` naming it (e.g. a method with CR/LF,
        a non-ASCII path, one not starting with "/" or holding a ``#``, params that are not a
        mapping or that repeat a parameter of *path*'s query, a str body); a *params* name that is
        not a str, or a value that is not a str, int, bool or None, is a
        :class:`~nsq_sync.errors.ConfigTypeError` (a ConfigError and a TypeError).
        """
        method = _check_method(method)
        path_query = _path_and_query(path, params)
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            raise TypeError(f"body must be bytes, bytearray or memoryview, not {type(body).__name__}")
        if content_type is not None:
            if not isinstance(content_type, str):
                raise TypeError(f"content_type must be str, not {type(content_type).__name__}")
            _check_header_value("content_type", content_type, content_type)
        target = f"{self._prefix}{path_query}"
        url = f"{self._base_url}{path_query}"
        headers = {"Accept": ACCEPT_V1, "User-Agent": _USER_AGENT}
        if body is not None:
            headers["Content-Type"] = content_type or "application/octet-stream"
        elif method in ("POST", "PUT"):
            body = b""
        headers.update(self._extra_headers)

        payload = bytes(body) if body is not None else None
        started = time.monotonic()
        deadline = started + self._timeout  # one deadline for the whole request
        conn = self._kept(deadline) if self._keep_alive else None
        try:
            if conn is not None:
                try:
                    status, reason, resp_headers, data = self._exchange(conn, method, target, payload, headers, url)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    # The server closed the kept connection as the request went out, and sent
                    # no answer. Only a request that changes nothing goes again: a POST may
                    # have been done before the connection closed (a caller may retry it).
                    if method not in _REPLAYABLE:
                        raise
                    conn.discard()
                    logger.debug("%s %s: kept connection closed by the server; once more on a new one", method, url)
                    conn = None
            if conn is None:
                conn = self._connection(deadline)
                status, reason, resp_headers, data = self._exchange(conn, method, target, payload, headers, url)
        except (OSError, http.client.HTTPException, ssl.CertificateError, UnicodeError) as exc:
            # (UnicodeError: a name the IDNA codec refuses, from getaddrinfo)
            if conn is not None:
                conn.discard()
            reason_text = _transport_reason(exc, self._timeout)
            logger.debug("%s %s failed after %.1f ms: %s", method, url, (time.monotonic() - started) * 1000, reason_text)
            raise HTTPError(0, reason_text, url, timed_out=isinstance(exc, (socket.timeout, TimeoutError))) from exc
        except BaseException:
            if conn is not None:
                conn.discard()
            raise
        self._give_back(conn)

        logger.debug("%s %s -> %d (%.1f ms, %d bytes)", method, url, status, (time.monotonic() - started) * 1000, len(data))
        if not 200 <= status < 300:
            message = _error_message(data, reason)
            if status == 404 and message == "NOT_FOUND" and path_query.partition("?")[0] in self._own_routes:
                message += self._wrong_server_hint.format(route=path_query.partition("?")[0])
            raise HTTPError(status, message, url)
        return HTTPResponse(status, reason, resp_headers, data, url)

    def get_json(self, path: str, params: Optional[Params] = None) -> Any:
        """GET *path* and return the parsed (and, for old servers, unwrapped) JSON.

        Raises :class:`HTTPError` as :meth:`request` does, or when the body is not JSON.
        """
        return self.request("GET", path, params).json()

    def get_text(self, path: str, params: Optional[Params] = None) -> str:
        """GET *path* and return the body as text. Raises :class:`HTTPError` as :meth:`request` does."""
        return self.request("GET", path, params).text()

    def post(
        self,
        path: str,
        params: Optional[Params] = None,
        body: Optional[Body] = None,
        content_type: Optional[str] = None,
    ) -> str:
        """POST to *path* and return the body as text (``""`` for the admin actions, ``"OK"`` for pub).

        Raises :class:`HTTPError` as :meth:`request` does.
        """
        resp = self.request("POST", path, params, body, content_type)
        return resp.text()

    def _admin_action(self, route: str, params: Dict[str, str], target: str) -> None:
        """POST an admin action (``/topic/create``, ...) that nsqd and nsqlookupd answer with an
        empty body; anything else is an :class:`HTTPError` saying the *target* (``"topic"``)
        may or may not have been changed."""
        resp = self.request("POST", route, params)
        done = _ACTION_DONE.get(route.rsplit("/", 1)[-1], "changed")
        AnswerShape(resp, f"{self._server} {route}").empty(f"the {target} may or may not have been {done}")

    def ping(self) -> bool:
        """GET ``/ping``; True when the server answers 2xx with ``OK`` (what nsqd, nsqlookupd and
        nsqadmin answer).

        Raises :class:`HTTPError` otherwise: nsqd answers 500 with its health text when unhealthy,
        and any other answer (a proxy's login page, say) is one with the answer's status.
        """
        resp = self.request("GET", "/ping")
        AnswerShape(resp, f"{self._server} /ping").text_is(b"OK")
        return True

    def info(self) -> Dict[str, Any]:
        """GET ``/info``: the server's version and (for nsqd) ports and limits.

        Raises :class:`HTTPError`, also when the answer is not a JSON object with a ``version`` string.
        """
        resp = self.request("GET", "/info")
        shape = AnswerShape(resp, f"{self._server} /info")
        data = shape.obj(resp.json())
        shape.str_field(data, "version")
        return data

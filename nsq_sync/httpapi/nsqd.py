"""Client for nsqd's HTTP API (``--http-address``, default port 4151).

Routes, methods and parameters follow nsqd v1.3.0 (``nsqd/http.go``):
``GET /ping``, ``GET /info``, ``GET /stats?format=json&topic=&channel=&include_clients=&include_mem=``,
``POST /pub?topic=&defer=<ms>``, ``POST /mpub?topic=&binary=true``,
``POST /topic/{create,delete,empty,pause,unpause}?topic=`` and
``POST /channel/{create,delete,empty,pause,unpause}?topic=&channel=``.

Topic and channel names are checked locally before anything is sent, as are
message bodies, so a bad argument never reaches the server.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import ConfigError, HTTPError
from ..protocol.commands import MessageBody
from ..protocol.names import check_channel, check_topic
from .base import _ACTION_DONE, AnswerShape, HTTPClient

__all__ = ["NsqdHTTPClient", "encode_mpub_binary"]

logger = logging.getLogger(__name__)

_SIZE = struct.Struct(">i")
_MAX_INT32 = 2**31 - 1


def _body_bytes(body: object, param: str) -> bytes:
    """*body* as bytes (str encoded UTF-8); TypeError for other types, ConfigError when empty."""
    if isinstance(body, str):
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            shown = body if len(body) <= 64 else f"<str of {len(body)} characters>"
            raise ConfigError(param, shown, f"str is not encodable as UTF-8 ({exc.reason} at index {exc.start}); pass bytes") from None
    elif isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
    else:
        raise TypeError(f"{param} must be bytes or str, not {type(body).__name__}")
    if not data:
        raise ConfigError(param, data, "message body must not be empty")
    if len(data) > _MAX_INT32:
        raise ConfigError(param, f"<{len(data)} bytes>", "message body too large")
    return data


def _bodies_list(bodies: object) -> List[bytes]:
    if isinstance(bodies, (str, bytes, bytearray, memoryview)):
        raise TypeError("bodies must be a list of message bodies, not a single body")
    try:
        items = list(bodies)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"bodies must be an iterable of bytes or str, not {type(bodies).__name__}") from None
    if not items:
        raise ConfigError("bodies", items, "at least one message body is required")
    return [_body_bytes(item, f"bodies[{i}]") for i, item in enumerate(items)]


def encode_mpub_binary(bodies: Iterable[bytes]) -> bytes:
    """nsqd's binary MPUB body: ``[int32 count]`` then ``[int32 size][body]`` per message (big-endian)."""
    items = list(bodies)
    parts = [_SIZE.pack(len(items))]
    for body in items:
        parts.append(_SIZE.pack(len(body)))
        parts.append(body)
    return b"".join(parts)


def _check_defer(defer_ms: object) -> Optional[int]:
    if defer_ms is None:
        return None
    if isinstance(defer_ms, bool) or not isinstance(defer_ms, int):
        raise TypeError(f"defer_ms must be an int number of milliseconds, not {type(defer_ms).__name__}")
    if defer_ms < 0:
        raise ConfigError("defer_ms", defer_ms, "must be >= 0 milliseconds")
    return defer_ms


def _check_stats(shape: AnswerShape, data: object, include_clients: bool = True) -> Dict[str, Any]:
    """nsqd's /stats answer when it has the documented shape: an object whose ``topics`` (and
    ``producers``, when there) are lists of objects, each topic with a ``topic_name`` string and a
    ``channels`` list of objects, each channel with a ``channel_name`` string and (when there) a
    ``clients`` list of objects.  nsqd marshals empty Go slices as null: those become ``[]``,
    except a channel's ``clients`` when they were not asked for (*include_clients* false): nsqd
    sends null then whoever is connected, so the key is left out rather than made ``[]``.
    Raises :class:`HTTPError` (via *shape*) for anything else."""
    stats = shape.obj(data)
    topics = shape.list_field(stats, "topics")
    shape.items(topics, "topics", dict)
    producers = shape.optional_list_field(stats, "producers")  # (nsqd >= 1.1)
    if producers is not None:
        shape.items(producers, "producers", dict)
    for i, topic in enumerate(topics):
        where = f"topics[{i}]"
        shape.str_field(topic, "topic_name", where)
        channels = shape.list_field(topic, "channels", where)
        shape.items(channels, f"{where}.channels", dict)
        for j, channel in enumerate(channels):
            at = f"{where}.channels[{j}]"
            shape.str_field(channel, "channel_name", at)
            if not include_clients and "clients" in channel and channel["clients"] is None:
                del channel["clients"]  # (not asked for: unknown, not "no clients"; client_count stays)
            clients = shape.optional_list_field(channel, "clients", at)
            if clients is not None:
                shape.items(clients, f"{at}.clients", dict)
    return stats



class NsqdHTTPClient(HTTPClient):
    """Client for one nsqd's HTTP API.

    ``NsqdHTTPClient("127.0.0.1:4151")``; see :class:`~nsq_sync.httpapi.base.HTTPClient`
    for *timeout*, *ssl_context*, *headers* and *max_response_size*.  Every method raises
    :class:`~nsq_sync.errors.HTTPError` when nsqd answers non-2xx (``.status`` and
    nsqd's ``.message`` such as ``"TOPIC_NOT_FOUND"``) or cannot be reached
    (``.status == 0``), and when a 2xx answer is not what nsqd answers (``.status`` is the
    answer's, and ``.message`` starts ``not an nsqd /<route> answer``).
    """

    _server = "nsqd"
    # (nsqlookupd answers these 404 NOT_FOUND: the routes nsqlookupd v1.3.0 lacks)
    _own_routes = frozenset((
        "/stats", "/pub", "/mpub", "/topic/empty", "/topic/pause", "/topic/unpause",
        "/channel/empty", "/channel/pause", "/channel/unpause",
    ))
    _wrong_server_hint = (" (is this nsqlookupd's HTTP port? every nsqd serves {route}; nsqd's HTTP port is 4151 "
                          "by default, nsqlookupd's 4161)")
    #: this client's /info showed nsqd (or could not tell): see _check_nsqd
    _known_nsqd = False

    # ping() and info() come from HTTPClient: nsqd answers /ping with the text "OK"
    # (500 and its health text such as "NOK - ..." when unhealthy).

    def stats(
        self,
        topic: Optional[str] = None,
        channel: Optional[str] = None,
        include_clients: bool = True,
        include_mem: bool = True,
    ) -> Dict[str, Any]:
        """``GET /stats?format=json``, optionally filtered to *topic* and/or *channel*.

        Returns nsqd's dict (``version``, ``health``, ``start_time``, ``topics``,
        ``producers`` and ``memory`` unless *include_mem* is false); ``topics``,
        ``producers`` and each ``channels``/``clients`` list are lists, never None.
        With *include_clients* false nsqd does not list the clients, so the channels have no
        ``clients`` key (``client_count`` is still there).
        An unknown topic gives ``topics == []``, not an error.

        Raises ConfigError/TypeError for a bad topic/channel name, HTTPError on failure, also when
        the answer is not nsqd's shape: not a JSON object, ``topics`` missing or not a list of
        objects each with a ``topic_name`` string and a ``channels`` list of objects each with a
        ``channel_name`` string, or ``producers``/``clients`` there but not lists of objects.
        """
        return self._stats(topic, channel, include_clients, include_mem)[1]

    def _stats(
        self, topic: Optional[str], channel: Optional[str], include_clients: bool, include_mem: bool,
    ) -> Tuple[AnswerShape, Dict[str, Any]]:
        params: Dict[str, Any] = {"format": "json"}
        if topic is not None:
            params["topic"] = check_topic(topic)
        if channel is not None:
            params["channel"] = check_channel(channel)
        params["include_clients"] = bool(include_clients)
        params["include_mem"] = bool(include_mem)
        resp = self.request("GET", "/stats", params)
        shape = AnswerShape(resp, "nsqd /stats")
        return shape, _check_stats(shape, resp.json(), bool(include_clients))

    def _topic_entry(self, topic: str, include_clients: bool) -> Tuple[AnswerShape, str, Optional[Dict[str, Any]]]:
        """(the answer's checks, the entry's field name such as ``"topics[0]"``, the entry or None)."""
        topic = check_topic(topic)
        shape, data = self._stats(topic, None, include_clients, False)
        for i, entry in enumerate(data["topics"]):
            if entry["topic_name"] == topic:
                return shape, f"topics[{i}]", entry
        return shape, "", None

    def _channel_entry(self, topic: str, channel: str) -> Tuple[AnswerShape, str, Optional[Dict[str, Any]]]:
        topic = check_topic(topic)
        channel = check_channel(channel)
        shape, data = self._stats(topic, channel, True, False)
        for i, entry in enumerate(data["topics"]):
            if entry["topic_name"] != topic:
                continue
            for j, found in enumerate(entry["channels"]):
                if found["channel_name"] == channel:
                    return shape, f"topics[{i}].channels[{j}]", found
        return shape, "", None

    def topic_stats(self, topic: str) -> Optional[Dict[str, Any]]:
        """The stats dict of *topic* (``depth``, ``backend_depth``, ``message_count``, ``paused``,
        ``channels``, ...) or None when nsqd does not have the topic.  Each channel's dict is as
        :meth:`channel_stats` gives it, with its ``clients`` list.

        Raises ConfigError/TypeError for a bad name, HTTPError on failure (as :meth:`stats`).
        """
        return self._topic_entry(topic, True)[2]

    def topic_depth(self, topic: str) -> int:
        """Messages waiting in *topic* itself (memory + disk; nsqd's ``depth`` already includes
        ``backend_depth``); 0 when the topic does not exist.

        Once a topic has channels nsqd moves its messages into them, so this drops to 0;
        use :meth:`channel_depth` then.  Raises ConfigError/TypeError, HTTPError (as :meth:`stats`,
        and when the topic's ``depth`` is not an integer >= 0).
        """
        shape, where, entry = self._topic_entry(topic, False)
        return shape.count_field(entry, "depth", where) if entry is not None else 0

    def channel_stats(self, topic: str, channel: str) -> Optional[Dict[str, Any]]:
        """The stats dict of *channel* in *topic* (``depth``, ``backend_depth``, ``in_flight_count``,
        ``deferred_count``, ``requeue_count``, ``timeout_count``, ``message_count``,
        ``client_count``, ``clients``, ``paused``, ...) or None when either does not exist.

        Raises ConfigError/TypeError for bad names, HTTPError on failure (as :meth:`stats`).
        """
        return self._channel_entry(topic, channel)[2]

    def channel_depth(self, topic: str, channel: str) -> int:
        """Messages waiting in *channel* (memory + disk, not counting in-flight or deferred);
        0 when the topic or channel does not exist.  Raises ConfigError/TypeError, HTTPError
        (as :meth:`stats`, and when the channel's ``depth`` is not an integer >= 0).
        """
        shape, where, entry = self._channel_entry(topic, channel)
        return shape.count_field(entry, "depth", where) if entry is not None else 0

    # -- publishing ---------------------------------------------------------

    def pub(self, topic: str, body: MessageBody, defer_ms: Optional[int] = None) -> str:
        """``POST /pub``: publish one message (str is encoded UTF-8), deferred by *defer_ms* if given.

        Returns nsqd's answer, ``"OK"``.  Raises before sending: ConfigError for a bad
        topic, an empty body or a negative *defer_ms*; TypeError for a body that is not
        bytes/str.  Raises HTTPError from nsqd, e.g. 413 ``MSG_TOO_BIG`` (body over
        ``--max-msg-size``) or 400 ``INVALID_DEFER`` (over ``--max-req-timeout``), and
        HTTPError with the answer's status when a 2xx answer is anything but nsqd's ``OK``
        (a proxy's login page, say): the message may or may not have been published.
        """
        topic = check_topic(topic)
        data = _body_bytes(body, "body")
        defer = _check_defer(defer_ms)
        params: Dict[str, Any] = {"topic": topic}
        if defer is not None:
            params["defer"] = defer
        resp = self.request("POST", "/pub", params, data)
        AnswerShape(resp, "nsqd /pub").text_is(b"OK", "the message may or may not have been published")
        return "OK"

    def mpub(self, topic: str, bodies: Iterable[MessageBody], binary: bool = True) -> str:
        """``POST /mpub``: publish several messages at once; returns ``"OK"``.

        *binary* (the default) sends nsqd's length-prefixed format, so bodies may hold
        any bytes; ``binary=False`` sends newline-separated bodies.  Raises before
        sending: ConfigError for a bad topic, no bodies, an empty body, or (text mode)
        a body containing a newline; TypeError for a body that is not bytes/str.
        Raises HTTPError from nsqd, e.g. 413 ``BAD_MESSAGE`` (binary, a message over
        ``--max-msg-size``), 413 ``MSG_TOO_BIG`` (text mode) or 413 ``BODY_TOO_BIG``, and
        HTTPError with the answer's status when a 2xx answer is anything but nsqd's ``OK``:
        the messages may or may not have been published.
        """
        topic = check_topic(topic)
        items = _bodies_list(bodies)
        if binary:
            payload = encode_mpub_binary(items)
            params: Dict[str, Any] = {"topic": topic, "binary": "true"}
        else:
            for i, item in enumerate(items):
                if b"\n" in item:
                    raise ConfigError(f"bodies[{i}]", f"<{len(item)} bytes>", "contains a newline; use binary=True")
            payload = b"\n".join(items)
            params = {"topic": topic}
        resp = self.request("POST", "/mpub", params, payload)
        AnswerShape(resp, "nsqd /mpub").text_is(b"OK", "the messages may or may not have been published")
        return "OK"

    # -- topics -------------------------------------------------------------

    #: the admin routes nsqlookupd serves too (it keeps a registry of topics and channels)
    _shared_routes = frozenset(("/topic/create", "/topic/delete", "/channel/create", "/channel/delete"))

    def _admin_action(self, route: str, params: Dict[str, str], target: str) -> None:
        if route in self._shared_routes and not self._known_nsqd:
            self._check_nsqd(target, route)
        super()._admin_action(route, params, target)

    def _check_nsqd(self, target: str, route: str) -> None:
        """Before the first action nsqlookupd serves too: make sure this is nsqd, by its ``/info``.

        nsqlookupd answers ``/topic/create`` and the like just as nsqd does, so given its HTTP
        port the action changed its registry and no nsqd, without a word. Its ``/info`` has only
        a ``version``; nsqd's has its ``tcp_port``. An ``/info`` that is not answered 2xx (a proxy
        that serves only some routes) tells nothing: the action goes ahead. Raises HTTPError
        (status 0 when /info got no answer).
        """
        try:
            resp = self.request("GET", "/info")
        except HTTPError as exc:
            if exc.status == 0:
                raise
            self._known_nsqd = True  # (asked once: the answer will not change)
            return
        try:
            info = resp.json()
        except HTTPError:
            info = None
        if isinstance(info, dict) and "version" in info and "tcp_port" not in info:
            done = _ACTION_DONE[route.rsplit("/", 1)[-1]]
            raise HTTPError(resp.status, f"not nsqd: its /info has no tcp_port, as nsqlookupd's, so the {target} "
                                         f"was not {done} (is this nsqlookupd's HTTP "
                                         f"port? nsqd's HTTP port is 4151 by default, nsqlookupd's 4161)", resp.url)
        self._known_nsqd = True

    def _topic_action(self, action: str, topic: str) -> None:
        self._admin_action(f"/topic/{action}", {"topic": check_topic(topic)}, "topic")

    def create_topic(self, topic: str) -> None:
        """``POST /topic/create`` (idempotent). Raises ConfigError/TypeError for a bad name, HTTPError."""
        self._topic_action("create", topic)

    def delete_topic(self, topic: str) -> None:
        """``POST /topic/delete``: delete the topic, its channels and queued messages.

        Raises ConfigError/TypeError for a bad name, HTTPError (404 ``TOPIC_NOT_FOUND``).
        """
        self._topic_action("delete", topic)

    def empty_topic(self, topic: str) -> None:
        """``POST /topic/empty``: drop the messages queued in the topic (not its channels').

        Raises ConfigError/TypeError for a bad name, HTTPError (404 ``TOPIC_NOT_FOUND``).
        """
        self._topic_action("empty", topic)

    def pause_topic(self, topic: str) -> None:
        """``POST /topic/pause``: stop moving messages to channels.

        Raises ConfigError/TypeError for a bad name, HTTPError (404 ``TOPIC_NOT_FOUND``).
        """
        self._topic_action("pause", topic)

    def unpause_topic(self, topic: str) -> None:
        """``POST /topic/unpause``. Raises ConfigError/TypeError for a bad name, HTTPError (404 ``TOPIC_NOT_FOUND``)."""
        self._topic_action("unpause", topic)

    # -- channels -----------------------------------------------------------

    def _channel_action(self, action: str, topic: str, channel: str) -> None:
        params = {"topic": check_topic(topic), "channel": check_channel(channel)}
        self._admin_action(f"/channel/{action}", params, "channel")

    def create_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/create`` (idempotent); the topic must exist.

        Raises ConfigError/TypeError for bad names, HTTPError (404 ``TOPIC_NOT_FOUND``).
        """
        self._channel_action("create", topic, channel)

    def delete_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/delete``. Raises ConfigError/TypeError for bad names, HTTPError
        (404 ``TOPIC_NOT_FOUND`` or ``CHANNEL_NOT_FOUND``).
        """
        self._channel_action("delete", topic, channel)

    def empty_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/empty``: drop the channel's queued messages.

        Raises ConfigError/TypeError for bad names, HTTPError (404 ``TOPIC_NOT_FOUND``/``CHANNEL_NOT_FOUND``).
        """
        self._channel_action("empty", topic, channel)

    def pause_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/pause``: stop delivering to the channel's consumers.

        Raises ConfigError/TypeError for bad names, HTTPError (404 ``TOPIC_NOT_FOUND``/``CHANNEL_NOT_FOUND``).
        """
        self._channel_action("pause", topic, channel)

    def unpause_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/unpause``. Raises ConfigError/TypeError for bad names,
        HTTPError (404 ``TOPIC_NOT_FOUND``/``CHANNEL_NOT_FOUND``).
        """
        self._channel_action("unpause", topic, channel)


#: Upper-case alias (pynsq style).
NSQDHTTPClient = NsqdHTTPClient

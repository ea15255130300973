"""Client for nsqlookupd's HTTP API (``--http-address``, default port 4161).

Routes follow nsqlookupd v1.3.0 (``nsqlookupd/http.go``): ``GET /ping``,
``GET /info``, ``GET /lookup?topic=``, ``GET /topics``, ``GET /channels?topic=``,
``GET /nodes``, and ``POST /topic/create``, ``/topic/delete``,
``/topic/tombstone?topic=&node=``, ``/channel/create``, ``/channel/delete``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..addresses import address_key, check_host
from ..errors import ConfigError, HTTPError
from ..protocol.names import check_channel, check_topic
from .base import AnswerShape, HTTPClient

__all__ = ["LookupdClient", "nsqd_http_address"]

logger = logging.getLogger(__name__)

# fullmatch, not ^...$ ("$" also matches before a trailing newline); [0-9], not \d (any Unicode digit)
_NODE_HOST = re.compile(r"[A-Za-z0-9_.-]+").fullmatch
_NODE_PORT = re.compile(r"[0-9]{1,5}").fullmatch


def _is_ipv6(host: str) -> bool:
    address, percent, zone = host.partition("%")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return not percent or _NODE_HOST(zone) is not None


def _check_node(node: object) -> str:
    """*node* as nsqlookupd compares it: ``broadcast_address + ":" + http_port``, so an IPv6
    address without brackets ("[::1]:4151" and "::1:4151" both give "::1:4151")."""
    if not isinstance(node, str):
        raise TypeError(f"node must be str ('broadcast_address:http_port'), not {type(node).__name__}")
    host, _, port = node.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        usable = _is_ipv6(host)
    else:
        usable = _is_ipv6(host) if ":" in host else _NODE_HOST(host) is not None
    if not usable or _NODE_PORT(port) is None or not 1 <= int(port) <= 65535:
        raise ConfigError("node", node, "must be 'broadcast_address:http_port' of an nsqd (IPv6 as '[::1]:4151' or '::1:4151')")
    return f"{host}:{port}"


def _producer_address(entry: object) -> Optional[Tuple[str, int]]:
    """``(broadcast_address, tcp_port)`` of one /lookup producer entry; None when it has no usable pair."""
    if not isinstance(entry, dict):
        return None
    host, port = entry.get("broadcast_address"), entry.get("tcp_port")
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return None
    try:
        check_host("broadcast_address", host, host)
    except ConfigError:
        return None
    return host, port


def nsqd_http_address(producer: Mapping[str, Any]) -> str:
    """``"host:port"`` of the HTTP API of the nsqd of one :meth:`LookupdClient.nodes` or
    :meth:`LookupdClient.lookup` producer entry: its ``broadcast_address`` and ``http_port``, an
    IPv6 address in brackets (``"[::1]:4151"``; ``f"{broadcast_address}:{http_port}"`` gives
    ``"::1:4151"``, which no HTTP client takes).  Ready for :class:`NsqdHTTPClient` and for
    :meth:`LookupdClient.tombstone_topic`'s *node*.

    Raises TypeError when *producer* is not a mapping, ConfigError naming ``producer`` when it has
    no usable ``broadcast_address`` (a host name or IP address) and ``http_port`` (an int from 1
    to 65535).
    """
    if not isinstance(producer, Mapping):
        raise TypeError(f"producer must be a nodes()/lookup() producer entry (a dict), not {type(producer).__name__}")
    host, port = producer.get("broadcast_address"), producer.get("http_port")
    if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    usable = isinstance(host, str) and bool(host) and not isinstance(port, bool) and isinstance(port, int) and 1 <= port <= 65535
    if usable:
        try:
            check_host("producer", producer, host)  # type: ignore[arg-type]
        except ConfigError:
            usable = False
    if not usable:
        shown = {key: producer.get(key) for key in ("broadcast_address", "http_port")}
        raise ConfigError("producer", shown, "needs a broadcast_address (a host name or IP address) and an http_port (an int from 1 to 65535)")
    return address_key(host, port)  # type: ignore[arg-type]


def strip_lookup_path(address: object) -> object:
    """pynsq took nsqlookupd addresses as "http://host:4161/lookup": drop that "/lookup" (the
    client adds the route itself), so the same setting works here and in a Reader."""
    if not isinstance(address, str):
        return address
    trimmed = address.rstrip("/")
    if trimmed.endswith("/lookup"):
        return trimmed[: -len("/lookup")]
    return address


class LookupdClient(HTTPClient):
    """Client for one nsqlookupd's HTTP API.

    ``LookupdClient("127.0.0.1:4161")``; see :class:`~nsq_sync.httpapi.base.HTTPClient`
    for *timeout*, *ssl_context*, *headers* and *max_response_size*. An address ending in ``/lookup`` (pynsq's
    form) stands for the base address. Every method raises
    :class:`~nsq_sync.errors.HTTPError` when nsqlookupd answers non-2xx or cannot be
    reached (``.status == 0``), and when a 2xx answer is not what nsqlookupd answers
    (``.status`` is the answer's, and ``.message`` starts ``not an nsqlookupd /<route> answer``).
    """

    _server = "nsqlookupd"
    # (nsqd answers these 404 NOT_FOUND: the routes nsqd v1.3.0 lacks)
    _own_routes = frozenset(("/lookup", "/topics", "/channels", "/nodes", "/topic/tombstone"))
    _wrong_server_hint = (" (is this nsqd's HTTP port? every nsqlookupd serves {route}; nsqlookupd's HTTP port "
                          "is 4161 by default, nsqd's 4151)")

    def __init__(self, address: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(strip_lookup_path(address), *args, **kwargs)  # type: ignore[arg-type]

    # ping() and info() come from HTTPClient (nsqlookupd's /info holds only "version").

    def lookup(self, topic: str) -> Dict[str, Any]:
        """``GET /lookup``: ``{"channels": [...], "producers": [{"broadcast_address", "tcp_port",
        "http_port", "hostname", "remote_address", "version"}, ...]}`` for *topic*.

        Tombstoned and inactive producers are left out by nsqlookupd.  Raises
        ConfigError/TypeError for a bad name; HTTPError, in particular status 404 with
        message ``TOPIC_NOT_FOUND`` when no nsqd has registered the topic (see :meth:`producers`),
        and with the answer's status when it is not a /lookup answer (not a JSON object,
        ``producers`` missing or not a list, or ``channels`` not a list of strings; ``null`` lists
        are returned as ``[]``).  The producer entries are returned as nsqlookupd sent them
        (:func:`nsqd_http_address` gives one's nsqd HTTP address).
        """
        resp = self.request("GET", "/lookup", {"topic": check_topic(topic)})
        shape = AnswerShape(resp, "nsqlookupd /lookup")
        data = shape.obj(resp.json())
        shape.list_field(data, "producers")  # (its entries are returned as sent: see producers())
        channels = shape.optional_list_field(data, "channels")
        if channels is None:
            data["channels"] = []
        else:
            shape.items(channels, "channels", str)
        return data

    def producers(self, topic: str) -> List[Tuple[str, int]]:
        """``(broadcast_address, tcp_port)`` of every nsqd with *topic*; ``[]`` when the topic is unknown.

        A producer entry without a usable ``broadcast_address`` (a host name or IP address) and
        ``tcp_port`` (an int from 1 to 65535) is skipped, with one warning per answer, and the
        others are returned.  Raises ConfigError/TypeError for a bad name, HTTPError for any
        other failure, including an answer that is not a /lookup answer (see :meth:`lookup`).
        """
        try:
            data = self.lookup(topic)
        except HTTPError as exc:
            if exc.status == 404 and exc.message == "TOPIC_NOT_FOUND":
                return []
            raise
        found: List[Tuple[str, int]] = []
        skipped: List[Any] = []
        for entry in data["producers"]:
            address = _producer_address(entry)
            if address is None:
                skipped.append(entry)
            else:
                found.append(address)
        if skipped:
            logger.warning(
                "nsqlookupd %s: skipped %d of %d producers of topic %r without a usable broadcast_address and tcp_port (first: %.200r)",
                self.address, len(skipped), len(skipped) + len(found), topic, skipped[0],
            )
        return found

    def _names(self, route: str, key: str, params: Optional[Dict[str, str]] = None) -> List[str]:
        """The list of strings *key* of the answer to ``GET route`` (``null`` is ``[]``)."""
        resp = self.request("GET", route, params)
        shape = AnswerShape(resp, f"nsqlookupd {route}")
        names = shape.list_field(shape.obj(resp.json()), key)
        shape.items(names, key, str)
        return names

    def topics(self) -> List[str]:
        """``GET /topics``: every topic registered.

        Raises HTTPError, also when the answer is not a JSON object with a ``topics`` list of strings.
        """
        return self._names("/topics", "topics")

    def channels(self, topic: str) -> List[str]:
        """``GET /channels``: the channels registered for *topic* (``[]`` for an unknown topic).

        Raises ConfigError/TypeError for a bad name, HTTPError, also when the answer is not a JSON
        object with a ``channels`` list of strings.
        """
        return self._names("/channels", "channels", {"topic": check_topic(topic)})

    def nodes(self) -> List[Dict[str, Any]]:
        """``GET /nodes``: every active nsqd, as dicts with ``broadcast_address``, ``tcp_port``,
        ``http_port``, ``hostname``, ``remote_address``, ``version``, ``topics`` and
        ``tombstones`` (one bool per topic; tombstoned nodes are included), as nsqlookupd sent them.
        :func:`nsqd_http_address` gives a node's HTTP address (IPv6 in brackets).

        Raises HTTPError, also when the answer is not a JSON object with a ``producers`` list of objects.
        """
        resp = self.request("GET", "/nodes")
        shape = AnswerShape(resp, "nsqlookupd /nodes")
        nodes = shape.list_field(shape.obj(resp.json()), "producers")
        shape.items(nodes, "producers", dict)
        return nodes

    def create_topic(self, topic: str) -> None:
        """``POST /topic/create``: register *topic* without a producer. Raises ConfigError/TypeError, HTTPError."""
        self._admin_action("/topic/create", {"topic": check_topic(topic)}, "topic")

    def delete_topic(self, topic: str) -> None:
        """``POST /topic/delete``: forget *topic* and its channels (succeeds for unknown topics).

        nsqds that still have the topic register it again on their next heartbeat/change.
        Raises ConfigError/TypeError, HTTPError.
        """
        self._admin_action("/topic/delete", {"topic": check_topic(topic)}, "topic")

    def create_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/create``: register *channel* (and *topic*). Raises ConfigError/TypeError, HTTPError."""
        self._admin_action("/channel/create", {"topic": check_topic(topic), "channel": check_channel(channel)}, "channel")

    def delete_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/delete``. Raises ConfigError/TypeError, HTTPError (404 ``CHANNEL_NOT_FOUND``)."""
        self._admin_action("/channel/delete", {"topic": check_topic(topic), "channel": check_channel(channel)}, "channel")

    def tombstone_topic(self, topic: str, node: str) -> None:
        """``POST /topic/tombstone``: hide the producer *node* (``"broadcast_address:http_port"``)
        of *topic* from lookups for ``--tombstone-lifetime``, e.g. before deleting the topic on it.

        An IPv6 broadcast address may be given in brackets or not (``"[::1]:4151"`` or
        ``"::1:4151"``): nsqlookupd compares the node with the unbracketed form, which is sent.
        A node that does not match any producer is silently ignored by nsqlookupd.
        Raises ConfigError/TypeError for a bad topic or node, HTTPError.
        """
        self._admin_action("/topic/tombstone", {"topic": check_topic(topic), "node": _check_node(node)}, "producer")

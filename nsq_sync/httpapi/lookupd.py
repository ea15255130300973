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
from typing import Any, Dict, List, Optional, Tuple

from ..addresses import check_host
from ..errors import ConfigError, HTTPError
from ..protocol.names import check_channel, check_topic
from .base import HTTPClient

__all__ = ["LookupdClient"]

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


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


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


def _list_field(data: Any, key: str) -> List[Any]:
    if isinstance(data, dict):
        value = data.get(key)
        return list(value) if value else []
    return []


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
    reached (``.status == 0``).
    """

    def __init__(self, address: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(strip_lookup_path(address), *args, **kwargs)  # type: ignore[arg-type]

    # ping() and info() come from HTTPClient (nsqlookupd's /info holds only "version").

    def lookup(self, topic: str) -> Dict[str, Any]:
        """``GET /lookup``: ``{"channels": [...], "producers": [{"broadcast_address", "tcp_port",
        "http_port", "hostname", "remote_address", "version"}, ...]}`` for *topic*.

        Tombstoned and inactive producers are left out by nsqlookupd.  Raises
        ConfigError/TypeError for a bad name; HTTPError, in particular status 404 with
        message ``TOPIC_NOT_FOUND`` when no nsqd has registered the topic (see :meth:`producers`),
        and with the answer's status when it is not a /lookup answer (not a JSON object, or
        ``producers`` missing or not a list; ``null`` lists are returned as ``[]``).  The
        producer entries are returned as nsqlookupd sent them.
        """
        resp = self.request("GET", "/lookup", {"topic": check_topic(topic)})
        data = resp.json()

        def malformed(problem: str) -> HTTPError:
            return HTTPError(resp.status, f"not an nsqlookupd /lookup answer: {problem}", resp.url)

        if not isinstance(data, dict):
            raise malformed(f"a JSON {_json_kind(data)}, not an object")
        if "producers" not in data:
            raise malformed("no 'producers' list")
        for key in ("producers", "channels"):
            value = data.get(key)
            if value is None:
                data[key] = []  # (Go's empty slice may be encoded as null)
            elif not isinstance(value, list):
                raise malformed(f"'{key}' is a JSON {_json_kind(value)}, not a list")
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

    def topics(self) -> List[str]:
        """``GET /topics``: every topic registered. Raises HTTPError."""
        return _list_field(self.get_json("/topics"), "topics")

    def channels(self, topic: str) -> List[str]:
        """``GET /channels``: the channels registered for *topic* (``[]`` for an unknown topic).

        Raises ConfigError/TypeError for a bad name, HTTPError.
        """
        return _list_field(self.get_json("/channels", {"topic": check_topic(topic)}), "channels")

    def nodes(self) -> List[Dict[str, Any]]:
        """``GET /nodes``: every active nsqd, as dicts with ``broadcast_address``, ``tcp_port``,
        ``http_port``, ``hostname``, ``remote_address``, ``version``, ``topics`` and
        ``tombstones`` (one bool per topic; tombstoned nodes are included). Raises HTTPError.
        """
        return _list_field(self.get_json("/nodes"), "producers")

    def create_topic(self, topic: str) -> None:
        """``POST /topic/create``: register *topic* without a producer. Raises ConfigError/TypeError, HTTPError."""
        self.post("/topic/create", {"topic": check_topic(topic)})

    def delete_topic(self, topic: str) -> None:
        """``POST /topic/delete``: forget *topic* and its channels (succeeds for unknown topics).

        nsqds that still have the topic register it again on their next heartbeat/change.
        Raises ConfigError/TypeError, HTTPError.
        """
        self.post("/topic/delete", {"topic": check_topic(topic)})

    def create_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/create``: register *channel* (and *topic*). Raises ConfigError/TypeError, HTTPError."""
        self.post("/channel/create", {"topic": check_topic(topic), "channel": check_channel(channel)})

    def delete_channel(self, topic: str, channel: str) -> None:
        """``POST /channel/delete``. Raises ConfigError/TypeError, HTTPError (404 ``CHANNEL_NOT_FOUND``)."""
        self.post("/channel/delete", {"topic": check_topic(topic), "channel": check_channel(channel)})

    def tombstone_topic(self, topic: str, node: str) -> None:
        """``POST /topic/tombstone``: hide the producer *node* (``"broadcast_address:http_port"``)
        of *topic* from lookups for ``--tombstone-lifetime``, e.g. before deleting the topic on it.

        An IPv6 broadcast address may be given in brackets or not (``"[::1]:4151"`` or
        ``"::1:4151"``): nsqlookupd compares the node with the unbracketed form, which is sent.
        A node that does not match any producer is silently ignored by nsqlookupd.
        Raises ConfigError/TypeError for a bad topic or node, HTTPError.
        """
        self.post("/topic/tombstone", {"topic": check_topic(topic), "node": _check_node(node)})

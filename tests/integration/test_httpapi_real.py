"""nsq_sync.httpapi against real nsqd and nsqlookupd v1.3.0 processes."""

from __future__ import annotations

import ssl

import pytest

from nsq_sync.errors import ConfigError, HTTPError
from nsq_sync.httpapi import LookupdClient, NsqdHTTPClient, nsqd_http_address
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import NsqdProcess, wait_until


def expect_http_error(status: int, message: str, fn, *args, **kwargs) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        fn(*args, **kwargs)
    assert (info.value.status, info.value.message) == (status, message)
    return info.value


# ---------------------------------------------------------------- ping / info


def test_nsqd_ping_and_info(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    assert client.ping() is True
    info = client.info()
    assert info["version"] == "1.3.0"
    assert info["tcp_port"] == nsqd.tcp_port
    assert info["http_port"] == nsqd.http_port
    assert info["broadcast_address"] == "127.0.0.1"
    assert NsqdHTTPClient.from_url(f"http://{nsqd.http_address}/").ping() is True


def test_lookupd_ping_and_info(nsqlookupd):
    client = LookupdClient(nsqlookupd.http_address)
    assert client.ping() is True
    assert client.info() == {"version": "1.3.0"}
    assert client.topics() == []
    assert client.nodes() == []


def test_nsqd_over_https(tls_nsqd, tls_files):
    context = ssl.create_default_context(cafile=tls_files.ca_cert)
    client = NsqdHTTPClient(f"https://{tls_nsqd.https_address}", ssl_context=context)
    assert client.scheme == "https"
    assert client.ping() is True
    assert client.pub("secure", b"x") == "OK"
    assert client.topic_depth("secure") == 1

    # the default context does not trust the test CA
    untrusting = NsqdHTTPClient(f"https://{tls_nsqd.https_address}")
    with pytest.raises(HTTPError) as info:
        untrusting.ping()
    assert info.value.status == 0
    assert "TLS" in info.value.message
    assert isinstance(info.value.__cause__, ssl.SSLError)


def test_kept_connection_across_an_nsqd_restart(nsqd):
    """Publishes share one kept connection; nsqd's restart closes it, and the next publish
    (a POST, never sent twice) goes out on a new connection instead of failing."""
    with NsqdHTTPClient(nsqd.http_address) as client:
        for n in range(20):
            assert client.pub("kept", b"%d" % n) == "OK"
        assert len(client._idle) == 1
        kept = client._idle[0]
        nsqd.restart()
        assert client.pub("kept", b"after restart") == "OK"
        assert client._idle and client._idle[0] is not kept
        assert client.topic_depth("kept") == 21  # (nsqd's graceful stop keeps them on disk)
    assert client._idle == []


def test_max_response_size_against_real_servers(nsqd, nsqlookupd):
    assert NsqdHTTPClient(nsqd.http_address, max_response_size=2).ping() is True  # "OK": exactly the limit
    small = NsqdHTTPClient(nsqd.http_address, max_response_size=100)
    with pytest.raises(HTTPError) as info:
        small.stats()  # nsqd sends a Content-Length: refused before reading
    assert info.value.status == 200
    assert info.value.message.endswith("is over max_response_size (100 bytes); not read")
    assert NsqdHTTPClient(nsqd.http_address, max_response_size=None).stats()["version"] == "1.3.0"
    # error answers are bounded too: nsqlookupd's 404 {"message":"TOPIC_NOT_FOUND"} is 29 bytes
    assert LookupdClient(nsqlookupd.http_address, max_response_size=29).producers("nope") == []
    with pytest.raises(HTTPError) as info:
        LookupdClient(nsqlookupd.http_address, max_response_size=28).producers("nope")
    assert info.value.status == 404 and "max_response_size (28 bytes)" in info.value.message


# ---------------------------------------------------------------- publishing


def test_pub_mpub_and_depth(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    bodies = [b"one", "twö", b"\x00\xff binary", b"with\nnewline", b"x" * 1000]
    assert client.pub("pubtest", bodies[0]) == "OK"
    assert client.pub("pubtest", bodies[1]) == "OK"
    assert client.mpub("pubtest", bodies[2:]) == "OK"  # binary: the newline stays inside one message
    assert client.mpub("pubtest", [b"text1", "text2"], binary=False) == "OK"

    expected_bytes = sum(len(b.encode() if isinstance(b, str) else b) for b in bodies) + len(b"text1text2")
    assert client.topic_depth("pubtest") == 7
    topic = client.topic_stats("pubtest")
    assert topic is not None
    assert topic["message_count"] == 7
    assert topic["message_bytes"] == expected_bytes
    assert topic["channels"] == []

    stats = client.stats(topic="pubtest")
    assert [t["topic_name"] for t in stats["topics"]] == ["pubtest"]
    assert "memory" in stats
    assert "memory" not in client.stats(include_mem=False)
    assert client.stats(topic="nosuchtopic")["topics"] == []

    # the first channel receives what was queued in the topic
    client.create_channel("pubtest", "ch")
    wait_until(lambda: client.channel_depth("pubtest", "ch") == 7, timeout=5, message="messages moved to channel")
    assert client.topic_depth("pubtest") == 0
    channel = client.channel_stats("pubtest", "ch")
    for key in ("depth", "in_flight_count", "deferred_count", "requeue_count", "timeout_count", "client_count"):
        assert key in channel
    assert channel["clients"] == []


def test_topic_stats_lists_the_channels_consumers(nsqd):
    # topic_stats() gave "clients": [] for a channel with a consumer (it asked for no clients)
    import nsq_sync

    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("cl")
    client.create_channel("cl", "c")
    reader = nsq_sync.Reader(topic="cl", channel="c", nsqd_tcp_addresses=[nsqd.tcp_address],
                             message_handler=lambda message: None)
    reader.start()
    try:
        wait_until(lambda: client.channel_stats("cl", "c")["client_count"] == 1, timeout=10, message="consumer connected")
        (channel,) = client.topic_stats("cl")["channels"]
        assert channel["client_count"] == 1
        assert len(channel["clients"]) == 1
        assert len(client.channel_stats("cl", "c")["clients"]) == 1
        (unlisted,) = client.stats(topic="cl", include_clients=False)["topics"][0]["channels"]
        assert unlisted["client_count"] == 1 and "clients" not in unlisted
    finally:
        reader.close()


@pytest.mark.parametrize("accept", [None, "*/*"], ids=["v1-accept", "any-accept"])
def test_nsqd_answers_exactly_what_the_client_checks_for(nsqd, nsqlookupd, accept):
    # pub()/mpub() take nothing but "OK" and the admin actions nothing but an empty body (anything
    # else: HTTPError, "may or may not have been ..."): nsqd 1.3.0 answers just that, whether or
    # not the client asks for the v1 format (it does by default; headers= can override Accept)
    headers = {"Accept": accept} if accept else None
    client = NsqdHTTPClient(nsqd.http_address, headers=headers)
    assert client.request("POST", "/pub", {"topic": "ans"}, b"x").body == b"OK"
    assert client.request("POST", "/pub", {"topic": "ans", "defer": 1000}, b"x").body == b"OK"
    assert client.request("POST", "/mpub", {"topic": "ans", "binary": "true"}, b"\0\0\0\1\0\0\0\1x").body == b"OK"
    assert client.request("POST", "/mpub", {"topic": "ans"}, b"a\nb").body == b"OK"
    assert client.request("GET", "/ping").body == b"OK"
    # and the methods return as documented
    assert client.pub("ans", b"one") == "OK"
    assert client.pub("ans", "two", defer_ms=1000) == "OK"
    assert client.mpub("ans", [b"3", b"4\n"]) == "OK"
    assert client.mpub("ans", [b"5", b"6"], binary=False) == "OK"
    assert client.ping() is True
    assert client.info()["version"] == "1.3.0"
    for route, params in (("/topic/create", {"topic": "adm"}), ("/topic/pause", {"topic": "adm"}),
                          ("/topic/unpause", {"topic": "adm"}), ("/topic/empty", {"topic": "adm"}),
                          ("/channel/create", {"topic": "adm", "channel": "c"}),
                          ("/channel/pause", {"topic": "adm", "channel": "c"}),
                          ("/channel/unpause", {"topic": "adm", "channel": "c"}),
                          ("/channel/empty", {"topic": "adm", "channel": "c"}),
                          ("/channel/delete", {"topic": "adm", "channel": "c"}), ("/topic/delete", {"topic": "adm"})):
        assert client.request("POST", route, params).body == b"", route
    for method, args in (("create_topic", ("adm",)), ("pause_topic", ("adm",)), ("unpause_topic", ("adm",)),
                         ("empty_topic", ("adm",)), ("create_channel", ("adm", "c")), ("pause_channel", ("adm", "c")),
                         ("unpause_channel", ("adm", "c")), ("empty_channel", ("adm", "c")),
                         ("delete_channel", ("adm", "c")), ("delete_topic", ("adm",))):
        assert getattr(client, method)(*args) is None, method
    assert client.topic_depth("ans") == 11  # 5 sent by request(), 6 by pub()/mpub()

    lookupd = LookupdClient(nsqlookupd.http_address, headers=headers)
    assert lookupd.request("GET", "/ping").body == b"OK"
    for route, params in (("/topic/create", {"topic": "lk"}), ("/channel/create", {"topic": "lk", "channel": "c"}),
                          ("/topic/tombstone", {"topic": "lk", "node": "127.0.0.1:1"}),
                          ("/channel/delete", {"topic": "lk", "channel": "c"}), ("/topic/delete", {"topic": "lk"})):
        assert lookupd.request("POST", route, params).body == b"", route
    for method, args in (("create_topic", ("lk",)), ("create_channel", ("lk", "c")), ("tombstone_topic", ("lk", "127.0.0.1:1")),
                         ("delete_channel", ("lk", "c")), ("delete_topic", ("lk",))):
        assert getattr(lookupd, method)(*args) is None, method
    assert lookupd.ping() is True and lookupd.info() == {"version": "1.3.0"}


def test_params_are_added_to_a_query_in_the_path(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("ht1")
    client.create_channel("ht1", "c")
    # was sent as "/pub?topic=ht1?defer=60000": 400 INVALID_TOPIC
    assert client.post("/pub?topic=ht1", {"defer": 60_000}, b"x") == "OK"
    wait_until(lambda: client.channel_stats("ht1", "c")["deferred_count"] == 1, timeout=5, message="deferred message")
    # was "/stats?format=json?topic=ht1": nsqd answered its text format ("not valid JSON")
    stats = client.get_json("/stats?format=json", {"topic": "ht1", "include_mem": False})
    assert [t["topic_name"] for t in stats["topics"]] == ["ht1"]
    assert "memory" not in stats
    with pytest.raises(ConfigError) as info:
        client.get_json("/stats?format=json", {"format": "text"})
    assert info.value.param == "params"


def test_pub_deferred(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("deferred")
    client.create_channel("deferred", "ch")
    assert client.pub("deferred", b"later", defer_ms=60_000) == "OK"
    stats = wait_until(
        lambda: (lambda c: c if c and c["deferred_count"] == 1 else None)(client.channel_stats("deferred", "ch")),
        timeout=5,
        message="deferred message",
    )
    assert stats["depth"] == 0
    # over nsqd's --max-req-timeout (default 1h)
    expect_http_error(400, "INVALID_DEFER", client.pub, "deferred", b"x", defer_ms=2 * 3600 * 1000)


def test_bad_input_is_rejected_before_sending(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    with pytest.raises(ConfigError) as info:
        client.pub("bad topic!", b"x")
    assert info.value.param == "topic"
    with pytest.raises(ConfigError):
        client.pub("fine", b"")
    with pytest.raises(ConfigError):
        client.mpub("fine", [])
    with pytest.raises(ConfigError):
        client.mpub("fine", [b"a\nb"], binary=False)
    with pytest.raises(TypeError):
        client.pub("fine", 12)
    # had any of these reached nsqd, "fine" would exist now
    assert client.stats()["topics"] == []


def test_server_side_validation_errors(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    # nsqd's own answers when a request bypasses the local checks
    expect_http_error(400, "MSG_EMPTY", client.post, "/pub", {"topic": "t"}, b"")
    expect_http_error(400, "INVALID_TOPIC", client.post, "/pub", {"topic": "bad!"}, b"x")
    expect_http_error(400, "MISSING_ARG_TOPIC", client.post, "/pub", {}, b"x")
    expect_http_error(400, "INVALID_ARG_CHANNEL", client.post, "/channel/create", {"topic": "t", "channel": "bad!"})
    expect_http_error(405, "METHOD_NOT_ALLOWED", client.get_json, "/pub")
    expect_http_error(404, "NOT_FOUND", client.get_json, "/no/such/route")


def test_too_big_default_limits(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    one_mib = 1024 * 1024  # nsqd default --max-msg-size
    err = expect_http_error(413, "MSG_TOO_BIG", client.pub, "big", b"x" * (one_mib + 1))
    assert err.url.endswith("/pub?topic=big")
    # a body far larger than socket buffers: nsqd answers without reading it and closes
    expect_http_error(413, "MSG_TOO_BIG", client.pub, "big", b"x" * (16 * one_mib))
    # default --max-body-size is 5 MiB
    expect_http_error(413, "BODY_TOO_BIG", client.mpub, "big", [b"y" * one_mib] * 6)
    assert client.pub("big", b"x" * one_mib) == "OK"
    assert client.topic_depth("big") == 1


def test_too_big_small_limits():
    proc = NsqdProcess(extra_args=["--max-msg-size=64", "--max-body-size=256"])
    with started(proc):
        client = NsqdHTTPClient(proc.http_address)
        assert client.pub("small", b"a" * 64) == "OK"
        expect_http_error(413, "MSG_TOO_BIG", client.pub, "small", b"a" * 65)
        # binary MPUB reports an oversized message as BAD_MESSAGE (E_BAD_MESSAGE minus "E_")
        expect_http_error(413, "BAD_MESSAGE", client.mpub, "small", [b"ok", b"b" * 65])
        expect_http_error(413, "MSG_TOO_BIG", client.mpub, "small", [b"ok", b"b" * 65], binary=False)
        expect_http_error(413, "BODY_TOO_BIG", client.mpub, "small", [b"c" * 60] * 5)
        # nothing of the rejected batches was published
        assert client.topic_depth("small") == 1


# ---------------------------------------------------------------- topic / channel administration


def test_topic_and_channel_admin(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("adm")
    client.create_topic("adm")  # idempotent
    topic = client.topic_stats("adm")
    assert topic is not None and topic["paused"] is False

    client.pause_topic("adm")
    assert client.topic_stats("adm")["paused"] is True
    client.unpause_topic("adm")
    assert client.topic_stats("adm")["paused"] is False

    client.create_channel("adm", "c1")
    client.create_channel("adm", "c2")
    assert [c["channel_name"] for c in client.topic_stats("adm")["channels"]] == ["c1", "c2"]

    client.pause_channel("adm", "c1")
    assert client.channel_stats("adm", "c1")["paused"] is True
    assert client.channel_stats("adm", "c2")["paused"] is False
    client.unpause_channel("adm", "c1")
    assert client.channel_stats("adm", "c1")["paused"] is False

    client.mpub("adm", [b"1", b"2", b"3"])
    wait_until(lambda: client.channel_depth("adm", "c1") == 3 and client.channel_depth("adm", "c2") == 3,
               timeout=5, message="messages in both channels")
    client.empty_channel("adm", "c1")
    assert client.channel_depth("adm", "c1") == 0
    assert client.channel_depth("adm", "c2") == 3

    # a paused topic keeps its messages instead of copying them to channels
    client.pause_topic("adm")
    client.mpub("adm", [b"4", b"5"])
    assert client.topic_depth("adm") == 2
    assert client.channel_depth("adm", "c2") == 3
    client.empty_topic("adm")
    assert client.topic_depth("adm") == 0
    client.unpause_topic("adm")

    client.delete_channel("adm", "c1")
    assert client.channel_stats("adm", "c1") is None
    expect_http_error(404, "CHANNEL_NOT_FOUND", client.delete_channel, "adm", "c1")
    expect_http_error(404, "CHANNEL_NOT_FOUND", client.empty_channel, "adm", "c1")
    expect_http_error(404, "CHANNEL_NOT_FOUND", client.pause_channel, "adm", "c1")

    client.delete_topic("adm")
    assert client.topic_stats("adm") is None
    assert client.topic_depth("adm") == 0
    expect_http_error(404, "TOPIC_NOT_FOUND", client.delete_topic, "adm")
    expect_http_error(404, "TOPIC_NOT_FOUND", client.empty_topic, "adm")
    expect_http_error(404, "TOPIC_NOT_FOUND", client.pause_topic, "adm")
    expect_http_error(404, "TOPIC_NOT_FOUND", client.unpause_topic, "adm")
    expect_http_error(404, "TOPIC_NOT_FOUND", client.create_channel, "adm", "c1")


def test_ephemeral_names(nsqd):
    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("eph#ephemeral")
    client.create_channel("eph#ephemeral", "ch#ephemeral")
    assert client.channel_stats("eph#ephemeral", "ch#ephemeral") is not None
    client.pub("eph#ephemeral", b"x")
    wait_until(lambda: client.channel_depth("eph#ephemeral", "ch#ephemeral") == 1, timeout=5, message="depth 1")


# ---------------------------------------------------------------- nsqlookupd


def test_lookupd_sees_nsqd_topics(nsq_cluster):
    lookupd = LookupdClient(nsq_cluster.lookupd.http_address)
    first, second = nsq_cluster.nsqds
    nsqd_client = NsqdHTTPClient(first.http_address)

    nsqd_client.create_topic("lk")
    wait_until(lambda: "lk" in lookupd.topics(), timeout=10, message="topic registered with lookupd")
    result = lookupd.lookup("lk")
    assert [p["tcp_port"] for p in result["producers"]] == [first.tcp_port]
    assert result["producers"][0]["http_port"] == first.http_port
    assert result["producers"][0]["version"] == "1.3.0"
    assert result["channels"] == []
    assert lookupd.producers("lk") == [("127.0.0.1", first.tcp_port)]

    nsqd_client.create_channel("lk", "lkch")
    wait_until(lambda: lookupd.channels("lk") == ["lkch"], timeout=10, message="channel registered")
    assert lookupd.lookup("lk")["channels"] == ["lkch"]

    # the second nsqd joins the topic
    NsqdHTTPClient(second.http_address).pub("lk", b"x")
    wait_until(lambda: len(lookupd.producers("lk")) == 2, timeout=10, message="two producers")
    assert sorted(port for _, port in lookupd.producers("lk")) == sorted([first.tcp_port, second.tcp_port])

    nodes = {n["tcp_port"]: n for n in lookupd.nodes()}
    assert set(nodes) == {first.tcp_port, second.tcp_port}
    assert nodes[first.tcp_port]["topics"] == ["lk"]
    assert nodes[first.tcp_port]["tombstones"] == [False]
    assert nodes[first.tcp_port]["broadcast_address"] == "127.0.0.1"

    # tombstone the first nsqd's producer: hidden from lookups, flagged in /nodes
    lookupd.tombstone_topic("lk", f"127.0.0.1:{first.http_port}")
    assert lookupd.producers("lk") == [("127.0.0.1", second.tcp_port)]
    nodes = {n["tcp_port"]: n for n in lookupd.nodes()}
    assert nodes[first.tcp_port]["tombstones"] == [True]
    assert nodes[second.tcp_port]["tombstones"] == [False]
    # a node that matches nothing is silently ignored
    lookupd.tombstone_topic("lk", "127.0.0.1:1")
    assert lookupd.producers("lk") == [("127.0.0.1", second.tcp_port)]

    # deleting the channel and topic from the lookupd
    lookupd.delete_channel("lk", "lkch")
    assert lookupd.channels("lk") == []
    expect_http_error(404, "CHANNEL_NOT_FOUND", lookupd.delete_channel, "lk", "lkch")
    lookupd.delete_topic("lk")
    assert "lk" not in lookupd.topics()
    expect_http_error(404, "TOPIC_NOT_FOUND", lookupd.lookup, "lk")
    assert lookupd.producers("lk") == []


@pytest.mark.parametrize("spelling", ["[::1]:{port}", "::1:{port}"])
def test_lookupd_tombstones_an_nsqd_with_an_ipv6_broadcast_address(nsqlookupd, spelling):
    # nsqlookupd matches node against broadcast_address + ":" + http_port, never bracketed:
    # "[::1]:PORT" was sent as is and matched nothing, "::1:PORT" was refused
    lookupd = LookupdClient(nsqlookupd.http_address)
    with started(NsqdProcess([nsqlookupd.tcp_address], extra_args=["--broadcast-address=::1"])) as v6, \
            started(NsqdProcess([nsqlookupd.tcp_address])) as v4:
        for proc in (v6, v4):
            NsqdHTTPClient(proc.http_address).create_topic("v6")
        wait_until(lambda: len(lookupd.producers("v6")) == 2, timeout=10, message="both nsqd registered")
        assert ("::1", v6.tcp_port) in lookupd.producers("v6")

        lookupd.tombstone_topic("v6", spelling.format(port=v6.http_port))
        assert lookupd.producers("v6") == [("127.0.0.1", v4.tcp_port)]
        nodes = {n["tcp_port"]: n for n in lookupd.nodes()}
        assert (nodes[v6.tcp_port]["broadcast_address"], nodes[v6.tcp_port]["tombstones"]) == ("::1", [True])
        assert nodes[v4.tcp_port]["tombstones"] == [False]
        # each node's nsqd HTTP address, as NsqdHTTPClient and tombstone_topic take it
        assert nsqd_http_address(nodes[v6.tcp_port]) == f"[::1]:{v6.http_port}"
        assert NsqdHTTPClient(nsqd_http_address(nodes[v6.tcp_port])).address == f"[::1]:{v6.http_port}"
        assert NsqdHTTPClient(nsqd_http_address(nodes[v4.tcp_port])).ping()
        lookupd.tombstone_topic("v6", nsqd_http_address(nodes[v4.tcp_port]))
        assert lookupd.producers("v6") == []


def test_lookupd_admin_without_producers(nsqlookupd):
    lookupd = LookupdClient(nsqlookupd.http_address)
    lookupd.create_topic("manual")
    assert lookupd.topics() == ["manual"]
    # registered but nobody produces it: not a 404
    assert lookupd.lookup("manual") == {"channels": [], "producers": []}
    assert lookupd.producers("manual") == []

    lookupd.create_channel("manual", "mc")
    lookupd.create_channel("other", "oc")  # also registers the topic
    assert lookupd.channels("manual") == ["mc"]
    assert sorted(lookupd.topics()) == ["manual", "other"]
    lookupd.delete_channel("manual", "mc")
    assert lookupd.channels("manual") == []

    lookupd.delete_topic("manual")
    lookupd.delete_topic("never-existed")  # nsqlookupd accepts deleting an unknown topic
    assert lookupd.topics() == ["other"]
    assert lookupd.channels("never-existed") == []


def test_lookupd_unknown_topic(nsqlookupd):
    lookupd = LookupdClient(nsqlookupd.http_address)
    err = expect_http_error(404, "TOPIC_NOT_FOUND", lookupd.lookup, "unknown")
    assert err.url == f"http://{nsqlookupd.http_address}/lookup?topic=unknown"
    assert lookupd.producers("unknown") == []


# ---------------------------------------------------------------- unreachable servers


def test_connection_refused_after_stop(nsqd, nsqlookupd):
    nsqd_client = NsqdHTTPClient(nsqd.http_address, timeout=2)
    lookupd_client = LookupdClient(nsqlookupd.http_address, timeout=2)
    assert nsqd_client.ping() and lookupd_client.ping()
    nsqd.stop()
    nsqlookupd.stop()
    for call in (nsqd_client.ping, nsqd_client.stats, lambda: nsqd_client.pub("t", b"x"),
                 lookupd_client.ping, lookupd_client.topics, lambda: lookupd_client.producers("t")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 0
        assert "refused" in info.value.message
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert info.value.timed_out is False


def test_a_hung_nsqd_is_told_from_a_down_one(nsqd):
    # both were HTTPError status 0; only the message text differed
    import os
    import signal

    client = NsqdHTTPClient(nsqd.http_address, timeout=0.5)
    assert client.ping()
    os.kill(nsqd.pid, signal.SIGSTOP)  # hung: the kernel accepts the connection, nothing answers
    try:
        with pytest.raises(HTTPError) as info:
            client.stats()
    finally:
        os.kill(nsqd.pid, signal.SIGCONT)
    assert (info.value.status, info.value.timed_out) == (0, True)
    assert client.ping()
    nsqd.stop()  # down
    with pytest.raises(HTTPError) as info:
        client.stats()
    assert (info.value.status, info.value.timed_out) == (0, False)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize("which", ["nsqd", "nsqlookupd"])
def test_an_http_client_given_a_tcp_port_says_it_may_not_be_an_http_port(which, nsqd, nsqlookupd):
    # The TCP ports close an HTTP request unanswered (its first bytes are a bad protocol
    # magic to them): "connection reset by peer" alone did not say the address was wrong.
    address = (nsqd if which == "nsqd" else nsqlookupd).tcp_address
    for client in (LookupdClient(address, timeout=5), NsqdHTTPClient(address, timeout=5)):
        with pytest.raises(HTTPError) as info:
            client.ping()
        assert info.value.status == 0
        assert "is this an HTTP port?" in info.value.message, info.value.message


def test_a_client_given_the_other_daemons_http_port_says_so(nsqd, nsqlookupd):
    # LookupdClient at nsqd's HTTP port (or NsqdHTTPClient at nsqlookupd's) said only "HTTP 404: NOT_FOUND"
    lookupd_at_nsqd = LookupdClient(nsqd.http_address)
    nsqd_at_lookupd = NsqdHTTPClient(nsqlookupd.http_address)
    for call in (lookupd_at_nsqd.topics, lambda: lookupd_at_nsqd.producers("t"), lookupd_at_nsqd.nodes):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 404
        assert info.value.message.startswith("NOT_FOUND (is this nsqd's HTTP port?"), info.value.message
    for call in (nsqd_at_lookupd.stats, lambda: nsqd_at_lookupd.topic_stats("t"), lambda: nsqd_at_lookupd.pub("t", b"x")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 404
        assert info.value.message.startswith("NOT_FOUND (is this nsqlookupd's HTTP port?"), info.value.message


def test_nsqd_client_at_nsqlookupds_port_creates_and_deletes_nothing(nsqd, nsqlookupd):
    """Both daemons serve /topic/create, /topic/delete, /channel/create and /channel/delete.
    An NsqdHTTPClient given nsqlookupd's port created the topic in nsqlookupd's registry (where
    Readers then look it up and find no nsqd) and said nothing; now it asks /info first."""
    nsqd_at_lookupd = NsqdHTTPClient(nsqlookupd.http_address)
    lookupd = LookupdClient(nsqlookupd.http_address)
    for call in (lambda: nsqd_at_lookupd.create_topic("t"), lambda: nsqd_at_lookupd.create_channel("t", "c"),
                 lambda: nsqd_at_lookupd.delete_topic("t"), lambda: nsqd_at_lookupd.delete_channel("t", "c")):
        with pytest.raises(HTTPError) as info:
            call()
        assert info.value.status == 200
        assert "(is this nsqlookupd's HTTP port?" in info.value.message, info.value.message
    assert lookupd.topics() == []
    # the real nsqd passes the check, once
    client = NsqdHTTPClient(nsqd.http_address)
    client.create_topic("t")
    client.create_channel("t", "c")
    assert client.topic_stats("t")["channels"][0]["channel_name"] == "c"

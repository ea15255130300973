"""TLS, snappy and deflate against a real nsqd v1.3.0, and the duplex stress test under TLS.

The stress test is the proof for the TLS-across-threads hazard (ARCHITECTURE.md):
one connection's reader receives large messages while 16 threads publish on the
same connection and workers FIN, all through one OpenSSL object. Every test
passes ``backend=backend``; with NSQ_SYNC_BACKEND=gevent the same tests run on
greenlets in a monkey-patched process.
"""

from __future__ import annotations

import collections
import json
import queue
import random
import shutil
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

import nsq_sync
from nsq_sync.protocol import commands
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import NsqdProcess, TLSFiles, wait_until

from conn_helpers import Events  # noqa: E402  (tests/support, on sys.path via conftest)
from tcp_proxy import TcpProxy  # noqa: E402

TIMEOUT = 10.0
MAX_MSG_SIZE = 1024 * 1024  # nsqd's default --max-msg-size
COMPRESSION: Dict[str, Dict[str, bool]] = {"none": {}, "snappy": {"snappy": True}, "deflate": {"deflate": True}}


# --------------------------------------------------------------------------
# helpers


def tls_kwargs(tls_files: TLSFiles, **extra: Any) -> Dict[str, Any]:
    options: Dict[str, Any] = {"ca_certs": tls_files.ca_cert}
    options.update(extra)
    return {"tls_v1": True, "tls_options": options}


def publish(conn: nsq_sync.AsyncConn, topic: str, body: bytes) -> None:
    assert conn.request(commands.pub(topic, body)).result(5) == b"OK"


def round_trip(
    make_conn: Callable[..., nsq_sync.AsyncConn],
    nsqd: NsqdProcess,
    topic: str,
    body: bytes,
    stats: Callable[[str, str], Any] = None,  # type: ignore[assignment]
    **kwargs: Any,
) -> None:
    """Publish *body* and consume it back over one connection made with *kwargs*."""
    conn = make_conn(nsqd.tcp_address, **kwargs)
    inbox: "queue.Queue[nsq_sync.Message]" = queue.Queue()
    conn.on("message", lambda conn, message: inbox.put(message))
    conn.subscribe(topic, "ch")
    conn.send_rdy(1)
    publish(conn, topic, body)
    message = inbox.get(timeout=TIMEOUT)
    assert message.body == body
    message.finish()
    stats = wait_channel(nsqd, topic, "ch", in_flight_count=0, depth=0, stats=stats)
    assert stats["clients"][0]["tls"] is bool(kwargs.get("tls_v1"))


def wait_channel(
    nsqd: NsqdProcess, topic: str, channel: str, stats: Callable[[str, str], Any] = None, **expected: int  # type: ignore[assignment]
) -> Dict[str, Any]:
    """Poll /stats (or *stats*) until every given channel counter has the expected value; return the stats."""
    last: Dict[str, Any] = {}
    channel_stats = stats or nsqd.channel_stats

    def check() -> bool:
        nonlocal last
        last = channel_stats(topic, channel) or {}
        return all(last.get(key) == value for key, value in expected.items())

    try:
        wait_until(check, timeout=TIMEOUT, message=f"channel {topic}/{channel} to reach {expected}")
    except TimeoutError:
        raise AssertionError(f"channel {topic}/{channel} never reached {expected}; last stats: {last}") from None
    return last


def https_channel_stats(nsqd: NsqdProcess, tls_files: TLSFiles) -> Callable[[str, str], Any]:
    """Channel stats over nsqd's HTTPS port with the client certificate.

    ``--tls-client-auth-policy`` makes nsqd require TLS on HTTP too (it implies
    ``--tls-required``), and the harness's HTTPS fallback has no client certificate.
    """
    context = ssl.create_default_context(cafile=tls_files.ca_cert)
    context.load_cert_chain(tls_files.client_cert, tls_files.client_key)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))

    def channel_stats(topic: str, channel: str) -> Any:
        query = urllib.parse.urlencode({"format": "json", "topic": topic, "channel": channel})
        with opener.open(f"https://{nsqd.https_address}/stats?{query}", timeout=5) as response:
            data = json.loads(response.read())
        for entry in data.get("topics") or []:
            for chan in entry.get("channels") or []:
                if entry["topic_name"] == topic and chan["channel_name"] == channel:
                    return chan
        return None

    return channel_stats


def make_other_name_cert(directory: Path) -> Tuple[str, str, str]:
    """A CA and a server certificate valid ONLY for DNS:nsq-other.invalid (no IP, no localhost).

    Returns (ca_cert, server_cert, server_key).
    """
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command-line tool is needed for the test certificates"
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        proc = subprocess.run([openssl, *args], cwd=directory, stdin=subprocess.DEVNULL, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "30",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=nsq_sync other-name CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=DNS:nsq-other.invalid\n"
    )
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=nsq-other.invalid")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7",
        "-days", "30", "-sha256", "-extfile", "server.ext", "-out", "server.pem",
    )  # fmt: skip
    return str(directory / "ca.pem"), str(directory / "server.pem"), str(directory / "server.key")


# --------------------------------------------------------------------------
# the feature matrix


@pytest.mark.parametrize("compression", sorted(COMPRESSION))
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_feature_matrix_round_trips_bodies(
    tls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn], tls: bool, compression: str
) -> None:
    kwargs: Dict[str, Any] = dict(COMPRESSION[compression])
    if tls:
        kwargs.update(tls_kwargs(tls_files))
    topic, channel = f"matrix_{compression}_{int(tls)}", "ch"

    consumer = make_conn(tls_nsqd.tcp_address, **kwargs)
    events = Events(consumer, "error", "close")
    response = consumer.identify_response
    assert response is not None
    assert response["tls_v1"] is tls
    assert response["snappy"] is (compression == "snappy")
    assert response["deflate"] is (compression == "deflate")
    if compression == "deflate":
        assert response["deflate_level"] == 6
    publisher = make_conn(tls_nsqd.tcp_address, **kwargs)

    rng = random.Random(f"{compression}-{tls}")
    bodies = [b"%03d:" % 0 + rng.randbytes(MAX_MSG_SIZE - 64 - 4)]
    assert len(bodies[0]) == MAX_MSG_SIZE - 64
    for index in range(1, 50):
        size = rng.choice([1, 2, 17, 255, 4096, 16383, 16384, 65536, rng.randrange(1, 200_000)])
        bodies.append(b"%03d:" % index + rng.randbytes(size))
    assert len(set(bodies)) == 50

    received: "queue.Queue[nsq_sync.Message]" = queue.Queue()
    consumer.on("message", lambda conn, message: received.put(message))
    consumer.subscribe(topic, channel)
    consumer.send_rdy(50)
    futures = [publisher.request(commands.pub(topic, body)) for body in bodies]
    assert [future.result(TIMEOUT) for future in futures] == [b"OK"] * 50

    messages = [received.get(timeout=TIMEOUT) for _ in bodies]
    for message in messages:
        message.finish()
    assert sorted(m.body for m in messages) == sorted(bodies), "bodies must round-trip byte for byte"
    assert all(m.attempts == 1 for m in messages)
    stats = wait_channel(tls_nsqd, topic, channel, in_flight_count=0, depth=0, message_count=50)
    assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0
    (client,) = stats["clients"]
    assert client["tls"] is tls
    assert client["snappy"] is (compression == "snappy")
    assert client["deflate"] is (compression == "deflate")
    assert events.count("error") == 0 and events.count("close") == 0


def test_snappy_and_deflate_together_is_a_config_error(backend: str) -> None:
    with pytest.raises(nsq_sync.ConfigError) as info:
        nsq_sync.AsyncConn("127.0.0.1", 4150, snappy=True, deflate=True, backend=backend)
    assert "snappy" in str(info.value) and "deflate" in str(info.value)


def test_tls_asked_of_a_server_without_tls(nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(nsqd.tcp_address, connect=False, tls_v1=True, tls_options={"cert_reqs": ssl.CERT_NONE})
    events = Events(conn, "error", "close")
    with pytest.raises(nsq_sync.TLSError) as info:
        conn.connect()
    assert "no TLS" in str(info.value)
    assert events.names() == ["error", "close"]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls_v1"])
def test_nsqds_https_port_is_a_protocol_error_naming_it(tls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn],
                                                        tls: bool) -> None:
    # nsqd's HTTPS port (--https-address) closes without a word on NSQ's magic and IDENTIFY
    # (a TLS record header that makes no sense to it): a ConnectionClosedError, which said
    # nothing of the cause and, being a close that may pass, kept a Writer waiting out its
    # publish_timeout (test_writer_refused_real.py). The port is now asked whether it speaks TLS.
    kwargs = tls_kwargs(tls_files) if tls else {}
    conn = make_conn(tls_nsqd.https_address, connect=False, **kwargs)
    events = Events(conn, "ready", "error", "close")
    with pytest.raises(nsq_sync.ProtocolError) as info:
        conn.connect()
    message = str(info.value)
    assert tls_nsqd.https_address in message and "is this nsqd's HTTPS port instead of its TCP port?" in message, message
    assert events.names() == ["error", "close"] and conn.closed()
    # Control: its TCP port, with the same settings, is nsqd's protocol.
    round_trip(make_conn, tls_nsqd, "https_control", b"x", **kwargs)


def test_a_reader_on_nsqds_https_port_says_so(tls_nsqd: NsqdProcess, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    reader = nsq_sync.Reader("https_topic", "c", lambda message: True, nsqd_tcp_addresses=[tls_nsqd.https_address], backend=backend)
    try:
        with caplog.at_level("WARNING", logger="nsq_sync.reader"):
            reader.start()
            wait_until(lambda: any("HTTPS port" in r.getMessage() for r in caplog.records), timeout=TIMEOUT, message="the Reader's warning")
        warning = next(r.getMessage() for r in caplog.records if "HTTPS port" in r.getMessage())
        assert f"cannot consume from {tls_nsqd.https_address}" in warning, warning
        assert "is this nsqd's HTTPS port instead of its TCP port?" in warning, warning
        assert reader.stats()["connections"][0]["connected"] is False
    finally:
        reader.close(2)


# --------------------------------------------------------------------------
# certificate verification


def test_self_signed_cert_refused_with_system_store(tls_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(tls_nsqd.tcp_address, connect=False, tls_v1=True)
    events = Events(conn, "ready", "error", "close")
    began = time.monotonic()
    with pytest.raises(nsq_sync.TLSError) as info:
        conn.connect()
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert "certificate" in message and "not accepted" in message, message
    assert tls_nsqd.tcp_address in message
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert events.names() == ["error", "close"]
    assert conn.closed()


def test_wrong_hostname_is_refused(tmp_path: Path, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    ca_cert, server_cert, server_key = make_other_name_cert(tmp_path / "other")
    with started(NsqdProcess(tls_cert=server_cert, tls_key=server_key)) as other:
        # Trusted CA, but the certificate is for nsq-other.invalid and we dial 127.0.0.1.
        conn = make_conn(other.tcp_address, connect=False, tls_v1=True, tls_options={"ca_certs": ca_cert})
        with pytest.raises(nsq_sync.TLSError) as info:
            conn.connect()
        message = str(info.value)
        assert "not accepted" in message and "127.0.0.1" in message, message
        assert "mismatch" in message.lower() or "hostname" in message.lower(), message
        # Control: the same trust with host name checking off connects, so it was the name.
        round_trip(make_conn, other, "other_name", b"x", tls_v1=True, tls_options={"ca_certs": ca_cert, "check_hostname": False})


def test_cert_none_skips_verification(tls_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    round_trip(make_conn, tls_nsqd, "cert_none", b"unverified", tls_v1=True, tls_options={"cert_reqs": ssl.CERT_NONE})


def test_ssl_context_as_tls_options(tls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    context = ssl.create_default_context(cafile=tls_files.ca_cert)
    round_trip(make_conn, tls_nsqd, "ssl_context", b"context", tls_v1=True, tls_options=context)


# --------------------------------------------------------------------------
# server policies


@pytest.fixture
def mtls_nsqd(tls_files: TLSFiles) -> Iterator[NsqdProcess]:
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        tls_root_ca=tls_files.ca_cert,
        extra_args=["--tls-client-auth-policy=require-verify"],
    )
    with started(proc):
        yield proc


def test_mutual_tls_without_client_cert_fails(mtls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    conn = make_conn(mtls_nsqd.tcp_address, connect=False, **tls_kwargs(tls_files))
    events = Events(conn, "ready", "error", "close")
    began = time.monotonic()
    with pytest.raises(nsq_sync.Error) as info:
        conn.connect()
    assert time.monotonic() - began < 5
    # With TLS 1.3 the client's handshake completes and nsqd's refusal arrives as an alert on
    # the first read (the upgrade's OK); nsq_sync reports it as a TLSError either way.
    assert isinstance(info.value, nsq_sync.TLSError), repr(info.value)
    assert "certificate" in str(info.value).lower(), str(info.value)
    assert events.names() == ["error", "close"]


def test_mutual_tls_with_client_cert(mtls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    kwargs = tls_kwargs(tls_files, certfile=tls_files.client_cert, keyfile=tls_files.client_key)
    round_trip(make_conn, mtls_nsqd, "mtls", b"mutual", stats=https_channel_stats(mtls_nsqd, tls_files), **kwargs)


def test_mutual_tls_policy_implies_tls_required(mtls_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    # nsqd v1.3.0 turns --tls-client-auth-policy into --tls-required: a plain client is refused.
    conn = make_conn(mtls_nsqd.tcp_address)
    with pytest.raises(nsq_sync.InvalidError) as info:
        conn.request(commands.pub("plain", b"x")).result(5)
    assert "TLS required" in info.value.text
    assert conn.wait_closed(TIMEOUT)


@pytest.fixture
def tls_required_nsqd(tls_files: TLSFiles) -> Iterator[NsqdProcess]:
    proc = NsqdProcess(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key, extra_args=["--tls-required=true"])
    with started(proc):
        yield proc


@pytest.mark.parametrize("command", ["PUB", "SUB"])
def test_tls_required_refuses_plain_client(
    tls_required_nsqd: NsqdProcess, make_conn: Callable[..., nsq_sync.AsyncConn], command: str
) -> None:
    conn = make_conn(tls_required_nsqd.tcp_address)  # IDENTIFY itself is allowed without TLS
    events = Events(conn, "error", "close")
    assert conn.identify_response is not None and conn.identify_response["tls_v1"] is False
    with pytest.raises(nsq_sync.InvalidError) as info:
        if command == "PUB":
            conn.request(commands.pub("needs_tls", b"x")).result(5)
        else:
            conn.subscribe("needs_tls", "ch")
    assert info.value.code == "E_INVALID" and info.value.fatal
    assert "TLS required" in info.value.text and command in info.value.text
    assert conn.wait_closed(TIMEOUT)
    assert events.count("close") == 1


def test_tls_required_accepts_tls_client(tls_required_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn]) -> None:
    round_trip(make_conn, tls_required_nsqd, "needs_tls", b"secure", **tls_kwargs(tls_files))


# --------------------------------------------------------------------------
# a caller's deadline inside a TLS record


@pytest.mark.parametrize("compression", ["none", "deflate"])
def test_caller_deadline_holds_while_a_tls_record_arrives_in_part(
    tls_nsqd: NsqdProcess, tls_files: TLSFiles, make_conn: Callable[..., nsq_sync.AsyncConn], compression: str
) -> None:
    """A publish's timeout ends its wait even when only the start of a TLS record came.

    The proxy lets 3 bytes of nsqd's answer through and holds the rest. OpenSSL keeps the
    partial record, so the wait for its rest used to last the staleness limit (60 s here),
    whatever the caller's timeout. Once the proxy lets go, both answers arrive in order.
    """
    host, port = tls_nsqd.tcp_address.rsplit(":", 1)
    with TcpProxy((host, int(port))) as proxy:
        conn = make_conn(proxy.address, heartbeat_interval=30, **tls_kwargs(tls_files), **COMPRESSION[compression])
        topic = f"tls_partial_{compression}"
        assert conn.request_wait(commands.pub(topic, b"one"), TIMEOUT) == b"OK"
        link = proxy.wait_links(1)[0]
        before = link.down.forwarded
        proxy.stall_after(3, "down", link=link)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.request_wait(commands.pub(topic, b"two"), 0.3)
        waited = time.monotonic() - began
        assert waited < 5, f"the 0.3 s timeout took {waited:.1f}s"
        proxy.wait_forwarded(link, "down", before + 3)  # the wait began inside a record
        proxy.resume()
        assert conn.request_wait(commands.pub(topic, b"three"), TIMEOUT) == b"OK"
        assert conn.connected() and conn.pending_requests == 0
        wait_until(lambda: (tls_nsqd.topic_stats(topic) or {}).get("message_count") == 3, timeout=TIMEOUT, message="3 messages in the topic")


# --------------------------------------------------------------------------
# duplex stress: one TLS connection, reading and writing from many threads at once


@pytest.mark.parametrize("compression", ["none", "snappy", "deflate"])
def test_duplex_stress_under_tls(
    tls_nsqd: NsqdProcess, tls_files: TLSFiles, backend: str, make_conn: Callable[..., nsq_sync.AsyncConn], compression: str
) -> None:
    topic, channel = f"stress_{compression}", "ch"
    backlog, publishers, per_publisher = 300, 16, 200
    total = backlog + publishers * per_publisher
    rng = random.Random(compression)

    # 300 messages of 64 KiB waiting before we subscribe (HTTP /mpub, 50 at a time < 5 MiB bodies).
    tls_nsqd.create_channel(topic, channel)
    pre = [b"pre:%05d:" % i + rng.randbytes(64 * 1024 - 10) for i in range(backlog)]
    for start in range(0, backlog, 50):
        tls_nsqd.mpublish(topic, pre[start : start + 50])
    wait_channel(tls_nsqd, topic, channel, depth=backlog)
    expected = {body[:10] for body in pre}

    pool = nsq_sync.WorkerPool(8, backend=backend, name=f"stress-{compression}")
    try:
        conn = make_conn(tls_nsqd.tcp_address, worker_pool=pool, **tls_kwargs(tls_files), **COMPRESSION[compression])
        events = Events(conn, "error", "close")
        lock = threading.Lock()
        seen: "collections.Counter[bytes]" = collections.Counter()
        problems: List[str] = []
        done = threading.Event()

        def handler(conn: nsq_sync.AsyncConn, message: nsq_sync.Message) -> None:
            key = message.body[:10] if message.body.startswith(b"pre:") else message.body[:11]
            try:
                if message.attempts != 1:
                    problems.append(f"{key!r} delivered with attempts={message.attempts}")
                message.finish()
            except Exception as exc:
                problems.append(f"finish of {key!r} raised {exc!r}")
            with lock:
                seen[key] += 1
                if sum(seen.values()) >= total:
                    done.set()

        conn.on("message", handler)
        conn.subscribe(topic, channel)
        conn.send_rdy(200)

        def publisher(index: int) -> None:
            local = random.Random(f"{compression}-{index}")
            try:
                for n in range(per_publisher):
                    body = b"pub:%02d:%03d:" % (index, n) + local.randbytes(local.randrange(1, 8192))
                    answer = conn.request(commands.pub(topic, body)).result(30)
                    if answer != b"OK":
                        problems.append(f"publisher {index} message {n} got {answer!r}")
            except BaseException as exc:
                problems.append(f"publisher {index} raised {exc!r}")

        threads = [threading.Thread(target=publisher, args=(i,), name=f"publisher-{i}") for i in range(publishers)]
        for thread in threads:
            thread.start()
        # One deadline for everything; stop early if the connection broke (error/close event).
        deadline = time.monotonic() + 40
        broken = lambda: events.count("error") or events.count("close")  # noqa: E731
        while time.monotonic() < deadline and not broken():
            if done.wait(0.1) and not any(thread.is_alive() for thread in threads):
                break
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        diagnosis = f"received {sum(seen.values())} of {total}; problems: {problems[:5]}; events: {events.log[:5]}"
        assert not any(thread.is_alive() for thread in threads), "publishers did not finish in time; " + diagnosis
        assert done.is_set(), diagnosis

        expected |= {b"pub:%02d:%03d:" % (i, n) for i in range(publishers) for n in range(per_publisher)}
        assert problems == []
        assert set(seen) == expected
        assert [key for key, count in seen.items() if count != 1] == [], "each message exactly once"
        stats = wait_channel(tls_nsqd, topic, channel, in_flight_count=0, depth=0, message_count=total)
        assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0
        assert conn.in_flight == 0
        assert conn.connected()
        assert events.count("error") == 0 and events.count("close") == 0, events.log
        conn.close(timeout=5)
        assert conn.wait_closed(5)
        assert [kwargs["error"] for kwargs in events.of("error")] == []
    finally:
        pool.close(wait=True, timeout=5)

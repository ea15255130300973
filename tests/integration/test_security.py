"""Security (issue #6): AUTH allowed / denied / unauthorized / EXPIRED at the Writer and Reader
level, no credential or message body in logs, reprs or error messages, and what
tests/integration/test_tls_real.py (AsyncConn-level TLS: verification, host name, mTLS,
tls-required) does not cover: TLS end to end through Writer/Reader, the secret and bodies
never crossing the wire in clear text under TLS, and a server that answers IDENTIFY without
TLS (a downgrade) never getting the secret.

Real nsqd v1.3.0 and the test AuthServer of nsq_sync.testing; the downgrade uses the scripted
fake nsqd (tests/functional/fake_nsqd.py). Every client gets ``backend=backend``.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from nsq_sync import AsyncConn, LookupdClient, Message, NsqdHTTPClient, Reader, Writer
from nsq_sync.backoff import ExponentialBackoff
from nsq_sync.errors import (
    AuthFailedError,
    ConfigError,
    Error,
    HTTPError,
    NoConnectionsError,
    TLSError,
    UnauthorizedError,
)
from nsq_sync.protocol import commands
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import AuthServer, NsqdProcess, TLSFiles, wait_until

_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "support"))
sys.path.insert(0, str(_TESTS / "functional"))
from fake_nsqd import FakeNsqd  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402
from tasks import live_tasks, split  # noqa: E402

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

TOPIC = "sec_topic"
CHANNEL = "ch"
FAST_BACKOFF = ExponentialBackoff(multiplier=0.01, max_duration=0.1)


# =========================================================================== helpers
def report(name: str, **values: Any) -> None:
    shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\n[security] {name}: {shown}")


class Clients:
    """Readers/Writers on the backend under test, all closed after the test."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.made: List[Any] = []

    def reader(self, handler: Callable[[Message], Any], topic: str = TOPIC, **kwargs: Any) -> Reader:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("backoff_strategy", FAST_BACKOFF)
        kwargs.setdefault("max_backoff_duration", 0.1)
        kwargs.setdefault("requeue_delay", 0)
        reader = Reader(topic, CHANNEL, handler, **kwargs)
        reader.reconnect_base = 0.1
        reader.reconnect_cap = 0.5
        self.made.append(reader)
        return reader

    def writer(self, addresses: Any, **kwargs: Any) -> Writer:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("reconnect_interval", 0.1)
        kwargs.setdefault("max_reconnect_interval", 0.5)
        writer = Writer(addresses, **kwargs)
        self.made.append(writer)
        return writer

    def close(self) -> None:
        for client in self.made:
            client.close(5)
            if isinstance(client, Reader):
                assert client.join(10)


@pytest.fixture
def clients(backend: str) -> Iterator[Clients]:
    before = set(live_tasks())
    made = Clients(backend)
    try:
        yield made
    finally:
        made.close()
    deadline = time.monotonic() + 5
    while True:
        leaked = sorted(set(live_tasks()) - before)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling the task list only
    assert not leaked, f"tasks still running after close: {leaked}"


class Inbox:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.bodies: collections.Counter = collections.Counter()

    def handler(self, message: Message) -> bool:
        with self.cond:
            self.bodies[message.body] += 1
            self.cond.notify_all()
        return True

    def wait(self, wanted: Any, timeout: float = 15.0) -> None:
        wanted = set(wanted)
        with self.cond:
            assert self.cond.wait_for(lambda: wanted <= set(self.bodies), timeout), f"missing {sorted(wanted - set(self.bodies))[:5]}"


def library_records(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    """nsq_sync's own records; the stand-in auth server (nsq_sync.testing) logs its request
    line with the secret in the query string: that is the remote service, not the client."""
    return [r for r in caplog.records if r.name.startswith("nsq_sync") and not r.name.startswith("nsq_sync.testing")]


def record_texts(record: logging.LogRecord) -> List[str]:
    texts = [record.getMessage()]
    if record.exc_info:
        texts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        texts.append(record.exc_text)
    if record.stack_info:
        texts.append(record.stack_info)
    return texts


def auth_calls(server: AuthServer, secret: str) -> int:
    return sum(1 for s in list(server.requests) if s == secret)


# =========================================================================== AUTH at the Writer/Reader level
def test_auth_allowed_writer_and_reader_round_trip(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients) -> None:
    auth_server.set_secret("allowed-secret-1d3f")
    inbox = Inbox()
    reader = clients.reader(inbox.handler, nsqd_tcp_addresses=auth_nsqd.tcp_address, auth_secret="allowed-secret-1d3f", max_in_flight=10)
    reader.start()
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret="allowed-secret-1d3f")
    bodies = [b"auth-%d" % i for i in range(100)]
    for body in bodies:
        assert writer.pub(TOPIC, body) == b"OK"
    inbox.wait(bodies)
    conn = list(writer.conns.values())[0]
    assert conn.auth_response is not None and conn.auth_response["permission_count"] == 1


def test_auth_denied_writer_backs_off_and_fails_typed(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients) -> None:
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret="unknown-secret-5b1e", publish_timeout=2)
    began = time.monotonic()
    with pytest.raises(NoConnectionsError) as info:
        writer.pub(TOPIC, b"x")  # (at once: every nsqd refused the secret, HandshakeRefusedError)
    elapsed = time.monotonic() - began
    before = auth_calls(auth_server, "unknown-secret-5b1e")
    window = time.monotonic() + 2.0
    while window - time.monotonic() > 0:
        # (False at each refused attempt, every nsqd having refused one made while it waited,
        # and at the end of the window)
        assert not writer.wait_connected(max(0.0, window - time.monotonic()))
    attempts = auth_calls(auth_server, "unknown-secret-5b1e") - before
    # it keeps trying in the background, with backoff (0.1 s doubling to 0.5 s), not in a tight loop
    assert 2 <= attempts <= 12, attempts
    assert auth_nsqd.topic_stats(TOPIC) is None
    report("AUTH denied (Writer)", error=type(info.value).__name__, auth_attempts_in_2s=attempts, elapsed_s=elapsed)


def test_auth_denied_writer_error_names_the_auth_failure(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients) -> None:
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret="unknown-secret-77aa", publish_timeout=1)
    with pytest.raises(NoConnectionsError) as info:
        writer.pub(TOPIC, b"x")
    cause = info.value.__cause__
    assert "E_AUTH_FAILED" in str(info.value) or isinstance(cause, AuthFailedError), str(info.value)


def test_auth_denied_reader_keeps_retrying_then_recovers_when_allowed(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    secret = "late-secret-4c2e"
    auth_nsqd.create_channel(TOPIC, CHANNEL)
    auth_nsqd.publish(TOPIC, b"waiting")
    inbox = Inbox()
    reader = clients.reader(inbox.handler, nsqd_tcp_addresses=auth_nsqd.tcp_address, auth_secret=secret)
    reader.start()
    wait_until(lambda: auth_calls(auth_server, secret) >= 3, timeout=10, message="three refused AUTH attempts")
    denied = [r.getMessage() for r in library_records(caplog) if "E_AUTH_FAILED" in r.getMessage()]
    assert denied, "the auth failure is not in the Reader's warnings"
    assert reader.conns == {}
    auth_server.set_secret(secret)
    allowed = time.monotonic()
    inbox.wait([b"waiting"])
    report("AUTH denied then allowed (Reader)", refused_attempts=auth_calls(auth_server, secret) - 1, recovered_after_allow_s=time.monotonic() - allowed)


def test_auth_without_permission_for_the_topic(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    auth_server.set_secret("narrow-secret-88e1", topic="^sec_", permissions=("publish",))
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret="narrow-secret-88e1", retries=3)
    assert writer.pub(TOPIC, b"allowed") == b"OK"
    with pytest.raises(UnauthorizedError) as info:
        writer.pub("other_topic", b"refused")  # never re-sent: nsqd rejected it
    assert info.value.code == "E_UNAUTHORIZED" and "other_topic" in info.value.text
    assert writer.pub(TOPIC, b"allowed again") == b"OK"  # reconnected after the fatal error
    assert auth_nsqd.topic_stats("other_topic") is None
    # subscribe is not granted: the Reader is refused at SUB, logs it and keeps trying
    reader = clients.reader(lambda m: True, nsqd_tcp_addresses=auth_nsqd.tcp_address, auth_secret="narrow-secret-88e1")
    reader.start()
    wait_until(lambda: sum("E_UNAUTHORIZED" in r.getMessage() for r in library_records(caplog)) >= 2, timeout=10, message="refused SUBs logged")
    assert reader.conns == {}


# =========================================================================== an EXPIRING secret
def test_expired_secret_writer_gets_a_typed_error_then_recovers(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients) -> None:
    secret = "expiring-secret-21f0"
    auth_server.set_secret(secret, ttl=1)
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret=secret, publish_timeout=2)
    assert writer.pub(TOPIC, b"before") == b"OK"
    granted_at = time.monotonic()
    auth_server.revoke(secret)
    # nsqd caches the authorization for its ttl: still allowed right after the revocation
    assert writer.pub(TOPIC, b"cached") == b"OK"
    remaining = 1.1 - (time.monotonic() - granted_at)
    if remaining > 0:
        time.sleep(remaining)  # the ttl running out is the behaviour under test
    with pytest.raises(AuthFailedError) as info:  # nsqd asks the auth server again: 403
        writer.pub(TOPIC, b"after expiry")
    assert info.value.code == "E_AUTH_FAILED" and info.value.fatal
    with pytest.raises(NoConnectionsError):  # reconnecting fails AUTH too
        writer.pub(TOPIC, b"still expired", timeout=0.5)
    auth_server.set_secret(secret, ttl=60)
    allowed = time.monotonic()
    assert writer.pub(TOPIC, b"renewed", timeout=5) == b"OK"
    recovered = time.monotonic() - allowed
    assert auth_nsqd.topic_depth(TOPIC) == 3
    report("AUTH secret expired (Writer)", first_error=type(info.value).__name__, recovered_after_renewal_s=recovered)


def test_expired_secret_reader_is_refused_on_reconnect_then_recovers(auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nsq_sync")
    secret = "expiring-reader-secret-6a9d"
    auth_server.set_secret(secret, ttl=1)
    auth_nsqd.create_channel(TOPIC, CHANNEL)
    inbox = Inbox()
    with TcpProxy(split(auth_nsqd.tcp_address)) as proxy:
        reader = clients.reader(inbox.handler, nsqd_tcp_addresses=proxy.address, auth_secret=secret, max_in_flight=5)
        reader.start()
        auth_nsqd.publish(TOPIC, b"first")
        inbox.wait([b"first"])
        auth_server.revoke(secret)
        time.sleep(1.1)  # let the ttl run out: the behaviour under test
        # nsqd checks authorization on SUB/PUB only: the existing subscription keeps delivering
        auth_nsqd.publish(TOPIC, b"on the old subscription")
        inbox.wait([b"on the old subscription"])
        proxy.cut()  # reconnecting needs AUTH again: now refused
        wait_until(lambda: sum("E_AUTH_FAILED" in r.getMessage() for r in library_records(caplog)) >= 2, timeout=10, message="refused reconnects logged")
        auth_nsqd.publish(TOPIC, b"while refused")
        assert reader.conns == {}
        auth_server.set_secret(secret)
        renewed = time.monotonic()
        inbox.wait([b"while refused"])
        report("AUTH secret expired (Reader)", recovered_after_renewal_s=time.monotonic() - renewed)


# =========================================================================== nothing secret in logs, reprs, errors
def test_no_secret_and_no_body_in_logs_reprs_or_errors(
    auth_server: AuthServer, auth_nsqd: NsqdProcess, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nsq_sync")
    good, bad, expiring = "GoodSecret-6f2a91e0", "BadSecret-0c7d33aa", "ExpiringSecret-9e81b4c2"
    secrets = [good, bad, expiring]
    auth_server.set_secret(good, topic="^sec_")
    auth_server.set_secret(expiring, topic="^sec_", ttl=1)
    bodies = [b"BODY-%03d-c0ffee-d00d" % i for i in range(40)]
    shown: List[str] = []
    errors: List[BaseException] = []

    def expect_error(call: Callable[[], Any]) -> None:
        try:
            call()
        except Error as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an nsq_sync error")

    inbox = Inbox()
    handled: List[Message] = []

    def handler(message: Message) -> bool:
        handled.append(message)
        inbox.handler(message)
        if message.body.endswith(b"d00d") and int(message.body[5:8]) % 4 == 0:
            raise RuntimeError("handler failed for the test")  # logged with its traceback
        return True

    reader = clients.reader(handler, nsqd_tcp_addresses=auth_nsqd.tcp_address, auth_secret=good, max_in_flight=10, max_tries=1)
    reader.start()
    # max_msg_size=None: let nsqd itself refuse the oversize body (its E_BAD_MESSAGE path is under test)
    writer = clients.writer(auth_nsqd.tcp_address, auth_secret=good, publish_timeout=2, max_msg_size=None)
    for body in bodies:
        assert writer.pub(TOPIC, body) == b"OK"
    inbox.wait(bodies)
    # failures of every kind, all logged somewhere
    expect_error(lambda: writer.pub("other_topic", b"BODY-unauthorized-c0ffee"))  # E_UNAUTHORIZED
    expect_error(lambda: writer.pub(TOPIC, b"BODY-oversize-c0ffee" + b"z" * (1024 * 1024)))  # E_BAD_MESSAGE
    expect_error(lambda: writer.pub("bad topic!", b"BODY-badname-c0ffee"))  # ConfigError
    bad_writer = clients.writer(auth_nsqd.tcp_address, auth_secret=bad, publish_timeout=0.5)
    expect_error(lambda: bad_writer.pub(TOPIC, b"BODY-denied-c0ffee"))
    bad_reader = clients.reader(lambda m: True, nsqd_tcp_addresses=auth_nsqd.tcp_address, auth_secret=bad)
    bad_reader.start()
    exp_writer = clients.writer(auth_nsqd.tcp_address, auth_secret=expiring, publish_timeout=0.5)
    assert exp_writer.pub(TOPIC, b"BODY-expiring-ok-c0ffee") == b"OK"
    auth_server.revoke(expiring)
    time.sleep(1.1)  # the ttl runs out
    expect_error(lambda: exp_writer.pub(TOPIC, b"BODY-expired-c0ffee"))
    expect_error(lambda: exp_writer.pub(TOPIC, b"BODY-expired-again-c0ffee"))
    for bad_kwargs in ({"auth_secret": 12345}, {"auth_secret": ""}, {"tls_options": {"certfile": "/nonexistent.pem", "password": good}}):
        expect_error(lambda: AsyncConn("127.0.0.1", 4150, **bad_kwargs))  # type: ignore[arg-type]
    wait_until(lambda: auth_calls(auth_server, bad) >= 4, timeout=10, message="refused AUTH attempts")

    for client in (writer, bad_writer, exp_writer, reader, bad_reader):
        shown += [repr(client), str(client)]
        for conn in client.conns.values():
            shown += [repr(conn), str(conn)]
    shown += [repr(m) for m in handled] + [str(m) for m in handled]
    for exc in errors:
        shown += [str(exc), repr(exc), repr(exc.args)]
    assert {type(e).__name__ for e in errors} >= {"UnauthorizedError", "BadMessageError", "ConfigError", "NoConnectionsError", "AuthFailedError"}

    records = library_records(caplog)
    assert any(r.levelno >= logging.WARNING for r in records) and any(r.exc_info for r in records)
    for text in shown + [t for r in records for t in record_texts(r)]:
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} shown in: {text[:300]}"
    body_markers = [b.decode() for b in bodies] + ["c0ffee"]
    info_and_up = [t for r in records if r.levelno >= logging.INFO for t in record_texts(r)]
    for text in shown + info_and_up:
        for marker in body_markers:
            assert marker not in text, f"a message body is shown in: {text[:300]}"
    debug_with_body = sum(1 for r in records if r.levelno < logging.INFO and any("c0ffee" in t for t in record_texts(r)))
    report(
        "no secret/body in logs",
        records=len(records),
        warning_and_up=sum(r.levelno >= logging.WARNING for r in records),
        with_traceback=sum(bool(r.exc_info) for r in records),
        errors_checked=len(errors),
        debug_records_with_body=debug_with_body,
    )


def test_reader_does_not_echo_credentials_in_a_lookupd_address() -> None:
    with pytest.raises(ConfigError) as info:
        Reader(TOPIC, CHANNEL, lambda m: True, lookupd_http_addresses="http://admin:hunter2-pw@127.0.0.1:4161")
    assert "hunter2-pw" not in str(info.value) and "hunter2-pw" not in repr(info.value.value)


def test_http_clients_do_not_echo_credentials() -> None:
    for cls in (LookupdClient, NsqdHTTPClient):
        with pytest.raises(ConfigError) as info:
            cls("http://admin:hunter2-pw@127.0.0.1:4161")
        assert "hunter2-pw" not in str(info.value) and "hunter2-pw" not in repr(info.value.value)
        client = cls("127.0.0.1:1", headers={"Authorization": "Bearer token-9c1f77"}, timeout=0.5)
        assert "token-9c1f77" not in repr(client) and "token-9c1f77" not in str(client)
        with pytest.raises(HTTPError) as failed:
            client.ping()  # nothing listens on port 1
        assert failed.value.status == 0 and "token-9c1f77" not in str(failed.value)
        with pytest.raises(ConfigError) as bad_header:
            cls("127.0.0.1:4161", headers={"Authorization": "Bearer token-9c1f77\r\nX-Injected: 1"})
        assert "token-9c1f77" not in str(bad_header.value)


# =========================================================================== TLS: what test_tls_real does not cover
@pytest.fixture
def tls_auth_nsqd(tls_files: TLSFiles, auth_server: AuthServer) -> Iterator[NsqdProcess]:
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        tls_root_ca=tls_files.ca_cert,
        extra_args=[f"--auth-http-address={auth_server.address}"],
    )
    with started(proc):
        yield proc


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-control"])
def test_secret_and_bodies_on_the_wire_only_under_tls(
    tls: bool,
    tls_files: TLSFiles,
    auth_server: AuthServer,
    tls_auth_nsqd: NsqdProcess,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nsq_sync.conn as conn_module

    monkeypatch.setattr(conn_module, "_warned", set())
    caplog.set_level(logging.WARNING, logger="nsq_sync.conn")
    secret = "WireSecret-3e5f0a7c"
    body = b"WIRE-BODY-7d1c9e"
    auth_server.set_secret(secret)
    tls_kwargs: Dict[str, Any] = {"tls_v1": True, "tls_options": {"ca_certs": tls_files.ca_cert}} if tls else {}
    with TcpProxy(split(tls_auth_nsqd.tcp_address), record=True) as proxy:
        inbox = Inbox()
        reader = clients.reader(inbox.handler, nsqd_tcp_addresses=proxy.address, auth_secret=secret, **tls_kwargs)
        reader.start()
        writer = clients.writer(proxy.address, auth_secret=secret, **tls_kwargs)
        assert writer.pub(TOPIC, body) == b"OK"
        inbox.wait([body])
        wire = b"".join(link.sent_up + link.sent_down for link in proxy.links)
    assert len(proxy.links) == 2
    checks = [r.get("tls") for r in auth_server.request_params if r.get("secret") == secret]
    warned = [r.getMessage() for r in caplog.records if "sent in clear text" in r.getMessage()]
    if tls:
        assert secret.encode() not in wire and body not in wire
        assert checks and set(checks) == {"true"}
        assert warned == []
    else:  # the control: the capture does see clear text, and the application was told (once)
        assert secret.encode() in wire and body in wire
        assert checks and set(checks) == {"false"}
        assert len(warned) == 1 and "requires AUTH on a connection without TLS" in warned[0]
        assert secret not in warned[0]
    report(f"wire capture ({'TLS' if tls else 'plain'})", bytes=len(wire), secret_visible=secret.encode() in wire, body_visible=body in wire)


@pytest.mark.parametrize("codec", ["deflate", "snappy"])
def test_handshake_answers_never_reach_response_listeners(
    codec: str, backend: str, tls_files: TLSFiles, auth_server: AuthServer, tls_auth_nsqd: NsqdProcess
) -> None:
    """TLS, compression and AUTH answer during the handshake (the IDENTIFY JSON, an OK per
    upgrade, the AUTH JSON); none is a `response` (pynsq passes them all on)."""
    secret = "HandshakeSecret-61d0"
    auth_server.set_secret(secret)
    host, port = split(tls_auth_nsqd.tcp_address)
    conn = AsyncConn(host, port, backend=backend, tls_v1=True, tls_options={"ca_certs": tls_files.ca_cert}, auth_secret=secret, **{codec: True})
    seen: List[Any] = []
    responded = threading.Event()
    for name in ("response", "identify_response", "auth_response"):
        conn.on(name, lambda name=name, **kw: seen.append((name, kw.get("data"))))
    conn.on("response", lambda **kw: responded.set())  # (listeners run on the worker pool)
    try:
        conn.connect()
        assert conn.identify_response["tls_v1"] is True and conn.identify_response[codec] is True
        assert [name for name, _ in seen] == ["identify_response", "auth_response"]
        assert seen[1][1]["identity"] == conn.auth_response["identity"]
        assert conn.request_wait(commands.pub(TOPIC, b"after the handshake"), timeout=5) == b"OK"
        assert responded.wait(5)
        assert seen[2:] == [("response", b"OK")]  # the first `response` is the first answer after `ready`
    finally:
        conn.close(2)


def test_server_answering_identify_without_tls_never_gets_the_secret(backend: str) -> None:
    """A server (or a man in the middle) that ignores tls_v1 and asks for AUTH in clear text."""
    secret = "DowngradeSecret-a41b"
    with FakeNsqd(identify_response={"tls_v1": False, "auth_required": True}) as fake:
        conn = AsyncConn(fake.host, fake.port, backend=backend, tls_v1=True, auth_secret=secret)
        with pytest.raises(TLSError):
            conn.connect()
        writer = Writer(f"{fake.host}:{fake.port}", backend=backend, tls_v1=True, auth_secret=secret, reconnect_interval=0.05, max_reconnect_interval=0.1)
        try:
            with pytest.raises(NoConnectionsError):
                writer.pub(TOPIC, b"never sent", timeout=0.5)
            fake.wait_connected(count=3)
        finally:
            writer.close(2)
        names = {c.name for c in fake.received}
        raw = b"".join(bytes(s.raw) for s in fake.sessions)
    assert names == {"IDENTIFY"}, names
    assert secret.encode() not in raw
    report("TLS downgrade refused", sessions=len(fake.sessions), commands=sorted(names))


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


def test_writer_and_reader_over_mutual_tls(mtls_nsqd: NsqdProcess, tls_files: TLSFiles, clients: Clients) -> None:
    options = {"ca_certs": tls_files.ca_cert, "certfile": tls_files.client_cert, "keyfile": tls_files.client_key}
    inbox = Inbox()
    reader = clients.reader(inbox.handler, nsqd_tcp_addresses=mtls_nsqd.tcp_address, tls_v1=True, tls_options=options, max_in_flight=10)
    reader.start()
    writer = clients.writer(mtls_nsqd.tcp_address, tls_v1=True, tls_options=options)
    bodies = [b"mtls-%d" % i for i in range(50)]
    assert writer.mpub(TOPIC, bodies[:25]) == b"OK"
    for body in bodies[25:]:
        assert writer.pub(TOPIC, body) == b"OK"
    inbox.wait(bodies)
    # without the client certificate: refused with a TLS error, retried, never connected
    plain = clients.writer(mtls_nsqd.tcp_address, tls_v1=True, tls_options={"ca_certs": tls_files.ca_cert}, publish_timeout=1)
    with pytest.raises(NoConnectionsError):
        plain.pub(TOPIC, b"refused")


def test_bad_tls_file_error_does_not_show_the_key_password(tls_files: TLSFiles) -> None:
    password = "KeyPassword-5512"
    with pytest.raises(ConfigError) as info:
        Writer("127.0.0.1:4150", tls_v1=True, tls_options={"certfile": tls_files.client_cert, "keyfile": "/nonexistent/key.pem", "password": password})
    assert password not in str(info.value) and password not in repr(info.value.value)
    with pytest.raises(ConfigError) as info:
        Reader(TOPIC, CHANNEL, lambda m: True, nsqd_tcp_addresses="127.0.0.1:4150", tls_v1=True, tls_options={"bogus": 1, "password": password})
    assert password not in str(info.value)

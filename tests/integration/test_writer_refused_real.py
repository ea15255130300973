"""A Writer refused by a real nsqd v1.3.0 (AUTH, TLS), or pointed at a port that is not nsqd's
TCP port (nsqd's HTTP or HTTPS port, nsqlookupd's TCP port), fails its publishes at once.

Before, a wrong AUTH secret, a missing one, an untrusted certificate or an nsqd that requires
TLS made every blocking publish wait out its whole publish_timeout and then raise
NoConnectionsError (a WSGI worker hung for the timeout on every request). Now the publish raises
HandshakeRefusedError (a NoConnectionsError) as soon as the attempt to connect was refused,
with the refusal as __cause__ and in the message, never the secret; the Writer keeps
reconnecting, and publishes go through once nsqd accepts the connection.
"""

from __future__ import annotations

import ssl
import time
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from nsq_sync import Writer
from nsq_sync.errors import (
    AuthFailedError,
    AuthRequiredError,
    HandshakeRefusedError,
    InvalidError,
    NoConnectionsError,
    ProtocolError,
    TLSError,
)
from nsq_sync.pytest_plugin import started
from nsq_sync.testing import AuthServer, NsqdProcess, NsqlookupdProcess, TLSFiles, wait_until

pytestmark = pytest.mark.timeout(60)

TOPIC = "refused_topic"
#: the publish_timeout none of these publishes may wait out
LONG = 30.0
#: a generous bound on "at once": the refusal itself takes milliseconds
PROMPT = 5.0
WAIT = 15.0
SECRET = "WrongSecret-3b9d07e1"


@pytest.fixture
def writers(writer_factory: Callable[..., Writer]) -> Callable[..., Writer]:
    """writer_factory's Writers, with a publish_timeout none of these publishes may wait out."""

    def make(addresses: Any, **kwargs: Any) -> Writer:
        kwargs.setdefault("publish_timeout", LONG)
        return writer_factory(addresses, **kwargs)

    return make


def refused(call: Callable[[], Any]) -> Tuple[HandshakeRefusedError, float]:
    """The HandshakeRefusedError *call* raises, and how long it took."""
    began = time.monotonic()
    with pytest.raises(NoConnectionsError) as info:
        call()
    elapsed = time.monotonic() - began
    assert isinstance(info.value, HandshakeRefusedError), repr(info.value)
    assert elapsed < PROMPT, f"raised after {elapsed:.2f}s of a {LONG:g}s publish_timeout: {info.value}"
    return info.value, elapsed


def report(name: str, elapsed: float, exc: BaseException) -> None:
    print(f"\n[refused] {name}: raised after {elapsed * 1000:.0f} ms of {LONG:g} s: {type(exc.__cause__).__name__}")


# =========================================================================== AUTH
def test_wrong_secret_fails_at_once_then_publishes_once_the_auth_server_accepts_it(
    auth_server: AuthServer, auth_nsqd: NsqdProcess, writers: Callable[..., Writer]
) -> None:
    writer = writers(auth_nsqd.tcp_address, auth_secret=SECRET)
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"refused"))
    assert isinstance(exc.__cause__, AuthFailedError) and exc.__cause__.code == "E_AUTH_FAILED"
    message = str(exc)
    assert auth_nsqd.tcp_address in message and "E_AUTH_FAILED" in message, message
    assert SECRET not in message and SECRET not in repr(exc) and SECRET not in str(exc.__cause__)
    assert SECRET in auth_server.requests  # (it was asked, and said no)
    report("wrong secret", elapsed, exc)
    # Every publish of a worker fails at once, not only the first; async ones too.
    refused(lambda: writer.mpub(TOPIC, [b"a", b"b"]))
    future = writer.pub_async(TOPIC, b"async")
    assert isinstance(future.exception(PROMPT), HandshakeRefusedError)
    # It keeps reconnecting with its backoff; once the auth server takes the secret, the same
    # Writer publishes.
    wait_until(lambda: auth_server.requests.count(SECRET) >= 3, timeout=WAIT, message="reconnects in the background")
    auth_server.set_secret(SECRET)
    assert writer.wait_connected(WAIT)
    assert writer.pub(TOPIC, b"accepted") == b"OK"
    assert auth_nsqd.topic_depth(TOPIC) == 1


def test_no_secret_for_an_nsqd_that_requires_auth_fails_at_once(auth_nsqd: NsqdProcess, writers: Callable[..., Writer]) -> None:
    writer = writers(auth_nsqd.tcp_address)
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"x"))
    assert isinstance(exc.__cause__, AuthRequiredError), repr(exc.__cause__)
    assert "requires AUTH" in str(exc)
    report("no secret", elapsed, exc)


@pytest.fixture
def tls_required_auth_nsqd(tls_files: TLSFiles, auth_server: AuthServer) -> Iterator[NsqdProcess]:
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        extra_args=["--tls-required=true", f"--auth-http-address={auth_server.address}"],
    )
    with started(proc):
        yield proc


def test_an_nsqd_that_requires_tls_refuses_auth_in_clear_at_once(
    auth_server: AuthServer, tls_required_auth_nsqd: NsqdProcess, tls_files: TLSFiles, writers: Callable[..., Writer]
) -> None:
    auth_server.set_secret(SECRET)  # (a good secret: the refusal is nsqd's TLS policy)
    plain = writers(tls_required_auth_nsqd.tcp_address, auth_secret=SECRET)
    exc, elapsed = refused(lambda: plain.pub(TOPIC, b"in clear"))
    assert isinstance(exc.__cause__, InvalidError) and "TLS required" in exc.__cause__.text, repr(exc.__cause__)
    report("TLS required, AUTH in clear", elapsed, exc)
    encrypted = writers(tls_required_auth_nsqd.tcp_address, auth_secret=SECRET, tls_v1=True, tls_options={"ca_certs": tls_files.ca_cert})
    assert encrypted.pub(TOPIC, b"encrypted") == b"OK"


# =========================================================================== TLS
def test_an_untrusted_certificate_fails_at_once(tls_nsqd: NsqdProcess, writers: Callable[..., Writer]) -> None:
    writer = writers(tls_nsqd.tcp_address, tls_v1=True)  # the system's CAs, which did not sign it
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"x"))
    assert isinstance(exc.__cause__, TLSError), repr(exc.__cause__)
    assert isinstance(exc.__cause__.__cause__, ssl.SSLCertVerificationError)
    assert "not accepted" in str(exc) and tls_nsqd.tcp_address in str(exc), str(exc)
    callback_data: List[Any] = []
    writer.pub(TOPIC, b"y", callback=lambda conn, data: callback_data.append(data))
    wait_until(lambda: callback_data, timeout=PROMPT, message="the callback")
    assert isinstance(callback_data[0], HandshakeRefusedError)
    assert tls_nsqd.topic_stats(TOPIC) is None
    report("untrusted certificate", elapsed, exc)


def test_tls_asked_of_an_nsqd_without_tls_fails_at_once(nsqd: NsqdProcess, writers: Callable[..., Writer]) -> None:
    writer = writers(nsqd.tcp_address, tls_v1=True)
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"x"))
    assert isinstance(exc.__cause__, TLSError) and "no TLS" in str(exc.__cause__), repr(exc.__cause__)
    report("no TLS on nsqd", elapsed, exc)


def test_an_unreachable_nsqd_still_waits_for_the_timeout(nsqd: NsqdProcess, writers: Callable[..., Writer]) -> None:
    # Control: nothing refused, the nsqd is just down (it may come back): the wait is kept.
    address = nsqd.tcp_address
    nsqd.stop()
    writer = writers(address, publish_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(NoConnectionsError) as info:
        writer.pub(TOPIC, b"x")
    assert type(info.value) is NoConnectionsError and time.monotonic() - began >= 0.9, repr(info.value)


# =========================================================================== not nsqd's TCP port
@pytest.mark.parametrize("port", ["nsqd-http", "nsqlookupd-tcp"])
def test_a_port_that_is_not_nsqds_tcp_port_fails_at_once(port: str, nsqd: NsqdProcess, nsqlookupd: NsqlookupdProcess,
                                                          writers: Callable[..., Writer]) -> None:
    # The commonest misconfiguration: nsqd's HTTP port (4151) or nsqlookupd's TCP port (4160)
    # given as nsqd's TCP port. Before, every publish waited out its publish_timeout (30 s
    # here) and raised a NoConnectionsError; the ProtocolError saying why was in its message.
    address, said = {
        "nsqd-http": (nsqd.http_address, "is this nsqd's HTTP port instead of its TCP port?"),
        "nsqlookupd-tcp": (nsqlookupd.tcp_address, "is this nsqlookupd's TCP port instead of nsqd's?"),
    }[port]
    # wait_connected() says so at once too (False), not at the end of its timeout
    began = time.monotonic()
    assert writers(address).wait_connected(LONG) is False
    waited = time.monotonic() - began
    assert waited < PROMPT, f"wait_connected returned after {waited:.2f}s of {LONG:g}s"
    writer = writers(address)
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"x"))
    assert isinstance(exc.__cause__, ProtocolError), repr(exc.__cause__)
    message = str(exc)
    assert f"{address} answered IDENTIFY with b'" in message and said in message, message
    assert "something other than NSQ's protocol" in message, message
    report(f"{port} port", elapsed, exc)
    future = writer.pub_async(TOPIC, b"async")
    assert isinstance(future.exception(PROMPT), HandshakeRefusedError)
    assert nsqd.topic_stats(TOPIC) is None


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls_v1"])
def test_nsqds_https_port_fails_at_once(tls: bool, tls_nsqd: NsqdProcess, tls_files: TLSFiles, writers: Callable[..., Writer]) -> None:
    # nsqd's HTTPS port closes without a word on NSQ's handshake. Before, that was a
    # ConnectionClosedError ("closed the connection during IDENTIFY"), a close that may pass:
    # every publish waited out its publish_timeout (30.0 s measured with 30 s here) and raised
    # a NoConnectionsError. Now the port is found to speak TLS: a ProtocolError, a refusal.
    kwargs = {"tls_v1": True, "tls_options": {"ca_certs": tls_files.ca_cert}} if tls else {}
    address = tls_nsqd.https_address
    began = time.monotonic()
    assert writers(address, **kwargs).wait_connected(LONG) is False
    waited = time.monotonic() - began
    assert waited < PROMPT, f"wait_connected returned after {waited:.2f}s of {LONG:g}s"
    writer = writers(address, **kwargs)
    exc, elapsed = refused(lambda: writer.pub(TOPIC, b"x"))
    assert isinstance(exc.__cause__, ProtocolError), repr(exc.__cause__)
    message = str(exc)
    assert address in message and "is this nsqd's HTTPS port instead of its TCP port?" in message, message
    report("nsqd-https port" + (" (tls_v1)" if tls else ""), elapsed, exc)
    future = writer.pub_async(TOPIC, b"async")
    assert isinstance(future.exception(PROMPT), HandshakeRefusedError)
    assert tls_nsqd.topic_stats(TOPIC) is None
    # Control: its TCP port with the same settings takes the publish.
    assert writers(tls_nsqd.tcp_address, **kwargs).pub(TOPIC, b"tcp") == b"OK"

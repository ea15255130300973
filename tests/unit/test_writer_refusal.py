"""Which failed connection attempts the Writer takes as refusals (publishes then fail at once,
HandshakeRefusedError) and which may pass (publishes wait up to their timeout).

A ProtocolError (the peer answered the handshake with something that is not NSQ's protocol: nsqd's
HTTP port, nsqlookupd's TCP port, another service) is a refusal; it was taken as one that may
pass before, and a publish to nsqd's HTTP port waited out its whole timeout."""

from __future__ import annotations

import socket
import ssl

import pytest

from nsq_sync.errors import (
    AuthFailedError,
    AuthRequiredError,
    BadBodyError,
    ConnectError,
    ConnectionClosedError,
    IntegrityError,
    InvalidError,
    ProtocolError,
    TLSError,
    UnauthorizedError,
)
from nsq_sync.writer import _refusal


def tls_error(cause: BaseException) -> TLSError:
    try:
        raise TLSError(f"TLS handshake failed: {cause}") from cause
    except TLSError as exc:
        return exc


def cert_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "unable to get local issuer certificate"
    return error


@pytest.mark.parametrize(
    "error",
    [
        AuthFailedError("AUTH failed"),
        UnauthorizedError("AUTH no authorizations found"),
        InvalidError("cannot AUTH in current state (TLS required)"),
        BadBodyError("IDENTIFY heartbeat interval (90000) is invalid"),
        AuthRequiredError("127.0.0.1:4150 requires AUTH but no auth_secret was given"),
        TLSError("tls_v1 was asked for but 127.0.0.1:4150 has no TLS configured"),
        tls_error(cert_error()),
        tls_error(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")),
        # not NSQ's protocol: what answered is not nsqd's TCP port
        pytest.param(ProtocolError("127.0.0.1:4151 answered IDENTIFY with b'HTTP/1.1 400 Bad Request', not NSQ's protocol: received an HTTP response"), id="not-nsq:http-port"),
        pytest.param(ProtocolError("127.0.0.1:4160 answered IDENTIFY with b'\\x00\\x00\\x00\\x0eE_BAD_PROTOCOL', not NSQ's protocol: unknown frame type"), id="not-nsq:nsqlookupd-tcp-port"),
        pytest.param(ProtocolError("expected a response to IDENTIFY from 127.0.0.1:4150, got frame type 2"), id="not-nsq:message-frame-to-identify"),
        pytest.param(ProtocolError("IDENTIFY response is not JSON: b'hello'"), id="not-nsq:identify-not-json"),
        pytest.param(ProtocolError("127.0.0.1:4150 sent more than 65536 bytes in answer to IDENTIFY; nsqd's are far smaller"), id="not-nsq:oversize-answer"),
        pytest.param(IntegrityError("corrupt snappy stream: bad snappy stream identifier"), id="not-nsq:corrupt-snappy"),
    ],
    ids=lambda e: f"{type(e).__name__}:{type(e.__cause__).__name__ if e.__cause__ else '-'}",
)
def test_refusals(error: BaseException) -> None:
    assert _refusal(error, authed_before=False)


@pytest.mark.parametrize(
    "error",
    [
        ConnectError("cannot connect to 127.0.0.1:4150: [Errno 111] Connection refused"),
        ConnectError("timed out after 1.0s during the handshake with 127.0.0.1:4150"),
        ConnectionClosedError("127.0.0.1:4150 closed the connection during IDENTIFY"),  # (cut mid-handshake, or nsqd stopping)
        ConnectError("timed out after 1.0s waiting for the answer to IDENTIFY from 127.0.0.1:4150 (it came in part)"),
        tls_error(socket.timeout("timed out")),
        tls_error(ConnectionResetError(104, "Connection reset by peer")),
        tls_error(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        tls_error(ssl.SSLSyscallError(5, "Some I/O error occurred")),
    ],
    ids=lambda e: f"{type(e).__name__}:{type(e.__cause__).__name__ if e.__cause__ else '-'}",
)
def test_failures_that_may_pass(error: BaseException) -> None:
    assert not _refusal(error, authed_before=False)


def test_auth_failed_once_the_secret_was_accepted_may_be_an_auth_server_outage() -> None:
    # nsqd answers "E_AUTH_FAILED AUTH failed" alike for a refused secret and an auth server
    # it could not reach; after this nsqd accepted the secret, the outage is the likely reading.
    assert not _refusal(AuthFailedError("AUTH failed"), authed_before=True)
    assert _refusal(UnauthorizedError("AUTH no authorizations found"), authed_before=True)
    assert _refusal(tls_error(cert_error()), authed_before=True)
    assert _refusal(ProtocolError("received an HTTP response"), authed_before=True)

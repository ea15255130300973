"""A Writer whose every nsqd refused the handshake fails its publishes at once, against the fake nsqd.

A refusal is an answer waiting will not change (docs/writer.md): AUTH refused on first contact,
a TLS or IDENTIFY setting nsqd does not take, an answer that is not NSQ's protocol (the address
is not nsqd's TCP port: its HTTP port, nsqlookupd's, another service). Before, a publish waited out its whole timeout and
then raised NoConnectionsError. Now it raises HandshakeRefusedError (a NoConnectionsError) as
soon as the latest attempt to every nsqd was refused; a Writer still making its first attempt,
or with another nsqd unreachable or still connecting, waits as before. The Writer keeps
reconnecting, and publishes go through once a connection succeeds.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from typing import Any, Callable, Iterator, List, Tuple

import pytest
from fake_nsqd import DEFAULT, FakeNsqd, close, error, raw, response
from wsgi_servers import free_port

from nsq_sync.errors import AuthFailedError, HandshakeRefusedError, NoConnectionsError, ProtocolError, UnauthorizedError
from nsq_sync.testing import wait_until
from nsq_sync.writer import Writer

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
#: a publish_timeout none of these publishes may wait out: raising well before it is the point
LONG = 30.0
#: generous bound on "at once" (a refusal is answered in milliseconds; slow CI machines vary)
PROMPT = 5.0
SECRET = "fake-secret-7c1e93"
REFUSE_AUTH = [error("E_AUTH_FAILED AUTH failed"), close()]


def refusing_fake(answer: Any = REFUSE_AUTH) -> FakeNsqd:
    """A fake nsqd that requires AUTH and answers it with *answer* (a refusal by default)."""
    fake = FakeNsqd(identify_response={"auth_required": True}).start()
    fake.set_answer("AUTH", answer)
    return fake


def address(fake: FakeNsqd) -> str:
    return f"{fake.host}:{fake.port}"


@contextlib.contextmanager
def writer_to(addresses: Any, backend: str, **kwargs: Any) -> Iterator[Writer]:
    kwargs.setdefault("publish_timeout", LONG)
    kwargs.setdefault("reconnect_interval", 0.05)
    kwargs.setdefault("max_reconnect_interval", 0.2)
    made = Writer(addresses, backend=backend, auth_secret=SECRET, **kwargs)
    try:
        yield made
    finally:
        made.close(WAIT)


def timed(call: Callable[[], Any]) -> Tuple[BaseException, float]:
    """The exception *call* raises and the seconds it took to raise it."""
    began = time.monotonic()
    with pytest.raises(NoConnectionsError) as info:
        call()
    return info.value, time.monotonic() - began


class Gate:
    """A scripted answer that holds the handshake step it answers until released."""

    def __init__(self, then: Any) -> None:
        self.then = then
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self, session: Any, command: Any) -> Any:
        self.arrived.set()
        assert self.release.wait(WAIT), "the test never released the gate"
        return self.then


# ============================================================== every nsqd refused: at once
@pytest.mark.parametrize("kind", ["pub", "mpub", "dpub"])
def test_a_blocking_publish_fails_at_once_when_every_nsqd_refused_the_auth(backend: str, kind: str) -> None:
    fake = refusing_fake()
    try:
        with writer_to(address(fake), backend) as writer:
            publish = {
                "pub": lambda: writer.pub("t", b"x"),
                "mpub": lambda: writer.mpub("t", [b"x", b"y"]),
                "dpub": lambda: writer.dpub("t", 10, b"x"),
            }[kind]
            exc, elapsed = timed(publish)
            assert isinstance(exc, HandshakeRefusedError), repr(exc)
            assert elapsed < PROMPT, f"raised after {elapsed:.2f}s of a {LONG:g}s publish_timeout"
            assert isinstance(exc.__cause__, AuthFailedError) and exc.__cause__.code == "E_AUTH_FAILED"
            message = str(exc)
            assert address(fake) in message and "E_AUTH_FAILED" in message, message
            assert SECRET not in message and SECRET not in repr(exc), message
            assert fake.published == []
    finally:
        fake.stop()


def test_async_publishes_and_callbacks_fail_at_once_too(backend: str) -> None:
    fake = refusing_fake()
    try:
        with writer_to(address(fake), backend) as writer:
            began = time.monotonic()
            future = writer.pub_async("t", b"x")
            assert isinstance(future.exception(WAIT), HandshakeRefusedError), repr(future.exception())
            got: List[Any] = []
            done = threading.Event()

            def callback(conn: Any, data: Any) -> None:
                got.append((conn, data))
                done.set()

            writer.pub("t", b"y", callback=callback)
            assert done.wait(WAIT)
            elapsed = time.monotonic() - began
            assert got[0][0] is None and isinstance(got[0][1], HandshakeRefusedError), got
            assert elapsed < PROMPT, f"failed after {elapsed:.2f}s of a {LONG:g}s publish_timeout"
    finally:
        fake.stop()


def test_the_writer_keeps_reconnecting_and_publishes_once_nsqd_accepts(backend: str) -> None:
    fake = refusing_fake()
    try:
        with writer_to(address(fake), backend) as writer:
            exc, _ = timed(lambda: writer.pub("t", b"refused"))
            assert isinstance(exc, HandshakeRefusedError)
            fake.wait_for_command("AUTH", count=3)  # (reconnecting in the background, with its backoff)
            fake.reset_answers()  # the auth server accepts the secret now
            assert writer.wait_connected(WAIT)
            assert writer.pub("t", b"accepted") == b"OK"
            assert writer.pub_async("t", b"async").result(WAIT) == b"OK"
            assert fake.published == [("t", b"accepted", None), ("t", b"async", None)]
            assert all(command.body == SECRET.encode() for command in fake.received if command.name == "AUTH")
    finally:
        fake.stop()


def test_an_identify_setting_nsqd_refuses_fails_at_once(backend: str) -> None:
    # E_BAD_BODY to IDENTIFY (a setting out of nsqd's range): nsqd refuses this client's
    # configuration, whatever the secret; no waiting makes it take it.
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", [error("E_BAD_BODY IDENTIFY heartbeat interval (90000) is invalid"), close()])
    try:
        with writer_to(address(fake), backend) as writer:
            exc, elapsed = timed(lambda: writer.pub("t", b"x"))
            assert isinstance(exc, HandshakeRefusedError) and elapsed < PROMPT, (repr(exc), elapsed)
            assert "E_BAD_BODY" in str(exc)
    finally:
        fake.stop()


# ============================================================== the first attempt under way
def test_a_publish_during_the_first_attempt_waits_for_its_outcome(backend: str) -> None:
    gate = Gate(REFUSE_AUTH)
    fake = refusing_fake(gate)
    try:
        with writer_to(address(fake), backend, timeout=WAIT) as writer:  # (timeout: each handshake step may take that long)
            assert gate.arrived.wait(WAIT), "the first attempt did not reach AUTH"
            # Still connecting: no instant failure, the publish waits (here, its short timeout).
            exc, elapsed = timed(lambda: writer.pub("t", b"early", timeout=0.3))
            assert type(exc) is NoConnectionsError and exc.__cause__ is None, repr(exc)
            assert elapsed >= 0.25, elapsed
            # A publish waiting when the attempt is refused fails then, not at its timeout.
            outcome: List[Any] = []
            publisher = threading.Thread(target=lambda: outcome.append(timed(lambda: writer.pub("t", b"waiting"))))
            publisher.start()
            wait_until(lambda: writer._calls, WAIT, message="the publish to wait for a connection")
            released = time.monotonic()
            gate.release.set()
            publisher.join(WAIT)
            assert not publisher.is_alive()
            exc, _ = outcome[0]
            assert isinstance(exc, HandshakeRefusedError), repr(exc)
            assert time.monotonic() - released < PROMPT
    finally:
        gate.release.set()
        fake.stop()


# ============================================================== several nsqd: only all-refused fails fast
def test_one_nsqd_refused_and_another_unreachable_still_waits(backend: str) -> None:
    fake = refusing_fake()
    unreachable = f"127.0.0.1:{free_port()}"
    try:
        with writer_to([address(fake), unreachable], backend) as writer:
            fake.wait_for_command("AUTH")
            wait_until(lambda: all(node.last_error is not None for node in writer._nodes), WAIT, message="both nodes to fail once")
            exc, elapsed = timed(lambda: writer.pub("t", b"x", timeout=1.0))
            assert type(exc) is NoConnectionsError, repr(exc)  # (the other may come up)
            assert elapsed >= 0.9, elapsed
            message = str(exc)
            assert address(fake) in message and "E_AUTH_FAILED" in message and unreachable in message, message
    finally:
        fake.stop()


@pytest.mark.parametrize("then", ["connects", "is-refused"])
def test_one_nsqd_refused_and_another_connecting_waits_for_the_other(backend: str, then: str) -> None:
    # While the other nsqd's first attempt is under way, a publish waits (it may connect); it
    # goes there if it does, and fails at once when that one is refused too.
    refusing = refusing_fake()
    gate = Gate(DEFAULT if then == "connects" else [error("E_BAD_BODY IDENTIFY msg timeout (1) is invalid"), close()])
    slow = FakeNsqd()
    slow.set_answer("IDENTIFY", gate)  # (held, then answered as above)
    slow.start()
    try:
        with writer_to([address(refusing), address(slow)], backend, timeout=WAIT) as writer:
            refusing.wait_for_command("AUTH")
            assert gate.arrived.wait(WAIT)
            wait_until(lambda: writer._nodes[0].refused is not None, WAIT, message="the refusal to be recorded")
            exc, elapsed = timed(lambda: writer.pub("t", b"early", timeout=0.3))
            assert type(exc) is NoConnectionsError and elapsed >= 0.25, (repr(exc), elapsed)
            outcome: List[Any] = []

            def publish() -> None:
                try:
                    outcome.append(writer.pub("t", b"on the other"))
                except Exception as exc:  # (checked below)
                    outcome.append(exc)

            publisher = threading.Thread(target=publish)
            publisher.start()
            wait_until(lambda: writer._calls, WAIT, message="the publish to wait for a connection")
            released = time.monotonic()
            gate.release.set()
            publisher.join(PROMPT)
            assert not publisher.is_alive(), f"still waiting {time.monotonic() - released:.2f}s after the other nsqd's outcome"
            if then == "connects":
                assert outcome == [b"OK"]
                assert slow.published == [("t", b"on the other", None)]
            else:
                assert len(outcome) == 1 and isinstance(outcome[0], HandshakeRefusedError), outcome
                assert "E_AUTH_FAILED" in str(outcome[0]) and "E_BAD_BODY" in str(outcome[0])
            assert refusing.published == []
    finally:
        gate.release.set()
        refusing.stop()
        slow.stop()


# ============================================================== E_AUTH_FAILED once the secret was accepted
@pytest.mark.parametrize(
    "refusal, fails_fast",
    [("E_AUTH_FAILED AUTH failed", False), ("E_UNAUTHORIZED AUTH no authorizations found", True)],
    ids=["auth-failed-waits", "unauthorized-fails-fast"],
)
def test_a_refusal_after_the_secret_was_accepted(backend: str, refusal: str, fails_fast: bool) -> None:
    # nsqd answers E_AUTH_FAILED alike for a secret its auth server refused and for an auth
    # server it could not reach: once this nsqd accepted the secret, the second is the likely
    # reading, and a publish waits for the auth server to come back (as before). E_UNAUTHORIZED
    # is the auth server's own answer (the secret grants nothing now): refused at once.
    fake = FakeNsqd(identify_response={"auth_required": True}).start()  # accepts the secret at first
    try:
        with writer_to(address(fake), backend) as writer:
            assert writer.wait_connected(WAIT)
            assert writer.pub("t", b"accepted") == b"OK"
            fake.set_answer("AUTH", [error(refusal), close()])
            fake.close_client()
            code = refusal.split()[0]
            wait_until(lambda: code in str(writer._nodes[0].last_error), WAIT, message="a refused reconnect")
            exc, elapsed = timed(lambda: writer.pub("t", b"after", timeout=1.0))
            if fails_fast:
                assert isinstance(exc, HandshakeRefusedError) and elapsed < 0.9, (repr(exc), elapsed)
                assert isinstance(exc.__cause__, UnauthorizedError)
            else:
                assert type(exc) is NoConnectionsError and elapsed >= 0.9, (repr(exc), elapsed)
                assert code in str(exc)
    finally:
        fake.stop()


# ============================================================== not nsqd: an answer that is not NSQ's protocol
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"
NOT_NSQ = {
    # nsqd's (or nsqlookupd's) HTTP port: the commonest misconfiguration
    "http-port": ([raw(HTTP_400), close()], "is this nsqd's HTTP port instead of its TCP port?"),
    # nsqlookupd's TCP port: a bare size and E_BAD_PROTOCOL, no frame type
    "nsqlookupd-tcp-port": ([raw(struct.pack(">l", 14) + b"E_BAD_PROTOCOL"), close()], "is this nsqlookupd's TCP port instead of nsqd's?"),
    # another service's banner, read as a frame size far over max_frame_size
    "ssh-banner": ([raw(b"SSH-2.0-OpenSSH_9.6\r\n"), close()], "SSH-2.0-OpenSSH_9.6"),
    # a frame type nsqd never sends
    "unknown-frame-type": ([raw(struct.pack(">ll", 8, 7) + b"garbage!"), close()], "unknown frame type 7"),
    # a response frame, but not the JSON (or OK) nsqd answers IDENTIFY with; kept open
    "identify-not-json": (response(b"hello, world"), "IDENTIFY response is not JSON"),
}


@pytest.mark.parametrize("answer, said", list(NOT_NSQ.values()), ids=list(NOT_NSQ))
def test_an_address_that_is_not_nsqd_fails_at_once(backend: str, answer: Any, said: str) -> None:
    # Before, every publish waited out its whole publish_timeout, then raised NoConnectionsError.
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", answer)
    try:
        with writer_to(address(fake), backend) as writer:
            exc, elapsed = timed(lambda: writer.pub("t", b"x"))
            assert isinstance(exc, HandshakeRefusedError), repr(exc)
            assert elapsed < PROMPT, f"raised after {elapsed:.2f}s of a {LONG:g}s publish_timeout"
            assert isinstance(exc.__cause__, ProtocolError), repr(exc.__cause__)
            message = str(exc)
            assert "something other than NSQ's protocol (is each one an nsqd TCP port?)" in message, message
            assert address(fake) in message and said in message, message
            future = writer.pub_async("t", b"async")
            assert isinstance(future.exception(WAIT), HandshakeRefusedError), repr(future.exception())
            assert fake.published == []
    finally:
        fake.stop()


def test_the_writer_keeps_reconnecting_and_publishes_once_nsqd_listens_there(backend: str) -> None:
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    try:
        with writer_to(address(fake), backend) as writer:
            exc, _ = timed(lambda: writer.pub("t", b"refused"))
            assert isinstance(exc, HandshakeRefusedError)
            fake.wait_for_command("IDENTIFY", count=3)  # (reconnecting in the background, with its backoff)
            fake.reset_answers()  # nsqd listens on that port now
            assert writer.wait_connected(WAIT)
            assert writer.pub("t", b"accepted") == b"OK"
            assert fake.published == [("t", b"accepted", None)]
    finally:
        fake.stop()


@pytest.mark.parametrize("cut", [[raw(b"\x00\x00\x00"), close()], close(abort=True)], ids=["eof-in-a-frame", "reset"])
def test_a_handshake_cut_by_the_peer_still_waits(backend: str, cut: Any) -> None:
    # Control: a connection closed or reset during the handshake (nsqd stopping, the network)
    # may pass: not a refusal, the publish waits for its timeout as before.
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", cut)
    try:
        with writer_to(address(fake), backend) as writer:
            fake.wait_for_command("IDENTIFY")
            wait_until(lambda: writer._nodes[0].last_error is not None, WAIT, message="a failed attempt")
            exc, elapsed = timed(lambda: writer.pub("t", b"x", timeout=1.0))
            assert type(exc) is NoConnectionsError and elapsed >= 0.9, (repr(exc), elapsed)
            assert not isinstance(writer._nodes[0].last_error, ProtocolError), repr(writer._nodes[0].last_error)
    finally:
        fake.stop()


def test_not_nsqd_and_another_unreachable_still_waits(backend: str) -> None:
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    unreachable = f"127.0.0.1:{free_port()}"
    try:
        with writer_to([address(fake), unreachable], backend) as writer:
            wait_until(lambda: all(node.last_error is not None for node in writer._nodes), WAIT, message="both nodes to fail once")
            assert writer._nodes[0].refused is not None  # (the HTTP answer is a refusal; the other may come up)
            exc, elapsed = timed(lambda: writer.pub("t", b"x", timeout=1.0))
            assert type(exc) is NoConnectionsError and elapsed >= 0.9, (repr(exc), elapsed)
            assert "HTTP port" in str(exc) and unreachable in str(exc), str(exc)
    finally:
        fake.stop()


def test_not_nsqd_and_another_refusing_the_secret_fails_at_once(backend: str) -> None:
    http = FakeNsqd().start()
    http.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    refusing = refusing_fake()
    try:
        with writer_to([address(http), address(refusing)], backend) as writer:
            exc, elapsed = timed(lambda: writer.pub("t", b"x"))
            assert isinstance(exc, HandshakeRefusedError) and elapsed < PROMPT, (repr(exc), elapsed)
            message = str(exc)
            assert "was refused (credentials or TLS, by nsqd or by this client: an untrusted certificate) or answered with something other than NSQ's protocol" in message
            assert "HTTP port" in message and "E_AUTH_FAILED" in message, message
    finally:
        http.stop()
        refusing.stop()


# ============================================================== wait_connected
@pytest.mark.parametrize("refusal", ["not-nsqd", "auth"])
def test_wait_connected_returns_false_at_once_when_every_nsqd_refused(backend: str, refusal: str) -> None:
    # Before, it returned False only at the end of its timeout.
    if refusal == "auth":
        fake = refusing_fake()
    else:
        fake = FakeNsqd().start()
        fake.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    try:
        with writer_to(address(fake), backend) as writer:
            began = time.monotonic()
            assert writer.wait_connected(LONG) is False
            elapsed = time.monotonic() - began
            assert elapsed < PROMPT, f"returned after {elapsed:.2f}s of a {LONG:g}s timeout"
            assert writer._nodes[0].refused is not None
    finally:
        fake.stop()


def test_wait_connected_after_a_fix_waits_for_an_attempt_begun_after_it(backend: str) -> None:
    # An nsqd already refused when the wait begins is given its next attempt: the one under way
    # may have been refused before the cause was fixed, and does not end the wait.
    fake = refusing_fake()
    gate = Gate(REFUSE_AUTH)  # (an attempt under way when the secret is fixed: refused all the same)
    try:
        with writer_to(address(fake), backend, timeout=WAIT) as writer:
            exc, _ = timed(lambda: writer.pub("t", b"refused"))
            assert isinstance(exc, HandshakeRefusedError)
            fake.set_answer("AUTH", gate)
            assert gate.arrived.wait(WAIT), "no attempt reached AUTH"
            fake.set_answer("AUTH", DEFAULT)  # fixed, for the attempts from now on
            # (released while the wait below runs: if it ran first, the outcome is the same)
            threading.Timer(0.2, gate.release.set).start()
            began = time.monotonic()
            assert writer.wait_connected(WAIT) is True, f"False after {time.monotonic() - began:.2f}s"
            assert gate.release.is_set()
            assert writer.pub("t", b"accepted") == b"OK"
    finally:
        gate.release.set()
        fake.stop()


def test_wait_connected_without_a_timeout_waits_until_connected(backend: str) -> None:
    # No timeout: it has no False to return, refused or not (as before).
    fake = refusing_fake()
    try:
        with writer_to(address(fake), backend) as writer:
            result: List[Any] = []
            waiter = threading.Thread(target=lambda: result.append(writer.wait_connected()), daemon=True)
            waiter.start()
            fake.wait_for_command("AUTH", count=3)  # (refused three times while it waits)
            assert waiter.is_alive() and result == [], result
            fake.reset_answers()
            waiter.join(WAIT)
            assert result == [True]
    finally:
        fake.stop()


def test_wait_connected_with_one_nsqd_refused_and_another_unreachable_waits_for_its_timeout(backend: str) -> None:
    fake = FakeNsqd().start()
    fake.set_answer("IDENTIFY", [raw(HTTP_400), close()])
    try:
        with writer_to([address(fake), f"127.0.0.1:{free_port()}"], backend) as writer:
            began = time.monotonic()
            assert writer.wait_connected(1.0) is False
            assert time.monotonic() - began >= 0.95
            assert writer._nodes[0].refused is not None and writer._nodes[1].refused is None
    finally:
        fake.stop()

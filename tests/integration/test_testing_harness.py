"""Tests of nsq_sync.testing (the broker launcher) against real nsqd/nsqlookupd v1.3.0.

These talk to the brokers with the standard library only (urllib, socket,
ssl), so they check the harness independently of the nsq_sync client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import nsq_sync
from nsq_sync import testing
from nsq_sync.testing import (
    AuthServer,
    BrokerNotFoundError,
    BrokerStartError,
    LocalCluster,
    NsqdProcess,
    NsqlookupdProcess,
    TLSFiles,
    find_binary,
    wait_until,
)

# --------------------------------------------------------------------------
# stdlib helpers


def http(
    url: str, method: str = "GET", body: Optional[bytes] = None, timeout: float = 5.0
) -> Tuple[int, bytes]:
    """Plain urllib request that ignores proxy settings; returns (status, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def topic_depth(nsqd: NsqdProcess, topic: str) -> Optional[int]:
    status, body = http(f"http://{nsqd.http_address}/stats?format=json&topic={topic}")
    assert status == 200, body
    for entry in json.loads(body)["topics"]:
        if entry["topic_name"] == topic:
            return int(entry["depth"])
    return None


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def https_get(port: int, context: ssl.SSLContext, hostname: str, path: str = "/ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {hostname}\r\n\r\n".encode())
            chunks = []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    return b"".join(chunks)


class RawNsqConnection:
    """Just enough of the NSQ TCP protocol (V2) to check AUTH and PUB."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(b"  V2")

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("nsqd closed the connection")
            data += chunk
        return data

    def command(self, line: bytes, body: Optional[bytes] = None) -> Tuple[int, bytes]:
        payload = line + b"\n"
        if body is not None:
            payload += struct.pack(">l", len(body)) + body
        self.sock.sendall(payload)
        (size,) = struct.unpack(">l", self._read_exact(4))
        frame = self._read_exact(size)
        (frame_type,) = struct.unpack(">l", frame[:4])
        return frame_type, frame[4:]

    def close(self) -> None:
        self.sock.close()


FRAME_RESPONSE, FRAME_ERROR = 0, 1


# --------------------------------------------------------------------------
# process lifecycle


def test_nsqd_starts_and_answers_ping(nsqd: NsqdProcess) -> None:
    assert nsqd.running and nsqd.pid is not None
    assert http(f"http://{nsqd.http_address}/ping") == (200, b"OK")
    assert f"TCP: listening on 127.0.0.1:{nsqd.tcp_port}" in nsqd.log_text()
    assert f"HTTP: listening on 127.0.0.1:{nsqd.http_port}" in nsqd.log_text()


def test_nsqlookupd_starts_and_answers_ping(nsqlookupd: NsqlookupdProcess) -> None:
    assert http(nsqlookupd.http_url("/ping")) == (200, b"OK")
    assert nsqlookupd.nodes() == []


def test_ports_are_distinct_and_nonzero(nsqd: NsqdProcess, nsqlookupd: NsqlookupdProcess) -> None:
    ports = [nsqd.tcp_port, nsqd.http_port, nsqlookupd.tcp_port, nsqlookupd.http_port]
    assert all(isinstance(p, int) and p > 0 for p in ports), ports
    assert len(set(ports)) == 4
    assert nsqd.https_port is None and nsqd.https_address is None
    assert nsqd.host == "127.0.0.1"
    assert nsqd.tcp_address == f"127.0.0.1:{nsqd.tcp_port}"
    assert nsqd.http_address == f"127.0.0.1:{nsqd.http_port}"
    assert nsqlookupd.tcp_address == f"127.0.0.1:{nsqlookupd.tcp_port}"
    socket.create_connection(("127.0.0.1", nsqd.tcp_port), timeout=5).close()
    socket.create_connection(("127.0.0.1", nsqlookupd.tcp_port), timeout=5).close()


def test_restart_keeps_ports_and_data(nsqd: NsqdProcess) -> None:
    status, body = http(f"http://{nsqd.http_address}/pub?topic=t", "POST", b"persist me")
    assert (status, body) == (200, b"OK")
    assert topic_depth(nsqd, "t") == 1
    ports = (nsqd.tcp_port, nsqd.http_port)
    data_path, old_pid = nsqd.data_path, nsqd.pid
    assert old_pid is not None

    assert nsqd.stop() == 0
    assert not nsqd.running and pid_gone(old_pid)
    nsqd.restart()

    assert nsqd.running and nsqd.pid != old_pid
    assert (nsqd.tcp_port, nsqd.http_port) == ports
    assert nsqd.data_path == data_path
    assert topic_depth(nsqd, "t") == 1


def test_kill_then_start_reuses_ports(nsqd: NsqdProcess) -> None:
    ports = (nsqd.tcp_port, nsqd.http_port)
    pid = nsqd.pid
    assert pid is not None
    nsqd.kill()
    assert pid_gone(pid) and not nsqd.running
    assert nsqd.returncode == -9
    nsqd.start()
    assert (nsqd.tcp_port, nsqd.http_port) == ports
    assert http(nsqd.http_url("/ping")) == (200, b"OK")


def test_restart_waits_for_a_busy_port(nsqd: NsqdProcess) -> None:
    nsqd.stop()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # port may be in TIME_WAIT
    blocker.bind(("127.0.0.1", nsqd.http_port))
    blocker.listen(1)
    release = threading.Timer(0.5, blocker.close)
    release.start()
    try:
        nsqd.start()  # retries until the port is free again
    finally:
        release.join()
        blocker.close()
    assert "address already in use" in nsqd.log_text()
    assert http(nsqd.http_url("/ping")) == (200, b"OK")


def test_pause_and_resume(nsqd: NsqdProcess) -> None:
    nsqd.pause()
    assert nsqd.paused
    with pytest.raises(OSError):
        http(nsqd.http_url("/ping"), timeout=0.5)
    nsqd.resume()
    assert not nsqd.paused
    assert http(nsqd.http_url("/ping")) == (200, b"OK")


def test_stop_while_paused_is_graceful() -> None:
    # nsqd (go-svc) asks for SIGTERM only after starting its servers, so a SIGTERM right after
    # start() may meet the signal's default action (-15): that says nothing about pausing, and
    # on a loaded machine it happened about once in 15 runs. Such a run is repeated with a fresh
    # nsqd; a paused nsqd past that gap must shut down cleanly every time (a stop that left it
    # stopped, or killed it, fails all three).
    statuses = []
    for _ in range(3):
        proc = NsqdProcess().start()
        try:
            proc.pause()
            statuses.append(proc.stop(timeout=5))
        finally:
            proc.close()
        if statuses[-1] != -signal.SIGTERM:
            break
    assert statuses[-1] == 0, statuses


def test_stop_is_idempotent_and_leaves_no_process() -> None:
    proc = NsqdProcess().start()
    pid = proc.pid
    data_path = proc.data_path
    assert pid is not None and data_path is not None
    assert Path(data_path).is_dir()
    # Stopped at once: nsqd (go-svc) asks for SIGTERM only after its servers answer, so
    # this stop may meet the default action (-15) instead of the clean shutdown (0).
    status = proc.stop()
    assert status in (0, -signal.SIGTERM), status
    proc.close()
    assert not proc.running
    assert pid_gone(pid)
    assert not Path(f"/proc/{pid}").exists()
    assert not Path(data_path).exists(), "temp data dir should be removed"
    # all of these are no-ops now
    assert proc.stop() == status
    proc.kill()
    proc.close()
    assert proc.pid == pid


def test_explicit_data_path_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "nsqd-data"
    with NsqdProcess(data_path=data) as proc:
        assert proc.data_path == str(data)
    assert (data / "nsqd.dat").is_file()


def test_extra_args_are_passed_verbatim() -> None:
    with NsqdProcess(extra_args=["--mem-queue-size=0", "--max-msg-size=12345"]) as proc:
        assert http(proc.http_url("/config/mem_queue_size")) == (200, b"0")
        assert http(proc.http_url("/config/max_msg_size")) == (200, b"12345")
        assert f"--node-id={proc.node_id}" in proc.log_text()


def test_start_failure_reports_the_log() -> None:
    proc = NsqdProcess(extra_args=["--no-such-flag"])
    with pytest.raises(BrokerStartError) as excinfo:
        proc.start()
    assert "no-such-flag" in str(excinfo.value)
    assert not proc.running
    proc.close()


def test_nsqd_http_helpers(nsqd: NsqdProcess) -> None:
    nsqd.create_channel("events", "ch")
    nsqd.publish("events", b"one")
    nsqd.mpublish("events", [b"two", b"three\nwith newline"])
    wait_until(lambda: nsqd.channel_depth("events", "ch") == 3, timeout=5, message="channel depth 3")
    assert nsqd.topic_depth("events") == 0
    assert nsqd.topic_depth("unknown") == 0
    stats = nsqd.stats()
    assert stats["health"] == "OK" and stats["version"] == testing.NSQ_VERSION


# --------------------------------------------------------------------------
# cluster


def test_cluster_registers_its_producers(nsq_cluster: LocalCluster) -> None:
    status, body = http(f"http://{nsq_cluster.lookupd_http_addresses[0]}/nodes")
    assert status == 200
    producers = json.loads(body)["producers"]
    assert len(producers) == 2
    assert {p["tcp_port"] for p in producers} == {n.tcp_port for n in nsq_cluster.nsqds}
    assert {p["broadcast_address"] for p in producers} == {"127.0.0.1"}
    assert nsq_cluster.nsqd_tcp_addresses == [n.tcp_address for n in nsq_cluster.nsqds]
    assert len({n.node_id for n in nsq_cluster.nsqds}) == 2

    third = nsq_cluster.add_nsqd()
    assert third in nsq_cluster.nsqds
    assert len(nsq_cluster.wait_for_producers(count=3)) == 3
    third.stop()
    assert len(nsq_cluster.wait_for_producers()) == 2


def test_cluster_topic_producers(nsq_cluster: LocalCluster) -> None:
    first = nsq_cluster.nsqds[0]
    first.publish("orders", b"x")
    producers = nsq_cluster.wait_for_producers(topic="orders", count=1)
    assert [p["tcp_port"] for p in producers] == [first.tcp_port]
    with pytest.raises(TimeoutError):
        nsq_cluster.wait_for_producers(topic="orders", count=2, timeout=0.3)


def test_cluster_context_manager_stops_everything() -> None:
    with LocalCluster(nsqd_count=1) as cluster:
        pids = [cluster.lookupd.pid] + [n.pid for n in cluster.nsqds]
        assert len(pids) == 2 and all(pids)
    assert all(pid_gone(pid) for pid in pids if pid is not None)


# --------------------------------------------------------------------------
# auth


def test_auth_server_answers_known_and_unknown_secrets(auth_server: AuthServer) -> None:
    auth_server.set_secret("good", ttl=60, permissions=["publish"])
    base = f"http://{auth_server.address}/auth?remote_ip=127.0.0.1&tls=false&common_name=&secret="

    status, body = http(base + "good")
    assert status == 200
    answer = json.loads(body)
    assert answer["ttl"] == 60
    assert answer["authorizations"] == [
        {"topic": ".*", "channels": [".*"], "permissions": ["publish"]}
    ]
    assert isinstance(answer["identity"], str) and isinstance(answer["identity_url"], str)

    assert http(base + "bad")[0] == 403
    auth_server.revoke("good")
    assert http(base + "good")[0] == 403
    assert auth_server.requests == ["good", "bad", "good"]
    assert auth_server.request_params[0]["remote_ip"] == "127.0.0.1"


def test_nsqd_accepts_the_auth_server_answers(auth_server: AuthServer, auth_nsqd: NsqdProcess) -> None:
    auth_server.set_secret("s3cret", identity="alice")

    conn = RawNsqConnection(auth_nsqd.tcp_address)
    try:
        frame_type, data = conn.command(b"AUTH", b"s3cret")
        assert frame_type == FRAME_RESPONSE, data
        assert json.loads(data) == {
            "identity": "alice",
            "identity_url": "https://example.invalid/nsq_sync-test-user",
            "permission_count": 1,
        }
        assert conn.command(b"PUB t", b"hello") == (FRAME_RESPONSE, b"OK")
    finally:
        conn.close()
    assert auth_server.request_params[-1]["tls"] == "false"
    assert auth_server.request_params[-1]["remote_ip"] == "127.0.0.1"

    conn = RawNsqConnection(auth_nsqd.tcp_address)
    try:
        assert conn.command(b"AUTH", b"wrong") == (FRAME_ERROR, b"E_AUTH_FAILED AUTH failed")
    finally:
        conn.close()
    assert auth_server.requests == ["s3cret", "wrong"]


def test_auth_rules_as_documented(auth_server: AuthServer, auth_nsqd: NsqdProcess) -> None:
    auth_server.set_authorizations("nothing", [])
    # publish is checked against the channel patterns with channel "" (see AuthServer docs)
    auth_server.set_secret("pub-narrow", topic="^t$", channels=["^c$"], permissions=["publish"])
    auth_server.set_secret("pub-any", topic="^t$", permissions=["publish"])

    def auth_then_pub(secret: str) -> Tuple[int, bytes]:
        conn = RawNsqConnection(auth_nsqd.tcp_address)
        try:
            frame_type, data = conn.command(b"AUTH", secret.encode())
            if frame_type != FRAME_RESPONSE:
                return frame_type, data
            return conn.command(b"PUB t", b"x")
        finally:
            conn.close()

    assert auth_then_pub("nothing") == (FRAME_ERROR, b"E_UNAUTHORIZED AUTH no authorizations found")
    frame_type, data = auth_then_pub("pub-narrow")
    assert frame_type == FRAME_ERROR and data.startswith(b"E_UNAUTHORIZED"), data
    assert auth_then_pub("pub-any") == (FRAME_RESPONSE, b"OK")


def test_auth_server_stop_and_start_keep_the_address(
    auth_server: AuthServer, auth_nsqd: NsqdProcess
) -> None:
    auth_server.set_secret("s")
    address = auth_server.address
    auth_server.stop()
    auth_server.stop()  # idempotent
    conn = RawNsqConnection(auth_nsqd.tcp_address)
    try:
        assert conn.command(b"AUTH", b"s") == (FRAME_ERROR, b"E_AUTH_FAILED AUTH failed")
    finally:
        conn.close()
    auth_server.start()
    assert auth_server.address == address
    conn = RawNsqConnection(auth_nsqd.tcp_address)
    try:
        assert conn.command(b"AUTH", b"s")[0] == FRAME_RESPONSE
    finally:
        conn.close()


# --------------------------------------------------------------------------
# TLS


def test_tls_files_verify_against_nsqd_https(tls_files: TLSFiles, tls_nsqd: NsqdProcess) -> None:
    assert tls_nsqd.https_port and tls_nsqd.https_port not in (tls_nsqd.tcp_port, tls_nsqd.http_port)
    context = ssl.create_default_context(cafile=tls_files.ca_cert)
    for hostname in ("127.0.0.1", "localhost"):
        response = https_get(tls_nsqd.https_port, context, hostname)
        assert response.startswith(b"HTTP/1.0 200"), response
        assert response.endswith(b"\r\n\r\nOK"), response

    untrusting = ssl.create_default_context()  # system CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(tls_nsqd.https_port, untrusting, "127.0.0.1")


def test_client_certificate_passes_require_verify(tls_files: TLSFiles) -> None:
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        tls_root_ca=tls_files.ca_cert,
        extra_args=["--tls-client-auth-policy=require-verify"],
    )
    with proc:
        assert proc.https_port is not None
        with_cert = ssl.create_default_context(cafile=tls_files.ca_cert)
        with_cert.load_cert_chain(tls_files.client_cert, tls_files.client_key)
        assert https_get(proc.https_port, with_cert, "127.0.0.1").startswith(b"HTTP/1.0 200")

        without_cert = ssl.create_default_context(cafile=tls_files.ca_cert)
        try:
            response = https_get(proc.https_port, without_cert, "127.0.0.1")
        except (ssl.SSLError, OSError):
            response = b""
        assert not response.startswith(b"HTTP/1.0 200")


def test_tls_required_nsqd_starts_and_helpers_use_https(tls_files: TLSFiles) -> None:
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        extra_args=["--tls-required=true"],
    )
    with proc:
        status, body = http(proc.http_url("/ping"))
        assert status == 403 and b"TLS_REQUIRED" in body
        proc.publish("secure", b"x")
        assert proc.topic_depth("secure") == 1


# --------------------------------------------------------------------------
# binary discovery


def _make_fake_binary(directory: Path, name: str, body: str = "exit 0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_binary_prefers_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _make_fake_binary(tmp_path / "bin", "nsqd")
    monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(fake.parent))
    assert find_binary("nsqd") == str(fake)


def test_find_binary_falls_back_to_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _make_fake_binary(tmp_path / "path-bin", "nsqlookupd")
    monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(testing, "_REPO_BIN_DIR", tmp_path / "no-cache")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_binary("nsqlookupd") == str(fake)


def test_missing_binary_error_explains_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(testing, "_REPO_BIN_DIR", tmp_path / "no-cache")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(BrokerNotFoundError) as excinfo:
        find_binary("nsqd")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, RuntimeError)
    for hint in ("bash .ci/build-brokers", "go build", "NSQ_SYNC_BIN_DIR", "PATH", "1.3.0"):
        assert hint in message
    with pytest.raises(BrokerNotFoundError):
        NsqdProcess().start()


def test_missing_binary_error_says_what_is_wrong_with_nsq_sync_bin_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "(no executable 'nsqd' there)" whatever the reason, even for a directory that
    # does not exist, and not what to point the variable at.
    monkeypatch.setattr(testing, "_REPO_BIN_DIR", tmp_path / "no-cache")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.chdir(tmp_path)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    other = tmp_path / "other"
    other.mkdir()
    (other / "nsqlookupd").write_text("")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "nsqd").write_text("#!/bin/sh\n")
    (plain / "nsqd").chmod(0o644)
    for env_dir, problem in [
        (str(tmp_path / "missing"), "the directory does not exist"),
        ("relative/bin", f"the directory does not exist (relative to the current directory: {tmp_path / 'relative/bin'})"),
        (str(not_a_dir), "not a directory"),
        (str(other), "no 'nsqd' in it (it holds: nsqlookupd)"),
        (str(plain), f"{str(plain / 'nsqd')!r} is not executable (chmod +x it)"),
    ]:
        monkeypatch.setenv("NSQ_SYNC_BIN_DIR", env_dir)
        with pytest.raises(BrokerNotFoundError) as excinfo:
            find_binary("nsqd")
        message = str(excinfo.value)
        assert f"  - $NSQ_SYNC_BIN_DIR = {env_dir}: {problem}\n" in message
        assert "$NSQ_SYNC_BIN_DIR is set but does not lead to 'nsqd'" in message
        assert "docs/testing.md" in message and "bash .ci/build-brokers" in message


def _docstring_examples(doc: str) -> str:
    """The literal blocks (the indented lines after a line ending in "::") of *doc*, dedented."""
    blocks: List[str] = []
    lines = doc.splitlines()
    for index, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and not following.startswith("    "):
                break
            block.append(following)
        blocks.append(textwrap.dedent("\n".join(block)))
    return "\n\n".join(blocks)


def test_the_pytest_plugins_examples_run(tmp_path: Path) -> None:
    # The first used an undefined consume_one(); the second, a fixture, did not import
    # pytest or NsqdProcess.
    import nsq_sync.pytest_plugin

    source = _docstring_examples(nsq_sync.pytest_plugin.__doc__ or "")
    assert "def test_" in source
    (tmp_path / "test_plugin_examples.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(nsq_sync.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plugin_examples.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    ran = source.count("def test_")
    assert f"{ran} passed" in done.stdout and "failed" not in done.stdout and "error" not in done.stdout, done.stdout + done.stderr


def test_a_forked_child_leaves_its_parents_broker_and_data_alone() -> None:
    """A child of os.fork() that closes the harness objects it inherited (a fixture's
    teardown, a `with` block) and runs the exit cleanup must not stop the parent's nsqd nor
    delete its data dir (it deleted the dir, and could hang closing the output pipe whose
    lock the parent's log thread held)."""
    nsqd = testing.NsqdProcess().start()
    try:
        nsqd.publish("forked", b"kept")
        data_path = nsqd.data_path
        assert data_path and os.path.isdir(data_path)
        pid = os.fork()
        if pid == 0:  # the child: what a normal exit does, then leave without pytest's own hooks
            code = 1
            try:
                nsqd.close()
                testing._cleanup_at_exit()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert nsqd.running and os.path.isdir(data_path)
        assert nsqd.topic_depth("forked") == 1
        nsqd.restart()  # the data survived: the message is still there after a restart
        assert nsqd.topic_depth("forked") == 1
    finally:
        nsqd.close()
    assert not os.path.exists(data_path)


# --------------------------------------------------------------------------
# a test process that dies without a normal exit


def process_gone(pid: int) -> bool:
    """The process is gone or a zombie (its parent died and nobody reaped it yet)."""
    if pid_gone(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return pid_gone(pid)


_DYING_SCRIPT = r"""
import os, signal, sys, threading
from nsq_sync.testing import NsqdProcess, NsqlookupdProcess
lookupd = NsqlookupdProcess().start()
started = []
# from a thread that ends at once: the brokers must outlive the thread, not the process
thread = threading.Thread(target=lambda: started.append(NsqdProcess().start()))
thread.start()
thread.join()
nsqd = started[0]
print(lookupd.pid, nsqd.pid, nsqd.data_path, flush=True)
if sys.argv[1] == "os._exit":
    sys.stdin.readline()  # once the test has seen the brokers running
    os._exit(3)
sys.stdin.read()
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGHUP", "os._exit"])
def test_brokers_die_with_the_process_that_started_them(how: str) -> None:
    """atexit does not run when a test process is killed (or pytest-timeout ends it with
    os._exit): the brokers it started kept running with parent 1 and their temp data dirs
    stayed. Now they are killed and the dirs removed, however the process ends."""
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(testing.__file__).resolve().parents[1])] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    child = subprocess.Popen(
        [sys.executable, "-c", _DYING_SCRIPT, how],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    pids: list = []
    data_path = ""
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line, f"the child failed to start brokers (status {child.wait(10)})"
        lookupd_pid, nsqd_pid, data_path = line.split()
        pids = [int(lookupd_pid), int(nsqd_pid)]
        assert not any(process_gone(pid) for pid in pids) and os.path.isdir(data_path)
        if how == "os._exit":
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        else:
            child.send_signal(getattr(signal, how))
        child.wait(10)
        wait_until(
            lambda: all(process_gone(pid) for pid in pids) and not os.path.exists(data_path),
            timeout=10,
            message="the brokers to die and their data dir to go",
        )
    finally:
        child.kill()
        child.wait(10)
        for pid in pids:  # the old behaviour: the brokers outlive the child
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        if data_path:
            wait_until(lambda: all(process_gone(pid) for pid in pids), timeout=10, message="brokers gone")
            shutil.rmtree(data_path, ignore_errors=True)


# --------------------------------------------------------------------------
# extra_args


@pytest.mark.parametrize(
    "cls, extra_args",
    [
        (NsqdProcess, ["--log-level=warn"]),
        (NsqdProcess, ["-log-level", "ERROR"]),
        (NsqlookupdProcess, ["--log-level=fatal"]),
    ],
)
def test_a_quiet_log_level_still_starts(cls: type, extra_args: list) -> None:
    """The ports are read from INFO lines: --log-level=warn (or error) made every start fail
    with "did not report listeners". A later --log-level=info now wins."""
    with cls(extra_args=extra_args, start_timeout=5) as proc:
        assert http(proc.http_url("/ping")) == (200, b"OK")
        ports = (proc.tcp_port, proc.http_port)
        started = [line for line in proc.log_text().splitlines() if line.startswith("---- nsq_sync")]
        assert started[-1].endswith(" ".join(extra_args) + " --log-level=info"), started
        proc.restart()
        assert (proc.tcp_port, proc.http_port) == ports
        assert http(proc.http_url("/ping")) == (200, b"OK")


def test_a_debug_log_level_is_kept() -> None:
    with NsqdProcess(extra_args=["--log-level=debug"]) as proc:
        assert "--log-level=info" not in proc.log_text()
        assert "--log-level=debug" in proc.log_text()


# --------------------------------------------------------------------------
# a known port taken by another process on restart


def test_restart_refuses_another_nsqd_on_its_http_port() -> None:
    """Another nsqd took the HTTP port freed by stop(): start() retried until the deadline,
    spawned one last attempt with no time left and took the other nsqd's /ping answer as
    its own, so it "succeeded" with its own nsqd dead and its helpers talking to the other."""
    import time

    proc = NsqdProcess(start_timeout=2).start()
    try:
        proc.stop()
        with NsqdProcess(extra_args=[f"--http-address=127.0.0.1:{proc.http_port}"]) as other:
            began = time.monotonic()
            with pytest.raises(BrokerStartError) as excinfo:
                proc.start()
            elapsed = time.monotonic() - began
            message = str(excinfo.value)
            assert f"HTTP port {proc.http_port} is in use by another process" in message
            assert "bind: address already in use" in message  # the failed attempt's log
            assert elapsed < proc.start_timeout + 1.0, elapsed
            assert not proc.running
            assert other.running and http(other.http_url("/ping")) == (200, b"OK")
    finally:
        proc.close()


def test_restart_with_its_tcp_port_taken_names_the_port_in_time() -> None:
    """A plain socket on the TCP port: the error said "did not report listeners within 2s"
    after twice start_timeout, without the "address already in use" line."""
    import time

    proc = NsqdProcess(start_timeout=1.5).start()
    blocker = socket.socket()
    try:
        proc.stop()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", proc.tcp_port))
        blocker.listen(1)
        began = time.monotonic()
        with pytest.raises(BrokerStartError) as excinfo:
            proc.start()
        elapsed = time.monotonic() - began
        message = str(excinfo.value)
        assert f"TCP port {proc.tcp_port} is in use by another process" in message, message
        assert f"listen tcp 127.0.0.1:{proc.tcp_port}: bind: address already in use" in message
        assert elapsed < proc.start_timeout + 1.0, elapsed
    finally:
        blocker.close()
        proc.close()


def test_a_ping_answer_from_another_process_is_not_taken_for_the_broker(tmp_path: Path) -> None:
    """The broker's process is alive but has not logged its listening lines, while another
    process answers /ping on its HTTP port: that answer is not the broker's."""
    import http.server as http_server

    proc = NsqdProcess(start_timeout=0.5).start()
    server: Optional[http_server.HTTPServer] = None
    try:
        proc.stop()

        class Ping(http_server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args: object) -> None:
                pass

        server = http_server.HTTPServer(("127.0.0.1", proc.http_port), Ping)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        # an "nsqd" that stays alive without binding anything (a slow start)
        proc.binary = str(_make_fake_binary(tmp_path, "slow-nsqd", "exec sleep 30"))
        with pytest.raises(BrokerStartError) as excinfo:
            proc.start()
        assert f"port {proc.http_port} answers /ping: another process serves on its port" in str(excinfo.value)
        assert not proc.running
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        proc.close()


# --------------------------------------------------------------------------
# LocalCluster stop/start and add_nsqd failures


def test_cluster_stop_then_start_restarts_the_nsqds() -> None:
    """start() after stop() started the lookupd only (it counted list entries, not running
    nsqds), and wait_for_producers() then expected the 0 running nsqds and passed."""
    with LocalCluster(nsqd_count=2) as cluster:
        ports = [(n.tcp_port, n.http_port) for n in cluster.nsqds]
        cluster.stop()
        cluster.start()
        assert len(cluster.nsqds) == 2 and all(n.running for n in cluster.nsqds)
        assert [(n.tcp_port, n.http_port) for n in cluster.nsqds] == ports
        producers = cluster.wait_for_producers(timeout=5)
        assert sorted(p["tcp_port"] for p in producers) == sorted(tcp for tcp, _ in ports)
        cluster.stop()
        with pytest.raises(RuntimeError, match="nsqlookupd is not running"):
            cluster.wait_for_producers(timeout=0.5)


def test_wait_for_producers_counts_a_crashed_nsqd(nsq_cluster: LocalCluster) -> None:
    crashed, killed = nsq_cluster.nsqds
    assert crashed.pid is not None
    os.kill(crashed.pid, signal.SIGKILL)  # not through the harness: a crash
    wait_until(lambda: not crashed.running, timeout=5, message="nsqd to die")
    with pytest.raises(TimeoutError, match=f"nsqd pid {crashed.pid} exited with status -9"):
        nsq_cluster.wait_for_producers(timeout=0.5)
    killed.kill()  # through the harness: no longer expected
    crashed.kill()
    assert nsq_cluster.wait_for_producers(timeout=5) == []


def test_a_failed_add_nsqd_leaves_no_entry_and_no_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_nsqd() appended the nsqd before starting it: a failed start left a dead entry in
    cluster.nsqds (nsqd_tcp_addresses then raised) and its temp data dir until close()."""
    import tempfile

    with LocalCluster(nsqd_count=1) as cluster:
        temp = tmp_path / "temp"
        temp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        with pytest.raises(BrokerStartError, match="bogus"):
            cluster.add_nsqd(["--bogus"])
        assert len(cluster.nsqds) == 1
        assert cluster.nsqd_tcp_addresses == [cluster.nsqds[0].tcp_address]
        assert list(temp.iterdir()) == []
        assert len(cluster.wait_for_producers(timeout=5)) == 1


# --------------------------------------------------------------------------
# an explicit binary


@pytest.mark.parametrize("cls", [NsqdProcess, NsqlookupdProcess])
def test_an_explicit_binary_that_cannot_run_is_broker_not_found(cls: type, tmp_path: Path) -> None:
    """binary= missing or not executable raised a raw FileNotFoundError/PermissionError."""
    not_executable = tmp_path / "plain-file"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    for binary, problem in [
        (tmp_path / "missing", "does not exist"),
        (not_executable, "is not executable"),
        (tmp_path, "is not a file"),
    ]:
        proc = cls(binary=str(binary))
        try:
            with pytest.raises(BrokerNotFoundError) as excinfo:
                proc.start()
            assert str(excinfo.value) == f"{cls.binary_name} executable binary={str(binary)!r} {problem}"
            assert not proc.running
        finally:
            proc.close()


def test_an_explicit_binary_that_is_no_program_is_a_start_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01 not a program\n")
    garbage.chmod(0o755)
    proc = NsqdProcess(binary=str(garbage))
    try:
        with pytest.raises(BrokerStartError, match="cannot run nsqd executable"):
            proc.start()
    finally:
        proc.close()


# --------------------------------------------------------------------------
# the pytest plugin without broker executables


def test_a_missing_executable_is_a_setup_error_as_documented(tmp_path: Path) -> None:
    """The docs said the test FAILS; pytest reports an ERROR at setup (pytest.fail() in a
    fixture). The behaviour is kept, the docs now say what pytest reports."""
    import subprocess
    import sys

    (tmp_path / "test_needs_nsqd.py").write_text("def test_needs_nsqd(nsqd):\n    pass\n")
    runner = (
        "import sys, pathlib, pytest, nsq_sync.testing as t\n"
        "t._REPO_BIN_DIR = pathlib.Path(sys.argv[1]) / 'no-cache'\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rA', sys.argv[1]]))\n"
    )
    env = dict(os.environ, NSQ_SYNC_BIN_DIR=str(tmp_path / "empty"), PATH=str(tmp_path / "empty"), COLUMNS="400")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(testing.__file__).resolve().parents[1])] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, "-c", runner, str(tmp_path)], cwd=str(tmp_path), env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "1 error" in proc.stdout and "skipped" not in proc.stdout, proc.stdout + proc.stderr
    assert "ERROR test_needs_nsqd.py::test_needs_nsqd - Failed: NSQ broker executable 'nsqd'" in proc.stdout
    docs = (Path(testing.__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    assert "pytest reports the test as an **error** at setup" in " ".join(docs.split())


# --------------------------------------------------------------------------
# portability: what can be checked off Windows


@pytest.mark.parametrize("where", ["env", "cache"])
def test_find_binary_finds_the_exe_on_windows(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Windows the executables are nsqd.exe / nsqlookupd.exe: find_binary("nsqd") looked
    for "nsqd" only. _EXE_SUFFIX is what the module sets from os.name."""
    fake = _make_fake_binary(tmp_path / "bin", "nsqd.exe")
    monkeypatch.setattr(testing, "_EXE_SUFFIX", ".exe")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    if where == "env":
        monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(fake.parent))
        monkeypatch.setattr(testing, "_REPO_BIN_DIR", tmp_path / "no-cache")
    else:
        monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(tmp_path / "empty"))
        monkeypatch.setattr(testing, "_REPO_BIN_DIR", fake.parent)
    assert find_binary("nsqd") == str(fake)
    assert find_binary("nsqd.exe") == str(fake)
    with pytest.raises(BrokerNotFoundError, match="'nsqlookupd' or 'nsqlookupd.exe'"):
        monkeypatch.setenv("NSQ_SYNC_BIN_DIR", str(tmp_path / "empty"))
        find_binary("nsqlookupd")


def test_pause_without_sigstop_is_a_clear_error(nsqd: NsqdProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where signal.SIGSTOP/SIGCONT do not exist (Windows), pause()/resume() raised
    AttributeError; now NotImplementedError, and the broker is left as it was."""
    monkeypatch.delattr(signal, "SIGSTOP")
    monkeypatch.delattr(signal, "SIGCONT")
    with pytest.raises(NotImplementedError, match=r"pause\(\) needs SIGSTOP.*POSIX-only"):
        nsqd.pause()
    with pytest.raises(NotImplementedError, match=r"resume\(\) needs SIGCONT.*POSIX-only"):
        nsqd.resume()
    assert nsqd.running and not nsqd.paused
    assert http(nsqd.http_url("/ping")) == (200, b"OK")

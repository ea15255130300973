"""The ``nsq-sync`` command end to end: real subprocesses against real nsqd/nsqlookupd v1.3.0.

Every command runs as ``python -m nsq_sync ...`` in its own process, with
``NSQ_SYNC_BIN_DIR`` pointing at the brokers the fixtures use. Commands that take
``--backend`` get the suite's backend (``--backend gevent`` in the gevent pass, which
makes the CLI re-exec itself under ``python -m gevent.monkey``); the demo runs on both
in both passes. Nothing waits by sleeping: long-running commands are watched through
their output lines, brokers through their ``/stats``, each with a deadline.

The helpers at the top (``cli_env``, ``run_cli``, ``CliProcess``) are reused by
test_examples.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pytest

from nsq_sync.testing import AuthServer, BrokerStartError, NsqdProcess, NsqlookupdProcess, TLSFiles, find_binary, wait_until
from nsq_sync.httpapi import LookupdClient

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 45.0  # one CLI run; each test stays below 60 s
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


# ------------------------------------------------------------------ helpers
def broker_bin_dir() -> str:
    """The directory of the nsqd/nsqlookupd executables the fixtures start."""
    return str(Path(find_binary("nsqd")).resolve().parent)


def cli_env(extra: Optional[Dict[str, str]] = None, bin_dir: Optional[str] = None) -> Dict[str, str]:
    """The environment for a CLI subprocess: ours, the brokers' directory, unbuffered output,
    and none of the variables that would change how the CLI starts."""
    env = dict(os.environ)
    for name in ("NSQ_SYNC_CLI_GEVENT", "NSQ_SYNC_BACKEND", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["NSQ_SYNC_BIN_DIR"] = bin_dir if bin_dir is not None else broker_bin_dir()
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def cli_command(*args: str) -> List[str]:
    return [sys.executable, "-m", "nsq_sync", *args]


def run_cli(
    *args: str,
    env: Optional[Dict[str, str]] = None,
    input: Optional[str] = None,  # noqa: A002 - subprocess.run's name
    cwd: Optional[os.PathLike] = None,
    timeout: float = RUN_TIMEOUT,
) -> "subprocess.CompletedProcess[str]":
    """Run ``nsq-sync ARGS`` to completion and return it (stdout/stderr as text)."""
    return subprocess.run(
        cli_command(*args),
        env=env if env is not None else cli_env(),
        input=input if input is not None else "",
        cwd=str(cwd) if cwd is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(proc: "subprocess.CompletedProcess[str]") -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


class CliProcess:
    """A long-running command (worker, tail, cluster, a script) whose output lines are
    collected by two reader threads, so a test can wait for a line with a deadline.
    With ``stdin=subprocess.PIPE`` the test writes its input (``self.proc.stdin``, text)."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str], cwd: Optional[os.PathLike] = None, stdin: int = subprocess.DEVNULL) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=str(cwd) if cwd is not None else None,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.lines: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"cli-{name}")
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def nsq_sync(cls, *args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[os.PathLike] = None,
                 stdin: int = subprocess.DEVNULL) -> "CliProcess":
        return cls(cli_command(*args), env if env is not None else cli_env(), cwd, stdin)

    def _read(self, name: str, stream: Iterable[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def stdout(self) -> List[str]:
        with self._lock:
            return list(self.lines["stdout"])

    def stderr(self) -> List[str]:
        with self._lock:
            return list(self.lines["stderr"])

    def output(self) -> str:
        with self._lock:
            return "--- stdout\n" + "\n".join(self.lines["stdout"]) + "\n--- stderr\n" + "\n".join(self.lines["stderr"])

    def wait_for_line(self, predicate: Callable[[str], bool], stream: str = "stdout", timeout: float = 20.0) -> str:
        """The first line of *stream* matching *predicate*; fails on timeout or if the process exits first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[stream]:
                    if predicate(line):
                        return line
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.1))
        state = "still running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        pytest.fail(f"no matching {stream} line within {timeout:g}s from {self.argv} ({state})\n{self.output()}")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit (then for all output) and return the exit code; fails on timeout."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.argv} did not exit within {timeout:g}s\n{self.output()}")
        for reader in self._readers:
            reader.join(5.0)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "CliProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # (stdin: unread input left in a pipe nobody reads any more)
                    pass


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(address: str, path: str = "/ping") -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def port_closed(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def channel_stats(nsqd: NsqdProcess, topic: str, channel: str) -> Dict[str, int]:
    stats = nsqd.channel_stats(topic, channel)
    assert stats is not None, f"nsqd has no channel {topic}/{channel}"
    return stats


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def env() -> Dict[str, str]:
    return cli_env()


# -------------------------------------------------------------------- demo
@pytest.mark.parametrize("demo_backend", ["thread", "gevent"])
def test_demo_json_summary_nothing_lost(demo_backend: str, env: Dict[str, str]) -> None:
    proc = run_cli("demo", "-n", "2000", "--json", "--backend", demo_backend, env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one line on stdout\n{describe(proc)}"
    summary = json.loads(lines[0])
    assert isinstance(summary, dict)
    assert summary["backend"] == demo_backend
    assert summary["sent"] == summary["acknowledged"] == summary["received"] == 2000
    assert summary["lost"] == 0
    assert summary["publish_errors"] == 0
    assert summary["duplicates"] == 0  # (nothing comes near msg_timeout: no redelivery)
    assert summary["publish_rate"] > 0 and summary["consume_rate"] > 0
    latency = summary["latency_ms"]
    assert set(latency) == {"p50", "p90", "p99", "max"}
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    # The Reader is subscribed before the first publish: no nsqlookupd poll interval
    # (one second) hides in the numbers any more.
    assert latency["p50"] < 1000, summary


def test_demo_text_summary(env: Dict[str, str], backend: str) -> None:
    proc = run_cli("demo", "-n", "300", "--threads", "2", "--batch", "1", "--backend", backend, env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    text = proc.stdout
    for word in ("sent 300", "acknowledged 300", "received 300", "duplicates", "lost 0", "msg/s", "p50", "p90", "p99", "max"):
        assert word in text, f"{word!r} missing from the summary\n{describe(proc)}"
    assert "cluster: nsqlookupd http" in proc.stderr


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_demo_timeout_reports_unreceived_not_lost(json_output: bool, env: Dict[str, str], backend: str) -> None:
    """--timeout ends the run before 20,000 single PUBs can be sent: the messages acknowledged
    but not received by then are reported as unreceived with the run marked timed out, not as
    lost (acknowledged but never received), which the demo cannot know; still exit 1. Before,
    they were "lost 342"."""
    args = ["demo", "-n", "20000", "--threads", "1", "--batch", "1", "--timeout", "0.05", "-q", "--backend", backend]
    proc = run_cli(*args, *(["--json"] if json_output else []), env=env)
    assert proc.returncode == EXIT_FAILED, describe(proc)
    assert "timed out after" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    if json_output:
        summary = json.loads(proc.stdout)
        assert summary["timed_out"] is True and summary["lost"] == 0, summary
        assert summary["unreceived"] == summary["acknowledged"] - summary["received"] > 0, summary
        assert summary["sent"] < 20000, summary
    else:
        first = proc.stdout.splitlines()[0]
        assert "(timed out)" in first and " lost " not in first, describe(proc)
        counts = dict(zip(first.split()[::2], first.split()[1::2]))  # ("sent", "522"), ("acknowledged", "522"), ...
        unreceived = int(counts["unreceived"].replace(",", ""))
        assert unreceived == int(counts["acknowledged"].replace(",", "")) - int(counts["received"].replace(",", "")) > 0, first


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_interrupted_exits_130_and_stops_its_brokers(signum: int, env: Dict[str, str], backend: str) -> None:
    # Far more messages than can be sent before the signal; the cluster line tells us it is running.
    with CliProcess.nsq_sync("demo", "-n", "50000000", "--batch", "1", "--timeout", "50", "--backend", backend, env=env) as demo:
        line = demo.wait_for_line(lambda l: l.startswith("cluster: nsqlookupd http"), stream="stderr", timeout=30)
        nsqd_tcp = line.split("nsqd tcp ", 1)[1].split(", ")
        lookupd_http = line.split("nsqlookupd http ", 1)[1].split(",")[0]
        assert nsqd_tcp and all(not port_closed(address) for address in nsqd_tcp)
        demo.signal(signum)
        code = demo.wait(30)
        assert code == EXIT_INTERRUPTED, demo.output()
        assert any("interrupted" in l for l in demo.stderr()), demo.output()
        assert not any("Traceback" in l for l in demo.stderr()), demo.output()
    # The brokers run in their own sessions: the demo must have stopped them itself.
    for address in nsqd_tcp:
        wait_until(lambda: port_closed(address), timeout=10, message=f"nsqd {address} to stop")
    wait_until(lambda: port_closed(lookupd_http), timeout=10, message="nsqlookupd to stop")


# ------------------------------------------------------------------ worker
HANDLER_MODULE = '''\
"""A worker handler for the CLI tests: appends each body to $OUT, slowly."""
import os
import threading
import time

_lock = threading.Lock()
_path = os.environ["OUT"]


def handle(message):
    time.sleep(float(os.environ.get("DELAY", "0")))
    with _lock:
        with open(_path, "ab") as out:
            out.write(message.body + b"\\n")
'''


def processed_bodies(path: Path) -> List[bytes]:
    try:
        return [line for line in path.read_bytes().split(b"\n") if line]
    except FileNotFoundError:
        return []


def test_worker_drains_on_sigterm(nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    topic, channel, total = "cli_worker", "work", 500
    (tmp_path / "slow_handler.py").write_text(HANDLER_MODULE)
    out = tmp_path / "processed.txt"
    bodies = [b"job-%04d" % i for i in range(total)]
    nsqd.create_channel(topic, channel)
    nsqd.mpublish(topic, bodies)
    env = cli_env({"OUT": str(out), "DELAY": "0.02"})
    with CliProcess.nsq_sync(
        "worker", "slow_handler:handle", "--topic", topic, "--channel", channel,
        "--nsqd-tcp-address", nsqd.tcp_address, "--max-in-flight", "10", "--concurrency", "2",
        "--backend", backend, env=env, cwd=tmp_path,
    ) as worker:
        wait_until(lambda: len(processed_bodies(out)) >= 20 or worker.proc.poll() is not None, timeout=30, message="20 messages processed")
        assert worker.proc.poll() is None, worker.output()
        worker.signal(signal.SIGTERM)
        code = worker.wait(30)
        assert code == EXIT_OK, worker.output()
        assert not any("Traceback" in l for l in worker.stderr()), worker.output()

    processed = processed_bodies(out)
    assert set(processed) <= set(bodies)
    assert 20 <= len(set(processed)) < total, "the drain should have stopped it part-way"

    # Everything the worker held was answered before it disconnected: FIN for the processed,
    # REQ (no delay) for what was buffered. nsqd applies them asynchronously, so poll briefly;
    # an unanswered message would stay in flight for nsqd's 60 s msg-timeout.
    def settled() -> Optional[Dict[str, int]]:
        stats = channel_stats(nsqd, topic, channel)
        return stats if stats["in_flight_count"] == 0 and stats["deferred_count"] == 0 else None

    stats = wait_until(settled, timeout=5, message="no messages in flight at nsqd")
    assert stats["depth"] + len(set(processed)) >= total, stats
    assert stats["client_count"] == 0


def test_worker_close_timeout_bounds_the_drain(nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    """A handler that outlives --close-timeout: the worker still exits 0 once the timeout is
    over (before the process manager's SIGKILL) and says what it left in flight."""
    (tmp_path / "slow_handler.py").write_text(HANDLER_MODULE)
    out = tmp_path / "processed.txt"
    nsqd.mpublish("cli_close_timeout", [b"one"])
    env = cli_env({"OUT": str(out), "DELAY": "60"})
    with CliProcess.nsq_sync(
        "-v", "worker", "slow_handler:handle", "--topic", "cli_close_timeout", "--channel", "work",
        "--nsqd-tcp-address", nsqd.tcp_address, "--close-timeout", "0.5", "--backend", backend, env=env, cwd=tmp_path,
    ) as worker:
        wait_until(lambda: (nsqd.channel_stats("cli_close_timeout", "work") or {}).get("in_flight_count") == 1, timeout=20, message="the message in flight")
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == EXIT_OK, worker.output()  # (the default, 25 s, would not be over yet)
        assert any("1 messages still in flight" in l for l in worker.stderr()), worker.output()
    assert processed_bodies(out) == []


def test_worker_refuses_a_bad_close_timeout(env: Dict[str, str]) -> None:
    done = run_cli("worker", "x:y", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--close-timeout", "-1", env=env)
    assert done.returncode == 2 and "--close-timeout" in done.stderr, describe(done)


#: a handler that fails a message's first attempt (a requeue) and finishes the next
FAIL_ONCE_MODULE = '''\
def handle(message):
    print("attempt", message.attempts, message.body.decode(), flush=True)
    return message.attempts >= 2
'''


def test_worker_msg_timeout_is_the_connections(nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    """--msg-timeout reaches nsqd (the IDENTIFY msg_timeout, in seconds): a handler that outlives
    it has its message timed out by nsqd after about that long, not after nsqd's 60 s."""
    (tmp_path / "slow_handler.py").write_text(HANDLER_MODULE)
    topic = "cli_msg_timeout"
    nsqd.create_channel(topic, "work")
    nsqd.publish(topic, b"long")
    env = cli_env({"OUT": str(tmp_path / "out.txt"), "DELAY": "60"})
    with CliProcess.nsq_sync(
        "worker", "slow_handler:handle", "--topic", topic, "--channel", "work", "--nsqd-tcp-address", nsqd.tcp_address,
        "--msg-timeout", "1", "--close-timeout", "0.5", "--backend", backend, env=env, cwd=tmp_path,
    ) as worker:
        wait_until(lambda: worker.proc.poll() is not None or channel_stats(nsqd, topic, "work")["timeout_count"] >= 1,
                   timeout=20, message="nsqd timing the message out")
        assert worker.proc.poll() is None, worker.output()
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == EXIT_OK, worker.output()


@pytest.mark.parametrize("max_backoff_duration", ["0", None], ids=["no-backoff", "default-backoff"])
def test_worker_requeue_delay_and_max_backoff_duration(max_backoff_duration: Optional[str], nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    """--requeue-delay 0 gives a failed message back at once (the default, 90 s x attempts,
    would hold it for 90 s); --max-backoff-duration 0 turns the Reader's backoff off, where by
    default a failure pauses it (1 s at the first level, logged at INFO)."""
    (tmp_path / "fail_once.py").write_text(FAIL_ONCE_MODULE)
    topic = "cli_requeue_delay"
    nsqd.create_channel(topic, "work")
    nsqd.publish(topic, b"job")
    args = ["-v", "worker", "fail_once:handle", "--topic", topic, "--channel", "work", "--nsqd-tcp-address", nsqd.tcp_address,
            "--requeue-delay", "0", "--backend", backend]
    if max_backoff_duration is not None:
        args += ["--max-backoff-duration", max_backoff_duration]
    with CliProcess.nsq_sync(*args, env=cli_env(), cwd=tmp_path) as worker:
        worker.wait_for_line(lambda line: line == "attempt 1 job", timeout=20)
        worker.wait_for_line(lambda line: line == "attempt 2 job", timeout=15)
        wait_until(lambda: channel_stats(nsqd, topic, "work")["in_flight_count"] == 0, timeout=5, message="the second attempt finished")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == EXIT_OK, worker.output()
    stats = channel_stats(nsqd, topic, "work")
    assert stats["requeue_count"] == 1 and stats["depth"] == 0 and stats["deferred_count"] == 0, stats
    backoff_lines = [line for line in worker.stderr() if "backoff" in line]
    assert bool(backoff_lines) == (max_backoff_duration is None), worker.output()


def test_worker_requeue_delay_defers_the_failed_message(nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    """--requeue-delay 5: the failed message waits at nsqd (deferred) and comes back about 5 s
    later (the default would be 90 s)."""
    (tmp_path / "fail_once.py").write_text(FAIL_ONCE_MODULE)
    topic = "cli_requeue_delay_5"
    nsqd.create_channel(topic, "work")
    nsqd.publish(topic, b"job")
    with CliProcess.nsq_sync(
        "worker", "fail_once:handle", "--topic", topic, "--channel", "work", "--nsqd-tcp-address", nsqd.tcp_address,
        "--requeue-delay", "5", "--max-backoff-duration", "0", "--backend", backend, env=cli_env(), cwd=tmp_path,
    ) as worker:
        worker.wait_for_line(lambda line: line == "attempt 1 job", timeout=20)
        requeued = time.monotonic()
        wait_until(lambda: channel_stats(nsqd, topic, "work")["deferred_count"] == 1, timeout=4, message="the message deferred at nsqd")
        worker.wait_for_line(lambda line: line == "attempt 2 job", timeout=20)
        assert time.monotonic() - requeued > 4, worker.output()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == EXIT_OK, worker.output()


@pytest.mark.parametrize("where", ["after", "before"])
def test_worker_verbose_logs_rates(where: str, nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    (tmp_path / "slow_handler.py").write_text(HANDLER_MODULE)
    nsqd.mpublish("cli_rates", [b"a", b"b", b"c"])
    args = ["worker", "slow_handler:handle", "--topic", "cli_rates", "--channel", "c",
            "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend]
    args = args[:1] + ["-v"] + args[1:] if where == "after" else ["-v"] + args
    with CliProcess.nsq_sync(*args, env=cli_env({"OUT": str(tmp_path / "out.txt")}), cwd=tmp_path) as worker:
        line = worker.wait_for_line(lambda l: "nsq_sync.cli" in l and "received" in l, stream="stderr", timeout=20)
        assert "nsq_sync.cli: cli_rates:c: received " in line, line  # (which topic and channel)
        assert "finished" in line and "requeued" in line and "in flight" in line and "connections 1" in line, line
        worker.signal(signal.SIGINT)
        assert worker.wait(30) == EXIT_OK, worker.output()
    assert sorted(processed_bodies(tmp_path / "out.txt")) == [b"a", b"b", b"c"]


# --------------------------------------------------------------- pub, tail
def test_pub_then_tail_round_trip(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    pub = run_cli("pub", "--topic", "cli_pub", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend,
                  "one", "two", "three", env=env)
    assert pub.returncode == EXIT_OK, describe(pub)
    assert "published 3 message(s) to cli_pub" in pub.stderr
    assert nsqd.topic_depth("cli_pub") == 3

    # (the topic's backlog, into tail's channel: --take-backlog, as it has no other channel)
    tail = run_cli("tail", "--topic", "cli_pub", "--nsqd-tcp-address", nsqd.tcp_address, "-n", "3", "--take-backlog", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK, describe(tail)
    assert sorted(tail.stdout.splitlines()) == ["one", "three", "two"], describe(tail)


@pytest.mark.parametrize("dash", [True, False], ids=["dash", "no-args"])
def test_pub_stdin_lines_then_tail(dash: bool, nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    args = ["pub", "--topic", "cli_stdin", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend]
    pub = run_cli(*args, *(["-"] if dash else []), input="alpha\nbeta\n\ngamma delta\n", env=env)
    assert pub.returncode == EXIT_OK, describe(pub)
    assert "published 3 message(s)" in pub.stderr  # the empty line is skipped

    # (the topic's backlog, into tail's channel: --take-backlog, as it has no other channel)
    tail = run_cli("tail", "--topic", "cli_stdin", "--nsqd-tcp-address", nsqd.tcp_address, "-n", "3", "--take-backlog", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK, describe(tail)
    assert sorted(tail.stdout.splitlines()) == ["alpha", "beta", "gamma delta"], describe(tail)


def test_pub_stops_at_a_line_nsqd_refuses_and_says_how_far_it_got(tmp_path: Path, env: Dict[str, str], backend: str) -> None:
    """A line nsqd refuses (E_BAD_MESSAGE: over its --max-msg-size) ends pub with exit 1 naming
    the line (1-based, empty lines counted) and how many messages were published before it;
    nothing after it is published. Before, the count was only printed on success."""
    from nsq_sync.pytest_plugin import started

    with started(NsqdProcess(extra_args=["--max-msg-size", "10"])) as small:
        args = ["pub", "--topic", "cli_refused", "--nsqd-tcp-address", small.tcp_address, "--backend", backend]
        pub = run_cli(*args, "-", input="one\n\ntwo\nthis one is too long\nfour\n", env=env)
        assert pub.returncode == EXIT_FAILED, describe(pub)
        assert "nsq-sync: failed: line 4: BadMessageError: E_BAD_MESSAGE" in pub.stderr, describe(pub)
        assert "published 2 message(s) to cli_refused before line 4" in pub.stderr, describe(pub)
        assert "Traceback" not in pub.stderr, describe(pub)
        assert small.topic_depth("cli_refused") == 2

        pub = run_cli(*args, "five", "this one is too long", "six", env=env)
        assert pub.returncode == EXIT_FAILED, describe(pub)
        assert "nsq-sync: failed: argument 2: BadMessageError" in pub.stderr, describe(pub)
        assert "published 1 message(s) to cli_refused before argument 2" in pub.stderr, describe(pub)
        assert small.topic_depth("cli_refused") == 3


def test_pub_line_over_max_msg_size_fails_the_job_not_its_arguments(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """A stdin line over the Writer's max_msg_size (nsqd's default 1 MiB) is refused by the Writer
    (ConfigError) after the lines before it were published: exit 1 naming the line and the count,
    also with -q. Before, it was exit 2, "bad arguments", with no count."""
    big = "x" * (1024 * 1024 + 1)
    pub = run_cli("pub", "--topic", "cli_big_line", "--nsqd-tcp-address", nsqd.tcp_address, "-q", "--backend", backend, "-",
                  input=f"one\n{big}\nthree\n", env=env)
    assert pub.returncode == EXIT_FAILED, describe(pub)
    assert "nsq-sync: failed: line 2: ConfigError" in pub.stderr and "max_msg_size" in pub.stderr, describe(pub)
    assert "published 1 message(s) to cli_big_line before line 2" in pub.stderr, describe(pub)
    assert nsqd.topic_depth("cli_big_line") == 1


def test_pub_max_msg_size_follows_the_nsqd_it_publishes_to(env: Dict[str, str], backend: str) -> None:
    """--max-msg-size: to an nsqd started with --max-msg-size 2 MiB, a 1.5 MiB line is published
    with --max-msg-size 2097152; set to 5, a line over it is refused before it is sent (exit 1,
    naming the line, after the line before it). Before, pub had no such option (exit 2), and
    refused every message over 1 MiB, whatever its nsqd took."""
    from nsq_sync.pytest_plugin import started

    limit = 2 * 1024 * 1024
    with started(NsqdProcess(extra_args=["--max-msg-size", str(limit)])) as nsqd:
        args = ["pub", "--topic", "cli_max_msg", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend]
        pub = run_cli(*args, "--max-msg-size", str(limit), "-", input="x" * (1536 * 1024) + "\n", env=env)
        assert pub.returncode == EXIT_OK, describe(pub)
        assert nsqd.topic_depth("cli_max_msg") == 1
        pub = run_cli(*args, "--max-msg-size", "5", "-", input="abc\ntoolong\nxyz\n", env=env)
        assert pub.returncode == EXIT_FAILED, describe(pub)
        assert "nsq-sync: failed: line 2: ConfigError" in pub.stderr and "exceeds max_msg_size (5 bytes" in pub.stderr, describe(pub)
        assert "published 1 message(s) to cli_max_msg before line 2" in pub.stderr, describe(pub)
        assert nsqd.topic_depth("cli_max_msg") == 2
        # 0: no check of pub's own; nsqd's is the one that counts (was exit 2: "must be at least 1").
        pub = run_cli(*args, "--max-msg-size", "0", "-", input="x" * (1536 * 1024) + "\n", env=env)
        assert pub.returncode == EXIT_OK, describe(pub)
        assert nsqd.topic_depth("cli_max_msg") == 3


def test_pub_nsqd_gone_part_way_exits_3_naming_the_line(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    topic = "cli_pub_gone"
    with CliProcess.nsq_sync("pub", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "--timeout", "1", "--backend", backend, "-",
                             env=env, stdin=subprocess.PIPE) as pub:
        assert pub.proc.stdin is not None
        pub.proc.stdin.write("one\ntwo\n")
        pub.proc.stdin.flush()
        wait_until(lambda: nsqd.topic_depth(topic) == 2, timeout=20, message="two messages published")
        nsqd.stop()
        if backend == "thread":
            # Once the Writer saw its connection end, the next line finds no connection at all.
            # (On gevent the hub cannot run while pub blocks reading stdin: the Writer may send
            # line 3 on the dead connection first, and that failure's outcome is unknown, exit 1.)
            pub.wait_for_line(lambda l: "connection to" in l and "closed" in l, stream="stderr", timeout=20)
        pub.proc.stdin.write("three\n")
        pub.proc.stdin.close()
        code = pub.wait(30)
        err = "\n".join(pub.stderr())
        if backend == "thread" or code == EXIT_UNAVAILABLE:
            assert code == EXIT_UNAVAILABLE and "nsq-sync: unavailable: line 3: " in err, pub.output()
        else:
            assert code == EXIT_FAILED and "nsq-sync: failed: line 3: " in err, pub.output()
        assert f"published 2 message(s) to {topic} before line 3" in err and "Traceback" not in err, pub.output()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_pub_stopped_by_a_signal_exits_130_with_the_count(signum: int, nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """Ctrl-C or SIGTERM while pub waits for stdin: the Writer is closed, exit 130, and stderr
    says how many messages were published. Before, SIGTERM killed it silently (no close) and
    Ctrl-C printed no count."""
    topic = "cli_pub_signal"
    with CliProcess.nsq_sync("pub", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, "-",
                             env=env, stdin=subprocess.PIPE) as pub:
        assert pub.proc.stdin is not None
        pub.proc.stdin.write("one\ntwo\n")
        pub.proc.stdin.flush()
        wait_until(lambda: nsqd.topic_depth(topic) == 2, timeout=20, message="two messages published")
        pub.signal(signum)
        assert pub.wait(30) == EXIT_INTERRUPTED, pub.output()
        assert pub.stderr() == [f"nsq-sync: interrupted: published 2 message(s) to {topic}"], pub.output()
    assert nsqd.topic_depth(topic) == 2


def test_pub_backend_option_abbreviated_restarts_under_gevent(nsqd: NsqdProcess, env: Dict[str, str]) -> None:
    """argparse takes --back for --backend: the CLI restarts under gevent's runner for it too.
    Before, only the words "--backend gevent" did, and --back gevent failed (exit 2) asking
    for gevent's monkey-patching."""
    pub = run_cli("pub", "--topic", "cli_back", "--nsqd-tcp-address", nsqd.tcp_address, "--back", "gevent", "one", env=env)
    assert pub.returncode == EXIT_OK, describe(pub)
    assert "published 1 message(s) to cli_back" in pub.stderr, describe(pub)
    assert nsqd.topic_depth("cli_back") == 1


def test_pub_bodies_reading_backend_gevent_do_not_restart_under_gevent(nsqd: NsqdProcess, tmp_path: Path) -> None:
    """Message bodies "--backend" "gevent" (after --) are messages, not the option: no restart
    under gevent. A gevent package that fails to import stands in for gevent here, so a restart
    would fail the run; before, the words anywhere in argv made the CLI restart."""
    stub = tmp_path / "stub"
    (stub / "gevent").mkdir(parents=True)
    (stub / "gevent" / "__init__.py").write_text("raise ImportError('the CLI imported gevent')\n")
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(stub), str(REPO), os.environ.get("PYTHONPATH", "")])})
    pub = run_cli("pub", "--topic", "cli_body_backend", "--nsqd-tcp-address", nsqd.tcp_address, "--", "--backend", "gevent", env=env)
    assert pub.returncode == EXIT_OK, describe(pub)
    assert "published 2 message(s) to cli_body_backend" in pub.stderr, describe(pub)
    assert nsqd.topic_depth("cli_body_backend") == 2


def test_tail_stops_when_its_output_pipe_closes(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """`nsq-sync tail | head -1`: once head exits, tail stops (exit 0) instead of failing
    every message (and requeueing it) for ever; what it could not print goes back to nsqd."""
    nsqd.create_channel("cli_pipe", "kept")
    nsqd.mpublish("cli_pipe", [b"m%d" % i for i in range(20)])
    command = f"{sys.executable} -m nsq_sync tail --topic cli_pipe --channel kept --nsqd-tcp-address {nsqd.tcp_address} --backend {backend} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, capture_output=True, timeout=60)
    assert done.returncode == EXIT_OK, describe(done)  # (pipefail: tail's own exit status)
    assert len(done.stdout.splitlines()) == 1, describe(done)
    assert b"Traceback" not in done.stderr, describe(done)
    # Every message was either shown (finished) or given back: none is left in flight.
    wait_until(lambda: (nsqd.channel_stats("cli_pipe", "kept") or {}).get("in_flight_count") == 0, 10, message="nothing in flight")


def test_tail_write_error_other_than_a_closed_pipe_exits_1_and_gives_the_messages_back(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """stdout on a full disk (/dev/full): tail says so and exits 1; the messages it could not
    print go back to nsqd. Before, every write error was taken for a closed pipe: exit 0, silent."""
    nsqd.create_channel("cli_full", "kept")
    nsqd.mpublish("cli_full", [b"m%d" % i for i in range(5)])
    with open("/dev/full", "wb") as full:  # (Linux: every write fails with ENOSPC)
        done = subprocess.run(cli_command("tail", "--topic", "cli_full", "--channel", "kept", "--nsqd-tcp-address", nsqd.tcp_address,
                                          "-n", "3", "--backend", backend), env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == EXIT_FAILED, f"exit {done.returncode}\n{done.stderr}"
    assert done.stderr == "nsq-sync: failed: write error: No space left on device\n", done.stderr
    stats = wait_until(lambda: (lambda c: c if c and c.get("in_flight_count") == 0 else None)(nsqd.channel_stats("cli_full", "kept")), 10, message="nothing in flight")
    assert stats["depth"] == 5 and stats["deferred_count"] == 0, stats  # (none was finished)
    # Each of the (at most -n) messages tail held went back once, after its RDY 0: not straight
    # back to tail to be given back again and again (one more attempt each time).
    assert stats["requeue_count"] <= 3, stats


def pipe_bytes(fd: int) -> int:
    """How many bytes wait in the pipe *fd* reads from (Linux: FIONREAD)."""
    import fcntl
    import termios

    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_tail_with_its_output_stalled_gives_everything_back_at_once_on_a_signal(signum: int, nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """stdout a pipe nobody reads: tail fills it, one handler blocks in its write and the
    others wait behind it, holding --max-in-flight messages. A signal ends tail within a few
    seconds, and every message it did not print is back in the channel at once (requeued, not
    finished, nothing left in flight). Before, the Reader's close waited its close_timeout,
    30 s, for the blocked handler, and left 2/3 of what tail held in flight at nsqd (until its
    60 s msg-timeout)."""
    import fcntl

    topic, total, max_in_flight = "cli_tail_stalled", 100, 50
    line = 2048  # (2 lines fill a 4 KiB page exactly, and a line is written whole: <= PIPE_BUF)
    bodies = [b"%04d" % i + b"." * (line - 5) for i in range(total)]
    nsqd.create_channel(topic, "kept")
    nsqd.mpublish(topic, bodies)
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(read_end, getattr(fcntl, "F_GETPIPE_SZ", 1032))  # (Linux; the name since Python 3.10)
    argv = cli_command("tail", "--topic", topic, "--channel", "kept", "--nsqd-tcp-address", nsqd.tcp_address,
                       "--max-in-flight", str(max_in_flight), "--backend", backend)
    try:
        proc = subprocess.Popen(argv, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        close_now(write_end)
    try:
        assert capacity // line < max_in_flight

        fits = capacity // line

        def stalled() -> bool:
            # The pipe is full, nsqd has the FIN of every line in it, and has sent tail as
            # many more messages: tail holds --max-in-flight messages it cannot print.
            stats = nsqd.channel_stats(topic, "kept") or {}
            return proc.poll() is not None or (
                pipe_bytes(read_end) == capacity and stats.get("in_flight_count") == max_in_flight and stats.get("depth") == total - fits - max_in_flight
            )

        wait_until(stalled, timeout=20, message="the pipe full and tail holding --max-in-flight messages")
        assert proc.poll() is None
        signalled = time.monotonic()
        proc.send_signal(signum)
        try:
            err = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            pytest.fail("tail did not exit within 20 s of the signal")
        elapsed = time.monotonic() - signalled
        assert proc.returncode == EXIT_OK, f"exit {proc.returncode}\n{err}"
        assert elapsed < 5, f"{elapsed:.1f}s after the signal\n{err}"
        assert "Traceback" not in err and "still in flight" not in err, err
        with open(read_end, "rb", closefd=False) as pipe:
            printed = pipe.read().splitlines()
    finally:
        close_now(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert len(printed) == fits and len(set(printed)) == fits and set(printed) <= set(bodies), len(printed)
    stats = settled_channel(nsqd, topic, "kept")  # (nothing in flight: without the give-back, not for 60 s)
    assert stats["depth"] == total - fits, stats  # every message not printed is back, none finished
    assert stats["requeue_count"] == max_in_flight, stats  # (what tail held, given back once each)


PID_1_TAIL = """\
import os
import sys

sys.path.insert(0, {repo!r})
os.getpid = lambda: 1  # as in a container where the command is PID 1 (each in its own PID namespace)
from nsq_sync.cli import main

sys.exit(main())
"""


def test_two_tails_get_channels_of_their_own_even_with_the_same_pid(nsqd: NsqdProcess, tmp_path: Path, backend: str) -> None:
    """Two default tails whose processes have the same pid (PID 1 in two containers) each get a
    channel of their own, so each prints every message. Before, both used tail1#ephemeral: one
    channel, each tail printing about half."""
    topic, total = "cli_tail_pid1", 6
    script = tmp_path / "pid1_tail.py"
    script.write_text(PID_1_TAIL.format(repo=str(REPO)))
    # (on gevent the script runs under gevent's runner itself: the CLI's re-exec would drop its getpid)
    runner = [sys.executable, "-m", "gevent.monkey"] if backend == "gevent" else [sys.executable]
    env = cli_env({"NSQ_SYNC_CLI_GEVENT": "1"} if backend == "gevent" else None)
    argv = [*runner, str(script), "tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "--nsqd-http-address", nsqd.http_address,
            "-n", str(total), "--backend", backend]
    nsqd.create_topic(topic)

    def channels() -> List[Dict[str, object]]:
        return list((nsqd.topic_stats(topic) or {}).get("channels") or [])

    with CliProcess(argv, env) as first, CliProcess(argv, env) as second:
        wait_until(lambda: sum(int(c["client_count"]) for c in channels()) == 2 or first.proc.poll() is not None or second.proc.poll() is not None,
                   timeout=20, message="both tails subscribed")
        names = sorted(str(c["channel_name"]) for c in channels())
        assert len(names) == 2 and all(name.startswith("tail-") and name.endswith("#ephemeral") for name in names), names
        nsqd.mpublish(topic, [b"m%d" % i for i in range(total)])
        for tail in (first, second):
            assert tail.wait(30) == EXIT_OK, tail.output()
            assert sorted(tail.stdout()) == sorted("m%d" % i for i in range(total)), tail.output()


def wait_subscribed(nsqd: NsqdProcess, topic: str, channel: str, tail: "CliProcess") -> None:
    def subscribed() -> bool:
        stats = nsqd.channel_stats(topic, channel)
        return bool(stats and stats["client_count"] >= 1) or tail.proc.poll() is not None

    wait_until(subscribed, timeout=20, message=f"tail subscribed to {topic}/{channel}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_tail_n_stopped_before_n_messages_exits_130(signum: int, nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """tail -n 3 gets one message, then a signal (a CI job's timeout, Ctrl-C): it did not print
    what -n promised, so it exits 130 (interrupted, as pub does) saying how many it printed.
    Before, it exited 0: "pub, then tail -n 1" smoke tests passed with nothing received.
    Without -n a signal is still the normal stop: exit 0."""
    topic, channel = "cli_tail_n_stopped", "ci"
    nsqd.create_channel(topic, channel)
    with CliProcess.nsq_sync("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                             "-n", "3", "--backend", backend, env=env) as tail:
        wait_subscribed(nsqd, topic, channel, tail)
        nsqd.publish(topic, b"only")
        tail.wait_for_line(lambda line: line == "only")
        tail.signal(signum)
        assert tail.wait(30) == EXIT_INTERRUPTED, tail.output()
        assert tail.stdout() == ["only"], tail.output()
        assert tail.stderr() == [f"nsq-sync: interrupted: printed 1 of 3 message(s) of {topic}"], tail.output()
    with CliProcess.nsq_sync("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                             "--backend", backend, env=env) as tail:
        wait_subscribed(nsqd, topic, channel, tail)
        tail.signal(signum)
        assert tail.wait(30) == EXIT_OK, tail.output()


def test_tail_timeout(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """--timeout: -n 2 with one message there is exit 1 once the time is over, saying how many
    were printed; not subscribed to any nsqd by then (nothing listens) is exit 3; -n reached in
    time is exit 0 at once; without -n, the timeout is a stop (exit 0). Before, there was no
    --timeout (exit 2), and a smoke test could only wait for ever."""
    topic, channel = "cli_tail_timeout", "ci"
    nsqd.create_channel(topic, channel)
    nsqd.publish(topic, b"one")
    tail = run_cli("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                   "-n", "2", "--timeout", "2", "--backend", backend, env=env)
    assert tail.returncode == EXIT_FAILED, describe(tail)
    assert tail.stdout == "one\n", describe(tail)
    assert tail.stderr == f"nsq-sync: failed: timed out after 2s (--timeout): printed 1 of 2 message(s) of {topic}\n", describe(tail)
    stats = settled_channel(nsqd, topic, channel)
    assert stats["depth"] == 0, stats  # (the one printed was finished)

    nowhere = f"127.0.0.1:{free_port()}"
    tail = run_cli("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nowhere,
                   "-n", "1", "--timeout", "1", "--backend", backend, env=env)
    assert tail.returncode == EXIT_UNAVAILABLE, describe(tail)
    assert tail.stderr.splitlines()[-1] == (f"nsq-sync: unavailable: not subscribed to any nsqd after 1s (--timeout): none reachable, "
                                            f"or none has the topic for nsqlookupd; printed 0 of 1 message(s) of {topic}"), describe(tail)

    nsqd.publish(topic, b"two")
    started = time.monotonic()
    tail = run_cli("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                   "-n", "1", "--timeout", "60", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK and tail.stdout == "two\n", describe(tail)
    assert time.monotonic() - started < 30

    tail = run_cli("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                   "--timeout", "1", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK and tail.stdout == "" and tail.stderr == "", describe(tail)


def test_tail_n_gives_the_rest_back_at_once_without_backoff(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """-n 1 on a named channel: what tail does not print goes back for the channel's other
    consumers now, not deferred by requeue_delay x attempts (90 s), and tail never backs off.
    The address is given twice, comma-separated, as a list in an environment variable is."""
    nsqd.create_channel("cli_tail_n", "shared")
    nsqd.mpublish("cli_tail_n", [b"m%d" % i for i in range(8)])
    addresses = f"{nsqd.tcp_address},{nsqd.tcp_address}"
    tail = run_cli("tail", "--topic", "cli_tail_n", "--channel", "shared", "--nsqd-tcp-address", addresses, "-n", "1",
                   "--max-in-flight", "8", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK, describe(tail)
    assert len(tail.stdout.splitlines()) == 1, describe(tail)
    assert "backing off" not in tail.stderr, describe(tail)
    stats = wait_until(lambda: (lambda c: c if c and c.get("in_flight_count") == 0 else None)(nsqd.channel_stats("cli_tail_n", "shared")), 10, message="nothing in flight")
    assert stats["deferred_count"] == 0 and stats["depth"] == 7, stats


def settled_channel(nsqd: NsqdProcess, topic: str, channel: str) -> Dict[str, int]:
    """The channel's stats once nothing is in flight or deferred and no client is subscribed."""
    def settled() -> Optional[Dict[str, int]]:
        stats = nsqd.channel_stats(topic, channel)
        return stats if stats and stats["in_flight_count"] == stats["deferred_count"] == stats["client_count"] == 0 else None

    return wait_until(settled, timeout=10, message=f"{topic}/{channel} settled")


def test_tail_n_on_a_named_channel_burns_no_attempts_and_gives_nothing_up(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """tail -n 1, four times, on a channel other consumers share: each run takes one message
    and prints it; nothing else is delivered to it, requeued or given up, and the rest reaches
    the next consumer at its first attempt. Before, tail held RDY 200: the messages it gave back
    came straight back to it, again and again (requeue_count 34 for 8 messages after three
    runs), and its Reader (max_tries 5) gave them up, FIN: lost for every consumer."""
    import nsq_sync

    topic, channel, total, runs = "cli_tail_attempts", "work", 8, 4
    bodies = [b"m%d" % i for i in range(total)]
    nsqd.create_channel(topic, channel)
    nsqd.mpublish(topic, bodies)
    printed: List[bytes] = []
    for _ in range(runs):
        tail = run_cli("tail", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1",
                       "--backend", backend, env=env)
        assert tail.returncode == EXIT_OK, describe(tail)
        assert "giving up" not in tail.stderr and "Traceback" not in tail.stderr, describe(tail)
        printed += [line.encode() for line in tail.stdout.splitlines()]
        settled_channel(nsqd, topic, channel)
    assert len(printed) == len(set(printed)) == runs and set(printed) <= set(bodies), printed
    stats = settled_channel(nsqd, topic, channel)
    assert stats["depth"] == total - runs, stats  # (none finished unprinted)
    assert stats["requeue_count"] == 0 and stats["timeout_count"] == 0, stats  # (none delivered to tail unprinted)

    attempts: Dict[bytes, int] = {}
    lock = threading.Lock()
    got_all = threading.Event()

    def handle(message: nsq_sync.Message) -> None:
        with lock:
            attempts[message.body] = message.attempts
            if len(attempts) == total - runs:
                got_all.set()

    reader = nsq_sync.Reader(topic, channel, message_handler=handle, nsqd_tcp_addresses=nsqd.tcp_address, max_in_flight=total, backend=backend)
    reader.start()
    try:
        assert got_all.wait(20), attempts
    finally:
        reader.close()
    assert set(attempts) == set(bodies) - set(printed), attempts
    assert set(attempts.values()) == {1}, attempts  # (never delivered before: tail took none of them)


@contextlib.contextmanager
def conventional_nsqd() -> Iterator[NsqdProcess]:
    """A started nsqd whose HTTP port is its TCP port + 1, as nsqd's defaults (4150, 4151) are.
    Two free ports in a row are only free until nsqd binds them (another process may take one
    meanwhile): a start that fails is tried again on other ports."""
    for _ in range(50):
        port = free_port()
        if port >= 65535 or not port_closed(f"127.0.0.1:{port + 1}"):
            continue
        nsqd = NsqdProcess(extra_args=[f"--tcp-address=127.0.0.1:{port}", f"--http-address=127.0.0.1:{port + 1}"])
        try:
            nsqd.start()
        except BrokerStartError as exc:
            nsqd.close()
            if "address already in use" not in str(exc):
                raise
            continue
        try:
            yield nsqd
        finally:
            nsqd.close()
        return
    pytest.fail("no two free ports in a row that nsqd could bind")


def test_tail_refuses_to_take_a_topics_backlog_into_its_ephemeral_channel(env: Dict[str, str], backend: str) -> None:
    """A topic with no channel yet holds 5 messages: tail with its own (ephemeral) channel would
    be its first channel, take all 5 and, when it exits, nsqd would delete the channel with the 4
    it gave back. tail refuses (exit 2, before subscribing: the topic keeps its messages) and
    names the ways on: --channel NAME, --take-backlog. nsqd's HTTP API is found at the TCP port
    + 1. Before, `tail -n 1` printed m0 and the other 4 were gone."""
    topic = "cli_backlog"
    with conventional_nsqd() as nsqd:
        nsqd.mpublish(topic, [b"m%d" % i for i in range(5)])
        tail = run_cli("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--backend", backend, env=env)
        assert tail.returncode == EXIT_USAGE, describe(tail)
        assert tail.stdout == "", describe(tail)
        assert tail.stderr.startswith(f"nsq-sync: error: topic '{topic}' has no channel yet and holds messages (5 on nsqd HTTP {nsqd.http_address})"), describe(tail)
        assert "--channel NAME" in tail.stderr and "--take-backlog" in tail.stderr and tail.stderr.count("\n") == 1, describe(tail)
        stats = nsqd.topic_stats(topic)
        assert stats is not None and stats["depth"] == 5 and stats["channels"] == [], stats  # never subscribed

        # A named channel keeps what tail does not print.
        tail = run_cli("tail", "--topic", topic, "--channel", "kept", "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--backend", backend, env=env)
        assert tail.returncode == EXIT_OK and tail.stdout == "m0\n", describe(tail)
        assert settled_channel(nsqd, topic, "kept")["depth"] == 4


def test_tail_backlog_check_through_lookupd_and_nsqd_http_address(nsq_cluster, env: Dict[str, str], backend: str) -> None:
    """The same refusal when the nsqd are found through nsqlookupd (each producer's HTTP port is
    asked), or given with --nsqd-http-address; --take-backlog goes ahead."""
    nsqd = nsq_cluster.nsqds[0]
    topic = "cli_backlog_lookupd"
    nsqd.mpublish(topic, [b"a", b"b", b"c"])
    nsq_cluster.wait_for_producers(topic, count=1)
    lookupd = ["--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0]]
    direct = ["--nsqd-tcp-address", nsqd.tcp_address, "--nsqd-http-address", nsqd.http_address]
    for where in (lookupd, direct):
        tail = run_cli("tail", "--topic", topic, *where, "-n", "1", "--backend", backend, env=env)
        assert tail.returncode == EXIT_USAGE, describe(tail)
        assert f"holds messages (3 on nsqd HTTP {nsqd.http_address})" in tail.stderr and "--take-backlog" in tail.stderr, describe(tail)
        assert nsqd.topic_depth(topic) == 3 and nsqd.topic_stats(topic)["channels"] == []  # type: ignore[index]
    tail = run_cli("tail", "--topic", topic, *lookupd, "-n", "3", "--take-backlog", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK, describe(tail)
    assert sorted(tail.stdout.splitlines()) == ["a", "b", "c"], describe(tail)


def test_tail_asks_an_nsqd_nsqlookupd_lists_at_its_real_http_port_not_a_guess(nsq_cluster, env: Dict[str, str], backend: str) -> None:
    """--lookupd-http-address and --nsqd-tcp-address of an nsqd nsqlookupd lists (whose HTTP
    port is not its TCP port + 1): the check asks it at the HTTP port nsqlookupd gives, and does
    not refuse over a guess that finds nothing; the topic has a channel, so tail runs."""
    nsqd = nsq_cluster.nsqds[0]
    topic = "cli_backlog_listed"
    assert nsqd.http_port != nsqd.tcp_port + 1, "the test needs an nsqd whose HTTP port is not its TCP port + 1"
    nsqd.create_channel(topic, "other")
    nsq_cluster.wait_for_producers(topic, count=1)
    with CliProcess.nsq_sync("tail", "--topic", topic, "--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0],
                             "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--backend", backend, env=env) as tail:
        def subscribed() -> bool:
            channels = (nsqd.topic_stats(topic) or {}).get("channels") or []
            return any(str(c["channel_name"]).startswith("tail-") and int(c["client_count"]) >= 1 for c in channels) or tail.proc.poll() is not None

        wait_until(subscribed, timeout=20, message="tail subscribed")
        nsqd.publish(topic, b"after")
        assert tail.wait(30) == EXIT_OK, tail.output()
        assert tail.stdout() == ["after"], tail.output()


def assert_refused_unchecked(tail: "subprocess.CompletedProcess[str]", topic: str, *named: str) -> None:
    """tail refused because its backlog check could not be made: exit 2, nothing printed, one
    line saying so, naming *named* (what could not be asked) and every way on."""
    assert tail.returncode == EXIT_USAGE, describe(tail)
    assert tail.stdout == "" and tail.stderr.count("\n") == 1, describe(tail)
    assert tail.stderr.startswith(f"nsq-sync: error: could not check whether topic '{topic}' holds messages that no channel has taken yet ("), describe(tail)
    for text in (*named, "--nsqd-http-address HOST:PORT", "--lookupd-http-address HOST:PORT", "--channel NAME", "--take-backlog"):
        assert text in tail.stderr, f"{text!r} not said\n{describe(tail)}"


def assert_backlog_kept(nsqd: NsqdProcess, topic: str, depth: int) -> None:
    """The topic still holds its *depth* messages and has no channel: nothing subscribed."""
    stats = nsqd.topic_stats(topic)
    assert stats is not None and stats["depth"] == depth and stats["channels"] == [], stats


def test_tail_refuses_when_the_backlog_check_cannot_be_made(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """An nsqd whose HTTP port is not its TCP port + 1 (`nsq-sync cluster`'s, this fixture's),
    named by --nsqd-tcp-address alone: tail's guess finds no HTTP API. Before, tail warned, went
    on, and its ephemeral channel took the topic's backlog: `tail -n 1` printed m0, exit 0, and
    m1..m4 were gone with the channel. Now it refuses (exit 2, one line naming the ways on) and
    the backlog stays; so it does when the --nsqd-http-address or --lookupd-http-address given
    does not answer. With nsqd's real HTTP address the check is made (and refuses for the
    backlog), and --take-backlog still goes ahead."""
    topic = "cli_backlog_unchecked"
    assert nsqd.http_port != nsqd.tcp_port + 1, "the test needs an nsqd whose HTTP port is not its TCP port + 1"  # type: ignore[operator]
    nsqd.mpublish(topic, [b"m%d" % i for i in range(5)])
    guessed = f"127.0.0.1:{nsqd.tcp_port + 1}"  # type: ignore[operator]
    nowhere = f"127.0.0.1:{free_port()}"
    tail = run_cli("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--backend", backend, env=env)
    assert_refused_unchecked(tail, topic, f"nsqd HTTP {guessed}, guessed as TCP port + 1 of {nsqd.tcp_address}")
    assert_backlog_kept(nsqd, topic, 5)
    # A --nsqd-http-address or --lookupd-http-address given that does not answer is a broker
    # down: exit 3 (see the next test), still without subscribing.
    for where, named in (
        (["--nsqd-tcp-address", nsqd.tcp_address, "--nsqd-http-address", nowhere], f"nsqd HTTP {nowhere}: connection refused"),
        (["--lookupd-http-address", nowhere], f"nsqlookupd {nowhere}: connection refused"),
    ):
        tail = run_cli("tail", "--topic", topic, *where, "-n", "1", "--backend", backend, env=env)
        assert_unavailable_unchecked(tail, topic, named)
        assert_backlog_kept(nsqd, topic, 5)

    tail = run_cli("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "--nsqd-http-address", nsqd.http_address,
                   "-n", "1", "--backend", backend, env=env)
    assert tail.returncode == EXIT_USAGE and f"holds messages (5 on nsqd HTTP {nsqd.http_address})" in tail.stderr, describe(tail)
    assert_backlog_kept(nsqd, topic, 5)

    tail = run_cli("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--take-backlog", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK and tail.stdout == "m0\n", describe(tail)


def assert_unavailable_unchecked(tail: "subprocess.CompletedProcess[str]", topic: str, named: str) -> None:
    """tail could not make its backlog check because a broker is down or hung: exit 3 (as pub's
    for the same broker), nothing printed, one line naming *named* and no option the user gave
    already."""
    assert tail.returncode == EXIT_UNAVAILABLE, describe(tail)
    assert tail.stdout == "" and tail.stderr.count("\n") == 1, describe(tail)
    assert tail.stderr.startswith(f"nsq-sync: unavailable: could not check whether topic '{topic}' holds messages that no channel has taken yet ("), describe(tail)
    assert named in tail.stderr and "nothing was consumed" in tail.stderr and "Try again once it answers" in tail.stderr, describe(tail)
    assert "--channel NAME" in tail.stderr and "--take-backlog" in tail.stderr, describe(tail)
    assert "Give --nsqd-http-address" not in tail.stderr, describe(tail)


def test_tail_backlog_check_of_a_hung_or_down_broker_exits_3_and_takes_nothing(nsq_cluster, env: Dict[str, str], backend: str) -> None:
    """An nsqd or nsqlookupd that is frozen (SIGSTOP: connections accepted, nothing answered) or
    gone: the backlog check cannot be made, and that is the broker's state, not the command
    line's. Before, tail exited 2 ("bad arguments") telling the user to give the very
    --nsqd-http-address or --lookupd-http-address they had given, while pub exits 3 for the same
    broker. Now exit 3, within the check's 3 s, and the topic keeps its backlog (tail never
    subscribed)."""
    nsqd, lookupd = nsq_cluster.nsqds[0], nsq_cluster.lookupd
    topic = "cli_backlog_hung"
    nsqd.mpublish(topic, [b"a", b"b"])
    nsq_cluster.wait_for_producers(topic, count=1)
    direct = ["--nsqd-tcp-address", nsqd.tcp_address, "--nsqd-http-address", nsqd.http_address]
    via_lookupd = ["--lookupd-http-address", lookupd.http_address]
    for frozen, where, named in ((nsqd, direct, f"nsqd HTTP {nsqd.http_address}: timed out after 1s"),
                                 (lookupd, via_lookupd, f"nsqlookupd {lookupd.http_address}: timed out after 1s"),
                                 (nsqd, via_lookupd, f"nsqd HTTP {nsqd.http_address}: timed out after 1s")):
        frozen.pause()
        try:
            started = time.monotonic()
            tail = run_cli("tail", "--topic", topic, *where, "-n", "1", "--backend", backend, env=env)
            took = time.monotonic() - started
        finally:
            frozen.resume()
        assert_unavailable_unchecked(tail, topic, named)
        assert took < 20, took
        assert_backlog_kept(nsqd, topic, 2)


@contextlib.contextmanager
def nsqd_with_another_at_tcp_port_plus_1() -> Iterator[Tuple[NsqdProcess, NsqdProcess]]:
    """Two started nsqd, the second's HTTP API on the first's TCP port + 1 (as can happen on
    ports the kernel picks: `nsq-sync cluster`). The port is only free until the second binds
    it: a start that fails is tried again with another pair."""
    for _ in range(50):
        first = NsqdProcess()
        try:
            first.start()
            second = NsqdProcess(extra_args=[f"--http-address=127.0.0.1:{first.tcp_port + 1}"])  # type: ignore[operator]
            try:
                second.start()
            except BrokerStartError as exc:
                second.close()
                if "address already in use" not in str(exc):
                    raise
                continue
            try:
                yield first, second
            finally:
                second.close()
            return
        finally:
            first.close()
    pytest.fail("no nsqd whose TCP port + 1 another nsqd could bind")


def test_tail_does_not_check_the_backlog_at_another_nsqds_http_api(env: Dict[str, str], backend: str) -> None:
    """The guess, TCP port + 1, answers, but it is another nsqd's HTTP API (its /info names
    another TCP port), whose stats say nothing about this nsqd's topic. Before, tail took that
    nsqd's "no such topic" for this one's, went on and took the backlog (exit 0, m0 printed, the
    rest gone). Now it refuses as for a check it could not make."""
    topic = "cli_backlog_foreign"
    with nsqd_with_another_at_tcp_port_plus_1() as (nsqd, other):
        nsqd.mpublish(topic, [b"a", b"b", b"c"])
        tail = run_cli("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1", "--backend", backend, env=env)
        assert_refused_unchecked(tail, topic, f"nsqd HTTP {other.http_address}, guessed as TCP port + 1 of {nsqd.tcp_address}: "
                                              f"it is the HTTP API of another nsqd (TCP port {other.tcp_port})")
        assert_backlog_kept(nsqd, topic, 3)
        assert other.topic_stats(topic) is None


def assert_interrupted_at_once(pub: Any, signum: int, topic: str, also_absent: Tuple[str, ...] = ()) -> None:
    """Signal *pub*, still connecting with nothing sent: it exits 130 within 5 s, its last word
    counts 0 published to *topic*, and nothing it said calls an outcome unknown."""
    signalled = time.monotonic()
    pub.signal(signum)
    code = pub.wait(25)
    elapsed = time.monotonic() - signalled
    assert code == EXIT_INTERRUPTED, pub.output()
    assert elapsed < 5, f"{elapsed:.1f}s after the signal\n{pub.output()}"
    assert pub.stderr()[-1] == f"nsq-sync: interrupted: published 0 message(s) to {topic}", pub.output()
    absent = ("unknown", "Traceback") + also_absent
    assert not any(word in l for l in pub.stderr() for word in absent), pub.output()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_pub_signal_while_waiting_for_a_connection_exits_130_at_once(signum: int, env: Dict[str, str], backend: str) -> None:
    """No nsqd reachable: a signal while pub waits for a connection (nothing sent) ends it at
    once with exit 130 and an exact count. Before, the signal waited for the whole --timeout
    and pub exited 3, "unavailable"."""
    address = f"127.0.0.1:{free_port()}"
    with CliProcess.nsq_sync("pub", "--topic", "cli_pub_wait", "--nsqd-tcp-address", address, "--timeout", "30",
                             "--backend", backend, "x", env=env) as pub:
        pub.wait_for_line(lambda l: f"cannot connect to {address}" in l, stream="stderr", timeout=20)
        assert_interrupted_at_once(pub, signum, "cli_pub_wait", also_absent=("unavailable",))


def test_pub_signal_while_a_frozen_nsqd_does_not_answer_the_handshake_exits_130_at_once(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """A real nsqd frozen (SIGSTOP: its kernel still accepts connections, nothing answers): pub is
    stuck in the handshake, nothing sent, and a signal ends it at once (exit 130, nothing said
    unknown); nsqd, thawed, never got the message. Before, the signal waited out --timeout."""
    topic = "cli_pub_frozen"
    nsqd.pause()
    try:
        with CliProcess.nsq_sync("pub", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "--timeout", "30",
                                 "--backend", backend, "x", env=env) as pub:
            pub.wait_for_line(lambda l: f"cannot connect to {nsqd.tcp_address}" in l and "handshake" in l, stream="stderr", timeout=20)
            assert_interrupted_at_once(pub, signal.SIGINT, topic)
    finally:
        nsqd.resume()
    assert nsqd.topic_stats(topic) is None  # (never published: nsqd does not even have the topic)


def test_pub_signal_during_a_handshake_nsqd_does_not_answer_exits_130_at_once(env: Dict[str, str], backend: str) -> None:
    """A listener that accepts and never answers (an nsqd hung in the handshake): pub is still
    connecting, nothing was sent, so a signal ends it at once and nothing is said unknown.
    Before, the first signal waited out --timeout, and a second one said "nsqd's answer to
    argument 1 is unknown"."""
    received: List[bytes] = []
    accepted = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = "127.0.0.1:%d" % server.getsockname()[1]
        peers: List[socket.socket] = []

        def accept() -> None:
            try:
                peer, _ = server.accept()
            except OSError:
                return
            peers.append(peer)
            peer.settimeout(20)
            try:
                received.append(peer.recv(4))  # the protocol magic, "  V2"
            except OSError:
                pass
            accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        try:
            with CliProcess.nsq_sync("pub", "--topic", "cli_pub_handshake", "--nsqd-tcp-address", address, "--timeout", "30",
                                     "--backend", backend, "x", env=env) as pub:
                assert accepted.wait(20) and received == [b"  V2"], (received, pub.output())
                assert_interrupted_at_once(pub, signal.SIGTERM, "cli_pub_handshake")
        finally:
            for peer in peers:
                peer.close()


def test_a_list_in_one_address_string_is_a_usage_error_naming_it(env: Dict[str, str]) -> None:
    # A library caller that joins addresses with ";" (or passes a comma list to Reader/Writer)
    # gets a ConfigError; the CLI splits commas but refuses ";" with exit 2.
    done = run_cli("pub", "--topic", "t", "--nsqd-tcp-address", "127.0.0.1:4150;127.0.0.1:4151", "x", env=env)
    assert done.returncode == 2, describe(done)
    assert "several addresses in one string" in done.stderr, describe(done)


def test_tail_through_lookupd_stops_on_sigterm(nsq_cluster, env: Dict[str, str], backend: str) -> None:
    nsqd = nsq_cluster.nsqds[0]
    nsqd.create_topic("cli_tail")
    nsq_cluster.wait_for_producers("cli_tail", count=1)
    with CliProcess.nsq_sync("-v", "tail", "--topic", "cli_tail", "--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0],
                             "--lookupd-poll-interval", "0.2", "--backend", backend, env=env) as tail:
        tail.wait_for_line(lambda l: "subscribed to" in l, stream="stderr", timeout=20)
        nsqd.publish("cli_tail", b"first")
        tail.wait_for_line(lambda l: l == "first", timeout=20)
        tail.signal(signal.SIGTERM)
        assert tail.wait(30) == EXIT_OK, tail.output()


# ------------------------------------------------------- stats, topic, channel
def stats_rows(*args: str, env: Dict[str, str]) -> List[Dict[str, Any]]:
    done = run_cli("stats", "--json", *args, env=env)
    assert done.returncode == EXIT_OK and done.stderr == "", describe(done)
    return json.loads(done.stdout)


def test_stats_total_adds_up_each_topic_and_channel_over_the_nsqd(nsq_cluster, env: Dict[str, str]) -> None:
    """--total gives one row per topic and channel, its numbers added up over the nsqd that
    have it, and says on how many (and on how many it is paused). Before, an operator summed
    the per-nsqd rows with jq."""
    from nsq_sync.httpapi import NsqdHTTPClient

    first, second = nsq_cluster.nsqds
    lookupd = ["--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0]]
    for nsqd, bodies in ((first, [b"a", b"b", b"c"]), (second, [b"d", b"e"])):
        nsqd.create_channel("cli_total", "work")
        nsqd.mpublish("cli_total", bodies)
    first.create_channel("cli_total", "audit")  # on one nsqd only
    first.mpublish("cli_total", [b"f"])
    NsqdHTTPClient(second.http_address).pause_channel("cli_total", "work")
    nsq_cluster.wait_for_producers("cli_total", count=2)

    rows = stats_rows(*lookupd, "--topic", "cli_total", "--total", env=env)
    assert rows == [
        {"nsqd": None, "topic": "cli_total", "channel": None, "depth": 0, "in_flight_count": None, "deferred_count": None,
         "client_count": None, "message_count": 6, "requeue_count": None, "timeout_count": None, "paused": False, "nsqd_count": 2,
         "paused_count": 0},
        {"nsqd": None, "topic": "cli_total", "channel": "audit", "depth": 1, "in_flight_count": 0, "deferred_count": 0,
         "client_count": 0, "message_count": 1, "requeue_count": 0, "timeout_count": 0, "paused": False, "nsqd_count": 1, "paused_count": 0},
        {"nsqd": None, "topic": "cli_total", "channel": "work", "depth": 6, "in_flight_count": 0, "deferred_count": 0,
         "client_count": 0, "message_count": 6, "requeue_count": 0, "timeout_count": 0, "paused": False, "nsqd_count": 2, "paused_count": 1},
    ], rows

    table = run_cli("stats", *lookupd, "--topic", "cli_total", "--total", env=env)
    assert table.returncode == EXIT_OK, describe(table)
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["TOPIC", "CHANNEL", "DEPTH", "IN-FLIGHT", "DEFERRED", "CLIENTS", "MESSAGES", "REQUEUES", "TIMEOUTS", "PAUSED", "ON"],
        ["cli_total", "-", "0", "-", "-", "-", "6", "-", "-", "no", "2", "nsqd"],
        ["cli_total", "audit", "1", "0", "0", "0", "1", "0", "0", "no", "1", "nsqd"],
        ["cli_total", "work", "6", "0", "0", "0", "6", "0", "0", "1", "of", "2", "2", "nsqd"],
    ], describe(table)


def test_stats_of_every_nsqd_nsqlookupd_lists_as_a_table_or_json(nsq_cluster, env: Dict[str, str], backend: str) -> None:
    """stats asks every nsqd nsqlookupd lists (at the HTTP port it registered) and shows each
    topic's own depth and each channel's depth, in flight, deferred and clients; --topic and
    --channel filter; an nsqd that does not answer is named and is exit 3, after the rest is
    printed. Before, there was no stats command (exit 2): operators needed curl."""
    import nsq_sync

    first, second = nsq_cluster.nsqds
    lookupd = ["--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0]]
    first.create_channel("cli_stats", "work")
    first.mpublish("cli_stats", [b"a", b"b", b"c"])
    second.mpublish("cli_stats_other", [b"x", b"y"])  # (no channel: the topic keeps them)
    nsq_cluster.wait_for_producers("cli_stats", count=1)
    nsq_cluster.wait_for_producers("cli_stats_other", count=1)
    held: List[Any] = []
    reader = nsq_sync.Reader("cli_stats", "work", message_handler=lambda m: (m.enable_async(), held.append(m)) and None,
                             nsqd_tcp_addresses=first.tcp_address, max_in_flight=1, backend=backend)
    reader.start()
    try:
        wait_until(lambda: (first.channel_stats("cli_stats", "work") or {}).get("in_flight_count") == 1, 20, message="one in flight")
        rows = stats_rows(*lookupd, env=env)
        by_key = {(row["topic"], row["channel"]): row for row in rows}
        assert by_key[("cli_stats", "work")] == {"nsqd": first.http_address, "topic": "cli_stats", "channel": "work", "depth": 2,
                                                "in_flight_count": 1, "deferred_count": 0, "client_count": 1, "message_count": 3,
                                                "requeue_count": 0, "timeout_count": 0, "paused": False}, rows
        assert by_key[("cli_stats", None)]["depth"] == 0 and by_key[("cli_stats", None)]["nsqd"] == first.http_address, rows
        assert by_key[("cli_stats_other", None)]["depth"] == 2 and by_key[("cli_stats_other", None)]["nsqd"] == second.http_address, rows

        assert [(r["topic"], r["channel"]) for r in stats_rows(*lookupd, "--topic", "cli_stats", env=env)] == [("cli_stats", None), ("cli_stats", "work")]
        assert [(r["topic"], r["channel"]) for r in stats_rows(*lookupd, "--channel", "work", env=env)] == [("cli_stats", "work")]

        table = run_cli("stats", "--nsqd-http-address", first.http_address, "--topic", "cli_stats", env=env)
        assert table.returncode == EXIT_OK, describe(table)
        assert [line.split() for line in table.stdout.splitlines()] == [
            ["TOPIC", "CHANNEL", "DEPTH", "IN-FLIGHT", "DEFERRED", "CLIENTS", "MESSAGES", "REQUEUES", "TIMEOUTS", "PAUSED", "NSQD"],
            ["cli_stats", "-", "0", "-", "-", "-", "3", "-", "-", "no", first.http_address],
            ["cli_stats", "work", "2", "1", "0", "1", "3", "0", "0", "no", first.http_address],
        ], describe(table)
    finally:
        reader.close()

    nowhere = f"127.0.0.1:{free_port()}"
    partial = run_cli("stats", "--json", "--nsqd-http-address", f"{first.http_address},{nowhere}", "--topic", "cli_stats", env=env)
    assert partial.returncode == EXIT_UNAVAILABLE, describe(partial)
    assert {row["nsqd"] for row in json.loads(partial.stdout)} == {first.http_address}, describe(partial)
    assert partial.stderr == f"nsq-sync: unavailable: nsqd HTTP {nowhere}: connection refused\n", describe(partial)
    none = run_cli("stats", "--nsqd-http-address", first.http_address, "--topic", "cli_stats_nothing", env=env)
    assert none.returncode == EXIT_OK and none.stdout == "" and none.stderr == "no topic 'cli_stats_nothing' on the nsqd asked\n", describe(none)


def test_stats_show_each_channels_requeues_and_timeouts(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """stats shows how many messages a channel's consumers requeued and how many nsqd timed out
    (nsqd's requeue_count and timeout_count), in the table and the JSON, added up by --total.
    Before, neither was shown: a consumer requeuing or outliving msg_timeout went unseen."""
    import queue

    import nsq_sync

    topic = "cli_stats_requeues"
    nsqd.create_channel(topic, "work")
    nsqd.mpublish(topic, [b"a", b"b"])
    host, port = nsqd.tcp_address.rsplit(":", 1)
    inbox: "queue.Queue[Any]" = queue.Queue()
    conn = nsq_sync.AsyncConn(host, int(port), backend=backend, msg_timeout=1.0)
    conn.on("message", lambda conn, message: inbox.put(message))
    conn.connect()
    try:
        conn.subscribe(topic, "work")
        conn.send_rdy(2)
        first, _second = inbox.get(timeout=10), inbox.get(timeout=10)
        conn.send_rdy(0)  # (nothing comes back here: the requeued one waits in the channel)
        first.requeue(delay=0, backoff=False)
        # the second is never answered: nsqd takes it back after msg_timeout (1 s)
        wait_until(lambda: channel_stats(nsqd, topic, "work")["timeout_count"] == 1, timeout=20, message="the timeout at nsqd")
    finally:
        conn.close(1)
    address = nsqd.http_address
    rows = stats_rows("--nsqd-http-address", address, "--topic", topic, env=env)
    assert [(r["channel"], r["requeue_count"], r["timeout_count"]) for r in rows] == [(None, None, None), ("work", 1, 1)], rows
    table = run_cli("stats", "--nsqd-http-address", address, "--topic", topic, env=env)
    assert table.returncode == EXIT_OK, describe(table)
    lines = table.stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["TOPIC", "CHANNEL", "DEPTH", "IN-FLIGHT", "DEFERRED", "CLIENTS", "MESSAGES", "REQUEUES", "TIMEOUTS", "PAUSED", "NSQD"],
        [topic, "-", "0", "-", "-", "-", "2", "-", "-", "no", address],
        [topic, "work", "2", "0", "0", "0", "2", "1", "1", "no", address],
    ], describe(table)
    # numbers right-aligned under their headings, the rest left-aligned: a tidy table
    heading = lines[0]
    for name in ("REQUEUES", "TIMEOUTS"):
        end = heading.index(name) + len(name)
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in lines[1:]), table.stdout
    totals = stats_rows("--nsqd-http-address", address, "--topic", topic, "--total", env=env)
    assert [(r["channel"], r["requeue_count"], r["timeout_count"]) for r in totals] == [(None, None, None), ("work", 1, 1)], totals


def test_topic_and_channel_actions_on_every_nsqd_say_what_they_did(nsq_cluster, env: Dict[str, str]) -> None:
    """topic/channel create, pause, unpause, empty, delete on every nsqd nsqlookupd lists, one
    line per nsqd saying what was done; a topic an nsqd does not have is skipped there (exit 0
    while some nsqd had it, 1 when none did). Before, there were no such commands (exit 2)."""
    first, second = nsq_cluster.nsqds
    lookupd = ["--lookupd-http-address", nsq_cluster.lookupd_http_addresses[0]]
    topic = "cli_admin"

    def run_ok(*args: str) -> List[str]:
        done = run_cli(*args, *lookupd, env=env)
        assert done.returncode == EXIT_OK and done.stderr == "", describe(done)
        return sorted(done.stdout.splitlines())

    assert run_ok("topic", "create", topic) == sorted(f"created topic '{topic}' on nsqd HTTP {n.http_address}" for n in (first, second))
    assert run_ok("channel", "create", topic, "work") == sorted(
        f"created channel 'work' of topic '{topic}' on nsqd HTTP {n.http_address}" for n in (first, second))
    first.mpublish(topic, [b"a", b"b"])
    assert run_ok("channel", "pause", topic, "work")[0].startswith(f"paused channel 'work' of topic '{topic}' on nsqd HTTP ")
    assert channel_stats(first, topic, "work")["paused"] and channel_stats(second, topic, "work")["paused"]
    run_ok("channel", "unpause", topic, "work")
    assert not channel_stats(first, topic, "work")["paused"]
    run_ok("topic", "pause", topic)
    assert first.topic_stats(topic)["paused"]  # type: ignore[index]
    run_ok("topic", "unpause", topic)
    assert channel_stats(first, topic, "work")["depth"] == 2
    assert f"emptied channel 'work' of topic '{topic}' on nsqd HTTP {first.http_address}: every message in it, in flight and deferred ones too" \
        in run_ok("channel", "empty", topic, "work")
    assert channel_stats(first, topic, "work")["depth"] == 0
    lookupd_http = nsq_cluster.lookupd_http_addresses[0]
    assert run_ok("channel", "delete", topic, "work") == sorted([
        *(f"deleted channel 'work' of topic '{topic}' on nsqd HTTP {n.http_address}, with every message in it" for n in (first, second)),
        f"removed channel 'work' of topic '{topic}' from nsqlookupd HTTP {lookupd_http}'s registry"])
    assert first.channel_stats(topic, "work") is None
    # nsqd unregisters itself as the channel's producer; nsqlookupd forgot the channel only
    # because the command told it to, as nsqadmin does (before, /channels still listed it)
    assert LookupdClient(lookupd_http).channels(topic) == []

    only_first = "cli_admin_one"
    first.create_topic(only_first)
    nsq_cluster.wait_for_producers(only_first, count=1)
    assert run_ok("topic", "delete", only_first) == sorted([
        f"deleted topic '{only_first}' on nsqd HTTP {first.http_address}, with its channels and every message in them",
        f"topic '{only_first}' is not on nsqd HTTP {second.http_address}: nothing deleted there",
        f"removed topic '{only_first}' from nsqlookupd HTTP {lookupd_http}'s registry"])
    assert first.topic_stats(only_first) is None
    assert only_first not in LookupdClient(lookupd_http).topics()
    again = run_cli("topic", "delete", only_first, *lookupd, env=env)
    assert again.returncode == EXIT_FAILED, describe(again)
    assert again.stderr == f"nsq-sync: failed: topic '{only_first}' is not on any nsqd asked (2): nothing deleted\n", describe(again)
    assert again.stdout.splitlines()[-1] == f"topic '{only_first}' is not in nsqlookupd HTTP {lookupd_http}'s registry", describe(again)
    no_topic = run_cli("channel", "create", "cli_admin_none", "c", "--nsqd-http-address", first.http_address, env=env)
    assert no_topic.returncode == EXIT_FAILED and "create it first: nsq-sync topic create" in no_topic.stderr, describe(no_topic)


def test_topic_and_channel_actions_on_a_down_or_hung_nsqd_exit_3(nsqd: NsqdProcess, env: Dict[str, str]) -> None:
    """An nsqd or nsqlookupd that does not answer (nothing listening; frozen, within --timeout)
    is exit 3 naming it and saying how far the action got; a TCP port given for the HTTP one
    (it closes HTTP requests unanswered) is exit 4, which a retry will not fix."""
    nowhere = f"127.0.0.1:{free_port()}"
    down = run_cli("topic", "create", "cli_admin_down", "--nsqd-http-address", f"{nsqd.http_address},{nowhere}", env=env)
    assert down.returncode == EXIT_UNAVAILABLE, describe(down)
    assert down.stdout == f"created topic 'cli_admin_down' on nsqd HTTP {nsqd.http_address}\n", describe(down)
    assert down.stderr == f"nsq-sync: unavailable: nsqd HTTP {nowhere}: connection refused (created on 1 of 2 nsqd)\n", describe(down)
    lookupd_down = run_cli("channel", "delete", "t", "c", "--lookupd-http-address", nowhere, env=env)
    assert lookupd_down.returncode == EXIT_UNAVAILABLE and lookupd_down.stderr == f"nsq-sync: unavailable: nsqlookupd {nowhere}: connection refused\n", describe(lookupd_down)
    not_http = run_cli("stats", "--nsqd-http-address", nsqd.tcp_address, env=env)
    assert not_http.returncode == EXIT_REFUSED and "is this an HTTP port?" in not_http.stderr, describe(not_http)
    nsqd.pause()
    try:
        hung = run_cli("topic", "delete", "cli_admin_down", "--nsqd-http-address", nsqd.http_address, "--timeout", "1", env=env)
    finally:
        nsqd.resume()
    assert hung.returncode == EXIT_UNAVAILABLE, describe(hung)
    # (the request is in nsqd's socket: once resumed, nsqd may carry it out, and the line says so)
    assert hung.stderr == (f"nsq-sync: unavailable: nsqd HTTP {nsqd.http_address}: timed out after 1s (deleted on 0 of 1 nsqd; "
                           "perhaps on 1 more, which did not answer in time but may still carry it out)\n"), describe(hung)


# ---------------------------------------------------------------- TLS and AUTH
def tls_args(tls_files: TLSFiles, *extra: str) -> List[str]:
    return ["--tls", "--tls-ca-file", tls_files.ca_cert, *extra]


def test_pub_tail_and_worker_over_tls(tls_files: TLSFiles, tmp_path: Path, backend: str) -> None:
    """--tls --tls-ca-file against an nsqd that refuses every command sent in clear
    (--tls-required): pub publishes, tail prints, worker consumes. Before, none of them had a
    way to ask for TLS (exit 2), and nothing could be sent to such an nsqd."""
    from nsq_sync.pytest_plugin import started

    topic = "cli_tls"
    nsqd = NsqdProcess(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key, extra_args=["--tls-required=tcp-https"])
    with started(nsqd):
        nsqd.create_channel(topic, "tail")
        nsqd.create_channel(topic, "work")
        address = ["--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend]
        plain = run_cli("pub", "--topic", topic, *address, "--timeout", "2", "clear", env=cli_env())
        assert plain.returncode != EXIT_OK, describe(plain)  # (the nsqd does refuse what is not encrypted)
        pub = run_cli("pub", "--topic", topic, *address, *tls_args(tls_files), "one", "two", env=cli_env())
        assert pub.returncode == EXIT_OK, describe(pub)
        assert channel_stats(nsqd, topic, "tail")["depth"] == 2

        tail = run_cli("tail", "--topic", topic, "--channel", "tail", *address, "-n", "2", *tls_args(tls_files), env=cli_env())
        assert tail.returncode == EXIT_OK, describe(tail)
        assert sorted(tail.stdout.splitlines()) == ["one", "two"], describe(tail)

        (tmp_path / "slow_handler.py").write_text(HANDLER_MODULE)
        out = tmp_path / "processed.txt"
        with CliProcess.nsq_sync("worker", "slow_handler:handle", "--topic", topic, "--channel", "work", *address, *tls_args(tls_files),
                                 env=cli_env({"OUT": str(out)}), cwd=tmp_path) as worker:
            wait_until(lambda: len(processed_bodies(out)) == 2 or worker.proc.poll() is not None, timeout=20, message="2 messages processed")
            worker.signal(signal.SIGTERM)
            assert worker.wait(30) == EXIT_OK, worker.output()
        assert sorted(processed_bodies(out)) == [b"one", b"two"]


def test_tls_verifies_nsqd_unless_told_not_to(tls_nsqd: NsqdProcess, tls_files: TLSFiles, backend: str) -> None:
    """--tls alone trusts the system's CAs, which did not sign the test nsqd's certificate: pub
    is refused (exit 4, OpenSSL's reason said). --tls-insecure-skip-verify connects anyway."""
    args = ["pub", "--topic", "cli_tls_verify", "--nsqd-tcp-address", tls_nsqd.tcp_address, "--timeout", "2", "--backend", backend, "--tls"]
    refused = run_cli(*args, "x", env=cli_env())
    assert refused.returncode == EXIT_REFUSED, describe(refused)
    assert "TLS certificate of" in refused.stderr and "was not accepted" in refused.stderr and "Traceback" not in refused.stderr, describe(refused)
    assert tls_nsqd.topic_stats("cli_tls_verify") is None
    insecure = run_cli(*args, "--tls-insecure-skip-verify", "x", env=cli_env())
    assert insecure.returncode == EXIT_OK, describe(insecure)
    assert tls_nsqd.topic_depth("cli_tls_verify") == 1


def test_mutual_tls_with_a_client_certificate(tls_files: TLSFiles, tmp_path: Path, backend: str) -> None:
    """An nsqd that asks for a client certificate (--tls-client-auth-policy require-verify):
    pub without one is refused (exit 4); with --tls-cert-file and --tls-key-file it
    publishes, and tail with a single file holding both certificate and key prints it."""
    from nsq_sync.pytest_plugin import started

    nsqd = NsqdProcess(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key, tls_root_ca=tls_files.ca_cert,
                       extra_args=["--tls-client-auth-policy=require-verify"])
    both = tmp_path / "client-with-key.pem"
    both.write_text(Path(tls_files.client_cert).read_text() + Path(tls_files.client_key).read_text())
    with started(nsqd):
        args = ["--topic", "cli_mtls", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, *tls_args(tls_files)]
        refused = run_cli("pub", *args, "--timeout", "2", "x", env=cli_env())
        assert refused.returncode == EXIT_REFUSED and "certificate required" in refused.stderr, describe(refused)
        pub = run_cli("pub", *args, "--tls-cert-file", tls_files.client_cert, "--tls-key-file", tls_files.client_key, "signed", env=cli_env())
        assert pub.returncode == EXIT_OK, describe(pub)
        tail = run_cli("tail", *args, "--tls-cert-file", str(both), "-n", "1", "--take-backlog", env=cli_env())
        assert tail.returncode == EXIT_OK, describe(tail)
        assert tail.stdout == "signed\n", describe(tail)


def test_http_commands_over_https_with_a_ca_file_and_client_certificate(tls_files: TLSFiles, tmp_path: Path) -> None:
    """stats, topic and channel at nsqd's https:// address: --tls-ca-file verifies it with the
    test CA, and --tls-cert-file/--tls-key-file answer an nsqd that asks for a client certificate.
    Without them, OpenSSL's reason is said (exit 4) and nothing is done. Before, none of these
    options existed for the HTTP commands (exit 2), so only the system's CAs could be used."""
    from nsq_sync.pytest_plugin import started

    # (--tls-required=tcp-https: the test's own checks go to the plain HTTP port)
    nsqd = NsqdProcess(tls_cert=tls_files.server_cert, tls_key=tls_files.server_key, tls_root_ca=tls_files.ca_cert,
                       extra_args=["--tls-client-auth-policy=require-verify", "--tls-required=tcp-https"])
    both = tmp_path / "client-with-key.pem"
    both.write_text(Path(tls_files.client_cert).read_text() + Path(tls_files.client_key).read_text())
    with started(nsqd):
        address = ["--nsqd-http-address", f"https://{nsqd.https_address}", "--timeout", "5"]
        untrusted = run_cli("topic", "create", "cli_https", *address, env=cli_env())
        assert untrusted.returncode == EXIT_REFUSED and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, describe(untrusted)
        no_certificate = run_cli("topic", "create", "cli_https", *address, "--tls-ca-file", tls_files.ca_cert, env=cli_env())
        assert no_certificate.returncode == EXIT_REFUSED and "CERTIFICATE_REQUIRED" in no_certificate.stderr, describe(no_certificate)
        assert nsqd.topic_stats("cli_https") is None

        mutual = ["--tls-ca-file", tls_files.ca_cert, "--tls-cert-file", tls_files.client_cert, "--tls-key-file", tls_files.client_key]
        created = run_cli("topic", "create", "cli_https", *address, *mutual, env=cli_env())
        assert created.returncode == EXIT_OK and "created topic 'cli_https'" in created.stdout, describe(created)
        channel = run_cli("channel", "create", "cli_https", "archive", *address, "--tls-insecure-skip-verify", "--tls-cert-file", str(both), env=cli_env())
        assert channel.returncode == EXIT_OK, describe(channel)
        nsqd.publish("cli_https", b"x")
        stats = run_cli("stats", *address, *mutual, "--json", env=cli_env())
        assert stats.returncode == EXIT_OK, describe(stats)
        rows = {(row["topic"], row["channel"]): row for row in json.loads(stats.stdout)}
        assert rows[("cli_https", "archive")]["depth"] == 1 and rows[("cli_https", None)]["nsqd"] == f"https://{nsqd.https_address}", rows


def test_auth_secret_from_the_option_or_the_environment(auth_server: AuthServer, auth_nsqd: NsqdProcess, backend: str) -> None:
    """An nsqd that requires AUTH: pub sends the secret of --auth-secret, or of
    $NSQ_SYNC_AUTH_SECRET when the option is not given (the option wins over it); tail reads
    with the secret from the environment. Without a secret, or with one the auth server refuses,
    pub is refused (exit 4, saying why), and no secret is ever printed. Before, neither could be
    given (exit 2)."""
    secret, topic = "cli-s3cret", "cli_auth"
    auth_server.set_secret(secret)
    auth_nsqd.create_channel(topic, "c")
    args = ["pub", "--topic", topic, "--nsqd-tcp-address", auth_nsqd.tcp_address, "--timeout", "2", "--backend", backend]
    pub = run_cli(*args, "--auth-secret", secret, "one", env=cli_env())
    assert pub.returncode == EXIT_OK, describe(pub)
    pub = run_cli(*args, "two", env=cli_env({"NSQ_SYNC_AUTH_SECRET": secret}))
    assert pub.returncode == EXIT_OK, describe(pub)
    assert channel_stats(auth_nsqd, topic, "c")["depth"] == 2
    assert auth_server.requests.count(secret) >= 2, auth_server.requests

    wrong = run_cli(*args, "--auth-secret", "wrong-secret", "three", env=cli_env({"NSQ_SYNC_AUTH_SECRET": secret}))
    assert wrong.returncode == EXIT_REFUSED and "AuthFailedError: E_AUTH_FAILED" in wrong.stderr, describe(wrong)
    assert "wrong-secret" in auth_server.requests and "wrong-secret" not in wrong.stderr + wrong.stdout, describe(wrong)
    missing = run_cli(*args, "four", env=cli_env())
    assert missing.returncode == EXIT_REFUSED and "requires AUTH but no auth_secret was given" in missing.stderr, describe(missing)
    assert channel_stats(auth_nsqd, topic, "c")["depth"] == 2

    tail = run_cli("tail", "--topic", topic, "--channel", "c", "--nsqd-tcp-address", auth_nsqd.tcp_address, "-n", "2", "--backend", backend,
                   env=cli_env({"NSQ_SYNC_AUTH_SECRET": secret}))
    assert tail.returncode == EXIT_OK, describe(tail)
    assert sorted(tail.stdout.splitlines()) == ["one", "two"], describe(tail)
    assert secret not in tail.stderr + pub.stderr


@pytest.mark.parametrize("case", ["wrong-secret", "no-secret", "untrusted-certificate"])
def test_pub_refused_by_nsqd_exits_4_at_once(case: str, auth_server: AuthServer, auth_nsqd: NsqdProcess, tls_nsqd: NsqdProcess,
                                            backend: str) -> None:
    """pub whose every nsqd refuses its handshake (the AUTH secret, or TLS) exits 4 at once with
    the reason, not 3 at the end of --timeout: waiting would not help, and a script that retries
    on 3 (nsqd down) should not retry this. Before, it waited out --timeout and exited 3."""
    secret = "cli-wrong-5e0c2a"
    args = ["pub", "--topic", "cli_refused", "--timeout", "30", "--backend", backend]
    if case == "untrusted-certificate":
        args += ["--nsqd-tcp-address", tls_nsqd.tcp_address, "--tls"]  # (the system's CAs did not sign it)
        said = "was not accepted"
    else:
        args += ["--nsqd-tcp-address", auth_nsqd.tcp_address]
        if case == "wrong-secret":
            args += ["--auth-secret", secret]
        said = "AuthFailedError: E_AUTH_FAILED" if case == "wrong-secret" else "requires AUTH but no auth_secret was given"
    began = time.monotonic()
    proc = run_cli(*args, "one", env=cli_env())
    elapsed = time.monotonic() - began
    assert proc.returncode == EXIT_REFUSED, describe(proc)
    assert elapsed < 20, f"exited after {elapsed:.1f}s of --timeout 30"  # (start-up included; gevent restarts the interpreter)
    assert "nsq-sync: refused: argument 1: " in proc.stderr and said in proc.stderr, describe(proc)
    assert "published 0 message(s) to cli_refused before argument 1" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert secret not in proc.stderr + proc.stdout, describe(proc)
    if case == "wrong-secret":
        assert secret in auth_server.requests


@pytest.mark.parametrize("case", ["wrong-secret", "no-secret", "wrong-secret-with-timeout"])
def test_tail_refused_by_every_nsqd_exits_4_at_once_as_pub_does(case: str, auth_server: AuthServer, auth_nsqd: NsqdProcess,
                                                                 backend: str) -> None:
    """tail whose every nsqd refuses its handshake (the AUTH secret) exits 4 at once with the
    reason, as pub does for the same cause, not 3 ("none reachable, or none has the topic") at
    the end of --timeout, nor never without one. Before, it exited 3 after -n N --timeout, and ran
    until stopped without --timeout."""
    secret = "cli-tail-wrong-41d7"
    auth_server.set_secret("cli-tail-right")
    auth_nsqd.create_channel("cli_tail_refused", "c")
    args = ["tail", "--topic", "cli_tail_refused", "--channel", "c", "--nsqd-tcp-address", auth_nsqd.tcp_address, "--backend", backend]
    if case != "no-secret":
        args += ["--auth-secret", secret]
    if case == "wrong-secret-with-timeout":
        args += ["-n", "1", "--timeout", "30"]
    said = "AuthFailedError: E_AUTH_FAILED" if case != "no-secret" else f"AuthRequiredError: {auth_nsqd.tcp_address} requires AUTH but no auth_secret was given"
    began = time.monotonic()
    proc = run_cli(*args, env=cli_env())
    elapsed = time.monotonic() - began
    assert proc.returncode == EXIT_REFUSED, describe(proc)
    assert elapsed < 20, f"exited after {elapsed:.1f}s"  # (start-up included; gevent restarts the interpreter)
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("nsq-sync: refused: not subscribed to any nsqd: the handshake with every nsqd was refused"), describe(proc)
    assert f"(last errors: {auth_nsqd.tcp_address}: {said}" in last, describe(proc)
    printed = "printed 0 of 1 message(s)" if case == "wrong-secret-with-timeout" else "printed 0 message(s)"
    assert last.endswith(f"; {printed} of cli_tail_refused"), describe(proc)
    assert secret not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr, describe(proc)
    if case != "no-secret":
        assert secret in auth_server.requests


def test_tail_through_nsqlookupd_refused_by_every_nsqd_it_lists_exits_4_at_its_timeout(auth_server: AuthServer, backend: str) -> None:
    """Through nsqlookupd (which may list other nsqd later) tail waits out --timeout, then exits 4
    when every nsqd it tried refused it, not 3: the same cause as pub's exit 4."""
    auth_server.set_secret("cli-tail-right")
    with NsqlookupdProcess() as lookupd, NsqdProcess(lookupd_tcp_addresses=[lookupd.tcp_address],
                                                     extra_args=[f"--auth-http-address={auth_server.address}"]) as nsqd:
        nsqd.create_channel("cli_tail_refused_l", "c")
        wait_until(lambda: lookupd.lookup("cli_tail_refused_l"), timeout=10, message="nsqlookupd lists the nsqd")
        proc = run_cli("tail", "--topic", "cli_tail_refused_l", "--channel", "c", "--lookupd-http-address", lookupd.http_address,
                       "--auth-secret", "cli-tail-wrong", "-n", "1", "--timeout", "3", "--backend", backend, env=cli_env())
    assert proc.returncode == EXIT_REFUSED, describe(proc)
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("nsq-sync: refused: not subscribed to any nsqd: the handshake with every nsqd was refused"), describe(proc)
    assert f"(last errors: {nsqd.tcp_address}: AuthFailedError: E_AUTH_FAILED" in last and last.endswith("; printed 0 of 1 message(s) of cli_tail_refused_l"), describe(proc)


def test_tail_waits_for_an_nsqd_that_is_down_and_exits_3_at_its_timeout(backend: str) -> None:
    """An nsqd that is down is no refusal: tail -n 1 --timeout waits it out and exits 3 (unavailable)."""
    address = f"127.0.0.1:{free_port()}"
    proc = run_cli("tail", "--topic", "cli_tail_down", "--channel", "c", "--nsqd-tcp-address", address, "-n", "1", "--timeout", "2",
                   "--backend", backend, env=cli_env())
    assert proc.returncode == EXIT_UNAVAILABLE, describe(proc)
    assert "nsq-sync: unavailable: not subscribed to any nsqd after 2s (--timeout)" in proc.stderr, describe(proc)


def test_pub_to_nsqds_http_port_exits_4_at_once(nsqd: NsqdProcess, backend: str) -> None:
    """pub given nsqd's HTTP port as --nsqd-tcp-address (the commonest mistake) exits 4 at once,
    saying what answered and what the port probably is. Before, it waited out --timeout and
    exited 3 ("unavailable"), as for an nsqd that is down, which retrying does not fix."""
    began = time.monotonic()
    proc = run_cli("pub", "--topic", "cli_not_nsqd", "--nsqd-tcp-address", nsqd.http_address, "--timeout", "30", "--backend", backend,
                   "one", env=cli_env())
    elapsed = time.monotonic() - began
    assert proc.returncode == EXIT_REFUSED, describe(proc)
    assert elapsed < 20, f"exited after {elapsed:.1f}s of --timeout 30"  # (start-up included; gevent restarts the interpreter)
    assert "nsq-sync: refused: argument 1: " in proc.stderr and "something other than NSQ's protocol" in proc.stderr, describe(proc)
    assert f"{nsqd.http_address} answered IDENTIFY with b'HTTP/1.1 400" in proc.stderr, describe(proc)
    assert "is this nsqd's HTTP port instead of its TCP port?" in proc.stderr, describe(proc)
    assert "published 0 message(s) to cli_not_nsqd before argument 1" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert nsqd.topic_stats("cli_not_nsqd") is None


# ----------------------------------------------------------------- cluster
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_cluster_json_prints_addresses_and_stops_cleanly(signum: int, env: Dict[str, str]) -> None:
    with CliProcess.nsq_sync("cluster", "--json", "--nsqd", "2", env=env) as cluster:
        line = cluster.wait_for_line(lambda l: l.startswith("{"), timeout=30)
        info = json.loads(line)
        assert set(info) == {"lookupd_http_addresses", "lookupd_tcp_addresses", "nsqd_tcp_addresses", "nsqd_http_addresses"}
        assert len(info["nsqd_tcp_addresses"]) == len(info["nsqd_http_addresses"]) == 2
        for address in info["nsqd_http_addresses"] + info["lookupd_http_addresses"]:
            assert http_ok(address), address
        # the nsqd are registered with the nsqlookupd it printed
        nodes = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({}))
                           .open(f"http://{info['lookupd_http_addresses'][0]}/nodes", timeout=5).read())
        assert sorted(n["tcp_port"] for n in nodes["producers"]) == sorted(int(a.rpartition(":")[2]) for a in info["nsqd_tcp_addresses"])
        cluster.signal(signum)
        assert cluster.wait(30) == EXIT_OK, cluster.output()
        assert cluster.stdout() == [line], "--json prints exactly one line"
        assert not any("Traceback" in l for l in cluster.stderr()), cluster.output()
    for address in info["nsqd_tcp_addresses"] + info["lookupd_tcp_addresses"]:
        assert port_closed(address), f"{address} still open after the cluster exited"


def test_cluster_text_output(env: Dict[str, str]) -> None:
    with CliProcess.nsq_sync("cluster", "--nsqd", "1", env=env) as cluster:
        cluster.wait_for_line(lambda l: l.startswith("Ctrl-C stops the cluster"), timeout=30)
        lines = cluster.stdout()
        assert lines[0].startswith("nsqlookupd http: 127.0.0.1:") and "tcp: 127.0.0.1:" in lines[0]
        assert lines[1].startswith("nsqd tcp:  127.0.0.1:")
        assert lines[2].startswith("nsqd http: 127.0.0.1:")
        assert http_ok(lines[2].split()[-1])
        cluster.signal(signal.SIGTERM)
        assert cluster.wait(30) == EXIT_OK, cluster.output()


# ---------------------------------------------- a reader of the output that leaves
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def run_pipeline(command: str, env: Dict[str, str], timeout: float = RUN_TIMEOUT) -> "subprocess.CompletedProcess[bytes]":
    """Run a shell pipeline with pipefail (its status: the last command that failed) in a
    session of its own; on timeout the whole session is killed, the CLI and its brokers too."""
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command!r} did not end within {timeout:g}s\n--- stdout\n{out!r}\n--- stderr\n{err!r}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def close_now(fd: int) -> None:
    """Close *fd* at once. (gevent's patched os.close defers closing a pipe until its hub runs
    a check callback: the reader of a pipe would leave some unknown time later.)"""
    open(fd, "rb", buffering=0).close()


@contextlib.contextmanager
def reader_gone_pipe() -> Iterator[int]:
    """The write end of a pipe whose read end is closed already: every write to it fails with
    EPIPE, and poll() reports it as a pipe without a reader."""
    read_end, write_end = os.pipe()
    close_now(read_end)
    try:
        yield write_end
    finally:
        os.close(write_end)


@contextlib.contextmanager
def reader_gone_socket() -> Iterator[int]:
    """A socket whose peer is closed: writes fail with EPIPE, but it is no pipe, so a command
    learns that its reader left only when it writes."""
    ours, peer = socket.socketpair()
    peer.close()
    try:
        yield ours.fileno()
    finally:
        ours.close()


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_cluster_stops_when_the_reader_of_its_output_leaves(json_output: bool, env: Dict[str, str]) -> None:
    """`nsq-sync cluster | head -1`: once head has its line and leaves, the cluster stops its
    brokers and exits 0 without a word. Before, it ran on (nothing more was written, so no
    EPIPE ever told it), and the pipeline never ended."""
    command = shlex.join(cli_command("cluster", "--nsqd", "1", *(["--json"] if json_output else [])))
    done = run_pipeline(f"{command} | head -{1 if json_output else 2}", env, timeout=40)
    assert done.returncode == EXIT_OK, describe(done)
    assert done.stderr == b"", describe(done)  # (no traceback, no "Exception ignored")
    lines = done.stdout.decode().splitlines()
    if json_output:
        info = json.loads(lines[0])
        addresses = info["nsqd_tcp_addresses"] + info["lookupd_tcp_addresses"] + info["lookupd_http_addresses"]
    else:
        addresses = [lines[0].split()[2], lines[0].split()[4], lines[1].split()[2]]  # lookupd http, tcp; nsqd tcp
    assert len(addresses) == 3 and all(address.startswith("127.0.0.1:") for address in addresses), lines
    for address in addresses:
        assert port_closed(address), f"{address} still open after the cluster exited"


def test_demo_stops_when_the_reader_of_its_output_leaves(env: Dict[str, str], backend: str) -> None:
    """The reader of the demo's stdout leaves while it runs: the demo stops (its brokers too)
    and exits 141 quietly, within a moment, instead of running 50 million messages (or
    --timeout) for a summary nobody will read and ending with a BrokenPipeError traceback."""
    argv = cli_command("demo", "-n", "50000000", "--batch", "1", "--timeout", "50", "--backend", backend)
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(argv, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]  # (a run that cannot start ends them: "")
        assert lines[0].startswith("nsq-sync demo: ") and lines[1].startswith("cluster: nsqlookupd http"), lines
        close_now(read_end)
        read_end = -1
        left = time.monotonic()
        rest = proc.communicate(timeout=30)[1]
        assert proc.returncode == EXIT_BROKEN_PIPE, f"exit {proc.returncode}\n{rest}"
        assert rest == "", rest  # (no traceback, no "Exception ignored")
        assert time.monotonic() - left < 10
    finally:
        if read_end != -1:
            os.close(read_end)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for address in lines[1].split("nsqd tcp ", 1)[1].strip().split(", ") + [lines[1].split("nsqlookupd http ", 1)[1].split(",")[0]]:
        assert port_closed(address), f"{address} still open after the demo exited"


@pytest.mark.parametrize("failed", [False, True], ids=["ok", "timed-out"])
def test_demo_summary_to_a_reader_that_left_exits_quietly(failed: bool, env: Dict[str, str], backend: str) -> None:
    """The summary cannot be written (stdout a socket whose peer closed, where only the write
    tells): exit 141 without a traceback, or 1 for a run that failed, whose exit code says more
    than the pipe's. Before: a BrokenPipeError traceback and exit 1 either way."""
    args = ["demo", "-n", "200", "--json", "-q", "--backend", backend]
    if failed:
        args = ["demo", "-n", "20000", "--threads", "1", "--batch", "1", "--timeout", "0.05", "--json", "-q", "--backend", backend]
    with reader_gone_socket() as stdout:
        done = subprocess.run(cli_command(*args), env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == (EXIT_FAILED if failed else EXIT_BROKEN_PIPE), f"exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert ("timed out after" in done.stderr) if failed else (done.stderr == ""), done.stderr


def test_pub_count_to_a_reader_that_left_exits_141_and_a_failure_keeps_its_code(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """pub's stderr (its count, its failures) is a pipe whose reader left: the messages are
    published and pub exits 141, its report lost; a failure still exits with its own code (3:
    no nsqd). Before, both ended with exit 1 (an uncaught BrokenPipeError)."""
    with reader_gone_pipe() as stderr:
        done = subprocess.run(cli_command("pub", "--topic", "cli_pub_epipe", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, "one", "two"),
                              env=env, stdout=subprocess.PIPE, stderr=stderr, timeout=RUN_TIMEOUT)
        assert done.returncode == EXIT_BROKEN_PIPE and done.stdout == b"", f"exit {done.returncode}"
        assert nsqd.topic_depth("cli_pub_epipe") == 2
        unreachable = f"127.0.0.1:{free_port()}"
        done = subprocess.run(cli_command("pub", "--topic", "cli_pub_epipe", "--nsqd-tcp-address", unreachable, "--timeout", "0.5", "--backend", backend, "x"),
                              env=env, stdout=subprocess.PIPE, stderr=stderr, timeout=RUN_TIMEOUT)
        assert done.returncode == EXIT_UNAVAILABLE and done.stdout == b"", f"exit {done.returncode}"


# ----------------------------------------------------------- bad arguments
def _write_not_callable(directory: Path) -> None:
    (directory / "not_callable_mod.py").write_text("handle = 42\n")


def _write_broken_module(directory: Path) -> None:
    (directory / "broken_mod.py").write_text("import definitely_not_an_installed_module_xyz\n\ndef handle(message):\n    pass\n")


BAD_ARGUMENTS = {
    "bad-topic": (["pub", "--topic", "bad topic!", "x"], "bad topic name"),
    "bad-topic-too-long": (["tail", "--topic", "t" * 65], "bad topic name"),
    "bad-channel": (["worker", "m:f", "--topic", "t", "--channel", "no/slash", "--nsqd-tcp-address", "127.0.0.1:4150"], "bad channel name"),
    "bad-address-no-port": (["pub", "--topic", "t", "--nsqd-tcp-address", "localhost", "x"], "bad address 'localhost'"),
    "bad-address-port": (["tail", "--topic", "t", "--lookupd-http-address", "127.0.0.1:99999"], "bad address"),
    "handler-no-colon": (["worker", "slow_handler", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150"], "must look like module:function"),
    "handler-missing-module": (["worker", "no_such_module_xyz:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150"], "cannot import module 'no_such_module_xyz'"),
    "handler-import-error": (["worker", "broken_mod:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150"], "definitely_not_an_installed_module_xyz"),
    "handler-missing-attribute": (["worker", "not_callable_mod:nope", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150"], "has no 'nope'"),
    "handler-not-callable": (["worker", "not_callable_mod:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150"], "is not callable"),
    "worker-no-address": (["worker", "broken_mod:handle", "--topic", "t", "--channel", "c"], "--nsqd-tcp-address or --lookupd-http-address"),
    "bad-count": (["demo", "-n", "0"], "must be at least 1"),
    "unknown-command": (["frobnicate"], "invalid choice"),
    "library-refuses-value": (["worker", "broken_mod:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--max-tries", "-1"], None),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_exit_2_with_a_message(case: str, tmp_path: Path, env: Dict[str, str], backend: str) -> None:
    args, message = BAD_ARGUMENTS[case]
    _write_not_callable(tmp_path)
    _write_broken_module(tmp_path)
    if case == "library-refuses-value":
        (tmp_path / "ok_mod.py").write_text("def handle(message):\n    pass\n")
        args = [a if a != "broken_mod:handle" else "ok_mod:handle" for a in args]
        message = "max_tries"
    if args[0] in ("pub", "tail", "worker", "demo"):
        args = [*args, "--backend", backend]
    started = time.monotonic()
    proc = run_cli(*args, env=env, cwd=tmp_path, timeout=30)
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert message in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert proc.stdout == ""
    assert time.monotonic() - started < 20


def test_pub_to_unreachable_nsqd_exits_3_quickly(env: Dict[str, str], backend: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run_cli("pub", "--topic", "t", "--nsqd-tcp-address", address, "--timeout", "1", "--backend", backend, "x", env=env, timeout=30)
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_UNAVAILABLE, describe(proc)
    assert "unavailable" in proc.stderr and address in proc.stderr, describe(proc)
    assert "nsq-sync: unavailable: argument 1: " in proc.stderr and "published 0 message(s) to t before argument 1" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert elapsed < 8, f"took {elapsed:.1f}s with --timeout 1"


def _path_without_brokers() -> str:
    keep = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry and not any(os.access(os.path.join(entry, name), os.X_OK) for name in ("nsqd", "nsqlookupd")):
            keep.append(entry)
    return os.pathsep.join(keep)


def _installed_copy(tmp_path: Path) -> Path:
    """A copy of the nsq_sync package outside the checkout (as a pip-installed package would be).

    find_binary() also looks in <checkout>/.cache/nsq-1.3.0/bin next to the package, where
    this checkout keeps the brokers, so an empty NSQ_SYNC_BIN_DIR alone would still find them.
    """
    site = tmp_path / "site"
    shutil.copytree(REPO / "nsq_sync", site / "nsq_sync", ignore=shutil.ignore_patterns("__pycache__"))
    return site


@pytest.mark.parametrize("command", [["demo", "-n", "10"], ["cluster"]], ids=["demo", "cluster"])
def test_missing_broker_binaries_exit_3(command: List[str], tmp_path: Path, backend: str) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    site = _installed_copy(tmp_path)
    env = cli_env({"PATH": _path_without_brokers(), "PYTHONPATH": str(site)}, bin_dir=str(empty))
    args = [*command, "--backend", backend] if command[0] == "demo" else command
    proc = run_cli(*args, env=env, cwd=site, timeout=30)
    assert proc.returncode == EXIT_UNAVAILABLE, describe(proc)
    assert "unavailable" in proc.stderr and "not found" in proc.stderr, describe(proc)
    assert str(empty) in proc.stderr, "the message says where it looked\n" + describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def test_broker_that_does_not_start_exit_3(tmp_path: Path, env: Dict[str, str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("nsqd", "nsqlookupd"):
        script = bin_dir / name
        script.write_text("#!/bin/sh\necho 'FATAL: this broker is broken' >&2\nexit 1\n")
        script.chmod(0o755)
    proc = run_cli("demo", "-n", "10", env=cli_env(bin_dir=str(bin_dir)), timeout=30)
    assert proc.returncode == EXIT_UNAVAILABLE, describe(proc)
    assert "could not start the local NSQ cluster" in proc.stderr, describe(proc)


# -------------------------------------------------------------------- help
COMMANDS = ("demo", "worker", "pub", "tail", "stats", "topic", "channel", "cluster")


def test_version(env: Dict[str, str]) -> None:
    from nsq_sync.__about__ import __version__

    proc = run_cli("--version", env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    assert proc.stdout == f"nsq-sync {__version__}\n" and proc.stderr == "", describe(proc)


def test_help_shows_an_example_for_each_command(env: Dict[str, str]) -> None:
    proc = run_cli("--help", env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    for command in COMMANDS:
        assert f"  nsq-sync {command} " in proc.stdout, f"no example for {command}\n{proc.stdout}"
    assert "exit codes" in proc.stdout and "130" in proc.stdout and "4 refused by nsqd" in proc.stdout and "not nsqd's TCP port" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(command: str, env: Dict[str, str]) -> None:
    proc = run_cli(command, "--help", env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    assert "example:" in proc.stdout and f"nsq-sync {command}" in proc.stdout.split("example:", 1)[1], proc.stdout
    assert "-v, --verbose" in proc.stdout

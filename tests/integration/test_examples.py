"""The runnable examples under docs/examples/, each run the way its docstring says, against
real nsqd v1.3.0; and docs/integrations.md shows exactly their code.

* wsgi_app.py: imported in this process (a gunicorn ``--preload`` master), served by wsgiref in
  a forked child (a worker); 20 requests from 4 threads must all land in nsqd.
* tasks.py: ``python tasks.py TASK ARGS`` publishes, ``nsq-sync worker tasks:handle`` runs them.
* consumer_script.py: a subprocess on ``Reader.run()``; SIGTERM drains it, exit 0.
* gevent_app.py: a monkey-patched subprocess, 50 publishing greenlets and a Reader.

The subprocess machinery comes from test_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import nsq_sync
from nsq_sync.testing import NsqdProcess, wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
INTEGRATIONS = REPO / "docs" / "integrations.md"


from loading import load_module as _load  # noqa: E402  (tests/support)


cli = _load(Path(__file__).with_name("test_cli.py"), "_nsq_sync_cli_test_helpers")
CliProcess = cli.CliProcess


def consume(nsqd: NsqdProcess, topic: str, count: int, backend: str, timeout: float = 20.0) -> List[bytes]:
    """Read *count* messages of *topic* (a fresh channel, so it gets the topic's backlog)."""
    bodies: List[bytes] = []
    lock = threading.Lock()
    done = threading.Event()

    def handle(message: nsq_sync.Message) -> bool:
        with lock:
            bodies.append(message.body)
            if len(bodies) >= count:
                done.set()
        return True

    reader = nsq_sync.Reader(topic, "check", message_handler=handle, nsqd_tcp_addresses=[nsqd.tcp_address],
                             max_in_flight=count, backend=backend)
    reader.start()
    try:
        assert done.wait(timeout), f"got {len(bodies)} of {count} messages of {topic}"
    finally:
        reader.close(5)
    return bodies


# -------------------------------------------------------------------- wsgi
def _post(port: int, payload: Dict[str, Any]) -> Tuple[int, Dict[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/events", data=json.dumps(payload).encode(), method="POST")
    with opener.open(request, timeout=15) as response:
        return response.status, json.loads(response.read())


def _reap(pid: int, timeout: float = 10.0) -> int:
    """Stop the forked server (SIGTERM, then SIGKILL) and return its exit status."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.02)


def test_wsgi_app_preloaded_then_forked(nsqd: NsqdProcess, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    topic = "wsgi_events"
    monkeypatch.setenv("NSQD_TCP_ADDRESSES", nsqd.tcp_address)
    monkeypatch.setenv("NSQ_TOPIC", topic)
    # "gunicorn --preload": the master imports the app, whose module-level Writer connects ...
    app = _load(EXAMPLES / "wsgi_app.py", "wsgi_app_under_test")
    try:
        assert app.writer.wait_connected(10), app.writer
        assert app.writer.backend.name == backend  # chosen automatically
        server = app.make_server(port=0)  # ... and binds the listening socket before forking.
        port = server.server_port
        pid = os.fork()
        if pid == 0:  # a worker: serve until SIGTERM; never return into pytest
            status = 1
            try:
                signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
                server.serve_forever()
                status = 0
            finally:
                os._exit(status)
        server.server_close()  # the master does not serve
        try:
            results: List[Tuple[int, Dict[str, Any]]] = []
            errors: List[BaseException] = []
            lock = threading.Lock()

            def client(first: int) -> None:
                try:
                    for n in range(first, first + 5):
                        answer = _post(port, {"n": n})
                        with lock:
                            results.append(answer)
                except BaseException as exc:  # reported below
                    with lock:
                        errors.append(exc)

            threads = [threading.Thread(target=client, args=(i * 5,), name=f"wsgi-client-{i}") for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert not errors, errors
            assert len(results) == 20
            assert all(status == 200 for status, _ in results), results
            assert {payload["pid"] for _, payload in results} == {pid}, "served by the forked worker"
            assert nsqd.topic_depth(topic) == 20

            # The master's Writer still has its own connection: the child left it alone.
            assert app.writer.pub(topic, b'{"n": "master"}') == b"OK"
        finally:
            status = _reap(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker status {status:#x}"
    finally:
        app.writer.close(5)
    bodies = consume(nsqd, topic, 21, backend)
    assert sorted(json.loads(b)["n"] for b in bodies if b != b'{"n": "master"}') == list(range(20))
    assert bodies.count(b'{"n": "master"}') == 1




def test_wsgi_master_keeps_publishing_while_forked_worker_idles(
    nsqd: NsqdProcess, monkeypatch: pytest.MonkeyPatch, backend: str, request: pytest.FixtureRequest
) -> None:
    """After the fork the master's Writer must keep working while a worker sits idle."""
    topic = "wsgi_idle"
    monkeypatch.setenv("NSQD_TCP_ADDRESSES", nsqd.tcp_address)
    monkeypatch.setenv("NSQ_TOPIC", topic)
    app = _load(EXAMPLES / "wsgi_app.py", "wsgi_app_idle_under_test")
    try:
        assert app.writer.pub(topic, b"before the fork") == b"OK"
        server = app.make_server(port=0)
        port = server.server_port
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
                server.serve_forever()
                status = 0
            finally:
                os._exit(status)
        server.server_close()
        try:
            for n in range(50):  # the worker is idle meanwhile: it has not published yet
                assert app.writer.pub(topic, b"master %d" % n, timeout=2) == b"OK"
            assert _post(port, {"n": "worker"})[0] == 200
        finally:
            status = _reap(pid)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"worker status {status:#x}"
        assert nsqd.topic_depth(topic) == 52
    finally:
        app.writer.close(5)


def test_wsgi_app_errors(nsqd: NsqdProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WSGI callable without a server: 404, 405, 400 and 503 when nsqd is gone."""
    monkeypatch.setenv("NSQD_TCP_ADDRESSES", nsqd.tcp_address)
    app = _load(EXAMPLES / "wsgi_app.py", "wsgi_app_errors_under_test")
    try:
        import io

        def call(method: str, path: str, body: bytes = b"") -> Tuple[str, Dict[str, Any]]:
            seen: List[str] = []
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
            chunks = app.application(environ, lambda status, headers: seen.append(status))
            return seen[0], json.loads(b"".join(chunks))

        assert call("GET", "/healthz")[0] == "200 OK"
        assert call("GET", "/nope")[0] == "404 Not Found"
        assert call("GET", "/events")[0] == "405 Method Not Allowed"
        assert call("POST", "/events")[0] == "400 Bad Request"
        assert call("POST", "/events", b"x")[0] == "200 OK"
        nsqd.stop()
        app.writer.publish_timeout = 1.0
        status, payload = call("POST", "/events", b"y")
        assert status == "503 Service Unavailable", payload
    finally:
        app.writer.close(2)


# ------------------------------------------------------------------- tasks
def test_tasks_module_with_nsq_sync_worker(nsqd: NsqdProcess, backend: str) -> None:
    env = cli.cli_env({"NSQD_TCP_ADDRESSES": nsqd.tcp_address, "TASKS_TOPIC": "tasks"})
    # the producer side, as documented: python tasks.py TASK ARGS
    for args in (["add", "2", "3"], ["send_welcome_email", '"ada@example.com"', '"Ada"']):
        proc = cli.subprocess.run([sys.executable, "tasks.py", *args], cwd=str(EXAMPLES), env=env,
                                  capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, cli.describe(proc)
        assert f"queued {args[0]} on tasks" in proc.stdout
    nsqd.publish("tasks", b"this is not json")  # logged and finished, not retried
    nsqd.publish("tasks", json.dumps({"task": "add", "args": [40], "kwargs": {"y": 2}}).encode())

    with CliProcess.nsq_sync("worker", "tasks:handle", "--topic", "tasks", "--channel", "workers",
                             "--nsqd-tcp-address", nsqd.tcp_address, "--max-in-flight", "4", "--backend", backend,
                             env=env, cwd=EXAMPLES) as worker:
        worker.wait_for_line(lambda l: l == "add(2, 3) = 5")
        worker.wait_for_line(lambda l: l == "email to ada@example.com: Welcome, Ada!")
        worker.wait_for_line(lambda l: l == "add(40, 2) = 42")
        worker.wait_for_line(lambda l: "dropping message" in l and "not a task" in l, stream="stderr")
        wait_until(lambda: cli.channel_stats(nsqd, "tasks", "workers")["message_count"] == 4
                   and cli.channel_stats(nsqd, "tasks", "workers")["in_flight_count"] == 0, timeout=10,
                   message="all four tasks finished")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    stats = cli.channel_stats(nsqd, "tasks", "workers")
    assert stats["depth"] == 0 and stats["requeue_count"] == 0, stats


def test_tasks_module_bad_usage() -> None:
    proc = cli.subprocess.run([sys.executable, "tasks.py", "no_such_task"], cwd=str(EXAMPLES), env=cli.cli_env(),
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "usage:" in proc.stderr, cli.describe(proc)


def test_wsgi_app_script_stops_cleanly_on_sigterm(nsqd: NsqdProcess) -> None:
    env = cli.cli_env({"NSQD_TCP_ADDRESSES": nsqd.tcp_address, "NSQ_TOPIC": "wsgi_script"})
    with CliProcess([sys.executable, str(EXAMPLES / "wsgi_app.py"), "0"], env) as server:
        line = server.wait_for_line(lambda l: l.startswith("serving on http://127.0.0.1:"))
        url = line.split()[2].rstrip(",")
        with urllib.request.urlopen(urllib.request.Request(url + "/events", data=b"from the script", method="POST"), timeout=10) as answer:
            assert json.loads(answer.read())["published"] == len(b"from the script")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.output()
        assert server.stdout()[-1] == "stopped", server.output()
        assert not any("Traceback" in l for l in server.stderr()), server.output()
    stats = nsqd.topic_stats("wsgi_script")
    assert stats is not None and stats["message_count"] == 1, stats


# --------------------------------------------------------- consumer script
def test_consumer_script_runs_until_sigterm(nsqd: NsqdProcess, backend: str) -> None:
    topic = "script_events"
    env = cli.cli_env({"NSQD_TCP_ADDRESSES": nsqd.tcp_address})
    runner = [sys.executable, "-m", "gevent.monkey"] if backend == "gevent" else [sys.executable]
    script = [*runner, str(EXAMPLES / "consumer_script.py"), topic, "printer"]
    with CliProcess(script, env) as consumer:
        consumer.wait_for_line(lambda l: l.startswith(f"consuming {topic}/printer from {nsqd.tcp_address}"))
        nsqd.mpublish(topic, [b"one", b"two", b"three"])
        for body in ("one", "two", "three"):
            consumer.wait_for_line(lambda l, body=body: l == f"message 1 {body}")
        consumer.signal(signal.SIGTERM)
        assert consumer.wait(30) == 0, consumer.output()
        assert consumer.stdout()[-1] == "stopped after 3 messages", consumer.output()
        assert not any("Traceback" in l for l in consumer.stderr()), consumer.output()
    stats = cli.channel_stats(nsqd, topic, "printer")
    assert stats["message_count"] == 3 and stats["depth"] == 0 and stats["in_flight_count"] == 0, stats


def test_consumer_script_addresses_from_argv_and_errors(nsqd: NsqdProcess) -> None:
    env = cli.cli_env()
    env.pop("NSQD_TCP_ADDRESSES", None)
    env.pop("NSQLOOKUPD_HTTP_ADDRESSES", None)
    missing = cli.subprocess.run([sys.executable, str(EXAMPLES / "consumer_script.py"), "t", "c"], env=env,
                                 capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "--nsqd-tcp-address" in missing.stderr, cli.describe(missing)
    with CliProcess([sys.executable, str(EXAMPLES / "consumer_script.py"), "argv_topic", "c",
                     "--nsqd-tcp-address", nsqd.tcp_address], env) as consumer:
        consumer.wait_for_line(lambda l: l.startswith("consuming argv_topic/c"))
        nsqd.publish("argv_topic", b"x")
        consumer.wait_for_line(lambda l: l == "message 1 x")
        consumer.signal(signal.SIGINT)
        assert consumer.wait(30) == 0, consumer.output()
        assert consumer.stdout()[-1] == "stopped after 1 messages"


# ------------------------------------------------------------------ gevent
def test_gevent_app(nsqd: NsqdProcess) -> None:
    proc = cli.subprocess.run([sys.executable, str(EXAMPLES / "gevent_app.py"), nsqd.tcp_address], env=cli.cli_env(),
                              capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, cli.describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "backend gevent", cli.describe(proc)
    assert re.fullmatch(r"published 50 messages from 50 greenlets in [0-9.]+s", lines[1]), cli.describe(proc)
    assert re.fullmatch(r"received 50 messages in [0-9.]+s", lines[2]), cli.describe(proc)
    assert "Traceback" not in proc.stderr, cli.describe(proc)
    topic = next(t["topic_name"] for t in nsqd.stats()["topics"] if t["topic_name"].startswith("gevent_app."))
    stats = cli.channel_stats(nsqd, topic, "app")
    assert stats["message_count"] == 50 and stats["depth"] == 0 and stats["in_flight_count"] == 0, stats


# -------------------------------------------------------------------- docs
EXAMPLE_FILES = ("wsgi_app.py", "tasks.py", "consumer_script.py", "gevent_app.py")


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_integrations_page_shows_the_example_code(name: str) -> None:
    """docs/integrations.md links each example and includes its code verbatim."""
    text = INTEGRATIONS.read_text()
    assert f"(examples/{name})" in text, f"no link to examples/{name}"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert (EXAMPLES / name).read_text() in blocks, f"docs/integrations.md does not show the current docs/examples/{name}"


MIGRATING = REPO / "docs" / "migrating.md"


def doc_block(path: Path, heading: str) -> str:
    """The first python block after *heading* in *path*."""
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    return re.findall(r"```python\n(.*?)```", text[start:], flags=re.S)[0]


def test_migrating_batching_snippet_runs_with_concurrent_handlers(nsqd: NsqdProcess, caplog: pytest.LogCaptureFixture) -> None:
    """docs/migrating.md's pynsq batching pattern with a lock, run as written (its address made
    this nsqd's, and start() in place of run()) with the default concurrency (10 workers):
    every message saved once, in batches of about 9, nothing raised or logged as an error. Its
    unguarded pynsq original answered batches twice (AlreadyRespondedError) and lost messages."""
    code = doc_block(MIGRATING, "### Handlers run concurrently")
    assert '"127.0.0.1:4150"' in code and code.rstrip().endswith("reader.run()"), code
    code = code.replace('"127.0.0.1:4150"', repr(nsqd.tcp_address)).rstrip()[: -len("reader.run()")] + "reader.start()\n"
    total = 90
    nsqd.create_channel("events", "batcher")
    nsqd.mpublish("events", [b"%d" % n for n in range(total)])
    namespace: Dict[str, Any] = {"__name__": "migrating_snippet"}
    sizes: List[int] = []

    def exec_snippet() -> None:
        exec(compile(code, str(MIGRATING), "exec"), namespace)

    exec_snippet()
    reader = namespace["reader"]
    try:
        save_all = namespace["save_all"]
        namespace["save_all"] = lambda bodies: (sizes.append(len(bodies)), save_all(bodies))  # (looked up at each call)

        def all_handled() -> bool:  # (each message saved, or held in the buffer: the burst's tail)
            with namespace["lock"]:
                return len(namespace["saved"]) + len(namespace["buffer"]) == total

        wait_until(all_handled, 20, message="every message saved or buffered")
        with namespace["lock"]:
            saved, left = list(namespace["saved"]), list(namespace["buffer"])
            for message in left:  # (the tail of the burst, fewer than a batch: answered here)
                message.finish()
            del namespace["buffer"][:]
        assert len(saved) == len(set(saved)) and len(left) < 9, (sizes, len(left))
        assert sum(1 for size in sizes if size >= 8) >= 0.8 * len(sizes), sizes
        assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]
    finally:
        reader.close(10)

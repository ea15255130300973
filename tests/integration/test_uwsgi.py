"""A module-level Writer under a real uWSGI (a test dependency), in its three ways of loading an app.

uWSGI forks its workers in C: Python's at-fork hooks do not run, and by default the app is
imported in the master before the fork. A Writer that started its threads there hung every
worker on its first request (a thread of ours held the GIL when uWSGI forked), and a worker
would otherwise have taken the master's socket for its own. The Writer now waits for its first
use when uWSGI made it before the workers, and compares process ids itself under uWSGI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from nsq_sync.testing import NsqdProcess, wait_until
from wsgi_servers import REPO, ServerProcess, server_binary  # tests/support

pytestmark = pytest.mark.integration

APP = REPO / "tests" / "support" / "uwsgi_app.py"


def _uwsgi(nsqd: NsqdProcess, options: List[str], log: Path, app: Path = APP, **env: str) -> ServerProcess:
    argv = [server_binary("uwsgi"), "--http-socket", "127.0.0.1:{port}", "--wsgi-file", app.name, "--die-on-term",
            "--need-app", "--disable-logging", *options]
    return ServerProcess(argv, app.parent, nsqd.tcp_address, log, **env)


@pytest.fixture
def uwsgi(nsqd: NsqdProcess, tmp_path: Path) -> Iterator[Any]:
    started: List[ServerProcess] = []

    def start(*options: str, app: Path = APP, **env: str) -> ServerProcess:
        server = _uwsgi(nsqd, list(options), tmp_path / f"uwsgi-{len(started)}.log", app, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


MODES = {
    # the default: the app is imported in the master, which then forks the workers
    "prefork": ["--master", "--processes", "2", "--threads", "2"],
    # each worker imports the app itself, after the fork
    "lazy-apps": ["--master", "--processes", "2", "--lazy-apps"],
    # no master: the one process imports the app as "worker 0", then serves as worker 1
    "single": ["--processes", "1"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_module_level_writer_publishes_from_every_worker(nsqd: NsqdProcess, uwsgi: Any, mode: str) -> None:
    server = uwsgi(*MODES[mode])
    seen: Dict[int, Dict[str, Any]] = {}
    answers = []
    for _ in range(40):
        report = server.get("/pub")
        answers.append(report["answer"])
        seen.setdefault(report["pid"], report)
    assert answers == ["OK"] * 40
    assert nsqd.topic_depth("uwsgi") == 40
    for pid, report in seen.items():
        assert len(report["ports"]) == 1, report  # its own connection, one per worker
        if mode == "prefork":
            assert report["imported_in"] == report["master"] != pid  # really made in the master
    ports = [report["ports"][0] for report in seen.values()]
    assert len(set(ports)) == len(ports), seen  # no worker uses another's (or the master's) socket
    # nsqd sees one producer connection per worker that published, and none from the master
    producers = wait_until(lambda: nsqd.stats().get("producers"), timeout=5, message="nsqd's producers")
    assert sorted(int(p["remote_address"].rsplit(":", 1)[1]) for p in producers) == sorted(ports)


def test_worker_threads_answer_heartbeats_between_requests(nsqd: NsqdProcess, uwsgi: Any) -> None:
    """nsqd closes a connection that leaves two heartbeats (here 2 s) unanswered; the worker's
    own reader thread answers them while no request runs."""
    server = uwsgi("--master", "--processes", "1")  # one worker (app imported in the master), so every request reaches the same one
    first = server.get("/pub")
    assert first["answer"] == "OK"
    wait_until(lambda: server.get("/heartbeats")["heartbeats"] >= 3, timeout=15, interval=0.5,
               message="three heartbeats read by the worker")
    again = server.get("/pub")
    assert again["answer"] == "OK"
    assert again["pid"] == first["pid"] and again["ports"] == first["ports"]  # the same connection lived on


@pytest.mark.parametrize("options", [
    pytest.param(["--master", "--processes", "4", "--threads", "8"], id="threads"),  # the documented command
    pytest.param(["--master", "--processes", "2", "--gevent", "10", "--gevent-monkey-patch"], id="gevent-loop"),
])
def test_documented_wsgi_example_under_uwsgi(nsqd: NsqdProcess, uwsgi: Any, options: List[str]) -> None:
    """docs/examples/wsgi_app.py with the uWSGI command its docstring gives (a port of our own), and
    on uWSGI's gevent loop engine, monkey-patched before the app is imported (the Writer then
    runs on the gevent backend)."""
    example = REPO / "docs" / "examples" / "wsgi_app.py"
    documented = "uwsgi --master --processes 4 --threads 8 --http-socket :8000 --wsgi-file wsgi_app.py"
    assert documented in example.read_text()
    server = uwsgi(*options, app=example)
    pids = set()
    for n in range(20):
        report = server.get("/events", json.dumps({"n": n}).encode())
        assert report["topic"] == "web_events", report
        pids.add(report["pid"])
    assert nsqd.topic_depth("web_events") == 20
    assert server.proc.pid not in pids  # answered by the workers, not the master


def test_reader_started_in_the_master_warns(nsqd: NsqdProcess, uwsgi: Any) -> None:
    server = uwsgi("--master", "--processes", "1", START_READER="1")
    wait_until(lambda: "started in uWSGI's master process" in server.log_text(),
               timeout=10, message="the Reader's warning in uWSGI's log")
    text = server.log_text()
    assert "Start Readers in the workers (uWSGI --lazy-apps, or a postfork hook)" in text
    server.stop(wait=0)  # its worker may well be the hung one the warning is about

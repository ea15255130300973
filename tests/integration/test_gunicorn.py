"""docs/examples/wsgi_app.py under a real gunicorn (a test dependency), as its docstring runs it.

gunicorn forks its workers with os.fork(), after importing the app in the master when
``--preload`` is given: the module-level Writer's at-fork hook runs, and each worker connects
on its first publish. With ``-k gevent`` the worker monkey-patches itself after the fork, so
the Writer made in the (unpatched) master goes on in a patched worker.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from nsq_sync.testing import NsqdProcess
from wsgi_servers import REPO, ServerProcess, server_binary  # tests/support

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "docs" / "examples" / "wsgi_app.py"


@pytest.fixture
def gunicorn(nsqd: NsqdProcess, tmp_path: Path) -> Iterator[Any]:
    started: List[ServerProcess] = []

    def start(*options: str) -> ServerProcess:
        argv = [server_binary("gunicorn"), "--bind", "127.0.0.1:{port}", "--graceful-timeout", "5", *options,
                "wsgi_app:application"]
        server = ServerProcess(argv, EXAMPLE.parent, nsqd.tcp_address, tmp_path / f"gunicorn-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _post_from_threads(server: ServerProcess, count: int, threads: int = 4) -> List[Dict[str, Any]]:
    """*count* POST /events from *threads* client threads at once (so several workers answer)."""
    reports: List[Dict[str, Any]] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        for n in range(offset, count, threads):
            report = server.get("/events", json.dumps({"n": n}).encode())
            with lock:
                reports.append(report)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return reports


@pytest.mark.parametrize("options", [
    pytest.param(["--preload", "-w", "4", "--threads", "8"], id="preload-threads"),  # the documented command
    pytest.param(["--preload", "-w", "2", "-k", "gevent"], id="preload-gevent"),
])
def test_documented_example_under_gunicorn(nsqd: NsqdProcess, gunicorn: Any, options: List[str]) -> None:
    if options[-1] == "8":
        assert "gunicorn --preload -w 4 --threads 8 wsgi_app:application" in EXAMPLE.read_text()
    server = gunicorn(*options)
    reports = _post_from_threads(server, 40)
    assert len(reports) == 40 and {r["topic"] for r in reports} == {"web_events"}, reports[:3]
    assert nsqd.topic_depth("web_events") == 40
    assert server.proc.pid not in {r["pid"] for r in reports}  # the workers answered, not the master

"""A WSGI app for tests/integration/test_uwsgi.py, served by a real uWSGI.

Like docs/examples/wsgi_app.py, it makes ONE Writer when uWSGI imports it: in the master, before
the workers are forked, unless uWSGI runs with --lazy-apps. Heartbeats come every second, so a
worker whose threads did not run between requests loses its connection within two seconds.

    GET /pub         publish one message; JSON: pid, master pid, answer, the connection's local port
    GET /heartbeats  JSON: how many heartbeats this worker's connection has read

With START_READER set it also starts a Reader when imported, which logs a warning in the master.
"""

import json
import os

import uwsgi  # only importable inside uWSGI

import nsq_sync

IMPORTED_IN = os.getpid()
writer = nsq_sync.Writer([os.environ["NSQD_TCP_ADDRESS"]], heartbeat_interval=1, backend="thread", name="uwsgi-test")
heartbeats = []
watched = set()
if os.environ.get("START_READER"):  # a Reader started in the master: it warns
    reader = nsq_sync.Reader("uwsgi", "c", message_handler=lambda message: True,
                             nsqd_tcp_addresses=[os.environ["NSQD_TCP_ADDRESS"]], backend="thread")
    reader.start()


def _watch() -> None:
    for conn in writer.conns.values():
        if id(conn) not in watched:
            watched.add(id(conn))
            conn.on("heartbeat", lambda **_: heartbeats.append(1))


def application(environ, start_response):
    report = {"pid": os.getpid(), "master": uwsgi.masterpid(), "imported_in": IMPORTED_IN}
    if environ["PATH_INFO"] == "/pub":
        try:
            report["answer"] = writer.pub("uwsgi", b"from %d" % os.getpid(), timeout=5).decode()
        except nsq_sync.Error as exc:
            report["answer"] = repr(exc)
        _watch()
        report["ports"] = [conn._raw_sock.getsockname()[1] for conn in writer.conns.values()]
    else:
        report["heartbeats"] = len(heartbeats)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(report).encode()]

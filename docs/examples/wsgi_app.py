"""A WSGI app that publishes to NSQ from its request handlers through ONE module-level Writer.

    NSQD_TCP_ADDRESSES=127.0.0.1:4150 python wsgi_app.py 8000      # wsgiref, for trying it out
    NSQD_TCP_ADDRESSES=127.0.0.1:4150 gunicorn --preload -w 4 --threads 8 wsgi_app:application
    NSQD_TCP_ADDRESSES=127.0.0.1:4150 uwsgi --master --processes 4 --threads 8 --http-socket :8000 --wsgi-file wsgi_app.py

    curl -X POST --data-binary '{"user": 42}' http://127.0.0.1:8000/events

The Writer is created when the module is imported. Every request thread shares it: publishing
blocks only the calling request until nsqd answers OK, and concurrent publishes pipeline on the
same connection. With ``gunicorn --preload`` the import happens once in the master, which then
forks the workers; the Writer notices the fork on its first publish in a worker and opens that
worker's own connections, leaving the master's sockets alone. uWSGI also imports the app in its
master by default; there the Writer connects on its first use, in the worker. Nothing here
depends on gunicorn or uWSGI: any WSGI server works, and the tests use wsgiref (below) and uWSGI.
"""

from __future__ import annotations

import json
import os
import sys

import nsq_sync

NSQD_TCP_ADDRESSES = os.environ.get("NSQD_TCP_ADDRESSES", "127.0.0.1:4150").split(",")
TOPIC = os.environ.get("NSQ_TOPIC", "web_events")
MAX_BODY = 1024 * 1024

# One Writer for the whole process (and, after a fork, one per worker process).
writer = nsq_sync.Writer(NSQD_TCP_ADDRESSES, publish_timeout=5.0)


def _respond(start_response, status, payload):
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    """POST /events publishes the request body; GET /healthz answers ok."""
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    if path == "/healthz":
        return _respond(start_response, "200 OK", {"status": "ok", "pid": os.getpid()})
    if path != "/events":
        return _respond(start_response, "404 Not Found", {"error": "not found"})
    if method != "POST":
        return _respond(start_response, "405 Method Not Allowed", {"error": "use POST"})
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if not 0 < length <= MAX_BODY:
        return _respond(start_response, "400 Bad Request", {"error": f"send a body of 1 to {MAX_BODY} bytes"})
    body = environ["wsgi.input"].read(length)
    try:
        writer.pub(TOPIC, body)  # returns when nsqd has the message
    except nsq_sync.Error as exc:  # NoConnectionsError, TimeoutError, a ServerError, ...
        return _respond(start_response, "503 Service Unavailable", {"error": f"{type(exc).__name__}: {exc}"})
    return _respond(start_response, "200 OK", {"published": length, "topic": TOPIC, "pid": os.getpid()})


def make_server(host="127.0.0.1", port=8000):
    """A threaded wsgiref server for *application* (one thread per request)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as _make_server

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

    return _make_server(host, port, application, server_class=ThreadingWSGIServer, handler_class=QuietHandler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (docker stop, systemd) stops the server like Ctrl-C


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    server = make_server(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
    print(f"serving on http://127.0.0.1:{server.server_port}, publishing to {TOPIC} on {NSQD_TCP_ADDRESSES}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        writer.close()  # waits for publishes still in flight
        print("stopped", flush=True)

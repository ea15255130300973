"""Celery-style tasks over NSQ: ``add.delay(2, 3)`` publishes, ``nsq-sync worker`` runs them.

Producer (a web request, a script, another task)::

    import tasks
    tasks.add.delay(2, 3)                      # or from a shell: python tasks.py add 2 3

Consumer, as many processes as you like (each message goes to one of them)::

    nsq-sync worker tasks:handle --topic tasks --channel workers \\
        --lookupd-http-address 127.0.0.1:4161 --max-in-flight 10

A task is a plain function registered with ``@task``. Its message is JSON:
``{"task": "add", "args": [2, 3], "kwargs": {}}``. When the function returns the message is
finished; when it raises, the message is requeued with backoff and retried up to the worker's
``--max-tries``. A message that is not a task (bad JSON, unknown name) is logged and finished:
retrying it would not help.

Environment: NSQD_TCP_ADDRESSES (comma-separated, for ``delay()``), TASKS_TOPIC (default "tasks").
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

import nsq_sync

TOPIC = os.environ.get("TASKS_TOPIC", "tasks")

logger = logging.getLogger("tasks")
_registry = {}
_writer = None
_writer_lock = threading.Lock()
_output_lock = threading.Lock()  # tasks run on several worker threads at once


def say(text):
    with _output_lock:
        print(text, flush=True)


def task(fn):
    """Register *fn* as a task and give it ``fn.delay(*args, **kwargs)``."""
    _registry[fn.__name__] = fn
    fn.delay = lambda *args, **kwargs: send(fn.__name__, *args, **kwargs)
    return fn


def _get_writer():
    """The process's Writer, created on first use (so importing this module connects nowhere)."""
    global _writer
    with _writer_lock:
        if _writer is None:
            addresses = os.environ.get("NSQD_TCP_ADDRESSES", "127.0.0.1:4150").split(",")
            _writer = nsq_sync.Writer(addresses)
        return _writer


def send(name, *args, **kwargs):
    """Publish one task; returns when nsqd has it (raises nsq_sync.Error otherwise)."""
    if name not in _registry:
        raise KeyError(f"no task named {name!r}")
    body = json.dumps({"task": name, "args": args, "kwargs": kwargs}).encode()
    _get_writer().pub(TOPIC, body)


def handle(message):
    """The consumer entry point: ``nsq-sync worker tasks:handle ...``."""
    try:
        job = json.loads(message.body)
        fn = _registry[job["task"]]
        args, kwargs = list(job.get("args", ())), dict(job.get("kwargs", {}))
    except (ValueError, KeyError, TypeError) as exc:
        logger.error("dropping message %s: not a task (%s)", message.id.decode(), exc)
        return True  # finish it
    fn(*args, **kwargs)  # an exception here requeues the message (with backoff)
    return True


# ---------------------------------------------------------------- the tasks
@task
def add(x, y):
    say(f"add({x}, {y}) = {x + y}")
    return x + y


@task
def send_welcome_email(address, name="there"):
    say(f"email to {address}: Welcome, {name}!")


if __name__ == "__main__":
    # python tasks.py TASK [ARG ...]: publish one task; arguments are JSON where they parse.
    if len(sys.argv) < 2 or sys.argv[1] not in _registry:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(sorted(_registry))}}} [ARG ...]")

    def parse(text):
        try:
            return json.loads(text)
        except ValueError:
            return text

    try:
        send(sys.argv[1], *[parse(a) for a in sys.argv[2:]])
    except nsq_sync.Error as exc:
        sys.exit(f"could not publish: {type(exc).__name__}: {exc}")
    finally:
        if _writer is not None:
            _writer.close()
    print(f"queued {sys.argv[1]} on {TOPIC}", flush=True)

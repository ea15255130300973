"""nsq_sync through its public API: Reader (or AsyncConn) and Writer.

Spec keys used here besides the common ones:
  backend   "thread" | "gevent" (gevent: monkey-patch everything before any import)
  variant   "reader" (nsq_sync.Reader, falls back to AsyncConn while it does not exist)
            | "asyncconn" (AsyncConn + message.finish(), RDY sent once)
"""

import json
import sys

_SPEC = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
if _SPEC.get("backend") == "gevent":
    from gevent import monkey

    monkey.patch_all()

import itertools  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Meter,
    Pacer,
    current_rss_mb,
    latency_summary,
    load_spec,
    make_bodies,
    make_body,
    split_address,
    stamp_of,
    stamped_body,
)


def conn_kwargs(spec):
    kwargs = {"output_buffer_timeout": spec.get("output_buffer_timeout", 250)}
    compression = spec.get("compression", "none")
    if compression == "snappy":
        kwargs["snappy"] = True
    elif compression == "deflate":
        kwargs["deflate"] = True
    return kwargs


def reader_class(nsq_sync):
    """nsq_sync.Reader; while it is not exported yet, nsq_sync.reader.Reader if that module exists."""
    cls = getattr(nsq_sync, "Reader", None)
    if cls is not None:
        return cls, "Reader"
    try:
        from nsq_sync.reader import Reader as cls
    except ImportError:
        return None, None
    return cls, "Reader (nsq_sync.reader, not exported yet)"


class Consumer:
    """Consume with the public API; ``on_body(body)`` runs in the handler; finish happens per message."""

    def __init__(self, nsq_sync, spec, n, on_body=None, on_done=None):
        self.n = n
        self.counter = itertools.count(1)
        self.done = threading.Event()
        self.on_body = on_body
        self.on_done = on_done
        self.used = None
        self.closer = None
        address = spec["address"]
        variant = spec.get("variant", "reader")
        backend = spec.get("backend", "thread")
        kwargs = conn_kwargs(spec)
        mif = spec["max_in_flight"]
        cls, label = reader_class(nsq_sync) if variant == "reader" else (None, None)
        if cls is not None:
            self.used = label

            def handler(message):
                if on_body is not None:
                    on_body(message.body)
                self._count()
                return True

            reader = cls(
                spec["topic"],
                spec["channel"],
                message_handler=handler,
                nsqd_tcp_addresses=[address],
                max_in_flight=mif,
                backend=backend,
                **kwargs,
                **spec.get("reader_kwargs", {}),  # experiments, e.g. {"concurrency": 1}
            )
            if hasattr(reader, "start"):
                reader.start()  # idempotent; pynsq-style Readers may also start on their own
            self.closer = reader.close
        else:
            self.used = "AsyncConn"
            host, port = split_address(address)
            conn = nsq_sync.AsyncConn(host, port, backend=backend, **kwargs)

            def on_message(conn, message):
                message.finish()
                if on_body is not None:
                    on_body(message.body)
                self._count()

            conn.on("message", on_message)
            conn.connect()
            conn.subscribe(spec["topic"], spec["channel"])
            conn.send_rdy(mif)
            self.closer = conn.close

    def _count(self):
        if next(self.counter) == self.n:
            if self.on_done is not None:
                self.on_done()
            self.done.set()

    def close(self):
        try:
            self.closer()
        except Exception as exc:  # the numbers are in; report, do not fail
            sys.stderr.write(f"close failed: {exc!r}\n")


def main():
    spec = load_spec()
    scenario = spec["scenario"]
    address = spec["address"]
    topic = spec["topic"]
    n = spec["n"]
    size = spec["body_size"]
    backend = spec.get("backend", "thread")
    timeout = spec.get("timeout", 600)
    meter = Meter()

    if scenario == "rss":
        import nsq_sync

        writer = nsq_sync.Writer([address], backend=backend)
        writer.pub(topic, make_body(size))
        meter.begin()
        meter.end(1, rss_now_mb=current_rss_mb())
        writer.close()
        return

    import nsq_sync

    if spec.get("variant", "reader") == "reader":
        # Reader loads on first use (nsq_sync.__getattr__); load it before any clock starts,
        # as the peers' clients import theirs first (without .pyc files, as here, that
        # import compiles reader.py: ~10 ms, 5% of a 50,000-message consume run).
        reader_class(nsq_sync)

    if scenario == "consume":
        meter.begin()
        consumer = Consumer(nsq_sync, spec, n, on_done=meter.stop)
        if not consumer.done.wait(timeout):
            raise SystemExit(f"timed out: {next(consumer.counter) - 1} of {n} messages")
        meter.end(n, api=consumer.used)
        consumer.close()
        return

    if scenario == "latency":
        latencies = []
        now = time.perf_counter

        def on_body(body):
            latencies.append(now() - stamp_of(body))

        writer = nsq_sync.Writer([address], backend=backend, **conn_kwargs(spec))
        writer.wait_connected(10)
        meter.begin()
        consumer = Consumer(nsq_sync, spec, n, on_body=on_body, on_done=meter.stop)
        time.sleep(0.3)  # let the subscription settle (the Reader connects in the background)
        pacer = Pacer(spec["rate"], n)
        pacer.start()
        while not pacer.done:
            for _ in range(pacer.due()):
                writer.pub(topic, stamped_body(size))
                pacer.sent += 1
            time.sleep(pacer.wait_time())
        if not consumer.done.wait(30):
            raise SystemExit(f"timed out: {next(consumer.counter) - 1} of {n} messages")
        meter.end(n, api=consumer.used, **latency_summary(latencies))
        consumer.close()
        writer.close()
        return

    writer = nsq_sync.Writer([address], backend=backend, **conn_kwargs(spec))
    if not writer.wait_connected(10):
        raise SystemExit("Writer did not connect")
    if scenario == "pub_serial":
        bodies = make_bodies(n, size)
        pub = writer.pub
        meter.begin()
        for body in bodies:
            pub(topic, body)
        meter.end(n)
    elif scenario == "pub_batch":
        window = spec["window"]
        bodies = make_bodies(n, size)
        pub_async = writer.pub_async
        meter.begin()
        for start in range(0, n, window):
            futures = [pub_async(topic, body) for body in bodies[start : start + window]]
            for future in futures:
                future.result()
        meter.end(n)
    elif scenario == "pub_concurrent":
        concurrency = spec["concurrency"]
        bodies = make_bodies(n, size)

        def publish_all(chunk):
            errors = []

            def worker(index):
                pub = writer.pub
                try:
                    for body in chunk[index::concurrency]:
                        pub(topic, body)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]

        publish_all(make_bodies(spec.get("warmup", 0), size))  # untimed (see run.py)
        meter.begin()
        publish_all(bodies)
        meter.end(n)
    elif scenario == "mpub":
        batch = spec["batch"]
        bodies = make_bodies(n, size)
        meter.begin()
        for start in range(0, n, batch):
            writer.mpub(topic, bodies[start : start + batch])
        meter.end(n)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    writer.close()


if __name__ == "__main__":
    main()

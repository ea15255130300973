"""pynsq 0.9.1 as idiomatic pynsq code uses it: nsq.Reader / nsq.Writer on the Tornado IOLoop.

Publishing is callback-chained (the next publish is issued from the previous
one's callback), since pynsq has no blocking publish.
"""

import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Meter,
    Pacer,
    current_rss_mb,
    latency_summary,
    load_spec,
    make_bodies,
    make_body,
    stamp_of,
    stamped_body,
)


class ErrorLog(logging.Handler):
    """Remember ERROR records from pynsq (connection failures are only logged)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage()[:300])


def main():
    spec = load_spec()
    scenario = spec["scenario"]
    address = spec["address"]
    topic = spec["topic"]
    n = spec["n"]
    size = spec["body_size"]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    errors = ErrorLog()
    logging.getLogger("nsq").addHandler(errors)

    meter = Meter()
    import nsq
    import tornado.ioloop

    loop = tornado.ioloop.IOLoop.current()
    kwargs = {"output_buffer_timeout": spec.get("output_buffer_timeout", 250)}
    compression = spec.get("compression", "none")
    if compression == "snappy":
        kwargs["snappy"] = True
    elif compression == "deflate":
        kwargs["deflate"] = True
    failure = []
    state = {"done": 0}

    def fail(message):
        if errors.messages:
            message += " (pynsq logged: " + " / ".join(errors.messages[:2]) + ")"
        failure.append(message)
        loop.stop()

    def extra():
        return {"errors": errors.messages[:3]} if errors.messages else {}

    def finish_soon(count, **fields):
        """Numbers are in: report now, then let the loop flush pending FINs before stopping."""
        meter.end(count, **fields, **extra())
        loop.call_later(0.3, loop.stop)

    def when_writer_ready(writer, then, waited=0.0):
        if any(conn.connected() for conn in writer.conns.values()):
            then()
        elif waited > 15:
            fail("Writer did not connect: " + "; ".join(errors.messages[:3]))
        else:
            loop.call_later(0.01, when_writer_ready, writer, then, waited + 0.01)

    def check(data):
        if isinstance(data, nsq.Error):
            fail(f"publish failed: {data!r}")
            return False
        return True

    if scenario == "consume" or scenario == "latency":
        latencies = []
        now = time.perf_counter

        def handler(message):
            if scenario == "latency":
                latencies.append(now() - stamp_of(message.body))
            state["done"] += 1
            if state["done"] == n:
                meter.stop()
                fields = latency_summary(latencies) if scenario == "latency" else {}
                finish_soon(n, **fields)
            return True

        def start_reader():
            state["reader"] = nsq.Reader(
                topic,
                spec["channel"],
                message_handler=handler,
                nsqd_tcp_addresses=[address],
                max_in_flight=spec["max_in_flight"],
                **kwargs,
            )

        if scenario == "consume":
            meter.begin()
            start_reader()
        else:
            writer = nsq.Writer([address], **kwargs)
            pacer = Pacer(spec["rate"], n)

            def tick():
                for _ in range(pacer.due()):
                    writer.pub(topic, stamped_body(size), callback=lambda conn, data: check(data))
                    pacer.sent += 1
                if not pacer.done:
                    loop.call_later(pacer.wait_time(), tick)

            def begin():
                meter.begin()
                start_reader()

                def go():
                    pacer.start()
                    tick()

                loop.call_later(0.3, go)

            when_writer_ready(writer, begin)
    elif scenario == "rss":
        writer = nsq.Writer([address], **kwargs)

        def publish_one():
            def done(conn, data):
                if check(data):
                    meter.begin()
                    meter.end(1, rss_now_mb=current_rss_mb())
                    loop.stop()

            writer.pub(topic, make_body(size), callback=done)

        when_writer_ready(writer, publish_one)
    else:
        writer = nsq.Writer([address], **kwargs)
        bodies = make_bodies(n, size)

        if scenario in ("pub_serial", "pub_concurrent"):
            chains = spec.get("concurrency", 1) if scenario == "pub_concurrent" else 1
            # untimed warm-up publishes first (see run.py); the clock starts at the answer that
            # completes them, and stops at the n-th answer after it
            warmup = spec.get("warmup", 0) if scenario == "pub_concurrent" else 0
            bodies = make_bodies(warmup, size) + bodies
            state["next"] = 0

            def publish_next():
                index = state["next"]
                if index < warmup + n:
                    state["next"] = index + 1
                    writer.pub(topic, bodies[index], callback=on_answer)

            def on_answer(conn, data):
                if not check(data):
                    return
                state["done"] += 1
                if state["done"] == warmup + n:
                    finish_soon(n)
                else:
                    if state["done"] == warmup:
                        meter.begin()
                    publish_next()

            def start():
                if not warmup:
                    meter.begin()
                for _ in range(chains):
                    publish_next()

        elif scenario == "pub_batch":
            window = spec["window"]
            state["start"] = 0

            def publish_round():
                start = state["start"]
                chunk = bodies[start : start + window]
                state["start"] = start + len(chunk)
                state["round_left"] = len(chunk)
                for body in chunk:
                    writer.pub(topic, body, callback=on_answer)

            def on_answer(conn, data):
                if not check(data):
                    return
                state["done"] += 1
                state["round_left"] -= 1
                if state["done"] == n:
                    finish_soon(n)
                elif state["round_left"] == 0:
                    publish_round()

            def start():
                meter.begin()
                publish_round()

        elif scenario == "mpub":
            batch = spec["batch"]
            state["start"] = 0

            def publish_batch():
                start = state["start"]
                chunk = bodies[start : start + batch]
                state["start"] = start + len(chunk)
                state["last"] = len(chunk)
                writer.mpub(topic, chunk, callback=on_answer)

            def on_answer(conn, data):
                if not check(data):
                    return
                state["done"] += state["last"]
                if state["done"] >= n:
                    finish_soon(n)
                else:
                    publish_batch()

            def start():
                meter.begin()
                publish_batch()

        else:
            raise SystemExit(f"unknown scenario {scenario}")
        when_writer_ready(writer, start)

    limit = spec.get("timeout", 600)
    loop.call_later(limit, lambda: fail(f"timed out after {limit}s with {state['done']} of {n} done; " + "; ".join(errors.messages[:3])))
    loop.start()
    if failure:
        sys.stderr.write("FAILED: " + failure[0] + "\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

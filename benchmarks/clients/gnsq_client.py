"""gnsq 1.0.2 as its README uses it: gnsq.Consumer / gnsq.Producer on gevent (no monkey-patching needed)."""

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


def main():
    spec = load_spec()
    scenario = spec["scenario"]
    address = spec["address"]
    topic = spec["topic"]
    n = spec["n"]
    size = spec["body_size"]
    timeout = spec.get("timeout", 600)
    meter = Meter()

    import gevent
    import gevent.event
    import gnsq

    kwargs = {"output_buffer_timeout": spec.get("output_buffer_timeout", 250)}
    compression = spec.get("compression", "none")
    if compression == "snappy":
        kwargs["snappy"] = True
    elif compression == "deflate":
        kwargs["deflate"] = True

    if scenario == "rss":
        producer = gnsq.Producer([address])
        producer.start()
        producer.publish(topic, make_body(size))
        meter.begin()
        meter.end(1, rss_now_mb=current_rss_mb())
        producer.close()
        return

    if scenario in ("consume", "latency"):
        latencies = []
        now = time.perf_counter
        done = gevent.event.Event()
        state = {"count": 0}

        def handler(consumer, message):
            if scenario == "latency":
                latencies.append(now() - stamp_of(message.body))
            state["count"] += 1
            if state["count"] == n:
                meter.stop()
                done.set()

        def make_consumer():
            consumer = gnsq.Consumer(
                topic,
                spec["channel"],
                nsqd_tcp_addresses=[address],
                max_in_flight=spec["max_in_flight"],
                message_handler=handler,
                **kwargs,
            )
            consumer.start(block=False)
            return consumer

        fields = {}
        if scenario == "consume":
            meter.begin()
            consumer = make_consumer()
        else:
            producer = gnsq.Producer([address], **kwargs)
            producer.start()
            meter.begin()
            consumer = make_consumer()
            gevent.sleep(0.3)
            pacer = Pacer(spec["rate"], n)
            pacer.start()
            while not pacer.done:
                for _ in range(pacer.due()):
                    producer.publish(topic, stamped_body(size))
                    pacer.sent += 1
                gevent.sleep(pacer.wait_time())
        if not done.wait(timeout if scenario == "consume" else 30):
            raise SystemExit(f"timed out: {state['count']} of {n} messages")
        if scenario == "latency":
            fields = latency_summary(latencies)
        meter.end(n, **fields)
        gevent.sleep(0.3)  # let the last FINs go out
        consumer.close()
        return

    producer = gnsq.Producer([address], **kwargs)
    producer.start()
    bodies = make_bodies(n, size)
    if scenario == "pub_serial":
        publish = producer.publish
        meter.begin()
        for body in bodies:
            publish(topic, body)
        meter.end(n)
    elif scenario == "pub_batch":
        window = spec["window"]
        publish = producer.publish
        meter.begin()
        for start in range(0, n, window):
            results = [publish(topic, body, raise_error=False) for body in bodies[start : start + window]]
            for result in results:
                result.get()
        meter.end(n)
    elif scenario == "pub_concurrent":
        concurrency = spec["concurrency"]

        def publish_all(chunk):
            def worker(index):
                for body in chunk[index::concurrency]:
                    producer.publish(topic, body)

            greenlets = [gevent.spawn(worker, i) for i in range(concurrency)]
            gevent.joinall(greenlets, raise_error=True)

        publish_all(make_bodies(spec.get("warmup", 0), size))  # untimed (see run.py)
        meter.begin()
        publish_all(bodies)
        meter.end(n)
    elif scenario == "mpub":
        batch = spec["batch"]
        meter.begin()
        for start in range(0, n, batch):
            producer.multipublish(topic, bodies[start : start + batch])
        meter.end(n)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    producer.close()


if __name__ == "__main__":
    main()

"""A gevent app: 50 greenlets publish through one Writer, a Reader consumes on the same hub.

    python gevent_app.py [NSQD_TCP_ADDRESS ...]    # default: $NSQD_TCP_ADDRESSES or 127.0.0.1:4150

monkey.patch_all() comes first, before anything imports socket, ssl or threading. nsq_sync
then picks its gevent backend by itself (``backend=None``, the default): its reader tasks and
handler workers are greenlets, and ``Writer.pub()`` blocks only the calling greenlet.
Exit code 0 when every message published came back.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402 - after patch_all on purpose
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

import nsq_sync  # noqa: E402

GREENLETS = 50


def main(argv):
    addresses = argv[1:] or os.environ.get("NSQD_TCP_ADDRESSES", "127.0.0.1:4150").split(",")
    topic = f"gevent_app.{os.getpid()}"
    received = set()
    all_received = gevent.event.Event()

    def handle(message):
        received.add(message.body)
        if len(received) == GREENLETS:
            all_received.set()
        return True

    writer = nsq_sync.Writer(addresses, publish_timeout=10)
    reader = nsq_sync.Reader(topic, "app", message_handler=handle, nsqd_tcp_addresses=addresses, max_in_flight=GREENLETS)
    print(f"backend {writer.backend.name}", flush=True)
    reader.start()
    try:
        started = time.monotonic()
        greenlets = [gevent.spawn(writer.pub, topic, b"hello from greenlet %d" % i) for i in range(GREENLETS)]
        gevent.joinall(greenlets, timeout=30, raise_error=True)
        published = sum(1 for g in greenlets if g.successful() and g.value == b"OK")
        print(f"published {published} messages from {GREENLETS} greenlets in {time.monotonic() - started:.3f}s", flush=True)
        all_received.wait(30)
        print(f"received {len(received)} messages in {time.monotonic() - started:.3f}s", flush=True)
    finally:
        reader.close()
        writer.close()
    return 0 if published == len(received) == GREENLETS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

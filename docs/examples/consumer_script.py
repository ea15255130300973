"""A plain consumer script: ``Reader.run()`` until Ctrl-C or SIGTERM, then a graceful drain.

    python consumer_script.py TOPIC CHANNEL --nsqd-tcp-address 127.0.0.1:4150
    NSQLOOKUPD_HTTP_ADDRESSES=127.0.0.1:4161 python consumer_script.py TOPIC CHANNEL
    python -m gevent.monkey consumer_script.py TOPIC CHANNEL ...     # the same on gevent

Addresses come from the command line, or else from the environment variables
NSQD_TCP_ADDRESSES / NSQLOOKUPD_HTTP_ADDRESSES (comma-separated). It prints each message and,
when stopped, how many it handled. Exit code 0 after a signal, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import nsq_sync


def _env_list(name):
    return [a for a in os.environ.get(name, "").split(",") if a]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the messages of an NSQ topic/channel.")
    parser.add_argument("topic")
    parser.add_argument("channel")
    parser.add_argument("--nsqd-tcp-address", action="append", default=[], help="repeatable")
    parser.add_argument("--lookupd-http-address", action="append", default=[], help="repeatable")
    parser.add_argument("--max-in-flight", type=int, default=10)
    args = parser.parse_args(argv)
    nsqd = args.nsqd_tcp_address or _env_list("NSQD_TCP_ADDRESSES")
    lookupd = args.lookupd_http_address or _env_list("NSQLOOKUPD_HTTP_ADDRESSES")
    if not nsqd and not lookupd:
        parser.error("give --nsqd-tcp-address/--lookupd-http-address or set NSQD_TCP_ADDRESSES/NSQLOOKUPD_HTTP_ADDRESSES")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    count = 0
    lock = threading.Lock()

    def handle(message):
        nonlocal count
        with lock:  # handlers run on up to max_in_flight workers at once
            count += 1
            print(f"message {message.attempts} {message.body.decode('utf-8', 'replace')}", flush=True)
        return True  # finish; False (or an exception) would requeue it

    try:
        reader = nsq_sync.Reader(
            args.topic,
            args.channel,
            message_handler=handle,
            nsqd_tcp_addresses=nsqd or None,
            lookupd_http_addresses=lookupd or None,
            max_in_flight=args.max_in_flight,
            lookupd_poll_interval=15,
        )
    except (nsq_sync.ConfigError, TypeError) as exc:
        parser.error(str(exc))
    print(f"consuming {args.topic}/{args.channel} from {', '.join(nsqd + lookupd)}; Ctrl-C or SIGTERM stops", flush=True)
    reader.run()  # blocks; on SIGINT/SIGTERM: stop taking messages, finish the in-flight ones, close
    print(f"stopped after {count} messages", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

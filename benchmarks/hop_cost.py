#!/usr/bin/env python3
"""What one thread hop per answer costs a blocking publisher (evidence for the Writer's design).

    benchmarks/.venv/bin/python benchmarks/hop_cost.py [--n 20000] [--reps 3]

Publishes N messages one at a time, waiting for each OK, with the minimal
blocking-socket client in three ways, alternating, against its own nsqd:

* direct:     the publishing thread reads its own OK (the minimal loop);
* lock:       a reader thread reads OKs and releases a plain lock the publisher waits on;
* future:     a reader thread reads OKs and completes a ``concurrent.futures.Future``
              the publisher waits on (what nsq_sync's Writer.pub does per publish).
"""

import argparse
import os
import sys
import threading
import time
from concurrent.futures import Future

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "clients"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from minimal import MinimalConn, pub_cmd
    from nsq_sync.testing import NsqdProcess

    nsqd = NsqdProcess(extra_args=[f"--mem-queue-size={args.n * args.reps * 3 + 1000}"]).start()
    cmd = pub_cmd("hop", b"x" * 100)
    try:
        results = {"direct": [], "lock": [], "future": []}
        for _ in range(args.reps):
            for mode in results:
                conn = MinimalConn(nsqd.tcp_address)
                n = args.n
                if mode == "direct":
                    t0 = time.perf_counter()
                    for _ in range(n):
                        conn.send(cmd)
                        conn.read_oks(1)
                    elapsed = time.perf_counter() - t0
                else:
                    waiters = []
                    guard = threading.Lock()

                    def reader():
                        for _ in range(n):
                            conn.read_oks(1)
                            with guard:
                                waiter = waiters.pop(0)
                            if mode == "lock":
                                waiter.release()
                            else:
                                waiter.set_result(b"OK")

                    thread = threading.Thread(target=reader, daemon=True)
                    thread.start()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        if mode == "lock":
                            waiter = threading.Lock()
                            waiter.acquire()
                        else:
                            waiter = Future()
                        with guard:
                            waiters.append(waiter)
                        conn.send(cmd)
                        if mode == "lock":
                            waiter.acquire()
                        else:
                            waiter.result()
                    elapsed = time.perf_counter() - t0
                    thread.join()
                conn.close()
                results[mode].append(n / elapsed)
        for mode, rates in results.items():
            rates.sort()
            print(f"{mode:<7} median {rates[len(rates) // 2]:>8,.0f} msg/s  ({', '.join(f'{r:,.0f}' for r in rates)})")
    finally:
        nsqd.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What 8 OS threads publishing one message at a time can reach on CPython (the "8 threads" target).

    benchmarks/.venv/bin/python benchmarks/thread_floor.py [--n 40000] [--threads 8] [--reps 3]

The ways below, alternated, in one process, against its own nsqd:

* handoff:         no I/O at all: each thread queues a token and waits on its own lock; one
                   server thread releases the locks in order. The cost of waking a waiting
                   thread and handing it the GIL, the floor of any blocking call answered by
                   another thread.
* minimal threads: the least a threaded client can do: each thread writes its PUB under a
                   lock and waits on its own lock; one reader thread reads the OKs (blocking
                   recv, a buffer parse) and releases the waiters in order.
* own sockets:     each thread on a connection of its own, a bare sendall + recv loop: no
                   hand-off at all, only the GIL (what a Writer's lanes aim at).
* nsq_sync lanes:  each thread on an AsyncConn lane of its own (``_lane_request``), what a
                   Writer's lanes do without the Writer around them.
* nsq_sync:        ``Writer.pub`` from every thread, one Writer (after 250 untimed publishes per
                   thread, while its lanes open).

The benchmark suite's "8 threads" target compares against the minimal loop with 100 PUBs
outstanding from one thread, where no thread waits for another; this script shows what
real threads cost on the same machine.
"""

import argparse
import collections
import os
import socket
import statistics
import struct
import sys
import threading
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "clients"))


def handoff(n: int, threads: int) -> float:
    queue: collections.deque = collections.deque()
    wake = threading.Lock()
    wake.acquire()
    state = {"sleeping": False, "stop": False}

    def client(count: int) -> None:
        mine = threading.Lock()
        for _ in range(count):
            mine.acquire()
            queue.append(mine)
            if state["sleeping"]:
                state["sleeping"] = False
                try:
                    wake.release()
                except RuntimeError:
                    pass
            mine.acquire()  # released by the server
            mine.release()

    def server() -> None:
        while not state["stop"]:
            try:
                waiter = queue.popleft()
            except IndexError:
                state["sleeping"] = True
                if not queue:
                    wake.acquire(timeout=0.01)
                continue
            waiter.release()

    return _run_threads(n, threads, client, server, lambda: state.update(stop=True))


def minimal_threads(address: str, topic: str, n: int, threads: int) -> float:
    from minimal import MinimalConn, pub_cmd

    conn = MinimalConn(address)
    sock = conn.sock
    sock.settimeout(None)
    send_lock = threading.Lock()
    waiters: collections.deque = collections.deque()
    body = b"x" * 100
    command = pub_cmd(topic, body)
    state = {"stop": False}

    def client(count: int) -> None:
        mine = threading.Lock()
        for _ in range(count):
            mine.acquire()
            with send_lock:  # the order of waiters is the order of PUBs on the wire
                waiters.append(mine)
                sock.sendall(command)
            mine.acquire()
            mine.release()

    def reader() -> None:
        buffer = b""
        while not state["stop"]:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            offset = 0
            while len(buffer) - offset >= 8:
                (size,) = struct.unpack_from(">l", buffer, offset)
                if len(buffer) - offset - 4 < size:
                    break
                offset += 4 + size
                waiters.popleft().release()
            buffer = buffer[offset:]

    def stop() -> None:
        state["stop"] = True
        sock.shutdown(socket.SHUT_RDWR)

    try:
        return _run_threads(n, threads, client, reader, stop)
    finally:
        conn.close()


def own_sockets(address: str, topic: str, n: int, threads: int) -> float:
    from minimal import MinimalConn, pub_cmd

    conns = [MinimalConn(address) for _ in range(threads)]
    command = pub_cmd(topic, b"x" * 100)
    handed = iter(conns)
    lock = threading.Lock()

    def client(count: int) -> None:
        with lock:
            sock = next(handed).sock
        sock.settimeout(None)
        send, recv = sock.sendall, sock.recv
        for _ in range(count):
            send(command)
            data = recv(65536)
            while len(data) < 10:  # one OK frame
                data += recv(65536)

    try:
        return _run_threads(n, threads, client, None, lambda: None)
    finally:
        for conn in conns:
            conn.close()


def nsq_sync_lanes(address: str, topic: str, n: int, threads: int) -> float:
    """Each thread on an AsyncConn lane of its own (what a Writer's lanes are, without the
    Writer around them: no encoding, no choice of connection): the part the Writer adds."""
    from nsq_sync import AsyncConn
    from nsq_sync.protocol import commands

    host, port = address.rsplit(":", 1)
    conns = []
    for _ in range(threads):
        conn = AsyncConn(host, int(port))
        conn._lane = True  # no reader task: the caller sends and reads (as Writer._lane_loop makes them)
        conn.connect()
        conns.append(conn)
    handed = iter(conns)
    lock = threading.Lock()
    command = commands.pub(topic, b"x" * 100)

    def client(count: int) -> None:
        with lock:
            request = next(handed)._lane_request
        for _ in range(count):
            request(command, 5.0)

    try:
        return _run_threads(n, threads, client, None, lambda: None)
    finally:
        for conn in conns:
            conn.close(5)


def nsq_sync_writer(address: str, topic: str, n: int, threads: int) -> float:
    import nsq_sync

    writer = nsq_sync.Writer([address])
    writer.wait_connected(10)
    body = b"x" * 100

    def client(count: int) -> None:
        for _ in range(count):
            writer.pub(topic, body)

    try:
        # untimed, as the other ways connect before the clock starts: the Writer opens a
        # connection (lane) per publishing thread on demand
        warm = [threading.Thread(target=client, args=(250,)) for _ in range(threads)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        return _run_threads(n, threads, client, None, lambda: None)
    finally:
        writer.close()


#: per run, what the scheduler did to the calling threads: (context switches, CPU migrations)
#: summed over them (Linux: /proc/thread-self/sched; None elsewhere)
_sched_totals: List[Optional[Tuple[int, int]]] = []


def _thread_sched() -> Optional[Tuple[int, int]]:
    """This thread's context switches and CPU migrations so far (Linux), else None."""
    try:
        with open("/proc/thread-self/sched") as f:
            fields = {key.strip(): value for key, value in (line.split(":", 1) for line in f if ":" in line)}
        return int(fields["nr_switches"].split()[0]), int(fields["se.nr_migrations"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def _run_threads(n, threads, client, server, stop) -> float:
    helper = threading.Thread(target=server, daemon=True) if server else None
    if helper:
        helper.start()
    counts: List[Optional[Tuple[int, int]]] = []

    def counted(count: int) -> None:
        client(count)
        counts.append(_thread_sched())  # (a new thread: its counts are this run's)

    workers = [threading.Thread(target=counted, args=(n // threads,)) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    _sched_totals.append(None if None in counts else (sum(c[0] for c in counts), sum(c[1] for c in counts)))  # type: ignore[index]
    stop()
    if helper:
        helper.join(5)
    return (n // threads) * threads / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the ways whose name contains this")
    args = parser.parse_args()

    from nsq_sync.testing import NsqdProcess

    nsqd = NsqdProcess(extra_args=[f"--mem-queue-size={args.n * (args.reps * 2 + 2)}"]).start()
    topic = "thread_floor"
    results = collections.defaultdict(list)
    cpu = collections.defaultdict(list)
    sched = collections.defaultdict(list)
    try:
        nsqd.create_topic(topic)
        ways = [
            ("handoff (no I/O)", lambda: handoff(args.n, args.threads)),
            ("minimal threads", lambda: minimal_threads(nsqd.tcp_address, topic, args.n, args.threads)),
            ("own sockets", lambda: own_sockets(nsqd.tcp_address, topic, args.n, args.threads)),
            ("nsq_sync lanes", lambda: nsq_sync_lanes(nsqd.tcp_address, topic, args.n, args.threads)),
            ("nsq_sync Writer", lambda: nsq_sync_writer(nsqd.tcp_address, topic, args.n, args.threads)),
        ]
        ways = [(name, run) for name, run in ways if args.only in name]
        for rep in range(args.reps):
            for name, run in ways:
                c0 = time.process_time()
                rate = run()
                cpu[name].append((time.process_time() - c0) / args.n * 1e6)
                results[name].append(rate)
                counted = _sched_totals[-1]
                sched[name].append(counted)
                where = "" if counted is None else f"  {counted[0] / args.n:.2f} context switches/call, {counted[1]:,} CPU migrations"
                print(f"rep {rep + 1} {name:18} {rate:10,.0f} /s{where}", flush=True)
    finally:
        nsqd.stop()
    print(f"\n{args.threads} threads, one blocking call each at a time; medians of {args.reps}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    print("| way | round trips/s (min-max) | process CPU per call | context switches per call | CPU migrations per run |")
    print("|---|---|---|---|---|")
    for name, _ in ways:
        rates = results[name]
        counted = [c for c in sched[name] if c is not None]
        switches = f"{statistics.median(c[0] for c in counted) / args.n:.2f}" if counted else "-"
        migrations = f"{statistics.median(c[1] for c in counted):,.0f} ({min(c[1] for c in counted):,}-{max(c[1] for c in counted):,})" if counted else "-"
        print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {statistics.median(cpu[name]):.1f} us | {switches} | {migrations} |")
    print("\nThe calling threads' context switches and CPU migrations (Linux, /proc/thread-self/sched):"
          " a run whose threads stay on one core switches about once per call; one whose threads"
          " migrate between cores wakes to a GIL held elsewhere and switches 2-3 times.")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Profile nsq_sync's consume path (every thread) against a real nsqd.

    benchmarks/.venv/bin/python benchmarks/profile_consume.py [--n 100000] [--api reader|asyncconn]
        [--mif 200] [--compression none|snappy|deflate] [--backend thread|gevent] [--sort tottime] [--top 40]
        [--save out.pstats] [--publish]

Starts its own nsqd, pre-fills a channel, and consumes N messages with a noop
handler while a cProfile profiler runs in *every* thread (the reader thread,
the worker threads and the main thread), then prints the merged statistics
plus a per-thread CPU split. ``--publish`` profiles ``Writer.pub`` one at a
time instead. Under gevent one profiler sees every greenlet (run in the hub's
thread), so the numbers there are rougher.
"""

import argparse
import json
import os
import sys

_ARGS = sys.argv[1:]
if "--backend" in _ARGS and _ARGS[_ARGS.index("--backend") + 1] == "gevent":
    from gevent import monkey

    monkey.patch_all()

import cProfile  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import pstats  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "clients"))


def apply_experiment(name):
    """Proposed hot-path changes, patched in for measurement only (the library is not edited)."""
    from nsq_sync import conn as conn_mod
    from nsq_sync.dispatch import Lane

    if name == "pubcork":
        def request(self, data):
            from concurrent.futures import Future

            future = Future()
            future.set_running_or_notify_cancel()
            with self._lock:
                if self.state != conn_mod.CONNECTED:
                    raise conn_mod.ConnectionClosedError("closed")
                self._pending.append(future)
                self._writes.append(data)
            return future

        conn_mod.AsyncConn.request = request
        return
    cork = name == "batch+cork"
    local = threading.local()

    def submit_many(self, fn, items):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, conn_mod.AsyncConn):
            self.submit(_run_batch, owner, fn, items)
        else:
            _orig_submit_many(self, fn, items)

    def _run_batch(conn, fn, items):
        if cork:
            local.corked = conn
        try:
            for item in items:
                fn(item)
        finally:
            if cork:
                local.corked = None
                try:
                    conn._flush()
                except Exception:  # the connection closed under the batch (at shutdown)
                    pass

    def _write(self, data):
        if self.state != conn_mod.CONNECTED:
            raise conn_mod.ConnectionClosedError(f"connection to {self.id} is {self.state.lower()}")
        self._writes.append(data)
        if getattr(local, "corked", None) is not self:
            self._flush()

    _orig_submit_many = Lane.submit_many
    Lane.submit_many = submit_many
    if cork:
        conn_mod.AsyncConn._write = _write


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100000)
    parser.add_argument("--mif", type=int, default=200)
    parser.add_argument("--api", choices=("reader", "asyncconn"), default="reader")
    parser.add_argument("--compression", choices=("none", "snappy", "deflate"), default="none")
    parser.add_argument("--backend", choices=("thread", "gevent"), default="thread")
    parser.add_argument("--concurrency", type=int, default=None, help="Reader(concurrency=...) (default: the Reader's)")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--save", default=None)
    parser.add_argument("--publish", choices=("serial", "batch100", "threads8"), default=None,
                        help="profile publishing instead: Writer.pub one at a time, pub_async 100 at a time, or 8 threads")
    parser.add_argument("--no-profile", action="store_true", help="just time it (profiling overhead check)")
    parser.add_argument("--experiment", choices=("none", "batch", "batch+cork", "pubcork"), default="none",
                        help="monkey-patch a proposed change into AsyncConn for this process only: "
                        "'batch' hands each read's messages to the worker as ONE work item; "
                        "'batch+cork' also holds that worker's writes until the batch is done (one sendall of all FINs); "
                        "'pubcork' (with --publish batch100): request() queues without writing and the 100 PUBs of a "
                        "round leave in one sendall before the caller waits (flush-on-wait)")
    args = parser.parse_args()

    from _common import cpu_seconds
    from minimal import MinimalConn, mpub_cmd
    from _common import make_bodies

    import nsq_sync
    from nsq_sync.testing import NsqdProcess

    if args.experiment != "none":
        apply_experiment(args.experiment)

    nsqd = NsqdProcess(extra_args=[f"--mem-queue-size={args.n + 10000}"]).start()
    topic, channel = "profile", "bench"
    try:
        if not args.publish:
            nsqd.create_topic(topic)
            nsqd.create_channel(topic, channel)
            conn = MinimalConn(nsqd.tcp_address)
            bodies = make_bodies(args.n + 2000, 100)
            for i in range(0, len(bodies), 2000):
                conn.send(mpub_cmd(topic, bodies[i : i + 2000]))
                conn.read_oks(1)
            conn.close()
            while nsqd.channel_depth(topic, channel) < len(bodies):
                time.sleep(0.01)

        profiles = []
        thread_cpu = {}
        orig_run = threading.Thread.run

        def profiled_run(self):
            prof = cProfile.Profile()
            profiles.append((self.name, prof))
            t0 = time.thread_time() if args.backend == "thread" else 0.0
            if not args.no_profile:
                prof.enable()
            try:
                orig_run(self)
            finally:
                if not args.no_profile:
                    prof.disable()
                if args.backend == "thread":
                    thread_cpu[self.name] = time.thread_time() - t0

        if args.backend == "thread":
            threading.Thread.run = profiled_run

        main_prof = cProfile.Profile()
        kwargs = {}
        if args.compression != "none":
            kwargs[args.compression] = True
        done = threading.Event()
        counter = itertools.count(1)
        n = args.n
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        if not args.no_profile:
            main_prof.enable()
        if args.publish:
            writer = nsq_sync.Writer([nsqd.tcp_address], backend=args.backend, **kwargs)
            writer.wait_connected(10)
            body = b"x" * 100
            t0 = time.perf_counter()
            if args.publish == "serial":
                for _ in range(n):
                    writer.pub(topic, body)
            elif args.publish == "batch100":
                conn = next(iter(writer.conns.values()))
                for _ in range(0, n, 100):
                    futures = [writer.pub_async(topic, body) for _ in range(100)]
                    if args.experiment == "pubcork":
                        conn._flush()  # flush-on-wait
                    for future in futures:
                        future.result()
            else:
                def work():
                    for _ in range(n // 8):
                        writer.pub(topic, body)

                threads = [threading.Thread(target=work, name=f"publisher-{i}") for i in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            elapsed = time.perf_counter() - t0
            closer = writer.close
            used = f"Writer ({args.publish})"
        else:
            ReaderClass = getattr(nsq_sync, "Reader", None)
            if ReaderClass is None and args.api == "reader":
                try:  # not exported yet: the module may already exist
                    from nsq_sync.reader import Reader as ReaderClass
                except ImportError:
                    ReaderClass = None
            if args.api == "reader" and ReaderClass is not None:
                used = f"Reader (concurrency {args.concurrency or 'default'})"

                def handler(message):
                    if next(counter) == n:
                        done.set()
                    return True

                if args.concurrency:
                    kwargs["concurrency"] = args.concurrency
                reader = ReaderClass(topic, channel, message_handler=handler, nsqd_tcp_addresses=[nsqd.tcp_address],
                                     max_in_flight=args.mif, backend=args.backend, **kwargs)
                if hasattr(reader, "start"):
                    reader.start()
                closer = reader.close
            else:
                used = "AsyncConn"
                host, port = nsqd.tcp_address.rsplit(":", 1)
                conn = nsq_sync.AsyncConn(host, int(port), backend=args.backend, **kwargs)

                def on_message(conn, message):
                    message.finish()
                    if next(counter) == n:
                        done.set()

                conn.on("message", on_message)
                conn.connect()
                conn.subscribe(topic, channel)
                conn.send_rdy(args.mif)
                closer = conn.close
            done.wait(600)
            elapsed = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
        if not args.no_profile:
            main_prof.disable()
        closer()
        time.sleep(0.2)
        threading.Thread.run = orig_run
        print(f"{used}: {n} messages in {elapsed:.3f}s = {n / elapsed:,.0f} msg/s; process CPU {cpu:.3f}s "
              f"({cpu * 100000 / n:.2f}s per 100k){' (profiled: slower than real)' if not args.no_profile else ''}")
        if thread_cpu:
            print("CPU per thread: " + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(thread_cpu.items(), key=lambda kv: -kv[1])))
        if args.no_profile:
            return
        stats = pstats.Stats(main_prof)
        for _name, prof in profiles:
            try:
                stats.add(prof)
            except TypeError:  # a profiler that saw nothing
                pass
        if args.save:
            stats.dump_stats(args.save)
        out = io.StringIO()
        stats.stream = out
        stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    finally:
        nsqd.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Load and soak for nsq_sync (issue #6): not timed assertions, measurements.

Two parts, both against real nsqd v1.3.0 on loopback started here (nsq_sync.testing):

``soak`` (default: 1,000,000 messages)
    64 threads publish through a few Writers (each connected to both nsqd), 8 Readers consume
    one channel across 2 nsqd. Every body carries its index; the consumers count deliveries per
    index, so the report gives messages lost (never delivered), duplicates (delivered more than
    once), publish errors (each retried until OK), rates, the RSS curve sampled every second
    (flat after warm-up?) and the thread count (back to the baseline after close?).

``conns``
    200 connections from one process: 10 nsqd x 20 Readers (each Reader on all 10). Reports
    RSS and CPU per connection at idle (heartbeats every 30 s, RDY redistribution) and under a
    light load published by a separate process, and the time to connect and to close.

Usage::

    bash benchmarks/soak                         # both parts, full size
    bash benchmarks/soak --part soak --messages 200000
    bash benchmarks/soak --part conns --idle-s 30 --load-s 30 --load-rate 1000
    bash benchmarks/soak --backend gevent        # the same on greenlets (monkey-patched first)

Prints a small table and a JSON report (also written to benchmarks/results/soak-<stamp>.json,
git-ignored). Exit status 0 when nothing was lost and no thread leaked, 1 otherwise.
"""

from __future__ import annotations

import sys

if "--backend" in sys.argv and sys.argv[sys.argv.index("--backend") + 1 :][:1] == ["gevent"]:
    from gevent import monkey  # before anything imports socket/threading

    monkey.patch_all()

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from nsq_sync import Reader, Writer  # noqa: E402
from nsq_sync.errors import Error  # noqa: E402
from nsq_sync.testing import NsqdProcess, wait_until  # noqa: E402

TOPIC = "soak"
CHANNEL = "ch"
_index = struct.Struct(">Q")


# ----------------------------------------------------------------------------- process metrics
def _status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    return (_status("VmRSS") or 0) / 1024.0


def os_threads() -> int:
    return _status("Threads") or 0


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tasks() -> int:
    """Our threads, or greenlets under gevent, still alive (nsq_sync's own names)."""
    count = sum(1 for t in threading.enumerate() if "nsq_sync" in t.name and t.is_alive())
    if "gevent" in sys.modules and getattr(sys.modules.get("gevent.monkey"), "is_module_patched", lambda m: False)("socket"):
        import gc

        import gevent

        count += sum(1 for g in gc.get_objects() if isinstance(g, gevent.Greenlet) and not g.dead and "nsq_sync" in str(getattr(g, "name", "")))
    return count


class Sampler:
    """Samples RSS, thread counts and progress counters every *interval* seconds."""

    def __init__(self, progress: Dict[str, Any], interval: float = 1.0) -> None:
        self.progress = progress
        self.interval = interval
        self.samples: List[Dict[str, Any]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        entry = {
            "t": round(time.monotonic() - self._t0, 2),
            "rss_mb": round(rss_mb(), 1),
            "threads": threading.active_count(),
            "os_threads": os_threads(),
            "nsq_sync_tasks": tasks(),
            "cpu_s": round(cpu_s(), 2),
        }
        entry.update({k: v() if callable(v) else v for k, v in self.progress.items()})
        self.samples.append(entry)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


def print_table(rows: List[List[Any]], headers: List[str]) -> None:
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# ----------------------------------------------------------------------------- the soak
class Counts:
    """Deliveries per message index (saturating at 255), thread-safe."""

    def __init__(self, n: int) -> None:
        self.counts = bytearray(n)
        self.lock = threading.Lock()
        self.received = 0
        self.distinct = 0

    def handler(self, message: Any) -> bool:
        (index,) = _index.unpack_from(message.body)
        with self.lock:
            count = self.counts[index]
            if count == 0:
                self.distinct += 1
            if count < 255:
                self.counts[index] = count + 1
            self.received += 1
        return True


def run_soak(args: argparse.Namespace) -> Dict[str, Any]:
    n = args.messages
    nsqds = [NsqdProcess(extra_args=["--mem-queue-size=10000"]) for _ in range(args.nsqds)]
    for nsqd in nsqds:
        nsqd.start()
    try:
        addresses = [nsqd.tcp_address for nsqd in nsqds]
        for nsqd in nsqds:
            nsqd.create_channel(TOPIC, CHANNEL)
        baseline_tasks = tasks()
        baseline_threads = threading.active_count()
        counts = Counts(n)
        published = [0]
        pub_errors: Dict[str, int] = {}
        pub_lock = threading.Lock()
        progress = {"published": lambda: published[0], "received": lambda: counts.received, "distinct": lambda: counts.distinct}
        sampler = Sampler(progress, args.sample_interval).start()

        readers = [
            Reader(
                TOPIC,
                CHANNEL,
                counts.handler,
                nsqd_tcp_addresses=addresses,
                max_in_flight=args.max_in_flight,
                concurrency=args.consumer_concurrency,
                backend=args.backend,
                name=f"soak-reader-{i}",
            )
            for i in range(args.consumers)
        ]
        for reader in readers:
            reader.start()
        writers = [Writer(addresses, backend=args.backend, retries=2, publish_timeout=30, name=f"soak-writer-{i}") for i in range(args.writers)]
        for writer in writers:
            assert writer.wait_connected(10, count=len(addresses)), "writers did not connect"
        wait_until(lambda: all(len(r.conns) == len(addresses) for r in readers), timeout=20, message="readers connected")
        padding = b"p" * max(0, args.body_size - _index.size)

        def publisher(thread_index: int) -> None:
            writer = writers[thread_index % len(writers)]
            start = n * thread_index // args.publishers
            end = n * (thread_index + 1) // args.publishers
            done = 0
            for index in range(start, end):
                body = _index.pack(index) + padding
                while True:
                    try:
                        writer.pub(TOPIC, body)
                        break
                    except Error as exc:  # counted, then the same index is published again
                        with pub_lock:
                            pub_errors[type(exc).__name__] = pub_errors.get(type(exc).__name__, 0) + 1
                done += 1
                if done == 100:
                    with pub_lock:
                        published[0] += done
                    done = 0
            with pub_lock:
                published[0] += done

        began = time.monotonic()
        cpu_began = cpu_s()
        threads = [threading.Thread(target=publisher, args=(i,), name=f"soak-publisher-{i}") for i in range(args.publishers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        published_at = time.monotonic()
        deadline = time.monotonic() + args.drain_timeout
        while counts.distinct < n and time.monotonic() < deadline:
            time.sleep(0.2)  # progress polling; the deadline bounds the drain
        consumed_at = time.monotonic()
        cpu_used = cpu_s() - cpu_began
        # let redeliveries (if any) show up as duplicates before counting
        while any(r.stats()["in_flight"] for r in readers) and time.monotonic() < deadline:
            time.sleep(0.1)
        peak_tasks = max(s["nsq_sync_tasks"] for s in sampler.samples)
        close_began = time.monotonic()
        for reader in readers:
            reader.close(10)
        for writer in writers:
            writer.close(10)
        close_s = time.monotonic() - close_began
        if tasks() > baseline_tasks:
            wait_until(lambda: tasks() <= baseline_tasks, timeout=10, interval=0.05, message="tasks to end")
        sampler.stop()
        threads_after = threading.active_count()
        tasks_after = tasks()
    finally:
        for nsqd in nsqds:
            nsqd.close()

    lost = counts.counts.count(0)
    duplicates = sum(c - 1 for c in counts.counts if c > 1)
    samples = sampler.samples
    # warm-up: until 10% of the messages were consumed (and at least 5 s); steady: from there
    # until everything was consumed (the samples after close are not part of the run)
    consumed_t = consumed_at - sampler._t0
    warm = [s for s in samples if s["received"] >= n * 0.1 and s["t"] >= 5 and s["t"] <= consumed_t]
    steady = warm if len(warm) >= 2 else samples
    rss_steady = [s["rss_mb"] for s in steady]
    slope = 0.0
    if len(steady) >= 2:
        xs = [s["received"] for s in steady]
        ys = rss_steady
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var * 100_000 if var else 0.0
    report = {
        "part": "soak",
        "backend": args.backend,
        "messages": n,
        "body_size": args.body_size,
        "publishers": args.publishers,
        "writers": args.writers,
        "consumers": args.consumers,
        "nsqds": args.nsqds,
        "published_ok": published[0],
        "publish_errors": pub_errors,
        "received": counts.received,
        "lost": lost,
        "duplicates": duplicates,
        "publish_s": round(published_at - began, 2),
        "consume_s": round(consumed_at - began, 2),
        "publish_rate": round(n / max(1e-9, published_at - began)),
        "consume_rate": round(n / max(1e-9, consumed_at - began)),
        "client_cpu_s": round(cpu_used, 2),
        "client_cpu_s_per_100k": round(cpu_used / n * 100_000, 2),
        "rss_mb_start": samples[0]["rss_mb"],
        "rss_mb_peak": max(s["rss_mb"] for s in samples),
        "rss_mb_steady_min": min(rss_steady),
        "rss_mb_steady_max": max(rss_steady),
        "rss_mb_per_100k_after_warmup": round(slope, 3),
        "rss_mb_growth_after_warmup": round(rss_steady[-1] - rss_steady[0], 1),
        "steady_samples": len(steady),
        "rss_mb_end": samples[-1]["rss_mb"],
        "threads_baseline": baseline_threads,
        "threads_peak": max(s["threads"] for s in samples),
        "threads_after_close": threads_after,
        "nsq_sync_tasks_baseline": baseline_tasks,
        "nsq_sync_tasks_peak": peak_tasks,
        "nsq_sync_tasks_after_close": tasks_after,
        "close_s": round(close_s, 2),
        "rss_curve": [(s["t"], s["rss_mb"], s["received"], s["threads"]) for s in samples],
    }
    report["ok"] = lost == 0 and report["nsq_sync_tasks_after_close"] <= baseline_tasks
    return report


def print_soak(report: Dict[str, Any]) -> None:
    print(f"\nsoak: {report['messages']:,} messages, {report['publishers']} publishing threads over {report['writers']} Writers, "
          f"{report['consumers']} Readers, {report['nsqds']} nsqd, backend {report['backend']}")
    print_table(
        [
            ["published OK", f"{report['published_ok']:,}", "publish errors (retried)", report["publish_errors"] or 0],
            ["received", f"{report['received']:,}", "lost", report["lost"]],
            ["duplicates", report["duplicates"], "publish rate /s", f"{report['publish_rate']:,}"],
            ["consume rate /s", f"{report['consume_rate']:,}", "client CPU s /100k", report["client_cpu_s_per_100k"]],
            ["RSS MB start/peak/end", f"{report['rss_mb_start']}/{report['rss_mb_peak']}/{report['rss_mb_end']}", "RSS MB steady min-max", f"{report['rss_mb_steady_min']}-{report['rss_mb_steady_max']}"],
            ["RSS slope MB/100k msgs", f"{report['rss_mb_per_100k_after_warmup']} (growth {report['rss_mb_growth_after_warmup']} MB)", "threads base/peak/after", f"{report['threads_baseline']}/{report['threads_peak']}/{report['threads_after_close']}"],
            ["nsq_sync tasks b/p/a", f"{report['nsq_sync_tasks_baseline']}/{report['nsq_sync_tasks_peak']}/{report['nsq_sync_tasks_after_close']}", "close s", report["close_s"]],
        ],
        ["metric", "value", "metric", "value"],
    )
    curve = report["rss_curve"]
    step = max(1, len(curve) // 15)
    print("\nRSS curve (every ~%ds): t s, RSS MB, received, threads" % step)
    for t, rss, received, threads in curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else []):
        print(f"  {t:7.1f}  {rss:7.1f}  {received:>10,}  {threads}")


# ----------------------------------------------------------------------------- 200 connections
def publisher_child(spec: Dict[str, Any]) -> None:
    """Run in a separate process: publish ``rate`` msg/s round-robin over the nsqds for ``seconds``."""
    writer = Writer(spec["addresses"], backend="thread")
    assert writer.wait_connected(10, count=len(spec["addresses"]))
    rate, seconds = spec["rate"], spec["seconds"]
    began = time.monotonic()
    sent = 0
    batch = max(1, rate // 50)  # 50 MPUBs a second
    while time.monotonic() - began < seconds:
        writer.mpub(TOPIC, [b"light-load-%d" % (sent + i) for i in range(batch)])
        sent += batch
        ahead = sent / rate - (time.monotonic() - began)
        if ahead > 0:
            time.sleep(ahead)  # pacing
    writer.close()
    print(json.dumps({"sent": sent}))


def run_conns(args: argparse.Namespace) -> Dict[str, Any]:
    nsqds = [NsqdProcess() for _ in range(args.conn_nsqds)]
    for nsqd in nsqds:
        nsqd.start()
    received = [0]
    lock = threading.Lock()

    def handler(message: Any) -> bool:
        with lock:
            received[0] += 1
        return True

    try:
        addresses = [nsqd.tcp_address for nsqd in nsqds]
        for nsqd in nsqds:
            nsqd.create_channel(TOPIC, CHANNEL)
        connections = args.conn_nsqds * args.conn_readers
        baseline = {"rss_mb": rss_mb(), "threads": threading.active_count(), "os_threads": os_threads(), "tasks": tasks()}
        began = time.monotonic()
        readers = [
            Reader(TOPIC, CHANNEL, handler, nsqd_tcp_addresses=addresses, max_in_flight=args.conn_max_in_flight, concurrency=1, backend=args.backend, name=f"conns-{i}")
            for i in range(args.conn_readers)
        ]
        for reader in readers:
            reader.start()
        wait_until(lambda: sum(len(r.conns) for r in readers) == connections, timeout=60, interval=0.05, message=f"{connections} connections")
        connect_s = time.monotonic() - began
        connected = {"rss_mb": rss_mb(), "threads": threading.active_count(), "os_threads": os_threads(), "tasks": tasks()}

        # idle: heartbeats (every 30 s by default) and RDY redistribution only
        cpu0, t0 = cpu_s(), time.monotonic()
        time.sleep(args.idle_s)  # the measurement window
        idle_cpu, idle_wall = cpu_s() - cpu0, time.monotonic() - t0
        idle_rss = rss_mb()

        # light load from a separate process (its CPU is not ours)
        spec = {"addresses": addresses, "rate": args.load_rate, "seconds": args.load_s}
        before = received[0]
        cpu0, t0 = cpu_s(), time.monotonic()
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--publisher-child", json.dumps(spec)],
            capture_output=True, text=True, timeout=args.load_s + 60,
        )  # fmt: skip
        if child.returncode != 0:
            raise RuntimeError(f"publisher child failed: {child.stderr[-2000:]}")
        sent = json.loads(child.stdout.strip().splitlines()[-1])["sent"]
        wait_until(lambda: received[0] - before >= sent, timeout=60, interval=0.05, message="light load consumed")
        load_cpu, load_wall = cpu_s() - cpu0, time.monotonic() - t0
        load_rss = rss_mb()
        peak_rss = max(idle_rss, load_rss)

        close_began = time.monotonic()
        for reader in readers:
            reader.close(10)
        close_s = time.monotonic() - close_began
        if tasks() > baseline["tasks"]:
            wait_until(lambda: tasks() <= baseline["tasks"], timeout=10, interval=0.05, message="tasks to end")
    finally:
        for nsqd in nsqds:
            nsqd.close()
    per = 1.0 / connections
    report = {
        "part": "conns",
        "backend": args.backend,
        "connections": connections,
        "nsqds": args.conn_nsqds,
        "readers": args.conn_readers,
        "connect_s": round(connect_s, 2),
        "rss_mb_baseline": round(baseline["rss_mb"], 1),
        "rss_mb_connected": round(connected["rss_mb"], 1),
        "rss_kb_per_connection": round((connected["rss_mb"] - baseline["rss_mb"]) * 1024 * per, 1),
        "rss_kb_per_connection_after_load": round((peak_rss - baseline["rss_mb"]) * 1024 * per, 1),
        "threads_connected": connected["threads"],
        "os_threads_connected": connected["os_threads"],
        "nsq_sync_tasks_connected": connected["tasks"],
        "idle_s": round(idle_wall, 1),
        "idle_cpu_s": round(idle_cpu, 3),
        "idle_cpu_ms_per_connection_per_minute": round(idle_cpu * 1000 * per * 60 / idle_wall, 3),
        "load_rate": args.load_rate,
        "load_s": round(load_wall, 1),
        "load_messages": sent,
        "load_cpu_s": round(load_cpu, 3),
        "load_cpu_ms_per_connection_per_minute": round(load_cpu * 1000 * per * 60 / load_wall, 3),
        "load_cpu_s_per_100k_messages": round(load_cpu / max(1, sent) * 100_000, 2),
        "close_s": round(close_s, 2),
        "nsq_sync_tasks_after_close": tasks(),
        "threads_after_close": threading.active_count(),
    }
    report["ok"] = report["nsq_sync_tasks_after_close"] <= baseline["tasks"]
    return report


def print_conns(report: Dict[str, Any]) -> None:
    print(f"\n{report['connections']} connections ({report['readers']} Readers x {report['nsqds']} nsqd), backend {report['backend']}")
    print_table(
        [
            ["connect all", f"{report['connect_s']} s", "RSS MB baseline/connected", f"{report['rss_mb_baseline']}/{report['rss_mb_connected']}"],
            ["RSS per connection", f"{report['rss_kb_per_connection']} KB", "RSS per conn after load", f"{report['rss_kb_per_connection_after_load']} KB"],
            ["threads (os) connected", f"{report['threads_connected']} ({report['os_threads_connected']})", "nsq_sync tasks", report["nsq_sync_tasks_connected"]],
            ["idle CPU", f"{report['idle_cpu_s']} s / {report['idle_s']} s", "idle CPU per conn", f"{report['idle_cpu_ms_per_connection_per_minute']} ms/min"],
            ["load", f"{report['load_messages']:,} msgs in {report['load_s']} s", "load CPU per conn", f"{report['load_cpu_ms_per_connection_per_minute']} ms/min"],
            ["load CPU", f"{report['load_cpu_s']} s", "CPU s / 100k msgs", report["load_cpu_s_per_100k_messages"]],
            ["close all", f"{report['close_s']} s", "tasks after close", report["nsq_sync_tasks_after_close"]],
        ],
        ["metric", "value", "metric", "value"],
    )


# ----------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["soak", "conns", "both"], default="both")
    parser.add_argument("--backend", choices=["thread", "gevent"], default="thread")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--body-size", type=int, default=100)
    parser.add_argument("--publishers", type=int, default=64)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--nsqds", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=200, help="per consumer Reader")
    parser.add_argument("--consumer-concurrency", type=int, default=2, help="handler workers per Reader")
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--sample-interval", type=float, default=1.0)
    parser.add_argument("--conn-nsqds", type=int, default=10)
    parser.add_argument("--conn-readers", type=int, default=20)
    parser.add_argument("--conn-max-in-flight", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=30)
    parser.add_argument("--load-s", type=float, default=30)
    parser.add_argument("--load-rate", type=int, default=1000, help="messages/s in total during the light load")
    parser.add_argument("--json", help="write the JSON report here (default benchmarks/results/soak-<stamp>.json)")
    parser.add_argument("--publisher-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher_child:
        publisher_child(json.loads(args.publisher_child))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reports: List[Dict[str, Any]] = []
    if args.part in ("soak", "both"):
        report = run_soak(args)
        print_soak(report)
        reports.append(report)
    if args.part in ("conns", "both"):
        report = run_conns(args)
        print_conns(report)
        reports.append(report)
    path = args.json or os.path.join(HERE, "results", f"soak-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(reports, f, indent=1)
    print(f"\nJSON report: {path}")
    print(json.dumps([{k: v for k, v in r.items() if k != "rss_curve"} for r in reports]))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

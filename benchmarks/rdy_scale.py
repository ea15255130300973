#!/usr/bin/env python3
"""What the Reader's RDY bookkeeping costs as the number of nsqd grows (discovery and steady state).

    PYTHONPATH=. .venv/bin/python benchmarks/rdy_scale.py [--n 250,1000,4000] [--mif 100,5000]
        [--via lookupd|direct] [--ticks 30] [--profile] [--json out.json]

For each N and max_in_flight, a child process (tests/support/many_nsqd.py) serves N fake
nsqd on N loopback ports from one selector thread, and nsqlookupd's /lookup listing them all
(``--via direct``: the N addresses go in ``nsqd_tcp_addresses`` instead). A thread-backend
Reader discovers them with one lookupd answer and connects (max_connect_attempts 32, the
default). No real nsqd, no messages: only the connection set and RDY.

Measured in this process, from start() until the fake nsqd see every connection subscribed
with the final RDY (N x max_in_flight // N when N <= max_in_flight, else max_in_flight in
all) and the Reader has them all registered:

* ``passes``: full RDY passes (``Reader._apply_rdy_locked`` calls), ``visits``: the
  connections they looked at (a pass visits every registered connection), their total CPU
  (the calling thread's ``time.thread_time``) and the longest pass;
* lock: how often the Reader's lock was taken, the CPU spent holding it, the longest hold
  and the 99th percentile (wall);
* wall: seconds until all were subscribed, and until their RDY was final; process CPU;
* ``peak_total_rdy``: the highest sum of RDY the fake nsqd ever saw (must stay within
  max_in_flight);
* steady state: ``--ticks`` passes of the redistribution tick (``_apply_rdy_locked(revoke=True)``
  under the lock) at N connections, median and max wall;
* churn (``--churn``, default 0.5): that fraction of the fake nsqd go away at once (their
  connections closed, their ports refused, nsqlookupd no longer listing them); the same
  counts until the fakes see the remaining connections with their final RDY and the Reader
  has handled every close (a second table).

``--profile`` adds cProfile's top functions inside the RDY passes. The fake servers run in
another process, so their CPU is not counted (on a 2-core machine they still compete for the
cores: wall times are indicative; the CPU and pass counts are the measure).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MANY_NSQD = os.path.join(ROOT, "tests", "support", "many_nsqd.py")
sys.path.insert(0, ROOT)

from nsq_sync.reader import Reader, _RdyLock  # noqa: E402


class _TimedLock(_RdyLock):
    """The Reader's lock, timing every hold (wall and the holder's CPU)."""

    __slots__ = ("holds", "cpu", "_t0", "_c0")

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.holds: List[float] = []
        self.cpu = 0.0
        self._t0 = 0.0
        self._c0 = 0.0

    def __enter__(self) -> "_TimedLock":
        super().__enter__()
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.holds.append(time.perf_counter() - self._t0)
        self.cpu += time.thread_time() - self._c0
        super().__exit__(*exc)


class _Probe:
    """Counts and times the Reader's full RDY passes (an instance attribute over the method)."""

    def __init__(self, reader: Reader, profile: bool) -> None:
        self.reader = reader
        self.profiler = cProfile.Profile() if profile else None
        self.reset()
        inner = reader._apply_rdy_locked

        def timed(revoke: bool = False) -> None:
            self.passes += 1
            self.visits += len(reader._conns)
            t0, c0 = time.perf_counter(), time.thread_time()
            if self.profiler is not None:
                self.profiler.enable()
            try:
                inner(revoke)
            finally:
                if self.profiler is not None:
                    self.profiler.disable()
                wall = time.perf_counter() - t0
                self.cpu += time.thread_time() - c0
                self.walls.append(wall)

        reader._apply_rdy_locked = timed  # type: ignore[method-assign]

    def reset(self) -> None:
        self.passes = 0
        self.visits = 0
        self.cpu = 0.0
        self.walls: List[float] = []


class _Servers:
    def __init__(self, n: int, lookupd: bool) -> None:
        args = [sys.executable, MANY_NSQD, str(n)] + (["--lookupd"] if lookupd else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        self.addresses: List[str] = hello["addresses"]
        self.lookupd = hello.get("lookupd")

    def status(self) -> Dict[str, Any]:
        self.proc.stdin.write("status\n")  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self, count: int) -> Dict[str, Any]:
        self.proc.stdin.write(f"close {count}\n")  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def stop(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)


def _pct(values: List[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _expected(n: int, mif: int) -> int:
    return n * min(mif // n, 2500) if n <= mif else mif


def _wait_final(servers: _Servers, reader: Reader, n: int, expected: int, began: float, timeout: float) -> Tuple[Optional[float], Dict[str, Any], bool]:
    """Poll until the fakes see *n* subscribed with *expected* RDY in all and the Reader has
    *n* registered (it registers some without a RDY to send, and may reach the final RDY
    before it has handled every close): (seconds until all were subscribed, the last
    status, timed out)."""
    subscribed_at = None
    while True:
        status = servers.status()
        now = time.perf_counter()
        if subscribed_at is None and status["subscribed"] == n:
            subscribed_at = now - began
        if status["subscribed"] == n and status["total_rdy"] == expected and len(reader._conns) == n:
            return subscribed_at, status, False
        if now - began > timeout:
            return subscribed_at, status, True
        time.sleep(0.02)  # (a benchmark polling another process, not a test)


def _counts(probe: "_Probe", lock: "_TimedLock") -> Dict[str, Any]:
    return dict(
        passes=probe.passes,
        visits=probe.visits,
        pass_cpu=probe.cpu,
        pass_max=max(probe.walls, default=0.0),
        lock_holds=len(lock.holds),
        lock_cpu=lock.cpu,
        lock_max=max(lock.holds, default=0.0),
        lock_p99=_pct(lock.holds, 0.99),
    )


def run_one(n: int, mif: int, via: str, ticks: int, profile: bool, timeout: float, churn: float) -> Dict[str, Any]:
    servers = _Servers(n, lookupd=via == "lookupd")
    kwargs: Dict[str, Any] = {"lookupd_http_addresses": servers.lookupd, "lookupd_poll_interval": 3600} if via == "lookupd" else {"nsqd_tcp_addresses": servers.addresses}
    reader = Reader("rdy_scale", "c", lambda m: True, max_in_flight=mif, backend="thread", **kwargs)
    reader._lock = _TimedLock(reader._lock._lock)
    probe = _Probe(reader, profile)
    expected = _expected(n, mif)
    result: Dict[str, Any] = {"n": n, "max_in_flight": mif, "via": via, "expected_total_rdy": expected}
    lock: _TimedLock = reader._lock  # type: ignore[assignment]
    try:
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        reader.start()
        subscribed_at, status, timed_out = _wait_final(servers, reader, n, expected, began, timeout)
        if timed_out:
            result["timed_out"] = status
        wall = time.perf_counter() - began
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        result.update(
            wall_subscribed=subscribed_at,
            wall_final_rdy=wall,
            process_cpu=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            **_counts(probe, lock),
            peak_total_rdy=status["peak_total_rdy"],
            server_rdy_commands=status["rdy_commands"],
            server_bad=status["bad"],
        )
        with reader._lock:
            result["reader_total_rdy"] = sum(st.conn.rdy for st in reader._conns.values())
            result["reader_conns"] = len(reader._conns)
        if profile and probe.profiler is not None:
            stats = pstats.Stats(probe.profiler)
            stats.sort_stats("tottime").print_stats(12)
        # steady state: the redistribution tick's pass at N connections
        probe.reset()
        probe.profiler = None
        tick_walls = []
        for _ in range(ticks):
            t0 = time.perf_counter()
            with reader._lock:
                reader._apply_rdy_locked(revoke=True)
            tick_walls.append(time.perf_counter() - t0)
        result.update(
            tick_median=statistics.median(tick_walls) if tick_walls else 0.0,
            tick_max=max(tick_walls, default=0.0),
            tick_cpu_each=probe.cpu / max(1, probe.passes),
        )
        gone = int(n * churn)
        if gone and not timed_out:
            probe.reset()
            lock.holds, lock.cpu = [], 0.0
            left = n - gone
            expected_left = _expected(left, mif)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            servers.close(gone)
            _, status, timed_out = _wait_final(servers, reader, left, expected_left, began, timeout)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            result["churn"] = dict(
                gone=gone, left=left, expected_total_rdy=expected_left, timed_out=status if timed_out else None,
                wall_final_rdy=time.perf_counter() - began,
                process_cpu=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                **_counts(probe, lock),
                peak_total_rdy=status["peak_total_rdy"],
            )
    finally:
        reader.close(30)
        reader.join(60)
        servers.stop()
    return result


def _churn_row(r: Dict[str, Any]) -> str:
    c = r["churn"]
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    return (
        f"| {r['n']:>5} -> {c['left']:<5} | {r['max_in_flight']:>5} | {c['passes']:>6} | {c['visits']:>9} | {ms(c['pass_cpu']):>8} | {ms(c['pass_max']):>6} "
        f"| {c['lock_holds']:>6} | {ms(c['lock_cpu']):>8} | {ms(c['lock_max']):>6} | {ms(c['lock_p99']):>5} "
        f"| {c['wall_final_rdy']:.2f} | {c['process_cpu']:.2f} | {c['peak_total_rdy']:>5} / {c['expected_total_rdy']:<5} |"
    )


CHURN_HEADER = (
    "| N -> left | mif | passes | visits | pass CPU ms | pass max ms | holds | lock CPU ms | hold max ms | p99 ms "
    "| final RDY s | proc CPU s | peak (whole run)/expected RDY |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r: Dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    return (
        f"| {r['n']:>5} | {r['max_in_flight']:>5} | {r['passes']:>6} | {r['visits']:>9} | {ms(r['pass_cpu']):>8} | {ms(r['pass_max']):>6} "
        f"| {r['lock_holds']:>6} | {ms(r['lock_cpu']):>8} | {ms(r['lock_max']):>6} | {ms(r['lock_p99']):>5} "
        f"| {r['wall_subscribed'] if r['wall_subscribed'] is None else round(r['wall_subscribed'], 2):>5} | {r['wall_final_rdy']:.2f} | {r['process_cpu']:.2f} "
        f"| {r['peak_total_rdy']:>5} / {r['expected_total_rdy']:<5} | {ms(r['tick_median'])} ({ms(r['tick_max'])}) |"
    )


HEADER = (
    "|     N |   mif | passes |    visits | pass CPU ms | pass max ms | holds | lock CPU ms | hold max ms | p99 ms "
    "| subscribed s | final RDY s | proc CPU s | peak/expected RDY | tick ms median (max) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="250,1000,4000", help="numbers of fake nsqd, comma-separated")
    parser.add_argument("--mif", default="100,5000", help="max_in_flight values, comma-separated")
    parser.add_argument("--via", choices=("lookupd", "direct"), default="lookupd")
    parser.add_argument("--ticks", type=int, default=30, help="redistribution passes timed at N connections")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run before giving up")
    parser.add_argument("--profile", action="store_true", help="cProfile the RDY passes during discovery")
    parser.add_argument("--churn", type=float, default=0.5, help="fraction of the nsqd that go away at once after discovery (0: none)")
    parser.add_argument("--json", help="also write the records to this file")
    args = parser.parse_args()
    logging.getLogger("nsq_sync").setLevel(logging.ERROR)  # (a warning per connection closed or refused)
    results = []
    print(HEADER, flush=True)
    for n in [int(x) for x in args.n.split(",")]:
        for mif in [int(x) for x in args.mif.split(",")]:
            record = run_one(n, mif, args.via, args.ticks, args.profile, args.timeout, args.churn)
            results.append(record)
            print(_row(record), flush=True)
            if record.get("timed_out") or record["server_bad"] or record["peak_total_rdy"] > mif:
                print(f"  !! {json.dumps({k: record.get(k) for k in ('timed_out', 'server_bad', 'peak_total_rdy')})}", flush=True)
    churned = [r for r in results if "churn" in r]
    if churned:
        print("\n" + CHURN_HEADER)
        for record in churned:
            print(_churn_row(record))
            if record["churn"]["timed_out"]:
                print(f"  !! timed out: {record['churn']['timed_out']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

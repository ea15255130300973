"""Shared by every benchmark client child process (standard library only).

A client is started as ``python clients/<impl>.py '<json spec>'`` by ``benchmarks/run.py``.
It talks to the parent over stdout with two lines:

* ``@@BENCH BEGIN`` right before the measured work starts (the parent samples
  nsqd's CPU time when it reads it);
* ``@@BENCH END {json}`` right after the measured work ended (the parent
  samples nsqd's CPU again), with the client's own measurements.

Nothing here imports gevent or any NSQ library, so a child can monkey-patch
first and import this afterwards.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

PREFIX = "@@BENCH"

#: publish scenarios: the first few bytes of every body carry a sequence number,
#: the rest is filler, so every client publishes the same bytes.
def make_body(size: int, seq: int = 0) -> bytes:
    head = b"%08d" % (seq % 100000000)
    if size <= len(head):
        return head[:size]
    return head + b"x" * (size - len(head))


def make_bodies(count: int, size: int) -> List[bytes]:
    return [make_body(size, i) for i in range(count)]


_stamp = struct.Struct(">d")


def stamped_body(size: int) -> bytes:
    """A body that starts with the send time (perf_counter, same process as the receiver)."""
    stamp = _stamp.pack(time.perf_counter())
    return stamp + b"y" * max(0, size - len(stamp))


def stamp_of(body: bytes) -> float:
    return _stamp.unpack_from(body)[0]


def load_spec() -> Dict[str, Any]:
    if len(sys.argv) < 2:
        sys.exit("usage: client.py '<json spec>'")
    return json.loads(sys.argv[1])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS of this program in MB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of a big
    parent would report the parent's peak.
    """
    hwm = _status_mb("VmHWM:")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> Optional[float]:
    return _status_mb("VmRSS:")


def _emit(line: str) -> None:
    # write straight to the fd: works the same under gevent and threads
    os.write(1, (line + "\n").encode())


class Meter:
    """Wall time and this process's CPU time between begin() and end()."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.c0 = 0.0
        self.t1: Optional[float] = None
        self.c1 = 0.0

    def begin(self) -> None:
        _emit(f"{PREFIX} BEGIN")
        self.c0 = cpu_seconds()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        """Freeze the clocks (call from wherever the work ended)."""
        if self.t1 is None:
            self.t1 = time.perf_counter()
            self.c1 = cpu_seconds()

    def end(self, count: int, **extra: Any) -> None:
        self.stop()
        assert self.t1 is not None
        result = {
            "count": count,
            "elapsed": self.t1 - self.t0,
            "client_cpu": self.c1 - self.c0,
            "peak_rss_mb": peak_rss_mb(),
        }
        result.update(extra)
        _emit(f"{PREFIX} END {json.dumps(result)}")


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * pct / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def latency_summary(latencies: List[float]) -> Dict[str, float]:
    values = sorted(latencies)
    return {
        "lat_p50_ms": percentile(values, 50) * 1000,
        "lat_p99_ms": percentile(values, 99) * 1000,
        "lat_max_ms": (values[-1] * 1000) if values else float("nan"),
    }


def split_address(address: str):
    host, _, port = address.rpartition(":")
    return host, int(port)


class Pacer:
    """Tells how many messages are due at rate *rate* since start()."""

    def __init__(self, rate: float, total: int) -> None:
        self.rate = rate
        self.total = total
        self.sent = 0
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def due(self) -> int:
        """Messages that should have been sent by now and were not."""
        target = int((time.perf_counter() - self.t0) * self.rate) + 1
        return max(0, min(self.total, target) - self.sent)

    def wait_time(self) -> float:
        """Seconds until the next message is due."""
        return max(0.0, self.t0 + self.sent / self.rate - time.perf_counter())

    @property
    def done(self) -> bool:
        return self.sent >= self.total

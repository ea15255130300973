#!/usr/bin/env python3
"""Benchmark nsq_sync against pynsq, gnsq and a minimal blocking-socket loop on a real nsqd.

One command::

    bash benchmarks/run            # full run (about 10-15 minutes on 2 cores)
    bash benchmarks/run --quick    # smoke run (about a minute)
    python benchmarks/run.py ...   # the same; re-executes itself in benchmarks/.venv

It creates ``benchmarks/.venv`` when missing (pynsq, gnsq, matplotlib and
nsq_sync from this checkout; see requirements.txt), starts its own nsqd v1.3.0
on loopback through :class:`nsq_sync.testing.NsqdProcess`, and runs every
client implementation in its own subprocess per scenario, interleaved and
repeated. It writes ``docs/benchmarks.md`` (tables of medians, min-max,
ratios and the issue's targets met/missed), ``docs/benchmarks.png`` and the
raw results as JSON in ``benchmarks/results/``.

Measurements per run (one child process = one implementation x scenario x repetition):

* msg/s: messages / wall time between the child's BEGIN and END lines;
* client CPU: ``getrusage(RUSAGE_SELF)`` user+sys in the child over that window;
* nsqd CPU: utime+stime of the nsqd process from ``/proc/<pid>/stat``, sampled
  by this parent when it reads BEGIN and END;
* peak RSS: VmHWM of the child (``ru_maxrss`` would carry the parent's peak over fork+exec);
* latency: publish->receive of stamped messages at a fixed rate, in the child.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")
CLIENTS = os.path.join(HERE, "clients")
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(ROOT, "docs")


# ----------------------------------------------------------------------------- venv


def _in_venv() -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(VENV)


def ensure_venv() -> None:
    """Create benchmarks/.venv when needed and re-execute this script inside it."""
    if _in_venv():
        return
    python = os.path.join(VENV, "bin", "python")
    probe = "import nsq, gnsq, matplotlib, nsq_sync, gevent, snappy"
    if not os.path.exists(python) or subprocess.call([python, "-c", probe], stderr=subprocess.DEVNULL) != 0:
        print(f"setting up {VENV} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.check_call(pip + ["-r", os.path.join(HERE, "requirements.txt")])
        subprocess.check_call(pip + ["-e", ROOT + "[gevent,snappy]"])
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


# ----------------------------------------------------------------------------- bytecode

#: The clients' environment. Every implementation runs from bytecode, as a pip-installed
#: package does (pip byte-compiles what it installs): pynsq, gnsq, tornado and the standard
#: library have their .pyc files, but nsq_sync is installed editable, and with
#: PYTHONDONTWRITEBYTECODE set (as on some CI machines and sandboxes) it was compiled from source
#: in every client process. That compiling costs CPU at start and about 5 MB of peak RSS, which
#: the RSS scenario then charged to nsq_sync alone.
CLIENT_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def compile_nsq_sync() -> None:
    """Byte-compile nsq_sync in place (its __pycache__, ignored by git), as pip would."""
    import nsq_sync

    package = os.path.dirname(os.path.abspath(nsq_sync.__file__))
    subprocess.check_call([sys.executable, "-m", "compileall", "-q", package], env=CLIENT_ENV)


# ----------------------------------------------------------------------------- scenarios

IMPL_LABELS = {
    "minimal": "minimal loop",
    "nsq_sync": "nsq_sync (thread)",
    "nsq_sync_gevent": "nsq_sync (gevent)",
    "nsq_sync_asyncconn": "nsq_sync AsyncConn (thread)",
    "pynsq": "pynsq 0.9.1",
    "gnsq": "gnsq 1.0.2",
}
IMPL_CLIENT = {
    "minimal": ("minimal.py", {}),
    "nsq_sync": ("nsq_sync_client.py", {"backend": "thread", "variant": "reader"}),
    "nsq_sync_gevent": ("nsq_sync_client.py", {"backend": "gevent", "variant": "reader"}),
    "nsq_sync_asyncconn": ("nsq_sync_client.py", {"backend": "thread", "variant": "asyncconn"}),
    "pynsq": ("pynsq_client.py", {}),
    "gnsq": ("gnsq_client.py", {}),
}
PEERS = ("pynsq", "gnsq")
BASE_IMPLS = ["minimal", "nsq_sync", "nsq_sync_gevent", "pynsq", "gnsq"]
CONSUME_EXTRA = 2000


#: repetitions of every scenario a target compares in a full run: one run's figures on a shared
#: 2-core machine move by up to 2x from run to run (where the scheduler puts nsqd and the client),
#: and a median of 3 still flips a target either way
TARGET_REPS = 5
#: 8 threads: every implementation publishes this many messages the same way, untimed, before the
#: measured ones. The other publishing scenarios start the clock once connected; a Writer opens a
#: connection per publishing thread (its lanes) on demand, which took 17-30 ms of a 0.35 s run
PUB_CONCURRENT_WARMUP = 2000


class Scenario:
    def __init__(
        self,
        sid: str,
        title: str,
        kind: str,
        n_full: int,
        n_quick: int,
        params: Optional[Dict[str, Any]] = None,
        compression: str = "none",
        metric: str = "rate",
        consume: bool = False,
        asyncconn: bool = False,
        per_run_seconds: Optional[Tuple[float, float]] = None,
        min_reps: int = 0,
    ) -> None:
        self.sid = sid
        self.title = title
        self.kind = kind
        self.n_full = n_full
        self.n_quick = n_quick
        self.params = params or {}
        self.compression = compression
        self.metric = metric
        self.consume = consume
        self.asyncconn = asyncconn
        self.per_run_seconds = per_run_seconds  # latency: (full, quick) seconds
        self.min_reps = min_reps  # at least this many repetitions in a full run

    def reps(self, reps: int, quick: bool) -> int:
        return reps if quick else max(reps, self.min_reps)

    def n(self, quick: bool) -> int:
        if self.per_run_seconds is not None:
            seconds = self.per_run_seconds[1 if quick else 0]
            return int(seconds * self.params["rate"])
        return self.n_quick if quick else self.n_full


def build_scenarios() -> List[Scenario]:
    # Sizes: a publishing run of the fastest client lasts about a second or more. At a third of
    # a second (mpub of 200,000) one client's repetitions spread 1.4-1.6x and the ratio of
    # medians moved by 10 points between runs; at 800,000 the spread fell to 1.05-1.2x. One at a
    # time: 1.2-1.9x at 8,000, 1.1-1.3x at 32,000. 100 outstanding (1.1x at either size) grew alike.
    out: List[Scenario] = []
    for comp in ("none", "snappy", "deflate"):
        suffix = "" if comp == "none" else f"_{comp}"
        out.append(
            Scenario(
                f"consume_mif200{suffix}",
                f"consume, max_in_flight 200, noop handler{'' if comp == 'none' else ', ' + comp}",
                "consume", 50000, 5000, {"max_in_flight": 200}, comp, consume=True, asyncconn=True,
                min_reps=TARGET_REPS,
            )
        )
    out.append(
        Scenario("consume_mif1", "consume, max_in_flight 1, noop handler", "consume", 4000, 800,
                 {"max_in_flight": 1}, consume=True, asyncconn=True)
    )
    for comp in ("none", "snappy", "deflate"):
        suffix = "" if comp == "none" else f"_{comp}"
        label = "" if comp == "none" else f", {comp}"
        out.append(Scenario(f"pub_serial{suffix}", f"publish one at a time, waiting for OK{label}",
                            "pub_serial", 32000, 1500, {}, comp, min_reps=TARGET_REPS))
    out.append(Scenario("pub_100_outstanding", "publish with 100 outstanding (rounds of 100)",
                        "pub_batch", 120000, 4000, {"window": 100}, min_reps=TARGET_REPS))
    out.append(Scenario("pub_8_threads", "8 threads publishing through one Writer (peers: 8 concurrent)",
                        "pub_concurrent", 20000, 3000, {"concurrency": 8, "warmup": PUB_CONCURRENT_WARMUP},
                        min_reps=TARGET_REPS))
    for comp in ("none", "snappy", "deflate"):
        suffix = "" if comp == "none" else f"_{comp}"
        label = "" if comp == "none" else f", {comp}"
        out.append(Scenario(f"mpub_100{suffix}", f"mpub of 100, waiting for OK{label}", "mpub",
                            800000, 20000, {"batch": 100}, comp, min_reps=TARGET_REPS))
    for obt in (250, 25):
        out.append(
            Scenario(
                f"latency_obt{obt}", f"latency publish->receive at 1,000 msg/s, output_buffer_timeout {obt} ms",
                "latency", 0, 0, {"rate": 1000, "max_in_flight": 200, "output_buffer_timeout": obt},
                metric="latency", consume=True, asyncconn=True, per_run_seconds=(5.0, 0.6), min_reps=5,
            )
        )
    out.append(Scenario("rss_one_connection", "import + one connection + one publish: peak RSS",
                        "rss", 1, 1, {}, metric="rss"))
    return out


# ----------------------------------------------------------------------------- nsqd helpers


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


#: CPUs for the client subprocesses when --pin is given (None: wherever the scheduler puts them)
CLIENT_CPUS: Optional[set] = None


def pin_cpus(broker_pid: int) -> Optional[str]:
    """--pin: nsqd on the first CPU, every client on the others; None when this machine cannot.

    Client and broker then never share a core, as on the separate machines of a deployment.
    Otherwise, on a machine with few cores, the scheduler moves a threaded client's threads
    onto nsqd's core in some runs and not in others, and the same client's rate varies by 2x.
    Every implementation runs under the same split.
    """
    global CLIENT_CPUS
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return None
    broker_cpu, CLIENT_CPUS = {cpus[0]}, set(cpus[1:])
    for task in os.listdir(f"/proc/{broker_pid}/task"):  # every thread nsqd has; new ones inherit
        os.sched_setaffinity(int(task), broker_cpu)
    os.sched_setaffinity(0, CLIENT_CPUS)  # this process too (it reads the clients' output)
    return f"nsqd on CPU {cpus[0]}, clients on CPU {','.join(map(str, cpus[1:]))}"


class Broker:
    def __init__(self, mem_queue_size: int) -> None:
        from nsq_sync.testing import NsqdProcess

        self.nsqd = NsqdProcess(extra_args=[f"--mem-queue-size={mem_queue_size}"])
        self.nsqd.start()
        sys.path.insert(0, CLIENTS)
        version = self.nsqd.http_request("GET", "/info")[1]
        self.version = json.loads(version).get("version", "?")

    @property
    def pid(self) -> int:
        assert self.nsqd.pid is not None
        return self.nsqd.pid

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def post(self, path: str) -> None:
        status, body = self.nsqd.http_request("POST", path)
        if status != 200:
            raise RuntimeError(f"nsqd {path}: {status} {body[:200]!r}")

    def create(self, topic: str, channel: Optional[str]) -> None:
        self.post(f"/topic/create?topic={topic}")
        if channel:
            self.post(f"/channel/create?topic={topic}&channel={channel}")

    def delete(self, topic: str) -> None:
        try:
            self.post(f"/topic/delete?topic={topic}")
        except Exception as exc:  # pragma: no cover - best effort
            print(f"  (could not delete topic {topic}: {exc})", flush=True)

    def prefill(self, topic: str, channel: str, n: int, size: int) -> None:
        """Put n messages in the channel (MPUB) and wait until nsqd moved them all there."""
        from _common import make_bodies
        from minimal import MinimalConn, mpub_cmd

        conn = MinimalConn(self.nsqd.tcp_address)
        bodies = make_bodies(n, size)
        for start in range(0, n, 2000):
            conn.send(mpub_cmd(topic, bodies[start : start + 2000]))
            conn.read_oks(1)
        conn.close()
        deadline = time.monotonic() + 30
        while self.nsqd.channel_depth(topic, channel) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefill of {topic}: channel depth stayed below {n}")
            time.sleep(0.01)

    def channel_counters(self, topic: str, channel: str) -> Dict[str, int]:
        stats = self.nsqd.channel_stats(topic, channel) or {}
        return {k: int(stats.get(k, 0)) for k in ("depth", "in_flight_count", "deferred_count", "requeue_count", "timeout_count", "message_count")}

    def topic_count(self, topic: str) -> int:
        stats = self.nsqd.topic_stats(topic) or {}
        return int(stats.get("message_count", 0))


# ----------------------------------------------------------------------------- one run


def _reader(stream, lines: "queue.Queue[Tuple[float, Optional[str]]]") -> None:
    for raw in iter(stream.readline, b""):
        lines.put((time.perf_counter(), raw.decode("utf-8", "replace").rstrip("\n")))
    lines.put((time.perf_counter(), None))


def _error_from(stderr_text: str, stdout_tail: List[str]) -> str:
    """The child's error line, with where the innermost traceback frame was (site-packages relative)."""
    lines = [l.strip() for l in stderr_text.splitlines() if l.strip()]
    frames = [l for l in lines if l.startswith('File "')]
    where = ""
    if frames:
        last = frames[-1]
        try:
            path = last.split('"')[1]
            path = path.split("site-packages/")[-1]
            rest = last.split('"', 2)[2].strip(", ")  # line N, in func
            where = f" (raised at {path}, {rest})"
        except IndexError:
            where = ""
    keep = [l for l in lines if not l.startswith("File ") and not l.startswith("^") and not l.startswith("~")]
    for line in reversed(keep):
        if line.startswith("FAILED:") or "Error" in line or "Exception" in line or "timed out" in line:
            return (line + (where if not line.startswith("FAILED:") else ""))[:700]
    if keep:
        return keep[-1][:700]
    return ("no result; stdout: " + " | ".join(stdout_tail[-3:]))[:700]


def run_one(broker: Broker, scenario: Scenario, impl: str, rep: int, seq: int, quick: bool, body_size: int) -> Dict[str, Any]:
    client_file, extra = IMPL_CLIENT[impl]
    n = scenario.n(quick)
    topic = f"b{seq:04d}_{scenario.sid[:24]}_{impl[:12]}"
    channel = "bench" if scenario.consume else None
    record: Dict[str, Any] = {
        "scenario": scenario.sid, "impl": impl, "rep": rep, "n": n, "compression": scenario.compression, "ok": False,
    }
    if scenario.params.get("warmup"):
        record["warmup"] = scenario.params["warmup"]  # untimed messages published first
    broker.create(topic, channel)
    # consume: N messages are measured, CONSUME_EXTRA more keep the channel from running dry
    # before the N-th (nsqd holds a last partial output buffer for output_buffer_timeout)
    prefilled = n + CONSUME_EXTRA if scenario.kind == "consume" else 0
    if prefilled:
        broker.prefill(topic, "bench", prefilled, body_size)
    timeout = 30 + n / 400.0 if scenario.metric != "latency" else 60 + n / 1000.0
    spec = {
        "scenario": scenario.kind, "address": broker.nsqd.tcp_address, "topic": topic, "channel": channel,
        "n": n, "body_size": body_size, "compression": scenario.compression, "timeout": timeout,
        "output_buffer_timeout": 250,
    }
    spec.update(scenario.params)
    spec.update(extra)
    lines: "queue.Queue[Tuple[float, Optional[str]]]" = queue.Queue()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(CLIENTS, client_file), json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=CLIENTS, env=CLIENT_ENV,
            preexec_fn=(lambda: os.sched_setaffinity(0, CLIENT_CPUS)) if CLIENT_CPUS else None,
        )
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True)
        reader.start()
        cpu0 = cpu1 = None
        result = None
        tail: List[str] = []
        deadline = time.monotonic() + timeout + 15
        while True:
            try:
                _, line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("@@BENCH BEGIN"):
                cpu0 = broker.cpu()
            elif line.startswith("@@BENCH END"):
                cpu1 = broker.cpu()
                result = json.loads(line.split("END", 1)[1])
                deadline = time.monotonic() + 20  # cleanup of the child
            else:
                tail.append(line)
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if result is None:
                tail.append(f"timed out after {timeout + 15:.0f}s (killed)")
        err.seek(0)
        stderr_text = err.read().decode("utf-8", "replace")
    record["returncode"] = proc.returncode
    if result is None:
        reason = _error_from(stderr_text + "\n" + "\n".join(tail), tail)
        if tail and "timed out" in tail[-1] and "timed out" not in reason:
            reason = tail[-1] + ": " + reason
        record["error"] = reason
        record["stderr_tail"] = stderr_text[-3000:]
    else:
        record.update(result)
        record["ok"] = True
        elapsed = max(result["elapsed"], 1e-9)
        count = result["count"]
        record["rate"] = count / elapsed
        record["client_cpu_per_100k"] = result["client_cpu"] * 100000.0 / count if count else None
        if cpu0 is not None and cpu1 is not None:
            record["nsqd_cpu"] = cpu1 - cpu0
            record["nsqd_cpu_per_100k"] = (cpu1 - cpu0) * 100000.0 / count if count else None
        if result.get("errors"):
            # the client logged connection errors and recovered (reconnect): the numbers are not
            # those of a working client, so the run counts as failed
            record["ok"] = False
            record["error"] = "connection error during the run, the client reconnected: " + " / ".join(result["errors"][:2])
        if proc.returncode not in (0, None):
            record["warnings"] = record.get("warnings", []) + [f"exit status {proc.returncode} after END: {_error_from(stderr_text, tail)}"]
    # verify what nsqd saw
    try:
        if scenario.kind == "consume" and record["ok"]:
            # the child is gone: whatever it did not FIN is still in flight (until msg_timeout)
            counters = broker.channel_counters(topic, "bench")
            finished = prefilled - counters["depth"] - counters["in_flight_count"] - counters["deferred_count"]
            counters["finished"] = finished
            record["nsqd_check"] = counters
            # requeues are expected: a closing Reader hands back what it had not started
            if finished < n or counters["timeout_count"]:
                record.setdefault("warnings", []).append(f"nsqd saw {finished} FINs for {n} messages: {counters}")
        elif scenario.kind in ("pub_serial", "pub_batch", "pub_concurrent", "mpub") and record["ok"]:
            got = broker.topic_count(topic)
            expected = n + scenario.params.get("warmup", 0)
            record["nsqd_check"] = {"message_count": got}
            if got != expected:
                record.setdefault("warnings", []).append(f"nsqd counted {got} messages, expected {expected}")
    finally:
        broker.delete(topic)
    return record


# ----------------------------------------------------------------------------- aggregation


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _normalize_error(text: str) -> str:
    """Drop what differs between runs of the same failure (addresses, ports, topics, message ids)."""
    import re

    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    text = re.sub(r"\[127\.0\.0\.1:\d+:[^\]]*\]", "[nsqd:…]", text)
    text = re.sub(r"b'[0-9a-f]{16}'", "b'<id>'", text)
    return text


def aggregate(records: List[Dict[str, Any]]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["scenario"], rec["impl"]), []).append(rec)
    out: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for key, recs in groups.items():
        ok = [r for r in recs if r["ok"]]
        agg: Dict[str, Any] = {"runs": len(recs), "ok_runs": len(ok)}
        agg["errors"] = sorted({_normalize_error(r["error"]) for r in recs if not r["ok"]})
        agg["warnings"] = sorted({w for r in recs for w in r.get("warnings", [])})
        agg["api"] = sorted({r["api"] for r in ok if r.get("api")})
        for field in ("rate", "client_cpu_per_100k", "nsqd_cpu_per_100k", "peak_rss_mb", "rss_now_mb",
                      "lat_p50_ms", "lat_p99_ms", "lat_max_ms"):
            values = [r[field] for r in ok if r.get(field) is not None]
            if values:
                agg[field] = statistics.median(values)
                agg[field + "_min"] = min(values)
                agg[field + "_max"] = max(values)
        out[key] = agg
    return out


# ----------------------------------------------------------------------------- report


def _fmt_rate(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}"


def _fmt(v: Optional[float], digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt_ratio(r: Optional[float], pct: bool = False) -> str:
    if r is None:
        return "–"
    return f"{r * 100:.0f}%" if pct else f"{r:.2f}x"


def evaluate_targets(scenarios: List[Scenario], agg: Dict[Tuple[str, str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, each with the measured value, the bound and met/missed."""
    targets: List[Dict[str, Any]] = []

    def get(sid: str, impl: str, field: str = "rate") -> Optional[float]:
        return agg.get((sid, impl), {}).get(field)

    def add(name: str, value: Optional[float], bound: str, met: Optional[bool], detail: str = "") -> None:
        targets.append({"target": name, "value": value, "bound": bound, "met": met, "detail": detail})

    def ratio_target(name: str, num: Optional[float], den: Optional[float], at_least: float, pct: bool = False, den_name: str = "") -> None:
        r = _ratio(num, den)
        bound = (f">= {at_least * 100:.0f}%" if pct else f">= {at_least:g}x")
        detail = f"{_fmt_rate(num)} vs {_fmt_rate(den)} msg/s" if num is not None and den is not None else ("n/a: " + den_name + " missing" if den is None else "n/a")
        add(name, r, bound, None if r is None else r >= at_least, detail)

    for comp in ("", "_snappy", "_deflate"):
        label = comp.strip("_") or "plain"
        sid = "consume_mif200" + comp
        if not any(s.sid == sid for s in scenarios):
            continue
        ratio_target(f"consume mif200 {label}: thread >= 10x pynsq", get(sid, "nsq_sync"), get(sid, "pynsq"), 10, den_name="pynsq")
        ratio_target(f"consume mif200 {label}: thread >= 8x gnsq", get(sid, "nsq_sync"), get(sid, "gnsq"), 8, den_name="gnsq")
        ratio_target(f"consume mif200 {label}: thread >= 40% of minimal loop", get(sid, "nsq_sync"), get(sid, "minimal"), 0.4, pct=True, den_name="minimal")
        ratio_target(f"consume mif200 {label}: gevent >= 6x gnsq", get(sid, "nsq_sync_gevent"), get(sid, "gnsq"), 6, den_name="gnsq")
        for field, factor, what in (("client_cpu_per_100k", 6, "client CPU"), ("nsqd_cpu_per_100k", 5, "nsqd CPU")):
            ours = get(sid, "nsq_sync", field)
            peers = [(p, get(sid, p, field)) for p in PEERS]
            peers = [(p, v) for p, v in peers if v is not None]
            if ours is None or not peers:
                add(f"consume mif200 {label}: {what}/100k <= 1/{factor} of peers'", None, f"<= 1/{factor}", None, "n/a")
                continue
            worst = max(ours / v for _, v in peers)
            detail = f"{ours:.3f}s vs " + ", ".join(f"{p} {v:.3f}s" for p, v in peers)
            add(f"consume mif200 {label}: {what}/100k <= 1/{factor} of peers'", worst, f"<= {1 / factor:.3f}x", worst <= 1 / factor, detail)
    for comp in ("", "_snappy", "_deflate"):
        label = comp.strip("_") or "plain"
        sid = "pub_serial" + comp
        if any(s.sid == sid for s in scenarios):
            ratio_target(f"publish one at a time {label}: >= 90% of minimal loop", get(sid, "nsq_sync"), get(sid, "minimal"), 0.9, pct=True, den_name="minimal")
    if any(s.sid == "pub_8_threads" for s in scenarios):
        ratio_target("8 threads through one Writer: >= 50% of minimal 100-outstanding", get("pub_8_threads", "nsq_sync"), get("pub_100_outstanding", "minimal"), 0.5, pct=True, den_name="minimal 100-outstanding")
    for comp in ("", "_snappy", "_deflate"):
        label = comp.strip("_") or "plain"
        sid = "mpub_100" + comp
        if any(s.sid == sid for s in scenarios):
            ratio_target(f"mpub of 100 {label}: >= 90% of minimal loop", get(sid, "nsq_sync"), get(sid, "minimal"), 0.9, pct=True, den_name="minimal")
    for obt in (250, 25):
        sid = f"latency_obt{obt}"
        if not any(s.sid == sid for s in scenarios):
            continue
        ours = get(sid, "nsq_sync", "lat_p99_ms")
        peers = [(p, get(sid, p, "lat_p99_ms")) for p in PEERS]
        peers = [(p, v) for p, v in peers if v is not None]
        if ours is None or not peers:
            add(f"latency p99 at 1,000 msg/s, obt {obt} ms: <= best peer", None, "<= best peer", None, "n/a")
        else:
            best_name, best = min(peers, key=lambda pv: pv[1])
            close = "" if ours <= best or ours > best * 1.05 else " (within 5%: inside the run-to-run noise)"
            add(f"latency p99 at 1,000 msg/s, obt {obt} ms: <= best peer", ours, f"<= {best:.1f} ms ({best_name})", ours <= best,
                f"{ours:.1f} ms vs " + ", ".join(f"{p} {v:.1f} ms" for p, v in peers) + close)
    rss = get("rss_one_connection", "nsq_sync", "peak_rss_mb")
    if any(s.sid == "rss_one_connection" for s in scenarios):
        add("import + one connection, thread backend: RSS <= 20 MB", rss, "<= 20 MB", None if rss is None else rss <= 20,
            "" if rss is None else f"peak RSS {rss:.1f} MB")
    # compression: no more than 2x the plain cost (client CPU per 100k, and wall time)
    for base in ("consume_mif200", "pub_serial", "mpub_100"):
        plain_cpu = get(base, "nsq_sync", "client_cpu_per_100k")
        plain_rate = get(base, "nsq_sync")
        for comp in ("snappy", "deflate"):
            sid = f"{base}_{comp}"
            if not any(s.sid == sid for s in scenarios):
                continue
            cpu = get(sid, "nsq_sync", "client_cpu_per_100k")
            rate = get(sid, "nsq_sync")
            r_cpu = _ratio(cpu, plain_cpu)
            r_time = _ratio(plain_rate, rate)
            if r_cpu is None or r_time is None:
                add(f"{base} {comp}: cost <= 2x plain", None, "<= 2x", None, "n/a")
                continue
            worst = max(r_cpu, r_time)
            # The ceiling's own ratio, for scale: compression's cost is mostly zlib's or snappy's.
            m_cpu = _ratio(get(sid, "minimal", "client_cpu_per_100k"), get(base, "minimal", "client_cpu_per_100k"))
            add(f"{base} {comp}: cost <= 2x plain", worst, "<= 2x", worst <= 2,
                f"client CPU {r_cpu:.2f}x, wall time {r_time:.2f}x of plain"
                + ("" if m_cpu is None else f" (minimal loop: client CPU {m_cpu:.2f}x)"))
    return targets


def write_markdown(path: str, meta: Dict[str, Any], scenarios: List[Scenario], impls_by_scenario: Dict[str, List[str]],
                   agg: Dict[Tuple[str, str], Dict[str, Any]], targets: List[Dict[str, Any]], chart: Optional[str]) -> None:
    L: List[str] = []
    L.append("# Benchmarks")
    L.append("")
    L.append(f"Generated by `{meta['command']}` on {meta['date']} ({'quick smoke run' if meta['quick'] else 'full run'}, "
             f"{meta['reps']} repetitions, at least {TARGET_REPS} where a target compares a ratio and for latency; "
             "implementations interleaved in rotating order in every repetition).")
    L.append("")
    L.append(f"Machine: {meta['cpu']}, {meta['cores']} cores, Linux {meta['kernel']}; Python {meta['python']}; "
             f"nsqd {meta['nsqd']} on loopback (`--mem-queue-size={meta['mem_queue_size']}`, so every message stays in memory); "
             f"{meta['body_size']}-byte bodies. Versions: {meta['versions']}.")
    L.append("")
    L.append("Every figure is the median of the repetitions, with min-max. Each implementation runs in its own "
             "process per scenario, so CPU and RSS are per client, and runs from bytecode, as a pip-installed "
             "package does (nsq_sync, installed editable, is byte-compiled before the run). Absolute numbers are noisy (a shared 2-core "
             "machine: nsqd and the client compete for the cores); compare ratios from the same run.")
    L.append("")
    if chart:
        L.append(f"![benchmark chart]({os.path.basename(chart)})")
        L.append("")
    # targets
    L.append("## Targets (issue #7)")
    L.append("")
    L.append("| target | measured | bound | result | detail |")
    L.append("|---|---|---|---|---|")
    for t in targets:
        v = t["value"]
        if v is None:
            val = "–"
        elif "RSS" in t["target"]:
            val = f"{v:.1f} MB"
        elif "latency" in t["target"]:
            val = f"{v:.1f} ms"
        elif "%" in t["bound"]:
            val = f"{v * 100:.0f}%"
        else:
            val = f"{v:.2f}x"
        res = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        L.append(f"| {t['target']} | {val} | {t['bound']} | {res} | {t['detail']} |")
    L.append("")
    met = sum(1 for t in targets if t["met"])
    missed = sum(1 for t in targets if t["met"] is False)
    L.append(f"{met} met, {missed} missed, {len(targets) - met - missed} not measurable.")
    L.append("")
    if any(t["met"] is False and t["target"].startswith("8 threads") for t in targets):
        L.append("The 8-thread target compares OS threads that each block for their own answer with one "
                 "thread that pipelines 100 publishes and waits for no one. nsq_sync gives each of the 8 threads "
                 "a connection of its own (Writer lanes), so no thread waits for another to read its answer, but "
                 "every publish still releases and takes back the GIL around its send and its recv. On a 2-core "
                 "machine shared with nsqd, the rate then depends on where the scheduler puts the client's "
                 "threads: kept on one core, a publish costs about one context switch; spread over both, a thread "
                 "that wakes often finds the GIL held on the other core, and the same client runs at half the "
                 "rate (see the min-max in its table below, and [Architecture](architecture.md#the-writer)). "
                 "`bash benchmarks/run --pin` (nsqd on one core, every client on the other) measures it without "
                 "that; `benchmarks/thread_floor.py` compares the Writer with 8 bare send/recv loops on sockets "
                 "of their own. [Tuning](tuning.md) says what to use for more (`pub_async` windows, `mpub`, gevent).")
        greenlets = agg.get(("pub_8_threads", "nsq_sync_gevent"), {}).get("rate")
        bar = agg.get(("pub_100_outstanding", "minimal"), {}).get("rate")
        if greenlets and bar:
            L.append("")
            L.append(f"For comparison, 8 greenlets through one Writer on the gevent backend (no GIL hand-off, a "
                     f"greenlet switch per answer) reached {greenlets / bar * 100:.0f}% of that bar in this run "
                     f"({_fmt_rate(greenlets)} vs {_fmt_rate(bar)} msg/s).")
        L.append("")
    if any(t["met"] is False and t["target"].startswith("consume mif200 deflate: thread >= 10x pynsq") for t in targets):
        ceiling = agg.get(("consume_mif200_deflate", "minimal"), {}).get("rate")
        pynsq = agg.get(("consume_mif200_deflate", "pynsq"), {})
        peer = pynsq.get("rate")
        if ceiling and peer:
            runs = ""
            if pynsq.get("ok_runs", 0) < pynsq.get("runs", 0):
                runs = (f" pynsq completed {pynsq['ok_runs']} of its {pynsq['runs']} runs (on Tornado 6 its compressed "
                        "connections close under load: pynsq issue #258, and the failures below); its figure is "
                        "the median of those.")
            L.append(f"Consuming with deflate, the minimal loop itself reached {ceiling / peer:.1f}x pynsq in this "
                     "run: nsqd compresses each connection's stream at the level the client asks for (6, every "
                     "client's default here), and that compression, not the client, bounds the rate." + runs + " "
                     "[Tuning](tuning.md#other-settings) has the figures for `deflate_level=1`.")
            L.append("")
    if any(t["met"] is None and t["target"].startswith("consume mif200 deflate: thread >= 10x pynsq") for t in targets):
        ours = agg.get(("consume_mif200_deflate", "nsq_sync"), {}).get("rate")
        ceiling = agg.get(("consume_mif200_deflate", "minimal"), {}).get("rate")
        plain = agg.get(("consume_mif200", "pynsq"), {}).get("rate")
        if ours and ceiling and plain:
            L.append("pynsq could not consume with deflate in any run: on Tornado 6 its compressed connections "
                     "close under load (see the failures below; pynsq issue #258, open since 2021). So that target "
                     "has no measurement. The nearest figures: pynsq's plain rate, which deflate could only lower, "
                     f"was {_fmt_rate(plain)} msg/s; nsq_sync with deflate reached {ours / plain:.2f}x that, and the "
                     f"minimal loop with deflate {ceiling / plain:.2f}x. With deflate, nsqd compresses every "
                     "connection's stream at the level the client asks for (6 here), and that bounds the rate "
                     "whatever the client ([Tuning](tuning.md#other-settings) has `deflate_level=1`).")
            L.append("")
    if any(t["met"] is False and t["target"].startswith("publish one at a time") for t in targets):
        L.append("Publishing one at a time is bound by the round trip, and on a virtual machine whose idle vCPUs "
                 "halt, by wake-ups: each microsecond a client spends between nsqd's answer and its next PUB cost "
                 "two to three in the round trip here. nsq_sync spends 3.9-4.5 us there (the Writer's and the "
                 "connection's checks and bookkeeping), the minimal loop 1.4-2.0 us (it sends commands built "
                 "before the timing starts), so the gap shows most when the machine is quiet and the round trip "
                 "short; a client that stays busy until the answer arrives gains (the minimal loop's slow snappy "
                 "decoder does). [Architecture](architecture.md#measuring-the-hot-path) gives the measurements.")
        L.append("")
    # per scenario
    L.append("## Results")
    L.append("")
    L.append("msg/s: median (min-max). CPU: seconds per 100,000 messages. RSS: peak MB of the client process. "
             "Ratios are of median msg/s: x pynsq / x gnsq (how many times faster), % minimal (share of the ceiling).")
    L.append("")
    for sc in scenarios:
        impls = impls_by_scenario[sc.sid]
        L.append(f"### {sc.title} (`{sc.sid}`)")
        L.append("")
        if sc.metric == "latency":
            if "250" in sc.sid:
                L.append("At 1,000 msg/s nsqd's 16 KiB output buffer fills every ~120 ms, before the 250 ms flush "
                         "ticker; the p99 then lands either near 120 ms or near 200-250 ms depending on how the "
                         "ticker's phase meets the buffer fills in that run, for every client (the minimal loop "
                         "too), so this scenario gets at least 5 repetitions and only a consistent shift means much.")
                L.append("")
            L.append("| implementation | p50 ms | p99 ms (min-max) | max ms | client CPU s | RSS MB | notes |")
            L.append("|---|---|---|---|---|---|---|")
            for impl in impls:
                a = agg.get((sc.sid, impl), {})
                L.append(
                    f"| {IMPL_LABELS[impl]} | {_fmt(a.get('lat_p50_ms'), 1)} | {_fmt(a.get('lat_p99_ms'), 1)} "
                    f"({_fmt(a.get('lat_p99_ms_min'), 1)}-{_fmt(a.get('lat_p99_ms_max'), 1)}) | {_fmt(a.get('lat_max_ms'), 1)} "
                    f"| {_fmt(a.get('client_cpu_per_100k') and a['client_cpu_per_100k'] * sc.n(meta['quick']) / 100000)} "
                    f"| {_fmt(a.get('peak_rss_mb'), 1)} | {_notes(a)} |"
                )
        elif sc.metric == "rss":
            L.append("| implementation | peak RSS MB (min-max) | RSS at the end MB | notes |")
            L.append("|---|---|---|---|")
            for impl in impls:
                a = agg.get((sc.sid, impl), {})
                L.append(f"| {IMPL_LABELS[impl]} | {_fmt(a.get('peak_rss_mb'), 1)} ({_fmt(a.get('peak_rss_mb_min'), 1)}-"
                         f"{_fmt(a.get('peak_rss_mb_max'), 1)}) | {_fmt(a.get('rss_now_mb'), 1)} | {_notes(a)} |")
        else:
            L.append("| implementation | msg/s (min-max) | client CPU s/100k | nsqd CPU s/100k | RSS MB | x pynsq | x gnsq | % minimal | notes |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            base_p = agg.get((sc.sid, "pynsq"), {}).get("rate")
            base_g = agg.get((sc.sid, "gnsq"), {}).get("rate")
            base_m = agg.get((sc.sid, "minimal"), {}).get("rate")
            for impl in impls:
                a = agg.get((sc.sid, impl), {})
                rate = a.get("rate")
                rng = f" ({_fmt_rate(a.get('rate_min'))}-{_fmt_rate(a.get('rate_max'))})" if rate is not None else ""
                L.append(
                    f"| {IMPL_LABELS[impl]} | {_fmt_rate(rate)}{rng} | {_fmt(a.get('client_cpu_per_100k'))} "
                    f"| {_fmt(a.get('nsqd_cpu_per_100k'))} | {_fmt(a.get('peak_rss_mb'), 1)} "
                    f"| {_fmt_ratio(_ratio(rate, base_p)) if impl != 'pynsq' else ''} "
                    f"| {_fmt_ratio(_ratio(rate, base_g)) if impl != 'gnsq' else ''} "
                    f"| {_fmt_ratio(_ratio(rate, base_m), pct=True) if impl != 'minimal' else ''} | {_notes(a)} |"
                )
        L.append("")
    # broken
    broken = [(sc, impl, agg[(sc.sid, impl)]) for sc in scenarios for impl in impls_by_scenario[sc.sid]
              if (sc.sid, impl) in agg and agg[(sc.sid, impl)]["errors"]]
    L.append("## Broken or failing runs")
    L.append("")
    if not broken:
        L.append("None.")
    else:
        L.append("| scenario | implementation | failed runs | error (last line of the child's stderr) |")
        L.append("|---|---|---|---|")
        for sc, impl, a in broken:
            errs = "<br>".join("`" + e.replace("|", "\\|").replace("`", "'") + "`" for e in a["errors"][:3])
            L.append(f"| {sc.sid} | {IMPL_LABELS[impl]} | {a['runs'] - a['ok_runs']} of {a['runs']} | {errs} |")
    L.append("")
    L.append("## Running the suite")
    L.append("")
    L.append("""```sh
bash benchmarks/run            # the full run (5 repetitions of each scenario with a target, 3 of the rest; about 15 minutes on 2 cores)
bash benchmarks/run --quick    # a smoke run with small sizes and one repetition (about a minute)
bash benchmarks/run --from-json benchmarks/results/STAMP.json   # rewrite this page from raw results
```

`python benchmarks/run.py` is the same. On first use it creates `benchmarks/.venv` with the benchmark-only
dependencies from `benchmarks/requirements.txt` (pynsq, Tornado, gnsq, gevent, python-snappy, matplotlib) and
nsq_sync from the checkout; none of them become dependencies of the library. It starts its own nsqd v1.3.0 on
loopback through `nsq_sync.testing.NsqdProcess`. Options: `--reps N`, `--scenarios` and `--impls`
(comma-separated ids or prefixes), `--body-size` (100 bytes by default), `--docs DIR` (where this page and the
chart go), `--no-docs` (only the raw JSON, in `benchmarks/results/`) and `--pin` (nsqd on the first CPU, every
client on the others, as on separate machines; off by default). `benchmarks/profile_consume.py`
profiles nsq_sync's consume and publish paths (see `benchmarks/README.md`).

Numbers from one machine do not transfer to another; run the suite where you deploy, and compare
implementations within one run rather than across runs.""")
    L.append("")
    L.append("## Method")
    L.append("")
    L.append("""* One child process per implementation, scenario and repetition (`benchmarks/clients/*.py`); the child prints
  `@@BENCH BEGIN` right before the measured work and `@@BENCH END {json}` right after it. msg/s and client CPU
  (`getrusage(RUSAGE_SELF)`, all threads) cover exactly that window; the parent samples nsqd's utime+stime from
  `/proc/<pid>/stat` (10 ms ticks) when it reads each line. Peak RSS is the child's VmHWM (`ru_maxrss` survives fork+exec, so it would report the parent).
* consume: the topic's channel is created and pre-filled with N + 2,000 messages (MPUB) before the child starts (the
  extra ones keep the channel from running dry: nsqd would hold the last partial output buffer for
  output_buffer_timeout and add up to 250 ms to every run); the window runs from creating the consumer (connect,
  IDENTIFY, SUB included) until the handler saw the N-th message. After the child exited the parent checks nsqd:
  at least N messages finished (prefilled - depth - in flight) and none timed out (otherwise a warning); requeues
  are allowed, since a closing Reader hands back the extra messages it had not started.
  nsq_sync uses `nsq_sync.Reader` with its defaults (as pynsq code would: `concurrency` defaults to max_in_flight)
  when the package has it — or `nsq_sync.reader.Reader` while the module exists but is not exported yet — and
  otherwise `AsyncConn` + `message.finish()` with one standing RDY (the notes column says which); the
  "AsyncConn" row always uses the latter. pynsq uses `nsq.Reader`, gnsq `gnsq.Consumer`; handlers do nothing.
* publish: `Writer.pub` (nsq_sync), `Writer.pub` with the next publish in the callback (pynsq), `Producer.publish`
  (gnsq). 100 outstanding: rounds of 100 publishes, each round waits for its 100 OKs (`pub_async` futures; pynsq
  callbacks; gnsq `raise_error=False` AsyncResults; the minimal loop writes the 100 PUBs in one `sendall`).
  8 threads: 8 threads (greenlets under gevent) calling the blocking `Writer.pub` on one Writer; pynsq 8 callback
  chains on its IOLoop; gnsq 8 greenlets on one Producer; the minimal loop keeps a window of 8 PUBs in flight.
  Each first publishes {PUB_CONCURRENT_WARMUP:,} messages the same way, untimed (the other publishing scenarios
  start the clock once connected, and nsq_sync's Writer opens a connection per publishing thread on demand; pynsq's
  clock starts at the answer that completes them). The parent checks nsqd's message count for the topic afterwards.
* latency: in one process, the implementation's own publisher sends timestamped messages at 1,000 msg/s while its
  consumer (max_in_flight 200, the given output_buffer_timeout, output_buffer_size 16 KiB) receives them;
  latency = receive time - send time, p50/p99 over all messages of the run.
* rss: import the library, connect one producer, publish one message, then read the peak RSS (VmHWM).
* Compression variants use the same scenario with snappy or deflate (level 6) negotiated by every client that
  supports it (the minimal loop too); "cost <= 2x plain" compares nsq_sync's compressed client CPU per 100k and wall
  time with its own plain run.""".replace("{PUB_CONCURRENT_WARMUP:,}", f"{PUB_CONCURRENT_WARMUP:,}"))
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def _notes(a: Dict[str, Any]) -> str:
    parts = []
    apis = a.get("api") or []
    if apis == ["AsyncConn"]:
        parts.append("via AsyncConn")
    elif apis and all(x.startswith("Reader") for x in apis):
        parts.append("via Reader" + ("" if "Reader" in apis else " (nsq_sync.reader: not exported yet)"))
    elif apis:
        parts.append("via " + " / ".join(apis))
    if a.get("runs") and a.get("ok_runs", 0) < a["runs"]:
        parts.append(f"**broken: {a['runs'] - a['ok_runs']} of {a['runs']} runs failed** (see below)")
    for w in a.get("warnings", [])[:2]:
        parts.append("warning: " + w.replace("|", "\\|")[:200])
    return "; ".join(parts)


def write_chart(path: str, scenarios: List[Scenario], impls_by_scenario: Dict[str, List[str]],
                agg: Dict[Tuple[str, str], Dict[str, Any]], meta: Dict[str, Any]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover
        print(f"no chart: {exc}")
        return None
    impls = ["minimal", "nsq_sync", "nsq_sync_gevent", "nsq_sync_asyncconn", "pynsq", "gnsq"]
    colors = {"minimal": "#888888", "nsq_sync": "#1f77b4", "nsq_sync_gevent": "#17becf", "nsq_sync_asyncconn": "#aec7e8",
              "pynsq": "#ff7f0e", "gnsq": "#2ca02c"}
    rate_sc = [s for s in scenarios if s.metric == "rate"]
    lat_sc = [s for s in scenarios if s.metric == "latency"]
    fig = plt.figure(figsize=(15, 10))
    grid = fig.add_gridspec(2, 3, height_ratios=[1.25, 1])
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs, ys, lo, hi = [], [], [], []
        for j, sc in enumerate(rate_sc):
            a = agg.get((sc.sid, impl))
            if not a or a.get("rate") is None:
                continue
            xs.append(j + (i - len(impls) / 2 + 0.5) * width)
            ys.append(a["rate"])
            lo.append(a["rate"] - a["rate_min"])
            hi.append(a["rate_max"] - a["rate"])
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=1.5, label=IMPL_LABELS[impl], color=colors[impl], error_kw={"lw": 0.6})
        for j, sc in enumerate(rate_sc):
            a = agg.get((sc.sid, impl))
            if a and a.get("rate") is None and a.get("errors"):
                ax.annotate("broken", (j + (i - len(impls) / 2 + 0.5) * width, 0.01), xycoords=("data", "axes fraction"),
                            rotation=90, ha="center", va="bottom", fontsize=7, color=colors[impl])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rate_sc)))
    ax.set_xticklabels([s.sid.replace("_", "\n", 1) for s in rate_sc], fontsize=8)
    ax.set_ylabel("msg/s (log scale; median, min-max bars)")
    ax.set_title(f"Throughput vs nsqd {meta['nsqd']} on loopback, {meta['body_size']}-byte bodies")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)

    def small_panel(axis, sid, field, title, ylabel, scale=1.0):
        names, vals, cols = [], [], []
        for impl in impls:
            a = agg.get((sid, impl))
            if a and a.get(field) is not None:
                names.append(IMPL_LABELS[impl].replace(" (", "\n("))
                vals.append(a[field] * scale)
                cols.append(colors[impl])
        axis.bar(range(len(vals)), vals, color=cols)
        axis.set_xticks(range(len(vals)))
        axis.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
        axis.set_title(title, fontsize=9)
        axis.set_ylabel(ylabel, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
        for k, v in enumerate(vals):
            axis.text(k, v, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="bottom", fontsize=7)

    small_panel(fig.add_subplot(grid[1, 0]), "consume_mif200", "client_cpu_per_100k",
                "consume mif200: client CPU s per 100k", "CPU seconds")
    ax_lat = fig.add_subplot(grid[1, 1])
    names = []
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, sc in enumerate(lat_sc):
            a = agg.get((sc.sid, impl))
            if a and a.get("lat_p99_ms") is not None:
                xs.append(j + (i - len(impls) / 2 + 0.5) * width)
                ys.append(a["lat_p99_ms"])
        if xs:
            ax_lat.bar(xs, ys, width, color=colors[impl], label=IMPL_LABELS[impl])
    ax_lat.set_xticks(range(len(lat_sc)))
    ax_lat.set_xticklabels([s.sid for s in lat_sc], fontsize=8)
    ax_lat.set_title("latency p99 at 1,000 msg/s (ms)", fontsize=9)
    ax_lat.grid(axis="y", alpha=0.3)
    small_panel(fig.add_subplot(grid[1, 2]), "rss_one_connection", "peak_rss_mb",
                "import + one connection: peak RSS (MB)", "MB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def versions() -> str:
    from importlib import metadata

    out = []
    for name in ("nsq_sync", "pynsq", "gnsq", "tornado", "gevent", "python-snappy"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def report_from_json(path: str, docs: str) -> int:
    with open(path) as f:
        data = json.load(f)
    meta, records = data["meta"], data["records"]
    for rec in records:  # re-read errors with the current extraction rules
        if not rec.get("ok") and rec.get("stderr_tail") and not rec.get("error", "").startswith(("connection error", "timed out")):
            rec["error"] = _error_from(rec["stderr_tail"], [])
    present = {r["scenario"] for r in records}
    scenarios = [s for s in build_scenarios() if s.sid in present]
    impls_by_scenario: Dict[str, List[str]] = {}
    for sc in scenarios:
        seen = {r["impl"] for r in records if r["scenario"] == sc.sid}
        impls_by_scenario[sc.sid] = [i for i in IMPL_LABELS if i in seen]
    agg = aggregate(records)
    targets = evaluate_targets(scenarios, agg)
    os.makedirs(docs, exist_ok=True)
    chart = write_chart(os.path.join(docs, "benchmarks.png"), scenarios, impls_by_scenario, agg, meta)
    md = os.path.join(docs, "benchmarks.md")
    write_markdown(md, meta, scenarios, impls_by_scenario, agg, targets, chart)
    print(f"report: {md}" + (f", chart: {chart}" if chart else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition: a smoke run of about a minute")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    parser.add_argument("--scenarios", default="", help="comma-separated scenario ids or prefixes (default: all)")
    parser.add_argument("--impls", default="", help="comma-separated implementations (default: all)")
    parser.add_argument("--body-size", type=int, default=100)
    parser.add_argument("--pin", action="store_true", help="nsqd on one CPU, the clients on the others (see pin_cpus)")
    parser.add_argument("--docs", default=DOCS, help="where benchmarks.md and benchmarks.png go")
    parser.add_argument("--no-docs", action="store_true", help="only write the JSON results")
    parser.add_argument("--from-json", metavar="PATH", help="no benchmark: rewrite the report and chart from a results JSON")
    args = parser.parse_args(argv)
    ensure_venv()
    if args.from_json:
        return report_from_json(args.from_json, args.docs)
    import nsq_sync

    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    scenarios = build_scenarios()
    if args.scenarios:
        wanted = [w.strip() for w in args.scenarios.split(",") if w.strip()]
        scenarios = [s for s in scenarios if any(s.sid == w or s.sid.startswith(w) for w in wanted)]
    have_reader = hasattr(nsq_sync, "Reader")
    if not have_reader:
        try:
            import nsq_sync.reader  # noqa: F401 - written but not exported yet

            have_reader = True
        except ImportError:
            pass
    impls_by_scenario: Dict[str, List[str]] = {}
    for sc in scenarios:
        impls = list(BASE_IMPLS)
        if sc.asyncconn and have_reader:
            impls.insert(3, "nsq_sync_asyncconn")
        if args.impls:
            allowed = {w.strip() for w in args.impls.split(",")}
            impls = [i for i in impls if i in allowed]
        impls_by_scenario[sc.sid] = impls
    compile_nsq_sync()
    max_n = max(sc.n(args.quick) for sc in scenarios)
    mem_queue_size = max_n + 10000
    broker = Broker(mem_queue_size)
    pinned = pin_cpus(broker.pid) if args.pin else None
    if args.pin and pinned is None:
        print("--pin: fewer than 2 CPUs (or no sched_setaffinity) here; not pinned", flush=True)
    started = time.monotonic()
    meta = {
        "command": "bash benchmarks/run" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick, "reps": reps, "body_size": args.body_size,
        "cpu": cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "nsqd": broker.version, "mem_queue_size": mem_queue_size,
        "versions": versions(), "nsq_sync_has_reader": have_reader, "pinned": pinned,
    }
    print(f"nsqd {broker.version} pid {broker.pid} at {broker.nsqd.tcp_address}; {reps} repetitions; "
          f"{len(scenarios)} scenarios; nsq_sync.Reader {'present' if have_reader else 'absent (AsyncConn used)'}", flush=True)
    records: List[Dict[str, Any]] = []
    seq = 0
    os.makedirs(RESULTS, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw_path = os.path.join(RESULTS, f"{stamp}{'-quick' if args.quick else ''}.json")
    try:
        for rep in range(max(sc.reps(reps, args.quick) for sc in scenarios)):
            for sc in scenarios:
                if rep >= sc.reps(reps, args.quick):
                    continue
                impls = impls_by_scenario[sc.sid]
                shift = rep % len(impls)
                order = impls[shift:] + impls[:shift]
                for impl in order:
                    seq += 1
                    rec = run_one(broker, sc, impl, rep, seq, args.quick, args.body_size)
                    records.append(rec)
                    if rec["ok"]:
                        if sc.metric == "latency":
                            what = f"p50 {rec['lat_p50_ms']:.1f} ms p99 {rec['lat_p99_ms']:.1f} ms"
                        elif sc.metric == "rss":
                            what = f"peak RSS {rec['peak_rss_mb']:.1f} MB"
                        else:
                            what = (f"{rec['rate']:>10,.0f} msg/s  client {rec['client_cpu_per_100k']:.2f}s/100k  "
                                    f"nsqd {rec.get('nsqd_cpu_per_100k', float('nan')):.2f}s/100k")
                        warn = f"  WARN {rec['warnings']}" if rec.get("warnings") else ""
                    else:
                        what, warn = "BROKEN: " + rec["error"][:160], ""
                    print(f"[{time.monotonic() - started:6.0f}s] rep {rep + 1} {sc.sid:<24} {impl:<19} {what}{warn}", flush=True)
                with open(raw_path, "w") as f:
                    json.dump({"meta": meta, "records": records}, f, indent=1)
    finally:
        broker.nsqd.close()
    agg = aggregate(records)
    targets = evaluate_targets(scenarios, agg)
    with open(raw_path, "w") as f:
        json.dump({"meta": meta, "records": records, "targets": targets,
                   "aggregate": {f"{k[0]}|{k[1]}": v for k, v in agg.items()}}, f, indent=1)
    print(f"raw results: {raw_path}")
    if not args.no_docs:
        os.makedirs(args.docs, exist_ok=True)
        chart = write_chart(os.path.join(args.docs, "benchmarks.png"), scenarios, impls_by_scenario, agg, meta)
        md = os.path.join(args.docs, "benchmarks.md")
        write_markdown(md, meta, scenarios, impls_by_scenario, agg, targets, chart)
        print(f"report: {md}" + (f", chart: {chart}" if chart else ""))
    for t in targets:
        res = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {res:<6} {t['target']}  ({t['detail']})")
    print(f"total {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where a run's CPU went, by Python function, from ``perf`` samples (no cProfile distortion).

cProfile adds a hook to every call, so a hot path of many small functions looks several times
slower than it is, and in different proportions. Linux ``perf`` samples instead; CPython 3.12+
started with ``-X perf`` names each Python function's frame (``py::name:file``), and DWARF
unwinding finds those frames in every sample. This script counts each sample once, for the
innermost Python function on its stack: that function's own bytecode plus the C code it
called (a lock, a ``recv``, a bytes join), but not the Python functions it called.

    perf record --call-graph dwarf,16384 -F 999 -o /tmp/perf.data -- \\
        env PYTHONPATH=. python3.12 -X perf benchmarks/profile_consume.py --no-profile --n 300000
    perf script -i /tmp/perf.data -F ip,sym | python3 benchmarks/perf_split.py [--top 25]

Samples without any Python frame (interpreter start-up, threads in C, child processes such as
the nsqd that profile_consume.py starts) are counted apart.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import sys
from typing import Counter, Iterable, List, Optional

_PY_FRAME = re.compile(r"\bpy::(\S+?)(?::(\S+))?$")


def innermost_python_frame(stack: List[str]) -> Optional[str]:
    """The first ``py::`` frame of a sample's stack (leaf first), as ``function  file``."""
    for line in stack:
        match = _PY_FRAME.search(line.strip())
        if match:
            function, path = match.group(1), match.group(2) or ""
            return f"{function}  {'/'.join(path.split('/')[-2:])}"
    return None


def split(lines: Iterable[str]) -> Counter[str]:
    """Samples per innermost Python function; ``perf script`` separates samples by a blank line."""
    counts: Counter[str] = collections.Counter()
    stack: List[str] = []
    for line in itertools.chain(lines, [""]):  # (a last blank line ends the last sample)
        if line.strip():
            stack.append(line)
            continue
        if stack:
            counts[innermost_python_frame(stack) or "(no Python frame)"] += 1
            stack = []
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="how many functions to list")
    args = parser.parse_args(argv)
    counts = split(sys.stdin)
    total = sum(counts.values())
    if not total:
        print("no samples: pipe in `perf script -F ip,sym` output", file=sys.stderr)
        return 1
    python_total = total - counts.get("(no Python frame)", 0)
    print(f"{total} samples, {python_total} with a Python frame; share of those:")
    for name, count in counts.most_common(args.top):
        if name != "(no Python frame)":
            print(f"{100.0 * count / python_total:6.1f}%  {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

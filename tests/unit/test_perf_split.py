"""benchmarks/perf_split.py: perf samples counted by innermost Python frame."""

import importlib.util
import io
import os
import sys

import pytest

pytestmark = pytest.mark.unit

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "perf_split.py")
_spec = importlib.util.spec_from_file_location("perf_split", _PATH)
perf_split = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf_split)

# Three samples as `perf script -F ip,sym` prints them (leaf first, blank line between):
# a lock acquire under _finish_message, bytecode of _deliver, and a thread in C only.
SAMPLES = """\
    7f01 lock_PyThread_acquire_lock
    7f02 _PyEval_EvalFrameDefault
    7fa247a10a79 py::AsyncConn._finish_message:/work/main/nsq_sync/conn.py
    7f03 _PyEval_EvalFrameDefault
    7fa247a10a63 py::Reader._on_message:/work/main/nsq_sync/reader.py

    7f02 _PyEval_EvalFrameDefault
    7fa247a10a58 py::AsyncConn._deliver:/work/main/nsq_sync/conn.py
    7fa247a10a00 py::Lane._run:/work/main/nsq_sync/dispatch.py

    ffffffff81000000 finish_task_switch.isra.0
    7f04 start_thread
"""


def test_each_sample_counts_once_for_its_innermost_python_frame():
    counts = perf_split.split(io.StringIO(SAMPLES))
    assert counts == {
        "AsyncConn._finish_message  nsq_sync/conn.py": 1,
        "AsyncConn._deliver  nsq_sync/conn.py": 1,
        "(no Python frame)": 1,
    }


def test_main_prints_shares_of_the_samples_with_a_python_frame(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(SAMPLES))
    assert perf_split.main([]) == 0
    out = capsys.readouterr().out
    assert "3 samples, 2 with a Python frame" in out
    assert " 50.0%       1  AsyncConn._finish_message  nsq_sync/conn.py" in out


def test_main_fails_without_samples(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert perf_split.main([]) == 1
    assert "no samples" in capsys.readouterr().err

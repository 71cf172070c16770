"""benchmarks/_trace.py: self times of nested trace events, and the op table."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _trace import op_table, self_times


def _x(name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}


def test_self_time_subtracts_nested_events():
    evs = [
        _x("outer", 0, 100),
        _x("a", 10, 30),
        _x("b", 50, 20),
        _x("c", 55, 5),
        _x("other_thread", 0, 40, tid=2),
    ]
    got = {e["name"]: us for e, us in self_times(evs)}
    assert got == {"outer": 50.0, "a": 30.0, "b": 15.0, "c": 5.0, "other_thread": 40.0}


def _write(tmp_path, events):
    f = tmp_path / "t.trace.json.gz"
    with gzip.open(f, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    return f


def test_host_table_skips_runtime_events(tmp_path):
    meta = {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}
    evs = [
        meta,
        _x("PjitFunction(run)", 0, 1000),
        _x("while.3", 10, 900),
        _x("fusion.1", 20, 600),
        _x("dot.2", 700, 100),
        _x("fusion.1", 850, 50),
    ]
    t = op_table(_write(tmp_path, evs), top=2)
    assert t["source"] == "host" and t["n_ops"] == 3
    assert [r["name"] for r in t["top"]] == ["fusion.1", "while.3"]
    assert t["top"][0]["calls"] == 2
    assert t["top"][0]["seconds"] == pytest.approx(650e-6)
    assert t["op_seconds_total"] == pytest.approx(900e-6)  # the pjit wrapper is not an op
    assert t["top"][0]["share"] == pytest.approx(650 / 900)


def test_device_events_win_and_carry_flops(tmp_path):
    evs = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
        _x("fusion.9", 0, 500),
        _x("gemm_1", 0, 40, pid=7, flops=2e6, bytes_accessed=8e3),
        _x("loop_add", 50, 10, pid=7),
    ]
    t = op_table(_write(tmp_path, evs))
    assert t["source"] == "device"
    assert [r["name"] for r in t["top"]] == ["gemm_1", "loop_add"]
    assert t["top"][0]["flops"] == 2e6 and t["top"][0]["bytes"] == 8e3
    assert t["top"][1]["flops"] is None

"""The costliest operations of a ``jax.profiler`` trace, read with gzip + json.

``jax.profiler.trace(folder)`` writes ``plugins/profile/<run>/<host>.trace.json.gz``
(Chrome trace format). On a GPU each kernel is an event of a ``/device:GPU:N``
process; on the CPU the XLA thunks are events of the host process, nested
inside runtime events (``PjitFunction(...)``, ``ThunkExecutor::Execute``) and,
for a ``lax.scan``, inside the while loop's own event. Each operation gets
its self time (its duration less that of the events nested in it on the same
thread), so nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

# host events that are the runtime, not an XLA operation
_RUNTIME = re.compile(
    r"::|^\$|^end: |\s|^Pjit|^Thunk|^Parse|^Handle|^Allocate|^Wait|"
    r"^Python|^Threadpool|^SlinkyThreadPool|^DevicePut"
)


def latest_trace(folder: str | Path) -> Path:
    files = sorted(Path(folder).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {folder}")
    return files[-1]


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, self microseconds) for complete ('X') events, per (pid, tid)."""
    by_thread = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [event, end, child time]
        for e in evs:
            ts, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
            while stack and stack[-1][1] <= ts:
                done = stack.pop()
                out.append((done[0], float(done[0]["dur"]) - done[2]))
            if stack:
                stack[-1][2] += float(e["dur"])
            stack.append([e, end, 0.0])
        out.extend((d[0], float(d[0]["dur"]) - d[2]) for d in stack)
    return out


def op_table(trace_file: str | Path, top: int = 20) -> dict:
    """The ``top`` operations by self time, summed over their calls.

    Rows: name, calls, seconds, share of all operations' time, and FLOPs and
    bytes where the trace's event arguments carry them (XLA's GPU events may;
    its CPU events do not), else None.
    """
    with gzip.open(trace_file, "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    timed = self_times(events)
    device = {p for p, n in names.items() if n.startswith("/device:")}
    on_device = device and any(e.get("pid") in device for e, _ in timed)
    rows: dict[str, dict] = {}
    for e, us in timed:
        if on_device:
            if e.get("pid") not in device:
                continue
        elif _RUNTIME.search(e.get("name", "")):
            continue
        r = rows.setdefault(
            e["name"], {"name": e["name"], "calls": 0, "seconds": 0.0, "flops": None, "bytes": None}
        )
        r["calls"] += 1
        r["seconds"] += us * 1e-6
        args = e.get("args") or {}
        for key, field in (("flops", "flops"), ("bytes", "bytes")):
            val = next((v for k, v in args.items() if field in k.lower()), None)
            with contextlib.suppress(TypeError, ValueError):
                r[key] = (r[key] or 0.0) + float(val) if val is not None else r[key]
    total = sum(r["seconds"] for r in rows.values())
    ranked = sorted(rows.values(), key=lambda r: -r["seconds"])[:top]
    for r in ranked:
        r["share"] = r["seconds"] / total if total else None
    return {
        "source": "device" if on_device else "host",
        "op_seconds_total": total,
        "n_ops": len(rows),
        "top": ranked,
    }

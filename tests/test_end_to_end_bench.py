"""benchmarks/end_to_end.py's smoke mode: the user's script in new processes
(jaxscanvi with an empty and a warm compile cache, and scvi-tools where some
Python here has it), and ``jaxscanvi demo`` with its compile seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.system
@pytest.mark.slow
def test_end_to_end_benchmark_smoke(tmp_path):
    out = tmp_path / "e2e.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "end_to_end.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    arms = doc["summary"]["arms"]
    cold, warm = arms["jaxscanvi_cold"], arms["jaxscanvi_warm"]
    for a in (cold, warm):
        assert a["n"] == 1 and a["total_s"] > 0
        assert set(a["phases_s"]) == set(a["phases_compile_s"])
        assert sum(a["phases_s"].values()) == pytest.approx(a["total_s"], rel=1e-6)
    # the cold run compiled into an empty cache, the warm one read it back
    assert cold["cache_misses"] > 0 and warm["cache_hits"] > 0
    assert warm["cache_misses"] < cold["cache_misses"]
    demo = doc["demo"]
    assert demo["total_s"] > 0 and 0 < demo["compile_share"] < 1
    assert demo["compile"]["n_programs"] > 0
    if doc["scvi_tools_python"] is not None:
        assert arms["scvi-tools"]["n"] == 2
        assert doc["summary"]["ratio_cold"]["total"] > 0
        assert set(doc["summary"]["ratio_warm"]["phases"]) == set(cold["phases_s"])

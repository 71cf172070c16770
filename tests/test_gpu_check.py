"""The GPU benchmark's smoke mode runs end to end on the CPU (tiny sizes), so
the script is ready for whoever has a GPU next."""

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
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--parts",
            "throughput",
            "shipped",
            "kernels",
            "precision",
            "epoch_1m",
            "sources",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert set(doc["parts"]) == {
        "throughput",
        "shipped",
        "kernels",
        "precision",
        "epoch_1m",
        "sources",
    }
    for name, part in doc["parts"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"))
        assert part["results"], name
        for r in part["results"]:
            assert "error" not in r, (name, r["error"])
    thr = doc["parts"]["throughput"]["results"]
    assert {r["model"] for r in thr} == {"scvi", "scanvi"}
    assert all(r["cells_per_s"] > 0 and r["loss_finite"] for r in thr)
    shipped = doc["parts"]["shipped"]["results"]
    assert {(r["config"], r["model"]) for r in shipped} == {
        (c, m) for c in ("shipped", "library") for m in ("scvi", "scanvi")
    }
    from jaxscanvi import backend

    assert all(
        r["kernels"]
        == (
            backend.defaults("cpu") if r["config"] == "shipped" else backend.Kernels.library()
        ).__dict__
        for r in shipped
    )
    kern = doc["parts"]["kernels"]["results"]
    assert [r["round"] for r in kern] == [0] * 4 + [1] * 4
    # the same kernels give the same loss in both rounds (same seed, same data)
    first = {r["config"]: r["final_train_loss"] for r in kern if r["round"] == 0}
    for r in kern[4:]:
        assert r["final_train_loss"] == pytest.approx(first[r["config"]], rel=1e-6)
    prec = {r["precision"]: r for r in doc["parts"]["precision"]["results"]}
    e32 = prec["float32"]["validation_elbo_float32_eval"]
    assert abs(prec["bfloat16"]["validation_elbo_float32_eval"] - e32) < 0.01 * abs(e32)
    big = [r for r in doc["parts"]["epoch_1m"]["results"] if "stage" not in r]
    assert {r["sparse_likelihood"] for r in big} == {True, False}
    src = doc["parts"]["sources"]["results"]
    assert {r["source"] for r in src} == {"device", "host", "stream"}
    assert all(r["cells_per_s"] > 0 and r["loss_finite"] for r in src)
    assert "table" not in p.stderr and "cells/s" in p.stdout


@pytest.mark.system
def test_step_parts_smoke(tmp_path):
    """benchmarks/step_parts.py (the log1p_poly kernel's on/off figure and the
    class bounds' cost) runs end to end and writes every arm."""
    out = tmp_path / "parts.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_parts.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {
        "fwd+bwd log1p_poly=on",
        "fwd+bwd log1p_poly=off",
        "forward (default kernels)",
        "class bounds fwd+bwd (C=3)",
    }
    assert all(len(r["ms"]) == 2 and r["median_ms"] > 0 for r in doc["results"].values())
    assert doc["log1p_poly_off_over_on"] > 0


@pytest.mark.system
def test_gpu_profile_smoke(tmp_path):
    """``gpu_check.sh --profile --smoke``: the step profile end to end on the CPU,
    JSON and markdown, each run with its cost, floor and costliest operations."""
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--profile",
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / "gpu_profile_smoke.json").read_text())
    assert doc["peaks"]["source"].startswith("measured")
    assert [(r["model"], r["batch_size"]) for r in doc["runs"]] == [
        ("scvi", 32),
        ("scvi", 64),
        ("scanvi", 32),
        ("scanvi", 64),
    ]
    for r in doc["runs"]:
        assert r["step_flops"] > 0 and r["step_bytes"] > 0 and r["times_floor"] > 0
        # XLA counts the matrix products and the element-wise rest: more than the hand count
        assert 1.0 < r["xla_over_hand_flops"] < 3.0
        top = r["ops"]["top"]
        assert 0 < len(top) <= 20 and top[0]["seconds"] >= top[-1]["seconds"]
        assert abs(sum(o["share"] for o in top) - 1.0) < 1e-6 or r["ops"]["n_ops"] > 20
    md = (tmp_path / "gpu_profile_smoke.md").read_text()
    assert "x floor" in md and "scanvi, batch 64" in md

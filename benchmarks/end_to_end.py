"""End to end as a user runs it: jaxscanvi against scvi-tools in the same run.

Each arm is a new Python process running the same user's script, timed with
``perf_counter`` from before its first import: ``import jaxscanvi as scvi``
(or ``import scvi``, scvi-tools, under a Python that has it), read the
``.h5ad``, ``SCVI.setup_anndata(adata, labels_key="labels")``, ``SCVI(adata)``
(default network: 128 hidden, 10 latent, 1 layer, ZINB), ``train(max_epochs=1)``
(the first epoch, timed apart), ``train(max_epochs=100)`` continuing the same
model (both libraries continue from its weights with a new optimizer),
``SCANVI.from_scvi_model(model, unlabeled_category="Unknown")``,
``train(max_epochs=20)`` and ``predict()``. Both use batch size 128,
``settings.seed = 0`` and their defaults otherwise: train_size 0.9 and no
validation loop (``check_val_every_n_epoch`` None in both), no early stopping.
scvi-tools runs on the CPU with ``torch.set_num_threads`` = the usable cores
and its progress bar and model summary off; jaxscanvi's progress bar is off.

Data: real PBMCs (default ``../shared/data/pbmc3k.h5ad``, all 2,638 cells),
the 2,000 most variable genes (seurat_v3 on the counts, chosen once), and
``labels``: the cell type with half the cells (seed 0) hidden as "Unknown".
Both libraries read the same prepared file.

Arms, alternating in every round (``--repeats``, default 3):

* ``jaxscanvi_cold``: jaxscanvi's persistent compile cache on and empty: the
  process gets ``XDG_CACHE_HOME`` = a new empty folder, so jaxscanvi's
  default cache is ``$XDG_CACHE_HOME/jaxscanvi/jax`` (compiled programs and
  exported traces), empty;
* ``jaxscanvi_warm``: a new process with the folder the cold run filled;
* ``scvi-tools`` twice per round (it has no compile cache; two runs so that
  both libraries are measured as often, with warm OS file caches).

Even rounds run cold, scvi-tools, warm, scvi-tools; odd rounds scvi-tools,
cold, scvi-tools, warm. Before the rounds, one untimed ``import`` of each
library warms the OS page cache, so "cold" means an empty compile cache, not
a cold disk. Figures are medians over the runs; ratios are scvi-tools'
median over jaxscanvi's; the 95 % t interval is over the rounds' ratios
(scvi-tools' mean in the round over jaxscanvi's run).

jaxscanvi's compile seconds per phase are ``jax.monitoring`` duration events
(tracing + lowering + backend compile, or the cache lookup and load on a hit;
``benchmarks/_programs.py``), as first_epoch.py counts them.

``demo``: ``jaxscanvi demo`` (default arguments, ``--quiet``, ``--out`` a
temporary folder) in a new process with an empty cache, after the first
round: its wall time from before ``import jax``, its compile seconds and
their share of the wall time.

The JSON is written after every round (``complete`` false until the last),
so an interrupted run keeps the rounds it finished.

Usage (one command; about 25 minutes on 2 CPU cores):
    python benchmarks/end_to_end.py
    python benchmarks/end_to_end.py --smoke      # tiny: 400 cells x 200 genes, 2 + 1 epochs
    python benchmarks/end_to_end.py --scvi-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_smoke,
    add_worker_args,
    args_record,
    format_table,
    loadavg,
    machine_info,
    parser,
    run_worker,
    usable_cores,
    versions,
    write_json,
)
from _e2e_workers import PHASES, make_data, worker_main
from _metrics import t_interval

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
DEFAULT_OUT = SCRIPT.parent / "results" / "end_to_end.json"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pbmc3k.h5ad"
SCVI_PYTHON_ENV = "JAXSCANVI_BENCH_SCVI_PYTHON"
SMOKE_DEMO = ["--n-cells", "600", "--n-genes", "400", "--scvi-epochs", "1"]
SMOKE_DEMO += ["--scanvi-epochs", "1", "--query-epochs", "1"]
TARGETS = {"cold": 3.0, "warm": 4.0, "demo_compile_share": 0.2}


def _has_scvi_tools(python: str) -> bool:
    code = "import importlib.util as u, sys; sys.exit(not (u.find_spec('scvi') and u.find_spec('torch')))"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def scvi_python(explicit: str | None) -> str | None:
    """The Python that runs scvi-tools: ``--scvi-python``, else $JAXSCANVI_BENCH_SCVI_PYTHON,
    else this one where it has scvi-tools, else ``../venv-cmp/bin/python`` beside the
    checkout (the developers' parity venv); None where none has scvi-tools and torch."""
    cands = [explicit, os.environ.get(SCVI_PYTHON_ENV), sys.executable]
    cands.append(str(ROOT.parent / "venv-cmp" / "bin" / "python"))
    for c in cands:
        if c and Path(c).exists() and _has_scvi_tools(c):
            return c
    return None


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT})")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="real cells (.h5ad, counts in X)")
    p.add_argument("--n-cells", type=int, default=None, help="cells to keep (all)")
    p.add_argument("--n-genes", type=int, default=2000, help="highly variable genes (2000)")
    p.add_argument("--hidden", type=float, default=0.5, help="fraction of labels hidden (0.5)")
    p.add_argument("--scvi-epochs", type=int, default=100, help="after the first epoch (100)")
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="rounds of alternating arms (3)")
    p.add_argument("--scvi-python", default=None, help="a Python with scvi-tools and torch")
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument("--no-demo", action="store_true", help="skip the `jaxscanvi demo` part")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    add_smoke(p, "tiny: 400 cells x 200 genes, 2 + 1 epochs, 1 round, a tiny demo")
    add_worker_args(p)
    return p


def setup(args) -> str | None:
    """Apply --smoke and the default output; the scvi-tools Python, or None."""
    if args.quick:
        args.n_cells, args.n_genes, args.scvi_epochs, args.scanvi_epochs = 400, 200, 2, 1
        args.repeats = 1
    if args.out is None:
        args.out = str(
            DEFAULT_OUT.with_name("end_to_end_quick.json") if args.quick else DEFAULT_OUT
        )
    if args.no_scvi_tools:
        return None
    py = scvi_python(args.scvi_python)
    if py is None:
        print("no Python with scvi-tools and torch found: jaxscanvi only", file=sys.stderr)
    return py


def _jax_env(xdg: Path) -> dict:
    rest = os.environ.get("PYTHONPATH")
    return {
        "XDG_CACHE_HOME": str(xdg),
        "JAXSCANVI_COMPILATION_CACHE": "1",
        "PYTHONPATH": str(ROOT) + (os.pathsep + rest if rest else ""),
    }


def warm_page_cache(py: str | None, env: dict) -> None:
    """One untimed import of each library, so the rounds read them from memory."""
    subprocess.run([sys.executable, "-c", "import jaxscanvi, anndata"], env={**os.environ, **env})
    if py:
        subprocess.run([py, "-c", "import scvi, anndata"], capture_output=True)


def _order(r: int, use_scvi: bool) -> list[str]:
    arms = ["jaxscanvi_cold", "scvi-tools", "jaxscanvi_warm", "scvi-tools"]
    if r % 2:
        arms = ["scvi-tools", "jaxscanvi_cold", "scvi-tools", "jaxscanvi_warm"]
    return [a for a in arms if use_scvi or a != "scvi-tools"]


def run_round(args, spec: dict, tmp: Path, py: str | None, r: int) -> dict:
    """Round ``r``'s runs, ``{arm: [result, ...]}``; raises on a failed worker."""
    xdg = tmp / f"xdg{r}"
    xdg.mkdir()
    rec: dict[str, list] = {}
    for arm in _order(r, py is not None):
        if arm == "scvi-tools":
            s = dict(spec, arm="scvi-tools", torch_threads=usable_cores())
            res = run_worker(SCRIPT, s, args.timeout, python=py)
        else:
            res = run_worker(SCRIPT, dict(spec, arm="jaxscanvi"), args.timeout, _jax_env(xdg))
        if "error" in res:
            raise RuntimeError(f"round {r} {arm}: {res['error']}\n{res['log_tail']}")
        if arm != "scvi-tools" and not str(res["cache_dir"]).startswith(str(xdg)):
            raise RuntimeError(f"{arm} used the cache {res['cache_dir']}, not {xdg}")
        rec.setdefault(arm, []).append(res)
        extra = f", compile {res['compile']['compile_s']:.1f} s" if "compile" in res else ""
        print(f"round {r} {arm}: {res['total_s']:.1f} s{extra}", flush=True)
    shutil.rmtree(xdg, ignore_errors=True)
    return rec


def run_demo(args, tmp: Path) -> dict:
    """``jaxscanvi demo`` in a new process with an empty cache."""
    xdg = tmp / "xdg_demo"
    xdg.mkdir()
    spec = {"arm": "demo", "out": str(tmp / "demo"), "demo_args": SMOKE_DEMO if args.quick else []}
    res = run_worker(SCRIPT, spec, args.timeout, _jax_env(xdg))
    if "error" in res:
        raise RuntimeError(f"demo: {res['error']}\n{res['log_tail']}")
    c = res["compile"]
    print(
        f"demo (empty cache): {res['total_s']:.1f} s, compile {c['compile_s']:.1f} s "
        f"({100 * res['compile_share']:.0f} %: trace {c['trace_s']:.1f}, lower "
        f"{c['lower_s']:.1f}, backend {c['backend_s']:.1f}), {c['n_programs']} programs",
        flush=True,
    )
    res["target_compile_share_max"] = TARGETS["demo_compile_share"]
    res["meets_target"] = res["compile_share"] <= TARGETS["demo_compile_share"]
    res["demo_args"] = spec["demo_args"]
    return res


def _med(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def arm_summary(results: list[dict]) -> dict:
    """Medians of one arm's runs: whole script, process, phases (and compile seconds)."""
    out = {
        "n": len(results),
        "total_s": _med([r["total_s"] for r in results]),
        "process_s": _med([r["process_seconds"] for r in results]),
        "total_s_runs": [r["total_s"] for r in results],
        "peak_rss_mb": _med([r["peak_rss_mb"] for r in results]),
        "phases_s": {p: _med([r["phases"][p]["seconds"] for r in results]) for p in PHASES},
        "predicted_accuracy_hidden": _med([r["predicted_accuracy_hidden"] for r in results]),
    }
    if "compile" in results[0]:
        out["compile_s"] = _med([r["compile"]["compile_s"] for r in results])
        out["compile_share"] = out["compile_s"] / out["total_s"]
        out["phases_compile_s"] = {
            p: _med([r["phases"][p]["compile_s"] for r in results]) for p in PHASES
        }
        for k in ("n_programs", "cache_hits", "cache_misses", "n_traced"):
            out[k] = _med([r["compile"][k] for r in results])
    return out


def summarise(rounds: list[dict]) -> dict:
    """Per arm medians, and scvi-tools' time over jaxscanvi's, cold and warm."""
    arms: dict[str, list] = {}
    for rec in rounds:
        for arm, rs in rec.items():
            arms.setdefault(arm, []).extend(rs)
    summary: dict = {"arms": {a: arm_summary(rs) for a, rs in arms.items()}}
    if "scvi-tools" not in arms:
        return summary
    ref = summary["arms"]["scvi-tools"]
    for mode in ("cold", "warm"):
        jx = summary["arms"][f"jaxscanvi_{mode}"]
        per_round = [
            _med([r["total_s"] for r in rec["scvi-tools"]]) / rec[f"jaxscanvi_{mode}"][0]["total_s"]
            for rec in rounds
        ]
        summary[f"ratio_{mode}"] = {
            "total": ref["total_s"] / jx["total_s"],
            "process": ref["process_s"] / jx["process_s"],
            "phases": {p: ref["phases_s"][p] / jx["phases_s"][p] for p in PHASES},
            "per_round": per_round,
            "t_interval_95": t_interval(per_round),
            "target_min": TARGETS[mode],
            "meets_target": ref["total_s"] / jx["total_s"] >= TARGETS[mode],
        }
    return summary


def _cell(s: dict, key: str, p: str) -> float:
    """An arm's median for phase ``p`` (``key`` e.g. "phases_s"), or its whole run's."""
    if p == "total":
        return s["compile_s" if key == "phases_compile_s" else "total_s"]
    return s[key][p]


def print_table(summary: dict) -> None:
    a = summary["arms"]
    cold, warm, ref = a["jaxscanvi_cold"], a["jaxscanvi_warm"], a.get("scvi-tools")
    rows = []
    for p in (*PHASES, "total"):
        c, w = _cell(cold, "phases_s", p), _cell(warm, "phases_s", p)
        r = _cell(ref, "phases_s", p) if ref else None
        row = [p, r, c, _cell(cold, "phases_compile_s", p), w, _cell(warm, "phases_compile_s", p)]
        rows.append(row + ([r / c, r / w] if r is not None else [None, None]))
    heads = ["phase", "scvi-tools s", "jax cold s", "cold compile s", "jax warm s"]
    heads += ["warm compile s", "x cold", "x warm"]
    print("\nmedians (x = scvi-tools / jaxscanvi)")
    print(format_table(heads, rows))


def save(
    args, meta: dict, t0: float, rounds: list[dict], demo: dict | None, complete: bool
) -> Path:
    """The JSON with the rounds so far (``complete`` false until the last)."""
    py = meta["scvi_tools_python"]
    doc = {
        **meta,
        "complete": complete,
        "rounds_done": len(rounds),
        "scvi_tools_versions": rounds[0]["scvi-tools"][0]["versions"] if py else None,
        "seconds": time.perf_counter() - t0,
        "summary": summarise(rounds),
        "demo": demo,
        "rounds": rounds,
    }
    doc["machine"] = {**meta["machine"], "loadavg_at_end": loadavg()}
    return write_json(args.out, doc)


def measure(args, py: str | None, tmp: Path, argv) -> dict:
    """Data, then the rounds, the demo after the first; the JSON after each round."""
    src = Path(args.data) if Path(args.data).exists() else None
    if src is None and not args.quick:
        raise SystemExit(f"{args.data} not found (pass --data)")
    data = make_data(src, tmp / "cells.h5ad", args.n_cells, args.n_genes, args.hidden)
    print(f"data: {data}", flush=True)
    keys = ("batch_size", "scvi_epochs", "scanvi_epochs")
    spec = {"data": str(tmp / "cells.h5ad"), **{k: getattr(args, k) for k in keys}}
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "data": data,
        "method": __doc__,
        "command": "python benchmarks/end_to_end.py " + " ".join(argv or sys.argv[1:]),
        "args": args_record(args, skip="worker"),
        "scvi_tools_python": py,
    }
    warm_page_cache(py, _jax_env(tmp / "xdg_warmup"))
    t0 = time.perf_counter()
    rounds, demo = [], None
    for r in range(args.repeats):
        rounds.append(run_round(args, spec, tmp, py, r))
        last = r == args.repeats - 1
        out = save(args, meta, t0, rounds, demo, complete=last and args.no_demo)
        if r == 0 and not args.no_demo:
            demo = run_demo(args, tmp)
            out = save(args, meta, t0, rounds, demo, complete=last)
    print(f"\nwrote {out}")
    return summarise(rounds)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return 0
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # the workers use jaxscanvi's own
    py = setup(args)
    tmp = Path(tempfile.mkdtemp(prefix="jaxscanvi_e2e_"))
    try:
        summary = measure(args, py, tmp, argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(summary)
    for mode in ("cold", "warm"):
        if f"ratio_{mode}" in summary:
            r = summary[f"ratio_{mode}"]
            print(f"scvi-tools / jaxscanvi {mode}: {r['total']:.2f}x (95 % t {r['t_interval_95']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

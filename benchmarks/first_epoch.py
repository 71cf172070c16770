"""Time to first epoch: what XLA compilation costs a user, cold and warm.

One workflow, run in a fresh subprocess: scVI on a reference, scANVI from it
(``SCANVI.from_scvi_model``), scVI and scANVI query models
(``load_query_data``), and inference (``get_latent_representation``,
``predict``). Each phase runs twice in the process: the first call pays for
compilation, the second reuses what was compiled. Training phases are
``train(max_epochs=1)`` calls; model construction (which compiles the
parameter initialisation) is timed apart.

The workflow runs three times, each in a new process:

* ``cold``: the persistent compilation cache on, in a fresh empty folder;
* ``warm``: the same folder again, now filled by the cold run;
* ``off``: ``JAXSCANVI_COMPILATION_CACHE=0``, no persistent cache.

The cache is jaxscanvi's default one: the workers get ``XDG_CACHE_HOME``
pointing at a temporary folder, so they use ``$XDG_CACHE_HOME/jaxscanvi/jax``.

Programs are counted as ``benchmarks/_programs.py`` counts them: one per
executable JAX builds (compiled, or loaded from the persistent cache), so
``programs`` is the number of distinct programs the process ran. Before
the workflow, each of ``import jax``, ``import jaxscanvi`` and ``import
jaxscanvi; jaxscanvi.model.SCVI`` is timed in fresh processes, alternating.

Compile time comes from ``jax.monitoring`` duration events: tracing
(``/jax/core/compile/jaxpr_trace_duration``), lowering
(``.../jaxpr_to_mlir_module_duration``) and the backend compile
(``.../backend_compile_duration``; on a persistent-cache hit it is the time
to look the program up and load it). Cache hits and misses are the
``/jax/compilation_cache/cache_hits`` and ``cache_misses`` events.

Usage:
    python benchmarks/first_epoch.py            # ~2,000 + 1,000 cells x 2,000 genes
    python benchmarks/first_epoch.py --quick    # smoke run, 600 + 300 cells x 200 genes
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_smoke,
    add_worker_args,
    format_table,
    machine_info,
    parser,
    round_order,
    run_worker,
    versions,
    write_json,
)
from _first_epoch_worker import ARCH, PHASES, TWICE, make_data, worker_main

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "first_epoch.json"


IMPORTS = {
    "jax": "import jax",
    "jaxscanvi": "import jaxscanvi",
    "jaxscanvi_model": "import jaxscanvi; jaxscanvi.model.SCVI",
}


def _path(code_dir: str) -> str:
    """PYTHONPATH with ``code_dir`` first (so its jaxscanvi loads), then this one's."""
    rest = os.environ.get("PYTHONPATH")
    return code_dir + (os.pathsep + rest if rest else "")


def import_times(repeats: int, env: dict, code_dirs: dict) -> dict:
    """Seconds of each statement of `IMPORTS` in a fresh interpreter, for each
    checkout of ``code_dirs`` (name prefix -> folder), all alternating for
    ``repeats`` rounds (in-process seconds and the whole process's), and
    ``python -X importtime``'s costliest modules of the first checkout."""
    code = "import time; t = time.perf_counter(); {}; print(time.perf_counter() - t)"
    env = {**os.environ, **env}
    res = {
        f"{pre}{k}": {"seconds": [], "process_seconds": []} for pre in code_dirs for k in IMPORTS
    }
    for _ in range(repeats):
        for (name, stmt), (pre, where) in itertools.product(IMPORTS.items(), code_dirs.items()):
            t = time.perf_counter()
            # cwd away from the checkout: PYTHONPATH decides which jaxscanvi loads
            p = subprocess.run(
                [sys.executable, "-c", code.format(stmt)],
                env={**env, "PYTHONPATH": _path(where)},
                capture_output=True,
                text=True,
                check=True,
                cwd=tempfile.gettempdir(),
            )
            name = pre + name
            res[name]["process_seconds"].append(time.perf_counter() - t)
            res[name]["seconds"].append(float(p.stdout.split()[-1]))
    env["PYTHONPATH"] = _path(next(iter(code_dirs.values())))
    for r in res.values():
        r["median_s"] = float(sorted(r["seconds"])[len(r["seconds"]) // 2])
        r["median_process_s"] = float(sorted(r["process_seconds"])[len(r["seconds"]) // 2])
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import jaxscanvi"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    rows = []
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].strip()))
    res["importtime_top"] = [f"{m} {us / 1e6:.3f}" for us, m in sorted(rows)[::-1][:15]]
    return res


def headline(total: dict, imports: dict, pre: str) -> dict:
    """The whole workflow's figures, from its ``total`` row."""
    return {
        "compile_seconds_cold": total["cold_compile_s"],
        "compile_seconds_warm": total["warm_compile_s"],
        "compile_speedup_warm_vs_cold": total["compile_ratio"],
        "xla_compile_seconds_cold": total["cold_backend_s"],
        "xla_compile_seconds_warm": total["warm_backend_s"],
        "trace_lower_seconds_cold": total["cold_compile_s"] - total["cold_backend_s"],
        "trace_lower_seconds_warm": total["warm_compile_s"] - total["warm_backend_s"],
        "wall_seconds_cold": total["cold_s"],
        "wall_seconds_warm": total["warm_s"],
        "wall_seconds_off": total["off_s"],
        "cache_hits_warm": total["warm_hits"],
        "cache_misses_warm": total["warm_misses"],
        "programs_cold": total["cold_programs"],
        "programs_warm": total["warm_programs"],
        "programs_off": total["off_programs"],
        "traced_warm": total["warm_traced"],
        **{f"import_{k}_median_s": imports[pre + k]["median_s"] for k in IMPORTS},
    }


def _folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(files), sum(p.stat().st_size for p in files)


def summarise(runs: dict) -> list[dict]:
    """Per phase: cold/warm/off seconds and compile seconds, and cold/warm ratios."""
    rows = []
    names = [p for p in PHASES if p not in TWICE] + [f"{p}#{i}" for p in TWICE for i in (1, 2)]
    order = {n: i for i, n in enumerate(PHASES)}
    names.sort(key=lambda n: (order[n.split("#")[0]], n))
    for name in [*names, "total"]:
        row = {"phase": name}
        for mode in ("cold", "warm", "off"):
            r = runs[mode]
            ph = r["total"] if name == "total" else r["phases"][name]
            row[f"{mode}_s"] = ph["seconds"]
            row[f"{mode}_compile_s"] = ph["compile_s"]
            row[f"{mode}_backend_s"] = ph["backend_s"]
            row[f"{mode}_hits"] = ph["cache_hits"]
            row[f"{mode}_misses"] = ph["cache_misses"]
            row[f"{mode}_programs"] = ph["n_programs"]
            row[f"{mode}_traced"] = ph["n_traced"]
        row["ratio"] = row["cold_s"] / row["warm_s"] if row["warm_s"] > 0 else None
        row["compile_ratio"] = (
            row["cold_compile_s"] / row["warm_compile_s"] if row["warm_compile_s"] > 0 else None
        )
        rows.append(row)
    return rows


METHOD = {
    "phases": "each '#1' is a phase's first call in the process (it compiles), "
    "'#2' the same call again (compiled); *_init is model "
    "construction; train phases are train(max_epochs=1)",
    "modes": "cold: persistent cache on, empty folder; warm: same folder, new "
    "process; off: JAXSCANVI_COMPILATION_CACHE=0",
    "compile_s": "trace + lowering + backend compile seconds from "
    "jax.monitoring duration events (backend compile includes a "
    "persistent-cache lookup and load)",
}


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON results path (default {DEFAULT_OUT}, "
        "or first_epoch_quick.json beside it with --quick)",
    )
    p.add_argument("--n-ref", type=int, default=2000, help="reference cells")
    p.add_argument("--n-query", type=int, default=1000, help="query cells")
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--label-fraction", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    add_smoke(p, "smoke run: 600 + 300 cells x 200 genes")
    p.add_argument(
        "--baseline",
        default=None,
        help="another checkout (a folder holding "
        "jaxscanvi/) run alternating with this one, for a before/after figure",
    )
    p.add_argument(
        "--import-repeats",
        type=int,
        default=5,
        help="fresh processes per import statement (alternating)",
    )
    add_worker_args(p)
    return p


def run_modes(args, code: dict, tmp: Path, meta: dict) -> dict | None:
    """The workflow cold, warm and off for each checkout, the checkouts
    alternating; None where a worker failed."""
    spec = {
        "ref": str(tmp / "ref.h5ad"),
        "query": str(tmp / "query.h5ad"),
        "batch_size": args.batch_size,
    }
    runs = {pre: {} for pre in code}
    for i, mode in enumerate(("cold", "warm", "off")):
        for pre in round_order(code, i):  # the checkouts alternate
            xdg = tmp / f"xdg{pre}"
            env = {
                "PYTHONPATH": _path(code[pre]),
                **(
                    {"XDG_CACHE_HOME": str(xdg), "JAXSCANVI_COMPILATION_CACHE": "1"}
                    if mode != "off"
                    else {"JAXSCANVI_COMPILATION_CACHE": "0"}
                ),
            }
            t = time.perf_counter()
            r = runs[pre][mode] = run_worker(SCRIPT, spec, args.timeout, env)
            if "error" in r:
                print(f"{pre}{mode}: {r['error']}\n{r['log_tail']}", file=sys.stderr)
                return None
            print(
                f"{pre}{mode}: {time.perf_counter() - t:.1f} s, cache {r['cache_dir']}",
                flush=True,
            )
            if mode == "cold":
                n_files, n_bytes = _folder_size(xdg / "jaxscanvi")
                meta[f"{pre}cache_folder"] = {"files": n_files, "bytes": n_bytes}
    return runs


def measure(args, meta: dict) -> tuple[dict, dict] | None:
    """Data, import times and the workflow's runs, in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="jaxscanvi_first_epoch_"))
    try:
        meta["data"] = make_data(tmp, args.n_ref, args.n_query, args.n_genes, args.label_fraction)
        print(
            f"data: reference {meta['data']['n_ref']} + query {meta['data']['n_query']} "
            f"cells x {args.n_genes} genes",
            flush=True,
        )
        here = str(Path(__file__).resolve().parents[1])
        code = {
            "": here,
            **({"baseline_": str(Path(args.baseline).resolve())} if args.baseline else {}),
        }
        for k in ("JAX_COMPILATION_CACHE_DIR",):  # this run's folder, not the user's
            os.environ.pop(k, None)
        meta["import"] = import_times(
            args.import_repeats,
            {"XDG_CACHE_HOME": str(tmp / "xdg_import"), "JAXSCANVI_COMPILATION_CACHE": "1"},
            code,
        )
        print(
            "import (median s): "
            + ", ".join(
                f"{k} {v['median_s']:.2f}" for k, v in meta["import"].items() if "median_s" in v
            ),
            flush=True,
        )
        runs = run_modes(args, code, tmp, meta)
        if runs is None:
            return None
        return code, runs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_baseline(meta: dict, code: dict, runs: dict, all_rows: dict) -> None:
    b = headline(all_rows["baseline_"][-1], meta["import"], "baseline_")
    meta["baseline"] = {
        "code": code["baseline_"],
        "headline": b,
        "rows": all_rows["baseline_"],
        "runs": runs["baseline_"],
    }
    meta["baseline_over_current"] = {
        k: b[k] / v
        for k, v in meta["headline"].items()
        if isinstance(v, (int, float)) and v and isinstance(b.get(k), (int, float))
    }


TABLE = {  # header: row key
    "phase": "phase",
    "cold s": "cold_s",
    "warm s": "warm_s",
    "ratio": "ratio",
    "off s": "off_s",
    "compile cold": "cold_compile_s",
    "compile warm": "warm_compile_s",
    "programs": "cold_programs",
    "traced warm": "warm_traced",
    "hits warm": "warm_hits",
    "misses warm": "warm_misses",
}


def report(meta: dict, rows: list[dict], out) -> None:
    print(format_table(list(TABLE), [[r[k] for k in TABLE.values()] for r in rows]))
    h = meta["headline"]
    print(
        f"\ncompile time (trace + lower + XLA): cold {h['compile_seconds_cold']:.2f} s, "
        f"warm {h['compile_seconds_warm']:.2f} s ({h['compile_speedup_warm_vs_cold']:.1f}x); "
        f"XLA alone: cold {h['xla_compile_seconds_cold']:.2f} s, warm "
        f"{h['xla_compile_seconds_warm']:.2f} s; trace + lower warm "
        f"{h['trace_lower_seconds_warm']:.2f} s\n"
        f"programs: cold {h['programs_cold']}, warm {h['programs_warm']} "
        f"(traced warm {h['traced_warm']}); import jax {h['import_jax_median_s']:.2f} s, "
        f"jaxscanvi {h['import_jaxscanvi_median_s']:.2f} s\n"
        f"cache folder {meta['cache_folder']['files']} files, "
        f"{meta['cache_folder']['bytes'] / 2**20:.1f} MiB\nwrote {out}"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return 0
    # this process only writes the data; it must not create the user's cache folder
    os.environ["JAXSCANVI_COMPILATION_CACHE"] = "0"
    if args.quick:
        args.n_ref, args.n_query, args.n_genes = 600, 300, 200
        args.import_repeats = min(args.import_repeats, 2)
    if args.out is None:
        args.out = str(
            DEFAULT_OUT.with_name("first_epoch_quick.json") if args.quick else DEFAULT_OUT
        )
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "architecture": ARCH,
        "method": METHOD,
    }
    m = meta["machine"]
    print(
        f"machine: {m['cpu_model']} | cpus usable {m['cpus_usable']} | load "
        f"{m['loadavg_at_start']} | jax {meta['versions']['jax']}",
        flush=True,
    )
    measured = measure(args, meta)
    if measured is None:
        return 1
    code, runs = measured
    all_rows = {pre: summarise(runs[pre]) for pre in code}
    rows = all_rows[""]
    meta["headline"] = headline(rows[-1], meta["import"], "")
    if args.baseline:
        add_baseline(meta, code, runs, all_rows)
    write_json(args.out, {**meta, "rows": rows, "runs": runs[""]})
    if args.baseline:
        print(
            "baseline / current: "
            + ", ".join(f"{k} {v:.2f}" for k, v in meta["baseline_over_current"].items())
        )
    report(meta, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

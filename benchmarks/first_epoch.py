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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, loadavg, machine_info, versions, write_json
from _programs import ProgramLog

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "first_epoch.json"
PHASES = (
    "import",
    "scvi_init",
    "scvi_train",
    "scvi_latent",
    "scanvi_init",
    "scanvi_train",
    "scanvi_predict",
    "scvi_query_init",
    "scvi_query_train",
    "scanvi_query_init",
    "scanvi_query_train",
    "scanvi_query_predict",
)
TWICE = (
    "scvi_train",
    "scvi_latent",
    "scanvi_train",
    "scanvi_predict",
    "scvi_query_train",
    "scanvi_query_train",
    "scanvi_query_predict",
)


# ============================================================== worker side
def _delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in after}
    d["compile_s"] = d["trace_s"] + d["lower_s"] + d["backend_s"]
    return d


def _worker(spec: dict) -> dict:
    t_start = time.perf_counter()
    import jax

    log = ProgramLog().start()
    import warnings

    import anndata as ad

    import jaxscanvi
    from jaxscanvi import SCANVI, SCVI

    warnings.simplefilter("ignore")
    out: dict = {"cache_dir": jax.config.jax_compilation_cache_dir, "phases": {}}
    state = {"t": t_start, "c": log.snapshot(), "n": 0}

    def mark(name, **extra):
        now, snap = time.perf_counter(), log.snapshot()
        progs = [f"{n} {s:.3f}" for n, s in log.programs[state["n"] :]]
        out["phases"][name] = {
            "seconds": now - state["t"],
            **_delta(snap, state["c"]),
            "programs": progs,
            **extra,
        }
        state["t"], state["c"], state["n"] = now, snap, len(log.programs)

    mark("import", jaxscanvi_file=jaxscanvi.__file__)
    ref = ad.read_h5ad(spec["ref"])
    query = ad.read_h5ad(spec["query"])
    state["t"], state["c"] = time.perf_counter(), log.snapshot()  # loading is not compiling
    state["n"] = len(log.programs)
    kw = dict(batch_size=spec["batch_size"], progress_bar=False, seed=0)

    def twice(name, fn):
        for i in (1, 2):
            fn()
            mark(f"{name}#{i}")

    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    vae = SCVI(ref, **ARCH, seed=0)
    mark("scvi_init")
    twice("scvi_train", lambda: vae.train(max_epochs=1, **kw))
    twice("scvi_latent", lambda: vae.get_latent_representation())
    lv = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    mark("scanvi_init")
    twice("scanvi_train", lambda: lv.train(max_epochs=1, **kw))
    twice("scanvi_predict", lambda: lv.predict())
    q_scvi = query.copy()
    SCVI.prepare_query_anndata(q_scvi, vae)
    qv = SCVI.load_query_data(q_scvi, vae)
    mark("scvi_query_init")
    qkw = dict(kw, plan_kwargs={"weight_decay": 0.0})
    twice("scvi_query_train", lambda: qv.train(max_epochs=1, **qkw))
    q_scanvi = query.copy()
    SCANVI.prepare_query_anndata(q_scanvi, lv)
    ql = SCANVI.load_query_data(q_scanvi, lv)
    mark("scanvi_query_init")
    twice("scanvi_query_train", lambda: ql.train(max_epochs=1, **qkw))
    twice("scanvi_query_predict", lambda: ql.predict())
    out["total"] = {
        "seconds": time.perf_counter() - t_start,
        **_delta(log.snapshot(), ProgramLog().snapshot()),
        "programs_by_name": log.by_name(),
    }
    out["jax_devices"] = [str(d) for d in jax.devices()]
    return out


def worker_main(spec_json: str, out_path: str) -> None:
    spec = json.loads(spec_json)
    res = {"loadavg_before": loadavg()}
    res.update(_worker(spec))
    res["loadavg_after"] = loadavg()
    Path(out_path).write_text(json.dumps(res))


# ============================================================== parent side
def make_data(
    folder: Path, n_ref: int, n_query: int, n_genes: int, label_fraction: float, seed: int = 0
) -> dict:
    """A 3-batch synthetic atlas: batches 0-1 the reference (part labelled), batch 2
    the query (unlabelled), written as two .h5ad files."""
    import numpy as np
    import pandas as pd

    from jaxscanvi.data.synthetic import synthetic_atlas

    n = n_ref + n_query
    adata = synthetic_atlas(n_cells=n, n_genes=n_genes, n_batches=3, seed=seed)
    adata.layers.pop("counts", None)
    adata.uns.pop("synthetic", None)
    rng = np.random.default_rng(seed)
    batch = adata.obs["batch"].astype(str).to_numpy()
    is_query = batch == sorted(set(batch))[-1]
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    hidden = is_query | (rng.random(n) >= label_fraction)
    cats = [*list(adata.obs["cell_type"].cat.categories), "Unknown"]
    adata.obs["labels"] = pd.Categorical(np.where(hidden, "Unknown", ct), categories=cats)
    ref, query = adata[~is_query].copy(), adata[is_query].copy()
    ref.write_h5ad(folder / "ref.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    return {
        "n_ref": int(ref.n_obs),
        "n_query": int(query.n_obs),
        "n_genes": n_genes,
        "n_cell_types": int(adata.obs["cell_type"].nunique()),
        "labelled_fraction_ref": float((ref.obs["labels"] != "Unknown").mean()),
        "generator": f"jaxscanvi.synthetic_atlas(n_cells={n}, n_genes={n_genes}, "
        f"n_batches=3, seed={seed}); the last batch is the query",
    }


def run_worker(spec: dict, env: dict, timeout: float | None) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(spec),
        "--worker-out",
        out,
    ]
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-3000:]
    try:
        if rc != 0:
            return {"error": f"worker exit {rc}", "log_tail": tail}
        res = json.loads(Path(out).read_text())
        res["process_seconds"] = time.perf_counter() - t
        return res
    finally:
        Path(out).unlink(missing_ok=True)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument("--quick", action="store_true", help="smoke run: 600 + 300 cells x 200 genes")
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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
        "method": {
            "phases": "each '#1' is a phase's first call in the process (it compiles), "
            "'#2' the same call again (compiled); *_init is model "
            "construction; train phases are train(max_epochs=1)",
            "modes": "cold: persistent cache on, empty folder; warm: same folder, new "
            "process; off: JAXSCANVI_COMPILATION_CACHE=0",
            "compile_s": "trace + lowering + backend compile seconds from "
            "jax.monitoring duration events (backend compile includes a "
            "persistent-cache lookup and load)",
        },
    }
    print(
        f"machine: {meta['machine']['cpu_model']} | cpus usable "
        f"{meta['machine']['cpus_usable']} | load {meta['machine']['loadavg_at_start']} "
        f"| jax {meta['versions']['jax']}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="jaxscanvi_first_epoch_"))
    try:
        meta["data"] = make_data(tmp, args.n_ref, args.n_query, args.n_genes, args.label_fraction)
        print(
            f"data: reference {meta['data']['n_ref']} + query {meta['data']['n_query']} "
            f"cells x {args.n_genes} genes",
            flush=True,
        )
        spec = {
            "ref": str(tmp / "ref.h5ad"),
            "query": str(tmp / "query.h5ad"),
            "batch_size": args.batch_size,
        }
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
        runs = {pre: {} for pre in code}
        for i, mode in enumerate(("cold", "warm", "off")):
            for pre in list(code)[:: (-1) ** i]:  # the checkouts alternate
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
                r = runs[pre][mode] = run_worker(spec, env, args.timeout)
                if "error" in r:
                    print(f"{pre}{mode}: {r['error']}\n{r['log_tail']}", file=sys.stderr)
                    return 1
                print(
                    f"{pre}{mode}: {time.perf_counter() - t:.1f} s, cache {r['cache_dir']}",
                    flush=True,
                )
                if mode == "cold":
                    n_files, n_bytes = _folder_size(xdg / "jaxscanvi")
                    meta[f"{pre}cache_folder"] = {"files": n_files, "bytes": n_bytes}
        all_rows = {pre: summarise(runs[pre]) for pre in code}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = all_rows[""]
    meta["headline"] = headline(rows[-1], meta["import"], "")
    if args.baseline:
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
    runs = runs[""]
    write_json(args.out, {**meta, "rows": rows, "runs": runs})
    if args.baseline:
        print(
            "baseline / current: "
            + ", ".join(f"{k} {v:.2f}" for k, v in meta["baseline_over_current"].items())
        )
    headers = [
        "phase",
        "cold s",
        "warm s",
        "ratio",
        "off s",
        "compile cold",
        "compile warm",
        "programs",
        "traced warm",
        "hits warm",
        "misses warm",
    ]
    print(
        format_table(
            headers,
            [
                [
                    r["phase"],
                    r["cold_s"],
                    r["warm_s"],
                    r["ratio"],
                    r["off_s"],
                    r["cold_compile_s"],
                    r["warm_compile_s"],
                    r["cold_programs"],
                    r["warm_traced"],
                    r["warm_hits"],
                    r["warm_misses"],
                ]
                for r in rows
            ],
        )
    )
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
        f"{meta['cache_folder']['bytes'] / 2**20:.1f} MiB\nwrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

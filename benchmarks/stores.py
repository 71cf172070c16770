"""Raw read rate of each atlas store: random runs of consecutive cells, in cells/s.

Builds one random count matrix (``--cells`` x ``--genes``, ``--density``
non-zero) and writes it as every store jaxscanvi reads: one backed ``.h5ad``
(`BackedRows`), a collection of 4 files, ``.h5ad`` and ``.zarr`` alternating
(`read_collection`), an annbatch collection (`read_annbatch`; where annbatch
is installed) and a TileDB-SOMA experiment (`read_soma`). Every store's files
are read once first, so the timings are from the page cache. Then, for
``--rounds`` rounds, each store reads the same random runs (lengths 32-256,
uniform) one ``read(start, stop)`` at a time and, in groups of 16 runs, one
``read_runs`` call at a time; the stores alternate within a round. Reported:
the median over rounds of cells read per second, and its ratio to slicing
the same runs from the matrix in memory (scipy CSR). The JSON goes to
``results/stores.json``.

    python benchmarks/stores.py              # 200,000 cells x 2,000 genes, 5% non-zero
    python benchmarks/stores.py --smoke      # tiny, for CI
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from _common import format_table, machine_info, versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 16  # runs per read_runs call


def counts(n: int, g: int, density: float, seed: int) -> sp.csr_matrix:
    """Random integer counts (1 + Poisson(2) where non-zero), built in row chunks."""
    rng = np.random.default_rng(seed)
    parts = []
    for a in range(0, n, 20_000):
        m = min(20_000, n - a)
        parts.append(
            sp.random(
                m,
                g,
                density=density,
                format="csr",
                dtype=np.float32,
                random_state=rng,
                data_rvs=lambda k: 1.0 + rng.poisson(2, k),
            )
        )
    X = sp.vstack(parts, format="csr")
    X.sort_indices()
    return X


def build(X: sp.csr_matrix, d: Path) -> dict:
    """Write every store; {name: (AnnData opener, folder or file to warm)}."""
    import anndata as ad
    import pandas as pd

    from jaxscanvi.data import read_collection, read_soma
    from jaxscanvi.data.backed import BackedRows

    n = X.shape[0]
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.arange(n) % 2)}, index=[f"c{i}" for i in range(n)]
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])
    whole = ad.AnnData(X=X, obs=obs, var=var)
    stores, timings = {}, {}
    t = time.perf_counter()
    whole.write_h5ad(d / "whole.h5ad")
    stores["one .h5ad (BackedRows)"] = (
        lambda: BackedRows(ad.read_h5ad(d / "whole.h5ad", backed="r").X),
        [d / "whole.h5ad"],
    )
    bounds = np.linspace(0, n, 5).astype(int)
    paths = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        p = d / (f"part{i}.zarr" if i % 2 else f"part{i}.h5ad")
        part = whole[a:b].copy()
        part.write_zarr(p) if i % 2 else part.write_h5ad(p)
        paths.append(p)
    stores["4 files, .h5ad + .zarr (read_collection)"] = (lambda: read_collection(paths).X, paths)
    timings["write h5ad + collection"] = time.perf_counter() - t
    try:
        import annbatch
    except ImportError:  # needs Python >= 3.12
        annbatch = None
    if annbatch is not None:
        from jaxscanvi.data import read_annbatch

        t = time.perf_counter()
        annbatch.DatasetCollection(d / "annbatch.zarr").add_adatas(
            [str(p) for p in paths], rng=np.random.default_rng(0)
        )
        timings["annbatch add_adatas"] = time.perf_counter() - t
        stores["annbatch collection (read_annbatch)"] = (
            lambda: read_annbatch(d / "annbatch.zarr").X,
            [d / "annbatch.zarr"],
        )
    try:
        import tiledbsoma.io
    except ImportError:  # the atlas extra is not installed
        return stores, timings
    t = time.perf_counter()
    tiledbsoma.io.from_anndata(str(d / "soma"), whole, measurement_name="RNA", X_layer_name="raw")
    timings["tiledbsoma from_anndata"] = time.perf_counter() - t
    stores["TileDB-SOMA experiment (read_soma)"] = (
        lambda: read_soma(str(d / "soma")).X,
        [d / "soma"],
    )
    return stores, timings


def warm(paths) -> int:
    """Read every byte of the stores' files once (page cache); bytes read."""
    total = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            total += len(f.read_bytes())
    return total


def timed(read, runs) -> float:
    t = time.perf_counter()
    cells = sum(read(a, b).shape[0] for a, b in runs)
    return cells / (time.perf_counter() - t)


def timed_grouped(read_runs, runs) -> float:
    t = time.perf_counter()
    cells = 0
    for i in range(0, len(runs), GROUP):
        group = runs[i : i + GROUP]
        cells += read_runs([a for a, _ in group], [b for _, b in group]).shape[0]
    return cells / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--runs", type=int, default=400, help="random runs per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="2,000 cells x 200 genes, 2 rounds")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--workdir",
        default=None,
        help="where to write the stores (default: a temporary folder, removed afterwards)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.runs, args.rounds = 2000, 200, 40, 2
    d = Path(args.workdir or tempfile.mkdtemp(prefix="stores-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        doc = run(args, d)
    finally:
        if args.workdir is None:
            shutil.rmtree(d, ignore_errors=True)
    out = (
        Path(args.out)
        if args.out
        else (Path("/tmp") / "stores_smoke.json" if args.smoke else RESULTS / "stores.json")
    )
    write_json(out, doc)
    print(
        format_table(
            ["store", "read cells/s", "x in-memory", "read_runs cells/s"],
            [
                [
                    k,
                    f"{v['read_cells_per_s']:,.0f}",
                    f"{v['read_vs_memory']:.3f}",
                    "-"
                    if v["read_runs_cells_per_s"] is None
                    else f"{v['read_runs_cells_per_s']:,.0f}",
                ]
                for k, v in doc["results"].items()
            ],
        )
    )
    print(f"wrote {out}")
    return 0


def run(args, d: Path) -> dict:
    X = counts(args.cells, args.genes, args.density, seed=0)
    stores, timings = build(X, d)
    # in memory: one slice per run, and a group of runs as slices stacked
    readers = {
        "scipy CSR in memory": (
            lambda a, b: X[a:b],
            lambda s, e: sp.vstack([X[a:b] for a, b in zip(s, e)], format="csr"),
        )
    }
    warmed = 0
    for name, (open_store, paths) in stores.items():
        warmed += warm(paths)
        store = open_store()
        readers[name] = (store.read, getattr(store, "read_runs", None))
    rng = np.random.default_rng(1)
    lengths = rng.integers(32, 257, size=(args.rounds + 1, args.runs))
    starts = [rng.integers(0, args.cells - ln + 1) for ln in lengths]
    runs = [list(zip(s.tolist(), (s + ln).tolist())) for s, ln in zip(starts, lengths)]
    for read, _ in readers.values():  # warm-up round (not timed)
        timed(read, runs[0][:20])
    rates = {k: {"read": [], "read_runs": []} for k in readers}
    for r in range(1, args.rounds + 1):
        for name, (read, read_runs) in readers.items():
            rates[name]["read"].append(timed(read, runs[r]))
            if read_runs is not None:
                rates[name]["read_runs"].append(timed_grouped(read_runs, runs[r]))
    mem = float(np.median(rates["scipy CSR in memory"]["read"]))
    results = {
        k: {
            "read_cells_per_s": float(np.median(v["read"])),
            "read_vs_memory": float(np.median(v["read"])) / mem,
            "read_runs_cells_per_s": (float(np.median(v["read_runs"])) if v["read_runs"] else None),
            "read_per_round": v["read"],
            "read_runs_per_round": v["read_runs"],
        }
        for k, v in rates.items()
    }
    return {
        "benchmark": "stores",
        "smoke": args.smoke,
        "args": vars(args),
        "matrix": {
            "cells": X.shape[0],
            "genes": X.shape[1],
            "nnz": int(X.nnz),
            "csr_mb": (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 1e6,
        },
        "bytes_warmed": warmed,
        "build_seconds": timings,
        "runs_per_group": GROUP,
        "machine": machine_info(with_jax=False),
        "versions": versions(),
        "results": results,
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""Atlases past one device: the chunked loader, its overhead, and mixing from a sorted file.

Three parts, each written to ``benchmarks/results/atlas.json`` (``--out``):

* ``loader``: the loader alone (order, read, build and ship CSR chunks to the
  device; no model) over a 2,000-gene, 5%-dense matrix, in memory and as
  every store `stores.py` builds (one backed ``.h5ad``; 4 ``.h5ad``/``.zarr``
  files; annbatch and TileDB-SOMA where installed), read from the page
  cache (each file is read once before timing). In memory also with the
  dense chunks CPU training ships instead (``dense chunks``: each chunk's
  counts densified on the host, 1.6 GB written per epoch here). Cells/s,
  CSR GB/s and the RSS it adds; for each store, ``reading_alone``: its library's read rate
  for the same runs (replayed, nothing built or shipped) and for all rows in
  order, the bound on what the loader can reach.
* ``overhead``: scVI trained through the device, host and stream sources in
  alternating rounds, steady epochs only (the first compiles): host and
  stream cells/s as a ratio of the device source's, with a tiny network
  (n_hidden=16, n_latent=4, n_layers=1, batch 1024) and the default one
  (batch 128).
* ``memory``: a loader-only streamed epoch over a large on-disk store
  (default 20M cells x 2,000 genes, 5% dense: a 16 GB HDF5 CSR written
  block by block into ``--tmp``), RSS sampled every second: what streaming adds
  over the process's baseline (the file's row offsets and per-cell columns
  included).
* ``mixing``: a synthetic atlas sorted by batch (60,000 cells x 1,000 genes,
  6 batches), scVI for 10 epochs from memory (device) and streamed from the
  sorted file: kNN batch entropy (`_metrics.batch_entropy`, k=50) and
  leave-one-out 15-NN cell-type accuracy of the latent means.

Run: ``python benchmarks/atlas.py`` (about 20 minutes on 2 CPU cores);
``--smoke`` runs every part tiny (CI).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import current_rss_mb, machine_info, versions, write_json

DEFAULT_OUT = HERE / "results" / "atlas.json"


def random_csr(n_cells: int, n_genes: int, density: float, seed: int = 0):
    """A CSR with exactly ``density * n_genes`` sorted non-zeros per row (fast to make)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    k = max(round(density * n_genes), 1)
    cols = np.sort(np.argsort(rng.random((min(n_cells, 4096), n_genes)), axis=1)[:, :k], 1)
    reps = -(-n_cells // cols.shape[0])
    indices = np.tile(cols, (reps, 1))[:n_cells].astype(np.int32).ravel()
    data = (1 + rng.poisson(1.5, n_cells * k)).astype(np.float32)
    indptr = np.arange(n_cells + 1, dtype=np.int64) * k
    return sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))


def _cells(X):
    import pandas as pd

    from jaxscanvi.data.cells import CellData

    n = X.shape[0]
    zeros = np.zeros(n, np.float32)
    return CellData(
        X=X,
        batch=np.zeros(n, np.int32),
        labels=np.zeros(n, np.int32),
        cat_covs=np.zeros((n, 0), np.int32),
        cont_covs=np.zeros((n, 0), np.float32),
        log_size_factor=None,
        log_library=zeros,
        lgamma_const=zeros,
        obs_names=pd.RangeIndex(n),
    )


def _loader_epoch(src, n: int, batch_size: int) -> float:
    import jax

    rows = src.order(np.random.default_rng(0), np.arange(n), batch_size)
    t0 = time.perf_counter()
    for chunk in src.chunks(rows):
        jax.block_until_ready(chunk)
    return time.perf_counter() - t0


def _csr(src):
    """``src`` shipping CSR chunks, as accelerators get them (the target's
    measure), not the dense chunks the CPU's training path builds."""
    src.dense_chunk_bytes = 0
    return src


def _read_bounds(open_x, n: int, batch_size: int) -> dict:
    """What the store's library allows, reading alone (no chunks built or shipped).

    ``runs``: the store's ``read_runs`` replayed over the very spans a
    streamed epoch asks for (recorded from one), on a freshly opened store;
    ``sequential``: the same rows read in order, 65,536 per call. Best of two."""
    from jaxscanvi.train.sources import StreamSource

    X = open_x()
    calls, read_runs = [], X.read_runs

    def record(lo, hi):
        calls.append((lo, hi))
        return read_runs(lo, hi)

    X.read_runs = record
    _loader_epoch(StreamSource(_cells(X), batch_size), n, batch_size)

    def replay():
        X = open_x()
        t0 = time.perf_counter()
        for lo, hi in calls:
            X.read_runs(lo, hi)
        return time.perf_counter() - t0

    def in_order():
        X = open_x()
        t0 = time.perf_counter()
        for a in range(0, n, 1 << 16):
            X.read_runs([a], [min(a + (1 << 16), n)])
        return time.perf_counter() - t0

    # the best of two, as the loader's epochs are
    runs = min(replay() for _ in range(2))
    seq = min(in_order() for _ in range(2))
    return {
        "read_runs_cells_per_s": round(n / runs),
        "read_runs_calls": len(calls),
        "sequential_cells_per_s": round(n / seq),
    }


def part_loader(n_cells: int, batch_size: int, tmp: Path) -> dict:
    """Each store's streamed epoch of chunks, against the in-memory host source's."""
    from stores import build, warm

    from jaxscanvi.train.sources import HostSource, StreamSource

    X = random_csr(n_cells, 2000, 0.05)
    gb = (X.data.nbytes + X.indices.nbytes) / 1e9
    stores, _ = build(X, tmp)  # one .h5ad, 4 files, annbatch, SOMA: what is installed
    makers = {
        "memory (host source)": lambda: _csr(HostSource(_cells(X), batch_size)),
        # what CPU training ships instead: the chunk densified on the host
        "memory (host source), dense chunks": lambda: HostSource(_cells(X), batch_size),
    }
    for name, (open_x, paths) in stores.items():
        warm(paths)  # the page cache, as the target reads
        makers[name] = (lambda o: lambda: _csr(StreamSource(_cells(o()), batch_size)))(open_x)
    openers = {name: open_x for name, (open_x, _) in stores.items()}
    out = {
        "n_cells": n_cells,
        "n_genes": 2000,
        "density": 0.05,
        "csr_gb": round(gb, 3),
        "batch_size": batch_size,
        "stores": {},
    }
    for name, make in makers.items():
        _loader_epoch(make(), n_cells, batch_size)  # warm: first transfer
        rss0 = current_rss_mb() or 0.0
        secs = [_loader_epoch(make(), n_cells, batch_size) for _ in range(5)]
        best = min(secs)
        out["stores"][name] = {
            "cells_per_s": round(n_cells / best),
            "csr_gb_per_s": round(gb / best, 3),
            "seconds": [round(s, 3) for s in secs],
            "rss_added_mb": round((current_rss_mb() or 0.0) - rss0, 1),
        }
        print(f"loader {name}: {n_cells / best:,.0f} cells/s ({gb / best:.2f} GB/s)")
        if name in openers:  # the library's own read rate: the bound on the loader
            bound = _read_bounds(openers[name], n_cells, batch_size)
            out["stores"][name]["reading_alone"] = bound
            print(f"  reading alone: {bound}")
    return out


def write_csr_blocks(
    path: Path, n_cells: int, n_genes: int, density: float, block: int = 500_000
) -> float:
    """An HDF5 file holding one CSR matrix "X" in anndata's layout, appended
    block by block (flat memory); returns the seconds it took. No obs: 20M
    cell names would dwarf what the loader itself holds."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        for s in range(0, n_cells, block):
            X = random_csr(min(block, n_cells - s), n_genes, density, seed=s)
            if s == 0:
                write_elem(f, "X", X)
            else:
                sparse_dataset(f["X"]).append(X)
    return time.perf_counter() - t0


def part_memory(n_cells: int, batch_size: int, tmp: Path) -> dict:
    import h5py
    from _scale_workers import RssSampler
    from anndata.io import sparse_dataset

    from jaxscanvi.data.backed import BackedRows
    from jaxscanvi.train.sources import StreamSource

    path = tmp / "huge.h5"
    write_s = write_csr_blocks(path, n_cells, 2000, 0.05)
    base = current_rss_mb() or 0.0
    X = BackedRows(sparse_dataset(h5py.File(path, "r")["X"]))
    src = StreamSource(_cells(X), batch_size)
    with RssSampler(every=1.0) as rss:
        seconds = _loader_epoch(src, n_cells, batch_size)
    peak = max(m for _, m in rss.samples if m is not None)
    out = {
        "n_cells": n_cells,
        "n_genes": 2000,
        "density": 0.05,
        "nnz": X.nnz,
        "file_gb": round(path.stat().st_size / 1e9, 2),
        "write_seconds": round(write_s),
        "epoch_seconds": round(seconds, 1),
        "cells_per_s": round(n_cells / seconds),
        "rss_baseline_mb": round(base, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_added_mb": round(peak - base, 1),
        "rss_samples_mb": [round(m, 1) for _, m in rss.samples if m is not None],
    }
    print(f"memory: {n_cells:,} cells streamed in {seconds:.0f} s, RSS +{peak - base:.0f} MB")
    path.unlink()
    return out


def _sorted_atlas(n_cells: int, n_genes: int, n_batches: int):
    import jaxscanvi as js

    a = js.synthetic_atlas(
        n_cells=n_cells,
        n_genes=n_genes,
        n_batches=n_batches,
        n_lineages=3,
        types_per_lineage=3,
        seed=0,
        batch_effect=0.25,
    )
    return a[np.argsort(a.obs["batch"].cat.codes.to_numpy(), kind="stable")].copy()


def _train(adata, source: str, epochs: int, arch: dict, batch_size: int, seed: int = 0):
    import jaxscanvi as js

    js.SCVI.setup_anndata(adata, batch_key="batch")
    m = js.SCVI(adata, **arch)
    m.train(
        max_epochs=epochs,
        batch_size=batch_size,
        progress_bar=False,
        data_source=source,
        seed=seed,
        train_size=1.0,
    )
    return m


def part_overhead(n_cells: int, epochs: int, rounds: int, tmp: Path) -> dict:
    import anndata as ad

    a = _sorted_atlas(n_cells, 2000, 4)
    a.write_h5ad(tmp / "overhead.h5ad")
    configs = {"tiny": (dict(n_hidden=16, n_latent=4, n_layers=1), 1024), "default": ({}, 128)}
    out = {"n_cells": n_cells, "n_genes": 2000, "epochs": epochs, "rounds": rounds}
    for name, (arch, bs) in configs.items():
        rates: dict[str, list[float]] = {"device": [], "host": [], "stream": []}
        for _ in range(rounds):  # alternating: each round runs every source once
            for source in rates:
                adata = (
                    ad.read_h5ad(tmp / "overhead.h5ad", backed="r")
                    if source == "stream"
                    else a.copy()
                )
                m = _train(adata, source, epochs, arch, bs)
                secs = m.history.to_frame()["epoch_seconds"].to_numpy()[1:]  # steady
                rates[source].append(float(n_cells / np.median(secs)))
        med = {s: float(np.median(v)) for s, v in rates.items()}
        out[name] = {
            "batch_size": bs,
            "arch": arch,
            "cells_per_s": rates,
            "median_cells_per_s": {s: round(v) for s, v in med.items()},
            "host_vs_device": round(med["host"] / med["device"], 3),
            "stream_vs_device": round(med["stream"] / med["device"], 3),
        }
        print(
            f"overhead {name}: host {out[name]['host_vs_device']}x, "
            f"stream {out[name]['stream_vs_device']}x of the device source"
        )
    return out


def part_mixing(n_cells: int, n_genes: int, epochs: int, tmp: Path, seeds=(0,)) -> dict:
    import anndata as ad
    from _metrics import batch_entropy, knn_accuracy, t_interval

    a = _sorted_atlas(n_cells, n_genes, 6)
    a.write_h5ad(tmp / "sorted.h5ad")
    out = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": 6,
        "epochs": epochs,
        "file_order": "sorted by batch",
        "seeds": list(seeds),
        "runs": [],
    }
    for seed in seeds:
        for source in ("device", "stream"):
            adata = (
                ad.read_h5ad(tmp / "sorted.h5ad", backed="r") if source == "stream" else a.copy()
            )
            m = _train(adata, source, epochs, {}, 128, seed=seed)
            z = m.get_latent_representation()
            rec = {
                "seed": seed,
                "source": source,
                "batch_entropy": round(batch_entropy(z, a.obs["batch"], k=50), 4),
                "knn_accuracy": round(knn_accuracy(z, a.obs["cell_type"]), 4),
            }
            out["runs"].append(rec)
            print(f"mixing {rec}")
    for metric in ("batch_entropy", "knn_accuracy"):
        by = {(r["seed"], r["source"]): r[metric] for r in out["runs"]}
        diff = [by[s, "stream"] - by[s, "device"] for s in seeds]
        out[f"{metric}_stream_minus_device"] = {
            "mean": round(float(np.mean(diff)), 4),
            "per_seed": [round(d, 4) for d in diff],
            "t_interval_95": t_interval(diff) if len(diff) > 1 else None,
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts",
        nargs="+",
        default=["loader", "overhead", "mixing"],
        help="any of loader, overhead, mixing, memory",
    )
    p.add_argument("--smoke", action="store_true", help="every part tiny (CI)")
    p.add_argument("--loader-cells", type=int, default=400_000)
    p.add_argument("--overhead-cells", type=int, default=30_000)
    p.add_argument("--mixing-cells", type=int, default=60_000)
    p.add_argument("--memory-cells", type=int, default=20_000_000)
    p.add_argument("--mixing-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tmp", default=None, help="folder for the stores (memory: 16 GB)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    big = not args.smoke
    sizes = dict(
        loader=args.loader_cells if big else 3000,
        overhead=args.overhead_cells if big else 1500,
        mixing=args.mixing_cells if big else 1200,
        memory=args.memory_cells if big else 20_000,
    )
    result = {"machine": machine_info(), "versions": versions(), "smoke": args.smoke}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        if "loader" in args.parts:
            result["loader"] = part_loader(sizes["loader"], 1024 if big else 128, tmp)
        if "overhead" in args.parts:
            result["overhead"] = part_overhead(
                sizes["overhead"], 4 if big else 2, 3 if big else 1, tmp
            )
        if "mixing" in args.parts:
            result["mixing"] = part_mixing(
                sizes["mixing"],
                1000 if big else 200,
                10 if big else 2,
                tmp,
                seeds=args.mixing_seeds if big else (0,),
            )
        if "memory" in args.parts:
            result["memory"] = part_memory(sizes["memory"], 1024 if big else 128, tmp)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of jaxscanvi SCVI/SCANVI, and of scvi-tools where installed.

For each model and batch size, a fresh subprocess (so peak RSS is that of one
configuration alone) trains on the same simulated atlas
(``jaxscanvi.data.synthetic_atlas``) and reports:

* the first epoch (compilation for JAX, warm-up for torch) apart;
* steady-state training cells/s = (training cells per epoch x steady epochs)
  / (sum of steady epoch seconds), training cells per epoch being the
  ``ceil(train_size * n_cells)`` cells of the training split; also the figure
  from the median epoch;
* wall time and peak/current RSS at the end of each phase (imports, data
  load + setup, model init, first epoch, steady epochs).

jaxscanvi: one ``train(max_epochs=1)`` call (it compiles the epoch), then one
``train(max_epochs=E)`` call that reuses the cached compiled epoch; the
steady epochs are that second call's ``history["epoch_seconds"]`` (synchronised:
the loop reads the epoch's results back before stopping the clock; no
validation runs since ``check_val_every_n_epoch`` is None).

scvi-tools: one ``train(max_epochs=1 + E)`` call with a Lightning callback
timing each epoch from ``on_train_epoch_start`` to the last
``on_train_batch_end``; epoch 0 is the warm-up. ``torch.set_num_threads`` is
set to the usable cores (``--torch-threads``), progress bar off, no validation.

A "ceiling" is also reported: measured float32 GEMM GFLOP/s (2048 x 2048,
numpy and jax, best of both) divided by the GEMM FLOPs of one training step
per cell (formula in the JSON under ``ceiling``). It ignores the element-wise
work (the ZINB likelihood, batch norm, Adam), so it is an upper bound.

Usage:
    python benchmarks/train_throughput.py                      # full run
    python benchmarks/train_throughput.py --quick              # smoke run
    python benchmarks/train_throughput.py --no-scvi-tools --batch-sizes 128 --epochs 5
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ceiling import flops_per_cell, measure_gemm
from _common import (
    add_smoke,
    add_worker_args,
    format_table,
    have_scvi_tools,
    loadavg,
    machine_info,
    parser,
    run_worker,
    usable_cores,
    versions,
    write_json,
)
from _train_workers import ARCH, TRAIN_SIZE, worker_main

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_throughput.json"


def make_data(path: Path, n_cells: int, n_genes: int, label_fraction: float, seed: int = 0) -> dict:
    from jaxscanvi.data.synthetic import synthetic_atlas

    adata = synthetic_atlas(n_cells=n_cells, n_genes=n_genes, seed=seed)
    adata.layers.pop("counts", None)  # X holds the same counts
    adata.uns.pop("synthetic", None)  # ground-truth arrays; not needed here
    rng = np.random.default_rng(seed)
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    hidden = rng.random(n_cells) >= label_fraction
    lab = np.where(hidden, "Unknown", ct)
    cats = [*list(adata.obs["cell_type"].cat.categories), "Unknown"]
    import pandas as pd

    adata.obs["labels_hidden"] = pd.Categorical(lab, categories=cats)
    adata.write_h5ad(path)
    info = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_batches": int(adata.obs["batch"].nunique()),
        "n_cell_types": int(adata.obs["cell_type"].nunique()),
        "labelled_fraction": float((~hidden).mean()),
        "nnz_per_cell_mean": float(adata.X.nnz / n_cells),
        "generator": f"jaxscanvi.data.synthetic.synthetic_atlas(n_cells={n_cells}, "
        f"n_genes={n_genes}, seed={seed})",
    }
    del adata
    gc.collect()
    return info


def label(spec: dict) -> str:
    if spec["model"] == "scanvi" and spec["framework"] == "jaxscanvi":
        return f"scanvi[{spec['objective']}]"
    return spec["model"]


METHOD = {
    "steady_cells_per_s": "n_train_cells_per_epoch * steady_epochs / "
    "sum(steady epoch seconds); first epoch excluded",
    "jaxscanvi": "train(max_epochs=1) [compiles], then train(max_epochs="
    "epochs) reusing the compiled epoch; history['epoch_seconds']",
    "scvi-tools": "train(max_epochs=1+epochs); Lightning callback, "
    "on_train_epoch_start -> last on_train_batch_end; epoch 0 "
    "excluded",
    "peak_rss": "VmHWM (own high-water mark) of a fresh subprocess per configuration; "
    "phases[*].peak_rss_mb is the peak up to the end of that phase",
}


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON results path (default {DEFAULT_OUT}, "
        "or train_throughput_quick.json beside it with --quick)",
    )
    p.add_argument("--n-cells", type=int, default=20000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument(
        "--epochs", type=int, default=3, help="steady-state epochs, after one warm-up/compile epoch"
    )
    p.add_argument("--models", nargs="+", default=["scvi", "scanvi"], choices=["scvi", "scanvi"])
    p.add_argument(
        "--scanvi-objectives",
        nargs="+",
        default=["scvi-tools"],
        choices=["seed", "scvi-tools"],
        help="jaxscanvi SCANVI objective(s); both compute the same networks, "
        "'scvi-tools' is the same loss as the scvi-tools run",
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        default=0.5,
        help="fraction of cells keeping their label for SCANVI",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="validation every epoch in both libraries (timed as part of it)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each configuration this many times; the best is reported",
    )
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument("--torch-threads", type=int, default=usable_cores())
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per worker process (default: none)"
    )
    add_smoke(p, "smoke run: 1,500 cells x 200 genes, batch size 128, 2 epochs")
    add_worker_args(p)
    return p


def ceiling_part(args, data: dict) -> dict:
    """The GEMM-only ceiling (``meta["ceiling"]``), printed as it is measured."""
    G, H, L = args.n_genes, ARCH["n_hidden"], ARCH["n_latent"]
    gemm = measure_gemm(args.gemm_n, layer_shapes=[(b, G, H) for b in args.batch_sizes])
    fpc = {
        m: flops_per_cell(m, G, H, L, data["n_batches"], data["n_cell_types"])
        for m in ("scvi", "scanvi")
    }
    ceiling = {m: gemm["gflops"] * 1e9 / fpc[m]["flops"] for m in fpc}
    print(
        f"GEMM {args.gemm_n}^2 float32: numpy {gemm['numpy_gflops_median']:.1f}, "
        f"jax {gemm['jax_gflops_median']:.1f} GFLOP/s | layer shapes (jax) "
        + ", ".join(f"{k}: {v:.1f}" for k, v in gemm["jax_gflops_layer_shapes"].items()),
        flush=True,
    )
    for m in fpc:
        print(
            f"ceiling {m}: {fpc[m]['flops'] / 1e6:.2f} MFLOP/cell/step "
            f"[{fpc[m]['formula']}] -> {ceiling[m]:,.0f} cells/s",
            flush=True,
        )
    return {
        "gemm": gemm,
        "flops_per_cell": fpc,
        "cells_per_s": ceiling,
        "note": "GEMM-only upper bound: element-wise work (likelihood, "
        "batch norm, optimizer) is not counted",
    }


def make_specs(args, use_scvi: bool) -> list[dict]:
    """One spec per worker process: batch size x model x repeat x library."""

    def spec(framework, model, objective, bs, rep, **extra):
        return {
            "framework": framework,
            "model": model,
            "objective": objective,
            "batch_size": bs,
            "epochs": args.epochs,
            "repeat": rep,
            "validate": args.validate,
            **extra,
        }

    specs = []
    for bs in args.batch_sizes:
        for model in args.models:
            objs = args.scanvi_objectives if model == "scanvi" else [None]
            for rep in range(args.repeats):
                specs += [spec("jaxscanvi", model, obj, bs, rep) for obj in objs]
                if use_scvi:
                    specs.append(
                        spec("scvi-tools", model, None, bs, rep, torch_threads=args.torch_threads)
                    )
    return specs


def run_specs(specs: list[dict], data_path: Path, timeout: float | None) -> list[dict]:
    """Each spec in a fresh worker process, in turn."""
    runs = []
    for i, spec in enumerate(specs):
        spec = dict(spec, data=str(data_path))
        print(
            f"[{i + 1}/{len(specs)}] {spec['framework']} {label(spec)} "
            f"batch_size={spec['batch_size']} repeat={spec['repeat']} ...",
            end=" ",
            flush=True,
        )
        res = run_worker(Path(__file__).resolve(), spec, timeout)
        if "error" in res:
            res = {"spec": spec, **res}
        res["spec"].pop("data", None)
        if "error" in res:
            print(f"FAILED ({res['error']})\n{res['log_tail']}", flush=True)
        else:
            print(
                f"{res['cells_per_s']:,.0f} cells/s (first epoch "
                f"{res['first_epoch_seconds']:.2f} s, peak RSS "
                f"{res['peak_rss_mb']:,.0f} MiB)",
                flush=True,
            )
        runs.append(res)
    return runs


SUMMARY_KEYS = (
    "first_epoch_seconds",
    "steady_epoch_seconds_median",
    "cells_per_s",
    "cells_per_s_median_epoch",
    "peak_rss_mb",
    "rss_growth_training_mb",
)
TABLE = {  # header: summary key (percent of the ceiling scaled below)
    "model": "model",
    "batch": "batch_size",
    "framework": "framework",
    "1st epoch s": "first_epoch_seconds",
    "steady s/ep": "steady_epoch_seconds_median",
    "cells/s": "cells_per_s",
    "peak RSS MiB": "peak_rss_mb",
    "+RSS train": "rss_growth_training_mb",
    "% ceiling": "fraction_of_ceiling",
    "jax/scvi-tools": "ratio_vs_scvi_tools",
}


def summarise(runs: list[dict], ceiling: dict) -> list[dict]:
    """The best repeat per configuration, with its ceiling and scvi-tools ratios."""
    best: dict[tuple, dict] = {}
    for r in runs:
        if "error" in r:
            continue
        s = r["spec"]
        key = (s["framework"], label(s), s["batch_size"])
        if key not in best or r["cells_per_s"] > best[key]["cells_per_s"]:
            best[key] = r
    summary = []
    for (fw, lab, bs), r in best.items():
        model = r["spec"]["model"]
        ref = best.get(("scvi-tools", model, bs)) if fw == "jaxscanvi" else None
        row = {
            "framework": fw,
            "model": lab,
            "batch_size": bs,
            **{k: r[k] for k in SUMMARY_KEYS},
            "ceiling_cells_per_s": ceiling[model],
            "fraction_of_ceiling": r["cells_per_s"] / ceiling[model],
            "ratio_vs_scvi_tools": r["cells_per_s"] / ref["cells_per_s"] if ref else None,
        }
        summary.append(row)
    order = {"jaxscanvi": 0, "scvi-tools": 1}
    summary.sort(
        key=lambda r: (r["batch_size"], r["model"].split("[")[0], order[r["framework"]], r["model"])
    )
    return summary


def print_table(args, summary: list[dict]) -> None:
    rows = [
        [100 * r[k] if k == "fraction_of_ceiling" else r[k] for k in TABLE.values()]
        for r in summary
    ]
    print()
    print(
        f"{args.n_cells} cells x {args.n_genes} genes, train_size {TRAIN_SIZE}, "
        f"{args.epochs} steady epochs after 1 warm-up; cells/s = training cells / s"
    )
    print(format_table(list(TABLE), rows))


def setup(args, p) -> bool:
    """Apply --quick and the default output; whether scvi-tools is compared."""
    if args.quick:
        args.n_cells, args.n_genes = 1500, 200
        args.batch_sizes, args.epochs, args.gemm_n = [128], 2, 1024
    if args.out is None:
        args.out = str(
            DEFAULT_OUT.with_name("train_throughput_quick.json") if args.quick else DEFAULT_OUT
        )
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    if not args.no_scvi_tools and not use_scvi:
        print("scvi-tools (or torch) is not importable: skipping the comparison", file=sys.stderr)
    return use_scvi


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return 0
    use_scvi = setup(args, p)
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "architecture": ARCH,
        "train_size": TRAIN_SIZE,
        "scvi_tools_compared": use_scvi,
        "method": METHOD,
    }
    m = meta["machine"]
    print(
        f"machine: {m['cpu_model']} | cpus usable {m['cpus_usable']} | load "
        f"{m['loadavg_at_start']} | jax {meta['versions']['jax']} {m['jax_devices']}",
        flush=True,
    )
    tmpdir = Path(tempfile.mkdtemp(prefix="jaxscanvi_bench_"))
    data_path = tmpdir / "atlas.h5ad"
    try:
        t = time.perf_counter()
        meta["data"] = make_data(data_path, args.n_cells, args.n_genes, args.label_fraction)
        print(
            f"data: {args.n_cells} cells x {args.n_genes} genes, "
            f"{meta['data']['n_cell_types']} types, {meta['data']['n_batches']} batches "
            f"({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
        meta["ceiling"] = ceiling_part(args, meta["data"])
        runs = run_specs(make_specs(args, use_scvi), data_path, args.timeout)
    finally:
        data_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            tmpdir.rmdir()
    summary = summarise(runs, meta["ceiling"]["cells_per_s"])
    print_table(args, summary)
    n_fail = sum("error" in r for r in runs)
    if n_fail:
        print(f"\n{n_fail} worker(s) failed; see 'runs' in the JSON")
    meta["machine"]["loadavg_at_end"] = loadavg()
    out = write_json(args.out, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())

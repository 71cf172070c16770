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
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from _common import (
    Phases,
    format_table,
    have_scvi_tools,
    loadavg,
    machine_info,
    memory_snapshot,
    versions,
    write_json,
)

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
TRAIN_SIZE = 0.9
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_throughput.json"


# ============================================================== worker side
def _steady_stats(n_train: int, first: float, steady: list[float]) -> dict:
    steady = [float(s) for s in steady]
    total = float(sum(steady))
    med = float(np.median(steady)) if steady else float("nan")
    return {
        "n_train_cells_per_epoch": int(n_train),
        "first_epoch_seconds": float(first),
        "steady_epoch_seconds": steady,
        "steady_epoch_seconds_median": med,
        "steady_epoch_seconds_min": float(min(steady)) if steady else None,
        "steady_epoch_seconds_max": float(max(steady)) if steady else None,
        "cells_per_s": n_train * len(steady) / total if total > 0 else None,
        "cells_per_s_median_epoch": n_train / med if med > 0 else None,
        "first_epoch_overhead_seconds": float(first) - med,
    }


def _worker_jax(spec: dict) -> dict:
    ph = Phases()
    import anndata as ad
    import jax

    from jaxscanvi import SCANVI, SCVI

    ph.mark("import")
    adata = ad.read_h5ad(spec["data"])
    if spec["model"] == "scvi":
        SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
        cls, extra = SCVI, {}
    else:
        SCANVI.setup_anndata(
            adata, labels_key="labels_hidden", unlabeled_category="Unknown", batch_key="batch"
        )
        cls, extra = SCANVI, {"plan_kwargs": {"objective": spec["objective"]}}
    ph.mark("load")
    model = cls(adata, **ARCH, seed=0)
    ph.mark("init")
    kw = dict(
        batch_size=spec["batch_size"],
        train_size=TRAIN_SIZE,
        progress_bar=False,
        seed=0,
        check_val_every_n_epoch=1 if spec.get("validate") else None,
        **extra,
    )
    t = time.perf_counter()
    model.train(max_epochs=1, **kw)
    wall1 = time.perf_counter() - t
    first = float(model.history.to_frame()["epoch_seconds"].iloc[0])
    ph.mark("first_epoch", train_call_seconds=round(wall1, 4))
    t = time.perf_counter()
    model.train(max_epochs=spec["epochs"], **kw)
    wall2 = time.perf_counter() - t
    steady = [float(s) for s in model.history.to_frame()["epoch_seconds"]]
    ph.mark("steady", train_call_seconds=round(wall2, 4))
    finite = bool(np.isfinite(model.history.to_frame()["train_loss"]).all())
    res = _steady_stats(len(model.train_indices), first, steady)
    res.update(
        {
            "phases": ph.records,
            "peak_rss_mb": memory_snapshot()["peak_rss_mb"],
            "final_train_loss": float(model.history.to_frame()["train_loss"].iloc[-1]),
            "loss_finite": finite,
            "rss_growth_training_mb": memory_snapshot()["peak_rss_mb"]
            - ph.records["init"]["rss_mb"],
            "n_labels": int(model.registry.n_labels),
            "jax_devices": [str(d) for d in jax.devices()],
            # the second train() call re-creates its data source outside the epochs
            "train_call_overhead_seconds": wall2 - sum(steady),
        }
    )
    return res


def _worker_scvi_tools(spec: dict) -> dict:
    ph = Phases()
    import logging
    import warnings

    import anndata as ad
    import torch

    warnings.filterwarnings("ignore")
    import scvi
    from lightning.pytorch.callbacks import Callback

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = 0
    torch.set_num_threads(spec["torch_threads"])
    ph.mark("import")

    class EpochTimer(Callback):
        def __init__(self):
            self.train_seconds, self.epoch_seconds, self.mem = [], [], []
            self.t0 = self.last = None

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.train_seconds.append(self.last - self.t0)
            self.epoch_seconds.append(time.perf_counter() - self.t0)
            self.mem.append(memory_snapshot())

    adata = ad.read_h5ad(spec["data"])
    if spec["model"] == "scvi":
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
        cls = scvi.model.SCVI
    else:
        scvi.model.SCANVI.setup_anndata(
            adata, labels_key="labels_hidden", unlabeled_category="Unknown", batch_key="batch"
        )
        cls = scvi.model.SCANVI
    ph.mark("load")
    model = cls(adata, **ARCH)
    ph.mark("init")
    cb = EpochTimer()
    t = time.perf_counter()
    # NB scvi-tools 1.4.2 SCANVI.train drops its SubSampleLabels callback when
    # callbacks= is given; that callback does nothing without n_samples_per_label.
    model.train(
        max_epochs=1 + spec["epochs"],
        batch_size=spec["batch_size"],
        train_size=TRAIN_SIZE,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        enable_model_summary=False,
        check_val_every_n_epoch=1 if spec.get("validate") else None,
    )
    wall = time.perf_counter() - t
    n_train = len(model.train_indices)
    # with validation, the whole epoch (jaxscanvi's epoch_seconds include it too)
    secs = cb.epoch_seconds if spec.get("validate") else cb.train_seconds
    res = _steady_stats(n_train, secs[0], secs[1:])
    ph.records["first_epoch"] = {"seconds": round(cb.epoch_seconds[0], 4), **cb.mem[0]}
    ph.mark("steady", train_call_seconds=round(wall, 4))
    ph.records["steady"]["seconds"] = round(sum(cb.epoch_seconds[1:]), 4)
    hist = model.history
    loss_key = next((k for k in ("train_loss_epoch", "train_loss") if k in hist), None)
    res.update(
        {
            "phases": ph.records,
            "peak_rss_mb": memory_snapshot()["peak_rss_mb"],
            "epoch_seconds_incl_epoch_end_hooks": cb.epoch_seconds,
            "final_train_loss": float(hist[loss_key].iloc[-1, 0]) if loss_key else None,
            "rss_growth_training_mb": memory_snapshot()["peak_rss_mb"]
            - ph.records["init"]["rss_mb"],
            "torch_threads": torch.get_num_threads(),
            "train_call_overhead_seconds": wall - sum(cb.epoch_seconds),
        }
    )
    return res


def worker_main(spec_json: str, out_path: str) -> None:
    spec = json.loads(spec_json)
    fn = _worker_jax if spec["framework"] == "jaxscanvi" else _worker_scvi_tools
    res = {"spec": spec, "loadavg_before": loadavg()}
    res.update(fn(spec))
    res["loadavg_after"] = loadavg()
    Path(out_path).write_text(json.dumps(res))


# ============================================================== parent side
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


def _time_best(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() over repeats calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(min(ts))


def measure_gemm(n: int = 2048, repeats: int = 10, layer_shapes=()) -> dict:
    """float32 GEMM GFLOP/s with numpy (BLAS) and jax (XLA), median and best."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    med, best = _time_best(lambda: a @ b, repeats)
    out = {
        "n": n,
        "numpy_gflops_median": flops / med / 1e9,
        "numpy_gflops_best": flops / best / 1e9,
    }
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    med, best = _time_best(lambda: dot(ja, jb).block_until_ready(), repeats)
    out.update({"jax_gflops_median": flops / med / 1e9, "jax_gflops_best": flops / best / 1e9})
    out["gflops"] = max(out["numpy_gflops_median"], out["jax_gflops_median"])
    shapes = {}
    for m, k, nn in layer_shapes:
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, nn), dtype=np.float32))
        med, _ = _time_best(lambda x=x, w=w: dot(x, w).block_until_ready(), max(repeats, 50))
        shapes[f"{m}x{k}x{nn}"] = 2.0 * m * k * nn / med / 1e9
    out["jax_gflops_layer_shapes"] = shapes
    return out


def flops_per_cell(model: str, G: int, H: int, L: int, n_batch: int, C: int) -> dict:
    """GEMM FLOPs of one training step per training cell (1 hidden layer, ZINB,
    dispersion='gene', observed library size, covariates one-hot into the decoder).

    forward MACs, scVI: encoder G*H + mean/var heads 2*H*L + decoder (L+n_batch)*H
    + px_scale and px_dropout heads 2*H*G. A step (forward + backward) is taken
    as 3 x forward, i.e. FLOPs = 6 x MACs.
    scANVI adds per main cell: classifier on z (L*H + H*C), C classes x
    [encoder z2|z1,y and decoder z1|z2,y: 2*((L+C)*H + 2*H*L)], and for the paired
    labelled cell: encoder G*H + 2*H*L + classifier L*H + H*C.
    """
    scvi_macs = G * H + 2 * H * L + (L + n_batch) * H + 2 * H * G
    if model == "scvi":
        macs = scvi_macs
        formula = "6*(G*H + 2*H*L + (L+n_batch)*H + 2*H*G)"
    else:
        macs = (
            scvi_macs
            + (L * H + H * C)
            + C * 2 * ((L + C) * H + 2 * H * L)
            + (G * H + 2 * H * L + L * H + H * C)
        )
        formula = "6*(scvi_macs + (L*H + H*C) + C*2*((L+C)*H + 2*H*L) + (G*H + 2*H*L + L*H + H*C))"
    return {
        "flops": 6.0 * macs,
        "formula": formula,
        "G": G,
        "H": H,
        "L": L,
        "n_batch": n_batch,
        "C": C,
    }


def run_worker(spec: dict, timeout: float | None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        out = f.name
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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-3000:]
    wall = time.perf_counter() - t
    try:
        if rc != 0:
            return {
                "spec": spec,
                "error": f"worker exit {rc}",
                "log_tail": tail,
                "process_seconds": wall,
            }
        res = json.loads(Path(out).read_text())
        res["process_seconds"] = wall
        return res
    finally:
        Path(out).unlink(missing_ok=True)


def label(spec: dict) -> str:
    if spec["model"] == "scanvi" and spec["framework"] == "jaxscanvi":
        return f"scanvi[{spec['objective']}]"
    return spec["model"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    p.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    )
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per worker process (default: none)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1,500 cells x 200 genes, batch size 128, 2 epochs",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker_main(args.worker, args.worker_out)
        return 0

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

    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "architecture": ARCH,
        "train_size": TRAIN_SIZE,
        "scvi_tools_compared": use_scvi,
        "method": {
            "steady_cells_per_s": "n_train_cells_per_epoch * steady_epochs / "
            "sum(steady epoch seconds); first epoch excluded",
            "jaxscanvi": "train(max_epochs=1) [compiles], then train(max_epochs="
            "epochs) reusing the compiled epoch; history['epoch_seconds']",
            "scvi-tools": "train(max_epochs=1+epochs); Lightning callback, "
            "on_train_epoch_start -> last on_train_batch_end; epoch 0 "
            "excluded",
            "peak_rss": "VmHWM (own high-water mark) of a fresh subprocess per configuration; "
            "phases[*].peak_rss_mb is the peak up to the end of that phase",
        },
    }
    print(
        f"machine: {meta['machine']['cpu_model']} | cpus usable "
        f"{meta['machine']['cpus_usable']} | load {meta['machine']['loadavg_at_start']} "
        f"| jax {meta['versions']['jax']} {meta['machine']['jax_devices']}",
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

        G, H, L = args.n_genes, ARCH["n_hidden"], ARCH["n_latent"]
        gemm = measure_gemm(args.gemm_n, layer_shapes=[(b, G, H) for b in args.batch_sizes])
        fpc = {
            m: flops_per_cell(m, G, H, L, meta["data"]["n_batches"], meta["data"]["n_cell_types"])
            for m in ("scvi", "scanvi")
        }
        ceiling = {m: gemm["gflops"] * 1e9 / fpc[m]["flops"] for m in fpc}
        meta["ceiling"] = {
            "gemm": gemm,
            "flops_per_cell": fpc,
            "cells_per_s": ceiling,
            "note": "GEMM-only upper bound: element-wise work (likelihood, "
            "batch norm, optimizer) is not counted",
        }
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

        specs = []
        for bs in args.batch_sizes:
            for model in args.models:
                objs = args.scanvi_objectives if model == "scanvi" else [None]
                for rep in range(args.repeats):
                    for obj in objs:
                        specs.append(
                            {
                                "framework": "jaxscanvi",
                                "model": model,
                                "objective": obj,
                                "batch_size": bs,
                                "epochs": args.epochs,
                                "repeat": rep,
                                "validate": args.validate,
                            }
                        )
                    if use_scvi:
                        specs.append(
                            {
                                "framework": "scvi-tools",
                                "model": model,
                                "objective": None,
                                "batch_size": bs,
                                "epochs": args.epochs,
                                "repeat": rep,
                                "validate": args.validate,
                                "torch_threads": args.torch_threads,
                            }
                        )
        runs = []
        for i, spec in enumerate(specs):
            spec = dict(spec, data=str(data_path))
            print(
                f"[{i + 1}/{len(specs)}] {spec['framework']} {label(spec)} "
                f"batch_size={spec['batch_size']} repeat={spec['repeat']} ...",
                end=" ",
                flush=True,
            )
            res = run_worker(spec, args.timeout)
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
    finally:
        data_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            tmpdir.rmdir()

    # best repeat per configuration
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
            "first_epoch_seconds": r["first_epoch_seconds"],
            "steady_epoch_seconds_median": r["steady_epoch_seconds_median"],
            "cells_per_s": r["cells_per_s"],
            "cells_per_s_median_epoch": r["cells_per_s_median_epoch"],
            "peak_rss_mb": r["peak_rss_mb"],
            "rss_growth_training_mb": r["rss_growth_training_mb"],
            "ceiling_cells_per_s": ceiling[model],
            "fraction_of_ceiling": r["cells_per_s"] / ceiling[model],
            "ratio_vs_scvi_tools": r["cells_per_s"] / ref["cells_per_s"] if ref else None,
        }
        summary.append(row)
    order = {"jaxscanvi": 0, "scvi-tools": 1}
    summary.sort(
        key=lambda r: (r["batch_size"], r["model"].split("[")[0], order[r["framework"]], r["model"])
    )

    headers = [
        "model",
        "batch",
        "framework",
        "1st epoch s",
        "steady s/ep",
        "cells/s",
        "peak RSS MiB",
        "+RSS train",
        "% ceiling",
        "jax/scvi-tools",
    ]
    rows = [
        [
            r["model"],
            r["batch_size"],
            r["framework"],
            r["first_epoch_seconds"],
            r["steady_epoch_seconds_median"],
            r["cells_per_s"],
            r["peak_rss_mb"],
            r["rss_growth_training_mb"],
            100 * r["fraction_of_ceiling"],
            None if r["ratio_vs_scvi_tools"] is None else r["ratio_vs_scvi_tools"],
        ]
        for r in summary
    ]
    print()
    print(
        f"{args.n_cells} cells x {args.n_genes} genes, train_size {TRAIN_SIZE}, "
        f"{args.epochs} steady epochs after 1 warm-up; cells/s = training cells / s"
    )
    print(format_table(headers, rows))
    n_fail = sum("error" in r for r in runs)
    if n_fail:
        print(f"\n{n_fail} worker(s) failed; see 'runs' in the JSON")
    meta["machine"]["loadavg_at_end"] = loadavg()
    out = write_json(args.out, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())

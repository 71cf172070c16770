"""Differential expression on pbmc3k: top genes, a volcano plot, and DE throughput.

Trains SCVI on ../shared/data/pbmc3k.h5ad (top 2,000 variable genes), runs
change-mode DE of B cells against CD14+ monocytes (printing the top genes and
writing a volcano plot made by ``jaxscanvi.pl.de_volcano``), then times
one-vs-rest DE over all cell types: genes x comparisons per second. Where
scvi-tools is importable it trains the same model for the same epochs and
times the same DE call in the same run.

    python benchmarks/de_throughput.py --out benchmarks/results/de_throughput.json \
        --volcano docs/img/de_volcano_pbmc3k.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbmc3k.h5ad"


def hvg(adata, n_top=2000):
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X)
    lib = np.asarray(X.sum(1)).ravel()
    norm = sp.diags(1e4 / lib) @ X
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    return adata[:, np.sort(np.argsort(-var)[:n_top])].copy()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/de_throughput.json")
    p.add_argument("--volcano", default=None, help="write the volcano PNG here")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=5000)
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument(
        "--quick", "--smoke", dest="quick", action="store_true", help="few epochs, few samples"
    )
    return p


def change_mode(model, a):
    """Change-mode DE of B cells against CD14+ monocytes: the top 10 genes each
    way, and the volcano plot where asked."""
    import jaxscanvi

    res = model.differential_expression(
        groupby="cell_type", group1="B", group2="CD14+ Mono", mode="change", n_samples=a.n_samples
    )
    up = res[res.lfc_mean > 0].head(10)
    down = res[res.lfc_mean < 0].head(10)
    print("B vs CD14+ Mono, change mode: up in B:", ", ".join(up.index))
    print("                             up in CD14+ Mono:", ", ".join(down.index))
    if a.volcano:
        import matplotlib

        matplotlib.use("Agg")
        Path(a.volcano).parent.mkdir(parents=True, exist_ok=True)
        jaxscanvi.pl.de_volcano(res, n_labels=12, save=a.volcano)
        print("volcano plot:", a.volcano)
    return up, down


def compare_scvi_tools(adata, a, n_groups: int, rate: float, out: dict) -> None:
    """The same model and one-vs-rest DE call in scvi-tools, where importable."""
    try:
        import scvi
    except ImportError:
        print("scvi-tools not importable: no comparison")
        return
    import torch

    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    scvi.settings.seed = 0
    b = adata.copy()
    scvi.model.SCVI.setup_anndata(b, layer="counts")
    sm = scvi.model.SCVI(b)
    sm.train(max_epochs=a.epochs, enable_progress_bar=False)
    t = time.perf_counter()
    sr = sm.differential_expression(groupby="cell_type", silent=True, n_samples_overall=a.n_samples)
    s_s = time.perf_counter() - t
    s_rate = adata.n_vars * n_groups / s_s
    out["scvi_tools"] = {
        "version": scvi.__version__,
        "de_seconds": s_s,
        "genes_x_comparisons_per_s": s_rate,
    }
    out["ratio_jax_over_scvi_tools"] = rate / s_rate
    print(
        f"scvi-tools {scvi.__version__}: {s_s:.1f} s = {s_rate:,.0f} genes x "
        f"comparisons / s; ratio {rate / s_rate:.1f}x"
    )
    del sr


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.quick:
        a.epochs, a.n_samples = 5, 500
    if not DATA.exists():
        print(f"{DATA} not found; this benchmark needs ../shared/data. Nothing to do.")
        return 0
    import anndata as ad

    import jaxscanvi
    from jaxscanvi import SCVI

    adata = hvg(ad.read_h5ad(DATA))
    adata.layers["counts"] = adata.X.copy()
    SCVI.setup_anndata(adata, layer="counts")
    model = SCVI(adata)
    t = time.perf_counter()
    model.train(max_epochs=a.epochs, progress_bar=False)
    train_s = time.perf_counter() - t
    up, down = change_mode(model, a)
    n_groups = adata.obs["cell_type"].nunique()
    model.differential_expression(groupby="cell_type", group1="B", n_samples=100)  # compile
    t = time.perf_counter()
    model.differential_expression(groupby="cell_type", n_samples=a.n_samples)
    de_s = time.perf_counter() - t
    rate = adata.n_vars * n_groups / de_s
    out = {
        "dataset": "pbmc3k",
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "epochs": a.epochs,
        "n_samples": a.n_samples,
        "n_comparisons": n_groups,
        "jaxscanvi": {
            "train_seconds": train_s,
            "de_seconds": de_s,
            "genes_x_comparisons_per_s": rate,
            "top_up_B": list(up.index),
            "top_up_CD14_Mono": list(down.index),
        },
        "versions": {"jaxscanvi": jaxscanvi.__version__, "python": sys.version.split()[0]},
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
    }
    print(
        f"jaxscanvi: one-vs-rest DE over {n_groups} types x {adata.n_vars} genes in "
        f"{de_s:.1f} s = {rate:,.0f} genes x comparisons / s"
    )
    if not a.no_scvi_tools:
        compare_scvi_tools(adata, a, n_groups, rate, out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

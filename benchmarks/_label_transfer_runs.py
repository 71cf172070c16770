"""Data and model runs of benchmarks/label_transfer.py: the genes, the hidden
labels, and one seed of jaxscanvi and of scvi-tools (the method is in
label_transfer.py's docstring)."""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
from _common import SCVI_TOOLS_CPU, memory_snapshot, scvi_tools_session, write_json
from _metrics import accuracy, balanced_accuracy, per_class_recall

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
TRAIN_SIZE = 0.9
UNKNOWN = "Unknown"


# ------------------------------------------------------------------- data
def top_variance_genes(X, n_top: int, target_sum: float = 1e4) -> np.ndarray:
    """Indices (in the original gene order) of the n_top genes with the largest
    variance of log1p(counts / cell total * target_sum), over all cells."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64)
    totals = np.asarray(X.sum(1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    Xn = sp.diags(scale) @ X
    Xn.data = np.log1p(Xn.data)
    n = X.shape[0]
    mean = np.asarray(Xn.sum(0)).ravel() / n
    sq = np.asarray(Xn.multiply(Xn).sum(0)).ravel() / n
    var = (sq - mean**2) * n / max(n - 1, 1)
    order = np.argsort(-var, kind="stable")[:n_top]
    return np.sort(order)


def hide_labels(
    labels: np.ndarray, fraction: float, seed: int, min_class_size: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per class, hide round(fraction * n) labels. Returns (new labels, hidden mask, info)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(object)
    hidden = np.zeros(len(labels), bool)
    info = {}
    for c in sorted(set(labels) - {UNKNOWN}):
        idx = np.flatnonzero(labels == c)
        if len(idx) < min_class_size:
            info[c] = {
                "n": len(idx),
                "hidden": 0,
                "note": "small class: all labels kept, not scored",
            }
            continue
        k = round(fraction * len(idx))
        hidden[rng.choice(idx, k, replace=False)] = True
        info[c] = {"n": len(idx), "hidden": k}
    new = labels.copy()
    new[hidden] = UNKNOWN
    return new, hidden, info


def load_data(path: Path, labels_key: str, n_hvg: int, max_cells: int | None = None):
    import anndata as ad

    adata = ad.read_h5ad(path)
    if max_cells is not None and max_cells < adata.n_obs:
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, max_cells, replace=False))
        adata = adata[keep].copy()
    genes = top_variance_genes(adata.X, n_hvg)
    sub = adata[:, genes].copy()
    sub.obs = sub.obs[[labels_key, "batch"]].copy()
    names = list(sub.var_names)
    return sub, {
        "n_cells": int(sub.n_obs),
        "n_genes_total": int(adata.n_vars),
        "n_hvg": len(names),
        "hvg_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
        "hvg_first": names[:10],
        "cell_types": {str(k): int(v) for k, v in adata.obs[labels_key].value_counts().items()},
        "batches": {str(k): int(v) for k, v in adata.obs["batch"].value_counts().items()},
    }


def with_labels(adata, labels: np.ndarray):
    """A copy of adata with obs['labels_hidden']: the classes in sorted order, then Unknown."""
    import pandas as pd

    a = adata.copy()
    cats = [*sorted(set(labels.astype(str)) - {UNKNOWN}), UNKNOWN]
    a.obs["labels_hidden"] = pd.Categorical(labels.astype(str), categories=cats)
    return a


def score(y_true, y_pred) -> dict:
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "per_class_recall": per_class_recall(y_true, y_pred),
        "n_scored": len(y_true),
    }


# ------------------------------------------------------------------ models
def run_jaxscanvi(adata, seed: int, args, truth, hidden) -> list[dict]:
    from jaxscanvi import SCANVI, SCVI

    a = with_labels(adata, args._labels)
    SCVI.setup_anndata(a, batch_key="batch", labels_key="labels_hidden")
    t = time.perf_counter()
    vae = SCVI(a, **ARCH, seed=seed)
    vae.train(
        max_epochs=args.scvi_epochs,
        batch_size=args.batch_size,
        train_size=TRAIN_SIZE,
        seed=seed,
        progress_bar=False,
    )
    t_scvi = time.perf_counter() - t
    out = []
    for obj in args.objectives:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lv = SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        lv.train(
            max_epochs=args.scanvi_epochs,
            batch_size=args.batch_size,
            train_size=TRAIN_SIZE,
            seed=seed,
            progress_bar=False,
            n_samples_per_label=args.n_samples_per_label,
            plan_kwargs={"objective": obj},
        )
        t_scanvi = time.perf_counter() - t
        pred = np.asarray(lv.predict()).astype(str)
        out.append(
            {
                "framework": "jaxscanvi",
                "objective": obj,
                "seed": seed,
                **score(truth[hidden], pred[hidden]),
                "scvi_train_seconds": t_scvi,
                "scanvi_train_seconds": t_scanvi,
                "final_scvi_elbo_train": float(vae.history.to_frame()["elbo_train"].iloc[-1]),
                **memory_snapshot(),
            }
        )
    return out


def run_scvi_tools(adata, seed: int, args, truth, hidden) -> dict:
    scvi, torch = scvi_tools_session(seed, args.torch_threads)
    a = with_labels(adata, args._labels)
    tkw = dict(batch_size=args.batch_size, train_size=TRAIN_SIZE, **SCVI_TOOLS_CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="labels_hidden")
        t = time.perf_counter()
        vae = scvi.model.SCVI(a, **ARCH)
        vae.train(max_epochs=args.scvi_epochs, **tkw)
        t_scvi = time.perf_counter() - t
        t = time.perf_counter()
        lv = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        lv.train(max_epochs=args.scanvi_epochs, n_samples_per_label=args.n_samples_per_label, **tkw)
        t_scanvi = time.perf_counter() - t
        pred = np.asarray(lv.predict()).astype(str)
    elbo = vae.history.get("elbo_train")
    return {
        "framework": "scvi-tools",
        "objective": "scvi-tools",
        "seed": seed,
        **score(truth[hidden], pred[hidden]),
        "scvi_train_seconds": t_scvi,
        "scanvi_train_seconds": t_scanvi,
        "final_scvi_elbo_train": None if elbo is None else float(elbo.iloc[-1, 0]),
        "torch_threads": torch.get_num_threads(),
        **memory_snapshot(),
    }


# ------------------------------------------------------------ resumable
def earlier_runs(args) -> list[dict]:
    """With --resume, the runs already in the output file (or its .partial)."""
    if not args.resume:
        return []
    for path in (Path(args.out), Path(str(args.out) + ".partial")):
        if path.exists():
            import json

            runs = json.loads(path.read_text()).get("runs", [])
            print(f"resuming: {len(runs)} runs from {path}", flush=True)
            return runs
    return []


def seed_done(runs: list[dict], seed: int, use_scvi: bool) -> bool:
    have = {r["framework"] for r in runs if r["seed"] == seed}
    return "jaxscanvi" in have and ("scvi-tools" in have or not use_scvi)


def write_partial(args, runs: list[dict]) -> None:
    kept = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_json(str(args.out) + ".partial", {"args": kept, "runs": runs})

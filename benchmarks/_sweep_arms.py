"""The arms and measures of benchmarks/sweep.py (its docstring describes them):
K sequential ``train()`` calls, one ``sweep.train_many`` of K members, the
XLA operation time of each, and the scANVI ensemble's calibration."""

from __future__ import annotations

import time

import numpy as np

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1)


def sequential(js, adata, k: int, train: dict) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    epochs = 0.0
    for s in range(k):
        m = js.SCVI(adata, seed=s, **ARCH).train(seed=s, **train)
        epochs += float(m.history.to_frame()["epoch_seconds"].sum())
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "epoch_seconds": epochs,
    }


def vmapped(js, adata, k: int, train: dict, order: str, vectorize="auto") -> dict:
    from jaxscanvi import sweep

    t0, c0 = time.perf_counter(), time.process_time()
    out = sweep.train_many(
        lambda s: js.SCVI(adata, seed=s, **ARCH),
        seeds=list(range(k)),
        order=order,
        vectorize=vectorize,
        **train,
    )
    return {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "epoch_seconds": float(out.models[0].history.to_frame()["epoch_seconds"].sum()),
    }


def op_seconds(run) -> float:
    """Thread-seconds of XLA operations while ``run()`` trains (a `jax.profiler`
    trace: every event that names the HLO operation it executed). Two cores
    running two operations at once count twice, so this measures work, not
    wall time."""
    import glob
    import gzip
    import json
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        run()
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return 1e-6 * sum(
        e["dur"] for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
    )


def trace(js, adata, k: int, train: dict) -> dict:
    """XLA operation time of one `train()` run and of a K-member sweep (each
    warmed up first), per member: does a member cost the sweep less work than
    a run of its own?"""
    one = lambda: sequential(js, adata, 1, train)  # noqa: E731
    many = lambda: vmapped(js, adata, k, train, "shared")  # noqa: E731
    one(), many()
    single, swept = op_seconds(one), op_seconds(many)
    return {
        "k": k,
        "op_seconds_single_run": single,
        "op_seconds_sweep": swept,
        "op_seconds_ratio_per_member": swept / (k * single),
    }


def load_counts(js, args):
    """``--adata``'s counts on its ``--n-genes`` most variable genes, or a simulated atlas."""
    if not args.adata:
        return js.synthetic_atlas(n_cells=args.n_cells, n_genes=args.n_genes, seed=0)
    import anndata

    from jaxscanvi.data.hvg import highly_variable_genes

    adata = anndata.read_h5ad(args.adata)
    return adata[:, highly_variable_genes(adata, args.n_genes)].copy()


def ensemble(js, args) -> dict:
    from jaxscanvi import sweep

    if args.adata:  # real counts: the n_genes most variable genes
        import anndata

        from jaxscanvi.data.hvg import highly_variable_genes

        adata = anndata.read_h5ad(args.adata)
        adata = adata[:, highly_variable_genes(adata, args.n_genes)].copy()
    else:
        adata = js.synthetic_atlas(
            n_cells=args.n_cells, n_genes=args.n_genes, seed=1, batch_effect=1.0
        )
    if "batch" not in adata.obs:
        adata.obs["batch"] = "b0"
    truth = adata.obs[args.labels_key].astype(str).to_numpy()
    hidden = np.random.default_rng(0).random(adata.n_obs) < 1 / 3
    adata.obs["labels"] = np.where(hidden, "Unknown", truth)
    js.SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    t0 = time.perf_counter()
    out = sweep.train_many(
        lambda s: js.SCANVI(adata, seed=s, **ARCH),
        seeds=list(range(max(args.ks))),
        max_epochs=args.epochs,
        order="per_model",
        batch_size=args.batch_size,
        progress_bar=False,
    )
    seconds = time.perf_counter() - t0
    idx = np.flatnonzero(hidden)
    scored = adata.copy()  # the hidden cells with their true labels, for scoring
    scored.obs["labels"] = truth
    cal = sweep.ensemble_calibration(out.models, adata=scored[idx].copy())
    ens = sweep.ensemble_predict(out.models, indices=idx)
    wrong = ens.prediction != truth[idx]
    return {
        "k": len(out.models),
        "epochs": args.epochs,
        "train_seconds": seconds,
        "hidden_cells": len(idx),
        **cal,
        "mean_disagreement_correct": float(ens.disagreement[~wrong].mean()),
        "mean_disagreement_wrong": float(ens.disagreement[wrong].mean()) if wrong.any() else None,
    }

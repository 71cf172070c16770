"""The data and the first workers of benchmarks/gpu_check.py (throughput,
kernels, shipped defaults, precision), each run in a process of its own;
gpu_check.py's docstring describes the parts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1)
TRAIN_SIZE = 0.9
KERNEL_NAMES = (
    "prng",
    "linear",
    "batch_norm",
    "relu_dropout",
    "deferred_adam",
    "fused_likelihood",
    "sparse_likelihood",
    "log1p_poly",
)


# ------------------------------------------------------------------ data
def counts(n_cells: int, n_genes: int, density: float = 0.05, seed: int = 0, block: int = 100_000):
    """CSR float32 counts: a random block of ``min(n_cells, block)`` rows, tiled.

    The block is cached under the temporary folder, so the parts of one run
    (separate processes) draw it once.
    """
    import tempfile

    import scipy.sparse as sp

    n0 = min(n_cells, block)
    cache = Path(tempfile.gettempdir()) / f"gpu_check_counts_{n0}_{n_genes}_{seed}.npz"
    if cache.exists():
        base = sp.load_npz(cache).tocsr()
    else:
        base = _random_block(n0, n_genes, density, seed)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.npz")
        sp.save_npz(tmp, base, compressed=False)
        tmp.replace(cache)
    if n_cells == n0:
        return base
    reps, rest = divmod(n_cells, n0)
    nnz = base.indptr[-1]
    head = base.indptr[rest]
    data = np.concatenate([np.tile(base.data, reps), base.data[:head]])
    indices = np.concatenate([np.tile(base.indices, reps), base.indices[:head]])
    offs = (np.arange(reps, dtype=np.int64) * nnz)[:, None]
    indptr = np.concatenate(
        [(base.indptr[:-1][None, :] + offs).ravel(), base.indptr[: rest + 1] + reps * nnz]
    )
    itype = np.int32 if indptr[-1] < 2**31 else np.int64
    return sp.csr_matrix(
        (data, indices.astype(itype), indptr.astype(itype)), shape=(n_cells, n_genes)
    )


def _random_block(n: int, n_genes: int, density: float, seed: int):
    """Each gene non-zero in a gene-specific fraction of cells (5% on average),
    values 1 + Poisson; every cell has at least one count."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rate = np.clip(rng.gamma(0.7, density / 0.7, n_genes), 1e-4, 0.9).astype(np.float32)
    lam = np.maximum(rate * 20, 0.1)
    parts = []
    for lo in range(0, n, 10_000):
        m = min(lo + 10_000, n) - lo
        mask = rng.random((m, n_genes), dtype=np.float32) < rate
        mask[np.arange(m), rng.integers(0, n_genes, m)] = True
        rows, cols = np.nonzero(mask)
        vals = (1 + rng.poisson(lam[cols])).astype(np.float32)
        parts.append(sp.csr_matrix((vals, (rows, cols)), shape=(m, n_genes)))
    return sp.vstack(parts).tocsr()


def anndata_for(n_cells: int, n_genes: int, seed: int = 0):
    import anndata as ad
    import pandas as pd

    X = counts(n_cells, n_genes, seed=seed)
    rng = np.random.default_rng(seed + 1)
    types = np.array([f"type{i}" for i in range(6)])
    ct = types[rng.integers(0, 6, n_cells)]
    hidden = np.where(rng.random(n_cells) < 0.7, "Unknown", ct)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(np.where(rng.random(n_cells) < 0.5, "b0", "b1")),
            "cell_type": pd.Categorical(ct),
            "labels_hidden": pd.Categorical(hidden, categories=[*types, "Unknown"]),
        },
        index=pd.RangeIndex(n_cells).astype(str),
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))


# ---------------------------------------------------------------- workers
def _emit(out: Path, rec: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _record(out: Path, rec: dict, run) -> None:
    """Emit ``rec`` updated with ``run()``; a failure is recorded, and the rest go on."""
    try:
        rec.update(run())
    except Exception as e:  # noqa: BLE001 - a failed part is a result; the others run
        rec["error"] = f"{type(e).__name__}: {e}"[:2000]
    _emit(out, rec)


def _device_memory() -> dict:
    import jax

    try:
        s = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices have none
        s = {}
    return {k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def _jax_model(adata, model: str):
    from jaxscanvi import SCANVI, SCVI

    if model == "scvi":
        SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
        return SCVI(adata, **ARCH, seed=0), {}
    SCANVI.setup_anndata(
        adata, labels_key="labels_hidden", unlabeled_category="Unknown", batch_key="batch"
    )
    return SCANVI(adata, **ARCH, seed=0), {
        "plan_kwargs": {"objective": "scvi-tools"},
        "calibrate": False,
    }


def _jax_run(
    adata,
    model: str,
    batch_size: int,
    epochs: int,
    precision="float32",
    val_elbo: bool = False,
    data_source: str = "device",
) -> dict:
    """Compile with one epoch, then time ``epochs`` more (a second train call)."""
    m, extra = _jax_model(adata, model)
    kw = dict(
        batch_size=batch_size,
        train_size=TRAIN_SIZE,
        progress_bar=False,
        seed=0,
        data_source=data_source,
        precision=precision,
        **extra,
    )
    t = time.perf_counter()
    m.train(max_epochs=1, **kw)
    first_call = time.perf_counter() - t
    first = float(m.history.to_frame()["epoch_seconds"].iloc[0])
    m.train(max_epochs=epochs, **kw)
    steady = [float(s) for s in m.history.to_frame()["epoch_seconds"]]
    n_train = len(m.train_indices)
    rec = {
        "n_train_cells_per_epoch": n_train,
        "first_epoch_seconds": first,
        "first_train_call_seconds": first_call,
        "steady_epoch_seconds": steady,
        "cells_per_s": n_train * len(steady) / sum(steady),
        "final_train_loss": float(m.history.to_frame()["train_loss"].iloc[-1]),
        "loss_finite": bool(np.isfinite(m.history.to_frame()["train_loss"]).all()),
        "device_memory": _device_memory(),
    }
    if val_elbo:
        rec["validation_elbo_float32_eval"] = float(m.get_elbo(indices=m.validation_indices))
    return rec


def _jax_setup(spec):
    import jax

    from jaxscanvi import backend

    return (
        jax,
        backend,
        {
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "default_kernels": backend.defaults().__dict__,
        },
    )


def worker_throughput(spec: dict, out: Path) -> None:
    _, _, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    for model in spec["models"]:
        for bs in spec["batch_sizes"]:
            rec = {"model": model, "batch_size": bs, "n_cells": spec["n_cells"]}
            _record(out, rec, lambda m=model, b=bs: _jax_run(adata.copy(), m, b, spec["epochs"]))


def worker_kernels(spec: dict, out: Path) -> None:
    _, backend, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    lib = backend.Kernels.library()
    configs = [("library", lib), ("all", backend.Kernels.every()), ("default", backend.defaults())]
    configs += [(f"library+{k}", backend.Kernels(**{k: True})) for k in KERNEL_NAMES]
    if spec.get("default_minus"):  # each kernel the backend turns on, turned off alone
        d = backend.defaults().__dict__
        configs += [
            (f"default-{k}", backend.Kernels(**dict(d, **{k: False}))) for k in KERNEL_NAMES if d[k]
        ]
    if spec.get("only"):  # a head-to-head of named configurations
        configs = [c for c in configs if c[0] in spec["only"]]
    configs = configs[: spec.get("max_configs", len(configs))]
    # rounds interleave the configurations, so drift hits each alike; later
    # rounds reuse what the first compiled
    for rnd in range(spec.get("rounds", 1)):
        for name, kern in configs:
            rec = {
                "config": name,
                "round": rnd,
                "kernels": kern.__dict__,
                "batch_size": spec["batch_size"],
                "n_cells": spec["n_cells"],
            }

            def run(kern=kern):
                with backend.use(kern):
                    return _jax_run(adata.copy(), "scvi", spec["batch_size"], spec["epochs"])

            _record(out, rec, run)


def worker_shipped(spec: dict, out: Path) -> None:
    """The kernels this backend ships (`backend.defaults()`, whatever it picks,
    fused likelihood included) measured whole, against the library path, the
    two alternating round by round; scVI and scANVI at each batch size."""
    _, backend, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    arms = [("shipped", backend.defaults()), ("library", backend.Kernels.library())]
    for rnd in range(spec["rounds"]):
        for model in spec["models"]:
            for bs in spec["batch_sizes"]:
                for name, kern in arms[:: (-1) ** rnd]:
                    rec = {
                        "config": name,
                        "round": rnd,
                        "model": model,
                        "batch_size": bs,
                        "kernels": kern.__dict__,
                        "n_cells": spec["n_cells"],
                    }

                    def run(kern=kern, model=model, bs=bs):
                        with backend.use(kern):
                            return _jax_run(adata.copy(), model, bs, spec["epochs"])

                    _record(out, rec, run)


def worker_precision(spec: dict, out: Path) -> None:
    _, _, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    for bs in spec["batch_sizes"]:
        for precision in ("float32", "bfloat16"):
            rec = {
                "precision": precision,
                "batch_size": bs,
                "n_cells": spec["n_cells"],
                "epochs": spec["epochs"],
            }
            _record(
                out,
                rec,
                lambda b=bs, p=precision: _jax_run(
                    adata.copy(), "scvi", b, spec["epochs"], p, val_elbo=True
                ),
            )

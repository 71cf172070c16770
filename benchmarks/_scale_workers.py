"""The data and the workers of benchmarks/scale.py, each run in a fresh process
(the parts are described in scale.py's docstring)."""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
from _common import current_rss_mb, peak_rss_mb


# ------------------------------------------------------------------- data
def synthetic_csr(n_cells: int, n_genes: int, mean_nnz: float, seed: int = 0, chunk: int = 50_000):
    """A CSR of NB-like counts built chunk by chunk into preallocated arrays, so
    building it never holds more than the matrix plus one chunk."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    freq = np.clip(rng.lognormal(0.0, 1.0, n_genes), 0, None)
    freq = np.minimum(freq / freq.mean() * mean_nnz / n_genes, 0.95).astype(np.float32)
    cap = int(n_cells * float(freq.sum()) * 1.05) + n_genes * chunk
    data = np.empty(cap, np.float32)  # pages are only touched as they fill
    indices = np.empty(cap, np.int32)
    indptr = np.zeros(n_cells + 1, np.int64)
    nnz = 0
    for s in range(0, n_cells, chunk):
        e = min(s + chunk, n_cells)
        mask = rng.random((e - s, n_genes), dtype=np.float32) < freq
        r, c = np.nonzero(mask)
        k = len(c)
        if nnz + k > cap:
            raise RuntimeError("synthetic_csr: capacity estimate too small")
        indices[nnz : nnz + k] = c
        data[nnz : nnz + k] = 1.0 + rng.poisson(1.5, k)
        indptr[s + 1 : e + 1] = nnz + np.cumsum(np.bincount(r, minlength=e - s))
        nnz += k
    return sp.csr_matrix((data[:nnz], indices[:nnz], indptr), shape=(n_cells, n_genes))


def csr_bytes(X) -> int:
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


def obs_frame(n: int, n_batch: int, n_types: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed + 1)
    return pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(
                rng.integers(0, n_batch, n), [f"b{i}" for i in range(n_batch)]
            ),
            "cell_type": pd.Categorical.from_codes(
                rng.integers(0, n_types, n), [f"t{i}" for i in range(n_types)]
            ),
        },
        index=pd.RangeIndex(n).astype(str),
    )


class RssSampler:
    """RSS every ``every`` seconds in a thread (for the flat-memory check)."""

    def __init__(self, every: float = 1.0):
        self.samples: list[tuple[float, float]] = []
        self.every, self._stop = every, threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, current_rss_mb()))
            self._stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


# ---------------------------------------------------------------- workers
def worker_memory(n_cells: int, n_genes: int, mean_nnz: float, batch_size: int) -> dict:
    import anndata as ad

    import jaxscanvi as js

    base = current_rss_mb()
    t0 = time.perf_counter()
    X = synthetic_csr(n_cells, n_genes, mean_nnz)
    build_s = time.perf_counter() - t0
    size = csr_bytes(X)
    adata = ad.AnnData(X, obs=obs_frame(n_cells, 4, 10))
    after_data = current_rss_mb()
    js.SCVI.setup_anndata(adata, batch_key="batch")
    model = js.SCVI(adata)
    t0 = time.perf_counter()
    model.train(max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False)
    epoch_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "nnz": int(X.nnz),
        "csr_mb": round(size / 2**20, 1),
        "build_seconds": round(build_s, 1),
        "rss_before_data_mb": round(base, 1),
        "rss_after_data_mb": round(after_data, 1),
        "epoch_seconds_incl_compile": round(epoch_s, 1),
        "cells_per_second": round(n_cells / epoch_s, 1),
        "data_source": "auto",
        "peak_rss_mb": round(peak, 1),
        "peak_rss_over_csr": round(peak / (size / 2**20), 3),
        "train_loss": float(model.history.to_frame()["train_loss"].iloc[-1]),
    }


def write_backed(
    path: Path, n_cells: int, n_genes: int, mean_nnz: float, chunk: int = 250_000
) -> dict:
    """Write an .h5ad chunk by chunk: X appended block by block, obs written once."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    t0 = time.perf_counter()
    obs = obs_frame(n_cells, 4, 10)
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)  # everything but X
    with h5py.File(path, "a") as f:
        for s in range(0, n_cells, chunk):
            block = synthetic_csr(min(chunk, n_cells - s), n_genes, mean_nnz, seed=s)
            if s == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
        f["X"].attrs["shape"] = (n_cells, n_genes)
        nnz = int(f["X"]["indptr"][-1])
    return {
        "write_seconds": round(time.perf_counter() - t0, 1),
        "nnz": nnz,
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }


def _fixed_steps(model, source, rows, warmup: int):
    """Run the model's compiled training step over ``rows`` (n_steps, B) through
    ``source``, as `train` does: ``warmup`` steps first (compiling), then the rest
    timed with RSS sampled each second."""
    import jax
    import jax.numpy as jnp

    from jaxscanvi.model.scvi import _loss
    from jaxscanvi.train.config import TrainConfig
    from jaxscanvi.train.fit import step_fns
    from jaxscanvi.train.state import TrainState

    config = TrainConfig(max_epochs=400)
    task = model._task(config, partial(_loss, model.module, config), ("scvi", model.module))
    tx, step, _ = step_fns(config, task)
    ts = TrainState(
        params=model.params,
        state=model.state,
        opt_state=tx.init(model.params),
        rng=jax.random.PRNGKey(0),
        step=jnp.asarray(0, jnp.int32),
        epoch=jnp.asarray(0, jnp.int32),
    )
    carry = (ts, jnp.asarray(-1, jnp.int32))
    carry, _ = source.run_epoch(step, carry, rows[:warmup])
    jax.block_until_ready(carry)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        carry, terms = source.run_epoch(step, carry, rows[warmup:])
        jax.block_until_ready(carry)
        seconds = time.perf_counter() - t0
    loss = np.asarray(terms[0]["loss"])
    mb = [m for _, m in rss.samples if m is not None]
    return seconds, mb, loss


def worker_stream(path: str, n_steps: int, batch_size: int) -> dict:
    """``n_steps`` steps of a block-shuffled epoch over every cell of the file."""
    import anndata as ad

    import jaxscanvi as js
    from jaxscanvi.train.sources import make_source

    adata = ad.read_h5ad(path, backed="r")
    t0 = time.perf_counter()
    js.SCVI.setup_anndata(adata, batch_key="batch")
    model = js.SCVI(adata)
    cells = model._train_cells()
    setup_s = time.perf_counter() - t0
    source = make_source("auto", cells, batch_size)
    rows = source.order(np.random.default_rng(0), np.arange(cells.n_obs), batch_size)
    warm = 20
    seconds, mb, loss = _fixed_steps(model, source, rows[: warm + n_steps], warm)
    return {
        "n_cells_in_file": int(adata.n_obs),
        "steps": n_steps,
        "source": source.kind,
        "setup_seconds": round(setup_s, 1),
        "seconds": round(seconds, 1),
        "cells_per_second": round(n_steps * batch_size / seconds, 1),
        "blocks_read": len(np.unique(rows[: warm + n_steps] // 8192)),
        "rss_first_mb": round(mb[0], 1),
        "rss_last_mb": round(mb[-1], 1),
        "rss_max_mb": round(max(mb), 1),
        "rss_samples": len(mb),
        "rss_trace_mb": [round(m, 1) for m in mb[:: max(len(mb) // 20, 1)]],
        "loss_first_last": [float(loss[0]), float(loss[-1])],
    }


def worker_in_memory_steps(path: str, n_steps: int, batch_size: int) -> dict:
    """The same number of steps on as many cells of the file, loaded into memory."""
    import anndata as ad

    import jaxscanvi as js
    from jaxscanvi.train.sources import make_source

    backed = ad.read_h5ad(path, backed="r")
    warm = 20
    n = (n_steps + warm) * batch_size
    adata = ad.AnnData(backed.X[:n], obs=backed.obs.iloc[:n].copy(), var=backed.var.copy())
    js.SCVI.setup_anndata(adata, batch_key="batch")
    model = js.SCVI(adata)
    source = make_source("host", model._train_cells(), batch_size)
    rows = source.order(np.random.default_rng(0), np.arange(n), batch_size)
    seconds, mb, _ = _fixed_steps(model, source, rows, warm)
    return {
        "steps": n_steps,
        "seconds": round(seconds, 1),
        "cells_per_second": round(n_steps * batch_size / seconds, 1),
        "data_source": "host",
        "rss_max_mb": round(max(mb), 1),
    }


def worker_classes(n_labels: int, n_cells: int, n_genes: int, batch_size: int) -> dict:
    import anndata as ad

    import jaxscanvi as js

    X = synthetic_csr(n_cells, n_genes, 300)
    obs = obs_frame(n_cells, 2, n_labels)
    labels = obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(n_cells) < 0.5] = "Unknown"
    obs["label"] = labels
    adata = ad.AnnData(X, obs=obs)
    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
    )
    model = js.SCANVI(adata)
    before = peak_rss_mb()
    model.train(
        max_epochs=1, batch_size=batch_size, train_size=1.0, progress_bar=False, calibrate=False
    )
    first = float(model.history.to_frame()["epoch_seconds"].iloc[-1])
    model.train(
        max_epochs=2, batch_size=batch_size, train_size=1.0, progress_bar=False, calibrate=False
    )
    steps = -(-n_cells // batch_size)
    s = float(model.history.to_frame()["epoch_seconds"].iloc[-1])
    return {
        "n_labels": n_labels,
        "n_cells": n_cells,
        "steps_per_epoch": steps,
        "first_epoch_seconds": round(first, 2),
        "epoch_seconds": round(s, 2),
        "step_ms": round(1000 * s / steps, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_training_mb": round(before, 1),
    }


def worker_devices(
    n_devices: int, n_cells: int, n_genes: int, batch_size: int, layout: str = "auto"
) -> dict:
    import anndata as ad
    import jax

    import jaxscanvi as js
    from jaxscanvi.train import sources

    if layout == "csr":  # no train() option for it: the device source's default
        sources.make_source.__kwdefaults__["dense_max_bytes"] = 0
    X = synthetic_csr(n_cells, n_genes, 300)
    adata = ad.AnnData(X, obs=obs_frame(n_cells, 2, 5))
    js.SCVI.setup_anndata(adata, batch_key="batch")
    model = js.SCVI(adata)
    model.train(
        max_epochs=2,
        batch_size=batch_size,
        train_size=1.0,
        progress_bar=False,
        devices=n_devices,
        data_source="device",
    )
    s = float(model.history.to_frame()["epoch_seconds"].iloc[-1])
    return {
        "devices": n_devices,
        "local_devices": jax.local_device_count(),
        "layout": layout,
        "epoch_seconds": round(s, 2),
        "cells_per_second": round(n_cells / s, 1),
        "csr_mb": round(csr_bytes(X) / 2**20, 2),
        "data_mb_per_device": round(model.data_bytes_per_device / 2**20, 2),
    }


WORKERS = {
    "memory": worker_memory,
    "stream": worker_stream,
    "in_memory_steps": worker_in_memory_steps,
    "classes": worker_classes,
    "devices": worker_devices,
}

"""The other workers of benchmarks/gpu_check.py: the million- and ten-million-
cell epochs, scvi-tools, the sweep and the data sources (gpu_check.py's
docstring describes them)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _gpu_workers import (
    ARCH,
    TRAIN_SIZE,
    _device_memory,
    _emit,
    _jax_model,
    _jax_run,
    _jax_setup,
    _record,
    anndata_for,
)


def worker_big(spec: dict, out: Path) -> None:
    """Epochs on a large tiled set (counts on the device as CSR), set-up timed apart;
    with ``flip_sparse``, again with the other likelihood layout."""
    _, backend, env = _jax_setup(spec)
    _emit(out, {"env": env})
    t = time.perf_counter()
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    base = {
        "n_cells": spec["n_cells"],
        "n_genes": spec["n_genes"],
        "nnz": int(adata.X.nnz),
        "csr_bytes": int(adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes),
        "batch_size": spec["batch_size"],
        "data_seconds": time.perf_counter() - t,
    }
    _emit(out, dict(base, stage="data"))
    default = backend.defaults()
    kernels = [default]
    if spec.get("flip_sparse"):
        kernels.append(
            backend.Kernels(
                **dict(default.__dict__, sparse_likelihood=not default.sparse_likelihood)
            )
        )
    for kern in kernels:
        rec = dict(base, sparse_likelihood=kern.sparse_likelihood)
        try:
            with backend.use(kern):
                t = time.perf_counter()
                m, extra = _jax_model(adata, "scvi")
                rec["setup_seconds"] = time.perf_counter() - t
                kw = dict(
                    batch_size=spec["batch_size"],
                    train_size=TRAIN_SIZE,
                    progress_bar=False,
                    seed=0,
                    data_source="device",
                    **extra,
                )
                t = time.perf_counter()
                m.train(max_epochs=spec["epochs"], **kw)
            rec["train_call_seconds"] = time.perf_counter() - t
            rec["epoch_seconds"] = [float(s) for s in m.history.to_frame()["epoch_seconds"]]
            rec["n_train_cells_per_epoch"] = len(m.train_indices)
            rec["cells_per_s_last_epoch"] = len(m.train_indices) / rec["epoch_seconds"][-1]
            rec["loss_finite"] = bool(np.isfinite(m.history.to_frame()["train_loss"]).all())
            rec["device_memory"] = _device_memory()
            del m
        except Exception as e:  # noqa: BLE001 - a failed run is a result
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        _emit(out, rec)


def _epoch_timer(gpu: bool):
    """A Lightning callback: seconds from each epoch's start to its end (CUDA synchronised)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds, self.t0, self.last = [], None, None

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if gpu:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

    return EpochTimer()


def worker_scvi_tools(spec: dict, out: Path) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import scvi
    import torch

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = 0
    gpu = torch.cuda.is_available()
    _emit(
        out,
        {
            "env": {
                "torch": torch.__version__,
                "cuda": gpu,
                "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                "scvi-tools": scvi.__version__,
            }
        },
    )

    base = anndata_for(spec["n_cells"], spec["n_genes"])
    for model in spec["models"]:
        for bs in spec["batch_sizes"]:
            rec = {"model": model, "batch_size": bs, "n_cells": spec["n_cells"]}
            try:
                adata = base.copy()
                if model == "scvi":
                    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
                    m = scvi.model.SCVI(adata, **ARCH)
                else:
                    scvi.model.SCANVI.setup_anndata(
                        adata,
                        labels_key="labels_hidden",
                        unlabeled_category="Unknown",
                        batch_key="batch",
                    )
                    m = scvi.model.SCANVI(adata, **ARCH)
                cb = _epoch_timer(gpu)
                m.train(
                    max_epochs=1 + spec["epochs"],
                    batch_size=bs,
                    train_size=TRAIN_SIZE,
                    enable_progress_bar=False,
                    accelerator="gpu" if gpu else "cpu",
                    devices=1,
                    callbacks=[cb],
                    enable_model_summary=False,
                )
                n_train = len(m.train_indices)
                steady = cb.seconds[1:]
                rec.update(
                    {
                        "n_train_cells_per_epoch": n_train,
                        "first_epoch_seconds": cb.seconds[0],
                        "steady_epoch_seconds": steady,
                        "cells_per_s": n_train * len(steady) / sum(steady),
                    }
                )
            except Exception as e:  # noqa: BLE001 - a failed run is a result
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            _emit(out, rec)


def worker_sweep(spec: dict, out: Path) -> None:
    """K models vmapped vs K sequential runs, each arm warmed up (compiled) first."""
    from _sweep_arms import sequential, vmapped  # benchmarks/sweep.py's arms

    import jaxscanvi as js

    _, _, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    js.SCVI.setup_anndata(adata, batch_key="batch")
    k = spec["k"]
    train = dict(
        max_epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        progress_bar=False,
        devices=1,
        data_source="device",
    )
    warm = {**train, "max_epochs": 1}
    _record(
        out,
        {"stage": "warm-up"},
        lambda: {
            "sequential": sequential(js, adata, 1, warm),
            "vmapped": vmapped(js, adata, k, warm, "shared"),
        },
    )
    for r in range(spec["repeats"]):
        arms = ["sequential", "vmapped"][:: (-1) ** r]
        rec = {
            "k": k,
            "repeat": r,
            "batch_size": spec["batch_size"],
            "n_cells": spec["n_cells"],
            "epochs": spec["epochs"],
        }

        def run(arms=arms):
            res = {
                a: sequential(js, adata, k, train)
                if a == "sequential"
                else vmapped(js, adata, k, train, "shared")
                for a in arms
            }
            res["ratio_seconds"] = res["vmapped"]["seconds"] / res["sequential"]["seconds"]
            res["ratio_epoch_seconds"] = (
                res["vmapped"]["epoch_seconds"] / res["sequential"]["epoch_seconds"]
            )
            res["device_memory"] = _device_memory()
            return res

        _record(out, rec, run)


def worker_sources(spec: dict, out: Path) -> None:
    """scVI through the device, host and stream sources (a local .h5ad) in
    alternating rounds: host and stream cells/s against resident data."""
    import anndata as ad

    _, _, env = _jax_setup(spec)
    _emit(out, {"env": env})
    adata = anndata_for(spec["n_cells"], spec["n_genes"])
    path = out.parent / "sources.h5ad"
    adata.write_h5ad(path)
    for r in range(spec["rounds"]):
        for source in ("device", "host", "stream"):
            rec = {
                "source": source,
                "round": r,
                "batch_size": spec["batch_size"],
                "n_cells": spec["n_cells"],
            }
            data = (lambda: ad.read_h5ad(path, backed="r")) if source == "stream" else adata.copy
            _record(
                out,
                rec,
                lambda s=source, d=data: _jax_run(
                    d(), "scvi", spec["batch_size"], spec["epochs"], data_source=s
                ),
            )

"""The workers of benchmarks/train_throughput.py: one configuration (library x
model x batch size) trained in a process of its own, its epochs timed and its
memory recorded at the end of each phase. The method is described in
train_throughput.py's docstring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _common import Phases, loadavg, memory_snapshot

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
TRAIN_SIZE = 0.9


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


def epoch_timer():
    """A Lightning callback timing each epoch: ``train_seconds`` from
    ``on_train_epoch_start`` to the last ``on_train_batch_end``, ``epoch_seconds``
    to ``on_train_epoch_end``, and memory at each epoch's end."""
    from lightning.pytorch.callbacks import Callback

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

    return EpochTimer()


def _worker_scvi_tools(spec: dict) -> dict:
    ph = Phases()
    import logging
    import warnings

    import anndata as ad
    import torch

    warnings.filterwarnings("ignore")
    import scvi

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = 0
    torch.set_num_threads(spec["torch_threads"])
    ph.mark("import")

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
    cb = epoch_timer()
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

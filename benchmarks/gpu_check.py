"""The GPU benchmark: jaxscanvi against scvi-tools on one accelerator, in one run.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu      # on a GPU ($OUT if set)
    bash benchmarks/gpu_check.sh --profile   # the step profile instead (gpu_profile.py)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke      # anywhere, tiny
    python benchmarks/gpu_check.py --cpu     # the kernel ablation on a CPU (kernels_cpu.json)

Parts, in order of value, each in its own subprocess with its own time
limit, so a failure or a timeout in one still leaves the others (every
result is written to the JSON as soon as it exists):

1. ``throughput``: SCVI and SCANVI (70% of cells unlabelled) cells/s at
   batch sizes 128, 1024 and 4096 on 100k cells x 2,000 genes, the
   backend's default kernels, float32.
1b. ``shipped``: the kernels the package ships on this backend
   (``backend.defaults()``) as one configuration against the library
   path, alternating, scVI and scANVI at batch 128 and 1024: the figure
   ``backend.py`` cites for its GPU default.
2. ``scvi_tools``: scvi-tools on the same data and device, for the ratio.
3. ``epoch_1m``: one epoch of 1M cells x 2,000 genes (5% non-zero) at
   batch 1024, counts resident on the device as CSR.
4. ``kernels``: SCVI at batch 128 with each hand-written kernel
   (`jaxscanvi.backend`) on alone over the library path, every kernel on,
   and the library path with the list-of-non-zeros likelihood.
5. ``precision``: float32 vs bfloat16 cells/s at batch 1024 and 4096, and
   the validation ELBO after the same training in each.
6. ``atlas_10m``: 10M cells x 2,000 genes (5% non-zero) as sparse counts
   on the device, one training epoch at batch 4096.
7. ``sweep``: 16 SCVI models at batch 128 trained as one vmapped program
   (`jaxscanvi.sweep.train_many`) against 16 sequential ``train()`` calls,
   the arms alternating (benchmarks/sweep.py's).

Data: 100k cells of random counts (each gene non-zero in 5% of cells on
average, with a per-gene rate; values 1 + Poisson), 2 batches, 6 labels;
larger sets tile that block. cells/s = training cells per epoch x steady
epochs / their seconds; the first epoch (compilation) is reported apart.
The parent writes ``gpu_check.json`` under ``--out`` after every part and
prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import format_table, machine_info, versions, write_json

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


def worker_scvi_tools(spec: dict, out: Path) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

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
                cb = EpochTimer()
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
    from sweep import sequential, vmapped  # benchmarks/sweep.py

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


WORKERS = {
    "throughput": worker_throughput,
    "shipped": worker_shipped,
    "scvi_tools": worker_scvi_tools,
    "epoch_1m": worker_big,
    "kernels": worker_kernels,
    "precision": worker_precision,
    "atlas_10m": worker_big,
    "sweep": worker_sweep,
    "sources": worker_sources,
}


# ----------------------------------------------------------------- parent
def plan(smoke: bool) -> list[tuple[str, dict, float]]:
    """(part, spec, time limit in seconds) in the order they run."""
    G = 2000
    if smoke:
        s = dict(n_cells=600, n_genes=100)
        return [
            ("throughput", dict(s, models=["scvi", "scanvi"], batch_sizes=[128], epochs=2), 300),
            (
                "shipped",
                dict(s, models=["scvi", "scanvi"], batch_sizes=[128], epochs=1, rounds=1),
                300,
            ),
            ("scvi_tools", dict(s, models=["scvi"], batch_sizes=[128], epochs=1), 300),
            (
                "epoch_1m",
                dict(n_cells=2000, n_genes=100, batch_size=256, epochs=2, flip_sparse=True),
                200,
            ),
            ("kernels", dict(s, batch_size=128, epochs=1, rounds=2, max_configs=4), 600),
            ("precision", dict(s, batch_sizes=[256], epochs=2), 300),
            ("atlas_10m", dict(n_cells=4000, n_genes=100, batch_size=512, epochs=1), 200),
            ("sweep", dict(s, k=2, batch_size=128, epochs=1, repeats=1), 300),
            ("sources", dict(s, batch_size=128, epochs=2, rounds=1), 300),
        ]
    return [
        (
            "throughput",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024, 4096],
                epochs=2,
            ),
            150,
        ),
        (
            "shipped",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024],
                epochs=3,
                rounds=2,
            ),
            200,
        ),
        (
            "scvi_tools",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024],
                epochs=1,
            ),
            120,
        ),
        (
            "epoch_1m",
            dict(n_cells=1_000_000, n_genes=G, batch_size=1024, epochs=2, flip_sparse=True),
            100,
        ),
        ("kernels", dict(n_cells=100_000, n_genes=G, batch_size=128, epochs=2, rounds=2), 120),
        ("precision", dict(n_cells=100_000, n_genes=G, batch_sizes=[1024, 4096], epochs=3), 75),
        ("atlas_10m", dict(n_cells=10_000_000, n_genes=G, batch_size=4096, epochs=1), 200),
        ("sweep", dict(n_cells=20_000, n_genes=G, k=16, batch_size=128, epochs=2, repeats=2), 150),
        ("sources", dict(n_cells=100_000, n_genes=G, batch_size=1024, epochs=3, rounds=2), 150),
    ]


def plan_cpu() -> list[tuple[str, dict, float]]:
    """The kernel ablation at a size a 2-core CPU measures in minutes."""
    # an epoch takes about 1 s here: 6 timed epochs x 3 interleaved rounds keep
    # the spread between rounds near the few-percent effects being measured
    return [
        (
            "kernels",
            dict(
                n_cells=20_000, n_genes=2000, batch_size=128, epochs=6, rounds=3, default_minus=True
            ),
            3000,
        )
    ]


def run_part(part: str, spec: dict, limit: float, tmp: Path) -> dict:
    out = tmp / f"{part}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        part,
        "--spec",
        json.dumps(spec),
        "--worker-out",
        str(out),
    ]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status, tail = (
            ("ok" if p.returncode == 0 else f"exit {p.returncode}"),
            (p.stdout + p.stderr)[-3000:],
        )
    except subprocess.TimeoutExpired as e:
        out_text = (e.stdout or b"") + (e.stderr or b"")
        if isinstance(out_text, bytes):
            out_text = out_text.decode(errors="replace")
        status, tail = f"timeout after {limit:.0f} s", out_text[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    env = next((r["env"] for r in recs if "env" in r), None)
    return {
        "spec": spec,
        "status": status,
        "seconds": time.perf_counter() - t,
        "env": env,
        "results": [r for r in recs if "env" not in r],
        "log_tail": tail if status != "ok" else None,
    }


def summary(parts: dict) -> list[list]:
    rows = []
    ref = {
        (r["model"], r["batch_size"]): r.get("cells_per_s")
        for r in parts.get("scvi_tools", {}).get("results", [])
    }
    for r in parts.get("throughput", {}).get("results", []):
        c, s = r.get("cells_per_s"), ref.get((r["model"], r["batch_size"]))
        rows.append(
            [
                f"{r['model']} b{r['batch_size']}",
                c,
                s,
                c / s if c and s else None,
                r.get("first_epoch_seconds"),
                r.get("error", "")[:40],
            ]
        )
    for name in ("epoch_1m", "atlas_10m"):
        for r in parts.get(name, {}).get("results", []):
            if "stage" in r:
                continue
            e = r.get("epoch_seconds") or [None]
            lay = "sparse" if r.get("sparse_likelihood") else "dense"
            rows.append(
                [
                    f"{name} b{r['batch_size']} {lay} (epoch s)",
                    r.get("cells_per_s_last_epoch"),
                    None,
                    None,
                    e[-1],
                    r.get("error", "")[:40],
                ]
            )
    for r in parts.get("shipped", {}).get("results", []):
        rows.append(
            [
                f"{r['config']} {r['model']} b{r['batch_size']} ({r['round']})",
                r.get("cells_per_s"),
                None,
                None,
                r.get("first_epoch_seconds"),
                r.get("error", "")[:40],
            ]
        )
    for r in parts.get("kernels", {}).get("results", []):
        rows.append(
            [
                f"kernels {r['config']} ({r.get('round', 0)})",
                r.get("cells_per_s"),
                None,
                None,
                r.get("first_epoch_seconds"),
                r.get("error", "")[:40],
            ]
        )
    for r in parts.get("sweep", {}).get("results", []):
        if "stage" in r:
            continue
        rows.append(
            [
                f"sweep K={r['k']} b{r['batch_size']} ({r['repeat']}): vmapped / sequential s",
                None,
                None,
                r.get("ratio_seconds"),
                None,
                r.get("error", "")[:40],
            ]
        )
    res = parts.get("sources", {}).get("results", [])
    resident = [r.get("cells_per_s") for r in res if r.get("source") == "device"]
    for r in res:
        c, base = r.get("cells_per_s"), (resident or [None])[0]
        rows.append(
            [
                f"source {r['source']} b{r['batch_size']} ({r['round']})",
                c,
                None,
                c / base if c and base else None,
                r.get("first_epoch_seconds"),
                r.get("error", "")[:40],
            ]
        )
    for r in parts.get("precision", {}).get("results", []):
        rows.append(
            [
                f"{r['precision']} b{r['batch_size']} (val elbo "
                f"{r.get('validation_elbo_float32_eval', float('nan')):.2f})",
                r.get("cells_per_s"),
                None,
                None,
                r.get("first_epoch_seconds"),
                r.get("error", "")[:40],
            ]
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="the kernel ablation sized for a CPU; writes kernels_cpu.json",
    )
    p.add_argument(
        "--out", default=None, help="folder for the JSON (results/gpu, or results with --cpu)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all parts; a part that would overrun is cut short",
    )
    p.add_argument("--parts", nargs="+", choices=list(WORKERS), default=None)
    p.add_argument("--worker")
    p.add_argument("--spec")
    p.add_argument("--worker-out")
    args = p.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec), Path(args.worker_out))
        return 0
    if args.budget is None:
        args.budget = 3600.0 if args.cpu else 450.0
    out_dir = Path(
        args.out
        or (not args.cpu and os.environ.get("OUT"))
        or HERE / "results" / ("" if args.cpu else "gpu")
    )
    tmp = out_dir / "parts"
    tmp.mkdir(parents=True, exist_ok=True)
    name = (
        "gpu_check_smoke.json"
        if args.smoke
        else "kernels_cpu.json"
        if args.cpu
        else "gpu_check.json"
    )
    doc = {
        "benchmark": "gpu_check",
        "smoke": args.smoke,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "machine": machine_info(with_jax=False),
        "nvidia_smi": _nvidia_smi(),
        "parts": {},
    }
    t0 = time.perf_counter()
    for part, spec, limit in plan_cpu() if args.cpu else plan(args.smoke):
        if args.parts and part not in args.parts:
            continue
        left = args.budget - (time.perf_counter() - t0)
        if left < 20:
            doc["parts"][part] = {"spec": spec, "status": "skipped: budget spent"}
            continue
        print(
            f"[{time.perf_counter() - t0:6.1f} s] {part} (limit {min(limit, left):.0f} s)",
            flush=True,
        )
        doc["parts"][part] = run_part(part, spec, min(limit, left), tmp)
        print(
            f"           {doc['parts'][part]['status']}, {doc['parts'][part]['seconds']:.1f} s",
            flush=True,
        )
        doc["total_seconds"] = time.perf_counter() - t0
        write_json(out_dir / name, doc)
    doc["total_seconds"] = time.perf_counter() - t0
    write_json(out_dir / name, doc)
    print(
        format_table(
            ["run", "jax cells/s", "scvi-tools cells/s", "ratio", "first epoch s", "error"],
            summary(doc["parts"]),
        )
    )
    print(f"wrote {out_dir / name} ({doc['total_seconds']:.0f} s)")
    return 0


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())

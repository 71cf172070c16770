"""The workers of benchmarks/end_to_end.py: the user's script, as jaxscanvi and
as scvi-tools run it, each in a fresh process and timed from before its first
import; ``jaxscanvi demo`` with its compile seconds; and the data both read.

Nothing here imports JAX, jaxscanvi, scvi-tools or torch at module level: the
scvi-tools worker runs under another Python (one with scvi-tools and torch).
The method is in end_to_end.py's docstring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _common import loadavg, memory_snapshot, usable_cores, versions

PHASES = (
    "import",
    "read",
    "scvi_init",
    "scvi_first_epoch",
    "scvi_train",
    "scanvi_init",
    "scanvi_train",
    "predict",
)


class Clock:
    """Seconds (and, given a `ProgramLog`, compile seconds) of consecutive phases
    from ``t0``, the time taken before the script's first import."""

    def __init__(self, t0: float, log=None):
        self.t0 = self.last = t0
        self.log = log
        self.snap = log.snapshot() if log is not None else None
        self.phases: dict[str, dict] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        rec: dict = {"seconds": now - self.last}
        if self.log is not None:
            snap = self.log.snapshot()
            rec.update({k: snap[k] - self.snap[k] for k in snap})
            rec["compile_s"] = rec["trace_s"] + rec["lower_s"] + rec["backend_s"]
            self.snap = snap
        self.phases[name] = rec
        self.last = now

    def result(self) -> dict:
        out = {"phases": self.phases, "total_s": self.last - self.t0, **memory_snapshot()}
        if self.log is not None:
            tot = self.log.snapshot()
            tot["compile_s"] = tot["trace_s"] + tot["lower_s"] + tot["backend_s"]
            out["compile"] = tot
        return out


def _accuracy(adata, pred) -> float:
    """Accuracy of the predictions on the cells whose labels were hidden."""
    import numpy as np

    hidden = (adata.obs["labels"].astype(str) == "Unknown").to_numpy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    return float((np.asarray(pred).astype(str)[hidden] == truth[hidden]).mean())


def jaxscanvi_arm(spec: dict) -> dict:
    """The user's script with ``import jaxscanvi as scvi``."""
    t0 = time.perf_counter()
    import jax
    from _programs import ProgramLog

    log = ProgramLog().start()  # jaxscanvi imports JAX first anyway
    import anndata as ad

    import jaxscanvi as scvi

    clock = Clock(t0, log)
    clock.mark("import")
    kw = dict(batch_size=spec["batch_size"], progress_bar=False)
    scvi.settings.seed = 0
    pred = _script(scvi, ad, clock, spec, kw)
    out = clock.result()
    out.update(
        cache_dir=jax.config.jax_compilation_cache_dir,
        jaxscanvi_file=scvi.__file__,
        jax_devices=[str(d) for d in jax.devices()],
        predicted_accuracy_hidden=pred,
    )
    return out


def scvi_tools_arm(spec: dict) -> dict:
    """The user's script with ``import scvi`` (scvi-tools), on the CPU, quiet."""
    t0 = time.perf_counter()
    import logging

    import anndata as ad
    import scvi
    import torch

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(spec["torch_threads"])
    clock = Clock(t0)
    clock.mark("import")
    kw = dict(
        batch_size=spec["batch_size"],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    scvi.settings.seed = 0
    pred = _script(scvi, ad, clock, spec, kw)
    out = clock.result()
    out.update(
        torch_threads=torch.get_num_threads(),
        versions=versions(),
        predicted_accuracy_hidden=pred,
    )
    return out


def _script(scvi, ad, clock: Clock, spec: dict, kw: dict) -> float:
    """What both users run after the import, line for line; the accuracy of
    the scANVI predictions on the cells whose labels were hidden."""
    import warnings

    warnings.simplefilter("ignore")
    adata = ad.read_h5ad(spec["data"])
    clock.mark("read")
    scvi.model.SCVI.setup_anndata(adata, labels_key="labels")
    model = scvi.model.SCVI(adata)
    clock.mark("scvi_init")
    model.train(max_epochs=1, **kw)
    clock.mark("scvi_first_epoch")
    model.train(max_epochs=spec["scvi_epochs"], **kw)  # continues the same model
    clock.mark("scvi_train")
    lvae = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category="Unknown")
    clock.mark("scanvi_init")
    lvae.train(max_epochs=spec["scanvi_epochs"], **kw)
    clock.mark("scanvi_train")
    pred = lvae.predict()
    clock.mark("predict")
    return _accuracy(adata, pred)


def demo_arm(spec: dict) -> dict:
    """``jaxscanvi demo`` (its command line's ``main``), its JAX compile events
    counted, timed from before ``import jax``."""
    t0 = time.perf_counter()
    import jax
    from _programs import ProgramLog

    log = ProgramLog().start()
    from jaxscanvi.cli import main

    rc = main(["demo", "--out", spec["out"], "--quiet", *spec["demo_args"]])
    if rc:
        raise SystemExit(f"jaxscanvi demo exited {rc}")
    wall = time.perf_counter() - t0
    snap = log.snapshot()
    snap["compile_s"] = snap["trace_s"] + snap["lower_s"] + snap["backend_s"]
    return {
        "rc": rc,
        "total_s": wall,
        "compile": snap,
        "compile_share": snap["compile_s"] / wall,
        "cache_dir": jax.config.jax_compilation_cache_dir,
        "programs_by_name": log.by_name(),
        **memory_snapshot(),
    }


ARMS = {"jaxscanvi": jaxscanvi_arm, "scvi-tools": scvi_tools_arm, "demo": demo_arm}


def worker_main(spec_json: str, out_path: str) -> None:
    spec = json.loads(spec_json)
    res = {"loadavg_before": loadavg(), "cpus_usable": usable_cores()}
    res.update(ARMS[spec["arm"]](spec))
    res["loadavg_after"] = loadavg()
    Path(out_path).write_text(json.dumps(res))


def make_data(
    src: Path | None, dest: Path, n_cells: int | None, n_genes: int, hidden: float
) -> dict:
    """``n_cells`` cells of ``src`` (all where None; a synthetic atlas where ``src``
    is None), its ``n_genes`` most variable genes (seurat_v3 on the counts,
    scanpy's rule, `jaxscanvi.data.hvg`), and ``obs["labels"]``: ``cell_type``
    with a ``hidden`` fraction of cells (seed 0) set to ``"Unknown"``."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from jaxscanvi.data.hvg import highly_variable_genes

    rng = np.random.default_rng(0)
    if src is None:
        from jaxscanvi.data.synthetic import synthetic_atlas

        adata = synthetic_atlas(n_cells=n_cells or 400, n_genes=max(n_genes, 200), seed=0)
        adata.layers.pop("counts", None)
        adata.uns.pop("synthetic", None)
    else:
        adata = ad.read_h5ad(src)
    known = (adata.obs["cell_type"].astype(str) != "Unknown").to_numpy()
    adata = adata[known].copy()  # unknown types cannot score a prediction
    if n_cells is not None and n_cells < adata.n_obs:
        adata = adata[np.sort(rng.choice(adata.n_obs, n_cells, replace=False))].copy()
    adata = adata[:, highly_variable_genes(adata, n_top_genes=n_genes, flavor="seurat_v3")].copy()
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    hide = rng.random(adata.n_obs) < hidden
    cats = [*sorted(set(ct)), "Unknown"]
    adata.obs["labels"] = pd.Categorical(np.where(hide, "Unknown", ct), categories=cats)
    adata.obs = adata.obs[["cell_type", "labels"]]
    adata.write_h5ad(dest)
    return {
        "source": str(src) if src is not None else "jaxscanvi.synthetic_atlas(seed=0)",
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_cell_types": len(cats) - 1,
        "hidden_fraction": float(hide.mean()),
        "hvg": "jaxscanvi.data.hvg.highly_variable_genes(flavor='seurat_v3') on the counts "
        "of the kept cells (scanpy's rule), chosen once; both libraries read the same file",
    }

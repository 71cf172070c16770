"""The data and the worker of benchmarks/first_epoch.py: the whole workflow in
one fresh process, each phase timed with its compile time and programs (the
method is in first_epoch.py's docstring)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from _common import loadavg
from _programs import ProgramLog

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
PHASES = (
    "import",
    "scvi_init",
    "scvi_train",
    "scvi_latent",
    "scanvi_init",
    "scanvi_train",
    "scanvi_predict",
    "scvi_query_init",
    "scvi_query_train",
    "scanvi_query_init",
    "scanvi_query_train",
    "scanvi_query_predict",
)
TWICE = (
    "scvi_train",
    "scvi_latent",
    "scanvi_train",
    "scanvi_predict",
    "scvi_query_train",
    "scanvi_query_train",
    "scanvi_query_predict",
)


def _delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in after}
    d["compile_s"] = d["trace_s"] + d["lower_s"] + d["backend_s"]
    return d


def _worker(spec: dict) -> dict:
    t_start = time.perf_counter()
    import jax

    log = ProgramLog().start()
    import warnings

    import anndata as ad

    import jaxscanvi
    from jaxscanvi import SCANVI, SCVI

    warnings.simplefilter("ignore")
    out: dict = {"cache_dir": jax.config.jax_compilation_cache_dir, "phases": {}}
    state = {"t": t_start, "c": log.snapshot(), "n": 0}

    def mark(name, **extra):
        now, snap = time.perf_counter(), log.snapshot()
        progs = [f"{n} {s:.3f}" for n, s in log.programs[state["n"] :]]
        out["phases"][name] = {
            "seconds": now - state["t"],
            **_delta(snap, state["c"]),
            "programs": progs,
            **extra,
        }
        state["t"], state["c"], state["n"] = now, snap, len(log.programs)

    mark("import", jaxscanvi_file=jaxscanvi.__file__)
    ref = ad.read_h5ad(spec["ref"])
    query = ad.read_h5ad(spec["query"])
    state["t"], state["c"] = time.perf_counter(), log.snapshot()  # loading is not compiling
    state["n"] = len(log.programs)
    kw = dict(batch_size=spec["batch_size"], progress_bar=False, seed=0)

    def twice(name, fn):
        for i in (1, 2):
            fn()
            mark(f"{name}#{i}")

    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    vae = SCVI(ref, **ARCH, seed=0)
    mark("scvi_init")
    twice("scvi_train", lambda: vae.train(max_epochs=1, **kw))
    twice("scvi_latent", lambda: vae.get_latent_representation())
    lv = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    mark("scanvi_init")
    twice("scanvi_train", lambda: lv.train(max_epochs=1, **kw))
    twice("scanvi_predict", lambda: lv.predict())
    q_scvi = query.copy()
    SCVI.prepare_query_anndata(q_scvi, vae)
    qv = SCVI.load_query_data(q_scvi, vae)
    mark("scvi_query_init")
    qkw = dict(kw, plan_kwargs={"weight_decay": 0.0})
    twice("scvi_query_train", lambda: qv.train(max_epochs=1, **qkw))
    q_scanvi = query.copy()
    SCANVI.prepare_query_anndata(q_scanvi, lv)
    ql = SCANVI.load_query_data(q_scanvi, lv)
    mark("scanvi_query_init")
    twice("scanvi_query_train", lambda: ql.train(max_epochs=1, **qkw))
    twice("scanvi_query_predict", lambda: ql.predict())
    out["total"] = {
        "seconds": time.perf_counter() - t_start,
        **_delta(log.snapshot(), ProgramLog().snapshot()),
        "programs_by_name": log.by_name(),
    }
    out["jax_devices"] = [str(d) for d in jax.devices()]
    return out


def worker_main(spec_json: str, out_path: str) -> None:
    spec = json.loads(spec_json)
    res = {"loadavg_before": loadavg()}
    res.update(_worker(spec))
    res["loadavg_after"] = loadavg()
    Path(out_path).write_text(json.dumps(res))


def make_data(
    folder: Path, n_ref: int, n_query: int, n_genes: int, label_fraction: float, seed: int = 0
) -> dict:
    """A 3-batch synthetic atlas: batches 0-1 the reference (part labelled), batch 2
    the query (unlabelled), written as two .h5ad files."""
    import numpy as np
    import pandas as pd

    from jaxscanvi.data.synthetic import synthetic_atlas

    n = n_ref + n_query
    adata = synthetic_atlas(n_cells=n, n_genes=n_genes, n_batches=3, seed=seed)
    adata.layers.pop("counts", None)
    adata.uns.pop("synthetic", None)
    rng = np.random.default_rng(seed)
    batch = adata.obs["batch"].astype(str).to_numpy()
    is_query = batch == sorted(set(batch))[-1]
    ct = adata.obs["cell_type"].astype(str).to_numpy()
    hidden = is_query | (rng.random(n) >= label_fraction)
    cats = [*list(adata.obs["cell_type"].cat.categories), "Unknown"]
    adata.obs["labels"] = pd.Categorical(np.where(hidden, "Unknown", ct), categories=cats)
    ref, query = adata[~is_query].copy(), adata[is_query].copy()
    ref.write_h5ad(folder / "ref.h5ad")
    query.write_h5ad(folder / "query.h5ad")
    return {
        "n_ref": int(ref.n_obs),
        "n_query": int(query.n_obs),
        "n_genes": n_genes,
        "n_cell_types": int(adata.obs["cell_type"].nunique()),
        "labelled_fraction_ref": float((ref.obs["labels"] != "Unknown").mean()),
        "generator": f"jaxscanvi.synthetic_atlas(n_cells={n}, n_genes={n_genes}, "
        f"n_batches=3, seed={seed}); the last batch is the query",
    }

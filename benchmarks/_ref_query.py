"""The reference-to-query setting of label_transfer.py (``--reference-to-query``).

Reference: the pbmc3k_v1 batch of pbmc_3k_4k.h5ad with its labels (source
"Unknown" cells stay unlabelled; Platelets, 14 cells, are dropped). Query:
the pbmc4k_v2 batch, every label hidden. Genes: the top ``--n-hvg`` by
log-normalised variance on the reference alone; the query is aligned to them
with ``prepare_query_anndata``. Both libraries: scVI ``--scvi-epochs``,
scANVI ``--scanvi-epochs`` on the reference, then ``load_query_data`` with
the default freezing and ``--query-epochs`` of query training with
``weight_decay=0`` (scvi-tools' tutorial setting). jaxscanvi's scANVI
trains with the first of ``--objectives`` ("seed", its default, unless
given). Scores on the query's
labelled-in-source cells: accuracy, balanced accuracy, macro F1, and the
time of each stage.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import (
    SCVI_TOOLS_CPU,
    format_table,
    have_scvi_tools,
    machine_info,
    memory_snapshot,
    scvi_tools_session,
    versions,
    write_json,
)
from _label_transfer_runs import ARCH, earlier_runs, seed_done, top_variance_genes, write_partial
from _metrics import accuracy, balanced_accuracy, macro_f1, mean_sd, per_class_recall

UNKNOWN = "Unknown"
REF_BATCH, QUERY_BATCH = "pbmc3k_v1", "pbmc4k_v2"


def split(path, labels_key: str, n_hvg: int, top_variance_genes):
    import anndata as ad

    a = ad.read_h5ad(path)
    truth = a.obs[labels_key].astype(str).to_numpy()
    is_ref = (a.obs["batch"] == REF_BATCH).to_numpy() & (truth != "Platelet")
    ref = a[is_ref].copy()
    query = a[(a.obs["batch"] == QUERY_BATCH).to_numpy()].copy()
    ref = ref[:, top_variance_genes(ref.X, n_hvg)].copy()
    ref.obs = ref.obs[[labels_key, "batch"]].copy()
    qtruth = query.obs[labels_key].astype(str).to_numpy()
    query.obs = query.obs[["batch"]].copy()
    query.obs[labels_key] = UNKNOWN
    return ref, query, qtruth


def scores(truth, pred) -> dict:
    keep = truth != UNKNOWN
    t, p = truth[keep], np.asarray(pred).astype(str)[keep]
    return {
        "accuracy": accuracy(t, p),
        "balanced_accuracy": balanced_accuracy(t, p),
        "macro_f1": macro_f1(t, p),
        "per_class_recall": per_class_recall(t, p),
        "n_scored": int(keep.sum()),
    }


def run_jaxscanvi(ref, query, truth, seed, args, arch) -> dict:
    from jaxscanvi import SCANVI, SCVI

    ref, query = ref.copy(), query.copy()
    t0 = time.perf_counter()
    SCVI.setup_anndata(ref, batch_key="batch", labels_key=args.labels_key)
    vae = SCVI(ref, **arch, seed=seed)
    vae.train(
        max_epochs=args.scvi_epochs, batch_size=args.batch_size, seed=seed, progress_bar=False
    )
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lv = SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
    objective = args.objectives[0]  # "seed", jaxscanvi's default, unless asked
    lv.train(
        max_epochs=args.scanvi_epochs,
        batch_size=args.batch_size,
        seed=seed,
        progress_bar=False,
        plan_kwargs={"objective": objective},
    )
    t2 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SCANVI.prepare_query_anndata(query, lv)
        q = SCANVI.load_query_data(query, lv)
    q.train(
        max_epochs=args.query_epochs,
        batch_size=args.batch_size,
        seed=seed,
        progress_bar=False,
        plan_kwargs={"weight_decay": 0.0},
    )
    t3 = time.perf_counter()
    pred = q.predict()
    return {
        "framework": "jaxscanvi",
        "objective": objective,
        "seed": seed,
        **scores(truth, pred),
        "scvi_seconds": t1 - t0,
        "scanvi_seconds": t2 - t1,
        "query_seconds": t3 - t2,
        "temperature": lv.temperature,
        **memory_snapshot(),
    }


def run_scvi_tools(ref, query, truth, seed, args, arch) -> dict:
    scvi, _ = scvi_tools_session(seed, args.torch_threads)
    ref, query = ref.copy(), query.copy()
    tkw = dict(batch_size=args.batch_size, **SCVI_TOOLS_CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        scvi.model.SCVI.setup_anndata(ref, batch_key="batch", labels_key=args.labels_key)
        vae = scvi.model.SCVI(ref, **arch)
        vae.train(max_epochs=args.scvi_epochs, **tkw)
        t1 = time.perf_counter()
        lv = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        lv.train(max_epochs=args.scanvi_epochs, **tkw)
        t2 = time.perf_counter()
        scvi.model.SCANVI.prepare_query_anndata(query, lv)
        q = scvi.model.SCANVI.load_query_data(query, lv)
        q.train(max_epochs=args.query_epochs, plan_kwargs={"weight_decay": 0.0}, **tkw)
        t3 = time.perf_counter()
        pred = q.predict()
    return {
        "framework": "scvi-tools",
        "seed": seed,
        **scores(truth, pred),
        "scvi_seconds": t1 - t0,
        "scanvi_seconds": t2 - t1,
        "query_seconds": t3 - t2,
        **memory_snapshot(),
    }


# ------------------------------------------------------- reference to query
QUERY_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "scvi_seconds",
    "scanvi_seconds",
    "query_seconds",
)


def query_runs(args, ref, query, truth, use_scvi: bool) -> list[dict]:
    runs = earlier_runs(args)
    for seed in args.seeds:
        if seed_done(runs, seed, use_scvi):
            print(f"seed {seed}: in {args.out} already (--resume)", flush=True)
            continue
        fns = [run_jaxscanvi] + ([run_scvi_tools] if use_scvi else [])
        for fn in fns:
            r = fn(ref, query, truth, seed, args, ARCH)
            runs.append(r)
            print(
                f"  seed {seed} {r['framework']}: acc {100 * r['accuracy']:.2f}, BA "
                f"{100 * r['balanced_accuracy']:.2f}, macro F1 {100 * r['macro_f1']:.2f}"
                f" (scVI {r['scvi_seconds']:.0f} s, scANVI {r['scanvi_seconds']:.0f} s, "
                f"query {r['query_seconds']:.0f} s)",
                flush=True,
            )
        write_partial(args, runs)
    return runs


def query_summary(runs: list[dict], use_scvi: bool) -> list[dict]:
    frameworks = ["jaxscanvi"] + (["scvi-tools"] if use_scvi else [])
    summary = []
    for fw in frameworks:
        rs = [r for r in runs if r["framework"] == fw]
        summary.append({"framework": fw, **{m: mean_sd([r[m] for r in rs]) for m in QUERY_METRICS}})
    return summary


def print_query_summary(seeds, summary: list[dict]) -> None:
    headers = ["method", "acc %", "BA %", "macro F1 %", "scVI s", "scANVI s", "query s"]
    rows = [
        [r["framework"]]
        + [
            f"{100 * r[m]['mean']:.2f}"
            + (f" ± {100 * r[m]['sd']:.2f}" if r[m]["sd"] is not None else "")
            for m in ("accuracy", "balanced_accuracy", "macro_f1")
        ]
        + [f"{r[m]['mean']:.1f}" for m in ("scvi_seconds", "scanvi_seconds", "query_seconds")]
        for r in summary
    ]
    print()
    print(f"query cells with a source label, {len(seeds)} seed(s)")
    print(format_table(headers, rows))


def main_query(args, default_out: Path) -> int:
    """label_transfer.py --reference-to-query."""
    if args.quick:
        args.n_hvg, args.seeds, args.scvi_epochs, args.scanvi_epochs = 300, [0], 2, 1
        args.query_epochs = 2
    out_path = args.out or str(
        default_out.with_name(
            "reference_to_query_quick.json" if args.quick else "reference_to_query.json"
        )
    )
    data_path = Path(args.data)
    if not data_path.exists():
        print(f"label_transfer: {data_path} not found; nothing to do.", file=sys.stderr)
        return 0
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    ref, query, truth = split(data_path, args.labels_key, args.n_hvg, top_variance_genes)
    print(
        f"reference {ref.n_obs} cells ({REF_BATCH}), query {query.n_obs} cells "
        f"({QUERY_BATCH}), {ref.n_vars} genes; epochs scVI {args.scvi_epochs}, "
        f"scANVI {args.scanvi_epochs}, query {args.query_epochs}",
        flush=True,
    )
    args.out = out_path
    runs = query_runs(args, ref, query, truth, use_scvi)
    summary = query_summary(runs, use_scvi)
    print_query_summary(args.seeds, summary)
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": vars(args),
        "architecture": ARCH,
        "setting": "reference-to-query",
        "method": __doc__,
        "scvi_tools_compared": use_scvi,
    }
    out = write_json(out_path, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 0

"""Label transfer on real PBMCs: jaxscanvi SCANVI (both objectives) vs scvi-tools.

Data: ``../shared/data/pbmc_3k_4k.h5ad`` (4,808 PBMCs, two 10x runs as the
batches, ``obs['cell_type']`` with B, CD4 T, CD8 T, NK, Mono/DC, Platelet and
Unknown). The script exits with a message, status 0, where the file is absent.

Per seed (``--seeds``):

1. genes: the top ``--n-hvg`` genes by variance of log-normalised counts
   (counts scaled to 10,000 per cell, log1p), computed once on all cells;
   the model sees the raw counts of those genes;
2. labels: within each cell type, ``--hide-fraction`` of the cells (rounded)
   drawn with ``numpy.random.default_rng(seed)`` lose their label ("Unknown").
   Cells labelled "Unknown" in the source stay unlabelled and are never
   scored. Types with fewer than ``--min-class-size`` cells (Platelet, 14
   cells, with the defaults) keep all their labels: they inform training but
   are not scored, since 70 % of 14 cells would give a 10-cell class a sixth
   of the balanced accuracy;
3. jaxscanvi: SCVI for ``--scvi-epochs``, then, for each objective
   (``plan_kwargs={"objective": "seed"}`` and ``{"objective": "scvi-tools"}``),
   ``SCANVI.from_scvi_model`` trained ``--scanvi-epochs`` from that same scVI;
4. scvi-tools (where importable): the same with ``scvi.model.SCVI`` /
   ``scvi.model.SCANVI`` on the same genes, labels, epochs, batch size and
   train_size, ``scvi.settings.seed = seed``.

Scores on the hidden cells: accuracy and balanced accuracy (mean per-class
recall over the classes present among them), per seed and mean +- sd over
seeds, and jaxscanvi minus scvi-tools in percentage points (paired by seed).

Architecture: n_hidden 128, n_latent 10, n_layers 1, ZINB (both libraries'
defaults). Default epochs are scvi-tools' heuristics for 4,808 cells: 400 for
scVI, 10 for scANVI after pretraining.

``--reference-to-query`` runs the other setting instead: a labelled
reference batch, an unlabelled query batch mapped by scArches surgery (see
``benchmarks/_ref_query.py``), scored by accuracy, balanced accuracy and
macro F1, with times.

Usage:
    python benchmarks/label_transfer.py                  # full run
    python benchmarks/label_transfer.py --reference-to-query --scvi-epochs 100
    python benchmarks/label_transfer.py --quick          # smoke run
    python benchmarks/label_transfer.py --scvi-epochs 200 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    accuracy,
    balanced_accuracy,
    format_table,
    have_scvi_tools,
    loadavg,
    machine_info,
    mean_sd,
    memory_snapshot,
    per_class_recall,
    versions,
    write_json,
)

ARCH = dict(n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb")
TRAIN_SIZE = 0.9
UNKNOWN = "Unknown"
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "pbmc_3k_4k.h5ad"
DEFAULT_OUT = HERE / "results" / "label_transfer.json"


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
    import logging

    import scvi
    import torch

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.torch_threads)
    scvi.settings.seed = seed
    a = with_labels(adata, args._labels)
    tkw = dict(
        batch_size=args.batch_size,
        train_size=TRAIN_SIZE,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
        enable_model_summary=False,
    )
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
def _earlier_runs(args) -> list[dict]:
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


def _done(runs: list[dict], seed: int, use_scvi: bool) -> bool:
    have = {r["framework"] for r in runs if r["seed"] == seed}
    return "jaxscanvi" in have and ("scvi-tools" in have or not use_scvi)


def _write_partial(args, runs: list[dict]) -> None:
    kept = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    write_json(str(args.out) + ".partial", {"args": kept, "runs": runs})


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON results path (default {DEFAULT_OUT}, "
        "or label_transfer_quick.json beside it with --quick)",
    )
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--hide-fraction", type=float, default=0.7)
    p.add_argument(
        "--min-class-size",
        type=int,
        default=50,
        help="cell types with fewer cells keep all labels and are not scored",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scvi-epochs", type=int, default=400)
    p.add_argument("--scanvi-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--n-samples-per-label",
        type=int,
        default=None,
        help="scANVI's labelled cells per class per epoch (both libraries)",
    )
    p.add_argument(
        "--max-cells",
        type=int,
        default=None,
        help="random subsample of cells (fixed seed 0), for smoke runs",
    )
    p.add_argument(
        "--objectives", nargs="+", default=["seed", "scvi-tools"], choices=["seed", "scvi-tools"]
    )
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds already in --out (or its .partial file, which "
        "is rewritten after every seed) and run only the others",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1,500 cells, 300 genes, seed 0, 2 scVI + 1 scANVI epochs",
    )
    p.add_argument(
        "--reference-to-query",
        action="store_true",
        help="reference batch -> query batch by surgery (see _ref_query.py)",
    )
    p.add_argument(
        "--query-epochs",
        type=int,
        default=100,
        help="query training epochs in --reference-to-query (100)",
    )
    args = p.parse_args(argv)
    if args.reference_to_query:
        return main_query(args)
    if args.quick:
        args.n_hvg, args.seeds, args.scvi_epochs, args.scanvi_epochs = 300, [0], 2, 1
        args.max_cells = args.max_cells or 1500
    if args.out is None:
        args.out = str(
            DEFAULT_OUT.with_name("label_transfer_quick.json") if args.quick else DEFAULT_OUT
        )

    data_path = Path(args.data)
    if not data_path.exists():
        print(
            f"label_transfer: {data_path} not found; nothing to do. It ships in "
            "../shared/data beside the project on developer machines; pass --data PATH.",
            file=sys.stderr,
        )
        return 0
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    if not args.no_scvi_tools and not use_scvi:
        print("scvi-tools (or torch) is not importable: skipping the comparison", file=sys.stderr)

    t = time.perf_counter()
    adata, data_info = load_data(data_path, args.labels_key, args.n_hvg, args.max_cells)
    truth = adata.obs[args.labels_key].astype(str).to_numpy()
    print(
        f"data: {data_info['n_cells']} cells, top {data_info['n_hvg']} of "
        f"{data_info['n_genes_total']} genes by log-normalised variance "
        f"({time.perf_counter() - t:.1f} s); epochs scVI {args.scvi_epochs}, scANVI "
        f"{args.scanvi_epochs}; batch size {args.batch_size}; scvi-tools "
        f"{'yes' if use_scvi else 'no'}",
        flush=True,
    )

    runs, splits = _earlier_runs(args), {}
    for seed in args.seeds:
        if _done(runs, seed, use_scvi):
            print(f"seed {seed}: in {args.out} already (--resume)", flush=True)
            continue
        labels, hidden, info = hide_labels(truth, args.hide_fraction, seed, args.min_class_size)
        args._labels = labels
        splits[seed] = {
            "per_class": info,
            "n_hidden": int(hidden.sum()),
            "n_labelled": int((labels != UNKNOWN).sum()),
        }
        print(
            f"seed {seed}: {hidden.sum()} hidden (scored), {splits[seed]['n_labelled']} labelled",
            flush=True,
        )
        for r in run_jaxscanvi(adata, seed, args, truth, hidden):
            runs.append(r)
            print(
                f"  jaxscanvi[{r['objective']}]: balanced acc "
                f"{100 * r['balanced_accuracy']:.2f}, acc {100 * r['accuracy']:.2f} "
                f"(scVI {r['scvi_train_seconds']:.1f} s, scANVI "
                f"{r['scanvi_train_seconds']:.1f} s)",
                flush=True,
            )
        if use_scvi:
            r = run_scvi_tools(adata, seed, args, truth, hidden)
            runs.append(r)
            print(
                f"  scvi-tools: balanced acc {100 * r['balanced_accuracy']:.2f}, acc "
                f"{100 * r['accuracy']:.2f} (scVI {r['scvi_train_seconds']:.1f} s, "
                f"scANVI {r['scanvi_train_seconds']:.1f} s)",
                flush=True,
            )
        _write_partial(args, runs)  # a long run keeps every finished seed
    del args._labels

    # summaries
    groups = [("jaxscanvi", o) for o in args.objectives]
    if use_scvi:
        groups.append(("scvi-tools", "scvi-tools"))
    by = {g: {r["seed"]: r for r in runs if (r["framework"], r["objective"]) == g} for g in groups}
    summary = []
    for g in groups:
        rs = by[g]
        row = {
            "framework": g[0],
            "objective": g[1],
            "balanced_accuracy": mean_sd([rs[s]["balanced_accuracy"] for s in rs]),
            "accuracy": mean_sd([rs[s]["accuracy"] for s in rs]),
            "per_seed": {
                s: {"balanced_accuracy": rs[s]["balanced_accuracy"], "accuracy": rs[s]["accuracy"]}
                for s in rs
            },
        }
        if use_scvi and g[0] == "jaxscanvi":
            ref = by[("scvi-tools", "scvi-tools")]
            common = [s for s in rs if s in ref]
            for m in ("balanced_accuracy", "accuracy"):
                row[f"{m}_minus_scvi_tools_points"] = {
                    **mean_sd([100 * (rs[s][m] - ref[s][m]) for s in common]),
                    "per_seed": {s: 100 * (rs[s][m] - ref[s][m]) for s in common},
                }
        summary.append(row)

    def pm(d, scale=100):
        if d["mean"] is None:
            return "-"
        if d["sd"] is None:
            return f"{scale * d['mean']:.2f}"
        return f"{scale * d['mean']:.2f} ± {scale * d['sd']:.2f}"

    headers = [
        "method",
        *[f"BA s{s}" for s in args.seeds],
        "BA mean±sd",
        "acc mean±sd",
        "ΔBA pts",
        "Δacc pts",
    ]
    rows = []
    for row in summary:
        name = (
            row["framework"]
            if row["framework"] == "scvi-tools"
            else f"jaxscanvi[{row['objective']}]"
        )
        per = [
            None
            if s not in row["per_seed"]
            else f"{100 * row['per_seed'][s]['balanced_accuracy']:.2f}"
            for s in args.seeds
        ]
        d_ba = row.get("balanced_accuracy_minus_scvi_tools_points")
        d_acc = row.get("accuracy_minus_scvi_tools_points")
        rows.append(
            [
                name,
                *per,
                pm(row["balanced_accuracy"]),
                pm(row["accuracy"]),
                None if d_ba is None else pm(d_ba, 1),
                None if d_acc is None else pm(d_acc, 1),
            ]
        )
    print()
    print(
        f"hidden-label cells, {len(args.seeds)} seed(s); BA = balanced accuracy "
        f"(mean per-class recall), in %; Δ = jaxscanvi - scvi-tools, points, paired "
        f"by seed"
    )
    print(format_table(headers, rows))

    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": vars(args),
        "architecture": ARCH,
        "train_size": TRAIN_SIZE,
        "data": {**data_info, "path": str(data_path)},
        "splits": splits,
        "scvi_tools_compared": use_scvi,
        "method": {
            "hvg": "top n_hvg by variance (ddof=1) of log1p(counts / total * 1e4), all cells",
            "labels": f"per class hide round({args.hide_fraction} * n) with "
            "default_rng(seed); classes < min_class_size keep all labels "
            "and are not scored; source 'Unknown' cells stay unlabelled "
            "and unscored",
            "scores": "on hidden cells; balanced accuracy = mean recall over the "
            "classes present among them",
        },
    }
    meta["machine"]["loadavg_at_end"] = loadavg()
    out = write_json(args.out, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 0


def main_query(args) -> int:
    import _ref_query as rq

    if args.quick:
        args.n_hvg, args.seeds, args.scvi_epochs, args.scanvi_epochs = 300, [0], 2, 1
        args.query_epochs = 2
    out_path = args.out or str(
        DEFAULT_OUT.with_name(
            "reference_to_query_quick.json" if args.quick else "reference_to_query.json"
        )
    )
    data_path = Path(args.data)
    if not data_path.exists():
        print(f"label_transfer: {data_path} not found; nothing to do.", file=sys.stderr)
        return 0
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    ref, query, truth = rq.split(data_path, args.labels_key, args.n_hvg, top_variance_genes)
    print(
        f"reference {ref.n_obs} cells ({rq.REF_BATCH}), query {query.n_obs} cells "
        f"({rq.QUERY_BATCH}), {ref.n_vars} genes; epochs scVI {args.scvi_epochs}, "
        f"scANVI {args.scanvi_epochs}, query {args.query_epochs}",
        flush=True,
    )
    args.out = out_path
    runs = _earlier_runs(args)
    for seed in args.seeds:
        if _done(runs, seed, use_scvi):
            print(f"seed {seed}: in {out_path} already (--resume)", flush=True)
            continue
        fns = [rq.run_jaxscanvi] + ([rq.run_scvi_tools] if use_scvi else [])
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
        _write_partial(args, runs)
    frameworks = ["jaxscanvi"] + (["scvi-tools"] if use_scvi else [])
    summary = []
    for fw in frameworks:
        rs = [r for r in runs if r["framework"] == fw]
        row = {"framework": fw}
        for m in (
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "scvi_seconds",
            "scanvi_seconds",
            "query_seconds",
        ):
            row[m] = mean_sd([r[m] for r in rs])
        summary.append(row)
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
    print(f"query cells with a source label, {len(args.seeds)} seed(s)")
    print(format_table(headers, rows))
    meta = {
        "versions": versions(),
        "machine": machine_info(),
        "args": vars(args),
        "architecture": ARCH,
        "setting": "reference-to-query",
        "method": rq.__doc__,
        "scvi_tools_compared": use_scvi,
    }
    out = write_json(out_path, {**meta, "summary": summary, "runs": runs})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

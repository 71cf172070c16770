"""Does an MMD penalty mix batches better than seed noise does? One sweep answers.

Data: ``../shared/data/pbmc_3k_4k.h5ad`` (4,808 PBMCs from a v1 and a v2 10x
run: a strong batch effect), 2,000 genes (`jaxscanvi.data.hvg`, seurat_v3
with ``batch_key``).

Every seed x MMD weight (default 8 seeds x weights 0, 1, 3, 10: 32 scVI
models, 100 epochs) is trained by one call, `jaxscanvi.sweep.train_many`,
as one vmapped program: ``loss_terms={"mmd": contrib.mmd_batch_penalty(2)}``
with ``grid={"loss_weights.mmd": weights}``; weight 0 is plain scVI.
``order="per_model"``: each seed has its own split, minibatch order and
initial weights, shared by its four weights, so the weights are compared
seed by seed.

Each latent mean is scored by scib-metrics' ``Benchmarker`` (raw scores, not
min-max scaled), with unintegrated PCA for PCR comparison: batch correction
(BRAS, iLISI, kBET, graph connectivity, PCR comparison), bio conservation
(isolated labels, KMeans NMI/ARI, silhouette of labels, cLISI) and their
total (0.4 batch + 0.6 bio). Cells labelled "Unknown" are left out of the
scoring.

Report: for each weight > 0, the mean over seeds of (weight minus weight 0)
for each score, with a two-sided 95 % t interval for paired samples; a
difference whose interval excludes 0 is beyond seed noise. JSON:
``results/mmd_sweep.json``; figure: ``results/mmd_sweep.png`` (each seed a
line across the weights).

Run: ``python benchmarks/mmd_sweep.py`` (needs the ``bench`` extra; about 30
minutes on 2 CPU cores). ``--report`` redraws from the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import format_table, machine_info, versions, write_json
from _metrics import t_interval

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "pbmc_3k_4k.h5ad"
OUT = HERE / "results" / "mmd_sweep.json"
UNKNOWN = "Unknown"
SCORES = (
    "Batch correction",
    "Bio conservation",
    "Total",
    "iLISI",
    "KBET",
    "Graph connectivity",
    "PCR comparison",
    "BRAS",
    "KMeans NMI",
    "KMeans ARI",
    "Isolated labels",
    "Silhouette label",
    "cLISI",
)


def train(adata, seeds: list[int], weights: list[float], epochs: int):
    from jaxscanvi import SCVI, contrib, sweep

    t0 = time.perf_counter()
    out = sweep.train_many(
        lambda s: SCVI(adata, seed=s),
        seeds=seeds,
        grid={"loss_weights.mmd": weights},
        order="per_model",
        max_epochs=epochs,
        loss_terms={"mmd": contrib.mmd_batch_penalty(2)},
        loss_weights={"mmd": 0.0},
    )
    seconds = time.perf_counter() - t0
    return out, seconds


def scib(adata, latents: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """scib-metrics' Benchmarker on the labelled cells; raw scores per embedding."""
    from integration import unintegrated_pca
    from scib_metrics.benchmark import Benchmarker

    known = np.asarray(adata.obs["cell_type"].astype(str) != UNKNOWN)
    b = adata[known].copy()
    b.obs["cell_type"] = b.obs["cell_type"].astype(str).astype("category")
    b.obsm["Unintegrated"] = unintegrated_pca(b)
    for name, z in latents.items():
        b.obsm[name] = np.asarray(z)[known]
    bm = Benchmarker(
        b,
        batch_key="batch",
        label_key="cell_type",
        embedding_obsm_keys=["Unintegrated", *latents],
        pre_integrated_embedding_obsm_key="Unintegrated",
        n_jobs=1,
        progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm.benchmark()
        df = bm.get_results(min_max_scale=False)
    df = df.drop(index="Metric Type", errors="ignore")
    return {str(m): {str(k): float(v) for k, v in row.items()} for m, row in df.iterrows()}


def paired(runs: list[dict], weight: float, score: str) -> dict:
    """Mean over seeds of (weight minus weight 0) with a 95 % paired t interval."""
    base = {r["seed"]: r["scores"][score] for r in runs if r["weight"] == 0}
    d = np.array(
        [
            r["scores"][score] - base[r["seed"]]
            for r in runs
            if r["weight"] == weight and r["seed"] in base
        ]
    )
    ci = t_interval(d)
    return {
        "n_seeds": len(d),
        "mean": float(d.mean()),
        "ci95": ci,
        "beyond_seed_noise": ci is not None and (ci[0] > 0 or ci[1] < 0),
    }


def summarise(runs: list[dict], weights: list[float]) -> dict:
    out = {}
    for w in weights:
        rows = [r for r in runs if r["weight"] == w]
        out[f"{w:g}"] = {
            s: {
                "mean": float(np.mean([r["scores"][s] for r in rows])),
                "sd": float(np.std([r["scores"][s] for r in rows], ddof=1))
                if len(rows) > 1
                else None,
                "minus_weight_0": paired(runs, w, s) if w != 0 else None,
            }
            for s in SCORES
        }
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights, runs = doc["weights"], doc["runs"]
    panels = ("Batch correction", "Bio conservation", "Total")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    x = np.arange(len(weights))
    for ax, score in zip(axes, panels):
        for s in doc["seeds"]:
            ys = [
                next(r["scores"][score] for r in runs if r["seed"] == s and r["weight"] == w)
                for w in weights
            ]
            ax.plot(x, ys, "-o", color="0.6", lw=0.8, ms=3)
        means = [doc["summary"][f"{w:g}"][score]["mean"] for w in weights]
        ax.plot(x, means, "-s", color="C0", lw=2, ms=6, label="mean over seeds")
        for i, w in enumerate(weights[1:], start=1):
            p = doc["summary"][f"{w:g}"][score]["minus_weight_0"]
            mark = "*" if p["beyond_seed_noise"] else "n.s."
            ax.annotate(
                f"{p['mean']:+.3f} {mark}",
                (x[i], means[i]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
                color="C0",
            )
        ax.set_xticks(x, [f"{w:g}" for w in weights])
        ax.set_xlabel("MMD weight")
        ax.set_title(f"scIB {score.lower()}", fontsize=10)
    axes[0].set_ylabel("raw scIB score (grey: one seed)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"scVI + MMD on pbmc_3k_4k: {len(doc['seeds'])} seeds x {len(weights)} "
        "weights in one sweep (vs weight 0: mean, * = 95 % CI excludes 0)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(doc: dict) -> None:
    rows = []
    for w in doc["weights"]:
        s = doc["summary"][f"{w:g}"]
        row = [f"{w:g}"]
        for score in ("Batch correction", "iLISI", "KBET", "Bio conservation", "Total"):
            cell = f"{s[score]['mean']:.3f}"
            p = s[score]["minus_weight_0"]
            if p is not None:
                cell += (
                    f" ({p['mean']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]"
                    f"{' *' if p['beyond_seed_noise'] else ''})"
                )
            row.append(cell)
        rows.append(row)
    print(
        format_table(
            ["MMD weight", "batch correction", "iLISI", "kBET", "bio conservation", "total"], rows
        )
    )


def load_counts(path: Path, n_hvg: int):
    """The counts of the ``n_hvg`` most variable genes (batch-aware), set up for SCVI."""
    import anndata as ad

    from jaxscanvi import SCVI
    from jaxscanvi.data.hvg import highly_variable_genes

    adata = ad.read_h5ad(path)
    adata = adata[:, highly_variable_genes(adata, n_hvg, batch_key="batch")].copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    return adata


def latents(members: list[dict], models) -> dict:
    return {
        f"w{m['loss_weights.mmd']:g}_s{m['seed']}": model.get_latent_representation()
        for m, model in zip(members, models)
    }


def collect_runs(members: list[dict], models, scores: dict) -> list[dict]:
    """Each member's seed, weight, scib scores and final history."""
    runs = []
    for m, model in zip(members, models):
        name = f"w{m['loss_weights.mmd']:g}_s{m['seed']}"
        last = model.history.to_frame().iloc[-1]
        runs.append(
            {
                "seed": int(m["seed"]),
                "weight": float(m["loss_weights.mmd"]),
                "scores": scores[name],
                "final_history": {
                    k: float(v)
                    for k, v in last.items()
                    if isinstance(v, (int, float, np.number)) and k != "epoch_seconds"
                },
            }
        )
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--report", action="store_true", help="redraw from the JSON")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="2 seeds, weights 0 and 1, 2 epochs, 200 genes: a check that it runs "
        "(writes mmd_sweep_smoke.json unless --out)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.weights, args.epochs, args.n_hvg = [0, 1], [0.0, 1.0], 2, 200
        if args.out == str(OUT):
            args.out = str(OUT.with_name("mmd_sweep_smoke.json"))
    out = Path(args.out)
    if args.report:
        import json

        doc = json.loads(out.read_text())
        report(doc)
        plot(doc, out.with_suffix(".png"))
        return 0
    if 0.0 not in args.weights:
        p.error("--weights must include 0 (plain scVI, the baseline)")
    path = Path(args.data)
    if not path.exists():
        print(f"{path} not found: this benchmark needs ../shared/data/pbmc_3k_4k.h5ad")
        return 0
    adata = load_counts(path, args.n_hvg)
    weights = [0.0] + [w for w in args.weights if w != 0.0]
    result, seconds = train(adata, args.seeds, weights, args.epochs)
    print(f"trained {len(result.models)} models in one sweep: {seconds:.0f} s", flush=True)
    members = result.members.to_dict("records")
    zs = latents(members, result.models)
    t0 = time.perf_counter()
    scores = scib(adata, zs)
    runs = collect_runs(members, result.models, scores)
    doc = {
        "benchmark": "mmd_sweep",
        "data": str(path),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "weights": weights,
        "order": "per_model",
        "sweep_seconds": seconds,
        "scib_seconds": time.perf_counter() - t0,
        "unintegrated": scores["Unintegrated"],
        "runs": runs,
        "summary": summarise(runs, weights),
        "versions": versions(),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
    }
    write_json(out, doc)
    report(doc)
    plot(doc, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

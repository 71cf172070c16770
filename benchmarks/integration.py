"""Integration quality with the field's own metrics (scib-metrics), jaxscanvi vs scvi-tools.

For every dataset of ``../shared/data`` with several batches and cell-type
labels, and each seed: the same genes (top ``--n-hvg`` by variance of
log-normalised counts), the same epochs, batch size and train_size, then

* jaxscanvi ``SCVI`` and ``SCANVI.from_scvi_model`` latents,
* scvi-tools ``SCVI`` and ``SCANVI.from_scvi_model`` latents (where importable),
* the unintegrated PCA (50 components of the log-normalised genes),

scored by scib-metrics' ``Benchmarker``: bio conservation (isolated labels,
NMI/ARI of k-means clusters, silhouette of labels, cLISI) and batch correction
(BRAS, iLISI, kBET per label, graph connectivity, PCR comparison), on the
cells whose label is known. Totals are scIB's 0.6 bio + 0.4 batch, without
min-max scaling, so they compare across runs. Labels marked ``Unknown`` stay
unlabelled for scANVI and are left out of the scores.

Writes ``benchmarks/results/integration.json`` (per seed, mean and sd, the
paired jaxscanvi - scvi-tools differences) and ``integration.png`` (a
scIB-style table of the means). Datasets without labels (scIB's metrics need
them) are listed as skipped.

    pip install -e ".[bench]" scvi-tools    # scib-metrics is in [bench]
    python benchmarks/integration.py                     # 8 seeds, 400 + 10 epochs
    python benchmarks/integration.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (
    SCVI_TOOLS_CPU,
    add_smoke,
    format_table,
    have_scvi_tools,
    machine_info,
    parser,
    scvi_tools_session,
    usable_cores,
    versions,
    write_json,
)
from _label_transfer_runs import top_variance_genes
from _metrics import mean_sd, t_interval

DATA = HERE.parents[1] / "shared" / "data"
OUT = HERE / "results" / "integration.json"
ARCH = dict(n_hidden=128, n_latent=10, n_layers=1)
TRAIN_SIZE = 0.9
UNKNOWN = "Unknown"
METHODS = (
    "Unintegrated",
    "jaxscanvi scVI",
    "jaxscanvi scANVI",
    "scvi-tools scVI",
    "scvi-tools scANVI",
)


def datasets(names=None) -> tuple[list[Path], dict[str, str]]:
    """Files with >= 2 batches and >= 2 known cell types; the others with why not."""
    import anndata as ad

    keep, skipped = [], {}
    for path in sorted(DATA.glob("*.h5ad")):
        if names and path.stem not in names:
            continue
        a = ad.read_h5ad(path, backed="r")
        obs = a.obs
        a.file.close()
        if "batch" not in obs or obs["batch"].nunique() < 2:
            skipped[path.stem] = "one batch"
        elif "cell_type" not in obs or len(set(obs["cell_type"].astype(str)) - {UNKNOWN}) < 2:
            skipped[path.stem] = "no cell-type labels (scIB's metrics need them)"
        else:
            keep.append(path)
    return keep, skipped


def load(path: Path, n_hvg: int, max_cells: int | None):
    import anndata as ad
    import pandas as pd

    a = ad.read_h5ad(path)
    if max_cells is not None and max_cells < a.n_obs:
        a = a[np.sort(np.random.default_rng(0).choice(a.n_obs, max_cells, replace=False))]
    a = a[:, top_variance_genes(a.X, n_hvg)].copy()
    labels = a.obs["cell_type"].astype(str)
    cats = [*sorted(set(labels) - {UNKNOWN}), UNKNOWN]
    a.obs = pd.DataFrame(
        {
            "batch": a.obs["batch"].astype(str).astype("category"),
            "cell_type": pd.Categorical(labels, categories=cats),
        },
        index=a.obs_names,
    )
    return a


def unintegrated_pca(a, n_comps: int = 50) -> np.ndarray:
    """PCA of log1p(counts / total * 1e4), centred, by a dense SVD (small data)."""
    X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    X = X - X.mean(0)
    u, s, _ = np.linalg.svd(X, full_matrices=False)
    k = min(n_comps, len(s))
    return (u[:, :k] * s[:k]).astype(np.float32)


def run_jaxscanvi(a, seed: int, args) -> dict[str, np.ndarray]:
    from jaxscanvi import SCANVI, SCVI

    a = a.copy()
    SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    vae = SCVI(a, **ARCH, seed=seed)
    vae.train(
        max_epochs=args.scvi_epochs,
        batch_size=args.batch_size,
        train_size=TRAIN_SIZE,
        seed=seed,
        progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lv = SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
    lv.train(
        max_epochs=args.scanvi_epochs,
        batch_size=args.batch_size,
        train_size=TRAIN_SIZE,
        seed=seed,
        progress_bar=False,
    )
    return {
        "jaxscanvi scVI": vae.get_latent_representation(),
        "jaxscanvi scANVI": lv.get_latent_representation(),
    }


def run_scvi_tools(a, seed: int, args) -> dict[str, np.ndarray]:
    scvi, _ = scvi_tools_session(seed, args.torch_threads)
    a = a.copy()
    kw = dict(batch_size=args.batch_size, train_size=TRAIN_SIZE, **SCVI_TOOLS_CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.model.SCVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
        vae = scvi.model.SCVI(a, **ARCH)
        vae.train(max_epochs=args.scvi_epochs, **kw)
        lv = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category=UNKNOWN)
        lv.train(max_epochs=args.scanvi_epochs, **kw)
    return {
        "scvi-tools scVI": vae.get_latent_representation(),
        "scvi-tools scANVI": lv.get_latent_representation(),
    }


def scib_scores(a, embeddings: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """scib-metrics' Benchmarker on the labelled cells; raw (unscaled) scores."""
    from scib_metrics.benchmark import Benchmarker

    known = np.asarray(a.obs["cell_type"].astype(str) != UNKNOWN)
    b = a[known].copy()
    b.obs["cell_type"] = b.obs["cell_type"].astype(str).astype("category")
    for name, z in embeddings.items():
        b.obsm[name] = np.asarray(z)[known]
    bm = Benchmarker(
        b,
        batch_key="batch",
        label_key="cell_type",
        embedding_obsm_keys=list(embeddings),
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


def plot_table(means: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in means]
    metrics = list(next(iter(means.values())))
    vals = np.array([[means[m][k] for k in metrics] for m in methods])
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) + 2.5, 0.5 * len(methods) + 1.6))
    # colour each column by rank within it, as scIB's tables do
    ranks = vals.argsort(0).argsort(0) / max(len(methods) - 1, 1)
    ax.imshow(ranks, cmap="YlGnBu", aspect="auto", vmin=-0.2, vmax=1.2)
    for i in range(len(methods)):
        for j in range(len(metrics)):
            ax.text(j, i, f"{vals[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(metrics)), metrics, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--scvi-epochs", type=int, default=400)
    p.add_argument("--scanvi-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument("--datasets", nargs="+", default=None, help="file stems; default all")
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument("--torch-threads", type=int, default=usable_cores())
    add_smoke(p, "smoke run: 1 seed, 800 cells, 500 genes, 5 + 2 epochs")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds --out already holds; run only the others",
    )
    return p


def run_seeds(a, pca, name: str, args, use_scvi: bool, earlier: dict, save) -> list[dict]:
    """Each seed's embeddings and scores (seeds in ``earlier`` kept as they
    are); ``save(per_seed)`` after each."""
    per_seed = []
    for seed in args.seeds:
        if seed in earlier:
            per_seed.append(earlier[seed])
            continue
        t = time.perf_counter()
        emb = {"Unintegrated": pca, **run_jaxscanvi(a, seed, args)}
        t_jax = time.perf_counter() - t
        if use_scvi:
            t = time.perf_counter()
            emb.update(run_scvi_tools(a, seed, args))
            t_torch = time.perf_counter() - t
        scores = scib_scores(a, emb)
        per_seed.append(
            {
                "seed": seed,
                "scores": scores,
                "jaxscanvi_seconds": t_jax,
                "scvi_tools_seconds": t_torch if use_scvi else None,
            }
        )
        print(
            f"{name} seed {seed}: " + ", ".join(f"{m} {s['Total']:.3f}" for m, s in scores.items()),
            flush=True,
        )
        save(per_seed)
    return per_seed


def summarise(per_seed: list[dict], use_scvi: bool) -> tuple[dict, dict]:
    """Mean and sd per method and metric; the paired jaxscanvi - scvi-tools Totals."""
    methods = list(per_seed[0]["scores"])
    metrics = list(per_seed[0]["scores"][methods[0]])
    summary = {
        m: {k: mean_sd([s["scores"][m][k] for s in per_seed]) for k in metrics} for m in methods
    }
    paired = {}
    if use_scvi:
        for model in ("scVI", "scANVI"):
            d = [
                s["scores"][f"jaxscanvi {model}"]["Total"]
                - s["scores"][f"scvi-tools {model}"]["Total"]
                for s in per_seed
            ]
            paired[model] = {"total_difference_per_seed": d, **mean_sd(d), "ci95": t_interval(d)}
    return summary, paired


def run_dataset(path: Path, args, use_scvi: bool, doc: dict, done: dict, out: Path) -> dict:
    """One dataset: its seeds, summary and table figure; the summary returned."""
    a = load(path, args.n_hvg, args.max_cells)
    pca = unintegrated_pca(a)
    earlier = {r["seed"]: r for r in done.get(path.stem, {}).get("per_seed", [])}

    def save(per_seed):
        doc["datasets"][path.stem] = {
            "n_cells": int(a.n_obs),
            "n_genes": int(a.n_vars),
            "per_seed": per_seed,
        }
        write_json(out, doc)

    per_seed = run_seeds(a, pca, path.stem, args, use_scvi, earlier, save)
    summary, paired = summarise(per_seed, use_scvi)
    doc["datasets"][path.stem].update({"summary": summary, "paired_total_jax_minus_scvi": paired})
    write_json(out, doc)
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.scvi_epochs, args.scanvi_epochs = [0], 5, 2
        args.max_cells, args.n_hvg = 800, 500
    out = Path(args.out or (OUT.with_name("integration_quick.json") if args.quick else OUT))
    if not DATA.exists():
        print(f"{DATA} not present: nothing to benchmark")
        return 0
    try:
        import scib_metrics  # noqa: F401
    except ImportError:
        print("scib-metrics is not installed: pip install -e '.[bench]'")
        return 1
    use_scvi = not args.no_scvi_tools and have_scvi_tools()
    paths, skipped = datasets(args.datasets)
    doc = {
        "benchmark": "integration",
        "args": vars(args),
        "versions": versions(),
        "machine": machine_info(),
        "skipped": skipped,
        "datasets": {},
        "scvi_tools_compared": use_scvi,
    }
    done = json.loads(out.read_text())["datasets"] if args.resume and out.exists() else {}
    rows = []
    for path in paths:
        summary = run_dataset(path, args, use_scvi, doc, done, out)
        plot_table(
            {m: {k: v["mean"] for k, v in s.items()} for m, s in summary.items()},
            out.with_suffix(".png")
            if len(paths) == 1
            else out.with_name(f"{out.stem}_{path.stem}.png"),
            f"{path.stem}: scib-metrics, mean over seeds {args.seeds}",
        )
        keys = ("Bio conservation", "Batch correction", "Total")
        for m, s in summary.items():
            rows.append([path.stem, m, *(s[k]["mean"] for k in keys), s["Total"]["sd"]])
    print(format_table(["dataset", "method", "bio", "batch", "total", "total sd"], rows))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

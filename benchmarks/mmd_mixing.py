"""Does an extra MMD loss term mix batches better? (scVI on pbmc_3k_4k).

Data: ``../shared/data/pbmc_3k_4k.h5ad`` (4,808 PBMCs from two 10x runs with
different chemistries, v1 and v2: a strong batch effect), top 2,000 genes by
variance of log-normalised counts (`jaxscanvi.data.hvg`).

For each seed, scVI is trained with ``loss_terms={"mmd":
contrib.mmd_batch_penalty(2)}`` at each weight in ``--weights`` (0 = plain
scVI), all else equal, and the latent means are scored:

* batch mixing: mean normalised entropy of batch labels among each cell's 50
  nearest neighbours (1 = perfectly mixed, 0 = separated; `_metrics.batch_entropy`,
  on scikit-learn's neighbours);
* cell-type separation: leave-one-out 15-NN accuracy of the cell-type labels
  (not used in training);
* cross-batch transfer: 15-NN accuracy of each batch's cell types predicted
  from the other batch's cells only (mean of both directions), which needs
  both mixing and separation.

``cell_type_fine`` is not scored: its names differ by batch (pbmc3k has "CD14+
Mono", pbmc4k "MNP"), so it rewards batches kept apart. Cells labelled
"Unknown" (20) and the Platelets (14, pbmc3k only) are left out of the
accuracies.

Run: ``python benchmarks/mmd_mixing.py`` (about 10 minutes on 2 CPU cores);
prints a table and writes ``benchmarks/results/mmd_mixing.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import format_table, machine_info, versions, write_json
from _metrics import mean_sd

DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "pbmc_3k_4k.h5ad"
DEFAULT_OUT = HERE / "results" / "mmd_mixing.json"


def run(adata, weight: float, seed: int, epochs: int) -> dict:
    from _metrics import batch_entropy, knn_accuracy, knn_predict

    import jaxscanvi as js
    from jaxscanvi import contrib

    model = js.SCVI(adata, seed=seed)
    kw = (
        {}
        if weight == 0
        else dict(
            loss_terms={"mmd": contrib.mmd_batch_penalty(model.registry.n_batch)},
            loss_weights={"mmd": weight},
        )
    )
    t0 = time.perf_counter()
    model.train(max_epochs=epochs, seed=seed, progress_bar=False, **kw)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    h = model.history.to_frame()
    types = adata.obs["cell_type"].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy()
    scored = ~np.isin(types, ["Unknown", "Platelet"])
    transfer = []
    for b in np.unique(batches):
        ref, qry = scored & (batches != b), scored & (batches == b)
        pred = knn_predict(z, types, k=15, reference=ref, query=qry)
        transfer.append(float((pred == types[qry]).mean()))
    return {
        "weight": weight,
        "seed": seed,
        "train_seconds": round(seconds, 2),
        "batch_entropy_k50": batch_entropy(z, batches, k=50),
        "knn_accuracy_cell_type": knn_accuracy(z[scored], types[scored], k=15),
        "cross_batch_transfer_accuracy": float(np.mean(transfer)),
        "reconstruction_loss_train": float(h["reconstruction_loss_train"].iloc[-1]),
    }


def summarise(runs: list[dict], weights) -> dict:
    """Mean and sd over seeds per weight, printed as a table."""
    metrics = (
        "batch_entropy_k50",
        "knn_accuracy_cell_type",
        "cross_batch_transfer_accuracy",
        "reconstruction_loss_train",
        "train_seconds",
    )
    summary = {
        f"{w:g}": {m: mean_sd([r[m] for r in runs if r["weight"] == w]) for m in metrics}
        for w in weights
    }
    rows = [
        [w] + [f"{s[m]['mean']:.3f} ± {s[m]['sd'] or 0:.3f}" for m in metrics]
        for w, s in summary.items()
    ]
    print(
        format_table(
            [
                "MMD weight",
                "batch entropy (k=50)",
                "kNN acc. type",
                "cross-batch kNN acc.",
                "reconstruction loss",
                "train s",
            ],
            rows,
        )
    )
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seed 0, weights 0 and 1, 2 epochs, 200 genes: a check that it runs "
        "(writes mmd_mixing_smoke.json unless --out)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.weights, args.epochs, args.n_hvg = [0], [0.0, 1.0], 2, 200
        if args.out == str(DEFAULT_OUT):
            args.out = str(DEFAULT_OUT.with_name("mmd_mixing_smoke.json"))
    path = Path(args.data)
    if not path.exists():
        print(f"{path} not found: this benchmark needs ../shared/data/pbmc_3k_4k.h5ad")
        return 0
    import anndata as ad

    import jaxscanvi as js
    from jaxscanvi.data.hvg import highly_variable_genes

    adata = ad.read_h5ad(path)
    adata = adata[:, highly_variable_genes(adata, args.n_hvg)].copy()
    js.SCVI.setup_anndata(adata, batch_key="batch")
    runs = []
    for seed in args.seeds:
        for w in args.weights:
            r = run(adata, w, seed, args.epochs)
            runs.append(r)
            print(
                f"seed {seed} weight {w:g}: entropy {r['batch_entropy_k50']:.3f}, "
                f"kNN type {r['knn_accuracy_cell_type']:.3f}, "
                f"cross-batch {r['cross_batch_transfer_accuracy']:.3f}, "
                f"{r['train_seconds']:.0f} s",
                flush=True,
            )
    summary = summarise(runs, args.weights)
    write_json(
        args.out,
        {
            "data": str(path),
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "epochs": args.epochs,
            "runs": runs,
            "summary": summary,
            "versions": versions(),
            "machine": machine_info(),
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

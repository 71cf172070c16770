"""Which of pbmc4k's labels move the hierarchical model's fine accuracy (issue 32).

Same data, split, hierarchy and training as ``hierarchy.py`` (its
``--parts accuracy``: 2,000 genes, 70 % of each (run, fine type) hidden, one
scVI per seed, scANVIs of 20 epochs with ``n_samples_per_label=100``). The
pbmc4k run's labelled cells carry coarse labels of two kinds: a depth-1
**leaf** (B, CD8 T, NK: the same node as pbmc3k's fine type of that name) or
an **inner node** (CD4 T, Mono/DC). Four scANVIs per seed, from one scVI:

* ``flat_fine``: pbmc3k's fine labels alone (hierarchy.py's flat arm);
* ``hier``: plus all of pbmc4k's labels (hierarchy.py's hierarchical arm);
* ``hier_inner_only``: plus pbmc4k's inner-node labels only (its leaf-labelled
  cells unlabelled);
* ``hier_leaf_only``: plus pbmc4k's leaf labels only (no cell at an inner
  node, so training is flat scANVI's on these labels).

Scores: fine balanced accuracy and per-type recall on the hidden pbmc3k
cells, each arm against ``flat_fine`` and ``hier`` against
``hier_leaf_only`` (the inner-node labels' effect), paired over seeds, 95 %
t interval, in points. ``markers``: per run and coarse type of the T and NK
cells, the percentage of cells with a count of each marker gene (how the two
runs' annotators drew CD8 T and NK).

Run: ``python benchmarks/hierarchy_ablation.py [--seeds 0 1 ...] [--out F]``;
JSON: ``results/hierarchy_ablation.json`` (rewritten after each seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import machine_info, versions, write_json
from _hierarchy_workers import UNL
from _metrics import balanced_accuracy, per_class_recall
from hierarchy import derive_hierarchy, hide, load_pbmc, paired

ARMS = ("flat_fine", "hier", "hier_inner_only", "hier_leaf_only")
MARKERS = ("CD3E", "CD8A", "CD8B", "CCR7", "IL7R", "GZMK", "GZMB", "GNLY", "NKG7", "KLRB1")


def label_columns(fine, coarse, is_fine, hidden, tree) -> dict[str, np.ndarray]:
    inner = set(tree.values())
    at_inner = ~is_fine & np.isin(coarse, sorted(inner))
    hier = np.where(hidden, UNL, np.where(is_fine, fine, coarse))
    return {
        "flat_fine": np.where(hidden | ~is_fine, UNL, fine),
        "hier": hier,
        "hier_inner_only": np.where(~is_fine & ~at_inner, UNL, hier),
        "hier_leaf_only": np.where(at_inner, UNL, hier),
    }


def one_seed(data, seed: int, scvi_epochs: int, scanvi_epochs: int) -> dict:
    import pandas as pd

    import jaxscanvi as js

    adata, fine, coarse, is_fine = data
    tree = derive_hierarchy(fine, coarse, is_fine)
    hidden = hide(fine, is_fine, seed)
    cols = label_columns(fine, coarse, is_fine, hidden, tree)
    for k, v in cols.items():
        adata.obs[k] = pd.Categorical(v)
    t0 = time.perf_counter()
    js.SCVI.setup_anndata(adata, batch_key="batch")
    vae = js.SCVI(adata, seed=seed).train(scvi_epochs, progress_bar=False, seed=seed)
    cells = hidden & is_fine
    out: dict = {"seed": seed}
    for arm in ARMS:
        kw = {} if arm == "flat_fine" else {"label_hierarchy": tree}
        m = js.SCANVI.from_scvi_model(vae, UNL, labels_key=arm, adata=adata, **kw)
        m.train(scanvi_epochs, n_samples_per_label=100, progress_bar=False, seed=seed)
        pred = np.asarray(m.predict(), str)[cells]
        out[f"fine_ba_{arm}"] = balanced_accuracy(fine[cells], pred)
        out[f"recall_{arm}"] = per_class_recall(fine[cells], pred)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markers(adata, coarse, is_fine) -> dict:
    import scipy.sparse as sp

    genes = [g for g in MARKERS if g in adata.var_names]
    X = adata[:, genes].X
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    out = {}
    for run, sel in (("pbmc3k", is_fine), ("pbmc4k", ~is_fine)):
        for t in ("CD4 T", "CD8 T", "NK"):
            m = sel & (coarse == t)
            pct = 100 * (X[m] > 0).mean(0)
            out[f"{run} {t}"] = {"n": int(m.sum()), **dict(zip(genes, pct.round(1).tolist()))}
    return out


def summary(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    res = {
        f"{a}_minus_flat_fine": paired(runs, f"fine_ba_{a}", "fine_ba_flat_fine") for a in ARMS[1:]
    }
    res["hier_minus_hier_leaf_only"] = paired(runs, "fine_ba_hier", "fine_ba_hier_leaf_only")
    types = sorted(runs[0]["recall_flat_fine"]) if runs else []
    res["recall_mean_points"] = {
        a: {t: round(100 * float(np.mean([r[f"recall_{a}"][t] for r in runs])), 1) for t in types}
        for a in ARMS
    }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--scvi-epochs", type=int, default=60)
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--out", type=Path, default=HERE / "results" / "hierarchy_ablation.json")
    args = p.parse_args(argv)
    data = load_pbmc(2000)
    doc = {"method": __doc__, "versions": versions(), "machine": machine_info(with_jax=False)}
    doc["markers"] = markers(*data[:1], data[2], data[3])
    runs = []
    for seed in args.seeds:
        runs.append(one_seed(data, seed, args.scvi_epochs, args.scanvi_epochs))
        print(json.dumps({k: v for k, v in runs[-1].items() if "recall" not in k}), flush=True)
        doc.update(runs=runs, **summary(runs))
        write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Labels at two depths of a cell-type hierarchy (issue 32), on pbmc_3k_4k.

Setting (per seed): the top 2,000 genes by log-normalised variance; 70 % of
each (batch, fine type) group's labels hidden. Of the labelled cells, the
pbmc3k_v1 run keeps its fine labels (``cell_type_fine``) and the pbmc4k_v2
run only its coarse ones (``cell_type``). pbmc4k's own "fine" column
(MNP, T_CD4, T_CD8) is no finer than its coarse one, so the fine level is
pbmc3k's. The 2-level hierarchy is derived from the two columns (each
pbmc3k fine type under the coarse type of its cells):

    PBMC (root)
    ├── B, CD8 T, NK, Platelet          (leaves at depth 1: fine = coarse)
    ├── CD4 T   ── Naive CD4 T, Memory CD4 T
    └── Mono/DC ── CD14+ Mono, FCGR3A+ Mono, DC

"Unknown" is unlabelled. One scVI per seed (``--scvi-epochs``), then three
scANVIs from it (``--scanvi-epochs``, ``n_samples_per_label=100``):

* ``hierarchical``: fine labels of pbmc3k plus coarse labels of pbmc4k;
* ``flat_fine``: the fine-labelled (pbmc3k) cells alone, pbmc4k unlabelled;
* ``flat_coarse``: every labelled cell at the coarse level.

Scores on the hidden cells: fine balanced accuracy (pbmc3k, the cells with a
fine truth), hierarchical minus flat_fine; coarse balanced accuracy (both
runs, "Unknown" left out), the hierarchical model's most probable depth-1
node (``predict(level=1)``: its leaves' probabilities summed) minus
flat_coarse (the coarse ancestor of its top leaf is reported beside it);
per seed also each type's recall and the misses (true -> predicted counts)
of each arm at both levels (``per_class``); paired over seeds, 95 % t interval (`_metrics.t_interval`), in points. The
deepest node with probability >= 0.9 (``predict(level="deepest")``): per
depth, the fraction of hidden cells there and the accuracy there. A call is correct when it lies on the path
of the truth: an ancestor of (or equal to) the true type, or, for a pbmc4k
cell whose truth is coarse, a type under it.

Step time: a flat hierarchy (every type's parent the root) against no
hierarchy, same data and seed, in alternating rounds of epochs in one
process (``steptime``). A flat hierarchy's config has no ``label_parents``,
so it trains with the no-hierarchy model's own compiled program (the
flat arm compiles nothing): the ratio measures only timing noise; and scANVI steps with C = 10, 100, 1,000 leaves in a
hierarchy of depth 6, each in its own process for its peak RSS (``scale``).

Run: ``python benchmarks/hierarchy.py`` (all parts; ``--parts accuracy``,
``--seeds 0 1``); ``--smoke`` runs every part tiny (the accuracy part on a
simulated atlas whose lineages are the coarse level). JSON:
``results/hierarchy.json`` (``hierarchy_smoke.json`` with ``--smoke``).
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
sys.path.insert(0, str(HERE.parent))
from _common import machine_info, versions, write_json
from _hierarchy_workers import ROOT, UNL, WORKERS
from _metrics import balanced_accuracy, per_class_recall, t_interval

DATA = HERE.parent.parent / "shared" / "data" / "pbmc_3k_4k.h5ad"
RESULTS = HERE / "results"
FINE_BATCH, COARSE_BATCH = "pbmc3k_v1", "pbmc4k_v2"


# ------------------------------------------------------------------ data
def load_pbmc(n_hvg: int):
    import anndata as ad

    from jaxscanvi.data.hvg import highly_variable_genes

    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, n_hvg, flavor="variance")].copy()
    obs = adata.obs
    fine = obs["cell_type_fine"].astype(str).to_numpy()
    coarse = obs["cell_type"].astype(str).to_numpy()
    is_fine = (obs["batch"].astype(str) == FINE_BATCH).to_numpy()
    return adata, fine, coarse, is_fine


def load_synthetic(n_cells: int = 800):
    """The smoke test's stand-in: lineages are the coarse level."""
    from jaxscanvi.data import synthetic_atlas

    adata = synthetic_atlas(n_cells, 200, n_lineages=3, types_per_lineage=2, seed=0)
    fine = adata.obs["cell_type"].astype(str).to_numpy()
    coarse = adata.obs["lineage"].astype(str).to_numpy()
    is_fine = (adata.obs["batch"].cat.codes == 0).to_numpy()
    return adata, fine, coarse, is_fine


def derive_hierarchy(fine, coarse, is_fine) -> dict[str, str]:
    """Each fine type of the fine run under the coarse type of its cells (a fine
    type named like its coarse type is that node itself); coarse types under
    the root."""
    tree = {}
    for f, c in zip(fine[is_fine], coarse[is_fine]):
        if f != c:
            tree[f] = c
    for c in set(coarse) - {UNL}:
        tree[c] = ROOT
    return tree


def hide(fine, is_fine, seed: int, frac: float = 0.7) -> np.ndarray:
    """True for hidden cells: ``frac`` of each (run, fine type) group, at least
    one cell of each group kept."""
    rng = np.random.default_rng(seed)
    hidden = np.zeros(len(fine), bool)
    for run in (True, False):
        for t in np.unique(fine[is_fine == run]):
            idx = np.flatnonzero((fine == t) & (is_fine == run))
            k = min(round(frac * len(idx)), len(idx) - 1)
            hidden[rng.choice(idx, k, replace=False)] = True
    return hidden


# --------------------------------------------------------------- accuracy
def one_seed(data, seed: int, scvi_epochs: int, scanvi_epochs: int, threshold: float):
    import pandas as pd

    import jaxscanvi as js
    from jaxscanvi.data import hierarchy

    adata, fine, coarse, is_fine = data
    tree = derive_hierarchy(fine, coarse, is_fine)
    hidden = hide(fine, is_fine, seed)
    labelled_fine = np.where(is_fine, fine, coarse)
    cols = {
        "hier": np.where(hidden, UNL, labelled_fine),
        "flat_fine": np.where(hidden | ~is_fine, UNL, fine),
        "flat_coarse": np.where(hidden, UNL, coarse),
    }
    for k, v in cols.items():
        adata.obs[k] = pd.Categorical(v)
    t0 = time.perf_counter()
    js.SCVI.setup_anndata(adata, batch_key="batch")
    vae = js.SCVI(adata, seed=seed).train(scvi_epochs, progress_bar=False, seed=seed)
    models = {}
    for name in cols:
        kw = {"label_hierarchy": tree} if name == "hier" else {}
        m = js.SCANVI.from_scvi_model(vae, UNL, labels_key=name, adata=adata, **kw)
        models[name] = m.train(
            scanvi_epochs, n_samples_per_label=100, progress_bar=False, seed=seed
        )
    seconds = time.perf_counter() - t0
    pred = {k: np.asarray(m.predict(), str) for k, m in models.items()}
    up = dict(tree)

    def coarse_of(leaf):
        node = leaf
        while up.get(node, ROOT) != ROOT:
            node = up[node]
        return node

    fine_cells = hidden & is_fine
    coarse_cells = hidden & (coarse != UNL)
    # the coarse call: the most probable depth-1 node (its leaves' summed probability)
    hier_coarse = np.asarray(models["hier"].predict(level=1), str)
    leaf_coarse = np.array([coarse_of(p) for p in pred["hier"]])
    out = {
        "seed": seed,
        "seconds": round(seconds, 1),
        "fine_ba_hier": balanced_accuracy(fine[fine_cells], pred["hier"][fine_cells]),
        "fine_ba_flat": balanced_accuracy(fine[fine_cells], pred["flat_fine"][fine_cells]),
        "coarse_ba_hier": balanced_accuracy(coarse[coarse_cells], hier_coarse[coarse_cells]),
        "coarse_ba_flat": balanced_accuracy(
            coarse[coarse_cells], pred["flat_coarse"][coarse_cells]
        ),
        "coarse_ba_hier_leaf_ancestor": balanced_accuracy(
            coarse[coarse_cells], leaf_coarse[coarse_cells]
        ),
    }
    out["per_class"] = per_class(
        {"fine": (fine, fine_cells), "coarse": (coarse, coarse_cells)},
        {"hier": pred["hier"], "flat_fine": pred["flat_fine"]},
        {"hier": hier_coarse, "flat_coarse": pred["flat_coarse"]},
    )
    deep = models["hier"].predict(level="deepest", threshold=threshold)
    tree_obj = hierarchy.from_registry(models["hier"].registry)
    truth = np.where(is_fine, fine, coarse)
    out["deepest"] = deepest_summary(deep, truth, hidden & (truth != UNL), is_fine, tree_obj)
    return out


def per_class(truths: dict, fine_preds: dict, coarse_preds: dict) -> dict:
    """Per level and arm: each true type's recall on the hidden cells, and the
    confusion (true type -> predicted type -> count) of its misses."""
    out: dict = {}
    for level, preds in (("fine", fine_preds), ("coarse", coarse_preds)):
        truth, cells = truths[level]
        out[level] = {}
        for arm, p in preds.items():
            t, q = truth[cells], p[cells]
            miss: dict = {}
            for a, b in zip(t[t != q], q[t != q]):
                miss.setdefault(str(a), {}).setdefault(str(b), 0)
                miss[str(a)][str(b)] += 1
            out[level][arm] = {"recall": per_class_recall(t, q), "misses": miss}
    return out


def _ancestors(tree_obj, node: str) -> list[str]:
    up = dict(tree_obj.parent)
    path = [node]
    while path[-1] in up:
        path.append(up[path[-1]])
    return path


def deepest_summary(deep, truth, cells, is_fine, tree_obj) -> dict:
    """Per depth: fraction of ``cells`` called there, and the accuracy there (the
    call on the truth's path), over all cells and per run."""
    pred = deep["prediction"].to_numpy().astype(str)
    depth = deep["depth"].to_numpy()
    ok = np.array(
        [p in _ancestors(tree_obj, t) or t in _ancestors(tree_obj, p) for p, t in zip(pred, truth)]
    )
    out = {}
    for name, sel in (
        ("all", cells),
        ("fine_run", cells & is_fine),
        ("coarse_run", cells & ~is_fine),
    ):
        n = int(sel.sum())
        out[name] = {
            str(d): {
                "fraction": float((sel & (depth == d)).sum() / max(n, 1)),
                "accuracy": (
                    float(ok[sel & (depth == d)].mean()) if (sel & (depth == d)).any() else None
                ),
            }
            for d in (0, 1, 2)
        }
    return out


def paired(runs, a: str, b: str) -> dict:
    d = np.array([100 * (r[a] - r[b]) for r in runs])
    res = {
        "n": len(d),
        a: [100 * r[a] for r in runs],
        b: [100 * r[b] for r in runs],
        "difference_points": d.round(3).tolist(),
        "mean_difference": float(d.mean()) if len(d) else None,
    }
    if len(d) > 1:
        res["ci95"] = t_interval(d)
    return res


def part_accuracy(args) -> dict:
    data = load_synthetic() if args.smoke else load_pbmc(args.n_hvg)
    path = RESULTS / "hierarchy_accuracy.partial.json"
    runs = []
    if path.exists() and not args.smoke:
        runs = [r for r in json.loads(path.read_text()) if r["seed"] in args.seeds]
    for seed in args.seeds:
        if any(r["seed"] == seed for r in runs):
            continue
        r = one_seed(data, seed, args.scvi_epochs, args.scanvi_epochs, args.threshold)
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "deepest"}), flush=True)
        if not args.smoke:
            path.write_text(json.dumps(runs))
    runs.sort(key=lambda r: r["seed"])
    fine = paired(runs, "fine_ba_hier", "fine_ba_flat")
    coarse = paired(runs, "coarse_ba_hier", "coarse_ba_flat")
    coarse_leaf = paired(runs, "coarse_ba_hier_leaf_ancestor", "coarse_ba_flat")
    deep = {}
    for run in ("all", "fine_run", "coarse_run"):
        deep[run] = {}
        for d in ("0", "1", "2"):
            fr = [r["deepest"][run][d]["fraction"] for r in runs]
            acc = [
                r["deepest"][run][d]["accuracy"]
                for r in runs
                if r["deepest"][run][d]["accuracy"] is not None
            ]
            deep[run][d] = {
                "fraction_mean": float(np.mean(fr)),
                "accuracy_mean": float(np.mean(acc)) if acc else None,
            }
    return {
        "runs": runs,
        "fine_balanced_accuracy": fine,
        "coarse_balanced_accuracy": coarse,
        "coarse_balanced_accuracy_leaf_ancestor": coarse_leaf,
        "deepest_at_threshold": deep,
        "threshold": args.threshold,
        "hierarchy": derive_hierarchy(*data[1:]),
    }


def spawn(name: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kw)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {name} failed:\n{res.stderr[-3000:]}")


def part_steptime(smoke: bool) -> dict:
    kw = (
        dict(n_cells=600, n_genes=200, n_types=6, rounds=2, epochs_per_round=2, batch_size=128)
        if smoke
        else dict(
            n_cells=5000,
            n_genes=2000,
            n_types=10,
            rounds=16,
            epochs_per_round=3,
            batch_size=128,
        )
    )
    return spawn("steptime", **kw)


def part_scale(smoke: bool) -> list[dict]:
    sizes = (10, 100) if smoke else (10, 100, 1000)
    kw = (
        dict(n_cells=600, n_genes=200, batch_size=128, epochs=2)
        if smoke
        else dict(n_cells=5000, n_genes=2000, batch_size=128, epochs=3)
    )
    return [spawn("scale", n_labels=c, **kw) for c in sizes]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts",
        nargs="+",
        default=["accuracy", "steptime", "scale"],
        choices=["accuracy", "steptime", "scale"],
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--n-hvg", type=int, default=2000)
    p.add_argument("--scvi-epochs", type=int, default=60)
    p.add_argument("--scanvi-epochs", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--smoke", action="store_true", help="every part tiny, for the tests")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None)
    p.add_argument("--kwargs", default="{}")
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return 0
    if args.smoke:
        args.seeds, args.scvi_epochs, args.scanvi_epochs = args.seeds[:2], 2, 2
    out_path = args.out or RESULTS / ("hierarchy_smoke.json" if args.smoke else "hierarchy.json")
    doc = json.loads(out_path.read_text()) if out_path.exists() and not args.smoke else {}
    doc.update({"method": __doc__, "versions": versions(), "machine": machine_info(with_jax=False)})
    if "accuracy" in args.parts:
        if not DATA.exists() and not args.smoke:
            print(f"hierarchy: {DATA} absent; accuracy part skipped", file=sys.stderr)
        else:
            doc["accuracy"] = part_accuracy(args)
            write_json(out_path, doc)
    if "steptime" in args.parts:
        doc["steptime"] = part_steptime(args.smoke)
        write_json(out_path, doc)
    if "scale" in args.parts:
        doc["scale"] = part_scale(args.smoke)
        write_json(out_path, doc)
    print(
        json.dumps(
            {k: v for k, v in doc.items() if k not in ("method", "versions")}, indent=1, default=str
        )[:4000]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

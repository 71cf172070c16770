"""The step-time and scale workers of benchmarks/hierarchy.py, each run in a
fresh process (hierarchy.py's docstring describes the parts)."""

from __future__ import annotations

import time

import numpy as np
from _common import peak_rss_mb

ROOT = "PBMC"
UNL = "Unknown"


# -------------------------------------------------------------- step time
def synthetic_adata(n_cells: int, n_genes: int, n_types: int, seed: int = 0):
    import anndata as ad
    from _scale_workers import obs_frame, synthetic_csr

    X = synthetic_csr(n_cells, n_genes, 300, seed=seed)
    obs = obs_frame(n_cells, 2, n_types, seed=seed)
    types = obs["cell_type"].astype(str).to_numpy()
    types[:n_types] = [f"t{i}" for i in range(n_types)]  # every type has cells
    obs["cell_type"] = types
    return ad.AnnData(X, obs=obs)


def depth6_tree(n_leaves: int, depth: int = 6) -> dict[str, str]:
    """Leaves t0.. at depth ``depth``: level k groups leaves into about
    n_leaves**(k/depth) nodes, so the tree fans out evenly (single-child chains
    where C is small)."""
    tree = {}
    for leaf in range(n_leaves):
        parent = ROOT
        for k in range(1, depth):
            n_k = max(1, round(n_leaves ** (k / depth)))
            node = f"n{k}_{leaf * n_k // n_leaves}"
            tree[node] = parent
            parent = node
        tree[f"t{leaf}"] = parent
    return tree


def worker_scale(n_labels: int, n_cells: int, n_genes: int, batch_size: int, epochs: int) -> dict:
    """scANVI step time and peak RSS with C leaves under a depth-6 tree; a quarter
    of the cells labelled at a leaf, a quarter at one of its ancestors."""
    import pandas as pd

    import jaxscanvi as js

    adata = synthetic_adata(n_cells, n_genes, n_labels)
    tree = depth6_tree(n_labels)
    types = adata.obs["cell_type"].to_numpy().astype(object)
    rng = np.random.default_rng(0)
    labels = types.copy()
    r = rng.random(n_cells)
    for i in np.flatnonzero(r < 0.25):
        path = [types[i]]
        while path[-1] in tree:
            path.append(tree[path[-1]])
        labels[i] = path[rng.integers(1, len(path) - 1)]
    labels[r >= 0.5] = UNL
    first_of_each = pd.Series(np.arange(n_cells)).groupby(types).first().to_numpy()
    labels[first_of_each] = types[first_of_each]  # every leaf has a cell
    adata.obs["label"] = pd.Categorical(labels)
    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category=UNL, batch_key="batch", label_hierarchy=tree
    )
    model = js.SCANVI(adata)
    before = peak_rss_mb()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        progress_bar=False,
        calibrate=False,
    )
    secs = model.history.to_frame()["epoch_seconds"].to_numpy()
    steps = -(-n_cells // batch_size)
    return {
        "n_labels": n_labels,
        "n_nodes": len(set(tree) | {ROOT}),
        "depth": 6,
        "n_cells": n_cells,
        "n_genes": n_genes,
        "steps_per_epoch": steps,
        "first_epoch_seconds": round(float(secs[0]), 2),
        "epoch_seconds_median": round(float(np.median(secs[1:])), 3),
        "step_ms": round(1000 * float(np.median(secs[1:])) / steps, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_before_training_mb": round(before, 1),
        "final_loss_finite": bool(
            np.isfinite(model.history.to_frame()["train_loss"].to_numpy()[-1])
        ),
    }


def worker_steptime(
    n_cells: int, n_genes: int, n_types: int, rounds: int, epochs_per_round: int, batch_size: int
) -> dict:
    """No hierarchy against a flat one (each type under the root), same data, in
    alternating rounds of ``epochs_per_round`` epochs. Per round: each arm's median
    epoch (wall) and its train call's process CPU time (all threads), which other
    jobs on a shared machine disturb less; the figure is the median over rounds
    of the round's flat / none ratio, so slow drifts in load cancel."""
    import pandas as pd

    import jaxscanvi as js

    adata = synthetic_adata(n_cells, n_genes, n_types)
    labels = adata.obs["cell_type"].to_numpy().astype(object)
    labels[np.random.default_rng(0).random(n_cells) < 0.5] = UNL
    adata.obs["label"] = pd.Categorical(labels)
    flat = {t: ROOT for t in adata.obs["cell_type"].unique()}
    models = {}
    for name, tree in (("none", None), ("flat", flat)):
        js.SCANVI.setup_anndata(
            adata,
            labels_key="label",
            unlabeled_category=UNL,
            batch_key="batch",
            label_hierarchy=tree,
        )
        models[name] = js.SCANVI(adata, seed=0)
    wall: dict[str, list[float]] = {"none": [], "flat": []}
    cpu: dict[str, list[float]] = {"none": [], "flat": []}
    for rnd in range(rounds + 1):  # round 0 compiles
        for name in ("none", "flat") if rnd % 2 == 0 else ("flat", "none"):
            c0 = time.process_time()
            models[name].train(
                max_epochs=epochs_per_round,
                batch_size=batch_size,
                train_size=1.0,
                progress_bar=False,
                calibrate=False,
                seed=rnd,
            )
            c1 = time.process_time()
            secs = models[name].history.to_frame()["epoch_seconds"].to_numpy()
            if rnd > 0:
                wall[name].append(float(np.median(secs)))
                cpu[name].append(c1 - c0)
    steps = -(-n_cells // batch_size)
    ratio_wall = np.asarray(wall["flat"]) / np.asarray(wall["none"])
    ratio_cpu = np.asarray(cpu["flat"]) / np.asarray(cpu["none"])
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_types": n_types,
        "rounds": rounds,
        "epochs_per_round": epochs_per_round,
        "steps_per_epoch": steps,
        # equal configs: the flat arm trains with the none arm's compiled program
        "same_config": models["flat"].module.config == models["none"].module.config,
        "step_ms_none": round(1000 * float(np.median(wall["none"])) / steps, 3),
        "step_ms_flat_hierarchy": round(1000 * float(np.median(wall["flat"])) / steps, 3),
        "ratio_flat_over_none_wall": round(float(np.median(ratio_wall)), 4),
        "ratio_flat_over_none_cpu": round(float(np.median(ratio_cpu)), 4),
        "ratio_cpu_per_round": ratio_cpu.round(4).tolist(),
        "ratio_wall_per_round": ratio_wall.round(4).tolist(),
        "round_wall_median_epoch_seconds": wall,
        "round_cpu_seconds": cpu,
    }


WORKERS = {"scale": worker_scale, "steptime": worker_steptime}

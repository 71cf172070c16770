"""A synthetic single-cell atlas with batches, a cell-type hierarchy and NB counts.

Cell types belong to lineages; each lineage and each type up-regulates its
own marker genes. Batches scale genes (log-normal) and shift library sizes,
so a model must remove them to mix batches. Counts are negative binomial
with per-gene dispersion, like droplet UMI data.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_atlas(  # noqa: PLR0913 - the simulation's knobs, keyword-only
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 2,
    n_lineages: int = 3,
    types_per_lineage: int = 2,
    seed: int = 0,
    *,
    batch_effect: float = 0.5,
    library_log_mean: float = 7.0,
    library_log_sd: float = 0.35,
    markers_per_type: int = 15,
    marker_lfc: float = 2.0,
    de_genes: dict[str, list[int]] | None = None,
    dtype=np.float32,
) -> ad.AnnData:
    """Simulate an AnnData of raw counts.

    ``obs`` holds ``batch``, ``cell_type`` and ``lineage`` (categoricals);
    ``var`` holds ``marker_of`` (the type or lineage a gene marks, or "").
    ``uns['synthetic']['de_genes']`` maps each type to its marker gene indices;
    ``type_logits`` (types x genes), ``batch_lfc`` (batches x genes) and
    ``type_weights`` hold the ground truth the counts were drawn from.
    """
    rng = np.random.default_rng(seed)
    types, lineage_of, logits, marker_of, type_markers = _programme(
        rng, n_genes, n_lineages, types_per_lineage, markers_per_type, marker_lfc
    )
    counts, cell_type, batch, batch_lfc, weights = _draw_counts(
        rng,
        logits,
        n_cells,
        n_batches,
        (batch_effect, library_log_mean, library_log_sd),
        dtype,
    )
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(
                [f"batch{b}" for b in batch], categories=[f"batch{b}" for b in range(n_batches)]
            ),
            "cell_type": pd.Categorical([types[t] for t in cell_type], categories=types),
            "lineage": pd.Categorical(
                [f"L{lineage_of[t]}" for t in cell_type],
                categories=[f"L{l}" for l in range(n_lineages)],
            ),
        },
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(
        {"marker_of": marker_of.astype(str)}, index=pd.Index([f"gene{g}" for g in range(n_genes)])
    )
    X = sp.csr_matrix(counts)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    adata.uns["synthetic"] = {
        "seed": seed,
        "de_genes": {k: v.tolist() for k, v in type_markers.items()},
        # ground truth for tests: per-type log expression (up to a constant),
        # per-batch log fold changes, and the type proportions
        "type_logits": logits.astype(np.float32),
        "batch_lfc": batch_lfc.astype(np.float32),
        "type_weights": weights.astype(np.float32),
    }
    return adata


def _programme(rng, n_genes, n_lineages, types_per_lineage, markers_per_type, marker_lfc):
    """Type names, each type's lineage, per-type logits and the marker genes.

    Draws only the base expression and the gene permutation, in that order,
    so that the counts drawn after stay the same for a seed.
    """
    n_types = n_lineages * types_per_lineage
    types = [f"L{l}_T{t}" for l in range(n_lineages) for t in range(types_per_lineage)]
    lineage_of = np.repeat(np.arange(n_lineages), types_per_lineage)

    base = rng.normal(0.0, 1.0, n_genes)  # log expression shape across genes
    free = rng.permutation(n_genes)
    marker_of = np.full(n_genes, "", dtype=object)
    take = 0
    lin_markers = []
    for l in range(n_lineages):
        g = free[take : take + markers_per_type]
        take += markers_per_type
        marker_of[g] = f"L{l}"
        lin_markers.append(g)
    type_markers = {}
    for name in types:
        g = free[take : take + markers_per_type]
        take += markers_per_type
        marker_of[g] = name
        type_markers[name] = g
    if take > n_genes:
        raise ValueError(
            f"n_genes={n_genes} is too small for {n_types} types with "
            f"{markers_per_type} markers each"
        )
    logits = np.tile(base, (n_types, 1))
    for t, name in enumerate(types):
        logits[t, lin_markers[lineage_of[t]]] += marker_lfc * 0.75
        logits[t, type_markers[name]] += marker_lfc
    return types, lineage_of, logits, marker_of, type_markers


def _draw_counts(rng, logits, n_cells, n_batches, library, dtype):
    """Batch effects, type and batch per cell, and the NB counts.

    ``library`` is (batch_effect, library_log_mean, library_log_sd).
    """
    batch_effect, library_log_mean, library_log_sd = library
    n_types, n_genes = logits.shape
    batch_lfc = rng.normal(0.0, batch_effect, (n_batches, n_genes))
    batch_lib_shift = rng.normal(0.0, 0.3, n_batches)
    theta = rng.gamma(2.0, 2.0, n_genes) + 0.2

    weights = rng.dirichlet(np.full(n_types, 4.0))
    cell_type = rng.choice(n_types, n_cells, p=weights)
    batch = rng.integers(0, n_batches, n_cells)
    lib = np.exp(rng.normal(library_log_mean + batch_lib_shift[batch], library_log_sd))
    cell_noise = rng.normal(0.0, 0.2, (n_cells, n_genes))
    log_rho = logits[cell_type] + batch_lfc[batch] + cell_noise
    rho = np.exp(log_rho - log_rho.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    mu = lib[:, None] * rho
    lam = rng.gamma(theta[None, :], mu / theta[None, :])
    counts = rng.poisson(lam).astype(dtype)
    empty = counts.sum(1) == 0
    counts[empty, rng.integers(0, n_genes, empty.sum())] = 1
    return counts, cell_type, batch, batch_lfc, weights

"""Bayesian differential expression statistics, as scvi-tools computes them.

The model methods draw posterior samples of normalized expression (on the
device); these functions turn two stacks of samples, shape (S, G), into the
per-gene columns scvi-tools reports.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

EPS = 1e-8


def vanilla(scales1: np.ndarray, scales2: np.ndarray) -> dict[str, np.ndarray]:
    """Bayes factor of h1 > h2 (Lopez et al. 2018)."""
    p1 = np.mean(scales1 > scales2, 0)
    p2 = 1.0 - p1
    return {"proba_m1": p1, "proba_m2": p2,
            "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS)}


def lfc(x, y, pseudocounts: float):
    return np.log2(x + pseudocounts) - np.log2(y + pseudocounts)


def change(scales1: np.ndarray, scales2: np.ndarray, *, delta: float, pseudocounts: float,
           test_mode: str = "three") -> dict[str, np.ndarray]:
    """Posterior probability that |LFC| >= delta (Boyeau et al. 2019), and LFC summaries."""
    dist = lfc(scales1, scales2, pseudocounts)
    p_plus = np.mean(dist >= delta, 0)
    p_minus = np.mean(dist < -delta, 0)
    proba_de = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
    # LFC summaries with a much smaller offset, so they estimate the fold change itself
    summary = describe(lfc(scales1, scales2, 1e-3 * pseudocounts))
    return {"proba_de": proba_de, "proba_not_de": 1.0 - proba_de,
            "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
            "pseudocounts": np.full(dist.shape[1], pseudocounts), "delta": np.full(
                dist.shape[1], delta), **{"lfc_" + k: v for k, v in summary.items()}}


def describe(samples: np.ndarray) -> dict[str, np.ndarray]:
    return {"mean": samples.mean(0), "median": np.median(samples, 0),
            "std": samples.std(0), "min": samples.min(0), "max": samples.max(0)}


def pseudocounts_offset(scales_a, scales_b, where_zero_a, where_zero_b,
                        quantile: float = 0.9) -> float:
    """Offset that shrinks the LFC of genes not expressed in either group towards 0."""
    max_a, max_b = scales_a.max(0), scales_b.max(0)
    eps_a = np.quantile(max_a[where_zero_a], quantile) if where_zero_a.any() else 1e-10
    eps_b = np.quantile(max_b[where_zero_b], quantile) if where_zero_b.any() else 1e-10
    return float(max(1e-10, max(eps_a, eps_b) / len(max_a)))


def fdr_de_prediction(proba_de: pd.Series, fdr: float = 0.05) -> pd.Series:
    """Largest set of top genes whose posterior expected FDR is <= fdr."""
    order = proba_de.sort_values(ascending=False)
    cum_fdr = (1.0 - order).cumsum() / (1.0 + np.arange(len(order)))
    d = int((cum_fdr <= fdr).sum())
    out = pd.Series(np.zeros(len(order), bool), index=order.index)
    out.iloc[:d] = True
    return out.loc[proba_de.index]


def raw_counts_properties(X: sp.csr_matrix, idx1: np.ndarray, idx2: np.ndarray
                          ) -> dict[str, np.ndarray]:
    """Per-gene raw means, non-zero proportions and means of counts scaled to 1e4 per cell."""
    lib = np.asarray(X.sum(1)).ravel()
    scale = sp.diags((1e4 / np.maximum(lib, 1e-12)).astype(np.float64))
    out = {}
    subs = {"1": X[idx1], "2": X[idx2]}
    for k, sub in subs.items():
        out["raw_mean" + k] = np.asarray(sub.mean(0)).ravel()
    for k, sub in subs.items():
        out["non_zeros_proportion" + k] = np.asarray((sub != 0).mean(0)).ravel()
    normed = scale @ X
    for k, idx in (("1", idx1), ("2", idx2)):
        out["raw_normalized_mean" + k] = np.asarray(normed[idx].mean(0)).ravel()
    return out

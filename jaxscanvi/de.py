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
    return {"proba_m1": p1, "proba_m2": p2, "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS)}


def lfc(x, y, pseudocounts: float):
    return np.log2(x + pseudocounts) - np.log2(y + pseudocounts)


def change(
    scales1: np.ndarray,
    scales2: np.ndarray,
    *,
    delta: float | None,
    pseudocounts: float,
    test_mode: str = "three",
) -> dict[str, np.ndarray]:
    """Posterior probability that |LFC| >= delta (Boyeau et al. 2019), and LFC summaries.
    ``delta=None``: estimated from the LFCs (`estimate_delta`)."""
    dist = lfc(scales1, scales2, pseudocounts)
    if delta is None:
        delta = estimate_delta(dist.mean(0))
    p_plus = np.mean(dist >= delta, 0)
    p_minus = np.mean(dist < -delta, 0)
    proba_de = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
    # LFC summaries with a much smaller offset, so they estimate the fold change itself
    summary = describe(lfc(scales1, scales2, 1e-3 * pseudocounts))
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "pseudocounts": np.full(dist.shape[1], pseudocounts),
        "delta": np.full(dist.shape[1], delta),
        **{"lfc_" + k: v for k, v in summary.items()},
    }


def describe(samples: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "mean": samples.mean(0),
        "median": np.median(samples, 0),
        "std": samples.std(0),
        "min": samples.min(0),
        "max": samples.max(0),
    }


def pseudocounts_offset(
    scales_a, scales_b, where_zero_a, where_zero_b, quantile: float = 0.9
) -> float:
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


def raw_counts_properties(
    X: sp.csr_matrix, idx1: np.ndarray, idx2: np.ndarray
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


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """scvi-tools' automatic LFC threshold (``delta=None``): fit a 3-component
    Gaussian mixture to the genes' mean LFCs, take ``coef`` times the mean
    absolute value of its lowest and highest component means, at least
    ``min_thres``."""
    means = gaussian_mixture_means(np.asarray(lfc_means, np.float64).ravel(), 3)
    return float(max(min_thres, coef * np.abs(means[[0, -1]]).mean()))


def gaussian_mixture_means(
    x: np.ndarray, k: int, *, max_iter: int = 100, tol: float = 1e-3, reg: float = 1e-6
) -> np.ndarray:
    """Sorted component means of a 1-D Gaussian mixture fitted by EM.

    Started, like scikit-learn's GaussianMixture, from a k-means partition
    (here seeded at the quantiles, so the fit is deterministic); stops when
    the mean log-likelihood changes by less than ``tol``.
    """
    centres = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(100):  # Lloyd's k-means in 1-D
        assign = np.abs(x[:, None] - centres[None]).argmin(1)
        new = np.array(
            [x[assign == j].mean() if (assign == j).any() else centres[j] for j in range(k)]
        )
        if np.allclose(new, centres):
            break
        centres = new
    resp = np.eye(k)[assign]
    previous = -np.inf
    for _ in range(max_iter):
        nk = resp.sum(0) + 10 * np.finfo(float).eps
        mu = resp.T @ x / nk
        var = (resp * (x[:, None] - mu) ** 2).sum(0) / nk + reg
        logp = (
            np.log(nk / len(x)) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[:, None] - mu) ** 2 / var
        )
        top = logp.max(1, keepdims=True)
        log_norm = top + np.log(np.exp(logp - top).sum(1, keepdims=True))
        resp = np.exp(logp - log_norm)
        ll = float(log_norm.mean())
        if abs(ll - previous) < tol:
            break
        previous = ll
    return np.sort(mu)


def robust_inliers(
    reps: np.ndarray, contamination: float = 0.1, seed: int = 0
) -> np.ndarray | None:
    """Which rows of ``reps`` (cells' latent positions) are not outliers, as
    scikit-learn's EllipticEnvelope() decides (scvi-tools' ``filter_outlier_cells``):
    a minimum covariance determinant fit (C-steps from several starts on
    half the points, consistency-corrected and reweighted), then the
    ``contamination`` share of cells farthest from it in Mahalanobis
    distance are outliers. None when the covariance cannot be estimated.
    """
    from scipy.stats import chi2

    X = np.asarray(reps, np.float64)
    n, p = X.shape
    h = int(np.ceil(0.5 * (n + p + 1)))
    if n <= p + 1:
        return None

    def fit(rows):
        loc = X[rows].mean(0)
        cov = np.cov(X[rows].T, bias=True).reshape(p, p)
        sign, logdet = np.linalg.slogdet(cov)
        return loc, cov, (logdet if sign > 0 else np.inf)

    def dist(loc, cov):
        diff = X - loc
        return np.einsum("ij,ij->i", diff @ np.linalg.pinv(cov), diff)

    rng = np.random.default_rng(seed)
    starts = [np.arange(n)] + [rng.choice(n, p + 1, replace=False) for _ in range(30)]
    best = None
    for rows in starts:
        loc, cov, logdet = fit(rows)
        for _ in range(30):  # C-steps: refit on the h closest points until stable
            new = np.sort(np.argsort(dist(loc, cov), kind="stable")[:h])
            if len(new) == len(rows) and (new == rows).all():
                break
            rows = new
            loc, cov, logdet = fit(rows)
        if np.isfinite(logdet) and (best is None or logdet < best[2]):
            best = (loc, cov, logdet)
    if best is None:
        return None
    d = dist(best[0], best[1])
    d = d / (np.median(d) / chi2(p).isf(0.5))  # consistency correction
    keep = d < chi2(p).isf(0.025)  # reweighting
    if keep.sum() <= p:
        return None
    loc, cov, logdet = fit(np.flatnonzero(keep))
    if not np.isfinite(logdet):
        return None
    d = dist(loc, cov)
    return -d >= np.percentile(-d, 100.0 * contamination)

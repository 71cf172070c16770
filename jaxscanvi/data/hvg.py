"""Highly variable genes by scanpy's flavours, without scanpy.

``flavor="seurat_v3"`` (counts; what scvi-tools' tutorials use) and
``flavor="seurat"`` (log-normalised data) follow ``scanpy.pp.highly_variable_genes``
step for step: the same statistics, ranks, ties and batch rules. seurat_v3
fits log-variance against log-mean by loess; scanpy calls scikit-misc (netlib's
loess), and `loess` here does the same computation (the k-d tree, the vertex
fits and their cubic interpolation), equal to it to about 1e-12.
`tests/test_parity_hvg.py` checks the genes against scanpy's own.

``flavor="variance"`` keeps the older rule: the variance of log-normalised
counts, ranked within each batch and then by the median rank.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .counts import counts_matrix

FLAVORS = ("seurat_v3", "seurat", "variance")


def highly_variable_genes(
    adata,
    n_top_genes: int = 2000,
    layer: str | None = None,
    batch_key: str | None = None,
    flavor: str = "seurat_v3",
    span: float = 0.3,
) -> np.ndarray:
    """A boolean mask over ``adata.var_names`` of the ``n_top_genes`` most variable genes.

    ``flavor``: ``"seurat_v3"`` on raw counts (scanpy's and scvi-tools' choice),
    ``"seurat"`` on log-normalised values, or ``"variance"``. ``span``: the
    loess span of seurat_v3's mean-variance fit.
    """
    if not isinstance(n_top_genes, (int, np.integer)) or n_top_genes <= 0:
        raise InputError(
            "n_top_genes", n_top_genes, "must be a positive integer", "pass e.g. n_top_genes=2000"
        )
    if flavor not in FLAVORS:
        raise InputError(
            "flavor", flavor, f"is not one of {FLAVORS}", "pass flavor='seurat_v3' for raw counts"
        )
    if batch_key is not None and batch_key not in adata.obs.columns:
        raise InputError(
            "batch_key",
            batch_key,
            "not a column of adata.obs",
            "pass the name of the batch column, or None",
        )
    X = (
        adata.layers[layer]
        if (flavor == "seurat" and layer)
        else (adata.X if flavor == "seurat" else counts_matrix(adata, layer))
    )
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = X.tocsr() if sp.issparse(X) else np.asarray(X)
    batches = None if batch_key is None else adata.obs[batch_key]
    n = min(int(n_top_genes), adata.n_vars)
    if flavor == "seurat_v3":
        return _seurat_v3(X, batches, n, span)
    if flavor == "seurat":
        return _seurat(X, batches, n)
    return _variance(X, batches, n)


# ---------------------------------------------------------------- seurat_v3
def _seurat_v3(X, batches, n_top: int, span: float) -> np.ndarray:
    codes = np.zeros(X.shape[0], int) if batches is None else np.asarray(batches)
    norm_vars = []
    for b in np.unique(codes):
        Xb = X[codes == b]
        mean, var = mean_var(Xb)
        not_const = var > 0
        log_fit = np.zeros(X.shape[1])
        log_fit[not_const] = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span)
        reg_std = np.sqrt(10**log_fit)
        n_obs = Xb.shape[0]
        clip = reg_std * np.sqrt(n_obs) + mean  # Seurat clips at sqrt(n) sds
        s1, s2 = _clipped_sums(Xb, clip)
        norm_vars.append((n_obs * mean**2 + s2 - 2 * s1 * mean) / ((n_obs - 1) * reg_std**2))
    norm_vars = np.stack(norm_vars)
    ranks = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    n_batches_hv = (ranks < n_top).sum(0)
    ranks[ranks >= n_top] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    order = (
        pd.DataFrame({"rank": median_rank, "nb": n_batches_hv})
        .sort_values(["rank", "nb"], ascending=[True, False], na_position="last")
        .index
    )
    return _mask(X.shape[1], np.asarray(order)[:n_top])


def _clipped_sums(X, clip: np.ndarray):
    """Per gene: sum and sum of squares of min(count, clip[gene])."""
    if sp.issparse(X):
        X = X.tocsr()
        v = np.minimum(X.data.astype(np.float64), clip[X.indices])
        s1 = np.bincount(X.indices, v, minlength=X.shape[1])
        s2 = np.bincount(X.indices, v * v, minlength=X.shape[1])
        return s1, s2
    v = np.minimum(np.asarray(X, np.float64), clip)
    return v.sum(0), (v * v).sum(0)


def loess(
    x: np.ndarray, y: np.ndarray, span: float = 0.3, cell: float = 0.2, surface: str = "interpolate"
) -> np.ndarray:
    """Cleveland's loess of y on x (local quadratic, tricube weights on the
    ``floor(span * n)`` nearest points, gaussian family), at every x.

    ``surface="interpolate"`` does what netlib's loess (and so R and
    scikit-misc) does by default: fit value and slope at the vertices of a k-d
    tree whose cells hold at most ``floor(n * span * cell)`` points, and join
    them by cubic Hermite interpolation. ``"direct"`` fits at every point.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    q = min(n, int(np.floor(n * span + 1e-5)))
    if q < 3:
        raise InputError(
            "span",
            span,
            f"keeps {q} of {n} points, fewer than the 3 a local quadratic needs",
            "pass a larger span",
        )
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    if surface == "direct":
        fitted = _local_fit(xs, ys, xs, q)[0]
    else:
        verts = _kd_vertices(xs, max(int(np.floor(n * span * cell)), 1))
        value, slope = _local_fit(xs, ys, verts, q)
        fitted = _hermite(verts, value, slope, xs)
    out = np.empty(n)
    out[order] = fitted
    return out


def _local_fit(xs, ys, at, q: int, chunk: int = 256):
    """Value and slope at each point of ``at`` of the tricube-weighted local
    quadratic through the q points of sorted ``xs`` nearest it."""
    lo = _nearest_windows(xs, at, q)
    value, slope = np.empty(at.size), np.empty(at.size)
    window = np.arange(q)
    for start in range(0, at.size, chunk):
        sl = slice(start, min(start + chunk, at.size))
        idx = lo[sl, None] + window
        d = xs[idx] - at[sl, None]
        rho = np.abs(d).max(1, keepdims=True)  # the q-th nearest: weight 0
        rho = np.where(rho > 0, rho, 1.0)
        w = (1 - np.minimum(np.abs(d) / rho, 1) ** 3) ** 3
        # least squares in (1, d, d^2) centred at the point, d scaled by rho
        # for conditioning: the intercept is the value, b1 / rho the slope
        u = d / rho
        basis = np.stack([np.ones_like(u), u, u * u], -1)
        wb = basis * w[..., None]
        gram = np.einsum("cki,ckj->cij", wb, basis)
        rhs = np.einsum("cki,ck->ci", wb, ys[idx])
        coef = np.linalg.solve(gram + 1e-12 * np.eye(3), rhs[..., None])[..., 0]
        value[sl], slope[sl] = coef[:, 0], coef[:, 1] / rho[:, 0]
    return value, slope


def _kd_vertices(xs: np.ndarray, fc: int) -> np.ndarray:
    """Cell boundaries of netlib loess' k-d tree over sorted 1-d points: the box
    widened by 0.5 %, cells split at their median point (ties kept on one side)
    until they hold at most ``fc`` points."""
    lo_x, hi_x = xs[0], xs[-1]
    margin = 0.005 * max(hi_x - lo_x, 1e-10 * max(abs(lo_x), abs(hi_x)) + 1e-30)
    verts = {lo_x - margin, hi_x + margin}
    cells = [(0, xs.size - 1, lo_x - margin, hi_x + margin)]
    while cells:
        l, u, v0, v1 = cells.pop()
        if u - l + 1 <= fc:
            continue
        m = _split_point(xs, l, u)
        split = xs[m]
        if split in (v0, v1):
            continue
        verts.add(split)
        cells += [(l, m, v0, split), (m + 1, u, split, v1)]
    return np.array(sorted(verts))


def _split_point(xs, l: int, u: int) -> int:
    """The median index, moved 0, +1, -1, +2, ... to the first place where the
    next point differs, so tied points stay in one cell."""
    m = (l + u) // 2
    offset = 0
    while l <= m + offset < u:
        if xs[m + offset] != xs[m + offset + 1]:
            return m + offset
        offset = -offset if offset > 0 else -offset + 1
    return m


def _hermite(verts, value, slope, z):
    """Cubic Hermite interpolation of (value, slope) given at ``verts``, at z."""
    j = np.clip(np.searchsorted(verts, z, side="left") - 1, 0, verts.size - 2)
    h = verts[j + 1] - verts[j]
    t = (z - verts[j]) / h
    phi0, phi1 = (1 - t) ** 2 * (1 + 2 * t), t**2 * (3 - 2 * t)
    psi0, psi1 = t * (1 - t) ** 2, -(t**2) * (1 - t)
    return phi0 * value[j] + phi1 * value[j + 1] + (psi0 * slope[j] + psi1 * slope[j + 1]) * h


def _nearest_windows(xs: np.ndarray, at: np.ndarray, q: int) -> np.ndarray:
    """For each point of ``at``, the start of the window of q consecutive points
    of sorted ``xs`` nearest it (in 1-d the q nearest points are contiguous).

    Moving the start right, the window's left reach falls and its right reach
    grows: binary search for the first start whose right reach is at least its
    left reach, then keep it or the one before, whichever reaches less far.
    """
    n = xs.size
    lo, hi = np.zeros(at.size, int), np.full(at.size, n - q + 1)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        mid_c = np.minimum(mid, n - q)
        right_wins = (xs[mid_c + q - 1] - at >= at - xs[mid_c]) | (mid > n - q)
        active = lo < hi
        hi = np.where(active & right_wins, mid, hi)
        lo = np.where(active & ~right_wins, mid + 1, lo)
    best = np.minimum(lo, n - q)
    prev = np.maximum(best - 1, 0)

    def reach(s):
        return np.maximum(np.abs(at - xs[s]), np.abs(xs[s + q - 1] - at))

    return np.where(reach(prev) < reach(best), prev, best)


# ------------------------------------------------------------------ seurat
def _seurat(X, batches, n_top: int) -> np.ndarray:
    if batches is None:
        return _mask(X.shape[1], _top_dispersion(_dispersion_table(X), n_top))
    cats = batches.astype("category").cat.categories
    codes = np.asarray(batches)
    hv_count = np.zeros(X.shape[1], int)
    frames = []
    for b in cats:
        Xb = X[codes == b]
        expressed = np.asarray((Xb != 0).sum(0)).ravel() > 0  # scanpy drops the rest
        df = _dispersion_table(Xb[:, expressed])
        hv = np.zeros(expressed.sum(), bool)
        hv[_top_dispersion(df, n_top)] = True
        full = pd.DataFrame(
            0.0, index=np.arange(X.shape[1]), columns=pd.Index(["dispersions_norm"])
        )
        full.loc[np.flatnonzero(expressed), "dispersions_norm"] = df["dispersions_norm"].to_numpy()
        hv_count[np.flatnonzero(expressed)] += hv
        frames.append(full["dispersions_norm"].to_numpy())
    disp = np.nanmean(np.stack(frames), 0)
    order = (
        pd.DataFrame({"nb": hv_count, "disp": disp})
        .sort_values(["nb", "disp"], ascending=False, na_position="last")
        .index
    )
    return _mask(X.shape[1], np.asarray(order)[:n_top])


def _dispersion_table(X, n_bins: int = 20) -> pd.DataFrame:
    X = X.copy()
    if sp.issparse(X):
        X.data = np.expm1(X.data)
    else:
        X = np.expm1(np.asarray(X, np.float64))
    mean, var = mean_var(X)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": np.log(disp)})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = pd.isna(stats["dev"])  # a bin with one gene: normalised dispersion 1
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    return df


def _top_dispersion(df: pd.DataFrame, n_top: int) -> np.ndarray:
    """Genes whose normalised dispersion reaches the n-th highest (ties kept)."""
    d = df["dispersions_norm"].to_numpy()
    finite = np.sort(d[~np.isnan(d)])[::-1]
    cut = finite[min(n_top, finite.size) - 1]
    return np.flatnonzero(np.nan_to_num(d, nan=-np.inf) >= cut)


# ---------------------------------------------------------------- variance
def _variance(X, batches, n_top: int) -> np.ndarray:
    if batches is None:
        score = -_log_norm_var(X)
    else:
        codes = np.asarray(batches).astype(str)
        ranks = []
        for b in np.unique(codes):
            v = _log_norm_var(X[np.flatnonzero(codes == b)])
            ranks.append(np.argsort(np.argsort(-v, kind="stable"), kind="stable"))
        score = np.median(np.stack(ranks), 0) - 1e-9 * _log_norm_var(X)
    return _mask(X.shape[1], np.argsort(score, kind="stable")[:n_top])


def _log_norm_var(X) -> np.ndarray:
    X = sp.csr_matrix(X, dtype=np.float64)
    lib = np.asarray(X.sum(1)).ravel()
    lib[lib == 0] = 1.0
    norm = sp.csr_matrix(sp.diags(1e4 / lib) @ X)
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    sq = np.asarray(norm.multiply(norm).mean(0)).ravel()
    return sq - mean**2


# ------------------------------------------------------------------ shared
def mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance (float64), as scanpy computes them."""
    n = X.shape[0]
    if sp.issparse(X):
        X = X.tocsr()
        mean = np.asarray(X.sum(0, dtype=np.float64)).ravel() / n
        sq = np.bincount(X.indices, X.data.astype(np.float64) ** 2, minlength=X.shape[1]) / n
    else:
        X = np.asarray(X, np.float64)
        mean, sq = X.mean(0), (X * X).mean(0)
    var = sq - mean**2
    if n > 1:
        var *= n / (n - 1)
    return mean, var


def _mask(n: int, chosen) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[np.asarray(chosen, int)] = True
    return mask

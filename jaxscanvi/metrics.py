"""Small numpy/scipy metrics for judging embeddings (no sklearn), used by the tests
and benchmarks.

* `knn_indices`: exact k nearest neighbours (Euclidean), self excluded.
* `knn_accuracy`: leave-one-out kNN classification accuracy (majority vote).
* `batch_entropy`: mean entropy of batch labels among each cell's k
  neighbours, normalised by log(n_batches): 1 = perfectly mixed, 0 = separated.
* `pca_log_normalized`: PCA of log1p(counts / library * 1e4), the usual
  uncorrected baseline embedding.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def knn_indices(z: np.ndarray, k: int = 15, query: np.ndarray | None = None,
                chunk: int = 1024) -> np.ndarray:
    """Indices (len(query), k) of the k nearest cells of ``z`` to each query cell.

    ``query`` holds row indices into ``z`` (default: all cells); a cell is never
    its own neighbour (leave-one-out).
    """
    z = np.asarray(z, np.float64)
    n = z.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k={k} must lie in (0, {n})")
    query = np.arange(n) if query is None else np.asarray(query)
    sq = (z ** 2).sum(1)
    out = np.empty((len(query), k), np.int64)
    for s in range(0, len(query), chunk):
        q = query[s:s + chunk]
        d = sq[q][:, None] + sq[None, :] - 2.0 * z[q] @ z.T
        d[np.arange(len(q)), q] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        # order the k neighbours by distance (ties broken by index) for determinism
        dk = np.take_along_axis(d, part, 1)
        order = np.lexsort((part, dk), axis=1)
        out[s:s + len(q)] = np.take_along_axis(part, order, 1)
    return out


def knn_predict(z: np.ndarray, labels: np.ndarray, k: int = 15,
                reference: np.ndarray | None = None,
                query: np.ndarray | None = None) -> np.ndarray:
    """Majority label among each query cell's k nearest reference cells.

    ``reference`` (bool mask or indices) restricts the neighbours to cells whose
    labels may be used; ``query`` (bool mask or indices) picks the cells to
    predict. Ties go to the label of the nearest neighbour among the tied ones.
    """
    labels = np.asarray(labels)
    n = len(labels)
    ref = np.arange(n) if reference is None else _as_index(reference, n)
    qry = np.arange(n) if query is None else _as_index(query, n)
    z = np.asarray(z, np.float64)
    # neighbours among reference cells: embed reference + query, exclude self
    zr = z[ref]
    sq_r = (zr ** 2).sum(1)
    pos_in_ref = np.full(n, -1)
    pos_in_ref[ref] = np.arange(len(ref))
    cats, codes = np.unique(labels, return_inverse=True)
    codes_r = codes[ref]
    pred = np.empty(len(qry), dtype=codes.dtype)
    for s in range(0, len(qry), 1024):
        q = qry[s:s + 1024]
        d = (z[q] ** 2).sum(1)[:, None] + sq_r[None, :] - 2.0 * z[q] @ zr.T
        self_pos = pos_in_ref[q]
        has = self_pos >= 0
        d[np.flatnonzero(has), self_pos[has]] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        dk = np.take_along_axis(d, part, 1)
        order = np.argsort(dk, axis=1, kind="stable")
        nn = np.take_along_axis(part, order, 1)
        votes = codes_r[nn]  # (q, k), nearest first
        counts = np.stack([(votes == c).sum(1) for c in range(len(cats))], 1)
        best = counts.max(1, keepdims=True)
        tied = counts == best  # (q, C)
        # first neighbour (nearest) whose label is among the tied winners
        is_tied_vote = np.take_along_axis(tied, votes, 1)
        first = np.argmax(is_tied_vote, axis=1)
        pred[s:s + len(q)] = votes[np.arange(len(q)), first]
    return cats[pred]


def knn_accuracy(z: np.ndarray, labels: np.ndarray, k: int = 15,
                 mask: np.ndarray | None = None) -> float:
    """Leave-one-out kNN accuracy over the cells of ``mask`` (default all).

    Only cells in ``mask`` serve as neighbours and as queries, so cells with
    unknown labels are neither scored nor voted with.
    """
    labels = np.asarray(labels)
    n = len(labels)
    idx = np.arange(n) if mask is None else _as_index(mask, n)
    pred = knn_predict(np.asarray(z)[idx], labels[idx], k=k)
    return float((pred == labels[idx]).mean())


def batch_entropy(z: np.ndarray, batches: np.ndarray, k: int = 15,
                  max_cells: int | None = None, seed: int = 0) -> float:
    """Mean normalised entropy of batch labels in kNN neighbourhoods (1 = mixed).

    Each neighbourhood's batch frequencies are first divided by the global
    batch frequencies (then renormalised), so unequal batch sizes do not cap
    the score below 1 for a perfectly mixed embedding.
    """
    batches = np.asarray(batches)
    cats, codes = np.unique(batches, return_inverse=True)
    B = len(cats)
    if B < 2:
        return 1.0
    n = len(codes)
    query = None
    if max_cells is not None and max_cells < n:
        query = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    nn = knn_indices(z, k, query=query)
    counts = np.stack([(codes[nn] == c).sum(1) for c in range(B)], 1).astype(np.float64)
    global_freq = np.bincount(codes, minlength=B) / n
    p = counts / global_freq[None, :]
    p /= p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(ent.mean() / np.log(B))


def log_normalize(X, target_sum: float = 1e4):
    """log1p(X / library * target_sum) as a CSR matrix (or dense if X is dense)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        lib = np.asarray(X.sum(1)).ravel()
        out = sp.diags(target_sum / np.maximum(lib, 1e-12)) @ X
        out = sp.csr_matrix(out)
        out.data = np.log1p(out.data)
        return out
    X = np.asarray(X, np.float64)
    lib = X.sum(1, keepdims=True)
    return np.log1p(X / np.maximum(lib, 1e-12) * target_sum)


def pca(X, n_components: int = 10, *, scale: bool = False, n_iter: int = 6,
        n_oversamples: int = 20, seed: int = 0) -> np.ndarray:
    """Principal-component scores of the rows of X (centred; optionally scaled).

    A seeded randomized SVD (Halko et al. 2011, with QR-normalised power
    iterations): a few thin matrix products instead of an O(genes^3)
    eigendecomposition, which takes tens of seconds on a busy 2-core machine.
    Component signs are fixed (largest-|loading| entry positive).
    """
    M = X.toarray() if sp.issparse(X) else np.array(X, np.float64)
    M = np.asarray(M, np.float64)
    M -= M.mean(0, keepdims=True)
    if scale:
        sd = M.std(0, keepdims=True)
        M /= np.where(sd > 0, sd, 1.0)
    n, g = M.shape
    k = min(n_components, n, g)
    width = min(k + n_oversamples, n, g)
    Q = np.random.default_rng(seed).standard_normal((g, width))
    Q, _ = np.linalg.qr(M @ Q)
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(M.T @ Q)
        Q, _ = np.linalg.qr(M @ Q)
    Ub, S, Vt = np.linalg.svd(Q.T @ M, full_matrices=False)
    U = Q @ Ub[:, :k]
    V = Vt[:k].T
    signs = np.sign(V[np.abs(V).argmax(0), np.arange(k)])
    return U * (S[:k] * signs)


def pca_log_normalized(X, n_components: int = 10, *, scale: bool = False) -> np.ndarray:
    """PCA of log-normalised counts: the uncorrected baseline embedding."""
    return pca(log_normalize(X), n_components, scale=scale)


def _as_index(sel, n: int) -> np.ndarray:
    sel = np.asarray(sel)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ValueError(f"mask of shape {sel.shape} for {n} cells")
        return np.flatnonzero(sel)
    return sel.astype(np.int64)

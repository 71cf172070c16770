"""Highly variable genes without scanpy: variance of log-normalised counts.

Counts are scaled to 10,000 per cell and log1p-transformed (sparse stays
sparse); genes are ranked by variance, within each batch when ``batch_key``
is given (then by the median rank across batches, so a gene variable only
because batches differ is not preferred).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputError
from .counts import counts_matrix


def _log_norm_var(X) -> np.ndarray:
    X = sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else X.tocsr().astype(
        np.float64)
    lib = np.asarray(X.sum(1)).ravel()
    lib[lib == 0] = 1.0
    norm = sp.diags(1e4 / lib) @ X
    norm = sp.csr_matrix(norm)
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    sq = np.asarray(norm.multiply(norm).mean(0)).ravel()
    return sq - mean ** 2


def highly_variable_genes(adata, n_top_genes: int = 2000, layer: str | None = None,
                          batch_key: str | None = None) -> np.ndarray:
    """A boolean mask over ``adata.var_names`` of the ``n_top_genes`` most variable genes."""
    if not isinstance(n_top_genes, (int, np.integer)) or n_top_genes <= 0:
        raise InputError("n_top_genes", n_top_genes, "must be a positive integer",
                         "pass e.g. n_top_genes=2000")
    X = counts_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    n = min(int(n_top_genes), adata.n_vars)
    if batch_key is None:
        score = -_log_norm_var(X)
    else:
        if batch_key not in adata.obs.columns:
            raise InputError("batch_key", batch_key, "not a column of adata.obs",
                             "pass the name of the batch column, or None")
        codes = adata.obs[batch_key].astype(str).to_numpy()
        ranks = []
        for b in np.unique(codes):
            v = _log_norm_var(X[np.flatnonzero(codes == b)])
            ranks.append(np.argsort(np.argsort(-v, kind="stable"), kind="stable"))
        score = np.median(np.stack(ranks), 0) - 1e-9 * _log_norm_var(X)
    mask = np.zeros(adata.n_vars, bool)
    mask[np.argsort(score, kind="stable")[:n]] = True
    return mask

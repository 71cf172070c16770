"""Raw counts: where they are (``adata.X`` or a layer), and one checked pass over them.

The pass runs block by block, so a backed (on-disk) matrix is never loaded
whole, and in a run of several processes each scans only its own rows.
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .. import distributed
from ..errors import InputError


def counts_matrix(adata, layer: str | None):
    """The counts matrix named by ``layer`` (``None`` means ``adata.X``)."""
    if layer is None:
        if adata.X is None:
            raise InputError(
                "layer",
                None,
                "adata.X is empty (None)",
                "pass layer= naming the layer that holds raw counts",
            )
        return adata.X
    if layer not in adata.layers:
        raise InputError(
            "layer",
            layer,
            f"no such layer; adata.layers has {sorted(adata.layers.keys())}",
            "pass the name of the layer holding raw counts, or layer=None for adata.X",
        )
    return adata.layers[layer]


def _row_blocks(X, rows: slice | None = None):
    """(start, rows) blocks of a backed (on-disk) matrix, or an in-memory one whole;
    only rows ``rows`` (a slice) of a backed one when given."""
    from .backed import BackedRows, is_backed

    if is_backed(X) or isinstance(X, BackedRows):
        X = X if isinstance(X, BackedRows) else BackedRows(X)
        yield from X.blocks(*((rows.start, rows.stop) if rows is not None else ()))
    else:
        yield 0, X


def _check_values(block, field: str, chunk: int, *, allow_noninteger: bool) -> bool:
    """Raise if a block's stored values are NaN/inf, negative, or (unless allowed) not
    integers; return whether any is fractional. Never densifies a sparse block."""
    values = np.asarray(block.data) if sp.issparse(block) else np.asarray(block).ravel()
    fractional = False
    for start in range(0, values.size, chunk):
        v = values[start : start + chunk]
        if v.dtype.kind not in "iuf":  # (complex is a number, not a count)
            raise InputError(
                field,
                str(v.dtype),
                "counts are not numeric",
                "store raw counts as an integer or float matrix",
            )
        finite = np.isfinite(v)
        if not finite.all():
            bad = v[~finite][0]
            raise InputError(
                field,
                float(bad),
                "counts contain NaN or inf",
                "remove or repair the cells/genes with non-finite values",
            )
        if (v < 0).any():
            raise InputError(
                field,
                float(v[v < 0][0]),
                "counts contain negative values",
                "pass raw (un-normalised, non-negative) counts",
            )
        frac = v != np.round(v)
        if frac.any():
            if not allow_noninteger:
                raise InputError(
                    field,
                    float(v[frac][0]),
                    "counts contain non-integer values (normalised or log data?)",
                    "pass raw integer counts via layer=..., or setup_anndata(..., "
                    "allow_noninteger_counts=True) to accept them with a warning, as "
                    "scvi-tools does",
                )
            fractional = True
    return fractional


def scan_counts(
    X,
    field: str,
    *,
    allow_noninteger: bool = False,
    each_block=(),
    chunk: int = 1 << 22,
    rows: slice | None = None,
) -> list[list]:
    """Check every stored count (see `_check_values`) and apply each function of
    ``each_block`` to every block of rows, in one pass over the matrix (one read
    of a backed file); returns each function's per-block results. ``rows``
    limits a backed matrix to a slice of its rows."""
    results: list[list] = [[] for _ in each_block]
    fractional = False
    for _, block in _row_blocks(X, rows):
        fractional |= _check_values(block, field, chunk, allow_noninteger=allow_noninteger)
        for out, fn in zip(results, each_block):
            out.append(fn(block))
    if fractional:
        warnings.warn(
            f"{field}: non-integer counts accepted "
            "(allow_noninteger_counts=True); the count likelihood assumes "
            "integers",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    return results


def _scan_shards(X, field: str, each_block, *, allow_noninteger: bool) -> list[list]:
    """`scan_counts` over all rows, or, for a backed matrix in a run of several
    processes, over this process's slice only (each process reads its own)."""
    from .backed import BackedRows, is_backed

    rows = None
    if distributed.process_count() > 1 and (is_backed(X) or isinstance(X, BackedRows)):
        rows = distributed.local_slice(X.shape[0])
    results = distributed.agree(
        lambda: scan_counts(
            X, field, allow_noninteger=allow_noninteger, each_block=each_block, rows=rows
        )
    )
    assert results is not None  # agree returns fn()'s result (or raises)
    return results


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def check_counts(X, field: str, *, allow_noninteger: bool = False) -> None:
    """Raise if stored values are NaN/inf, negative, or (unless allowed) not integers."""
    scan_counts(X, field, allow_noninteger=allow_noninteger)


def row_sums(block) -> np.ndarray:
    """Per-row totals of an in-memory block."""
    if sp.issparse(block):
        return np.asarray(block.sum(axis=1)).ravel()
    return np.asarray(block).sum(axis=1).ravel()


def col_sums(block) -> np.ndarray:
    """Per-gene totals (float64) of an in-memory block, without densifying it."""
    if not sp.issparse(block):
        return np.asarray(block).sum(axis=0, dtype=np.float64)
    block = block.tocsr()
    total = np.zeros(block.shape[1], np.float64)
    # bincount in chunks: a float64 copy of all values at once could be GBs
    for a in range(0, block.nnz, 1 << 22):
        total += np.bincount(
            block.indices[a : a + (1 << 22)],
            weights=block.data[a : a + (1 << 22)],
            minlength=block.shape[1],
        )
    return total


def row_stats(X: sp.csr_matrix, rows_per_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-row total counts and sum of lgamma(x + 1) (float64), in row chunks so
    the float64 temporaries stay small next to the matrix."""
    n = X.shape[0]  # pyright: ignore[reportOptionalSubscript]  # scipy is untyped: shape reads as None
    totals, lg = np.empty(n), np.empty(n)
    for s in range(0, n, rows_per_chunk):
        e = min(s + rows_per_chunk, n)
        a, b = X.indptr[s], X.indptr[e]
        v = np.asarray(X.data[a:b], np.float64)
        ptr = X.indptr[s : e + 1] - a
        # per-row sums via cumulative sums (empty rows give 0)
        cs = np.concatenate([[0.0], np.cumsum(v)])
        totals[s:e] = cs[ptr[1:]] - cs[ptr[:-1]]
        cs = np.concatenate([[0.0], np.cumsum(gammaln(v + 1.0))])
        lg[s:e] = cs[ptr[1:]] - cs[ptr[:-1]]
    return totals, lg


def row_nnz(block) -> np.ndarray:
    """Stored values per row of an in-memory CSR block."""
    return np.diff(block.indptr)


def _user_stacklevel() -> int:
    """stacklevel for warnings.warn called from here that points past jaxscanvi's frames."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # the function that calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    return level

"""AnnData -> host arrays, read the way a registry says.

`CellData` holds the counts as CSR (never densified whole) plus per-cell
arrays. It is what every minibatch source draws from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import distributed
from ..errors import InputError
from . import hierarchy
from .atlas import AtlasRows
from .backed import BackedRows, as_csr_matrix, is_backed
from .counts import _cat, _scan_shards, check_counts, counts_matrix, row_nnz, row_stats
from .registry import Registry


@dataclass
class CellData:
    """Model inputs for N cells, on the host."""

    X: sp.csr_matrix | BackedRows  # (N, G) float32 counts (BackedRows: on disk)
    batch: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32; n_labels: "unlabelled", above: inner nodes
    cat_covs: np.ndarray  # (N, k) int32
    cont_covs: np.ndarray  # (N, m) float32
    log_size_factor: np.ndarray | None  # (N,) float32, or None
    log_library: np.ndarray  # (N,) float32: log of total counts
    lgamma_const: np.ndarray  # (N,) float32: sum_g lgamma(x_g + 1)
    obs_names: pd.Index

    # scipy has no type information: pyright reads csr_matrix.shape as None
    @property
    def n_obs(self) -> int:
        return self.X.shape[0]  # pyright: ignore[reportOptionalSubscript]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]  # pyright: ignore[reportOptionalSubscript]

    def row_nnz(self) -> np.ndarray:
        return np.diff(self.X.indptr)

    def subset(self, idx: np.ndarray) -> CellData:
        idx = np.asarray(idx)
        return CellData(
            X=self.X[idx],
            batch=self.batch[idx],
            labels=self.labels[idx],
            cat_covs=self.cat_covs[idx],
            cont_covs=self.cont_covs[idx],
            log_size_factor=None if self.log_size_factor is None else self.log_size_factor[idx],
            log_library=self.log_library[idx],
            lgamma_const=self.lgamma_const[idx],
            obs_names=self.obs_names[idx],
        )


def to_csr(X) -> sp.csr_matrix:
    """A float32 CSR view/copy of X without densifying sparse input."""
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    if sp.issparse(X):
        src = X
        # a sparse array (csr_array) becomes a csr_matrix: one type
        X = as_csr_matrix(X.tocsr())
        if X.dtype != np.float32:
            X = as_csr_matrix(X.astype(np.float32))
        shares = X is src or any(
            np.shares_memory(getattr(X, k), getattr(src, k))
            for k in ("data", "indices", "indptr")
            if hasattr(src, k)
        )
        if shares and (not X.has_canonical_format or (X.data == 0).any()):
            X = X.copy()  # the clean-up below must not touch the caller's matrix
    else:
        X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    X.sum_duplicates()
    X.eliminate_zeros()
    return X


def encode(
    series: pd.Series, categories: tuple[str, ...], field: str, *, extra: str | None = None
) -> np.ndarray:
    """Codes of ``series`` in ``categories``; ``extra`` maps to len(categories)."""
    if series.isna().any():
        raise InputError(
            field,
            "NaN",
            "the column has missing values",
            "fill them with a category of their own, or drop those cells",
        )
    values = series.astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    if extra is not None:
        lookup[extra] = len(categories)
    codes = np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int32, count=len(values))
    if (codes < 0).any():
        unseen = sorted(set(values[codes < 0]))
        raise InputError(
            field,
            unseen[:10],
            f"categories the model has never seen (it knows {list(categories)[:12]})",
            "rename them to known categories, or drop those cells",
        )
    return codes


def check_var_names(adata, registry: Registry) -> None:
    names = tuple(str(v) for v in adata.var_names)
    if names == registry.var_names:
        return
    ours, theirs = set(registry.var_names), set(names)
    missing = len(ours - theirs)
    raise InputError(
        "adata.var_names",
        f"{len(names)} genes ({missing} of the model's {len(ours)} missing)",
        "genes differ from the ones the model was trained on (names or order)",
        "reorder/subset with adata[:, model.registry.var_names]; "
        "genes the data lacks must be added first (e.g. as all-zero columns)",
    )


def _backed_counts(
    raw, field: str, *, allow_noninteger: bool
) -> tuple[BackedRows, np.ndarray, np.ndarray]:
    """On-disk counts as `BackedRows`, each cell's total and sum of lgamma(x + 1):
    from one checked pass, or from set-up's pass over an atlas store."""
    X = raw if isinstance(raw, BackedRows) else BackedRows(raw)
    many = distributed.process_count() > 1
    if many:  # read only this process's slice
        rows = distributed.local_slice(X.shape[0])
        X = (
            X.limited(rows)
            if isinstance(X, AtlasRows)
            else BackedRows(X.dataset, X.block_size, X.cache_blocks, rows=rows)
        )
    elif isinstance(X, AtlasRows):
        kept = X.remembered(allow_noninteger=allow_noninteger)
        if kept is not None:
            return X, *kept
    parts, nnz = _scan_shards(X, field, (row_stats, row_nnz), allow_noninteger=allow_noninteger)
    totals = distributed.gather_rows(_cat([t for t, _ in parts], np.float64))
    lg = distributed.gather_rows(_cat([g for _, g in parts], np.float64))
    if isinstance(X, AtlasRows) and not many:
        X.remember(
            totals=totals, lgamma=lg, row_nnz=_cat(nnz, np.int64), allow_noninteger=allow_noninteger
        )
    return X, totals, lg


def _counts(
    adata, registry: Registry
) -> tuple[sp.csr_matrix | BackedRows, np.ndarray, np.ndarray, str]:
    """The counts (in memory, or `BackedRows` when they stay on disk), each cell's
    total and sum of lgamma(x + 1), and the field they came from."""
    raw = counts_matrix(adata, registry.layer)
    field = f"adata.layers[{registry.layer!r}]" if registry.layer else "adata.X"
    if is_backed(raw) or isinstance(raw, BackedRows):
        # counts stay on disk: checks and per-cell statistics in one pass
        X, totals, lg = _backed_counts(
            raw, field, allow_noninteger=registry.allow_noninteger_counts
        )
        return X, totals, lg, field
    check_counts(raw, field, allow_noninteger=registry.allow_noninteger_counts)
    X = to_csr(raw)
    totals, lg = row_stats(X)
    return X, totals, lg, field


def _column(obs, key: str, fname: str) -> pd.Series:
    if key not in obs.columns:
        raise InputError(
            fname, key, "not a column of adata.obs", "add the column the model was set up with"
        )
    return obs[key]


def _labels(obs, registry: Registry, n: int) -> np.ndarray:
    tree = hierarchy.from_registry(registry)
    if tree is not None and registry.labels_key in obs.columns:
        return tree.encode(
            obs[registry.labels_key],
            f"adata.obs[{registry.labels_key!r}]",
            registry.unlabeled_category,
        )
    if registry.labels_key is not None and registry.labels_key in obs.columns:
        return encode(
            obs[registry.labels_key],
            registry.label_categories,
            f"adata.obs[{registry.labels_key!r}]",
            extra=registry.unlabeled_category,
        )
    if registry.labels_key is not None and registry.unlabeled_category is not None:
        return np.full(n, registry.n_labels, np.int32)  # query without labels
    if registry.labels_key is not None:
        _column(obs, registry.labels_key, "labels_key")
        raise AssertionError  # _column() raised
    return np.zeros(n, np.int32)


def _covariates(obs, registry: Registry, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Categorical covariates' codes (N, k) and continuous covariates (N, m)."""
    cat_covs = np.zeros((n, len(registry.categorical_covariate_keys)), np.int32)
    for j, (k, cats) in enumerate(
        zip(registry.categorical_covariate_keys, registry.categorical_covariate_categories)
    ):
        cat_covs[:, j] = encode(
            _column(obs, k, "categorical_covariate_keys"), cats, f"adata.obs[{k!r}]"
        )
    cont_covs = np.zeros((n, len(registry.continuous_covariate_keys)), np.float32)
    for j, k in enumerate(registry.continuous_covariate_keys):
        col = _column(obs, k, "continuous_covariate_keys")
        if not pd.api.types.is_numeric_dtype(col.dtype):
            raise InputError(
                f"adata.obs[{k!r}]", str(col.dtype), "not numeric", "convert it with pd.to_numeric"
            )
        v = col.to_numpy(dtype=np.float64)
        if not np.isfinite(v).all():
            raise InputError(
                f"adata.obs[{k!r}]", "NaN", "NaN or inf values", "impute or drop those cells"
            )
        cont_covs[:, j] = v
    return cat_covs, cont_covs


def _log_size_factor(obs, registry: Registry) -> np.ndarray | None:
    if registry.size_factor_key is None:
        return None
    sf = _column(obs, registry.size_factor_key, "size_factor_key").to_numpy(dtype=np.float64)
    if not np.isfinite(sf).all() or (sf <= 0).any():
        raise InputError(
            f"adata.obs[{registry.size_factor_key!r}]",
            "non-positive",
            "size factors must be finite and positive",
            "recompute the size factors",
        )
    return np.log(sf).astype(np.float32)


def cell_data(adata, registry: Registry, *, check_genes: bool = True) -> CellData:
    """Read ``adata`` as ``registry`` says. Raises InputError on any mismatch."""
    if adata.n_obs == 0:
        raise InputError(
            "adata.n_obs", 0, "the AnnData has no cells", "pass an AnnData with at least one cell"
        )
    if check_genes:
        check_var_names(adata, registry)
    X, totals, lg, field = _counts(adata, registry)
    n = adata.n_obs  # the rows of X (AnnData keeps them equal)
    obs = adata.obs
    if registry.batch_key is not None:
        batch = encode(
            _column(obs, registry.batch_key, "batch_key"),
            registry.batch_categories,
            f"adata.obs[{registry.batch_key!r}]",
        )
    else:
        batch = np.zeros(n, np.int32)
    labels = _labels(obs, registry, n)
    cat_covs, cont_covs = _covariates(obs, registry, n)
    log_sf = _log_size_factor(obs, registry)
    if (totals <= 0).any():
        i = int(np.flatnonzero(totals <= 0)[0])
        raise InputError(
            field,
            f"cell {adata.obs_names[i]!r} (row {i})",
            f"{int((totals <= 0).sum())} cell(s) have no counts",
            "drop cells with zero total counts before using the model",
        )
    return CellData(
        X=X,
        batch=batch,
        labels=labels,
        cat_covs=cat_covs,
        cont_covs=cont_covs,
        log_size_factor=log_sf,
        log_library=np.log(totals).astype(np.float32),
        lgamma_const=lg.astype(np.float32),
        obs_names=pd.Index(adata.obs_names),
    )

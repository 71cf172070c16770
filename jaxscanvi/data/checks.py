"""The checks setup_anndata runs on an AnnData before it records a `Registry`.

Each raises an `InputError` naming the field, the value and a fix, or warns
about what trains but wastes time (genes without counts, one-cell batches).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .. import distributed
from ..errors import InputError
from .atlas import AtlasRows
from .counts import (
    _cat,
    _scan_shards,
    _user_stacklevel,
    col_sums,
    counts_matrix,
    row_nnz,
    row_stats,
    row_sums,
)

# label values that mean "no label": a mismatched unlabeled_category next to one
# of these is a typo, not a fully labelled dataset
UNLABELLED_NAMES = {
    "unknown",
    "unlabeled",
    "unlabelled",
    "unassigned",
    "nan",
    "na",
    "none",
    "n/a",
    "?",
    "",
}


def _warn_zero_genes(gene_totals: np.ndarray, field: str, var_names: pd.Index) -> None:
    """Warn (not raise: scVI trains fine with them) about genes no cell expresses."""
    zero = np.flatnonzero(gene_totals == 0)
    if zero.size == 0:
        return
    shown = [str(var_names[i]) for i in zero[:5]]
    more = f" and {zero.size - len(shown)} more" if zero.size > len(shown) else ""
    warnings.warn(
        f"{field}: {zero.size} of {len(gene_totals)} gene(s) have no counts in any cell "
        f"({', '.join(shown)}{more}); the model learns nothing from them and they cost "
        "time and memory. Fix: filter them out before setup_anndata, e.g. "
        "sc.pp.filter_genes(adata, min_counts=1), or adata = adata[:, np.asarray("
        f"{field}.sum(0)).ravel() > 0].copy()",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def categories_of(series: pd.Series, field: str) -> tuple[str, ...]:
    """Categories actually present, in the column's category order (or sorted)."""
    if series.isna().any():
        first = series.loc[series.isna().to_numpy()].index[0]
        raise InputError(
            field,
            "NaN",
            f"the column has missing values (first at obs "
            f"'{first}', {int(series.isna().sum())} in all)",
            "fill them with a category of their own, e.g. .cat.add_categories"
            "('unknown').fillna('unknown'), or drop those cells",
        )
    if pd.api.types.is_float_dtype(series.dtype) and series.mod(1).ne(0).any():
        first = series.loc[series.mod(1).ne(0).to_numpy()].iloc[0]
        raise InputError(
            field,
            float(first),
            "the column holds non-integer numbers "
            f"({series.nunique()} distinct values), which look continuous, "
            "not categories",
            "pass a column of categories (e.g. "
            ".astype(str) if the numbers are codes), or pass it as "
            "continuous_covariate_keys",
        )
    if isinstance(series.dtype, pd.CategoricalDtype):
        present = set(series.cat.remove_unused_categories().cat.categories)
        cats = [c for c in series.cat.categories if c in present]
    else:
        cats = sorted(pd.unique(series.to_numpy()), key=lambda v: (str(type(v)), v))
    out = tuple(str(c) for c in cats)
    if len(set(out)) != len(out):
        raise InputError(
            field,
            list(cats),
            "categories collide once written as text",
            "rename the categories so that their string forms differ",
        )
    return out


def _obs_column(adata, key: str, field: str) -> pd.Series:
    if key not in adata.obs.columns:
        close = [c for c in adata.obs.columns if c.lower() == str(key).lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            field,
            key,
            f"not a column of adata.obs{hint}; columns are {list(adata.obs.columns)[:20]}",
            "pass the name of an existing adata.obs column",
        )
    return adata.obs[key]


def _checked_var_names(adata) -> pd.Index:
    """``adata``'s genes, once it is known to be a non-empty AnnData with unique names."""
    if not hasattr(adata, "obs") or not hasattr(adata, "var_names"):
        raise InputError(
            "adata",
            type(adata).__name__,
            "not an AnnData",
            "pass an anndata.AnnData (e.g. anndata.read_h5ad(path))",
        )
    if adata.n_obs == 0:
        raise InputError(
            "adata.n_obs", 0, "the AnnData has no cells", "pass an AnnData with at least one cell"
        )
    if adata.n_vars == 0:
        raise InputError(
            "adata.n_vars", 0, "the AnnData has no genes", "pass an AnnData with at least one gene"
        )
    var_names = pd.Index(adata.var_names)
    if var_names.has_duplicates:
        dup = var_names[var_names.duplicated()][0]
        raise InputError(
            "adata.var_names",
            str(dup),
            "gene names are duplicated",
            "make them unique with adata.var_names_make_unique()",
        )
    return var_names


def _check_library_sizes(adata, layer, var_names: pd.Index, *, allow_noninteger: bool):
    """One pass over the counts: valid values, no empty cell; warn about empty genes."""
    X = counts_matrix(adata, layer)
    field = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if isinstance(X, AtlasRows) and distributed.process_count() == 1:
        # an atlas store keeps this pass's per-cell columns for the model
        stats, cols, nnz = _scan_shards(
            X, field, (row_stats, col_sums, row_nnz), allow_noninteger=allow_noninteger
        )
        sums = _cat([t for t, _ in stats], np.float64)
        X.remember(
            totals=sums,
            lgamma=_cat([g for _, g in stats], np.float64),
            row_nnz=_cat(nnz, np.int64),
            allow_noninteger=allow_noninteger,
        )
    else:
        rows, cols = _scan_shards(X, field, (row_sums, col_sums), allow_noninteger=allow_noninteger)
        sums = distributed.gather_rows(_cat(rows, np.float64))
    gene_totals = distributed.sum_all(np.sum(cols, axis=0) if cols else np.zeros(X.shape[1]))
    if (sums <= 0).any():
        idx = int(np.flatnonzero(sums <= 0)[0])
        raise InputError(
            field,
            f"cell {adata.obs_names[idx]!r} (row {idx})",
            f"{int((sums <= 0).sum())} cell(s) have no counts at all, so their library "
            "size is zero",
            "drop them first, e.g. adata = adata[np.asarray("
            f"{'adata.X' if layer is None else f'adata.layers[{layer!r}]'}.sum(1)).ravel()"
            " > 0].copy()",
        )
    _warn_zero_genes(gene_totals, field, var_names)


def _label_categories(adata, labels_key, unlabeled_category) -> tuple[str, ...]:
    """The cell types, the unlabelled category left out."""
    label_cats: tuple[str, ...] = ("0",)
    if labels_key is not None:
        col = _obs_column(adata, labels_key, "labels_key")
        label_cats = categories_of(col, f"adata.obs[{labels_key!r}]")
        if unlabeled_category is not None:
            unl = str(unlabeled_category)
            suspects = [c for c in label_cats if c.strip().lower() in UNLABELLED_NAMES]
            if unl not in label_cats and suspects:
                # a fully labelled dataset (a reference) is fine; a typo is not
                raise InputError(
                    "unlabeled_category",
                    unlabeled_category,
                    f"not among the labels of adata.obs[{labels_key!r}], which has "
                    f"{suspects[0]!r}; those cells would count as a cell type",
                    f"pass unlabeled_category={suspects[0]!r}",
                )
            label_cats = tuple(c for c in label_cats if c != unl)
            if len(label_cats) == 0:
                raise InputError(
                    "labels_key",
                    labels_key,
                    "no cell has a label (all are the unlabelled category)",
                    "label at least two cell types",
                )
    elif unlabeled_category is not None:
        raise InputError(
            "labels_key",
            None,
            "unlabeled_category is given but labels_key is not",
            "pass labels_key naming the cell-type column",
        )
    return label_cats


def _check_size_factors(adata, size_factor_key) -> None:
    if size_factor_key is not None:
        sf = _obs_column(adata, size_factor_key, "size_factor_key")
        vals = np.asarray(pd.to_numeric(sf, errors="coerce"), dtype=float)
        if not np.isfinite(vals).all() or (vals <= 0).any():
            raise InputError(
                f"adata.obs[{size_factor_key!r}]",
                "non-positive or NaN",
                "size factors must be finite and positive",
                "recompute the size factors, or leave size_factor_key=None",
            )


def _check_continuous(adata, cont_keys) -> None:
    for k in cont_keys:
        col = _obs_column(adata, k, "continuous_covariate_keys")
        if not pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            raise InputError(
                f"adata.obs[{k!r}]",
                str(col.dtype),
                "a continuous covariate must be numeric",
                "convert it with pd.to_numeric, or pass it in categorical_covariate_keys instead",
            )
        v = col.to_numpy(dtype=float)
        if not np.isfinite(v).all():
            raise InputError(
                f"adata.obs[{k!r}]",
                "NaN",
                "the continuous covariate has NaN or inf values",
                "impute or drop those cells",
            )


def _warn_single_cell_batches(adata, batch_key, batch_cats) -> None:
    for key, cats, fname in [(batch_key, batch_cats, "batch_key")]:
        if key is not None:
            counts = adata.obs[key].astype(str).value_counts()
            single = [c for c in cats if counts.get(c, 0) == 1]
            if single:
                warnings.warn(
                    f"{fname}: batch(es) {single[:5]} of adata.obs[{key!r}] have a "
                    "single cell; their batch effect cannot be estimated",
                    UserWarning,
                    stacklevel=4,
                )

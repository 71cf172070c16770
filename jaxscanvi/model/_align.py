"""A query's genes in its reference's order: `prepare_query_anndata`.

The reference's genes in order, the missing ones padded with zeros, sparse
matrices kept sparse; the query then suits `load_query_data` (`_query`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import io
from ..data.registry import UNS_KEY, Registry
from ..errors import InputError

MIN_GENE_OVERLAP = 0.5  # refuse below this fraction of reference genes
WARN_GENE_OVERLAP = 0.8  # warn below this (scvi-tools' MIN_VAR_NAME_RATIO)


def _reference_var_names(reference_model) -> pd.Index:
    from ._import import is_scvi_tools_folder, read_scvi_tools

    if isinstance(reference_model, (str, Path)) and is_scvi_tools_folder(reference_model):
        return pd.Index(read_scvi_tools(reference_model)["var_names"])
    if isinstance(reference_model, (str, Path)):
        from ._validate import registry_of

        meta = io.read_metadata(reference_model)
        return pd.Index(registry_of(reference_model, meta).var_names)
    registry = getattr(reference_model, "registry", None)
    if not isinstance(registry, Registry):
        raise InputError(
            "reference_model",
            type(reference_model).__name__,
            "not a jaxscanvi model or a saved model folder",
            "pass a trained SCVI/SCANVI or the folder given to model.save()",
        )
    return pd.Index(registry.var_names)


def _reorder_columns(X, take: np.ndarray, n_out: int):
    """Columns ``take`` of X (-1: a zero column), as a matrix of n_out columns.

    Sparse input stays sparse (a sparse selection product); dense stays dense.
    """
    keep = take >= 0
    if sp.issparse(X) or hasattr(X, "to_memory"):
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        sel = sp.csr_matrix(
            (np.ones(keep.sum(), X.dtype), (take[keep], np.flatnonzero(keep))),
            shape=(X.shape[1], n_out),
        )
        out = cast(sp.csr_matrix, sp.csr_matrix(X) @ sel)  # scipy is untyped
        out.sort_indices()
        return out.tocsc() if sp.isspmatrix_csc(X) else out
    X = np.asarray(X)
    out = np.zeros((X.shape[0], n_out), X.dtype)
    out[:, keep] = X[:, take[keep]]
    return out


def prepare_query_anndata(
    adata,
    reference_model,
    return_reference_var_names: bool = False,
    inplace: bool = True,
    *,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
):
    """Put ``adata``'s genes in the reference's order, padding missing genes with zeros.

    ``reference_model`` is a trained model or a folder written by ``save``.
    Sparse X and layers stay sparse. Genes the reference lacks are dropped;
    ``varm``/``varp`` (per-gene matrices) cannot be padded and are dropped too.
    Refuses when fewer than ``min_gene_overlap`` of the reference genes are
    present, and warns below 80%. Returns the reference gene names with
    ``return_reference_var_names=True`` (``adata`` untouched), the new AnnData
    with ``inplace=False``, else None.
    """
    ref_names = _reference_var_names(reference_model)
    if return_reference_var_names:
        return ref_names
    return align_genes(adata, ref_names, inplace=inplace, min_gene_overlap=min_gene_overlap)


def align_genes(
    adata, ref_names: pd.Index, *, inplace: bool = True, min_gene_overlap: float = MIN_GENE_OVERLAP
):
    """`prepare_query_anndata` once the reference's gene names are known."""
    if not hasattr(adata, "var_names"):
        raise InputError("adata", type(adata).__name__, "not an AnnData", "pass an anndata.AnnData")
    query_names = pd.Index(adata.var_names.astype(str))
    if query_names.has_duplicates:
        dup = query_names[query_names.duplicated()][0]
        raise InputError(
            "adata.var_names",
            dup,
            "gene names are duplicated",
            "make them unique with adata.var_names_make_unique()",
        )
    pos = pd.Series(np.arange(len(query_names)), index=query_names)
    take = pos.reindex(ref_names).fillna(-1).to_numpy(np.int64)
    present = int((take >= 0).sum())
    frac = present / max(len(ref_names), 1)
    if frac < min_gene_overlap:
        raise InputError(
            "adata.var_names",
            f"{present} of {len(ref_names)} reference genes",
            f"only {frac:.0%} of the reference's genes are in the query (at least "
            f"{min_gene_overlap:.0%} needed); its cells cannot be mapped meaningfully",
            "use gene identifiers of the same kind as the reference (symbols vs Ensembl "
            "IDs, same species), or lower min_gene_overlap knowingly",
        )
    if present < len(ref_names):
        msg = (
            f"prepare_query_anndata: {len(ref_names) - present} of the "
            f"{len(ref_names)} reference genes ({1 - frac:.1%}) are missing from the "
            "query and are padded with zero counts"
        )
        if frac < WARN_GENE_OVERLAP:
            msg += "; with so many missing, expect poorer mapping"
        warnings.warn(msg, UserWarning, stacklevel=2)
    if present == len(ref_names) and query_names.equals(ref_names):
        return None if inplace else adata.copy()
    n = len(ref_names)
    var = adata.var.reindex(ref_names)
    var.index = var.index.astype(str)
    X = None if adata.X is None else _reorder_columns(adata.X, take, n)
    layers = {k: _reorder_columns(v, take, n) for k, v in adata.layers.items()}
    new = ad.AnnData(
        X=X,
        obs=adata.obs.copy(),
        var=var,
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        obsp=dict(adata.obsp),
        layers=layers,
    )
    new.uns.pop(UNS_KEY, None)  # a registry of the old gene layout no longer applies
    if not inplace:
        return new
    _become(adata, new)
    return None


def _become(adata, new) -> None:
    """Make ``adata`` hold ``new``'s contents, in place (its gene axis changes).

    anndata has no public way to change an object's shape in place (scvi-tools
    calls the private ``AnnData._init_as_actual``). Re-running the public
    constructor on the object does exactly that through a public signature:
    ``AnnData.__init__`` with these arguments calls ``_init_as_actual`` with
    them, which resets every field (a view becomes an actual object; ``varm``,
    ``varp`` and ``raw`` are dropped, as they do not fit the new gene axis).
    ``tests/test_public_apis.py`` pins it.
    """
    ad.AnnData.__init__(
        adata,
        X=new.X,
        obs=new.obs,
        var=new.var,
        uns=new.uns,
        obsm=new.obsm,
        obsp=new.obsp,
        layers=new.layers,
    )

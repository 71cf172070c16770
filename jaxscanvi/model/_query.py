"""Reference mapping: align a query's genes, then scArches surgery.

`prepare_query_anndata` puts a query's genes in the reference's order and
pads the missing ones with zeros, without densifying. `load_query_data`
builds a query model from a trained reference: the category axes grow by the
query's new batches, covariate categories and (for scANVI) cell types, every
reference value is copied in, and training afterwards changes only what the
freeze switches allow (see `jaxscanvi.surgery`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import io
from ..data.registry import UNS_KEY, Registry, categories_of
from ..errors import InputError, ModelFormatError
from ..module import SCANVAE, SCANVIConfig
from ..surgery import Freeze, freeze_masks, transplant

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
        out = sp.csr_matrix(X) @ sel
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


def _load_reference(cls, reference_model):
    if isinstance(reference_model, (str, Path)):
        from . import SCANVI, SCVI
        from ._import import is_scvi_tools_folder, saved_model_name

        kinds = {"SCVI": SCVI, "SCANVI": SCANVI}
        name = (
            saved_model_name(reference_model)
            if is_scvi_tools_folder(reference_model)
            else io.read_metadata(reference_model).get("model_class")
        )
        kind = kinds.get(name)
        if kind is None:
            raise ModelFormatError(
                f"{str(reference_model)!r} holds a {name!r} model, not SCVI or SCANVI"
            )
        reference_model = kind.load(reference_model)
    if not isinstance(reference_model, cls):
        raise InputError(
            "reference_model",
            type(reference_model).__name__,
            f"{cls.__name__}.load_query_data needs a {cls.__name__} reference",
            f"train a {cls.__name__} on the reference first (for SCANVI: "
            "SCANVI.from_scvi_model(scvi_model, ...))",
        )
    if not reference_model.is_trained:
        warnings.warn(
            "load_query_data: the reference model has not been trained", UserWarning, stacklevel=3
        )
    return reference_model


def _grown(
    ref_cats: tuple[str, ...], series: pd.Series, field: str, drop: str | None = None
) -> tuple[tuple[str, ...], list[str]]:
    """Reference categories then the query's unseen ones (codes of old ones kept)."""
    cats = categories_of(series, field)
    new = [c for c in cats if c not in ref_cats and c != drop]
    return tuple(ref_cats) + tuple(new), new


def query_registry(
    adata, ref: Registry, new_labels: Sequence[str] | None, label_hierarchy=None
) -> tuple[Registry, dict[str, list[str]]]:
    """The reference registry with the query's new categories appended."""
    obs = adata.obs

    def need(key, fname):
        if key is not None and key not in obs.columns:
            raise InputError(
                fname,
                key,
                "the reference was set up with this adata.obs column but the query lacks it",
                f"add adata.obs[{key!r}] to the query",
            )

    need(ref.batch_key, "batch_key")
    for k in ref.categorical_covariate_keys:
        need(k, "categorical_covariate_keys")
    for k in ref.continuous_covariate_keys:
        need(k, "continuous_covariate_keys")
    need(ref.size_factor_key, "size_factor_key")
    added: dict[str, list[str]] = {"batch": [], "labels": [], "covariates": []}
    batch_cats = ref.batch_categories
    if ref.batch_key is not None:
        batch_cats, added["batch"] = _grown(
            ref.batch_categories, obs[ref.batch_key], f"adata.obs[{ref.batch_key!r}]"
        )
    cov_cats = []
    for k, cats in zip(ref.categorical_covariate_keys, ref.categorical_covariate_categories):
        grown, new = _grown(cats, obs[k], f"adata.obs[{k!r}]")
        cov_cats.append(grown)
        added["covariates"] += [f"{k}={c}" for c in new]
    label_cats = ref.label_categories
    if ref.labels_key is not None:
        if ref.labels_key not in obs.columns:
            if ref.unlabeled_category is None:
                raise InputError(
                    "labels_key",
                    ref.labels_key,
                    "the reference was set up with this adata.obs column but the query lacks it",
                    f"add adata.obs[{ref.labels_key!r}] to the query",
                )
            obs[ref.labels_key] = pd.Categorical([ref.unlabeled_category] * adata.n_obs)
        if ref.label_hierarchy:
            return _hierarchical_registry(
                adata, ref, new_labels, label_hierarchy, added, batch_cats, cov_cats
            )
        label_cats, added["labels"] = _grown(
            ref.label_categories,
            obs[ref.labels_key],
            f"adata.obs[{ref.labels_key!r}]",
            drop=ref.unlabeled_category,
        )
    if label_hierarchy is not None:
        raise InputError(
            "label_hierarchy",
            "given",
            "the reference was trained without a label hierarchy, so a query cannot extend one",
            "train the reference with SCANVI.setup_anndata(..., "
            "label_hierarchy=...), or leave it None",
        )
    for lab in new_labels or ():
        lab = str(lab)
        if ref.labels_key is None:
            raise InputError(
                "new_labels",
                list(new_labels),
                "the reference has no labels",
                "leave new_labels=None",
            )
        if lab == ref.unlabeled_category:
            raise InputError(
                "new_labels", lab, "is the unlabelled category", "name real cell types only"
            )
        if lab not in label_cats:
            label_cats = (*label_cats, lab)
            added["labels"].append(lab)
    reg = ref.replace(
        batch_categories=batch_cats,
        label_categories=label_cats,
        categorical_covariate_categories=tuple(cov_cats),
    )
    return reg, added


def _hierarchical_registry(adata, ref, new_labels, extension, added, batch_cats, cov_cats):
    """`query_registry` for a reference with a label hierarchy: query labels at any
    node, new leaves under existing nodes through ``extension`` (child -> parent)."""
    from ._hierarchy import query_labels

    label_cats, pairs, new = query_labels(adata, ref, extension, f"adata.obs[{ref.labels_key!r}]")
    stray = [str(x) for x in new_labels or () if str(x) not in label_cats]
    if stray:
        raise InputError(
            "new_labels",
            stray[:10],
            "with a label hierarchy, new types "
            "are the new leaves of label_hierarchy that query cells carry",
            "map them to a parent in label_hierarchy and label some cells",
        )
    added["labels"] = new
    reg = ref.replace(
        batch_categories=batch_cats,
        label_categories=label_cats,
        categorical_covariate_categories=tuple(cov_cats),
        label_hierarchy=pairs,
    )
    return reg, added


@dataclass(frozen=True)
class QueryInfo:
    """What `load_query_data` added to the reference, and the freeze switches it used."""

    new_batches: tuple = ()
    new_labels: tuple = ()
    new_covariate_categories: tuple = ()
    freeze: dict | None = None

    def to_dict(self) -> dict:
        """As saved in a model folder (the format's ``query_info``)."""
        return {
            "new_batches": list(self.new_batches),
            "new_labels": list(self.new_labels),
            "new_covariate_categories": list(self.new_covariate_categories),
            "freeze": self.freeze,
        }

    def __getitem__(self, key: str):
        # ``model.query_info["new_batches"]``: it was a dict before it was declared
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, d: dict) -> QueryInfo:
        return cls(
            tuple(d.get("new_batches") or ()),
            tuple(d.get("new_labels") or ()),
            tuple(d.get("new_covariate_categories") or ()),
            d.get("freeze"),
        )


def load_query_data(
    cls,
    adata,
    reference_model,
    *,
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
    freeze_classifier: bool = True,
    unfrozen: bool = False,
    new_labels: Sequence[str] | None = None,
    label_hierarchy=None,
):
    """A query model from a trained reference (scArches surgery).

    ``adata`` must have the reference's genes in order (see
    `prepare_query_anndata`). The query's unseen batch and covariate
    categories get new rows in the layers that take covariates, after the
    reference's (whose codes are kept). Training the returned model
    changes only the new rows and what the switches unfreeze, exactly:
    frozen values stay bitwise equal, whatever the weight decay. Defaults
    are scvi-tools'. For SCANVI, cell types in the query's labels that the
    reference lacks, and ``new_labels``, are added as new classes: new
    columns of the classifier's last layer and new rows of the class
    networks, trained from the query's labelled cells of those types.
    With a reference hierarchy, query cells may carry labels at any node,
    and ``label_hierarchy`` (child -> parent) adds new leaves under
    existing nodes.
    """
    from ..data.cells import check_var_names

    reference_model = _load_reference(cls, reference_model)
    ref_reg: Registry = reference_model.registry
    try:
        check_var_names(adata, ref_reg)
    except InputError as e:
        raise InputError(
            "adata.var_names",
            e.value,
            "the query's genes differ from the reference's (names or order)",
            f"call {cls.__name__}.prepare_query_anndata(adata, reference_model) first",
        ) from None
    if new_labels is not None and isinstance(new_labels, str):
        new_labels = [new_labels]
    flags = Freeze(
        freeze_dropout=freeze_dropout,
        freeze_expression=freeze_expression,
        freeze_decoder_first_layer=freeze_decoder_first_layer,
        freeze_batchnorm_encoder=freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        freeze_classifier=freeze_classifier,
        unfrozen=unfrozen,
    )
    reg, added = query_registry(adata, ref_reg, new_labels, label_hierarchy)
    if added["labels"] and isinstance(reference_model.module, SCANVAE):
        # (scVI uses labels only for dispersion="gene-label", whose new columns train)
        warnings.warn(
            f"load_query_data: new cell types {added['labels'][:10]} are "
            "added to the reference's "
            f"{len(ref_reg.label_categories)}",
            UserWarning,
            stacklevel=2,
        )
    config = reference_model.module.config
    changes = {
        "n_batch": reg.n_batch,
        "n_labels": reg.n_labels,
        "n_cats_per_cov": reg.n_cats_per_cov,
    }
    if isinstance(config, SCANVIConfig) and reg.label_hierarchy:
        from ._hierarchy import parents_of

        changes["label_parents"] = parents_of(reg)
    if freeze_dropout:
        changes["dropout_rate"] = 0.0
        if isinstance(config, SCANVIConfig):
            changes["classifier_dropout_rate"] = 0.0
    frozen_bn = [
        m
        for m, f in (
            ("z_encoder", freeze_batchnorm_encoder),
            ("encoder_z2_z1", freeze_batchnorm_encoder),
            ("decoder", freeze_batchnorm_decoder),
            ("decoder_z1_z2", freeze_batchnorm_decoder),
            ("classifier", freeze_classifier),
        )
        if f and not unfrozen
    ]
    changes["frozen_batchnorm"] = tuple(frozen_bn)
    if isinstance(config, SCANVIConfig) and config.y_prior is not None and added["labels"]:
        p = np.asarray(config.y_prior, float) / np.sum(config.y_prior)
        changes["y_prior"] = tuple(p) + (float(p.mean()),) * len(added["labels"])
    config = dataclasses.replace(config, **changes)
    adata.uns[UNS_KEY] = reg.to_json()
    model = cls(
        adata,
        registry=reg,
        _config=config,
        seed=reference_model.init_seed,
        encoder=reference_model.module.encoder_cls,
        decoder=reference_model.module.decoder_cls,
    )
    merged, is_new = transplant(reference_model.variables, model.variables)
    model._adopt_variables(merged, freeze=freeze_masks(merged, is_new, flags))
    model.query_info = QueryInfo(
        new_batches=tuple(added["batch"]),
        new_labels=tuple(added["labels"]),
        new_covariate_categories=tuple(added["covariates"]),
        freeze=flags.to_dict(),
    )
    model._inherit_reference(reference_model)
    return model

"""Reference mapping: align a query's genes, then scArches surgery.

`prepare_query_anndata` (`_align`) puts a query's genes in the reference's
order and pads the missing ones with zeros, without densifying. `load_query_data`
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

import numpy as np
import pandas as pd

from .. import io
from ..data.registry import UNS_KEY, Registry, categories_of
from ..errors import InputError, ModelFormatError
from ..module import SCANVAE, SCANVIConfig
from ..surgery import Freeze, freeze_masks, transplant


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
        kind = kinds.get(name) if isinstance(name, str) else None
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
    _check_columns(obs, ref)
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
    label_cats = _with_new_labels(label_cats, new_labels, ref, added["labels"])
    reg = ref.replace(
        batch_categories=batch_cats,
        label_categories=label_cats,
        categorical_covariate_categories=tuple(cov_cats),
    )
    return reg, added


def _check_columns(obs: pd.DataFrame, ref: Registry) -> None:
    """The query has every adata.obs column the reference was set up with."""

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


def _with_new_labels(
    label_cats: tuple[str, ...], new_labels, ref: Registry, added: list[str]
) -> tuple[str, ...]:
    """``label_cats`` then each of ``new_labels`` it lacks (appended to ``added``)."""
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
            added.append(lab)
    return label_cats


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
    reference_model = _load_reference(cls, reference_model)
    ref_reg: Registry = reference_model.registry
    _check_genes(cls, adata, ref_reg)
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
    config = _query_config(reference_model.module.config, reg, added["labels"], flags)
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


def _check_genes(cls, adata, ref_reg: Registry) -> None:
    """The query's genes are the reference's, in order."""
    from ..data.cells import check_var_names

    try:
        check_var_names(adata, ref_reg)
    except InputError as e:
        raise InputError(
            "adata.var_names",
            e.value,
            "the query's genes differ from the reference's (names or order)",
            f"call {cls.__name__}.prepare_query_anndata(adata, reference_model) first",
        ) from None


def _query_config(config, reg: Registry, new_labels: list[str], flags: Freeze):
    """The reference's module config grown to the query registry's sizes, with
    what the freeze switches fix (dropout off, frozen batch norm)."""
    changes = {
        "n_batch": reg.n_batch,
        "n_labels": reg.n_labels,
        "n_cats_per_cov": reg.n_cats_per_cov,
    }
    if isinstance(config, SCANVIConfig) and reg.label_hierarchy:
        from ._hierarchy import parents_of

        changes["label_parents"] = parents_of(reg)
    if flags.freeze_dropout:
        changes["dropout_rate"] = 0.0
        if isinstance(config, SCANVIConfig):
            changes["classifier_dropout_rate"] = 0.0
    frozen_bn = [
        m
        for m, f in (
            ("z_encoder", flags.freeze_batchnorm_encoder),
            ("encoder_z2_z1", flags.freeze_batchnorm_encoder),
            ("decoder", flags.freeze_batchnorm_decoder),
            ("decoder_z1_z2", flags.freeze_batchnorm_decoder),
            ("classifier", flags.freeze_classifier),
        )
        if f and not flags.unfrozen
    ]
    changes["frozen_batchnorm"] = tuple(frozen_bn)
    if isinstance(config, SCANVIConfig) and config.y_prior is not None and new_labels:
        p = np.asarray(config.y_prior, float) / np.sum(config.y_prior)
        changes["y_prior"] = tuple(p) + (float(p.mean()),) * len(new_labels)
    return dataclasses.replace(config, **changes)

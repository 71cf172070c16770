"""SCANVI's own arguments: its setup keys, classifier options and labels
checked, and its constructor's arguments as a `SCANVIConfig`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..module import SCANVIConfig
from ._hierarchy import parents_of


def config_of(
    registry,
    *,
    linear_classifier: bool,
    y_prior: Sequence[float] | None,
    classifier_parameters: dict | None,
    class_chunk_size: int,
    **arch,
) -> SCANVIConfig:
    """`SCANVI`'s config: the registry's sizes, scVI's architecture ``arch``
    (`SCVI`'s keywords) and the classifier's options."""
    cls_kw = classifier_options(classifier_parameters)
    return SCANVIConfig(
        n_genes=registry.n_vars,
        n_batch=registry.n_batch,
        n_labels=registry.n_labels,
        n_cats_per_cov=registry.n_cats_per_cov,
        n_continuous_cov=registry.n_continuous_cov,
        **arch,
        use_size_factor_key=registry.size_factor_key is not None,
        classifier_n_hidden=cls_kw.get("n_hidden", 0 if linear_classifier else arch["n_hidden"]),
        classifier_n_layers=cls_kw.get("n_layers", 0 if linear_classifier else arch["n_layers"]),
        classifier_dropout_rate=cls_kw.get("dropout_rate", arch["dropout_rate"]),
        classifier_use_batch_norm=cls_kw.get("use_batch_norm"),
        classifier_use_layer_norm=cls_kw.get("use_layer_norm"),
        y_prior=None if y_prior is None else tuple(float(p) for p in y_prior),
        class_chunk_size=class_chunk_size,
        label_parents=parents_of(registry),
    )


def check_setup_keys(labels_key, unlabeled_category) -> None:
    """`SCANVI.setup_anndata` needs a labels column and the unlabelled value."""
    if labels_key is None:
        raise InputError(
            "labels_key",
            None,
            "scANVI needs a cell-type column",
            "pass labels_key naming the adata.obs column of labels",
        )
    if unlabeled_category is None:
        raise InputError(
            "unlabeled_category",
            None,
            "scANVI needs the value that marks unlabelled cells",
            "pass e.g. unlabeled_category='Unknown'",
        )


def check_registry(registry) -> None:
    """A registry set up for scANVI (`SCANVI.setup_anndata`)."""
    if registry.unlabeled_category is None or registry.labels_key is None:
        raise InputError(
            "adata",
            "set up without unlabeled_category",
            "SCANVI needs labels_key and unlabeled_category",
            "call SCANVI.setup_anndata(adata, labels_key=..., unlabeled_category=...)",
        )


def classifier_options(classifier_parameters: dict | None) -> dict:
    """scvi-tools' ``classifier_parameters``, checked: the options our classifier has."""
    cls_kw = dict(classifier_parameters or {})
    allowed = {"n_hidden", "n_layers", "dropout_rate", "use_batch_norm", "use_layer_norm"}
    unknown = set(cls_kw) - allowed
    if unknown:
        raise InputError(
            "classifier_parameters",
            sorted(unknown),
            "unknown classifier options",
            f"use only {sorted(allowed)}",
        )
    return cls_kw


def check_labels(labels: np.ndarray, registry) -> None:
    """At least two cell types carry labels (with a hierarchy: every leaf has
    cells, which `setup_anndata` checked, once any cell is labelled)."""
    C = registry.n_labels
    if registry.label_hierarchy and (labels != C).any():
        return
    present = np.unique(labels[labels < C])
    if len(present) == 0:
        raise InputError(
            f"adata.obs[{registry.labels_key!r}]",
            "all unlabelled",
            "no cell carries a label",
            "label some cells of at least two types",
        )
    if len(present) < 2:
        raise InputError(
            f"adata.obs[{registry.labels_key!r}]",
            registry.label_categories[present[0]],
            "only one cell type is labelled",
            "label cells of at least two types",
        )


def check_objective(objective) -> None:
    """``plan_kwargs['objective']``: scANVI's two training objectives."""
    if objective not in ("seed", "scvi-tools"):
        raise InputError(
            "plan_kwargs['objective']",
            objective,
            "unknown objective",
            "pass 'seed' (default) or 'scvi-tools'",
        )

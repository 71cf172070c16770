"""A saved folder's metadata, checked before anything is allocated.

Every value `load` uses is checked for its type and a sane range, every size
the config declares (genes, batches, labels, covariates) against the
registry's lists, and the parameter shapes the config implies (traced
abstractly, so nothing of their size is allocated) against the stored blob.
A damaged or hostile folder therefore gives a `ModelFormatError`, never a
huge allocation or a stray exception.
"""

from __future__ import annotations

import dataclasses

from ..data import hierarchy
from ..data.registry import Registry
from ..errors import InputError, ModelFormatError
from ._hierarchy import parents_of
from ._validate_blobs import check_variables
from ._validate_core import MAX_DIM, Bad, int_in, is_int, is_num, str_list, want
from ._validate_model import model_fields

__all__ = ["check", "check_variables", "registry_of"]

_INT_FIELDS = {
    "n_genes": 1,
    "n_batch": 1,
    "n_labels": 1,
    "n_continuous_cov": 0,
    "n_hidden": 1,
    "n_latent": 1,
    "n_layers": 1,
    "classifier_n_hidden": 0,
    "classifier_n_layers": 0,
    "class_chunk_size": 1,
}  # name: smallest value
_BOOL_FIELDS = (
    "encode_covariates",
    "deeply_inject_covariates",
    "use_observed_lib_size",
    "use_size_factor_key",
    "log_variational",
)
_REGISTRY_STR_LISTS = (
    "var_names",
    "batch_categories",
    "label_categories",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)
_REGISTRY_OPT_STRS = ("layer", "batch_key", "labels_key", "unlabeled_category", "size_factor_key")


def check(cls, dir_path, meta: dict) -> tuple[Registry, object]:
    """(registry, config) of a folder's metadata, every declared size checked."""
    try:
        registry = _registry(meta.get("registry"))
        config = _config(cls, meta.get("config"))
        _sizes(config, registry)
        model_fields(meta, cls)
    except Bad as e:
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata is damaged: {e}. Fix: save the "
            "model again, or restore the folder from a copy"
        ) from None
    return registry, config


def registry_of(dir_path, meta: dict) -> Registry:
    """The folder's registry, checked (for readers that need only that)."""
    try:
        return _registry(meta.get("registry"))
    except Bad as e:
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata is damaged: {e}. Fix: save the "
            "model again, or restore the folder from a copy"
        ) from None


def _registry(d) -> Registry:
    want(isinstance(d, dict), "registry", d, "must be an object")
    known = {f.name for f in dataclasses.fields(Registry)}
    want(set(d) <= known, "registry", sorted(set(d) - known)[:5], "unknown fields")
    want("var_names" in d, "registry.var_names", None, "missing")
    for k in _REGISTRY_STR_LISTS:
        if k in d:
            str_list(
                d[k],
                f"registry.{k}",
                non_empty=k in ("var_names", "batch_categories", "label_categories"),
                unique=True,
            )
    for k in _REGISTRY_OPT_STRS:
        want(
            d.get(k) is None or isinstance(d[k], str),
            f"registry.{k}",
            d.get(k),
            "must be a string or null",
        )
    cats = d.get("categorical_covariate_categories", [])
    want(
        isinstance(cats, list) and len(cats) == len(d.get("categorical_covariate_keys", [])),
        "registry.categorical_covariate_categories",
        cats,
        "must list one list of categories per categorical covariate key",
    )
    for i, c in enumerate(cats):
        str_list(c, f"registry.categorical_covariate_categories[{i}]", non_empty=True, unique=True)
    want(
        isinstance(d.get("allow_noninteger_counts", False), bool),
        "registry.allow_noninteger_counts",
        d.get("allow_noninteger_counts"),
        "must be true or false",
    )
    want(
        is_int(d.get("format_version", 1)),
        "registry.format_version",
        d.get("format_version"),
        "must be an integer",
    )
    _label_hierarchy(d)
    try:
        return Registry.from_dict(d)
    except (TypeError, ValueError) as e:
        raise Bad(f"registry ({e})") from None


def _label_hierarchy(d) -> None:
    pairs = d.get("label_hierarchy")
    if pairs is None:
        return
    want(
        isinstance(pairs, list)
        and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in pairs
        ),
        "registry.label_hierarchy",
        pairs,
        "must be a list of [child, parent] name pairs",
    )
    try:
        hierarchy.root_of(dict(pairs))  # cycles and roots
    except InputError as e:
        raise Bad(f"registry.label_hierarchy ({e.problem})") from None
    parents = {p for _, p in pairs}
    leaves = {c for c, _ in pairs} - parents
    want(
        set(d.get("label_categories", ())) == leaves and len(pairs) == len(dict(pairs)),
        "registry.label_hierarchy",
        sorted(leaves)[:5],
        "its leaves must be the registry's label_categories, each child listed once",
    )


def _config(cls, d):
    want(isinstance(d, dict), "config", d, "must be an object")
    names = {f.name for f in dataclasses.fields(cls.config_cls)}
    want(set(d) <= names, "config", sorted(set(d) - names)[:5], "unknown fields")
    for k, lo in _INT_FIELDS.items():
        if k in d:
            int_in(d[k], f"config.{k}", lo, MAX_DIM)
    for k in _BOOL_FIELDS:
        if k in d:
            want(isinstance(d[k], bool), f"config.{k}", d[k], "must be true or false")
    for k in ("classifier_use_batch_norm", "classifier_use_layer_norm"):
        want(
            d.get(k) is None or isinstance(d[k], bool),
            f"config.{k}",
            d.get(k),
            "must be true, false or null",
        )
    for k in ("dropout_rate", "classifier_dropout_rate"):
        if k in d:
            want(is_num(d[k]) and 0 <= d[k] < 1, f"config.{k}", d[k], "must lie in [0, 1)")
    cats = d.get("n_cats_per_cov", [])
    want(
        isinstance(cats, list) and all(is_int(c) and 1 <= c <= MAX_DIM for c in cats),
        "config.n_cats_per_cov",
        cats,
        "must be a list of positive integers",
    )
    str_list(d.get("frozen_batchnorm", []), "config.frozen_batchnorm")
    prior = d.get("y_prior")
    want(
        prior is None or (isinstance(prior, list) and all(is_num(p) and p > 0 for p in prior)),
        "config.y_prior",
        prior,
        "must be null or a list of positive numbers",
    )
    parents = d.get("label_parents")
    want(
        parents is None
        or (
            isinstance(parents, list)
            and len(parents) <= MAX_DIM
            and all(is_int(p) for p in parents)
        ),
        "config.label_parents",
        parents,
        "must be null or a list of integers",
    )
    try:
        return cls.config_cls.from_dict(d)
    except (TypeError, ValueError) as e:  # (InputError is a ValueError)
        raise Bad(f"config ({e})") from None


def _sizes(config, registry: Registry) -> None:
    """Each size the config declares is the length of a list in the registry."""
    for field, declared, actual in (
        ("n_genes", config.n_genes, registry.n_vars),
        ("n_batch", config.n_batch, registry.n_batch),
        ("n_labels", config.n_labels, registry.n_labels),
        ("n_cats_per_cov", list(config.n_cats_per_cov), list(registry.n_cats_per_cov)),
        ("n_continuous_cov", config.n_continuous_cov, registry.n_continuous_cov),
    ):
        want(declared == actual, f"config.{field}", declared, f"the registry lists {actual}")
    declared = getattr(config, "label_parents", None)
    want(
        declared == parents_of(registry),
        "config.label_parents",
        None if declared is None else list(declared)[:10],
        "must be the tree of the registry's label_hierarchy (null when flat)",
    )

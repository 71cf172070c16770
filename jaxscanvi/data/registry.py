"""setup_anndata: validate an AnnData once and record how to read it.

The record is a frozen, JSON-serialisable dataclass (`Registry`) kept in
``adata.uns`` as a JSON string and saved with every model, so a model can read
a new AnnData exactly as it read the training one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._version import FORMAT_VERSION
from ..errors import InputError
from . import hierarchy
from .checks import UNLABELLED_NAMES as UNLABELLED_NAMES  # re-exported, as categories_of
from .checks import (
    _check_continuous,
    _check_library_sizes,
    _check_size_factors,
    _checked_var_names,
    _label_categories,
    _obs_column,
    _warn_single_cell_batches,
    categories_of,
)

UNS_KEY = "_jaxscanvi_registry"


@dataclass(frozen=True)
class Registry:
    """How to turn an AnnData into model inputs.

    Categories are stored as strings in a fixed order; a code is the position
    in that order. ``label_categories`` lists the classes only: the unlabelled
    category, when there is one, is not a class and gets code
    ``len(label_categories)``.
    """

    var_names: tuple[str, ...]
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: tuple[str, ...] = ("0",)
    labels_key: str | None = None
    label_categories: tuple[str, ...] = ("0",)
    unlabeled_category: str | None = None
    size_factor_key: str | None = None
    categorical_covariate_keys: tuple[str, ...] = ()
    categorical_covariate_categories: tuple[tuple[str, ...], ...] = ()
    continuous_covariate_keys: tuple[str, ...] = ()
    allow_noninteger_counts: bool = False
    format_version: int = FORMAT_VERSION
    # child -> parent pairs, sorted; label_categories are then its leaves
    label_hierarchy: tuple[tuple[str, str], ...] | None = None

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def n_batch(self) -> int:
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        return len(self.label_categories)

    @property
    def n_cats_per_cov(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categorical_covariate_categories)

    @property
    def n_continuous_cov(self) -> int:
        return len(self.continuous_covariate_keys)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["label_hierarchy"] is None:  # flat models write what they always wrote
            del d["label_hierarchy"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Registry:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"registry has unknown fields {sorted(unknown)}")
        d = dict(d)
        for k in (
            "var_names",
            "batch_categories",
            "label_categories",
            "categorical_covariate_keys",
            "continuous_covariate_keys",
        ):
            if k in d:
                d[k] = tuple(d[k])
        if "categorical_covariate_categories" in d:
            d["categorical_covariate_categories"] = tuple(
                tuple(c) for c in d["categorical_covariate_categories"]
            )
        if d.get("label_hierarchy") is not None:
            d["label_hierarchy"] = tuple((str(a), str(b)) for a, b in d["label_hierarchy"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> Registry:
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> Registry:
        return dataclasses.replace(self, **changes)


def setup_anndata(  # noqa: PLR0913 (scvi-tools' keywords)
    adata,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    *,
    unlabeled_category: str | None = None,
    allow_noninteger_counts: bool = False,
    label_hierarchy=None,
) -> Registry:
    """Validate ``adata`` and store its registry in ``adata.uns``; also return it."""
    registry = build_registry(
        adata,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
        unlabeled_category=unlabeled_category,
        allow_noninteger_counts=allow_noninteger_counts,
        label_hierarchy=label_hierarchy,
    )
    adata.uns[UNS_KEY] = registry.to_json()
    return registry


def build_registry(  # noqa: PLR0913 (setup_anndata's keywords)
    adata,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    unlabeled_category: str | None = None,
    allow_noninteger_counts: bool = False,
    label_hierarchy=None,
) -> Registry:
    var_names = _checked_var_names(adata)
    _check_library_sizes(adata, layer, var_names, allow_noninteger=allow_noninteger_counts)

    batch_cats: tuple[str, ...] = ("0",)
    if batch_key is not None:
        batch_cats = categories_of(
            _obs_column(adata, batch_key, "batch_key"), f"adata.obs[{batch_key!r}]"
        )

    label_cats = _label_categories(adata, labels_key, unlabeled_category)
    pairs = None
    if label_hierarchy is not None:
        if labels_key is None:
            raise InputError(
                "label_hierarchy",
                "given",
                "a hierarchy needs labels",
                "pass labels_key naming the cell-type column",
            )
        tree = hierarchy.build(
            label_hierarchy,
            adata.obs[labels_key],
            label_cats,
            unlabeled_category,
            f"adata.obs[{labels_key!r}]",
        )
        label_cats, pairs = tree.leaves, tree.parent

    _check_size_factors(adata, size_factor_key)
    cat_keys = tuple(categorical_covariate_keys or ())
    cat_cats = tuple(
        categories_of(_obs_column(adata, k, "categorical_covariate_keys"), f"adata.obs[{k!r}]")
        for k in cat_keys
    )
    cont_keys = tuple(continuous_covariate_keys or ())
    _check_continuous(adata, cont_keys)
    _warn_single_cell_batches(adata, batch_key, batch_cats)

    return Registry(
        var_names=tuple(str(v) for v in var_names),
        layer=layer,
        batch_key=batch_key,
        batch_categories=batch_cats,
        labels_key=labels_key,
        label_categories=label_cats,
        unlabeled_category=None if unlabeled_category is None else str(unlabeled_category),
        size_factor_key=size_factor_key,
        categorical_covariate_keys=cat_keys,
        categorical_covariate_categories=cat_cats,
        continuous_covariate_keys=cont_keys,
        allow_noninteger_counts=allow_noninteger_counts,
        label_hierarchy=pairs,
    )


def registry_of(adata) -> Registry:
    """The registry that setup_anndata stored in ``adata``."""
    if UNS_KEY not in getattr(adata, "uns", {}):
        raise InputError(
            "adata",
            "not set up",
            "setup_anndata has not been run on this AnnData",
            "call SCVI.setup_anndata(adata, ...) (or SCANVI.setup_anndata) first",
        )
    return Registry.from_json(str(adata.uns[UNS_KEY]))

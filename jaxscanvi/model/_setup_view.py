"""What scvi-tools users read off a model's AnnData setup.

``model.adata_manager`` (an `AnnDataSetup`), ``model.view_anndata_setup()``
and ``model.summary_string``, built from the model's `Registry` (which is
all the setup there is here: no ``_scvi_*`` columns are added to the data).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..data.registry import Registry, registry_of
from ..errors import InputError

# scvi-tools' REGISTRY_KEYS: the names of the registered fields
REGISTRY_KEYS = SimpleNamespace(
    X_KEY="X",
    BATCH_KEY="batch",
    LABELS_KEY="labels",
    SIZE_FACTOR_KEY="size_factor",
    CAT_COVS_KEY="extra_categorical_covs",
    CONT_COVS_KEY="extra_continuous_covs",
)


class StateRegistry(dict):
    """A field's categories, readable as keys or attributes (scvi-tools' attrdict)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class AnnDataSetup:
    """The AnnData a model was set up with, and how its fields are read."""

    def __init__(self, adata, registry: Registry, model_name: str):
        self.adata, self.registry, self.model_name = adata, registry, model_name

    @property
    def summary_stats(self) -> dict[str, int]:
        r = self.registry
        return {
            "n_cells": 0 if self.adata is None else int(self.adata.n_obs),
            "n_vars": r.n_vars,
            "n_batch": r.n_batch,
            "n_labels": r.n_labels,
            "n_extra_categorical_covs": len(r.categorical_covariate_keys),
            "n_extra_continuous_covs": len(r.continuous_covariate_keys),
        }

    @property
    def data_registry(self) -> dict[str, dict]:
        """Registered field -> where it is read from (``attr_name``, ``attr_key``)."""
        r = self.registry
        out = {"X": {"attr_name": "X" if r.layer is None else "layers", "attr_key": r.layer}}
        for name, key in (
            ("batch", r.batch_key),
            ("labels", r.labels_key),
            ("size_factor", r.size_factor_key),
        ):
            if key is not None:
                out[name] = {"attr_name": "obs", "attr_key": key}
        if r.categorical_covariate_keys:
            out["extra_categorical_covs"] = {
                "attr_name": "obs",
                "attr_key": list(r.categorical_covariate_keys),
            }
        if r.continuous_covariate_keys:
            out["extra_continuous_covs"] = {
                "attr_name": "obs",
                "attr_key": list(r.continuous_covariate_keys),
            }
        return out

    def get_state_registry(self, key: str) -> StateRegistry:
        """A categorical field's ``categorical_mapping`` (category of each code) and
        ``original_key``; for labels also ``unlabeled_category``."""
        r = self.registry
        if key == "batch":
            return StateRegistry(
                categorical_mapping=np.asarray(r.batch_categories, object), original_key=r.batch_key
            )
        if key == "labels":
            cats = r.label_categories
            if r.unlabeled_category is not None:  # scvi-tools lists it last
                cats = (*cats, r.unlabeled_category)
            return StateRegistry(
                categorical_mapping=np.asarray(cats, object),
                original_key=r.labels_key,
                unlabeled_category=r.unlabeled_category,
            )
        if key == "extra_categorical_covs":
            return StateRegistry(
                field_keys=list(r.categorical_covariate_keys),
                mappings={
                    k: np.asarray(c, object)
                    for k, c in zip(
                        r.categorical_covariate_keys, r.categorical_covariate_categories
                    )
                },
            )
        if key == "extra_continuous_covs":
            return StateRegistry(columns=np.asarray(r.continuous_covariate_keys, object))
        raise InputError(
            "key",
            key,
            "is not a categorical field of the setup",
            "pass 'batch', 'labels', 'extra_categorical_covs' or 'extra_continuous_covs'",
        )

    def get_from_registry(self, key: str):
        """The registered data of ``key``: the counts for "X", else the obs column(s)."""
        if self.adata is None:
            raise InputError(
                "adata", None, "this model was loaded without data", "load it with adata=..."
            )
        where = self.data_registry.get(key)
        if where is None:
            raise InputError(
                "key", key, "is not registered", f"pass one of {list(self.data_registry)}"
            )
        if key == "X":
            return (
                self.adata.X if where["attr_key"] is None else self.adata.layers[where["attr_key"]]
            )
        return self.adata.obs[where["attr_key"]].to_numpy()

    def view_registry(self, hide_state_registries: bool = False) -> None:  # noqa: FBT001, FBT002 (scvi-tools' signature)
        print(setup_text(self, hide_state_registries=hide_state_registries))


def setup_text(setup: AnnDataSetup, *, hide_state_registries: bool = False) -> str:
    """`view_registry`'s text: setup arguments, summary, fields, categories."""
    r = setup.registry
    args = {
        "layer": r.layer,
        "batch_key": r.batch_key,
        "labels_key": r.labels_key,
        "size_factor_key": r.size_factor_key,
        "categorical_covariate_keys": list(r.categorical_covariate_keys) or None,
        "continuous_covariate_keys": list(r.continuous_covariate_keys) or None,
    }
    if r.unlabeled_category is not None:
        args["unlabeled_category"] = r.unlabeled_category
    lines = [f"Setup via `{setup.model_name}.setup_anndata` with arguments:"]
    lines += [f"    {k}={v!r}" for k, v in args.items()]
    lines += ["Summary statistics:"]
    lines += [f"    {k}: {v}" for k, v in setup.summary_stats.items()]
    lines += ["Data registry:"]
    for name, where in setup.data_registry.items():
        target = f"adata.{where['attr_name']}" + (
            "" if where["attr_key"] is None else f"[{where['attr_key']!r}]"
        )
        lines.append(f"    {name}: {target}")
    if not hide_state_registries:
        for key in ("batch", "labels"):
            if key in setup.data_registry:
                mapping = setup.get_state_registry(key).categorical_mapping
                lines.append(f"{key} state registry ({setup.data_registry[key]['attr_key']}):")
                lines += [f"    {cat} -> {code}" for code, cat in enumerate(mapping)]
    return "\n".join(lines)


# ------------------------------------------------- bound onto BaseModel
def adata_manager(self) -> AnnDataSetup:
    """The model's AnnData setup (scvi-tools' ``model.adata_manager``)."""
    return AnnDataSetup(self.adata, self.registry, type(self).__name__)


def view_anndata_setup(self, adata=None, hide_state_registries: bool = False) -> None:  # noqa: FBT001, FBT002 (scvi-tools' signature)
    """Print how ``adata`` (default: the model's) is set up."""
    registry = self.registry if adata is None else registry_of(adata)
    setup = AnnDataSetup(self.adata if adata is None else adata, registry, type(self).__name__)
    print(setup_text(setup, hide_state_registries=hide_state_registries))


def summary_string(self) -> str:
    """scvi-tools' one-paragraph model summary (also ``print(model)``)."""
    c = self.module.config
    text = (
        f"{type(self).__name__} model with the following parameters: \n"
        f"n_hidden: {c.n_hidden}, n_latent: {c.n_latent}, n_layers: {c.n_layers}, "
        f"dropout_rate: {c.dropout_rate}, dispersion: {c.dispersion}, \n"
        f"gene_likelihood: {c.gene_likelihood}, "
        f"latent_distribution: {c.latent_distribution}."
    )
    status = "Trained" if self.is_trained else "Not Trained"
    return text + f"\nTraining status: {status}\nModel's adata is minified?: False"

"""`SCANVI.from_scvi_model`: a scANVI model that starts from a trained scVI model."""

from __future__ import annotations

import warnings

import numpy as np

from ..data.registry import build_registry
from ..errors import InputError
from ._import import ARCH_KEYS
from .scvi import SCVI


def from_scvi_model(
    cls,
    scvi_model: SCVI,
    unlabeled_category: str,
    labels_key: str | None = None,
    adata=None,
    *,
    label_hierarchy=None,
    **scanvi_kwargs,
):
    """Initialise from a trained SCVI: every shared weight is copied.

    Architecture arguments already fixed by the scVI model are ignored
    with a warning, as in scvi-tools; the classifier and the class
    networks start fresh. ``label_hierarchy`` as in `SCANVI.setup_anndata`.
    """
    if not isinstance(scvi_model, SCVI):
        raise InputError(
            "scvi_model",
            type(scvi_model).__name__,
            "not an SCVI model",
            "pass a trained jaxscanvi.SCVI",
        )
    if not scvi_model.is_trained:
        warnings.warn(
            "from_scvi_model: the scVI model has not been trained", UserWarning, stacklevel=2
        )
    adata = adata if adata is not None else scvi_model.adata
    reg = scvi_model.registry
    labels_key = labels_key or reg.labels_key
    if labels_key is None:
        raise InputError(
            "labels_key",
            None,
            "the scVI model was set up without labels and none was given",
            "pass labels_key=...",
        )
    cfg = scvi_model.module.config
    for k in ARCH_KEYS:
        if k in scanvi_kwargs:
            warnings.warn(
                f"Ignoring param '{k}' as it was already passed in to the "
                f"pretrained SCVI model with value {getattr(cfg, k)!r}.",
                UserWarning,
                stacklevel=2,
            )
            scanvi_kwargs.pop(k)
    new_reg = build_registry(
        adata,
        layer=reg.layer,
        batch_key=reg.batch_key,
        labels_key=labels_key,
        size_factor_key=reg.size_factor_key,
        categorical_covariate_keys=reg.categorical_covariate_keys,
        continuous_covariate_keys=reg.continuous_covariate_keys,
        unlabeled_category=unlabeled_category,
        allow_noninteger_counts=reg.allow_noninteger_counts,
        label_hierarchy=label_hierarchy,
    )
    # keep the scVI model's category orders for batches and covariates
    new_reg = new_reg.replace(
        batch_categories=reg.batch_categories,
        categorical_covariate_categories=reg.categorical_covariate_categories,
    )
    if cfg.dispersion == "gene-label":
        raise InputError(
            "dispersion",
            "gene-label",
            "the scVI model's per-label dispersion does not carry over to scANVI's classes",
            "pretrain scVI with dispersion='gene' or 'gene-batch'",
        )
    adata.uns["_jaxscanvi_registry"] = new_reg.to_json()
    arch = {k: getattr(cfg, k) for k in ARCH_KEYS}
    scanvi_kwargs.setdefault("encoder", scvi_model.module.encoder_cls)
    scanvi_kwargs.setdefault("decoder", scvi_model.module.decoder_cls)
    model = cls(adata, **arch, **scanvi_kwargs, seed=scvi_model.init_seed, registry=new_reg)
    params = _copy_shared(scvi_model.params, model.params)
    model._adopt(params=params, state=_copy_shared(scvi_model.state, model.state))
    model.was_pretrained = True
    return model


def _copy_shared(src: dict, dst: dict) -> dict:
    """dst with every leaf that also exists in src (same path and shape) taken from src."""
    out = {}
    for k, v in dst.items():
        if k in src and isinstance(v, dict) and isinstance(src[k], dict):
            out[k] = _copy_shared(src[k], v)
        elif k in src and not isinstance(v, dict) and np.shape(src[k]) == np.shape(v):
            out[k] = src[k]
        else:
            out[k] = v
    return out

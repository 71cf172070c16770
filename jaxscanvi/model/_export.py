"""Write a model as a scvi-tools folder (``model.pt``) that scvi-tools' ``load`` opens.

The weights are `_import`'s mapping run backwards (checked by running it
forwards again: the round trip must give back every value exactly). Parts
scvi-tools builds but this model does not use (the library encoder with the
observed library size, the unused dispersion and dropout heads) are written
as zeros: scvi-tools does not use them either. ``attr_dict`` carries what
scvi-tools' ``load`` reads: the registry, ``init_params_`` and the indices.
The training history is not written, nor scANVI's temperature (scvi-tools
has none; the classifier's weights are written as trained).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

from .. import torchfile
from .._version import __version__
from ..data import hierarchy
from ..errors import InputError
from ._weights import _LINEAR, _NETS_SCVI, map_weights

SCVI_TOOLS_VERSION = "1.4.2"  # the registry layout written (scvi-tools >= 1.0 reads it)


def _np(tree):
    return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), tree)


def _fc_layers(state: dict, prefix: str, net: dict, stats: dict) -> None:
    i = 0
    while f"dense{i}" in net:
        covs = sorted(
            (int(name.rpartition("cov")[2]), name)
            for name in net
            if name.startswith(f"layer{i}_cov")
        )
        blocks = [net[f"dense{i}"]["kernel"].T] + [net[name].T for _, name in covs]
        layer = f"{prefix}.fc_layers.Layer {i}"
        state[f"{layer}.0.weight"] = np.concatenate(blocks, axis=1)
        state[f"{layer}.0.bias"] = net[f"dense{i}"]["bias"]
        if f"bn{i}" in net:
            bn, st = net[f"bn{i}"], stats[f"bn{i}"]
            state[f"{layer}.1.weight"] = bn["scale"]
            state[f"{layer}.1.bias"] = bn["bias"]
            state[f"{layer}.1.running_mean"] = st["mean"]
            state[f"{layer}.1.running_var"] = st["var"]
            state[f"{layer}.1.num_batches_tracked"] = np.zeros((), np.int64)
        i += 1


def _linear(state: dict, prefix: str, layer: dict) -> None:
    state[f"{prefix}.weight"] = layer["kernel"].T
    state[f"{prefix}.bias"] = layer["bias"]


def state_dict(model) -> dict:
    """scvi-tools' ``module.state_dict()`` for ``model`` (numpy arrays)."""
    params, stats = _np(model.params), _np(model.state.get("batch_stats", {}))
    const = _np(model.state.get("constants", {}))
    cfg = model.module.config
    state: dict = {}
    for prefix, path in _NETS_SCVI.items():
        net = params.get(path[0], {}).get(path[1])
        if net is not None:
            _fc_layers(state, prefix, net, stats.get(path[0], {}).get(path[1], {}))
    linear = dict(_LINEAR)
    if "classifier" in params:
        last = (
            "classifier.classifier.1"
            if "classifier" in params["classifier"]
            else "classifier.classifier.0"
        )
        linear[last] = ("classifier", "logits")
    for prefix, path in linear.items():
        layer = params.get(path[0], {}).get(path[1])
        if layer is not None:
            _linear(state, prefix, layer)
    n_hidden = state["z_encoder.encoder.fc_layers.Layer 0.0.bias"].shape[0]
    if "l_encoder" not in params:  # built by scvi-tools, unused with the observed library
        first = "z_encoder.encoder.fc_layers.Layer 0"
        for key, value in list(state.items()):
            if key.startswith(first + "."):
                zero = (
                    np.ones_like(value)
                    if key.endswith(("1.weight", "running_var"))
                    else np.zeros_like(value)
                )
                state["l_encoder.encoder.fc_layers.Layer 0." + key[len(first) + 1 :]] = zero
        for head in ("mean_encoder", "var_encoder"):
            state[f"l_encoder.{head}.weight"] = np.zeros((1, n_hidden), np.float32)
            state[f"l_encoder.{head}.bias"] = np.zeros((1,), np.float32)
    for head in ("px_r_decoder", "px_dropout_decoder"):  # heads this setting does not use
        if f"decoder.{head}.weight" not in state:
            state[f"decoder.{head}.weight"] = np.zeros((cfg.n_genes, n_hidden), np.float32)
            state[f"decoder.{head}.bias"] = np.zeros((cfg.n_genes,), np.float32)
    widths = {"gene": (), "gene-batch": (cfg.n_batch,), "gene-label": (cfg.n_labels,)}
    if "px_r" in params:
        state["px_r"] = params["px_r"]
    elif cfg.dispersion in widths:
        state["px_r"] = np.zeros((cfg.n_genes, *widths[cfg.dispersion]), np.float32)
    for key in ("library_log_means", "library_log_vars"):
        if key in const and not cfg.use_observed_lib_size:  # (buffers only then)
            state[key] = const[key].reshape(1, -1)
    if hasattr(cfg, "y_prior"):
        p = np.ones(cfg.n_labels) if cfg.y_prior is None else np.asarray(cfg.y_prior)
        state["y_prior"] = (p / p.sum()).reshape(1, -1).astype(np.float32)
    return state


def _check_round_trip(model, state: dict) -> None:
    back = map_weights(state, model.variables, type(model).__name__)
    ours = jax.tree_util.tree_leaves_with_path(_np(model.variables))
    theirs = dict(jax.tree_util.tree_leaves_with_path(_np(back)))
    for path, value in ours:
        other = theirs.get(path)
        if other is None or not np.array_equal(other, value):
            raise AssertionError(f"export of {jax.tree_util.keystr(path)} does not round-trip")


def _objects(values) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _mapping(key, cats) -> tuple[np.ndarray, str | None]:
    # scvi-tools codes a missing key as one category 0 in an "_scvi_<field>" column
    return (np.zeros(1, np.int64), None) if key is None else (_objects(cats), key)


def registry_dict(model) -> dict:
    """scvi-tools' ``registry_`` for ``model``'s registry."""
    reg, name = model.registry, type(model).__name__
    batch_map, batch_key = _mapping(reg.batch_key, reg.batch_categories)
    labels = reg.label_categories + (
        (reg.unlabeled_category,) if reg.unlabeled_category is not None else ()
    )
    label_map, labels_key = _mapping(reg.labels_key, labels)
    label_state = {"categorical_mapping": label_map, "original_key": labels_key or "_scvi_labels"}
    if name == "SCANVI":
        label_state["unlabeled_category"] = reg.unlabeled_category
    n_obs = 0 if model.adata is None else int(model.adata.n_obs)
    cat_keys, cont_keys = list(reg.categorical_covariate_keys), list(reg.continuous_covariate_keys)

    def field(data, state, summary):
        return {"data_registry": data, "state_registry": state, "summary_stats": summary}

    fields = {
        "X": field(
            {"attr_name": "layers" if reg.layer else "X", "attr_key": reg.layer},
            {"n_obs": n_obs, "n_vars": reg.n_vars, "column_names": _objects(reg.var_names)},
            {"n_vars": reg.n_vars, "n_cells": n_obs},
        ),
        "batch": field(
            {"attr_name": "obs", "attr_key": "_scvi_batch"},
            {"categorical_mapping": batch_map, "original_key": batch_key or "_scvi_batch"},
            {"n_batch": reg.n_batch},
        ),
        "labels": field(
            {"attr_name": "obs", "attr_key": "_scvi_labels"},
            label_state,
            {"n_labels": len(label_map)},
        ),
        "size_factor": field({"attr_name": "obs", "attr_key": reg.size_factor_key}, {}, {})
        if reg.size_factor_key
        else field({}, {}, {}),
        "extra_categorical_covs": field(
            {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"},
            {
                "mappings": {
                    k: _objects(c) for k, c in zip(cat_keys, reg.categorical_covariate_categories)
                },
                "field_keys": cat_keys,
                "n_cats_per_key": list(reg.n_cats_per_cov),
            },
            {"n_extra_categorical_covs": len(cat_keys)},
        )
        if cat_keys
        else field({}, {}, {}),
        "extra_continuous_covs": field(
            {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"},
            {"columns": _objects(cont_keys)},
            {"n_extra_continuous_covs": len(cont_keys)},
        )
        if cont_keys
        else field({}, {}, {}),
    }
    setup = {
        "layer": reg.layer,
        "batch_key": reg.batch_key,
        "labels_key": reg.labels_key,
        "size_factor_key": reg.size_factor_key,
        "categorical_covariate_keys": cat_keys or None,
        "continuous_covariate_keys": cont_keys or None,
    }
    if name == "SCANVI":
        setup = {
            "labels_key": reg.labels_key,
            "unlabeled_category": reg.unlabeled_category,
            **{k: v for k, v in setup.items() if k != "labels_key"},
        }
    setup["use_minified"] = False
    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "model_name": name,
        "setup_args": setup,
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": f"jaxscanvi-{__version__}",
    }


def init_params(model) -> dict:
    """scvi-tools' ``init_params_``: named arguments, the rest as model kwargs."""
    cfg, name = model.module.config, type(model).__name__
    named = {
        k: getattr(cfg, k)
        for k in (
            "n_hidden",
            "n_latent",
            "n_layers",
            "dropout_rate",
            "dispersion",
            "gene_likelihood",
            "use_observed_lib_size",
        )
    }
    extra = {
        k: getattr(cfg, k)
        for k in (
            "latent_distribution",
            "encode_covariates",
            "deeply_inject_covariates",
            "use_batch_norm",
            "use_layer_norm",
        )
    }
    if not cfg.log_variational:  # (scvi-tools' default is True)
        extra["log_variational"] = False
    if name == "SCVI":
        named["latent_distribution"] = extra.pop("latent_distribution")
        return {"kwargs": {"kwargs": extra}, "non_kwargs": named}
    linear = cfg.classifier_n_layers == 0
    named.update(linear_classifier=linear, datamodule=None)
    # scvi-tools derives these from the network's; only differences are passed
    derived = {
        "n_layers": 0 if linear else cfg.n_layers,
        "n_hidden": 0 if linear else cfg.n_hidden,
        "dropout_rate": cfg.dropout_rate,
    }
    ours = {
        "n_layers": cfg.classifier_n_layers,
        "n_hidden": 0 if linear else cfg.classifier_n_hidden,
        "dropout_rate": cfg.classifier_dropout_rate,
    }
    cls_params = {k: v for k, v in ours.items() if v != derived[k]}
    if cls_params:
        extra["classifier_parameters"] = cls_params
    return {"kwargs": {"model_kwargs": extra}, "non_kwargs": named}


def attr_dict(model) -> dict:
    attr = {
        "registry_": registry_dict(model),
        "init_params_": init_params(model),
        "is_trained_": bool(model.is_trained),
        "history_": None,
        "train_indices_": np.asarray(model.train_indices, np.int64),
        "validation_indices_": np.asarray(model.validation_indices, np.int64),
        "test_indices_": np.zeros(0, np.int64),
    }
    if type(model).__name__ == "SCANVI":
        attr["unlabeled_category_"] = model.registry.unlabeled_category
        if model.adata is not None and model.registry.labels_key in model.adata.obs:
            attr["labels_"] = _objects(model.adata.obs[model.registry.labels_key])
    return attr


def _check_exportable(model) -> None:
    if type(model).__name__ not in ("SCVI", "SCANVI"):
        raise InputError(
            "model",
            type(model).__name__,
            "only SCVI and SCANVI have a scvi-tools counterpart",
            "save it with format='jaxscanvi'",
        )
    mod = model.module
    if (
        getattr(mod, "encoder_cls", None) is not None
        or getattr(mod, "decoder_cls", None) is not None
    ):
        raise InputError(
            "format",
            "scvi-tools",
            "the model uses a custom encoder or decoder, which scvi-tools cannot build",
            "save it with format='jaxscanvi'",
        )
    cfg = mod.config
    if getattr(cfg, "label_parents", None) is not None:
        raise InputError(
            "format",
            "scvi-tools",
            "the model has a label hierarchy, which "
            "scvi-tools' SCANVI cannot represent (its labels are one flat "
            "list, so cells labelled at inner nodes have no code there)",
            "save it with format='jaxscanvi'",
        )
    for k in ("use_batch_norm", "use_layer_norm"):
        own = getattr(cfg, f"classifier_{k}", None)
        if own is not None and own != (getattr(cfg, k) in ("encoder", "both")):
            raise InputError(
                f"classifier_parameters[{k!r}]",
                own,
                "scvi-tools gives the classifier the encoder's normalisation, not its own",
                "save it with format='jaxscanvi'",
            )
    _check_flat_hierarchy(model)


def _check_flat_hierarchy(model) -> None:
    """A flat hierarchy is flat scANVI, which scvi-tools holds; but not cells
    labelled with its root, a name outside scvi-tools' labels. The hierarchy
    itself is not written (warned)."""
    tree = hierarchy.from_registry(model.registry)
    if tree is None:
        return
    reg = model.registry
    if tree.root != reg.unlabeled_category and model.adata is not None:
        at_root = int((model.adata.obs[reg.labels_key].astype(str) == tree.root).sum())
        if at_root:
            raise InputError(
                "format",
                "scvi-tools",
                f"{at_root} cells are labelled with the hierarchy's root "
                f"{tree.root!r}, which scvi-tools' SCANVI has no code for",
                f"label them {reg.unlabeled_category!r} (the same to training), or "
                "save with format='jaxscanvi'",
            )
    warnings.warn(
        "scvi-tools format has no place for the label hierarchy: the file loads as "
        "flat scANVI (the same weights and leaf predictions), without predict(level=...)",
        UserWarning,
        stacklevel=2,
    )


def write_scvi_tools(model, dir_path, *, overwrite: bool, save_anndata: bool) -> None:
    """``model.pt`` (and ``adata.h5ad``) in ``dir_path``, each written atomically."""
    _check_exportable(model)
    d = Path(dir_path)
    if (d / "model.pt").exists() and not overwrite:
        raise FileExistsError(
            f"{d} already holds model.pt. Fix: pass overwrite=True to replace it, or another folder"
        )
    if save_anndata and model.adata is None:
        raise InputError(
            "save_anndata", True, "the model holds no AnnData", "pass save_anndata=False"
        )
    if getattr(model, "temperature", 1.0) != 1.0:
        warnings.warn(
            f"scvi-tools has no temperature: its predict(soft=True) gives this "
            f"model's probabilities at temperature 1, not {model.temperature:.3g} "
            "(the labels are the same)",
            UserWarning,
            stacklevel=3,
        )
    state = state_dict(model)
    _check_round_trip(model, state)
    saved = {
        "model_state_dict": {
            **{k: torchfile.Tensor(v) for k, v in state.items()},
            "pyro_param_store": {"params": {}, "constraints": {}},
        },
        "var_names": _objects(model.registry.var_names),
        "attr_dict": attr_dict(model),
    }
    d.mkdir(parents=True, exist_ok=True)
    files = [("model.pt", lambda p: torchfile.save(saved, p, archive="model"))]
    if save_anndata:
        files.append(("adata.h5ad", model.adata.write_h5ad))
    for name, write in files:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=d)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, d / name)
        finally:
            Path(tmp).unlink(missing_ok=True)

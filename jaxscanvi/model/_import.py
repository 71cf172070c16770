"""Read a model folder saved by scvi-tools (``model.pt``) into jaxscanvi.

scvi-tools saves ``{"model_state_dict", "var_names", "attr_dict"}`` with
``torch.save``. Weights map one to one:

* ``<net>.fc_layers.Layer i.0.weight`` (n_out, n_in + one-hot widths) is
  split into our ``dense{i}`` kernel (its first n_in columns, transposed) and
  one ``layer{i}_cov{j}`` table per covariate with more than one category
  (its block of columns, transposed): a one-hot product is a row lookup.
* ``Layer i.1`` (BatchNorm1d) weight/bias -> ``bn{i}`` scale/bias, and
  running_mean/running_var -> the ``batch_stats`` mean/var.
* ``mean_encoder``/``var_encoder`` (and scANVI's ``mean_decoder``/
  ``var_decoder``) -> ``mean``/``var``; ``decoder.px_scale_decoder.0``,
  ``px_r_decoder``, ``px_dropout_decoder`` keep their names; the classifier's
  last linear layer -> ``logits``.
* ``library_log_means``/``library_log_vars`` (1, n_batch) -> constants;
  ``y_prior`` -> the config's class prior.

The registry (category orders, keys, layer) comes from ``attr_dict["registry_"]``,
the architecture from ``attr_dict["init_params_"]`` checked against the
weights' shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import torchfile
from ..data.registry import UNS_KEY, Registry
from ..errors import InputError, ModelFormatError
from ..io import METADATA
from ._weights import map_weights

# init_params_ entries that do not change the network (or that we read elsewhere)
_IGNORED = {
    "datamodule",
    "n_batch",
    "n_labels",
    "n_continuous_cov",
    "n_cats_per_cov",
    "n_input",
    "use_cuda",
    "use_gpu",
    "unlabeled_category",
    "pretrained_model",
}
# the architecture fields of a scVI/scANVI config (`_pretrained` checks them too)
ARCH_KEYS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "gene_likelihood",
    "latent_distribution",
    "encode_covariates",
    "deeply_inject_covariates",
    "use_batch_norm",
    "use_layer_norm",
    "use_observed_lib_size",
)
_ARCH = set(ARCH_KEYS)
_SCANVI_ARCH = {"linear_classifier", "classifier_parameters", "y_prior"}


def is_scvi_tools_folder(dir_path) -> bool:
    """A folder scvi-tools wrote (``model.pt``, or < 0.15's ``model_params.pt``)."""
    d = Path(dir_path)
    return (
        d.is_dir()
        and not (d / METADATA).exists()
        and any((d / name).exists() for name in ("model.pt", "model_params.pt"))
    )


def read_scvi_tools(dir_path) -> dict:
    """The state dict (numpy arrays), var_names and attr_dict of a scvi-tools folder.

    Read without torch through `torchfile`'s whitelist (nothing in the
    file is run). ``model.pt`` holds all three (scvi-tools >= 0.15);
    older folders hold ``model_params.pt``, ``var_names.csv`` and ``attr.pkl``.
    """
    d = Path(dir_path)
    if (d / "model.pt").exists():
        saved = torchfile.load(d / "model.pt")
        if not isinstance(saved, dict) or "model_state_dict" not in saved:
            raise ModelFormatError(
                f"{str(d / 'model.pt')!r} is not a scvi-tools model file (no model_state_dict)"
            )
        state, names, attr = (
            saved["model_state_dict"],
            saved.get("var_names"),
            saved.get("attr_dict"),
        )
    elif (d / "model_params.pt").exists():
        missing = [n for n in ("var_names.csv", "attr.pkl") if not (d / n).exists()]
        if missing:
            raise ModelFormatError(
                f"{str(d)!r} holds model_params.pt (scvi-tools < 0.15) "
                f"but not {missing}. Fix: copy the whole folder"
            )
        state = torchfile.load(d / "model_params.pt")
        # np.savetxt(fmt="%s"): one name a line
        names = (d / "var_names.csv").read_text().splitlines()
        attr = torchfile.load_pickle(d / "attr.pkl")
    else:
        found = sorted(p.name for p in d.glob("*")) if d.is_dir() else "no such folder"
        raise ModelFormatError(
            f"{str(dir_path)!r} has no model.pt (found: {found}). Fix: pass the folder "
            "that scvi-tools' model.save(dir_path) wrote"
        )
    if not isinstance(state, dict) or not isinstance(attr, dict) or names is None:
        raise ModelFormatError(
            f"{str(d)!r}: the scvi-tools files lack the state dict, "
            "attributes or gene names. Fix: save the model again"
        )
    return {
        "state": {k: v for k, v in state.items() if isinstance(v, np.ndarray)},
        "var_names": np.asarray(names).astype(str),
        "attr": attr,
    }


def _strs(a) -> tuple[str, ...]:
    return tuple(str(v) for v in np.asarray(a).tolist())


def registry_from_scvi_tools(attr: dict, var_names, model_name: str) -> Registry:
    """Our `Registry` from scvi-tools' ``registry_`` (category orders kept)."""
    reg = attr.get("registry_") or _registry_from_setup_dict(attr)
    setup = reg.get("setup_args") or {}
    fields = reg.get("field_registries") or {}
    if reg.get("model_name") not in (None, model_name):
        raise ModelFormatError(
            f"the folder holds a scvi-tools {reg.get('model_name')} "
            f"model, not {model_name}. Fix: import it with "
            f"{reg.get('model_name')}.from_scvi_tools"
        )

    def state(name):
        return (fields.get(name) or {}).get("state_registry") or {}

    batch_cats = _strs(state("batch").get("categorical_mapping", ["0"]))
    labels = state("labels")
    label_cats = _strs(labels.get("categorical_mapping", ["0"]))
    unlabeled = labels.get("unlabeled_category", setup.get("unlabeled_category"))
    if model_name == "SCANVI":
        unlabeled = str(unlabeled)
        if unlabeled in label_cats:
            if label_cats[-1] != unlabeled:
                raise ModelFormatError(
                    f"the unlabelled category {unlabeled!r} is not last in scvi-tools' "
                    f"label mapping {list(label_cats)[:10]}; this scvi-tools version "
                    "orders labels differently. Fix: re-save it with scvi-tools >= 1.0"
                )
            label_cats = label_cats[:-1]
    else:
        unlabeled = None
    cat = state("extra_categorical_covs")
    cat_keys = tuple(cat.get("field_keys") or setup.get("categorical_covariate_keys") or ())
    mappings = cat.get("mappings") or {}
    cat_cats = tuple(_strs(mappings[k]) for k in cat_keys)
    cont_keys = (
        _strs(state("extra_continuous_covs").get("columns", ()))
        if state("extra_continuous_covs")
        else ()
    )
    return Registry(
        var_names=tuple(str(v) for v in var_names),
        layer=setup.get("layer"),
        batch_key=setup.get("batch_key"),
        batch_categories=batch_cats,
        labels_key=setup.get("labels_key"),
        label_categories=label_cats,
        unlabeled_category=unlabeled,
        size_factor_key=setup.get("size_factor_key"),
        categorical_covariate_keys=cat_keys,
        categorical_covariate_categories=cat_cats,
        continuous_covariate_keys=cont_keys,
    )


def _registry_from_setup_dict(attr: dict) -> dict:
    """scvi-tools < 0.15's ``scvi_setup_dict_`` as the later ``registry_`` (the
    fields jaxscanvi reads), as scvi-tools' own ``registry_from_setup_dict`` does."""
    sd = attr.get("scvi_setup_dict_")
    if not isinstance(sd, dict):
        return {}
    maps = sd.get("categorical_mappings") or {}
    x = (sd.get("data_registry") or {}).get("X") or {}
    extra = sd.get("extra_categoricals") or {}

    def obs(code):
        m = maps.get(code) or {}
        key = m.get("original_key")
        return (None if key in (None, code) else key), {
            "state_registry": {"categorical_mapping": m.get("mapping", ["0"])}
        }

    batch_key, batch = obs("_scvi_batch")
    labels_key, labels = obs("_scvi_labels")
    labels["state_registry"]["unlabeled_category"] = attr.get("unlabeled_category_")
    cont = list(np.asarray(sd.get("extra_continuous_keys", [])).astype(str).tolist())
    return {
        "scvi_version": sd.get("scvi_version"),
        "setup_args": {
            "layer": x.get("attr_key") if x.get("attr_name") == "layers" else None,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "unlabeled_category": attr.get("unlabeled_category_"),
        },
        "field_registries": {
            "batch": batch,
            "labels": labels,
            "extra_categorical_covs": {
                "state_registry": {
                    "field_keys": list(extra.get("keys") or []),
                    "mappings": dict(extra.get("mappings") or {}),
                }
            },
            "extra_continuous_covs": {"state_registry": {"columns": cont} if cont else {}},
        },
    }


def init_kwargs(attr: dict, model_name: str) -> dict:
    """The architecture keywords scvi-tools recorded (nested kwargs flattened)."""
    params = attr.get("init_params_") or {}
    flat: dict = {}

    def walk(d):
        for k, v in d.items():
            if k in ("kwargs", "model_kwargs", "non_kwargs") and isinstance(v, dict):
                walk(v)
            else:
                flat[k] = v

    walk(params)
    if flat.get("log_variational", True) is True:
        flat.pop("log_variational", None)  # the default; False is not offered here
    allowed = _ARCH | (_SCANVI_ARCH if model_name == "SCANVI" else set())
    unknown = set(flat) - allowed - _IGNORED
    if unknown:
        raise ModelFormatError(
            f"the scvi-tools model was built with options jaxscanvi does not have: "
            f"{sorted(unknown)}. Fix: retrain it without them, or train in jaxscanvi"
        )
    return {k: v for k, v in flat.items() if k in allowed}


def setup_adata(adata, registry: Registry, dir_path):
    """Record ``registry`` in ``adata`` after checking its genes and obs columns."""
    from ..data.cells import cell_data, check_var_names

    check_var_names(adata, registry)
    for key in (
        registry.batch_key,
        registry.labels_key,
        *registry.categorical_covariate_keys,
        *registry.continuous_covariate_keys,
    ):
        if key is not None and key not in adata.obs:
            raise InputError(
                f"adata.obs[{key!r}]",
                "missing",
                "the scvi-tools model was set up with this column",
                f"add adata.obs[{key!r}]",
            )
    adata.uns[UNS_KEY] = registry.to_json()
    cell_data(adata, registry)  # codes every category now: unknown ones fail here
    return adata


def load_adata(dir_path, adata):
    """``adata``, else the folder's ``adata.h5ad``, else None (pass data to each call)."""
    if adata is not None:
        return adata
    path = Path(dir_path) / "adata.h5ad"
    if not path.exists():
        return None
    import anndata

    return anndata.read_h5ad(path)


def import_model(cls, dir_path, adata, model_name: str, extra_kwargs=None):
    """Build ``cls`` from a scvi-tools folder: registry, architecture, weights."""
    saved = read_scvi_tools(dir_path)
    attr = saved["attr"]
    registry = registry_from_scvi_tools(attr, saved["var_names"], model_name)
    kwargs = init_kwargs(attr, model_name)
    kwargs.update(extra_kwargs or {})
    if model_name == "SCANVI":
        prior = saved["state"].get("y_prior")
        if prior is not None:
            p = np.reshape(prior, -1).astype(np.float64)
            kwargs["y_prior"] = None if np.allclose(p, p[0]) else tuple(p.tolist())
        else:
            kwargs.pop("y_prior", None)
    adata = load_adata(dir_path, adata)
    if adata is not None:
        setup_adata(adata, registry, dir_path)
    # built without data so nothing is estimated from it: every value comes from the file
    model = cls(None, registry=registry, **kwargs)
    variables = map_weights(saved["state"], model.variables, model_name)
    model._adopt_variables(variables)
    model.adata, model._cells = adata, None
    model.is_trained = bool(attr.get("is_trained_", True))
    for ours, theirs in (
        ("train_indices", "train_indices_"),
        ("validation_indices", "validation_indices_"),
    ):
        if isinstance(attr.get(theirs), np.ndarray):
            setattr(model, ours, np.asarray(attr[theirs], np.int64))
    reg = attr.get("registry_") or _registry_from_setup_dict(attr)
    model.imported_from = {"scvi_version": reg.get("scvi_version"), "path": str(dir_path)}
    return model


def saved_model_name(dir_path) -> str | None:
    """The scvi-tools class (``"SCVI"``, ``"SCANVI"``) a folder holds, if recorded."""
    attr = read_scvi_tools(dir_path)["attr"]
    name = (attr.get("registry_") or {}).get("model_name")
    if name is None and "scvi_setup_dict_" in attr:
        name = "SCANVI" if attr.get("unlabeled_category_") is not None else "SCVI"
    return name

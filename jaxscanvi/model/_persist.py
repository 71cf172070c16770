"""Save and load: a model folder (metadata JSON plus msgpack blobs), written atomically.

The format is `io`'s; what a model adds to the metadata is its
`BaseModel._metadata` (SCANVI: temperature, calibration, reference statistics).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from .. import distributed, io
from ..data.cells import check_var_names
from ..data.registry import Registry
from ..errors import InputError, ModelFormatError
from ..train.history import History
from ._query import QueryInfo


def save(self, dir_path, overwrite: bool = False, save_anndata: bool = False, *,  # noqa: FBT001, FBT002 (scvi-tools' signature)
         format: str = "jaxscanvi") -> None:
    """Save parameters, config, registry and history to a folder, atomically.

    ``format="scvi-tools"`` writes scvi-tools' folder instead (``model.pt``,
    and ``adata.h5ad`` with ``save_anndata=True``), which scvi-tools'
    ``SCVI.load``/``SCANVI.load`` open; no torch is needed to write it.
    In a run of several processes, process 0 writes and the others wait
    for it (an error there is raised on every process).
    """
    if format not in ("jaxscanvi", "scvi-tools"):
        raise InputError("format", format, "unknown model folder format",
                         "pass format='jaxscanvi' (the default) or format='scvi-tools'")
    if format == "scvi-tools":
        from ._export import write_scvi_tools
        writer = write_scvi_tools
    else:
        writer = _write
    distributed.agree(lambda: writer(self, dir_path, overwrite=overwrite,
                                     save_anndata=save_anndata)
                      if distributed.is_main() else None)


def _metadata(model) -> dict:
    return {
        "model_class": type(model).__name__,
        "config": model.module.config.to_dict(),
        "registry": model.registry.to_dict(),
        "init_seed": model.init_seed,
        "is_trained": model.is_trained,
        "loss_terms": list(model.loss_term_names),
        "custom_modules": {k: _qualified_name(getattr(model.module, f"{k}_cls"))
                           for k in ("encoder", "decoder")},
        "history": model.history.to_records(),
        "train_indices": np.asarray(model.train_indices).tolist(),
        "validation_indices": np.asarray(model.validation_indices).tolist(),
        **model._metadata(),
    }


def _write(model, dir_path, *, overwrite: bool, save_anndata: bool) -> None:
    meta = _metadata(model)
    blobs = {"variables": io.to_bytes(model.variables)}
    if model._freeze is not None:  # a query model keeps what its training may change
        meta["query_info"] = None if model.query_info is None else model.query_info.to_dict()
        blobs["freeze"] = io.to_bytes({"params": model._freeze[0],
                                       "state": model._freeze[1]})
    extra = {}
    d = Path(dir_path)
    if d.is_dir() and (d / io.METADATA).exists() and not overwrite:
        raise FileExistsError(f"{d} already holds a saved model. Fix: pass "
                              "overwrite=True to replace it, or another folder")
    if save_anndata and model.adata is None:
        raise InputError("save_anndata", True, "the model holds no AnnData",
                         "pass save_anndata=False")
    try:
        if save_anndata:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".adata.", suffix=".h5ad", dir=d)
            os.close(fd)
            extra["adata"] = Path(tmp)
            model.adata.write_h5ad(tmp)
        io.write_folder(d, meta, blobs, overwrite=overwrite, extra_files=extra)
    finally:
        for tmp_file in extra.values():  # moved into place on success
            tmp_file.unlink(missing_ok=True)


def load(cls, dir_path, adata=None, *, encoder=None, decoder=None):
    """Load a model saved by ``save``; ``adata`` must match its genes.

    A model built with a custom ``encoder``/``decoder`` records the class's
    import path; it is imported again, or pass the class here. A folder
    saved by scvi-tools (``model.pt``, or the older ``model_params.pt``)
    is imported as by ``from_scvi_tools``.
    """
    from ._import import import_model, is_scvi_tools_folder
    if is_scvi_tools_folder(dir_path):
        return import_model(cls, dir_path, adata, cls.__name__)
    meta = io.read_metadata(dir_path)
    if meta.get("model_class") != cls.__name__:
        raise ModelFormatError(
            f"{str(dir_path)!r} holds a {meta.get('model_class')} model, not a "
            f"{cls.__name__}. Fix: load it with {meta.get('model_class')}.load(...)")
    try:
        registry = Registry.from_dict(meta["registry"])
        config = cls.config_cls.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{str(dir_path)!r}: metadata is damaged ({e})") from None
    adata = _adata(dir_path, meta, adata, registry)
    custom = meta.get("custom_modules") or {}
    model = cls(adata, registry=registry, _config=config, seed=meta.get("init_seed", 0),
                encoder=_resolve_module(custom.get("encoder"), encoder, "encoder", dir_path),
                decoder=_resolve_module(custom.get("decoder"), decoder, "decoder", dir_path))
    model._read_metadata(meta)
    restored = io.from_bytes(model.variables, io.read_blob(dir_path, meta, "variables"),
                             "parameters")
    model.params = restored["params"]
    model.state = {k: v for k, v in restored.items() if k != "params"}
    model.is_trained = bool(meta.get("is_trained", False))
    model.loss_term_names = tuple(meta.get("loss_terms", ()))
    hist = meta.get("history") or []
    model._history = History.from_records(hist)
    if "freeze" in meta.get("files", {}):
        model._freeze = _freeze_masks(dir_path, meta, model)
        info = meta.get("query_info")
        model.query_info = None if info is None else QueryInfo.from_dict(info)
    model.train_indices = np.asarray(meta.get("train_indices", []), np.int64)
    model.validation_indices = np.asarray(meta.get("validation_indices", []), np.int64)
    return model


def _adata(dir_path, meta: dict, adata, registry: Registry):
    """The AnnData to attach: the caller's, else the folder's own (if saved)."""
    if adata is None:
        path = io.file_path(dir_path, meta, "adata")
        if path is not None:
            import anndata
            adata = anndata.read_h5ad(path)
    if adata is not None:
        check_var_names(adata, registry)
        adata.uns["_jaxscanvi_registry"] = registry.to_json()
    return adata


def _freeze_masks(dir_path, meta: dict, model) -> tuple:
    def as_bool(tree):
        return jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), bool), tree)
    masks = io.from_bytes({"params": as_bool(model.params), "state": as_bool(model.state)},
                          io.read_blob(dir_path, meta, "freeze"), "freeze masks")
    return tuple(jax.tree_util.tree_map(lambda m: np.asarray(m, bool), t)
                 for t in (masks["params"], masks["state"]))


def _qualified_name(obj) -> str | None:
    if obj is None:
        return None
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _resolve_module(name: str | None, given, what: str, dir_path):
    """The custom module a saved model was built with: ``given``, or imported by name."""
    if given is not None:
        return given
    if name is None:
        return None
    mod_name, _, qual = name.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        raise ModelFormatError(
            f"{str(dir_path)!r} was saved with a custom {what} {name!r}, which cannot be "
            f"imported here. Fix: pass {what}=<that class> to load()") from None

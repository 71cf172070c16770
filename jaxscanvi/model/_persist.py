"""Save and load: a model folder (metadata JSON plus msgpack blobs), written atomically.

The format is `io`'s; what a model adds to the metadata is its
`BaseModel._metadata` (SCANVI: temperature, calibration, reference statistics).
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np

from .. import distributed, io, lock
from ..data.atlas import AtlasRows
from ..data.cells import check_var_names
from ..data.registry import Registry
from ..errors import InputError, ModelFormatError
from ..train.history import History
from . import _validate
from ._query import QueryInfo


def save(
    self,
    dir_path,
    overwrite: bool = False,
    save_anndata: bool = False,
    *,
    format: str = "jaxscanvi",
) -> None:
    """Save parameters, config, registry and history to a folder, atomically.

    ``format="scvi-tools"`` writes scvi-tools' folder instead (``model.pt``,
    and ``adata.h5ad`` with ``save_anndata=True``), which scvi-tools'
    ``SCVI.load``/``SCANVI.load`` open; no torch is needed to write it.
    In a run of several processes, process 0 writes and the others wait
    for it (an error there is raised on every process).
    """
    if format not in ("jaxscanvi", "scvi-tools"):
        raise InputError(
            "format",
            format,
            "unknown model folder format",
            "pass format='jaxscanvi' (the default) or format='scvi-tools'",
        )
    if save_anndata and self.adata is not None and isinstance(self.adata.X, AtlasRows):
        raise InputError(
            "save_anndata",
            True,
            f"the counts are in an atlas store "
            f"({self.adata.X!r}), which a model folder does not copy",
            "save with save_anndata=False and load with SCVI.load(dir, "
            "adata=...) on the store opened again (jaxscanvi.data."
            "read_collection, read_annbatch or read_soma)",
        )
    if format == "scvi-tools":
        from ._export import write_scvi_tools

        writer = write_scvi_tools
    else:
        writer = _write
    distributed.agree(
        lambda: (
            writer(self, dir_path, overwrite=overwrite, save_anndata=save_anndata)
            if distributed.is_main()
            else None
        )
    )


def _metadata(model) -> dict:
    return {
        "model_class": type(model).__name__,
        "config": model.module.config.to_dict(),
        "registry": model.registry.to_dict(),
        "init_seed": model.init_seed,
        "is_trained": model.is_trained,
        "loss_terms": list(model.loss_term_names),
        "custom_modules": {
            k: _qualified_name(getattr(model.module, f"{k}_cls")) for k in ("encoder", "decoder")
        },
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
        blobs["freeze"] = io.to_bytes({"params": model._freeze[0], "state": model._freeze[1]})
    extra = {}
    d = Path(dir_path)
    if d.is_dir() and (d / io.METADATA).exists() and not overwrite:
        raise FileExistsError(
            f"{d} already holds a saved model. Fix: pass "
            "overwrite=True to replace it, or another folder"
        )
    if save_anndata and model.adata is None:
        raise InputError(
            "save_anndata", True, "the model holds no AnnData", "pass save_anndata=False"
        )
    with lock.locked(d, "save"):  # one writer at a time, the AnnData included
        _write_locked(model, d, meta, blobs, extra, overwrite=overwrite, save_anndata=save_anndata)


def _write_locked(
    model, d: Path, meta, blobs, extra, *, overwrite: bool, save_anndata: bool
) -> None:
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


def load(
    cls, dir_path, adata=None, *, encoder=None, decoder=None, trust_custom_modules: bool = False
):
    """Load a model saved by ``save``; ``adata`` must match its genes.

    Loading runs no code that the folder names. A model built with a custom
    ``encoder``/``decoder`` records the class's import path; pass the class
    here, or ``trust_custom_modules=True`` to import that path (only for
    folders you trust: importing a module runs its code). A folder saved by
    scvi-tools (``model.pt``, or the older ``model_params.pt``) is imported
    as by ``from_scvi_tools``, through a reader that runs no pickled code.
    """
    from ._import import import_model, is_scvi_tools_folder

    if is_scvi_tools_folder(dir_path):
        return import_model(cls, dir_path, adata, cls.__name__)
    meta = io.read_metadata(dir_path)
    if meta.get("model_class") != cls.__name__:
        raise ModelFormatError(
            f"{str(dir_path)!r} holds a {meta.get('model_class')} model, not a "
            f"{cls.__name__}. Fix: load it with {meta.get('model_class')}.load(...)"
        )
    # every declared size is checked against the registry and the stored
    # shapes before the model (and its parameters) is built
    registry, config = _validate.check(cls, dir_path, meta)
    custom = meta.get("custom_modules") or {}
    encoder = _resolve_module(
        custom.get("encoder"), encoder, "encoder", dir_path, trust=trust_custom_modules
    )
    decoder = _resolve_module(
        custom.get("decoder"), decoder, "decoder", dir_path, trust=trust_custom_modules
    )
    blob = io.read_blob(dir_path, meta, "variables")
    _validate.check_variables(dir_path, config, blob, encoder=encoder, decoder=decoder)
    adata = _adata(dir_path, meta, adata, registry)
    model = cls(
        adata,
        registry=registry,
        _config=config,
        seed=meta.get("init_seed", 0),
        encoder=encoder,
        decoder=decoder,
    )
    model._read_metadata(meta)
    restored = io.from_bytes(model.variables, blob, "parameters")
    hist = meta.get("history") or []
    model._adopt_variables(restored, history=History.from_records(hist))
    model.is_trained = bool(meta.get("is_trained", False))
    model.loss_term_names = tuple(meta.get("loss_terms", ()))
    if "freeze" in meta.get("files", {}):
        model._adopt(freeze=_freeze_masks(dir_path, meta, model))
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

            try:
                adata = anndata.read_h5ad(path)
            except Exception as e:  # noqa: BLE001 (h5py raises many kinds on bad files)
                raise ModelFormatError(
                    f"{str(path)!r}, the saved AnnData, cannot be read "
                    f"({type(e).__name__}: {str(e)[:160]}). Fix: pass "
                    "adata=... to load(), or save the model again"
                ) from None
    if adata is not None:
        check_var_names(adata, registry)
        adata.uns["_jaxscanvi_registry"] = registry.to_json()
    return adata


def _freeze_masks(dir_path, meta: dict, model) -> tuple:
    def as_bool(tree):
        return jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), bool), tree)

    masks = io.from_bytes(
        {"params": as_bool(model.params), "state": as_bool(model.state)},
        io.read_blob(dir_path, meta, "freeze"),
        "freeze masks",
    )
    return tuple(
        jax.tree_util.tree_map(lambda m: np.asarray(m, bool), t)
        for t in (masks["params"], masks["state"])
    )


def _qualified_name(obj) -> str | None:
    if obj is None:
        return None
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _resolve_module(name, given, what: str, dir_path, *, trust: bool):
    """The custom module a saved model was built with: ``given``, or, only when
    the caller trusts the folder, imported by the name it records."""
    if name is not None and not isinstance(name, str):
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata names the custom {what} "
            f"{str(name)[:80]!r}, not a 'module:Class' path; the folder "
            "is damaged. Fix: save the model again"
        )
    if given is not None:
        return given
    if name is None:
        return None
    if not trust:
        raise ModelFormatError(
            f"{str(dir_path)!r} was saved with a custom {what} {name!r}; load() does not "
            "import code named by a file. Fix: pass "
            f"{what}=<that class> to load(), or trust_custom_modules=True if you trust "
            "this folder (importing runs the module's code)"
        )
    mod_name, _, qual = name.partition(":")
    try:
        if not _IMPORT_PATH.fullmatch(name):  # e.g. a class defined inside a function
            raise ImportError(name)
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        raise ModelFormatError(
            f"{str(dir_path)!r} was saved with a custom {what} {name!r}, which cannot be "
            f"imported here. Fix: pass {what}=<that class> to load()"
        ) from None


# what _qualified_name writes: dotted identifiers, a colon, a dotted qualname
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

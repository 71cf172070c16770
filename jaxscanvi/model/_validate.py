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
import functools
import math

import jax
import numpy as np
from flax import serialization

from ..data import hierarchy
from ..data.registry import Registry
from ..errors import InputError, ModelFormatError
from ..module.scanvae import SCANVAE, SCANVIConfig
from ..module.vae import VAE

MAX_DIM = 2**31 - 1  # any one declared size (genes, units, categories)
MAX_CELLS = 2**40  # a cell index
SEED_RANGE = (-(2**63), 2**63)  # what jax.random.PRNGKey accepts

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


class _Bad(Exception):
    """One damaged field: becomes a ModelFormatError naming the folder."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _want(ok, field: str, value, need: str) -> None:
    if not ok:
        shown = repr(value)
        raise _Bad(f"{field}={shown[:80] + ('...' if len(shown) > 80 else '')} ({need})")


def _str_list(v, field: str, *, non_empty: bool = False, unique: bool = False) -> None:
    _want(
        isinstance(v, list)
        and all(isinstance(x, str) for x in v)
        and (len(v) > 0 or not non_empty),
        field,
        v,
        "must be a " + ("non-empty " if non_empty else "") + "list of strings",
    )
    if unique:
        _want(len(set(v)) == len(v), field, v, "must not repeat a name")


def _int_in(v, field: str, lo: int, hi: int) -> None:
    _want(_is_int(v) and lo <= v <= hi, field, v, f"must be an integer in [{lo}, {hi}]")


def check(cls, dir_path, meta: dict) -> tuple[Registry, object]:
    """(registry, config) of a folder's metadata, every declared size checked."""
    try:
        registry = _registry(meta.get("registry"))
        config = _config(cls, meta.get("config"))
        _sizes(config, registry)
        _model_fields(meta, cls)
    except _Bad as e:
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata is damaged: {e}. Fix: save the "
            "model again, or restore the folder from a copy"
        ) from None
    return registry, config


def registry_of(dir_path, meta: dict) -> Registry:
    """The folder's registry, checked (for readers that need only that)."""
    try:
        return _registry(meta.get("registry"))
    except _Bad as e:
        raise ModelFormatError(
            f"{str(dir_path)!r}: metadata is damaged: {e}. Fix: save the "
            "model again, or restore the folder from a copy"
        ) from None


def _registry(d) -> Registry:
    _want(isinstance(d, dict), "registry", d, "must be an object")
    known = {f.name for f in dataclasses.fields(Registry)}
    _want(set(d) <= known, "registry", sorted(set(d) - known)[:5], "unknown fields")
    _want("var_names" in d, "registry.var_names", None, "missing")
    for k in _REGISTRY_STR_LISTS:
        if k in d:
            _str_list(
                d[k],
                f"registry.{k}",
                non_empty=k in ("var_names", "batch_categories", "label_categories"),
                unique=True,
            )
    for k in _REGISTRY_OPT_STRS:
        _want(
            d.get(k) is None or isinstance(d[k], str),
            f"registry.{k}",
            d.get(k),
            "must be a string or null",
        )
    cats = d.get("categorical_covariate_categories", [])
    _want(
        isinstance(cats, list) and len(cats) == len(d.get("categorical_covariate_keys", [])),
        "registry.categorical_covariate_categories",
        cats,
        "must list one list of categories per categorical covariate key",
    )
    for i, c in enumerate(cats):
        _str_list(c, f"registry.categorical_covariate_categories[{i}]", non_empty=True, unique=True)
    _want(
        isinstance(d.get("allow_noninteger_counts", False), bool),
        "registry.allow_noninteger_counts",
        d.get("allow_noninteger_counts"),
        "must be true or false",
    )
    _want(
        _is_int(d.get("format_version", 1)),
        "registry.format_version",
        d.get("format_version"),
        "must be an integer",
    )
    _label_hierarchy(d)
    try:
        return Registry.from_dict(d)
    except (TypeError, ValueError) as e:
        raise _Bad(f"registry ({e})") from None


def _label_hierarchy(d) -> None:
    pairs = d.get("label_hierarchy")
    if pairs is None:
        return
    _want(
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
        raise _Bad(f"registry.label_hierarchy ({e.problem})") from None
    parents = {p for _, p in pairs}
    leaves = {c for c, _ in pairs} - parents
    _want(
        set(d.get("label_categories", ())) == leaves and len(pairs) == len(dict(pairs)),
        "registry.label_hierarchy",
        sorted(leaves)[:5],
        "its leaves must be the registry's label_categories, each child listed once",
    )


def _config(cls, d):
    _want(isinstance(d, dict), "config", d, "must be an object")
    names = {f.name for f in dataclasses.fields(cls.config_cls)}
    _want(set(d) <= names, "config", sorted(set(d) - names)[:5], "unknown fields")
    for k, lo in _INT_FIELDS.items():
        if k in d:
            _int_in(d[k], f"config.{k}", lo, MAX_DIM)
    for k in _BOOL_FIELDS:
        if k in d:
            _want(isinstance(d[k], bool), f"config.{k}", d[k], "must be true or false")
    for k in ("classifier_use_batch_norm", "classifier_use_layer_norm"):
        _want(
            d.get(k) is None or isinstance(d[k], bool),
            f"config.{k}",
            d.get(k),
            "must be true, false or null",
        )
    for k in ("dropout_rate", "classifier_dropout_rate"):
        if k in d:
            _want(_is_num(d[k]) and 0 <= d[k] < 1, f"config.{k}", d[k], "must lie in [0, 1)")
    cats = d.get("n_cats_per_cov", [])
    _want(
        isinstance(cats, list) and all(_is_int(c) and 1 <= c <= MAX_DIM for c in cats),
        "config.n_cats_per_cov",
        cats,
        "must be a list of positive integers",
    )
    _str_list(d.get("frozen_batchnorm", []), "config.frozen_batchnorm")
    prior = d.get("y_prior")
    _want(
        prior is None or (isinstance(prior, list) and all(_is_num(p) and p > 0 for p in prior)),
        "config.y_prior",
        prior,
        "must be null or a list of positive numbers",
    )
    parents = d.get("label_parents")
    _want(
        parents is None
        or (
            isinstance(parents, list)
            and len(parents) <= MAX_DIM
            and all(_is_int(p) for p in parents)
        ),
        "config.label_parents",
        parents,
        "must be null or a list of integers",
    )
    try:
        return cls.config_cls.from_dict(d)
    except (TypeError, ValueError) as e:  # (InputError is a ValueError)
        raise _Bad(f"config ({e})") from None


def _sizes(config, registry: Registry) -> None:
    """Each size the config declares is the length of a list in the registry."""
    for field, declared, actual in (
        ("n_genes", config.n_genes, registry.n_vars),
        ("n_batch", config.n_batch, registry.n_batch),
        ("n_labels", config.n_labels, registry.n_labels),
        ("n_cats_per_cov", list(config.n_cats_per_cov), list(registry.n_cats_per_cov)),
        ("n_continuous_cov", config.n_continuous_cov, registry.n_continuous_cov),
    ):
        _want(declared == actual, f"config.{field}", declared, f"the registry lists {actual}")
    declared = getattr(config, "label_parents", None)
    want = hierarchy.from_registry(registry)
    _want(
        declared == (None if want is None else want.parents),
        "config.label_parents",
        None if declared is None else list(declared)[:10],
        "must be the tree of the registry's label_hierarchy",
    )


def _model_fields(meta: dict, cls) -> None:
    _int_in(meta.get("init_seed", 0), "init_seed", SEED_RANGE[0], SEED_RANGE[1] - 1)
    _want(
        isinstance(meta.get("is_trained", False), bool),
        "is_trained",
        meta.get("is_trained"),
        "must be true or false",
    )
    _str_list(meta.get("loss_terms", []), "loss_terms")
    custom = meta.get("custom_modules") or {}
    _want(
        isinstance(custom, dict)
        and set(custom) <= {"encoder", "decoder"}
        and all(v is None or isinstance(v, str) for v in custom.values()),
        "custom_modules",
        custom,
        "must map encoder/decoder to a 'module:Class' path or null",
    )
    hist = meta.get("history") or []
    _want(
        isinstance(hist, list)
        and all(
            isinstance(h, dict)
            and _is_int(h.get("epoch"))
            and all(
                isinstance(k, str) and (v is None or isinstance(v, (int, float, str)))
                for k, v in h.items()
            )
            for h in hist
        ),
        "history",
        str(hist)[:60],
        "must be a list of per-epoch records, each with an integer epoch",
    )
    for k in ("train_indices", "validation_indices"):
        _indices(meta.get(k, []), k)
    train, val = set(meta.get("train_indices", [])), set(meta.get("validation_indices", []))
    _want(
        not (train & val),
        "validation_indices",
        sorted(train & val)[:5],
        "cells also listed in train_indices",
    )
    if "query_info" in meta:
        _query_info(meta["query_info"])
    if cls.__name__ == "SCANVI":
        _scanvi_fields(meta)


def _indices(v, field: str) -> None:
    _want(
        isinstance(v, list) and all(_is_int(i) and 0 <= i < MAX_CELLS for i in v),
        field,
        v if not isinstance(v, list) else v[:5],
        f"must be a list of cell indices in [0, {MAX_CELLS})",
    )
    _want(len(set(v)) == len(v), field, len(v), "must not repeat a cell")


def _query_info(q) -> None:
    if q is None:
        return
    _want(
        isinstance(q, dict)
        and set(q) <= {"new_batches", "new_labels", "new_covariate_categories", "freeze"},
        "query_info",
        q,
        "must be an object with the fields QueryInfo.to_dict writes",
    )
    for k in ("new_batches", "new_labels", "new_covariate_categories"):
        _want(isinstance(q.get(k, []), list), f"query_info.{k}", q.get(k), "must be a list")
    freeze = q.get("freeze")
    _want(
        freeze is None
        or (isinstance(freeze, dict) and all(isinstance(v, bool) for v in freeze.values())),
        "query_info.freeze",
        freeze,
        "must map switch names to true/false",
    )


def _scanvi_fields(meta: dict) -> None:
    _want(
        isinstance(meta.get("was_pretrained", False), bool),
        "was_pretrained",
        meta.get("was_pretrained"),
        "must be true or false",
    )
    t = meta.get("temperature", 1.0)
    _want(_is_num(t) and t > 0, "temperature", t, "must be a positive finite number")
    cal = meta.get("calibration") or {}
    _want(
        isinstance(cal, dict)
        and all(v is None or isinstance(v, (int, float)) for v in cal.values()),
        "calibration",
        cal,
        "must map names to numbers",
    )
    stats = meta.get("reference_stats")
    if stats is None:
        return
    _want(isinstance(stats, dict), "reference_stats", stats, "must be an object or null")
    if "threshold" in stats:
        _want(
            _is_num(stats["threshold"]) and stats["threshold"] > 0,
            "reference_stats.threshold",
            stats["threshold"],
            "must be a positive number",
        )
    if "latent_means" in stats:
        n_latent = meta["config"].get("n_latent", 10)
        n_labels = len(meta["registry"].get("label_categories", ["0"]))
        codes = stats.get("latent_codes")
        _want(
            isinstance(codes, list) and all(_is_int(c) and 0 <= c < n_labels for c in codes),
            "reference_stats.latent_codes",
            codes,
            f"must be cell-type codes below {n_labels}",
        )
        if not codes:
            _want(
                stats.get("latent_means") == [] and stats.get("latent_sds") == [],
                "reference_stats",
                sorted(stats),
                "no codes, so no latent moments",
            )
            return
        try:
            means = np.asarray(stats.get("latent_means"), np.float64)
            sds = np.asarray(stats.get("latent_sds"), np.float64)
        except (TypeError, ValueError):
            means = sds = np.zeros((0, 0))
        _want(
            means.shape == sds.shape == (len(codes), n_latent)
            and bool(np.isfinite(means).all())
            and bool((sds >= 0).all()),
            "reference_stats",
            sorted(stats),
            f"latent_means and latent_sds must hold one finite row of {n_latent} per code",
        )


# ---------------------------------------------------------------- the blobs
@functools.lru_cache(maxsize=16)
def _expected(module) -> dict:
    from ._base import variable_shapes

    flat = {}

    def add(path, leaf):
        flat[jax.tree_util.keystr(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))

    jax.tree_util.tree_map_with_path(add, variable_shapes(module))
    return flat


def _flatten(raw, prefix: str = "", out=None) -> dict:
    out = {} if out is None else out
    if isinstance(raw, dict):
        for k, v in raw.items():
            _flatten(v, f"{prefix}[{k!r}]", out)
    else:
        out[prefix] = raw
    return out


def check_variables(dir_path, config, data: bytes, *, encoder=None, decoder=None) -> None:
    """The stored parameters have exactly the shapes and dtypes ``config`` implies."""
    module_cls = SCANVAE if isinstance(config, SCANVIConfig) else VAE
    module = module_cls(config, encoder_cls=encoder, decoder_cls=decoder)
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 (msgpack raises many kinds on bad bytes)
        raise ModelFormatError(
            f"{str(dir_path)!r}: the saved parameters do not fit this "
            f"model's structure ({type(e).__name__}: {str(e)[:120]})"
            ". Fix: save the model again"
        ) from None
    got = _flatten(raw)
    # every layer stores at least one array, so a layer count above the number
    # of stored arrays is damage; caught here because tracing thousands of
    # layers to learn the expected shapes would take minutes
    for field in ("n_layers", "classifier_n_layers"):
        n = getattr(config, field, 0)
        if n > len(got):
            raise ModelFormatError(
                f"{str(dir_path)!r}: config.{field}={n}, but the saved parameters hold "
                f"only {len(got)} arrays; the folder is damaged. Fix: save the model again"
            )
    want = _expected(module)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ModelFormatError(
            f"{str(dir_path)!r}: the saved parameters do not fit this "
            f"model's structure (missing {missing[:3]}, unexpected "
            f"{extra[:3]}). Fix: save the model again"
        )
    bad = [
        f"{k}: {np.shape(v)} {getattr(v, 'dtype', type(v).__name__)} vs {want[k][0]} {want[k][1]}"
        for k, v in got.items()
        if not isinstance(v, np.ndarray) or v.shape != want[k][0] or v.dtype != want[k][1]
    ]
    if bad:
        raise ModelFormatError(
            f"{str(dir_path)!r}: saved parameters have wrong shapes or "
            f"types, so the config's sizes do not match them: {bad[:3]}"
            ". Fix: save the model again"
        )

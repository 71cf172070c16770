"""scArches surgery on parameter pytrees: grow category axes, decide what trains.

A query brings batch (or covariate, or label) categories the reference never
saw. The query model is initialised fresh with the larger category axes;
`transplant` copies every reference value into it, so only the new rows or
columns keep their fresh values, and records which elements are new.
`freeze_masks` then says, element by element, what query training may change:
new categories always, the rest as the ``freeze_*`` flags of scvi-tools'
``load_query_data`` say. The masks feed an optax transform that zeroes frozen
updates (weight decay included) and a train-step mask that holds frozen
batch-norm statistics, so frozen values stay bitwise unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import numpy as np

ENCODERS = ("z_encoder", "l_encoder", "encoder_z2_z1")
DECODERS = ("decoder", "decoder_z1_z2")


@dataclass(frozen=True)
class Freeze:
    """scvi-tools' ``load_query_data`` switches (same names and defaults)."""

    freeze_dropout: bool = False
    freeze_expression: bool = True
    freeze_decoder_first_layer: bool = True
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False
    freeze_classifier: bool = True
    unfrozen: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _grow(ref: np.ndarray, new: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    """``new`` with ``ref`` written into its leading block; mask of the elements not
    covered by ``ref`` (the new categories)."""
    ref, new = np.asarray(ref), np.asarray(new)
    if ref.shape == new.shape:
        return ref, np.zeros(new.shape, bool)
    if ref.ndim != new.ndim or any(r > n for r, n in zip(ref.shape, new.shape)):
        raise ValueError(f"{path}: reference shape {ref.shape} cannot grow to {new.shape}")
    out = new.copy()
    block = tuple(slice(0, r) for r in ref.shape)
    out[block] = ref
    is_new = np.ones(new.shape, bool)
    is_new[block] = False
    return out, is_new


def transplant(reference: dict, fresh: dict) -> tuple[dict, dict]:
    """(variables, is_new): ``fresh`` with every reference value copied in.

    Category axes may only grow (new categories are appended after the
    reference's, whose codes are kept). Every other shape must match.
    """
    ref_flat = dict(jax.tree_util.tree_leaves_with_path(reference))
    out, new_mask = {}, {}

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        if path not in ref_flat:
            if "_cov" not in key:
                raise ValueError(f"{key}: the reference has no such variable")
            # the reference had one category here, so no embedding (scvi-tools skips
            # single-category covariates): its row is zero, which reproduces it
            ref_value = np.zeros((1, *np.shape(leaf)[1:]), np.asarray(leaf).dtype)
        else:
            ref_value = ref_flat[path]
        value, mask = _grow(ref_value, leaf, key)
        out[path], new_mask[path] = value, mask
        return leaf

    jax.tree_util.tree_map_with_path(one, fresh)
    rebuild = jax.tree_util.tree_map_with_path
    # device_put, not jnp.asarray: that compiles a program per leaf shape
    return (
        rebuild(lambda p, _: jax.device_put(out[p]), fresh),
        rebuild(lambda p, _: new_mask[p], fresh),
    )


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _param_trainable(names: list[str], f: Freeze) -> bool:
    """May query training change this (reference) parameter? Mirrors scvi-tools'
    `_set_params_online_update`, except that old category rows stay frozen."""
    if f.unfrozen:
        return True
    module, leaf_owner = names[0], names[-2] if len(names) > 1 else ""
    if module == "l_encoder":  # scvi-tools trains the library encoder whole
        return True
    if module == "classifier":
        return not f.freeze_classifier
    if "_cov" in names[-1]:  # reference categories' rows: frozen (new rows train)
        return False
    if leaf_owner.startswith("bn"):
        if module in ENCODERS:
            return not f.freeze_batchnorm_encoder
        if module in DECODERS:
            return not f.freeze_batchnorm_decoder
        return False
    if leaf_owner == "dense0" and module == "z_encoder":
        return not f.freeze_expression
    if leaf_owner == "dense0" and names[:2] == ["decoder", "px_decoder"]:
        return not f.freeze_decoder_first_layer
    return False


def _state_trainable(names: list[str], f: Freeze) -> bool:
    """May query training update this running statistic?"""
    if f.unfrozen or names[0] != "batch_stats":
        return True
    module = names[1]
    if module == "l_encoder":
        return True
    if module == "classifier":
        return not f.freeze_classifier
    if module in ENCODERS:
        return not f.freeze_batchnorm_encoder
    if module in DECODERS:
        return not f.freeze_batchnorm_decoder
    return True


def freeze_masks(variables: dict, is_new: dict, f: Freeze) -> tuple[dict, dict]:
    """(params mask, state mask): True where query training may change an element."""

    def param_mask(path, new):
        if _param_trainable(_names(path), f):
            return np.ones(np.shape(new), bool)
        return np.asarray(new, bool)

    params = jax.tree_util.tree_map_with_path(param_mask, is_new["params"])
    state = {
        k: jax.tree_util.tree_map_with_path(
            lambda p, v, k=k: np.full(np.shape(v), _state_trainable([k, *_names(p)], f)), v
        )
        for k, v in variables.items()
        if k != "params"
    }
    return params, state

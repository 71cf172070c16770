"""A saved folder's parameters checked against the shapes its config implies
(traced abstractly, so nothing of their size is allocated)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import serialization

from ..errors import ModelFormatError
from ..module.scanvae import SCANVAE, SCANVIConfig
from ..module.vae import VAE


@functools.lru_cache(maxsize=16)
def _expected(module) -> dict:
    from ._init import variable_shapes

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
    want = _expected(module)  # pyright: ignore[reportArgumentType] - linen modules hash
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

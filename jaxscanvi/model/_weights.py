"""scvi-tools' torch weights (``model_state_dict``) into jaxscanvi's variables.

`map_weights` copies each weight to its place (see `_import` for the
mapping) and refuses a weight with no place, a parameter left unfilled, or
a shape that differs; `_export` reads the same tables the other way.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import ModelFormatError

_LAYER = re.compile(
    r"^(?P<net>.+?)\.fc_layers\.Layer (?P<i>\d+)\.(?P<j>[01])\."
    r"(?P<what>weight|bias|running_mean|running_var)$"
)

# torch module prefix -> our path (for FCLayers and plain linear layers)
_NETS_SCVI = {
    "z_encoder.encoder": ("z_encoder", "encoder"),
    "l_encoder.encoder": ("l_encoder", "encoder"),
    "decoder.px_decoder": ("decoder", "px_decoder"),
    "classifier.classifier.0": ("classifier", "classifier"),
    "encoder_z2_z1.encoder": ("encoder_z2_z1", "encoder"),
    "decoder_z1_z2.decoder": ("decoder_z1_z2", "decoder"),
}
_LINEAR = {
    "z_encoder.mean_encoder": ("z_encoder", "mean"),
    "z_encoder.var_encoder": ("z_encoder", "var"),
    "l_encoder.mean_encoder": ("l_encoder", "mean"),
    "l_encoder.var_encoder": ("l_encoder", "var"),
    "decoder.px_scale_decoder.0": ("decoder", "px_scale_decoder"),
    "decoder.px_r_decoder": ("decoder", "px_r_decoder"),
    "decoder.px_dropout_decoder": ("decoder", "px_dropout_decoder"),
    "encoder_z2_z1.mean_encoder": ("encoder_z2_z1", "mean"),
    "encoder_z2_z1.var_encoder": ("encoder_z2_z1", "var"),
    "decoder_z1_z2.mean_decoder": ("decoder_z1_z2", "mean"),
    "decoder_z1_z2.var_decoder": ("decoder_z1_z2", "var"),
}


def _get(tree, path) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _put(tree: dict, path, value, filled: set, where: str):
    node = _get(tree, path[:-1])
    old = node.get(path[-1]) if isinstance(node, dict) else None
    if old is None:
        raise ModelFormatError(
            f"scvi-tools weight {where!r} has no counterpart "
            f"{'/'.join(path)} in the jaxscanvi model"
        )
    if tuple(np.shape(old)) != tuple(value.shape):
        raise ModelFormatError(
            f"scvi-tools weight {where!r} has shape {tuple(value.shape)} but jaxscanvi's "
            f"{'/'.join(path)} has {tuple(np.shape(old))}: the architectures differ"
        )
    node[path[-1]] = jnp.asarray(value, jnp.float32)
    filled.add(tuple(path))


def _mutable(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _mutable(v) for k, v in tree.items()}
    return tree


def map_weights(state: dict, variables: dict, model_name: str) -> dict:
    """Copy every scvi-tools weight into a copy of ``variables`` (paths above)."""
    variables = _mutable(variables)
    params, stats = variables["params"], variables.setdefault("batch_stats", {})
    filled: set = set()
    nets = dict(_NETS_SCVI)
    linear = dict(_LINEAR)
    # the classifier's last linear layer is .1 after FCLayers, .0 when linear
    last = (
        "classifier.classifier.1"
        if "classifier.classifier.1.weight" in state
        else "classifier.classifier.0"
    )
    linear[last] = ("classifier", "logits")
    used = set()
    for key, value in state.items():
        if key.startswith("l_encoder.") and "l_encoder" not in params:
            used.add(key)  # scvi-tools builds it even when the observed library is used
            continue
        m = _LAYER.match(key)
        if m and m["net"] in nets:
            _fc_layer(params, stats, nets[m["net"]], m, value, filled)
            used.add(key)
            continue
        net, _, what = key.rpartition(".")
        if (
            net in ("decoder.px_r_decoder", "decoder.px_dropout_decoder")
            and _get(params, linear[net]) is None
        ):
            used.add(key)  # heads scvi-tools builds but does not use in this setting
            continue
        if net in linear and what in ("weight", "bias"):
            _put(
                params,
                linear[net] + ("kernel" if what == "weight" else "bias",),
                value.T if what == "weight" else value,
                filled,
                key,
            )
            used.add(key)
        elif key == "px_r":
            if "px_r" in params:  # (built but unused by a Poisson likelihood)
                _put(params, ("px_r",), value, filled, key)
            used.add(key)
        elif key in ("library_log_means", "library_log_vars"):
            const = variables.setdefault("constants", {})
            const[key] = jnp.asarray(np.reshape(value, -1), jnp.float32)
            used.add(key)
        elif key.endswith("num_batches_tracked") or key == "y_prior":
            used.add(key)
    left = sorted(set(state) - used)
    if left:
        raise ModelFormatError(
            f"scvi-tools weights with no place in jaxscanvi's {model_name}: {left[:8]}"
        )
    missing = [p for p in _leaf_paths(params) if p not in filled]
    if missing:
        raise ModelFormatError(
            f"jaxscanvi parameters not found in the scvi-tools model: "
            f"{['/'.join(p) for p in missing[:8]]}"
        )
    return variables


def _fc_layer(params: dict, stats: dict, base: tuple, m: re.Match, value, filled: set):
    """One FCLayers weight (``m``: its `_LAYER` match) into our ``base`` network:
    BatchNorm1d parameters and statistics, or a linear layer's bias, or its
    weight split into the dense kernel and one table per covariate."""
    where = m.string
    i, what = int(m["i"]), m["what"]
    if m["j"] == "1":  # BatchNorm1d
        if what in ("weight", "bias"):
            _put(
                params,
                (*base, f"bn{i}", "scale" if what == "weight" else "bias"),
                value,
                filled,
                where,
            )
        else:
            stat = "mean" if what == "running_mean" else "var"
            _put(stats, (*base, f"bn{i}", stat), value, filled, where)
    elif what == "bias":
        _put(params, (*base, f"dense{i}", "bias"), value, filled, where)
    else:
        kernel = _get(params, (*base, f"dense{i}", "kernel"))
        if kernel is None:
            raise ModelFormatError(
                f"scvi-tools weight {where!r} has no counterpart in the jaxscanvi model"
            )
        n_in = kernel.shape[0]
        _put(params, (*base, f"dense{i}", "kernel"), value[:, :n_in].T, filled, where)
        net = _get(params, base)
        covs = sorted(
            (int(c.group(1)), name)
            for name in net
            if (c := re.fullmatch(rf"layer{i}_cov(\d+)", name))
        )
        off = n_in
        for _, name in covs:
            width = net[name].shape[0]
            _put(params, (*base, name), value[:, off : off + width].T, filled, where)
            off += width
        if off != value.shape[1]:
            raise ModelFormatError(
                f"scvi-tools weight {where!r} has {value.shape[1]} input columns; "
                f"jaxscanvi expects {off} (inputs plus one-hot covariates): the "
                "registries differ"
            )


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, k))
    else:
        yield prefix

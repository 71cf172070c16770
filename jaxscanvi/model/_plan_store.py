"""Construction plans on disk, so a warm process does not trace ``module.init``.

A plan (`model._init._plan`) is plain data: each variable's key path, kind,
arguments, shape and fold. It is kept as JSON in an entry of the exported-
program folder (`_export_cache.entries_folder`), framed and checked as those
are (`_export_cache.pack`): the key text names the module's repr, the
versions of JAX, jaxlib, Flax and jaxscanvi (with its sources' digest) and
the flags the keys and folds depend on. An entry that fails the check, does
not parse, or describes something other than a plan is ignored; the caller
traces the module again and writes a new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import flax
import jax
import jaxlib.version

from .. import _export_cache

KINDS = ("uniform", "normal", "fill")


class Leaf(NamedTuple):
    """One variable: its kind and arguments (`nn.init.Described`), its shape,
    and for a draw the data Flax folds into the params key for it."""

    kind: str
    args: tuple
    shape: tuple[int, ...]
    fold: int | None


def _flag(name: str):
    # jax.config's flags are attributes set at run time
    return getattr(jax.config, name)


def key_text(module_text: str) -> str:
    from .._version import __version__

    return repr(
        {
            "plan": module_text,
            "jax": jax.__version__,
            "jaxlib": jaxlib.version.__version__,
            "flax": flax.__version__,
            "jaxscanvi": __version__,
            "sources": _export_cache.source_digest(),
            "prng": str(_flag("jax_default_prng_impl")),
            "custom_prng": bool(_flag("jax_enable_custom_prng")),
            "partitionable": bool(_flag("jax_threefry_partitionable")),
            "x64": bool(_flag("jax_enable_x64")),
            "rng_separator": bool(flax.config.flax_fix_rng_separator),
        }
    )


def _path(text: str) -> Path | None:
    where = _export_cache.entries_folder()
    if where is None:
        return None
    return where / (hashlib.sha256(text.encode()).hexdigest() + ".plan")


def load(module_text: str):
    """The stored (tree structure, leaves) for the module, or None."""
    text = key_text(module_text)
    path = _path(text)
    if path is None:
        return None
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    payload = _export_cache.unpack(blob, text)
    if payload is None:
        return None
    try:
        return _parse(json.loads(payload.decode()))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def save(module_text: str, tree, leaves) -> None:
    """Store the plan, where the cache is on and the tree is dicts of strings."""
    text = key_text(module_text)
    path = _path(text)
    if path is None:
        return
    numbered = jax.tree_util.tree_unflatten(tree, list(range(len(leaves))))
    paths = [
        [getattr(p, "key", None) for p in kp]
        for kp, _ in jax.tree_util.tree_flatten_with_path(numbered)[0]
    ]
    data = {"paths": paths, "leaves": [list(leaf) for leaf in leaves]}
    try:
        payload = json.dumps(data, allow_nan=False).encode()
        # only what reads back as this very plan is stored
        if _parse(json.loads(payload)) != (tree, tuple(leaves)):
            return
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return  # a key or argument JSON cannot hold: the next process traces
    _export_cache._write(path, _export_cache.pack(text, payload))


def _parse(data) -> tuple:
    paths, raw = data["paths"], data["leaves"]
    if not isinstance(paths, list) or not isinstance(raw, list) or len(paths) != len(raw):
        raise ValueError("not a plan")
    nested: dict = {}
    for i, path in enumerate(paths):
        if not path or not all(isinstance(k, str) for k in path):
            raise ValueError("a key path of strings")
        node = nested
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError("a leaf and a node at one path")
        if path[-1] in node:
            raise ValueError("two leaves at one path")
        node[path[-1]] = i
    order, tree = jax.tree_util.tree_flatten(nested)
    if order != list(range(len(raw))):  # an empty dict, or paths out of order
        raise ValueError("paths out of order")
    return tree, tuple(_leaf(x) for x in raw)


def _leaf(x) -> Leaf:
    kind, args, shape, fold = x
    number = (int, float)
    if kind not in KINDS or not isinstance(args, list) or len(args) != 1:
        raise ValueError("kind")
    if not all(isinstance(a, number) and not isinstance(a, bool) for a in args):
        raise ValueError("args")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
        raise ValueError("shape")
    # every parameter has a fold (a constant one too); every draw is a parameter
    if not (fold is None and kind == "fill") and not (type(fold) is int and 0 <= fold < 2**32):
        raise ValueError("fold")
    return Leaf(kind, tuple(args), tuple(shape), fold)

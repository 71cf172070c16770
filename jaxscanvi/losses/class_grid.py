"""The class terms of every (class, cell) pair, as one grid through the class networks.

Apart from the bounds in `scanvi` because of its chunking: above
``class_chunk_size`` classes the grid is scanned in chunks, and batch
normalisation then needs the whole grid's statistics built first, pass by pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..module.scanvae import SCANVAE, class_noise
from ..nn.layers import global_stats


def class_bn_layers(module, state) -> list[tuple[str, ...]]:
    """Paths of the class networks' trainable batch-norm layers, in forward order
    (q(u|z1,c)'s layers, then p(z1|u,c)'s)."""
    frozen = set(module.config.frozen_batchnorm)
    stats = state.get("batch_stats", {})
    paths = []
    for net in ("encoder_z2_z1", "decoder_z1_z2"):
        if net in frozen:
            continue
        for fc, layers in stats.get(net, {}).items():
            paths += [(net, fc, name) for name in sorted(layers, key=lambda s: int(s[2:]))]
    return paths


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def class_bounds(module, params, state, z1, weight, rng, *, train: bool, sample: bool = True):
    """-log p(z1|u,c) and KL(q(u|z1,c)||p(u)) for every class: two (B, C) arrays.

    Also returns the updated batch statistics of the two class networks.
    The (class, cell) grid runs through the class networks as one minibatch
    (`SCANVAE.class_grid`), with batch statistics over the whole grid, as
    scvi-tools computes them. Class c's random draws come from the c-th of
    ``jax.random.split(rng, C)`` (`class_noise`). Above ``class_chunk_size``
    classes, chunks are scanned and the grid's statistics are built first,
    one pass over the chunks per batch-norm layer (a layer's inputs depend on
    the layers before it): each pass sums the layer's rows chunk by chunk,
    with the layers before it normalised by the statistics already built. The
    last pass computes the bounds with them. Values, gradients and running
    averages are then those of the whole grid at once, with memory bounded by
    one chunk.
    """
    cfg = module.config
    C, B = cfg.n_labels, z1.shape[0]
    chunk = cfg.class_chunk_size

    def run(x, bn_global=None, collect=None):
        classes, valid, keys = x
        noise = class_noise(cfg, keys, B, train=train, sample=sample)
        mask = valid[:, None] * weight
        variables = {"params": params, **state}
        if bn_global:
            variables["bn_global"] = bn_global
        args = (z1, classes, mask, noise)
        if train:
            mutable = ["batch_stats"] + (["bn_sums"] if collect else [])
            (nll, kl2), upd = module.apply(
                variables, *args, train=True, mutable=mutable, method=SCANVAE.class_grid
            )
            if collect:  # a statistics pass: only this layer's sums are used
                return _get(upd["bn_sums"], collect)["sums"]
            sub = {
                k: upd["batch_stats"][k]
                for k in ("encoder_z2_z1", "decoder_z1_z2")
                if k in upd["batch_stats"]
            }
            return nll, kl2, sub
        nll, kl2 = module.apply(variables, *args, train=False, method=SCANVAE.class_grid)
        return nll, kl2, {}

    keys = jax.random.split(rng, C)
    if chunk >= C:
        nll, kl2, sub = run((jnp.arange(C), jnp.ones(C, z1.dtype), keys))
        return nll.T, kl2.T, sub

    n_chunks = -(-C // chunk)
    classes = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)
    valid = (classes < C).astype(z1.dtype)
    keys = jnp.concatenate([keys, keys[: n_chunks * chunk - C]])  # padded classes reuse some
    keys = keys.reshape(n_chunks, chunk, *keys.shape[1:])
    xs = (jnp.minimum(classes, C - 1), valid, keys)
    # every scan recomputes each chunk in the backward pass (jax.checkpoint):
    # otherwise reverse mode keeps every chunk's activations and memory grows
    # linearly with C. The statistics passes carry only (n, sum, sum of squares).
    known: dict = {}
    for path in class_bn_layers(module, state) if train else []:

        def add(total, x, bn_global=_nested(known), path=path):  # noqa: B008 - bound per layer
            sums = run(x, bn_global, collect=path)
            return jax.tree_util.tree_map(jnp.add, total, sums), None

        shift = jax.lax.stop_gradient(_get(state["batch_stats"], path)["mean"])
        zero = (jnp.zeros((), z1.dtype), jnp.zeros_like(shift), jnp.zeros_like(shift))
        sums, _ = jax.lax.scan(jax.checkpoint(add), zero, xs)
        known[path] = global_stats(sums, shift)
    bn_global = _nested(known)

    def body(_, x):
        return None, run(x, bn_global)

    _, (nll, kl2, sub) = jax.lax.scan(jax.checkpoint(body), None, xs)
    nll = nll.reshape(-1, B)[:C]
    kl2 = kl2.reshape(-1, B)[:C]
    # with the grid's statistics every chunk updates the running averages alike
    sub = jax.tree_util.tree_map(lambda a: a[0], sub)
    return nll.T, kl2.T, sub

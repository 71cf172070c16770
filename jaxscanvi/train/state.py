"""The train state pytree, the optimiser, and the KL warm-up schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything that changes during training; saving it makes training resumable."""

    params: Any
    state: Any  # mutable collections: batch_stats, constants
    opt_state: Any
    rng: jax.Array  # base key; step keys are fold_in(rng, step)
    step: jax.Array  # int32, optimisation steps taken
    epoch: jax.Array  # int32, epochs completed

    if TYPE_CHECKING:  # `struct.dataclass` adds it at runtime; declared for the checker

        def replace(self, **changes: Any) -> TrainState: ...


def make_optimizer(
    lr: float = 1e-3,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    trainable_mask=None,
    *,
    decoupled: bool = False,
    clip: tuple | None = None,
) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, eps, weight_decay): coupled L2 (scvi-tools' "Adam");
    with ``decoupled``, torch.optim.AdamW (its "AdamW"): p -= lr * (adam + wd * p).

    ``clip``: Lightning's gradient clipping of the raw gradients, ("norm", c)
    (global norm at most c) or ("value", c) (each element in [-c, c]).

    The learning rate is an injected hyper-parameter so reduce-on-plateau can
    change it between epochs. ``trainable_mask`` is a pytree like the params
    whose leaves are bools (the whole leaf) or boolean arrays of the leaf's
    shape (single rows or columns, as query surgery needs): every element
    marked False gets an update of exactly zero, weight decay included.
    """

    first = []  # before Adam
    if clip is not None:
        kind, c = clip
        first.append(optax.clip_by_global_norm(c) if kind == "norm" else optax.clip(c))
    if not decoupled:
        first.append(optax.add_decayed_weights(weight_decay))
    after = [optax.add_decayed_weights(weight_decay)] if decoupled else []
    # one element as it is: the state's structure (and old checkpoints) unchanged
    head = first[0] if len(first) == 1 else optax.chain(*first) if first else optax.identity()

    def build(learning_rate):
        return optax.chain(
            head, optax.scale_by_adam(eps=eps), *after, optax.scale_by_learning_rate(learning_rate)
        )

    tx = optax.inject_hyperparams(build)(learning_rate=lr)
    if trainable_mask is not None:
        tx = optax.chain(tx, zero_frozen(trainable_mask))
    return tx


def pending_update(
    opt_state,
    params,
    *,
    eps: float = 0.01,
    trainable_mask=None,
    b1: float = 0.9,
    b2: float = 0.999,
    decoupled_decay: float = 0.0,
):
    """Apply the Adam update held in ``opt_state`` to ``params``.

    ``opt_state`` is `make_optimizer`'s state after the step's moments were
    taken (its update already counted); this is the parameter update
    ``tx.update`` returned for that step, by optax's formula. Training on the
    device takes each step's update at the start of the next step: the
    moments are then written once, in place, instead of recomputed (and the
    old ones copied) for the parameter update, which on the CPU spends a
    tenth of a step on memory traffic. ``decoupled_decay``: AdamW's weight
    decay, which the moments do not hold.
    """
    adam = adam_state(opt_state)
    lr = hyperparams(opt_state)["learning_rate"]
    mu_hat = optax.tree.bias_correction(adam.mu, b1, adam.count)
    nu_hat = optax.tree.bias_correction(adam.nu, b2, adam.count)
    updates = jax.tree.map(
        lambda m, v, p: (m / (jnp.sqrt(v) + eps) + decoupled_decay * p) * -lr,
        mu_hat,
        nu_hat,
        params,
    )
    if trainable_mask is not None:
        updates, _ = zero_frozen(trainable_mask).update(updates, optax.EmptyState())
    return optax.apply_updates(params, updates)


def zero_frozen(trainable_mask) -> optax.GradientTransformation:
    """Replace the update of every element whose mask is False by an exact zero."""
    masks = jax.tree_util.tree_map(lambda m: np.asarray(m, bool), trainable_mask)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        out = jax.tree_util.tree_map(
            lambda u, m: u if m.all() else jnp.where(m, u, jnp.zeros_like(u)), updates, masks
        )
        return out, state

    return optax.GradientTransformation(init, update)


# what an optimiser's init may compute from its constants alone
_HOST_OPS = {
    "broadcast_in_dim": lambda x, shape, **_: None if np.ndim(x) else np.broadcast_to(x, shape),
    "convert_element_type": lambda x, new_dtype, **_: np.asarray(x, new_dtype),
    "mul": lambda x, y, **_: np.multiply(x, y),
}


def host_init(tx: optax.GradientTransformation, params):
    """``tx.init(params)``, computed in numpy when it reads only the shapes of
    ``params`` (as Adam's zeros and injected constants do).

    Called eagerly, ``tx.init`` compiles a small program per operation and
    shape (a dozen per model); traced once here and evaluated on the host, it
    compiles none. Any other operation, or a value read from ``params``,
    falls back to ``tx.init`` itself.
    """
    closed, shapes = jax.make_jaxpr(tx.init, return_shape=True)(params)
    jaxpr, env = closed.jaxpr, {}
    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = np.asarray(c)

    def read(v):
        return np.asarray(v.val, v.aval.dtype) if hasattr(v, "val") else env.get(v)

    for eqn in jaxpr.eqns:
        args = [read(v) for v in eqn.invars]
        op = _HOST_OPS.get(eqn.primitive.name)
        out = None if op is None or any(a is None for a in args) else op(*args, **eqn.params)
        if out is None or eqn.primitive.multiple_results:
            return tx.init(params)
        env[eqn.outvars[0]] = np.asarray(out, eqn.outvars[0].aval.dtype)
    outs = [read(v) for v in jaxpr.outvars]
    if any(o is None or getattr(v.aval, "weak_type", False) for o, v in zip(outs, jaxpr.outvars)):
        return tx.init(params)  # (a weakly typed leaf would change the epoch program's key)
    return jax.device_put(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outs))


def mask_key(mask) -> tuple | None:
    """A hashable summary of a mask pytree (structure and every element)."""
    if mask is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    return (treedef, tuple((np.shape(m), np.asarray(m, bool).tobytes()) for m in leaves))


def get_lr(opt_state) -> float:
    return float(hyperparams(opt_state)["learning_rate"])


def set_lr(opt_state, lr: float):
    """A copy of ``opt_state`` with learning rate ``lr`` (the state is not changed)."""
    return with_hyperparams(opt_state, learning_rate=jnp.asarray(lr, jnp.float32))


# The optimiser state is read and written through optax's public tree
# utilities (`optax.tree_utils.tree_get` / `tree_set`), by the names optax
# documents: the field ``hyperparams`` of `optax.inject_hyperparams`' state and
# the class `optax.ScaleByAdamState`. Nothing here depends on where in the
# chain (or in a chain with `zero_frozen`) they sit.


def hyperparams(opt_state) -> dict:
    """The injected hyper-parameters (name -> value) of `make_optimizer`'s state
    (or the sweep's), wherever the chain holds them."""
    return optax.tree_utils.tree_get(opt_state, "hyperparams")


def with_hyperparams(opt_state, **values):
    """A copy of ``opt_state`` whose injected hyper-parameters have ``values``
    (names not yet there are added: the sweep keeps its own numbers there)."""
    return optax.tree_utils.tree_set(opt_state, hyperparams={**hyperparams(opt_state), **values})


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The Adam moments and count inside ``opt_state``."""
    return optax.tree_utils.tree_get(opt_state, "ScaleByAdamState")


# the KL weight at (epoch, step): a `KLSchedule`, or a sweep's traced one
Schedule = Callable[[jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class KLSchedule:
    """scvi-tools' linear KL warm-up, by epochs (default) or by steps."""

    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0

    def __call__(self, epoch, step):
        slope = self.max_kl_weight - self.min_kl_weight
        epoch = jnp.asarray(epoch, jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        if self.n_epochs_kl_warmup:
            n = float(self.n_epochs_kl_warmup)
            return jnp.where(epoch < n, slope * epoch / n + self.min_kl_weight, self.max_kl_weight)
        if self.n_steps_kl_warmup:
            n = float(self.n_steps_kl_warmup)
            return jnp.where(step < n, slope * step / n + self.min_kl_weight, self.max_kl_weight)
        return jnp.asarray(self.max_kl_weight, jnp.float32)

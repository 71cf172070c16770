"""The compiled programs of a sweep: one epoch (and one validation pass) of K
models at once, `jax.vmap` over their train states and hyperparameters.

Each member's hyperparameters are traced values, so one program serves every
grid: the learning rate and weight decay live in the optimiser state
(`optax.inject_hyperparams`), the KL schedule, ``classification_ratio`` and
the extra loss terms' weights in an array dict ``hp`` the epoch takes as an
argument. Inside the vmap each member runs `train.loop.make_train_step`,
the very step a single `train()` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from .. import backend
from ..compile_cache import functions
from ..data.batch import dense_device_batch, device_batch
from ..train.loop import make_eval_step, make_train_step
from ..train.state import mask_key, pending_update, zero_frozen


def sweep_optimizer(eps: float, trainable_mask=None) -> optax.GradientTransformation:
    """`train.state.make_optimizer`'s Adam (coupled L2), with the weight decay
    injected too, so each member carries its own in its optimiser state."""

    def build(learning_rate, weight_decay):
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.scale_by_adam(eps=eps),
                           optax.scale_by_learning_rate(learning_rate))

    tx = optax.inject_hyperparams(build)(learning_rate=1e-3, weight_decay=0.0)
    if trainable_mask is not None:
        tx = optax.chain(tx, zero_frozen(trainable_mask))
    return tx


@dataclass(frozen=True)
class TracedSchedule:
    """`train.state.KLSchedule` with its numbers traced (one member's scalars).

    ``mode`` ("epochs", "steps" or "constant") is what every member shares;
    the arithmetic is KLSchedule's, operation for operation.
    """

    mode: str
    hp: dict

    def __call__(self, epoch, step):
        h = self.hp
        if self.mode == "constant":
            return jnp.asarray(h["kl_max"], jnp.float32)
        t = jnp.asarray(epoch if self.mode == "epochs" else step, jnp.float32)
        return jnp.where(t < h["kl_n"], h["kl_slope"] * t / h["kl_n"] + h["kl_min"],
                         h["kl_max"])


def with_hyper(loss: Callable, hp: dict) -> Callable:
    """The model's loss with its ratio and extra-term weights replaced by traced ones.

    A model's loss is a `functools.partial` of `losses.scvi_elbo` or
    `losses.scanvi_elbo`; a keyword given at call time overrides a stored one.
    """
    kw = {}
    if "classification_ratio" in hp:
        kw["classification_ratio"] = hp["classification_ratio"]
    if hp.get("weights"):
        kw["extra_weights"] = {**loss.keywords.get("extra_weights", {}), **hp["weights"]}
    return partial(loss, **kw) if kw else loss


@dataclass(frozen=True)
class Programs:
    """A sweep's compiled epoch and validation pass (see `programs`)."""

    epoch: Callable      # (ts, hp, cells, rows, lab_rows) -> (ts, bad, (terms, counts, kl))
    validate: Callable   # (ts, hp, cells, rows, lab_rows) -> (terms, counts, kl)


def programs(task, config, *, schedule_mode: str, shared: bool, dense: bool,
             n_genes: int, k_cap: int) -> Programs:
    """Build (or reuse) the vmapped epoch and validation programs.

    ``shared``: every member sees the same minibatch (rows (n_steps, B),
    gathered once); else rows are (n_steps, K, B), one minibatch per member.
    """
    masks = task.freeze if task.freeze is not None else (None, None)
    numerics = backend.current(config.precision)
    traced_plan = {"lr", "weight_decay", "classification_ratio"}
    spec = ("sweep", task.loss_spec,
            tuple(kv for kv in config.plan.options if kv[0] not in traced_plan),
            config.on_nonfinite, config.loss_terms,
            tuple((k, w) for k, w in config.loss_weights if callable(w)),
            mask_key(masks[0]), mask_key(masks[1]), numerics, schedule_mode, shared, dense,
            n_genes, k_cap)

    def build():
        eps = config.plan.get("eps", 0.01)
        tx = sweep_optimizer(eps, masks[0])
        pending = partial(pending_update, eps=eps, trainable_mask=masks[0]) \
            if numerics.kernels.deferred_adam else None
        loss_train, loss_eval = task.make_loss(train=True), task.make_loss(train=False)

        def member(hp):
            return make_train_step(with_hyper(loss_train, hp), tx,
                                   TracedSchedule(schedule_mode, hp), config.on_nonfinite,
                                   masks[1], pending)

        bax = None if shared else 0
        step = jax.vmap(lambda hp, c, b: member(hp).step(c, b), in_axes=(0, 0, bax))
        deferred = jax.vmap(lambda hp, c, b: member(hp).deferred(c, b), in_axes=(0, 0, bax))
        finish = jax.vmap(lambda hp, c: member(hp).finish(c))
        evaluate = jax.vmap(
            lambda hp, ts, b: make_eval_step(with_hyper(loss_eval, hp),
                                             TracedSchedule(schedule_mode, hp))(ts, b)[1],
            in_axes=(0, 0, bax))

        def gather(cells, r):
            one = dense_device_batch if dense else partial(device_batch, n_genes=n_genes,
                                                           k_cap=k_cap)
            return one(cells, r) if shared else jax.vmap(one, in_axes=(None, 0))(cells, r)

        def batches(cells, r):
            main = gather(cells, r[0])
            return main if r[1] is None else (main, gather(cells, r[1]))

        def epoch(ts, hp, cells, rows, lab_rows):
            k = ts.step.shape[0]
            bad = jnp.full((k,), -1, jnp.int32)
            if pending is None:
                (ts, bad), out = jax.lax.scan(
                    lambda c, r: step(hp, c, batches(cells, r)), (ts, bad), (rows, lab_rows))
            else:
                carry = (ts, bad, jnp.zeros((k,), bool))
                carry, out = jax.lax.scan(
                    lambda c, r: deferred(hp, c, batches(cells, r)), carry, (rows, lab_rows))
                ts, bad = finish(hp, carry)
            return ts, bad, out

        def validate(ts, hp, cells, rows, lab_rows):
            _, out = jax.lax.scan(lambda c, r: (c, evaluate(hp, c, batches(cells, r))),
                                  ts, (rows, lab_rows))
            return out

        return Programs(jax.jit(backend.traced(epoch, numerics)),
                        jax.jit(backend.traced(validate, numerics)))

    return functions.get(spec, build)


def masked(active, new, old):
    """``new`` for the members marked in ``active`` (K,), ``old`` for the rest."""
    def pick(a, b):
        return jnp.where(active.reshape(active.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree_util.tree_map(pick, new, old)


masked_jit = jax.jit(masked)

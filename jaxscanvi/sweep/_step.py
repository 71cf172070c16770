"""A sweep member's train and eval steps, with every hyperparameter it may vary traced.

Each member's numbers live in its optimiser state (`optax.inject_hyperparams`'
``hyperparams``): the learning rate and weight decay, which the optimiser
reads, and the KL schedule's numbers, ``classification_ratio`` and the extra
loss terms' weights, which the step reads back. So one step function, and one
compiled epoch, serves every member and every grid. The step is
`train.loop.make_train_step`, the very step a single `train()` runs, and the
epoch is the device source's (`train.chunks.scan_program` over its gather):
members run it in turn, or `jax.vmap`-ed over their stacked states
(`vmapped_epoch`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from .. import backend
from ..compile_cache import SweepEpochKey, SweepMemberKey, functions
from ..train.fit import pinned
from ..train.loop import StepFns, make_eval_step, make_train_step
from ..train.sources import grown_cap
from ..train.state import hyperparams, mask_key, pending_update, zero_frozen

# a member's extra-term weight, in its optimiser's hyperparams
WEIGHT_KEY = "loss_weight:"


def sweep_optimizer(
    eps: float, trainable_mask=None, *, decoupled: bool = False, clip: tuple | None = None
) -> optax.GradientTransformation:
    """`train.state.make_optimizer`'s chain (Adam after the clipping, coupled L2 or, with
    ``decoupled``, AdamW; Lightning's clipping), with the weight decay injected too.

    The factory ignores the other numbers a member keeps in its hyperparams.
    """

    def build(learning_rate, weight_decay, **numbers):
        del numbers  # the step's, not the optimiser's
        first = (
            []
            if clip is None
            else [optax.clip_by_global_norm(clip[1]) if clip[0] == "norm" else optax.clip(clip[1])]
        )
        if not decoupled:
            first.append(optax.add_decayed_weights(weight_decay))
        after = [optax.add_decayed_weights(weight_decay)] if decoupled else []
        head = first[0] if len(first) == 1 else optax.chain(*first) if first else optax.identity()
        return optax.chain(
            head, optax.scale_by_adam(eps=eps), *after, optax.scale_by_learning_rate(learning_rate)
        )

    tx = optax.inject_hyperparams(build)(learning_rate=1e-3, weight_decay=0.0)
    if trainable_mask is not None:
        tx = optax.chain(tx, zero_frozen(trainable_mask))
    return tx


def numbers(ts) -> dict:
    """A member's traced hyperparameters (see the module docstring)."""
    return hyperparams(ts.opt_state)


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
        return jnp.where(t < h["kl_n"], h["kl_slope"] * t / h["kl_n"] + h["kl_min"], h["kl_max"])


def with_hyper(loss: Callable, hp: dict) -> Callable:
    """The model's loss with its ratio and extra-term weights replaced by traced ones.

    A model's loss is a `functools.partial` of `losses.scvi_elbo` or
    `losses.scanvi_elbo`; a keyword given at call time overrides a stored one.
    """
    kw = {}
    if "classification_ratio" in hp:
        kw["classification_ratio"] = hp["classification_ratio"]
    weights = {k[len(WEIGHT_KEY) :]: v for k, v in hp.items() if k.startswith(WEIGHT_KEY)}
    if weights:
        kw["extra_weights"] = {**loss.keywords.get("extra_weights", {}), **weights}
    return partial(loss, **kw) if kw else loss


def member_steps(task, config, *, schedule_mode: str):
    """(optimizer, train `StepFns`, eval step) for any member, built once per program.

    Carries are train()'s: ``(TrainState, first_bad_step)`` for training, the
    TrainState for evaluation; each step reads its numbers from the state.
    """
    masks = task.freeze if task.freeze is not None else (None, None)
    numerics = backend.current(config.precision)
    plan = config.plan
    traced_plan = {"lr", "weight_decay", "classification_ratio"}
    spec = SweepMemberKey(
        loss_spec=task.loss_spec,
        plan_options=tuple(kv for kv in plan.options if kv[0] not in traced_plan),
        on_nonfinite=config.on_nonfinite,
        loss_terms=config.loss_terms,
        callable_weights=tuple((k, w) for k, w in config.loss_weights if callable(w)),
        params_mask=mask_key(masks[0]),
        state_mask=mask_key(masks[1]),
        numerics=numerics,
        schedule_mode=schedule_mode,
    )

    def build():
        eps, decoupled = plan.get("eps", 0.01), plan.get("optimizer") == "AdamW"
        clip = plan.get("gradient_clip_val")
        tx = sweep_optimizer(
            eps,
            masks[0],
            decoupled=decoupled,
            clip=None if clip is None else (plan.get("gradient_clip_algorithm", "norm"), clip),
        )
        deferred = numerics.kernels.deferred_adam
        loss_train, loss_eval = task.make_loss(train=True), task.make_loss(train=False)

        def fns(ts) -> StepFns:
            hp = numbers(ts)
            pending = (
                partial(
                    pending_update,
                    eps=eps,
                    trainable_mask=masks[0],
                    decoupled_decay=hp["weight_decay"] if decoupled else 0.0,
                )
                if deferred
                else None
            )
            return make_train_step(
                with_hyper(loss_train, hp),
                tx,
                TracedSchedule(schedule_mode, hp),
                config.on_nonfinite,
                masks[1],
                pending,
            )

        def evaluate(ts, batch):
            hp = numbers(ts)
            return make_eval_step(with_hyper(loss_eval, hp), TracedSchedule(schedule_mode, hp))(
                ts, batch
            )

        def deferred_step(c, b):
            f = fns(c[0]).deferred
            assert f is not None  # numerics defer Adam's update: the pair is built
            return f(c, b)

        def finish(c):
            f = fns(c[0]).finish
            assert f is not None  # as in deferred_step
            return f(c)

        train = StepFns(
            lambda c, b: fns(c[0]).step(c, b),
            deferred_step if deferred else None,
            finish if deferred else None,
        )
        return tx, pinned(train, numerics), backend.traced(evaluate, numerics)

    return functions.get(spec, build)


def vmapped_epoch(source, step_fn: Callable, *, own_rows: bool) -> Callable:
    """The device source's epoch program for one member, `jax.vmap`-ed over K
    stacked carries: ``(carry, cells, rows, lab_rows) -> (carry, outputs)``,
    outputs (K, n_steps). Rows are (n_steps, B), one minibatch gathered once for
    all members, or with ``own_rows`` (n_steps, K, B), each member its own.
    """
    # DeviceSource keeps its program (scan_program over its gather) private;
    # the sweep vmaps that very program rather than a copy of it
    one = source._epoch_fn(step_fn)
    axis = 1 if own_rows else None
    return functions.get(
        SweepEpochKey(one, axis), lambda: jax.jit(jax.vmap(one, in_axes=(0, None, axis, axis)))
    )


def run_epoch_vmapped(source, step_fn: Callable, carry, rows, lab_rows=None):
    """`DeviceSource.run_epoch` for K stacked carries (see `vmapped_epoch`)."""
    if not source.dense:  # the list of non-zeros grows to the fullest minibatch
        source.k_cap = grown_cap(source.k_cap, source.row_nnz, rows, lab_rows)
    fn = vmapped_epoch(source, step_fn, own_rows=rows.ndim == 3)
    lab = None if lab_rows is None else jnp.asarray(lab_rows)
    return fn(carry, source.cells, jnp.asarray(rows), lab)


def masked(active, new, old):
    """``new`` for the members marked in ``active`` (K,), ``old`` for the rest."""

    def pick(a, b):
        return jnp.where(active.reshape(active.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(pick, new, old)


masked_jit = jax.jit(masked)

"""The optimiser: Adam's update taken from its state, and the deferred train step
(each step's update applied at the start of the next) against the plain one."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxscanvi.losses import LossAux
from jaxscanvi.train.loop import make_train_step
from jaxscanvi.train.state import (
    KLSchedule,
    TrainState,
    adam_state,
    get_lr,
    hyperparams,
    make_optimizer,
    pending_update,
    set_lr,
    with_hyperparams,
)


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(r.normal(size=(5, 3)), jnp.float32),
        "b": jnp.asarray(r.normal(size=(4,)), jnp.float32),
    }


MASK = {"w": np.arange(15).reshape(5, 3) % 4 != 0, "b": True}


@pytest.mark.parametrize("mask", [None, MASK])
def test_pending_update_is_the_optax_update(mask):
    """Over 4 steps, params + tx.update's updates equal pending_update applied to
    the state tx.update returns; frozen elements never move."""
    tx = make_optimizer(lr=0.05, eps=0.01, weight_decay=1e-2, trainable_mask=mask)
    p_ref = p_new = _params()
    s_ref = s_new = tx.init(p_ref)
    r = np.random.default_rng(1)
    for _ in range(4):
        g = jax.tree.map(lambda a: jnp.asarray(r.normal(size=a.shape), jnp.float32), p_ref)
        u, s_ref = tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        _, s_new = tx.update(g, s_new, p_new)
        p_new = pending_update(s_new, p_new, eps=0.01, trainable_mask=mask)
        for a, b in zip(jax.tree.leaves(p_new), jax.tree.leaves(p_ref)):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    moved = np.abs(np.asarray(p_new["w"]) - np.asarray(_params()["w"])) > 0
    expect = np.ones((5, 3), bool) if mask is None else MASK["w"]
    np.testing.assert_array_equal(moved, expect)


class Toy(NamedTuple):
    weight: jax.Array
    x: jax.Array


def _loss(params, state, batch, key, kl_w, step=None):
    """A least-squares loss with a running count as mutable state; an x holding NaN
    gives a non-finite loss."""
    toy = batch[0]
    pred = toy.x @ params["w"] + params["b"][:3]
    loss = jnp.mean((pred - 1.0) ** 2) + 0.1 * jnp.sum(params["b"] ** 2)
    new_state = {"seen": state["seen"] + 1.0}
    return loss, LossAux({"loss": loss}, new_state, {})


def _batches(n_steps, nan_at):
    r = np.random.default_rng(2)
    x = r.normal(size=(n_steps, 6, 5)).astype(np.float32)
    if nan_at is not None:
        x[nan_at, 0, 0] = np.nan
    return (Toy(jnp.ones((n_steps, 6)), jnp.asarray(x)),)


@pytest.mark.parametrize("on_nonfinite,nan_at", [("raise", None), ("raise", 3), ("skip_step", 3)])
def test_deferred_steps_compute_what_plain_steps_do(on_nonfinite, nan_at):
    """A scan of step.deferred then step.finish gives the plain scan's parameters,
    optimiser state, mutable state, first bad step and per-step outputs."""
    tx = make_optimizer(lr=0.05, eps=0.01, weight_decay=1e-3)
    step = make_train_step(
        _loss,
        tx,
        KLSchedule(n_epochs_kl_warmup=None),
        on_nonfinite,
        pending=lambda s, p: pending_update(s, p, eps=0.01),
    )
    p0 = _params()
    ts = TrainState(
        params=p0,
        state={"seen": jnp.float32(0)},
        opt_state=tx.init(p0),
        rng=jax.random.PRNGKey(0),
        step=jnp.int32(0),
        epoch=jnp.int32(0),
    )
    carry = (ts, jnp.int32(-1))
    batches = _batches(7, nan_at)

    (ts_a, bad_a), out_a = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(carry, batches)

    @jax.jit
    def deferred(c, b):
        c, out = jax.lax.scan(step.deferred, (*c, jnp.bool_(False)), b)
        return step.finish(c), out

    (ts_b, bad_b), out_b = deferred(carry, batches)

    assert int(bad_a) == int(bad_b) == (-1 if nan_at is None else nan_at)
    for a, b in zip(jax.tree.leaves(ts_a), jax.tree.leaves(ts_b)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    # training happened, and a skipped or blocked step moved nothing
    assert float(jnp.abs(ts_b.params["w"] - p0["w"]).max()) > 1e-3
    n_taken = 7 if nan_at is None else (6 if on_nonfinite == "skip_step" else nan_at)
    assert int(adam_state(ts_b.opt_state).count) == n_taken
    assert float(ts_b.state["seen"]) == n_taken


OPTIMIZERS = {
    "adam": lambda lr: make_optimizer(lr),
    "masked_clipped": lambda lr: make_optimizer(lr, trainable_mask=MASK, clip=("norm", 1.0)),
    "adamw_value_clip": lambda lr: make_optimizer(lr, decoupled=True, clip=("value", 0.5)),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_state_is_read_and_written_by_public_names(kind):
    """`hyperparams`, `with_hyperparams`, `set_lr` and `adam_state` (optax's
    public tree utilities) find the learning rate and Adam's moments wherever
    the chain holds them, and change nothing in place."""
    p = _params()
    make = OPTIMIZERS[kind]
    tx = make(1e-3)
    s0 = tx.init(p)
    assert set(hyperparams(s0)) == {"learning_rate"}
    assert get_lr(s0) == pytest.approx(1e-3)

    s1 = set_lr(s0, 0.25)
    assert get_lr(s1) == pytest.approx(0.25) and get_lr(s0) == pytest.approx(1e-3)
    assert jax.tree.structure(s1) == jax.tree.structure(s0)
    assert hyperparams(s1)["learning_rate"].dtype == jnp.float32
    # the new rate is the one the next update uses: as an optimiser built with it
    g = _params(1)
    u_set, s_set = jax.jit(tx.update)(g, s1, p)
    u_new, _ = make(0.25).update(g, make(0.25).init(p), p)
    for a, b in zip(jax.tree.leaves(u_set), jax.tree.leaves(u_new)):
        np.testing.assert_allclose(a, b, rtol=1e-6)

    adam = adam_state(s_set)
    assert isinstance(adam, optax.ScaleByAdamState)
    assert int(adam.count) == 1 and int(adam_state(s1).count) == 0
    assert jax.tree.structure(adam.mu) == jax.tree.structure(p)

    # names not yet there are added (the sweep keeps its numbers beside the rate)
    s2 = with_hyperparams(s0, extra=jnp.float32(2.0))
    assert set(hyperparams(s2)) == {"learning_rate", "extra"}
    assert set(hyperparams(s0)) == {"learning_rate"}

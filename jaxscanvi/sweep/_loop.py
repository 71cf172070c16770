"""The epoch loops of a sweep: members in turn, or vmapped, each on train()'s pieces.

In turn (`run_in_turn`), each member is `train.loop.run_loop` with the
member's step: what its `train()` runs, on one device source and one
compiled program for all. Vmapped (`run_vmapped`), one epoch program runs
every member's epoch at once, and `run_loop`'s pieces (`epoch_orders`,
`train_record`, `after_epoch`, ...) keep each member's history, early
stopping and plateau; a stopped member's state is held (its update masked)
while the others go on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..train.config import TrainConfig
from ..train.fit import FitResult, Task, loop_config
from ..train.loop import (
    LoopState,
    NonFiniteEpoch,
    add_validation,
    after_epoch,
    close_record,
    epoch_orders,
    nonfinite_error,
    run_loop,
    train_record,
    validates,
    validation_orders,
)
from ..train.state import TrainState, hyperparams, with_hyperparams
from ._step import masked_jit, run_epoch_vmapped


@dataclass
class Member:
    """One member's fixed inputs: its run's config, task, split and seed."""

    config: TrainConfig
    task: Task
    train_idx: np.ndarray
    val_idx: np.ndarray
    seed: int

    def labelled(self):
        t = self.task.labelled
        return None if t is None else partial(t, train_idx=self.train_idx)

    def val_labelled(self):
        t = self.task.val_labelled
        return None if t is None else partial(t, self.val_idx)

    def val_metrics(self, ts) -> dict:
        if self.task.val_metrics is None:
            return {}
        return self.task.val_metrics({"params": ts.params, **ts.state}, self.val_idx, None)


def stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)


def member_of(tree, k: int):
    return jax.tree_util.tree_map(lambda a: a[k], tree)


def member_state(m: Member, tx, hp: dict) -> TrainState:
    """A member's train state as `fit` starts one (key PRNGKey(seed)), its
    traced numbers ``hp`` (name -> scalar) in its optimiser's hyperparams."""
    opt_state = with_hyperparams(
        tx.init(m.task.params), **{k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    )
    return TrainState(
        params=m.task.params,
        state=m.task.state,
        opt_state=opt_state,
        rng=jax.random.PRNGKey(m.seed),
        step=jnp.asarray(0, jnp.int32),
        epoch=jnp.asarray(0, jnp.int32),
    )


def initial_state(members: list[Member], tx, hp: dict) -> TrainState:
    """K member states stacked; ``hp``: name -> (K,) numbers."""
    return stack(
        [member_state(m, tx, {k: v[i] for k, v in hp.items()}) for i, m in enumerate(members)]
    )


def run_in_turn(members: list[Member], tx, hp: dict, *, source, steps) -> list[FitResult]:
    """Each member trained by `run_loop` in turn, on one source and one program."""
    train, evaluate = steps
    results = []
    for i, m in enumerate(members):
        ts = member_state(m, tx, {k: v[i] for k, v in hp.items()})
        try:
            ts, loop = run_loop(
                ts,
                cfg=loop_config(m.config),
                source=source,
                train_step=train,
                eval_step=evaluate,
                train_idx=m.train_idx,
                val_idx=m.val_idx,
                labelled_idx=m.labelled(),
                val_labelled=m.val_labelled(),
                extra_val_metrics=m.val_metrics,
            )
        except NonFiniteEpoch as err:  # this member stops; the others train
            _warn_stopped(i, m, err)
            ts, loop = err.train_state, err.loop_state
            loop.stopped_early = True
        results.append(FitResult(ts, loop, m.train_idx, m.val_idx, None, source.device_bytes()))
    return results


def _warn_stopped(i: int, m: Member, err: Exception, stacklevel: int = 4) -> None:
    warnings.warn(
        f"member {i} (seed {m.seed}) stopped: {err}", RuntimeWarning, stacklevel=stacklevel
    )


def _stop_nonfinite(failed, members, loops, ts, bad, terms: dict, epoch: int) -> None:
    """Warn of each ``failed`` member's non-finite loss and mark it stopped."""
    for m in failed:
        _warn_stopped(
            m,
            members[m],
            nonfinite_error(
                member_of(ts, m), int(bad[m]), {n: v[m] for n, v in terms.items()}, epoch
            ),
            stacklevel=5,  # the frame it named when run_vmapped warned itself
        )
        loops[m].stopped_early = True


def _joined(parts: list, *, shared: bool):
    """One order for all (shared), or the members' side by side: (n_steps, K, B)."""
    if any(p is None for p in parts):
        return None
    return parts[0] if shared else np.stack(parts, axis=1)


def run_vmapped(
    members: list[Member], ts: TrainState, *, source, steps, shared: bool, progress_bar: bool
) -> list[FitResult]:
    """Every member's epoch in one vmapped program, to max_epochs or its early stop."""
    train, evaluate = steps
    cfgs = [loop_config(m.config) for m in members]
    cfg, k = cfgs[0], len(members)
    loops = [LoopState() for _ in members]
    active = np.ones(k, bool)
    drawing = range(1 if shared else k)  # who draws orders
    has_val = len(members[0].val_idx) > 0
    bar = tqdm(
        range(cfg.max_epochs), desc=f"Training {k} models", disable=not progress_bar, leave=False
    )
    for epoch in bar:
        t0 = time.perf_counter()
        drawn = [
            epoch_orders(source, cfgs[i], epoch, members[i].train_idx, members[i].labelled())
            for i in drawing
        ]
        carry = (ts, jnp.full((k,), -1, jnp.int32))
        (new, bad), (terms, counts, klw) = run_epoch_vmapped(
            source,
            train,
            carry,
            _joined([d[1] for d in drawn], shared=shared),
            _joined([d[2] for d in drawn], shared=shared),
        )
        bad = np.asarray(bad)
        failed = active & (bad >= 0) & (cfg.on_nonfinite == "raise")
        # as run_loop: a member whose loss went non-finite keeps its last finite
        # state (without the epoch counted) and stops; the others go on
        done = active & ~failed
        new = new.replace(epoch=jnp.where(jnp.asarray(done), new.epoch + 1, new.epoch))
        ts = new if active.all() else masked_jit(jnp.asarray(active), new, ts)
        terms = {n: np.asarray(v) for n, v in terms.items()}
        _stop_nonfinite(np.flatnonzero(failed), members, loops, ts, bad, terms, epoch)
        active &= ~failed
        lrs = np.asarray(hyperparams(ts.opt_state)["learning_rate"], np.float64)
        counts, klw = np.asarray(counts), np.asarray(klw)
        records = {
            m: train_record(epoch, {n: t[m] for n, t in terms.items()}, counts[m], klw[m], lrs[m])
            for m in np.flatnonzero(done)
        }
        if has_val and validates(cfg, epoch) and records:
            _validate_members(
                members,
                ts,
                epoch,
                records,
                [d[0] for d in drawn],
                source=source,
                evaluate=evaluate,
                shared=shared,
            )
        seconds = time.perf_counter() - t0
        for m, rec in records.items():
            close_record(loops[m], rec, seconds)
            lrs[m], stop = after_epoch(loops[m], rec, lrs[m], cfgs[m])
            active[m] &= not stop
        if cfg.reduce_lr_on_plateau:
            lr = jnp.asarray(lrs, jnp.float32)
            ts = ts.replace(opt_state=with_hyperparams(ts.opt_state, learning_rate=lr))
        bar.set_postfix(active=int(active.sum()))
        if not active.any():
            break
    bar.close()
    return [
        FitResult(
            member_of(ts, m), loops[m], mem.train_idx, mem.val_idx, None, source.device_bytes()
        )
        for m, mem in enumerate(members)
    ]


def _validate_members(
    members: list[Member],
    ts: TrainState,
    epoch: int,
    records: dict,
    train_orders: list,
    *,
    source,
    evaluate,
    shared: bool,
) -> None:
    """Every member's validation of ``epoch`` in one vmapped program, added to
    ``records`` (member -> this epoch's record) with its extra metrics.
    ``train_orders``: the epoch's orders of the members who drew them (the
    first alone when the order is shared)."""
    v = [
        validation_orders(
            source,
            loop_config(members[i].config),
            epoch,
            orders,
            members[i].val_idx,
            members[i].val_labelled(),
        )
        for i, orders in enumerate(train_orders)
    ]
    _, (vterms, vcounts, _) = run_epoch_vmapped(
        source,
        evaluate,
        ts,
        _joined([x[0] for x in v], shared=shared),
        _joined([x[1] for x in v], shared=shared),
    )
    vterms, vcounts = {n: np.asarray(t) for n, t in vterms.items()}, np.asarray(vcounts)
    for m, rec in records.items():
        add_validation(rec, {n: t[m] for n, t in vterms.items()}, vcounts[m])
        rec.update(members[m].val_metrics(member_of(ts, m)))

"""The epoch loop of a sweep: `train.loop.run_loop`'s bookkeeping, once per member.

Minibatch orders are drawn as `run_loop` draws them (``default_rng([seed,
epoch])``), once for all members (shared order) or once per member. Early
stopping and reduce-on-plateau act on each member's own history; a stopped
member's state is held (its update masked) while the others go on.
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

from ..train.fit import FitResult, loop_config
from ..train.history import add_scvi_tools_names
from ..train.loop import LoopState, nonfinite_error, epoch_means
from ..train.state import TrainState, inject_state
from ._step import masked_jit, programs


@dataclass
class Member:
    """One member's fixed inputs: its run's config, task, split and seed."""

    config: object
    task: object
    train_idx: np.ndarray
    val_idx: np.ndarray
    seed: int


def stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)


def member_of(tree, k: int):
    return jax.tree_util.tree_map(lambda a: a[k], tree)


def initial_state(members: list[Member], tx, lr: np.ndarray, wd: np.ndarray) -> TrainState:
    """K train states stacked, each as `fit` starts one (key PRNGKey(seed))."""
    params = stack([m.task.params for m in members])
    opt_state = jax.vmap(tx.init)(params)
    hyper = inject_state(opt_state).hyperparams
    hyper["learning_rate"] = jnp.asarray(lr)
    hyper["weight_decay"] = jnp.asarray(wd)
    k = len(members)
    return TrainState(params=params, state=stack([m.task.state for m in members]),
                      opt_state=opt_state,
                      rng=jnp.stack([jax.random.PRNGKey(m.seed) for m in members]),
                      step=jnp.zeros((k,), jnp.int32), epoch=jnp.zeros((k,), jnp.int32))


def _lrs(ts) -> np.ndarray:
    return np.asarray(inject_state(ts.opt_state).hyperparams["learning_rate"], np.float64)


def _set_lrs(ts, lrs: np.ndarray):
    inject_state(ts.opt_state).hyperparams["learning_rate"] = jnp.asarray(lrs, jnp.float32)
    return ts


class Orders:
    """Each epoch's rows, as `run_loop` draws them, for every member."""

    def __init__(self, source, members: list[Member], *, shared: bool, batch_size: int):
        self.source, self.members, self.shared, self.b = source, members, shared, batch_size

    def _each(self):
        return self.members[:1] if self.shared else self.members

    def _stack(self, parts):
        if any(p is None for p in parts):
            return None
        return parts[0] if self.shared else np.stack(parts, axis=1)  # (n_steps, K, B)

    def train(self, epoch: int):
        rows, labs = [], []
        for m in self._each():
            rng = np.random.default_rng([m.config.seed, epoch])
            r = self.source.order(rng, m.train_idx, self.b)
            lab = None
            if m.task.labelled is not None:
                lab = self.source.labelled_order(
                    rng, m.task.labelled(rng, train_idx=m.train_idx), r.shape[0], self.b)
            rows.append(r)
            labs.append(lab)
        return self._stack(rows), self._stack(labs)

    def validation(self, epoch: int):
        rows, labs = [], []
        for m in self._each():
            r = self.source.order(None, m.val_idx, self.b, shuffle=False)
            lab = None
            if m.task.val_labelled is not None:
                vl = m.task.val_labelled(m.val_idx)
                lab = self.source.labelled_order(
                    np.random.default_rng([m.config.seed, epoch, 1]),
                    vl if len(vl) else m.val_idx, r.shape[0], self.b)
            rows.append(r)
            labs.append(lab)
        return self._stack(rows), self._stack(labs)


def run(members: list[Member], ts: TrainState, hp: dict, *, source, shared: bool,  # noqa: PLR0913 (keyword-only; train_many builds them)
        schedule_mode: str, progress_bar: bool) -> list[FitResult]:
    """Train every member to max_epochs or its early stop; one `FitResult` each."""
    first = members[0]
    config, task = first.config, first.task
    cfg = loop_config(config)
    k = len(members)
    loops = [LoopState() for _ in members]
    active = np.ones(k, bool)
    check_every = cfg.check_val_every_n_epoch
    if check_every is None and (cfg.early_stopping or cfg.reduce_lr_on_plateau):
        check_every = 1
    has_val = len(first.val_idx) > 0
    orders = Orders(source, members, shared=shared, batch_size=cfg.batch_size)
    compiled = partial(_programs, source, task, config, schedule_mode, shared)
    bar = tqdm(range(cfg.max_epochs), desc=f"Training {k} models",
               disable=not progress_bar, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        rows, lab_rows = orders.train(epoch)
        prog = compiled(rows, lab_rows)
        new, bad, (terms, counts, klw) = prog.epoch(ts, hp, source.cells, jnp.asarray(rows),
                                                    None if lab_rows is None else
                                                    jnp.asarray(lab_rows))
        bad = np.asarray(bad)
        failed = active & (bad >= 0) & (cfg.on_nonfinite == "raise")
        # as run_loop: a member whose loss went non-finite keeps its last finite
        # state (without the epoch counted) and stops; the others go on
        done = active & ~failed
        new = new.replace(epoch=jnp.where(jnp.asarray(done), new.epoch + 1, new.epoch))
        ts = new if active.all() else masked_jit(jnp.asarray(active), new, ts)
        terms = {n: np.asarray(v) for n, v in terms.items()}
        counts, klw = np.asarray(counts), np.asarray(klw)
        for m in np.flatnonzero(failed):
            err = nonfinite_error(member_of(ts, m), int(bad[m]),
                                   {n: v[:, m] for n, v in terms.items()}, epoch)
            warnings.warn(f"member {m} (seed {members[m].seed}) stopped: {err}",
                          RuntimeWarning, stacklevel=3)
            loops[m].stopped_early = True
        active &= ~failed
        records = {}
        lrs = _lrs(ts)
        for m in np.flatnonzero(done):
            rec = {"epoch": epoch}
            rec.update({f"{n}_train": v for n, v in
                        epoch_means({n: t[:, m] for n, t in terms.items()},
                                    counts[:, m]).items()})
            rec["train_loss"] = rec.pop("loss_train")
            rec["kl_weight"] = float(klw[-1, m])
            rec["lr"] = float(lrs[m])
            records[m] = rec
        if has_val and check_every and (epoch + 1) % check_every == 0 and done.any():
            _validate(ts, hp, members, records, orders.validation(epoch), compiled,
                      source.cells)
        seconds = time.perf_counter() - t0
        for m, rec in records.items():
            add_scvi_tools_names(rec)  # as train()'s loop records it
            rec["epoch_seconds"] = seconds
            loops[m].history.append(rec)
            if cfg.reduce_lr_on_plateau and cfg.lr_scheduler_metric in rec:
                lrs[m] = _plateau(loops[m], rec[cfg.lr_scheduler_metric], lrs[m], cfg)
            stop = False
            if cfg.early_stopping and cfg.early_stopping_monitor in rec:
                loop, metric = loops[m], rec[cfg.early_stopping_monitor]
                if metric < loop.best - cfg.early_stopping_min_delta:
                    loop.best, loop.bad_epochs = metric, 0
                else:
                    loop.bad_epochs += 1
                    stop = loop.bad_epochs >= cfg.early_stopping_patience
            loops[m].stopped_early = stop
            if stop:
                active[m] = False
        if cfg.reduce_lr_on_plateau:
            ts = _set_lrs(ts, lrs)
        bar.set_postfix(active=int(active.sum()))
        if not active.any():
            break
    bar.close()
    return [FitResult(member_of(ts, m), loops[m], mem.train_idx, mem.val_idx, None,
                      source.device_bytes()) for m, mem in enumerate(members)]


def _programs(source, task, config, schedule_mode, shared, rows, lab_rows):
    if not source.dense:  # the list of non-zeros grows to the fullest minibatch
        from ..train.sources import grown_cap
        source.k_cap = grown_cap(source.k_cap, source.row_nnz, rows, lab_rows)
    return programs(task, config, schedule_mode=schedule_mode, shared=shared,
                    dense=source.dense, n_genes=source.n_genes, k_cap=source.k_cap)


def _validate(ts, hp, members, records, orders, compiled, cells):
    """Each active member's validation columns, into its record."""
    rows, lab_rows = orders
    terms, counts, _ = compiled(rows, lab_rows).validate(ts, hp, cells, jnp.asarray(rows),
                                     None if lab_rows is None else jnp.asarray(lab_rows))
    terms = {n: np.asarray(v) for n, v in terms.items()}
    counts = np.asarray(counts)
    for m, rec in records.items():
        v = epoch_means({n: t[:, m] for n, t in terms.items()}, counts[:, m])
        rec.update({f"{n}_validation": val for n, val in v.items()})
        rec["validation_loss"] = rec.pop("loss_validation")
        task = members[m].task
        if task.val_metrics is not None:
            tm = member_of(ts, m)
            rec.update(task.val_metrics({"params": tm.params, **tm.state},
                                        members[m].val_idx, None))


def _plateau(loop: LoopState, metric: float, lr: float, cfg) -> float:
    """`train.loop._plateau` (torch's ReduceLROnPlateau, mode 'min', absolute
    threshold) on one member's learning rate; returns the new rate."""
    if metric < loop.lr_best - cfg.lr_threshold:
        loop.lr_best, loop.lr_bad_epochs = metric, 0
    else:
        loop.lr_bad_epochs += 1
    if loop.lr_bad_epochs > cfg.lr_patience:
        new = max(lr * cfg.lr_factor, cfg.lr_min)
        loop.lr_bad_epochs = 0
        if lr - new > 1e-8:
            return new
    return lr

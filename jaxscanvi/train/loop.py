"""The training loop: epochs, validation, early stopping, LR plateau, history."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ..data.batch import Batch
from ..errors import InputError, NonFiniteLossError
from .history import add_scvi_tools_names
from .orders import epoch_orders, validation_orders
from .state import Schedule, TrainState, get_lr, set_lr


@dataclass(frozen=True)
class StepFns:
    """A train step, and the pair that runs it with deferred updates (or None).

    ``deferred`` is a scan body over (TrainState, first_bad_step, due) that
    applies each step's update at the start of the next one; ``finish``
    applies the last. A scan of ``deferred`` then ``finish`` computes what a
    scan of ``step`` does. Calling it calls ``step``, so it stands wherever
    a plain scan body does; a frozen dataclass rather than a NamedTuple
    because `jax.jit` and `lax.scan` keep weak references to what they trace.
    ``key``: a text naming the step in every process (`compile_cache.exported`)."""

    step: Callable
    deferred: Callable | None = None
    finish: Callable | None = None
    key: str | None = field(default=None, compare=False)

    def __call__(self, carry, batch):
        return self.step(carry, batch)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    on_nonfinite: str = "raise",
    state_mask=None,
    pending: Callable | None = None,
) -> StepFns:
    """One optimisation step as a scan body: (carry, batch) -> (carry, out).

    carry = (TrainState, first_bad_step). A step whose loss is not finite
    changes nothing; with "raise", every later step of the epoch is skipped
    too, so the state stays at the last finite parameters. ``state_mask``
    (bools like the mutable state) holds the leaves marked False fixed, e.g.
    frozen batch-norm running statistics after query surgery.

    With ``pending`` (``state.pending_update``: (opt_state, params) -> params,
    the update ``tx`` derives from its state), the result also carries the
    deferred pair (see `StepFns`).
    """
    if state_mask is not None:
        state_mask = jax.tree_util.tree_map(lambda m: np.asarray(m, bool), state_mask)

    def body(ts, bad, params, batch):
        """Loss and gradient at ``params``; returns what a step keeps and emits."""
        kl_w = schedule(ts.epoch, ts.step)
        key = jax.random.fold_in(ts.rng, ts.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, ts.state, batch, key, kl_w, step=ts.step
        )
        updates, opt_state = tx.update(grads, ts.opt_state, params)
        finite = jnp.isfinite(loss)
        ok = finite if on_nonfinite == "skip_step" else finite & (bad < 0)

        def pick(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = aux.state
        if state_mask is not None:
            new_state = jax.tree_util.tree_map(
                lambda a, b, m: a if m.all() else jnp.where(m, a, b),
                new_state,
                ts.state,
                state_mask,
            )
        new_ts = ts.replace(
            opt_state=pick(opt_state, ts.opt_state),
            state=pick(new_state, ts.state),
            step=ts.step + 1,
        )
        bad = jnp.where(~finite & (bad < 0), ts.step, bad)
        main = batch if isinstance(batch, Batch) else batch[0]
        # a skipped step counts no cells, so epoch means cover the steps taken
        out = (aux.terms, jnp.where(finite, main.weight.sum(), 0.0), kl_w)
        return new_ts, bad, ok, updates, out

    def step(carry, batch):
        ts, bad = carry
        new_ts, bad, ok, updates, out = body(ts, bad, ts.params, batch)
        params = optax.apply_updates(ts.params, updates)
        params = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), params, ts.params)
        return (new_ts.replace(params=params), bad), out

    if pending is None:
        return StepFns(step)
    return StepFns(step, *_deferred_pair(body, pending))


def _deferred_pair(body: Callable, pending: Callable) -> tuple[Callable, Callable]:
    """`StepFns`' ``deferred`` and ``finish`` around ``body``: each step first applies
    the update (``pending``) its predecessor left in the optimiser state, if ``due``."""

    def caught_up(ts, due):
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(due, a, b), pending(ts.opt_state, ts.params), ts.params
        )

    def deferred(carry, batch):
        ts, bad, due = carry
        params = caught_up(ts, due)
        # this step's update is dropped here and taken from its state next step
        new_ts, bad, ok, _, out = body(ts, bad, params, batch)
        return (new_ts.replace(params=params), bad, ok), out

    def finish(carry):
        ts, bad, due = carry
        return ts.replace(params=caught_up(ts, due)), bad

    return deferred, finish


def make_eval_step(loss_fn: Callable, schedule: Schedule) -> Callable:
    """Evaluation (no update) as a scan body."""

    def step(carry, batch):
        ts = carry
        kl_w = schedule(ts.epoch, ts.step)
        key = jax.random.fold_in(jax.random.fold_in(ts.rng, 0x7A11), ts.step)
        _, aux = loss_fn(ts.params, ts.state, batch, key, kl_w, step=ts.step)
        main = batch if isinstance(batch, Batch) else batch[0]
        return ts, (aux.terms, main.weight.sum(), kl_w)

    return step


def epoch_means(terms: dict, counts) -> dict[str, float]:
    """Cell-weighted means of per-step term means."""
    counts = np.asarray(counts, np.float64)
    total = max(counts.sum(), 1.0)
    # where(): a skipped step's NaN terms times a zero count would still be NaN
    return {
        k: float(np.where(counts > 0, np.asarray(v, np.float64), 0.0).dot(counts) / total)
        for k, v in terms.items()
    }


@dataclass
class FitConfig:
    max_epochs: int
    batch_size: int
    seed: int
    check_val_every_n_epoch: int | None = None
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    on_nonfinite: str = "raise"
    progress_bar: bool = True
    n_samples_per_label: int | None = None


@dataclass
class LoopState:
    """Host-side bookkeeping that must survive a resume."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: float = math.inf
    bad_epochs: int = 0
    lr_best: float = math.inf
    lr_bad_epochs: int = 0
    stopped_early: bool = False


def run_loop(  # noqa: PLR0913 - the loop's parts, keyword-only
    ts: TrainState,
    *,
    cfg: FitConfig,
    source,
    train_step: Callable,
    eval_step: Callable,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    labelled_idx: Callable[[np.random.Generator], np.ndarray] | None = None,
    val_labelled: Callable[[], np.ndarray] | None = None,
    loop: LoopState | None = None,
    on_epoch_end: Callable[[TrainState, LoopState], None] | None = None,
    extra_val_metrics: Callable[[TrainState], dict] | None = None,
) -> tuple[TrainState, LoopState]:
    """Train until max_epochs (or early stop). Epochs already in ``ts.epoch`` are skipped."""
    loop = loop or LoopState()
    start = int(ts.epoch)
    has_val = len(val_idx) > 0
    bar = tqdm(
        range(start, cfg.max_epochs),
        initial=start,
        total=cfg.max_epochs,
        desc="Training",
        disable=not cfg.progress_bar,
        leave=False,
    )
    # the next epoch's orders, drawn an epoch early: the host and stream
    # sources build its first chunk while this epoch's last one computes
    ahead = None
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            rng, rows, lab_rows = ahead or epoch_orders(source, cfg, epoch, train_idx, labelled_idx)
            ahead = None
            if epoch + 1 < cfg.max_epochs:  # each epoch's rng is its own: no other draw moves
                ahead = epoch_orders(source, cfg, epoch + 1, train_idx, labelled_idx)
            carry = (ts, jax.device_put(np.int32(-1)))
            (ts_new, bad), (terms, counts, klw) = source.run_epoch(
                train_step, carry, rows, lab_rows, then=ahead and ahead[1:]
            )
            bad = int(bad)
            if bad >= 0 and cfg.on_nonfinite == "raise":
                raise NonFiniteEpoch(nonfinite_message(ts_new, bad, terms, epoch), ts_new, loop)
            ts = ts_new.replace(epoch=jax.device_put(np.int32(epoch + 1)))  # no eager add
            record = train_record(epoch, terms, counts, klw, get_lr(ts.opt_state))
            if has_val and validates(cfg, epoch):
                vrows, vlab = validation_orders(source, cfg, epoch, rng, val_idx, val_labelled)
                _, (vterms, vcounts, _) = source.run_epoch(eval_step, ts, vrows, vlab)
                add_validation(record, vterms, vcounts)
                if extra_val_metrics is not None:
                    record.update(extra_val_metrics(ts))
            close_record(loop, record, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{record['train_loss']:.4g}")
            lr = get_lr(ts.opt_state)
            new_lr, stop = after_epoch(loop, record, lr, cfg)
            if new_lr != lr:
                ts = ts.replace(opt_state=set_lr(ts.opt_state, new_lr))
            if on_epoch_end is not None:
                on_epoch_end(ts, loop)
            if stop:
                break
    finally:  # a prepared epoch that never runs (early stop, error) is dropped
        source.close()
    bar.close()
    return ts, loop


# The pieces of an epoch's bookkeeping, each on one model's LoopState: run_loop
# uses them, and a sweep (`jaxscanvi.sweep`) uses them for each of its members
# (with `epoch_orders` and `validation_orders`, from `orders`).


def validation_every(cfg: FitConfig) -> int | None:
    """Epochs between validations: every epoch when something monitors them."""
    every = cfg.check_val_every_n_epoch
    if every is None and (cfg.early_stopping or cfg.reduce_lr_on_plateau):
        every = 1
    return every


def validates(cfg: FitConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a validation pass."""
    every = validation_every(cfg)
    return bool(every) and (epoch + 1) % every == 0


def train_record(epoch: int, terms: dict, counts, klw, lr: float) -> dict:
    """An epoch's history record from its per-step outputs (one model's)."""
    record: dict[str, float] = {"epoch": epoch}
    record.update({f"{k}_train": v for k, v in epoch_means(terms, counts).items()})
    record["train_loss"] = record.pop("loss_train")
    record["kl_weight"] = float(np.asarray(klw)[-1])
    record["lr"] = float(lr)
    return record


def add_validation(record: dict, terms: dict, counts) -> None:
    """A validation pass's means into ``record``."""
    v = epoch_means(terms, counts)
    record.update({f"{k}_validation": val for k, val in v.items()})
    record["validation_loss"] = record.pop("loss_validation")


def close_record(loop: LoopState, record: dict, seconds: float) -> None:
    """``record`` with scvi-tools' names and its time, appended to the history."""
    add_scvi_tools_names(record)
    record["epoch_seconds"] = seconds
    loop.history.append(record)


def after_epoch(loop: LoopState, record: dict, lr: float, cfg: FitConfig) -> tuple[float, bool]:
    """Reduce-on-plateau and early stopping on ``record``: (the new learning
    rate, whether training stops). Updates ``loop``."""
    if cfg.reduce_lr_on_plateau and cfg.lr_scheduler_metric in record:
        lr = plateau(loop, record[cfg.lr_scheduler_metric], lr, cfg)
    stop = False
    _check_monitor(cfg, record)
    if cfg.early_stopping and cfg.early_stopping_monitor in record:
        m = record[cfg.early_stopping_monitor]
        if m < loop.best - cfg.early_stopping_min_delta:
            loop.best, loop.bad_epochs = m, 0
        else:
            loop.bad_epochs += 1
            stop = loop.bad_epochs >= cfg.early_stopping_patience
    loop.stopped_early = stop
    return lr, stop


def _check_monitor(cfg: FitConfig, record: dict) -> None:
    """A monitored metric missing from a validation epoch's record would never
    stop training or lower the learning rate: refuse it at the first one."""
    if not any(k.endswith("_validation") for k in record):
        return
    for on, name, arg in (
        (cfg.early_stopping, cfg.early_stopping_monitor, "early_stopping_monitor"),
        (cfg.reduce_lr_on_plateau, cfg.lr_scheduler_metric, "plan_kwargs['lr_scheduler_metric']"),
    ):
        if on and name not in record:
            metrics = sorted(k for k in record if "validation" in k)
            raise InputError(
                arg, name, "is not a metric of this training's history", f"pass one of {metrics}"
            )


def plateau(loop: LoopState, metric: float, lr: float, cfg: FitConfig) -> float:
    """torch ReduceLROnPlateau(mode='min', threshold_mode='abs'): the new rate."""
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


class NonFiniteEpoch(NonFiniteLossError):
    """`run_loop`'s error for a non-finite epoch; always set: ``train_state``, after
    the last finite step (the epoch not counted), and ``loop_state``, the epochs before."""

    def __init__(self, message: str, train_state: TrainState, loop_state: LoopState):
        super().__init__(message)
        self.train_state = train_state
        self.loop_state = loop_state

    def __reduce__(self):
        return type(self), (str(self), self.train_state, self.loop_state)


def nonfinite_error(ts, bad_step, terms, epoch) -> NonFiniteLossError:
    """The error for an epoch whose step ``bad_step`` went non-finite, naming the terms."""
    return NonFiniteLossError(nonfinite_message(ts, bad_step, terms, epoch))


def nonfinite_message(ts, bad_step, terms, epoch) -> str:
    """What went non-finite at step ``bad_step`` (global) of epoch ``epoch``, and the fixes."""
    first = int(bad_step) - (int(ts.step) - len(np.asarray(terms["loss"])))
    first = min(max(first, 0), len(np.asarray(terms["loss"])) - 1)
    names = [k for k, v in terms.items() if not np.isfinite(np.asarray(v)[first])]
    culprit = [k for k in names if k not in ("loss", "elbo")] or names
    return (
        f"non-finite loss at epoch {epoch}, step {first} of the epoch (global step "
        f"{int(bad_step)}): term(s) {culprit} became "
        f"{[float(np.asarray(terms[k])[first]) for k in culprit]}. The model keeps the "
        "parameters of the last finite step. Fix: lower the learning rate "
        "(plan_kwargs={'lr': ...}), check the input counts, or pass "
        "on_nonfinite='skip_step' to skip such steps"
    )

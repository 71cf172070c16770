"""`fit`: one training run, from a `TrainConfig` and what the model brings (`Task`).

It splits the cells, builds (or reuses) the compiled step, the train state
and the minibatch source, resumes from a checkpoint if asked, and runs the
epoch loop. It knows nothing of AnnData or of the model classes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np

from .. import backend, distributed, lock
from ..compile_cache import TrainStepKey, functions
from ..data.cells import CellData
from ..data.split import split_indices
from ..errors import InputError, NonFiniteLossError
from ..nn import prng
from . import checkpoint
from .config import TrainConfig
from .loop import (
    FitConfig,
    LoopState,
    NonFiniteEpoch,
    StepFns,
    make_eval_step,
    make_train_step,
    run_loop,
)
from .parallel import DataParallel, to_default_device
from .sources import check_source, make_source
from .state import TrainState, host_init, make_optimizer, mask_key, pending_update


class Task(NamedTuple):
    """What a model brings to training."""

    cells: CellData
    params: Any
    state: Any
    # make_loss(train=...) -> loss(params, state, batch, rng, kl_weight, step=...)
    make_loss: Callable[..., Callable]
    # equal specs make equal losses: with the config, the compiled step's cache key
    loss_spec: Hashable
    # model_class, config, registry: what a checkpoint must match to be resumed
    owner: dict
    # (params mask, state mask): what training may change; None: everything
    freeze: tuple | None = None
    # labelled(rng, train_idx) -> the labelled cells each epoch pairs minibatches with
    labelled: Callable | None = None
    # val_labelled(val_idx) -> labelled validation cells
    val_labelled: Callable | None = None
    # val_metrics(variables, val_idx, parallel) -> extra history columns
    val_metrics: Callable | None = None


@dataclass(frozen=True)
class FitPlan:
    """What one `train()` call fits: its settings and what the model brings.

    A model's ``fit_plan(**train_kwargs)`` returns it and ``_train`` fits it;
    ``calibrate`` is scANVI's ``train(calibrate=...)``, which acts after the fit.
    """

    config: TrainConfig
    task: Task
    calibrate: bool = False


class FitResult(NamedTuple):
    train_state: TrainState
    loop: LoopState
    train_idx: np.ndarray
    val_idx: np.ndarray
    parallel: DataParallel | None  # the devices inference should use afterwards
    data_bytes_per_device: int = 0  # cells resident on the fullest device (0: fed per step)


class FitFailed(NonFiniteLossError):
    """`fit`'s error when the loss went non-finite: ``result`` (always set) is the
    fit up to the last finite step, what the model keeps."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result

    def __reduce__(self):
        return type(self), (str(self), self.result)


def step_fns(config: TrainConfig, task: Task):
    """(optimizer, train StepFns, eval step), compiled once per specification."""
    masks = task.freeze if task.freeze is not None else (None, None)
    numerics = backend.current(config.precision)
    spec = TrainStepKey(
        loss_spec=task.loss_spec,
        plan=config.plan,
        on_nonfinite=config.on_nonfinite,
        loss_terms=config.loss_terms,
        loss_weights=config.loss_weights,
        params_mask=mask_key(masks[0]),
        state_mask=mask_key(masks[1]),
        numerics=numerics,
    )

    def build():
        plan = config.plan
        eps = plan.get("eps", 0.01)
        decay, decoupled = plan.get("weight_decay", 1e-6), plan.get("optimizer") == "AdamW"
        tx = make_optimizer(
            plan.get("lr", 1e-3), eps, decay, masks[0], decoupled=decoupled, clip=_clip(plan)
        )
        pending = (
            partial(
                pending_update,
                eps=eps,
                trainable_mask=masks[0],
                decoupled_decay=decay if decoupled else 0.0,
            )
            if numerics.kernels.deferred_adam
            else None
        )
        step = make_train_step(
            task.make_loss(train=True), tx, plan.schedule, config.on_nonfinite, masks[1], pending
        )
        evaluate = make_eval_step(task.make_loss(train=False), plan.schedule)
        # the spec names the steps in any process: their epochs can be exported
        text = None if " at 0x" in repr(spec) else repr(spec)
        ev = StepFns(backend.traced(evaluate, numerics), key=text and "eval " + text)
        return tx, pinned(step, numerics, text and "train " + text), ev

    return functions.get(spec, build)


def pinned(fns: StepFns, numerics: backend.Numerics, key: str | None = None) -> StepFns:
    """A train step and its deferred pair, each traced under ``numerics``."""

    def pin(f: Callable | None) -> Callable | None:
        return None if f is None else backend.traced(f, numerics)

    step = backend.traced(fns.step, numerics)
    return StepFns(step, pin(fns.deferred), pin(fns.finish), key)


def data_shards(config: TrainConfig, n_obs: int) -> np.ndarray | None:
    """Bounds of the slices each global minibatch is drawn from (None: one slice)."""
    hosts = jax.process_count()
    n = hosts if config.data_shards is None else config.data_shards
    if hosts > 1 and n != hosts:
        raise InputError(
            "data_shards",
            n,
            f"this run has {hosts} processes, each drawing from its own slice of the cells",
            f"leave data_shards unset (or pass {hosts})",
        )
    if n == 1:
        return None
    distributed.check_batch_size(config.batch_size, n, jax.local_device_count() if hosts > 1 else 1)
    return distributed.shard_bounds(n_obs, n)


def check(config: TrainConfig, cells: CellData):
    """What `TrainConfig` cannot check alone: the devices, the data's slices and
    source, the split. Returns (devices, slice bounds, train rows, validation rows)."""
    parallel = DataParallel.over(config.devices)
    shards = data_shards(config, cells.n_obs)
    check_source(config.data_source, cells)
    split = split_indices(
        cells.n_obs,
        config.train_size,
        config.validation_size,
        config.seed,
        shuffle=config.shuffle_set_split,
    )
    return parallel, shards, *split


def fit(config: TrainConfig, task: Task) -> FitResult:
    """Train ``task`` as ``config`` says. On a non-finite loss it raises
    `FitFailed`, whose ``result`` holds the last good state.

    The checkpoint folder, if any, is locked for the whole run (`lock`): a
    second run writing to it fails at once instead of mixing its files in."""
    # process 0 writes; a refusal there stops every process (`agree`)
    held = distributed.agree(
        lambda: (
            lock.acquire(config.checkpoint_dir, "training checkpoints")
            if config.checkpoint_dir is not None and distributed.is_main()
            else None
        )
    )
    try:
        return _fit(config, task, held)
    finally:
        if held is not None:
            lock.release(held)


def _fit(config: TrainConfig, task: Task, held) -> FitResult:
    cells = task.cells
    parallel, shards, train_idx, val_idx = check(config, cells)
    tx, train_step, eval_step = step_fns(config, task)
    # key and counters from numpy: jax.random.PRNGKey and jnp.asarray would each
    # compile a small program
    rng = prng.host_key(config.seed) if prng.host_keys_ok() else jax.random.PRNGKey(config.seed)
    ts = TrainState(
        params=task.params,
        state=task.state,
        opt_state=host_init(tx, task.params),
        rng=jax.device_put(rng),
        step=jax.device_put(np.int32(0)),
        epoch=jax.device_put(np.int32(0)),
    )
    fingerprint = _fingerprint(config, cells.n_obs)
    loop = None
    if config.resume:
        restored = checkpoint.load(config.checkpoint_dir, ts, fingerprint, task.owner)
        if restored is not None:
            ts, loop = restored
    # data_shards unset on one host: the device source on n devices draws from n slices
    source = make_source(
        config.data_source,
        cells,
        config.batch_size,
        parallel=parallel,
        shards=shards,
        spread=config.data_shards is None,
    )
    # inference runs on each process's own devices
    infer = parallel if jax.process_count() == 1 else DataParallel.over("local")
    result = partial(
        FitResult,
        train_idx=train_idx,
        val_idx=val_idx,
        parallel=infer,
        data_bytes_per_device=source.device_bytes(),
    )
    try:
        ts, loop = run_loop(
            ts,
            cfg=loop_config(config),
            source=source,
            train_step=train_step,
            eval_step=eval_step,
            train_idx=train_idx,
            val_idx=val_idx,
            labelled_idx=None
            if task.labelled is None
            else partial(task.labelled, train_idx=train_idx),
            val_labelled=None if task.val_labelled is None else partial(task.val_labelled, val_idx),
            extra_val_metrics=_val_metrics(task, val_idx, infer),
            loop=loop,
            on_epoch_end=_checkpointer(config, fingerprint, task.owner, held),
        )
    except NonFiniteEpoch as err:  # the loop's: it says what to keep
        raise FitFailed(str(err), result(err.train_state, err.loop_state)) from err
    except NonFiniteLossError as err:  # from elsewhere: keep the state we started from
        raise FitFailed(str(err), result(ts, LoopState())) from err
    except Exception as err:
        lost = distributed.peer_lost(err)  # another process died: say which
        if lost is None:
            raise
        raise lost from err
    return result(ts, loop)


def loop_config(config: TrainConfig) -> FitConfig:
    """The loop's settings from a `TrainConfig` (`fit` and `jaxscanvi.sweep`)."""
    return FitConfig(
        max_epochs=config.max_epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        check_val_every_n_epoch=config.check_val_every_n_epoch,
        early_stopping=config.early_stopping,
        early_stopping_monitor=config.early_stopping_monitor,
        early_stopping_patience=config.early_stopping_patience,
        early_stopping_min_delta=config.early_stopping_min_delta,
        on_nonfinite=config.on_nonfinite,
        progress_bar=config.progress_bar,
        **dict(config.plan.plateau),
    )


def _clip(plan) -> tuple | None:
    """Lightning's gradient clipping: ("norm" | "value", threshold), or None."""
    value = plan.get("gradient_clip_val")
    return None if value is None else (plan.get("gradient_clip_algorithm", "norm"), value)


def _fingerprint(config: TrainConfig, n_obs: int) -> dict:
    """The settings a resumed run must share with the one that wrote the checkpoint."""
    return {
        "batch_size": config.batch_size,
        "seed": config.seed,
        "train_size": config.train_size,
        "validation_size": config.validation_size,
        # only when set, so older checkpoints keep resuming
        **({} if config.shuffle_set_split else {"shuffle_set_split": False}),
        "plan": repr(list(config.plan.options)),
        "schedule": repr(config.plan.schedule),
        "loss_terms": list(config.loss_term_names),
        "n_obs": n_obs,
    }


def _checkpointer(config: TrainConfig, fingerprint: dict, owner: dict, held):
    if config.checkpoint_dir is None:
        return None

    def on_epoch_end(ts, loop):
        if not distributed.is_main():  # one writer; every process can resume
            return
        lock.refresh(held)  # the run is alive: its lock must not look stale
        e = int(ts.epoch)
        if e % config.checkpoint_every == 0 or e >= config.max_epochs or loop.stopped_early:
            checkpoint.save(config.checkpoint_dir, ts, loop, fingerprint, owner)

    return on_epoch_end


def _val_metrics(task: Task, val_idx: np.ndarray, parallel):
    val_metrics = task.val_metrics
    if val_metrics is None:
        return None

    def metrics(ts):
        if jax.process_count() > 1:
            ts = to_default_device(ts)
        return val_metrics({"params": ts.params, **ts.state}, val_idx, parallel)

    return metrics

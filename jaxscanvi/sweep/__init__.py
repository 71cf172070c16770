"""Many models in one program: seeds, hyperparameter sweeps and ensembles.

`train_many` trains K models of one architecture on one AnnData: one data
pipeline, one compiled epoch program (`train()`'s, `train.chunks.scan_program`
on the device source) for all K. Members differ by seed (initialisation,
dropout and sampling noise) and by any hyperparameter that changes no shape:
``lr``, ``weight_decay``, ``max_kl_weight``, ``min_kl_weight``,
``n_epochs_kl_warmup`` (or ``n_steps_kl_warmup``), ``classification_ratio``
(scANVI) and the weight of any extra loss term (``"loss_weights.<name>"``).
These are traced, held in each member's optimiser state, so one compile
serves every member. Each comes back as an ordinary trained `SCVI` / `SCANVI`.

>>> from jaxscanvi import SCVI, sweep
>>> out = sweep.train_many(lambda seed: SCVI(adata, seed=seed), seeds=[0, 1, 2],
...                        grid={"lr": [1e-3, 3e-3], "max_kl_weight": [0.5, 1.0]},
...                        max_epochs=100, early_stopping=True)      # doctest: +SKIP
>>> out.history            # one row per member x epoch, hyperparameters as columns
>>> best = out.best("elbo_validation")                               # doctest: +SKIP

A random search is a list of members:

>>> rng = np.random.default_rng(0)                                   # doctest: +SKIP
>>> members = [{"seed": 0, "lr": 10 ** rng.uniform(-4, -2),
...             "max_kl_weight": rng.uniform(0.2, 1.0)} for _ in range(16)]
>>> out = sweep.train_many(make_model, members=members, max_epochs=50)

What equals what: member (seed s, hyperparameters h) is, to float
tolerance, ``make_model(s).train(seed=s, plan_kwargs=h, devices=1, ...)``
when ``order="per_model"`` (each member draws its split and minibatches from
its own seed, as that run does). With the default ``order="shared"`` every
member trains and validates on the same split and minibatch order, that of
``train(seed=data_seed)`` (default: the first member's seed): the member of
seed s then equals ``make_model(s)`` trained with the split and order of
``data_seed`` but the dropout and sampling noise of s, so a member with
s == data_seed equals ``train(seed=data_seed)``. A shared order gathers each
minibatch once for all members; the per-model order gathers K.

Early stopping and reduce-on-plateau act per member; a stopped member keeps
its parameters while the others go on, and the loop ends when every member
has stopped or at ``max_epochs``. A member whose loss goes non-finite (with
``on_nonfinite="raise"``) stops with its last finite parameters and a
warning, instead of ending the sweep.

Vmapped or in turn (``vectorize``): on an accelerator the epoch program runs
`jax.vmap`-ed over the K stacked train states, one step of every member at
once. On the CPU ("auto" there) the members run in turn through the same
compiled program, each as its own `train()` would: a CPU step is already
compute bound and XLA's batched matrix products run slower than its 2-D ones,
so vmapping made a CPU sweep slower than K `train()` calls (benchmarks/sweep.py).
In turn, it takes what K runs take less what they would repeat: K copies of
the data, and a compile for each distinct setting of the hyperparameters
(train() compiles its step per setting; the sweep traces them). Both ways give
the same models, to float tolerance.

Before compiling, the sweep estimates the device memory K vmapped members
need (`_memory`) and refuses a K that does not fit, naming the largest that
does; the check is the same in turn, where it over-counts. The custom training
kernels of `jaxscanvi.backend` vmap as they are: a sweep runs whatever
`train()` would run on this backend, with its optimiser (Adam or AdamW, with
gradient clipping).

When vmapping pays: K members cost K times the arithmetic, so a vmapped sweep
saves what K runs would repeat (data set-up and gathers, compilation,
dispatch) and fills a device that one model at batch 128 leaves idle. On an
accelerator that is most of a small model's step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import jax
import numpy as np
import pandas as pd

from ..errors import InputError
from ..train.config import TrainConfig
from ..train.fit import Task
from ..train.sources import make_source
from . import _members, _memory
from ._loop import Member, initial_state, run_in_turn, run_vmapped
from ._step import member_steps
from .ensemble import ensemble_calibration, ensemble_predict

__all__ = ["SweepResult", "ensemble_calibration", "ensemble_predict", "train_many"]


@dataclass
class SweepResult:
    """The trained members and their records.

    ``models[i]`` is member i; ``members`` has one row per member (its seed
    and hyperparameters); ``history`` one row per member and epoch: member,
    seed, data_seed, each swept hyperparameter as ``hp_<name>``, then the
    model's history columns; the tidy form to plot or group.
    """

    models: list
    members: pd.DataFrame
    history: pd.DataFrame

    @property
    def final(self) -> pd.DataFrame:
        """Each member's last history row: its final training and validation metrics."""
        return self.history.groupby("member", sort=True).tail(1).set_index("member")

    def best(self, metric: str = "elbo_validation"):
        """The model whose final ``metric`` is lowest."""
        if metric not in self.history:
            raise InputError(
                "metric",
                metric,
                "not a history column",
                f"pass one of {sorted(self.history.columns)}",
            )
        best = self.final[metric].idxmin()  # a label of `final`'s index: a member number
        return self.models[int(cast(int, best))]


def train_many(
    model,
    *,
    seeds=(0,),
    grid: dict | None = None,
    members: list[dict] | None = None,
    order: str = "shared",
    data_seed: int | None = None,
    memory_budget: int | None = None,
    vectorize: bool | str = "auto",
    **train_kwargs,
) -> SweepResult:
    """Train one model per seed x grid point (or per ``members`` entry) in one program.

    Parameters
    ----------
    model
        A function ``seed -> model`` (e.g. ``lambda s: SCVI(adata, seed=s)``):
        each member is built from its seed. Or a model: every member then
        starts from its parameters (e.g. a pretrained scANVI), and seeds vary
        the noise and, with ``order="per_model"``, the split and order.
    seeds, grid
        Members are every seed crossed with every combination of ``grid``
        (a dict of hyperparameter -> list of values; see the module docs).
    members
        Instead of seeds x grid: a list of dicts, each with ``seed`` and the
        hyperparameters it sets (a random search).
    order
        "shared" (default): one split and one minibatch order for all, those
        of ``train(seed=data_seed)``; "per_model": each member's own, as
        ``train(seed=its seed)``.
    data_seed
        The seed of the shared split and order (default: the first member's).
    memory_budget
        Bytes the sweep may use on the device (default: what it has free).
    vectorize
        True: every member's epoch in one `jax.vmap`-ed program; False: the
        members in turn through one compiled program (each as its `train()`
        runs); "auto" (default): vmapped on accelerators, in turn on the CPU,
        where vmapping does not pay. Both give the same models, to float
        tolerance.
    train_kwargs
        What ``model.train`` takes (``max_epochs``, ``batch_size``,
        ``plan_kwargs``, ``early_stopping``, ``loss_terms``, ...), shared by
        every member; ``seed``, checkpoints and ``data_shards`` are the
        sweep's to set.
    """
    specs, data_seed = _members_of(seeds, grid, members, order, data_seed, vectorize)
    shared = order == "shared"
    kwargs = [
        _members.train_arguments(s, train_kwargs, data_seed if shared else None) for s in specs
    ]
    models = [_build(model, s["seed"]) for s in specs]
    plans = [m.fit_plan(**kw) for m, kw in zip(models, kwargs)]
    configs = [p.config for p in plans]
    group = []
    for spec, m, plan in zip(specs, models, plans):
        _, _, train_idx, val_idx = m._check_plan(plan)  # every input error first
        group.append(Member(plan.config, plan.task, train_idx, val_idx, spec["seed"]))
    _same_program(group)
    mode = _members.schedule_mode(configs)
    first = group[0]
    has_ratio = "classification_ratio" in getattr(first.task.make_loss(train=True), "keywords", {})
    hp = _members.hyper_arrays(configs, has_ratio=has_ratio)
    _fits(first, len(group), first.task.cells, shared=shared, budget=memory_budget)
    source = make_source("device", first.task.cells, first.config.batch_size)
    tx, *steps = member_steps(first.task, first.config, schedule_mode=mode)
    results = _run(
        group,
        tx,
        hp,
        source=source,
        steps=steps,
        shared=shared,
        vectorize=vectorize,
        progress_bar=kwargs[0].get("progress_bar", False),
    )
    for m, plan, result in zip(models, plans, results):
        _finish(m, plan, result)
    return _result(models, specs, kwargs)


def _members_of(seeds, grid, members, order: str, data_seed, vectorize):
    """`train_many`'s checks, in order, then (each member's seed and
    hyperparameters, the seed of the shared order or None)."""
    if order not in ("shared", "per_model"):
        raise InputError(
            "order",
            order,
            "not 'shared' or 'per_model'",
            "pass order='shared' (one minibatch order) or 'per_model'",
        )
    if vectorize not in (True, False, "auto"):
        raise InputError(
            "vectorize",
            vectorize,
            "not True, False or 'auto'",
            "pass vectorize='auto' (vmapped on accelerators, in turn on the CPU), True or False",
        )
    specs = _members.expand(seeds, grid, members)
    if order == "shared":
        data_seed = specs[0]["seed"] if data_seed is None else data_seed
    elif data_seed is not None:
        raise InputError(
            "data_seed",
            data_seed,
            "applies to order='shared' only",
            "leave data_seed out, or pass order='shared'",
        )
    return specs, data_seed


def _run(group, tx, hp, *, source, steps, shared: bool, vectorize, progress_bar: bool) -> list:
    """Every member's `FitResult`: vmapped, or in turn on the CPU ("auto")."""
    if vectorize == "auto":
        vectorize = jax.default_backend() != "cpu"
    if vectorize:
        results = run_vmapped(
            group,
            initial_state(group, tx, hp),
            source=source,
            steps=steps,
            shared=shared,
            progress_bar=progress_bar,
        )
    else:
        results = run_in_turn(group, tx, hp, source=source, steps=steps)
    return results


def _build(model, seed: int):
    from ..model._base import BaseModel

    if isinstance(model, BaseModel):
        return model._twin()
    if not callable(model):
        raise InputError(
            "model",
            type(model).__name__,
            "not a model nor a function seed -> model",
            "pass e.g. lambda seed: SCVI(adata, seed=seed)",
        )
    built = model(seed)
    if not isinstance(built, BaseModel):
        raise InputError(
            "model",
            type(built).__name__,
            "the function returned no model",
            "return an SCVI or SCANVI built from the seed",
        )
    return built


def _finish(model, plan, result) -> None:
    """Hand ``model`` its member's ``result`` as the fit of ``plan``, so that what
    the model does after fitting (scANVI: calibration, reference statistics) runs."""
    model._train(plan, result)


def _same_program(group: list[Member]) -> None:
    """Members must share every shape and every setting that is not traced."""
    ref = group[0].task
    tree = jax.tree_util.tree_structure(ref.params)
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(ref.params)]
    for m in (member.task for member in group[1:]):
        if (
            jax.tree_util.tree_structure(m.params) != tree
            or [np.shape(x) for x in jax.tree_util.tree_leaves(m.params)] != shapes
        ):
            raise InputError(
                "model",
                "members of different architectures",
                "a sweep vmaps one architecture",
                "build every member with the same network sizes and data",
            )
        if m.loss_spec != ref.loss_spec:
            raise InputError(
                "model",
                "members with different losses",
                "a sweep compiles one loss",
                "build every member alike",
            )


def _fits(first: Member, k: int, cells, *, shared: bool, budget: int | None) -> None:
    task = first.task
    B, G = first.config.batch_size, cells.n_vars
    dense = cells.n_obs * G * 4 <= 1 << 30
    data = cells.n_obs * G * 4 if dense else cells.X.data.nbytes * 2 + cells.X.indptr.nbytes
    paired = task.labelled is not None
    budget = _memory.available_bytes() if budget is None else int(budget)
    _memory.check_fits(
        k,
        budget,
        lambda n: _memory.estimate(
            task.params,
            task.state,
            n_members=n,
            batch_size=B,
            n_genes=G,
            data_bytes=data,
            shared=shared,
            paired=paired,
        ),
    )


def _result(models, specs, kwargs) -> SweepResult:
    hyper = sorted({k for s in specs for k in s if k != "seed"})
    rows = [
        {
            "member": i,
            "seed": spec["seed"],
            "data_seed": kw["seed"],
            **{k: spec.get(k) for k in hyper},
        }
        for i, (spec, kw) in enumerate(zip(specs, kwargs))
    ]
    members = pd.DataFrame(rows)
    histories = [m.history.to_frame().reset_index() for m in models]
    history = pd.concat(histories, ignore_index=True)
    which = np.repeat(np.arange(len(models)), [len(h) for h in histories])
    # "hp_": the history has its own "lr" (the rate at each epoch)
    front = members.iloc[which].reset_index(drop=True).rename(columns={k: f"hp_{k}" for k in hyper})
    history = pd.concat([front, history], axis=1)
    return SweepResult(models, members.set_index("member"), history)

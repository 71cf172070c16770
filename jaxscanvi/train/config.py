"""What one `train()` call asks for, checked once and frozen: `TrainConfig`.

`train()`'s keywords are `TrainConfig`'s fields, by name; ``plan_kwargs``
becomes a `Plan`. Every check that needs no data runs here, before anything
is compiled; `fit.fit` checks what depends on the cells and the devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .. import backend
from ..errors import InputError, check_positive_int
from .compat import translate
from .state import KLSchedule

PLAN_KEYS = {
    "lr",
    "eps",
    "weight_decay",
    "n_epochs_kl_warmup",
    "n_steps_kl_warmup",
    "max_kl_weight",
    "min_kl_weight",
    "reduce_lr_on_plateau",
    "lr_factor",
    "lr_patience",
    "lr_threshold",
    "lr_min",
    "lr_scheduler_metric",
    "classification_ratio",
    "objective",
    "sparse_likelihood",
    "optimizer",
    "gradient_clip_val",
    "gradient_clip_algorithm",
}
OPTIMIZERS = ("Adam", "AdamW")
_SCHEDULE_KEYS = ("n_epochs_kl_warmup", "n_steps_kl_warmup", "max_kl_weight", "min_kl_weight")
_PLATEAU_KEYS = (
    "reduce_lr_on_plateau",
    "lr_factor",
    "lr_patience",
    "lr_threshold",
    "lr_min",
    "lr_scheduler_metric",
)


def max_epochs_heuristic(n_obs: int, epochs_cap: int = 400, decay_at_n_obs: int = 20_000) -> int:
    """scvi-tools' default: 400 epochs up to 20k cells, then fewer."""
    return max(min(round((decay_at_n_obs / n_obs) * epochs_cap), epochs_cap), 1)


@dataclass(frozen=True)
class Plan:
    """``plan_kwargs``, split by who reads them.

    ``options``: the optimiser's and the loss's (lr, eps, weight_decay,
    objective, ...), as sorted (name, value) pairs; ``schedule``: the KL
    warm-up; ``plateau``: the reduce-on-plateau settings the loop reads.
    """

    options: tuple = ()
    schedule: KLSchedule = KLSchedule()  # noqa: RUF009 - frozen: one shared default is safe
    plateau: tuple = ()

    @classmethod
    def parse(cls, plan_kwargs: dict | None, defaults: dict | None = None) -> Plan:
        unknown = set(plan_kwargs or {}) - PLAN_KEYS
        if unknown:
            raise InputError(
                "plan_kwargs",
                sorted(unknown),
                "unknown training-plan options",
                f"use only {sorted(PLAN_KEYS)}",
            )
        plan = {**(defaults or {}), **(plan_kwargs or {})}
        lr = plan.get("lr", 1e-3)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise InputError(
                "plan_kwargs['lr']",
                lr,
                "must be a positive number",
                "pass e.g. plan_kwargs={'lr': 1e-3}",
            )
        optimizer = plan.get("optimizer", "Adam")
        if optimizer not in OPTIMIZERS:
            raise InputError(
                "plan_kwargs['optimizer']",
                optimizer,
                "not an optimiser jaxscanvi has",
                "pass 'Adam' (default: L2 weight decay, "
                "torch.optim.Adam) or 'AdamW' (decoupled weight decay); "
                "'Custom' optimizer_creator functions are torch-only",
            )
        schedule = KLSchedule(**{k: plan.pop(k) for k in _SCHEDULE_KEYS if k in plan})
        plateau = {k: plan.pop(k) for k in _PLATEAU_KEYS if k in plan}
        return cls(tuple(sorted(plan.items())), schedule, tuple(sorted(plateau.items())))

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings (see `SCVI.train` for each one's meaning)."""

    max_epochs: int
    batch_size: int = 128
    train_size: float = 0.9
    validation_size: float | None = None
    shuffle_set_split: bool = True
    early_stopping: bool = False
    early_stopping_patience: int = 45
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_min_delta: float = 0.0
    check_val_every_n_epoch: int | None = None
    seed: int = 0
    progress_bar: bool = True
    on_nonfinite: str = "raise"
    data_source: str = "auto"
    plan: Plan = field(default_factory=Plan)
    # (name, fn) and (name, weight) pairs: extra loss terms and their weights
    loss_terms: tuple = ()
    loss_weights: tuple = ()
    checkpoint_dir: Any = None
    checkpoint_every: int = 1
    resume: bool = False
    devices: Any = "auto"
    data_shards: int | None = None
    precision: str = "float32"

    def __post_init__(self):
        backend.check_precision(self.precision)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("data_shards", self.data_shards, allow_none=True)
        check_positive_int("max_epochs", self.max_epochs)
        if self.on_nonfinite not in ("raise", "skip_step"):
            raise InputError(
                "on_nonfinite",
                self.on_nonfinite,
                "not 'raise' or 'skip_step'",
                "pass on_nonfinite='raise' (default) or 'skip_step'",
            )
        if self.data_source not in ("auto", "device", "host", "stream"):
            raise InputError(
                "data_source",
                self.data_source,
                "not 'auto', 'device', 'host' or 'stream'",
                "pass data_source='auto' (default), 'device', 'host' or 'stream'",
            )
        if self.resume and self.checkpoint_dir is None:
            raise InputError(
                "resume",
                True,
                "resuming needs checkpoint_dir",
                "pass checkpoint_dir=... (the folder written by an "
                "earlier train(..., checkpoint_dir=...))",
            )
        if self.checkpoint_dir is not None:
            check_positive_int("checkpoint_every", self.checkpoint_every)

    @classmethod
    def from_arguments(cls, arguments: dict, *, default_plan: dict | None = None) -> TrainConfig:
        """From `train()`'s arguments (its ``locals()``): each field by its name,
        ``plan_kwargs`` parsed, ``loss_terms``/``loss_weights`` checked. scvi-tools'
        and Lightning's keywords are translated first (`compat.translate`)."""
        arguments = translate(arguments)
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in arguments.items() if k in names}
        given["plan"] = Plan.parse(arguments.get("plan_kwargs"), default_plan)
        terms = arguments.get("loss_terms")
        weights = resolve_weights(terms, arguments.get("loss_weights"))
        given["loss_terms"] = tuple((terms or {}).items())
        given["loss_weights"] = tuple((weights or {}).items())
        return cls(**given)

    @property
    def loss_term_names(self) -> tuple[str, ...]:
        return tuple(sorted(name for name, _ in self.loss_terms))


def resolve_weights(loss_terms, loss_weights) -> dict | None:
    """Each extra loss term's weight (default 1), checked; None without terms."""
    if loss_terms is not None and not isinstance(loss_terms, dict):
        raise InputError(
            "loss_terms",
            type(loss_terms).__name__,
            "not a dict",
            "pass loss_terms={'name': fn}, fn(outputs, batch, params) -> scalar",
        )
    for name, fn in (loss_terms or {}).items():
        if not callable(fn):
            raise InputError(
                f"loss_terms[{name!r}]",
                type(fn).__name__,
                "not a function",
                "pass fn(outputs, batch, params) -> scalar",
            )
    if not loss_terms:
        if loss_weights:
            raise InputError(
                "loss_weights",
                sorted(loss_weights),
                "names no loss term",
                "pass loss_terms={...} with these names",
            )
        return None
    loss_weights = dict(loss_weights or {})
    unknown = set(loss_weights) - set(loss_terms)
    if unknown:
        raise InputError(
            "loss_weights",
            sorted(unknown),
            "names no loss term",
            f"use names of loss_terms: {sorted(loss_terms)}",
        )
    return {k: _weight(k, loss_weights.get(k, 1.0)) for k in loss_terms}


def _weight(name: str, w):
    if callable(w):
        return w
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise InputError(
            f"loss_weights[{name!r}]",
            w,
            "not a finite number or a schedule",
            "pass a float, or a function of the step such as optax.linear_schedule(0.0, 1.0, 1000)",
        )
    return float(w)

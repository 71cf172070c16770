"""Who the members of a sweep are: seeds times a grid (or a list), each one's
`train()` arguments, and the arrays of their traced hyperparameters."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..errors import InputError

# plan_kwargs a member may set: none of them changes a shape or the program
PLAN_HYPER = (
    "lr",
    "weight_decay",
    "max_kl_weight",
    "min_kl_weight",
    "n_epochs_kl_warmup",
    "n_steps_kl_warmup",
    "classification_ratio",
)
WEIGHT_PREFIX = "loss_weights."
# train() arguments the sweep sets itself, or cannot honour
_REFUSED = {
    "seed": "each member's seed comes from seeds= (or a member's 'seed')",
    "checkpoint_dir": "a sweep keeps no checkpoints",
    "resume": "a sweep keeps no checkpoints",
    "data_shards": "a sweep runs on one device, drawing minibatches from all cells",
}


def expand(seeds, grid: dict | None, members: list | None) -> list[dict]:
    """Every member as a dict: ``seed`` plus the hyperparameters it sets."""
    if members is not None:
        if grid:
            raise InputError(
                "grid",
                sorted(grid),
                "given together with members=",
                "pass either grid= (crossed with seeds=) or members=",
            )
        if (
            not isinstance(members, (list, tuple))
            or not members
            or not all(isinstance(m, dict) for m in members)
        ):
            raise InputError(
                "members",
                type(members).__name__,
                "not a non-empty list of dicts",
                "pass e.g. members=[{'seed': 0, 'lr': 1e-3}, ...]",
            )
        out = [
            {"seed": m.get("seed", 0), **{k: v for k, v in m.items() if k != "seed"}}
            for m in members
        ]
    else:
        seeds = list(seeds) if isinstance(seeds, (list, tuple, range, np.ndarray)) else [seeds]
        grid = dict(grid or {})
        for name, values in grid.items():
            if not isinstance(values, (list, tuple, np.ndarray)) or len(values) == 0:
                raise InputError(
                    f"grid[{name!r}]",
                    values,
                    "not a non-empty list",
                    f"pass e.g. grid={{{name!r}: [v1, v2]}}",
                )
        names = list(grid)
        out = [
            {"seed": s, **dict(zip(names, combo))}
            for s in seeds
            for combo in itertools.product(*grid.values())
        ]
    if not out:
        raise InputError("seeds", seeds, "no members", "pass at least one seed")
    for m in out:
        _check_member(m)
    return out


def _check_member(m: dict) -> None:
    s = m["seed"]
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
        raise InputError(
            "seeds", s, "a seed must be a non-negative int", "pass e.g. seeds=[0, 1, 2]"
        )
    for name, v in m.items():
        if name == "seed":
            continue
        if name not in PLAN_HYPER and not name.startswith(WEIGHT_PREFIX):
            raise InputError(
                f"grid[{name!r}]",
                v,
                "not a hyperparameter a sweep can vary "
                "(they must not change shapes or the program)",
                f"vary only {list(PLAN_HYPER)} or 'loss_weights.<term>'; "
                "train other settings in separate sweeps",
            )
        if name in ("n_epochs_kl_warmup", "n_steps_kl_warmup") and v is None:
            continue
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.number))
            or not math.isfinite(float(v))
        ):
            raise InputError(
                f"grid[{name!r}]",
                v,
                "not a finite number",
                "pass numbers (a weight schedule cannot be swept; fix it "
                "in loss_weights= for every member)",
            )


def train_arguments(member: dict, train_kwargs: dict, data_seed: int | None) -> dict:
    """The `train()` arguments member ``member`` equals a single run of."""
    for name in _REFUSED:
        if name in train_kwargs:
            raise InputError(
                name, train_kwargs[name], _REFUSED[name], "leave it out of train_many's arguments"
            )
    kw = dict(train_kwargs)
    devices = kw.get("devices", 1)
    if devices not in ("auto", 1):
        raise InputError(
            "devices",
            devices,
            "a sweep runs its members on one device (vmap, not data parallelism)",
            "pass devices=1 or leave it out",
        )
    kw["devices"] = 1
    if kw.get("data_source", "auto") not in ("auto", "device"):
        raise InputError(
            "data_source",
            kw["data_source"],
            "a sweep keeps the counts on the device",
            "pass data_source='device' or 'auto'",
        )
    plan = dict(kw.get("plan_kwargs") or {})
    weights = dict(kw.get("loss_weights") or {})
    for name, v in member.items():
        if name.startswith(WEIGHT_PREFIX):
            weights[name[len(WEIGHT_PREFIX) :]] = float(v)
        elif name != "seed":
            plan[name] = v
    if plan:
        kw["plan_kwargs"] = plan
    if weights:
        kw["loss_weights"] = weights
    kw["seed"] = member["seed"] if data_seed is None else data_seed
    kw.setdefault("progress_bar", False)
    return kw


def schedule_mode(configs) -> str:
    """The KL warm-up's kind, which every member must share."""

    def mode(s):
        return "epochs" if s.n_epochs_kl_warmup else "steps" if s.n_steps_kl_warmup else "constant"

    modes = {mode(c.plan.schedule) for c in configs}
    if len(modes) > 1:
        raise InputError(
            "grid",
            sorted(modes),
            "members mix KL warm-up kinds (by epochs, by steps, none)",
            "give every member the same kind: e.g. vary "
            "n_epochs_kl_warmup over positive numbers only",
        )
    return modes.pop()


def hyper_arrays(configs, *, has_ratio: bool) -> dict:
    """Each member's traced numbers, stacked (K,) and named as its optimiser's
    hyperparams hold them: learning rate, weight decay, the KL schedule's
    numbers, the classification ratio, and every numeric extra-term weight."""
    from ._step import WEIGHT_KEY

    def f32(values):
        return np.asarray(np.asarray(values, np.float64), np.float32)

    sched = [c.plan.schedule for c in configs]
    hp = {
        "learning_rate": f32([c.plan.get("lr", 1e-3) for c in configs]),
        "weight_decay": f32([c.plan.get("weight_decay", 1e-6) for c in configs]),
        "kl_slope": f32([s.max_kl_weight - s.min_kl_weight for s in sched]),
        "kl_min": f32([s.min_kl_weight for s in sched]),
        "kl_max": f32([s.max_kl_weight for s in sched]),
        "kl_n": f32([float(s.n_epochs_kl_warmup or s.n_steps_kl_warmup or 1) for s in sched]),
    }
    if has_ratio:
        hp["classification_ratio"] = f32(
            [float(c.plan.get("classification_ratio")) for c in configs]
        )
    weights = [dict(c.loss_weights) for c in configs]
    for name, w in weights[0].items():
        if any(
            callable(x[name]) != callable(w) or (callable(w) and x[name] is not w)
            for x in weights[1:]
        ):
            raise InputError(
                f"grid['{WEIGHT_PREFIX}{name}']",
                "numbers and a schedule",
                "members give this term a number and a schedule",
                "sweep numbers only, or give every member the same schedule",
            )
    hp.update(
        {
            WEIGHT_KEY + k: f32([x[k] for x in weights])
            for k, w in weights[0].items()
            if not callable(w)
        }
    )
    return hp

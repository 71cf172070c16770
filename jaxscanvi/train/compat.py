"""scvi-tools' and Lightning's `train()` keywords, in jaxscanvi's terms.

scvi-tools passes what its ``train()`` does not name to a Lightning
``Trainer``. Here each such keyword is mapped to the setting that does the
same thing, accepted with a one-line warning where it only concerns
Lightning's machinery (loggers, checkpoints of its own), or refused with an
`InputError` saying what to do instead. `translate` runs first in
`TrainConfig.from_arguments`, before any other check.
"""

from __future__ import annotations

import warnings

import jax

from ..data.counts import _user_stacklevel
from ..errors import InputError

# Lightning's own machinery, with nothing to do here
IGNORED = {
    "logger": "history is kept in model.history",
    "enable_checkpointing": "pass checkpoint_dir=... for resumable checkpoints",
    "checkpointing_monitor": "pass checkpoint_dir=... for resumable checkpoints",
    "log_every_n_steps": "the history holds one row per epoch",
    "enable_model_summary": "print(model) summarises the model",
    "num_sanity_val_steps": "validation inputs are checked before training",
    "benchmark": "XLA chooses its kernels when compiling",
    "deterministic": "training is always deterministic for a given seed",
    "default_root_dir": "nothing is written unless checkpoint_dir is given",
    "log_save_dir": "history is kept in model.history",
    "learning_rate_monitor": "the learning rate is in the history ('lr')",
    "simple_progress_bar": "the progress bar is tqdm's",
    "progress_bar_refresh_rate": "the progress bar is tqdm's",
    "load_sparse_tensor": "sparse counts are always read as they are stored",
    "detect_anomaly": "non-finite losses are caught by on_nonfinite",
}
# dataloader options that concern torch's DataLoader only
_LOADER_IGNORED = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
# what cannot apply, and what to do instead
REFUSED = {
    "callbacks": "Lightning callbacks cannot run here; use early_stopping=..., "
    "checkpoint_dir=... or read model.history after training",
    "accumulate_grad_batches": "pass a larger batch_size",
    "max_steps": "training runs whole epochs; pass max_epochs "
    "(about max_steps * batch_size / n_cells)",
    "min_epochs": "leave it out; with early stopping pass early_stopping_patience",
    "min_steps": "leave it out; with early stopping pass early_stopping_patience",
    "max_time": "pass max_epochs",
    "limit_train_batches": "subset the AnnData, or lower max_epochs",
    "limit_val_batches": "pass validation_size",
    "val_check_interval": "pass check_val_every_n_epoch",
    "overfit_batches": "train on a subset of the AnnData",
    "fast_dev_run": "pass max_epochs=1",
    "plugins": "leave it out",
    "num_nodes": "run one process per host with jaxscanvi.distributed.initialize()",
    "datamodule": "set the AnnData up with setup_anndata; custom data modules cannot "
    "feed the compiled epoch",
}
# Lightning's defaults of the refused keywords: passing them asks for nothing
_DEFAULTS = {
    "max_steps": (-1, None),
    "min_epochs": (None,),
    "min_steps": (None,),
    "max_time": (None,),
    "accumulate_grad_batches": (1, None),
    "limit_train_batches": (None, 1.0),
    "limit_val_batches": (None, 1.0),
    "val_check_interval": (None, 1.0),
    "overfit_batches": (0, 0.0),
    "fast_dev_run": (False,),
    "callbacks": (None, ()),
    "plugins": (None, ()),
    "num_nodes": (1,),
    "datamodule": (None,),
}
_ACCELERATORS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}
_PRECISIONS = {
    32: "float32",
    "32": "float32",
    "32-true": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bf16-mixed": "bfloat16",
    "bf16-true": "bfloat16",
    "bfloat16": "bfloat16",
}
# what TrainConfig itself has a field for
MAPPED = (
    "enable_progress_bar",
    "early_stopping_min_delta",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "early_stopping_mode",
    "strategy",
)


def _ignore(name: str, why: str) -> None:
    # at the caller of train() or fit_plan(), however many frames lie between
    warnings.warn(f"train(): {name} is ignored ({why})", UserWarning, stacklevel=_user_stacklevel())


def translate(arguments: dict) -> dict:
    """`train()`'s ``locals()`` with scvi-tools' keywords turned into ours.

    Merges ``trainer_config`` into the Lightning keywords and ``plan_config``
    into ``plan_kwargs`` (scvi-tools 1.4's dict forms of the same things).
    """
    args = dict(arguments)
    extra = {**(args.pop("trainer_config", None) or {}), **(args.pop("trainer_kwargs", None) or {})}
    plan = {**(args.pop("plan_config", None) or {}), **(args.get("plan_kwargs") or {})}
    for name in ("datamodule", "load_sparse_tensor"):
        if args.get(name):
            extra[name] = args.pop(name)
    if args.pop("adversarial_classifier", None):
        raise InputError(
            "adversarial_classifier",
            True,
            "scANVI's adversarial classifier is not implemented",
            "leave adversarial_classifier=None",
        )
    for name, value in extra.items():
        if name in REFUSED and _is_default(name, value):
            continue
        if name in REFUSED:
            raise InputError(name, value, "cannot apply to jaxscanvi's training", REFUSED[name])
        if name in IGNORED:
            _ignore(name, IGNORED[name])
        elif name not in MAPPED:
            raise InputError(
                name,
                value,
                "is not an argument of train()",
                "see help(model.train) for scvi-tools' and jaxscanvi's arguments",
            )
    if "enable_progress_bar" in extra:
        args["progress_bar"] = bool(extra["enable_progress_bar"])
    if "early_stopping_min_delta" in extra:
        args["early_stopping_min_delta"] = float(extra["early_stopping_min_delta"])
    if extra.get("early_stopping_mode", "min") != "min":
        raise InputError(
            "early_stopping_mode",
            extra["early_stopping_mode"],
            "only 'min' applies: every monitored quantity here is a loss",
            "monitor a loss (e.g. 'elbo_validation') with mode 'min'",
        )
    strategy = extra.get("strategy", "auto")
    if strategy != "auto":
        _ignore(
            "strategy",
            "several devices always split each minibatch between them "
            "(data parallelism); choose them with devices=...",
        )
    plan.update(_clipping(extra))
    args["plan_kwargs"] = plan or None
    _split_options(args)
    args["precision"] = _precision(args.get("precision", "float32"))
    args["devices"] = devices_for(args.pop("accelerator", "auto"), args.get("devices", "auto"))
    if args.get("train_size") is None:  # scvi-tools' None: its default, 0.9
        args["train_size"] = 0.9
    return args


def _is_default(name: str, value) -> bool:
    if isinstance(value, list) and not value:
        value = ()
    return any(
        value is d or (type(value) is type(d) and value == d) for d in _DEFAULTS.get(name, ())
    )


def _clipping(extra: dict) -> dict:
    out = {}
    clip = extra.get("gradient_clip_val")
    if clip is not None and clip != 0:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise InputError(
                "gradient_clip_val",
                clip,
                "not a positive number",
                "pass e.g. gradient_clip_val=1.0, or leave it out",
            )
        out["gradient_clip_val"] = float(clip)
    algorithm = extra.get("gradient_clip_algorithm")
    if algorithm is not None:
        if algorithm not in ("norm", "value"):
            raise InputError(
                "gradient_clip_algorithm",
                algorithm,
                "not 'norm' or 'value'",
                "pass 'norm' (Lightning's default) or 'value'",
            )
        out["gradient_clip_algorithm"] = algorithm
    return out


def _split_options(args: dict) -> None:
    """``datasplitter_kwargs``: what concerns torch's DataLoader is ignored."""
    options = dict(args.pop("datasplitter_kwargs", None) or {})
    for name in _LOADER_IGNORED:
        if name in options:
            options.pop(name)
            _ignore(
                f"datasplitter_kwargs[{name!r}]",
                "no data-loader processes: minibatches are gathered from arrays in memory",
            )
    if "shuffle_set_split" in options:
        args["shuffle_set_split"] = bool(options.pop("shuffle_set_split"))
    if options:
        raise InputError(
            "datasplitter_kwargs",
            sorted(options),
            "cannot apply here",
            f"pass only {list(_LOADER_IGNORED)} (ignored) or "
            "shuffle_set_split; train_size and validation_size are "
            "train()'s own arguments",
        )


def _precision(value) -> str:
    if value in _PRECISIONS:
        return _PRECISIONS[value]
    raise InputError(
        "precision",
        value,
        "not a precision jaxscanvi trains in",
        "pass 32 / '32-true' / 'float32', or 'bf16-mixed' / 'bfloat16' "
        "(bf16 matrix products, float32 elsewhere); float16 and float64 "
        "are not supported",
    )


def devices_for(accelerator, devices):
    """scvi-tools' (accelerator, devices) as our ``devices``: "auto", an int, or
    a list of jax devices."""
    if accelerator in (None, "auto"):
        if (
            isinstance(devices, (list, tuple))
            and devices
            and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)
        ):
            return _by_index(jax.local_devices(), devices)  # Lightning: device indices
        return "auto" if devices in (-1, "-1") else devices
    platform = _ACCELERATORS.get(accelerator) if isinstance(accelerator, str) else None
    if platform is None:
        raise InputError(
            "accelerator",
            accelerator,
            "not an accelerator JAX can run on",
            "pass 'auto', 'cpu', 'gpu' (or 'cuda') or 'tpu'",
        )
    default = jax.default_backend()
    if platform != default:
        have = f"JAX runs on {default}"
        if platform == "cpu":
            raise InputError(
                "accelerator",
                accelerator,
                f"{have}; jaxscanvi trains on JAX's default backend",
                "leave accelerator='auto', or start "
                "Python with JAX_PLATFORMS=cpu to train on the CPU",
            )
        raise InputError(
            "accelerator",
            accelerator,
            f"{have}; no {platform} is visible to JAX",
            "pass accelerator='auto' or 'cpu', or install jax with "
            f"{platform} support (e.g. pip install 'jax[cuda12]')",
        )
    return devices_for("auto", devices)


def _by_index(local: list, ids) -> list:
    bad = [i for i in ids if not 0 <= i < len(local)]
    if bad:
        raise InputError(
            "devices",
            list(ids),
            f"there are {len(local)} local device(s)",
            f"pass indices from 0 to {len(local) - 1}, an int or 'auto'",
        )
    return [local[i] for i in ids]

"""`jaxscanvi.settings`: scvi-tools' ``scvi.settings``, where it means something here.

``seed`` is the default of every ``seed=`` argument (model initialisation,
training's split, minibatch order and sampling), so ``settings.seed = 0``
followed by the same calls gives the same model, as in scvi-tools. Unlike
scvi-tools it seeds no global generator: each model built with the default
starts from the same initial parameters.
"""

from __future__ import annotations

import logging
import warnings

from .errors import InputError

_STYLES = ("rich", "tqdm")
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


class Settings:
    """Library-wide defaults; set attributes, e.g. ``jaxscanvi.settings.seed = 1``.

    seed
        Default seed of models and training (0).
    batch_size
        Cells per compiled chunk in inference (``get_latent_representation``
        and the other ``get_*``) when a call passes no ``batch_size``. None
        (default): 1024 for every call (short requests are padded), so each
        inference program compiles once per model. Training's ``batch_size`` is
        `train()`'s own argument, as in scvi-tools.
    verbosity
        Level of the ``jaxscanvi`` logger (an int or a name like "WARNING").
    progress_bar_style
        "tqdm" or "rich": accepted; the bar is always tqdm's.
    num_threads
        Accepted, no effect: XLA sizes its CPU thread pool once, when JAX
        starts; limit it with the process's CPU affinity (``taskset``) instead.
    dl_num_workers, dl_persistent_workers, dl_pin_memory
        Accepted, no effect: minibatches are gathered from arrays already in
        memory (or on the device), with no data-loader worker processes.
    """

    _names = (
        "seed",
        "batch_size",
        "verbosity",
        "progress_bar_style",
        "num_threads",
        "dl_num_workers",
        "dl_persistent_workers",
        "dl_pin_memory",
    )

    def __init__(self):
        object.__setattr__(self, "_values", {})
        self.reset()

    def reset(self) -> None:
        """Back to the defaults."""
        self._values.clear()
        for name, value in (
            ("seed", 0),
            ("batch_size", None),
            ("verbosity", logging.WARNING),
            ("progress_bar_style", "tqdm"),
            ("num_threads", None),
            ("dl_num_workers", 0),
            ("dl_persistent_workers", False),
            ("dl_pin_memory", False),
        ):
            self._values[name] = value

    def __getattr__(self, name: str):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"jaxscanvi.settings has no setting {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name not in self._names:
            raise InputError(
                f"settings.{name}",
                value,
                "is not a jaxscanvi setting",
                f"use one of {list(self._names)}",
            )
        check = getattr(self, f"_check_{name}", None)
        self._values[name] = check(value) if check is not None else value

    # ------------------------------------------------------------- the checks
    @staticmethod
    def _check_seed(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(
                "settings.seed",
                value,
                "not a non-negative int",
                "set e.g. jaxscanvi.settings.seed = 0",
            )
        return int(value)

    @staticmethod
    def _check_batch_size(value):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InputError(
                "settings.batch_size",
                value,
                "not a positive int or None",
                "set e.g. jaxscanvi.settings.batch_size = 1024",
            )
        return value

    @staticmethod
    def _check_verbosity(value):
        level = _LEVELS.get(value.upper()) if isinstance(value, str) else value
        if isinstance(level, bool) or not isinstance(level, int):
            raise InputError(
                "settings.verbosity",
                value,
                "not a logging level",
                f"set an int or one of {list(_LEVELS)}",
            )
        logging.getLogger("jaxscanvi").setLevel(level)
        return level

    @staticmethod
    def _check_progress_bar_style(value):
        if value not in _STYLES:
            raise InputError(
                "settings.progress_bar_style",
                value,
                "not 'rich' or 'tqdm'",
                "set 'tqdm' (the bar is tqdm's either way)",
            )
        return value

    @staticmethod
    def _check_num_threads(value):
        if value is not None:
            warnings.warn(
                "jaxscanvi.settings.num_threads has no effect: XLA sizes its CPU "
                "thread pool when JAX starts (limit the process's CPUs with "
                "taskset instead)",
                UserWarning,
                stacklevel=3,
            )
        return value

    def __repr__(self) -> str:
        return (
            "jaxscanvi.settings(" + ", ".join(f"{k}={self._values[k]!r}" for k in self._names) + ")"
        )


settings = Settings()


def default_seed(seed: int | None) -> int:
    """``seed``, or the library-wide default when None."""
    return settings.seed if seed is None else seed

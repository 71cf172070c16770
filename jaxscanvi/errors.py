"""Exceptions raised on bad input. Each names the field, the value and the fix."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Bad user input, caught before anything is compiled."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field}={shown}: {problem}. Fix: {fix}")


class ModelFormatError(ValueError):
    """A folder that is not, or no longer, a readable jaxscanvi model."""


class FolderLockedError(FileExistsError):
    """Another live process is writing the same model or checkpoint folder."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the model keeps its last finite parameters."""


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """Raise `InputError` unless ``value`` is a positive int (or None, if allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise InputError(
            name,
            value,
            "must be a positive integer",
            f"pass e.g. {name}=128" if "batch" in name else f"pass {name}=1 or more",
        )

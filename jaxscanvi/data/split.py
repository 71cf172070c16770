"""The train/validation split: scvi-tools' DataSplitter, reproduced."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def split_indices(
    n: int, train_size: float, validation_size: float | None, seed: int, *, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation (with ``shuffle=False``, the cells in order), validation
    cells first; returns (train, validation) sorted."""
    if not (isinstance(train_size, (int, float)) and 0 < train_size <= 1):
        raise InputError("train_size", train_size, "must lie in (0, 1]", "pass e.g. train_size=0.9")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    else:
        if not (0 <= validation_size < 1) or train_size + validation_size > 1:
            raise InputError(
                "validation_size",
                validation_size,
                "must lie in [0, 1) with train_size + validation_size <= 1",
                "pass e.g. validation_size=0.1, or None for the rest",
            )
        n_val = math.floor(n * validation_size)
    if n_train == 0:
        raise InputError(
            "train_size", train_size, "leaves no training cells", "increase train_size"
        )
    perm = np.random.RandomState(seed=seed).permutation(n) if shuffle else np.arange(n)
    return np.sort(perm[n_val : n_val + n_train]), np.sort(perm[:n_val])

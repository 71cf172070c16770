"""SCANVI's pieces of a fit: its loss, and the labelled cells an epoch pairs with."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from .._settings import default_seed
from ..errors import InputError, check_positive_int
from ..losses import scanvi_elbo
from ..train.config import TrainConfig, max_epochs_heuristic
from . import _predict
from ._scanvi_args import check_objective


def train_config(arguments: dict, n_obs: int, *, was_pretrained: bool) -> TrainConfig:
    """`SCANVI.train`'s ``arguments`` (by name) checked, their defaults filled
    (``arguments`` too), as a `TrainConfig`."""
    if arguments["max_epochs"] is None:
        max_epochs = max_epochs_heuristic(n_obs)
        if was_pretrained:
            max_epochs = int(min(10, max(2, round(max_epochs / 3.0))))
        arguments["max_epochs"] = max_epochs
    check_positive_int("max_epochs", arguments["max_epochs"])
    arguments["seed"] = default_seed(arguments["seed"])
    check_positive_int("n_samples_per_label", arguments["n_samples_per_label"], allow_none=True)
    config = TrainConfig.from_arguments(
        arguments, default_plan={"objective": "seed", "classification_ratio": 50.0}
    )
    check_objective(config.plan.get("objective"))
    return config


def task_hooks(
    module, cells, n_labels: int, config: TrainConfig, n_per_label, *, labelled: bool
) -> dict[str, Callable]:
    """The task's scANVI hooks: validation metrics and (unless no cell is
    ``labelled``: an unlabelled query) the labelled cells of each epoch."""
    labels = cells.labels
    hooks: dict[str, Callable] = {
        "val_metrics": partial(_predict.validation_metrics, module, n_labels, cells)
    }
    if labelled:
        hooks["labelled"] = partial(
            labelled_training_cells, labels, n_labels, n_per_label, config.train_size
        )
        hooks["val_labelled"] = partial(labelled_among, labels, n_labels)
    return hooks


def loss(module, config: TrainConfig, replay, *, train: bool):
    """The task's ``make_loss``: scANVI's ELBO with the plan's objective and terms."""
    return partial(
        scanvi_elbo,
        module,
        train=train,
        objective=config.plan.get("objective"),
        classification_ratio=float(config.plan.get("classification_ratio")),
        sparse=config.plan.get("sparse_likelihood", True),
        extra_terms=dict(config.loss_terms),
        extra_weights=dict(config.loss_weights),
        replay=replay,
    )


def labelled_among(labels: np.ndarray, n_labels: int, idx: np.ndarray) -> np.ndarray:
    # at a leaf (code < n_labels) or an inner node of a hierarchy (> n_labels)
    return idx[labels[idx] != n_labels]


def labelled_training_cells(
    labels, n_labels: int, n_per_label: int | None, train_size, rng, *, train_idx: np.ndarray
) -> np.ndarray:
    """The labelled training cells an epoch pairs minibatches with: all of them, or
    a class-balanced draw of at most ``n_per_label`` per type."""
    lab = labelled_among(labels, n_labels, train_idx)
    if len(lab) == 0:
        raise InputError(
            "train_size",
            train_size,
            "no labelled cell fell in the training split",
            "label more cells or raise train_size",
        )
    if n_per_label is None:
        return lab
    picks = []
    for c in np.unique(labels[lab]):  # leaves, and inner nodes of a hierarchy
        of_c = lab[labels[lab] == c]
        if len(of_c):
            picks.append(rng.choice(of_c, min(n_per_label, len(of_c)), replace=False))
    return np.sort(np.concatenate(picks))

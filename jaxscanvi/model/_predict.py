"""SCANVI's predictions: the classifier's logits, its options checked, its outputs.

Plain functions of what they are given (a module and its variables, a
registry, probabilities); the `SCANVI` methods are thin calls to them.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from ..errors import InputError
from . import _hierarchy, _kernels
from ._calibration import expected_calibration_error, softmax
from ._inference import jitted, map_cells

UNASSIGNED = "Unassigned"


def logits(
    module,
    variables,
    cells,
    indices,
    batch_size,
    *,
    use_posterior_mean: bool = True,
    parallel=None,
) -> np.ndarray:
    """q(c|z)'s logits for the selected cells, under ``variables``."""
    if use_posterior_mean:  # the model's shared encoding program
        fn = jitted(partial(_kernels.encode_fn, module))
        out = map_cells(fn, variables, cells, indices, batch_size, parallel=parallel)
        return np.asarray(out["logits"], np.float64)
    fn = jitted(partial(_kernels.classify_fn, module, use_posterior_mean=False))
    return np.asarray(
        map_cells(fn, variables, cells, indices, batch_size, parallel=parallel), np.float64
    )


def probabilities(model, adata, indices, batch_size, *, use_posterior_mean: bool) -> tuple:
    """The calibrated probabilities of ``model``'s cell types for the selected
    cells of ``adata`` (default: the model's), and those cells' names."""
    cells = model._cells_for(adata)
    out = model._logits(
        model.variables,
        cells,
        indices,
        batch_size,
        use_posterior_mean=use_posterior_mean,
        parallel=model._parallel,
    )
    idx = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
    return softmax(out / model.temperature), cells.obs_names[idx]


def validation_metrics(module, n_labels: int, cells, variables, val_idx, parallel) -> dict:
    """The classifier's loss, accuracy and calibration error on the labelled
    validation cells (extra history columns)."""
    val_lab = val_idx[cells.labels[val_idx] < n_labels]  # leaf-labelled cells
    if len(val_lab) == 0:
        return {}
    probs = softmax(logits(module, variables, cells, val_lab, None, parallel=parallel))
    y = cells.labels[val_lab]
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return {
        "classification_loss_validation_labelled": float(-np.log(p_true).mean()),
        "accuracy_validation_labelled": float((probs.argmax(1) == y).mean()),
        "calibration_error_validation": expected_calibration_error(probs, y),
    }


def check_options(model, level, threshold, *, soft: bool, unassigned_threshold) -> None:
    """`SCANVI.predict`'s options, refused before anything runs."""
    _hierarchy.check_level(model, level, threshold, soft, unassigned_threshold)
    if unassigned_threshold is None:
        return
    if soft:
        raise InputError(
            "unassigned_threshold",
            unassigned_threshold,
            "applies to hard predictions only",
            "pass soft=False, or threshold the probabilities yourself",
        )
    if not (isinstance(unassigned_threshold, (int, float)) and 0 <= unassigned_threshold <= 1):
        raise InputError(
            "unassigned_threshold",
            unassigned_threshold,
            "must be a probability in [0, 1]",
            "pass e.g. unassigned_threshold=0.5",
        )


def predictions(
    registry, probs: np.ndarray, index, *, soft: bool, level, threshold, unassigned_threshold
):
    """`SCANVI.predict`'s output from the calibrated probabilities of the cells
    named ``index``: names, a DataFrame of probabilities, or a level's nodes."""
    names = np.asarray(registry.label_categories, dtype=object)
    if level != "leaf":
        return _hierarchy.predict_level(registry, probs, level, threshold, index)
    if not soft:
        pred = names[probs.argmax(1)]
        if unassigned_threshold is not None:
            pred = np.where(probs.max(1) < unassigned_threshold, UNASSIGNED, pred)
        return pred
    probs = probs / probs.sum(1, keepdims=True)
    return pd.DataFrame(probs, index=index, columns=pd.Index(list(names)))


def expression_kernel(registry, label) -> tuple:
    """`SCANVI.get_normalized_expression`'s decoding kernel and its keywords: as
    if of cell type ``label``, or (None) as the cell is."""
    if label is None:
        return _kernels.expression_fn, {}
    return _kernels.label_expression_fn, {"target": label_code(registry, label)}


def label_code(registry, label) -> int:
    """The code of cell type ``label``, which must be one of the model's."""
    cats = list(registry.label_categories)
    if str(label) not in cats:
        raise InputError(
            "label",
            label,
            f"is not a cell type of the model ({cats[:10]})",
            "pass one of model.registry.label_categories",
        )
    return cats.index(str(label))

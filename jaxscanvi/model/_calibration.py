"""Temperature calibration of SCANVI's probabilities, and the calibration error.

`temperature_fit` and `labelled_error` read a model (its cells and
logits) and change nothing: `SCANVI.calibrate` keeps what the first returns,
`SCANVI.calibration_error` returns the second. The rest is plain numpy on
logits.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import InputError
from ..train.history import History


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE: bin cells by top-class confidence; weighted |accuracy - confidence|."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> dict:
    """The T minimising the NLL of softmax(logits / T) on labels ``y``, with the
    expected calibration error and the NLL before and after."""
    from scipy.optimize import minimize_scalar

    def nll(log_t):
        z = logits / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())

    res = minimize_scalar(
        nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded", options={"xatol": 1e-4}
    )
    t = float(np.exp(res.x))
    return {
        "temperature": t,
        "n_cells": len(y),
        "nll_before": nll(0.0),
        "nll_after": float(res.fun),
        "ece_before": expected_calibration_error(softmax(logits), y),
        "ece_after": expected_calibration_error(softmax(logits / t), y),
    }


def labelled_cells(model, adata, indices) -> tuple:
    """Cells, the labelled cells among ``indices`` (default: validation), their codes."""
    cells = model._cells_for(adata)
    C = model.registry.n_labels
    if indices is None:
        if adata is not None and adata is not model.adata:
            idx = np.arange(cells.n_obs)
        else:
            idx = model.validation_indices
    else:
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx
    idx = idx[cells.labels[idx] < C]
    return cells, idx, cells.labels[idx]


def temperature_fit(model, adata, indices, batch_size: int | None) -> dict:
    """`fit_temperature` on the labelled cells `labelled_cells` selects (ten or more)."""
    cells, idx, y = labelled_cells(model, adata, indices)
    if len(idx) < 10:
        raise InputError(
            "indices",
            f"{len(idx)} labelled cells",
            "too few labelled cells to fit a temperature (10 or more needed)",
            "train with validation cells that carry labels (train_size < 1) "
            "or pass adata/indices with labelled cells",
        )
    logits = model._logits(model.variables, cells, idx, batch_size, parallel=model._parallel)
    return fit_temperature(logits, y)


def labelled_error(model, adata, indices, n_bins: int, batch_size: int | None) -> float:
    """The calibration error of the model's tempered probabilities on the labelled
    cells `labelled_cells` selects."""
    cells, idx, y = labelled_cells(model, adata, indices)
    if len(idx) == 0:
        raise InputError(
            "indices",
            "no labelled cells",
            "the calibration error needs cells with known labels",
            "pass adata/indices with labels",
        )
    logits = model._logits(model.variables, cells, idx, batch_size, parallel=model._parallel)
    return expected_calibration_error(softmax(logits / model.temperature), y, n_bins)


def with_calibration(history: History, calibration: dict) -> History:
    """``history`` with the temperature and the calibrated validation error
    added to its last epoch."""
    frame = history.to_frame()
    last = frame.index[-1]
    frame.loc[last, "temperature"] = calibration["temperature"]
    frame.loc[last, "calibration_error_validation_calibrated"] = calibration["ece_after"]
    return History(frame)

"""Temperature calibration of SCANVI's probabilities, and the calibration error.

`calibrate` and `calibration_error` are functions of the model, bound as
SCANVI's methods; the rest is plain numpy on logits.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import InputError


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


def calibrate(self, adata=None, indices=None, batch_size: int | None = None) -> dict:
    """Fit the temperature T of softmax(logits / T) on labelled cells.

    Default cells: the labelled validation cells (the ones training did
    not fit). T minimises their negative log-likelihood; it never changes
    which type is predicted, only how confident the probabilities are.
    Returns (and keeps in ``model.calibration``) T, the expected
    calibration error and the NLL before and after.
    """
    cells, idx, y = labelled_cells(self, adata, indices)
    if len(idx) < 10:
        raise InputError(
            "indices",
            f"{len(idx)} labelled cells",
            "too few labelled cells to fit a temperature (10 or more needed)",
            "train with validation cells that carry labels (train_size < 1) "
            "or pass adata/indices with labelled cells",
        )
    logits = self._logits(self.variables, cells, idx, batch_size, parallel=self._parallel)
    self.calibration = fit_temperature(logits, y)
    self.temperature = self.calibration["temperature"]
    return dict(self.calibration)


def calibration_error(
    self, adata=None, indices=None, n_bins: int = 10, batch_size: int | None = None
) -> float:
    """Expected calibration error of ``predict(soft=True)`` on labelled cells
    (default: the labelled validation cells)."""
    cells, idx, y = labelled_cells(self, adata, indices)
    if len(idx) == 0:
        raise InputError(
            "indices",
            "no labelled cells",
            "the calibration error needs cells with known labels",
            "pass adata/indices with labels",
        )
    logits = self._logits(self.variables, cells, idx, batch_size, parallel=self._parallel)
    return expected_calibration_error(softmax(logits / self.temperature), y, n_bins)

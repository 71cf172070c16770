"""Annotation by an ensemble of scANVI models (e.g. the members of a sweep).

The ensemble's probability of a type is the mean of its members' calibrated
probabilities (each member's `SCANVI.predict(soft=True)`); its label is the
arg-max. Two disagreement scores: ``disagreement``, the fraction of members
whose own label is not the ensemble's, and ``mutual_information``, the
entropy of the mean minus the mean entropy (the part of the uncertainty that
comes from members disagreeing, not from each being unsure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import InputError
from ..model._calibration import expected_calibration_error, labelled_cells


class EnsemblePrediction(NamedTuple):
    probabilities: pd.DataFrame  # cells x types, the members' mean
    prediction: np.ndarray  # the ensemble's label per cell
    disagreement: np.ndarray  # fraction of members predicting another label
    mutual_information: np.ndarray  # H(mean p) - mean H(p), in nats


def _check(models: Sequence) -> list:
    from ..model.scanvi import SCANVI

    models = list(models)
    if not models or not all(isinstance(m, SCANVI) for m in models):
        raise InputError(
            "models",
            [type(m).__name__ for m in models][:5],
            "not a non-empty list of SCANVI models",
            "pass e.g. sweep.train_many(...).models of a scANVI sweep",
        )
    cats = list(models[0].registry.label_categories)
    if any(list(m.registry.label_categories) != cats for m in models[1:]):
        raise InputError(
            "models",
            "different cell types",
            "members must share their label categories",
            "ensemble models trained on the same labels",
        )
    return models


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(-1)


def member_probabilities(models: Sequence, adata=None, indices=None) -> np.ndarray:
    """(K, cells, types): each member's calibrated probabilities."""
    return np.stack(
        [m.predict(adata=adata, indices=indices, soft=True).to_numpy() for m in _check(models)]
    )


def ensemble_predict(models: Sequence, adata=None, indices=None) -> EnsemblePrediction:
    """The ensemble's probabilities, label and disagreement for each cell."""
    models = _check(models)
    probs = member_probabilities(models, adata, indices)
    mean = probs.mean(0)
    names = np.asarray(models[0].registry.label_categories, dtype=object)
    top = mean.argmax(1)
    disagreement = (probs.argmax(2) != top[None]).mean(0)
    mi = _entropy(mean) - _entropy(probs).mean(0)
    index = models[0].predict(adata=adata, indices=indices, soft=True).index
    return EnsemblePrediction(
        pd.DataFrame(mean, index=index, columns=pd.Index(list(names))),
        names[top],
        disagreement,
        np.maximum(mi, 0.0),
    )


def ensemble_calibration(models: Sequence, adata=None, indices=None) -> dict:
    """Accuracy and expected calibration error (10 bins) of the ensemble and of
    each member, on labelled cells (default: the first member's labelled
    validation cells; with a shared-order sweep every member's)."""
    models = _check(models)
    _, idx, y = labelled_cells(models[0], adata, indices)
    if len(idx) == 0:
        raise InputError(
            "indices",
            "no labelled cells",
            "calibration needs labelled cells",
            "pass indices of labelled cells, or an adata with labels",
        )
    probs = member_probabilities(models, adata, idx)
    mean = probs.mean(0)
    return {
        "n_cells": len(idx),
        "ece_ensemble": expected_calibration_error(mean, y),
        "accuracy_ensemble": float((mean.argmax(1) == y).mean()),
        "ece_members": [expected_calibration_error(p, y) for p in probs],
        "accuracy_members": [float((p.argmax(1) == y).mean()) for p in probs],
    }

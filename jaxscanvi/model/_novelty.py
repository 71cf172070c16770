"""Novelty: how poorly the reference's cell types explain a cell's counts.

`novelty_scores` reads a model and changes nothing (`SCANVI.novelty_score`
returns it); `reference_statistics` is what reference training keeps for it
(and for replay, `_replay`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ._inference import jitted


def excess_fn(module, variables, batch, key):
    """Fraction of each cell's counts far above the model's expectation at the
    posterior mean of z: sum of (x - mu) over genes with x > 3 mu + 3, over sum x."""

    def run(mdl, b):
        inf = mdl.inference(b, train=False)
        z = inf["qz_m"]
        if mdl.config.latent_distribution == "ln":
            z = jax.nn.softmax(z, -1)
        lib = inf.get("ql_m", inf["library"])
        mu = jnp.exp(mdl.generative(z, lib, b, train=False)["log_mu"])
        excess = jnp.where(b.x > 3.0 * mu + 3.0, b.x - mu, 0.0).sum(-1)
        return excess / jnp.maximum(b.x.sum(-1), 1.0)

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def unexplained(model, cells, indices, batch_size) -> np.ndarray:
    fn = jitted(partial(excess_fn, model.module))
    return np.asarray(model._map(fn, cells, indices, batch_size), np.float64)


def reference_statistics(model, quantile: float = 0.99) -> dict | None:
    """The ``quantile`` of the labelled training cells' residual scores (the
    level above which `novelty_score` calls a cell novel), and each type's
    latent mean and spread."""
    cells = model._train_cells()
    C = model.registry.n_labels
    idx = model.train_indices[cells.labels[model.train_indices] < C]
    if len(idx) < 10:
        return None
    scores = unexplained(model, cells, idx, None)
    z = np.asarray(model.get_latent_representation(indices=idx), np.float64)
    y = cells.labels[idx]
    codes = [c for c in range(C) if (y == c).sum() >= 2]
    return {
        "threshold": float(np.quantile(scores, quantile)),
        "quantile": quantile,
        "median": float(np.median(scores)),
        "statistic": "unexplained count fraction",
        "n_cells": len(idx),
        # per-type latent moments: what a query adding types replays
        "latent_codes": codes,
        "latent_means": [z[y == c].mean(0).tolist() for c in codes],
        "latent_sds": [z[y == c].std(0).tolist() for c in codes],
    }


def novelty_scores(model, adata, indices, batch_size: int | None) -> np.ndarray:
    """The unexplained count fraction of each cell over the reference's threshold."""
    if not model.reference_stats or "threshold" not in model.reference_stats:
        raise InputError(
            "model",
            "no reference statistics",
            "novelty scores need a "
            "model trained on labelled cells (or a query model built from "
            "one)",
            "train the reference SCANVI first",
        )
    scores = unexplained(model, model._cells_for(adata), indices, batch_size)
    return scores / model.reference_stats["threshold"]

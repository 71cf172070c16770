"""The losses as pure functions: ``(params, state, batch, rng, kl_weight) -> (loss, aux)``.

`common` holds what both models use, `scvi` the scVI bound (and its
per-cell terms and importance weights), `scanvi` scANVI's bounds,
`class_grid` their class terms for every class at once, `hierarchy` the
class terms of cells labelled at inner nodes of a tree.
"""

from .class_grid import class_bounds
from .common import (
    ExtraTerm,
    LossAux,
    add_extra_terms,
    forward,
    kl_library,
    kl_z,
    reconstruction_loss,
    term_weight,
    weighted_mean,
)
from .hierarchy import label_mask, subtree_bound, subtree_cross_entropy
from .scanvi import (
    classification_loss,
    labelled_bound,
    marginal_bound,
    replay_loss,
    scanvi_elbo,
    scanvi_elbo_terms,
    scanvi_log_importance_weights,
    scanvi_per_cell,
)
from .scvi import elbo_terms, log_importance_weights, scvi_elbo, scvi_per_cell, scvi_terms

__all__ = [
    "ExtraTerm",
    "LossAux",
    "add_extra_terms",
    "class_bounds",
    "classification_loss",
    "elbo_terms",
    "forward",
    "kl_library",
    "kl_z",
    "label_mask",
    "labelled_bound",
    "log_importance_weights",
    "marginal_bound",
    "reconstruction_loss",
    "replay_loss",
    "scanvi_elbo",
    "scanvi_elbo_terms",
    "scanvi_log_importance_weights",
    "scanvi_per_cell",
    "scvi_elbo",
    "scvi_per_cell",
    "scvi_terms",
    "subtree_bound",
    "subtree_cross_entropy",
    "term_weight",
    "weighted_mean",
]

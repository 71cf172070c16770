r"""The scVI ELBO (and, in `scanvi_losses`, scANVI's) as pure functions.

Per cell n, with q(z|x) = N(m, v) and the prior p(z) = N(0, I):

.. math::
    \text{reconstruction}_n = -\log p(x_n \mid z_n, \ell_n, s_n), \qquad
    \text{KL}^z_n = \mathrm{KL}(q(z_n|x_n)\,\|\,N(0, I)),

    \text{KL}^\ell_n = \mathrm{KL}(q(\ell_n|x_n)\,\|\,LogNormal(\mu_{s_n}, \sigma^2_{s_n}))
    \quad\text{(only with a learned library)},

    \text{loss} = \frac{1}{B}\sum_n \big[\text{reconstruction}_n + \beta\,\text{KL}^z_n
    + \text{KL}^\ell_n\big]

with the warm-up weight :math:`\beta` applied to the z term only, as in
scvi-tools. ``elbo`` below is the unweighted negative ELBO per cell.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .data.batch import Batch
from .distributions import kl_normal, kl_standard_normal, log_nb, log_poisson, log_zinb
from .module import VAE


class LossAux(NamedTuple):
    """What a loss function returns beside the scalar loss."""

    terms: dict[str, jax.Array]   # per-term means over the minibatch's cells
    state: Any                    # updated mutable collections (batch statistics)
    outputs: dict[str, jax.Array]  # forward outputs, for extra loss terms


def weighted_mean(v, weight):
    """Mean of per-cell values over real (weight 1) cells."""
    return (v * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def reconstruction_loss(outputs: dict, batch: Batch, gene_likelihood: str, *,
                        sparse: bool = True):
    """-log p(x | z, l) per cell, (B,) (or (S, B) for S posterior samples)."""
    nz = batch.nz if sparse and outputs["log_mu"].ndim == 2 else None
    x = batch.x
    if gene_likelihood == "zinb":
        ll = log_zinb(x, outputs["log_mu"], outputs["log_theta"], outputs["zi_logits"],
                      nz=nz, lgamma_const=batch.lgamma_const)
    elif gene_likelihood == "nb":
        ll = log_nb(x, outputs["log_mu"], outputs["log_theta"], nz=nz,
                    lgamma_const=batch.lgamma_const)
    else:
        ll = log_poisson(x, outputs["log_mu"], lgamma_const=batch.lgamma_const)
    return -ll


def kl_z(outputs: dict):
    """KL(q(z|x) || N(0, I)) per cell, summed over latent dimensions."""
    return kl_standard_normal(outputs["qz_m"], outputs["qz_v"]).sum(-1)


def kl_library(outputs: dict, batch: Batch, library_log_means, library_log_vars):
    """KL(q(l|x) || N(mu_s, var_s)) per cell; zero with the observed library."""
    if "ql_m" not in outputs:
        return jnp.zeros_like(batch.log_library)
    m = library_log_means[batch.batch]
    v = library_log_vars[batch.batch]
    return kl_normal(outputs["ql_m"], outputs["ql_v"], m, v)


def scvi_terms(module: VAE, outputs: dict, batch: Batch, state: dict, *,
               sparse: bool = True) -> dict[str, jax.Array]:
    """Per-cell reconstruction loss and KL terms, each (B,)."""
    rec = reconstruction_loss(outputs, batch, module.config.gene_likelihood, sparse=sparse)
    const = state.get("constants", {})
    kl_l = kl_library(outputs, batch, const.get("library_log_means"),
                      const.get("library_log_vars"))
    return {"reconstruction_loss": rec, "kl_z": kl_z(outputs), "kl_l": kl_l}


def forward(module, params, state, batch: Batch, rng, *, train: bool, **kwargs):
    """Run the module; returns (outputs, updated mutable state)."""
    k_sample, k_dropout = jax.random.split(rng)
    variables = {"params": params, **state}
    if train:
        outputs, mutated = module.apply(
            variables, batch, train=True, rngs={"sample": k_sample, "dropout": k_dropout},
            mutable=["batch_stats"], **kwargs)
        return outputs, {**state, **mutated}
    outputs = module.apply(variables, batch, train=False, rngs={"sample": k_sample},
                           **kwargs)
    return outputs, state


ExtraTerm = Callable[[dict, Batch, Any], jax.Array]


def add_extra_terms(loss, terms, outputs, batch, params, extra_terms, extra_weights):
    """Add user loss terms fn(outputs, batch, params) -> scalar, each times its weight."""
    for name, fn in (extra_terms or {}).items():
        value = fn(outputs, batch, params)
        terms[name] = value
        loss = loss + extra_weights[name] * value
    return loss, terms


def scvi_elbo(module: VAE, params, state, batch: Batch, rng, kl_weight, *,
              train: bool = True, sparse: bool = True, extra_terms=None,
              extra_weights=None):
    """scVI loss: (params, state, batch, rng, kl_weight) -> (loss, LossAux).

    ``LossAux.terms`` holds per-term means over the minibatch: ``loss``,
    ``elbo`` (unweighted negative ELBO), ``reconstruction_loss``, ``kl_local``,
    ``kl_z``, ``kl_l``, plus any extra terms by name.
    """
    outputs, new_state = forward(module, params, state, batch, rng, train=train)
    t = scvi_terms(module, outputs, batch, state, sparse=sparse)
    w = batch.weight
    per_cell = t["reconstruction_loss"] + kl_weight * t["kl_z"] + t["kl_l"]
    loss = weighted_mean(per_cell, w)
    kl_local = t["kl_z"] + t["kl_l"]
    terms = {
        "elbo": weighted_mean(t["reconstruction_loss"] + kl_local, w),
        "reconstruction_loss": weighted_mean(t["reconstruction_loss"], w),
        "kl_local": weighted_mean(kl_local, w),
        "kl_z": weighted_mean(t["kl_z"], w),
        "kl_l": weighted_mean(t["kl_l"], w),
    }
    loss, terms = add_extra_terms(loss, terms, outputs, batch, params, extra_terms,
                                  extra_weights)
    terms["loss"] = loss
    return loss, LossAux(terms, new_state, outputs)

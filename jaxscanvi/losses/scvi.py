r"""The scVI ELBO (scANVI's is in `losses.scanvi`) as pure functions.

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

import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..distributions import normal_log_prob
from ..module import VAE
from .common import (
    LossAux,
    add_extra_terms,
    forward,
    kl_library,
    kl_z,
    reconstruction_loss,
    weighted_mean,
)


def scvi_terms(
    module: VAE, outputs: dict, batch: Batch, state: dict, *, sparse: bool = True
) -> dict[str, jax.Array]:
    """Per-cell reconstruction loss and KL terms, each (B,)."""
    rec = reconstruction_loss(outputs, batch, module.config.gene_likelihood, sparse=sparse)
    const = state.get("constants", {})
    kl_l = kl_library(outputs, batch, const.get("library_log_means"), const.get("library_log_vars"))
    return {"reconstruction_loss": rec, "kl_z": kl_z(outputs), "kl_l": kl_l}


def scvi_per_cell(
    module: VAE,
    params,
    state,
    batch: Batch,
    rng,
    *,
    train: bool = False,
    sparse: bool = True,
    sample: bool = True,
):
    """Per-cell scVI terms, each (B,): ``reconstruction_loss``, ``kl_z``, ``kl_l``,
    ``kl_local`` (= kl_z + kl_l) and ``elbo`` (the negative ELBO, rec + kl_local).

    Returns ``(terms, outputs, new_state)``. ``sample=False`` evaluates the
    bound at the posterior means instead of at a sample (deterministic; what
    the parity tests compare).
    """
    outputs, new_state = forward(module, params, state, batch, rng, train=train, sample=sample)
    t = scvi_terms(module, outputs, batch, state, sparse=sparse)
    t["kl_local"] = t["kl_z"] + t["kl_l"]
    t["elbo"] = t["reconstruction_loss"] + t["kl_local"]
    return t, outputs, new_state


def scvi_elbo(  # noqa: PLR0913 - the loss signature, then keyword options
    module: VAE,
    params,
    state,
    batch: Batch,
    rng,
    kl_weight,
    *,
    train: bool = True,
    sparse: bool = True,
    extra_terms=None,
    extra_weights=None,
    step=None,
):
    """scVI loss: (params, state, batch, rng, kl_weight) -> (loss, LossAux).

    ``LossAux.terms`` holds per-term means over the minibatch: ``loss``,
    ``elbo`` (unweighted negative ELBO), ``reconstruction_loss``, ``kl_local``,
    ``kl_z``, ``kl_l``, plus any extra terms by name. ``step`` (the global
    optimisation step) is what weight schedules of extra terms are evaluated at.
    """
    t, outputs, new_state = scvi_per_cell(
        module, params, state, batch, rng, train=train, sparse=sparse
    )
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
    loss, terms = add_extra_terms(
        loss, terms, outputs, batch, params, extra_terms, extra_weights, step
    )
    terms["loss"] = loss
    return loss, LossAux(terms, new_state, outputs)


# --------------------------------------------- per-cell kernels for inference
def elbo_terms(module, variables, batch: Batch, key):
    """Each cell's reconstruction loss and local KL (scVI's terms, dense likelihood),
    what ``get_elbo`` and ``get_reconstruction_error`` average."""
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    outputs, _ = forward(module, params, state, batch, key, train=False)
    t = scvi_terms(module, outputs, batch, state, sparse=False)
    return {"reconstruction_loss": t["reconstruction_loss"], "kl_local": t["kl_z"] + t["kl_l"]}


def log_importance_weights(module, variables, batch: Batch, key, *, n_samples: int):
    """log p(x|z,l) + log p(z) + log p(l) - log q(z|x) - log q(l|x), as (B, S)."""
    outputs = module.apply(variables, batch, train=False, rngs={"sample": key}, n_samples=n_samples)
    rec = reconstruction_loss(outputs, batch, module.config.gene_likelihood, sparse=False)
    z = outputs["untran_z"]
    log_pz = normal_log_prob(z, 0.0, 1.0).sum(-1)
    log_qz = normal_log_prob(z, outputs["qz_m"], outputs["qz_v"]).sum(-1)
    logw = -rec + log_pz - log_qz
    if "ql_m" in outputs:
        const = variables["constants"]
        lib = outputs["library"]
        m = const["library_log_means"][batch.batch]
        v = const["library_log_vars"][batch.batch]
        logw = (
            logw
            + normal_log_prob(lib, m, v)
            - normal_log_prob(lib, outputs["ql_m"], outputs["ql_v"])
        )
    return jnp.atleast_2d(logw).T  # (B, S); with n_samples=1 logw is (B,)

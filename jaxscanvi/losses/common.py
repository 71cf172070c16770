"""What the scVI and scANVI losses share: the count likelihood, the KLs, the
forward pass and user-added terms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..distributions import (
    kl_normal,
    kl_standard_normal,
    log_nb,
    log_poisson,
    log_zinb,
    sparse_pays,
)


class LossAux(NamedTuple):
    """What a loss function returns beside the scalar loss."""

    terms: dict[str, jax.Array]  # per-term means over the minibatch's cells
    state: Any  # updated mutable collections (batch statistics)
    outputs: dict[str, jax.Array]  # forward outputs, for extra loss terms


def weighted_mean(v, weight):
    """Mean of per-cell values over real (weight 1) cells."""
    return (v * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def reconstruction_loss(outputs: dict, batch: Batch, gene_likelihood: str, *, sparse: bool = True):
    """-log p(x | z, l) per cell, (B,) (or (S, B) for S posterior samples)."""
    # None: dense (also where the fused dense pass is the faster one)
    nz = batch.nz if sparse and sparse_pays() and outputs["log_mu"].ndim == 2 else None
    x = batch.x
    if gene_likelihood == "zinb":
        ll = log_zinb(
            x,
            outputs["log_mu"],
            outputs["log_theta"],
            outputs["zi_logits"],
            nz=nz,
            lgamma_const=batch.lgamma_const,
        )
    elif gene_likelihood == "nb":
        ll = log_nb(
            x, outputs["log_mu"], outputs["log_theta"], nz=nz, lgamma_const=batch.lgamma_const
        )
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


def forward(module, params, state, batch: Batch, rng, *, train: bool, **kwargs):
    """Run the module; returns (outputs, updated mutable state)."""
    k_sample, k_dropout = jax.random.split(rng)
    variables = {"params": params, **state}
    if train:
        outputs, mutated = module.apply(
            variables,
            batch,
            train=True,
            rngs={"sample": k_sample, "dropout": k_dropout},
            mutable=["batch_stats"],
            **kwargs,
        )
        return outputs, {**state, **mutated}
    outputs = module.apply(variables, batch, train=False, rngs={"sample": k_sample}, **kwargs)
    return outputs, state


ExtraTerm = Callable[[dict, Batch, Any], jax.Array]


def term_weight(weight, step):
    """A loss weight at a training step: a number, or a schedule ``weight(step)``
    (optax's convention, e.g. ``optax.linear_schedule(0.0, 10.0, 2000)``)."""
    if callable(weight):
        return jnp.asarray(weight(jnp.asarray(0 if step is None else step)), jnp.float32)
    return jnp.asarray(weight, jnp.float32)


def add_extra_terms(loss, terms, outputs, batch, params, extra_terms, extra_weights, step=None):
    """Add user loss terms fn(outputs, batch, params) -> scalar, each times its weight.

    Each term's value goes into ``terms[name]`` and its weight at this step
    into ``terms[name + "_weight"]``, so both reach the history.
    """
    for name, fn in (extra_terms or {}).items():
        value = jnp.asarray(fn(outputs, batch, params), jnp.float32)
        w = term_weight((extra_weights or {}).get(name, 1.0), step)
        terms[name] = value
        terms[f"{name}_weight"] = w
        loss = loss + w * value
    return loss, terms

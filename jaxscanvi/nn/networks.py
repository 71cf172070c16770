"""Encoder, decoders and classifier with scvi-tools' architecture.

Each is a pure linen module: ``module.apply(variables, inputs, train=...)``.
A user may swap any of them for a module with the same call signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import Dense, FCLayers


class Encoder(nn.Module):
    """q(z | x): FCLayers then a mean head and a variance head.

    Returns ``(mean, var)``; var = exp(head) + var_eps, as in scvi-tools.
    ``keep_masks`` are `FCLayers`' (dropout keep-masks drawn by the caller).
    """

    n_out: int
    n_cats: Sequence[int] = ()
    n_layers: int = 1
    n_hidden: int = 128
    dropout_rate: float = 0.1
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    inject_covariates: bool = True
    var_eps: float = 1e-4
    bn_axis_name: str | None = None
    bn_frozen: bool = False

    @nn.compact
    def __call__(self, x, cats=(), *, train: bool, mask=None, keep_masks=None):
        h = FCLayers(
            self.n_hidden,
            self.n_cats,
            self.n_layers,
            self.n_hidden,
            self.dropout_rate,
            self.use_batch_norm,
            self.use_layer_norm,
            self.inject_covariates,
            self.bn_axis_name,
            self.bn_frozen,
            name="encoder",
        )(x, cats, train=train, mask=mask, keep_masks=keep_masks)
        mean = Dense(self.n_out, name="mean")(h)
        var = jnp.exp(Dense(self.n_out, name="var")(h)) + self.var_eps
        return mean, var


class DecoderSCVI(nn.Module):
    """p(x | z, s): hidden layers, then per-gene heads.

    Returns ``(log_scale, log_theta_cell, zi_logits)``: the log of the
    normalised expression (log-softmax, or log-softplus with size factors),
    the per-cell dispersion head (used only by dispersion="gene-cell"), and
    the zero-inflation logits.
    """

    n_genes: int
    n_cats: Sequence[int] = ()
    n_layers: int = 1
    n_hidden: int = 128
    use_batch_norm: bool = False
    use_layer_norm: bool = False
    inject_covariates: bool = True
    scale_activation: str = "softmax"
    need_theta: bool = False
    need_dropout: bool = True
    bn_frozen: bool = False

    @nn.compact
    def __call__(self, z, cats=(), *, train: bool, mask=None):
        h = FCLayers(
            self.n_hidden,
            self.n_cats,
            self.n_layers,
            self.n_hidden,
            0.0,
            self.use_batch_norm,
            self.use_layer_norm,
            self.inject_covariates,
            bn_frozen=self.bn_frozen,
            name="px_decoder",
        )(z, cats, train=train, mask=mask)
        logits = Dense(self.n_genes, name="px_scale_decoder")(h)
        if self.scale_activation == "softmax":
            log_scale = jax.nn.log_softmax(logits, axis=-1)
        else:
            log_scale = jnp.log(jax.nn.softplus(logits))
        log_theta = Dense(self.n_genes, name="px_r_decoder")(h) if self.need_theta else None
        zi = Dense(self.n_genes, name="px_dropout_decoder")(h) if self.need_dropout else None
        return log_scale, log_theta, zi


class Decoder(nn.Module):
    """p(z1 | z2, c) of scANVI: FCLayers (no dropout), mean and variance heads.

    Returns ``(mean, var)`` with var = exp(head), as scvi-tools' Decoder.
    """

    n_out: int
    n_cats: Sequence[int] = ()
    n_layers: int = 1
    n_hidden: int = 128
    use_batch_norm: bool = False
    use_layer_norm: bool = False
    bn_axis_name: str | None = None
    bn_frozen: bool = False

    @nn.compact
    def __call__(self, x, cats=(), *, train: bool, mask=None):
        h = FCLayers(
            self.n_hidden,
            self.n_cats,
            self.n_layers,
            self.n_hidden,
            0.0,
            self.use_batch_norm,
            self.use_layer_norm,
            True,
            self.bn_axis_name,
            self.bn_frozen,
            name="decoder",
        )(x, cats, train=train, mask=mask)
        mean = Dense(self.n_out, name="mean")(h)
        var = jnp.exp(Dense(self.n_out, name="var")(h))
        return mean, var


class Classifier(nn.Module):
    """q(c | z): FCLayers then a linear layer to logits; n_layers=0 is linear."""

    n_labels: int
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    bn_frozen: bool = False

    @nn.compact
    def __call__(self, z, *, train: bool, mask=None):
        h = z
        if self.n_layers > 0:
            h = FCLayers(
                self.n_hidden,
                (),
                self.n_layers,
                self.n_hidden,
                self.dropout_rate,
                self.use_batch_norm,
                self.use_layer_norm,
                bn_frozen=self.bn_frozen,
                name="classifier",
            )(h, (), train=train, mask=mask)
        return Dense(self.n_labels, name="logits")(h)

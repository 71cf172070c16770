"""The scVI generative model and inference networks as one linen module.

``VAE.__call__`` runs inference then generation and returns a dict of
outputs (latent samples and moments, library, decoder parameters). The loss
lives in `losses`, as pure functions of these outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..errors import InputError
from ..nn import prng
from ..nn.init import Normal
from ..nn.networks import DecoderSCVI, Encoder

Dispersion = Literal["gene", "gene-batch", "gene-label", "gene-cell"]
Likelihood = Literal["zinb", "nb", "poisson"]
NormChoice = Literal["encoder", "decoder", "none", "both"]


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an scVI model (scvi-tools' defaults)."""

    n_genes: int
    n_batch: int = 1
    n_labels: int = 1
    n_cats_per_cov: tuple[int, ...] = ()
    n_continuous_cov: int = 0
    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    dispersion: Dispersion = "gene"
    gene_likelihood: Likelihood = "zinb"
    latent_distribution: Literal["normal", "ln"] = "normal"
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: NormChoice = "both"
    use_layer_norm: NormChoice = "none"
    use_observed_lib_size: bool = True
    use_size_factor_key: bool = False
    log_variational: bool = True
    # modules whose batch norm uses its running statistics even in training
    # (set by query surgery for frozen batch norms)
    frozen_batchnorm: tuple[str, ...] = ()

    def __post_init__(self):
        validate_choice(
            "dispersion", self.dispersion, ("gene", "gene-batch", "gene-label", "gene-cell")
        )
        validate_choice("gene_likelihood", self.gene_likelihood, ("zinb", "nb", "poisson"))
        validate_choice("latent_distribution", self.latent_distribution, ("normal", "ln"))
        validate_choice(
            "use_batch_norm", self.use_batch_norm, ("encoder", "decoder", "none", "both")
        )
        validate_choice(
            "use_layer_norm", self.use_layer_norm, ("encoder", "decoder", "none", "both")
        )
        for name in ("n_hidden", "n_latent", "n_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(
                    name, v, "must be a positive integer", f"pass e.g. {name}={VAE_DEFAULTS[name]}"
                )
        if not (isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1):
            raise InputError(
                "dropout_rate",
                self.dropout_rate,
                "must lie in [0, 1)",
                "pass e.g. dropout_rate=0.1",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        d = dict(d)
        d["n_cats_per_cov"] = tuple(d.get("n_cats_per_cov", ()))
        d["frozen_batchnorm"] = tuple(d.get("frozen_batchnorm", ()))
        return cls(**d)

    def norm_flags(self) -> tuple[bool, bool, bool, bool]:
        bn, ln = self.use_batch_norm, self.use_layer_norm
        return (
            bn in ("encoder", "both"),
            bn in ("decoder", "both"),
            ln in ("encoder", "both"),
            ln in ("decoder", "both"),
        )


VAE_DEFAULTS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}


def validate_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(
            name,
            value,
            f"not one of {list(allowed)}",
            f"pass one of {', '.join(map(repr, allowed))}",
        )


class Generative(TypedDict):
    """What `VAE.generative` returns: the decoder's outputs for ``z``."""

    log_scale: jax.Array
    log_mu: jax.Array
    log_theta: jax.Array | None  # None for a Poisson likelihood
    zi_logits: jax.Array | None  # None unless the likelihood is zero-inflated


class VAE(nn.Module):
    """scVI: q(z|x) q(l|x) and p(x | z, l, s). See scvi-tools' VAE.

    ``encoder_cls`` and ``decoder_cls`` swap the networks of q(z|x) and p(x|z, l, s)
    for a user's: each is called with the `VAEConfig` and must return a linen
    module with the call signature of `Encoder` or `DecoderSCVI` (see the
    README's "Research API").
    """

    config: VAEConfig
    encoder_cls: Callable[[VAEConfig], nn.Module] | None = None
    decoder_cls: Callable[[VAEConfig], nn.Module] | None = None

    def setup(self):
        c = self.config
        bn_enc, bn_dec, ln_enc, ln_dec = c.norm_flags()
        cat_list = (c.n_batch, *tuple(c.n_cats_per_cov))
        enc_cats = cat_list if c.encode_covariates else ()
        frozen = set(c.frozen_batchnorm)
        if self.encoder_cls is not None:
            self.z_encoder = self.encoder_cls(c)
        else:
            self.z_encoder = Encoder(
                c.n_latent,
                enc_cats,
                c.n_layers,
                c.n_hidden,
                c.dropout_rate,
                bn_enc,
                ln_enc,
                c.deeply_inject_covariates,
                bn_frozen="z_encoder" in frozen,
            )
        if not c.use_observed_lib_size:
            self.l_encoder = Encoder(
                1,
                enc_cats,
                1,
                c.n_hidden,
                c.dropout_rate,
                bn_enc,
                ln_enc,
                c.deeply_inject_covariates,
                bn_frozen="l_encoder" in frozen,
            )
        if self.decoder_cls is not None:
            self.decoder = self.decoder_cls(c)
        else:
            self.decoder = DecoderSCVI(
                c.n_genes,
                cat_list,
                c.n_layers,
                c.n_hidden,
                bn_dec,
                ln_dec,
                c.deeply_inject_covariates,
                scale_activation="softplus" if c.use_size_factor_key else "softmax",
                need_theta=c.dispersion == "gene-cell",
                need_dropout=c.gene_likelihood == "zinb",
                bn_frozen="decoder" in frozen,
            )
        shape = {
            "gene": (c.n_genes,),
            "gene-batch": (c.n_genes, c.n_batch),
            "gene-label": (c.n_genes, c.n_labels),
            "gene-cell": None,
        }[c.dispersion]
        if shape is not None and c.gene_likelihood != "poisson":
            self.px_r = self.param("px_r", Normal(1.0), shape)

    def _cats(self, batch: Batch):
        return (batch.batch, *tuple(batch.cat_covs[:, j] for j in range(batch.cat_covs.shape[1])))

    def _encoder_input(self, batch: Batch):
        c = self.config
        # log(1 + x) is log1p(x) bit for bit on counts (1 + x is exact; within
        # 1e-7 otherwise) and costs half of XLA's CPU log1p
        x_ = jnp.log(1.0 + batch.x) if c.log_variational else batch.x
        if c.encode_covariates and c.n_continuous_cov:
            x_ = jnp.concatenate([x_, batch.cont_covs], axis=-1)
        cats = self._cats(batch) if c.encode_covariates else ()
        return x_, cats

    def encode_z(self, batch: Batch, *, train: bool):
        """Moments (mean, var) of q(z | x)."""
        x_, cats = self._encoder_input(batch)
        return self.z_encoder(x_, cats, train=train, mask=batch.weight)

    def inference(
        self, batch: Batch, *, train: bool, n_samples: int = 1, sample: bool = True
    ) -> dict[str, jax.Array]:
        """q(z|x) and q(l|x): moments and a sample (the means with ``sample=False``)."""
        c = self.config
        x_, cats = self._encoder_input(batch)
        qz_m, qz_v = self.z_encoder(x_, cats, train=train, mask=batch.weight)
        shape = qz_m.shape if n_samples == 1 else (n_samples, *qz_m.shape)
        eps = (
            prng.normal(self.make_rng("sample"), shape, qz_m.dtype)
            if sample
            else jnp.zeros(shape, qz_m.dtype)
        )
        untran_z = qz_m + jnp.sqrt(qz_v) * eps
        z = jax.nn.softmax(untran_z, -1) if c.latent_distribution == "ln" else untran_z
        out = {"qz_m": qz_m, "qz_v": qz_v, "untran_z": untran_z, "z": z}
        if c.use_observed_lib_size:
            library = batch.log_library
            if n_samples > 1:
                library = jnp.broadcast_to(library, (n_samples, *library.shape))
        else:
            ql_m, ql_v = self.l_encoder(x_, cats, train=train, mask=batch.weight)
            ql_m, ql_v = ql_m[..., 0], ql_v[..., 0]
            shape = ql_m.shape if n_samples == 1 else (n_samples, *ql_m.shape)
            eps_l = (
                prng.normal(self.make_rng("sample"), shape, ql_m.dtype)
                if sample
                else jnp.zeros(shape, ql_m.dtype)
            )
            library = ql_m + jnp.sqrt(ql_v) * eps_l
            out.update(ql_m=ql_m, ql_v=ql_v)
        out["library"] = library
        return out

    def generative(self, z, library, batch: Batch, *, train: bool, batch_index=None) -> Generative:
        c = self.config
        b = batch.batch if batch_index is None else batch_index
        cats = (b, *tuple(batch.cat_covs[:, j] for j in range(batch.cat_covs.shape[1])))
        dec_in = z
        if c.n_continuous_cov:
            cont = jnp.broadcast_to(batch.cont_covs, z.shape[:-1] + batch.cont_covs.shape[-1:])
            dec_in = jnp.concatenate([z, cont], axis=-1)
        if z.ndim == 3:  # (S, B, L): run the decoder on S*B rows
            S, B = z.shape[:2]
            flat = dec_in.reshape(S * B, -1)
            fcats = tuple(jnp.tile(k, S) for k in cats)
            outs = self.decoder(flat, fcats, train=train, mask=jnp.tile(batch.weight, S))
            log_scale, theta_cell, zi = (None if o is None else o.reshape(S, B, -1) for o in outs)
        else:
            log_scale, theta_cell, zi = self.decoder(dec_in, cats, train=train, mask=batch.weight)
        assert log_scale is not None  # the decoder always returns the scale
        size = batch.log_size_factor if c.use_size_factor_key else library
        log_mu = log_scale + size[..., None]
        if c.dispersion == "gene":
            log_theta = self.px_r if c.gene_likelihood != "poisson" else None
        elif c.dispersion == "gene-batch":
            log_theta = jnp.take(self.px_r, b, axis=1).T if c.gene_likelihood != "poisson" else None
        elif c.dispersion == "gene-label":
            lab = jnp.minimum(batch.labels, c.n_labels - 1)
            log_theta = (
                jnp.take(self.px_r, lab, axis=1).T if c.gene_likelihood != "poisson" else None
            )
        else:
            log_theta = theta_cell
        return {"log_scale": log_scale, "log_mu": log_mu, "log_theta": log_theta, "zi_logits": zi}

    def __call__(self, batch: Batch, *, train: bool, n_samples: int = 1, sample: bool = True):
        inf = self.inference(batch, train=train, n_samples=n_samples, sample=sample)
        gen = self.generative(inf["z"], inf["library"], batch, train=train)
        return {**inf, **gen}

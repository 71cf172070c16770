"""scANVI's module: scVI plus q(c|z), q(u|z,c) and p(z|u,c).

Names follow scvi-tools: z1 is the cell state z, z2 is the within-type state
u, c (``y``) the cell type. Parameters shared with scVI keep scVI's paths, so
`SCANVI.from_scvi_model` copies them by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..distributions import kl_standard_normal, normal_log_prob
from ..errors import InputError
from .vae import VAE, VAEConfig
from ..nn import prng
from ..nn.networks import Classifier, Decoder, Encoder


@dataclass(frozen=True)
class SCANVIConfig(VAEConfig):
    """scVI's architecture plus the classifier and the class-conditional prior.

    ``n_labels`` counts the cell types (the unlabelled category excluded).
    ``classifier_use_batch_norm``/``layer_norm`` default to the encoder's.
    """

    classifier_n_hidden: int = 128
    classifier_n_layers: int = 1
    classifier_dropout_rate: float = 0.1
    classifier_use_batch_norm: bool | None = None
    classifier_use_layer_norm: bool | None = None
    y_prior: tuple[float, ...] | None = None
    class_chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.n_labels < 2:
            raise InputError("labels", self.n_labels, "scANVI needs at least two labelled "
                             "cell types", "label cells of at least two types")
        if self.y_prior is not None:
            p = self.y_prior
            if len(p) != self.n_labels or min(p) <= 0:
                raise InputError("y_prior", list(p)[:10], f"must have {self.n_labels} "
                                 "positive entries (one per cell type)",
                                 "pass a positive vector, or None for uniform")
        if not isinstance(self.class_chunk_size, int) or self.class_chunk_size <= 0:
            raise InputError("class_chunk_size", self.class_chunk_size,
                             "must be a positive integer", "pass e.g. 64")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SCANVIConfig:
        d = dict(d)
        d["n_cats_per_cov"] = tuple(d.get("n_cats_per_cov", ()))
        d["frozen_batchnorm"] = tuple(d.get("frozen_batchnorm", ()))
        if d.get("y_prior") is not None:
            d["y_prior"] = tuple(d["y_prior"])
        return cls(**d)

    def log_prior(self):
        if self.y_prior is None:
            return jnp.full((self.n_labels,), -jnp.log(float(self.n_labels)))
        p = jnp.asarray(self.y_prior, jnp.float32)
        return jnp.log(p / p.sum())

    def classifier_flags(self) -> tuple[bool, bool]:
        bn_enc, _, ln_enc, _ = self.norm_flags()
        bn = bn_enc if self.classifier_use_batch_norm is None else self.classifier_use_batch_norm
        ln = ln_enc if self.classifier_use_layer_norm is None else self.classifier_use_layer_norm
        return bn, ln

    def vae_config(self) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(VAEConfig)}
        return VAEConfig(**{k: v for k, v in self.to_dict().items() if k in names})


class SCANVAE(VAE):
    """scANVI. ``class_axis`` names the vmapped class axis for batch statistics."""

    config: SCANVIConfig
    class_axis: str | None = None

    def setup(self):
        super().setup()
        c = self.config
        bn_enc, bn_dec, ln_enc, ln_dec = c.norm_flags()
        cls_bn, cls_ln = c.classifier_flags()
        frozen = set(c.frozen_batchnorm)
        self.classifier = Classifier(c.n_labels, c.classifier_n_hidden, c.classifier_n_layers,
                                     c.classifier_dropout_rate, cls_bn, cls_ln,
                                     bn_frozen="classifier" in frozen)
        self.encoder_z2_z1 = Encoder(c.n_latent, (c.n_labels,), c.n_layers, c.n_hidden,
                                     c.dropout_rate, bn_enc, ln_enc, True,
                                     bn_axis_name=self.class_axis,
                                     bn_frozen="encoder_z2_z1" in frozen)
        self.decoder_z1_z2 = Decoder(c.n_latent, (c.n_labels,), c.n_layers, c.n_hidden,
                                     bn_dec, ln_dec, bn_axis_name=self.class_axis,
                                     bn_frozen="decoder_z1_z2" in frozen)

    def classify(self, batch: Batch, *, train: bool, use_posterior_mean: bool = True):
        """Logits of q(c | z), z the posterior mean of q(z|x) (or a sample)."""
        qz_m, qz_v = self.encode_z(batch, train=train)
        z = qz_m
        if not use_posterior_mean:
            z = qz_m + jnp.sqrt(qz_v) * prng.normal(self.make_rng("sample"), qz_m.shape)
            if self.config.latent_distribution == "ln":
                z = jax.nn.softmax(z, -1)
        return self.classifier(z, train=train, mask=batch.weight)

    def class_bound(self, z1, c, mask, *, train: bool, sample: bool = True):
        """Per-cell -log p(z1 | u, c) and KL(q(u | z1, c) || N(0, I)) for one class c.

        u is a sample of q(u | z1, c), or its mean with ``sample=False``.
        """
        codes = jnp.full(z1.shape[:1], c, jnp.int32)
        m2, v2 = self.encoder_z2_z1(z1, (codes,), train=train, mask=mask)
        z2 = m2 + jnp.sqrt(v2) * prng.normal(self.make_rng("sample"), m2.shape) \
            if sample else m2
        pm, pv = self.decoder_z1_z2(z2, (codes,), train=train, mask=mask)
        nll_z1 = -normal_log_prob(z1, pm, pv).sum(-1)
        kl_z2 = kl_standard_normal(m2, v2).sum(-1)
        return nll_z1, kl_z2

    def __call__(self, batch: Batch, *, train: bool, n_samples: int = 1, sample: bool = True):
        out = super().__call__(batch, train=train, n_samples=n_samples, sample=sample)
        if n_samples == 1:
            out["logits_z"] = self.classifier(out["z"], train=train, mask=batch.weight)
        if self.is_initializing():
            self.class_bound(out["z"], 0, batch.weight, train=False)
        return out

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

from ..data import hierarchy
from ..data.batch import Batch
from ..distributions import kl_standard_normal, normal_log_prob
from ..errors import InputError
from ..nn import prng
from ..nn.networks import Classifier, Decoder, Encoder
from .vae import VAE, VAEConfig


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
    # a label hierarchy: each label code's parent code (leaves, root, inner
    # nodes; the root's is -1), or None for flat labels and flat hierarchies
    # (`model._hierarchy.parents_of`)
    label_parents: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n_labels < 2:
            raise InputError(
                "labels",
                self.n_labels,
                "scANVI needs at least two labelled cell types",
                "label cells of at least two types",
            )
        if self.y_prior is not None:
            p = self.y_prior
            if len(p) != self.n_labels or min(p) <= 0:
                raise InputError(
                    "y_prior",
                    list(p)[:10],
                    f"must have {self.n_labels} positive entries (one per cell type)",
                    "pass a positive vector, or None for uniform",
                )
        if not isinstance(self.class_chunk_size, int) or self.class_chunk_size <= 0:
            raise InputError(
                "class_chunk_size",
                self.class_chunk_size,
                "must be a positive integer",
                "pass e.g. 64",
            )
        if self.label_parents is not None:
            self._check_parents(self.label_parents)

    def _check_parents(self, p: tuple[int, ...]) -> None:
        C = self.n_labels
        n = len(p)
        if (
            n <= C
            or p[C] != -1
            or sum(q == -1 for q in p) != 1
            or any(not -1 <= q < n for q in p)
            or any(0 <= q < C for q in p)
        ):
            raise InputError(
                "label_parents",
                list(p)[:10],
                f"is not a tree over {C} leaves "
                "(leaf codes, then the root with parent -1, then inner nodes)",
                "build the model from a registry set up with label_hierarchy",
            )
        if self.dispersion == "gene-label":
            raise InputError(
                "dispersion",
                "gene-label",
                "a per-label dispersion is not "
                "defined for cells labelled at inner nodes of a hierarchy",
                "use dispersion='gene' or 'gene-batch'",
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["label_parents"] is None:  # flat models write what they always wrote
            del d["label_parents"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SCANVIConfig:
        d = dict(d)
        d["n_cats_per_cov"] = tuple(d.get("n_cats_per_cov", ()))
        d["frozen_batchnorm"] = tuple(d.get("frozen_batchnorm", ()))
        for k in ("y_prior", "label_parents"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        parents = d.get("label_parents")
        if parents is not None and len(parents) == d.get("n_labels", -1) + 1:
            # a flat hierarchy's parents, in files saved before it trained as flat labels
            d["label_parents"] = None
        return cls(**d)

    def leaf_mask(self):
        """(n label codes, C) of the leaves under each code (`hierarchy.leaf_mask`)."""
        return hierarchy.leaf_mask(self.label_parents, self.n_labels)

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


def class_noise(config: SCANVIConfig, keys, n_cells: int, *, train: bool, sample: bool):
    """The random draws of `SCANVAE.class_grid` for K classes, one key each ((K,)
    keys): u's standard normal noise (K, n_cells, n_latent) when ``sample``,
    and in training q(u|z1,c)'s dropout keep-masks, one (K, n_cells, n_hidden)
    per layer. Class k's draws come from its own key alone, so a class gets
    the same draws whichever chunk of classes it is computed in."""
    rate = config.dropout_rate

    def one(key):
        k_sample, k_drop = jax.random.split(key)
        eps = prng.normal(k_sample, (n_cells, config.n_latent)) if sample else None
        keep = None
        if train and rate > 0:
            keep = tuple(
                prng.bernoulli(k, 1.0 - rate, (n_cells, config.n_hidden))
                for k in jax.random.split(k_drop, config.n_layers)
            )
        return eps, keep

    return jax.vmap(one)(keys)


class SCANVAE(VAE):
    """scANVI."""

    config: SCANVIConfig

    def setup(self):
        super().setup()
        c = self.config
        bn_enc, bn_dec, ln_enc, ln_dec = c.norm_flags()
        cls_bn, cls_ln = c.classifier_flags()
        frozen = set(c.frozen_batchnorm)
        self.classifier = Classifier(
            c.n_labels,
            c.classifier_n_hidden,
            c.classifier_n_layers,
            c.classifier_dropout_rate,
            cls_bn,
            cls_ln,
            bn_frozen="classifier" in frozen,
        )
        self.encoder_z2_z1 = Encoder(
            c.n_latent,
            (c.n_labels,),
            c.n_layers,
            c.n_hidden,
            c.dropout_rate,
            bn_enc,
            ln_enc,
            True,
            bn_frozen="encoder_z2_z1" in frozen,
        )
        self.decoder_z1_z2 = Decoder(
            c.n_latent,
            (c.n_labels,),
            c.n_layers,
            c.n_hidden,
            bn_dec,
            ln_dec,
            bn_frozen="decoder_z1_z2" in frozen,
        )

    def classify(self, batch: Batch, *, train: bool, use_posterior_mean: bool = True):
        """Logits of q(c | z), z the posterior mean of q(z|x) (or a sample)."""
        qz_m, qz_v = self.encode_z(batch, train=train)
        z = qz_m
        if not use_posterior_mean:
            z = qz_m + jnp.sqrt(qz_v) * prng.normal(self.make_rng("sample"), qz_m.shape)
            if self.config.latent_distribution == "ln":
                z = jax.nn.softmax(z, -1)
        return self.classifier(z, train=train, mask=batch.weight)

    def class_grid(self, z1, classes, mask, noise=None, *, train: bool):
        """-log p(z1 | u, c) and KL(q(u | z1, c) || N(0, I)) of every cell for each
        class c of ``classes`` (K,): two (K, B) arrays.

        The K x B (class, cell) rows go through the class networks as one
        minibatch, so batch statistics span the whole grid, as scvi-tools'
        (whose class networks see the cells stacked once per class). ``mask``
        (K, B) weighs each row in them. ``noise`` is `class_noise`'s draw for
        these classes; its u noise, or u at its mean where it has none.
        """
        K, (B, L) = classes.shape[0], z1.shape
        rows = jnp.broadcast_to(z1, (K, B, L)).reshape(K * B, L)
        codes = jnp.repeat(classes.astype(jnp.int32), B)
        w = mask.reshape(K * B)
        eps, keep = (None, None) if noise is None else noise
        if keep is not None:
            keep = tuple(k.reshape(K * B, -1) for k in keep)
        m2, v2 = self.encoder_z2_z1(rows, (codes,), train=train, mask=w, keep_masks=keep)
        z2 = m2 if eps is None else m2 + jnp.sqrt(v2) * eps.reshape(K * B, L)
        pm, pv = self.decoder_z1_z2(z2, (codes,), train=train, mask=w)
        nll_z1 = -normal_log_prob(rows, pm, pv).sum(-1)
        kl_z2 = kl_standard_normal(m2, v2).sum(-1)
        return nll_z1.reshape(K, B), kl_z2.reshape(K, B)

    def __call__(self, batch: Batch, *, train: bool, n_samples: int = 1, sample: bool = True):
        out = super().__call__(batch, train=train, n_samples=n_samples, sample=sample)
        if n_samples == 1:
            out["logits_z"] = self.classifier(out["z"], train=train, mask=batch.weight)
        if self.is_initializing():
            self.class_grid(out["z"], jnp.zeros(1, jnp.int32), batch.weight[None], train=False)
        return out

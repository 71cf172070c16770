"""Class terms for labels at any node of a cell-type hierarchy.

A cell labelled at node v sums scANVI's class terms over the leaves under v,
with q(c|z1) renormalised there; its classification term is -log of q's mass
under v. The per-cell ``mask`` (B, C) is the leaf set of its label: one-hot
for a leaf (L_S), all ones for the root or no label (L_U).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# a large finite floor for logits outside v, not -inf: softmax gives exact
# zeros there and 0 * floor stays 0 in values and gradients
_MASKED = -1e30


def label_mask(cfg, labels):
    """(B, C) mask of the leaves under each cell's label (`SCANVIConfig.leaf_mask`)."""
    codes = jnp.clip(labels, 0, len(cfg.label_parents) - 1)
    return jnp.asarray(cfg.leaf_mask())[codes]


def subtree_cross_entropy(logits, mask):
    r"""Per cell :math:`-\log \sum_{c \in v} q(c|z)` over the leaves under its label v
    (``mask`` (B, C)), and whether the top leaf lies under v (a 0/1 float)."""
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jax.nn.logsumexp(jnp.where(mask > 0, logp, _MASKED), axis=-1)
    hit = jnp.take_along_axis(mask, logits.argmax(-1)[:, None], axis=1)[:, 0]
    return ce, hit


def subtree_bound(logits, log_prior, nll_z1, kl_z2, mask):
    r"""The class terms of a cell labelled at node v, with c summed over the leaves
    under v (``mask`` (B, C), 1 there) and q(c|z1) renormalised within them:

    .. math::
        q_v(c) = \frac{q(c|z_1)\,[c \in v]}{\sum_{c' \in v} q(c'|z_1)},\quad
        \text{rec} = \sum_c q_v(c)\,[-\log p(z_1|u,c)], \quad
        \text{kl} = \sum_c q_v(c)\,\mathrm{KL}(q(u|z_1,c)\|p(u))
            + \mathrm{KL}(q_v\,\|\,p(c))

    a bound on -log p(z1, c in v). A leaf's mask (one-hot) gives
    `labelled_bound`, the root's (all ones) `marginal_bound`. Returns
    ``(rec, kl)``, each (B,).
    """
    inside = mask > 0
    masked = jnp.where(inside, logits, _MASKED)
    probs = jax.nn.softmax(masked, -1)
    log_probs = jax.nn.log_softmax(masked, -1)
    kl_c = jnp.where(inside, probs * (log_probs - log_prior), 0.0).sum(-1)
    return (probs * nll_z1).sum(-1), (probs * kl_z2).sum(-1) + kl_c

r"""scANVI's bounds (Xu et al. 2021; the user guide's L_S and L_U).

Per cell, with z1 ~ q(z1|x) and, for each class c, u ~ q(u|z1, c):

.. math::
    b_c = -\log p(z_1 \mid u, c) + \beta\,\mathrm{KL}(q(u|z_1,c)\,\|\,N(0,I))

    \mathcal{L}_S(c) = \text{rec} + \log q(z_1|x) + b_c - \beta \log p(c) + \beta\,\text{KL}^\ell

    \mathcal{L}_U = \text{rec} + \log q(z_1|x) + \sum_c q(c|z_1)\, b_c
        + \beta\,\mathrm{KL}(q(c|z_1)\,\|\,p(c)) + \beta\,\text{KL}^\ell

(these are negative bounds: lower is better). The class terms of all C cell
types run as one (class, cell) grid through the class networks, in chunks
of ``class_chunk_size`` classes by `lax.scan` so memory stays flat as C grows
(`class_grid`); the count decoder runs once per cell, never per class. The
classification loss is the cross-entropy of q(c | E[z|x]) on a minibatch of
labelled cells, times ``classification_ratio``.

``objective="seed"`` uses L_S for labelled cells of the main minibatch and
L_U for the others; ``objective="scvi-tools"`` marginalises every cell
(L_U), as scvi-tools does.

With a label hierarchy (``config.label_parents``) a cell labelled at node v
gets `subtree_bound`: the class terms summed over the leaves under v, q(c|z1)
renormalised there, and its classification term is -log of q's mass under v
(`subtree_cross_entropy`). A leaf label is L_S and the root L_U, so the flat
case is the special case of one rule; a flat hierarchy (every leaf under the
root) has no ``label_parents``, and so trains flat scANVI's program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..distributions import normal_log_prob
from ..module.scanvae import SCANVAE
from .class_grid import class_bn_layers as class_bn_layers  # re-exported
from .class_grid import class_bounds
from .common import LossAux, add_extra_terms, forward, reconstruction_loss, weighted_mean
from .hierarchy import label_mask, subtree_bound, subtree_cross_entropy
from .scvi import scvi_terms


def _merge_stats(base: dict, update: dict, names) -> dict:
    bs = dict(base.get("batch_stats", {}))
    for n in names:
        if n in update.get("batch_stats", {}):
            bs[n] = update["batch_stats"][n]
    return {**base, "batch_stats": bs}


def classification_loss(module, params, state, batch: Batch, rng, *, train: bool):
    """Cross-entropy of q(c | E[z|x]) on labelled cells; returns (ce, acc, state, logits)."""
    variables = {"params": params, **state}
    k_sample, k_dropout = jax.random.split(rng)
    kw = dict(rngs={"sample": k_sample, "dropout": k_dropout}, method=SCANVAE.classify)
    if train:
        logits, upd = module.apply(variables, batch, train=True, mutable=["batch_stats"], **kw)
        state = {**state, **upd}
    else:
        logits = module.apply(variables, batch, train=False, **kw)
    cfg = module.config
    if cfg.label_parents is not None:
        ce_cell, hit = subtree_cross_entropy(logits, label_mask(cfg, batch.labels))
        w = batch.weight * (batch.labels != cfg.n_labels)
        return weighted_mean(ce_cell, w), weighted_mean(hit, w), state, logits
    labels = jnp.minimum(batch.labels, cfg.n_labels - 1)
    logp = jax.nn.log_softmax(logits, -1)
    ce_cell = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    w = batch.weight * (batch.labels < cfg.n_labels)
    acc = weighted_mean((logits.argmax(-1) == labels).astype(jnp.float32), w)
    return weighted_mean(ce_cell, w), acc, state, logits


def replay_loss(module, params, state, rng, n: int, replay, *, train: bool):
    """Cross-entropy of the classifier on latent points drawn from the reference's
    cell types: z ~ N(mean_c, sd_c^2), c uniform over ``replay = (codes, means, sds)``.

    A query that adds cell types has labelled cells of the new types only;
    these replayed reference types are the negatives that keep the new
    classes from taking over the old ones' cells.
    """
    codes, means, sds = (jnp.asarray(a) for a in replay)
    k_c, k_z, k_d = jax.random.split(rng, 3)
    pick = jax.random.randint(k_c, (n,), 0, codes.shape[0])
    z = means[pick] + sds[pick] * jax.random.normal(k_z, (n, means.shape[1]))
    variables = {"params": params, **state}

    def run(mdl, z):
        return mdl.classifier(z, train=train)

    if train:
        logits, upd = module.apply(
            variables, z, method=run, rngs={"dropout": k_d}, mutable=["batch_stats"]
        )
        state = {**state, **upd}
    else:
        logits = module.apply(variables, z, method=run)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, codes[pick][:, None], axis=1).mean(), state


def marginal_bound(logits, log_prior, nll_z1, kl_z2):
    r"""L_U's class terms per cell, with c marginalised under q(c|z1):

    .. math::
        \text{rec} = \sum_c q(c|z_1)\,[-\log p(z_1|u,c)], \qquad
        \text{kl} = \sum_c q(c|z_1)\,\mathrm{KL}(q(u|z_1,c)\,\|\,p(u))
            + \mathrm{KL}(q(c|z_1)\,\|\,p(c))

    ``logits`` (B, C) of q(c|z1), ``log_prior`` (C,), ``nll_z1`` and ``kl_z2``
    (B, C) from `class_bounds`. Returns ``(rec, kl)``, each (B,).
    """
    probs = jax.nn.softmax(logits, -1)
    log_probs = jax.nn.log_softmax(logits, -1)
    kl_c = (probs * (log_probs - log_prior)).sum(-1)
    return (probs * nll_z1).sum(-1), (probs * kl_z2).sum(-1) + kl_c


def labelled_bound(labels, log_prior, nll_z1, kl_z2):
    r"""L_S's class terms per cell for its known class y:
    :math:`-\log p(z_1|u,y)` and :math:`\mathrm{KL}(q(u|z_1,y)\|p(u)) - \log p(y)`.

    ``labels`` (B,) codes below C. Returns ``(rec, kl)``, each (B,).
    """
    y = labels[:, None]
    return (
        jnp.take_along_axis(nll_z1, y, axis=1)[:, 0],
        jnp.take_along_axis(kl_z2, y, axis=1)[:, 0] - log_prior[labels],
    )


def scanvi_per_cell(  # noqa: PLR0913 - the loss signature, then keyword options
    module,
    params,
    state,
    batch: Batch,
    rng,
    *,
    train: bool = False,
    objective: str = "seed",
    sparse: bool = True,
    sample: bool = True,
):
    """Per-cell scANVI terms, each (B,): ``reconstruction_loss`` (count term plus
    log q(z1|x) plus the class-conditional z1 term), ``kl_local`` (the u, c and
    library KLs), ``elbo`` (their sum, the negative bound), and scVI's ``kl_z``
    and ``kl_l`` for reference.

    ``objective="seed"`` uses L_S for cells whose label code is below C and
    L_U for the rest; ``"scvi-tools"`` uses L_U for every cell. Returns
    ``(terms, outputs, new_state)``; ``sample=False`` evaluates at the means of
    q(z1|x), q(l|x) and q(u|z1,c) (deterministic).
    """
    if objective not in ("seed", "scvi-tools"):
        raise ValueError(f"objective={objective!r}: use 'seed' or 'scvi-tools'")
    k_main, k_class, _ = jax.random.split(rng, 3)  # the third key is scanvi_elbo's
    outputs, new_state = forward(module, params, state, batch, k_main, train=train, sample=sample)
    cfg = module.config
    t = scvi_terms(module, outputs, batch, state, sparse=sparse)
    z1 = outputs["z"]
    log_qz1 = normal_log_prob(z1, outputs["qz_m"], outputs["qz_v"]).sum(-1)
    nll_z1, kl_z2, sub = class_bounds(
        module, params, new_state, z1, batch.weight, k_class, train=train, sample=sample
    )
    if train:
        new_state = _merge_stats(new_state, {"batch_stats": sub}, sub.keys())
    log_prior = cfg.log_prior()
    rec_c, kl_c = marginal_bound(outputs["logits_z"], log_prior, nll_z1, kl_z2)
    if objective == "seed" and cfg.label_parents is not None:
        rec_c, kl_c = subtree_bound(
            outputs["logits_z"], log_prior, nll_z1, kl_z2, label_mask(cfg, batch.labels)
        )
    elif objective == "seed":
        labelled_cell = batch.labels < cfg.n_labels
        rec_s, kl_s = labelled_bound(
            jnp.minimum(batch.labels, cfg.n_labels - 1), log_prior, nll_z1, kl_z2
        )
        rec_c = jnp.where(labelled_cell, rec_s, rec_c)
        kl_c = jnp.where(labelled_cell, kl_s, kl_c)
    rec = t["reconstruction_loss"] + log_qz1 + rec_c
    kl = kl_c + t["kl_l"]
    terms = {
        "reconstruction_loss": rec,
        "kl_local": kl,
        "elbo": rec + kl,
        "kl_z": t["kl_z"],
        "kl_l": t["kl_l"],
    }
    return terms, outputs, new_state


def scanvi_elbo(  # noqa: PLR0913 - the loss signature, then keyword options
    module,
    params,
    state,
    batches,
    rng,
    kl_weight,
    *,
    train: bool = True,
    objective: str = "seed",
    classification_ratio: float = 50.0,
    sparse: bool = True,
    extra_terms=None,
    extra_weights=None,
    replay=None,
    step=None,
):
    """scANVI loss: (params, state, (batch, labelled_batch), rng, kl_weight) -> (loss, LossAux).

    ``batches`` is the main minibatch, or a pair (main, labelled); with the
    pair the classification loss is added (averaged with `replay_loss` when
    ``replay`` is given). The per-cell bound is `scanvi_per_cell`'s, with
    ``kl_weight`` on its KL part.
    """
    batch, labelled = (batches, None) if isinstance(batches, Batch) else batches
    k_ce = jax.random.split(rng, 3)[2]
    pc, outputs, new_state = scanvi_per_cell(
        module, params, state, batch, rng, train=train, objective=objective, sparse=sparse
    )
    rec, kl, t = pc["reconstruction_loss"], pc["kl_local"], pc
    w = batch.weight
    loss = weighted_mean(rec + kl_weight * kl, w)
    terms = {
        "elbo": weighted_mean(rec + kl, w),
        "reconstruction_loss": weighted_mean(rec, w),
        "kl_local": weighted_mean(kl, w),
        "kl_z": weighted_mean(t["kl_z"], w),
        "kl_l": weighted_mean(t["kl_l"], w),
    }
    if labelled is not None:
        ce, acc, new_state, _ = classification_loss(
            module, params, new_state, labelled, k_ce, train=train
        )
        if replay is not None:
            ce_r, new_state = replay_loss(
                module,
                params,
                new_state,
                jax.random.fold_in(k_ce, 1),
                labelled.weight.shape[0],
                replay,
                train=train,
            )
            ce = 0.5 * (ce + ce_r)
        loss = loss + classification_ratio * ce
        terms["classification_loss"] = ce
        terms["accuracy"] = acc
    loss, terms = add_extra_terms(
        loss, terms, outputs, batch, params, extra_terms, extra_weights, step
    )
    terms["loss"] = loss
    return loss, LossAux(terms, new_state, outputs)


# --------------------------------------------- per-cell kernels for inference
def scanvi_elbo_terms(module, variables, batch: Batch, key):
    """Each cell's scANVI reconstruction loss and local KL as scvi-tools 1.4.2's
    ``SCANVAE.loss`` defines them, what SCANVI's ``get_elbo`` and
    ``get_reconstruction_error`` average: every cell marginalised over c
    (L_U, labels unused), eval mode, one sample of z1 and of each u.

    ``reconstruction_loss`` = -log p(x|z1,l) + log q(z1|x) + sum_c q(c|z1)
    [-log p(z1|u,c)]; ``kl_local`` = sum_c q(c|z1) KL(q(u|z1,c)||p(u)) +
    KL(q(c|z1)||p(c)) + KL(q(l|x)||p(l)).
    """
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    t, _, _ = scanvi_per_cell(
        module, params, state, batch, key, train=False, objective="scvi-tools", sparse=False
    )
    return {"reconstruction_loss": t["reconstruction_loss"], "kl_local": t["kl_local"]}


def scanvi_log_importance_weights(module, variables, batch: Batch, key, *, n_samples: int):
    r"""The log weights scvi-tools 1.4.2's ``marginal_ll`` forms for scANVI, (B, S).

    scvi-tools reuses scVI's estimator with scANVI's reconstruction loss, so
    for z1 ~ q(z1|x) (and l ~ q(l|x) with a learned library), u ~ q(u|z1,c):

    .. math::
        \log w = \log N(z_1; 0, I) - \big[-\log p(x|z_1,l) + \log q(z_1|x)
            + \textstyle\sum_c q(c|z_1)\,(-\log p(z_1|u,c))\big] - \log q(z_1|x)
            \;[+ \log p(l) - \log q(l|x)]

    That is not an importance weight of scANVI's generative model (its prior
    on z1 is the class mixture, and log q(z1|x) enters twice), so the
    estimate is comparable with scvi-tools' own number, not a bound on
    log p(x) under scANVI.
    """
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    k_main, k_class = jax.random.split(key)
    outputs = module.apply(
        variables, batch, train=False, rngs={"sample": k_main}, n_samples=n_samples
    )
    rec_x = reconstruction_loss(outputs, batch, module.config.gene_likelihood, sparse=False)
    z = outputs["z"]  # scvi-tools evaluates the densities at z after its transform
    S = n_samples
    B, D = z.shape[-2:]
    log_qz = normal_log_prob(z, outputs["qz_m"], outputs["qz_v"]).sum(-1)
    log_pz = normal_log_prob(z, 0.0, 1.0).sum(-1)
    # the class terms on all S*B samples at once (eval mode: rows are independent)
    zf = z.reshape(S * B, D)
    wf = jnp.tile(batch.weight, S)
    logits = module.apply(variables, zf, wf, method=_classify_latent)
    nll_z1, kl_z2, _ = class_bounds(module, params, state, zf, wf, k_class, train=False)
    rec_c, _ = marginal_bound(logits, module.config.log_prior(), nll_z1, kl_z2)
    rec = rec_x + log_qz + rec_c.reshape(z.shape[:-1])
    logw = log_pz - rec - log_qz
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


def _classify_latent(mdl, z, mask):
    return mdl.classifier(z, train=False, mask=mask)

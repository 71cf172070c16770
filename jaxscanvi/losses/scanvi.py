r"""scANVI's bounds (Xu et al. 2021; the user guide's L_S and L_U).

Per cell, with z1 ~ q(z1|x) and, for each class c, u ~ q(u|z1, c):

.. math::
    b_c = -\log p(z_1 \mid u, c) + \beta\,\mathrm{KL}(q(u|z_1,c)\,\|\,N(0,I))

    \mathcal{L}_S(c) = \text{rec} + \log q(z_1|x) + b_c - \beta \log p(c) + \beta\,\text{KL}^\ell

    \mathcal{L}_U = \text{rec} + \log q(z_1|x) + \sum_c q(c|z_1)\, b_c
        + \beta\,\mathrm{KL}(q(c|z_1)\,\|\,p(c)) + \beta\,\text{KL}^\ell

(these are negative bounds: lower is better). The class terms of all C cell
types run as one (class, cell) grid through the class networks, in chunks
of ``class_chunk_size`` classes by `lax.scan` so memory stays flat as C grows;
the count decoder runs once per cell, never per class. The classification
loss is the cross-entropy of q(c | E[z|x]) on a minibatch of labelled cells,
times ``classification_ratio``.

``objective="seed"`` uses L_S for labelled cells of the main minibatch and
L_U for the others; ``objective="scvi-tools"`` marginalises every cell
(L_U), as scvi-tools does.

With a label hierarchy (``config.label_parents``) a cell labelled at node v
gets `subtree_bound`: the class terms summed over the leaves under v, q(c|z1)
renormalised there, and its classification term is -log of q's mass under v
(`subtree_cross_entropy`). A leaf label is L_S and the root L_U, so the flat
case is the special case of one rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..data.batch import Batch
from ..distributions import normal_log_prob
from ..module.scanvae import SCANVAE, class_noise
from ..nn.layers import global_stats
from .common import LossAux, add_extra_terms, forward, reconstruction_loss, weighted_mean
from .hierarchy import label_mask, subtree_bound, subtree_cross_entropy
from .scvi import scvi_terms


def _merge_stats(base: dict, update: dict, names) -> dict:
    bs = dict(base.get("batch_stats", {}))
    for n in names:
        if n in update.get("batch_stats", {}):
            bs[n] = update["batch_stats"][n]
    return {**base, "batch_stats": bs}


def class_bn_layers(module, state) -> list[tuple[str, ...]]:
    """Paths of the class networks' trainable batch-norm layers, in forward order
    (q(u|z1,c)'s layers, then p(z1|u,c)'s)."""
    frozen = set(module.config.frozen_batchnorm)
    stats = state.get("batch_stats", {})
    paths = []
    for net in ("encoder_z2_z1", "decoder_z1_z2"):
        if net in frozen:
            continue
        for fc, layers in stats.get(net, {}).items():
            paths += [(net, fc, name) for name in sorted(layers, key=lambda s: int(s[2:]))]
    return paths


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def class_bounds(module, params, state, z1, weight, rng, *, train: bool, sample: bool = True):
    """-log p(z1|u,c) and KL(q(u|z1,c)||p(u)) for every class: two (B, C) arrays.

    Also returns the updated batch statistics of the two class networks.
    The (class, cell) grid runs through the class networks as one minibatch
    (`SCANVAE.class_grid`), with batch statistics over the whole grid, as
    scvi-tools computes them. Class c's random draws come from the c-th of
    ``jax.random.split(rng, C)`` (`class_noise`). Above ``class_chunk_size``
    classes, chunks are scanned and the grid's statistics are built first,
    one pass over the chunks per batch-norm layer (a layer's inputs depend on
    the layers before it): each pass sums the layer's rows chunk by chunk,
    with the layers before it normalised by the statistics already built. The
    last pass computes the bounds with them. Values, gradients and running
    averages are then those of the whole grid at once, with memory bounded by
    one chunk.
    """
    cfg = module.config
    C, B = cfg.n_labels, z1.shape[0]
    chunk = cfg.class_chunk_size

    def run(x, bn_global=None, collect=None):
        classes, valid, keys = x
        noise = class_noise(cfg, keys, B, train=train, sample=sample)
        mask = valid[:, None] * weight
        variables = {"params": params, **state}
        if bn_global:
            variables["bn_global"] = bn_global
        args = (z1, classes, mask, noise)
        if train:
            mutable = ["batch_stats"] + (["bn_sums"] if collect else [])
            (nll, kl2), upd = module.apply(
                variables, *args, train=True, mutable=mutable, method=SCANVAE.class_grid
            )
            if collect:  # a statistics pass: only this layer's sums are used
                return _get(upd["bn_sums"], collect)["sums"]
            sub = {
                k: upd["batch_stats"][k]
                for k in ("encoder_z2_z1", "decoder_z1_z2")
                if k in upd["batch_stats"]
            }
            return nll, kl2, sub
        nll, kl2 = module.apply(variables, *args, train=False, method=SCANVAE.class_grid)
        return nll, kl2, {}

    keys = jax.random.split(rng, C)
    if chunk >= C:
        nll, kl2, sub = run((jnp.arange(C), jnp.ones(C, z1.dtype), keys))
        return nll.T, kl2.T, sub

    n_chunks = -(-C // chunk)
    classes = jnp.arange(n_chunks * chunk).reshape(n_chunks, chunk)
    valid = (classes < C).astype(z1.dtype)
    keys = jnp.concatenate([keys, keys[: n_chunks * chunk - C]])  # padded classes reuse some
    keys = keys.reshape(n_chunks, chunk, *keys.shape[1:])
    xs = (jnp.minimum(classes, C - 1), valid, keys)
    # every scan recomputes each chunk in the backward pass (jax.checkpoint):
    # otherwise reverse mode keeps every chunk's activations and memory grows
    # linearly with C. The statistics passes carry only (n, sum, sum of squares).
    known: dict = {}
    for path in class_bn_layers(module, state) if train else []:

        def add(total, x, bn_global=_nested(known), path=path):  # noqa: B008 - bound per layer
            sums = run(x, bn_global, collect=path)
            return jax.tree_util.tree_map(jnp.add, total, sums), None

        shift = jax.lax.stop_gradient(_get(state["batch_stats"], path)["mean"])
        zero = (jnp.zeros((), z1.dtype), jnp.zeros_like(shift), jnp.zeros_like(shift))
        sums, _ = jax.lax.scan(jax.checkpoint(add), zero, xs)
        known[path] = global_stats(sums, shift)
    bn_global = _nested(known)

    def body(_, x):
        return None, run(x, bn_global)

    _, (nll, kl2, sub) = jax.lax.scan(jax.checkpoint(body), None, xs)
    nll = nll.reshape(-1, B)[:C]
    kl2 = kl2.reshape(-1, B)[:C]
    # with the grid's statistics every chunk updates the running averages alike
    sub = jax.tree_util.tree_map(lambda a: a[0], sub)
    return nll.T, kl2.T, sub


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

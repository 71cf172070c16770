"""Labels at every level of a cell-type hierarchy: the loss.

A cell labelled at node v sums the class terms over the leaves under v with
q(c|z1) renormalised there, and its classification term is -log of q's mass
under v. Checked: a flat hierarchy gives today's loss (values and gradients),
a two-level tree against a NumPy reference written here, the scvi-tools
objective, finite gradients, and the tree's own bookkeeping (masks, depths).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from test_scanvi import FAST_COMPILE, assert_trees_close, make_batch, tiny_module

from jaxscanvi import InputError
from jaxscanvi.data import hierarchy
from jaxscanvi.distributions import normal_log_prob
from jaxscanvi.losses import classification_loss, forward, scanvi_elbo, scvi_terms
from jaxscanvi.module.scanvae import class_noise
from jaxscanvi.module_scanvi import SCANVAE

C = 5
ROOT = C
# leaves 0, 1 under node 6; leaves 2, 3, 4 under node 7; 6 and 7 under the root (5)
TWO_LEVEL = (6, 6, 7, 7, 7, -1, 5, 5)
LEAVES_UNDER = {0: [0], 1: [1], 2: [2], 3: [3], 4: [4], 5: [0, 1, 2, 3, 4], 6: [0, 1], 7: [2, 3, 4]}
FLAT = (ROOT,) * C + (-1,)
LABELS = [0, 6, 5, 7, 3, 6, 7, 5, 4, 1]  # leaves, inner nodes and unlabelled


def with_parents(module, parents):
    return SCANVAE(dataclasses.replace(module.config, label_parents=parents))


@partial(jax.jit, static_argnames=("module", "objective", "train"), compiler_options=FAST_COMPILE)
def loss_and_grad(params, state, batches, rng, *, module, objective, train=True):
    def f(p):
        return scanvi_elbo(module, p, state, batches, rng, 0.7, train=train, objective=objective)[0]

    return jax.value_and_grad(f)(params)


# ------------------------------------------------- the flat case is today's
@pytest.mark.parametrize("objective", ["seed", "scvi-tools"])
def test_flat_hierarchy_equals_flat_labels(objective):
    """Every type under the root: the loss (bound plus classification on a labelled
    minibatch) and its gradient equal the model without a hierarchy."""
    module, params, state = tiny_module(C)
    flat = with_parents(module, FLAT)
    main = make_batch([0, 5, 4, 5, 2, 1, 5, 3, 5, 0])
    lab = make_batch([0, 1, 3, 2, 4, 4], seed=1)
    rng = jax.random.PRNGKey(7)
    v0, g0 = loss_and_grad(params, state, (main, lab), rng, module=module, objective=objective)
    v1, g1 = loss_and_grad(params, state, (main, lab), rng, module=flat, objective=objective)
    assert np.isfinite(float(v0))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    assert assert_trees_close(g1, g0, rtol=1e-5, atol=1e-6) > 10


# ----------------------------------------------- two levels against NumPy
def numpy_reference(module, params, state, batch, rng, kl_weight):
    """The hierarchical bound in NumPy from the model's pieces: per cell, with S the
    leaves under its label, q_S = q(c|z1) / sum_S q on S,
    rec = -log p(x|z1,l) + log q(z1|x) + sum_S q_S (-log p(z1|u,c)),
    kl = sum_S q_S KL(q(u|z1,c)||p(u)) + sum_S q_S log(q_S / p(c)) + KL_l."""
    cfg = module.config
    k_main, k_class, _ = jax.random.split(rng, 3)
    outputs, _ = forward(module, params, state, batch, k_main, train=True)
    t = scvi_terms(module, outputs, batch, state, sparse=False)
    z1 = outputs["z"]
    log_qz1 = np.asarray(normal_log_prob(z1, outputs["qz_m"], outputs["qz_v"]).sum(-1), np.float64)
    variables = {"params": params, **state}
    keys = jax.random.split(k_class, C)
    nll, kl2 = [], []
    for c in range(C):  # one class at a time, on that class's draws
        noise = class_noise(cfg, keys[c : c + 1], z1.shape[0], train=True, sample=True)
        (n,), (k,) = module.apply(
            variables,
            z1,
            jnp.asarray([c]),
            batch.weight[None],
            noise,
            train=True,
            method=SCANVAE.class_grid,
        )
        nll.append(np.asarray(n, np.float64))
        kl2.append(np.asarray(k, np.float64))
    nll, kl2 = np.stack(nll, 1), np.stack(kl2, 1)
    logits = np.asarray(outputs["logits_z"], np.float64)
    q = np.exp(logits - logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    prior = np.asarray(cfg.y_prior, np.float64) / np.sum(cfg.y_prior)
    rec_x = np.asarray(t["reconstruction_loss"], np.float64)
    kl_l = np.asarray(t["kl_l"], np.float64)
    per_cell = []
    for i, lab in enumerate(np.asarray(batch.labels)):
        S = LEAVES_UNDER[int(lab)]
        qs = q[i, S] / q[i, S].sum()
        rec = rec_x[i] + log_qz1[i] + (qs * nll[i, S]).sum()
        kl = (qs * kl2[i, S]).sum() + (qs * np.log(qs / prior[S])).sum() + kl_l[i]
        per_cell.append(rec + kl_weight * kl)
    return np.mean(per_cell), q


def test_two_level_bound_matches_numpy():
    """Leaves, inner nodes and unlabelled cells in one minibatch (train mode: dropout,
    learned library): the library's loss equals the NumPy reference, and differs
    from the flat model's (the inner labels matter)."""
    module, params, state = tiny_module(C)
    tree = with_parents(module, TWO_LEVEL)
    batch = make_batch(LABELS, seed=2)
    rng = jax.random.PRNGKey(11)
    ref, _ = numpy_reference(tree, params, state, batch, rng, 0.7)
    got = scanvi_elbo(tree, params, state, batch, rng, 0.7, train=True)[0]
    np.testing.assert_allclose(float(got), ref, rtol=2e-6)
    unl = batch._replace(labels=jnp.where(batch.labels > C, C, batch.labels))
    flat = scanvi_elbo(module, params, state, unl, rng, 0.7, train=True)[0]
    assert abs(float(flat) - ref) > 1e-3


def test_two_level_gradients_finite_and_reach_every_network():
    module, params, state = tiny_module(C)
    tree = with_parents(module, TWO_LEVEL)
    main = make_batch(LABELS, seed=2)
    lab = make_batch([6, 7, 0, 6, 3, 7], seed=4)
    value, grads = loss_and_grad(
        params, state, (main, lab), jax.random.PRNGKey(3), module=tree, objective="seed"
    )
    assert np.isfinite(float(value))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    for k in ("classifier", "encoder_z2_z1", "decoder_z1_z2", "z_encoder", "decoder"):
        assert (
            max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(grads[k])) > 0
        ), k


@partial(jax.jit, static_argnames=("module",), compiler_options=FAST_COMPILE)
def _ce(params, state, lab, rng, *, module):
    ce, acc, _, logits = classification_loss(module, params, state, lab, rng, train=False)
    return ce, acc, logits


def test_classification_sums_q_over_the_subtree():
    """-log sum_{c under v} q(c|E[z|x]) over cells labelled anywhere but the root;
    accuracy: the top leaf lies under v."""
    module, params, state = tiny_module(C)
    tree = with_parents(module, TWO_LEVEL)
    lab = make_batch([6, 7, 0, 5, 3, 7, 5, 1], seed=5)
    ce, acc, logits = _ce(params, state, lab, jax.random.PRNGKey(2), module=tree)
    logits = np.asarray(logits, np.float64)
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.asarray(lab.labels)
    keep = y != ROOT
    want = [-np.log(q[i, LEAVES_UNDER[y[i]]].sum()) for i in np.flatnonzero(keep)]
    np.testing.assert_allclose(float(ce), np.mean(want), rtol=1e-5)
    hits = [q[i].argmax() in LEAVES_UNDER[y[i]] for i in np.flatnonzero(keep)]
    np.testing.assert_allclose(float(acc), np.mean(hits), rtol=1e-6)


def test_scvi_tools_objective_marginalises_every_cell():
    """objective="scvi-tools": the bound is L_U for every cell, whatever its label, so
    it equals the flat model's on the same cells unlabelled."""
    module, params, state = tiny_module(C)
    tree = with_parents(module, TWO_LEVEL)
    batch = make_batch(LABELS, seed=2)
    rng = jax.random.PRNGKey(1)
    got = scanvi_elbo(tree, params, state, batch, rng, 0.7, objective="scvi-tools")[0]
    unl = batch._replace(labels=jnp.full_like(batch.labels, C))
    want = scanvi_elbo(module, params, state, unl, rng, 0.7, objective="scvi-tools")[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


# -------------------------------------------------------- the tree itself
def test_leaf_mask_and_depths():
    mask = hierarchy.leaf_mask(TWO_LEVEL, C)
    for node, leaves in LEAVES_UNDER.items():
        np.testing.assert_array_equal(np.flatnonzero(mask[node]), leaves)
    np.testing.assert_array_equal(hierarchy.depths(TWO_LEVEL), [2, 2, 2, 2, 2, 0, 1, 1])


PBMC = {"Naive CD4 T": "CD4 T", "Memory CD4 T": "CD4 T", "CD4 T": "PBMC", "B": "PBMC", "NK": "PBMC"}


def _column(values):
    return pd.Series(pd.Categorical(values))


def test_build_orders_codes_and_encodes_any_level():
    col = _column(["B", "Naive CD4 T", "CD4 T", "Unknown", "NK", "Memory CD4 T", "PBMC"])
    tree = hierarchy.build(PBMC, col, tuple(col.cat.categories), "Unknown", "labels")
    assert tree.leaves == ("B", "Memory CD4 T", "NK", "Naive CD4 T")  # column order
    assert tree.root == "PBMC" and tree.inner == ("CD4 T",)
    assert tree.nodes == ("B", "Memory CD4 T", "NK", "Naive CD4 T", "PBMC", "CD4 T")
    assert tree.parents == (4, 5, 4, 5, -1, 4)
    np.testing.assert_array_equal(
        tree.encode(col, "labels", "Unknown"), [0, 3, 5, 4, 2, 1, 4]
    )  # root == unlabelled


@pytest.mark.parametrize(
    "mapping, values, problem",
    [
        ({"A": "B", "B": "A", "C": "A"}, ["C"], "cycle"),
        ({"A": "A"}, ["A"], "own parent"),
        ({"A": "R1", "B": "R2"}, ["A", "B"], "2 roots"),
        ({"A": "R", "B": "R"}, ["A", "B", "C"], "missing from the map"),
        ({"A": "R", "B": "R", "C": "R"}, ["A", "B"], "no cell"),
        ({"A": "R", "B": "Unknown", "Unknown": "R"}, ["A", "B"], "unlabelled category"),
        (["A", "B"], ["A"], "mapping"),
    ],
)
def test_bad_hierarchies_are_refused(mapping, values, problem):
    col = _column([*values, "Unknown"])
    cats = tuple(c for c in col.cat.categories if c != "Unknown")
    with pytest.raises(InputError, match=problem) as e:
        hierarchy.build(mapping, col, cats, "Unknown", "adata.obs['labels']")
    assert e.value.field == "label_hierarchy" and "Fix:" in str(e.value)

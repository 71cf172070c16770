"""scANVI: the per-class bound against a plain loop, L_S / L_U, chunking, many cell
types, from_scvi_model, predict, save/load, training options, and label transfer.

The loss tests run the module on a tiny hand-built minibatch with fixed parameters
and keys; the model tests share one pretrained scVI and one trained scANVI on the
small synthetic atlas (module-scoped) so compiled steps are reused.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import hvg, shared_file

from jaxscanvi import SCANVI, SCVI, InputError
from jaxscanvi.data.batch import Batch
from jaxscanvi.distributions import normal_log_prob
from jaxscanvi.losses import classification_loss, forward, scanvi_elbo, scvi_terms
from jaxscanvi.model import _scanvi_train
from jaxscanvi.model._calibration import softmax
from jaxscanvi.model._init import init_variables
from jaxscanvi.model.scanvi import expected_calibration_error
from jaxscanvi.module import VAE
from jaxscanvi.module.scanvae import class_noise
from jaxscanvi.module_scanvi import SCANVAE, SCANVIConfig
from jaxscanvi.train.config import max_epochs_heuristic
from jaxscanvi.train.loop import make_train_step
from jaxscanvi.train.state import KLSchedule, TrainState, make_optimizer

UNL = "Unknown"
# Test-only jitted functions skip XLA's LLVM optimisation: they run once on tiny inputs,
# so compile time dominates (buffer assignment, hence memory_analysis, is unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------- helpers
PRIOR5 = (0.1, 0.2, 0.3, 0.25, 0.15)


def tiny_module(
    n_labels=5,
    *,
    batch_norm="none",
    chunk=64,
    n_genes=12,
    n_hidden=8,
    n_latent=3,
    seed=0,
    y_prior=PRIOR5,
    observed_lib=False,
):
    """A tiny SCANVAE and its initialised (fixed) variables: (module, params, state)."""
    cfg = SCANVIConfig(
        n_genes=n_genes,
        n_batch=2,
        n_labels=n_labels,
        n_hidden=n_hidden,
        n_latent=n_latent,
        dropout_rate=0.1,
        use_batch_norm=batch_norm,
        use_observed_lib_size=observed_lib,
        class_chunk_size=chunk,
        y_prior=y_prior,
    )
    module = SCANVAE(cfg)
    consts = {
        "library_log_means": jnp.asarray([3.0, 3.5]),
        "library_log_vars": jnp.asarray([0.5, 0.8]),
    }
    v = init_variables(module, n_genes, 0, 0, seed, consts)
    params = v["params"]
    state = {k: x for k, x in v.items() if k != "params"}
    if batch_norm != "none":  # non-trivial running statistics for eval-mode tests
        leaves, tree = jax.tree_util.tree_flatten(state["batch_stats"])
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        leaves = [a + 0.3 * jnp.abs(jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)]
        state = {**state, "batch_stats": jax.tree_util.tree_unflatten(tree, leaves)}
    return module, params, state


def make_batch(labels, n_genes=12, seed=0) -> Batch:
    """A dense minibatch (nz=None) of len(labels) cells; label n_labels = unlabelled."""
    labels = np.asarray(labels, np.int32)
    B = len(labels)
    r = np.random.default_rng(seed)
    x = r.poisson(r.gamma(1.0, 4.0, (B, n_genes))).astype(np.float32)
    x[:, 0] += 1.0  # no empty cell
    lib = np.log(x.sum(1)).astype(np.float32)
    return Batch(
        x=jnp.asarray(x),
        nz=None,
        weight=jnp.ones(B, jnp.float32),
        batch=jnp.asarray(r.integers(0, 2, B), jnp.int32),
        labels=jnp.asarray(labels),
        cat_covs=jnp.zeros((B, 0), jnp.int32),
        cont_covs=jnp.zeros((B, 0), jnp.float32),
        log_size_factor=jnp.zeros(B, jnp.float32),
        log_library=jnp.asarray(lib),
        lgamma_const=jnp.zeros(B, jnp.float32),
    )


def loop_loss(module, params, state, batch, rng, kl_weight, *, objective, train):
    """The user guide's bounds with the class sum as a plain Python loop.

    Per cell: base = rec + log q(z1|x) + beta KL_l and, for each class c (one
    `class_grid` call per class, on that class's draws from the library's keys),
    b_c = -log p(z1|u,c)
    + beta KL(q(u|z1,c)||N(0,I)).  L_U = base + sum_c q(c|z1) b_c + beta KL(q(c|z1)||p(c));
    L_S(y) = base + b_y - beta log p(y).
    """
    cfg = module.config
    C = cfg.n_labels
    k_main, k_class, _ = jax.random.split(rng, 3)
    outputs, _ = forward(module, params, state, batch, k_main, train=train)
    t = scvi_terms(module, outputs, batch, state, sparse=False)
    z1 = outputs["z"]
    log_qz1 = normal_log_prob(z1, outputs["qz_m"], outputs["qz_v"]).sum(-1)
    log_q = jax.nn.log_softmax(outputs["logits_z"], -1)
    q = jnp.exp(log_q)
    log_prior = cfg.log_prior()
    variables = {"params": params, **state}
    keys = jax.random.split(k_class, C)
    base = t["reconstruction_loss"] + log_qz1 + kl_weight * t["kl_l"]
    b = []
    for c in range(C):
        noise = class_noise(cfg, keys[c : c + 1], z1.shape[0], train=train, sample=True)
        (nll,), (kl2,) = module.apply(
            variables,
            z1,
            jnp.asarray([c]),
            batch.weight[None],
            noise,
            train=train,
            method=SCANVAE.class_grid,
        )
        b.append(nll + kl_weight * kl2)
    marg = sum(q[:, c] * b[c] for c in range(C))
    kl_c = sum(q[:, c] * (log_q[:, c] - log_prior[c]) for c in range(C))
    per_cell = base + marg + kl_weight * kl_c
    if objective == "seed":
        for c in range(C):
            l_s = base + b[c] - kl_weight * log_prior[c]
            per_cell = jnp.where(batch.labels == c, l_s, per_cell)
    w = batch.weight
    return (per_cell * w).sum() / w.sum()


def lib_loss(module, params, state, batch, rng, kl_weight, *, objective, train):
    return scanvi_elbo(
        module, params, state, batch, rng, kl_weight, train=train, objective=objective
    )[0]


@partial(
    jax.jit, static_argnames=("fn", "module", "objective", "train"), compiler_options=FAST_COMPILE
)
def value_and_grads(params, state, batch, rng, kl_weight, *, fn, module, objective, train):
    """jit(value_and_grad) of fn w.r.t. params; one compile per (fn, module, objective)."""
    return jax.value_and_grad(
        lambda p: fn(module, p, state, batch, rng, kl_weight, objective=objective, train=train)
    )(params)


@partial(
    jax.jit, static_argnames=("fn", "module", "objective", "train"), compiler_options=FAST_COMPILE
)
def value_of(params, state, batch, rng, kl_weight, *, fn, module, objective, train):
    return fn(module, params, state, batch, rng, kl_weight, objective=objective, train=train)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5, floor=1e-30):
    """Leafwise allclose; atol is relative to each leaf's largest entry (float32 sums),
    or to ``floor`` where that is larger (leaves that are zero up to rounding)."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    n_nonzero = 0
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.abs(y).max()), floor)
        np.testing.assert_allclose(
            x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path)
        )
        n_nonzero += bool(np.abs(y).max() > 0)
    return n_nonzero


C5 = 5
LABELS_MIXED = [0, 5, 4, 5, 2, 1, 5, 3, 5, 0]  # 5 = unlabelled (C = 5)


# ----------------------------------------------------- the bound vs a loop
def test_class_grid_equals_class_loop_train():
    """ "seed" on a mixed minibatch: L_S for labelled cells, L_U for the others.
    The (class, cell) grid == a Python loop over classes, value and grad w.r.t. params.
    Train mode (dropout on, its own keys per class), no batch norm, learned library."""
    module, params, state = tiny_module(C5)
    batch = make_batch(LABELS_MIXED)
    args = (params, state, batch, jax.random.PRNGKey(7), 0.7)
    v_lib, g_lib = value_and_grads(*args, fn=lib_loss, module=module, objective="seed", train=True)
    v_loop, g_loop = value_and_grads(
        *args, fn=loop_loss, module=module, objective="seed", train=True
    )
    assert np.isfinite(float(v_lib))
    np.testing.assert_allclose(float(v_lib), float(v_loop), rtol=1e-6)
    n = assert_trees_close(g_lib, g_loop)
    # the gradient reaches the classifier, both class networks and the scVI parts
    for k in ("classifier", "encoder_z2_z1", "decoder_z1_z2", "z_encoder", "l_encoder", "decoder"):
        leaves = jax.tree_util.tree_leaves(g_lib[k])
        assert max(float(np.abs(np.asarray(x)).max()) for x in leaves) > 0, k
    assert n > 10


def test_class_grid_equals_class_loop_eval_batchnorm():
    """Eval mode with batch norm (running statistics) and a uniform prior: grid == loop
    ("seed" on a mixed minibatch; values only, the gradient check is the train test's)."""
    module, params, state = tiny_module(C5, batch_norm="both", y_prior=None)
    batch = make_batch(LABELS_MIXED, seed=3)
    args = (params, state, batch, jax.random.PRNGKey(3), 0.9)
    kw = dict(module=module, objective="seed", train=False)  # L_S and L_U cells
    v_lib = value_of(*args, fn=lib_loss, **kw)
    v_loop = value_of(*args, fn=loop_loss, **kw)
    assert np.isfinite(float(v_lib))
    np.testing.assert_allclose(float(v_lib), float(v_loop), rtol=1e-6)


# ------------------------------------------------------------ L_S and L_U
@partial(jax.jit, static_argnames=("module",), compiler_options=FAST_COMPILE)
def _per_cell_losses(params, state, batch, rng, kl_weight, label_sets, *, module):
    """Per-cell losses via one-hot weights: (seed for each label set, scvi-tools,
    logits of q(c|z), whole-batch seed and scvi-tools losses)."""
    B = batch.x.shape[0]
    eye = jnp.eye(B)

    def per_cell(labels, objective):
        def one(w):
            b = batch._replace(weight=w, labels=labels)
            loss, aux = scanvi_elbo(
                module, params, state, b, rng, kl_weight, train=True, objective=objective
            )
            return loss, aux.outputs["logits_z"]

        return jax.vmap(one)(eye)

    seed = jax.vmap(lambda lab: per_cell(lab, "seed")[0])(label_sets)
    unl = jnp.full(B, module.config.n_labels, jnp.int32)
    l_u, logits = per_cell(unl, "scvi-tools")
    whole = {
        o: scanvi_elbo(module, params, state, batch, rng, kl_weight, train=True, objective=o)[0]
        for o in ("seed", "scvi-tools")
    }
    return seed, l_u, logits[0], whole


def test_L_S_is_the_class_term_at_the_known_label():
    """With the same keys, per cell: L_U = sum_c q(c|z) L_S(c) - beta H(q(c|z)), L_S(c)
    being the "seed" loss of the cell labelled c; "seed" == "scvi-tools" on unlabelled
    cells; a mixed minibatch averages L_S at the known labels and L_U elsewhere.
    Only the public loss is used, one cell at a time (one-hot weights)."""
    C, B = C5, 6
    module, params, state = tiny_module(C)  # non-uniform y_prior
    mixed = np.array([0, 3, C, 1, C, 4])
    batch = make_batch(mixed)
    label_sets = jnp.asarray(np.stack([np.full(B, c) for c in range(C + 1)] + [mixed]), jnp.int32)
    kw = 0.6
    seed, L_U, logits, whole = _per_cell_losses(
        params, state, batch, jax.random.PRNGKey(5), kw, label_sets, module=module
    )
    seed, L_U = np.asarray(seed, np.float64), np.asarray(L_U, np.float64)
    L_S = seed[:C].T  # (B, C): cell n labelled c
    np.testing.assert_allclose(seed[C], L_U, rtol=1e-6)  # unlabelled: seed == scvi-tools
    log_q = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    q = np.exp(log_q)
    entropy = -(q * log_q).sum(1)
    np.testing.assert_allclose(L_U, (q * L_S).sum(1) - kw * entropy, rtol=2e-6, atol=1e-4)
    assert (L_S.max(1) - L_S.min(1) > 1e-3).all()  # the label matters
    # mixed minibatch, per cell and as the minibatch mean
    pick = np.where(mixed < C, L_S[np.arange(B), np.minimum(mixed, C - 1)], L_U)
    np.testing.assert_allclose(seed[C + 1], pick, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(whole["seed"]), pick.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(whole["scvi-tools"]), L_U.mean(), rtol=1e-6)
    assert abs(float(whole["seed"]) - float(whole["scvi-tools"])) > 1e-3


@partial(jax.jit, static_argnames=("module",), compiler_options=FAST_COMPILE)
def _classification_pieces(params, state, main, lab, rng, *, module):
    variables = {"params": params, **state}
    ce, acc, _, logits = classification_loss(module, params, state, lab, rng, train=False)
    mean = module.apply(variables, lab, train=False, method=SCANVAE.encode_z)[0]
    ref_logits = module.apply(
        variables, mean, train=False, method=lambda m, z, train: m.classifier(z, train=train)
    )
    out = {}
    for ratio in (0.0, 50.0):
        both, aux = scanvi_elbo(
            module, params, state, (main, lab), rng, 0.5, train=False, classification_ratio=ratio
        )
        out[ratio] = (both, aux.terms["classification_loss"], aux.terms["accuracy"])
    alone = scanvi_elbo(module, params, state, main, rng, 0.5, train=False)[0]
    return ce, acc, logits, ref_logits, out, alone


def test_classification_loss_counts_labelled_cells_only():
    """Cross-entropy of q(c | E[z|x]) over labelled cells only; the pair (main,
    labelled) adds classification_ratio * CE to the bound."""
    module, params, state = tiny_module(C5)
    main = make_batch(LABELS_MIXED)
    lab = make_batch([0, 1, C5, 3, 2, C5, 4, 4], seed=1)
    ce, acc, logits, ref_logits, out, alone = _classification_pieces(
        params, state, main, lab, jax.random.PRNGKey(2), module=module
    )
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    logp = np.asarray(jax.nn.log_softmax(ref_logits, -1))
    y = np.asarray(lab.labels)
    keep = y < C5
    np.testing.assert_allclose(float(ce), -logp[keep, y[keep]].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(acc), (logp.argmax(1)[keep] == y[keep]).mean())
    for ratio, (both, ce_term, acc_term) in out.items():
        np.testing.assert_allclose(float(both), float(alone) + ratio * float(ce_term), rtol=1e-6)
        np.testing.assert_allclose(float(ce_term), float(ce), rtol=1e-6)
        np.testing.assert_allclose(float(acc_term), float(acc))


# --------------------------------------------------------------- chunking
def test_chunked_equals_unchunked_train():
    """class_chunk_size=2 < C=5 (a scan over 3 chunks, the last one padded) equals the
    whole grid at once: value and grad (train mode, no batch norm)."""
    m_full, params, state = tiny_module(C5, chunk=64)
    m_chunk = SCANVAE(dataclasses.replace(m_full.config, class_chunk_size=2))
    batch = make_batch(LABELS_MIXED)
    args = (params, state, batch, jax.random.PRNGKey(7), 0.7)
    v_full, g_full = value_and_grads(
        *args, fn=lib_loss, module=m_full, objective="seed", train=True
    )
    v_chunk, g_chunk = value_and_grads(
        *args, fn=lib_loss, module=m_chunk, objective="seed", train=True
    )
    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-6)
    assert_trees_close(g_chunk, g_full)


@partial(jax.jit, static_argnames=("module",), compiler_options=FAST_COMPILE)
def _loss_grads_state(params, state, batch, rng, *, module):
    def loss(p):
        value, aux = scanvi_elbo(module, p, state, batch, rng, 0.7, train=True, objective="seed")
        return value, aux.state

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_chunked_equals_unchunked_with_batch_norm():
    """Batch norm on in both class networks, C = 10 in chunks of 4 (the last one
    padded) and one padded cell: the loss, its gradient and the updated running
    averages equal those of the whole grid at once, whose statistics span the whole
    (class, cell) grid as scvi-tools' do."""
    C = 10
    m_full, params, state = tiny_module(C, batch_norm="both", chunk=64, y_prior=None)
    m_chunk = SCANVAE(dataclasses.replace(m_full.config, class_chunk_size=4))
    labels = [0, 10, 9, 10, 2, 7, 10, 3, 10, 5, 10, 8]
    batch = make_batch(labels, seed=4)
    batch = batch._replace(weight=batch.weight.at[-1].set(0.0))
    rng = jax.random.PRNGKey(11)
    (v_full, s_full), g_full = _loss_grads_state(params, state, batch, rng, module=m_full)
    (v_chunk, s_chunk), g_chunk = _loss_grads_state(params, state, batch, rng, module=m_chunk)
    np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-5)
    # the biases of the dense layers before batch norm have a zero gradient (batch
    # norm removes any shift): both are zero up to rounding; the rest agree
    g_max = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_full))

    def split(g):
        named = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}
        pre_bn = {k for k in named if "['dense" in k and k.endswith("['bias']")}
        return ([named[k] for k in pre_bn], {k: x for k, x in named.items() if k not in pre_bn})

    (zero_chunk, rest_chunk), (zero_full, rest_full) = split(g_chunk), split(g_full)
    # one per network: z and l encoders, count decoder, classifier, two class networks
    assert len(zero_full) == 6
    for x in zero_chunk + zero_full:
        assert float(jnp.abs(x).max()) < 1e-7 * g_max
    assert assert_trees_close(rest_chunk, rest_full) > 10
    for net in ("encoder_z2_z1", "decoder_z1_z2"):
        new, old = s_full["batch_stats"][net], state["batch_stats"][net]
        # the class networks' running averages moved, and moved alike
        moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new, old)
        assert min(jax.tree_util.tree_leaves(moved)) > 1e-5, net
        assert_trees_close(s_chunk["batch_stats"][net], new, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- many cell types
def _train_step_for(C, chunk, *, concrete, B=32, G=20):
    """The model's jitted train step (make_train_step over scanvi_elbo, Adam) lowered
    and compiled for C classes; with concrete=False only shapes are built (no init)."""
    cfg = SCANVIConfig(n_genes=G, n_labels=C, n_hidden=16, n_latent=4, class_chunk_size=chunk)
    module = SCANVAE(cfg)
    tx = make_optimizer()

    consts = {"library_log_means": jnp.zeros(1), "library_log_vars": jnp.ones(1)}
    if concrete:
        variables = init_variables(module, G, 0, 0, 0, consts)
    else:  # shapes only
        rngs = dict(
            zip(("params", "sample", "dropout"), jax.random.split(jax.random.PRNGKey(0), 3))
        )
        variables = dict(
            jax.eval_shape(lambda: module.init(rngs, make_batch([0, 0], G), train=False))
        )
        variables.setdefault("batch_stats", {})
        variables["constants"] = consts

    def make_carry(v):
        params = v["params"]
        state = {k: x for k, x in v.items() if k != "params"}
        ts = TrainState(
            params=params,
            state=state,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(0),
            step=jnp.asarray(0, jnp.int32),
            epoch=jnp.asarray(0, jnp.int32),
        )
        return ts, jnp.asarray(-1, jnp.int32)

    carry = make_carry(variables) if concrete else jax.eval_shape(make_carry, variables)
    r = np.random.default_rng(C)
    main_labels = np.where(r.random(B) < 0.5, r.integers(0, C, B), C)
    zeros = jnp.zeros(B, jnp.int32)
    batches = (
        make_batch(main_labels, G, seed=1)._replace(batch=zeros),
        make_batch(r.integers(0, C, B), G, seed=2)._replace(batch=zeros),
    )
    step = make_train_step(partial(scanvi_elbo, module, train=True), tx, KLSchedule())
    compiled = jax.jit(step).lower(carry, batches).compile(compiler_options=FAST_COMPILE)
    return compiled, carry, batches


def test_many_cell_types_memory_stays_flat():
    """C = 500 synthetic classes: a train step compiles and runs, and its compiled
    temporary memory stays within 3x of C = 10 at the same class_chunk_size (16; C=10
    is then one grid, C=500 a scan over 32 chunks)."""
    temps = {}
    for C in (10, 500):
        compiled, carry, batches = _train_step_for(C, 16, concrete=C == 500)
        ma = compiled.memory_analysis()
        if ma is None or getattr(ma, "temp_size_in_bytes", None) is None:
            pytest.skip("this backend reports no memory analysis")
        temps[C] = int(ma.temp_size_in_bytes)
    (ts, bad), (terms, _, _) = compiled(carry, batches)  # C = 500 runs
    assert int(bad) < 0 and int(ts.step) == 1
    assert np.isfinite(float(terms["loss"]))
    assert np.isfinite(float(terms["classification_loss"]))
    ratio = temps[500] / temps[10]
    assert ratio < 3.0, (
        f"compiled temp memory grows with the number of classes: "
        f"C=10 {temps[10]} B, C=500 {temps[500]} B ({ratio:.1f}x)"
    )


# ------------------------------------------------------------ model fixtures
ARCH = dict(n_hidden=32, n_latent=6)


@pytest.fixture(scope="module")
def hidden_atlas(small_atlas):
    """The small atlas with ~70% of labels hidden ("Unknown"), fixed seed."""
    a = small_atlas.copy()
    rng = np.random.default_rng(0)
    truth = a.obs["cell_type"].astype(str).to_numpy()
    hidden = rng.random(a.n_obs) < 0.7
    a.obs["labels_obs"] = pd.Categorical(np.where(hidden, UNL, truth))
    a.obs["hidden"] = hidden
    return a


@pytest.fixture(scope="module")
def scvi_model(hidden_atlas):
    SCVI.setup_anndata(hidden_atlas, batch_key="batch", labels_key="labels_obs")
    model = SCVI(hidden_atlas, **ARCH)
    model.train(max_epochs=40, batch_size=128, progress_bar=False)
    return model


# scanvi_model's training options; test_both_objectives changes only the objective
SCANVI_TRAIN = dict(
    n_samples_per_label=40, check_val_every_n_epoch=1, batch_size=128, progress_bar=False
)


@pytest.fixture(scope="module")
def scanvi_model(scvi_model):
    """from_scvi_model, then train with the default epochs heuristic ("seed")."""
    model = SCANVI.from_scvi_model(scvi_model, UNL, labels_key="labels_obs")
    model.train(**SCANVI_TRAIN)
    return model


def _accuracy_on_hidden(model, adata):
    idx = np.flatnonzero(adata.obs["hidden"].to_numpy())
    pred = model.predict(indices=idx)
    truth = adata.obs["cell_type"].astype(str).to_numpy()[idx]
    return float((pred == truth).mean()), float(pd.Series(truth).value_counts(normalize=True).max())


# ------------------------------------------------------------ from_scvi_model
def test_from_scvi_model_copies_encoder_and_starts_scanvi_nets_fresh(scvi_model, hidden_atlas):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained scVI: no warning expected
        model = SCANVI.from_scvi_model(scvi_model, UNL, labels_key="labels_obs")
    assert model.was_pretrained and not model.is_trained
    assert model.registry.label_categories == tuple(
        sorted(hidden_atlas.obs["cell_type"].astype(str).unique())
    )
    assert UNL not in model.registry.label_categories
    z_scvi = scvi_model.get_latent_representation()
    z_scanvi = model.get_latent_representation()
    np.testing.assert_array_equal(z_scanvi, z_scvi)
    m1, v1 = scvi_model.get_latent_representation(return_dist=True)
    m2, v2 = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(m2, m1)
    np.testing.assert_array_equal(v2, v1)
    # every scVI leaf is copied (params and batch statistics)
    for coll_s, coll_m in (
        (scvi_model.params, model.params),
        (scvi_model.state["batch_stats"], model.state["batch_stats"]),
    ):
        for k in coll_s:
            jax.tree_util.tree_map(np.testing.assert_array_equal, coll_m[k], coll_s[k])
    # scANVI-only networks equal a fresh model's initialisation (same seed)
    fresh_adata = hidden_atlas.copy()
    SCANVI.setup_anndata(
        fresh_adata, labels_key="labels_obs", unlabeled_category=UNL, batch_key="batch"
    )
    fresh = SCANVI(fresh_adata, **ARCH, seed=scvi_model.init_seed)
    assert fresh.module.config == model.module.config
    for k in ("classifier", "encoder_z2_z1", "decoder_z1_z2"):
        assert k in model.params and k not in scvi_model.params
        jax.tree_util.tree_map(np.testing.assert_array_equal, model.params[k], fresh.params[k])
    for k in ("encoder_z2_z1", "decoder_z1_z2"):
        if k in fresh.state["batch_stats"]:
            jax.tree_util.tree_map(
                np.testing.assert_array_equal,
                model.state["batch_stats"][k],
                fresh.state["batch_stats"][k],
            )
    # ... while the shared networks are the trained ones, not a fresh init
    diff = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a - b)).max()),
        model.params["z_encoder"],
        fresh.params["z_encoder"],
    )
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-3


def test_from_scvi_model_architecture_kwargs(scvi_model):
    with pytest.warns(UserWarning, match="Ignoring param 'n_latent'"):
        m = SCANVI.from_scvi_model(scvi_model, UNL, n_latent=3)
    assert m.module.config.n_latent == scvi_model.module.config.n_latent
    with pytest.warns(UserWarning) as rec:
        m = SCANVI.from_scvi_model(scvi_model, UNL, gene_likelihood="nb", n_hidden=64)
    msgs = " ".join(str(w.message) for w in rec)
    assert "Ignoring param 'gene_likelihood'" in msgs
    assert "Ignoring param 'n_hidden'" in msgs
    assert m.module.config.gene_likelihood == scvi_model.module.config.gene_likelihood
    assert m.module.config.n_hidden == scvi_model.module.config.n_hidden
    with pytest.raises(InputError):
        SCANVI.from_scvi_model(scvi_model, UNL, classifier_parameters={"bogus": 1})
    with pytest.raises(InputError):
        SCANVI.from_scvi_model("not a model", UNL)
    with pytest.raises(InputError):
        SCANVI.from_scvi_model(scvi_model, "no-such-category")


def test_from_scvi_model_refuses_gene_label_dispersion_and_warns_untrained(scvi_model):
    untrained = copy.copy(scvi_model)  # same data, no training, per-label dispersion
    untrained.module = VAE(dataclasses.replace(scvi_model.module.config, dispersion="gene-label"))
    untrained.is_trained = False
    with pytest.warns(UserWarning, match="not been trained"), pytest.raises(InputError):
        SCANVI.from_scvi_model(untrained, UNL)


# ------------------------------------------------------------ training
def test_train_history_and_epochs_heuristic(scanvi_model, hidden_atlas):
    n = hidden_atlas.n_obs
    h = min(round(20000 / n * 400), 400)
    assert max_epochs_heuristic(n) == h
    assert scanvi_model.history.n_epochs == min(10, max(2, round(h / 3)))
    hist = scanvi_model.history.to_frame()
    for col in (
        "classification_loss_train",
        "accuracy_train",
        "classification_loss_validation",
        "accuracy_validation",
        "classification_loss_validation_labelled",
        "accuracy_validation_labelled",
        "calibration_error_validation",
        "elbo_validation",
        "train_loss",
    ):
        assert col in hist.columns, col
        assert np.isfinite(hist[col].to_numpy()).all(), col
    for col in ("accuracy_train", "accuracy_validation_labelled", "calibration_error_validation"):
        assert ((hist[col] >= 0) & (hist[col] <= 1)).all(), col
    assert hist["classification_loss_train"].iloc[-1] < hist["classification_loss_train"].iloc[0]
    # the labelled-validation metrics are those of the classifier on labelled validation cells
    reg = scanvi_model.registry
    labels = hidden_atlas.obs["labels_obs"].astype(str).to_numpy()
    val = scanvi_model.validation_indices
    val_lab = val[labels[val] != UNL]
    assert len(val_lab) > 0
    y = np.asarray([reg.label_categories.index(s) for s in labels[val_lab]])
    # per-epoch metrics are those of the uncalibrated classifier (temperature 1)
    probs = softmax(
        scanvi_model._logits(scanvi_model.variables, scanvi_model._train_cells(), val_lab, None)
    )
    last = hist.iloc[-1]
    np.testing.assert_allclose(
        last["accuracy_validation_labelled"], (probs.argmax(1) == y).mean(), atol=1e-9
    )
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-12, 1)
    np.testing.assert_allclose(
        last["classification_loss_validation_labelled"], -np.log(p_true).mean(), rtol=1e-4
    )
    np.testing.assert_allclose(
        last["calibration_error_validation"], expected_calibration_error(probs, y), atol=1e-5
    )


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # bins: (0.5,0.6]: conf .55 acc 1; (0.6,0.7]: conf .7 acc 1; (0.7,0.8]: .8 acc 0;
    # (0.8,0.9]: .9 acc 1
    expect = 0.25 * (0.45 + 0.3 + 0.8 + 0.1)
    assert expected_calibration_error(probs, labels) == pytest.approx(expect)


@pytest.mark.parametrize("h,pretrained,expected", [(20, True, 7), (4, True, 2), (3, False, 3)])
def test_max_epochs_heuristic_is_applied(
    scvi_model, hidden_atlas, monkeypatch, h, pretrained, expected
):
    monkeypatch.setattr(_scanvi_train, "max_epochs_heuristic", lambda n_obs: h)
    if pretrained:
        model = SCANVI.from_scvi_model(scvi_model, UNL, labels_key="labels_obs")
    else:
        a = hidden_atlas.copy()
        SCANVI.setup_anndata(a, labels_key="labels_obs", unlabeled_category=UNL, batch_key="batch")
        model = SCANVI(a, **ARCH)
    model.train(n_samples_per_label=5, batch_size=128, progress_bar=False)
    assert model.history.n_epochs == expected
    assert expected == (int(min(10, max(2, round(h / 3)))) if pretrained else h)


def test_both_objectives_transfer_labels(scanvi_model, scvi_model, hidden_atlas):
    acc_seed, chance = _accuracy_on_hidden(scanvi_model, hidden_atlas)
    other = SCANVI.from_scvi_model(scvi_model, UNL, labels_key="labels_obs")
    other.train(**SCANVI_TRAIN, plan_kwargs={"objective": "scvi-tools"})
    assert other.history.n_epochs == scanvi_model.history.n_epochs  # same epochs
    acc_st, _ = _accuracy_on_hidden(other, hidden_atlas)
    assert chance < 0.6  # the majority type's share of hidden cells (~0.45)
    for acc in (acc_seed, acc_st):  # both ~0.92 here
        assert acc > 0.8 and acc > chance + 0.3, (acc_seed, acc_st, chance)
    # the objective is really plumbed through: the two runs differ
    assert not np.allclose(
        scanvi_model.history.to_frame()["elbo_train"].to_numpy(),
        other.history.to_frame()["elbo_train"].to_numpy(),
    )
    with pytest.raises(InputError):
        other.train(max_epochs=1, plan_kwargs={"objective": "nope"}, progress_bar=False)


# ------------------------------------------------------------ predict, save, load
def test_get_elbo_is_scvi_tools_scanvi_bound(scanvi_model, hidden_atlas):
    """SCANVI.get_elbo / get_reconstruction_error average scvi-tools' scANVI terms
    (L_U for every cell, labels unused), not scVI's, whatever the training
    objective. tests/test_parity.py checks them against scvi-tools itself."""
    from jaxscanvi.losses import elbo_terms, scanvi_per_cell

    idx = np.arange(100)
    per_cell = scanvi_model.get_elbo(indices=idx, batch_size=100, return_mean=False)
    rec = scanvi_model.get_reconstruction_error(indices=idx, batch_size=100, return_mean=False)[
        "reconstruction_loss"
    ]
    assert per_cell.shape == rec.shape == (100,)
    assert scanvi_model.get_elbo(indices=idx, batch_size=100) == pytest.approx(
        float(per_cell.mean()), rel=1e-6
    )
    # the map's key for its first chunk, at which the loss function gives the same terms
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    batch = scanvi_model.minibatch(idx)
    t, _, _ = scanvi_per_cell(
        scanvi_model.module,
        scanvi_model.params,
        scanvi_model.state,
        batch,
        key,
        objective="scvi-tools",
        sparse=False,
    )
    np.testing.assert_allclose(rec, t["reconstruction_loss"], rtol=1e-5)
    np.testing.assert_allclose(per_cell, -t["elbo"], rtol=1e-5)
    # the labels are not used: hiding every label changes nothing
    unl = hidden_atlas[idx].copy()
    unl.obs["labels_obs"] = pd.Categorical(
        [UNL] * len(idx), categories=unl.obs["labels_obs"].cat.categories
    )
    np.testing.assert_allclose(
        scanvi_model.get_elbo(unl, batch_size=100, return_mean=False), per_cell, rtol=1e-6
    )
    # and it is scANVI's bound, not scVI's (log q(z1|x) and the class terms differ)
    scvi_t = elbo_terms(scanvi_model.module, scanvi_model.variables, batch, key)
    assert not np.allclose(rec, scvi_t["reconstruction_loss"], rtol=1e-2)


def test_marginal_ll_weights_and_averaging(scanvi_model):
    """At the posterior means (every sample replaced by its mean) scvi-tools'
    scANVI weight is log N(z1; 0, I) - reconstruction - log q(z1|x) with the
    reconstruction of get_reconstruction_error: checked here in numpy. The mean
    is scvi-tools' mean of minibatch means."""
    from unittest import mock

    from jaxscanvi import clear_caches

    idx = np.arange(150)
    clear_caches()
    with mock.patch(
        "jaxscanvi.nn.prng.normal", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype)
    ):
        try:
            ll = scanvi_model.get_marginal_ll(
                indices=idx, n_mc_samples=3, batch_size=64, return_mean=False
            )
            rec = scanvi_model.get_reconstruction_error(indices=idx, return_mean=False)[
                "reconstruction_loss"
            ]
        finally:
            clear_caches()
    m, v = (
        np.asarray(a, np.float64)
        for a in scanvi_model.get_latent_representation(indices=idx, return_dist=True)
    )
    log_q = (-0.5 * (np.log(2 * np.pi) + np.log(v))).sum(1)  # at z1 = m
    log_p = (-0.5 * (np.log(2 * np.pi) + m**2)).sum(1)
    np.testing.assert_allclose(ll, log_p - rec - log_q, rtol=2e-5)
    # sampled: scvi-tools' mean over minibatches (64, 64, 22) of their means
    per_cell = scanvi_model.get_marginal_ll(
        indices=idx, n_mc_samples=5, batch_size=64, return_mean=False
    )
    assert np.isfinite(per_cell).all() and not np.allclose(per_cell, ll)
    mean = scanvi_model.get_marginal_ll(indices=idx, n_mc_samples=5, batch_size=64)
    want = np.mean([per_cell[:64].mean(), per_cell[64:128].mean(), per_cell[128:].mean()])
    assert mean == pytest.approx(want, rel=1e-6)


def test_predict_hard_and_soft(scanvi_model, hidden_atlas):
    cats = list(scanvi_model.registry.label_categories)
    hard = scanvi_model.predict()
    assert hard.shape == (hidden_atlas.n_obs,)
    assert set(np.unique(hard)) <= set(cats) and UNL not in set(hard)
    soft = scanvi_model.predict(soft=True)
    assert isinstance(soft, pd.DataFrame)
    assert list(soft.columns) == cats
    assert list(soft.index) == list(hidden_atlas.obs_names)
    p = soft.to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cats, object)[p.argmax(1)], hard)
    idx = np.arange(10, 60)
    sub = scanvi_model.predict(indices=idx, soft=True)
    assert list(sub.index) == list(hidden_atlas.obs_names[idx])
    np.testing.assert_allclose(sub.to_numpy(), p[idx], atol=1e-6)


def test_predict_on_new_adata(scanvi_model, hidden_atlas):
    idx = np.arange(0, hidden_atlas.n_obs, 3)[::-1]  # a subset, in another order
    new = hidden_atlas[idx].copy()
    del new.obs["labels_obs"]  # a query without the label column
    new.obs_names = [f"q{i}" for i in range(new.n_obs)]
    ref_soft = scanvi_model.predict(indices=idx, soft=True).to_numpy()
    soft = scanvi_model.predict(new, soft=True)
    assert list(soft.index) == list(new.obs_names)
    assert list(soft.columns) == list(scanvi_model.registry.label_categories)
    np.testing.assert_allclose(soft.to_numpy(), ref_soft, atol=1e-5)
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(scanvi_model.predict(new), scanvi_model.predict(indices=idx))


def test_save_load_roundtrip(scanvi_model, hidden_atlas, tmp_path):
    path = tmp_path / "scanvi"
    scanvi_model.save(path)
    a = hidden_atlas.copy()
    loaded = SCANVI.load(path, adata=a)
    assert loaded.was_pretrained and loaded.is_trained
    assert loaded.module.config == scanvi_model.module.config
    assert loaded.registry.label_categories == scanvi_model.registry.label_categories
    np.testing.assert_array_equal(loaded.predict(), scanvi_model.predict())
    np.testing.assert_array_equal(
        loaded.predict(soft=True).to_numpy(), scanvi_model.predict(soft=True).to_numpy()
    )
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), scanvi_model.get_latent_representation()
    )
    pd.testing.assert_frame_equal(loaded.history.to_frame(), scanvi_model.history.to_frame())


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def test_checkpoint_resume_bitwise(scvi_model, tmp_path):
    """Two epochs, then a fresh model resumed from the checkpoint to four: bit for
    bit the uninterrupted four-epoch run (parameters, statistics, optimiser,
    history with validation, predictions)."""
    kw = dict(SCANVI_TRAIN, max_epochs=4)

    def fresh():
        return SCANVI.from_scvi_model(scvi_model, UNL, labels_key="labels_obs")

    full = fresh()
    full.train(**kw, checkpoint_dir=tmp_path / "full")
    part = fresh()
    part.train(**{**kw, "max_epochs": 2}, checkpoint_dir=tmp_path / "part")
    assert part.history.n_epochs == 2 and not _bitwise_equal(part.params, full.params)
    resumed = fresh()
    resumed.train(**kw, checkpoint_dir=tmp_path / "part", resume=True)
    assert int(resumed.train_state.epoch) == 4
    assert _bitwise_equal(resumed.params, full.params)
    assert _bitwise_equal(resumed.state, full.state)
    assert _bitwise_equal(resumed.train_state.opt_state, full.train_state.opt_state)
    cols = [c for c in full.history.to_frame().columns if c != "epoch_seconds"]
    assert "accuracy_validation" in cols
    pd.testing.assert_frame_equal(resumed.history.to_frame()[cols], full.history.to_frame()[cols])
    np.testing.assert_array_equal(
        resumed.predict(soft=True).to_numpy(), full.predict(soft=True).to_numpy()
    )


# ------------------------------------------------------------ real data
def _balanced_accuracy(truth, pred):
    classes = np.unique(truth)
    return float(np.mean([(pred[truth == c] == c).mean() for c in classes]))


@pytest.mark.data
def test_pbmc_label_transfer():
    """pbmc_3k_4k (2 batches, 6 types + Unknown): hide 70% of labels per type (fixed
    seed; Unknown cells stay unlabelled), scVI 20 epochs then scANVI 8 epochs; balanced
    accuracy on the hidden cells well above chance (~0.72 and ~0.91 accuracy here)."""
    import anndata

    adata = hvg(anndata.read_h5ad(shared_file("pbmc_3k_4k.h5ad")), 2000)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    hidden = np.zeros(adata.n_obs, bool)
    for c in np.unique(truth):
        if c == UNL:
            continue
        of_c = np.flatnonzero(truth == c)
        hidden[rng.choice(of_c, round(0.7 * len(of_c)), replace=False)] = True
    adata.obs["labels_obs"] = pd.Categorical(np.where(hidden, UNL, truth))
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels_obs")
    scvi = SCVI(adata)
    scvi.train(max_epochs=20, batch_size=256, progress_bar=False)  # ~1-2 s an epoch
    model = SCANVI.from_scvi_model(scvi, UNL)
    assert UNL not in model.registry.label_categories
    model.train(max_epochs=8, batch_size=256, progress_bar=False)
    idx = np.flatnonzero(hidden)
    pred = model.predict(indices=idx)
    bal = _balanced_accuracy(truth[idx], pred)
    acc = float((pred == truth[idx]).mean())
    n_cls = len(model.registry.label_categories)
    assert bal > 0.6 and bal > 3.0 / n_cls, (bal, acc)
    assert acc > 0.8, (bal, acc)
    # cells labelled Unknown in the source are predicted as one of the real types
    unk = np.flatnonzero(truth == UNL)
    if len(unk):
        assert set(model.predict(indices=unk)) <= set(model.registry.label_categories)

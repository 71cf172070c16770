"""The SCVI loss on fixed parameters against an independent numpy computation.

The numpy side re-implements the whole forward pass from the parameter arrays:
encoder (log1p input, one-hot covariates, Dense -> BatchNorm(eps=1e-3) -> ReLU,
mean head, var = exp(head) + 1e-4), the reparameterised sample, the decoder
(softmax scale * library, px_r dispersion, zero-inflation logits) and the
ZINB / NB / Poisson log-likelihoods in float64. Eval mode uses the running
BatchNorm statistics and no dropout; train mode (for a dropout-free model)
uses the masked batch statistics and updates the running ones torch-style.

The Gaussian noise is pinned by reading it back from the model's outputs,
eps = (untran_z - qz_m) / sqrt(qz_v), where qz_m and qz_v are first checked
against the numpy encoder; everything downstream of eps is numpy's.

Parameters and running statistics are perturbed away from their
initialisation so that every block (BatchNorm affine, covariate embeddings,
running stats) matters.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

import jaxscanvi
from jaxscanvi import SCVI
from jaxscanvi.data.batch import host_batch, nnz_cap
from jaxscanvi.losses import scvi_elbo

N_CELLS, N_GENES, B_PAD = 48, 16, 56  # 8 padding rows in every minibatch; n_genes = n_hidden
KL_WEIGHT = 0.37


# ------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adata():
    a = jaxscanvi.synthetic_atlas(
        n_cells=N_CELLS,
        n_genes=N_GENES,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        markers_per_type=3,
        seed=3,
        library_log_mean=5.0,
    )
    SCVI.setup_anndata(a, layer="counts", batch_key="batch")
    return a


def _perturb(model, seed):
    """Move every parameter and running statistic away from its initial value."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    leaves = [np.asarray(l) + rng.normal(0.0, 0.3, l.shape).astype(np.float32) for l in leaves]
    model.params = jax.tree_util.tree_unflatten(tree, [jnp.asarray(l) for l in leaves])

    def stats(path, v):
        name = path[-1].key
        if name == "mean":
            return jnp.asarray(rng.normal(0.0, 0.5, v.shape), jnp.float32)
        return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), jnp.float32)

    state = dict(model.state)
    state["batch_stats"] = jax.tree_util.tree_map_with_path(stats, state["batch_stats"])
    model.state = state
    return model


_MODELS = {
    # zinb, per-gene dispersion, observed library; dropout-free so train mode is exact
    "zinb": dict(dropout_rate=0.0),
    # nb, per-gene-and-batch dispersion, learned library with its KL, covariates in the
    # encoder, two layers with deep injection, dropout that eval mode must switch off
    "nb": dict(
        gene_likelihood="nb",
        dispersion="gene-batch",
        use_observed_lib_size=False,
        encode_covariates=True,
        n_layers=2,
        dropout_rate=0.2,
    ),
    "poisson": dict(gene_likelihood="poisson"),
}


@pytest.fixture(scope="module")
def models(adata):
    return {}


def get_model(models, adata, name):
    if name not in models:
        with jax.disable_jit():  # op by op: the primitives' executables are shared
            m = SCVI(adata, n_hidden=16, n_latent=4, seed=1, **_MODELS[name])
        models[name] = _perturb(m, seed=10 + sorted(_MODELS).index(name))
    return models[name]


def model_batch(model):
    cells = model._train_cells()
    k = nnz_cap(cells.row_nnz(), B_PAD) + 3
    return host_batch(cells, np.arange(cells.n_obs), B_PAD, k)


def loss_fn(model, *, train: bool, sparse: bool = True):
    """scvi_elbo for this model, run op by op.

    Compiling a program per model and mode costs more here than running the
    tiny model eagerly, whose small executables are shared by all models; the
    jitted path is exercised by get_elbo below.
    """
    fn = partial(scvi_elbo, model.module, train=train, sparse=sparse)

    def run(*args):
        with jax.disable_jit():
            return fn(*args)

    return run


# ------------------------------------------------------- numpy forward
def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def np_fc_layers(p, s, x, cats, *, n_layers, use_bn, inject_all, train, w, new_stats):
    """FCLayers: [x, one-hot covariates] @ [kernel; embeddings] -> BN -> ReLU (no dropout)."""
    h = x
    for i in range(n_layers):
        d = p[f"dense{i}"]
        inputs, kernel = [h], [d["kernel"]]
        if i == 0 or inject_all:
            for j, onehot in cats:
                inputs.append(onehot)
                kernel.append(p[f"layer{i}_cov{j}"])
        h = np.concatenate(inputs, 1) @ np.concatenate(kernel, 0) + d["bias"]
        if use_bn:
            bn, st = p[f"bn{i}"], s[f"bn{i}"]
            if train:
                n = w.sum()
                mean = (w[:, None] * h).sum(0) / n
                s2 = (w[:, None] * (h - mean) ** 2).sum(0)
                var = s2 / n
                new_stats[f"bn{i}"] = {
                    "mean": 0.99 * st["mean"] + 0.01 * mean,
                    "var": 0.99 * st["var"] + 0.01 * s2 / (n - 1),
                }
            else:
                mean, var = st["mean"], st["var"]
            h = (h - mean) / np.sqrt(var + 1e-3) * bn["scale"] + bn["bias"]
        h = np.maximum(h, 0.0)
    return h


def np_encoder(p, s, x, cats, cfg, *, train, w, new_stats):
    h = np_fc_layers(
        p["encoder"],
        s["encoder"],
        x,
        cats,
        n_layers=cfg["n_layers"],
        use_bn=True,
        inject_all=cfg["deep"],
        train=train,
        w=w,
        new_stats=new_stats.setdefault("encoder", {}),
    )
    m = h @ p["mean"]["kernel"] + p["mean"]["bias"]
    v = np.exp(h @ p["var"]["kernel"] + p["var"]["bias"]) + 1e-4
    return m, v


def ref_log_nb(x, log_mu, log_th):
    mu, th = np.exp(log_mu), np.exp(log_th)
    return (
        sp.gammaln(x + th)
        - sp.gammaln(th)
        - sp.gammaln(x + 1.0)
        - th * np.log1p(mu / th)
        - x * np.log1p(th / mu)
    )


def np_model_loss(model, batch, eps_z, eps_l=None, *, train=False):
    """Per-cell reconstruction, KL z, KL l, and the moments, all in float64 numpy."""
    c = model.module.config
    cfg = {"n_layers": c.n_layers, "deep": c.deeply_inject_covariates}
    P = _np(model.params)
    S = _np(model.state["batch_stats"])
    n = int(np.asarray(batch.weight).sum())
    X = np.asarray(batch.x, np.float64)[:n]
    b = np.asarray(batch.batch)[:n]
    w = np.ones(n)
    onehot = np.eye(c.n_batch)[b]
    cats = [(0, onehot)] if c.n_batch > 1 else []
    enc_cats = cats if c.encode_covariates else []
    new_stats: dict = {}
    x_in = np.log1p(X)
    qz_m, qz_v = np_encoder(
        P["z_encoder"],
        S["z_encoder"],
        x_in,
        enc_cats,
        cfg,
        train=train,
        w=w,
        new_stats=new_stats.setdefault("z_encoder", {}),
    )
    z = qz_m + np.sqrt(qz_v) * eps_z[:n]
    out = {"qz_m": qz_m, "qz_v": qz_v, "z": z}
    lib_obs = np.log(X.sum(1))
    if c.use_observed_lib_size:
        library = lib_obs
        kl_l = np.zeros(n)
    else:
        ql_m, ql_v = np_encoder(
            P["l_encoder"],
            S["l_encoder"],
            x_in,
            enc_cats,
            {"n_layers": 1, "deep": c.deeply_inject_covariates},
            train=train,
            w=w,
            new_stats=new_stats.setdefault("l_encoder", {}),
        )
        ql_m, ql_v = ql_m[:, 0], ql_v[:, 0]
        library = ql_m + np.sqrt(ql_v) * eps_l[:n]
        # scvi-tools' prior: per-batch mean and (biased) variance of log library size
        pm = np.array([lib_obs[b == k].mean() for k in range(c.n_batch)])
        pv = np.array([lib_obs[b == k].var() for k in range(c.n_batch)])
        m2, v2 = pm[b], pv[b]
        kl_l = 0.5 * (np.log(v2 / ql_v) + (ql_v + (ql_m - m2) ** 2) / v2 - 1.0)
        out.update(ql_m=ql_m, ql_v=ql_v, prior_mean=pm, prior_var=pv)
    out["library"] = library
    D = P["decoder"]
    h = np_fc_layers(
        D["px_decoder"],
        S["decoder"]["px_decoder"],
        z,
        cats,
        n_layers=c.n_layers,
        use_bn=True,
        inject_all=c.deeply_inject_covariates,
        train=train,
        w=w,
        new_stats=new_stats.setdefault("decoder", {}).setdefault("px_decoder", {}),
    )
    logits = h @ D["px_scale_decoder"]["kernel"] + D["px_scale_decoder"]["bias"]
    scale = np.exp(logits - logits.max(1, keepdims=True))
    scale /= scale.sum(1, keepdims=True)  # softmax
    log_mu = np.log(scale) + library[:, None]
    if c.gene_likelihood == "poisson":
        mu = np.exp(log_mu)
        ll = (X * log_mu - mu - sp.gammaln(X + 1)).sum(1)
    else:
        px_r = P["px_r"]
        log_th = px_r[None, :] if c.dispersion == "gene" else px_r[:, b].T
        log_th = np.broadcast_to(log_th, X.shape)
        nb = ref_log_nb(X, log_mu, log_th)
        if c.gene_likelihood == "nb":
            ll = nb.sum(1)
        else:
            pi = h @ D["px_dropout_decoder"]["kernel"] + D["px_dropout_decoder"]["bias"]
            zinb = np.where(
                X > 0,
                sp.log_expit(-pi) + nb,
                np.logaddexp(sp.log_expit(pi), sp.log_expit(-pi) + nb),
            )
            ll = zinb.sum(1)
            out["zi_logits"] = pi
    out["log_mu"] = log_mu
    out["reconstruction_loss"] = -ll
    out["kl_z"] = 0.5 * (qz_v + qz_m**2 - 1.0 - np.log(qz_v)).sum(1)
    out["kl_l"] = kl_l
    out["new_stats"] = new_stats
    return out


def recovered_noise(outputs, n):
    """The standard normal draws the model used, read back from its outputs."""
    o = {k: np.asarray(v, np.float64) for k, v in outputs.items() if v is not None}
    eps_z = (o["untran_z"] - o["qz_m"]) / np.sqrt(o["qz_v"])
    eps_l = (o["library"] - o["ql_m"]) / np.sqrt(o["ql_v"]) if "ql_m" in o else None
    for e in (eps_z, eps_l):
        if e is not None:  # a real draw, not zeros
            assert 0.3 < e[:n].std() < 2.0 and abs(e[:n].mean()) < 1.0
    return eps_z, eps_l


def check_against_numpy(model, batch, loss, aux, ref, n, *, kl_weight, rtol=2e-5):
    o = aux.outputs
    np.testing.assert_allclose(np.asarray(o["qz_m"])[:n], ref["qz_m"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o["qz_v"])[:n], ref["qz_v"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(o["library"])[:n], ref["library"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o["log_mu"])[:n], ref["log_mu"], rtol=1e-5, atol=1e-4)
    if "zi_logits" in ref:
        np.testing.assert_allclose(
            np.asarray(o["zi_logits"])[:n], ref["zi_logits"], rtol=1e-4, atol=1e-4
        )
    rec, klz, kll = ref["reconstruction_loss"], ref["kl_z"], ref["kl_l"]
    t = {k: float(v) for k, v in aux.terms.items()}
    expect = {
        "reconstruction_loss": rec.mean(),
        "kl_z": klz.mean(),
        "kl_l": kll.mean(),
        "kl_local": (klz + kll).mean(),
        "elbo": (rec + klz + kll).mean(),
        # scvi-tools: the warm-up weight multiplies KL(z) only, not KL(l)
        "loss": (rec + kl_weight * klz + kll).mean(),
    }
    for k, v in expect.items():
        assert t[k] == pytest.approx(v, rel=rtol, abs=1e-4), (k, t[k], v)
    assert float(loss) == pytest.approx(expect["loss"], rel=rtol, abs=1e-4)
    assert set(expect) <= set(t)


# ------------------------------------------------------------------ tests
def test_library_and_counts_in_the_batch(adata, models):
    model = get_model(models, adata, "zinb")
    b = model_batch(model)
    X = adata.layers["counts"].toarray().astype(np.float64)
    np.testing.assert_array_equal(np.asarray(b.x)[:N_CELLS], X)
    np.testing.assert_allclose(np.asarray(b.log_library)[:N_CELLS], np.log(X.sum(1)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(b.lgamma_const)[:N_CELLS], sp.gammaln(X + 1).sum(1), rtol=1e-6
    )
    codes = adata.obs["batch"].cat.codes.to_numpy()
    np.testing.assert_array_equal(np.asarray(b.batch)[:N_CELLS], codes)


@pytest.mark.parametrize("name", ["zinb", "nb", "poisson"])
def test_eval_loss_equals_numpy(adata, models, name):
    model = get_model(models, adata, name)
    batch = model_batch(model)
    rng = jax.random.PRNGKey(7)
    loss, aux = loss_fn(model, train=False)(model.params, model.state, batch, rng, KL_WEIGHT)
    eps_z, eps_l = recovered_noise(aux.outputs, N_CELLS)
    ref = np_model_loss(model, batch, eps_z, eps_l)
    check_against_numpy(model, batch, loss, aux, ref, N_CELLS, kl_weight=KL_WEIGHT)
    # eval mode leaves the running statistics alone
    for a, b in zip(jax.tree_util.tree_leaves(aux.state), jax.tree_util.tree_leaves(model.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the library prior the model holds is the per-batch mean/variance of log library
    if name == "nb":
        const = model.state["constants"]
        np.testing.assert_allclose(
            np.asarray(const["library_log_means"]), ref["prior_mean"], rtol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(const["library_log_vars"]), ref["prior_var"], rtol=1e-5
        )
        assert aux.terms["kl_l"] > 0
    else:
        assert float(aux.terms["kl_l"]) == 0.0


def test_eval_loss_is_deterministic_given_rng_and_depends_on_it(adata, models):
    model = get_model(models, adata, "nb")
    batch = model_batch(model)
    f = loss_fn(model, train=False)
    l1, a1 = f(model.params, model.state, batch, jax.random.PRNGKey(3), 1.0)
    l2, _ = f(model.params, model.state, batch, jax.random.PRNGKey(3), 1.0)
    l3, a3 = f(model.params, model.state, batch, jax.random.PRNGKey(4), 1.0)
    assert float(l1) == float(l2)
    assert float(l1) != float(l3)
    # dropout (rate 0.2 in this model) is off in eval mode: the moments of q(z|x)
    # do not depend on the rng, only the sample does
    np.testing.assert_array_equal(np.asarray(a1.outputs["qz_m"]), np.asarray(a3.outputs["qz_m"]))
    assert not np.array_equal(np.asarray(a1.outputs["z"]), np.asarray(a3.outputs["z"]))


def test_padding_cells_do_not_enter_the_loss(adata, models):
    model = get_model(models, adata, "zinb")
    batch = model_batch(model)
    f = loss_fn(model, train=False)
    loss, aux = f(model.params, model.state, batch, jax.random.PRNGKey(5), KL_WEIGHT)
    # overwrite the padding rows' per-cell data with garbage: nothing may change
    pad = np.arange(N_CELLS, B_PAD)
    garbage = batch._replace(
        log_library=np.asarray(batch.log_library).copy(),
        lgamma_const=np.asarray(batch.lgamma_const).copy(),
    )
    garbage.log_library[pad] = 30.0
    garbage.lgamma_const[pad] = -1e6
    loss_g, aux_g = f(model.params, model.state, garbage, jax.random.PRNGKey(5), KL_WEIGHT)
    assert float(loss_g) == float(loss)
    for k in aux.terms:
        assert float(aux_g.terms[k]) == float(aux.terms[k]), k


def test_train_mode_batch_norm_statistics_equal_numpy(adata, models):
    """Train mode, dropout-free model: BatchNorm normalises with the statistics
    of the real cells only (padding masked out) and updates the running stats
    with momentum 0.01 and the unbiased variance."""
    model = get_model(models, adata, "zinb")
    batch = model_batch(model)
    loss, aux = loss_fn(model, train=True)(
        model.params, model.state, batch, jax.random.PRNGKey(11), KL_WEIGHT
    )
    eps_z, _ = recovered_noise(aux.outputs, N_CELLS)
    ref = np_model_loss(model, batch, eps_z, train=True)
    check_against_numpy(model, batch, loss, aux, ref, N_CELLS, kl_weight=KL_WEIGHT, rtol=5e-5)
    new = _np(aux.state["batch_stats"])
    for path, value in [
        (("z_encoder", "encoder"), ref["new_stats"]["z_encoder"]["encoder"]),
        (("decoder", "px_decoder"), ref["new_stats"]["decoder"]["px_decoder"]),
    ]:
        ours = new[path[0]][path[1]]
        for bn, stats in value.items():
            for k in ("mean", "var"):
                np.testing.assert_allclose(
                    ours[bn][k], stats[k], rtol=1e-4, atol=1e-5, err_msg=f"{path}/{bn}/{k}"
                )
    # and the running statistics did move
    old = _np(model.state["batch_stats"])["z_encoder"]["encoder"]["bn0"]["mean"]
    assert not np.allclose(old, new["z_encoder"]["encoder"]["bn0"]["mean"])


def test_get_elbo_and_reconstruction_error_agree_with_the_loss(adata, models):
    """The model's get_elbo / get_reconstruction_error (jitted, eval mode, dense
    likelihood, rng fold_in(PRNGKey(0), chunk)) equal scvi_elbo's terms with
    the sparse likelihood at the same rng, and the numpy computation with the
    same noise."""
    model = get_model(models, adata, "zinb")
    batch = model_batch(model)
    elbo = model.get_elbo(batch_size=B_PAD)
    rec = model.get_reconstruction_error(batch_size=B_PAD)["reconstruction_loss"]
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    _loss, aux = loss_fn(model, train=False)(model.params, model.state, batch, key, 1.0)
    assert elbo == pytest.approx(-float(aux.terms["elbo"]), rel=1e-5, abs=1e-4)
    assert rec == pytest.approx(float(aux.terms["reconstruction_loss"]), rel=1e-5, abs=1e-4)
    eps_z, _ = recovered_noise(aux.outputs, N_CELLS)
    ref = np_model_loss(model, batch, eps_z)
    assert elbo == pytest.approx(-(ref["reconstruction_loss"] + ref["kl_z"]).mean(), rel=2e-5)
    assert rec == pytest.approx(ref["reconstruction_loss"].mean(), rel=2e-5)
    # ELBO <= 0 side: the negative ELBO exceeds the reconstruction loss by the KL
    assert -elbo > rec

"""The research API: public loss pieces, extra loss terms (jaxscanvi.contrib),
weight schedules, and swapping the encoder or decoder for a user's module."""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxscanvi as js
from jaxscanvi import contrib, losses
from jaxscanvi.module import VAEConfig

TRAIN = dict(batch_size=128, progress_bar=False, train_size=1.0)


# ----------------------------------------------------------- user modules
class MLPEncoder(nn.Module):
    """A user's q(z|x): one GELU layer, no batch norm, ignores covariates."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x, cats=(), *, train: bool, mask=None):
        h = nn.gelu(nn.Dense(24, name="hidden")(x))
        mean = nn.Dense(self.config.n_latent, name="mean")(h)
        var = jnp.exp(nn.Dense(self.config.n_latent, name="log_var")(h)) + 1e-4
        return mean, var


class LinearDecoder(nn.Module):
    """A user's p(x|z, s): linear in z plus a per-batch offset (as LDVAE)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z, cats=(), *, train: bool, mask=None):
        c = self.config
        logits = nn.Dense(c.n_genes, name="loadings")(z)
        logits = logits + nn.Embed(c.n_batch, c.n_genes, name="batch_offset")(cats[0])
        zi = nn.Dense(c.n_genes, name="dropout")(z)
        return jax.nn.log_softmax(logits, -1), None, zi


def _setup(adata):
    js.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    return adata


# ----------------------------------------------------- pure loss pieces
def test_marginal_and_labelled_bound_equal_a_loop_over_classes():
    rng = np.random.default_rng(0)
    B, C = 7, 4
    logits = rng.normal(size=(B, C))
    nll, kl2 = rng.normal(size=(B, C)) ** 2, rng.random((B, C))
    prior = rng.random(C) + 0.1
    log_prior = np.log(prior / prior.sum())
    rec, kl = losses.marginal_bound(
        jnp.asarray(logits), jnp.asarray(log_prior), jnp.asarray(nll), jnp.asarray(kl2)
    )
    labels = rng.integers(0, C, B)
    rec_s, kl_s = losses.labelled_bound(
        jnp.asarray(labels), jnp.asarray(log_prior), jnp.asarray(nll), jnp.asarray(kl2)
    )
    for n in range(B):
        q = np.exp(logits[n] - logits[n].max())
        q /= q.sum()
        want_rec = sum(q[c] * nll[n, c] for c in range(C))
        want_kl = sum(q[c] * kl2[n, c] + q[c] * (np.log(q[c]) - log_prior[c]) for c in range(C))
        np.testing.assert_allclose(float(rec[n]), want_rec, rtol=1e-5)
        np.testing.assert_allclose(float(kl[n]), want_kl, rtol=1e-5, atol=1e-6)
        y = labels[n]
        np.testing.assert_allclose(float(rec_s[n]), nll[n, y], rtol=1e-6)
        np.testing.assert_allclose(float(kl_s[n]), kl2[n, y] - log_prior[y], rtol=1e-5)


def _mmd2_loop(z, a, b, scales):
    def k(u, v):
        d2 = ((u - v) ** 2).sum()
        return sum(np.exp(-d2 / (2 * s * s)) for s in scales)

    kaa = np.mean([k(z[i], z[j]) for i in a for j in a])
    kbb = np.mean([k(z[i], z[j]) for i in b for j in b])
    kab = np.mean([k(z[i], z[j]) for i in a for j in b])
    return kaa + kbb - 2 * kab


def _toy_batch(z, batch_codes, labels, weight):
    n = len(batch_codes)
    outputs = {"qz_m": jnp.asarray(z, jnp.float32), "z": jnp.asarray(z + 1.0, jnp.float32)}
    from jaxscanvi.data.batch import Batch

    b = Batch(
        x=jnp.zeros((n, 1)),
        nz=None,
        weight=jnp.asarray(weight, jnp.float32),
        batch=jnp.asarray(batch_codes, jnp.int32),
        labels=jnp.asarray(labels, jnp.int32),
        cat_covs=jnp.zeros((n, 0), jnp.int32),
        cont_covs=jnp.zeros((n, 0)),
        log_size_factor=jnp.zeros(n),
        log_library=jnp.zeros(n),
        lgamma_const=jnp.zeros(n),
    )
    return outputs, b


def test_mmd_penalty_equals_brute_force_and_ignores_padding():
    rng = np.random.default_rng(1)
    n = 14
    z = rng.normal(size=(n, 3))
    codes = np.array([0, 0, 1, 1, 1, 2, 0, 2, 1, 0, 2, 2, 0, 1])
    weight = np.ones(n)
    weight[[3, 11]] = 0.0  # padding rows
    scales = (0.5, 2.0)
    outputs, batch = _toy_batch(z, codes, np.zeros(n), weight)
    got = float(contrib.mmd_batch_penalty(4, scales)(outputs, batch, None))
    real = np.flatnonzero(weight > 0)
    want = []
    for b in range(4):  # batch 3 has no cells: skipped
        inside = [i for i in real if codes[i] == b]
        rest = [i for i in real if codes[i] != b]
        if inside and rest:
            want.append(_mmd2_loop(z, inside, rest, scales))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-4)
    # on="z" reads the samples; one batch only: no penalty
    got_z = float(contrib.mmd_batch_penalty(4, scales, on="z")(outputs, batch, None))
    np.testing.assert_allclose(got_z, got, rtol=1e-4)  # z = qz_m + 1: shift invariant
    outputs1, batch1 = _toy_batch(z, np.zeros(n), np.zeros(n), weight)
    assert float(contrib.mmd_batch_penalty(4, scales)(outputs1, batch1, None)) == 0.0
    # far apart batches give a larger penalty than interleaved ones
    far = z + 5.0 * codes[:, None]
    o2, b2 = _toy_batch(far, codes, np.zeros(n), weight)
    assert float(contrib.mmd_batch_penalty(4, scales)(o2, b2, None)) > 2 * got


def test_class_centre_loss_equals_brute_force():
    rng = np.random.default_rng(2)
    n, C = 12, 3
    z = rng.normal(size=(n, 4))
    labels = np.array([0, 1, 2, 3, 0, 1, 3, 2, 2, 0, 3, 1])  # 3 = unlabelled
    weight = np.ones(n)
    weight[4] = 0.0
    outputs, batch = _toy_batch(z, np.zeros(n), labels, weight)
    got = float(contrib.class_centre_loss(C)(outputs, batch, None))
    cells = [i for i in range(n) if labels[i] < C and weight[i] > 0]
    total = 0.0
    for i in cells:
        same = [j for j in cells if labels[j] == labels[i]]
        centre = z[same].mean(0)
        total += ((z[i] - centre) ** 2).sum()
    np.testing.assert_allclose(got, total / len(cells), rtol=1e-5)


def test_contrib_factories_refuse_bad_arguments():
    with pytest.raises(js.InputError, match="n_batch"):
        contrib.mmd_batch_penalty(0)
    with pytest.raises(js.InputError, match="on"):
        contrib.class_centre_loss(3, on="latent")


# ---------------------------------------------------- terms in training
@pytest.fixture(scope="module")
def tiny(small_atlas):
    a = _setup(small_atlas[:300].copy())
    return a, js.SCVI(a, n_latent=4, n_hidden=32)


def test_per_cell_terms_agree_with_the_minibatch_loss(tiny):
    _adata, model = tiny
    batch = model.minibatch(np.arange(40))
    key = jax.random.PRNGKey(3)
    t, _, _ = losses.scvi_per_cell(model.module, model.params, model.state, batch, key)
    loss, aux = losses.scvi_elbo(
        model.module, model.params, model.state, batch, key, 1.0, train=False
    )
    np.testing.assert_allclose(float(jnp.mean(t["elbo"])), float(aux.terms["elbo"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(aux.terms["elbo"]), rtol=1e-6)
    # at the means the bound no longer depends on the key
    m1 = losses.scvi_per_cell(model.module, model.params, model.state, batch, key, sample=False)[0][
        "elbo"
    ]
    m2 = losses.scvi_per_cell(
        model.module, model.params, model.state, batch, jax.random.PRNGKey(4), sample=False
    )[0]["elbo"]
    np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
    assert not np.allclose(np.asarray(m1), np.asarray(t["elbo"]))


def test_an_extra_term_adds_its_weighted_value_and_gradient(tiny):
    _adata, model = tiny
    batch = model.minibatch(np.arange(64))
    key = jax.random.PRNGKey(0)
    mmd = contrib.mmd_batch_penalty(model.registry.n_batch)

    def loss(params, w):
        return losses.scvi_elbo(
            model.module,
            params,
            model.state,
            batch,
            key,
            1.0,
            train=False,
            extra_terms={"mmd": mmd},
            extra_weights={"mmd": w},
        )

    (l0, _a0), g0 = jax.value_and_grad(loss, has_aux=True)(model.params, 0.0)
    (l5, a5), g5 = jax.value_and_grad(loss, has_aux=True)(model.params, 5.0)
    value = float(a5.terms["mmd"])
    assert value > 0
    np.testing.assert_allclose(float(l5) - float(l0), 5.0 * value, rtol=1e-4)
    assert float(a5.terms["mmd_weight"]) == 5.0
    enc0 = jax.tree_util.tree_leaves(g0["z_encoder"])
    enc5 = jax.tree_util.tree_leaves(g5["z_encoder"])
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(enc0, enc5)) > 1e-6
    # the penalty reads the latent means only: the decoder's gradient is unchanged
    for a, b in zip(
        jax.tree_util.tree_leaves(g0["decoder"]), jax.tree_util.tree_leaves(g5["decoder"])
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # and its gradient matches a central finite difference along a random direction
    # of the mean head (after the last ReLU, so the term is smooth along it)
    head = model.params["z_encoder"]["mean"]
    d = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape) * 1e-3, head
    )

    def mmd_at(shift):
        p = dict(model.params)
        p["z_encoder"] = {
            **p["z_encoder"],
            "mean": jax.tree_util.tree_map(lambda a, b: a + shift * b, head, d),
        }
        return float(loss(p, 1.0)[1].terms["mmd"])

    fd = (mmd_at(1.0) - mmd_at(-1.0)) / 2.0
    gmmd = jax.tree_util.tree_map(
        lambda a, b: (a - b) / 5.0, g5["z_encoder"]["mean"], g0["z_encoder"]["mean"]
    )
    an = sum(
        float((a * b).sum())
        for a, b in zip(jax.tree_util.tree_leaves(gmmd), jax.tree_util.tree_leaves(d))
    )
    np.testing.assert_allclose(fd, an, rtol=2e-2)


def test_scanvi_loss_takes_extra_terms_too(small_atlas):
    adata = small_atlas[:200].copy()
    js.SCANVI.setup_anndata(
        adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch"
    )
    model = js.SCANVI(adata, n_latent=4, n_hidden=16)
    batch = model.minibatch(np.arange(32))
    centre = contrib.class_centre_loss(model.registry.n_labels)
    key = jax.random.PRNGKey(0)
    args = (model.module, model.params, model.state, batch, key, 1.0)
    plain, _ = losses.scanvi_elbo(*args, train=False)
    both, aux = losses.scanvi_elbo(
        *args, train=False, extra_terms={"centre": centre}, extra_weights={"centre": 3.0}
    )
    assert "logits_z" in aux.outputs  # class probabilities are there for terms to use
    value = float(centre(aux.outputs, batch, model.params))
    assert value > 0 and float(aux.terms["centre"]) == pytest.approx(value, rel=1e-6)
    np.testing.assert_allclose(float(both) - float(plain), 3.0 * value, rtol=1e-4)


def _term_values(model, adata, fns):
    batch = model.minibatch()
    outputs = losses.forward(
        model.module,
        model.params,
        model.state,
        batch,
        jax.random.PRNGKey(0),
        train=False,
        sample=False,
    )[0]
    return {k: float(f(outputs, batch, model.params)) for k, f in fns.items()}


def test_terms_train_into_the_model_and_the_history(small_atlas, tmp_path):
    adata = _setup(small_atlas.copy())
    fns = {"mmd": contrib.mmd_batch_penalty(2), "centre": contrib.class_centre_loss(4)}
    base = js.SCVI(adata, n_latent=4, n_hidden=32)
    base.train(max_epochs=8, **TRAIN)
    model = js.SCVI(adata, n_latent=4, n_hidden=32)
    steps_per_epoch = -(-adata.n_obs // 128)
    schedule = optax.linear_schedule(0.0, 50.0, 2 * steps_per_epoch)
    model.train(
        max_epochs=8, **TRAIN, loss_terms=fns, loss_weights={"mmd": schedule, "centre": 2.0}
    )
    h = model.history.to_frame()
    for col in ("mmd_train", "centre_train", "mmd_weight_train", "centre_weight_train"):
        assert col in h.columns, col
    # the history records the schedule's cell-weighted mean over each epoch's steps
    cells = np.minimum(128, adata.n_obs - 128 * np.arange(steps_per_epoch))
    want = [
        np.dot(
            [float(schedule(s)) for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)],
            cells,
        )
        / cells.sum()
        for e in range(3)
    ]
    np.testing.assert_allclose(h["mmd_weight_train"].to_numpy()[:3], want, rtol=1e-5)
    assert (h["centre_weight_train"] == 2.0).all()
    # both penalties are lower than in the same model trained without them
    with_terms = _term_values(model, adata, fns)
    without = _term_values(base, adata, fns)
    assert with_terms["mmd"] < 0.7 * without["mmd"], (with_terms, without)
    assert with_terms["centre"] < without["centre"], (with_terms, without)
    # the names survive save/load; the functions are the user's to give again
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "metadata.json").read_text())["loss_terms"] == [
        "centre",
        "mmd",
    ]
    again = js.SCVI.load(tmp_path / "m", adata=adata)
    assert again.loss_term_names == ("centre", "mmd")
    with pytest.warns(UserWarning, match="loss terms"):
        again.train(max_epochs=1, **TRAIN)


def test_from_scvi_tools_errors_name_the_fix(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(js.ModelFormatError, match=r"model\.pt") as e:
        js.SCVI.from_scvi_tools(tmp_path / "empty")
    assert "Fix:" in str(e.value)
    (tmp_path / "empty" / "model.pt").write_bytes(b"not a torch file")
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch needed to read it
    with pytest.raises(js.ModelFormatError, match=r"not in torch's zip format.*Fix:"):
        js.SCANVI.from_scvi_tools(tmp_path / "empty")


# ------------------------------------------------------------ module swap
def test_custom_encoder_and_decoder_train_save_and_load(small_atlas, tmp_path):
    adata = _setup(small_atlas.copy())
    model = js.SCVI(adata, n_latent=4, encoder=MLPEncoder, decoder=LinearDecoder)
    assert set(model.params["z_encoder"]) == {"hidden", "mean", "log_var"}
    assert set(model.params["decoder"]) == {"loadings", "batch_offset", "dropout"}
    model.train(max_epochs=6, **TRAIN)
    loss = model.history.to_frame()["train_loss"].to_numpy()
    assert np.isfinite(loss).all() and loss[-1] < loss[0] - 1.0
    z = model.get_latent_representation()
    # the user's module, not ours, produced the latent
    mean = model.module.apply(
        {"params": model.params, **model.state},
        jnp.log1p(jnp.asarray(adata.X[:5].toarray())),
        (),
        train=False,
        method=lambda m, x, c, train: m.z_encoder(x, c, train=train),
    )[0]
    np.testing.assert_allclose(z[:5], np.asarray(mean), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "custom")
    meta = json.loads((tmp_path / "custom" / "metadata.json").read_text())
    assert meta["custom_modules"]["encoder"].endswith(":MLPEncoder")
    # loading imports nothing by itself: the classes are passed, or trusted by name
    with pytest.raises(js.ModelFormatError, match="trust_custom_modules=True"):
        js.SCVI.load(tmp_path / "custom", adata=adata)
    again = js.SCVI.load(
        tmp_path / "custom", adata=adata, encoder=MLPEncoder, decoder=LinearDecoder
    )
    np.testing.assert_array_equal(again.get_latent_representation(), z)
    again = js.SCVI.load(tmp_path / "custom", adata=adata, trust_custom_modules=True)
    np.testing.assert_array_equal(again.get_latent_representation(), z)
    assert again.module.decoder_cls is LinearDecoder
    # a class that cannot be imported must be passed, and the error says so
    meta["custom_modules"]["encoder"] = "nowhere_module:MLPEncoder"
    (tmp_path / "custom" / "metadata.json").write_text(json.dumps(js.io.sign(meta)))
    with pytest.raises(js.ModelFormatError, match="encoder=") as e:
        js.SCVI.load(tmp_path / "custom", adata=adata, trust_custom_modules=True)
    assert "nowhere_module" in str(e.value)

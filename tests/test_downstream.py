"""Downstream tasks: DE, posterior predictive, likelihood parameters, plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxscanvi import SCANVI, SCVI, InputError, de, pl, synthetic_atlas

VANILLA_COLS = [
    "proba_m1",
    "proba_m2",
    "bayes_factor",
    "scale1",
    "scale2",
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
    "comparison",
    "group1",
    "group2",
]
CHANGE_COLS = [
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "pseudocounts",
    "delta",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_min",
    "lfc_max",
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
    "is_de_fdr_0.05",
    "comparison",
    "group1",
    "group2",
]


@pytest.fixture(scope="module")
def de_atlas():
    return synthetic_atlas(
        n_cells=2400,
        n_genes=400,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=3,
        markers_per_type=20,
    )


@pytest.fixture(scope="module")
def de_model(de_atlas):
    a = de_atlas
    SCVI.setup_anndata(a, layer="counts", batch_key="batch")
    m = SCVI(a, n_latent=8)
    m.train(max_epochs=40, batch_size=256, progress_bar=False)
    return m


def _true_lfc(adata, t: str) -> np.ndarray:
    """log2 of the true mean normalized expression of type t over the rest."""
    syn = adata.uns["synthetic"]
    logits = np.asarray(syn["type_logits"], np.float64)
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    types = list(adata.obs["cell_type"].cat.categories)
    i = types.index(t)
    w = np.asarray(syn["type_weights"], np.float64).copy()
    w[i] = 0
    rest = (w[:, None] * rho).sum(0) / w.sum()
    return np.log2(rho[i] / rest)


# ---------------------------------------------------------------- statistics
def test_vanilla_and_change_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.gamma(2.0, 1.0, (500, 7))
    b = rng.gamma(2.0, 1.2, (500, 7))
    v = de.vanilla(a, b)
    p = np.array([(a[:, g] > b[:, g]).mean() for g in range(7)])
    np.testing.assert_allclose(v["proba_m1"], p)
    np.testing.assert_allclose(v["bayes_factor"], np.log(p + 1e-8) - np.log(1 - p + 1e-8))
    c = de.change(a, b, delta=0.3, pseudocounts=0.01)
    l = np.log2(a + 0.01) - np.log2(b + 0.01)
    pde = np.maximum((l >= 0.3).mean(0), (l < -0.3).mean(0))
    np.testing.assert_allclose(c["proba_de"], pde)
    np.testing.assert_allclose(c["proba_not_de"], 1 - pde)
    l_small = np.log2(a + 1e-5) - np.log2(b + 1e-5)
    np.testing.assert_allclose(c["lfc_median"], np.median(l_small, 0))
    np.testing.assert_allclose(c["lfc_std"], l_small.std(0))
    two = de.change(a, b, delta=0.3, pseudocounts=0.01, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], (l >= 0.3).mean(0) + (l < -0.3).mean(0))


def test_fdr_prediction_brute_force():
    rng = np.random.default_rng(1)
    p = pd.Series(rng.uniform(size=60) ** 0.3, index=[f"g{i}" for i in range(60)])
    got = de.fdr_de_prediction(p, 0.1)
    best = 0  # largest top-k set whose mean (1 - p) <= 0.1, by brute force
    srt = np.sort(p.values)[::-1]
    for k in range(1, 61):
        if np.mean(1 - srt[:k]) <= 0.1:
            best = k
    assert got.sum() == best and got.index.equals(p.index)
    assert got[p >= srt[best - 1]].all() if best else not got.any()


def test_raw_counts_properties_dense_reference():
    rng = np.random.default_rng(2)
    X = rng.poisson(1.0, (40, 9)).astype(np.float32)
    X[X.sum(1) == 0, 0] = 1
    i1, i2 = np.arange(15), np.arange(15, 40)
    got = de.raw_counts_properties(sp.csr_matrix(X), i1, i2)
    norm = X / X.sum(1, keepdims=True) * 1e4
    np.testing.assert_allclose(got["raw_mean1"], X[i1].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["non_zeros_proportion2"], (X[i2] > 0).mean(0))
    np.testing.assert_allclose(got["raw_normalized_mean2"], norm[i2].mean(0), rtol=1e-5)


def test_pseudocounts_offset_reference():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=(50, 10)), rng.uniform(size=(50, 10))
    za = np.arange(10) < 3
    zb = np.arange(10) >= 8
    want = max(np.quantile(a.max(0)[za], 0.9), np.quantile(b.max(0)[zb], 0.9)) / 10
    assert de.pseudocounts_offset(a, b, za, zb) == pytest.approx(want)
    assert de.pseudocounts_offset(a, b, np.zeros(10, bool), np.zeros(10, bool)) == 1e-10


# ---------------------------------------------------------------- DE on a model
def test_de_change_recovers_planted_genes_and_controls_fdr(de_model, de_atlas):
    a = de_atlas
    t = "L1_T0"
    res = de_model.differential_expression(
        groupby="cell_type", group1=t, mode="change", delta=0.25, n_samples=3000
    )
    assert list(res.columns) == CHANGE_COLS
    assert res.index.is_unique and len(res) == a.n_vars
    planted = {f"gene{g}" for g in a.uns["synthetic"]["de_genes"][t]}
    top = set(res.index[: len(planted)])
    assert len(top & planted) >= 0.8 * len(planted)
    # posterior expected FDR control: flagged genes are mostly truly DE
    truth = pd.Series(np.abs(_true_lfc(a, t)), index=a.var_names)
    flagged = res.index[res["is_de_fdr_0.05"].to_numpy()]
    assert len(flagged) >= len(planted)
    fdp = float((truth[flagged] < 0.25 / 2).mean())
    assert fdp <= 0.15, fdp
    # LFC agrees with the truth in sign for the planted (up-regulated) genes
    assert (res.loc[list(planted), "lfc_mean"] > 0).mean() >= 0.9
    assert res["proba_de"].is_monotonic_decreasing


def test_de_vanilla_one_vs_rest_all_groups(de_model, de_atlas):
    res = de_model.differential_expression(groupby="cell_type", n_samples=1000)
    assert list(res.columns) == VANILLA_COLS
    types = list(de_atlas.obs["cell_type"].cat.categories)
    assert sorted(res["comparison"].unique()) == sorted(f"{t} vs Rest" for t in types)
    for t in types:
        sub = res[res["group1"] == t]
        planted = {f"gene{g}" for g in de_atlas.uns["synthetic"]["de_genes"][t]}
        assert len(set(sub.index[: len(planted)]) & planted) >= 0.7 * len(planted), t
        assert sub["bayes_factor"].is_monotonic_decreasing
    np.testing.assert_allclose(res["proba_m1"] + res["proba_m2"], 1.0)


def test_de_idx_and_batch_correction(de_model, de_atlas):
    a = de_atlas
    m1 = (a.obs["cell_type"] == "L0_T0").to_numpy()
    m2 = (a.obs["cell_type"] == "L0_T1").to_numpy()
    res = de_model.differential_expression(
        idx1=m1, idx2=np.flatnonzero(m2), batch_correction=True, n_samples=1000
    )
    assert "comparison" not in res and len(res) == a.n_vars
    props = de.raw_counts_properties(
        de_model._train_cells().X, np.flatnonzero(m1), np.flatnonzero(m2)
    )
    np.testing.assert_allclose(res.loc[a.var_names, "raw_mean1"], props["raw_mean1"])
    q = de_model.differential_expression(
        idx1="cell_type == 'L0_T0'", idx2="cell_type == 'L0_T1'", n_samples=500
    )
    assert q["bayes_factor"].notna().all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"groupby": "nope"}, "groupby"),
        ({"groupby": "cell_type", "group1": "absent"}, "group1"),
        ({"groupby": "cell_type", "mode": "bayes"}, "mode"),
        ({"groupby": "cell_type", "weights": "bogus"}, "weights"),
        (
            {
                "groupby": "cell_type",
                "weights": "importance",
                "importance_weighting_kwargs": {"n_cells": 3},
            },
            "importance_weighting_kwargs",
        ),
        ({"groupby": "cell_type", "batchid1": ["batch0"]}, "batchid1"),
        ({"groupby": "cell_type", "fdr_target": 1.5}, "fdr_target"),
    ],
)
def test_de_bad_arguments(de_model, kwargs, field):
    with pytest.raises(InputError, match=field):
        de_model.differential_expression(n_samples=10, **kwargs)


def test_importance_weights_match_brute_force():
    from scipy.special import logsumexp
    from scipy.stats import nbinom, norm

    from jaxscanvi.model._kernels import anchor_terms as _anchor_terms

    rng = np.random.default_rng(4)
    S, A, G, L = 3, 4, 5, 2
    z = rng.normal(size=(S, L)).astype(np.float32)
    log_scale = np.log(rng.dirichlet(np.ones(G), S)).astype(np.float32)
    log_theta = rng.normal(size=(S, G)).astype(np.float32)
    qm = rng.normal(size=(A, L)).astype(np.float32)
    qv = rng.uniform(0.2, 1.5, (A, L)).astype(np.float32)
    xa = rng.poisson(3.0, (A, G)).astype(np.float32)
    lib = np.log(xa.sum(1) + 1).astype(np.float32)
    log_px = rng.normal(-20, 1, A).astype(np.float32)
    got = np.asarray(_anchor_terms("nb", z, log_scale, log_theta, z, qm, qv, xa, lib, log_px))
    want = np.zeros(S)
    for s in range(S):
        terms, lq = [], []
        for a in range(A):
            mu = np.exp(log_scale[s] + lib[a])
            th = np.exp(log_theta[s])
            lp = nbinom.logpmf(xa[a], th, th / (th + mu)).sum()
            terms.append(norm.logpdf(z[s]).sum() + lp - log_px[a])
            lq.append(norm.logpdf(z[s], qm[a], np.sqrt(qv[a])).sum())
        want[s] = logsumexp(terms) - logsumexp(lq)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_de_importance_weighting_runs_and_ranks(de_model, de_atlas):
    t = "L1_T0"
    res = de_model.differential_expression(
        groupby="cell_type",
        group1=t,
        weights="importance",
        n_samples=400,
        importance_weighting_kwargs={"max_cells": 64, "n_mc_samples": 20},
    )
    assert list(res.columns) == VANILLA_COLS
    # importance weights concentrate on few samples (ties at the top), so
    # check the evidence for the planted (up-regulated) genes on average
    planted = [f"gene{g}" for g in de_atlas.uns["synthetic"]["de_genes"][t]]
    null = de_atlas.var_names[de_atlas.var["marker_of"] == ""]
    assert res.loc[planted, "proba_m1"].mean() > 0.9
    assert res.loc[planted, "bayes_factor"].mean() > res.loc[null, "bayes_factor"].mean() + 2


# ---------------------------------------------------------------- expression
def test_transform_batch_moves_expression_along_true_batch_effect(de_model, de_atlas):
    idx = np.arange(300)
    e0 = de_model.get_normalized_expression(indices=idx, transform_batch="batch0")
    e1 = de_model.get_normalized_expression(indices=idx, transform_batch="batch1")
    got = np.log(e1.values.mean(0) / e0.values.mean(0))
    truth = np.diff(np.asarray(de_atlas.uns["synthetic"]["batch_lfc"]), axis=0)[0]
    r = np.corrcoef(got, truth)[0, 1]
    assert r > 0.8, r
    both = de_model.get_normalized_expression(indices=idx, transform_batch=["batch0", "batch1"])
    np.testing.assert_allclose(both.values, (e0.values + e1.values) / 2, rtol=1e-5)


# ---------------------------------------------------------------- predictive
@pytest.fixture(scope="module")
def nb_model(small_atlas):
    a = small_atlas.copy()
    SCVI.setup_anndata(a, layer="counts", batch_key="batch")
    m = SCVI(a, n_hidden=32, n_latent=4, gene_likelihood="nb")
    m.train(max_epochs=5, progress_bar=False)
    return m


def test_posterior_predictive_mean_and_variance(nb_model):
    idx = np.arange(6)
    S = 300
    # chunks of 8 cells: the default 1,024 would draw 170x more padding than cells
    x = nb_model.posterior_predictive_sample(indices=idx, n_samples=S, seed=1, batch_size=8)
    assert isinstance(x, sp.coo_array) and x.shape == (6, nb_model.registry.n_vars, S)
    x = x.todense()
    lp = nb_model.get_likelihood_parameters(indices=idx, n_samples=S, batch_size=8)
    mu, th = lp["mean"], lp["dispersions"]  # (S, cells, genes)
    mean = mu.mean(0)
    var = (mu + mu**2 / th).mean(0) + mu.var(0)  # law of total variance
    zs = (x.mean(-1) - mean) / np.sqrt(var / S)
    assert np.mean(np.abs(zs) < 4) > 0.99
    big = mean > 2
    ratio = x.var(-1)[big] / var[big]
    assert 0.7 < np.median(ratio) < 1.3


def test_posterior_predictive_zinb_shapes_and_gene_list(de_model, de_atlas):
    genes = list(de_atlas.var_names[:5])
    x = de_model.posterior_predictive_sample(indices=np.arange(20), gene_list=genes)
    assert isinstance(x, sp.csr_matrix) and x.shape == (20, 5)
    assert np.all(x.data >= 0) and np.all(x.data == np.round(x.data))
    lp = de_model.get_likelihood_parameters(indices=np.arange(20))
    assert set(lp) == {"mean", "dispersions", "dropout"}
    assert lp["mean"].shape == (20, de_atlas.n_vars)
    assert np.all((lp["dropout"] >= 0) & (lp["dropout"] <= 1))
    assert lp["dispersions"].shape == (20, de_atlas.n_vars)


def test_latent_library_size_and_correlation(de_model, de_atlas):
    lib = de_model.get_latent_library_size(indices=np.arange(10))
    obs = np.asarray(de_atlas.layers["counts"][:10].sum(1)).reshape(-1, 1)
    np.testing.assert_allclose(lib, obs, rtol=1e-5)
    c = de_model.get_feature_correlation_matrix(indices=np.arange(150), n_samples=3)
    assert c.shape == (de_atlas.n_vars,) * 2 and list(c.index) == list(de_atlas.var_names)
    np.testing.assert_allclose(np.diag(c.values), 1.0, atol=1e-6)
    np.testing.assert_allclose(c.values, c.values.T, atol=1e-6)
    # markers of one type co-vary across cells: mean within-set correlation is positive
    g = de_atlas.uns["synthetic"]["de_genes"]["L0_T0"]
    block = c.values[np.ix_(g, g)]
    assert block[~np.eye(len(g), dtype=bool)].mean() > 0.2


def test_learned_library_size_is_lognormal_mean(small_atlas):
    """give_mean: exp(ql_m + ql_v / 2), the mean of the learned log-normal q(l|x)
    (what scvi-tools returns, LogNormal(ql_m, sqrt(ql_v)).mean), with ql_m and
    ql_v from a numpy l-encoder (log1p -> dense -> eval batch norm -> ReLU ->
    heads); give_mean=False: a draw from that log-normal."""
    a = small_atlas.copy()
    SCVI.setup_anndata(a, layer="counts", batch_key="batch")
    m = SCVI(a, n_hidden=16, n_latent=4, use_observed_lib_size=False)
    m.train(max_epochs=2, batch_size=128, progress_bar=False)  # non-trivial statistics
    lib = m.get_latent_library_size()
    s = m.get_latent_library_size(give_mean=False)
    assert lib.shape == s.shape == (a.n_obs, 1)

    def np64(t):
        return {
            k: np64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in t.items()
        }

    p, bs = np64(m.params["l_encoder"]), np64(m.state["batch_stats"]["l_encoder"])
    x = a.layers["counts"]
    x = np.log1p(np.asarray(x.todense() if sp.issparse(x) else x, np.float64))
    dense, bn, st = p["encoder"]["dense0"], p["encoder"]["bn0"], bs["encoder"]["bn0"]
    h = x @ dense["kernel"] + dense["bias"]
    h = (h - st["mean"]) / np.sqrt(st["var"] + 1e-3) * bn["scale"] + bn["bias"]
    h = np.maximum(h, 0.0)
    ql_m = (h @ p["mean"]["kernel"] + p["mean"]["bias"])[:, 0]
    ql_v = np.exp(h @ p["var"]["kernel"] + p["var"]["bias"])[:, 0] + 1e-4
    np.testing.assert_allclose(lib[:, 0], np.exp(ql_m + ql_v / 2), rtol=2e-5)
    assert not np.allclose(lib[:, 0], np.exp(ql_m), rtol=1e-3)  # the variance term counts
    eps = (np.log(s[:, 0]) - ql_m) / np.sqrt(ql_v)  # standard normal if s ~ q(l|x)
    assert abs(eps.mean()) < 0.15 and 0.85 < eps.std() < 1.15


# ---------------------------------------------------------------- SCANVI
@pytest.fixture(scope="module")
def scanvi_model(de_atlas):
    a = de_atlas.copy()
    lab = a.obs["cell_type"].astype(str).to_numpy().copy()
    lab[np.random.default_rng(0).uniform(size=a.n_obs) < 0.6] = "Unknown"
    a.obs["lab"] = lab
    SCANVI.setup_anndata(
        a, layer="counts", batch_key="batch", labels_key="lab", unlabeled_category="Unknown"
    )
    m = SCANVI(a, n_latent=8)
    m.train(max_epochs=25, batch_size=256, progress_bar=False)
    return m


def test_scanvi_de_on_predicted_labels(scanvi_model):
    m = scanvi_model
    a = m.adata
    a.obs["pred"] = m.predict()
    res = m.differential_expression(groupby="pred", group1="L1_T1", mode="change", n_samples=1000)
    planted = {f"gene{g}" for g in a.uns["synthetic"]["de_genes"]["L1_T1"]}
    assert len(set(res.index[: len(planted)]) & planted) >= 0.8 * len(planted)


def test_scanvi_expression_conditioned_on_label(scanvi_model):
    m = scanvi_model
    a = m.adata
    others = np.flatnonzero(a.obs["cell_type"].to_numpy() == "L0_T0")[:150]
    g = a.uns["synthetic"]["de_genes"]["L1_T1"]
    base = m.get_normalized_expression(indices=others)
    moved = m.get_normalized_expression(indices=others, label="L1_T1")
    assert moved.shape == base.shape
    up = np.log(moved.values[:, g].mean() / base.values[:, g].mean())
    own = a.uns["synthetic"]["de_genes"]["L0_T0"]
    down = np.log(moved.values[:, own].mean() / base.values[:, own].mean())
    assert up > 0.2 and down < -0.2, (up, down)
    with pytest.raises(InputError, match="label"):
        m.get_normalized_expression(indices=others, label="not a type")


# ---------------------------------------------------------------- plots
def test_plots_return_figures_and_write_png(tmp_path, de_model, de_atlas):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    f = pl.history(de_model, save=tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000 and f.axes
    y = de_atlas.obs["cell_type"].astype(str).to_numpy()
    yp = y.copy()
    yp[:100] = "L0_T0"
    f = pl.confusion_matrix(y, yp, save=tmp_path / "c.png")
    np.testing.assert_allclose(f.matrix.sum(1), 1.0)
    assert (tmp_path / "c.png").exists()
    res = de_model.differential_expression(
        groupby="cell_type", group1="L0_T0", mode="change", n_samples=300
    )
    f = pl.de_volcano(res, save=tmp_path / "v.png")
    assert (tmp_path / "v.png").exists() and f.axes[0].get_xlabel() == "log2 fold change"
    two = de_model.differential_expression(
        groupby="cell_type", group1=["L0_T0", "L0_T1"], n_samples=100
    )
    with pytest.raises(InputError, match="several comparisons"):
        pl.de_volcano(two)

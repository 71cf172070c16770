"""What a scvi-tools user relies on: `settings`, train()'s scvi-tools and Lightning
keywords, the optimisers, the history's form and names, setup introspection,
per-cell ELBOs, and the DE options (automatic delta, outlier filtering,
importance-weighted expression)."""

from __future__ import annotations

import logging
import warnings

import jax
import numpy as np
import optax
import pandas as pd
import pytest

import jaxscanvi as js
from jaxscanvi import SCANVI, SCVI, InputError, de
from jaxscanvi.train.compat import translate
from jaxscanvi.train.history import History
from jaxscanvi.train.state import make_optimizer, pending_update

TINY = dict(n_hidden=16, n_latent=4)
QUIET = dict(progress_bar=False)


@pytest.fixture(autouse=True)
def _fresh_settings():
    js.settings.reset()
    yield
    js.settings.reset()


@pytest.fixture(scope="module")
def setup_atlas(small_atlas):
    a = small_atlas.copy()
    a.obs["lab"] = a.obs["cell_type"].astype(str)
    a.obs.loc[a.obs.index[::3], "lab"] = "Unknown"
    SCVI.setup_anndata(a, batch_key="batch", labels_key="lab")
    return a


@pytest.fixture(scope="module")
def trained(setup_atlas):
    model = SCVI(setup_atlas, **TINY)
    model.train(max_epochs=3, check_val_every_n_epoch=1, **QUIET)
    return model


# ------------------------------------------------------------------ settings
def test_settings_seed_is_the_default_seed(setup_atlas):
    js.settings.seed = 3
    a, b = SCVI(setup_atlas, **TINY), SCVI(setup_atlas, **TINY, seed=3)
    c = SCVI(setup_atlas, **TINY, seed=0)
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(c.params)))
    assert a.init_seed == 3


def test_settings_accept_scvi_tools_names_and_refuse_others():
    js.settings.dl_num_workers = 4  # accepted, no effect
    js.settings.progress_bar_style = "rich"
    js.settings.verbosity = "INFO"
    assert logging.getLogger("jaxscanvi").level == logging.INFO
    with pytest.warns(UserWarning, match="num_threads has no effect"):
        js.settings.num_threads = 2
    with pytest.raises(InputError, match=r"settings\.sed"):
        js.settings.sed = 1
    with pytest.raises(InputError, match=r"settings\.seed"):
        js.settings.seed = -1
    with pytest.raises(InputError, match=r"settings\.batch_size"):
        js.settings.batch_size = 0


def test_settings_batch_size_is_the_inference_chunk(trained):
    z = trained.get_latent_representation()
    js.settings.batch_size = 37  # same numbers whatever the chunking
    np.testing.assert_allclose(trained.get_latent_representation(), z, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- train()'s keywords
def _args(**kw):
    base = {
        "accelerator": "auto",
        "devices": "auto",
        "train_size": None,
        "precision": "float32",
        "plan_kwargs": None,
        "trainer_kwargs": {},
    }
    extra = {
        k: kw.pop(k)
        for k in list(kw)
        if k not in base
        and k
        not in (
            "datasplitter_kwargs",
            "plan_config",
            "trainer_config",
            "datamodule",
            "load_sparse_tensor",
            "adversarial_classifier",
            "shuffle_set_split",
        )
    }
    return {**base, **kw, "trainer_kwargs": extra}


def test_translate_maps_scvi_tools_keywords():
    out = translate(
        _args(
            enable_progress_bar=False,
            early_stopping_min_delta=0.5,
            gradient_clip_val=2.0,
            precision="bf16-mixed",
            trainer_config={"max_steps": -1},
            plan_config={"lr": 1e-2},
            plan_kwargs={"weight_decay": 0.0},
            devices=[0],
            datasplitter_kwargs={"shuffle_set_split": False},
        )
    )
    assert out["progress_bar"] is False and out["early_stopping_min_delta"] == 0.5
    assert out["plan_kwargs"] == {"lr": 1e-2, "weight_decay": 0.0, "gradient_clip_val": 2.0}
    assert out["precision"] == "bfloat16" and out["train_size"] == 0.9
    assert out["devices"] == [jax.local_devices()[0]]
    assert out["shuffle_set_split"] is False
    assert translate(_args(accelerator="cpu", devices=-1))["devices"] == "auto"
    assert translate(_args(precision=32))["precision"] == "float32"


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(max_steps=10), "max_steps"),
        (dict(callbacks=[object()]), "callbacks"),
        (dict(accumulate_grad_batches=4), "accumulate_grad_batches"),
        (dict(datamodule=object()), "datamodule"),
        (dict(foo=1), "foo"),
        (dict(precision="16-mixed"), "precision"),
        (dict(accelerator="mps"), "accelerator"),
        (dict(accelerator="gpu"), "accelerator"),
        (dict(devices=[5]), "devices"),
        (dict(early_stopping_mode="max"), "early_stopping_mode"),
        (dict(adversarial_classifier=True), "adversarial_classifier"),
        (dict(datasplitter_kwargs={"drop_last": True}), "datasplitter_kwargs"),
        (dict(gradient_clip_val=-1.0), "gradient_clip_val"),
    ],
)
def test_translate_refuses_what_cannot_apply(kw, field):
    if field == "accelerator" and kw["accelerator"] == "gpu" and jax.default_backend() == "gpu":
        pytest.skip("a GPU is what JAX runs on here")
    with pytest.raises(InputError, match=field):
        translate(_args(**kw))


def test_translate_warns_once_for_lightning_machinery():
    with pytest.warns(UserWarning, match="logger is ignored") as rec:
        translate(_args(logger=True))
    assert len(rec) == 1
    with pytest.warns(UserWarning, match="load_sparse_tensor"):
        translate(_args(load_sparse_tensor=True))
    with pytest.warns(UserWarning, match="num_workers"):
        translate(_args(datasplitter_kwargs={"num_workers": 4}))


def test_train_takes_scvi_tools_arguments(setup_atlas):
    """Positional order as scvi-tools (max_epochs, accelerator, devices,
    train_size, validation_size, shuffle_set_split), min_delta stopping early."""
    model = SCVI(setup_atlas, **TINY)
    with pytest.warns(UserWarning, match="logger"):
        model.train(
            20,
            "auto",
            "auto",
            0.8,
            0.1,
            False,
            enable_progress_bar=False,
            early_stopping=True,
            early_stopping_patience=2,
            early_stopping_min_delta=1e9,
            logger=False,
            log_every_n_steps=5,
        )
    n = setup_atlas.n_obs
    # no shuffle: validation cells first, then training, the rest is scvi-tools' test set
    np.testing.assert_array_equal(model.validation_indices, np.arange(int(n * 0.1)))
    np.testing.assert_array_equal(
        model.train_indices, np.arange(int(n * 0.1), int(n * 0.1) + int(n * 0.8))
    )
    np.testing.assert_array_equal(model.test_indices, np.arange(int(n * 0.9), n))
    # nothing improves by 1e9: the best is epoch 0, stop after 2 more
    assert model.history.n_epochs == 3
    with pytest.raises(InputError, match="early_stopping_monitor"):
        model.train(2, early_stopping=True, early_stopping_monitor="validation_acuracy", **QUIET)


def test_scanvi_train_takes_scvi_tools_arguments(setup_atlas):
    model = SCANVI.from_scvi_model(SCVI(setup_atlas, **TINY), "Unknown")
    model.train(
        2,
        None,
        1,
        None,
        None,
        True,
        64,
        "auto",
        "auto",
        None,
        enable_progress_bar=False,
        plan_kwargs={"optimizer": "AdamW"},
    )
    h = model.history
    for name in (
        "train_classification_loss",
        "train_accuracy",
        "train_f1_score",
        "validation_classification_loss",
        "validation_accuracy",
        "validation_f1_score",
        "kl_global_train",
        "elbo_validation",
    ):
        assert name in h, name
    # scvi-tools' micro F1 is the accuracy; our names stay beside theirs
    np.testing.assert_array_equal(h["train_f1_score"].to_numpy(), h["accuracy_train"].to_numpy())
    np.testing.assert_array_equal(
        h["validation_accuracy"].to_numpy(), h["accuracy_validation"].to_numpy()
    )
    assert (h["kl_global_train"].to_numpy() == 0).all()


# ---------------------------------------------------------------- optimiser
def _torch_adam(p, grads, lr, eps, wd, decoupled, clip):
    """torch.optim.Adam / AdamW after Lightning's norm clipping, written out."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if clip is not None:
            g = g * min(1.0, clip / (np.sqrt((g**2).sum()) + 1e-6))
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        p = p - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + eps)
    return p


@pytest.mark.parametrize("decoupled,clip", [(False, None), (True, None), (False, 0.5), (True, 0.5)])
def test_optimizer_is_torchs_adam_or_adamw(decoupled, clip):
    r = np.random.default_rng(0)
    p0 = r.normal(size=(6, 4))
    grads = [r.normal(size=(6, 4)) * 3 for _ in range(5)]
    tx = make_optimizer(
        0.05, 0.01, 0.1, decoupled=decoupled, clip=None if clip is None else ("norm", clip)
    )
    p = {"w": jax.numpy.asarray(p0, np.float32)}
    s = tx.init(p)
    for g in grads:
        u, s = tx.update({"w": jax.numpy.asarray(g, np.float32)}, s, p)
        p = optax.apply_updates(p, u)
    expected = _torch_adam(p0, grads, 0.05, 0.01, 0.1, decoupled, clip)
    np.testing.assert_allclose(p["w"], expected, rtol=2e-5, atol=2e-6)


def test_deferred_adamw_update_is_the_optax_update():
    """pending_update with AdamW's decoupled decay: the update tx.update gives."""
    tx = make_optimizer(0.05, 0.01, 0.1, decoupled=True)
    r = np.random.default_rng(1)
    p = {"w": jax.numpy.asarray(r.normal(size=(5, 3)), np.float32)}
    s = tx.init(p)
    for _ in range(3):
        g = {"w": jax.numpy.asarray(r.normal(size=(5, 3)), np.float32)}
        u, s = tx.update(g, s, p)
        ref = optax.apply_updates(p, u)
        got = pending_update(s, p, eps=0.01, decoupled_decay=0.1)
        np.testing.assert_allclose(got["w"], ref["w"], rtol=2e-6, atol=1e-7)
        p = ref


def test_unknown_optimizer_is_refused(trained):
    with pytest.raises(InputError, match="optimizer"):
        trained.train(1, plan_kwargs={"optimizer": "SGD"}, **QUIET)


# ------------------------------------------------------------------ history
def test_history_is_scvi_tools_form(trained, tmp_path):
    h = trained.history
    assert isinstance(h, dict) and isinstance(h, History) and h.n_epochs == 3
    frame = h["elbo_train"]
    assert list(frame.columns) == ["elbo_train"] and frame.index.name == "epoch"
    assert list(frame.index) == [0, 1, 2]
    wide = h.to_frame()
    for name in h:  # each frame is the wide frame's column, without unlogged epochs
        pd.testing.assert_frame_equal(h[name], wide[[name]].dropna())
    # saved as records, loaded back as a History
    trained.save(tmp_path / "m", overwrite=True)
    loaded = SCVI.load(tmp_path / "m", adata=trained.adata)
    assert isinstance(loaded.history, History)
    pd.testing.assert_frame_equal(loaded.history.to_frame(), wide, check_dtype=False)


def test_history_validation_metrics_only_on_validation_epochs():
    records = [
        {"epoch": 0, "train_loss": 3.0},
        {"epoch": 1, "train_loss": 2.0, "validation_loss": 2.5},
    ]
    h = History.from_records(records)
    assert list(h["validation_loss"].index) == [1]
    assert list(h["train_loss"].index) == [0, 1]
    assert History.from_records(h.to_records()).to_frame().equals(h.to_frame())
    assert History().n_epochs == 0 and len(History()) == 0


# --------------------------------------------------------- introspection
def test_setup_introspection(trained, setup_atlas, capsys):
    mgr = trained.adata_manager
    labels = mgr.get_state_registry("labels")
    assert list(labels.categorical_mapping) == list(trained.registry.label_categories)
    assert labels.original_key == "lab"
    assert list(mgr.get_state_registry("batch").categorical_mapping) == list(
        setup_atlas.obs["batch"].cat.categories
    )
    np.testing.assert_array_equal(
        mgr.get_from_registry("batch"), setup_atlas.obs["batch"].to_numpy()
    )
    assert mgr.summary_stats["n_cells"] == setup_atlas.n_obs
    assert mgr.summary_stats["n_batch"] == 2
    trained.view_anndata_setup()
    text = capsys.readouterr().out
    assert "batch_key='batch'" in text and "labels_key='lab'" in text
    assert trained.summary_string.startswith(
        "SCVI model with the following parameters: \nn_hidden: 16, n_latent: 4,"
    )
    assert "Training status: Trained" in str(trained)
    assert js.REGISTRY_KEYS.LABELS_KEY == "labels"


def test_per_cell_elbo_and_likelihoods(trained):
    idx = np.arange(40)
    per = trained.get_elbo(indices=idx, return_mean=False)
    assert per.shape == (40,)
    np.testing.assert_allclose(per.mean(), trained.get_elbo(indices=idx), rtol=1e-5)
    rec = trained.get_reconstruction_error(indices=idx, return_mean=False)
    assert rec["reconstruction_loss"].shape == (40,)
    assert (-per >= rec["reconstruction_loss"] - 1e-4).all()  # KL >= 0
    ll = trained.get_marginal_ll(indices=idx, n_mc_samples=20, return_mean=False)
    assert ll.shape == (40,)
    np.testing.assert_allclose(
        ll.mean(), trained.get_marginal_ll(indices=idx, n_mc_samples=20), rtol=1e-5
    )


# -------------------------------------------------------------------- DE
def test_estimate_delta_recovers_a_three_mode_mixture():
    r = np.random.default_rng(0)
    x = np.concatenate([r.normal(0, 0.1, 800), r.normal(-2, 0.2, 100), r.normal(3, 0.2, 100)])
    assert de.estimate_delta(x) == pytest.approx(0.6 * 2.5, rel=0.03)
    # no outer modes worth the name: the floor
    assert de.estimate_delta(r.normal(0, 0.01, 500)) == pytest.approx(0.1)


def test_robust_inliers_flags_the_far_cells():
    r = np.random.default_rng(0)
    x = r.normal(size=(400, 5))
    x[:20] += 12.0  # 5% far away
    keep = de.robust_inliers(x)
    assert not keep[:20].any()
    assert abs(keep.mean() - 0.9) < 0.01
    assert de.robust_inliers(x[:4]) is None


def test_importance_weighted_expression(trained):
    expr = trained.get_normalized_expression(
        indices=np.arange(100),
        n_samples_overall=64,
        weights="importance",
        library_size=1e4,
        n_mc_samples=20,
    )
    assert expr.shape == (64, trained.adata.n_vars)
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-3)
    with pytest.warns(UserWarning, match="only with n_samples_overall"):
        trained.get_normalized_expression(indices=np.arange(5), weights="importance")
    with pytest.raises(InputError, match="transform_batch"):
        trained.get_normalized_expression(
            n_samples_overall=8, weights="importance", transform_batch=["batch0", "batch1"]
        )


def test_de_automatic_delta_and_outlier_filter(trained):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = trained.differential_expression(
            groupby="batch",
            group1="batch0",
            mode="change",
            delta=None,
            filter_outlier_cells=True,
            n_samples_overall=200,
        )
    assert res["delta"].nunique() == 1 and res["delta"].iloc[0] >= 0.1
    assert len(res) == trained.adata.n_vars


@pytest.mark.scvi_tools
def test_delta_and_outliers_match_scikit_learn():
    """Where scikit-learn is installed (the parity venv): scvi-tools' own
    estimators, GaussianMixture and EllipticEnvelope, on the same data."""
    pytest.importorskip("sklearn")
    from sklearn.covariance import EllipticEnvelope
    from sklearn.mixture import GaussianMixture

    r = np.random.default_rng(3)
    lfc = np.concatenate([r.normal(0, 0.3, 900), r.normal(-1.5, 0.4, 60), r.normal(2.0, 0.5, 80)])
    gmm = GaussianMixture(n_components=3, random_state=0).fit(lfc[:, None])
    means = np.sort(gmm.means_.ravel())
    expected = max(0.1, 0.6 * np.abs(means[[0, -1]]).mean())
    assert de.estimate_delta(lfc) == pytest.approx(expected, rel=0.02)
    z = r.standard_t(4, size=(500, 6))  # heavy tails, as latent outliers are
    ours = de.robust_inliers(z)
    theirs = EllipticEnvelope(random_state=0).fit_predict(z) == 1
    assert (ours == theirs).mean() > 0.97

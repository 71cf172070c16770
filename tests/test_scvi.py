"""SCVI end to end: quality, determinism, save/load, resume, inference API, options.

Compilation dominates the cost on CPU, so most tests share one architecture
and one training plan (``TINY`` on the conftest ``small_atlas``) and reuse the
compiled step functions; quality tests use larger models on larger data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import batch_entropy, hvg, knn_accuracy, pca_log_normalized, shared_file

from jaxscanvi import SCVI, InputError, NonFiniteLossError, synthetic_atlas
from jaxscanvi.train.config import max_epochs_heuristic

TINY = dict(n_hidden=32, n_latent=5)
TRAIN = dict(max_epochs=4, batch_size=128, progress_bar=False)
# quality runs: short KL warm-up, larger learning rate (see test_synthetic_atlas_quality)
QUICK_PLAN = {"n_epochs_kl_warmup": 5, "lr": 5e-3}


def leaves(params):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def params_equal(a, b) -> bool:
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))


def all_finite(params) -> bool:
    return all(np.isfinite(x).all() for x in leaves(params))


def setup(adata, **kw):
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch", **kw)
    return adata


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_adata(small_atlas):
    return setup(small_atlas.copy(), labels_key="cell_type")


@pytest.fixture(scope="module")
def tiny(tiny_adata):
    """A small model trained 4 epochs (validation every epoch), shared read-only."""
    model = SCVI(tiny_adata, **TINY, seed=0)
    model.train(**TRAIN, check_val_every_n_epoch=1)
    return model


def train_tiny(adata, seed=0, train_seed=0, **kw):
    model = SCVI(adata, **TINY, seed=seed)
    args = {**TRAIN, "seed": train_seed, **kw}
    model.train(**args)
    return model


# ------------------------------------------------------------ quality tests
def _quality_checks(
    model, adata, cell_type, batch, counts, *, min_acc, min_gain, label_mask=None, n_pcs=10
):
    hist = model.history.to_frame()
    assert "elbo_validation" in hist.columns and "validation_loss" in hist.columns
    v = hist["elbo_validation"].to_numpy()
    assert np.isfinite(v).all()
    assert v[-1] < v[0], f"validation -ELBO did not decrease: {v[0]:.1f} -> {v[-1]:.1f}"

    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, model.module.config.n_latent)
    acc = knn_accuracy(z, cell_type, k=15, mask=label_mask)
    labels = cell_type if label_mask is None else cell_type[label_mask]
    chance = 1.0 / len(np.unique(labels))
    assert acc > min_acc and acc > 3 * chance, f"kNN accuracy {acc:.3f} (chance {chance:.3f})"

    pcs = pca_log_normalized(counts, n_pcs)
    ent_scvi = batch_entropy(z, batch, k=15)
    ent_pca = batch_entropy(pcs, batch, k=15)
    print(
        f"\nkNN accuracy {acc:.3f} (chance {chance:.3f}); batch entropy scVI "
        f"{ent_scvi:.3f} vs PCA {ent_pca:.3f}; validation -ELBO {v[0]:.1f} -> {v[-1]:.1f}"
    )
    assert ent_scvi > ent_pca + min_gain, (
        f"batch entropy scVI {ent_scvi:.3f} is not clearly above PCA's {ent_pca:.3f}"
    )
    return acc, ent_scvi, ent_pca


def test_synthetic_atlas_quality():
    adata = synthetic_atlas(
        n_cells=2000, n_genes=400, n_batches=3, n_lineages=3, types_per_lineage=2, seed=1
    )
    setup(adata)
    model = SCVI(adata, seed=0)
    epochs = 30
    # a short KL warm-up and a larger learning rate than scvi-tools' defaults, so that
    # batches mix within a few CPU seconds (with lr=1e-3 it takes ~80 epochs here)
    model.train(
        max_epochs=epochs, check_val_every_n_epoch=1, progress_bar=False, plan_kwargs=QUICK_PLAN
    )
    assert model.history.n_epochs == epochs
    _quality_checks(
        model,
        adata,
        adata.obs["cell_type"].to_numpy(),
        adata.obs["batch"].to_numpy(),
        adata.layers["counts"],
        min_acc=0.8,
        min_gain=0.3,
    )


def test_pbmc_quality():
    import anndata as ad

    adata = hvg(ad.read_h5ad(shared_file("pbmc_3k_4k.h5ad")), 2000)
    # README: X holds raw integer UMI counts; batch and cell_type are categoricals
    SCVI.setup_anndata(adata, batch_key="batch")
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()
    known = cell_type != "Unknown"
    assert (~known).sum() > 0  # the Unknown cells exist and are excluded below
    model = SCVI(adata, seed=0)
    epochs = 20
    model.train(
        max_epochs=epochs,
        batch_size=256,
        check_val_every_n_epoch=1,
        progress_bar=False,
        plan_kwargs=QUICK_PLAN,
    )
    assert model.history.n_epochs == epochs
    _quality_checks(
        model,
        adata,
        cell_type,
        adata.obs["batch"].astype(str).to_numpy(),
        adata.X,
        min_acc=0.85,
        min_gain=0.1,
        label_mask=known,
        n_pcs=20,
    )


# ------------------------------------------------------------- determinism
def test_same_seed_identical_parameters(tiny, tiny_adata):
    again = train_tiny(tiny_adata)  # same init seed, same train seed, no validation
    assert params_equal(again.params, tiny.params)
    assert params_equal(again.state["batch_stats"], tiny.state["batch_stats"])
    # validation passes change nothing in the trajectory
    cols = [c for c in again.history.to_frame().columns if c != "epoch_seconds"]
    pd.testing.assert_frame_equal(again.history.to_frame()[cols], tiny.history.to_frame()[cols])


def test_different_seed_different_parameters(tiny, tiny_adata):
    other_init = SCVI(tiny_adata, **TINY, seed=1)
    assert not params_equal(other_init.params, SCVI(tiny_adata, **TINY, seed=0).params)
    other_init.train(**TRAIN)
    assert not params_equal(other_init.params, tiny.params)
    other_train = train_tiny(tiny_adata, train_seed=1)  # same init, different shuffling
    assert not params_equal(other_train.params, tiny.params)
    assert not np.array_equal(other_train.train_indices, tiny.train_indices)


def test_device_and_host_sources_same_trajectory(tiny, tiny_adata):
    """The sources see the same cells in the same order (sources.py docstring).

    The device source keeps these small counts dense and uses the dense
    likelihood while the host source uses the sparse one, so agreement is to
    float tolerance rather than bitwise.
    """
    dev = train_tiny(tiny_adata, data_source="device")
    assert params_equal(dev.params, tiny.params)  # "auto" picks the device on CPU
    host = train_tiny(tiny_adata, data_source="host")
    h_dev, h_host = dev.history.to_frame(), host.history.to_frame()
    np.testing.assert_allclose(h_host["train_loss"], h_dev["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(h_host["elbo_train"], h_dev["elbo_train"], rtol=1e-6)
    assert max_abs_diff(host.params, dev.params) < 1e-5  # observed: ~4e-7
    z_dev = dev.get_latent_representation()
    z_host = host.get_latent_representation()
    np.testing.assert_allclose(z_host, z_dev, atol=1e-4)


def test_device_csr_source_matches_host(tiny_adata, monkeypatch):
    """The device source's CSR path (large data) against the host source."""
    from jaxscanvi.train import fit, sources

    host = train_tiny(tiny_adata, data_source="host", max_epochs=2)
    real = sources.make_source
    seen = []

    def csr_source(kind, cells, batch_size, **kw):
        src = real(kind, cells, batch_size, dense_max_bytes=0)
        seen.append(src)
        return src

    monkeypatch.setattr(fit, "make_source", csr_source)
    dev = train_tiny(tiny_adata, data_source="device", max_epochs=2)
    assert seen and seen[0].kind == "device" and not seen[0].dense
    np.testing.assert_allclose(
        dev.history.to_frame()["train_loss"], host.history.to_frame()["train_loss"], rtol=1e-6
    )
    assert max_abs_diff(dev.params, host.params) < 1e-5


# ------------------------------------------------------- checkpoint/resume
def test_checkpoint_resume_bitwise(tiny, tiny_adata, tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = train_tiny(tiny_adata, checkpoint_dir=full_dir)
    assert params_equal(full.params, tiny.params)  # checkpointing changes nothing

    first = train_tiny(tiny_adata, checkpoint_dir=part_dir, max_epochs=2)
    assert first.history.n_epochs == 2
    resumed = SCVI(tiny_adata, **TINY, seed=0)
    resumed.train(**TRAIN, checkpoint_dir=part_dir, resume=True)
    assert params_equal(resumed.params, full.params)
    assert params_equal(resumed.state, full.state)
    assert params_equal(resumed.train_state.opt_state, full.train_state.opt_state)
    assert int(resumed.train_state.step) == int(full.train_state.step)
    assert int(resumed.train_state.epoch) == 4
    cols = [c for c in full.history.to_frame().columns if c != "epoch_seconds"]
    assert list(resumed.history.to_frame().index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(resumed.history.to_frame()[cols], full.history.to_frame()[cols])
    np.testing.assert_array_equal(
        resumed.get_latent_representation(), full.get_latent_representation()
    )

    # resuming a finished run trains no further
    again = SCVI(tiny_adata, **TINY, seed=0)
    again.train(**TRAIN, checkpoint_dir=part_dir, resume=True)
    assert params_equal(again.params, full.params) and again.history.n_epochs == 4


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": 64},
        {"seed": 3},
        {"train_size": 0.8},
        {"plan_kwargs": {"lr": 2e-3}},
        {"model": {"n_hidden": 16}},
    ],
)
def test_resume_with_other_settings_refused(tiny_adata, tmp_path, change):
    d = tmp_path / "ckpt"
    train_tiny(tiny_adata, checkpoint_dir=d, max_epochs=1)
    kw = {**TRAIN, "checkpoint_dir": d, "resume": True}
    model_kw = dict(TINY)
    for k, v in change.items():
        if k == "model":
            model_kw.update(v)
        else:
            kw[k] = v
    model = SCVI(tiny_adata, **model_kw, seed=0)
    before = leaves(model.params)
    with pytest.raises(InputError, match="resume"):
        model.train(**kw)
    assert all(np.array_equal(a, b) for a, b in zip(before, leaves(model.params)))


def test_resume_needs_checkpoint_dir(tiny_adata):
    with pytest.raises(InputError, match="checkpoint_dir"):
        SCVI(tiny_adata, **TINY).train(**TRAIN, resume=True)


def test_resume_from_empty_folder_trains_from_scratch(tiny, tiny_adata, tmp_path):
    model = train_tiny(tiny_adata, checkpoint_dir=tmp_path / "none", resume=True)
    assert params_equal(model.params, tiny.params)


# ------------------------------------------------------------- save / load
def test_save_load_bit_identical(tiny, tiny_adata, tmp_path):
    d = tmp_path / "model"
    tiny.save(d)
    with pytest.raises(FileExistsError):
        tiny.save(d)
    tiny.save(d, overwrite=True)
    z = tiny.get_latent_representation()
    zs = tiny.get_latent_representation(give_mean=False)
    expr = tiny.get_normalized_expression()
    for adata in (tiny_adata, tiny_adata.copy()):
        loaded = SCVI.load(d, adata=adata)
        assert loaded.is_trained
        assert params_equal(loaded.params, tiny.params)
        assert params_equal(loaded.state, tiny.state)
        assert loaded.module.config == tiny.module.config
        assert loaded.registry == tiny.registry
        assert np.array_equal(loaded.get_latent_representation(), z)
        assert np.array_equal(loaded.get_latent_representation(give_mean=False), zs)
        e2 = loaded.get_normalized_expression()
        assert np.array_equal(e2.to_numpy(), expr.to_numpy())
        assert list(e2.index) == list(expr.index) and list(e2.columns) == list(expr.columns)
        np.testing.assert_array_equal(loaded.train_indices, tiny.train_indices)
        np.testing.assert_array_equal(loaded.validation_indices, tiny.validation_indices)
        pd.testing.assert_frame_equal(
            loaded.history.to_frame(), tiny.history.to_frame(), check_dtype=False
        )


def test_save_with_anndata_and_load_without(tiny, tmp_path):
    d = tmp_path / "with_data"
    tiny.save(d, save_anndata=True)
    loaded = SCVI.load(d)
    assert loaded.adata is not None and loaded.adata.n_obs == tiny.adata.n_obs
    assert np.array_equal(loaded.get_latent_representation(), tiny.get_latent_representation())


def test_load_without_data_needs_adata(tiny, tiny_adata, tmp_path):
    d = tmp_path / "no_data"
    tiny.save(d)
    loaded = SCVI.load(d)
    with pytest.raises(InputError):
        loaded.get_latent_representation()
    z = loaded.get_latent_representation(adata=tiny_adata)
    assert np.array_equal(z, tiny.get_latent_representation())


def test_load_rejects_other_genes(tiny, tiny_adata, tmp_path):
    d = tmp_path / "m"
    tiny.save(d)
    with pytest.raises(InputError):
        SCVI.load(d, adata=tiny_adata[:, ::-1].copy())


# ----------------------------------------------------------- inference API
def test_latent_representation_api(tiny, tiny_adata):
    n, L = tiny_adata.n_obs, tiny.module.config.n_latent
    z = tiny.get_latent_representation()
    assert z.shape == (n, L) and np.isfinite(z).all()
    m, v = tiny.get_latent_representation(return_dist=True)
    assert m.shape == v.shape == (n, L)
    assert np.array_equal(m, z)  # give_mean is the posterior mean for a normal latent
    assert (v > 0).all()
    # a posterior sample: standardised residuals are ~N(0, 1)
    zs = tiny.get_latent_representation(give_mean=False)
    assert zs.shape == (n, L) and not np.array_equal(zs, z)
    r = (zs - m) / np.sqrt(v)
    assert abs(r.mean()) < 0.1 and 0.85 < (r**2).mean() < 1.15
    # indices (ints and bool masks) select rows, in the order given
    idx = np.array([5, 3, 400, 17, 599])
    np.testing.assert_allclose(
        tiny.get_latent_representation(indices=idx), z[idx], rtol=1e-5, atol=1e-6
    )
    mask = np.zeros(n, bool)
    mask[::7] = True
    np.testing.assert_allclose(
        tiny.get_latent_representation(indices=mask), z[mask], rtol=1e-5, atol=1e-6
    )
    # minibatch size of the inference pass does not matter
    np.testing.assert_allclose(
        tiny.get_latent_representation(batch_size=50), z, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(InputError):
        tiny.get_latent_representation(indices=[n])


def test_latent_on_new_anndata(tiny, tiny_adata):
    import anndata as ad

    z = tiny.get_latent_representation()
    perm = np.random.default_rng(0).permutation(tiny_adata.n_obs)[:250]
    src = tiny_adata[perm]
    new = ad.AnnData(
        X=src.layers["counts"].copy(),
        obs=src.obs[["batch", "cell_type"]].copy(),
        var=pd.DataFrame(index=src.var_names.copy()),
    )
    new.layers["counts"] = new.X.copy()
    SCVI.setup_anndata(new, layer="counts", batch_key="batch", labels_key="cell_type")
    np.testing.assert_allclose(tiny.get_latent_representation(new), z[perm], rtol=1e-5, atol=1e-6)
    # an unseen batch is refused
    bad = new.copy()
    bad.obs["batch"] = bad.obs["batch"].cat.rename_categories({"batch0": "elsewhere"})
    with pytest.raises(InputError):
        tiny.get_latent_representation(bad)


def test_normalized_expression_api(tiny, tiny_adata):
    n, G = tiny_adata.n_obs, tiny_adata.n_vars
    expr = tiny.get_normalized_expression()
    assert isinstance(expr, pd.DataFrame) and expr.shape == (n, G)
    assert list(expr.index) == list(tiny_adata.obs_names)
    assert list(expr.columns) == list(tiny_adata.var_names)
    e = expr.to_numpy()
    assert (e > 0).all()
    np.testing.assert_allclose(e.sum(1), 1.0, rtol=1e-4)
    e4 = tiny.get_normalized_expression(library_size=1e4, return_numpy=True)
    assert isinstance(e4, np.ndarray)
    np.testing.assert_allclose(e4, e * 1e4, rtol=1e-5)
    # library_size="latent": the observed library is used, so rows sum to it
    lat = tiny.get_normalized_expression(library_size="latent", return_numpy=True)
    lib = np.asarray(tiny_adata.layers["counts"].sum(1)).ravel()
    np.testing.assert_allclose(lat.sum(1), lib, rtol=1e-3)

    # transform_batch decodes all cells as one batch; a list averages batches
    b0 = tiny.get_normalized_expression(transform_batch="batch0", return_numpy=True)
    b1 = tiny.get_normalized_expression(transform_batch="batch1", return_numpy=True)
    both = tiny.get_normalized_expression(transform_batch=["batch0", "batch1"], return_numpy=True)
    assert not np.allclose(b0, b1)
    np.testing.assert_allclose(both, (b0 + b1) / 2, rtol=1e-5)
    in0 = tiny_adata.obs["batch"].to_numpy() == "batch0"
    np.testing.assert_allclose(b0[in0], e[in0], rtol=1e-5)  # own batch: unchanged
    with pytest.raises(InputError):
        tiny.get_normalized_expression(transform_batch="nope")

    genes = [tiny_adata.var_names[i] for i in (7, 2, 150)]
    sub = tiny.get_normalized_expression(gene_list=genes)
    assert list(sub.columns) == genes
    np.testing.assert_allclose(sub.to_numpy(), expr[genes].to_numpy(), rtol=1e-6)
    with pytest.raises(InputError):
        tiny.get_normalized_expression(gene_list=["not_a_gene"])

    idx = np.array([4, 1, 9])
    part = tiny.get_normalized_expression(indices=idx)
    assert list(part.index) == list(tiny_adata.obs_names[idx])

    # several posterior samples
    mean3 = tiny.get_normalized_expression(n_samples=3)
    assert isinstance(mean3, pd.DataFrame) and mean3.shape == (n, G)
    np.testing.assert_allclose(mean3.to_numpy().sum(1), 1.0, rtol=1e-4)
    s3 = tiny.get_normalized_expression(n_samples=3, return_mean=False)
    assert isinstance(s3, np.ndarray) and s3.shape == (3, n, G)
    np.testing.assert_allclose(s3.mean(0), mean3.to_numpy(), rtol=1e-5)
    assert not np.allclose(s3[0], s3[1])
    s3g = tiny.get_normalized_expression(n_samples=3, return_mean=False, gene_list=genes)
    assert s3g.shape == (3, n, 3)
    overall = tiny.get_normalized_expression(n_samples_overall=40)
    assert overall.shape == (40, G)
    with pytest.raises(InputError):
        tiny.get_normalized_expression(library_size=0)


def test_elbo_reconstruction_marginal_ll(tiny, tiny_adata):
    elbo = tiny.get_elbo()
    rec = tiny.get_reconstruction_error()
    assert set(rec) == {"reconstruction_loss"}
    r = rec["reconstruction_loss"]
    assert np.isfinite(elbo) and np.isfinite(r)
    assert elbo < 0 and r > 0  # ELBO: higher is better; reconstruction: -log p(x|z)
    # the same posterior samples are drawn, so -ELBO - reconstruction = mean KL >= 0
    assert -elbo - r >= 0
    # the validation ELBO of the history is the same quantity (another z sample)
    val = tiny.validation_indices
    assert len(val) == 60
    hist_val = tiny.history.to_frame()["elbo_validation"].iloc[-1]
    assert abs(-tiny.get_elbo(indices=val) - hist_val) < 0.02 * abs(hist_val)

    idx = np.arange(0, tiny_adata.n_obs, 6)  # 100 cells, one inference chunk
    e_sub = tiny.get_elbo(indices=idx)
    m100 = tiny.get_marginal_ll(indices=idx, n_mc_samples=100, batch_size=100)
    m2 = tiny.get_marginal_ll(indices=idx, n_mc_samples=2, batch_size=100)
    assert np.isfinite(m100) and np.isfinite(m2)
    # Counts are discrete, so log p(x) <= 0 and ELBO <= log p(x) <= 0: in magnitude,
    # |log p(x)| <= |ELBO|, and more importance samples tighten the bound (up to Monte
    # Carlo noise). Magnitudes keep this test independent of the sign convention of
    # get_marginal_ll (see test_marginal_ll_sign_matches_scvi_tools).
    assert abs(m100) <= abs(e_sub) * (1 + 1e-3)
    assert abs(m100) <= abs(m2) * (1 + 1e-3)
    assert abs(m100) > 0.5 * abs(e_sub)  # but not absurdly far from the ELBO


def test_per_cell_values_with_return_mean_false(tiny):
    """return_mean=False gives each cell's value (scvi-tools' option); the means
    are their mean over cells, for the marginal likelihood over minibatches."""
    idx = np.arange(0, tiny.adata.n_obs, 6)  # 100 cells
    elbo = tiny.get_elbo(indices=idx, return_mean=False)
    rec = tiny.get_reconstruction_error(indices=idx, return_mean=False)
    assert elbo.shape == rec["reconstruction_loss"].shape == (100,)
    assert tiny.get_elbo(indices=idx) == pytest.approx(float(elbo.mean()), rel=1e-6)
    assert (-elbo >= rec["reconstruction_loss"] - 1e-4).all()  # KL >= 0 per cell
    ll = tiny.get_marginal_ll(indices=idx, n_mc_samples=4, batch_size=40, return_mean=False)
    assert ll.shape == (100,) and np.isfinite(ll).all()
    mean = tiny.get_marginal_ll(indices=idx, n_mc_samples=4, batch_size=40)
    assert mean == pytest.approx(
        np.mean([ll[:40].mean(), ll[40:80].mean(), ll[80:].mean()]), rel=1e-6
    )


def test_marginal_ll_single_sample(tiny):
    """n_mc_samples=1 is the one-sample importance estimate (an ELBO sample).

    Fails on the current code: _log_weights_fn returns shape (B,) when the
    module is run with n_samples=1, and np.concatenate(..., axis=1) raises.
    """
    idx = np.arange(0, tiny.adata.n_obs, 6)
    m1 = tiny.get_marginal_ll(indices=idx, n_mc_samples=1, batch_size=100)
    elbo = tiny.get_elbo(indices=idx)
    assert np.isfinite(m1)
    assert abs(abs(m1) - abs(elbo)) < 0.05 * abs(elbo)


def test_marginal_ll_sign_matches_scvi_tools(tiny):
    """scvi-tools' get_marginal_ll returns log p(x) ("not the negative log
    likelihood, higher is better"), consistent with get_elbo returning the ELBO:
    so log p(x) >= ELBO with both negative numbers."""
    idx = np.arange(0, tiny.adata.n_obs, 6)
    elbo = tiny.get_elbo(indices=idx)
    ll = tiny.get_marginal_ll(indices=idx, n_mc_samples=100, batch_size=100)
    assert ll < 0, f"get_marginal_ll returned {ll:.2f}: the negative log-likelihood"
    assert ll >= elbo - 1e-3 * abs(elbo)


def test_history_columns(tiny):
    h = tiny.history.to_frame()
    assert h.index.name == "epoch" and list(h.index) == [0, 1, 2, 3]
    expected = {
        "train_loss",
        "elbo_train",
        "reconstruction_loss_train",
        "kl_local_train",
        "kl_z_train",
        "kl_l_train",
        "kl_weight",
        "lr",
        "epoch_seconds",
        "validation_loss",
        "elbo_validation",
        "reconstruction_loss_validation",
        "kl_local_validation",
        "kl_z_validation",
        "kl_l_validation",
    }
    assert expected <= set(h.columns), expected - set(h.columns)
    assert np.isfinite(h.to_numpy(dtype=float)).all()
    # scvi-tools' linear KL warm-up over 400 epochs, applied per epoch
    np.testing.assert_allclose(h["kl_weight"], np.arange(4) / 400, atol=1e-7)
    np.testing.assert_allclose(h["lr"], 1e-3, rtol=1e-6)
    for split in ("train", "validation"):
        rec, kl, elbo = (
            h[f"reconstruction_loss_{split}"],
            h[f"kl_local_{split}"],
            h[f"elbo_{split}"],
        )
        np.testing.assert_allclose(elbo, rec + kl, rtol=1e-5)
        np.testing.assert_allclose(kl, h[f"kl_z_{split}"] + h[f"kl_l_{split}"], rtol=1e-5)
        loss = h["train_loss" if split == "train" else "validation_loss"]
        np.testing.assert_allclose(
            loss, rec + h["kl_weight"] * h[f"kl_z_{split}"] + h[f"kl_l_{split}"], rtol=1e-5
        )
    assert (h["kl_l_train"] == 0).all()  # observed library: no library KL
    assert (h["kl_z_train"] > 0).all()
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    # without validation, no validation columns
    assert not any(
        c.endswith("_validation")
        for c in train_tiny(tiny.adata, max_epochs=1).history.to_frame().columns
    )


def test_max_epochs_default_heuristic(tiny_adata, monkeypatch):
    for n in (600, 10_000, 20_000, 30_000, 50_000, 100_000, 1_000_000, 3_000_000):
        assert max_epochs_heuristic(n) == max(min(round(20000 / n * 400), 400), 1), n
    assert max_epochs_heuristic(600) == 400
    assert max_epochs_heuristic(50_000) == 160
    assert max_epochs_heuristic(100_000) == 80
    model = SCVI(tiny_adata, **TINY)
    seen = {}

    def fake_train(plan):
        seen["max_epochs"] = plan.config.max_epochs
        return model

    monkeypatch.setattr(model, "_train", fake_train)
    model.train(progress_bar=False)
    assert seen["max_epochs"] == min(round(20000 / tiny_adata.n_obs * 400), 400) == 400
    # and on a (virtual) large data set the same rule is used
    seen.clear()
    big = 40_000
    monkeypatch.setattr(type(model._train_cells()), "n_obs", property(lambda self: big))
    model.train(progress_bar=False)
    assert seen["max_epochs"] == round(20000 / big * 400) == 200


# ------------------------------------------------------ non-finite losses
def _nan_on_short_minibatch(outputs, batch, params):
    """NaN only on the padded last minibatch of an epoch; zero otherwise."""
    full = batch.weight.sum() == batch.weight.shape[0]
    return jnp.where(full, 0.0, jnp.nan)


def test_nonfinite_raise_keeps_last_finite_parameters(tiny_adata):
    model = SCVI(tiny_adata, **TINY, seed=0)
    init = leaves(model.params)
    with pytest.raises(NonFiniteLossError, match="boom"):
        model.train(**TRAIN, train_size=1.0, loss_terms={"boom": _nan_on_short_minibatch})
    # 600 cells / 128: steps 0-3 are full and finite, step 4 (88 cells) is NaN
    assert all_finite(model.params)
    assert not all(np.array_equal(a, b) for a, b in zip(init, leaves(model.params)))
    assert int(model.train_state.step) == 5


def test_failed_fit_carries_what_the_model_keeps(tiny_adata):
    """`fit` raises `FitFailed` (a NonFiniteLossError) whose typed ``result`` is
    the fit up to the last finite step; the model adopts exactly that."""
    from jaxscanvi.train.fit import FitFailed, FitResult, fit

    model = SCVI(tiny_adata, **TINY, seed=0)
    boom = {"boom": _nan_on_short_minibatch}
    plan = model.fit_plan(**TRAIN, train_size=1.0, loss_terms=boom)
    with pytest.raises(FitFailed) as err:
        fit(plan.config, plan.task)
    assert isinstance(err.value, NonFiniteLossError) and "boom" in str(err.value)
    result = err.value.result
    assert isinstance(result, FitResult) and result.loop.history == []  # epoch 0 failed
    assert int(result.train_state.step) == 5 and all_finite(result.train_state.params)
    with pytest.raises(FitFailed) as err:
        model.train(**TRAIN, train_size=1.0, loss_terms=boom)
    kept = err.value.result.train_state
    assert model.train_state is kept and not model.is_trained
    assert all(np.array_equal(a, b) for a, b in zip(leaves(kept.params), leaves(model.params)))


def test_nonfinite_skip_step(tiny_adata):
    model = SCVI(tiny_adata, **TINY, seed=0)
    model.train(
        **{**TRAIN, "max_epochs": 2},
        train_size=1.0,
        on_nonfinite="skip_step",
        loss_terms={"boom": _nan_on_short_minibatch},
    )
    assert all_finite(model.params) and model.history.n_epochs == 2
    assert int(model.train_state.step) == 10  # skipped steps still count
    # the ELBO terms of every step are finite; only the extra term (and so the total
    # loss of the epoch) records the NaN of the skipped steps
    assert np.isfinite(model.history.to_frame()["elbo_train"]).all()
    assert np.isfinite(model.get_latent_representation()).all()


def test_nonfinite_huge_lr_skip_step(tiny_adata):
    model = SCVI(tiny_adata, **TINY, seed=0)
    model.train(**TRAIN, plan_kwargs={"lr": 1e6}, on_nonfinite="skip_step")
    assert all_finite(model.params)
    assert all_finite(model.state)


def test_on_nonfinite_validated(tiny_adata):
    with pytest.raises(InputError):
        SCVI(tiny_adata, **TINY).train(**TRAIN, on_nonfinite="ignore")


# ------------------------------------------------ early stopping and LR plateau
def test_early_stopping_deterministic_monitor(tiny_adata):
    # kl_weight grows every epoch, so it never improves after epoch 0
    for patience, n_epochs in ((1, 2), (3, 4)):
        model = train_tiny(
            tiny_adata,
            max_epochs=10,
            early_stopping=True,
            early_stopping_patience=patience,
            early_stopping_monitor="kl_weight",
        )
        assert model.history.n_epochs == n_epochs
        assert int(model.train_state.epoch) == n_epochs


def test_early_stopping_huge_lr(tiny_adata):
    model = SCVI(tiny_adata, **TINY, seed=0)
    model.train(
        max_epochs=15,
        progress_bar=False,
        early_stopping=True,
        early_stopping_patience=1,
        on_nonfinite="skip_step",
        plan_kwargs={"lr": 1e6},
    )
    assert model.history.n_epochs < 15
    assert all_finite(model.params)


def test_reduce_lr_on_plateau(tiny_adata):
    model = train_tiny(
        tiny_adata,
        max_epochs=5,
        plan_kwargs={
            "reduce_lr_on_plateau": True,
            "lr_patience": 0,
            "lr_factor": 0.5,
            "lr_scheduler_metric": "kl_weight",
            "lr_min": 2e-4,
        },
    )
    # epoch 0 improves; every later epoch is a plateau and halves the lr (floor 2e-4);
    # the history records the lr used in that epoch
    np.testing.assert_allclose(
        model.history.to_frame()["lr"], [1e-3, 1e-3, 5e-4, 2.5e-4, 2e-4], rtol=1e-6
    )
    assert model.history.n_epochs == 5


def test_reduce_lr_on_plateau_validation_metric(tiny_adata):
    model = SCVI(tiny_adata, **TINY, seed=0)
    model.train(
        max_epochs=8,
        progress_bar=False,
        on_nonfinite="skip_step",
        plan_kwargs={"lr": 1e6, "reduce_lr_on_plateau": True, "lr_patience": 1, "lr_factor": 0.1},
    )
    lr = model.history.to_frame()["lr"].to_numpy()
    assert "elbo_validation" in model.history.to_frame().columns
    assert lr[-1] < lr[0] and (np.diff(lr) <= 0).all()


# ------------------------------------------------------------------ options
# Each set of options compiles a new model (tens of seconds on a busy 2-core CPU), so
# options are combined; every option appears once and gets its own checks below.
# (Dispersion is irrelevant to a Poisson likelihood, so Poisson goes with the
# default per-gene dispersion.)
OPTIONS = {
    "nb+gene-batch+2-layers+layer-norm": dict(
        gene_likelihood="nb",
        dispersion="gene-batch",
        n_layers=2,
        use_batch_norm="none",
        use_layer_norm="both",
    ),
    "zinb+gene-label+ln+bn-encoder-ln-decoder": dict(
        dispersion="gene-label",
        latent_distribution="ln",
        use_batch_norm="encoder",
        use_layer_norm="decoder",
    ),
    "zinb+gene-cell+covariates": dict(dispersion="gene-cell", encode_covariates=True),
    "poisson+learned-library": dict(gene_likelihood="poisson", use_observed_lib_size=False),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_train(small_atlas, name):
    kw = OPTIONS[name]
    adata = small_atlas.copy()
    setup_kw = {"labels_key": "cell_type"}
    if "covariates" in name:
        rng = np.random.default_rng(0)
        adata.obs["donor"] = pd.Categorical(rng.choice(["d0", "d1", "d2"], adata.n_obs))
        adata.obs["pct_mito"] = rng.uniform(0, 0.2, adata.n_obs)
        setup_kw.update(
            categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct_mito"]
        )
    setup(adata, **setup_kw)
    model = SCVI(adata, n_hidden=16, n_latent=4, **kw)
    model.train(max_epochs=2, train_size=1.0, progress_bar=False)
    h = model.history.to_frame()
    assert len(h) == 2 and np.isfinite(h["train_loss"]).all()
    assert all_finite(model.params) and all_finite(model.state)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z).all()
    p, cfg = model.params, model.module.config
    G = adata.n_vars
    if cfg.gene_likelihood == "poisson":
        assert "px_r" not in p
    if cfg.gene_likelihood != "zinb":
        assert "px_dropout_decoder" not in p["decoder"]
    if cfg.dispersion == "gene-batch":
        assert p["px_r"].shape == (G, 2)
    if cfg.dispersion == "gene-label":
        assert p["px_r"].shape == (G, 4)
    if cfg.dispersion == "gene-cell":
        assert "px_r" not in p and "px_r_decoder" in p["decoder"]
    if not cfg.use_observed_lib_size:
        assert "l_encoder" in p and (h["kl_l_train"] > 0).all()
        assert np.isfinite(model.get_elbo())
        assert np.isfinite(
            model.get_marginal_ll(indices=np.arange(50), n_mc_samples=10, batch_size=50)
        )
    if cfg.latent_distribution == "ln":
        np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-4)  # mean on the simplex
        assert (z > 0).all()
    if "covariates" in name:
        assert cfg.n_cats_per_cov == (3,) and cfg.n_continuous_cov == 1
        flat = jax.tree_util.tree_flatten_with_path(p)[0]
        names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat}
        assert any(n.startswith("z_encoder/") and "layer0_cov1" in n for n in names)
        assert any(n.startswith("decoder/") and "layer0_cov1" in n for n in names)
    if cfg.n_layers == 2:
        assert "dense1" in p["z_encoder"]["encoder"]
        assert "dense1" in p["decoder"]["px_decoder"]
    bn_names = set(model.state.get("batch_stats", {}))
    assert ("z_encoder" in bn_names) == (cfg.use_batch_norm in ("encoder", "both"))
    assert ("decoder" in bn_names) == (cfg.use_batch_norm in ("decoder", "both"))

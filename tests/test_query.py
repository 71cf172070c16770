"""Reference mapping: gene alignment, scArches surgery, new cell types, calibration,
abstention, novelty, and the command line."""

from __future__ import annotations

import warnings

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import hvg, shared_file

from jaxscanvi import SCANVI, SCVI, InputError, synthetic_atlas
from jaxscanvi.model.scanvi import expected_calibration_error

NOVEL = "L1_T1"
ARCH = dict(n_hidden=32, n_latent=5)


@pytest.fixture(scope="module")
def split():
    """3 batches, 4 types; the reference is batches 0-1 without NOVEL, the query batch 2."""
    a = synthetic_atlas(
        n_cells=2000,
        n_genes=200,
        n_batches=3,
        n_lineages=2,
        types_per_lineage=2,
        seed=0,
        markers_per_type=10,
    )
    truth = a.obs["cell_type"].astype(str).to_numpy()
    is_q = (a.obs["batch"] == "batch2").to_numpy()
    ref = a[~is_q & (truth != NOVEL)].copy()
    ref.obs["lab"] = ref.obs["cell_type"].astype(str)
    query = a[is_q].copy()
    return ref, query


@pytest.fixture(scope="module")
def reference(split):
    ref, _ = split
    ref = ref.copy()
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="lab")
    vae = SCVI(ref, **ARCH)
    vae.train(max_epochs=20, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 10})
    # 10% of the cells are neither trained on nor used for calibration
    model = SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
    model.train(max_epochs=8, train_size=0.8, validation_size=0.1, progress_bar=False)
    return model


def _query(split, labelled_novel: float = 0.0):
    _, query = split
    q = query.copy()
    truth = q.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    q.obs["lab"] = np.where(
        (truth == NOVEL) & (rng.random(q.n_obs) < labelled_novel), truth, "Unknown"
    )
    return q, truth


# ------------------------------------------------------------ gene alignment
def test_prepare_query_reorders_pads_and_stays_sparse(reference, tmp_path):
    ref_names = list(reference.registry.var_names)
    rng = np.random.default_rng(0)
    keep = [*[g for g in ref_names if rng.random() > 0.1][::-1], "extra1", "extra2"]
    X = sp.random(30, len(keep), density=0.2, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 10)
    q = ad.AnnData(X=X, var=pd.DataFrame(index=keep))
    q.layers["counts"] = X.tocsc()
    dense_in = pd.DataFrame(X.toarray(), columns=keep)
    with pytest.warns(UserWarning, match=r"\d+ of the 200 reference genes .* missing"):
        out = SCANVI.prepare_query_anndata(q, reference, inplace=False)
    assert list(out.var_names) == ref_names and q.n_vars == len(keep)  # input untouched
    assert sp.issparse(out.X) and sp.issparse(out.layers["counts"])
    expect = dense_in.reindex(columns=ref_names, fill_value=0.0).to_numpy()
    np.testing.assert_array_equal(out.X.toarray(), expect)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), expect)
    assert out.X.nnz == X[:, [i for i, g in enumerate(keep) if g in ref_names]].nnz
    # a saved folder works as the reference, and inplace rewrites the AnnData itself
    reference.save(tmp_path / "ref", overwrite=True)
    names = SCANVI.prepare_query_anndata(q, tmp_path / "ref", return_reference_var_names=True)
    assert list(names) == ref_names and q.n_vars == len(keep)
    with pytest.warns(UserWarning):
        assert SCANVI.prepare_query_anndata(q, tmp_path / "ref") is None
    assert list(q.var_names) == ref_names and sp.issparse(q.X)


def test_prepare_query_refuses_tiny_overlap(reference):
    names = list(reference.registry.var_names)[:40] + [f"other{i}" for i in range(100)]
    q = ad.AnnData(
        X=sp.csr_matrix(np.ones((5, len(names)), np.float32)), var=pd.DataFrame(index=names)
    )
    with pytest.raises(InputError) as e:
        SCANVI.prepare_query_anndata(q, reference)
    assert e.value.field == "adata.var_names" and "40 of 200" in str(e.value)
    assert "Fix:" in str(e.value)


def test_load_query_data_needs_aligned_genes(reference, split):
    q, _ = _query(split)
    q = q[:, ::-1].copy()
    with pytest.raises(InputError, match="prepare_query_anndata"):
        SCANVI.load_query_data(q, reference)
    with pytest.raises(InputError, match="needs a SCVI reference"):
        SCVI.load_query_data(q, reference)


# ------------------------------------------------------------------ surgery
@pytest.fixture(scope="module")
def query_model(reference, split):
    q, truth = _query(split)
    model = SCANVI.load_query_data(q, reference)
    before = jax.tree_util.tree_map(np.array, model.params)
    stats_before = jax.tree_util.tree_map(np.array, model.state)
    # weight decay on: a frozen weight must still not move
    model.train(max_epochs=10, progress_bar=False, plan_kwargs={"weight_decay": 0.05})
    return model, before, stats_before, truth


def test_surgery_grows_categories_and_keeps_reference_codes(reference, query_model):
    model, *_ = query_model
    assert model.registry.batch_categories == (*reference.registry.batch_categories, "batch2")
    assert model.query_info["new_batches"] == ["batch2"]
    emb = model.params["decoder"]["px_decoder"]["layer0_cov0"]
    assert emb.shape[0] == 3


def test_frozen_leaves_bitwise_unchanged(query_model):
    model, before, stats_before, _ = query_model
    params_mask, state_mask = model._freeze
    flat_b = jax.tree_util.tree_leaves_with_path(before)
    flat_a = jax.tree_util.tree_leaves(model.params)
    flat_m = jax.tree_util.tree_leaves(params_mask)
    n_frozen = n_trained = 0
    for (path, b), a, m in zip(flat_b, flat_a, flat_m):
        a = np.asarray(a)
        assert np.array_equal(a[~m], b[~m]), jax.tree_util.keystr(path)
        n_frozen += int((~m).sum())
        n_trained += int((a[m] != b[m]).sum())
    assert n_frozen > 0.9 * sum(np.size(b) for _, b in flat_b)
    assert n_trained > 0  # the new batch's rows did train
    new_row = np.asarray(model.params["decoder"]["px_decoder"]["layer0_cov0"])[2]
    assert not np.array_equal(new_row, before["decoder"]["px_decoder"]["layer0_cov0"][2])
    # frozen batch-norm running statistics too (encoder, classifier); the decoder's move
    for (path, b), a, m in zip(
        jax.tree_util.tree_leaves_with_path(stats_before),
        jax.tree_util.tree_leaves(model.state),
        jax.tree_util.tree_leaves(state_mask),
    ):
        if not np.all(m):
            assert np.array_equal(np.asarray(a), b), jax.tree_util.keystr(path)
    dec = model.state["batch_stats"]["decoder"]["px_decoder"]["bn0"]["mean"]
    assert not np.array_equal(
        np.asarray(dec), stats_before["batch_stats"]["decoder"]["px_decoder"]["bn0"]["mean"]
    )


def test_reference_cells_map_as_before(reference, query_model, split):
    """Frozen encoder and old rows: the query model embeds reference cells exactly as
    the reference model does."""
    model, *_ = query_model
    ref = reference.adata
    np.testing.assert_array_equal(
        model.get_latent_representation(ref), reference.get_latent_representation()
    )


def test_query_accuracy(query_model):
    model, _, _, truth = query_model
    pred = model.predict()
    known = truth != NOVEL
    acc = float((pred[known] == truth[known]).mean())
    assert acc > 0.7, acc  # 3 reference types: chance is ~0.33-0.5
    # novelty: flag rates are checked on PBMC, where the absent type is distinct


def test_unfrozen_trains_everything(reference, split):
    q, _ = _query(split)
    model = SCANVI.load_query_data(q, reference, unfrozen=True)
    params_mask, _state_mask = model._freeze
    assert all(np.all(m) for m in jax.tree_util.tree_leaves(params_mask))
    assert model.module.config.frozen_batchnorm == ()


def _assert_reference_classes_frozen(model, before, stats_before, n_ref):
    """After query training with new cell types: the classifier's reference classes
    (logit columns, hidden layers, running statistics) and the reference classes'
    rows of q(u|z,c) and p(z|u,c) are bitwise unchanged; the new class's did train."""
    p = jax.tree_util.tree_map(np.asarray, model.params)
    logits, old_logits = p["classifier"]["logits"], before["classifier"]["logits"]
    assert np.array_equal(logits["kernel"][:, :n_ref], old_logits["kernel"][:, :n_ref])
    assert np.array_equal(logits["bias"][:n_ref], old_logits["bias"][:n_ref])
    assert not np.array_equal(logits["kernel"][:, n_ref:], old_logits["kernel"][:, n_ref:])
    assert _bitwise(p["classifier"]["classifier"], before["classifier"]["classifier"])
    assert _bitwise(
        model.state["batch_stats"]["classifier"], stats_before["batch_stats"]["classifier"]
    )
    for net, fc in (("encoder_z2_z1", "encoder"), ("decoder_z1_z2", "decoder")):
        rows, old_rows = p[net][fc]["layer0_cov0"], before[net][fc]["layer0_cov0"]
        assert rows.shape[0] == n_ref + 1
        assert np.array_equal(rows[:n_ref], old_rows[:n_ref]), net
        assert not np.array_equal(rows[n_ref:], old_rows[n_ref:]), net


def _bitwise(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_query_resume_bitwise(reference, split, tmp_path):
    """A query model with a new cell type (surgery masks, replayed reference types)
    resumed from a two-epoch checkpoint to four is bit for bit the uninterrupted run."""
    q, _ = _query(split, labelled_novel=0.3)
    kw = dict(max_epochs=4, progress_bar=False, check_val_every_n_epoch=1)

    def fresh():
        with pytest.warns(UserWarning, match="new cell types"):
            return SCANVI.load_query_data(q.copy(), reference)

    full = fresh()
    full.train(**kw, checkpoint_dir=tmp_path / "full")
    part = fresh()
    part.train(**{**kw, "max_epochs": 2}, checkpoint_dir=tmp_path / "part")
    assert part.history.n_epochs == 2 and not _bitwise(part.params, full.params)
    resumed = fresh()
    resumed.train(**kw, checkpoint_dir=tmp_path / "part", resume=True)
    assert int(resumed.train_state.epoch) == 4
    assert _bitwise(resumed.params, full.params)
    assert _bitwise(resumed.state, full.state)
    assert _bitwise(resumed.train_state.opt_state, full.train_state.opt_state)
    cols = [c for c in full.history.to_frame().columns if c != "epoch_seconds"]
    pd.testing.assert_frame_equal(resumed.history.to_frame()[cols], full.history.to_frame()[cols])
    np.testing.assert_array_equal(
        resumed.predict(soft=True).to_numpy(), full.predict(soft=True).to_numpy()
    )


def test_new_cell_types_from_labelled_query_cells(reference, split):
    q, truth = _query(split, labelled_novel=0.3)
    with pytest.warns(UserWarning, match="new cell types"):
        model = SCANVI.load_query_data(q, reference)
    assert model.registry.label_categories[-1] == NOVEL
    assert model.params["classifier"]["logits"]["kernel"].shape[-1] == 4
    before = jax.tree_util.tree_map(np.array, model.params)
    stats_before = jax.tree_util.tree_map(np.array, model.state)
    model.train(max_epochs=12, progress_bar=False)
    _assert_reference_classes_frozen(model, before, stats_before, n_ref=3)
    hidden = q.obs["lab"].to_numpy() == "Unknown"
    pred = model.predict()
    novel = hidden & (truth == NOVEL)
    old = hidden & (truth != NOVEL)
    assert (pred[novel] == NOVEL).mean() > 0.5, (pred[novel] == NOVEL).mean()
    assert (pred[old] == truth[old]).mean() > 0.7, (pred[old] == truth[old]).mean()
    # explicit new_labels with no cells of it still extends the registry
    q2, _ = _query(split)
    with pytest.warns(UserWarning, match="new cell types"):
        m2 = SCANVI.load_query_data(q2, reference, new_labels=["Plasma"])
    assert m2.registry.label_categories[-1] == "Plasma"


def test_query_model_save_load_roundtrip(query_model, tmp_path):
    model, *_ = query_model
    model.save(tmp_path / "q", overwrite=True)
    loaded = SCANVI.load(tmp_path / "q", adata=model.adata)
    assert loaded.temperature == model.temperature
    assert loaded.query_info == model.query_info
    # what query training may change survives the round trip
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded._freeze), jax.tree_util.tree_leaves(model._freeze)
    ):
        np.testing.assert_array_equal(np.asarray(a, bool), np.asarray(b, bool))
    assert loaded.reference_stats == model.reference_stats
    np.testing.assert_array_equal(
        loaded.predict(soft=True).to_numpy(), model.predict(soft=True).to_numpy()
    )
    np.testing.assert_array_equal(loaded.novelty_score(), model.novelty_score())


# -------------------------------------------------- calibration, abstention
def test_calibration_lowers_error_on_held_out_cells(reference):
    cal = reference.calibration
    assert cal["n_cells"] == len(reference.validation_indices)
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    n = reference.adata.n_obs
    held = np.setdiff1d(
        np.arange(n), np.concatenate([reference.train_indices, reference.validation_indices])
    )
    assert len(held) > 50
    y = np.asarray(
        [
            reference.registry.label_categories.index(t)
            for t in reference.adata.obs["lab"].astype(str).to_numpy()[held]
        ]
    )
    logits = reference._logits(reference.variables, reference._train_cells(), held, None)

    def soft(t):
        z = logits / t
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    before = expected_calibration_error(soft(1.0), y)
    after = expected_calibration_error(soft(reference.temperature), y)
    assert after < before, (before, after, reference.temperature)
    assert abs(reference.calibration_error(indices=held) - after) < 1e-9
    hist = reference.history.to_frame()
    assert "calibration_error_validation_calibrated" in hist and "temperature" in hist


def test_temperature_fit_matches_brute_force(reference):
    """The fitted temperature minimises validation NLL: a grid search agrees."""
    val = reference.validation_indices
    y = reference._train_cells().labels[val]
    logits = reference._logits(reference.variables, reference._train_cells(), val, None)
    grid = np.exp(np.linspace(np.log(0.05), np.log(50), 4001))

    def nll(t):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        return (np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean()

    best = grid[np.argmin([nll(t) for t in grid])]
    assert abs(np.log(best) - np.log(reference.temperature)) < 0.01


def test_predict_soft_is_calibrated_and_unassigned(reference):
    probs = reference.predict(soft=True)
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-6)
    hard = reference.predict()
    assert (np.asarray(probs.columns)[probs.to_numpy().argmax(1)] == hard).all()
    top = probs.to_numpy().max(1)
    p = float(np.quantile(top, 0.3))
    gated = reference.predict(unassigned_threshold=p)
    assert ((gated == "Unassigned") == (top < p)).all()
    assert (gated[top >= p] == hard[top >= p]).all()
    with pytest.raises(InputError) as e:
        reference.predict(soft=True, unassigned_threshold=0.5)
    assert e.value.field == "unassigned_threshold"
    with pytest.raises(InputError):
        reference.predict(unassigned_threshold=1.5)


# ---------------------------------------------------------------- real data
COARSE = {
    "Naive CD4 T": "CD4 T",
    "Memory CD4 T": "CD4 T",
    "CD8 T": "CD8 T",
    "B": "B",
    "NK": "NK",
    "CD14+ Mono": "Mono/DC",
    "FCGR3A+ Mono": "Mono/DC",
    "DC": "Mono/DC",
    "Platelet": "Platelet",
    "T_CD4": "CD4 T",
    "T_CD8": "CD8 T",
    "MNP": "Mono/DC",
    "Unknown": "Unknown",
    "CD4 T": "CD4 T",
    "Mono/DC": "Mono/DC",
}


def _reference_model(ref, n_genes=1000):
    ref = hvg(ref, n_genes)
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="coarse")
    vae = SCVI(ref, n_hidden=64)
    vae.train(
        max_epochs=15, batch_size=256, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": 8}
    )
    model = SCANVI.from_scvi_model(vae, "Unknown")
    model.train(max_epochs=5, batch_size=256, progress_bar=False)
    return model


def _map(query, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SCANVI.prepare_query_anndata(query, model)
    q = SCANVI.load_query_data(query, model)
    q.train(max_epochs=8, batch_size=256, progress_bar=False, plan_kwargs={"weight_decay": 0.0})
    return q


@pytest.mark.data
def test_pbmc3k_reference_to_pbmc4k_query():
    ref = ad.read_h5ad(shared_file("pbmc3k.h5ad"))
    query = ad.read_h5ad(shared_file("pbmc4k_soupx.h5ad"))
    ref.obs["coarse"] = ref.obs["cell_type"].astype(str).map(COARSE)
    ref = ref[ref.obs["coarse"] != "Platelet"].copy()
    truth = query.obs["cell_type"].astype(str).map(COARSE).to_numpy()
    del query.obs["cell_type"]
    q = _map(query, _reference_model(ref))
    pred = q.predict()
    known = truth != "Unknown"
    acc = float((pred[known] == truth[known]).mean())
    largest = pd.Series(truth[known]).value_counts(normalize=True).iloc[0]
    assert acc > max(0.65, largest + 0.3), acc  # ~0.8 here; majority class 0.30


@pytest.mark.data
def test_pbmc_held_out_batch_with_a_type_absent_from_the_reference():
    """pbmc_3k_4k: reference = the v1 batch without B cells, query = the v2 batch."""
    a = ad.read_h5ad(shared_file("pbmc_3k_4k.h5ad"))
    a.obs["coarse"] = a.obs["cell_type"].astype(str)
    is_q = (a.obs["batch"] == "pbmc4k_v2").to_numpy()
    truth = a.obs["coarse"].to_numpy()
    ref = a[~is_q & (truth != "B") & (truth != "Platelet")].copy()
    query = a[is_q].copy()
    qtruth = truth[is_q]
    del query.obs["coarse"]
    q = _map(query, _reference_model(ref, 2000))  # B markers must be among the genes
    pred = q.predict()
    known = ~np.isin(qtruth, ["B", "Unknown", "Platelet"])
    acc = float((pred[known] == qtruth[known]).mean())
    assert acc > 0.65, acc
    flagged = q.novelty_score() > 1
    b = qtruth == "B"
    rates = {t: flagged[qtruth == t].mean() for t in np.unique(qtruth[known])}
    assert flagged[b].mean() > 2 * max(rates.values()) + 0.03, (flagged[b].mean(), rates)


# -------------------------------------------------------------- command line
def test_scvi_surgery_with_encoded_covariates_keeps_reference_exact():
    """SCVI, batches and a categorical covariate injected into the encoder too: the
    query's new categories train, every reference value stays bitwise."""
    a = synthetic_atlas(
        n_cells=300,
        n_genes=60,
        n_batches=3,
        n_lineages=1,
        types_per_lineage=2,
        seed=5,
        markers_per_type=8,
    )
    a.obs["donor"] = np.where(np.arange(a.n_obs) % 3 == 0, "d0", "d1")
    a.obs.loc[(a.obs["batch"] == "batch2").to_numpy() & (np.arange(a.n_obs) % 2 == 0), "donor"] = (
        "d2"
    )
    is_q = (a.obs["batch"] == "batch2").to_numpy()
    ref, query = a[~is_q].copy(), a[is_q].copy()
    SCVI.setup_anndata(ref, batch_key="batch", categorical_covariate_keys=["donor"])
    vae = SCVI(ref, n_hidden=8, n_latent=3, encode_covariates=True)
    vae.train(max_epochs=2, progress_bar=False)
    q = SCVI.load_query_data(query, vae)
    assert q.registry.batch_categories[-1] == "batch2"
    assert q.registry.categorical_covariate_categories[0] == ("d0", "d1", "d2")
    before = jax.tree_util.tree_map(np.array, q.params)
    q.train(max_epochs=2, progress_bar=False, plan_kwargs={"weight_decay": 0.1})
    mask = q._freeze[0]
    enc = "z_encoder"
    for (path, b), new, m in zip(
        jax.tree_util.tree_leaves_with_path(before),
        jax.tree_util.tree_leaves(q.params),
        jax.tree_util.tree_leaves(mask),
    ):
        assert np.array_equal(np.asarray(new)[~m], b[~m]), jax.tree_util.keystr(path)
    cov = np.asarray(q.params[enc]["encoder"]["layer0_cov1"])  # donor rows in the encoder
    assert not np.array_equal(cov[2], before[enc]["encoder"]["layer0_cov1"][2])
    np.testing.assert_array_equal(
        q.get_latent_representation(vae.adata), vae.get_latent_representation()
    )

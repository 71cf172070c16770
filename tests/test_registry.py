"""setup_anndata and the Registry: what is recorded, and how a new AnnData is read with it.

Models are tiny (40 genes, n_hidden=16, n_latent=4) and share one compiled
initialiser / latent kernel, since every SCVI here has the same architecture.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxscanvi import SCANVI, SCVI, InputError, Registry, synthetic_atlas
from jaxscanvi.data.cells import cell_data
from jaxscanvi.data.registry import UNS_KEY, registry_of

ARCH = dict(n_hidden=16, n_latent=4)


def tiny_atlas(seed: int = 0) -> ad.AnnData:
    return synthetic_atlas(
        n_cells=120,
        n_genes=40,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=seed,
        markers_per_type=5,
    )


@pytest.fixture(scope="module")
def base_atlas():
    return tiny_atlas()


@pytest.fixture
def adata(base_atlas):
    return base_atlas.copy()


def with_covariates(a: ad.AnnData) -> ad.AnnData:
    """Add a size factor, a categorical covariate in a non-alphabetical order
    (with an unused category) and a continuous covariate."""
    rng = np.random.default_rng(1)
    n = a.n_obs
    a.obs["sf"] = rng.uniform(0.5, 2.0, n)
    a.obs["donor"] = pd.Categorical(
        rng.choice(["zeta", "alpha", "mu"], n), categories=["zeta", "alpha", "mu", "unused_donor"]
    )
    a.obs["pct_mito"] = rng.uniform(0.0, 0.2, n)
    a.obs["site"] = rng.choice(["s2", "s10", "s1"], n)  # plain object column
    return a


def full_setup(a: ad.AnnData) -> Registry:
    SCVI.setup_anndata(
        a,
        layer="counts",
        batch_key="batch",
        labels_key="cell_type",
        size_factor_key="sf",
        categorical_covariate_keys=["donor", "site"],
        continuous_covariate_keys=["pct_mito"],
    )
    return registry_of(a)


# ------------------------------------------------------------------ the record
def test_registry_records_every_field(adata):
    a = with_covariates(adata)
    reg = full_setup(a)
    assert isinstance(reg, Registry)
    assert reg.layer == "counts"
    assert reg.var_names == tuple(a.var_names)
    assert reg.n_vars == a.n_vars
    assert reg.batch_key == "batch"
    assert reg.batch_categories == ("batch0", "batch1")
    assert reg.labels_key == "cell_type"
    assert reg.label_categories == tuple(a.obs["cell_type"].cat.categories)
    assert reg.unlabeled_category is None
    assert reg.size_factor_key == "sf"
    assert reg.categorical_covariate_keys == ("donor", "site")
    # categorical column: its own category order, minus unused categories;
    # object column: sorted
    assert reg.categorical_covariate_categories == (("zeta", "alpha", "mu"), ("s1", "s10", "s2"))
    assert reg.n_cats_per_cov == (3, 3)
    assert reg.continuous_covariate_keys == ("pct_mito",)
    assert reg.n_continuous_cov == 1
    assert reg.allow_noninteger_counts is False
    # stored in the AnnData as JSON text
    assert isinstance(a.uns[UNS_KEY], str)
    assert json.loads(a.uns[UNS_KEY])["batch_key"] == "batch"


def test_registry_is_frozen(adata):
    reg = full_setup(with_covariates(adata))
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.batch_key = "other"  # type: ignore[misc]
    hash(reg)  # frozen + tuples only: hashable


def test_registry_json_roundtrip(adata):
    reg = full_setup(with_covariates(adata))
    text = json.dumps(reg.to_dict())  # plain JSON, no custom encoder
    back = Registry.from_dict(json.loads(text))
    assert back == reg
    assert Registry.from_json(reg.to_json()) == reg
    # tuples come back as tuples (so the record stays hashable and comparable)
    assert isinstance(back.categorical_covariate_categories[0], tuple)
    assert isinstance(back.var_names, tuple)
    hash(back)


def test_registry_from_dict_rejects_unknown_fields(adata):
    d = full_setup(with_covariates(adata)).to_dict()
    d["mystery"] = 1
    with pytest.raises(ValueError, match="mystery"):
        Registry.from_dict(d)


def test_setup_without_keys_gives_single_batch_and_label(adata):
    SCVI.setup_anndata(adata)
    reg = registry_of(adata)
    assert reg.layer is None and reg.batch_key is None and reg.labels_key is None
    assert reg.n_batch == 1 and reg.n_labels == 1
    cells = cell_data(adata, reg)
    assert (cells.batch == 0).all() and (cells.labels == 0).all()
    assert cells.log_size_factor is None


def test_layer_is_read_not_X(adata):
    # X holds normalised (non-integer) values, the layer raw counts: only the
    # layer is validated and read.
    raw = adata.layers["counts"].copy()
    adata.X = adata.X.multiply(1.0 / np.asarray(adata.X.sum(1))).tocsr()
    SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    cells = cell_data(adata, registry_of(adata))
    assert (raw.astype(np.float32) != cells.X).nnz == 0
    np.testing.assert_allclose(cells.log_library, np.log(np.asarray(raw.sum(1)).ravel()), rtol=1e-6)


def test_cell_data_encodes_in_registry_order(adata):
    a = with_covariates(adata)
    reg = full_setup(a)
    cells = cell_data(a, reg)
    donors = np.asarray(reg.categorical_covariate_categories[0])
    sites = np.asarray(reg.categorical_covariate_categories[1])
    assert list(donors[cells.cat_covs[:, 0]]) == list(a.obs["donor"].astype(str))
    assert list(sites[cells.cat_covs[:, 1]]) == list(a.obs["site"].astype(str))
    assert list(np.asarray(reg.batch_categories)[cells.batch]) == list(a.obs["batch"].astype(str))
    np.testing.assert_allclose(cells.cont_covs[:, 0], a.obs["pct_mito"], rtol=1e-6)
    np.testing.assert_allclose(cells.log_size_factor, np.log(a.obs["sf"]), rtol=1e-6)
    assert cells.X.dtype == np.float32 and sp.isspmatrix_csr(cells.X)


# --------------------------------------------------- CSR / CSC / dense agree
def _as(fmt: str, X):
    if fmt == "csr":
        return sp.csr_matrix(X)
    if fmt == "csc":
        return sp.csc_matrix(X)
    return np.asarray(X.toarray())


@pytest.fixture(scope="module")
def per_format(base_atlas):
    out = {}
    for fmt in ("csr", "csc", "dense"):
        a = base_atlas.copy()
        a.X = _as(fmt, base_atlas.X)
        del a.layers["counts"]
        SCVI.setup_anndata(a, batch_key="batch")
        out[fmt] = a
    return out


def test_formats_give_same_registry_and_cells(per_format):
    regs = {f: registry_of(a) for f, a in per_format.items()}
    assert regs["csr"] == regs["csc"] == regs["dense"]
    cells = {f: cell_data(a, regs[f]) for f, a in per_format.items()}
    ref = cells["csr"]
    for f in ("csc", "dense"):
        c = cells[f]
        assert sp.isspmatrix_csr(c.X)
        assert (c.X != ref.X).nnz == 0
        for name in ("batch", "labels", "cat_covs", "cont_covs", "log_library", "lgamma_const"):
            assert np.array_equal(getattr(c, name), getattr(ref, name)), (f, name)


def test_formats_give_same_model_outputs(per_format):
    z = {f: SCVI(a, **ARCH, seed=3).get_latent_representation() for f, a in per_format.items()}
    assert z["csr"].shape == (per_format["csr"].n_obs, 4)
    assert np.array_equal(z["csr"], z["csc"])
    assert np.array_equal(z["csr"], z["dense"])


def test_dense_integer_dtype_is_accepted(base_atlas):
    a = base_atlas.copy()
    a.X = base_atlas.X.toarray().astype(np.int64)
    SCVI.setup_anndata(a, batch_key="batch")
    ref = base_atlas.copy()
    SCVI.setup_anndata(ref, batch_key="batch")
    c1, c2 = cell_data(a, registry_of(a)), cell_data(ref, registry_of(ref))
    assert c1.X.dtype == np.float32
    assert (c1.X != c2.X).nnz == 0


# ----------------------------------------------------------- no densifying
def _big_sparse(fmt: str) -> ad.AnnData:
    """20k cells x 10k genes, ~10 non-zeros a cell: 800 MB dense (float32), ~2 MB sparse."""
    n, g, per = 20_000, 10_000, 10
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(n), per)
    cols = rng.integers(0, g, n * per)
    vals = rng.integers(1, 5, n * per).astype(np.float32)
    X = sp.coo_matrix((vals, (rows, cols)), shape=(n, g)).tocsr()
    X.sum_duplicates()
    X = X.asformat(fmt)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b"], n))}, index=[f"c{i}" for i in range(n)]
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_big_sparse_matrix_is_never_densified(fmt, monkeypatch):
    a = _big_sparse(fmt)
    full_shape = a.shape
    densified = []

    def spy(name, orig):
        def wrapper(self, *args, **kwargs):
            if self.shape == full_shape:
                densified.append(name)
            return orig(self, *args, **kwargs)

        return wrapper

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        for meth in ("toarray", "todense"):
            monkeypatch.setattr(cls, meth, spy(f"{cls.__name__}.{meth}", getattr(cls, meth)))
    tracemalloc.start()
    try:
        SCVI.setup_anndata(a, batch_key="batch")
        cells = cell_data(a, registry_of(a))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not densified, densified
    assert cells.X.shape == full_shape and cells.X.nnz == a.X.nnz
    dense_bytes = full_shape[0] * full_shape[1] * 4
    assert peak < dense_bytes / 10, f"peak {peak / 1e6:.0f} MB: looks densified"


# ---------------------------------------------------- categories actually used
def test_unused_categories_are_dropped(adata):
    a = adata
    a.obs["batch"] = a.obs["batch"].cat.add_categories(["ghost_batch"])
    a.obs["cell_type"] = a.obs["cell_type"].cat.add_categories(["ghost_type"])
    a.obs["donor"] = pd.Categorical(
        ["d1"] * 60 + ["d2"] * 60, categories=["ghost_donor", "d2", "d1"]
    )
    SCVI.setup_anndata(
        a, batch_key="batch", labels_key="cell_type", categorical_covariate_keys=["donor"]
    )
    reg = registry_of(a)
    assert "ghost_batch" not in reg.batch_categories and reg.n_batch == 2
    assert "ghost_type" not in reg.label_categories
    assert reg.categorical_covariate_categories == (("d2", "d1"),)
    assert reg.n_batch == 2 and reg.n_cats_per_cov == (2,)
    cells = cell_data(a, reg)
    assert cells.batch.max() == 1 and cells.cat_covs.max() == 1


def _semi_labelled(a: ad.AnnData, n_unlabelled: int = 50) -> ad.AnnData:
    ct = a.obs["cell_type"].astype(str).to_numpy().copy()
    ct[:n_unlabelled] = "Unknown"
    a.obs["ct"] = pd.Categorical(
        ct, categories=["Unknown", *sorted(set(ct) - {"Unknown"}), "never_seen_type"]
    )
    return a


def test_unlabeled_category_is_not_a_class(adata):
    a = _semi_labelled(adata)
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown", batch_key="batch")
    reg = registry_of(a)
    assert reg.unlabeled_category == "Unknown"
    assert "Unknown" not in reg.label_categories
    assert "never_seen_type" not in reg.label_categories
    assert reg.label_categories == ("L0_T0", "L0_T1")
    cells = cell_data(a, reg)
    unl = (a.obs["ct"] == "Unknown").to_numpy()
    # the unlabelled code is n_labels, past every class
    assert (cells.labels[unl] == reg.n_labels).all()
    assert (cells.labels[~unl] < reg.n_labels).all()
    names = np.asarray(reg.label_categories)[cells.labels[~unl]]
    assert list(names) == list(a.obs["ct"][~unl].astype(str))


def test_scanvi_unlabeled_category_given_as_non_string(adata):
    # integer labels with -1 marking unlabelled cells
    a = adata
    codes = a.obs["cell_type"].cat.codes.to_numpy().astype(int)
    codes[:30] = -1
    a.obs["ct_int"] = codes
    SCANVI.setup_anndata(a, labels_key="ct_int", unlabeled_category=-1)
    reg = registry_of(a)
    assert reg.unlabeled_category == "-1"
    assert "-1" not in reg.label_categories
    cells = cell_data(a, reg)
    assert (cells.labels[:30] == reg.n_labels).all()


# ------------------------------------------------------ reading a new AnnData
@pytest.fixture(scope="module")
def fitted(base_atlas):
    a = base_atlas.copy()
    SCVI.setup_anndata(a, batch_key="batch")
    return a, SCVI(a, **ARCH)


def test_query_with_permuted_genes_is_refused(fitted):
    a, model = fitted
    perm = np.random.default_rng(0).permutation(a.n_vars)
    q = a[:, perm].copy()
    with pytest.raises(InputError, match=r"adata\.var_names") as e:
        model.get_latent_representation(adata=q)
    assert e.value.field == "adata.var_names"
    assert "order" in str(e.value) and "Fix:" in str(e.value)


def test_query_with_missing_genes_is_refused(fitted):
    a, model = fitted
    q = a[:, 5:].copy()
    with pytest.raises(InputError, match=r"adata\.var_names.*5 of the model's 40 missing"):
        model.get_latent_representation(adata=q)


def test_query_with_extra_genes_is_refused(fitted):
    a, model = fitted
    ones = sp.csr_matrix(np.ones((a.n_obs, 1), np.float32))
    q = ad.AnnData(
        X=sp.hstack([a.X, ones]).tocsr(),
        obs=a.obs.copy(),
        var=pd.DataFrame(index=[*list(a.var_names), "extra_gene"]),
    )
    with pytest.raises(InputError, match=r"adata\.var_names"):
        model.get_latent_representation(adata=q)


def test_var_names_fix_can_be_followed(fitted):
    # the message's fix: reorder/subset with adata[:, model.registry.var_names]
    a, model = fitted
    perm = np.random.default_rng(1).permutation(a.n_vars)
    q = a[:, perm].copy()
    fixed = q[:, model.registry.var_names].copy()  # literally as the message says
    assert np.array_equal(
        model.get_latent_representation(adata=fixed), model.get_latent_representation()
    )


def test_fixes_name_functions_that_exist(fitted):
    """The var_names / unseen-category messages suggest helpers by name; they must exist."""
    import jaxscanvi

    a, model = fitted
    msgs = []
    with pytest.raises(InputError) as e:
        model.get_latent_representation(adata=a[:, 1:].copy())
    msgs.append(str(e.value))
    q = a.copy()
    q.obs["batch"] = q.obs["batch"].astype(str).replace("batch1", "batch_new")
    with pytest.raises(InputError) as e:
        model.get_latent_representation(adata=q)
    msgs.append(str(e.value))
    for msg in msgs:
        fix = msg.split("Fix:", 1)[1]
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\(", fix):
            found = hasattr(jaxscanvi, name) or hasattr(SCVI, name) or hasattr(SCANVI, name)
            assert found, f"fix suggests {name}(...), which jaxscanvi does not have: {msg}"


def test_query_with_unseen_batch_is_refused(fitted):
    a, model = fitted
    q = a.copy()
    q.obs["batch"] = q.obs["batch"].astype(str).replace("batch1", "batch_new")
    with pytest.raises(InputError, match=r"adata\.obs\['batch'\].*batch_new.*Fix:") as e:
        model.get_latent_representation(adata=q)
    assert e.value.value == ["batch_new"]


def test_query_with_subset_of_batches_is_fine(fitted):
    a, model = fitted
    keep = (a.obs["batch"] == "batch1").to_numpy()
    q = a[keep].copy()  # only one batch; the category order comes from the registry
    z_q = model.get_latent_representation(adata=q)
    z_all = model.get_latent_representation()
    np.testing.assert_allclose(z_q, z_all[keep], rtol=1e-5, atol=1e-6)


def test_query_missing_batch_column_is_refused(fitted):
    a, model = fitted
    q = a.copy()
    del q.obs["batch"]
    with pytest.raises(InputError, match=r"batch_key='batch'.*Fix:"):
        model.get_latent_representation(adata=q)


def test_query_is_not_setup_and_not_modified(fitted):
    a, model = fitted
    q = a.copy()
    q.uns.pop(UNS_KEY, None)
    model.get_latent_representation(adata=q)
    assert UNS_KEY not in q.uns


def test_reading_does_not_modify_the_callers_matrix(base_atlas):
    """cell_data may clean up a CSR (drop stored zeros), but on its own copy."""
    a = base_atlas.copy()
    X = a.X.copy()
    X.data[:5] = 0.0  # explicitly stored zeros: valid CSR, same values
    a.X = X
    before = (a.X.indptr.copy(), a.X.indices.copy(), a.X.data.copy())
    SCVI.setup_anndata(a, batch_key="batch")
    cells = cell_data(a, registry_of(a))
    assert cells.X.nnz == before[2].size - 5  # the model's copy has no stored zeros
    after = (a.X.indptr, a.X.indices, a.X.data)
    for b, c in zip(before, after):
        assert np.array_equal(b, c), "cell_data changed adata.X in place"

"""Bad input: one InputError naming the field, the value and the fix, before any compile.

"Before any compile" is enforced by `no_compute`, which replaces every entry
point to compiled work (parameter initialisation, the training loop, the data
and the inference map) with a tripwire; an InputError raised by a
setup/constructor/train()/inference call under it was raised before any of them.
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import jaxscanvi.model._base as base
from jaxscanvi import (
    SCANVI,
    SCVI,
    InputError,
    ModelFormatError,
    NonFiniteLossError,
    synthetic_atlas,
)
from jaxscanvi.compile_cache import functions as compiled_functions

ARCH = dict(n_hidden=16, n_latent=4)


class CompiledTooEarly(AssertionError):
    """Compiled work started before the bad input was reported."""


@pytest.fixture
def no_compute(monkeypatch):
    def tripwire(what):
        def f(*a, **k):
            raise CompiledTooEarly(f"{what} ran before the input was validated")

        return f

    monkeypatch.setattr(base, "init_variables", tripwire("init_variables (jit of init)"))
    monkeypatch.setattr(base, "fit", tripwire("the training loop"))
    monkeypatch.setattr(base.BaseModel, "_map", tripwire("BaseModel._map (jitted kernel)"))


def tiny_atlas() -> ad.AnnData:
    a = synthetic_atlas(
        n_cells=120,
        n_genes=40,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=5,
    )
    rng = np.random.default_rng(0)
    a.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2"], a.n_obs))
    a.obs["pct"] = rng.uniform(0, 0.2, a.n_obs)
    a.obs["sf"] = rng.uniform(0.5, 2.0, a.n_obs)
    return a


@pytest.fixture(scope="module")
def base_atlas():
    return tiny_atlas()


@pytest.fixture
def adata(base_atlas):
    return base_atlas.copy()


def assert_clear(err: InputError, field: str, value: str | None = None):
    """One InputError whose message names the field, (the value) and a fix."""
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    msg = str(err)
    assert err.field == field, (err.field, msg)
    assert re.match(re.escape(field) + "=", msg), msg
    m = re.search(r"\. Fix: (.+)$", msg, flags=re.S)
    assert m and len(m.group(1).strip()) > 10, f"no usable fix in: {msg}"
    if value is not None:
        assert re.search(value, msg.split(". Fix:")[0]), f"value {value!r} not in: {msg}"
    # one error, not a wrapped chain of them
    assert err.__cause__ is None


def test_input_error_is_a_value_error():
    err = InputError("batch_size", 0, "must be a positive integer", "pass batch_size=128")
    assert isinstance(err, ValueError)
    assert str(err) == "batch_size=0: must be a positive integer. Fix: pass batch_size=128"
    assert (err.field, err.value, err.fix) == ("batch_size", 0, "pass batch_size=128")
    assert issubclass(ModelFormatError, ValueError)
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_long_values_are_shortened():
    err = InputError("f", "x" * 1000, "bad", "fix it")
    assert len(str(err)) < 200 and "..." in str(err)


# ---------------------------------------------------------- setup_anndata table
def _set_value(v, layer=None):
    def f(a):
        X = a.X if layer is None else a.layers[layer]
        X = X.copy()
        X.data[3] = v
        if layer is None:
            a.X = X
        else:
            a.layers[layer] = X
        return a

    return f


def _zero_cell(a):
    X = a.X.tolil()
    X[7, :] = 0
    a.X = X.tocsr()
    return a


def _dup_genes(a):
    names = list(a.var_names)
    names[5] = names[2]
    a.var_names = names
    return a


def _obs(col, values):
    def f(a):
        a.obs[col] = values(a)
        return a

    return f


def _nan_categorical(a):
    d = a.obs["donor"].copy()
    d.iloc[4] = np.nan
    return d


def _nan_float(a):
    v = a.obs["pct"].to_numpy().copy()
    v[9] = np.nan
    return v


def _inf_float(a):
    v = a.obs["pct"].to_numpy().copy()
    v[9] = np.inf
    return v


SETUP_CASES = [
    # id, mutate, setup kwargs, field, value regex
    ("non_integer_counts", _set_value(0.5), {}, "adata.X", r"0\.5"),
    ("negative_counts", _set_value(-2.0), {}, "adata.X", r"-2\.0"),
    ("nan_counts", _set_value(np.nan), {}, "adata.X", r"nan"),
    ("inf_counts", _set_value(np.inf), {}, "adata.X", r"inf"),
    (
        "non_integer_counts_in_layer",
        _set_value(1.25, "counts"),
        {"layer": "counts"},
        "adata.layers['counts']",
        r"1\.25",
    ),
    (
        "negative_counts_in_layer",
        _set_value(-1.0, "counts"),
        {"layer": "counts"},
        "adata.layers['counts']",
        r"-1\.0",
    ),
    ("zero_cells", lambda a: a[:0].copy(), {}, "adata.n_obs", r"0"),
    ("zero_genes", lambda a: a[:, :0].copy(), {}, "adata.n_vars", r"0"),
    ("missing_layer", lambda a: a, {"layer": "raw_counts"}, "layer", r"raw_counts"),
    ("missing_batch_key", lambda a: a, {"batch_key": "batchh"}, "batch_key", r"batchh"),
    (
        "batch_key_case_hint",
        lambda a: a,
        {"batch_key": "Batch"},
        "batch_key",
        r"did you mean 'batch'",
    ),
    ("missing_labels_key", lambda a: a, {"labels_key": "celltype"}, "labels_key", r"celltype"),
    (
        "missing_size_factor_key",
        lambda a: a,
        {"size_factor_key": "size"},
        "size_factor_key",
        r"size",
    ),
    (
        "missing_categorical_covariate",
        lambda a: a,
        {"categorical_covariate_keys": ["donor", "sex"]},
        "categorical_covariate_keys",
        r"sex",
    ),
    (
        "missing_continuous_covariate",
        lambda a: a,
        {"continuous_covariate_keys": ["percent_mito"]},
        "continuous_covariate_keys",
        r"percent_mito",
    ),
    (
        "nan_in_batch",
        _obs("batch", lambda a: a.obs["batch"].where(np.arange(a.n_obs) != 2)),
        {"batch_key": "batch"},
        "adata.obs['batch']",
        r"NaN.*cell2",
    ),
    (
        "nan_in_categorical_covariate",
        _obs("donor", _nan_categorical),
        {"categorical_covariate_keys": ["donor"]},
        "adata.obs['donor']",
        r"NaN.*cell4",
    ),
    (
        "nan_in_labels",
        _obs("cell_type", lambda a: a.obs["cell_type"].where(np.arange(a.n_obs) != 0)),
        {"labels_key": "cell_type"},
        "adata.obs['cell_type']",
        r"NaN",
    ),
    (
        "nan_in_continuous_covariate",
        _obs("pct", _nan_float),
        {"continuous_covariate_keys": ["pct"]},
        "adata.obs['pct']",
        r"NaN",
    ),
    (
        "inf_in_continuous_covariate",
        _obs("pct", _inf_float),
        {"continuous_covariate_keys": ["pct"]},
        "adata.obs['pct']",
        r"inf",
    ),
    (
        "string_continuous_covariate",
        _obs("pct", lambda a: a.obs["pct"].map(lambda v: f"{v:.2f}")),
        {"continuous_covariate_keys": ["pct"]},
        "adata.obs['pct']",
        r"object|str",
    ),
    (
        "categorical_continuous_covariate",
        _obs("pct", lambda a: a.obs["donor"]),
        {"continuous_covariate_keys": ["pct"]},
        "adata.obs['pct']",
        r"category",
    ),
    (
        "bool_continuous_covariate",
        _obs("pct", lambda a: a.obs["pct"] > 0.1),
        {"continuous_covariate_keys": ["pct"]},
        "adata.obs['pct']",
        r"bool",
    ),
    (
        "nonpositive_size_factor",
        _obs("sf", lambda a: a.obs["sf"].where(np.arange(a.n_obs) != 1, 0.0)),
        {"size_factor_key": "sf"},
        "adata.obs['sf']",
        r"non-positive",
    ),
    (
        "nan_size_factor",
        _obs("sf", lambda a: a.obs["sf"].where(np.arange(a.n_obs) != 1)),
        {"size_factor_key": "sf"},
        "adata.obs['sf']",
        r"NaN",
    ),
    ("duplicate_var_names", _dup_genes, {}, "adata.var_names", r"gene2"),
    ("cell_with_zero_counts", _zero_cell, {}, "adata.X", r"cell7.*row 7"),
    (
        "unlabeled_category_without_labels_key",
        lambda a: a,
        {"unlabeled_category": "Unknown"},
        "labels_key",
        r"None",
    ),
]


@pytest.mark.parametrize(
    "mutate,kwargs,field,value", [c[1:] for c in SETUP_CASES], ids=[c[0] for c in SETUP_CASES]
)
def test_setup_anndata_rejects(adata, mutate, kwargs, field, value, no_compute):
    import warnings

    a = mutate(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. anndata's duplicate-name warning
        with pytest.raises(InputError) as e:
            if "unlabeled_category" in kwargs:
                from jaxscanvi.data.registry import setup_anndata

                setup_anndata(a, **kwargs)
            else:
                SCVI.setup_anndata(a, **kwargs)
    assert_clear(e.value, field, value)
    assert "_jaxscanvi_registry" not in a.uns  # nothing recorded on failure


def test_setup_anndata_rejects_non_anndata(no_compute):
    with pytest.raises(InputError) as e:
        SCVI.setup_anndata(np.ones((3, 3)))
    assert_clear(e.value, "adata", "ndarray")


def test_noninteger_counts_can_be_allowed_with_a_warning(adata):
    adata.X = adata.X.copy()
    adata.X.data[3] = 0.5
    with pytest.warns(UserWarning, match="non-integer"):
        SCVI.setup_anndata(adata, allow_noninteger_counts=True)


def test_negative_counts_refused_even_when_noninteger_allowed(adata):
    adata.X = adata.X.copy()
    adata.X.data[3] = -0.5
    with pytest.raises(InputError, match="negative"):
        SCVI.setup_anndata(adata, allow_noninteger_counts=True)


def test_dense_counts_checked_too(adata):
    X = adata.X.toarray()
    X[0, 0] = 2.5
    adata.X = X
    with pytest.raises(InputError) as e:
        SCVI.setup_anndata(adata)
    assert_clear(e.value, "adata.X", r"2\.5")


def test_single_cell_batch_warns(adata):
    b = adata.obs["batch"].astype(str).to_numpy().copy()
    b[0] = "lonely"
    adata.obs["batch"] = b
    with pytest.warns(UserWarning, match="lonely"):
        SCVI.setup_anndata(adata, batch_key="batch")


def test_model_on_not_set_up_adata(adata, no_compute):
    with pytest.raises(InputError) as e:
        SCVI(adata, **ARCH)
    assert_clear(e.value, "adata", "not set up")


# ------------------------------------------------------- model construction
CONSTRUCT_CASES = [
    ("n_hidden_zero", {"n_hidden": 0}, "n_hidden", r"0"),
    ("n_latent_negative", {"n_latent": -2}, "n_latent", r"-2"),
    ("n_layers_float", {"n_layers": 1.5}, "n_layers", r"1\.5"),
    ("dropout_one", {"dropout_rate": 1.0}, "dropout_rate", r"1\.0"),
    ("dispersion_unknown", {"dispersion": "per-cell"}, "dispersion", r"per-cell"),
    ("likelihood_unknown", {"gene_likelihood": "normal"}, "gene_likelihood", r"normal"),
    (
        "latent_distribution_unknown",
        {"latent_distribution": "lognormal"},
        "latent_distribution",
        r"lognormal",
    ),
    ("batch_norm_unknown", {"use_batch_norm": "all"}, "use_batch_norm", r"all"),
]


@pytest.mark.parametrize(
    "kwargs,field,value", [c[1:] for c in CONSTRUCT_CASES], ids=[c[0] for c in CONSTRUCT_CASES]
)
def test_model_construction_rejects(adata, kwargs, field, value, no_compute):
    SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(InputError) as e:
        SCVI(adata, **{**ARCH, **kwargs})
    assert_clear(e.value, field, value)


def test_degenerate_library_prior_refused(adata, no_compute):
    # a one-cell batch has zero library-size variance: the learned-library prior
    # (use_observed_lib_size=False) would be degenerate
    b = adata.obs["batch"].astype(str).to_numpy().copy()
    b[0] = "lonely"
    adata.obs["batch"] = b
    with pytest.warns(UserWarning, match="single cell"):
        SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(InputError) as e:
        SCVI(adata, **ARCH, use_observed_lib_size=False)
    assert_clear(e.value, "batch_key", r"lonely")


# ----------------------------------------------------------------- SCANVI
def _semi(a, n_unlabelled=40, classes=None):
    ct = a.obs["cell_type"].astype(str).to_numpy().copy()
    if classes is not None:
        ct[:] = classes
    ct[:n_unlabelled] = "Unknown"
    a.obs["ct"] = ct
    return a


_TREE = {"L0_T0": "L0", "L0_T1": "L0", "L0": "cell"}
SCANVI_SETUP_CASES = [
    (
        "unlabeled_category_absent",
        lambda a: _semi(a),
        {"labels_key": "ct", "unlabeled_category": "unlabelled"},
        "unlabeled_category",
        r"unlabelled.*not among the labels.*'Unknown'",
    ),
    (
        "no_labelled_cells",
        lambda a: _semi(a, n_unlabelled=a.n_obs),
        {"labels_key": "ct", "unlabeled_category": "Unknown"},
        "labels_key",
        r"no cell has a label",
    ),
    (
        "labels_key_missing",
        lambda a: _semi(a),
        {"labels_key": "celltypes", "unlabeled_category": "Unknown"},
        "labels_key",
        r"celltypes",
    ),
    (
        "labels_key_none",
        lambda a: _semi(a),
        {"labels_key": None, "unlabeled_category": "Unknown"},
        "labels_key",
        r"None",
    ),
    (
        "unlabeled_category_none",
        lambda a: _semi(a),
        {"labels_key": "ct", "unlabeled_category": None},
        "unlabeled_category",
        r"None",
    ),
    (
        "nan_labels",
        lambda a: _obs(
            "ct",
            lambda a: pd.Series(
                np.where(np.arange(a.n_obs) == 3, None, a.obs["cell_type"].astype(str)),
                index=a.obs_names,
            ),
        )(a),
        {"labels_key": "ct", "unlabeled_category": "L0_T0"},
        "adata.obs['ct']",
        r"NaN",
    ),
    # label hierarchies (labelled here: L0_T0, L0_T1)
    (
        "label_hierarchy_cycle",
        lambda a: _semi(a),
        {
            "labels_key": "ct",
            "unlabeled_category": "Unknown",
            "label_hierarchy": {**_TREE, "cell": "L0_T0"},
        },
        "label_hierarchy",
        r"cycle",
    ),
    (
        "label_hierarchy_two_roots",
        lambda a: _semi(a),
        {
            "labels_key": "ct",
            "unlabeled_category": "Unknown",
            "label_hierarchy": {"L0_T0": "L0", "L0_T1": "L1"},
        },
        "label_hierarchy",
        r"2 roots",
    ),
    (
        "label_missing_from_hierarchy",
        lambda a: _semi(a),
        {
            "labels_key": "ct",
            "unlabeled_category": "Unknown",
            "label_hierarchy": {"L0_T0": "L0", "L0": "cell"},
        },
        "label_hierarchy",
        r"L0_T1.*missing from the map",
    ),
    (
        "hierarchy_leaf_without_cells",
        lambda a: _semi(a),
        {
            "labels_key": "ct",
            "unlabeled_category": "Unknown",
            "label_hierarchy": {**_TREE, "L0_T2": "L0"},
        },
        "label_hierarchy",
        r"L0_T2.*no cell",
    ),
    (
        "label_hierarchy_not_a_mapping",
        lambda a: _semi(a),
        {"labels_key": "ct", "unlabeled_category": "Unknown", "label_hierarchy": ["L0_T0", "L0"]},
        "label_hierarchy",
        r"list",
    ),
]


@pytest.mark.parametrize(
    "mutate,kwargs,field,value",
    [c[1:] for c in SCANVI_SETUP_CASES],
    ids=[c[0] for c in SCANVI_SETUP_CASES],
)
def test_scanvi_setup_rejects(adata, mutate, kwargs, field, value, no_compute):
    a = mutate(adata)
    with pytest.raises(InputError) as e:
        SCANVI.setup_anndata(a, **kwargs)
    assert_clear(e.value, field, value)


def test_scanvi_single_labelled_class_refused_before_compiling(adata, no_compute):
    a = _semi(adata, classes="L0_T0")  # every labelled cell is the same type
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown")
    with pytest.raises(InputError) as e:
        SCANVI(a, **ARCH)
    # caught when the config is built (n_labels=1) or by the label check
    field = e.value.field
    assert field in ("labels", "labels_key", "adata.obs['ct']"), str(e.value)
    assert_clear(e.value, field)
    assert re.search(r"two", str(e.value)), str(e.value)


def test_scanvi_on_scvi_setup_refused(adata, no_compute):
    SCVI.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(InputError) as e:
        SCANVI(adata, **ARCH)
    assert_clear(e.value, "adata", "unlabeled_category")


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        ({"y_prior": [0.5, 0.3, 0.2]}, "y_prior", r"0\.5"),
        ({"y_prior": [1.0, 0.0]}, "y_prior", r"0\.0"),
        ({"class_chunk_size": 0}, "class_chunk_size", r"0"),
    ],
    ids=["y_prior_wrong_length", "y_prior_zero", "class_chunk_size_zero"],
)
def test_scanvi_construction_rejects(adata, kwargs, field, value, no_compute):
    a = _semi(adata)
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown")
    with pytest.raises(InputError) as e:
        SCANVI(a, **ARCH, **kwargs)
    assert_clear(e.value, field, value)


def test_scanvi_unknown_classifier_parameter(adata, no_compute):
    a = _semi(adata)
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown")
    with pytest.raises(InputError) as e:
        SCANVI(a, **ARCH, classifier_parameters={"n_hiden": 8})
    assert_clear(e.value, "classifier_parameters", "n_hiden")


@pytest.fixture(scope="module")
def scanvi_model(base_atlas):
    a = _semi(base_atlas.copy())
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown", batch_key="batch")
    return a, SCANVI(a, **ARCH)


def test_scanvi_query_with_unseen_label_categories(scanvi_model, no_compute):
    a, model = scanvi_model
    q = a.copy()
    ct = q.obs["ct"].to_numpy().copy()
    ct[50:55] = "NewType"
    q.obs["ct"] = ct
    for call in (lambda: model.get_latent_representation(adata=q), lambda: model.predict(adata=q)):
        with pytest.raises(InputError) as e:
            call()
        assert_clear(e.value, "adata.obs['ct']", r"NewType")
        assert e.value.value == ["NewType"]


def test_scanvi_query_without_label_column_is_all_unlabelled(scanvi_model):
    from jaxscanvi.data.cells import cell_data

    a, model = scanvi_model
    q = a.copy()
    del q.obs["ct"]
    cells = cell_data(q, model.registry)
    assert (cells.labels == model.registry.n_labels).all()


def test_scanvi_query_with_unseen_batch(scanvi_model, no_compute):
    a, model = scanvi_model
    q = a.copy()
    q.obs["batch"] = q.obs["batch"].astype(str).replace("batch0", "batchX")
    with pytest.raises(InputError) as e:
        model.get_latent_representation(adata=q)
    assert_clear(e.value, "adata.obs['batch']", "batchX")


SCANVI_TRAIN_CASES = [
    ("n_samples_per_label_zero", {"n_samples_per_label": 0}, "n_samples_per_label", "0"),
    (
        "unknown_objective",
        {"plan_kwargs": {"objective": "supervised"}},
        "plan_kwargs['objective']",
        "supervised",
    ),
    ("max_epochs_zero", {"max_epochs": 0}, "max_epochs", "0"),
    ("batch_size_zero", {"batch_size": 0}, "batch_size", "0"),
    ("train_size_zero", {"train_size": 0.0}, "train_size", r"0\.0"),
]


@pytest.mark.parametrize(
    "kwargs,field,value",
    [c[1:] for c in SCANVI_TRAIN_CASES],
    ids=[c[0] for c in SCANVI_TRAIN_CASES],
)
def test_scanvi_train_rejects(scanvi_model, kwargs, field, value, no_compute):
    _, model = scanvi_model
    kw = {"max_epochs": 1, "progress_bar": False, **kwargs}
    with pytest.raises(InputError) as e:
        model.train(**kw)
    assert_clear(e.value, field, value)


# ------------------------------------------------------------------ train()
@pytest.fixture(scope="module")
def scvi_model(base_atlas):
    a = base_atlas.copy()
    SCVI.setup_anndata(a, batch_key="batch")
    return SCVI(a, **ARCH)


TRAIN_CASES = [
    ("batch_size_zero", {"batch_size": 0}, "batch_size", r"0"),
    ("batch_size_negative", {"batch_size": -4}, "batch_size", r"-4"),
    ("batch_size_float", {"batch_size": 64.0}, "batch_size", r"64\.0"),
    ("batch_size_bool", {"batch_size": True}, "batch_size", r"True"),
    ("max_epochs_zero", {"max_epochs": 0}, "max_epochs", r"0"),
    ("max_epochs_negative", {"max_epochs": -1}, "max_epochs", r"-1"),
    ("max_epochs_float", {"max_epochs": 2.5}, "max_epochs", r"2\.5"),
    ("train_size_zero", {"train_size": 0}, "train_size", r"0"),
    ("train_size_negative", {"train_size": -0.1}, "train_size", r"-0\.1"),
    ("train_size_above_one", {"train_size": 1.5}, "train_size", r"1\.5"),
    ("train_size_string", {"train_size": "0.9"}, "train_size", r"0\.9"),
    ("validation_size_one", {"validation_size": 1.0}, "validation_size", r"1\.0"),
    ("validation_size_negative", {"validation_size": -0.2}, "validation_size", r"-0\.2"),
    (
        "train_plus_validation_above_one",
        {"train_size": 0.8, "validation_size": 0.3},
        "validation_size",
        r"0\.3",
    ),
    (
        "unknown_plan_kwarg",
        {"plan_kwargs": {"learning_rate": 1e-3}},
        "plan_kwargs",
        r"learning_rate",
    ),
    ("lr_zero", {"plan_kwargs": {"lr": 0.0}}, "plan_kwargs['lr']", r"0\.0"),
    ("lr_negative", {"plan_kwargs": {"lr": -1e-3}}, "plan_kwargs['lr']", r"-0\.001"),
    ("lr_string", {"plan_kwargs": {"lr": "1e-3"}}, "plan_kwargs['lr']", r"1e-3"),
    ("on_nonfinite_unknown", {"on_nonfinite": "ignore"}, "on_nonfinite", r"ignore"),
    (
        "loss_weights_unknown_term",
        {"loss_terms": {"l2": lambda o, b, p: 0.0}, "loss_weights": {"l1": 2.0}},
        "loss_weights",
        r"l1",
    ),
    ("loss_term_not_a_function", {"loss_terms": {"l2": 3.0}}, "loss_terms['l2']", r"float"),
    ("loss_terms_not_a_dict", {"loss_terms": [len]}, "loss_terms", r"list"),
    (
        "loss_weight_not_a_number",
        {"loss_terms": {"l2": lambda o, b, p: 0.0}, "loss_weights": {"l2": "high"}},
        "loss_weights['l2']",
        r"high",
    ),
    ("loss_weights_without_loss_terms", {"loss_weights": {"l2": 1.0}}, "loss_weights", r"l2"),
    ("resume_without_checkpoint_dir", {"resume": True}, "resume", r"True"),
    ("data_source_unknown", {"data_source": "gpu"}, "data_source", r"gpu"),
    ("data_source_stream_for_data_in_memory", {"data_source": "stream"}, "data_source", r"stream"),
    ("devices_more_than_there_are", {"devices": 64}, "devices", r"64"),
    ("devices_unknown", {"devices": "gpus"}, "devices", r"gpus"),
    ("data_shards_zero", {"data_shards": 0}, "data_shards", r"0"),
    (
        "batch_size_not_split_by_data_shards",
        {"batch_size": 127, "data_shards": 2},
        "batch_size",
        r"127",
    ),
]


@pytest.mark.parametrize(
    "kwargs,field,value", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_train_rejects(scvi_model, kwargs, field, value, no_compute):
    kw = {"max_epochs": 1, "progress_bar": False, **kwargs}
    params_before = scvi_model.params
    with pytest.raises(InputError) as e:
        scvi_model.train(**kw)
    assert_clear(e.value, field, value)
    assert scvi_model.params is params_before and not scvi_model.is_trained


INFERENCE_CASES = [
    (
        "indices_out_of_range",
        lambda m: m.get_latent_representation(indices=[0, 500]),
        "indices",
        r"500",
    ),
    ("negative_index", lambda m: m.get_latent_representation(indices=[-1]), "indices", r"-1"),
    ("batch_size_zero", lambda m: m.get_latent_representation(batch_size=0), "batch_size", r"0"),
    (
        "unknown_transform_batch",
        lambda m: m.get_normalized_expression(transform_batch="batch9"),
        "transform_batch",
        r"batch9",
    ),
    (
        "unknown_gene_list",
        lambda m: m.get_normalized_expression(gene_list=["nope"]),
        "gene_list",
        r"nope",
    ),
    (
        "bad_library_size",
        lambda m: m.get_normalized_expression(library_size=-1),
        "library_size",
        r"-1",
    ),
    ("n_samples_zero", lambda m: m.get_normalized_expression(n_samples=0), "n_samples", r"0"),
    ("n_mc_samples_zero", lambda m: m.get_marginal_ll(n_mc_samples=0), "n_mc_samples", r"0"),
]


@pytest.mark.parametrize(
    "call,field,value", [c[1:] for c in INFERENCE_CASES], ids=[c[0] for c in INFERENCE_CASES]
)
def test_inference_rejects(scvi_model, call, field, value, monkeypatch):
    # _map itself validates indices, so only the jitted kernel is a tripwire here
    def tripwire(*a, **k):
        raise CompiledTooEarly("a jitted kernel ran before the input was validated")

    monkeypatch.setattr(compiled_functions, "get", lambda spec, build: tripwire)
    with pytest.raises(InputError) as e:
        call(scvi_model)
    assert_clear(e.value, field, value)


def test_save_anndata_without_adata(tmp_path, scvi_model, no_compute):
    m = SCVI.__new__(SCVI)
    m.__dict__.update(scvi_model.__dict__)
    m.adata = None
    with pytest.raises(InputError) as e:
        m.save(tmp_path / "m", save_anndata=True)
    assert_clear(e.value, "save_anndata", "True")
    assert not (tmp_path / "m").exists()

"""Parity with scvi-tools through weight import (skipped without scvi-tools).

See tests/parity.py for what is compared and how.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.scvi_tools  # CI's parity step runs every test so marked

if importlib.util.find_spec("scvi") is None or importlib.util.find_spec("torch") is None:
    pytest.skip(
        "scvi-tools and torch are not installed (pip install 'jaxscanvi[compare]')",
        allow_module_level=True,
    )

from parity import (
    CURVE_TOL,
    SCANVI_CASES,
    TOL,
    Z_MAX,
    compare,
    compare_posterior,
    load_pair,
    train_scvi_tools,
    training_curves,
)

CASE_NAMES = [
    "scvi_default",
    "scvi_nb_learned_library",
    "scvi_poisson_layernorm",
    "scanvi",
    "scvi_query",
    "scanvi_query",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return train_scvi_tools(tmp_path_factory.mktemp("scvi_tools"), epochs=3)


@pytest.fixture(scope="module")
def pairs(folders):
    """Each case loaded once by scvi-tools and imported once by us."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = load_pair(folders[case], case)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASE_NAMES)
def test_imported_model_matches_scvi_tools(folders, pairs, case):
    r = compare(folders[case], case, pairs(case))
    worst = {k: v for k, v in r["max_rel_diff"].items() if not v <= TOL}
    assert not worst, f"{case}: differences above {TOL}: {worst}"
    # every quantity the issue names was compared
    names = set(r["max_rel_diff"])
    assert {
        "latent_mean",
        "px_scale",
        "reconstruction_loss",
        "kl_local",
        "elbo_per_cell",
        "reconstruction_loss_sparse",
        "get_latent_representation",
    } <= names
    if case in SCANVI_CASES:
        assert r["predict_agreement"] == 1.0
        assert {"classifier_logits", "predict_soft"} <= names


def test_query_models_keep_the_reference_batches(pairs):
    """The imported surgery models know the reference's batches, then the
    query's, in scvi-tools' order, and their weights have a column for each."""
    ref_batches = list(pairs("scvi_default")[1].registry.batch_categories)
    for case in ("scvi_query", "scanvi_query"):
        theirs, ours = pairs(case)
        cats = [
            str(c) for c in theirs.adata_manager.get_state_registry("batch")["categorical_mapping"]
        ]
        assert list(ours.registry.batch_categories) == cats
        assert cats[: len(ref_batches)] == ref_batches and len(cats) == 2 * len(ref_batches)
        assert ours.module.config.n_batch == len(cats)
        query_batches = set(np.asarray(ours.adata.obs["batch"]).astype(str))
        assert query_batches == set(cats[len(ref_batches) :])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_posterior_summaries_match_scvi_tools(folders, pairs, case):
    """get_elbo, get_reconstruction_error and get_marginal_ll (per cell and
    mean) through both libraries' methods: exact at the posterior means, and
    unbiased against each other when sampled."""
    r = compare_posterior(folders[case], case, pair=pairs(case))
    assert set(r["max_rel_diff"]) == {
        "get_elbo_per_cell",
        "get_elbo",
        "get_reconstruction_error_per_cell",
        "get_reconstruction_error",
        "get_marginal_ll_per_cell",
        "get_marginal_ll",
    }
    worst = {k: v for k, v in r["max_rel_diff"].items() if not v <= TOL}
    assert not worst, f"{case}: differences above {TOL}: {worst}"
    big = {k: v for k, v in r["z"].items() if not abs(v) <= Z_MAX}
    assert not big, f"{case}: sampled estimates differ by more than {Z_MAX} s.e.: {big}"


@pytest.mark.parametrize("scanvi", [False, True], ids=["scvi", "scanvi"])
def test_training_from_the_same_weights_tracks_scvi_tools(tmp_path, scanvi):
    r = training_curves(tmp_path, epochs=5, scanvi=scanvi)
    theirs = np.asarray(r["elbo_train_scvi_tools"])
    ours = np.asarray(r["elbo_train_jaxscanvi"])
    assert len(theirs) == len(ours) == 5
    # training happened on both sides: the negative ELBO fell every epoch
    assert (np.diff(theirs) < 0).all() and (np.diff(ours) < 0).all()
    assert r["max_rel_diff"] <= CURVE_TOL, r


def test_import_refuses_wrong_model_class(folders):
    import jaxscanvi as js

    with pytest.raises(js.ModelFormatError, match="SCANVI"):
        js.SCVI.from_scvi_tools(folders["scanvi"])

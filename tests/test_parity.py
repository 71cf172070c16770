"""Parity with scvi-tools through weight import (skipped without scvi-tools).

See tests/parity.py for what is compared and how.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("scvi") is None or importlib.util.find_spec("torch") is None:
    pytest.skip("scvi-tools and torch are not installed (pip install "
                "'jaxscanvi[compare]')", allow_module_level=True)

from parity import TOL, compare, train_scvi_tools  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return train_scvi_tools(tmp_path_factory.mktemp("scvi_tools"), epochs=3)


@pytest.mark.parametrize("case", ["scvi_default", "scvi_nb_learned_library",
                                  "scvi_poisson_layernorm", "scanvi"])
def test_imported_model_matches_scvi_tools(folders, case):
    r = compare(folders[case], case)
    worst = {k: v for k, v in r["max_rel_diff"].items() if not v <= TOL}
    assert not worst, f"{case}: differences above {TOL}: {worst}"
    # every quantity the issue names was compared
    names = set(r["max_rel_diff"])
    assert {"latent_mean", "px_scale", "reconstruction_loss", "kl_local",
            "elbo_per_cell"} <= names
    if case == "scanvi":
        assert r["predict_agreement"] == 1.0
        assert "classifier_logits" in names


def test_import_refuses_wrong_model_class(folders):
    import jaxscanvi as js
    with pytest.raises(js.ModelFormatError, match="SCANVI"):
        js.SCVI.from_scvi_tools(folders["scanvi"])

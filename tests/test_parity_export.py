"""Models written with ``save(format="scvi-tools")`` open in scvi-tools with the
same outputs (skipped without scvi-tools and torch).

Both ways round: scvi-tools' fixtures (tests/fixtures/scvi_tools) -> jaxscanvi
-> scvi-tools, and models trained here -> scvi-tools.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.scvi_tools  # CI's parity step runs every test so marked

if importlib.util.find_spec("scvi") is None or importlib.util.find_spec("torch") is None:
    pytest.skip(
        "scvi-tools and torch are not installed (pip install 'jaxscanvi[compare]')",
        allow_module_level=True,
    )

import numpy as np

import jaxscanvi as js

F = Path(__file__).parent / "fixtures" / "scvi_tools"
sys.path.insert(0, str(F.parent))
from make_scvi_tools_fixtures import make_adata

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def quiet():
    for name in ("scvi", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _theirs(folder, scanvi: bool):
    import scvi

    return (scvi.model.SCANVI if scanvi else scvi.model.SCVI).load(str(folder))


def _same(ours_z, ours_pred, ours_soft, theirs, scanvi: bool):
    np.testing.assert_allclose(theirs.get_latent_representation(), ours_z, rtol=0, atol=TOL)
    if scanvi:
        assert (np.asarray(theirs.predict()).astype(str) == np.asarray(ours_pred)).all()
        np.testing.assert_allclose(
            np.asarray(theirs.predict(soft=True)), ours_soft, rtol=0, atol=TOL
        )


@pytest.mark.parametrize(
    "name,key", [("scvi", "scvi"), ("scanvi", "scanvi"), ("scanvi_query", "query")]
)
def test_scvi_tools_to_jaxscanvi_to_scvi_tools(tmp_path, name, key):
    import anndata as ad

    out = np.load(F / "outputs.npz")
    scanvi = name != "scvi"
    cls = js.SCANVI if scanvi else js.SCVI
    adata = None if name != "scanvi" else ad.read_h5ad(F / "scvi" / "adata.h5ad")
    cls.load(F / name, adata=adata).save(tmp_path / name, format="scvi-tools", save_anndata=True)
    theirs = _theirs(tmp_path / name, scanvi)
    _same(out[f"{key}_latent"], out.get(f"{key}_predict"), out.get(f"{key}_soft"), theirs, scanvi)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("SCVI", {}),
        (
            "SCANVI",
            dict(
                n_layers=2,
                gene_likelihood="nb",
                dispersion="gene-batch",
                use_observed_lib_size=False,
                encode_covariates=True,
            ),
        ),
    ],
)
def test_trained_here_opens_in_scvi_tools(tmp_path, kind, kwargs):
    adata = make_adata(200, ["b0", "b1"], seed=3)
    cls = getattr(js, kind)
    setup = dict(
        batch_key="batch",
        categorical_covariate_keys=["site"],
        continuous_covariate_keys=["percent_mito"],
    )
    if kind == "SCANVI":
        cls.setup_anndata(adata, labels_key="label", unlabeled_category="Unknown", **setup)
    else:
        cls.setup_anndata(adata, **setup)
    model = cls(adata, n_hidden=16, n_latent=4, **kwargs)
    init = np.array(model.params["z_encoder"]["mean"]["kernel"])
    model.train(max_epochs=3, progress_bar=False)
    before = model.get_latent_representation()
    # it trained: three finite epochs that moved the weights
    assert np.isfinite(model.history["train_loss"].to_numpy()).sum() == 3
    assert np.abs(np.asarray(model.params["z_encoder"]["mean"]["kernel"]) - init).max() > 1e-3
    model.temperature = 1.0  # scvi-tools has no temperature (save warns)
    model.save(tmp_path / "m", format="scvi-tools", save_anndata=True)
    scanvi = kind == "SCANVI"
    theirs = _theirs(tmp_path / "m", scanvi)
    _same(
        before,
        model.predict() if scanvi else None,
        np.asarray(model.predict(soft=True)) if scanvi else None,
        theirs,
        scanvi,
    )

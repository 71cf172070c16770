"""scvi-tools model folders read without torch, and written back (tests/fixtures/scvi_tools).

The fixtures and their outputs were made by scvi-tools 1.4.2 with
tests/fixtures/make_scvi_tools_fixtures.py; here torch is blocked, so
every file is read by jaxscanvi.torchfile alone.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
import warnings
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import jaxscanvi as js
from jaxscanvi import torchfile

F = Path(__file__).parent / "fixtures" / "scvi_tools"
TOL = 1e-5


@pytest.fixture(autouse=True)
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails


@pytest.fixture(scope="module")
def outputs():
    return dict(np.load(F / "outputs.npz"))


@pytest.fixture(scope="module")
def ref_adata():
    return ad.read_h5ad(F / "scvi" / "adata.h5ad")


@pytest.fixture(scope="module")
def models(ref_adata):
    blocked = sys.modules.get("torch", "absent")
    sys.modules["torch"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {
                "scvi": js.SCVI.load(F / "scvi"),
                "scvi_legacy": js.SCVI.load(F / "scvi_legacy", adata=ref_adata.copy()),
                "scanvi": js.SCANVI.load(F / "scanvi"),
                "scanvi_query": js.SCANVI.load(F / "scanvi_query"),
            }
    finally:
        if blocked == "absent":
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = blocked


@pytest.mark.parametrize(
    "name,key",
    [("scvi", "scvi"), ("scvi_legacy", "scvi"), ("scanvi", "scanvi"), ("scanvi_query", "query")],
)
def test_scvi_tools_folder_gives_scvi_tools_outputs(models, outputs, ref_adata, name, key):
    model = models[name]
    data = ref_adata.copy() if name == "scanvi" else None  # saved without its AnnData
    if name == "scanvi":
        assert model.adata is None
    z = model.get_latent_representation(data)
    np.testing.assert_allclose(z, outputs[f"{key}_latent"], rtol=0, atol=TOL)
    if isinstance(model, js.SCANVI):
        assert (np.asarray(model.predict(data)).astype(str) == outputs[f"{key}_predict"]).all()
        np.testing.assert_allclose(
            np.asarray(model.predict(data, soft=True)), outputs[f"{key}_soft"], rtol=0, atol=TOL
        )


def test_registry_and_indices_come_from_the_folder(models, ref_adata):
    reg = models["scanvi"].registry
    assert reg.batch_categories == ("b0", "b1")
    assert reg.label_categories == ("T0", "T1", "T2") and reg.unlabeled_category == "Unknown"
    assert reg.categorical_covariate_categories == (("s1", "s2"),)
    assert reg.continuous_covariate_keys == ("percent_mito",)
    assert models["scanvi_query"].registry.batch_categories == ("b0", "b1", "b2")
    legacy, new = models["scvi_legacy"], models["scvi"]
    assert legacy.registry == new.registry
    assert len(new.train_indices) + len(new.validation_indices) == ref_adata.n_obs


def test_from_scvi_tools_is_the_same_import(models):
    again = js.SCVI.from_scvi_tools(F / "scvi")
    np.testing.assert_array_equal(
        again.get_latent_representation(), models["scvi"].get_latent_representation()
    )


def test_scvi_tools_folder_as_query_reference(models):
    query = ad.read_h5ad(F / "scanvi_query" / "adata.h5ad")
    names = js.SCANVI.prepare_query_anndata(query, F / "scanvi", return_reference_var_names=True)
    assert list(names) == list(models["scanvi"].registry.var_names)
    q = js.SCANVI.load_query_data(query, F / "scanvi")
    assert q.registry.batch_categories == ("b0", "b1", "b2")
    assert q.query_info.new_batches == ("b2",)
    ref = models["scanvi"].params["z_encoder"]["encoder"]["dense0"]["kernel"]
    np.testing.assert_array_equal(q.params["z_encoder"]["encoder"]["dense0"]["kernel"], ref)


# ------------------------------------------------------------ refusing pickles
@pytest.fixture
def trap(monkeypatch):
    """A module with a callable that records being called, and os.system patched."""
    calls = []
    mod = types.ModuleType("evil_mod")
    mod.boom = lambda *a: calls.append(a)
    monkeypatch.setitem(sys.modules, "evil_mod", mod)
    monkeypatch.setattr("os.system", lambda *a: calls.append(a))
    return calls


PAYLOADS = {
    "os_system": b"cos\nsystem\n(S'echo hacked'\ntR.",
    "posix_system": b"cposix\nsystem\n(S'echo hacked'\ntR.",
    "module_callable": b"cevil_mod\nboom\n(S'x'\ntR.",
    "builtins_eval": b"cbuiltins\neval\n(S'1'\ntR.",
    "builtins_getattr": b"cbuiltins\ngetattr\n(cbuiltins\ndict\nS'get'\ntR.",
    # a whitelisted container holding a forbidden callable's result
    "nested": b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01cevil_mod\nboom\nq\x02)Rq\x03s.",
}


def _torch_zip(path: Path, pkl: bytes, extra: dict | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_model_pt_naming_other_callables_is_refused(tmp_path, trap, payload):
    _torch_zip(tmp_path / "model.pt", PAYLOADS[payload])
    with pytest.raises(js.ModelFormatError, match=r"refers to .*not loaded") as e:
        js.SCVI.load(tmp_path)
    assert "Fix:" in str(e.value)
    assert trap == []  # nothing was called


@pytest.mark.parametrize("payload", ["os_system", "module_callable"])
def test_legacy_attr_pkl_naming_other_callables_is_refused(tmp_path, trap, payload):
    for name in ("model_params.pt", "var_names.csv"):
        (tmp_path / name).write_bytes((F / "scvi_legacy" / name).read_bytes())
    (tmp_path / "attr.pkl").write_bytes(PAYLOADS[payload])
    with pytest.raises(js.ModelFormatError, match="refers to"):
        js.SCVI.load(tmp_path)
    assert trap == []


@pytest.mark.parametrize(
    "item,match", [(b"cevil_mod\nboom\n)R", "refers to"), (b"}", "object array")]
)
def test_object_array_of_non_strings_is_refused(tmp_path, trap, item, match):
    # a numpy object array whose second item is a forbidden call's result, or a dict
    raw = pickle.dumps(np.array(["a", "zz"], dtype=object), protocol=2)
    assert raw.count(b"X\x02\x00\x00\x00zz") == 1
    _torch_zip(tmp_path / "model.pt", raw.replace(b"X\x02\x00\x00\x00zz", item))
    with pytest.raises(js.ModelFormatError, match=match):
        torchfile.load(tmp_path / "model.pt")
    assert trap == []


def test_storage_size_is_checked_before_reading(tmp_path):
    src = zipfile.ZipFile(F / "scvi" / "model.pt")
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as z:
        for info in src.infolist():
            data = src.read(info)
            z.writestr(info.filename, data[:-4] if info.filename.endswith("/data/1") else data)
    with pytest.raises(js.ModelFormatError, match=r"storage .*bytes"):
        js.SCVI.load(tmp_path, adata=ad.read_h5ad(F / "scvi" / "adata.h5ad"))


def test_compressed_storages_are_refused(tmp_path):
    # torch stores storages uncompressed; a compressed one could inflate without bound
    src = zipfile.ZipFile(F / "scvi" / "model.pt")
    with zipfile.ZipFile(tmp_path / "model.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    with pytest.raises(js.ModelFormatError, match="compressed"):
        js.SCVI.load(tmp_path, adata=ad.read_h5ad(F / "scvi" / "adata.h5ad"))


def test_ndarray_cannot_be_called_around_the_checks(tmp_path):
    # numpy.ndarray only names the class for _reconstruct; calling it is refused
    _torch_zip(tmp_path / "model.pt", b"cnumpy\nndarray\n(K\x02tR.")
    with pytest.raises(js.ModelFormatError, match="damaged or not a model file"):
        torchfile.load(tmp_path / "model.pt")


def test_not_a_torch_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02 not a zip")
    with pytest.raises(js.ModelFormatError, match=r"zip format.*Fix:"):
        js.SCVI.load(tmp_path)


def test_wrong_class_is_named(ref_adata):
    with pytest.raises(js.ModelFormatError, match="SCANVI"):
        js.SCVI.load(F / "scanvi", adata=ref_adata.copy())


# ------------------------------------------------------------ writing back
def test_export_reads_back_exactly(models, tmp_path):
    q = models["scanvi_query"]
    q.save(tmp_path / "out", format="scvi-tools", save_anndata=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adata.h5ad", "model.pt"]
    saved = torchfile.load(tmp_path / "out" / "model.pt")
    theirs = torchfile.load(F / "scanvi_query" / "model.pt")
    # the same state dict keys and shapes scvi-tools wrote
    shapes = {k: np.shape(v) for k, v in saved["model_state_dict"].items()}
    assert shapes == {k: np.shape(v) for k, v in theirs["model_state_dict"].items()}
    assert saved["attr_dict"]["registry_"]["model_name"] == "SCANVI"
    back = js.SCANVI.load(tmp_path / "out")
    np.testing.assert_array_equal(back.get_latent_representation(), q.get_latent_representation())
    np.testing.assert_array_equal(back.predict(soft=True), q.predict(soft=True))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        q.save(tmp_path / "out", format="scvi-tools")


def test_export_warns_that_the_temperature_is_dropped(models, tmp_path):
    m = models["scanvi"]
    m.temperature = 2.0
    try:
        with pytest.warns(UserWarning, match="temperature"):
            m.save(tmp_path / "t", format="scvi-tools")
    finally:
        m.temperature = 1.0


def test_unknown_save_format(models, tmp_path):
    with pytest.raises(js.InputError, match=r"format.*Fix:"):
        models["scvi"].save(tmp_path / "x", format="torch")


def test_torchfile_round_trip_keeps_dtypes_and_shapes(tmp_path):
    arrays = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.array(7, np.int64),
        "b": np.array([True, False]),
        "e": np.zeros((0, 3), np.float64),
    }
    torchfile.save({k: torchfile.Tensor(v) for k, v in arrays.items()}, tmp_path / "a.pt")
    back = torchfile.load(tmp_path / "a.pt")
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    buf = io.BytesIO((tmp_path / "a.pt").read_bytes())
    with zipfile.ZipFile(buf) as z:  # storages aligned as torch aligns them
        for info in z.infolist():
            if "/data/" in info.filename:
                start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                assert start % 64 == 0

"""Model folders: save/load round trips, refusals, foreign or damaged folders, atomicity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import pandas as pd
import pytest

from jaxscanvi import (
    FORMAT_VERSION,
    SCANVI,
    SCVI,
    InputError,
    ModelFormatError,
    io,
    synthetic_atlas,
)
from jaxscanvi.data.registry import UNS_KEY

ARCH = dict(n_hidden=16, n_latent=4)


def tiny_atlas() -> ad.AnnData:
    return synthetic_atlas(
        n_cells=120,
        n_genes=40,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=5,
    )


@pytest.fixture(scope="module")
def base_atlas():
    return tiny_atlas()


@pytest.fixture(scope="module")
def trained(base_atlas):
    a = base_atlas.copy()
    SCVI.setup_anndata(a, batch_key="batch")
    m = SCVI(a, **ARCH)
    m.train(max_epochs=2, batch_size=64, progress_bar=False)
    return m


@pytest.fixture(scope="module")
def trained_z(trained):
    return trained.get_latent_representation()


@pytest.fixture(scope="module")
def other(base_atlas):
    """Same data and architecture, different (untrained, seed 1) parameters."""
    a = base_atlas.copy()
    SCVI.setup_anndata(a, batch_key="batch")
    return SCVI(a, **ARCH, seed=1)


@pytest.fixture(scope="module")
def other_z(other, trained_z):
    z = other.get_latent_representation()
    assert not np.array_equal(z, trained_z)  # else the atomicity tests prove nothing
    return z


@pytest.fixture
def query(base_atlas):
    return base_atlas.copy()


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """A pristine save of the trained model; tests copy it before damaging it."""
    d = tmp_path_factory.mktemp("saved") / "model"
    trained.save(d)
    return d


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(saved, d)
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


# --------------------------------------------------------------- round trips
def test_roundtrip_is_bit_identical(trained, trained_z, saved, query):
    m = SCVI.load(saved, adata=query)
    assert isinstance(m, SCVI)
    assert np.array_equal(m.get_latent_representation(), trained_z)
    assert leaves_equal(m.params, trained.params)
    assert leaves_equal(m.state, trained.state)
    assert m.registry == trained.registry
    assert m.module.config == trained.module.config
    assert m.is_trained is True
    assert np.array_equal(m.train_indices, trained.train_indices)
    assert np.array_equal(m.validation_indices, trained.validation_indices)
    assert m.init_seed == trained.init_seed
    pd.testing.assert_frame_equal(
        m.history.to_frame(), trained.history.to_frame(), check_dtype=False
    )
    assert m.history.n_epochs == 2


def test_saved_folder_is_pickle_free_and_described(saved):
    meta = json.loads((saved / "metadata.json").read_text())
    assert meta["format"] == io.FORMAT_TAG
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model_class"] == "SCVI"
    names = {p.name for p in saved.iterdir()}
    assert names == {"metadata.json"} | {f["file"] for f in meta["files"].values()}
    for p in saved.iterdir():
        assert not p.name.endswith((".pkl", ".pt", ".pickle", ".tmp"))
    for entry in meta["files"].values():
        assert io.sha256((saved / entry["file"]).read_bytes()) == entry["sha256"]


def test_load_without_adata(trained_z, saved, query):
    m = SCVI.load(saved)
    assert m.adata is None
    with pytest.raises(InputError, match=r"adata=None.*loaded without data.*Fix:"):
        m.get_latent_representation()
    assert np.array_equal(m.get_latent_representation(adata=query), trained_z)


def test_load_marks_the_given_adata_as_set_up(saved, query, trained):
    query.uns.pop(UNS_KEY, None)
    SCVI.load(saved, adata=query)
    assert json.loads(query.uns[UNS_KEY]) == json.loads(trained.registry.to_json())


def test_save_anndata_and_load_it(trained, trained_z, tmp_path):
    d = tmp_path / "with_adata"
    trained.save(d, save_anndata=True)
    meta = json.loads((d / "metadata.json").read_text())
    assert "adata" in meta["files"] and meta["files"]["adata"]["file"].endswith(".h5ad")
    m = SCVI.load(d)
    assert m.adata is not None
    assert list(m.adata.obs_names) == list(trained.adata.obs_names)
    assert list(m.adata.var_names) == list(trained.adata.var_names)
    assert np.array_equal(m.get_latent_representation(), trained_z)


def test_given_adata_wins_over_saved_adata(trained, trained_z, tmp_path, query):
    d = tmp_path / "with_adata"
    trained.save(d, save_anndata=True)
    sub = query[:30].copy()
    m = SCVI.load(d, adata=sub)
    assert m.adata is sub
    # a different cell count compiles a different padded program: equal up to rounding
    np.testing.assert_allclose(m.get_latent_representation(), trained_z[:30], rtol=1e-5, atol=1e-6)


def test_scanvi_roundtrip_and_wrong_class(base_atlas, tmp_path, saved):
    a = base_atlas.copy()
    ct = a.obs["cell_type"].astype(str).to_numpy().copy()
    ct[:40] = "Unknown"
    a.obs["ct"] = ct
    SCANVI.setup_anndata(a, labels_key="ct", unlabeled_category="Unknown", batch_key="batch")
    s = SCANVI(a, **ARCH)
    d = tmp_path / "scanvi"
    s.save(d)
    with pytest.raises(
        ModelFormatError,
        match=r"holds a SCANVI model, not a SCVI.*"
        r"SCANVI\.load",
    ):
        SCVI.load(d, adata=a)
    with pytest.raises(
        ModelFormatError,
        match=r"holds a SCVI model, not a SCANVI.*"
        r"SCVI\.load",
    ):
        SCANVI.load(saved)
    m = SCANVI.load(d, adata=a)
    assert m.registry.label_categories == s.registry.label_categories
    assert m.registry.unlabeled_category == "Unknown"
    assert m.was_pretrained is False
    assert np.array_equal(m.get_latent_representation(), s.get_latent_representation())


# ---------------------------------------------------------- overwrite rules
def test_save_refuses_to_overwrite(trained, other, trained_z, saved, copy_of_saved, query):
    before = snapshot(copy_of_saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(copy_of_saved)
    assert snapshot(copy_of_saved) == before
    assert np.array_equal(
        SCVI.load(copy_of_saved, adata=query).get_latent_representation(), trained_z
    )


def test_refused_save_with_anndata_leaves_folder_untouched(other, copy_of_saved):
    before = snapshot(copy_of_saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(copy_of_saved, save_anndata=True)
    assert snapshot(copy_of_saved) == before, (
        f"a refused save left files behind: {sorted(set(snapshot(copy_of_saved)) - set(before))}"
    )


def test_overwrite_replaces_and_cleans_up(other, other_z, copy_of_saved, query):
    old_files = set(snapshot(copy_of_saved))
    other.save(copy_of_saved, overwrite=True)
    m = SCVI.load(copy_of_saved, adata=query)
    assert np.array_equal(m.get_latent_representation(), other_z)
    assert m.is_trained is False and m.history.n_epochs == 0
    meta = json.loads((copy_of_saved / "metadata.json").read_text())
    names = {p.name for p in copy_of_saved.iterdir()}
    # the old parameter file is gone; only what metadata lists remains
    assert names == {"metadata.json"} | {f["file"] for f in meta["files"].values()}
    assert names != old_files


def test_overwrite_without_anndata_drops_the_old_one(trained, other, tmp_path):
    d = tmp_path / "m"
    trained.save(d, save_anndata=True)
    other.save(d, overwrite=True)
    assert not any(p.name.endswith(".h5ad") for p in d.iterdir())
    assert SCVI.load(d).adata is None


def test_save_onto_a_file_is_refused(trained, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("hello")
    with pytest.raises(FileExistsError):
        trained.save(f)
    assert f.read_text() == "hello"


def test_save_same_model_twice_with_overwrite_is_stable(trained, trained_z, tmp_path, query):
    d = tmp_path / "m"
    trained.save(d)
    first = snapshot(d)
    trained.save(d, overwrite=True)
    assert snapshot(d) == first  # content-addressed: the same bytes, the same files
    assert np.array_equal(SCVI.load(d, adata=query).get_latent_representation(), trained_z)


# ------------------------------------------------------ foreign / damaged folders
def _edit_meta(d: Path, fn):
    meta = json.loads((d / "metadata.json").read_text())
    fn(meta)
    # re-signed, so that what is tested is the check of the edited field
    (d / "metadata.json").write_text(json.dumps(io.sign(meta)))


def _variables_file(d: Path) -> Path:
    meta = json.loads((d / "metadata.json").read_text())
    return d / meta["files"]["variables"]["file"]


def _flip_a_byte(d: Path):
    p = _variables_file(d)
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _replace_blob(d: Path, data: bytes):
    p = _variables_file(d)
    p.write_bytes(data)
    _edit_meta(d, lambda m: m["files"]["variables"].update(sha256=io.sha256(data)))


def _wrong_shapes(d: Path):
    from flax import serialization

    raw = serialization.msgpack_restore(_variables_file(d).read_bytes())

    def shrink(t):
        if isinstance(t, dict):
            return {k: shrink(v) for k, v in t.items()}
        a = np.asarray(t)
        return a[..., :1] if a.ndim and a.shape[-1] > 1 else a

    _replace_blob(d, serialization.msgpack_serialize(shrink(raw)))


FOREIGN = [
    # id, how to damage a copy of a good save, error type, message regex
    (
        "empty_folder",
        lambda d: [p.unlink() for p in d.iterdir()],
        ModelFormatError,
        r"not a jaxscanvi model folder.*metadata\.json",
    ),
    (
        "scvi_tools_folder",
        lambda d: (
            [p.unlink() for p in d.iterdir()],
            (d / "model.pt").write_bytes(b"\x80\x02torch"),
        ),
        ModelFormatError,
        r"scvi-tools",
    ),
    (
        "truncated_metadata",
        lambda d: (d / "metadata.json").write_text((d / "metadata.json").read_text()[:40]),
        ModelFormatError,
        r"damaged \(not valid JSON.*Fix:",
    ),
    (
        "metadata_not_an_object",
        lambda d: (d / "metadata.json").write_text("[1, 2]"),
        ModelFormatError,
        r"not a jaxscanvi model folder",
    ),
    (
        "wrong_format_tag",
        lambda d: _edit_meta(d, lambda m: m.update(format="other")),
        ModelFormatError,
        r"not a jaxscanvi model folder.*'other'",
    ),
    (
        "newer_format_version",
        lambda d: _edit_meta(d, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
        ModelFormatError,
        rf"format {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}.*Fix: upgrade",
    ),
    (
        "format_version_not_int",
        lambda d: _edit_meta(d, lambda m: m.update(format_version="1")),
        ModelFormatError,
        r"model format '1'",
    ),
    (
        "format_version_missing",
        lambda d: _edit_meta(d, lambda m: m.pop("format_version")),
        ModelFormatError,
        r"model format None",
    ),
    ("corrupted_blob", _flip_a_byte, ModelFormatError, r"does not match its checksum.*Fix:"),
    ("missing_blob", lambda d: _variables_file(d).unlink(), ModelFormatError, r"is missing.*Fix:"),
    (
        "no_variables_entry",
        lambda d: _edit_meta(d, lambda m: m["files"].pop("variables")),
        ModelFormatError,
        r"names no 'variables' file",
    ),
    (
        "no_registry",
        lambda d: _edit_meta(d, lambda m: m.pop("registry")),
        ModelFormatError,
        r"metadata is damaged",
    ),
    (
        "registry_unknown_field",
        lambda d: _edit_meta(d, lambda m: m["registry"].update(colour="red")),
        ModelFormatError,
        r"colour",
    ),
    (
        "config_unknown_field",
        lambda d: _edit_meta(d, lambda m: m["config"].update(n_heads=4)),
        ModelFormatError,
        r"n_heads",
    ),
    (
        "config_invalid_value",
        lambda d: _edit_meta(d, lambda m: m["config"].update(dispersion="per-cell")),
        ModelFormatError,
        r"damaged.*per-cell",
    ),
    (
        "no_model_class",
        lambda d: _edit_meta(d, lambda m: m.pop("model_class")),
        ModelFormatError,
        r"holds a None model",
    ),
    ("blob_with_wrong_shapes", _wrong_shapes, ModelFormatError, r"wrong shapes"),
    (
        "blob_not_msgpack",
        lambda d: _replace_blob(d, b"definitely not msgpack"),
        ModelFormatError,
        r"do not fit this model",
    ),
    (
        "blob_wrong_structure",
        lambda d: _replace_blob(d, io.to_bytes({"params": {"x": np.zeros(3)}})),
        ModelFormatError,
        r"do not fit this model",
    ),
]


@pytest.mark.parametrize(
    "damage,exc,pattern", [c[1:] for c in FOREIGN], ids=[c[0] for c in FOREIGN]
)
def test_load_refuses_foreign_or_damaged(copy_of_saved, query, damage, exc, pattern):
    damage(copy_of_saved)
    with pytest.raises(exc, match=pattern) as e:
        SCVI.load(copy_of_saved, adata=query)
    assert type(e.value) is exc  # not a stray KeyError/TypeError wrapped in something


def test_load_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*Fix:"):
        SCVI.load(tmp_path / "nowhere")


def test_load_a_file(tmp_path):
    f = tmp_path / "model.json"
    f.write_text("{}")
    with pytest.raises(ModelFormatError, match=r"is a file, not a model folder"):
        SCVI.load(f)


def test_load_with_damaged_saved_anndata(trained, tmp_path):
    d = tmp_path / "m"
    trained.save(d, save_anndata=True)
    h5 = next(p for p in d.iterdir() if p.name.endswith(".h5ad"))
    h5.write_bytes(h5.read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(ModelFormatError, match=r"missing or damaged"):
        SCVI.load(d)


def test_scvi_tools_hint_names_an_existing_function(tmp_path):
    import jaxscanvi

    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    with pytest.raises(ModelFormatError) as e:
        SCVI.load(tmp_path)
    msg = str(e.value)
    if "from_scvi_tools" in msg:
        assert hasattr(jaxscanvi, "from_scvi_tools") or hasattr(SCVI, "from_scvi_tools"), (
            f"the hint names from_scvi_tools(...), which jaxscanvi does not have: {msg}"
        )


# ------------------------------------------------------------ adata checks on load
def test_load_with_different_genes(saved, query):
    with pytest.raises(InputError, match=r"adata\.var_names.*Fix:"):
        SCVI.load(saved, adata=query[:, 3:].copy())


def test_load_with_permuted_genes(saved, query):
    q = query[:, np.random.default_rng(0).permutation(query.n_vars)].copy()
    with pytest.raises(InputError, match=r"adata\.var_names.*order"):
        SCVI.load(saved, adata=q)


def test_load_with_renamed_genes(saved, query):
    q = query.copy()
    q.var_names = [f"x{g}" for g in q.var_names]
    with pytest.raises(InputError, match=r"40 of the model's 40 missing"):
        SCVI.load(saved, adata=q)


def test_load_with_unseen_batch(saved, query):
    query.obs["batch"] = query.obs["batch"].astype(str).replace("batch1", "batchZ")
    with pytest.raises(InputError, match=r"adata\.obs\['batch'\].*batchZ"):
        SCVI.load(saved, adata=query)


# --------------------------------------------------------------------- atomicity
class SimulatedCrash(Exception):
    pass


def _crash_on_call(monkeypatch, owner, name, n):
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise SimulatedCrash(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _assert_old_save_intact(d: Path, trained_z, adata=None):
    m = SCVI.load(d, adata=adata)
    assert np.array_equal(m.get_latent_representation(), trained_z)
    assert m.is_trained is True
    leftovers = [p.name for p in d.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


# (what to break, which call): every write of a blob or metadata, every rename, every
# fsync of a file that a save performs before metadata.json is replaced.
CRASHES = [
    ("atomic_write_bytes", 1),  # the parameter blob
    ("atomic_write_bytes", 2),  # metadata.json
    ("replace", 1),  # rename of the parameter blob
    ("replace", 2),  # rename of metadata.json
    ("fsync", 1),
    ("fsync", 2),
]


@pytest.mark.parametrize("name,n", CRASHES, ids=[f"{a}#{b}" for a, b in CRASHES])
def test_crash_mid_save_keeps_earlier_save(
    name, n, other, other_z, trained_z, copy_of_saved, query, monkeypatch
):
    owner = io if name == "atomic_write_bytes" else io.os
    calls = _crash_on_call(monkeypatch, owner, name, n)
    with pytest.raises(SimulatedCrash):
        other.save(copy_of_saved, overwrite=True)
    assert calls["n"] == n
    monkeypatch.undo()
    _assert_old_save_intact(copy_of_saved, trained_z, adata=query)
    # and the folder is not wedged: the next save goes through
    other.save(copy_of_saved, overwrite=True)
    assert np.array_equal(
        SCVI.load(copy_of_saved, adata=query).get_latent_representation(), other_z
    )


@pytest.mark.parametrize("n", [1, 2, 3], ids=["blob", "adata", "metadata"])
def test_crash_mid_save_with_anndata(n, trained, other, trained_z, tmp_path, monkeypatch):
    d = tmp_path / "m"
    trained.save(d, save_anndata=True)
    calls = _crash_on_call(monkeypatch, io.os, "replace", n)
    with pytest.raises(SimulatedCrash):
        other.save(d, overwrite=True, save_anndata=True)
    assert calls["n"] == n
    monkeypatch.undo()
    _assert_old_save_intact(d, trained_z)  # loads with its own saved AnnData


def test_crash_while_writing_anndata(other, trained_z, copy_of_saved, query, monkeypatch):
    def boom(self, *a, **k):
        raise SimulatedCrash("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(SimulatedCrash):
        other.save(copy_of_saved, overwrite=True, save_anndata=True)
    monkeypatch.undo()
    _assert_old_save_intact(copy_of_saved, trained_z, adata=query)


def test_first_save_crash_leaves_no_loadable_half_model(other, tmp_path, monkeypatch):
    d = tmp_path / "fresh"
    _crash_on_call(monkeypatch, io, "atomic_write_bytes", 2)
    with pytest.raises(SimulatedCrash):
        other.save(d)
    monkeypatch.undo()
    with pytest.raises(ModelFormatError, match=r"metadata\.json"):
        SCVI.load(d)


def test_atomic_write_bytes_cleans_up_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    io.atomic_write_bytes(target, b"old")
    _crash_on_call(monkeypatch, io.os, "replace", 1)
    with pytest.raises(SimulatedCrash):
        io.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]

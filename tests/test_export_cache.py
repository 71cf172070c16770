"""compile_cache.exported: traced and lowered programs on disk, trusted only
when intact and for exactly the key asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from jaxscanvi import _export_cache, compile_cache

pytest.importorskip("flatbuffers")  # jax.export's serializer (extra "test" installs it)
TRACES = []


def kernel(params, batch):
    TRACES.append(1)  # runs only while JAX traces
    h = jnp.tanh(batch["x"] @ params["w"] + params["b"])
    return {"z": h, "pair": (h.sum(-1), batch["n"] * 2)}


def _args(rows=6):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    return params, {
        "x": rng.normal(size=(rows, 4)).astype(np.float32),
        "n": np.arange(rows, dtype=np.int32),
    }


@pytest.fixture
def cache(tmp_path):
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    cc.reset_cache()
    # programs an earlier test built with the cache off (the draw program)
    compile_cache.clear_caches()
    TRACES.clear()
    yield tmp_path / "jax_exported"
    jax.config.update("jax_compilation_cache_dir", saved)
    cc.reset_cache()


def _same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_second_build_loads_without_tracing(cache):
    args = _args()
    first = compile_cache.exported("test-kernel", kernel, *args)
    assert first.source == "exported" and len(TRACES) == 1
    assert len(list(cache.glob("*.jxe"))) == 1
    again = compile_cache.exported("test-kernel", kernel, *args)  # as a new process would
    assert again.source == "disk"
    out = again(*args)
    assert len(TRACES) == 1  # neither build nor call traced the kernel again
    _same(out, jax.jit(kernel)(*args))
    assert isinstance(out["pair"], tuple)


def test_call_checks_shapes(cache):
    fn = compile_cache.exported("test-kernel", kernel, *_args(6))
    with pytest.raises(TypeError, match="do not match"):
        fn(*_args(7))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "magic"])
def test_damaged_entry_is_rebuilt(cache, damage):
    args = _args()
    compile_cache.exported("test-kernel", kernel, *args)
    (path,) = cache.glob("*.jxe")
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-100] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "empty":
        blob = bytearray()
    else:
        blob[:5] = b"XXXXX"
    path.write_bytes(bytes(blob))
    seen = []
    real = jax.export.deserialize
    jax.export.deserialize = lambda b: (seen.append(bytes(b)), real(b))[1]
    try:
        fn = compile_cache.exported("test-kernel", kernel, *args)
    finally:
        jax.export.deserialize = real
    assert fn.source == "exported" and len(TRACES) == 2  # rebuilt from the function
    repaired = path.read_bytes()
    assert repaired != bytes(blob)
    # what the deserializer saw is the rebuilt entry's module, not the damaged one
    assert len(seen) == 1 and repaired.endswith(seen[0])
    _same(fn(*args), jax.jit(kernel)(*args))
    assert compile_cache.exported("test-kernel", kernel, *args).source == "disk"  # repaired


def test_entry_of_another_key_is_not_trusted(cache):
    args = _args()
    compile_cache.exported("key-a", kernel, *args)
    (a,) = cache.glob("*.jxe")
    text_b = _export_cache.key_text(
        "key-b",
        tuple(
            (tuple(np.shape(x)), str(jnp.result_type(x))) for x in jax.tree_util.tree_leaves(args)
        ),
        jax.default_backend(),
    )
    b = cache / (__import__("hashlib").sha256(text_b.encode()).hexdigest() + ".jxe")
    b.write_bytes(a.read_bytes())  # a valid entry, filed under another key
    fn = compile_cache.exported("key-b", kernel, *args)
    assert fn.source == "exported" and len(TRACES) == 2


def test_unpack_rejects_what_pack_did_not_make():
    blob = _export_cache.pack("k", b"payload")
    assert _export_cache.unpack(blob, "k") == b"payload"
    assert _export_cache.unpack(blob, "j") is None
    assert _export_cache.unpack(blob[:-1], "k") is None
    assert _export_cache.unpack(blob + b"x", "k") is None


def test_off_without_a_cache_folder():
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        fn = compile_cache.exported("test-kernel", kernel, *_args())
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
    assert fn.source == "jit"
    _same(fn(*_args()), jax.jit(kernel)(*_args()))


def test_model_inference_loads_its_program(cache, small_atlas):
    from jaxscanvi import SCVI, clear_caches

    adata = small_atlas.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_hidden=16, n_latent=3, seed=0)
    # plain arrays, as jit gives: committed ones would make train() compile twice
    assert not any(a.committed for a in jax.tree_util.tree_leaves(m.params))
    z = m.get_latent_representation()
    assert {p.name for p in cache.glob("*.jxe")} and len(list(cache.glob("*.jxe"))) == 2
    clear_caches()  # what a new process starts from (the files stay)
    kernels = []
    real = compile_cache.exported

    def spy(*a, **k):
        kernels.append(real(*a, **k))
        return kernels[-1]

    from jaxscanvi.model import _inference

    _inference.exported = spy
    try:
        z2 = m.get_latent_representation()
    finally:
        _inference.exported = real
    assert [k.source for k in kernels] == ["disk"]
    np.testing.assert_array_equal(z, z2)


def _fit_history(adata):
    from jaxscanvi import SCVI

    m = SCVI(adata, n_hidden=16, n_latent=3, seed=0)
    m.train(max_epochs=2, batch_size=32, progress_bar=False, data_source="device")
    return m.history["elbo_train"].to_numpy().ravel(), m


def test_device_epoch_loads_from_disk_and_survives_damage(cache, small_atlas):
    from jaxscanvi import SCVI, clear_caches
    from jaxscanvi._export_cache import MAGIC

    adata = small_atlas.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    h1, m1 = _fit_history(adata)
    entries = set(cache.glob("*.jxe"))
    assert len(entries) == 2  # construction and the epoch
    clear_caches()  # a new process: nothing in memory, the files stay
    built = []
    real = _export_cache.exported

    def spy(*a, **k):
        built.append(real(*a, **k))
        return built[-1]

    _export_cache.exported = spy
    try:
        h2, m2 = _fit_history(adata)
        assert [b.source for b in built] == ["disk"]
        for path in entries:  # damaged entries: ignored, rebuilt, the same training
            path.write_bytes(MAGIC + b"\0" * 40)
        clear_caches()
        built.clear()
        h3, _ = _fit_history(adata)
        assert [b.source for b in built] == ["exported"]
    finally:
        _export_cache.exported = real
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(h1, h3)
    _same(m1.params, m2.params)

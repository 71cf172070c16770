"""The one in-memory cache of compiled functions: bounded, clearable, and not a leak."""

import ast
import gc
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

import jaxscanvi
from jaxscanvi import compile_cache
from jaxscanvi.compile_cache import FunctionCache, ProgramKey, functions


@dataclass(frozen=True)
class _TestKey(ProgramKey):
    n: int


def test_cache_drops_the_least_recently_used():
    cache = FunctionCache(max_entries=2)
    built = []

    def build(name):
        built.append(name)
        return name

    assert cache.get("a", lambda: build("a")) == "a"
    assert cache.get("b", lambda: build("b")) == "b"
    cache.get("a", lambda: build("a2"))  # a is used again: b is now the oldest
    cache.get("c", lambda: build("c"))
    assert len(cache) == 2
    assert cache.get("a", lambda: build("a3")) == "a"  # kept
    assert cache.get("b", lambda: build("b2")) == "b2"  # dropped, so built again
    assert built == ["a", "b", "c", "b2"]


def test_clear_caches_empties_the_cache():
    functions.get(_TestKey(1), lambda: object())
    assert len(functions) > 0
    jaxscanvi.clear_caches()
    assert len(functions) == 0


def test_finished_models_device_source_is_freed(atlas, monkeypatch):
    """A device source holds its model's counts on the device; once the model is
    gone and the caches cleared, nothing may keep it alive."""
    from jaxscanvi import SCVI
    from jaxscanvi.train import fit

    real = fit.make_source
    seen = []

    def recording(*args, **kwargs):
        src = real(*args, **kwargs)
        seen.append(weakref.ref(src))
        return src

    monkeypatch.setattr(fit, "make_source", recording)
    SCVI.setup_anndata(atlas, layer="counts", batch_key="batch")
    model = SCVI(atlas, n_hidden=16, n_latent=4)
    model.train(max_epochs=1, data_source="device", progress_bar=False)
    assert len(seen) == 1 and model.is_trained
    # the cached epoch program refers to no source: the model's counts on the
    # device are freed with the training call, before any cache is cleared
    # (they were kept alive by the cache until the closure stopped holding self)
    gc.collect()
    assert seen[0]() is None
    assert len(jaxscanvi.compile_cache.functions) > 0
    del model
    jaxscanvi.clear_caches()
    assert len(jaxscanvi.compile_cache.functions) == 0


def test_the_cache_takes_only_typed_keys():
    """A key assembled by hand (a tuple) is refused: every key is one of
    compile_cache's `ProgramKey` kinds."""
    with pytest.raises(TypeError, match="ProgramKey"):
        functions.get(("kernel", 1), lambda: object())
    with pytest.raises(TypeError, match="ProgramKey"):
        functions.get("kernel", lambda: object())


def test_keys_of_two_kinds_never_meet():
    """Equal fields of two kinds of program are two entries; equal fields of one
    kind are one (the key is its kind and its fields, nothing else)."""

    @dataclass(frozen=True)
    class _OtherKey(ProgramKey):
        n: int

    cache = FunctionCache(max_entries=4, key_type=ProgramKey)
    assert cache.get(_TestKey(1), lambda: "a") == "a"
    assert cache.get(_OtherKey(1), lambda: "b") == "b"
    assert cache.get(_TestKey(1), lambda: "c") == "a"
    assert len(cache) == 2
    k = compile_cache.ChunkEpochKey(len, 3, 0, True, None)
    assert k == compile_cache.ChunkEpochKey(len, 3, 0, True, None)
    assert hash(k) == hash(compile_cache.ChunkEpochKey(len, 3, 0, True, None))
    assert k != compile_cache.ChunkEpochKey(len, 3, 8, True, None)


def test_each_kind_of_key_is_built_in_one_place():
    """Every `ProgramKey` kind is constructed at exactly one call site in the
    package (the function that makes its program), and every kind is used."""
    package = Path(jaxscanvi.__file__).parent
    kinds = {
        name
        for name, v in vars(compile_cache).items()
        if isinstance(v, type) and issubclass(v, ProgramKey) and v is not ProgramKey
    }
    sites: dict[str, list[str]] = {k: [] for k in kinds}
    for f in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            name = getattr(getattr(node, "func", None), "id", None)
            if isinstance(node, ast.Call) and name in kinds:
                sites[name].append(f"{f.relative_to(package)}:{node.lineno}")
    assert all(len(v) == 1 for v in sites.values()), sites

"""The one in-memory cache of compiled functions: bounded, clearable, and not a leak."""

import gc
import weakref

import jaxscanvi
from jaxscanvi.compile_cache import FunctionCache, functions


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
    functions.get(("test", 1), lambda: object())
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

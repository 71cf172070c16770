"""Construction plans on disk (`model._plan_store`): a warm process draws the
same variables without tracing ``module.init``, and an entry is trusted only
when intact and for exactly the module and settings asked for."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc
from test_init import CONFIGS, _init_of, _module, assert_same_variables, module_init

from jaxscanvi import compile_cache
from jaxscanvi.model import _init, _plan_store
from jaxscanvi.module import VAE


def _new_process():
    """What a new process holds in memory: nothing (the folder stays)."""
    _init._plan.cache_clear()
    _init._described.cache_clear()
    compile_cache.functions.clear()


@pytest.fixture
def folder(tmp_path):
    saved = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    cc.reset_cache()
    _new_process()
    yield tmp_path / "jax_exported"
    jax.config.update("jax_compilation_cache_dir", saved)
    cc.reset_cache()
    _new_process()


def _no_trace(monkeypatch):
    def refuse(module):
        raise AssertionError("module.init traced in a warm process")

    monkeypatch.setattr(_init, "_described", refuse)


@pytest.mark.parametrize("name", ["scvi", "scvi_covariates", "scanvi_classifier_norms_query"])
def test_warm_process_draws_without_tracing(folder, monkeypatch, name):
    module = _module(name)
    cold = _init_of(module, 4)
    cold_shapes = _init.variable_shapes(module)
    assert len(list(folder.glob("*.plan"))) == 1
    _new_process()
    _no_trace(monkeypatch)
    assert _init.describable(module)
    warm = _init_of(module, 4)
    assert_same_variables(warm, module_init(module, 4))
    assert_same_variables(warm, cold)
    shapes = _init.variable_shapes(module)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(cold_shapes)
    assert jax.tree_util.tree_leaves(shapes) == jax.tree_util.tree_leaves(cold_shapes)


def _damage(path, how):
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif how == "flipped":  # one payload byte: the digest no longer matches
        path.write_bytes(blob[:-3] + bytes([blob[-3] ^ 1]) + blob[-2:])
    elif how == "other key":  # a whole, valid entry for another module
        other = VAE(dataclasses.replace(CONFIGS["scvi"], n_hidden=9))
        text = _plan_store.key_text(repr(other))
        payload = b'{"paths": [["params", "w"]], "leaves": [["uniform", [3], [2], 1]]}'
        path.write_bytes(_plan_store._export_cache.pack(text, payload))
    else:  # intact frame, a payload that is not a plan
        text = _plan_store.key_text(repr(_module("scvi")))
        payload = b'{"paths": [["params", "w"]], "leaves": [["pickle", [3], [2], 1]]}'
        path.write_bytes(_plan_store._export_cache.pack(text, payload))


@pytest.mark.parametrize("how", ["truncated", "flipped", "other key", "not a plan"])
def test_damaged_entry_is_ignored_and_rebuilt(folder, how):
    module = _module("scvi")
    want = module_init(module, 1)
    _init_of(module, 1)
    (path,) = folder.glob("*.plan")
    good = path.read_bytes()
    _damage(path, how)
    assert path.read_bytes() != good
    _new_process()
    assert _plan_store.load(repr(module)) is None  # never trusted
    assert_same_variables(_init_of(module, 1), want)  # traced again
    assert path.read_bytes() == good  # and written again


def test_changed_config_is_a_new_entry(folder):
    a = _module("scvi")
    b = VAE(dataclasses.replace(CONFIGS["scvi"], n_latent=5))
    _init_of(a, 0)
    _init_of(b, 0)
    assert len(list(folder.glob("*.plan"))) == 2
    _new_process()
    plan_a, plan_b = _plan_store.load(repr(a)), _plan_store.load(repr(b))
    assert plan_a is not None and plan_b is not None
    assert plan_a[1] != plan_b[1]
    assert_same_variables(_init_of(b, 0), module_init(b, 0))
    # a flag the folds depend on is part of the key as well
    assert _plan_store.key_text(repr(a)) != _plan_store.key_text(repr(b))
    with jax.threefry_partitionable(False):
        assert _plan_store.load(repr(a)) is None


def test_no_entry_when_the_cache_is_off(tmp_path):
    saved = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        _new_process()
        module = _module("scvi")
        assert_same_variables(_init_of(module, 0), module_init(module, 0))
        assert _plan_store.load(repr(module)) is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)
        _new_process()

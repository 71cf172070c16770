"""The backend switch: every hand-written kernel has a library twin that computes
the same thing, the switch really changes what is traced, and bf16 precision
trains to the float32 model's validation ELBO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscanvi import SCANVI, SCVI, InputError, backend
from jaxscanvi.nn.layers import Dense


def _train(atlas, kernels, model="scvi", precision="float32", epochs=2, source="device"):
    if model == "scvi":
        SCVI.setup_anndata(atlas, layer="counts", batch_key="batch")
        m = SCVI(atlas, seed=0)
        extra = {}
    else:
        atlas.obs["hidden"] = (
            atlas.obs["cell_type"].astype(str).where(np.arange(atlas.n_obs) % 3 == 0, "Unknown")
        )
        SCANVI.setup_anndata(
            atlas,
            layer="counts",
            batch_key="batch",
            labels_key="hidden",
            unlabeled_category="Unknown",
        )
        m = SCANVI(atlas, seed=0)
        extra = {"calibrate": False}
    with backend.use(kernels):
        m.train(
            max_epochs=epochs,
            progress_bar=False,
            precision=precision,
            check_val_every_n_epoch=1,
            data_source=source,
            **extra,
        )
    return m


def _leaves(m):
    return jax.tree_util.tree_leaves(m.params)


def test_parse_and_defaults(monkeypatch):
    base = backend.defaults("cpu")
    assert base.prng and base.linear and base.fused_likelihood and not base.sparse_likelihood
    assert backend.parse("library", base) == backend.Kernels()
    assert backend.parse("all", base) == backend.Kernels.every()
    assert backend.parse("", base) == base
    got = backend.parse("prng=0, sparse_likelihood=on", base)
    assert not got.prng and got.sparse_likelihood and got.linear
    with pytest.raises(InputError, match="JAXSCANVI_KERNELS"):
        backend.parse("prgn=0", base)
    monkeypatch.setenv("JAXSCANVI_KERNELS", "library")
    assert backend.current().kernels == backend.Kernels()
    with backend.use("all"):  # a block's choice wins over the environment
        assert backend.kernels() == backend.Kernels.every()
    assert backend.kernels() == backend.Kernels()


def test_bad_precision_is_refused_before_compiling(atlas):
    SCVI.setup_anndata(atlas, layer="counts", batch_key="batch")
    m = SCVI(atlas)
    with pytest.raises(InputError, match="precision"):
        m.train(max_epochs=1, precision="float16", progress_bar=False)
    assert not m.is_trained


def _grad_jaxpr(kernels, precision="float32"):
    module = Dense(8)
    x = jnp.ones((4, 16))
    with backend.use(kernels, precision):
        v = module.init(jax.random.PRNGKey(0), x)

        def loss(p):
            return module.apply(p, x).sum()

        return str(jax.make_jaxpr(jax.grad(loss))(v))


def test_switch_changes_what_is_traced():
    # the hand-written backward of a narrow head (16 -> 8) holds an optimisation
    # barrier that autodiff's never does
    assert "optimization_barrier" in _grad_jaxpr("all")
    assert "optimization_barrier" not in _grad_jaxpr("library")
    f32 = _grad_jaxpr("library")
    bf16 = _grad_jaxpr("library", "bfloat16")
    assert "bf16" not in f32
    assert "bf16" in bf16 and "preferred_element_type=float32" in bf16


@pytest.mark.parametrize("model", ["scvi", "scanvi"])
def test_library_path_trains_the_same_model(atlas, model):
    """Every kernel on vs every kernel off (dense counts): same parameters and
    history to float32 rounding, so each kernel is an optimisation only."""
    a = _train(atlas.copy(), "all", model)
    b = _train(atlas.copy(), "library", model)
    assert a.history.to_frame()["train_loss"].notna().all()
    np.testing.assert_allclose(
        a.history.to_frame()["train_loss"], b.history.to_frame()["train_loss"], rtol=2e-5
    )
    np.testing.assert_allclose(
        a.history.to_frame()["elbo_validation"], b.history.to_frame()["elbo_validation"], rtol=2e-5
    )
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5)
    # and training moved the parameters
    init = SCVI(a.adata, seed=0) if model == "scvi" else None
    if init is not None:
        moved = max(
            float(np.abs(np.asarray(x) - np.asarray(y)).max())
            for x, y in zip(_leaves(a), _leaves(init))
        )
        assert moved > 1e-3


def test_sparse_likelihood_trains_the_same_model(atlas):
    """The list-of-non-zeros likelihood (host source builds the list) against the
    dense one: same trajectory to float32 rounding."""
    a = _train(atlas.copy(), "library", source="host")
    b = _train(atlas.copy(), "sparse_likelihood=1", source="host")
    np.testing.assert_allclose(
        a.history.to_frame()["train_loss"], b.history.to_frame()["train_loss"], rtol=2e-5
    )
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-5)


@pytest.mark.slow
def test_bfloat16_validation_elbo_within_half_a_percent(atlas):
    f32 = _train(atlas.copy(), None, epochs=30)
    bf16 = _train(atlas.copy(), None, precision="bfloat16", epochs=30)
    e32 = f32.get_elbo(indices=f32.validation_indices)
    e16 = bf16.get_elbo(indices=bf16.validation_indices)
    assert (
        f32.history.to_frame()["elbo_validation"].iloc[-1]
        < f32.history.to_frame()["elbo_validation"].iloc[0]
    )
    assert abs(e16 - e32) / abs(e32) < 0.005
    # bf16 products really ran: the two models are not bit-identical
    assert any(not np.array_equal(x, y) for x, y in zip(_leaves(f32), _leaves(bf16)))
    for leaf in _leaves(bf16):  # parameters stay float32
        assert leaf.dtype == jnp.float32


def _kernel_fn(variables, batch, key, scale=1.0):
    return {"out": batch * scale}


def test_the_kernel_choice_is_a_field_of_the_kernel_key():
    """An inference kernel built under another choice is another program; under
    the same choice it is the same one (`compile_cache.KernelKey.numerics`)."""
    from functools import partial

    from jaxscanvi.model._inference import jitted

    fn = partial(_kernel_fn, scale=2.0)
    with backend.use("library"):
        lib = jitted(fn)
        assert jitted(partial(_kernel_fn, scale=2.0)) is lib
    with backend.use("all"):
        every = jitted(fn)
    with backend.use("library", precision="bfloat16"):
        bf16 = jitted(fn)
    assert len({id(lib), id(every), id(bf16)}) == 3


def test_the_kernel_choice_has_one_context_and_one_reader():
    """`backend._ACTIVE` is the one context: set by `use` and `traced`, read by
    `current` alone; every other module asks `current`, `kernels` or `matmul_dtype`."""
    import inspect
    import re
    from pathlib import Path

    package = Path(backend.__file__).parent
    outside = [
        str(f.relative_to(package))
        for f in package.rglob("*.py")
        if f.name != "backend.py" and re.search(r"\b_ACTIVE\b|ContextVar", f.read_text())
    ]
    assert outside == []
    src = Path(backend.__file__).read_text()
    assert src.count("_ACTIVE.get(") == 1
    assert "_ACTIVE.get(" in inspect.getsource(backend.current)

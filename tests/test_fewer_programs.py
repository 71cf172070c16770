"""What a model compiles: construction is one program, and its inference calls
share one program per chunk size (no eager programs for keys or constants)."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxscanvi.nn import prng

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _programs import ProgramLog


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1, 2**31, 2**32 + 5, 2**40, -1, -(2**63)])
def test_host_keys_are_jax_keys(seed):
    assert prng.host_keys_ok()
    np.testing.assert_array_equal(prng.host_key(seed), np.asarray(jax.random.PRNGKey(seed)))
    key = jax.random.PRNGKey(seed)
    for i in (0, 1, 7, 2**31 + 3, 2**32 - 1):
        np.testing.assert_array_equal(
            prng.host_fold_in(np.asarray(key), i), np.asarray(jax.random.fold_in(key, i))
        )


def test_init_is_one_program_with_the_same_values(small_atlas):
    from jaxscanvi import SCVI
    from jaxscanvi.compile_cache import clear_caches
    from jaxscanvi.model._init import dummy_batch

    adata = small_atlas.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    # the draw program, shared by every model, compiled anew
    clear_caches()
    jax.clear_caches()
    with ProgramLog() as log:
        m = SCVI(adata, n_hidden=24, n_latent=3, seed=3)
    assert log.n_programs == 1, log.by_name()
    with ProgramLog() as log:
        SCVI(adata, n_hidden=20, n_latent=3, seed=3)
    assert log.n_programs == 0, log.by_name()
    # as construction compiled before: keys split outside, the same options
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    c = m.module.config
    init = jax.jit(
        partial(m.module.init, train=False),
        compiler_options={
            "xla_backend_optimization_level": 0,
            "xla_llvm_disable_expensive_passes": True,
        },
    )
    ref = init({"params": k1, "sample": k2, "dropout": k3}, dummy_batch(c.n_genes, 0, 0))
    for a, b in zip(jax.tree_util.tree_leaves(ref["params"]), jax.tree_util.tree_leaves(m.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanvi_inference_calls_share_a_program(small_atlas):
    from jaxscanvi import SCANVI

    adata = small_atlas.copy()
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::2], "labels"] = "Unknown"
    SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    m = SCANVI(adata, n_hidden=24, n_latent=3, seed=0)
    with ProgramLog() as first:
        z = m.get_latent_representation()
    with ProgramLog() as rest:
        probs = m.predict(soft=True)
        z10 = m.get_latent_representation(indices=np.arange(10))
        qm, qv = m.get_latent_representation(return_dist=True)
    assert first.n_programs == 1, first.by_name()
    assert rest.n_programs == 0, rest.by_name()
    assert z.shape == (adata.n_obs, 3) and np.allclose(z[:10], z10) and np.allclose(z, qm)
    assert np.allclose(np.asarray(probs).sum(1), 1.0, atol=1e-5) and (qv > 0).all()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"trainable_mask": {"a": True, "b": np.array([True, False])}, "clip": ("norm", 1.0)},
        {"decoupled": True, "clip": ("value", 0.5)},
    ],
)
def test_host_init_is_the_optimizers_init(kw):
    from jaxscanvi.train.state import host_init, make_optimizer

    p = {
        "a": jax.device_put(np.ones((3, 4), np.float32)),
        "b": jax.device_put(np.ones(2, np.float32)),
    }
    tx = make_optimizer(1e-3, 0.01, 1e-6, **kw)
    with ProgramLog() as log:
        got = host_init(tx, p)
    assert log.n_programs == 0, log.by_name()
    ref = tx.init(p)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert (a.dtype, a.shape, a.weak_type) == (b.dtype, b.shape, b.weak_type)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_training_compiles_only_its_epoch(small_atlas):
    from jaxscanvi import SCVI

    adata = small_atlas.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_hidden=24, n_latent=3, seed=0)
    with ProgramLog() as log:
        m.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert log.by_name() == {"jit(run)": 1}

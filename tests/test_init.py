"""Model construction draws the variables outside a per-model program
(`model._init`): the same tree, shapes, dtypes and values, bit for bit, as
``module.init`` compiled as construction did before."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from jaxscanvi.model import _init
from jaxscanvi.module import SCANVAE, VAE, SCANVIConfig, VAEConfig
from jaxscanvi.nn import prng

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _programs import ProgramLog

SMALL: dict[str, Any] = dict(n_genes=37, n_hidden=16, n_latent=4)
CONFIGS = {
    "scvi": VAEConfig(**SMALL),
    "scvi_covariates": VAEConfig(
        **SMALL,
        n_batch=3,
        n_labels=2,
        n_cats_per_cov=(3, 1, 4),
        n_continuous_cov=2,
        n_layers=2,
        encode_covariates=True,
        deeply_inject_covariates=False,
        use_observed_lib_size=False,
        dispersion="gene-batch",
    ),
    "scvi_layer_norm_gene_cell_nb": VAEConfig(
        **SMALL,
        n_batch=2,
        use_batch_norm="none",
        use_layer_norm="both",
        dispersion="gene-cell",
        gene_likelihood="nb",
    ),
    "scvi_gene_label_poisson": VAEConfig(
        **SMALL, n_labels=3, dispersion="gene-label", latent_distribution="ln"
    ),
    "scvi_poisson_size_factor": VAEConfig(
        **SMALL, gene_likelihood="poisson", use_size_factor_key=True, use_batch_norm="encoder"
    ),
    "scanvi": SCANVIConfig(**SMALL, n_batch=2, n_labels=5),
    "scanvi_linear_hierarchy": SCANVIConfig(
        **SMALL,
        n_batch=3,
        n_labels=4,
        n_cats_per_cov=(2,),
        n_continuous_cov=1,
        n_layers=2,
        classifier_n_layers=0,
        label_parents=(5, 5, 6, 6, -1, 4, 4),
        y_prior=(0.1, 0.2, 0.3, 0.4),
    ),
    "scanvi_classifier_norms_query": SCANVIConfig(
        **SMALL,
        n_batch=4,
        n_labels=3,
        classifier_n_layers=2,
        classifier_n_hidden=8,
        classifier_use_batch_norm=False,
        classifier_use_layer_norm=True,
        use_batch_norm="decoder",
        use_layer_norm="encoder",
        use_observed_lib_size=False,
        encode_covariates=True,
        frozen_batchnorm=("z_encoder", "decoder", "classifier"),
    ),
}


def module_init(module, seed: int) -> dict:
    """The old construction: ``module.init`` on two dummy cells, one program
    with the construction's compiler options, the key split inside."""
    c = module.config
    batch = _init.dummy_batch(c.n_genes, c.n_continuous_cov, len(c.n_cats_per_cov))

    def init(key, batch):
        k1, k2, k3 = jax.random.split(key, 3)
        return module.init({"params": k1, "sample": k2, "dropout": k3}, batch, train=False)

    out = jax.jit(init, compiler_options=_init._INIT_OPTIONS)(prng.host_key(seed), batch)
    return jax.tree_util.tree_map(np.asarray, dict(out))


def assert_same_variables(got: dict, want: dict) -> None:
    got = {k: v for k, v in got.items() if k != "constants"}
    want = {"batch_stats": {}, **want}
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    for (path, a), b in zip(flat_got, jax.tree_util.tree_leaves(want)):
        a = np.asarray(a)
        where = jax.tree_util.keystr(path)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), where
        np.testing.assert_array_equal(a, b, err_msg=where)


def _module(name: str):
    config = CONFIGS[name]
    return SCANVAE(config) if isinstance(config, SCANVIConfig) else VAE(config)


def _init_of(module, seed: int) -> dict:
    c = module.config
    return _init.init_variables(module, c.n_genes, c.n_continuous_cov, len(c.n_cats_per_cov), seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_described_init_is_module_init(name):
    module = _module(name)
    assert _init.describable(module)  # not the fallback
    for seed in (0, 2**31 + 7):
        variables = _init_of(module, seed)
        assert_same_variables(variables, module_init(module, seed))
    # and variable_shapes, from the same abstract trace
    want = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    got = _init.variable_shapes(module)
    assert set(got.pop("constants")) == {"library_log_means", "library_log_vars"}
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_draws_span_chunks_and_blocks():
    """A parameter over several rows and a model over several calls of the draw
    program (n_genes x n_hidden > ROWS * CHUNK), still bit for bit."""
    module = VAE(VAEConfig(n_genes=_init.CHUNK + 3, n_hidden=70, n_latent=3))
    assert module.config.n_genes * 70 > _init.ROWS * _init.CHUNK
    assert_same_variables(_init_of(module, 5), module_init(module, 5))


def test_host_split_is_jax_split():
    for seed in (0, 1, 2**32 - 1):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(
            _init.host_split(np.asarray(key), 3), np.asarray(jax.random.split(key, 3))
        )


def test_a_users_encoder_falls_back_to_module_init():
    """Initialisers jaxscanvi cannot describe: ``module.init``, as before."""
    import flax.linen as nn

    class MyEncoder(nn.Module):
        config: VAEConfig

        @nn.compact
        def __call__(self, x, cats=(), *, train, mask=None):
            h = nn.Dense(self.config.n_latent)(x)  # lecun_normal: not described
            return h, nn.softplus(h) + 1e-4

    module = VAE(CONFIGS["scvi"], encoder_cls=MyEncoder)
    assert not _init.describable(module)
    assert_same_variables(_init_of(module, 3), module_init(module, 3))


@pytest.mark.filterwarnings("ignore:.*has not been trained")
def test_models_share_one_draw_program(small_atlas):
    """scVI, scANVI and their query models: at most one program among them
    all (the draw program, none once it is in memory), and the query's
    fresh variables are module.init's."""
    from jaxscanvi import SCANVI, SCVI

    adata = small_atlas.copy()
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "labels"] = "Unknown"
    ref = adata[adata.obs["batch"] != adata.obs["batch"].cat.categories[-1]].copy()
    query = adata[adata.obs["batch"] == adata.obs["batch"].cat.categories[-1]].copy()
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    with ProgramLog() as log:
        scvi = SCVI(ref, n_hidden=24, n_latent=3, seed=2)
        scanvi = SCANVI.from_scvi_model(scvi, "Unknown")
        q_scvi = SCVI.load_query_data(query.copy(), scvi)
        q_scanvi = SCANVI.load_query_data(query.copy(), scanvi)
    assert log.n_programs <= 1, log.by_name()
    # plain arrays, as jit's: training fed these and later its own compiles once
    assert not any(a.committed for a in jax.tree_util.tree_leaves(scanvi.variables))
    for model in (scvi, scanvi, q_scvi, q_scanvi):
        assert _init.describable(model.module)
    for model in (q_scvi, q_scanvi):  # the config query surgery built
        assert_same_variables(_init_of(model.module, 2), module_init(model.module, 2))

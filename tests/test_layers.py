"""The fast building blocks of `jaxscanvi.nn` against the plain code they replace.

* `prng`: the unrolled Threefry gives ``jax.random``'s numbers bit for bit.
* `Dropout`: the same mask as ``flax.linen.Dropout`` (same module path, same
  keys), and with ``relu=True`` the gradient of ReLU then dropout.
* `linear` and `batch_norm`: hand-written backward passes equal JAX's
  autodiff of the plain formulas (masked rows, a named vmapped axis).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscanvi.nn import prng
from jaxscanvi.nn.layers import Dropout, batch_norm, linear

KEYS = [jax.random.PRNGKey(3), jax.random.key(7), jax.random.fold_in(jax.random.PRNGKey(1), 5)]
SHAPES = [(), (5,), (3, 7), (6, 128, 10), (2, 3, 64)]


@pytest.mark.parametrize("key", KEYS, ids=["raw", "typed", "folded"])
def test_prng_equals_jax_random(key):
    for shape in SHAPES:
        np.testing.assert_array_equal(prng.bits(key, shape), jax.random.bits(key, shape))
        np.testing.assert_array_equal(prng.uniform(key, shape), jax.random.uniform(key, shape))
        np.testing.assert_array_equal(prng.normal(key, shape), jax.random.normal(key, shape))
        np.testing.assert_array_equal(
            prng.bernoulli(key, 0.9, shape), jax.random.bernoulli(key, 0.9, shape)
        )


def test_prng_under_jit_and_vmap():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    ours = jax.jit(jax.vmap(lambda k: prng.normal(k, (3, 2))))(keys)
    np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.normal(k, (3, 2)))(keys))
    u = jax.jit(lambda k: prng.uniform(k, (1000,), minval=-2.0, maxval=3.0))(keys[0])
    np.testing.assert_array_equal(u, jax.random.uniform(keys[0], (1000,), minval=-2.0, maxval=3.0))
    assert float(u.min()) >= -2.0 and float(u.max()) < 3.0


def test_prng_falls_back_for_other_generators():
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(prng.normal(key, (4, 3)), jax.random.normal(key, (4, 3)))


class _Flax(nn.Module):
    relu: bool

    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.3, deterministic=False)(nn.relu(x) if self.relu else x)


class _Ours(nn.Module):
    relu: bool

    @nn.compact
    def __call__(self, x):
        return Dropout(0.3)(x, deterministic=False, relu=self.relu)


@pytest.mark.parametrize("relu", [False, True])
def test_dropout_matches_flax_value_and_gradient(relu):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
    x = x.at[0, :4].set(0.0)  # exact zeros: ReLU's gradient there is 0
    rngs = {"dropout": jax.random.PRNGKey(11)}

    def run(mod):
        return lambda x: mod.apply({}, x, rngs=rngs)

    ref, ours = run(_Flax(relu)), run(_Ours(relu))
    y = ours(x)
    np.testing.assert_array_equal(y, ref(x))
    assert 0.2 < float((y == 0).mean()) < (0.75 if relu else 0.4)
    c = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    g_ref = jax.grad(lambda x: (ref(x) * c).sum())(x)
    g_ours = jax.grad(lambda x: (ours(x) * c).sum())(x)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-6, atol=0)
    assert float(jnp.abs(g_ours).sum()) > 0


@pytest.mark.parametrize("shape", [((50, 128), 10), ((4, 50, 10), 128), ((50, 2000), 128)])
def test_linear_gradient_equals_autodiff(shape):
    (x_shape, n_out) = shape
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    x = jax.random.normal(k[0], x_shape)
    w = jax.random.normal(k[1], (x_shape[-1], n_out)) / 10
    b = jax.random.normal(k[2], (n_out,))
    c = jax.random.normal(k[3], (*x_shape[:-1], n_out))
    ours = jax.grad(lambda x, w, b: (jnp.tanh(linear(x, w, b)) * c).sum(), (0, 1, 2))
    ref = jax.grad(lambda x, w, b: (jnp.tanh(x @ w + b) * c).sum(), (0, 1, 2))
    for a, r in zip(ours(x, w, b), ref(x, w, b)):
        np.testing.assert_allclose(a, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


def _plain_batch_norm(x, w, scale, bias, axis_name=None):
    f = x.shape[-1]
    flat, wf = x.reshape(-1, f), w.reshape(-1)
    n, s1 = wf.sum(), (wf[:, None] * flat).sum(0)
    if axis_name:
        n, s1 = jax.lax.psum(n, axis_name), jax.lax.psum(s1, axis_name)
    mean = s1 / n
    s2 = (wf[:, None] * jnp.square(flat - mean)).sum(0)
    if axis_name:
        s2 = jax.lax.psum(s2, axis_name)
    return (x - mean) * jax.lax.rsqrt(s2 / n + 1e-3) * scale + bias


def test_batch_norm_gradient_equals_autodiff():
    """Masked rows, and statistics spanning a vmapped named axis."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(5, 7, 6)), jnp.float32)
    w = jnp.asarray(r.random((5, 7)) > 0.3, jnp.float32)
    s = jnp.asarray(r.normal(size=6), jnp.float32)
    t = jnp.asarray(r.normal(size=6), jnp.float32)
    c = jnp.asarray(r.normal(size=x.shape), jnp.float32)

    def loss(bn, vmapped):
        if vmapped:
            return lambda x, s, t: (
                jnp.tanh(jax.vmap(lambda xi, wi: bn(xi, wi, s, t, "k"), axis_name="k")(x, w)) * c
            ).sum()
        return lambda x, s, t: (jnp.tanh(bn(x, w, s, t, None)) * c).sum()

    def ours(x, w, s, t, axis):
        return batch_norm(x, w, s, t, 1e-3, axis)[0]

    for vmapped in (False, True):
        a, b = loss(ours, vmapped), loss(_plain_batch_norm, vmapped)
        np.testing.assert_allclose(a(x, s, t), b(x, s, t), rtol=1e-5)
        for ga, gb in zip(jax.grad(a, (0, 1, 2))(x, s, t), jax.grad(b, (0, 1, 2))(x, s, t)):
            np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5)
    # the named axis really spans the classes: same as flattening them
    np.testing.assert_allclose(loss(ours, True)(x, s, t), loss(ours, False)(x, s, t), rtol=1e-5)


def test_encoder_input_is_log1p_of_the_counts():
    """The encoders' input log(1 + x) equals XLA's log1p bit for bit on counts up
    to 2^20, and is within 1e-7 of log1p on non-integer values."""
    from jaxscanvi.data.batch import Batch
    from jaxscanvi.model._init import init_variables
    from jaxscanvi.module import VAE, VAEConfig

    r = np.random.default_rng(0)
    counts = np.concatenate(
        [
            np.arange(2**20),
            r.integers(0, 2**20, 2**20 - 2**18),
            r.uniform(0, 1e-3, 2**17),
            r.uniform(0, 50, 2**17),
        ]
    )
    x = counts.astype(np.float32).reshape(-1, 64)
    B, G = x.shape
    module = VAE(VAEConfig(n_genes=G, n_hidden=4, n_latent=2))
    v = init_variables(
        module, G, 0, 0, 0, {"library_log_means": jnp.zeros(1), "library_log_vars": jnp.ones(1)}
    )
    batch = Batch(
        x=jnp.asarray(x),
        nz=None,
        weight=jnp.ones(B),
        batch=jnp.zeros(B, jnp.int32),
        labels=jnp.zeros(B, jnp.int32),
        cat_covs=jnp.zeros((B, 0), jnp.int32),
        cont_covs=jnp.zeros((B, 0)),
        log_size_factor=jnp.zeros(B),
        log_library=jnp.zeros(B),
        lgamma_const=jnp.zeros(B),
    )
    x_, _ = jax.jit(lambda b: module.apply(v, b, method=VAE._encoder_input))(batch)
    x_ = np.asarray(x_).ravel()
    ref = np.asarray(jax.jit(jnp.log1p)(jnp.asarray(x))).ravel()
    n_int = 2**21 - 2**18
    np.testing.assert_array_equal(x_[:n_int], ref[:n_int])
    np.testing.assert_allclose(
        x_[n_int:], np.log1p(x.ravel()[n_int:].astype(np.float64)), rtol=2.4e-7, atol=6e-8
    )

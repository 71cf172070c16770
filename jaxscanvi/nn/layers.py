"""Building blocks with scvi-tools' (torch's) numerics.

* ``Dense`` initialises like ``torch.nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  for kernel and bias.
* ``BatchNorm`` matches ``torch.nn.BatchNorm1d(momentum=0.01, eps=1e-3)``:
  biased batch variance to normalise, unbiased variance in the running
  average. It takes a per-row ``mask`` so padded rows of the last minibatch
  of an epoch do not enter the statistics, and an optional ``axis_name`` so
  statistics can span a vmapped or sharded axis. For statistics over more
  rows than one call sees (scANVI's class chunks), it reports its rows' sums
  in the ``bn_sums`` collection when that is mutable, and normalises with
  whole-grid statistics handed in as the ``bn_global`` collection.
* ``FCLayers`` injects categorical covariates as one-hot columns of the first
  (and, with ``inject_covariates``, every) layer. The one-hot product is an
  embedding lookup, and each covariate's block is a parameter leaf of its own
  (``cov0``, ``cov1``, ...) so query surgery can train new categories alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import backend
from . import prng
from .init import Fill, TorchUniform


def torch_uniform(fan_in: int) -> TorchUniform:
    return TorchUniform(fan_in)


def _matmul(a, b):
    """``a @ b``; bf16 operands accumulate and return in float32."""
    if a.dtype == jnp.bfloat16:
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return a @ b


def dense(x, kernel, bias):
    """``x @ kernel + bias`` by the kernel and precision `backend` has active."""
    low = backend.matmul_dtype()
    if low is not None:
        x, kernel = x.astype(low), kernel.astype(low)
    if backend.kernels().linear:
        return linear(x, kernel, bias)
    return _matmul(x, kernel) + bias


@jax.custom_vjp
def linear(x, kernel, bias):
    """``x @ kernel + bias``, with a backward pass laid out for the CPU (below)."""
    return _matmul(x, kernel) + bias


def _linear_fwd(x, kernel, bias):
    return _matmul(x, kernel) + bias, (x, kernel)


def _linear_bwd(res, g):
    x, kernel = res
    g = g.astype(x.dtype)  # bf16 operands: the backward products in bf16 too
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    n_in, n_out = kernel.shape
    if n_out < min(n_in, 32):
        # the kernel gradient of a narrow head (e.g. 128 -> 10) as (out, in), then
        # transposed: XLA's CPU product with a narrow last axis is ~3x slower, and
        # the barrier stops it folding the transpose back into the product
        d_kernel = jax.lax.optimization_barrier(_matmul(g2.T, x2)).T
    else:
        d_kernel = _matmul(x2.T, g2)
    d_bias = g2.astype(jnp.float32).sum(0)
    return (_matmul(g, kernel.T).astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias)


linear.defvjp(_linear_fwd, _linear_bwd)


class Dense(nn.Module):
    """Linear layer, torch initialisation. ``fan_in`` defaults to the input width."""

    features: int
    fan_in: int | None = None

    @nn.compact
    def __call__(self, x):
        fan_in = self.fan_in if self.fan_in is not None else x.shape[-1]
        init = torch_uniform(fan_in)
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return dense(x, kernel, bias)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm1d semantics with masking; see module docstring."""

    momentum: float = 0.01
    epsilon: float = 1e-3
    axis_name: str | None = None
    frozen: bool = False  # normalise with the running statistics even in training

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", Fill(0.0), None, (features,))
        ra_var = self.variable("batch_stats", "var", Fill(1.0), None, (features,))
        scale = self.param("scale", Fill(1.0), (features,))
        bias = self.param("bias", Fill(0.0), (features,))
        if not train or self.frozen:
            y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return y * scale + bias
        w = (
            jnp.ones(x.shape[:-1], x.dtype)
            if mask is None
            else jnp.broadcast_to(mask, x.shape[:-1]).astype(x.dtype)
        )
        if self.is_mutable_collection("bn_sums"):
            self.put_variable(
                "bn_sums", "sums", shifted_sums(x, w, jax.lax.stop_gradient(ra_mean.value))
            )
        if self.has_variable("bn_global", "mean"):
            # statistics of the whole grid, differentiable functions of every row
            mean, s2, n = (self.get_variable("bn_global", k) for k in ("mean", "s2", "n"))
            r = jax.lax.rsqrt(s2 / jnp.maximum(n, 1.0) + self.epsilon)
            y = (x - mean) * r * scale + bias
        else:
            norm = batch_norm if backend.kernels().batch_norm else batch_norm_plain
            # a jax.custom_vjp made through functools.partial: pyright loses its return type
            y, mean, s2, n = norm(x, w, scale, bias, self.epsilon, self.axis_name)  # pyright: ignore[reportGeneralTypeIssues]
        if not self.is_initializing():
            unbiased = s2 / jnp.maximum(n - 1.0, 1.0)
            m = self.momentum
            ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
            ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
        return y


def shifted_sums(x, w, shift):
    """(n, sum w (x - shift), sum w (x - shift)^2) over the rows of ``x``, not
    summed over any axis. Sums from disjoint row sets add up; `global_stats`
    turns the total into (mean, s2, n). The shift (any constant; the running
    mean is close to the batch mean) keeps the squares from cancelling."""
    flat = x.reshape(-1, x.shape[-1]) - shift
    wf = w.reshape(-1)
    return wf.sum(), (wf[:, None] * flat).sum(0), (wf[:, None] * jnp.square(flat)).sum(0)


def global_stats(sums, shift):
    """{"mean", "s2", "n"} (s2 = sum w (x - mean)^2) from summed `shifted_sums`."""
    n, s1, sq = sums
    d = s1 / jnp.maximum(n, 1.0)
    return {"mean": shift + d, "s2": jnp.maximum(sq - n * jnp.square(d), 0.0), "n": n}


def _bn_stats(x, w, axis_name):
    flat = x.reshape(-1, x.shape[-1])
    wf = w.reshape(-1)
    n = wf.sum()
    s1 = (wf[:, None] * flat).sum(0)
    if axis_name is not None:
        n = jax.lax.psum(n, axis_name)
        s1 = jax.lax.psum(s1, axis_name)
    mean = s1 / jnp.maximum(n, 1.0)
    s2 = (wf[:, None] * jnp.square(flat - mean)).sum(0)
    if axis_name is not None:
        s2 = jax.lax.psum(s2, axis_name)
    return n, mean, s2


def batch_norm_plain(x, w, scale, bias, epsilon, axis_name):
    """`batch_norm` differentiated by autodiff (the library path)."""
    y, mean, s2, n = _batch_norm_fwd(x, w, scale, bias, epsilon, axis_name)[0]
    return y, *jax.lax.stop_gradient((mean, s2, n))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm(x, w, scale, bias, epsilon, axis_name):
    """Training-mode batch norm over the rows of ``x`` (..., F) weighted by ``w``
    (x.shape[:-1]; 0 drops a row from the statistics), statistics summed over
    ``axis_name`` if given. Returns ``(y, mean, s2, n)``: the output, the batch
    mean, the weighted sum of squared deviations and the weight total; the
    last three are for running averages and carry no gradient.

    The backward pass is the closed form (two column sums), not the traced
    chain of reductions: the same gradient with fewer passes over x.
    """
    return _batch_norm_fwd(x, w, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, w, scale, bias, epsilon, axis_name):
    n, mean, s2 = _bn_stats(x, w, axis_name)
    r = jax.lax.rsqrt(s2 / jnp.maximum(n, 1.0) + epsilon)
    xhat = (x - mean) * r
    return (xhat * scale + bias, mean, s2, n), (xhat, r, w, n, scale)


def _batch_norm_bwd(epsilon, axis_name, res, cts):
    # y = xhat * scale + bias with xhat = (x - mean) r; for the weighted
    # statistics, dx = scale r (dy - (w/n) (sum dy + xhat sum dy xhat))
    xhat, r, w, n, scale = res
    dy = cts[0]
    f = dy.shape[-1]
    d_bias = dy.reshape(-1, f).sum(0)
    d_scale = (dy * xhat).reshape(-1, f).sum(0)
    a, b = d_bias, d_scale
    if axis_name is not None:  # the statistics spanned the axis; the parameter
        a = jax.lax.psum(a, axis_name)  # gradients are summed over it by JAX
        b = jax.lax.psum(b, axis_name)
    wn = (w / jnp.maximum(n, 1.0))[..., None]
    dx = (scale * r) * (dy - wn * (a + xhat * b))
    return dx, None, d_scale, d_bias


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with the mask drawn by `prng.bernoulli`: the same
    mask, bit for bit, without the CPU's rolled Threefry loop. With ``relu=True``
    it applies ReLU first, and its gradient needs only the output, so the mask
    is computed once (XLA would otherwise recompute it in the backward pass).
    """

    rate: float

    @nn.compact
    def __call__(self, x, *, deterministic: bool, relu: bool = False, keep_mask=None) -> jax.Array:
        """``keep_mask``: the entries to keep (bool, x's shape) when the caller drew them."""
        if deterministic or self.rate == 0.0:
            return nn.relu(x) if relu else x
        keep = 1.0 - self.rate
        mask = keep_mask
        if mask is None:
            mask = prng.bernoulli(self.make_rng("dropout"), keep, x.shape)
        if relu:
            if backend.kernels().relu_dropout:
                # a jax.custom_vjp made through functools.partial: pyright loses its return type
                return _relu_dropout(x, mask, keep)  # pyright: ignore[reportReturnType]
            return jax.lax.select(mask, nn.relu(x) / keep, jnp.zeros_like(x))
        return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _relu_dropout(x, mask, keep):
    return jnp.where(mask & (x > 0), x / keep, 0.0)


def _relu_dropout_fwd(x, mask, keep):
    y = _relu_dropout(x, mask, keep)
    return y, y


def _relu_dropout_bwd(keep, y, g):
    # y > 0 exactly where the mask kept a positive input; ReLU's gradient is 0 at 0
    return jnp.where(y > 0, g / keep, 0.0), None


_relu_dropout.defvjp(_relu_dropout_fwd, _relu_dropout_bwd)


def layer_norm(x, eps: float = 1e-5):
    """torch.nn.LayerNorm(elementwise_affine=False)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class FCLayers(nn.Module):
    """scvi-tools' FCLayers: [Dense -> BatchNorm -> LayerNorm -> ReLU -> Dropout] x n_layers."""

    n_out: int
    n_cats: Sequence[int] = ()
    n_layers: int = 1
    n_hidden: int = 128
    dropout_rate: float = 0.1
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    inject_covariates: bool = True
    bn_axis_name: str | None = None
    bn_frozen: bool = False

    @nn.compact
    def __call__(
        self, x, cats: Sequence[jax.Array] = (), *, train: bool, mask=None, keep_masks=None
    ):
        """``mask`` weighs rows in the batch statistics; ``keep_masks``, one per
        layer, are dropout keep-masks drawn by the caller (else each layer draws
        its own from the ``dropout`` rng)."""
        # scvi-tools ignores covariates with a single category
        active = [(j, n, c) for j, (n, c) in enumerate(zip(self.n_cats, cats)) if n > 1]
        for i in range(self.n_layers):
            n_o = self.n_out if i == self.n_layers - 1 else self.n_hidden
            inject = i == 0 or self.inject_covariates
            cov_width = sum(n for _, n, _ in active) if inject else 0
            fan_in = x.shape[-1] + cov_width
            h = Dense(n_o, fan_in=fan_in, name=f"dense{i}")(x)
            if inject:
                init = torch_uniform(fan_in)
                for j, n, code in active:
                    emb = self.param(f"layer{i}_cov{j}", init, (n, n_o))
                    h = h + jnp.take(emb, code, axis=0)
            if self.use_batch_norm:
                h = BatchNorm(axis_name=self.bn_axis_name, frozen=self.bn_frozen, name=f"bn{i}")(
                    h, train=train, mask=mask
                )
            if self.use_layer_norm:
                h = layer_norm(h)
            if self.dropout_rate > 0:
                h = Dropout(self.dropout_rate)(
                    h,
                    deterministic=not train,
                    relu=True,
                    keep_mask=None if keep_masks is None else keep_masks[i],
                )
            else:
                h = nn.relu(h)
            x = h
        return x

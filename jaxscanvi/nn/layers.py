"""Building blocks with scvi-tools' (torch's) numerics.

* ``Dense`` initialises like ``torch.nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  for kernel and bias.
* ``BatchNorm`` matches ``torch.nn.BatchNorm1d(momentum=0.01, eps=1e-3)``:
  biased batch variance to normalise, unbiased variance in the running
  average. It takes a per-row ``mask`` so padded rows of the last minibatch
  of an epoch do not enter the statistics, and an optional ``axis_name`` so
  statistics can span a vmapped or sharded axis.
* ``FCLayers`` injects categorical covariates as one-hot columns of the first
  (and, with ``inject_covariates``, every) layer. The one-hot product is an
  embedding lookup, and each covariate's block is a parameter leaf of its own
  (``cov0``, ``cov1``, ...) so query surgery can train new categories alone.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int):
    bound = 1.0 / jnp.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
        return x @ kernel + bias


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm1d semantics with masking; see module docstring."""

    momentum: float = 0.01
    epsilon: float = 1e-3
    axis_name: str | None = None
    frozen: bool = False  # normalise with the running statistics even in training

    @nn.compact
    def __call__(self, x, *, train: bool, mask=None):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        if not train or self.frozen:
            mean, var = ra_mean.value, ra_var.value
        else:
            flat = x.reshape(-1, features)
            w = (jnp.ones(flat.shape[0], x.dtype) if mask is None
                 else jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1).astype(x.dtype))
            n = w.sum()
            s1 = (w[:, None] * flat).sum(0)
            if self.axis_name is not None:
                n = jax.lax.psum(n, self.axis_name)
                s1 = jax.lax.psum(s1, self.axis_name)
            mean = s1 / jnp.maximum(n, 1.0)
            s2 = (w[:, None] * jnp.square(flat - mean)).sum(0)
            if self.axis_name is not None:
                s2 = jax.lax.psum(s2, self.axis_name)
            var = s2 / jnp.maximum(n, 1.0)
            if not self.is_initializing():
                unbiased = s2 / jnp.maximum(n - 1.0, 1.0)
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
                ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return y * scale + bias


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
    def __call__(self, x, cats: Sequence[jax.Array] = (), *, train: bool, mask=None):
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
                h = BatchNorm(axis_name=self.bn_axis_name, frozen=self.bn_frozen,
                              name=f"bn{i}")(
                    h, train=train, mask=mask)
            if self.use_layer_norm:
                h = layer_norm(h)
            h = nn.relu(h)
            if self.dropout_rate > 0:
                h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
            x = h
        return x

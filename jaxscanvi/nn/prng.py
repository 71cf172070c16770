"""Threefry random numbers as plain element-wise arithmetic.

On the CPU, JAX lowers its Threefry hash to a rolled loop (to keep compile
times down), which XLA runs as a while loop of small kernels: in a training
step that draws dropout masks and posterior noise that loop costs more than
the arithmetic. The same hash written out unrolled fuses into the kernel that
uses the bits. These functions reproduce ``jax.random.bits``, ``uniform``,
``bernoulli`` and ``normal`` bit for bit for Threefry keys (JAX's default,
with ``jax_threefry_partitionable``, its default since 0.5); for any other
key or setting, or where `backend` turns the ``prng`` kernel off (the
default off the CPU), they call ``jax.random`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import backend

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on uint32 arrays."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _key_words(key):
    """The two uint32 words of a Threefry key, or None for another generator
    (or when the written-out kernel is off)."""
    # (jax.config's flags are attributes set at run time: pyright does not see them)
    if not (jax.config.jax_threefry_partitionable and backend.kernels().prng):  # pyright: ignore[reportAttributeAccessIssue]
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(key)):
            return None
        key = jax.random.key_data(key)
    elif (
        key.shape[-1:] != (2,)
        or key.dtype != jnp.uint32
        or "threefry" not in str(jax.config.jax_default_prng_impl)  # pyright: ignore[reportAttributeAccessIssue]
    ):
        return None
    return key[..., 0], key[..., 1]


def bits(key, shape) -> jax.Array:
    """``jax.random.bits(key, shape)`` (uint32)."""
    words = _key_words(key)
    if words is None:
        return jax.random.bits(key, shape)
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:  # the counter's high word would be needed
        return jax.random.bits(key, shape)
    lo = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.uint32(0)
    b0, b1 = threefry2x32(words[0], words[1], jnp.zeros_like(lo), lo)
    return b0 ^ b1


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
    """``jax.random.uniform`` for float32."""
    if jnp.dtype(dtype) != jnp.float32 or not backend.kernels().prng:
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    b = bits(key, shape)
    one = np.array(1.0, np.float32).view(np.uint32)
    f = jax.lax.bitcast_convert_type((b >> np.uint32(9)) | one, jnp.float32) - 1.0
    minval = jnp.asarray(minval, jnp.float32)
    maxval = jnp.asarray(maxval, jnp.float32)
    return jnp.maximum(minval, f * (maxval - minval) + minval)


def bernoulli(key, p: float, shape) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)`` for a Python float p."""
    return uniform(key, shape) < jnp.float32(p)


def normal(key, shape, dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal`` for float32."""
    if jnp.dtype(dtype) != jnp.float32 or not backend.kernels().prng:
        return jax.random.normal(key, shape, dtype)
    lo = np.nextafter(np.float32(-1.0), np.float32(np.inf))
    # drawn flat, then shaped (the same numbers): XLA's CPU loops vectorise only
    # the last axis, and latent arrays end in a short one (10)
    u = uniform(key, (int(np.prod(shape, dtype=np.int64)),), jnp.float32, lo, 1.0)
    return (jnp.float32(np.sqrt(2)) * jax.lax.erf_inv(u)).reshape(shape)


# ------------------------------------------------------------- keys on the host
# Outside jit, jax.random.PRNGKey and fold_in each run a small compiled program
# (one more for a process to compile, trace and load); the same Threefry words
# come from numpy here. Raw uint32[2] keys, as jax.random.PRNGKey makes them.
_MASK = 0xFFFFFFFF


def host_key(seed: int) -> np.ndarray:
    """``np.asarray(jax.random.PRNGKey(seed))`` computed in numpy."""
    s = int(seed)
    x64 = jax.config.jax_enable_x64  # pyright: ignore[reportAttributeAccessIssue]  # a run-time flag
    hi = (s >> 32) & _MASK if x64 else 0  # JAX keeps 32 bits
    return np.array([hi, s & _MASK], np.uint32)


def host_fold_in(key, data: int) -> np.ndarray:
    """``np.asarray(jax.random.fold_in(key, data))`` for a raw Threefry key."""
    key = np.asarray(key, np.uint32)
    with np.errstate(over="ignore"):
        y0, y1 = threefry2x32(key[0], key[1], np.uint32(0), np.uint32(int(data) & _MASK))
    return np.array([y0, y1], np.uint32)


def host_keys_ok() -> bool:
    """Whether the keys JAX makes are raw Threefry words (its default), so
    `host_key` and `host_fold_in` stand for them."""
    return (
        # jax.config's flags are attributes set at run time: pyright does not see them
        "threefry" in str(jax.config.jax_default_prng_impl)  # pyright: ignore[reportAttributeAccessIssue]
        and not jax.config.jax_enable_custom_prng  # pyright: ignore[reportAttributeAccessIssue]
    )

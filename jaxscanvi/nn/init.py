"""The initialisers of jaxscanvi's modules, each able to describe its draw.

Called as usual they draw as before (`jax.random`). Inside `describing()`
they return a `Described` box instead: a placeholder array of the shape,
with what the value would be (a uniform or normal draw, or a constant) and
the order of the call. `model._init` reads those boxes from an abstract
trace of ``module.init`` and draws the values outside any per-model program.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

# the calls recorded so far, while `describing()` is on in this thread (a
# thread-local: `backend` keeps the package's one context variable)
_state = threading.local()


class Described(struct.PyTreeNode, nn.meta.AxisMetadata):
    """A variable's placeholder and what its value would be: ``kind`` is
    "uniform" (``args`` = (fan_in,)), "normal" ((stddev,)) or "fill" ((value,));
    ``order`` numbers the initialiser calls of one trace."""

    value: Any
    kind: str = struct.field(pytree_node=False)
    args: tuple = struct.field(pytree_node=False)
    order: int = struct.field(pytree_node=False)

    def unbox(self) -> Any:
        return self.value

    def replace_boxed(self, val) -> Described:
        return self.replace(value=val)

    def add_axis(self, index, params) -> Described:
        return self

    def remove_axis(self, index, params) -> Described:
        return self


@contextlib.contextmanager
def describing():
    """Initialisers called inside return `Described` boxes."""
    outer = getattr(_state, "calls", None)
    _state.calls = []
    try:
        yield
    finally:
        _state.calls = outer


def _described(kind: str, args: tuple, shape, dtype) -> Any:
    """A `Described` box while describing (typed Any: it stands in for an array), else None."""
    calls = getattr(_state, "calls", None)
    if calls is None:
        return None
    calls.append(kind)
    return Described(jnp.zeros(shape, dtype), kind, args, len(calls))


@dataclass(frozen=True)
class TorchUniform:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as ``torch.nn.Linear``."""

    fan_in: int

    def __call__(self, key, shape, dtype=jnp.float32) -> jax.Array:
        box = _described("uniform", (self.fan_in,), shape, dtype)
        if box is not None:
            return box
        bound = 1.0 / jnp.sqrt(max(self.fan_in, 1))
        return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclass(frozen=True)
class Normal:
    """N(0, stddev^2), as ``nn.initializers.normal(stddev)``."""

    stddev: float = 1.0

    def __call__(self, key, shape, dtype=jnp.float32) -> jax.Array:
        box = _described("normal", (self.stddev,), shape, dtype)
        if box is not None:
            return box
        return nn.initializers.normal(self.stddev)(key, shape, dtype)


@dataclass(frozen=True)
class Fill:
    """A constant; ``key`` is unused (None for a non-parameter variable)."""

    value: float

    def __call__(self, key, shape, dtype=jnp.float32) -> jax.Array:
        box = _described("fill", (self.value,), shape, dtype)
        if box is not None:
            return box
        return jnp.full(shape, self.value, dtype)

"""The program counter of benchmarks/first_epoch.py: one count per executable
JAX builds, none for a call that reuses one."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _programs import ProgramLog


def test_counts_each_new_shape_once():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    a3, a5 = jnp.ones(3), jnp.ones(5)  # made outside: their own programs are not counted
    with ProgramLog() as log:
        f(a3).block_until_ready()
        f(a3).block_until_ready()
        f(a5).block_until_ready()
    assert log.n_programs == 2
    assert log.by_name() == {"jit(<lambda>)": 2}
    snap = log.snapshot()
    assert snap["n_programs"] == 2 and snap["backend_s"] > 0 and snap["trace_s"] > 0


def test_stops_counting_after_the_block():
    g = jax.jit(lambda x: x * 7)
    with ProgramLog() as log:
        pass
    g(jnp.ones(4)).block_until_ready()
    assert log.n_programs == 0

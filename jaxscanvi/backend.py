"""Which hand-written kernels run, and in what precision, decided in one place.

The training step has a library path (``jax.random``, autodiff, a plain
optax update, the likelihood through autodiff) and hand-written kernels that
were tuned on one backend and pay only there:

=================  =========================================================
``prng``           Threefry written out as element-wise arithmetic
                   (`nn.prng`), instead of the CPU's rolled loop
``linear``         custom VJP of the dense layer (`nn.layers.linear`)
``batch_norm``     closed-form batch-norm backward (`nn.layers.batch_norm`)
``relu_dropout``   ReLU + dropout whose gradient needs no second mask
``deferred_adam``  each Adam update applied at the start of the next step
``fused_likelihood``  one custom-VJP pass for the dense NB/ZINB likelihood
``sparse_likelihood`` the likelihood's lgamma part over the list of
                   non-zeros instead of every entry (not a kernel, a choice
                   of layout; it needs the list, which sources then build)
``log1p_poly``     in the fused likelihood, log1p(exp(-|a|)) by a degree-9
                   polynomial on [0, 1] instead of XLA's log1p
=================  =========================================================

`defaults` picks them per backend from measurements (the CPU's from
``benchmarks/results/kernels_cpu*.json``, the GPU's from
``benchmarks/results/gpu/``); `use` overrides them for a
block of code, and the environment variable ``JAXSCANVI_KERNELS`` for a
process, e.g. ``JAXSCANVI_KERNELS=library`` (every kernel off),
``all``, or ``prng=0,fused_likelihood=1``.

The choice is read when a step is traced, from one context variable
(`_ACTIVE`), which `current` alone reads: the layers, the sampler and the
likelihood ask `kernels()` and `matmul_dtype()`, both `current()`'s fields.
`use` sets it for a block, `traced` for one function: whatever is active when
the function is built holds whenever JAX traces it. So the `Numerics` a
program is built under is a field of its compiled-function cache key
(`compile_cache.KernelKey`, `TrainStepKey`, `SweepMemberKey`); the epoch
programs' keys hold it through their step, which `traced` pinned to it
(docs/guide/internals.md, "The kernel choice").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .errors import InputError

PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Kernels:
    prng: bool = False
    linear: bool = False
    batch_norm: bool = False
    relu_dropout: bool = False
    deferred_adam: bool = False
    fused_likelihood: bool = False
    sparse_likelihood: bool = False
    log1p_poly: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def library(cls) -> Kernels:
        """Every hand-written kernel off; the dense likelihood."""
        return cls()

    @classmethod
    def every(cls) -> Kernels:
        return cls(**{n: True for n in cls.names()})


# Measured per backend. On the CPU (results/kernels_cpu*.json, scVI at batch
# 128) the fused likelihood pays most; no other kernel alone stood clear of
# the spread, but all of them together beat the library path plus the fused
# likelihood in 5 of 5 alternating rounds (median 1.14x), and the dense
# likelihood beats gathers and scatter-adds; `gpu_check.py --parts kernels`
# re-measures any backend. On an H200
# (results/gpu/gpu_check_h200.json, scVI at batch 128) the fused likelihood
# was the one kernel that stood clear of run-to-run spread (511k cells/s vs
# 390k-469k for three configurations that compute identically), and the
# non-zero list beat the dense likelihood on a 1M-cell epoch of CSR counts
# (0.67 vs 0.75 s); the others were within that spread, so the library path.
# log1p_poly, measured alone (results/step_parts_cpu.json): the fused ZINB
# pass and its gradients on 128 x 2,000 take 1.18 ms with it, 1.35 without,
# on the CPU; unmeasured on a GPU, where log1p is cheap, so off there.
# The GPU default below, as one configuration against the library path (scVI
# and scANVI, batch 128 and 1024, alternating): part "shipped" of
# benchmarks/results/gpu/gpu_check.json, written by `bash benchmarks/gpu_check.sh`
# (PENDING: no GPU session has run that part yet; until then the default rests
# on the per-kernel figures above).
# Other backends (TPU) keep the library path until measured there.
_DEFAULTS = {
    "cpu": Kernels(
        prng=True,
        linear=True,
        batch_norm=True,
        relu_dropout=True,
        deferred_adam=True,
        fused_likelihood=True,
        sparse_likelihood=False,
        log1p_poly=True,
    ),
    "gpu": Kernels(fused_likelihood=True, sparse_likelihood=True),
}
_FALLBACK = Kernels(sparse_likelihood=True)


def defaults(backend: str | None = None) -> Kernels:
    """The kernels a backend runs unless told otherwise."""
    return _DEFAULTS.get(backend or jax.default_backend(), _FALLBACK)


def parse(spec: str, base: Kernels) -> Kernels:
    """``"library"``, ``"all"``, or ``"name=0|1,..."`` applied to ``base``."""
    spec = spec.strip()
    if spec in ("", "default"):
        return base
    if spec == "library":
        return Kernels.library()
    if spec == "all":
        return Kernels.every()
    changes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip().lower()
        if name not in Kernels.names() or value not in ("0", "1", "on", "off", "true", "false"):
            raise InputError(
                "JAXSCANVI_KERNELS",
                spec,
                f"{part!r} is not name=0|1 with a name from {list(Kernels.names())}",
                "set e.g. JAXSCANVI_KERNELS='prng=0,linear=1', 'library' or 'all', or unset it",
            )
        changes[name] = value in ("1", "on", "true")
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Everything about how a step computes that is fixed when it is traced."""

    kernels: Kernels
    precision: str = "float32"

    @property
    def matmul_dtype(self):
        return jnp.bfloat16 if self.precision == "bfloat16" else None


# The one context of the kernel choice: set by `use` (a block) and `traced` (a
# function), read by `current` alone. None: the backend's defaults, changed by
# JAXSCANVI_KERNELS.
_ACTIVE: contextvars.ContextVar[Numerics | None] = contextvars.ContextVar(
    "jaxscanvi_numerics", default=None
)


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise InputError(
            "precision",
            precision,
            f"not one of {list(PRECISIONS)}",
            "pass precision='float32' (default) or 'bfloat16' (bf16 matrix "
            "products with float32 accumulation; the rest stays float32)",
        )
    return precision


def current(precision: str | None = None) -> Numerics:
    """What a function built now will trace with (the only reader of `_ACTIVE`)."""
    active = _ACTIVE.get()
    if active is not None:
        if precision is None or precision == active.precision:
            return active
        return dataclasses.replace(active, precision=check_precision(precision))
    kernels = parse(os.environ.get("JAXSCANVI_KERNELS", ""), defaults())
    return Numerics(kernels, check_precision(precision or "float32"))


def kernels() -> Kernels:
    """The kernels of `current`: what a layer being traced now runs."""
    return current().kernels


def matmul_dtype():
    """The matmul dtype of `current` (None: float32)."""
    return current().matmul_dtype


@contextlib.contextmanager
def use(kernels: Kernels | str | None = None, precision: str | None = None):
    """Run a block with these kernels (a `Kernels`, or a `parse` spec) and precision."""
    base = current()
    if isinstance(kernels, str):
        kernels = parse(kernels, base.kernels)
    new = Numerics(
        kernels or base.kernels, check_precision(precision) if precision else base.precision
    )
    token = _ACTIVE.set(new)
    try:
        yield new
    finally:
        _ACTIVE.reset(token)


def traced(fn: Callable, numerics: Numerics) -> Callable:
    """``fn`` that always runs (and so is traced) under ``numerics``."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        token = _ACTIVE.set(numerics)
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return run

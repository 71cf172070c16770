"""A module's initial variables, without a program per model.

``module.init`` compiled as one program per model costs a user a backend
compile per model (reference, scANVI, each query) and, warm, a load each;
its forward pass is dead code there, so the program is the parameter draws
alone. Here an abstract trace of ``module.init`` under `nn.init.describing`
says what each variable is (a uniform or normal draw, or a constant), the
keys Flax would hand each initialiser are derived on the host, and every
draw comes from one small program shared by all models (`_draw_rows`).
The values are those of ``module.init`` bit for bit (tests/test_init.py).
A module that cannot be described (a user's encoder or decoder, another
initialiser, another PRNG setting) is initialised by ``module.init`` as before.
"""

from __future__ import annotations

import functools
import hashlib
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..compile_cache import InitDrawKey, InitKey, exported, functions
from ..data.batch import Batch, NonZeros
from ..nn import prng
from ..nn.init import Described, describing
from . import _plan_store
from ._plan_store import Leaf

# init runs once per model: skip XLA's backend optimisation, which would
# otherwise take most of the construction time (same values either way)
_INIT_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# the draw program's block: ROWS rows of CHUNK consecutive values of one key
ROWS, CHUNK = 64, 4096


def dummy_batch(n_genes: int, n_cont: int, n_cat: int) -> Batch:
    """Two cells of numpy arrays (jnp.ones would compile a program per shape)."""
    B, f, i = 2, np.float32, np.int32
    return Batch(
        x=np.ones((B, n_genes), f),
        nz=NonZeros(np.zeros(1, i), np.zeros(1, i), np.zeros(1, f)),
        weight=np.ones(B, f),
        batch=np.zeros(B, i),
        labels=np.zeros(B, i),
        cat_covs=np.zeros((B, n_cat), i),
        cont_covs=np.zeros((B, n_cont), f),
        log_size_factor=np.zeros(B, f),
        log_library=np.ones(B, f),
        lgamma_const=np.zeros(B, f),
    )


def _module_batch(module) -> Batch:
    c = module.config
    return dummy_batch(c.n_genes, c.n_continuous_cov, len(c.n_cats_per_cov))


def _full_init(module, key, batch):
    k1, k2, k3 = jax.random.split(key, 3)
    return module.init({"params": k1, "sample": k2, "dropout": k3}, batch, train=False)


@functools.lru_cache(maxsize=32)
def _described(module) -> dict:
    """``module.init``'s variables traced abstractly with describing
    initialisers: `Described` boxes where jaxscanvi's initialisers ran."""
    key = np.zeros(2, np.uint32)
    with describing():
        return jax.eval_shape(partial(_full_init, module), key, _module_batch(module))


def variable_shapes(module) -> dict:
    """The variables `init_variables` would make, as shapes and dtypes only:
    from the plan, else traced abstractly; nothing of their size is allocated."""
    plan = _plan(module)
    if plan is not None:
        tree, leaves = plan
        structs = [jax.ShapeDtypeStruct(leaf.shape, jnp.float32) for leaf in leaves]
        shapes = dict(jax.tree_util.tree_unflatten(tree, structs))
    else:
        shapes = dict(nn.meta.unbox(_described(module)))
    shapes.setdefault("batch_stats", {})
    const = jax.ShapeDtypeStruct((module.config.n_batch,), jnp.float32)
    shapes["constants"] = {"library_log_means": const, "library_log_vars": const}
    return shapes


def init_variables(
    module, n_genes: int, n_cont: int, n_cat: int, seed: int, constants: dict | None = None
):
    """Initialise a module's variables (as ``module.init`` on two dummy cells)."""
    plan = _plan(module) if (n_genes, n_cont, n_cat) == _shape_of(module) else None
    if plan is not None:
        # from the host: plain (uncommitted) arrays, as jit's
        variables = jax.tree_util.tree_map(jax.device_put, _draw(plan, seed))
    else:
        variables = _program_init(module, dummy_batch(n_genes, n_cont, n_cat), seed)
    variables.setdefault("batch_stats", {})
    if constants is not None:
        variables["constants"] = constants
    return variables


def _shape_of(module) -> tuple[int, int, int]:
    c = module.config
    return c.n_genes, c.n_continuous_cov, len(c.n_cats_per_cov)


# ---------------------------------------------------- the one-program-per-model path
def _program_init(module, batch, seed: int) -> dict:
    key = prng.host_key(seed) if prng.host_keys_ok() else jax.random.PRNGKey(seed)
    # initialisation draws with jax.random alone, so no backend pinning. The
    # key is split inside, so construction is this one program
    init = functions.get(InitKey(module), lambda: _init_program(module, key, batch))
    # an exported program's outputs come back committed to their device, which
    # would make training compile its epoch again on the next train() call;
    # through the host they are plain (uncommitted) arrays, as jit's
    # (parameters are megabytes, copied once per model)
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a)), dict(init(key, batch)))


def _init_program(module, key, batch):
    # through the exported-program cache where the module prints stably
    text = repr(module)
    if " at 0x" in text:
        return jax.jit(partial(_full_init, module), compiler_options=_INIT_OPTIONS)
    return exported(
        ("init", text), partial(_full_init, module), key, batch, compiler_options=_INIT_OPTIONS
    )


# ------------------------------------------------------------- the described path
def describable(module) -> bool:
    """Whether `init_variables` draws ``module``'s variables without a program of its own."""
    return _plan(module) is not None


@functools.lru_cache(maxsize=32)
def _plan(module) -> tuple[Any, tuple[Leaf, ...]] | None:
    """(tree structure, leaves) of the module's variables, or None where some
    variable is not described (or Flax's keys cannot be derived here).
    Kept on disk (`_plan_store`) where the module prints stably, so a warm
    process neither traces ``module.init`` nor describes it again."""
    if not _host_draws_ok() or getattr(module, "encoder_cls", None) is not None:
        return None
    if getattr(module, "decoder_cls", None) is not None:
        return None
    text = repr(module)
    stable = " at 0x" not in text  # an address differs in every process
    plan = _plan_store.load(text) if stable else None
    if plan is None:
        plan = _traced_plan(module)
        if plan is not None and stable:
            _plan_store.save(text, *plan)
    return plan


def _traced_plan(module) -> tuple[Any, tuple[Leaf, ...]] | None:
    is_box = lambda x: isinstance(x, Described)  # noqa: E731
    flat, tree = jax.tree_util.tree_flatten_with_path(_described(module), is_leaf=is_box)
    if not all(is_box(v) and v.value.dtype == jnp.float32 for _, v in flat):
        return None
    names = [tuple(str(getattr(p, "key", p)) for p in path) for path, _ in flat]
    # Flax counts the params made in each scope, in call order: a draw's key
    # folds in the scope's path and that count (flax.core.scope.Scope.make_rng)
    folds: dict[int, int] = {}
    counts: dict[tuple, int] = {}
    for i in sorted(range(len(flat)), key=lambda i: flat[i][1].order):
        if names[i][0] == "params":
            scope = names[i][1:-1]
            counts[scope] = counts.get(scope, 0) + 1
            folds[i] = _suffix_hash((*scope, counts[scope]))
        elif flat[i][1].kind != "fill":
            return None
    leaves = tuple(
        Leaf(box.kind, box.args, tuple(box.value.shape), folds.get(i))
        for i, (_, box) in enumerate(flat)
    )
    return tree, leaves


def _host_draws_ok() -> bool:
    """Threefry keys as raw words, split and drawn the partitionable way."""
    # (jax.config's flags are attributes set at run time: pyright does not see them)
    return prng.host_keys_ok() and bool(jax.config.jax_threefry_partitionable)  # pyright: ignore[reportAttributeAccessIssue]


def _suffix_hash(suffix: tuple) -> int:
    """The uint32 `flax.core.scope._fold_in_static` folds in for ``suffix``."""
    m = hashlib.sha1()
    for x in suffix:
        if flax.config.flax_fix_rng_separator:
            m.update(b"\0")
        if isinstance(x, str):
            m.update(x.encode("utf-8"))
        else:
            m.update(x.to_bytes((x.bit_length() + 7) // 8, byteorder="big"))
    return int.from_bytes(m.digest()[:4], byteorder="big")


def host_split(key, n: int) -> np.ndarray:
    """``np.asarray(jax.random.split(key, n))`` for a raw Threefry key
    (partitionable: key i hashes the counter (0, i))."""
    key = np.asarray(key, np.uint32)
    with np.errstate(over="ignore"):
        b0, b1 = prng.threefry2x32(
            key[0], key[1], np.zeros(n, np.uint32), np.arange(n, dtype=np.uint32)
        )
    return np.stack([b0, b1], axis=1)


def _draw(plan, seed: int) -> dict:
    tree, leaves = plan
    params_key = host_split(prng.host_key(seed), 3)[0]
    # per kind, rows of CHUNK values: (key word 0, key word 1, first counter, min, max)
    rows: dict[str, list] = {"uniform": [], "normal": []}
    spans = []
    for leaf in leaves:
        if leaf.kind == "fill":
            spans.append(None)
            continue
        assert leaf.fold is not None  # every draw is a parameter
        k = prng.host_fold_in(params_key, leaf.fold)
        if leaf.kind == "uniform":
            bound = np.float32(1.0) / np.sqrt(np.float32(max(leaf.args[0], 1)))
            lo, hi = -bound, bound
        else:  # jax.random.normal's uniform
            lo, hi = np.nextafter(np.float32(-1.0), np.float32(0.0)), np.float32(1.0)
        n = int(np.prod(leaf.shape, dtype=np.int64))
        spans.append((len(rows[leaf.kind]), n))
        rows[leaf.kind] += [(k[0], k[1], s, lo, hi) for s in range(0, n, CHUNK)]
    drawn = {kind: _draw_all(r, normal=kind == "normal") for kind, r in rows.items()}
    values = []
    for leaf, span in zip(leaves, spans):
        if span is None:
            values.append(np.full(leaf.shape, leaf.args[0], np.float32))
            continue
        first, n = span
        v = drawn[leaf.kind][first : first + -(-n // CHUNK)].reshape(-1)[:n].reshape(leaf.shape)
        values.append(v * np.float32(leaf.args[0]) if leaf.kind == "normal" else v)
    return dict(jax.tree_util.tree_unflatten(tree, values))


def _draw_all(rows, *, normal: bool) -> np.ndarray:
    """Every row's CHUNK values, ROWS rows per call."""
    if not rows:
        return np.zeros((0, CHUNK), np.float32)
    pad = [(0, 0, 0, 0.0, 0.0)] * (-len(rows) % ROWS)
    cols = list(zip(*(rows + pad)))
    args = [np.array(c, np.uint32) for c in cols[:3]] + [np.array(c, np.float32) for c in cols[3:]]
    fn = functions.get(InitDrawKey(ROWS, CHUNK), _draw_program)
    flag = np.array(normal)
    return np.concatenate(
        [
            np.asarray(fn(*(a[i : i + ROWS] for a in args), flag))
            for i in range(0, len(args[0]), ROWS)
        ]
    )


def _draw_program():
    z32, zf = np.zeros(ROWS, np.uint32), np.zeros(ROWS, np.float32)
    # the options of the per-model program: XLA's optimisation level changes
    # the uniform draws' last bits (a fused multiply-add), so the values stay
    return exported(
        ("init_draws", ROWS, CHUNK),
        _draw_rows,
        *(z32, z32, z32, zf, zf, np.array(True)),
        compiler_options=_INIT_OPTIONS,
    )


def _draw_rows(k0, k1, start, lo, hi, normal):
    """Row r: ``jax.random.uniform(key_r, (n,), minval=lo_r, maxval=hi_r)`` at
    positions start_r ... start_r + CHUNK - 1, bit for bit; with ``normal``,
    sqrt(2) erfinv of it (``jax.random.normal``, where lo and hi are its bounds)."""
    count = start[:, None] + jax.lax.broadcasted_iota(jnp.uint32, (ROWS, CHUNK), 1)
    b0, b1 = prng.threefry2x32(k0[:, None], k1[:, None], jnp.zeros_like(count), count)
    one = np.array(1.0, np.float32).view(np.uint32)
    f = jax.lax.bitcast_convert_type(((b0 ^ b1) >> np.uint32(9)) | one, jnp.float32) - 1.0
    lo, hi = lo[:, None], hi[:, None]
    u = jax.lax.max(lo, f * (hi - lo) + lo)
    return jax.lax.cond(
        normal, lambda u: np.float32(np.sqrt(2)) * jax.lax.erf_inv(u), lambda u: u, u
    )

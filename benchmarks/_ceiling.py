"""The GEMM-only ceiling of benchmarks/train_throughput.py: measured float32
GEMM GFLOP/s over the GEMM FLOPs of one training step per cell."""

from __future__ import annotations

import time

import numpy as np


def _time_best(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() over repeats calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(min(ts))


def measure_gemm(n: int = 2048, repeats: int = 10, layer_shapes=()) -> dict:
    """float32 GEMM GFLOP/s with numpy (BLAS) and jax (XLA), median and best."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    med, best = _time_best(lambda: a @ b, repeats)
    out = {
        "n": n,
        "numpy_gflops_median": flops / med / 1e9,
        "numpy_gflops_best": flops / best / 1e9,
    }
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    med, best = _time_best(lambda: dot(ja, jb).block_until_ready(), repeats)
    out.update({"jax_gflops_median": flops / med / 1e9, "jax_gflops_best": flops / best / 1e9})
    out["gflops"] = max(out["numpy_gflops_median"], out["jax_gflops_median"])
    shapes = {}
    for m, k, nn in layer_shapes:
        x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, nn), dtype=np.float32))
        med, _ = _time_best(lambda x=x, w=w: dot(x, w).block_until_ready(), max(repeats, 50))
        shapes[f"{m}x{k}x{nn}"] = 2.0 * m * k * nn / med / 1e9
    out["jax_gflops_layer_shapes"] = shapes
    return out


def flops_per_cell(model: str, G: int, H: int, L: int, n_batch: int, C: int) -> dict:
    """GEMM FLOPs of one training step per training cell (1 hidden layer, ZINB,
    dispersion='gene', observed library size, covariates one-hot into the decoder).

    forward MACs, scVI: encoder G*H + mean/var heads 2*H*L + decoder (L+n_batch)*H
    + px_scale and px_dropout heads 2*H*G. A step (forward + backward) is taken
    as 3 x forward, i.e. FLOPs = 6 x MACs.
    scANVI adds per main cell: classifier on z (L*H + H*C), C classes x
    [encoder z2|z1,y and decoder z1|z2,y: 2*((L+C)*H + 2*H*L)], and for the paired
    labelled cell: encoder G*H + 2*H*L + classifier L*H + H*C.
    """
    scvi_macs = G * H + 2 * H * L + (L + n_batch) * H + 2 * H * G
    if model == "scvi":
        macs = scvi_macs
        formula = "6*(G*H + 2*H*L + (L+n_batch)*H + 2*H*G)"
    else:
        macs = (
            scvi_macs
            + (L * H + H * C)
            + C * 2 * ((L + C) * H + 2 * H * L)
            + (G * H + 2 * H * L + L * H + H * C)
        )
        formula = "6*(scvi_macs + (L*H + H*C) + C*2*((L+C)*H + 2*H*L) + (G*H + 2*H*L + L*H + H*C))"
    return {
        "flops": 6.0 * macs,
        "formula": formula,
        "G": G,
        "H": H,
        "L": L,
        "n_batch": n_batch,
        "C": C,
    }

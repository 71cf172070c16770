"""Two parts of a scANVI training step, timed alone on this backend.

* ``likelihood``: the fused ZINB log-likelihood and its gradients on a
  B x G minibatch, with the ``log1p_poly`` kernel on and off
  (`jaxscanvi.backend`), and the same forward pass alone (what validation
  runs).
* ``class_bounds``: scANVI's class terms (`losses.class_bounds`: the
  (class, cell) grid through q(u|z1,c) and p(z1|u,c), training mode) and
  their gradients, for C classes.

Each is jitted as a ``fori_loop`` of ``--steps`` evaluations, so XLA keeps its
buffers across them as in a training epoch; the arms alternate for
``--rounds`` rounds and the median per evaluation is reported. The JSON goes
to ``results/step_parts_<backend>.json``.

    python benchmarks/step_parts.py            # B = 128, G = 2,000, C = 6
    python benchmarks/step_parts.py --smoke    # tiny, for CI
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def per_eval_ms(fn, args, steps: int) -> float:
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / steps * 1e3


def likelihood_arms(B: int, G: int, steps: int):
    """{arm: (jitted loop, args)}: fused ZINB forward+backward with log1p_poly
    on and off, and the forward pass alone."""
    import jax
    import jax.numpy as jnp

    from jaxscanvi import backend
    from jaxscanvi.distributions import log_zinb

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.poisson(rng.gamma(0.3, 2.0, (B, G))).astype(np.float32))
    args = (
        jnp.asarray(rng.normal(-1, 2, (B, G)), jnp.float32),
        jnp.asarray(rng.normal(0, 1.5, G), jnp.float32),
        jnp.asarray(rng.normal(-2, 2, (B, G)), jnp.float32),
    )

    def make_grad_loop():  # a new function per arm: JAX caches traces by function
        def grad_loop(a):
            g = jax.grad(lambda *p: -log_zinb(x, *p).sum(), argnums=(0, 1, 2))

            def body(i, c):  # tiny dependent updates keep every gradient live
                return tuple(p + 1e-9 * d for p, d in zip(c, g(*c)))

            return jax.lax.fori_loop(0, steps, body, a)

        return grad_loop

    def value_loop(a):
        def body(i, c):
            m, t, z = c
            return m + 1e-9 * log_zinb(x, m, t, z)[:, None], t, z

        return jax.lax.fori_loop(0, steps, body, a)

    arms = {}
    for on in (True, False):
        with backend.use(f"log1p_poly={int(on)}"):
            fn = jax.jit(make_grad_loop()).lower(args).compile()
        arms[f"fwd+bwd log1p_poly={'on' if on else 'off'}"] = (fn, (args,))
    fn = jax.jit(value_loop).lower(args).compile()
    arms["forward (default kernels)"] = (fn, (args,))
    return arms


def class_bound_arms(B: int, C: int, steps: int):
    import jax
    import jax.numpy as jnp

    from jaxscanvi.losses.scanvi import class_bounds
    from jaxscanvi.module_scanvi import SCANVAE, SCANVIConfig

    module = SCANVAE(SCANVIConfig(n_genes=50, n_batch=2, n_labels=C))
    z1 = jax.random.normal(jax.random.PRNGKey(1), (B, module.config.n_latent))
    w = jnp.ones(B)
    keys = dict(zip(("params", "sample", "dropout"), jax.random.split(jax.random.PRNGKey(0), 3)))
    v = module.init(
        keys, z1, jnp.zeros(1, jnp.int32), w[None], train=False, method=SCANVAE.class_grid
    )
    params, state = v["params"], {k: x for k, x in v.items() if k != "params"}

    def loss(p, z, key):
        nll, kl, _ = class_bounds(module, p, state, z, w, key, train=True)
        return (nll + kl).sum()

    g = jax.grad(loss, argnums=(0, 1))

    def loop(p, z):
        def body(i, c):
            gp, gz = g(*c, jax.random.PRNGKey(i))
            return jax.tree_util.tree_map(lambda a, b: a - 1e-6 * b, c[0], gp), c[1] - 1e-6 * gz

        return jax.lax.fori_loop(0, steps, body, (p, z))

    fn = jax.jit(loop).lower(params, z1).compile()
    return {f"class bounds fwd+bwd (C={C})": (fn, (params, z1))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--steps", type=int, default=200, help="evaluations per timed call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.genes, args.classes, args.steps, args.rounds = 8, 30, 3, 2, 2
    import jax

    arms = {
        **likelihood_arms(args.batch, args.genes, args.steps),
        **class_bound_arms(args.batch, args.classes, args.steps),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for fn, a in arms.values():  # warm-up
        per_eval_ms(fn, a, args.steps)
    for _ in range(args.rounds):
        for name, (fn, a) in arms.items():
            times[name].append(per_eval_ms(fn, a, args.steps))
    res = {
        k: {"median_ms": float(np.median(v)), "min_ms": float(min(v)), "ms": v}
        for k, v in times.items()
    }
    on, off = (res[f"fwd+bwd log1p_poly={s}"]["median_ms"] for s in ("on", "off"))
    out = Path(args.out) if args.out else RESULTS / f"step_parts_{jax.default_backend()}.json"
    if args.smoke and not args.out:
        out = Path("/tmp") / out.name
    write_json(
        out,
        {
            "benchmark": "step_parts",
            "smoke": args.smoke,
            "args": vars(args),
            "machine": machine_info(),
            "versions": versions(),
            "results": res,
            "log1p_poly_off_over_on": off / on,
        },
    )
    print(
        format_table(
            ["part", "median ms", "min ms"],
            [[k, f"{v['median_ms']:.3f}", f"{v['min_ms']:.3f}"] for k, v in res.items()],
        )
    )
    print(f"log1p_poly: off / on = {off / on:.3f}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

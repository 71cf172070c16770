"""Where a training step's time goes on one device, and how far it is from a floor.

    bash benchmarks/gpu_check.sh --profile            # on a GPU; JSON + markdown in $OUT
    bash benchmarks/gpu_check.sh --profile --smoke    # tiny sizes, on the CPU (CI)

For scVI and scANVI (objective "scvi-tools", 70% of cells unlabelled) at
batch 128 and 1024, with the backend's shipped kernels: one epoch compiles,
one runs steady, and a third (``--steps`` steps) runs under
``jax.profiler.trace``. From the trace (``_trace.op_table``) come the 20
costliest operations by self time. XLA's ``cost_analysis()`` of the loss's
value-and-gradient program at the same batch (built from
``jaxscanvi.losses``, what the epoch program runs each step without the
optimizer) gives FLOPs and bytes per step, checked against a hand count of
the matrix products (`matmul_flops_per_cell`). The floor of a step is
max(FLOPs / peak FLOP/s, bytes / peak bandwidth): the H100's and H200's
datasheet numbers (`PEAKS`), or on the CPU peaks measured here
(`cpu_peaks`). Each row says how many times the floor the step took.

Writes ``gpu_profile.json`` (``gpu_profile_smoke.json``) and the same
tables as ``gpu_profile.md`` under ``--out`` (default ``$OUT``, else
``benchmarks/results/gpu``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine_info, versions, write_json
from _gpu_workers import ARCH, TRAIN_SIZE, _jax_model, anndata_for
from _trace import latest_trace, op_table

# dense datasheet peaks of the SXM parts (FLOP/s, bytes/s). Float32 matrix
# products run on tensor cores as TF32 unless precision is set "highest"
PEAKS = {
    "H100": {
        "fp32_flops": 67e12,
        "tf32_flops": 494.7e12,
        "bf16_flops": 989.4e12,
        "bandwidth": 3.35e12,
    },
    "H200": {
        "fp32_flops": 67e12,
        "tf32_flops": 494.7e12,
        "bf16_flops": 989.4e12,
        "bandwidth": 4.8e12,
    },
}
N_BATCH, N_LABELS = 2, 6  # gpu_check.anndata_for's batches and cell types


def matmul_flops_per_cell(
    model: str, G: int, H: int = 128, L: int = 10, n_batch: int = N_BATCH, C: int = N_LABELS
) -> dict:
    """Matrix-product FLOPs per cell of one training step, counted by hand (1 layer).

    Forward: encoder G->H and H->L twice (mean, variance); decoder (L + batch
    one-hot)->H and H->G twice (scale, zero-inflation). Backward: twice the
    forward, less the encoder's first product's input gradient. scANVI adds
    the classifier (L->H->C) and, per class c, q(u|z1,c) and p(z1|u,c), each
    (L + C)->H->L twice; and, per labelled cell (one labelled minibatch the
    size of the main one), the encoder and classifier again.
    """
    enc1, heads = 2 * G * H, 2 * 2 * H * L
    dec = 2 * (L + n_batch) * H + 2 * 2 * H * G
    fwd = enc1 + heads + dec
    if model == "scanvi":
        cls = 2 * L * H + 2 * H * C
        per_class = 2 * (2 * (L + C) * H + 2 * 2 * H * L)
        fwd += cls + C * per_class + (enc1 + heads + cls)
        step = 3 * fwd - 2 * enc1  # two first-layer products without an input gradient
    else:
        step = 3 * fwd - enc1
    return {"forward": fwd, "step": step}


def cpu_peaks() -> dict:
    """FLOP/s of a 1024^3 float32 product and bytes/s of summing 256 MiB (reads
    only, nothing allocated), best of 5."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    x = jnp.ones((1 << 26,), jnp.float32)
    total = jax.jit(lambda v: v.sum())
    out = {}
    for name, fn, arg, work in (
        ("fp32_flops", mm, a, 2 * 1024**3),
        ("bandwidth", total, x, x.size * 4),
    ):
        fn(arg).block_until_ready()
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            fn(arg).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[name] = work / best
    out["tf32_flops"] = out["fp32_flops"]
    return out


def device_peaks() -> tuple[str, dict]:
    import jax

    kind = jax.devices()[0].device_kind
    for name, peaks in PEAKS.items():
        if name in kind:
            return kind, {**peaks, "source": "datasheet (dense, SXM)"}
    return kind, {**cpu_peaks(), "source": "measured here (cpu_peaks)"}


def step_cost(m, model: str, B: int) -> dict:
    """XLA's cost analysis of the loss's value and gradient at batch ``B``."""
    import jax

    from jaxscanvi import losses

    n = m.adata.n_obs
    batch = m.minibatch(np.arange(B) % n)
    key = jax.random.PRNGKey(0)
    if model == "scvi":

        def f(p):
            return losses.scvi_elbo(m.module, p, m.state, batch, key, 1.0)
    else:
        lab = np.flatnonzero(m.adata.obs["labels_hidden"].astype(str) != "Unknown")
        pair = (batch, m.minibatch(lab[np.arange(B) % len(lab)]))

        def f(p):
            return losses.scanvi_elbo(m.module, p, m.state, pair, key, 1.0, objective="scvi-tools")

    compiled = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(m.params).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes": float(ca.get("bytes accessed", 0.0)),
        "transcendentals": float(ca.get("transcendentals", 0.0)),
    }


def profile_one(
    model: str, B: int, steps: int, n_genes: int, peaks: dict, trace_root: Path
) -> dict:
    import jax

    n_cells = math.ceil(B * steps / TRAIN_SIZE) + 1
    m, extra = _jax_model(anndata_for(n_cells, n_genes), model)
    kw = dict(
        batch_size=B,
        train_size=TRAIN_SIZE,
        progress_bar=False,
        seed=0,
        data_source="device",
        **extra,
    )
    m.train(max_epochs=1, **kw)  # compiles
    m.train(max_epochs=1, **kw)  # steady, untraced (each call starts a new history)
    epochs = [float(m.history.to_frame()["epoch_seconds"].iloc[-1])]
    folder = trace_root / f"{model}_b{B}"
    with jax.profiler.trace(str(folder)):
        m.train(max_epochs=1, **kw)
    epochs.append(float(m.history.to_frame()["epoch_seconds"].iloc[-1]))
    n_steps = math.ceil(len(m.train_indices) / B)
    ops = op_table(latest_trace(folder), top=20)
    cost = step_cost(m, model, B)
    hand = matmul_flops_per_cell(model, n_genes)
    step_s = epochs[0] / n_steps  # the untraced steady epoch
    # XLA's bytes count every operand of every operation, cached or not: the
    # bytes term is an estimate (an upper one where the step fits in cache);
    # the FLOP term is a strict floor
    flop_s, byte_s = cost["flops"] / peaks["tf32_flops"], cost["bytes"] / peaks["bandwidth"]
    floor_s = max(flop_s, byte_s)
    return {
        "model": model,
        "batch_size": B,
        "n_steps": n_steps,
        "epoch_seconds_steady_traced": epochs,
        "step_seconds": step_s,
        "traced_step_op_seconds": ops["op_seconds_total"] / n_steps,
        "step_flops": cost["flops"],
        "step_bytes": cost["bytes"],
        "flops_per_cell": cost["flops"] / B,
        "bytes_per_cell": cost["bytes"] / B,
        "hand_matmul_flops_per_cell": hand["step"],
        "xla_over_hand_flops": cost["flops"] / B / hand["step"],
        "floor_flops_seconds": flop_s,
        "floor_bytes_seconds": byte_s,
        "floor_seconds": floor_s,
        "bound": "flops" if flop_s >= byte_s else "bytes",
        "times_floor": step_s / floor_s if floor_s > 0 else None,
        "times_flop_floor": step_s / flop_s if flop_s > 0 else None,
        "ops": ops,
    }


def markdown(doc: dict) -> str:
    lines = [
        f"# Training-step profile: {doc['device_kind']}",
        "",
        f"Peaks ({doc['peaks']['source']}): {doc['peaks']['tf32_flops'] / 1e9:,.0f} "
        f"GFLOP/s (float32 products as TF32 on a GPU), "
        f"{doc['peaks']['bandwidth'] / 1e9:,.0f} GB/s. Floor = max(FLOPs / peak, "
        "bytes / bandwidth); XLA's bytes count cached operands too, so the bytes "
        "term can exceed a step that fits in cache, and x FLOP floor is the strict "
        "one.",
        "",
        "| model | batch | step ms | floor ms | x floor | x FLOP floor | bound | "
        "GFLOP/step | MB/step | FLOPs/cell (XLA) | matmul FLOPs/cell (hand) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["runs"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | error: {r['error'][:80]} | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['step_seconds'] * 1e3:.3f} | "
            f"{r['floor_seconds'] * 1e3:.4f} | {r['times_floor']:.1f} | "
            f"{r['times_flop_floor']:.1f} | {r['bound']} "
            f"| {r['step_flops'] / 1e9:.3f} | {r['step_bytes'] / 1e6:.1f} | "
            f"{r['flops_per_cell'] / 1e6:.2f} M | "
            f"{r['hand_matmul_flops_per_cell'] / 1e6:.2f} M |"
        )
    for r in doc["runs"]:
        if "error" in r:
            continue
        lines += [
            "",
            f"## {r['model']}, batch {r['batch_size']}: 20 costliest operations "
            f"({r['ops']['source']} events, {r['n_steps']} steps traced)",
            "",
            "| operation | calls | ms per step | share | FLOPs | bytes |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for o in r["ops"]["top"]:
            lines.append(
                f"| `{o['name'][:60]}` | {o['calls']} | "
                f"{o['seconds'] / r['n_steps'] * 1e3:.4f} | {o['share']:.1%} | "
                f"{o['flops'] if o['flops'] is not None else '-'} | "
                f"{o['bytes'] if o['bytes'] is not None else '-'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU")
    p.add_argument("--out", default=None, help="folder (default $OUT, else results/gpu)")
    p.add_argument("--steps", type=int, default=None, help="steps per traced epoch")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or HERE / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    import jax

    from jaxscanvi import backend

    G, sizes = (100, (32, 64)) if args.smoke else (2000, (128, 1024))
    steps = args.steps or (3 if args.smoke else 10)
    kind, peaks = device_peaks()
    doc = {
        "benchmark": "gpu_profile",
        "smoke": args.smoke,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "machine": machine_info(with_jax=False),
        "device_kind": kind,
        "backend": jax.default_backend(),
        "kernels": backend.current().kernels.__dict__,
        "peaks": peaks,
        "n_genes": G,
        "architecture": ARCH,
        "runs": [],
    }
    name = "gpu_profile_smoke" if args.smoke else "gpu_profile"
    traces = Path(tempfile.mkdtemp(prefix="jaxscanvi_profile_"))
    try:
        for model in ("scvi", "scanvi"):
            for B in sizes:
                print(f"{model} batch {B} ...", flush=True)
                try:
                    doc["runs"].append(profile_one(model, B, steps, G, peaks, traces))
                except Exception as e:  # noqa: BLE001 - one failure leaves the other runs
                    doc["runs"].append(
                        {
                            "model": model,
                            "batch_size": B,
                            "error": f"{type(e).__name__}: {e}"[:2000],
                        }
                    )
                write_json(out / f"{name}.json", doc)
    finally:
        shutil.rmtree(traces, ignore_errors=True)
    (out / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out / name}.json and .md")
    return 0 if all("error" not in r for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

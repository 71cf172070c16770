"""The GPU benchmark: jaxscanvi against scvi-tools on one accelerator, in one run.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu      # on a GPU ($OUT if set)
    bash benchmarks/gpu_check.sh --profile   # the step profile instead (gpu_profile.py)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke      # anywhere, tiny
    python benchmarks/gpu_check.py --cpu     # the kernel ablation on a CPU (kernels_cpu.json)

Parts, in order of value, each in its own subprocess with its own time
limit, so a failure or a timeout in one still leaves the others (every
result is written to the JSON as soon as it exists):

1. ``throughput``: SCVI and SCANVI (70% of cells unlabelled) cells/s at
   batch sizes 128, 1024 and 4096 on 100k cells x 2,000 genes, the
   backend's default kernels, float32.
1b. ``shipped``: the kernels the package ships on this backend
   (``backend.defaults()``) as one configuration against the library
   path, alternating, scVI and scANVI at batch 128 and 1024: the figure
   ``backend.py`` cites for its GPU default.
2. ``scvi_tools``: scvi-tools on the same data and device, for the ratio.
3. ``epoch_1m``: one epoch of 1M cells x 2,000 genes (5% non-zero) at
   batch 1024, counts resident on the device as CSR.
4. ``kernels``: SCVI at batch 128 with each hand-written kernel
   (`jaxscanvi.backend`) on alone over the library path, every kernel on,
   and the library path with the list-of-non-zeros likelihood.
5. ``precision``: float32 vs bfloat16 cells/s at batch 1024 and 4096, and
   the validation ELBO after the same training in each.
6. ``atlas_10m``: 10M cells x 2,000 genes (5% non-zero) as sparse counts
   on the device, one training epoch at batch 4096.
7. ``sweep``: 16 SCVI models at batch 128 trained as one vmapped program
   (`jaxscanvi.sweep.train_many`) against 16 sequential ``train()`` calls,
   the arms alternating (benchmarks/sweep.py's).

Data: 100k cells of random counts (each gene non-zero in 5% of cells on
average, with a per-gene rate; values 1 + Poisson), 2 batches, 6 labels;
larger sets tile that block. cells/s = training cells per epoch x steady
epochs / their seconds; the first epoch (compilation) is reported apart.
The parent writes ``gpu_check.json`` under ``--out`` after every part and
prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import format_table, machine_info, parser, versions, write_json
from _gpu_workers import worker_kernels, worker_precision, worker_shipped, worker_throughput
from _gpu_workers_big import worker_big, worker_scvi_tools, worker_sources, worker_sweep

WORKERS = {
    "throughput": worker_throughput,
    "shipped": worker_shipped,
    "scvi_tools": worker_scvi_tools,
    "epoch_1m": worker_big,
    "kernels": worker_kernels,
    "precision": worker_precision,
    "atlas_10m": worker_big,
    "sweep": worker_sweep,
    "sources": worker_sources,
}


# ----------------------------------------------------------------- parent
def plan(smoke: bool) -> list[tuple[str, dict, float]]:
    """(part, spec, time limit in seconds) in the order they run."""
    G = 2000
    if smoke:
        s = dict(n_cells=600, n_genes=100)
        return [
            ("throughput", dict(s, models=["scvi", "scanvi"], batch_sizes=[128], epochs=2), 300),
            (
                "shipped",
                dict(s, models=["scvi", "scanvi"], batch_sizes=[128], epochs=1, rounds=1),
                300,
            ),
            ("scvi_tools", dict(s, models=["scvi"], batch_sizes=[128], epochs=1), 300),
            (
                "epoch_1m",
                dict(n_cells=2000, n_genes=100, batch_size=256, epochs=2, flip_sparse=True),
                200,
            ),
            ("kernels", dict(s, batch_size=128, epochs=1, rounds=2, max_configs=4), 600),
            ("precision", dict(s, batch_sizes=[256], epochs=2), 300),
            ("atlas_10m", dict(n_cells=4000, n_genes=100, batch_size=512, epochs=1), 200),
            ("sweep", dict(s, k=2, batch_size=128, epochs=1, repeats=1), 300),
            ("sources", dict(s, batch_size=128, epochs=2, rounds=1), 300),
        ]
    return [
        (
            "throughput",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024, 4096],
                epochs=2,
            ),
            150,
        ),
        (
            "shipped",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024],
                epochs=3,
                rounds=2,
            ),
            200,
        ),
        (
            "scvi_tools",
            dict(
                n_cells=100_000,
                n_genes=G,
                models=["scvi", "scanvi"],
                batch_sizes=[128, 1024],
                epochs=1,
            ),
            120,
        ),
        (
            "epoch_1m",
            dict(n_cells=1_000_000, n_genes=G, batch_size=1024, epochs=2, flip_sparse=True),
            100,
        ),
        ("kernels", dict(n_cells=100_000, n_genes=G, batch_size=128, epochs=2, rounds=2), 120),
        ("precision", dict(n_cells=100_000, n_genes=G, batch_sizes=[1024, 4096], epochs=3), 75),
        ("atlas_10m", dict(n_cells=10_000_000, n_genes=G, batch_size=4096, epochs=1), 200),
        ("sweep", dict(n_cells=20_000, n_genes=G, k=16, batch_size=128, epochs=2, repeats=2), 150),
        ("sources", dict(n_cells=100_000, n_genes=G, batch_size=1024, epochs=3, rounds=2), 150),
    ]


def plan_cpu() -> list[tuple[str, dict, float]]:
    """The kernel ablation at a size a 2-core CPU measures in minutes."""
    # an epoch takes about 1 s here: 6 timed epochs x 3 interleaved rounds keep
    # the spread between rounds near the few-percent effects being measured
    return [
        (
            "kernels",
            dict(
                n_cells=20_000, n_genes=2000, batch_size=128, epochs=6, rounds=3, default_minus=True
            ),
            3000,
        )
    ]


def run_part(part: str, spec: dict, limit: float, tmp: Path) -> dict:
    out = tmp / f"{part}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        part,
        "--spec",
        json.dumps(spec),
        "--worker-out",
        str(out),
    ]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status, tail = (
            ("ok" if p.returncode == 0 else f"exit {p.returncode}"),
            (p.stdout + p.stderr)[-3000:],
        )
    except subprocess.TimeoutExpired as e:
        out_text = (e.stdout or b"") + (e.stderr or b"")
        if isinstance(out_text, bytes):
            out_text = out_text.decode(errors="replace")
        status, tail = f"timeout after {limit:.0f} s", out_text[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    env = next((r["env"] for r in recs if "env" in r), None)
    return {
        "spec": spec,
        "status": status,
        "seconds": time.perf_counter() - t,
        "env": env,
        "results": [r for r in recs if "env" not in r],
        "log_tail": tail if status != "ok" else None,
    }


def _row(name, cells_per_s, ratio, seconds, r: dict, ref=None) -> list:
    """A table row: run, jax cells/s, scvi-tools cells/s, ratio, first epoch s, error."""
    return [name, cells_per_s, ref, ratio, seconds, r.get("error", "")[:40]]


def _rows_throughput(parts: dict) -> list[list]:
    ref = {
        (r["model"], r["batch_size"]): r.get("cells_per_s")
        for r in parts.get("scvi_tools", {}).get("results", [])
    }
    rows = []
    for r in parts.get("throughput", {}).get("results", []):
        c, s = r.get("cells_per_s"), ref.get((r["model"], r["batch_size"]))
        name = f"{r['model']} b{r['batch_size']}"
        rows.append(_row(name, c, c / s if c and s else None, r.get("first_epoch_seconds"), r, s))
    for name in ("epoch_1m", "atlas_10m"):
        for r in parts.get(name, {}).get("results", []):
            if "stage" in r:
                continue
            e = r.get("epoch_seconds") or [None]
            lay = "sparse" if r.get("sparse_likelihood") else "dense"
            label = f"{name} b{r['batch_size']} {lay} (epoch s)"
            rows.append(_row(label, r.get("cells_per_s_last_epoch"), None, e[-1], r))
    return rows


def _rows_ablations(parts: dict) -> list[list]:
    rows = []
    for r in parts.get("shipped", {}).get("results", []):
        name = f"{r['config']} {r['model']} b{r['batch_size']} ({r['round']})"
        rows.append(_row(name, r.get("cells_per_s"), None, r.get("first_epoch_seconds"), r))
    for r in parts.get("kernels", {}).get("results", []):
        name = f"kernels {r['config']} ({r.get('round', 0)})"
        rows.append(_row(name, r.get("cells_per_s"), None, r.get("first_epoch_seconds"), r))
    for r in parts.get("sweep", {}).get("results", []):
        if "stage" in r:
            continue
        name = f"sweep K={r['k']} b{r['batch_size']} ({r['repeat']}): vmapped / sequential s"
        rows.append(_row(name, None, r.get("ratio_seconds"), None, r))
    res = parts.get("sources", {}).get("results", [])
    resident = [r.get("cells_per_s") for r in res if r.get("source") == "device"]
    for r in res:
        c, base = r.get("cells_per_s"), (resident or [None])[0]
        name = f"source {r['source']} b{r['batch_size']} ({r['round']})"
        rows.append(
            _row(name, c, c / base if c and base else None, r.get("first_epoch_seconds"), r)
        )
    for r in parts.get("precision", {}).get("results", []):
        name = (
            f"{r['precision']} b{r['batch_size']} (val elbo "
            f"{r.get('validation_elbo_float32_eval', float('nan')):.2f})"
        )
        rows.append(_row(name, r.get("cells_per_s"), None, r.get("first_epoch_seconds"), r))
    return rows


def summary(parts: dict) -> list[list]:
    return _rows_throughput(parts) + _rows_ablations(parts)


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, paragraph=False)
    p.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="the kernel ablation sized for a CPU; writes kernels_cpu.json",
    )
    p.add_argument(
        "--out", default=None, help="folder for the JSON (results/gpu, or results with --cpu)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all parts; a part that would overrun is cut short",
    )
    p.add_argument("--parts", nargs="+", choices=list(WORKERS), default=None)
    p.add_argument("--worker")
    p.add_argument("--spec")
    p.add_argument("--worker-out")
    return p


def run_parts(args, doc: dict, path: Path) -> None:
    """Each planned part in a process of its own, within the budget; the JSON
    rewritten after each."""
    tmp = path.parent / "parts"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for part, spec, limit in plan_cpu() if args.cpu else plan(args.smoke):
        if args.parts and part not in args.parts:
            continue
        left = args.budget - (time.perf_counter() - t0)
        if left < 20:
            doc["parts"][part] = {"spec": spec, "status": "skipped: budget spent"}
            continue
        print(
            f"[{time.perf_counter() - t0:6.1f} s] {part} (limit {min(limit, left):.0f} s)",
            flush=True,
        )
        doc["parts"][part] = run_part(part, spec, min(limit, left), tmp)
        print(
            f"           {doc['parts'][part]['status']}, {doc['parts'][part]['seconds']:.1f} s",
            flush=True,
        )
        doc["total_seconds"] = time.perf_counter() - t0
        write_json(path, doc)
    doc["total_seconds"] = time.perf_counter() - t0
    write_json(path, doc)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.spec), Path(args.worker_out))
        return 0
    if args.budget is None:
        args.budget = 3600.0 if args.cpu else 450.0
    out_dir = Path(
        args.out
        or (not args.cpu and os.environ.get("OUT"))
        or HERE / "results" / ("" if args.cpu else "gpu")
    )
    name = (
        "gpu_check_smoke.json"
        if args.smoke
        else "kernels_cpu.json"
        if args.cpu
        else "gpu_check.json"
    )
    doc = {
        "benchmark": "gpu_check",
        "smoke": args.smoke,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "machine": machine_info(with_jax=False),
        "nvidia_smi": _nvidia_smi(),
        "parts": {},
    }
    run_parts(args, doc, out_dir / name)
    print(
        format_table(
            ["run", "jax cells/s", "scvi-tools cells/s", "ratio", "first epoch s", "error"],
            summary(doc["parts"]),
        )
    )
    print(f"wrote {out_dir / name} ({doc['total_seconds']:.0f} s)")
    return 0


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())

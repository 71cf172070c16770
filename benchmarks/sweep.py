"""K models in one program (`jaxscanvi.sweep.train_many`) against K
sequential `train()` calls: same data, architecture, epochs and seeds.

Arms, for each K:

* ``sequential``: for s in 0..K-1, ``SCVI(adata, seed=s).train(seed=s, ...)``;
* ``vmapped``: ``sweep.train_many(lambda s: SCVI(adata, seed=s), seeds=range(K),
  ...)`` (shared minibatch order, the default), and with ``--per-model`` also
  ``order="per_model"`` (each member its own order, K gathers per step). Its
  ``vectorize="auto"`` vmaps on accelerators and runs members in turn on the
  CPU (before that default, this arm was vmapped on the CPU too).

Each arm is warmed up once (``max_epochs=1``: it compiles) and then timed
over ``--epochs`` epochs, wall clock from the first model's construction to
the K-th trained model (construction, training, what train() does after),
the process's CPU time over the same span (less sensitive to other jobs on
the machine than wall time, but blind to how many cores ran at once; its
ratio to wall time, ``sequential_cpu_per_wall``, says how many cores one
run keeps busy), and
separately the epochs alone (the sum of ``history["epoch_seconds"]``;
for the sweep, one member's, since its epochs are shared). The two arms
alternate, in swapped order each repeat, so a machine shared with other jobs
slows both alike; the JSON keeps every repeat and the median ratio
vmapped / sequential (below 1: the sweep is faster).

With ``--cold``, instead: compilation included. Each arm runs in a fresh
process with the compilation caches off (JAXSCANVI_COMPILATION_CACHE=0), and
is timed from the first model's construction to the K-th trained model:
``sequential`` (K ``train()`` calls), ``sweep`` (``train_many`` as a user
calls it, ``vectorize="auto"``: members in turn on the CPU) and ``vmapped``
(``vectorize=True``), alternating in rotated order each repeat; with
``--adata``, on that file's counts (its ``--n-genes`` most variable genes).
The result goes under ``"cold_start"`` in the JSON, beside what it held.

With ``--ensemble``, instead: K scANVI members (seeds 0..K-1, one sweep,
each with its own split and order) on a simulated atlas, or ``--adata``'s
counts on its ``--n-genes`` most variable genes, with a third of the labels
hidden, and the accuracy and
expected calibration error (10 bins) on the hidden cells of each member and
of their average (`sweep.ensemble_calibration`), written to
``results/sweep_ensemble.json``.

With ``--trace``, instead: the XLA operation time (thread-seconds, from a
`jax.profiler` trace) of one ``train()`` run and of a K-member sweep, and
their ratio per member, written to ``results/sweep_trace.json``: whether a
member costs the sweep less work than a run of its own.

Usage:
    python benchmarks/sweep.py                 # 3,000 cells x 2,000 genes, K = 1, 4, 16
    python benchmarks/sweep.py --ensemble --ks 5 --adata ../shared/data/pbmc3k.h5ad --epochs 20
    python benchmarks/sweep.py --smoke         # seconds: a check that it runs
    python benchmarks/sweep.py --trace --ks 4 --n-cells 12000   # XLA work per member
    python benchmarks/sweep.py --batch-size 128 --ks 16 --n-cells 20000   # on a GPU
    python benchmarks/sweep.py --cold --ks 4 --adata ../shared/data/pbmc_3k_4k.h5ad
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    args_record,
    format_table,
    loadavg,
    machine_info,
    parser,
    round_order,
    versions,
    write_json,
)
from _sweep_arms import ARCH, ensemble, load_counts, sequential, trace, vmapped

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sweep.json"


def write_side(args, name: str, res: dict) -> None:
    """The JSON of a mode other than the timings (--ensemble, --trace)."""
    write_json(
        args.out,
        {
            "benchmark": name,
            "machine": machine_info(),
            "versions": versions(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "architecture": ARCH,
            "result": res,
        },
    )


COLD_ARMS = {"sequential": None, "sweep": "auto", "vmapped": True}


def cold_worker(args) -> int:
    """One arm, compilation included, in this fresh process: prints its timings."""
    import jaxscanvi as js

    adata = load_counts(js, args)
    batch = "batch" if "batch" in adata.obs else None
    js.SCVI.setup_anndata(adata, batch_key=batch)
    train = dict(max_epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, devices=1)
    k, arm = args.ks[0], args.worker
    res = (
        sequential(js, adata, k, train)
        if arm == "sequential"
        else vmapped(js, adata, k, train, "shared", COLD_ARMS[arm])
    )
    print("RESULT " + json.dumps({**res, "n_obs": adata.n_obs, "n_vars": adata.n_vars}))
    return 0


def cold(args) -> dict:
    """Every arm in a fresh process per repeat, the arms' order rotating."""
    env = {**os.environ, "JAXSCANVI_COMPILATION_CACHE": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    base = [
        sys.executable,
        __file__,
        "--ks",
        str(args.ks[0]),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--n-genes",
        str(args.n_genes),
        "--n-cells",
        str(args.n_cells),
    ] + (["--adata", args.adata] if args.adata else [])
    arms, reps = list(COLD_ARMS), []
    for r in range(args.repeats):
        rec = {"repeat": r, "loadavg": loadavg()}
        for arm in round_order(arms, r, rotate=True):
            out = subprocess.run(
                [*base, "--worker", arm], env=env, check=True, capture_output=True, text=True
            ).stdout
            rec[arm] = json.loads(out.split("RESULT ", 1)[1])
            print(f"K={args.ks[0]} repeat {r} {arm}: {rec[arm]['seconds']:.1f} s", flush=True)
        reps.append(rec)
    res = {
        "k": args.ks[0],
        "epochs": args.epochs,
        "adata": args.adata,
        "n_obs": reps[0]["sequential"]["n_obs"],
        "n_vars": reps[0]["sequential"]["n_vars"],
        "machine": machine_info(),
        "repeats": reps,
    }
    for arm in ("sweep", "vmapped"):
        for what in ("seconds", "cpu_seconds"):
            res[f"ratio_{arm}_{what}"] = float(
                np.median([x[arm][what] / x["sequential"][what] for x in reps])
            )
    res["loadavg_at_end"] = loadavg()
    return res


def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__, paragraph=False)
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per-model", action="store_true", help="also time order='per_model'")
    p.add_argument("--smoke", action="store_true", help="tiny data, K=1 and 2, 1 epoch")
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="scANVI ensemble calibration instead of timings (K = max of --ks)",
    )
    p.add_argument(
        "--adata", help="--ensemble on this .h5ad of raw counts (default: a simulated atlas)"
    )
    p.add_argument("--labels-key", default="cell_type")
    p.add_argument(
        "--trace",
        action="store_true",
        help="instead: XLA operation time per member, a sweep of K = max of "
        "--ks against one run (results/sweep_trace.json)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="instead: K = first of --ks, compilation included, each arm in a "
        "fresh process (under 'cold_start' in the JSON)",
    )
    p.add_argument("--worker", choices=list(COLD_ARMS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main_cold(args) -> int:
    res = cold(args)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["cold_start"] = {
        "args": args_record(args),
        "versions": versions(),
        "architecture": ARCH,
        **res,
    }
    write_json(args.out, doc)
    rows = [
        [
            res["k"],
            arm,
            np.median([x[arm]["seconds"] for x in res["repeats"]]),
            res.get(f"ratio_{arm}_seconds", 1.0),
            res.get(f"ratio_{arm}_cpu_seconds", 1.0),
        ]
        for arm in COLD_ARMS
    ]
    print(
        format_table(
            ["K", "arm", "median s", "ratio to sequential (wall)", "ratio (CPU time)"], rows
        )
    )
    print(f"wrote {args.out}")
    return 0


def main_ensemble(js, args) -> int:
    if args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name("sweep_ensemble.json")
    res = ensemble(js, args)
    write_side(args, "sweep_ensemble", res)
    members = zip(res["accuracy_members"], res["ece_members"])
    print(
        format_table(
            ["", "accuracy", "ECE"],
            [["ensemble", res["accuracy_ensemble"], res["ece_ensemble"]]]
            + [[f"member {i}", a, e] for i, (a, e) in enumerate(members)],
        )
    )
    print(f"wrote {args.out}")
    return 0


def main_trace(js, adata, args, train: dict) -> int:
    if args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.with_name("sweep_trace.json")
    res = trace(js, adata, max(args.ks), train)
    write_side(args, "sweep_trace", res)
    keys = ("k", "op_seconds_single_run", "op_seconds_sweep", "op_seconds_ratio_per_member")
    print(
        format_table(
            ["K", "op s, one run", "op s, sweep", "per member ratio"], [[res[k] for k in keys]]
        )
    )
    print(f"wrote {args.out}")
    return 0


def time_k(js, adata, args, k: int, orders: list[str], train: dict) -> tuple[dict, list]:
    """The arms for one K, warmed up, then alternating over the repeats; the
    result for the JSON and the table's rows."""
    warm = {**train, "max_epochs": 1}
    sequential(js, adata, 1, warm)  # compiles the single-run epoch (shared by all K)
    for order in orders:
        vmapped(js, adata, k, warm, order)  # compiles the K-member epoch
    reps = []
    for r in range(args.repeats):
        rec = {"repeat": r, "loadavg": loadavg()}
        for arm in round_order(["sequential", *orders], r):
            rec[arm] = (
                sequential(js, adata, k, train)
                if arm == "sequential"
                else vmapped(js, adata, k, train, arm)
            )
            print(f"K={k} repeat {r} {arm}: {rec[arm]['seconds']:.1f} s", flush=True)
        reps.append(rec)
    res, rows = {"k": k, "repeats": reps}, []
    for order in orders:
        for what in ("seconds", "cpu_seconds", "epoch_seconds"):
            ratios = [r[order][what] / r["sequential"][what] for r in reps]
            res[f"ratio_{order}_{what}"] = float(np.median(ratios))
        rows.append(
            [
                k,
                order,
                np.median([r["sequential"]["seconds"] for r in reps]),
                np.median([r[order]["seconds"] for r in reps]),
                *(res[f"ratio_{order}_{w}"] for w in ("seconds", "cpu_seconds", "epoch_seconds")),
            ]
        )
    # how many of the machine's cores one run keeps busy: near all of them,
    # a sweep cannot win by filling idle ones
    res["sequential_cpu_per_wall"] = float(
        np.median([r["sequential"]["cpu_seconds"] / r["sequential"]["seconds"] for r in reps])
    )
    return res, rows


TABLE = [
    "K",
    "order",
    "sequential s",
    "vmapped s",
    "ratio (wall)",
    "ratio (CPU time)",
    "ratio (epochs)",
]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return cold_worker(args)
    if args.cold:
        return main_cold(args)
    if args.smoke:
        args.n_cells, args.n_genes, args.epochs, args.ks, args.repeats = 300, 200, 1, [1, 2], 1
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("sweep_smoke.json")
    import jaxscanvi as js

    if args.ensemble:
        return main_ensemble(js, args)
    adata = load_counts(js, args)
    js.SCVI.setup_anndata(adata, batch_key="batch" if "batch" in adata.obs else None)
    train = dict(max_epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, devices=1)
    if args.trace:
        return main_trace(js, adata, args, train)
    orders = ["shared"] + (["per_model"] if args.per_model else [])
    doc = {
        "benchmark": "sweep",
        "args": args_record(args),
        "machine": machine_info(),
        "versions": versions(),
        "architecture": ARCH,
        "results": [],
    }
    if args.out.exists():  # the cold-start figures stay beside the warm ones
        doc.update({k: v for k, v in json.loads(args.out.read_text()).items() if k == "cold_start"})
    t_start = time.perf_counter()
    rows = []
    for k in args.ks:
        res, k_rows = time_k(js, adata, args, k, orders, train)
        rows += k_rows
        doc["results"].append(res)
        write_json(args.out, doc)
    doc["total_seconds"] = time.perf_counter() - t_start
    doc["loadavg_at_end"] = loadavg()
    write_json(args.out, doc)
    print(format_table(TABLE, rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

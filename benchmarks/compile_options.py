"""XLA CPU compile options for the device epoch program: compile time against
steady epoch time, and whether the trajectory stays the same.

Each arm is a set of XLA options (``jax.jit(..., compiler_options=...)``)
given to the train and eval epoch programs only (`compile_cache.exported`'s
``compiler_options``), in a fresh process with the persistent cache off, so
every arm compiles. The model is scANVI from an scVI model on
benchmarks/first_epoch.py's reference (2,072 cells x 2,000 genes), the
architecture of that benchmark; ``first train`` is ``train(max_epochs=1)``
(its backend compile seconds from ``jax.monitoring``), ``steady`` the mean
epoch of a following ``train(max_epochs=E)``. Arms alternate round by round.
An option is worth adopting only where compile time drops, the steady epoch
does not slow, and the ELBO trajectory is bit-identical to the default's.

Usage:
    python benchmarks/compile_options.py            # 2 rounds, 6 steady epochs
    python benchmarks/compile_options.py --quick    # 600 + 300 cells x 200 genes, 1 round
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_smoke,
    add_worker_args,
    args_record,
    machine_info,
    parser,
    round_order,
    run_worker,
    versions,
    write_json,
)
from _first_epoch_worker import ARCH, make_data

SCRIPT = Path(__file__).resolve()
DEFAULT_OUT = SCRIPT.parent / "results" / "compile_options.json"
ARMS = {
    "default": {},
    "no_expensive_llvm": {"xla_llvm_disable_expensive_passes": True},
    "opt_level_1": {"xla_backend_optimization_level": 1},
    "opt_level_0": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True},
}


def worker(spec: dict) -> dict:
    import warnings

    import anndata as ad
    from _programs import ProgramLog

    import jaxscanvi._export_cache as E
    from jaxscanvi import SCANVI, SCVI

    warnings.simplefilter("ignore")
    real, opts = E.exported, spec["options"]

    def with_options(key, fn, *args, compiler_options=None):
        if isinstance(key, tuple) and key[:1] == ("device-epoch",):
            compiler_options = opts or None
        return real(key, fn, *args, compiler_options=compiler_options)

    E.exported = with_options  # what CarryProgram calls
    ref = ad.read_h5ad(spec["ref"])
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="labels")
    m = SCANVI.from_scvi_model(SCVI(ref, **ARCH, seed=0), unlabeled_category="Unknown")
    kw = dict(batch_size=128, progress_bar=False, seed=0)
    t = time.perf_counter()
    with ProgramLog() as log:
        m.train(max_epochs=1, **kw)
    first = time.perf_counter() - t
    t = time.perf_counter()
    m.train(max_epochs=spec["epochs"], **kw)
    steady = (time.perf_counter() - t) / spec["epochs"]
    return {
        "first_train_s": first,
        "backend_compile_s": log.snapshot()["backend_s"],
        "steady_epoch_s": steady,
        "elbo_train": [float(x) for x in m.history["elbo_train"].to_numpy().ravel()],
    }


def summarise(runs: dict) -> dict:
    base = runs["default"]
    out = {}
    for arm, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in ("first_train_s", "backend_compile_s", "steady_epoch_s")
        }
        same = all(r["elbo_train"] == base[0]["elbo_train"] for r in rs)
        out[arm] = {
            "options": ARMS[arm],
            "median": med,
            "compile_over_default": med["backend_compile_s"]
            / statistics.median(r["backend_compile_s"] for r in base),
            "steady_over_default": med["steady_epoch_s"]
            / statistics.median(r["steady_epoch_s"] for r in base),
            "same_trajectory": same,
        }
    return out


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6, help="epochs of the steady train()")
    p.add_argument("--timeout", type=float, default=900)
    add_smoke(p, "smoke run: 600 + 300 cells x 200 genes, one round")
    add_worker_args(p)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    n_ref, n_query, n_genes = (600, 300, 200) if args.quick else (2000, 1000, 2000)
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), n_ref, n_query, n_genes, 0.5)
        runs: dict = {arm: [] for arm in ARMS}
        for r in range(rounds):
            for arm in round_order(ARMS, r):
                spec = {"ref": str(Path(tmp) / "ref.h5ad"), "options": ARMS[arm]}
                spec["epochs"] = args.epochs
                env = {"JAXSCANVI_COMPILATION_CACHE": "0"}
                res = run_worker(SCRIPT, spec, args.timeout, env)
                if "error" in res:
                    raise SystemExit(f"{arm}: {res['error']}\n{res['log_tail']}")
                runs[arm].append(res)
                print(arm, {k: v for k, v in res.items() if k != "elbo_train"}, flush=True)
    result = {
        "versions": versions(),
        "machine": machine_info(),
        "args": args_record(args, skip="worker"),
        "data": data,
        "method": __doc__.split("Usage:")[0].strip(),
        "summary": summarise(runs),
        "runs": runs,
    }
    print(json.dumps(result["summary"], indent=1))
    print("wrote", write_json(args.out, result))


if __name__ == "__main__":
    main()

"""Atlas scale: a million cells in memory, ten million streamed from disk,
scANVI with many cell types, and 1 vs 2 devices.

Each part runs in a fresh process, so its peak RSS is its own:

1. ``memory``: a synthetic sparse atlas (default 1,000,000 cells x 2,000
   genes) built straight into CSR, one epoch of scVI (batch 128,
   ``data_source="auto"``); cells/s and peak RSS against the CSR's size.
2. ``stream``: the default 10,000,000 cells written block by block to a
   backed ``.h5ad`` (never whole in memory), then ``--stream-steps`` steps of
   a block-shuffled epoch over all of them, through the streaming source and
   the model's compiled training step; cells/s and RSS sampled every second
   (flat = no growth), against the same number of steps through the host
   source on as many cells loaded into memory.
3. ``classes``: scANVI step time and peak RSS for C = 10, 100, 500 cell types.
4. ``devices``: one scVI epoch on 1 and on 2 forced CPU devices, with the
   counts dense on the device (the default for data this small) and as CSR,
   and the bytes of cells each device holds (each holds its own slice).

Run: ``python benchmarks/scale.py`` (all parts; about 25 minutes and 10 GB of
disk here) or ``--parts memory classes``; prints a table per part and writes
``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import format_table, machine_info, parser, versions, write_json
from _scale_workers import WORKERS, write_backed

DEFAULT_OUT = HERE / "results" / "scale.json"


def spawn(name: str, env: dict | None = None, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--kwargs", json.dumps(kw)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {name} failed:\n{res.stderr[-3000:]}")


# ------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--parts", nargs="+", default=["memory", "stream", "classes", "devices"])
    p.add_argument("--memory-cells", type=int, default=1_000_000)
    p.add_argument("--stream-cells", type=int, default=10_000_000)
    p.add_argument(
        "--stream-nnz",
        type=float,
        default=60.0,
        help="mean non-zeros per cell of the streamed file",
    )
    p.add_argument("--stream-steps", type=int, default=2000)
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--mean-nnz", type=float, default=300.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 500])
    p.add_argument("--classes-cells", type=int, default=5000)
    p.add_argument("--devices-cells", type=int, default=20000)
    p.add_argument("--tmp", default=None, help="folder for the streamed file")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument(
        "--smoke",
        action="store_true",
        help="every part on tiny sizes, seconds each: a check that it runs "
        "(writes scale_smoke.json unless --out)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", help=argparse.SUPPRESS)
    return p


def part_memory(args) -> dict:
    r = spawn(
        "memory",
        n_cells=args.memory_cells,
        n_genes=args.n_genes,
        mean_nnz=args.mean_nnz,
        batch_size=args.batch_size,
    )
    headers = ["cells", "CSR MB", "epoch s (incl. compile)", "cells/s", "peak RSS MB"]
    keys = ["n_cells", "csr_mb", "epoch_seconds_incl_compile", "cells_per_second", "peak_rss_mb"]
    headers.append("peak RSS / CSR")
    keys.append("peak_rss_over_csr")
    print(format_table(headers, [[r[k] for k in keys]]), flush=True)
    return r


def part_stream(args) -> dict:
    B, steps = args.batch_size, args.stream_steps
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        path = Path(d) / "atlas.h5ad"
        w = write_backed(path, args.stream_cells, args.n_genes, args.stream_nnz)
        s = spawn("stream", path=str(path), n_steps=steps, batch_size=B)
        m = spawn("in_memory_steps", path=str(path), n_steps=steps, batch_size=B)
    row = [
        s["n_cells_in_file"],
        w["file_mb"],
        s["steps"],
        s["cells_per_second"],
        m["cells_per_second"],
        f"{s['rss_first_mb']}/{s['rss_last_mb']}/{s['rss_max_mb']}",
    ]
    headers = ["cells in file", "file MB", "steps", "stream cells/s", "in-memory cells/s"]
    print(format_table([*headers, "RSS first/last/max MB"], [row]), flush=True)
    return {
        "file": w,
        "streamed": s,
        "in_memory": m,
        "ratio_stream_over_memory": round(s["cells_per_second"] / m["cells_per_second"], 3),
    }


def part_classes(args) -> list[dict]:
    kw = dict(n_cells=args.classes_cells, n_genes=args.n_genes, batch_size=args.batch_size)
    rows = [spawn("classes", n_labels=c, **kw) for c in args.classes]
    print(
        format_table(
            ["C", "step ms", "epoch s", "peak RSS MB"],
            [[r["n_labels"], r["step_ms"], r["epoch_seconds"], r["peak_rss_mb"]] for r in rows],
        ),
        flush=True,
    )
    return rows


def part_devices(args) -> list[dict]:
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    kw = dict(n_cells=args.devices_cells, n_genes=args.n_genes, batch_size=args.batch_size)
    rows = [
        spawn("devices", env=env, n_devices=n, **kw, layout=layout)
        for layout in ("auto", "csr")
        for n in (1, 2)
    ]
    keys = ["devices", "layout", "epoch_seconds", "cells_per_second", "csr_mb"]
    keys.append("data_mb_per_device")
    print(
        format_table(
            ["devices", "layout", "epoch s", "cells/s", "CSR MB", "data MB per device"],
            [[r[k] for k in keys] for r in rows],
        ),
        flush=True,
    )
    return rows


PARTS = {"memory": part_memory, "stream": part_stream, "classes": part_classes}
PARTS["devices"] = part_devices


def smoke(args) -> None:
    """Tiny sizes for every part (CI's check that the script runs)."""
    args.memory_cells, args.stream_cells, args.stream_steps = 2000, 20_000, 20
    args.n_genes, args.mean_nnz, args.stream_nnz = 100, 20.0, 10.0
    args.classes, args.classes_cells, args.devices_cells = [3, 6], 600, 1000
    if args.out == str(DEFAULT_OUT):
        args.out = str(DEFAULT_OUT.with_name("scale_smoke.json"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](**json.loads(args.kwargs))))
        return 0
    if args.smoke:
        smoke(args)
    out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out.update(
        {
            "versions": versions(),
            "machine": machine_info(with_jax=False),
            "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
        }
    )
    for name, part in PARTS.items():  # in this order, whatever the order of --parts
        if name in args.parts:
            out[name] = part(args)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

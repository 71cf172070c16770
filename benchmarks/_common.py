"""Helpers shared by the benchmark scripts: argument parsing, worker processes,
alternating A/B rounds, environment record, memory, metrics, paired
intervals, JSON output.

Nothing here imports scvi-tools or torch; the scripts import them only inside
the code paths that compare against scvi-tools.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACKAGES = (
    "jaxscanvi",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpyro",
    "numpy",
    "scipy",
    "pandas",
    "anndata",
    "scvi-tools",
    "torch",
    "lightning",
    "psutil",
)


def have_scvi_tools() -> bool:
    """True where ``import scvi`` would find scvi-tools (without importing it)."""
    return (
        importlib.util.find_spec("scvi") is not None
        and importlib.util.find_spec("torch") is not None
    )


def scvi_tools_session(seed: int, threads: int):
    """``(scvi, torch)`` imported, Lightning's and scvi-tools' loggers quiet,
    torch's threads and scvi-tools' seed set: how every comparison starts."""
    import logging

    import scvi
    import torch

    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    scvi.settings.seed = seed
    return scvi, torch


# scvi-tools' train() on the CPU, quiet, as every comparison calls it
SCVI_TOOLS_CPU = dict(
    enable_progress_bar=False, accelerator="cpu", devices=1, enable_model_summary=False
)


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def machine_info(with_jax: bool = True) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cores(),
        "mem_total_gb": _mem_total_gb(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python_executable": sys.executable,
        "env": {
            k: os.environ[k]
            for k in (
                "XLA_FLAGS",
                "JAX_PLATFORMS",
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    if with_jax:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ------------------------------------------------------ arguments and workers
def parser(doc: str, *, paragraph: bool = True) -> argparse.ArgumentParser:
    """A script's parser, described by its docstring's first paragraph (or line)."""
    head = doc.split("\n\n" if paragraph else "\n")[0]
    return argparse.ArgumentParser(
        description=head, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_smoke(p: argparse.ArgumentParser, help: str) -> None:
    """``--quick`` and its alias ``--smoke`` (``args.quick``): the run CI makes."""
    p.add_argument("--quick", "--smoke", dest="quick", action="store_true", help=help)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The hidden ``--worker SPEC_JSON --worker-out PATH`` of a script's own workers."""
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)


def args_record(args: argparse.Namespace, skip: str | None = None) -> dict:
    """The arguments for the JSON (paths as strings; names starting ``skip`` left out)."""
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if not (skip and k.startswith(skip))
    }


def run_worker(
    script,
    spec: dict,
    timeout: float | None = None,
    env: dict | None = None,
    python: str | None = None,
) -> dict:
    """Run ``script --worker SPEC --worker-out FILE`` in a fresh process (of
    ``python``, else this one's) and read its JSON back, with ``process_seconds``
    (wall time of the process). A failure gives ``{"error", "log_tail",
    "process_seconds"}``."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [python or sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", out]
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", str(e)[-3000:]
    wall = time.perf_counter() - t
    try:
        if rc != 0:
            return {"error": f"worker exit {rc}", "log_tail": tail, "process_seconds": wall}
        res = json.loads(Path(out).read_text())
        res["process_seconds"] = wall
        return res
    finally:
        Path(out).unlink(missing_ok=True)


def round_order(arms, r: int, *, rotate: bool = False) -> list:
    """The order of the arms in round ``r`` of alternating A/B runs: reversed in
    odd rounds (or, with ``rotate``, rotated by ``r``), so a machine shared with
    other jobs slows every arm alike."""
    arms = list(arms)
    if rotate:
        r %= len(arms)
        return arms[r:] + arms[:r]
    return arms[::-1] if r % 2 else arms


# --------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    On Linux this is VmHWM, the high-water mark of this process's own memory.
    ru_maxrss is not used there: it survives fork and exec, so a worker
    started by a parent holding a large dataset would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def current_rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return None


def memory_snapshot() -> dict:
    cur = current_rss_mb()
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_mb": None if cur is None else round(cur, 1),
    }


class Phases:
    """Wall time and memory at the end of each named phase of a worker."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.records: dict[str, dict] = {}

    def mark(self, name: str, **extra) -> dict:
        now = time.perf_counter()
        rec = {"seconds": round(now - self.last, 4), **memory_snapshot(), **extra}
        self.records[name] = rec
        self.last = now
        return rec


# ------------------------------------------------------------------- output
def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}" if abs(c) < 1 else f"{c:.2f}"
    return str(c)

"""Will a run fit in memory? Checked before anything is allocated or compiled.

Each estimate is a lower bound (what the run must hold at the least), so a
refusal is certain to be right; the error names the size and the remedy.
"""

from __future__ import annotations

import os

import jax

from ..errors import InputError

GIB = float(1 << 30)
# bytes per (cell, gene) that one training step holds at the least: the counts
# and three decoder outputs (mean, dispersion or dropout, log-likelihood), float32
STEP_BYTES_PER_ENTRY = 16


def host_memory_bytes() -> int:
    """Memory this host can still give (MemAvailable), or its total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes() -> tuple[int, str]:
    """(bytes, name) of the first device's memory; on the CPU, the host's."""
    dev = jax.devices()[0]
    try:
        limit = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 (CPU devices report no memory stats)
        limit = None
    if limit:  # the counts and the minibatch may be split over every local device
        n = jax.local_device_count()
        return int(limit) * n, f"the {n} {dev.platform.upper()}(s)"
    return host_memory_bytes(), "this host (free memory)"


def check(config, cells, module_config) -> None:
    """Refuse a run that cannot fit: its device copy of the counts, or one step."""
    mem, where = device_memory_bytes()
    G = cells.n_vars
    if config.data_source == "device":
        X = cells.X
        need = X.data.nbytes * 2 + X.indptr.nbytes + cells.n_obs * 64
        if need > mem:
            raise InputError(
                "data_source",
                "device",
                f"the counts need {need / GIB:.1f} GiB on the "
                f"device ({cells.n_obs} cells, {X.nnz} non-zeros), more than {where} has "
                f"({mem / GIB:.1f} GiB)",
                "pass data_source='host' (a minibatch is copied "
                "per step), or 'stream' with a backed AnnData (anndata.read_h5ad(path, "
                "backed='r')), or keep fewer genes",
            )
    cells_per_step = min(config.batch_size, cells.n_obs)
    classes = 1
    if hasattr(module_config, "class_chunk_size"):  # scANVI enumerates cell types
        classes = min(module_config.n_labels, module_config.class_chunk_size)
    need = cells_per_step * G * classes * STEP_BYTES_PER_ENTRY
    if need > mem:
        per_class = f" x {classes} cell types enumerated at once" if classes > 1 else ""
        raise InputError(
            "batch_size",
            config.batch_size,
            f"one training step needs at least "
            f"{need / GIB:.1f} GiB ({cells_per_step} cells x {G} genes{per_class} x "
            f"{STEP_BYTES_PER_ENTRY} bytes), more than {where} has ({mem / GIB:.1f} GiB)",
            "pass a smaller batch_size, keep fewer genes (e.g. highly variable ones)"
            + (", or a smaller class_chunk_size" if classes > 1 else ""),
        )

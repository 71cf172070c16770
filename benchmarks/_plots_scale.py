"""Scaling figures: cells, classes, and streamed memory. Drawn by benchmarks/plots.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker
import numpy as np
from _plots_common import (
    GREY,
    JAX,
    JAX2,
    REF,
    Skip,
    label_bars,
    load,
    machine,
    plt,
    save,
    source,
)


def _scale_cpu_points(results: Path) -> list[tuple]:
    """(n_cells, cells_per_s, peak_gb, data_gb, label) of the CPU runs."""
    cpu = []
    t = load(results, "train_throughput.json", required=False)
    if t and t.get("summary"):
        s = next(
            (
                s
                for s in t["summary"]
                if s["framework"] == "jaxscanvi" and s["model"] == "scvi" and s["batch_size"] == 128
            ),
            None,
        )
        if s:
            print("  " + source("train_throughput.json", t))
            cpu.append(
                (
                    t["data"]["n_cells"],
                    s["cells_per_s"],
                    s["peak_rss_mb"] / 1024,
                    None,
                    "in RAM, batch 128",
                )
            )
    sc = load(results, "scale.json", required=False)
    if sc:
        print("  " + source("scale.json", sc))
        mem = sc.get("memory")
        if mem:
            cpu.append(
                (
                    mem["n_cells"],
                    mem["cells_per_second"],
                    mem["peak_rss_mb"] / 1024,
                    mem["csr_mb"] / 1024,
                    "CSR in RAM",
                )
            )
        st = (sc.get("stream") or {}).get("streamed")
        if st:
            cpu.append(
                (
                    st["n_cells_in_file"],
                    st["cells_per_second"],
                    st["rss_max_mb"] / 1024,
                    None,
                    f"streamed from disk\n({st.get('steps', '?')} steps)",
                )
            )
    return cpu


def _scale_gpu_points(results: Path) -> list[tuple]:
    """(n_cells, cells_per_s, peak_gb, data_gb, label) of the GPU runs."""
    gpu = []
    g = load(results, "gpu/gpu_check_h200.json", required=False)
    gname = "gpu/gpu_check_h200.json"
    if g:
        print("  " + source(gname, g))
        tp = g["parts"].get("throughput") or {}
        for r in tp.get("results") or []:
            if r["model"] == "scvi" and r["batch_size"] == 1024:
                gpu.append(
                    (
                        r["n_cells"],
                        r["cells_per_s"],
                        r["device_memory"]["peak_bytes_in_use"] / 2**30,
                        None,
                        "dense on device\nbatch 1024",
                    )
                )
        e1 = g["parts"].get("epoch_1m") or {}
        for r in e1.get("results") or []:
            if r.get("sparse_likelihood") is True and r.get("cells_per_s_last_epoch"):
                gpu.append(
                    (
                        r["n_cells"],
                        r["cells_per_s_last_epoch"],
                        r["device_memory"]["peak_bytes_in_use"] / 2**30,
                        r["csr_bytes"] / 2**30,
                        f"CSR on device\nbatch {r['batch_size']}",
                    )
                )
    for name in ("gpu/gpu_check_h200_atlas_10m.json", gname):
        a = load(results, name, required=False)
        part = ((a or {}).get("parts") or {}).get("atlas_10m") or {}
        done = [r for r in part.get("results") or [] if r.get("cells_per_s_last_epoch")]
        if part.get("status") == "ok" and done:
            r = done[-1]
            print("  " + source(name, a))
            gpu.append(
                (
                    r["n_cells"],
                    r["cells_per_s_last_epoch"],
                    r["device_memory"]["peak_bytes_in_use"] / 2**30,
                    r["csr_bytes"] / 2**30,
                    f"CSR on device\nbatch {r['batch_size']}",
                )
            )
            break
        if part:
            print(f"  note: {name}: atlas_10m status {part.get('status')!r}, not used")
    return gpu


def _draw_scale_points(axes, pts, color, mk, lab, dy) -> None:
    pts = sorted(pts)
    n = [p[0] for p in pts]
    axes[0].plot(n, [p[1] for p in pts], mk, color=color, label=lab.split(" (")[0])
    axes[1].plot(n, [p[2] for p in pts], mk, color=color, label=f"peak, {lab}")
    dn = [(p[0], p[3]) for p in pts if p[3] is not None]
    if dn:
        axes[1].plot(
            *zip(*dn),
            mk,
            mfc="none",
            color=color,
            ms=8,
            label=f"data size, {lab.split(' (')[0]}",
        )
    for p in pts:
        axes[0].annotate(
            f"{p[1]:,.0f}/s\n{p[4]}",
            (p[0], p[1]),
            xytext=(0, 8 * dy),
            textcoords="offset points",
            fontsize=6.5,
            color=color,
            ha="center",
            va="bottom" if dy > 0 else "top",
        )
        axes[1].annotate(
            f"{p[2]:.1f} GiB",
            (p[0], p[2]),
            xytext=(7, 0),
            textcoords="offset points",
            fontsize=6.5,
            color=color,
            va="center",
        )


def _scale_axes(axes) -> None:
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells in the data set (log)")
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel("scVI training cells / s (log)")
    axes[0].set_title("scVI throughput against data size")
    axes[1].set_ylabel("GiB (log)")
    axes[1].set_title("peak memory against data size")
    axes[0].legend(frameon=False, loc="center left")
    axes[1].legend(frameon=False, loc="upper left", fontsize=7)
    axes[0].set_xlim(axes[0].get_xlim()[0] / 2, axes[0].get_xlim()[1] * 2)
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo / 3, hi * 3)
    axes[1].set_xlim(right=axes[1].get_xlim()[1] * 3)
    lo, hi = axes[1].get_ylim()
    axes[1].set_yticks([t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if lo <= t <= hi])
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def fig_scale_cells(results: Path, out: Path) -> None:
    """Throughput and peak memory against the number of cells (CPU and GPU)."""
    cpu = _scale_cpu_points(results)
    gpu = _scale_gpu_points(results)
    if not cpu and not gpu:
        raise Skip("no scale figures in the JSON")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for pts, color, mk, lab, dy in (
        (cpu, JAX, "o", "CPU (host RSS)", -1),
        (gpu, "#2a9d8f", "s", "H200 (device memory)", 1),
    ):
        if pts:
            _draw_scale_points(axes, pts, color, mk, lab, dy)
    _scale_axes(axes)
    fig.tight_layout()
    save(fig, out, "scale_cells")


def _classes_step(ax, cl, c) -> None:
    ax.plot(c, [r["step_ms"] for r in cl], "o-", color=JAX, label="step (ms)")
    ax.plot(
        c,
        [r["first_epoch_seconds"] * 1000 / r["steps_per_epoch"] for r in cl],
        "s--",
        color=GREY,
        label="first epoch / steps (ms, incl. compile)",
    )
    for r in cl:
        ax.annotate(
            f"{r['step_ms']:.0f} ms",
            (r["n_labels"], r["step_ms"]),
            xytext=(4, -10),
            textcoords="offset points",
            fontsize=7,
            color=JAX,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cell types C (log)")
    ax.set_ylabel("ms per training step (log)")
    ax.set_ylim(min(r["step_ms"] for r in cl) / 2.5, ax.get_ylim()[1] * 1.5)
    ax.set_title(
        f"scANVI step against C\n{cl[0]['n_cells']:,} cells, "
        f"{cl[0]['steps_per_epoch']} steps per epoch"
    )
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.3)


def _classes_memory(ax, cl, c) -> None:
    ax.plot(c, [r["peak_rss_mb"] for r in cl], "o-", color=JAX, label="peak RSS")
    ax.plot(
        c,
        [r["peak_rss_before_training_mb"] for r in cl],
        "s--",
        color=GREY,
        label="peak RSS before training",
    )
    for r in cl:
        ax.annotate(
            f"{r['peak_rss_mb']:,.0f}",
            (r["n_labels"], r["peak_rss_mb"]),
            xytext=(0, 5),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_ylim(0, max(r["peak_rss_mb"] for r in cl) * 1.25)
    ax.set_xlabel("cell types C (log)")
    ax.set_ylabel("MB")
    ax.set_title("scANVI host memory against C")
    ax.legend(frameon=False, fontsize=7, loc="lower right")


def _classes_devices(ax, d: dict, dev: list) -> None:
    b = ax.bar(
        [str(r["devices"]) for r in dev],
        [r["cells_per_second"] for r in dev],
        color=[JAX, JAX2][: len(dev)],
    )
    label_bars(ax, b)
    ax.set_xlabel("forced host devices\n(data parallel)")
    ax.set_ylabel("training cells / s")
    cores = (d.get("machine") or {}).get("cpus_usable")
    ax.set_title(f"devices on {cores} cores" if cores else "devices")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)


def fig_scale_classes(results: Path, out: Path) -> None:
    """scANVI step time and memory against the number of cell types; forced devices."""
    name = "scale.json"
    d = load(results, name)
    print("  " + source(name, d))
    cl = d.get("classes")
    if not cl:
        raise Skip(f"{name} has no 'classes' part")
    dev = d.get("devices") or []
    fig, axes = plt.subplots(
        1,
        3 if dev else 2,
        figsize=(10.5 if dev else 7.5, 3.5),
        gridspec_kw={"width_ratios": [1, 1, 0.6][: 3 if dev else 2]},
    )
    c = [r["n_labels"] for r in cl]
    _classes_step(axes[0], cl, c)
    _classes_memory(axes[1], cl, c)
    if dev:
        _classes_devices(axes[2], d, dev)
    fig.suptitle(f"{name}: {machine(d)}", fontsize=9)
    fig.tight_layout()
    save(fig, out, "scale_classes")


def fig_stream(results: Path, out: Path) -> None:
    """Host RSS while streaming the 10M-cell file from disk."""
    name = "scale.json"
    d = load(results, name)
    st = d.get("stream") or {}
    s = st.get("streamed") or {}
    trace = s.get("rss_trace_mb")
    if not trace:
        raise Skip(f"{name} has no stream.streamed.rss_trace_mb")
    print("  " + source(name, d))
    fig, ax = plt.subplots(figsize=(6.2, 3.2))
    steps = s.get("steps", len(trace))
    x = np.linspace(0, steps, len(trace))
    ax.plot(
        x,
        trace,
        "o-",
        ms=3,
        color=JAX,
        label=f"streamed from disk: {s['cells_per_second']:,.0f} cells/s",
    )
    mem = st.get("in_memory") or {}
    if mem.get("rss_max_mb"):
        ax.axhline(
            mem["rss_max_mb"],
            color=REF,
            ls="--",
            label=f"in memory (peak): {mem['cells_per_second']:,.0f} cells/s",
        )
    f = st.get("file") or {}
    ax.set_ylim(0, max(trace) * 1.25)
    ax.set_xlabel("training step")
    ax.set_ylabel("host RSS (MB)")
    ax.set_title(
        f"scVI on a {s['n_cells_in_file']:,}-cell file"
        + (f" ({f['file_mb'] / 1024:.1f} GB on disk)" if f.get("file_mb") else "")
        + f": RSS stays flat\n{name}: {machine(d)}; stream / in-memory speed "
        f"{st.get('ratio_stream_over_memory', float('nan')):.2f}"
    )
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    save(fig, out, "stream_rss")

"""Figures for the documentation's benchmarks page, from the committed JSON.

Reads the JSON files that the benchmark scripts wrote into
``benchmarks/results/`` (and ``benchmarks/results/gpu/``) and writes one PNG
per figure into ``docs/img/benchmarks/``. Nothing is measured here: every
number on a figure is read from a JSON file. A figure whose JSON is missing
or lacks a field is skipped with a note; the others are still drawn.

Usage:
    python benchmarks/plots.py                  # all figures
    python benchmarks/plots.py --only accuracy  # some of them
    python benchmarks/plots.py --results DIR --out DIR

For each figure the script prints its source: the JSON, the command that wrote
it (its ``command`` or ``args`` field), the machine and the date, where the
JSON records them; the captions on ``docs/benchmarks.md`` say the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _plots_accuracy import fig_accuracy, fig_accuracy_paired
from _plots_common import OUT, RESULTS, Skip, plt
from _plots_gpu import fig_first_epoch, fig_gpu_kernels, fig_throughput_gpu
from _plots_integration import fig_integration, fig_mmd, fig_parity
from _plots_scale import fig_scale_cells, fig_scale_classes, fig_stream
from _plots_throughput import fig_de, fig_memory_cpu, fig_throughput_cpu

FIGURES = {
    "throughput_cpu": fig_throughput_cpu,
    "memory_cpu": fig_memory_cpu,
    "throughput_gpu": fig_throughput_gpu,
    "gpu_kernels": fig_gpu_kernels,
    "first_epoch": fig_first_epoch,
    "scale_cells": fig_scale_cells,
    "stream_rss": fig_stream,
    "scale_classes": fig_scale_classes,
    "accuracy": fig_accuracy,
    "accuracy_paired": fig_accuracy_paired,
    "integration_summary": fig_integration,
    "mmd_mixing": fig_mmd,
    "parity": fig_parity,
    "de_throughput": fig_de,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON files")
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    p.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    done, skipped = [], []
    for stem in args.only:
        print(f"{stem}:")
        try:
            FIGURES[stem](args.results, args.out)
            done.append(stem)
        except Skip as e:
            print(f"  skipped: {e}")
            skipped.append(stem)
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            AttributeError,
            ZeroDivisionError,
            StopIteration,
        ) as e:
            print(f"  skipped: a JSON lacks what this figure needs ({type(e).__name__}: {e})")
            skipped.append(stem)
        finally:
            plt.close("all")
    for extra in ("integration.png", "label_transfer_paired.png"):
        if (args.results / extra).exists():
            print(
                f"{extra}: written by benchmarks/{extra.split('.')[0]}.py; "
                "the page shows it from benchmarks/results/"
            )
    print(f"{len(done)} figures written to {args.out}; skipped: {', '.join(skipped) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

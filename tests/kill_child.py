"""The models the SIGKILL tests build, and the child process they kill.

``python tests/kill_child.py SPEC`` (SPEC: JSON) trains ``kind`` ("scvi",
"scanvi", "query") with a checkpoint every epoch into ``folder``, or, with
``"save": true``, loads the model saved in ``folder``, changes its
parameters and saves it over the old one. Two hooks make the SIGKILL land
mid-write: a wrapper on io.atomic_write_bytes counts the writes of
``target`` (metadata.json, or any other file), and os.fsync, during the
``kill_at``-th such write, cuts the freshly written file to half its length
(the part that reached the disk), prints MARKER and sleeps. The parent
SIGKILLs it there: it dies with a half-written file on disk,
deterministically, in the middle of a write.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

DATA = dict(
    n_cells=300,
    n_genes=50,
    n_batches=2,
    n_lineages=1,
    types_per_lineage=2,
    seed=0,
    markers_per_type=5,
)
ARCH = dict(n_hidden=16, n_latent=4)
TRAIN = dict(max_epochs=8, batch_size=128, progress_bar=False, checkpoint_every=1)
PRETRAIN = dict(max_epochs=2, batch_size=128, progress_bar=False)
MARKER = "KILL-ME-NOW"


def adata(part: str = "all", *, labels: bool = True):
    """The atlas; ``part`` "reference" (batch0) or "query" (batch1) for surgery."""
    from jaxscanvi import SCANVI, SCVI, synthetic_atlas

    a = synthetic_atlas(**DATA)
    if part != "all":
        a = a[(a.obs["batch"] == "batch0") == (part == "reference")].copy()
    if labels:
        SCANVI.setup_anndata(
            a, batch_key="batch", labels_key="cell_type", unlabeled_category="Unknown"
        )
    else:
        SCVI.setup_anndata(a, batch_key="batch")
    return a


def model_to_train(kind: str):
    """The untrained model of ``kind`` (a query: its reference trained), the same in
    every process."""
    from jaxscanvi import SCANVI, SCVI

    if kind == "scvi":
        return SCVI(adata(labels=False), **ARCH, seed=0)
    if kind == "scanvi":
        return SCANVI(adata(), **ARCH, seed=0)
    scanvi = SCANVI(adata("reference"), **ARCH, seed=0)
    scanvi.train(**PRETRAIN)
    q = adata("query")
    SCANVI.prepare_query_anndata(q, scanvi)
    return SCANVI.load_query_data(q, scanvi)


def main(spec: dict) -> None:
    import jax

    import jaxscanvi.io as io
    from jaxscanvi import SCANVI, SCVI

    real_write, real_fsync = io.atomic_write_bytes, os.fsync
    state = {"n": 0, "armed": False}

    def counting_write(path, data_):
        is_target = (Path(path).name == "metadata.json") == (spec["target"] == "metadata")
        state["n"] += is_target
        state["armed"] = is_target and state["n"] == spec["kill_at"]
        try:
            return real_write(path, data_)
        finally:
            state["armed"] = False

    def half_then_hang(fd):
        st = os.fstat(fd)
        if state["armed"] and stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, st.st_size // 2)
            real_fsync(fd)
            print(MARKER, st.st_size, flush=True)
            time.sleep(600)
            os._exit(3)  # never reached when the parent kills us
        return real_fsync(fd)

    if spec.get("save"):
        model = (SCVI if spec["kind"] == "scvi" else SCANVI).load(spec["folder"])
        model.params = jax.tree_util.tree_map(lambda v: v + 1, model.params)
    else:
        model = model_to_train(spec["kind"])
    io.atomic_write_bytes = counting_write
    os.fsync = half_then_hang
    if spec.get("save"):
        model.save(spec["folder"], overwrite=True)
    else:
        model.train(**TRAIN, checkpoint_dir=spec["folder"])
    print("FINISHED-WITHOUT-KILL", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

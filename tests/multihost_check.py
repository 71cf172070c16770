"""One process of a run of several on localhost, through `jax.distributed`.

    python tests/multihost_check.py PROCESS_ID NUM_PROCESSES PORT DATA.h5ad OUT_DIR

Each process opens the same backed .h5ad, trains scVI and scANVI on its own
slice of the cells, and writes to OUT_DIR: the rows of the file it read
(``reads_<id>.json``), its copy of the trained parameters
(``<model>_params_<id>.npz``), the latent space every process gets
(``<model>_latent_<id>.npy``), the errors that asking for different cells
on each process (``own_indices_<id>.json``) and a bad count in one slice raised
(``bad_<id>.json``), and, from process 0 only, the saved model.
tests/test_multihost.py compares all of it with one process replaying the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

SCVI_TRAIN = dict(
    max_epochs=2,
    batch_size=64,
    progress_bar=False,
    train_size=0.8,
    check_val_every_n_epoch=1,
    seed=3,
)
SCANVI_TRAIN = dict(max_epochs=1, batch_size=64, progress_bar=False, train_size=0.8, seed=3)
ARCH = dict(n_latent=4, n_hidden=16)


def flat(params) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main() -> int:
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    data, out = sys.argv[4], Path(sys.argv[5])
    import jaxscanvi as js
    from jaxscanvi import distributed

    distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    # what each process left the others (`distributed._client`, JAX's private store)
    client = distributed._client()
    peer = (pid + 1) % nproc
    note = (
        None
        if client is None
        else client.blocking_key_value_get(f"{distributed._KEY}/{peer}", 60_000)
    )
    (out / f"client_{pid}.json").write_text(
        json.dumps({"own_pid": os.getpid(), "peer": None if note is None else json.loads(note)})
    )

    import anndata as ad

    from jaxscanvi.data.backed import BackedRows

    reads: list[list[int]] = []
    plain_read = BackedRows.read

    def read(self, start, stop):  # every block of counts this process reads
        reads.append([int(start), int(stop)])
        return plain_read(self, start, stop)

    BackedRows.read = read

    adata = ad.read_h5ad(data, backed="r")
    js.SCVI.setup_anndata(adata, batch_key="batch")
    m = js.SCVI(adata, **ARCH)
    m.train(**SCVI_TRAIN)
    np.savez(out / f"scvi_params_{pid}.npz", **flat(m.params))
    np.save(out / f"scvi_latent_{pid}.npy", m.get_latent_representation())
    try:  # each process asking for its own cells only: refused on every process
        m.get_latent_representation(indices=distributed.local_indices(adata.n_obs))
        own = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        own = f"{type(e).__name__}: {e}"
    (out / f"own_indices_{pid}.json").write_text(json.dumps(own))
    m.save(out / "scvi_model", overwrite=True)
    (out / f"scvi_history_{pid}.json").write_text(m.history.to_frame().reset_index().to_json())
    (out / f"reads_{pid}.json").write_text(
        json.dumps(
            {
                "reads": reads,
                "slice": [
                    distributed.local_slice(adata.n_obs).start,
                    distributed.local_slice(adata.n_obs).stop,
                ],
            }
        )
    )

    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
    )
    s = js.SCANVI(adata, **ARCH)
    s.train(**SCANVI_TRAIN)
    np.savez(out / f"scanvi_params_{pid}.npz", **flat(s.params))
    np.save(out / f"scanvi_proba_{pid}.npy", s.predict(soft=True).to_numpy())

    # a bad count in process 1's slice only: both processes must stop with it
    bad = ad.read_h5ad(Path(data).with_name("bad.h5ad"), backed="r")
    try:
        js.SCVI.setup_anndata(bad)
        err = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        err = f"{type(e).__name__}: {e}"
    (out / f"bad_{pid}.json").write_text(json.dumps(err))
    print(f"process {pid} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run in a fresh process with 2 forced CPU devices (see test_parallel.py).

Trains the same small models on 1 and on 2 devices (same global batch and
seed) through each data source and prints one JSON line of differences. The
device source on 2 devices holds each device's half of the cells and draws
minibatches half by half, so its reference is one device with data_shards=2.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax
import numpy as np


def rel(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(np.asarray(y)).max(), 1e-12))
        for x, y in zip(la, lb)
    )


def main() -> int:
    import jaxscanvi as js

    out = {"n_devices": jax.local_device_count()}
    adata = js.synthetic_atlas(
        n_cells=500,
        n_genes=80,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=0,
        markers_per_type=8,
    )
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "label"] = "Unknown"
    js.SCVI.setup_anndata(adata, batch_key="batch")
    train = dict(
        max_epochs=2,
        progress_bar=False,
        check_val_every_n_epoch=1,
        early_stopping=True,
        early_stopping_patience=10,
    )
    models = {}
    # the host source on 2 devices against one device (sources agree on one
    # device: tests/test_scale.py); the device source against its replay
    for source, n, shards in (
        ("device", 1, None),
        ("device", 1, 2),
        ("device", 2, None),
        ("host", 2, None),
    ):
        m = js.SCVI(adata, n_latent=4, n_hidden=16)
        m.train(data_source=source, devices=n, batch_size=100, data_shards=shards, **train)
        models[source, n, shards] = m
    for source in ("device", "host"):
        two = models[source, 2, None]
        one = models["device", 1, 2 if source == "device" else None]
        out[f"scvi_{source}_params"] = rel(two.params, one.params)
        out[f"scvi_{source}_batch_stats"] = rel(two.state["batch_stats"], one.state["batch_stats"])
        out[f"scvi_{source}_history"] = float(
            np.abs(
                two.history.to_frame()["elbo_validation"].to_numpy()
                - one.history.to_frame()["elbo_validation"].to_numpy()
            ).max()
        )
        # inference shards over the same devices and keeps the cell order
        out[f"scvi_{source}_latent"] = rel(
            two.get_latent_representation(), one.get_latent_representation()
        )
    two = models["device", 2, None]
    out["history_columns"] = sorted(two.history.to_frame().columns)
    out["param_devices"] = len(jax.tree_util.tree_leaves(two.params)[0].sharding.device_set)
    out["train_state_devices"] = len(
        jax.tree_util.tree_leaves(two.train_state.params)[0].sharding.device_set
    )
    # scANVI: labelled minibatches and the class networks' statistics
    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
    )
    s = {}
    for n in (1, 2):
        m = js.SCANVI(adata, n_latent=4, n_hidden=16)
        m.train(
            max_epochs=1,
            batch_size=100,
            progress_bar=False,
            devices=n,
            data_source="device",
            data_shards=2 if n == 1 else None,
        )
        s[n] = m
    out["scanvi_params"] = rel(s[2].params, s[1].params)
    out["scanvi_predict_equal"] = float((s[2].predict() == s[1].predict()).mean())
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

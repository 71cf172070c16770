"""Run in a fresh process with 2 forced CPU devices (see test_sharded_device.py).

The device source on 2 devices, cells sharded by rows: what each device
holds, the minibatches it builds, and models trained that way against one
device replaying the same slices (``data_shards=2``). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax
import jax.numpy as jnp
import numpy as np


def rel(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(np.asarray(y)).max(), 1e-12))
        for x, y in zip(la, lb)
    )


def holdings(src, cells, bounds) -> dict:
    """Whether device d's buffers are exactly slice d's cells (and nothing else)."""
    c = src.cells
    out = {"leading_sharded": all(a.sharding.spec[0] == "data" for a in c)}
    ok = True
    for s in c.batch.addressable_shards:  # every field: its shard d is slice d
        d = s.index[0].start
        lo, hi = int(bounds[d]), int(bounds[d + 1])
        rows = hi - lo
        shard = {f: np.asarray(getattr(c, f).addressable_shards[d].data)[0] for f in c._fields}
        ok &= all(getattr(c, f).addressable_shards[d].device == s.device for f in c._fields)
        ok &= np.array_equal(shard["batch"][:rows], cells.batch[lo:hi])
        ok &= np.array_equal(shard["labels"][:rows], cells.labels[lo:hi])
        ok &= np.allclose(shard["log_library"][:rows], cells.log_library[lo:hi])
        X = cells.X[lo:hi]
        if src.dense:
            ok &= np.array_equal(shard["X"][:rows], X.toarray())
            ok &= shard["X"].shape[0] < cells.n_obs
        else:
            ok &= np.array_equal(shard["indptr"][: rows + 1], X.indptr)
            ok &= np.array_equal(shard["data"][: X.nnz], X.data)
            ok &= np.array_equal(shard["indices"][: X.nnz], X.indices)
            ok &= shard["data"].shape[0] < cells.X.nnz  # not the whole matrix
    out["own_rows_only"] = bool(ok)
    return out


def batches(src, cells, rows) -> dict:
    """The sharded minibatch against one device's minibatch of the same global rows."""
    from jaxscanvi.data.batch import DeviceCells, device_batch
    from jaxscanvi.data.sharded import local_rows, sharded_batch

    par, G = src.parallel, cells.n_vars
    K = 4 * int(cells.row_nnz().max()) * rows.shape[0]
    got = jax.jit(lambda c, r: sharded_batch(c, r, par.mesh, G, K))(
        src.cells, jnp.asarray(local_rows(rows[None], src.bounds)[0])
    )
    want = device_batch(DeviceCells.from_cells(cells), jnp.asarray(rows), G, 4 * K)
    real = rows >= 0  # padding rows carry weight 0 and whatever row 0 holds
    out = {
        "x_equal": bool(np.array_equal(np.asarray(got.x), np.asarray(want.x))),
        "batch_rows_sharded": got.x.sharding.spec[0] == "data",
        "weight_equal": bool(np.array_equal(np.asarray(got.weight), real)),
        "columns_equal": all(
            np.array_equal(np.asarray(getattr(got, f))[real], np.asarray(getattr(want, f))[real])
            for f in ("batch", "labels", "log_library", "lgamma_const")
        ),
    }
    if got.nz is not None:  # the list of non-zeros rebuilds x
        dense = np.zeros(got.x.shape, np.float32)
        np.add.at(dense, (np.asarray(got.nz.row), np.asarray(got.nz.col)), np.asarray(got.nz.val))
        out["nz_rebuilds_x"] = bool(np.array_equal(dense, np.asarray(want.x)))
    return out


def main() -> int:
    import jaxscanvi as js
    from jaxscanvi.data.cells import cell_data
    from jaxscanvi.train import sources
    from jaxscanvi.train.parallel import DataParallel

    out = {"n_devices": jax.local_device_count()}
    adata = js.synthetic_atlas(
        n_cells=400,
        n_genes=60,
        n_batches=2,
        n_lineages=2,
        types_per_lineage=2,
        seed=0,
        markers_per_type=8,
    )
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[::3], "label"] = "Unknown"
    js.SCVI.setup_anndata(adata, batch_key="batch")
    cells = cell_data(adata, js.SCVI(adata, n_latent=2, n_hidden=8).registry)
    par = DataParallel.over(2)
    defaults = sources.make_source.__kwdefaults__

    rng = np.random.default_rng(0)
    # device d's 32 columns from slice d, padding at the end and inside each
    rows = np.concatenate(
        [rng.choice(200, 31, replace=False), [-1], 200 + rng.choice(200, 31, replace=False), [-1]]
    ).astype(np.int32)
    rows[[3, 40]] = -1
    for kind, dense_max in (("csr", 0), ("dense", 1 << 30)):
        src = sources.make_source(
            "device", cells, 64, parallel=par, spread=True, dense_max_bytes=dense_max
        )
        bounds = src.bounds
        out[f"{kind}_bounds"] = bounds.tolist()
        out[f"{kind}_dense"] = src.dense
        out[f"{kind}_shards"] = None if src.shards is None else list(map(int, src.shards))
        out.update({f"{kind}_{k}": v for k, v in holdings(src, cells, bounds).items()})
        out.update({f"{kind}_{k}": v for k, v in batches(src, cells, rows).items()})
        out[f"{kind}_device_bytes"] = src.device_bytes()
        one = sources.make_source("device", cells, 64, dense_max_bytes=dense_max)
        out[f"{kind}_one_device_bytes"] = one.device_bytes()
    X = cells.X
    out["csr_bytes"] = int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)
    out["n_obs"] = cells.n_obs
    # data_shards not a multiple of the devices: every device holds every cell
    src = sources.make_source("device", cells, 64, parallel=par, shards=np.array([0, 400]))
    out["fallback_replicated"] = src.bounds is None and src.cells.batch.sharding.is_fully_replicated

    train = dict(max_epochs=2, batch_size=64, progress_bar=False, check_val_every_n_epoch=1)
    for kind, dense_max in (("csr", 0), ("dense", 1 << 30)):
        defaults["dense_max_bytes"] = dense_max
        m = {}
        for name, kw in (
            ("two", dict(devices=2)),
            ("replay", dict(devices=1, data_shards=2)),
            ("plain", dict(devices=1)),
        ):
            m[name] = js.SCVI(adata, n_latent=4, n_hidden=16)
            m[name].train(data_source="device", **kw, **train)
        two, ref = m["two"], m["replay"]
        out[f"scvi_{kind}_params"] = rel(two.params, ref.params)
        out[f"scvi_{kind}_batch_stats"] = rel(two.state["batch_stats"], ref.state["batch_stats"])
        out[f"scvi_{kind}_history"] = rel(
            two.history.to_frame()[["train_loss", "elbo_validation"]].to_numpy(),
            ref.history.to_frame()[["train_loss", "elbo_validation"]].to_numpy(),
        )
        out[f"scvi_{kind}_latent"] = rel(
            two.get_latent_representation(), ref.get_latent_representation()
        )
        # the comparison can tell draws apart: globally drawn minibatches differ
        out[f"scvi_{kind}_vs_unsharded"] = rel(two.params, m["plain"].params)
        out[f"scvi_{kind}_data_bytes"] = two.data_bytes_per_device
        out[f"scvi_{kind}_replay_bytes"] = ref.data_bytes_per_device
    defaults["dense_max_bytes"] = 0
    # the sparse likelihood (accelerators' path) through each device's list of
    # non-zeros; another width, so every step is traced afresh with it
    import jaxscanvi.losses as losses

    losses.sparse_pays = lambda: True
    m = {}
    for name, kw in (("two", dict(devices=2)), ("replay", dict(devices=1, data_shards=2))):
        m[name] = js.SCVI(adata, n_latent=4, n_hidden=12)
        m[name].train(data_source="device", **kw, **train)
    out["scvi_sparse_params"] = rel(m["two"].params, m["replay"].params)
    out["scvi_sparse_history"] = rel(
        m["two"].history.to_frame()["train_loss"].to_numpy(),
        m["replay"].history.to_frame()["train_loss"].to_numpy(),
    )
    losses.sparse_pays = sources.sparse_pays
    # scANVI: labelled minibatches come from each device's slice too
    js.SCANVI.setup_anndata(
        adata, labels_key="label", unlabeled_category="Unknown", batch_key="batch"
    )
    s = {}
    for name, kw in (("two", dict(devices=2)), ("replay", dict(devices=1, data_shards=2))):
        s[name] = js.SCANVI(adata, n_latent=4, n_hidden=16)
        s[name].train(data_source="device", **kw, **train)
    out["scanvi_params"] = rel(s["two"].params, s["replay"].params)
    out["scanvi_history"] = rel(
        s["two"].history.to_frame()["train_loss"].to_numpy(),
        s["replay"].history.to_frame()["train_loss"].to_numpy(),
    )
    out["scanvi_predict_equal"] = float((s["two"].predict() == s["replay"].predict()).mean())
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

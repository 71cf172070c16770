"""Many hosts: a 2-process run on localhost through `jax.distributed` (gloo on
CPU) against one process replaying it with ``data_shards=2``.

The run itself is tests/multihost_check.py, started twice as subprocesses.
Deselect with ``-m "not multiprocess"``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import jaxscanvi as js
from jaxscanvi import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import multihost_check as mh

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(small_atlas, tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    a = small_atlas[:400].copy()
    a.obs["label"] = a.obs["cell_type"].astype(str)
    a.obs.loc[a.obs_names[::3], "label"] = "Unknown"
    a.write_h5ad(d / "atlas.h5ad")
    bad = a.copy()
    bad.X = bad.X.copy()
    bad.X[300, bad.X[300].nonzero()[1][0]] = -2.0  # in process 1's slice
    bad.write_h5ad(d / "bad.h5ad")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device each
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "multihost_check.py"),
                str(p),
                "2",
                str(port),
                str(d / "atlas.h5ad"),
                str(d),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(x[-3000:] for x in logs)
    return d


def _replay(path, model_cls, setup, train):
    adata = ad.read_h5ad(path, backed="r")
    model_cls.setup_anndata(adata, batch_key="batch", **setup)
    m = model_cls(adata, **mh.ARCH)
    m.train(data_shards=2, **train)
    return m


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(np.abs(b[k]).max(), 1e-6)
        assert np.abs(a[k] - b[k]).max() / scale < tol, k


@pytest.mark.system
def test_each_process_names_itself_to_the_others(run):
    """`distributed._client` (JAX's private key-value store, wrapped in one
    function) holds each process's host and pid, read by the others: what names
    a lost process (`distributed.lost_processes`)."""
    notes = [json.loads((run / f"client_{p}.json").read_text()) for p in range(2)]
    for p in range(2):
        peer = notes[p]["peer"]
        assert peer == {"host": socket.gethostname(), "pid": notes[1 - p]["own_pid"]}, notes


@pytest.mark.system
def test_each_process_reads_only_its_slice(run):
    slices = []
    for p in range(2):
        info = json.loads((run / f"reads_{p}.json").read_text())
        lo, hi = info["slice"]
        slices.append((lo, hi))
        assert info["reads"], "the process read no counts"
        for start, stop in info["reads"]:
            assert lo <= start < stop <= hi, (p, start, stop, lo, hi)
    assert slices == [(0, 200), (200, 400)]


@pytest.mark.system
def test_two_processes_train_as_one_replaying_them(run):
    ref = _replay(run / "atlas.h5ad", js.SCVI, {}, mh.SCVI_TRAIN)
    p0, p1 = (dict(np.load(run / f"scvi_params_{p}.npz")) for p in range(2))
    _close(p1, p0, 1e-6)  # every process holds the same parameters
    _close(p0, mh.flat(ref.params), 1e-4)
    # the history and the latent space every process gets, in cell order
    hist = json.loads((run / "scvi_history_0.json").read_text())
    np.testing.assert_allclose(
        list(hist["elbo_validation"].values()),
        ref.history.to_frame()["elbo_validation"].to_numpy(),
        rtol=1e-4,
    )
    lat = np.load(run / "scvi_latent_0.npy")
    np.testing.assert_array_equal(lat, np.load(run / "scvi_latent_1.npy"))
    np.testing.assert_allclose(lat, ref.get_latent_representation(), atol=1e-4)
    # process 0 wrote the model; it loads and gives the same latent space
    loaded = js.SCVI.load(run / "scvi_model", adata=ref.adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), lat, atol=1e-5)


@pytest.mark.system
def test_scanvi_two_processes_match_replay(run):
    ref = _replay(
        run / "atlas.h5ad",
        js.SCANVI,
        {"labels_key": "label", "unlabeled_category": "Unknown"},
        mh.SCANVI_TRAIN,
    )
    p0, p1 = (dict(np.load(run / f"scanvi_params_{p}.npz")) for p in range(2))
    _close(p1, p0, 1e-6)
    _close(p0, mh.flat(ref.params), 1e-4)
    np.testing.assert_allclose(
        np.load(run / "scanvi_proba_0.npy"), ref.predict(soft=True).to_numpy(), atol=1e-4
    )


def test_sharded_order_draws_each_slice_from_its_own_cells():
    from jaxscanvi.train.sources import Source

    src = Source()
    src.shards = distributed.shard_bounds(103, 2)  # [0, 51, 103]
    idx = np.arange(103)
    rows = src.order(np.random.default_rng(0), idx, 10)
    left, right = rows[:, :5], rows[:, 5:]
    assert rows.shape == (11, 10)  # ceil(52 / 5) steps for the larger slice
    assert set(left[left >= 0]) == set(range(51))
    assert set(right[right >= 0]) == set(range(51, 103))
    lab = src.labelled_order(np.random.default_rng(1), np.array([3, 7]), 4, 10)
    assert set(lab[:, :5].ravel()) == {3, 7}
    assert (lab[:, 5:] == -1).all()  # a slice without labelled cells pads


def test_shard_helpers():
    np.testing.assert_array_equal(distributed.shard_bounds(10, 3), [0, 3, 6, 10])
    assert distributed.check_batch_size(128, 2) == 64
    with pytest.raises(js.InputError, match="batch_size"):
        distributed.check_batch_size(127, 2)
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(distributed.gather_rows(x), x)  # one process
    assert distributed.agree(lambda: 5) == 5


@pytest.mark.system
def test_a_bad_count_in_one_slice_stops_every_process(run):
    own, other = (json.loads((run / f"bad_{p}.json").read_text()) for p in (1, 0))
    assert own.startswith("InputError") and "negative" in own, own
    assert other.startswith("RuntimeError: process 1 stopped the run: InputError"), other


@pytest.mark.system
def test_inference_over_backed_data_needs_the_same_cells_everywhere(run):
    for p in range(2):
        err = json.loads((run / f"own_indices_{p}.json").read_text())
        assert err is not None and err.startswith("InputError") and "indices" in err, err
        assert "local_slice" in err


@pytest.mark.system
def test_a_dead_process_stops_the_others_and_the_checkpoint_survives(tmp_path):
    """Process 1 is SIGKILLed mid-epoch: process 0 stops at once with an error naming
    it, exits within the configured timeout, and its last checkpoint loads."""
    import re
    import time

    import lost_process_check as lp
    from flax import serialization

    from jaxscanvi import io

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "lost_process_check.py"), str(p), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    try:
        out1 = procs[1].communicate(timeout=600)[0]
        died = time.time()
        out0 = procs[0].communicate(timeout=lp.TIMEOUT_S + 60)[0]
        exited = time.time()
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9, out1[-3000:]
    killed_at = float(re.search(r"DYING (\S+)", out1).group(1))
    stop = re.search(r"STOPPED (\S+) (\w+): (.*)", out0)
    assert stop, out0[-3000:]
    assert stop.group(2) == "LostProcessError", out0[-3000:]
    assert re.match(
        r"process 1 \(pid \d+ on .*\) of this 2-process run is gone.*"
        r"process 0 stops too.*resume=True",
        stop.group(3),
    ), stop.group(3)
    assert float(stop.group(1)) - killed_at < lp.TIMEOUT_S  # noticed at once
    assert exited - died < lp.TIMEOUT_S + 50, out0[-2000:]  # and gone, bounded
    # the last complete checkpoint is whole and names its epoch
    meta = io.read_metadata(tmp_path / "ckpt")
    done = len(meta["loop"]["history"])
    assert done >= 2
    raw = serialization.msgpack_restore(io.read_blob(tmp_path / "ckpt", meta, "train_state"))
    assert int(raw["epoch"]) == done

"""Reliability: a training process (scVI, scANVI, a query model) SIGKILLed in
the middle of a checkpoint write resumes bit for bit, and one killed during
model.save leaves the previous version loadable; so does a disk that fills up
mid-write; a second writer of a folder gets FolderLockedError, and a dead
writer's lock is taken over (the stale-lock rule); format-1 model folders (a
frozen fixture) stay readable and other format versions are refused clearly;
all-zero genes give a warning; the error catalogue page (docs/guide/errors.md)
stays what tests/catalogue.py generates from the tests."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxscanvi import SCVI, io, synthetic_atlas

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # for catalogue.py (and the test modules it reads)

# ------------------------------------------------- SIGKILL during a checkpoint
# tests/kill_child.py trains (or saves) in a child process and hangs in the
# middle of a write (see its docstring); the test SIGKILLs it there. While it
# hangs, the folder is locked: a second writer gets FolderLockedError.
import kill_child
from kill_child import MARKER

KILL_DATA, KILL_ARCH, KILL_TRAIN = kill_child.DATA, kill_child.ARCH, kill_child.TRAIN
KILL_AT = 3  # the 3rd checkpoint (end of epoch 3) is the one interrupted
# JAXSCANVI_KILL_RUNS=50 runs test_sigkill_many_times 50 times per model kind;
# JAXSCANVI_KILL_RUNS_OUT=file.jsonl records each kind's count there
KILL_RUNS = int(os.environ.get("JAXSCANVI_KILL_RUNS", "0"))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _bitwise_equal(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def _kill_adata():
    return kill_child.adata(labels=False)


_UNINTERRUPTED: dict = {}


@pytest.fixture(scope="module")
def uninterrupted_of(tmp_path_factory):
    """The uninterrupted run of a model kind, trained once per module."""

    def get(kind: str):
        if kind not in _UNINTERRUPTED:
            model = kill_child.model_to_train(kind)
            model.train(
                **KILL_TRAIN, checkpoint_dir=tmp_path_factory.mktemp(f"full_{kind}") / "ckpt"
            )
            assert model.history.n_epochs == KILL_TRAIN["max_epochs"]
            _UNINTERRUPTED[kind] = model
        return _UNINTERRUPTED[kind]

    yield get
    _UNINTERRUPTED.clear()


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_of):
    return uninterrupted_of("scvi")


def _start_child(spec: dict, log: Path, cache: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:  # the long run: children after the first load their programs
        env["JAXSCANVI_COMPILATION_CACHE"] = str(cache)
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(TESTS / "kill_child.py"), json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=str(ROOT),
            env=env,
        )


def _kill_at_marker(proc: subprocess.Popen, log: Path, while_hanging=None) -> int:
    """Wait for the child's marker, run ``while_hanging()``, SIGKILL the child;
    the full length of the cut file."""
    try:
        deadline = time.monotonic() + 300
        line = b""
        while MARKER.encode() not in line:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
            if not ready:
                pytest.fail(f"no marker within 300 s; child stderr:\n{log.read_text()}")
            line = proc.stdout.readline()
            if not line:  # EOF: the child exited without reaching the write
                proc.wait()
                pytest.fail(
                    f"child exited ({proc.returncode}) before the marker; "
                    f"stderr:\n{log.read_text()}"
                )
        if while_hanging is not None:
            while_hanging()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    return int(line.decode().split()[1])


def _second_writer_is_refused(folder: Path) -> None:
    """A second process (this one) writing the locked folder fails at once, clearly."""
    from jaxscanvi import FolderLockedError

    with pytest.raises(
        FolderLockedError,
        match=r"being written by another process: pid "
        r"\d+ on .*Fix: wait for it to finish",
    ):
        SCVI(_kill_adata(), **KILL_ARCH, seed=0).train(
            max_epochs=1, batch_size=128, progress_bar=False, checkpoint_dir=folder
        )
    with pytest.raises(FolderLockedError):
        SCVI(_kill_adata(), **KILL_ARCH, seed=0).save(folder, overwrite=True)


def _kill_and_resume(
    kind: str,
    target: str,
    kill_at: int,
    tmp_path: Path,
    uninterrupted_of,
    *,
    check_lock: bool = False,
    cache: Path | None = None,
) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "child.log"
    proc = _start_child(
        {"kind": kind, "target": target, "kill_at": kill_at, "folder": str(ckpt)}, log, cache
    )
    # the reference run trains here while the child starts up and trains
    reference = uninterrupted_of(kind)
    full_len = _kill_at_marker(
        proc, log, (lambda: _second_writer_is_refused(ckpt)) if check_lock else None
    )

    # the kill landed mid-write: a half-written temporary file is left in the folder
    tmps = [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert len(tmps) == 1, sorted(p.name for p in ckpt.iterdir())
    assert tmps[0].stat().st_size == full_len // 2 > 0
    # and so is the dead process's lock, which the resume below takes over
    assert (ckpt / ".jaxscanvi.lock").exists()

    # metadata.json still names the complete checkpoint of the epoch before (if any)
    done = kill_at - 1
    if done == 0:  # killed in the first checkpoint: there is none, the resume starts over
        assert not (ckpt / "metadata.json").exists()
    else:
        meta = io.read_metadata(ckpt)
        assert meta["kind"] == "checkpoint"
        assert [h["epoch"] for h in meta["loop"]["history"]] == list(range(done))
        from flax import serialization

        raw = serialization.msgpack_restore(io.read_blob(ckpt, meta, "train_state"))
        assert int(raw["epoch"]) == done
        listed = {f["file"] for f in meta["files"].values()}
        assert all((ckpt / f).exists() for f in listed)

    # resuming in this process finishes the run, bit for bit like the uninterrupted one
    resumed = kill_child.model_to_train(kind)
    resumed.train(**KILL_TRAIN, checkpoint_dir=ckpt, resume=True)
    assert int(resumed.train_state.epoch) == KILL_TRAIN["max_epochs"]
    assert list(resumed.history.to_frame().index) == list(range(KILL_TRAIN["max_epochs"]))
    assert _bitwise_equal(resumed.params, reference.params)
    assert _bitwise_equal(resumed.state, reference.state)
    assert _bitwise_equal(resumed.train_state.opt_state, reference.train_state.opt_state)
    cols = [c for c in reference.history.to_frame().columns if c != "epoch_seconds"]
    assert resumed.history.to_frame()[cols].equals(reference.history.to_frame()[cols])
    # and the checkpoint it leaves behind is the final one, unlocked
    assert len(io.read_metadata(ckpt)["loop"]["history"]) == KILL_TRAIN["max_epochs"]
    assert not (ckpt / ".jaxscanvi.lock").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and select on pipes are POSIX")
@pytest.mark.parametrize(
    "kind,target",
    [
        ("scvi", "metadata"),
        ("scvi", "train_state"),
        ("scanvi", "metadata"),
        ("query", "train_state"),
    ],
)
@pytest.mark.system
def test_sigkill_during_checkpoint_write_resumes_bitwise(kind, target, uninterrupted_of, tmp_path):
    _kill_and_resume(kind, target, KILL_AT, tmp_path, uninterrupted_of, check_lock=kind == "scvi")


@pytest.mark.system
@pytest.mark.skipif(KILL_RUNS == 0, reason="set JAXSCANVI_KILL_RUNS=50 for the long run")
@pytest.mark.parametrize("kind", ["scvi", "scanvi", "query"])
def test_sigkill_many_times(kind, uninterrupted_of, tmp_path):
    import time as _time

    t0 = _time.perf_counter()
    for i in range(KILL_RUNS):
        run = tmp_path / f"run{i}"
        run.mkdir()
        _kill_and_resume(
            kind,
            ("metadata", "train_state")[i % 2],
            1 + i % (KILL_TRAIN["max_epochs"] - 1),
            run,
            uninterrupted_of,
            cache=tmp_path / "compilation_cache",
        )
        print(
            f"{kind} kill {i + 1}/{KILL_RUNS}: resumed bitwise ({_time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    seconds = _time.perf_counter() - t0
    print(
        f"\n{kind}: {KILL_RUNS} SIGKILLs mid-checkpoint, {KILL_RUNS} bitwise resumes in "
        f"{seconds:.0f} s"
    )
    record = os.environ.get("JAXSCANVI_KILL_RUNS_OUT")
    if record:  # the long run's figure, for benchmarks/results/ (one JSON line per kind)
        with open(record, "a") as f:
            f.write(
                json.dumps(
                    {
                        "kind": kind,
                        "kills": KILL_RUNS,
                        "bitwise_resumes": KILL_RUNS,
                        "previous_checkpoint_intact": KILL_RUNS,
                        "seconds": round(seconds, 1),
                        "max_epochs": KILL_TRAIN["max_epochs"],
                        "targets": ["metadata", "train_state"],
                    }
                )
                + "\n"
            )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and select on pipes are POSIX")
@pytest.mark.parametrize(
    "kind,target", [("scvi", "variables"), ("scanvi", "metadata"), ("query", "variables")]
)
@pytest.mark.system
def test_sigkill_during_model_save_keeps_the_previous_version(
    kind, target, uninterrupted_of, tmp_path
):
    from jaxscanvi import SCANVI

    cls = SCVI if kind == "scvi" else SCANVI
    model, d = uninterrupted_of(kind), tmp_path / "model"
    model.save(d)
    proc = _start_child(
        {"kind": kind, "target": target, "kill_at": 1, "folder": str(d), "save": True},
        tmp_path / "child.log",
    )
    _kill_at_marker(proc, tmp_path / "child.log")
    assert any(p.name.endswith(".tmp") for p in d.iterdir())  # killed mid-write
    again = cls.load(d)
    assert _bitwise_equal(again.variables, model.variables)
    # the dead writer's lock is stale: the next save takes it over
    model.save(d, overwrite=True)
    assert _bitwise_equal(cls.load(d).variables, model.variables)
    assert not (d / ".jaxscanvi.lock").exists()


# ------------------------------------------------------------ a full disk
_WRITE_ALL = io.write_all  # the real one, under every patch below


def _disk_fills_after(monkeypatch, budget: int | None, *, only=None):
    """io.write_all writes ``budget`` more bytes (to files ``only`` accepts), then
    raises ENOSPC, as a full disk does; None: never."""
    import errno

    left = {"bytes": budget, "written": 0}
    real = _WRITE_ALL

    def write_all(fd, data):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else ""
        if left["bytes"] is None or (only is not None and not only(name)):
            left["written"] += len(data)
            return real(fd, data)
        n = min(left["bytes"], len(data))
        real(fd, data[:n])
        left["bytes"] -= n
        left["written"] += n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "write_all", write_all)
    return left


@pytest.mark.parametrize("kind", ["scvi", "scanvi", "query"])
def test_full_disk_during_save_keeps_the_previous_version(
    kind, uninterrupted_of, tmp_path, monkeypatch
):
    from jaxscanvi import SCANVI

    cls = SCVI if kind == "scvi" else SCANVI
    model, d = uninterrupted_of(kind), tmp_path / "model"
    model.save(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    old_params = model.params
    model.params = jax.tree_util.tree_map(lambda v: v + 1, old_params)
    try:
        import shutil

        counted = _disk_fills_after(monkeypatch, None)  # the bytes the new version writes
        shutil.copytree(d, tmp_path / "scratch")
        model.save(tmp_path / "scratch", overwrite=True)
        total = counted["written"]
        assert total > 1000
        for budget in (0, 1, 100, total // 3, total // 2, total - 1):
            _disk_fills_after(monkeypatch, budget)
            with pytest.raises(
                OSError,
                match=r"No space left on device while writing .*"
                r"previous version is intact.*Fix: free space",
            ) as e:
                model.save(d, overwrite=True)
            assert e.value.errno == 28
            # the folder is exactly as it was: the old version, no temporary files, no lock
            assert {p.name: p.read_bytes() for p in d.iterdir()} == before, budget
        _disk_fills_after(monkeypatch, None)
        model.save(d, overwrite=True)  # space again: the new version is saved whole
        assert _bitwise_equal(cls.load(d).params, model.params)
    finally:
        model.params = old_params


def test_full_disk_during_a_checkpoint_then_resume_bitwise(uninterrupted, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    # the third checkpoint's train-state blob is the write that finds the disk full
    blob_writes = {"n": 0}

    def only(name):
        if "train_state" in name:
            blob_writes["n"] += 1
        return "train_state" in name and blob_writes["n"] >= 3

    _disk_fills_after(monkeypatch, 1000, only=only)
    with pytest.raises(OSError, match="No space left on device"):
        SCVI(_kill_adata(), **KILL_ARCH, seed=0).train(**KILL_TRAIN, checkpoint_dir=ckpt)
    assert [h["epoch"] for h in io.read_metadata(ckpt)["loop"]["history"]] == [0, 1]
    assert not (ckpt / ".jaxscanvi.lock").exists()  # released on the way out
    _disk_fills_after(monkeypatch, None)
    resumed = SCVI(_kill_adata(), **KILL_ARCH, seed=0)
    resumed.train(**KILL_TRAIN, checkpoint_dir=ckpt, resume=True)
    assert _bitwise_equal(resumed.params, uninterrupted.params)
    assert _bitwise_equal(resumed.train_state.opt_state, uninterrupted.train_state.opt_state)


# ------------------------------------------------------------ the lock's rule
def test_stale_lock_rule(tmp_path):
    import socket

    from jaxscanvi import lock

    p = tmp_path / lock.LOCK_NAME
    p.write_text("{}")
    me, host, now = os.getpid(), socket.gethostname(), time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert lock.is_stale(p, {"pid": dead.pid, "host": host, "time": now})  # dead here
    assert not lock.is_stale(p, {"pid": me, "host": host, "time": now})  # alive here
    # a live pid that started after the lock was written: the pid was reused
    assert lock.is_stale(p, {"pid": me, "host": host, "time": now - 10**6})
    # another host: only its age tells
    assert not lock.is_stale(p, {"pid": 1, "host": "elsewhere", "time": now - 60})
    assert lock.is_stale(p, {"pid": 1, "host": "elsewhere", "time": now - lock.STALE_AFTER_S - 1})
    # unreadable (its writer died before filling it): stale once a minute old
    assert not lock.is_stale(p, None)
    os.utime(p, (now - 120, now - 120))
    assert lock.is_stale(p, None)
    # acquire applies the rule: a stale lock is taken over, a live one refused
    p.write_text(json.dumps({"pid": dead.pid, "host": host, "time": now}))
    held = lock.acquire(tmp_path, "test")
    assert json.loads(held.read_text())["pid"] == me
    lock.release(held)
    assert not held.exists()


# ------------------------------------------------------ format 1 stays readable
# tests/fixtures/format_v1 was written once, by the release that introduced
# format 1 (see tests/fixtures/make_format_fixtures.py, which must not be rerun
# casually). Loading it with today's code must give the stored outputs.
FIXTURES = TESTS / "fixtures" / "format_v1"


@pytest.fixture(scope="module")
def fixture_adata():
    import anndata

    return anndata.read_h5ad(FIXTURES / "adata.h5ad")


def test_format_v1_fixture_is_small_and_complete():
    files = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file())
    for name in (
        "adata.h5ad",
        "scvi/metadata.json",
        "scanvi/metadata.json",
        "scvi_latent.npy",
        "scanvi_latent.npy",
        "scanvi_soft.npy",
        "scanvi_pred.npy",
    ):
        assert name in files, files
    assert sum((FIXTURES / f).stat().st_size for f in files) < 300 * 1024
    for kind, cls in (("scvi", "SCVI"), ("scanvi", "SCANVI")):
        meta = json.loads((FIXTURES / kind / "metadata.json").read_text())
        assert meta["format"] == io.FORMAT_TAG
        assert meta["format_version"] == 1
        assert meta["model_class"] == cls
        assert io.read_metadata(FIXTURES / kind)["format_version"] == 1


def test_format_v1_scvi_loads_to_the_stored_latent(fixture_adata):
    m = SCVI.load(FIXTURES / "scvi", adata=fixture_adata.copy())
    assert m.is_trained and m.history.n_epochs == 2
    assert m.registry.batch_key == "batch" and m.registry.n_vars == 30
    z = m.get_latent_representation()
    expected = np.load(FIXTURES / "scvi_latent.npy")
    assert z.shape == expected.shape == (200, 3)
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)


def test_format_v1_scanvi_loads_to_the_stored_latent_and_predictions(fixture_adata):
    from jaxscanvi import SCANVI

    m = SCANVI.load(FIXTURES / "scanvi", adata=fixture_adata.copy())
    assert m.is_trained and m.was_pretrained
    assert m.registry.unlabeled_category == "Unknown"
    assert m.registry.label_categories == ("L0_T0", "L0_T1")
    np.testing.assert_allclose(
        m.get_latent_representation(), np.load(FIXTURES / "scanvi_latent.npy"), rtol=1e-6, atol=1e-6
    )
    soft = m.predict(soft=True)
    assert list(soft.columns) == ["L0_T0", "L0_T1"]
    np.testing.assert_allclose(
        soft.to_numpy(), np.load(FIXTURES / "scanvi_soft.npy"), rtol=1e-6, atol=1e-6
    )
    pred = np.load(FIXTURES / "scanvi_pred.npy")  # not pickled: a unicode array
    assert pred.dtype.kind == "U"
    assert np.array_equal(np.asarray(m.predict()).astype(str), pred)


@pytest.fixture
def fixture_copy(tmp_path):
    import shutil

    d = tmp_path / "scvi"
    shutil.copytree(FIXTURES / "scvi", d)
    return d


def _set_version(d: Path, version, drop: bool = False):
    meta = json.loads((d / "metadata.json").read_text())
    if drop:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (d / "metadata.json").write_text(json.dumps(meta))


# sha256 of the committed format-1 files: a regenerated fixture (which would only
# prove that today's code reads today's files) fails here
FIXTURE_SHA256 = {
    "scvi/variables-a01a30a6d678b706.msgpack": "a01a30a6d678b706b4fc5428d72226bd86a645c3a7cc2ade34e63a729609867c",
    "scanvi/variables-3365d2e141fa02b8.msgpack": "3365d2e141fa02b8535320e5a506c26d945e4f6607ddb8646d2cabc66038d69d",
    "scvi_latent.npy": "1e7650933676936f9aba75496d080f4e8b514257ea4f3e56beaf79b656ed053a",
    "scanvi_latent.npy": "de0e3b65c9578e8f0fc4ddc0843f1d90189ae3cb600b9426cdce96429ffd5e25",
    "scanvi_soft.npy": "0931074dc50750d7287e42a47ee2faad67ef952d71047777b76acece4de56fc5",
    "scanvi_pred.npy": "89d59d63060e09dfd78b492c3d173abdf5d02013b21ce44d51a7d27226f5fba5",
}


def test_format_v1_fixture_is_the_committed_record():
    import hashlib

    for name, digest in FIXTURE_SHA256.items():
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == digest, name
    for kind in ("scvi", "scanvi"):  # each folder lists its own variables file
        files = json.loads((FIXTURES / kind / "metadata.json").read_text())["files"]
        assert {
            f"{kind}/{e['file']}": e["sha256"] for e in files.values()
        }.items() <= FIXTURE_SHA256.items()


def test_format_v1_fixture_copy_loads(fixture_copy, fixture_adata):
    """The unmodified copy loads to the stored latent, so the refusals below fail
    only for the version they change."""
    m = SCVI.load(fixture_copy, adata=fixture_adata.copy())
    np.testing.assert_allclose(
        m.get_latent_representation(), np.load(FIXTURES / "scvi_latent.npy"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "version,drop,pattern",
    [
        (
            999,
            False,
            r"model format 999 \(jaxscanvi 0\.1\.0\).*reads formats up to "
            r"\d+\. Fix: upgrade jaxscanvi \(pip install -U jaxscanvi\)",
        ),
        (
            0,
            False,
            r"model format 0 \(jaxscanvi 0\.1\.0\), an older format.*cannot read.*"
            r"Fix: load it with the jaxscanvi release that wrote it \(pip install "
            r"'jaxscanvi==0\.1\.0'\).*or train and save the model again",
        ),
        (-3, False, r"model format -3 .*an older format.*Fix:"),
        (
            None,
            True,
            r"no valid model format version \(model format None in metadata\.json"
            r".*Fix: restore the folder's original metadata\.json",
        ),
        ("1", False, r"no valid model format version \(model format '1'.*Fix:"),
        (True, False, r"no valid model format version \(model format True.*Fix:"),
        (1.0, False, r"no valid model format version \(model format 1\.0.*Fix:"),
    ],
    ids=["newer_999", "older_0", "negative", "missing", "string", "bool", "float"],
)
def test_format_version_refusals(fixture_copy, fixture_adata, version, drop, pattern):
    from jaxscanvi import ModelFormatError

    _set_version(fixture_copy, version, drop)
    with pytest.raises(ModelFormatError, match=pattern) as e:
        SCVI.load(fixture_copy, adata=fixture_adata.copy())
    assert type(e.value) is ModelFormatError
    assert str(fixture_copy) in str(e.value)


# ------------------------------------------------------------- all-zero genes
def _zero_genes(a, genes, layer=None):
    X = (a.X if layer is None else a.layers[layer]).tolil()
    X[:, genes] = 0
    if layer is None:
        a.X = X.tocsr()
    else:
        a.layers[layer] = X.tocsr()
    return a


@pytest.mark.parametrize(
    "layer,fmt", [(None, "csr"), ("counts", "csr"), (None, "csc"), (None, "dense")]
)
def test_all_zero_gene_warns_with_field_genes_and_fix(layer, fmt):
    import warnings

    from jaxscanvi.data.registry import UNS_KEY

    a = _zero_genes(synthetic_atlas(**KILL_DATA), [3, 17], layer)
    if fmt != "csr":
        X = a.X if layer is None else a.layers[layer]
        X = X.tocsc() if fmt == "csc" else X.toarray()
        if layer is None:
            a.X = X
        else:
            a.layers[layer] = X
    field = "adata.X" if layer is None else "adata.layers['counts']"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        SCVI.setup_anndata(a, layer=layer, batch_key="batch")
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    zero = [m for m in msgs if "no counts in any cell" in m]
    assert len(zero) == 1, msgs
    msg = zero[0]
    assert msg.startswith(
        f"{field}: 2 of 50 gene(s) have no counts in any cell (gene3, gene17);"
    ), msg
    assert "Fix: filter them out" in msg and "sc.pp.filter_genes(adata, min_counts=1)" in msg
    assert f"np.asarray({field}.sum(0)).ravel() > 0" in msg
    # the warning points at the caller, not at jaxscanvi's internals
    assert all(
        Path(w.filename).resolve() == Path(__file__).resolve()
        for w in rec
        if "no counts in any cell" in str(w.message)
    )
    assert UNS_KEY in a.uns  # a warning, not a refusal
    # and the suggested one-liner does remove exactly those genes
    X = a.X if layer is None else a.layers[layer]
    kept = a[:, np.asarray(X.sum(0)).ravel() > 0]
    assert kept.n_vars == 48 and "gene3" not in kept.var_names


def test_many_all_zero_genes_are_summarised():
    import warnings

    a = _zero_genes(synthetic_atlas(**KILL_DATA), list(range(10, 22)))
    with pytest.warns(UserWarning) as rec:
        SCVI.setup_anndata(a)
    msg = next(str(w.message) for w in rec if "no counts" in str(w.message))
    assert "12 of 50 gene(s)" in msg
    assert "(gene10, gene11, gene12, gene13, gene14 and 7 more)" in msg
    assert len(msg) < 600
    # no warning at all when every gene has counts
    b = synthetic_atlas(**KILL_DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCVI.setup_anndata(b)


def test_model_trains_with_all_zero_genes(uninterrupted):
    # same shapes and settings as the reference run, so nothing new is compiled
    a = _zero_genes(synthetic_atlas(**KILL_DATA), [0, 7, 49])
    with pytest.warns(UserWarning, match="no counts in any cell"):
        SCVI.setup_anndata(a, batch_key="batch")
    m = SCVI(a, **KILL_ARCH, seed=0)
    m.train(**{**KILL_TRAIN, "max_epochs": 2})
    assert np.isfinite(m.history.to_frame()["train_loss"]).all()
    assert all(np.isfinite(x).all() for x in _leaves(m.params))
    assert np.isfinite(m.get_latent_representation()).all()


# --------------------------------------------------------- the error catalogue
def test_error_catalogue_page_is_generated_from_the_tests():
    import catalogue

    assert catalogue.PAGE.read_text() == catalogue.section(), (
        "docs/guide/errors.md differs from the test cases; regenerate it with "
        "`python tests/catalogue.py --write`"
    )


def test_error_catalogue_covers_every_case_and_names_real_tests():
    import importlib

    import catalogue

    table = catalogue.section()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    # every case of the parametrised error tables has its row
    n_cases = 0
    for src in catalogue.SOURCES:
        mod = importlib.import_module(src)
        for fn in vars(mod).values():
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize" and (
                    "field" in mark.args[0] or "exc" in mark.args[0]
                ):
                    n_cases += len(mark.args[1])
                    for case_id in mark.kwargs["ids"]:
                        assert f": {catalogue.describe(case_id)} |" in table, case_id
    assert n_cases >= 90
    assert len(rows) == n_cases + len(catalogue.HAND_ROWS) + 1  # + the header rule
    # hand-written rows point at tests that exist
    for *_, ref in catalogue.HAND_ROWS:
        path, name = ref.split("::")
        assert f"\ndef {name}(" in (ROOT / path).read_text(), ref
    # InputError rows name a field; others name an exception or warning type
    for line in rows[1:]:
        assert re.search(
            r"\| `(InputError|ModelFormatError|FileNotFoundError|"
            r"FileExistsError|NonFiniteLossError|UserWarning|ImportError|"
            r"FolderLockedError|LostProcessError)`",
            line,
        ), line

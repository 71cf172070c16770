"""Reliability: a training process SIGKILLed in the middle of a checkpoint write
resumes bit for bit; format-1 model folders (a frozen fixture) stay readable and
other format versions are refused clearly; all-zero genes give a warning; the
error catalogue page (docs/guide/errors.md) stays what tests/catalogue.py generates."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxscanvi import SCVI, synthetic_atlas
from jaxscanvi import io

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # for catalogue.py (and the test modules it reads)

# ------------------------------------------------- SIGKILL during a checkpoint
# The child trains with a checkpoint every epoch, through the real
# io.atomic_write_bytes. Two hooks make the kill land mid-write: a wrapper on
# io.atomic_write_bytes counts the writes of TARGET (metadata.json or the
# train-state blob), and os.fsync, during the KILL_AT-th such write, cuts the
# freshly written file to half its length (the part that reached the disk),
# prints a marker and sleeps. The parent SIGKILLs the child there: it dies with
# a half-written file on disk, deterministically, in the middle of a checkpoint.
KILL_DATA = dict(n_cells=300, n_genes=50, n_batches=2, n_lineages=1, types_per_lineage=2,
                 seed=0, markers_per_type=5)
KILL_ARCH = dict(n_hidden=16, n_latent=4)
KILL_TRAIN = dict(max_epochs=8, batch_size=128, progress_bar=False, checkpoint_every=1)
KILL_AT = 3       # the 3rd checkpoint (end of epoch 3) is the one interrupted
MARKER = "KILL-ME-NOW"

CHILD = textwrap.dedent("""
    import os, stat, sys, time
    from pathlib import Path
    import jaxscanvi.io as io
    from jaxscanvi import SCVI, synthetic_atlas

    ckpt, target, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data, arch, train = eval(sys.argv[4]), eval(sys.argv[5]), eval(sys.argv[6])
    real_write, real_fsync = io.atomic_write_bytes, os.fsync
    state = {{"n": 0, "armed": False}}

    def counting_write(path, data_):
        is_target = (Path(path).name == "metadata.json") == (target == "metadata")
        state["n"] += is_target
        state["armed"] = is_target and state["n"] == kill_at
        try:
            return real_write(path, data_)
        finally:
            state["armed"] = False

    def half_then_hang(fd):
        st = os.fstat(fd)
        if state["armed"] and stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, st.st_size // 2)
            real_fsync(fd)
            print("{marker}", st.st_size, flush=True)
            time.sleep(600)
            os._exit(3)  # never reached when the parent kills us
        return real_fsync(fd)

    io.atomic_write_bytes = counting_write
    os.fsync = half_then_hang
    a = synthetic_atlas(**data)
    SCVI.setup_anndata(a, batch_key="batch")
    SCVI(a, **arch, seed=0).train(**train, checkpoint_dir=ckpt)
    print("FINISHED-WITHOUT-KILL", flush=True)
""").format(marker=MARKER)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _bitwise_equal(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and
                                      np.array_equal(x, y) for x, y in zip(la, lb))


def _kill_adata():
    a = synthetic_atlas(**KILL_DATA)
    SCVI.setup_anndata(a, batch_key="batch")
    return a


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = SCVI(_kill_adata(), **KILL_ARCH, seed=0)
    model.train(**KILL_TRAIN, checkpoint_dir=tmp_path_factory.mktemp("full") / "ckpt")
    assert model.history.n_epochs == KILL_TRAIN["max_epochs"]
    return model


def _start_child(ckpt: Path, target: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, str(ckpt), target, str(KILL_AT),
             repr(KILL_DATA), repr(KILL_ARCH), repr(KILL_TRAIN)],
            stdout=subprocess.PIPE, stderr=err, cwd=str(ROOT))


def _kill_at_marker(proc: subprocess.Popen, log: Path) -> int:
    """Wait for the child's marker, SIGKILL it; the full length of the cut file."""
    try:
        deadline = time.monotonic() + 180
        line = b""
        while MARKER.encode() not in line:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
            if not ready:
                pytest.fail(f"no marker within 180 s; child stderr:\n{log.read_text()}")
            line = proc.stdout.readline()
            if not line:  # EOF: the child exited without reaching the write
                proc.wait()
                pytest.fail(f"child exited ({proc.returncode}) before the marker; "
                            f"stderr:\n{log.read_text()}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    return int(line.decode().split()[1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and select on pipes are POSIX")
@pytest.mark.parametrize("target", ["metadata", "train_state"])
def test_sigkill_during_checkpoint_write_resumes_bitwise(target, request, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "child.log"
    proc = _start_child(ckpt, target, log)
    # the reference run trains here while the child starts up and trains
    uninterrupted = request.getfixturevalue("uninterrupted")
    full_len = _kill_at_marker(proc, log)

    # the kill landed mid-write: a half-written temporary file is left in the folder
    tmps = [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert len(tmps) == 1, sorted(p.name for p in ckpt.iterdir())
    assert tmps[0].stat().st_size == full_len // 2 > 0

    # metadata.json still names the complete checkpoint of the epoch before
    meta = io.read_metadata(ckpt)
    assert meta["kind"] == "checkpoint"
    done = KILL_AT - 1
    assert [h["epoch"] for h in meta["loop"]["history"]] == list(range(done))
    from flax import serialization
    raw = serialization.msgpack_restore(io.read_blob(ckpt, meta, "train_state"))
    assert int(raw["epoch"]) == done
    listed = {f["file"] for f in meta["files"].values()}
    assert all((ckpt / f).exists() for f in listed)

    # resuming in this process finishes the run, bit for bit like the uninterrupted one
    resumed = SCVI(_kill_adata(), **KILL_ARCH, seed=0)
    resumed.train(**KILL_TRAIN, checkpoint_dir=ckpt, resume=True)
    assert int(resumed.train_state.epoch) == KILL_TRAIN["max_epochs"]
    assert list(resumed.history.to_frame().index) == list(range(KILL_TRAIN["max_epochs"]))
    assert _bitwise_equal(resumed.params, uninterrupted.params)
    assert _bitwise_equal(resumed.state, uninterrupted.state)
    assert _bitwise_equal(resumed.train_state.opt_state, uninterrupted.train_state.opt_state)
    cols = [c for c in uninterrupted.history.to_frame().columns if c != "epoch_seconds"]
    assert resumed.history.to_frame()[cols].equals(uninterrupted.history.to_frame()[cols])
    # and the checkpoint it leaves behind is the final one
    assert len(io.read_metadata(ckpt)["loop"]["history"]) == KILL_TRAIN["max_epochs"]


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
    files = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*")
                   if p.is_file())
    for name in ("adata.h5ad", "scvi/metadata.json", "scanvi/metadata.json",
                 "scvi_latent.npy", "scanvi_latent.npy", "scanvi_soft.npy",
                 "scanvi_pred.npy"):
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
    np.testing.assert_allclose(m.get_latent_representation(),
                               np.load(FIXTURES / "scanvi_latent.npy"), rtol=1e-6, atol=1e-6)
    soft = m.predict(soft=True)
    assert list(soft.columns) == ["L0_T0", "L0_T1"]
    np.testing.assert_allclose(soft.to_numpy(), np.load(FIXTURES / "scanvi_soft.npy"),
                               rtol=1e-6, atol=1e-6)
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
    "scvi/variables-a01a30a6d678b706.msgpack":
        "a01a30a6d678b706b4fc5428d72226bd86a645c3a7cc2ade34e63a729609867c",
    "scanvi/variables-3365d2e141fa02b8.msgpack":
        "3365d2e141fa02b8535320e5a506c26d945e4f6607ddb8646d2cabc66038d69d",
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
        assert {f"{kind}/{e['file']}": e["sha256"] for e in files.values()}.items() \
            <= FIXTURE_SHA256.items()


def test_format_v1_fixture_copy_loads(fixture_copy, fixture_adata):
    """The unmodified copy loads to the stored latent, so the refusals below fail
    only for the version they change."""
    m = SCVI.load(fixture_copy, adata=fixture_adata.copy())
    np.testing.assert_allclose(m.get_latent_representation(),
                               np.load(FIXTURES / "scvi_latent.npy"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version,drop,pattern", [
    (999, False, r"model format 999 \(jaxscanvi 0\.1\.0\).*reads formats up to "
                 r"\d+\. Fix: upgrade jaxscanvi \(pip install -U jaxscanvi\)"),
    (0, False, r"model format 0 \(jaxscanvi 0\.1\.0\), an older format.*cannot read.*"
               r"Fix: load it with the jaxscanvi release that wrote it \(pip install "
               r"'jaxscanvi==0\.1\.0'\).*or train and save the model again"),
    (-3, False, r"model format -3 .*an older format.*Fix:"),
    (None, True, r"no valid model format version \(model format None in metadata\.json"
                 r".*Fix: restore the folder's original metadata\.json"),
    ("1", False, r"no valid model format version \(model format '1'.*Fix:"),
    (True, False, r"no valid model format version \(model format True.*Fix:"),
    (1.0, False, r"no valid model format version \(model format 1\.0.*Fix:"),
], ids=["newer_999", "older_0", "negative", "missing", "string", "bool", "float"])
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


@pytest.mark.parametrize("layer,fmt", [(None, "csr"), ("counts", "csr"), (None, "csc"),
                                       (None, "dense")])
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
    assert msg.startswith(f"{field}: 2 of 50 gene(s) have no counts in any cell (gene3, "
                          "gene17);"), msg
    assert "Fix: filter them out" in msg and "sc.pp.filter_genes(adata, min_counts=1)" in msg
    assert f"np.asarray({field}.sum(0)).ravel() > 0" in msg
    # the warning points at the caller, not at jaxscanvi's internals
    assert all(Path(w.filename).resolve() == Path(__file__).resolve()
               for w in rec if "no counts in any cell" in str(w.message))
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
        "`python tests/catalogue.py --write`")


def test_error_catalogue_covers_every_case_and_names_real_tests():
    import importlib
    import catalogue
    table = catalogue.section()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    # every case of the parametrised error tables has its row
    n_cases = 0
    for src in catalogue.SOURCES:
        mod = importlib.import_module(src)
        for name, fn in vars(mod).items():
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize" and (
                        "field" in mark.args[0] or "exc" in mark.args[0]):
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
        assert re.search(r"\| `(InputError|ModelFormatError|FileNotFoundError|"
                         r"FileExistsError|NonFiniteLossError|UserWarning|ImportError)`", line), line

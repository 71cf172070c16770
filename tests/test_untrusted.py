"""Untrusted and damaged model folders: loading runs no code a folder names,
and every damaged folder gives a ModelFormatError or loads a model identical
to the original: never another exception, a hang, nor an allocation of more
than 1 GiB (each load must leave the peak resident size less than 1 GiB higher, so a huge
allocation surfaces as a MemoryError and fails the test).

Hand-made cases (HAND) name each damage; the fuzzer (hypothesis) cuts, flips
and inserts bytes in any file, and edits or deletes any metadata value,
re-signing the metadata's checksum half the time (a hostile writer can). An
unsigned edit must be caught (or be harmless: key order, spacing); a re-signed
one cannot be told from an intended edit, so it may load, but still only as a
ModelFormatError or a working model. JAXSCANVI_FUZZ_EXAMPLES sets the number
of fuzzed folders (default 500).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import textwrap
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from jaxscanvi import SCANVI, SCVI, ModelFormatError, io, synthetic_atlas

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
N_FUZZ = int(os.environ.get("JAXSCANVI_FUZZ_EXAMPLES", "500"))
CLASSES = {"scvi": SCVI, "scanvi": SCANVI, "query": SCANVI}
COUNTS: Counter = Counter()  # outcomes, printed at the end of the module


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SCVI, SCANVI and query SCANVI, trained one epoch each and saved."""
    a = synthetic_atlas(
        n_cells=200,
        n_genes=30,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=5,
    )
    ref, query = a[a.obs.batch == "batch0"].copy(), a[a.obs.batch == "batch1"].copy()
    SCVI.setup_anndata(ref, batch_key="batch", labels_key="cell_type")
    train = dict(max_epochs=1, batch_size=64, progress_bar=False)
    scvi = SCVI(ref, n_hidden=8, n_latent=3, seed=0)
    scvi.train(**train)
    scanvi = SCANVI.from_scvi_model(scvi, unlabeled_category="Unknown")
    scanvi.train(**train)
    # values the one-epoch run leaves unset, so that their checks are reached
    scanvi.reference_stats = {
        "threshold": 0.5,
        "quantile": 0.99,
        "latent_codes": [0, 1],
        "latent_means": [[0.0] * 3, [1.0] * 3],
        "latent_sds": [[1.0] * 3, [0.5] * 3],
    }
    SCANVI.prepare_query_anndata(query, scanvi)
    qmodel = SCANVI.load_query_data(query, scanvi)
    qmodel.train(**train)
    root = tmp_path_factory.mktemp("saved")
    for name, m in (("scvi", scvi), ("scanvi", scanvi), ("query", qmodel)):
        m.save(root / name)
    originals = {k: CLASSES[k].load(root / k) for k in CLASSES}
    yield root, originals
    print(f"\ndamaged-folder outcomes: {dict(sorted(COUNTS.items()))}")


def _meta(d: Path) -> dict:
    return json.loads((d / "metadata.json").read_text())


def _write_meta(d: Path, meta: dict, *, resign: bool = True) -> None:
    (d / "metadata.json").write_text(json.dumps(io.sign(meta) if resign else meta))


def _copy(saved, kind: str, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(saved[0] / kind, dest)
    return dest


# ------------------------------------------------------------ loading guard
@contextlib.contextmanager
def _limits(seconds: int = 60, headroom: int = 1 << 30):
    """Inside: at most ``seconds``, and a peak RSS that grows by under ``headroom``.

    (An address-space rlimit set in this process would be the direct check,
    but XLA's threads die by SIGSEGV rather than raise when they meet it, so
    the peak resident size is checked instead; a refused huge allocation shows
    up as a MemoryError, which fails the test as an exception of the wrong kind.)
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def timeout(*_):
        raise TimeoutError(f"load took over {seconds} s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    assert grown < headroom, f"a load raised peak memory by {grown / 2**30:.2f} GiB"


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def _identical(m, o) -> bool:
    same = (
        m.registry == o.registry
        and m.module.config == o.module.config
        and _leaves_equal(m.variables, o.variables)
        # (JSON objects have no order: a history's column order is not content)
        and m.history.to_frame().sort_index(axis=1).equals(o.history.to_frame().sort_index(axis=1))
        and np.array_equal(m.train_indices, o.train_indices)
        and np.array_equal(m.validation_indices, o.validation_indices)
        and m.is_trained == o.is_trained
        and m.init_seed == o.init_seed
        and m.loss_term_names == o.loss_term_names
        and m.query_info == o.query_info
        and (m._freeze is None) == (o._freeze is None)
        and (m._freeze is None or _leaves_equal(m._freeze, o._freeze))
    )
    if isinstance(o, SCANVI):
        same = same and (m.temperature, m.calibration, m.reference_stats, m.was_pretrained) == (
            o.temperature,
            o.calibration,
            o.reference_stats,
            o.was_pretrained,
        )
    return same


def _load(saved, kind: str, d: Path, *, may_differ: bool) -> str:
    """Load a damaged folder; the outcome, or fail the test."""
    try:
        with _limits():
            m = CLASSES[kind].load(d)
    except ModelFormatError as e:
        assert str(d) in str(e) or "Fix:" in str(e), str(e)
        return "ModelFormatError"
    except BaseException as e:  # noqa: BLE001 (any other kind is the failure)
        pytest.fail(f"{kind}: {type(e).__name__}: {str(e)[:500]}")
    if _identical(m, saved[1][kind]):
        return "identical"
    assert may_differ, f"{kind}: the damaged folder loaded as a different model"
    return "loaded an edited model"


# --------------------------------------------------- 1. no code from a file
EVIL = textwrap.dedent("""
    from pathlib import Path
    Path({marker!r}).write_text("imported")
""")


def test_load_never_imports_a_module_the_folder_names(saved, tmp_path, monkeypatch):
    marker = tmp_path / "side_effect"
    (tmp_path / "h21_evil_mod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in CLASSES:
        d = _copy(saved, kind, tmp_path / kind)
        meta = _meta(d)
        meta["custom_modules"] = {"encoder": "h21_evil_mod:Encoder", "decoder": None}
        _write_meta(d, meta)  # correctly signed: the checksum is not what stops it
        with pytest.raises(
            ModelFormatError,
            match=r"does not import code named by a file"
            r".*Fix: pass encoder=<that class>.*trust_custom_modules=True",
        ):
            CLASSES[kind].load(d)
        assert not marker.exists() and "h21_evil_mod" not in sys.modules
    # the CLI reads the same folders, through the same load
    from jaxscanvi.cli import main

    a = synthetic_atlas(
        n_cells=40,
        n_genes=30,
        n_batches=1,
        n_lineages=1,
        types_per_lineage=2,
        seed=1,
        markers_per_type=5,
    )
    a.write_h5ad(tmp_path / "q.h5ad")
    rc = main(
        [
            "predict",
            "--model-dir",
            str(tmp_path / "scanvi"),
            "--adata",
            str(tmp_path / "q.h5ad"),
            "--out",
            str(tmp_path / "out.h5ad"),
            "--quiet",
        ]
    )
    assert rc == 2 and not marker.exists() and "h21_evil_mod" not in sys.modules
    # and so does a query built from a folder
    with pytest.raises(ModelFormatError, match="trust_custom_modules"):
        SCANVI.load_query_data(a, tmp_path / "scanvi")
    assert not marker.exists()
    # the module would have run: trusting the folder imports it (and finds no class)
    with pytest.raises(ModelFormatError, match="cannot be imported"):
        SCVI.load(tmp_path / "scvi", trust_custom_modules=True)
    assert marker.read_text() == "imported"
    sys.modules.pop("h21_evil_mod", None)


def test_no_pickle_eval_or_import_from_file_contents():
    """The package's code holds no unpickling, eval or import by a read name."""
    import re

    pkg = ROOT / "jaxscanvi"
    # torchfile.py unpickles scvi-tools' model.pt, through its own whitelist
    # (checked below); _import.py only calls it
    allowed = {"model/_import.py", "torchfile.py"}
    bad = re.compile(
        r"(^|[^\w.])(eval|exec|__import__|compile)\(|\bimport (c?pickle|"
        r"marshal|shelve|dill)\b|from (c?pickle|dill) import|allow_pickle\s*=\s*"
        r"True|read_pickle|torch\.load|import_module\(",
        re.M,
    )
    hits = [
        (p.relative_to(pkg).as_posix(), m.group(0))
        for p in pkg.rglob("*.py")
        for m in bad.finditer(p.read_text())
    ]
    assert [h for h in hits if h[0] not in allowed] == [
        ("__init__.py", "import_module("),
        ("__init__.py", "import_module("),
        ("model/_persist.py", "import_module("),
    ], hits
    # the package's lazy names import only its own modules, from fixed tables
    import jaxscanvi

    assert all(m.startswith(".") for m, _ in jaxscanvi._LAZY.values())
    assert all(n.isidentifier() for n in jaxscanvi._SUBMODULES)
    with pytest.raises(AttributeError):
        jaxscanvi.__getattr__("os")
    # torchfile's only unpickler resolves names through its whitelist, and
    # nothing there unpickles with the stock loader
    tf = (pkg / "torchfile.py").read_text()
    assert "class _Unpickler(pickle.Unpickler)" in tf and "def find_class" in tf
    assert not re.search(r"pickle\.loads?\(|(?<!_)Unpickler\(", tf)
    # and _persist's one import runs only behind trust_custom_modules
    src = (pkg / "model" / "_persist.py").read_text()
    body = src[src.index("def _resolve_module") :]
    assert body.index("if not trust:") < body.index("import_module(")


# ------------------------------------------------- 2. damaged folders, by hand
def _edit(fn, *, resign: bool = True):
    """A damage that edits the metadata (re-signed: the field's own check must catch it)."""

    def damage(d: Path):
        meta = _meta(d)
        fn(meta)
        _write_meta(d, meta, resign=resign)

    return damage


def _blob_path(d: Path, name: str = "variables") -> Path:
    return d / _meta(d)["files"][name]["file"]


def _bytes(fn, name: str = "variables"):
    """A damage of a blob's bytes (its checksum left as it was)."""

    def damage(d: Path):
        p = _blob_path(d, name)
        p.write_bytes(fn(p.read_bytes()))

    return damage


def _reblob(fn, name: str = "variables"):
    """Rewrite a blob's arrays, with a matching checksum (a hostile writer)."""

    def damage(d: Path):
        p = _blob_path(d, name)
        data = _pack(fn(serialization.msgpack_restore(p.read_bytes())))
        p.write_bytes(data)
        meta = _meta(d)
        meta["files"][name]["sha256"] = io.sha256(data)
        _write_meta(d, meta)

    return damage


class _Declared:
    """An array that declares ``shape`` but holds 4 bytes."""

    def __init__(self, shape):
        self.shape = shape


def _pack(tree) -> bytes:
    """msgpack as flax writes it (an ndarray is ext 1: shape, dtype name, bytes)."""
    import msgpack

    def ext(o):
        if isinstance(o, _Declared):
            return msgpack.ExtType(1, msgpack.packb((o.shape, "float32", b"\0" * 4)))
        if isinstance(o, np.ndarray):
            return msgpack.ExtType(
                1, msgpack.packb((o.shape, o.dtype.name, o.tobytes()), use_bin_type=True)
            )
        raise TypeError(type(o))

    return msgpack.packb(tree, default=ext, use_bin_type=True)


def _first_leaf(tree, fn):
    """``tree`` with its first array replaced by ``fn(array)``."""
    done = []

    def walk(t):
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        if done:
            return t
        done.append(1)
        return fn(t)

    return walk(tree)


def _flip(data: bytes, at: float = 0.5) -> bytes:
    b = bytearray(data)
    b[int(len(b) * at)] ^= 0x5A
    return bytes(b)


def _meta_bytes(fn):
    def damage(d: Path):
        p = d / "metadata.json"
        p.write_bytes(fn(p.read_bytes()))

    return damage


def _set(path: str, value):
    """Set a dotted path in the metadata (``config.n_genes``) to ``value``."""

    def fn(meta):
        *head, last = path.split(".")
        t = meta
        for k in head:
            t = t[k]
        t[last] = value

    return _edit(fn)


def _garbage_adata(d: Path):
    """A saved AnnData that is not one, correctly listed and signed."""
    data = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4
    (d / "adata-0000.h5ad").write_bytes(data)
    meta = _meta(d)
    meta["files"]["adata"] = {"file": "adata-0000.h5ad", "sha256": io.sha256(data)}
    _write_meta(d, meta)


def _reorder(meta_bytes: bytes) -> bytes:
    meta = json.loads(meta_bytes)
    return json.dumps(dict(reversed(list(meta.items()))), indent=3).encode()


HUGE = 10**12
HAND = [
    # id, model kind, damage, expected: "error" (ModelFormatError) or "identical"
    ("metadata_truncated_half", "scvi", _meta_bytes(lambda b: b[: len(b) // 2]), "error"),
    ("metadata_empty", "scanvi", _meta_bytes(lambda b: b""), "error"),
    ("metadata_not_utf8", "query", _meta_bytes(lambda b: b"\xff\xfe" + b[2:]), "error"),
    ("metadata_byte_flipped", "scvi", _meta_bytes(lambda b: _flip(b, 0.3)), "error"),
    (
        "metadata_value_edited_unsigned",
        "scanvi",
        _edit(lambda m: m.update(temperature=2.0), resign=False),
        "error",
    ),
    ("metadata_deeply_nested", "scvi", _meta_bytes(lambda b: b"[" * 200000), "error"),
    (
        "metadata_is_a_folder",
        "scvi",
        lambda d: ((d / "metadata.json").unlink(), (d / "metadata.json").mkdir()),
        "error",
    ),
    ("metadata_keys_reordered", "query", _meta_bytes(_reorder), "identical"),
    (
        "metadata_respaced",
        "scanvi",
        _meta_bytes(lambda b: json.dumps(json.loads(b)).encode()),
        "identical",
    ),
    ("blob_truncated", "scvi", _bytes(lambda b: b[: len(b) // 2]), "error"),
    ("blob_empty", "scanvi", _bytes(lambda b: b""), "error"),
    ("blob_byte_flipped", "query", _bytes(_flip), "error"),
    ("freeze_blob_truncated", "query", _bytes(lambda b: b[:100], "freeze"), "error"),
    ("blob_missing", "scvi", lambda d: _blob_path(d).unlink(), "error"),
    ("file_outside_folder", "scvi", _set("files.variables.file", "../scanvi/x.msgpack"), "error"),
    ("file_absolute_path", "scanvi", _set("files.variables.file", "/etc/hostname"), "error"),
    ("file_checksum_not_text", "scvi", _set("files.variables.sha256", 5), "error"),
    ("files_not_an_object", "scvi", _set("files", ["variables"]), "error"),
    ("n_genes_1e12", "scvi", _set("config.n_genes", HUGE), "error"),
    ("n_genes_negative", "scanvi", _set("config.n_genes", -30), "error"),
    ("n_genes_text", "scvi", _set("config.n_genes", "30"), "error"),
    ("n_genes_float", "scvi", _set("config.n_genes", 30.0), "error"),
    ("n_genes_bool", "scvi", _set("config.n_genes", True), "error"),
    ("n_genes_nan", "scvi", _set("config.n_genes", math.nan), "error"),
    ("n_batch_1e12", "query", _set("config.n_batch", HUGE), "error"),
    ("n_labels_zero", "scanvi", _set("config.n_labels", 0), "error"),
    ("n_continuous_cov_1e12", "scvi", _set("config.n_continuous_cov", HUGE), "error"),
    ("n_continuous_cov_negative", "scvi", _set("config.n_continuous_cov", -1), "error"),
    ("n_cats_per_cov_1e12", "scvi", _set("config.n_cats_per_cov", [HUGE]), "error"),
    ("n_hidden_1e12", "scanvi", _set("config.n_hidden", HUGE), "error"),
    ("n_latent_larger", "scvi", _set("config.n_latent", 1000), "error"),
    ("n_layers_50", "query", _set("config.n_layers", 50), "error"),
    (
        "n_layers_2689",
        "query",
        _set("config.n_layers", 2689),
        "error",
    ),  # fuzzer's find: was minutes
    ("classifier_n_layers_1e6", "scanvi", _set("config.classifier_n_layers", 10**6), "error"),
    ("classifier_n_hidden_1e12", "scanvi", _set("config.classifier_n_hidden", HUGE), "error"),
    ("dropout_nan", "scvi", _set("config.dropout_rate", math.nan), "error"),
    ("use_batch_norm_unknown", "scvi", _set("config.use_batch_norm", "sometimes"), "error"),
    ("y_prior_nan", "scanvi", _set("config.y_prior", [math.nan, 1.0]), "error"),
    ("temperature_nan", "scanvi", _set("temperature", math.nan), "error"),
    ("temperature_negative", "query", _set("temperature", -1.0), "error"),
    ("temperature_text", "scanvi", _set("temperature", "hot"), "error"),
    ("train_index_1e30", "scvi", _set("train_indices", [10**30]), "error"),
    ("train_index_negative", "scanvi", _set("train_indices", [0, -1]), "error"),
    ("train_index_float", "scvi", _set("train_indices", [1.5]), "error"),
    ("train_indices_text", "scvi", _set("train_indices", "all"), "error"),
    (
        "validation_overlaps_train",
        "query",
        _edit(lambda m: m["validation_indices"].append(m["train_indices"][0])),
        "error",
    ),
    (
        "var_names_duplicated",
        "scvi",
        _edit(lambda m: m["registry"]["var_names"].__setitem__(1, "gene0")),
        "error",
    ),
    ("var_names_a_string", "scvi", _set("registry.var_names", "abc"), "error"),
    ("batch_categories_empty", "scanvi", _set("registry.batch_categories", []), "error"),
    (
        "covariate_categories_without_keys",
        "scvi",
        _set("registry.categorical_covariate_categories", [["a"]]),
        "error",
    ),
    ("history_without_epoch", "scvi", _set("history", [{"train_loss": 1.0}]), "error"),
    ("history_text", "scanvi", _set("history", "long"), "error"),
    ("init_seed_2_80", "scvi", _set("init_seed", 2**80), "error"),
    ("init_seed_float", "scanvi", _set("init_seed", 0.5), "error"),
    ("custom_module_not_text", "scvi", _set("custom_modules", {"encoder": 5}), "error"),
    ("is_trained_text", "scvi", _set("is_trained", "yes"), "error"),
    ("query_freeze_not_bool", "query", _set("query_info.freeze", {"x": "y"}), "error"),
    ("threshold_nan", "scanvi", _set("reference_stats.threshold", math.nan), "error"),
    (
        "latent_means_wrong_width",
        "scanvi",
        _set("reference_stats.latent_means", [[0.0], [1.0]]),
        "error",
    ),
    ("calibration_text_values", "scanvi", _set("calibration", {"ece_after": "low"}), "error"),
    ("config_unknown_field", "query", _set("config.n_heads", 4), "error"),
    ("model_class_other", "scvi", _set("model_class", "SCANVI"), "error"),
    ("format_version_1e30", "scvi", _set("format_version", 10**30), "error"),
    ("loss_terms_numbers", "scvi", _set("loss_terms", [1]), "error"),
    (
        "blob_float64",
        "scvi",
        _reblob(lambda t: _first_leaf(t, lambda a: np.asarray(a, np.float64))),
        "error",
    ),
    (
        "blob_shape_shrunk",
        "scanvi",
        _reblob(lambda t: _first_leaf(t, lambda a: a[..., :1] if a.ndim else a[None])),
        "error",
    ),
    (
        "blob_extra_array",
        "scvi",
        _reblob(lambda t: {**t, "params": {**t["params"], "extra": np.zeros(3, np.float32)}}),
        "error",
    ),
    (
        "blob_array_replaced_by_text",
        "query",
        _reblob(lambda t: _first_leaf(t, lambda a: "text")),
        "error",
    ),
    (
        "blob_huge_declared_shape",
        "scvi",
        _reblob(lambda t: _first_leaf(t, lambda a: _Declared((HUGE, HUGE)))),
        "error",
    ),
    (
        "freeze_blob_int_masks",
        "query",
        _reblob(lambda t: _first_leaf(t, lambda a: np.asarray(a, np.int8)), "freeze"),
        "error",
    ),
    ("saved_adata_not_hdf5", "scanvi", _garbage_adata, "error"),
    (
        "stray_tmp_file",
        "scvi",
        lambda d: (d / ".variables.tmp").write_bytes(b"x" * 10),
        "identical",
    ),
]


@pytest.mark.parametrize("kind,damage,expected", [c[1:] for c in HAND], ids=[c[0] for c in HAND])
def test_hand_damaged_folder(saved, tmp_path, kind, damage, expected):
    d = _copy(saved, kind, tmp_path / "m")
    damage(d)
    outcome = _load(saved, kind, d, may_differ=False)
    COUNTS[f"hand: {outcome}"] += 1
    assert outcome == {"error": "ModelFormatError", "identical": "identical"}[expected]


def test_hand_cases_are_many_and_distinct():
    assert len(HAND) >= 40 and len({c[0] for c in HAND}) == len(HAND)


# ------------------------------------------------------ 2. fuzzed damaged folders
VALUES = st.one_of(
    st.sampled_from(
        [
            10**12,
            -1,
            0,
            1,
            2**31,
            2**63,
            2**80,
            math.nan,
            math.inf,
            -0.0,
            "",
            "gene0",
            None,
            True,
            False,
            [],
            {},
            [[]],
            [10**12],
            {"a": None},
        ]
    ),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
)


def _json_paths(obj, prefix=()):
    """Paths into the metadata (a few items of each long list)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i in sorted({0, 1, len(obj) - 1} & set(range(len(obj)))):
            out += _json_paths(obj[i], (*prefix, i))
    return out


def _fuzz_bytes(d: Path, data) -> None:
    files = sorted(p for p in d.iterdir() if p.is_file())
    p = data.draw(st.sampled_from(files))
    b = p.read_bytes()
    at = data.draw(st.integers(0, max(len(b) - 1, 0)))
    op = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    if op == "truncate":
        b = b[:at]
    elif op == "flip" and b:
        b = b[:at] + bytes([b[at] ^ data.draw(st.integers(1, 255))]) + b[at + 1 :]
    else:
        b = b[:at] + data.draw(st.binary(min_size=1, max_size=8)) + b[at:]
    p.write_bytes(b)


def _fuzz_json(d: Path, data) -> bool:
    """Edit one metadata value; True when re-signed."""
    meta = _meta(d)
    path = data.draw(st.sampled_from(_json_paths(meta)[1:]))
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    op = data.draw(st.sampled_from(["set", "set", "delete", "reorder"]))
    if op == "set":
        parent[path[-1]] = data.draw(VALUES)
    elif op == "delete":
        parent.pop(path[-1])
    elif isinstance(parent, dict):
        items = list(parent.items())
        data.draw(st.randoms()).shuffle(items)
        parent.clear()
        parent.update(items)
    resign = data.draw(st.booleans())
    _write_meta(d, meta, resign=resign)
    return resign


def _fuzz_blob(d: Path, data) -> bool:
    """Rewrite one array of a blob, re-signed; True when the result may be a valid
    array of other values (a declared shape that fits its bytes)."""
    names = sorted(_meta(d)["files"])
    name = data.draw(st.sampled_from(names))
    flat = []

    def collect(t, path=()):
        if isinstance(t, dict):
            for k, v in t.items():
                collect(v, (*path, k))
        else:
            flat.append(path)

    tree = serialization.msgpack_restore(_blob_path(d, name).read_bytes())
    collect(tree)
    path = data.draw(st.sampled_from(flat))
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    a = np.asarray(parent[path[-1]])
    op = data.draw(st.sampled_from(["grow", "shrink", "dtype", "drop", "declare"]))
    if op == "grow":
        parent[path[-1]] = np.concatenate([a.reshape(-1), a.reshape(-1)[:1]])
    elif op == "shrink":
        parent[path[-1]] = a.reshape(-1)[:-1]
    elif op == "dtype":
        parent[path[-1]] = a.astype(
            data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.bool_, np.uint8]))
        )
    elif op == "drop":
        parent.pop(path[-1])
    else:
        parent[path[-1]] = _Declared(
            data.draw(st.sampled_from([(HUGE,), (2**31, 2**31), (-1,), (0,)]))
        )
    _reblob(lambda _: tree, name)(d)
    return op == "declare"


@settings(
    max_examples=N_FUZZ,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_fuzzed_damaged_folder(saved, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(sorted(CLASSES)))
    d = _copy(saved, kind, tmp_path_factory.getbasetemp() / "fuzz")
    how = data.draw(st.sampled_from(["bytes", "json", "blob"]))
    resigned = False
    if how == "bytes":
        _fuzz_bytes(d, data)
    elif how == "json":
        resigned = _fuzz_json(d, data)
    else:
        resigned = _fuzz_blob(d, data)
    outcome = _load(saved, kind, d, may_differ=resigned)
    COUNTS[f"fuzz {how}{' re-signed' if resigned else ''}: {outcome}"] += 1
    COUNTS["fuzz total"] += 1


# ------------------------------------------------ 2. damaged .h5ad for the CLI
def _atlas():
    return synthetic_atlas(
        n_cells=60,
        n_genes=20,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=3,
    )


def _written(fn):
    def make(p: Path):
        a = _atlas()
        fn(a)
        a.write_h5ad(p)

    return make


def _cut(frac: float):
    def make(p: Path):
        _atlas().write_h5ad(p)
        b = p.read_bytes()
        p.write_bytes(b[: int(len(b) * frac)])

    return make


def _flipped(p: Path):
    _atlas().write_h5ad(p)
    b = bytearray(p.read_bytes())
    for at in (0.33, 0.5):
        b[int(len(b) * at)] ^= 0xFF
    p.write_bytes(bytes(b))


def _dense(a, fn):
    a.X = fn(a.X.toarray())


def _set_obs(key, fn):
    def edit(a):
        a.obs[key] = fn(a)

    return edit


def _batch_with_nan(a):
    col = a.obs["batch"].astype(object)
    col.iloc[0] = np.nan
    a.obs["batch"] = col


def _dup_genes(a):
    a.var_names = ["g"] * a.n_vars


H5AD = [
    # id, how the file is made, what the one error line must say
    ("random_bytes", lambda p: p.write_bytes(os.urandom(3000)), r"not a readable \.h5ad"),
    ("empty_file", lambda p: p.write_bytes(b""), r"not a readable \.h5ad"),
    ("truncated_half", _cut(0.5), r"not a readable \.h5ad"),
    ("truncated_to_header", _cut(0.02), r"not a readable \.h5ad"),
    ("bytes_flipped", _flipped, r"not a readable \.h5ad|adata"),
    ("zero_cells", lambda p: _atlas()[:0].copy().write_h5ad(p), r"no cells"),
    ("zero_genes", lambda p: _atlas()[:, :0].copy().write_h5ad(p), r"no genes"),
    ("duplicate_var_names", _written(_dup_genes), r"gene names are duplicated"),
    ("fractional_counts", _written(lambda a: _dense(a, lambda x: x * 0.5)), r"non-integer"),
    ("negative_counts", _written(lambda a: _dense(a, lambda x: x - 1)), r"negative"),
    (
        "nan_counts",
        _written(
            lambda a: _dense(
                a, lambda x: np.where(np.eye(*x.shape) > 0, np.nan, x).astype(np.float32)
            )
        ),
        r"NaN or inf",
    ),
    (
        "complex_counts",
        _written(lambda a: _dense(a, lambda x: x.astype(np.complex64))),
        r"not numeric",
    ),
    ("bool_counts", _written(lambda a: _dense(a, lambda x: x > 0)), r"not numeric"),
    ("no_X", _written(lambda a: setattr(a, "X", None)), r"adata\.X is empty"),
    (
        "labels_continuous",
        _written(_set_obs("cell_type", lambda a: np.linspace(0.1, 0.9, a.n_obs))),
        r"obs\['cell_type'\].*look continuous",
    ),
    (
        "labels_column_missing",
        _written(lambda a: a.obs.pop("cell_type")),
        r"not a column of adata\.obs",
    ),
    ("batch_with_missing_value", _written(_batch_with_nan), r"missing values"),
    ("a_folder", lambda p: p.mkdir(), r"no such file"),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in H5AD], ids=[c[0] for c in H5AD])
def test_cli_damaged_h5ad_is_one_clear_error(tmp_path, capsys, make, pattern):
    import re
    import warnings

    from jaxscanvi.cli import main

    p = tmp_path / "in.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (anndata's, about the odd inputs)
        make(p)
        rc = main(
            [
                "train",
                "--adata",
                str(p),
                "--model-dir",
                str(tmp_path / "m"),
                "--labels-key",
                "cell_type",
                "--batch-key",
                "batch",
                "--n-top-genes",
                "0",
                "--scvi-epochs",
                "1",
                "--scanvi-epochs",
                "1",
                "--quiet",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("jaxscanvi train: error: ") and "Fix:" in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "m").exists()  # nothing trained, nothing written
    COUNTS["h5ad: one clear error"] += 1

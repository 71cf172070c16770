"""A flat label hierarchy (every type's parent the root) trains flat scANVI.

Its config has no ``label_parents``, so it builds exactly the no-hierarchy
model's programs (none new after that model trained), and training with one
seed gives the same losses and weights bit for bit, cells labelled with the
root counting as unlabelled. Prediction by level still reads the registry's
hierarchy. Also: save/load, scvi-tools export, and a query that makes the
tree deeper.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
import pytest
from test_scanvi import make_batch

from jaxscanvi import SCANVI, InputError, io
from jaxscanvi.data import hierarchy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _programs import ProgramLog

UNL = "Unknown"
ROOT = "cell"
ARCH: dict[str, Any] = dict(n_hidden=24, n_latent=4)
FIT: dict[str, Any] = dict(max_epochs=2, batch_size=64, n_samples_per_label=30, progress_bar=False)


def _labelled(small_atlas, at_root: str):
    """Types, 60 % hidden: as ``UNL``, or every other one labelled ``at_root``."""
    a = small_atlas.copy()
    types = a.obs["cell_type"].astype(str).to_numpy()
    hidden = np.random.default_rng(1).random(a.n_obs) < 0.6
    root_ones = hidden & (np.arange(a.n_obs) % 2 == 0)
    a.obs["lab"] = pd.Categorical(np.where(root_ones, at_root, np.where(hidden, UNL, types)))
    return a


@pytest.fixture(scope="module")
def pair(small_atlas):
    """(no hierarchy, flat hierarchy, programs the flat one built): the same seed
    and data, its root-labelled cells unlabelled in the other; each trained."""
    none_data = _labelled(small_atlas, UNL)
    flat_data = _labelled(small_atlas, ROOT)
    types = sorted(set(small_atlas.obs["cell_type"].astype(str)))
    SCANVI.setup_anndata(none_data, labels_key="lab", unlabeled_category=UNL, batch_key="batch")
    SCANVI.setup_anndata(
        flat_data,
        labels_key="lab",
        unlabeled_category=UNL,
        batch_key="batch",
        label_hierarchy={t: ROOT for t in types},
    )
    none, flat = SCANVI(none_data, seed=3, **ARCH), SCANVI(flat_data, seed=3, **ARCH)
    none.train(**FIT)
    with ProgramLog() as log:
        flat.train(**FIT)
    return none, flat, log


def test_flat_hierarchy_has_flat_config_and_codes(pair):
    none, flat, _ = pair
    assert flat.registry.label_hierarchy and not none.registry.label_hierarchy
    assert flat.module.config.label_parents is None
    assert flat.module.config == none.module.config
    # root-labelled cells get the unlabelled code, as a hierarchy gives them
    codes, ref = flat._train_cells().labels, none._train_cells().labels
    np.testing.assert_array_equal(codes, ref)
    at_root = (flat.adata.obs["lab"] == ROOT).to_numpy()
    assert at_root.sum() > 50 and (codes[at_root] == flat.registry.n_labels).all()


def test_flat_hierarchy_builds_no_program_of_its_own(pair):
    """After the no-hierarchy model trained, training the flat one compiled
    nothing: its epoch, step and after-fit programs are the same ones."""
    none, flat, log = pair
    assert log.n_programs == 0, log.by_name()
    tasks = [m.fit_plan(**FIT).task for m in (none, flat)]
    assert tasks[0].loss_spec == tasks[1].loss_spec
    C = none.registry.n_labels
    batches = (make_batch([0, C, 1, C, 2, 3, C, 0], 200), make_batch([0, 1, 2, 3], 200, seed=1))
    key = jax.random.PRNGKey(0)
    texts = [
        str(jax.make_jaxpr(t.make_loss(train=True))(t.params, t.state, batches, key, 1.0))
        for t in tasks
    ]
    assert len(texts[0]) > 10_000  # the whole loss, traced
    assert texts[0] == texts[1]


def test_same_seed_same_training(pair):
    none, flat, _ = pair
    frames = [m.history.to_frame() for m in (none, flat)]
    cols = [c for c in frames[0].columns if c.endswith(("_train", "_validation"))]
    assert "elbo_train" in cols and "classification_loss_train" in cols
    for col in cols:
        np.testing.assert_array_equal(frames[1][col].to_numpy(), frames[0][col].to_numpy())
    leaves = zip(jax.tree_util.tree_leaves(flat.params), jax.tree_util.tree_leaves(none.params))
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(flat.predict(), none.predict())


def test_predictions_by_level(pair):
    _, flat, _ = pair
    soft = flat.predict(soft=True)
    every = flat.predict(soft=True, level="all")
    assert list(every.columns) == [*soft.columns, ROOT]
    np.testing.assert_allclose(every[ROOT], 1.0, atol=1e-6)
    np.testing.assert_array_equal(flat.predict(level=1), flat.predict())
    deep = flat.predict(level="deepest", threshold=0.9)
    top = soft.to_numpy().max(1)
    sure = top >= 0.9
    np.testing.assert_array_equal(deep["depth"].to_numpy(), sure.astype(int))
    np.testing.assert_array_equal(deep["prediction"][sure], flat.predict()[sure])
    assert (deep["prediction"][~sure] == ROOT).all()


def test_save_load(pair, tmp_path):
    _, flat, _ = pair
    flat.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert "label_parents" not in meta["config"] and meta["registry"]["label_hierarchy"]
    back = SCANVI.load(tmp_path / "m", flat.adata)
    assert back.module.config == flat.module.config and back.registry == flat.registry
    want = flat.predict(soft=True, level="all")
    pd.testing.assert_frame_equal(back.predict(soft=True, level="all"), want)
    # a folder written when a flat hierarchy still trained its own program
    tree = hierarchy.from_registry(flat.registry)
    assert tree is not None and not tree.inner
    meta["config"]["label_parents"] = list(tree.parents)
    (tmp_path / "m" / "metadata.json").write_text(json.dumps(io.sign(meta)))
    old = SCANVI.load(tmp_path / "m", flat.adata)
    assert old.module.config.label_parents is None
    pd.testing.assert_frame_equal(old.predict(soft=True, level="all"), want)


def test_scvi_tools_export(pair, tmp_path):
    """Flat scANVI is what scvi-tools holds; cells labelled with the root are not."""
    none, flat, _ = pair
    with pytest.raises(InputError, match="labelled with the hierarchy's root"):
        flat.save(tmp_path / "st", format="scvi-tools")
    flat.save(tmp_path / "m")
    relabelled = flat.adata.copy()
    relabelled.obs["lab"] = none.adata.obs["lab"].to_numpy()
    model = SCANVI.load(tmp_path / "m", relabelled)
    with pytest.warns(UserWarning, match="no place for the label hierarchy"):
        model.save(tmp_path / "st", format="scvi-tools")
    back = SCANVI.load(tmp_path / "st", none.adata)
    assert not back.registry.label_hierarchy
    np.testing.assert_array_equal(back.predict(), flat.predict())


def test_query_that_deepens_the_tree(pair):
    """A new leaf under the root keeps the tree flat; one under a new inner node
    makes the query model hierarchical."""
    _, flat, _ = pair
    q = flat.adata[flat.adata.obs["batch"].cat.codes == 1].copy()
    q.uns.pop("_jaxscanvi_registry", None)
    q.obs["batch"] = pd.Categorical(["query"] * q.n_obs)
    types = q.obs["cell_type"].astype(str).to_numpy()
    is_new = types == types[0]
    for ext, deep in (({"new": ROOT}, False), ({"new": "group", "group": ROOT}, True)):
        q.obs["lab"] = pd.Categorical(np.where(is_new, "new", UNL))
        with pytest.warns(UserWarning, match="new cell types"):
            model = SCANVI.load_query_data(q, flat, label_hierarchy=ext)
        tree = hierarchy.from_registry(model.registry)
        assert tree is not None and tree.leaves[-1] == "new"
        parents = model.module.config.label_parents
        assert parents == (tree.parents if deep else None)
        model.train(max_epochs=1, batch_size=64, progress_bar=False)
        assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
        if deep:
            every = model.predict(soft=True, level="all")
            np.testing.assert_allclose(every["group"], every["new"], atol=1e-6)

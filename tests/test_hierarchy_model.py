"""Labels at every level of a cell-type hierarchy: the model.

One SCANVI on the small synthetic atlas (2 lineages x 2 types): batch 0 keeps
its types, batch 1 only its lineages, half the cells unlabelled. Checked:
setup and codes, prediction down the tree (leaves, every node, the deepest
confident node, a depth), calibration and novelty, save/load, refusals, query
mapping with labels at any level and a new leaf, and the ontology helper.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxscanvi import SCANVI, InputError, io
from jaxscanvi.data import hierarchy
from jaxscanvi.errors import ModelFormatError

UNL = "Unknown"
ARCH = dict(n_hidden=32, n_latent=6)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree_atlas(small_atlas):
    a = small_atlas.copy()
    types = a.obs["cell_type"].astype(str).to_numpy()
    lineage = a.obs["lineage"].astype(str).to_numpy()
    coarse_batch = (a.obs["batch"].cat.codes == 1).to_numpy()
    hidden = np.random.default_rng(0).random(a.n_obs) < 0.5
    a.obs["labels_obs"] = pd.Categorical(
        np.where(hidden, UNL, np.where(coarse_batch, lineage, types))
    )
    a.obs["hidden"] = hidden
    a.uns["tree"] = {**dict(zip(types, lineage)), **{x: "cell" for x in set(lineage)}}
    return a


@pytest.fixture(scope="module")
def tree_model(tree_atlas):
    SCANVI.setup_anndata(
        tree_atlas,
        labels_key="labels_obs",
        unlabeled_category=UNL,
        batch_key="batch",
        label_hierarchy=tree_atlas.uns["tree"],
    )
    model = SCANVI(tree_atlas, **ARCH)
    model.train(max_epochs=30, n_samples_per_label=40, progress_bar=False)
    return model


def test_setup_codes_and_config(tree_model, tree_atlas):
    reg = tree_model.registry
    leaves = sorted(set(tree_atlas.obs["cell_type"].astype(str)))
    assert sorted(reg.label_categories) == leaves
    tree = hierarchy.from_registry(reg)
    assert tree.root == "cell" and set(tree.inner) == {"L0", "L1"}
    assert tree_model.module.config.label_parents == tree.parents
    codes = tree_model._train_cells().labels
    obs = tree_atlas.obs["labels_obs"].astype(str).to_numpy()
    names = np.asarray(tree.nodes, dtype=object)
    lab = codes != len(leaves)
    np.testing.assert_array_equal(names[codes[lab]], obs[lab])
    assert set(obs[~lab]) == {UNL}
    assert (codes > len(leaves)).sum() > 50  # cells labelled at inner nodes


def test_predictions_down_the_tree(tree_model, tree_atlas):
    soft = tree_model.predict(soft=True)
    every = tree_model.predict(soft=True, level="all")
    assert list(every.columns) == list(hierarchy.from_registry(tree_model.registry).nodes)
    np.testing.assert_allclose(every[list(soft.columns)].to_numpy(), soft.to_numpy(), atol=1e-6)
    np.testing.assert_allclose(every["cell"], 1.0, atol=1e-6)
    for lin in ("L0", "L1"):
        kids = [c for c in soft.columns if c.startswith(lin + "_")]
        np.testing.assert_allclose(every[lin], every[kids].sum(1), atol=1e-6)
    deep = tree_model.predict(level="deepest", threshold=0.9)
    assert list(deep.columns) == ["prediction", "probability", "depth"]
    assert (deep["probability"] >= 0.9 - 1e-6).all()
    for i, (node, p, _d) in enumerate(deep.itertuples(index=False)):
        np.testing.assert_allclose(p, every.iloc[i][node], rtol=1e-6)
        # nothing deeper clears the threshold
        deeper = {"cell": ["L0", "L1"], "L0": ["L0_T0", "L0_T1"], "L1": ["L1_T0", "L1_T1"]}
        assert all(every.iloc[i][k] < 0.9 for k in deeper.get(node, [])), (i, node)
    assert set(deep["depth"]) <= {0, 1, 2} and (deep["depth"] == 2).mean() > 0.5
    coarse = tree_model.predict(level=1)
    np.testing.assert_array_equal(coarse, np.where(every["L0"] >= every["L1"], "L0", "L1"))


def test_accuracy_and_coarse_cells_get_fine_types(tree_model, tree_atlas):
    """Hidden cells get their type; cells labelled only with a lineage are given a
    type of that lineage."""
    truth = tree_atlas.obs["cell_type"].astype(str).to_numpy()
    pred = tree_model.predict()
    hidden = tree_atlas.obs["hidden"].to_numpy()
    assert (pred[hidden] == truth[hidden]).mean() > 0.85
    obs = tree_atlas.obs["labels_obs"].astype(str).to_numpy()
    at_lineage = np.isin(obs, ["L0", "L1"])
    assert (
        np.char.startswith(pred[at_lineage].astype(str), obs[at_lineage].astype(str))
    ).mean() > 0.95


def test_calibration_and_novelty_work_as_before(tree_model):
    assert tree_model.temperature > 0 and "ece_after" in tree_model.calibration
    assert 0 <= tree_model.calibration_error() <= 1
    scores = tree_model.novelty_score()
    assert len(scores) == tree_model.adata.n_obs


def test_save_load_round_trip(tree_model, tree_atlas, tmp_path):
    tree_model.save(tmp_path / "m")
    back = SCANVI.load(tmp_path / "m", tree_atlas)
    assert back.registry == tree_model.registry
    assert back.module.config == tree_model.module.config
    pd.testing.assert_frame_equal(
        back.predict(soft=True, level="all"), tree_model.predict(soft=True, level="all")
    )
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    meta["config"]["label_parents"][0] = meta["config"]["label_parents"][1] + 1
    (tmp_path / "m" / "metadata.json").write_text(json.dumps(io.sign(meta)))
    with pytest.raises(ModelFormatError, match="label_parents"):
        SCANVI.load(tmp_path / "m", tree_atlas)


def test_flat_models_write_no_hierarchy_fields(atlas, tmp_path):
    atlas.obs["lab"] = atlas.obs["cell_type"]
    SCANVI.setup_anndata(atlas, labels_key="lab", unlabeled_category=UNL)
    m = SCANVI(atlas, **ARCH)
    m.save(tmp_path / "flat")
    meta = json.loads((tmp_path / "flat" / "metadata.json").read_text())
    assert "label_hierarchy" not in meta["registry"]
    assert "label_parents" not in meta["config"]
    with pytest.raises(InputError, match="no label hierarchy"):
        m.predict(level="deepest", threshold=0.9)


def test_refusals(tree_model, tmp_path):
    with pytest.raises(InputError, match="label hierarchy"):
        tree_model.save(tmp_path / "st", format="scvi-tools")
    for kw, match in (
        (dict(level="deepest"), "threshold"),
        (dict(level="deepest", threshold=1.5), "threshold"),
        (dict(level="all"), "soft"),
        (dict(level="coarsest"), "unknown"),
        (dict(level=0), "depths"),
        (dict(threshold=0.5), "deepest"),
    ):
        with pytest.raises(InputError, match=match):
            tree_model.predict(**kw)


def test_gene_label_dispersion_refused(tree_atlas):
    with pytest.raises(InputError, match="gene-label"):
        SCANVI(tree_atlas, dispersion="gene-label", **ARCH)


# ---------------------------------------------------------------- queries
def _query(tree_atlas, labels):
    q = tree_atlas[tree_atlas.obs["batch"].cat.codes == 1].copy()
    q.uns.pop("_jaxscanvi_registry", None)
    q.obs["batch"] = pd.Categorical(["query"] * q.n_obs)
    q.obs["labels_obs"] = pd.Categorical(labels(q))
    return q


def test_query_labels_at_any_level_and_a_new_leaf(tree_model, tree_atlas):
    def labels(q):
        t = q.obs["cell_type"].astype(str).to_numpy()
        out = np.where(np.arange(q.n_obs) % 3 == 0, q.obs["lineage"].astype(str), UNL)
        return np.where(t == "L1_T1", "L1_new", out).astype(object)

    q = _query(tree_atlas, labels)
    with pytest.warns(UserWarning, match="new cell types"):
        model = SCANVI.load_query_data(q, tree_model, label_hierarchy={"L1_new": "L1"})
    reg = model.registry
    assert reg.label_categories == (*tree_model.registry.label_categories, "L1_new")
    assert list(model.query_info["new_labels"]) == ["L1_new"]
    tree = hierarchy.from_registry(reg)
    assert model.module.config.label_parents == tree.parents
    assert dict(tree.parent)["L1_new"] == "L1"
    model.train(max_epochs=10, progress_bar=False)
    every = model.predict(soft=True, level="all")
    np.testing.assert_allclose(every["L1"], every[["L1_T0", "L1_T1", "L1_new"]].sum(1), atol=1e-6)
    # the new leaf is learnt from its cells (a copy of L1_T1 here, so it shares them)
    new = (q.obs["labels_obs"] == "L1_new").to_numpy()
    assert every["L1_new"][new].mean() > 2 * every["L1_new"][~new].mean()


@pytest.mark.filterwarnings("ignore:load_query_data")  # the flat reference is untrained
def test_query_refusals(tree_model, tree_atlas, atlas):
    q = _query(tree_atlas, lambda q: np.full(q.n_obs, "L1_new", object))
    with pytest.raises(InputError, match="missing from the map"):
        SCANVI.load_query_data(q, tree_model)
    q = _query(tree_atlas, lambda q: np.full(q.n_obs, "L0_T0_sub", object))
    with pytest.raises(InputError, match="must stay a leaf"):
        SCANVI.load_query_data(q, tree_model, label_hierarchy={"L0_T0_sub": "L0_T0"})
    atlas.obs["lab"] = atlas.obs["cell_type"]
    SCANVI.setup_anndata(atlas, labels_key="lab", unlabeled_category=UNL, batch_key="batch")
    flat = SCANVI(atlas, **ARCH)
    q = _query(tree_atlas, lambda q: np.full(q.n_obs, UNL, object))
    q.obs["lab"] = q.obs["labels_obs"]
    with pytest.raises(InputError, match="without a label hierarchy"):
        SCANVI.load_query_data(q, flat, label_hierarchy={"x": "L0"})


# ---------------------------------------------------------------- ontology
def test_hierarchy_from_cell_ontology():
    pytest.importorskip("cellxgene_ontology_guide")
    from jaxscanvi.ontology import hierarchy_from_cell_ontology

    names = [
        "T cell",
        "CD8-positive, alpha-beta memory T cell",
        "B cell",
        "CD4-positive, alpha-beta T cell",
    ]
    tree = hierarchy_from_cell_ontology(names)
    assert tree == {
        "T cell": "cell",
        "B cell": "cell",
        "CD8-positive, alpha-beta memory T cell": "T cell",
        "CD4-positive, alpha-beta T cell": "T cell",
    }
    ids = hierarchy_from_cell_ontology(["CL:0000084", "CL:0000909", "CL:0000236"])
    assert ids == {
        "CL:0000084": "CL:0000000",
        "CL:0000909": "CL:0000084",
        "CL:0000236": "CL:0000000",
    }
    assert hierarchy_from_cell_ontology(["CL:0000084", "CL:0000909"], names="label") == {
        "T cell": "cell",
        "CD8-positive, alpha-beta memory T cell": "T cell",
    }
    with pytest.raises(InputError, match="neither a CL term"):
        hierarchy_from_cell_ontology(["not a cell type"])


# ---------------------------------------------------------------- benchmark
@pytest.mark.system
@pytest.mark.slow
def test_hierarchy_benchmark_smoke(tmp_path):
    out = tmp_path / "h.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hierarchy.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    acc = doc["accuracy"]
    assert acc["fine_balanced_accuracy"]["n"] == 2 and "ci95" in acc["fine_balanced_accuracy"]
    assert set(acc["deepest_at_threshold"]["all"]) == {"0", "1", "2"}
    per_class = acc["runs"][0]["per_class"]
    assert set(per_class["fine"]) == {"hier", "flat_fine"}
    assert set(per_class["coarse"]) == {"hier", "flat_coarse"}
    assert all(0 <= r <= 1 for r in per_class["fine"]["hier"]["recall"].values())
    assert doc["steptime"]["ratio_flat_over_none_cpu"] > 0 and doc["steptime"]["same_config"]
    assert [r["n_labels"] for r in doc["scale"]] == [10, 100]
    assert all(r["final_loss_finite"] for r in doc["scale"])

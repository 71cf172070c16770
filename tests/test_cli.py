"""The command line: `jaxscanvi annotate` (predict/train and joint modes), `jaxscanvi demo`,
and its one-line errors for bad input.

The three whole runs are `system` tests (CI runs them as a step of their own); the
bad-input checks stay in the main suite."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from jaxscanvi import SCANVI, synthetic_atlas


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    a = synthetic_atlas(
        n_cells=500,
        n_genes=120,
        n_batches=3,
        n_lineages=2,
        types_per_lineage=2,
        seed=3,
        markers_per_type=8,
    )
    is_q = (a.obs["batch"] == "batch2").to_numpy()
    ref, query = a[~is_q].copy(), a[is_q].copy()
    del query.obs["cell_type"]
    ref.write_h5ad(d / "ref.h5ad")
    query.write_h5ad(d / "query.h5ad")
    return d


SMALL = [
    "--n-hidden",
    "16",
    "--n-latent",
    "4",
    "--scvi-epochs",
    "3",
    "--scanvi-epochs",
    "2",
    "--quiet",
]


def _annotate(d, out: str, *extra: str) -> list[str]:
    return [
        "annotate",
        "--reference",
        str(d / "ref.h5ad"),
        "--query",
        str(d / "query.h5ad"),
        "--labels-key",
        "cell_type",
        "--batch-key",
        "batch",
        "--n-top-genes",
        "100",
        *extra,
        "--out",
        str(d / out),
        *SMALL,
    ]


@pytest.mark.system
def test_cli_annotate_predict_train(cli_files, capsys):
    from jaxscanvi.cli import main

    d = cli_files
    rc = main(_annotate(d, "annotated.h5ad", "--query-epochs", "2"))
    assert rc == 0, capsys.readouterr().err
    out = ad.read_h5ad(d / "annotated.h5ad")
    for col in (
        "prediction",
        "prediction_probability",
        "prediction_assigned",
        "novelty_score",
        "is_novel",
    ):
        assert col in out.obs, col
    assert out.n_vars == 100 and out.obsm["X_scANVI"].shape == (out.n_obs, 4)
    assert set(out.obs["prediction"].astype(str)) <= {"L0_T0", "L0_T1", "L1_T0", "L1_T1"}
    assert (d / "annotated_model" / "metadata.json").exists()
    # predict with the saved query model: its batches are known, no surgery
    rc = main(
        [
            "predict",
            "--model-dir",
            str(d / "annotated_model"),
            "--adata",
            str(d / "query.h5ad"),
            "--out",
            str(d / "pred.h5ad"),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    pred = ad.read_h5ad(d / "pred.h5ad")
    np.testing.assert_array_equal(
        pred.obs["prediction"].astype(str), out.obs["prediction"].astype(str)
    )
    # the same reference as annotate's: its compiled steps are reused
    rc = main(
        [
            "train",
            "--adata",
            str(d / "ref.h5ad"),
            "--batch-key",
            "batch",
            "--labels-key",
            "cell_type",
            "--n-top-genes",
            "100",
            "--model-dir",
            str(d / "ref_model"),
            "--out",
            str(d / "ref_latent.h5ad"),
            *SMALL,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert ad.read_h5ad(d / "ref_latent.h5ad").obsm["X_scANVI"].shape == (
        ad.read_h5ad(d / "ref.h5ad").n_obs,
        4,
    )
    assert SCANVI.load(d / "ref_model").is_trained


@pytest.mark.system
def test_cli_annotate_joint_mode(cli_files, capsys):
    from jaxscanvi.cli import main

    d = cli_files
    rc = main(_annotate(d, "joint.h5ad", "--mode", "joint"))
    assert rc == 0, capsys.readouterr().err
    out, query = ad.read_h5ad(d / "joint.h5ad"), ad.read_h5ad(d / "query.h5ad")
    assert list(out.obs_names) == list(query.obs_names)
    assert out.obsm["X_scANVI"].shape == (query.n_obs, 4)
    probs = out.obsm["prediction_probabilities"]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    classes = np.asarray(out.uns["prediction_classes"])
    assert (classes[probs.argmax(1)] == out.obs["prediction"].astype(str)).all()


# the demo at a small size (the default is 5,000 cells x 1,000 genes, ~2 minutes)
DEMO_SMALL = [
    "--n-cells",
    "1200",
    "--n-genes",
    "300",
    "--marker-lfc",
    "3",
    "--scvi-epochs",
    "30",
    "--scanvi-epochs",
    "5",
    "--query-epochs",
    "10",
    "--n-hidden",
    "32",
    "--quiet",
]


@pytest.mark.system
def test_cli_demo_small(tmp_path, capsys):
    """`jaxscanvi demo` at a small size: exits 0, writes the annotated query, both
    models and the plots; the accuracy it prints is that of the written predictions
    and far above chance (11 reference types); the left-out type is flagged novel."""
    import importlib.util
    import re

    from jaxscanvi.cli import main

    out = tmp_path / "demo"
    rc = main(["demo", *DEMO_SMALL, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    m = re.search(r"query, (\d+) cells of reference types: accuracy ([0-9.]+)", text)
    assert m, text
    n_known, acc = int(m[1]), float(m[2])
    a = ad.read_h5ad(out / "query_annotated.h5ad")
    truth = a.obs["cell_type_truth"].astype(str).to_numpy()
    known = truth != "L3_T2"
    assert int(known.sum()) == n_known > 100
    pred = a.obs["prediction"].astype(str).to_numpy()
    assert abs(float((pred[known] == truth[known]).mean()) - acc) < 6e-4
    assert acc > 0.7, text
    m = re.search(r"novelty: (\d+) of (\d+) L3_T2 cells flagged", text)
    assert m and int(m[1]) > 0.5 * int(m[2]) > 0, text
    for d in ("query_model", "reference_model"):
        assert SCANVI.load(out / d).is_trained
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("history.png", "confusion_matrix.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            [
                "annotate",
                "--reference",
                "nope.h5ad",
                "--query",
                "q.h5ad",
                "--labels-key",
                "x",
                "--out",
                "o.h5ad",
            ],
            "no such file",
        ),
        (
            [
                "annotate",
                "--reference",
                "{d}/ref.h5ad",
                "--query",
                "{d}/query.h5ad",
                "--labels-key",
                "celltype",
                "--out",
                "{d}/o.h5ad",
            ],
            "labels_key='celltype'",
        ),
        (
            [
                "annotate",
                "--reference",
                "{d}/ref.h5ad",
                "--query",
                "{d}/query.h5ad",
                "--labels-key",
                "cell_type",
                "--batch-key",
                "sample",
                "--out",
                "{d}/o.h5ad",
            ],
            "batch_key='sample'",
        ),
        (
            [
                "predict",
                "--model-dir",
                "{d}/missing_model",
                "--adata",
                "{d}/query.h5ad",
                "--out",
                "{d}/o.h5ad",
            ],
            "no model folder",
        ),
    ],
)
def test_cli_bad_input_one_line_and_exit_2(cli_files, capsys, argv, needle):
    from jaxscanvi.cli import main

    rc = main([a.format(d=cli_files) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert needle in err and "Fix:" in err, err

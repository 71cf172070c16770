"""The docs' error catalogue (docs/guide/errors.md), generated from the tests that check it.

    python tests/catalogue.py           # print the page (markdown)
    python tests/catalogue.py --write   # write docs/guide/errors.md

Rows come from every parametrised test in tests/test_errors.py and
tests/test_io.py whose parameters name a ``field`` (an InputError naming that
field) or an ``exc`` (that exception type): one row per case id, described by
the id with underscores replaced. Bad inputs checked by single tests are
listed by hand in HAND_ROWS, each with the test that covers it.
tests/test_reliability.py checks that the page holds exactly this text and
that every test named here exists, so the two cannot drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PAGE = TESTS.parent / "docs" / "guide" / "errors.md"
HEADING = "# Error catalogue"

# parametrised test -> where the bad input is caught
STAGES = {
    "test_setup_anndata_rejects": "`setup_anndata`",
    "test_model_construction_rejects": "`SCVI(...)`",
    "test_scanvi_setup_rejects": "`SCANVI.setup_anndata`",
    "test_scanvi_construction_rejects": "`SCANVI(...)`",
    "test_scanvi_train_rejects": "`SCANVI.train`",
    "test_train_rejects": "`train`",
    "test_inference_rejects": "inference",
    "test_load_refuses_foreign_or_damaged": "`load`",
}
SOURCES = ("test_errors", "test_io")

# single tests: (where, bad input, what you get, the test that checks it)
HAND_ROWS = [
    (
        "`setup_anndata`",
        "not an AnnData",
        "`InputError` naming `adata`",
        "tests/test_errors.py::test_setup_anndata_rejects_non_anndata",
    ),
    (
        "`setup_anndata`",
        "negative counts with allow_noninteger_counts=True",
        "`InputError` naming `adata.X`",
        "tests/test_errors.py::test_negative_counts_refused_even_when_noninteger_allowed",
    ),
    (
        "`setup_anndata`",
        "non-integer counts with allow_noninteger_counts=True",
        "`UserWarning` naming `adata.X`",
        "tests/test_errors.py::test_noninteger_counts_can_be_allowed_with_a_warning",
    ),
    (
        "`setup_anndata`",
        "a batch with a single cell",
        "`UserWarning` naming `batch_key`",
        "tests/test_errors.py::test_single_cell_batch_warns",
    ),
    (
        "`setup_anndata`",
        "a gene with no counts in any cell",
        "`UserWarning` naming `adata.X` (or the layer), the genes and the fix",
        "tests/test_reliability.py::test_all_zero_gene_warns_with_field_genes_and_fix",
    ),
    (
        "`SCVI(...)`",
        "an AnnData that setup_anndata has not seen",
        "`InputError` naming `adata`",
        "tests/test_errors.py::test_model_on_not_set_up_adata",
    ),
    (
        "`SCVI(...)`",
        "use_observed_lib_size=False with a one-cell batch",
        "`InputError` naming `batch_key`",
        "tests/test_errors.py::test_degenerate_library_prior_refused",
    ),
    (
        "`SCANVI(...)`",
        "a single labelled cell type",
        "`InputError` naming the labels",
        "tests/test_errors.py::test_scanvi_single_labelled_class_refused_before_compiling",
    ),
    (
        "`SCANVI(...)`",
        "an AnnData set up by SCVI (no unlabeled_category)",
        "`InputError` naming `adata`",
        "tests/test_errors.py::test_scanvi_on_scvi_setup_refused",
    ),
    (
        "`SCANVI(...)`",
        "unknown classifier parameter",
        "`InputError` naming `classifier_parameters`",
        "tests/test_errors.py::test_scanvi_unknown_classifier_parameter",
    ),
    (
        "`train`",
        "a checkpoint written with other settings (resume=True)",
        "`InputError` naming `resume`",
        "tests/test_scvi.py::test_resume_with_other_settings_refused",
    ),
    (
        "`train`",
        "the loss becomes NaN or inf",
        "`NonFiniteLossError`, last finite parameters kept",
        "tests/test_scvi.py::test_nonfinite_raise_keeps_last_finite_parameters",
    ),
    (
        "`train`",
        "a checkpoint folder another live process is writing",
        "`FolderLockedError` naming the holder (pid, host, since when) and the fix",
        "tests/test_reliability.py::test_sigkill_during_checkpoint_write_resumes_bitwise",
    ),
    (
        "`train`",
        "another process of a jax.distributed run dies",
        "`LostProcessError` naming the lost process, within `lost_process_timeout_s`; "
        "fix: restart all with resume=True",
        "tests/test_multihost.py::test_a_dead_process_stops_the_others_and_the_checkpoint_survives",
    ),
    (
        "inference",
        "query with cell types the model has never seen",
        "`InputError` naming `adata.obs[labels_key]`",
        "tests/test_errors.py::test_scanvi_query_with_unseen_label_categories",
    ),
    (
        "inference",
        "query with a batch the model has never seen",
        "`InputError` naming `adata.obs[batch_key]`",
        "tests/test_errors.py::test_scanvi_query_with_unseen_batch",
    ),
    (
        "`save`",
        "save_anndata=True on a model without an AnnData",
        "`InputError` naming `save_anndata`",
        "tests/test_errors.py::test_save_anndata_without_adata",
    ),
    (
        "`save`",
        "save_anndata=True on a model whose counts are in an atlas store",
        "`InputError` naming `save_anndata`",
        "tests/test_stores.py::test_collection_auto_source_and_save_load",
    ),
    (
        "`read_collection`",
        "a file whose genes differ from the first file's (names, "
        "order or number), a missing file, no files",
        "`InputError` naming `paths[i]`, the file and the first differing gene",
        "tests/test_stores.py::test_collection_genes_must_match",
    ),
    (
        "`read_soma`",
        "a value filter TileDB-SOMA cannot evaluate, a filter that selects "
        "nothing, a missing measurement, X layer or experiment",
        "`InputError` naming `obs_value_filter` (or the field) and what the experiment has",
        "tests/test_stores.py::test_soma_bad_queries_are_clear",
    ),
    (
        "`read_annbatch`",
        "a folder that is missing or not an annbatch collection",
        "`InputError` naming `collection`",
        "tests/test_stores.py::test_annbatch_missing_collection_is_clear",
    ),
    (
        "`save`",
        "a folder another live process is writing",
        "`FolderLockedError` naming the holder",
        "tests/test_reliability.py::test_sigkill_during_checkpoint_write_resumes_bitwise",
    ),
    (
        "`save`",
        "the folder already holds a model (no overwrite=True)",
        "`FileExistsError`",
        "tests/test_io.py::test_save_refuses_to_overwrite",
    ),
    (
        "`load`",
        "the folder does not exist",
        "`FileNotFoundError`",
        "tests/test_io.py::test_load_missing_path",
    ),
    ("`load`", "a file, not a folder", "`ModelFormatError`", "tests/test_io.py::test_load_a_file"),
    (
        "`load`",
        "an older model format (format_version 0)",
        "`ModelFormatError` naming the release to load it with",
        "tests/test_reliability.py::test_format_version_refusals",
    ),
    (
        "`load`",
        "a SCANVI folder given to SCVI.load (or the reverse)",
        "`ModelFormatError` naming the class to use",
        "tests/test_io.py::test_scanvi_roundtrip_and_wrong_class",
    ),
    (
        "`load`",
        "the saved AnnData is damaged",
        "`ModelFormatError`",
        "tests/test_io.py::test_load_with_damaged_saved_anndata",
    ),
    (
        "`load`",
        "genes differ from the model's (names or order)",
        "`InputError` naming `adata.var_names`",
        "tests/test_io.py::test_load_with_different_genes",
    ),
    (
        "`load`",
        "a batch the model has never seen",
        "`InputError` naming `adata.obs[batch_key]`",
        "tests/test_io.py::test_load_with_unseen_batch",
    ),
    (
        "`load`",
        "a custom encoder/decoder not passed to `load` (nothing named by a file "
        "is imported unless `trust_custom_modules=True`), or one that cannot be imported",
        "`ModelFormatError` naming the class and `encoder=` (or `decoder=`)",
        "tests/test_research.py::test_custom_encoder_and_decoder_train_save_and_load",
    ),
    (
        "`from_scvi_tools`",
        "a folder without model.pt",
        "`ModelFormatError` listing what the folder holds",
        "tests/test_research.py::test_from_scvi_tools_errors_name_the_fix",
    ),
    (
        "`from_scvi_tools`",
        "a model.pt that is not a torch file",
        "`ModelFormatError` naming the fix",
        "tests/test_research.py::test_from_scvi_tools_errors_name_the_fix",
    ),
    (
        "`load` of a scvi-tools folder",
        "a pickle naming anything but tensors, numpy arrays and containers (e.g. os.system)",
        "`ModelFormatError` naming it; nothing in the file runs",
        "tests/test_scvi_tools_files.py::test_model_pt_naming_other_callables_is_refused",
    ),
    (
        "`from_scvi_tools`",
        "a SCANVI folder given to SCVI (or the reverse)",
        "`ModelFormatError` naming the right class",
        "tests/test_parity.py::test_import_refuses_wrong_model_class",
    ),
    (
        "reference mapping",
        "a query with under half of the reference's genes",
        "`InputError` naming `adata.var_names`",
        "tests/test_query.py::test_prepare_query_refuses_tiny_overlap",
    ),
    (
        "reference mapping",
        "query genes not aligned to the reference (load_query_data)",
        "`InputError` naming `adata.var_names`, pointing to prepare_query_anndata",
        "tests/test_query.py::test_load_query_data_needs_aligned_genes",
    ),
    (
        "reference mapping",
        "a reference of the wrong model class",
        "`InputError` naming `reference_model`",
        "tests/test_query.py::test_load_query_data_needs_aligned_genes",
    ),
    (
        "`predict`",
        "unassigned_threshold outside [0, 1], or with soft=True",
        "`InputError` naming `unassigned_threshold`",
        "tests/test_query.py::test_predict_soft_is_calibrated_and_unassigned",
    ),
    (
        "command line",
        "a missing file, labels or batch column",
        "`InputError` or `FileNotFoundError` text on one line (`jaxscanvi <command>: "
        "error: ...`), exit status 2",
        "tests/test_cli.py::test_cli_bad_input_one_line_and_exit_2",
    ),
]

# a few words read better than their identifier form
WORDS = {
    "non integer": "non-integer",
    "nan": "NaN",
    "nonpositive": "non-positive",
    "lr": "learning rate (lr)",
    "var names": "var_names",
    "scvi tools": "scvi-tools",
}
# rows are grouped by where the input is caught, in this order
ORDER = [
    "`setup_anndata`",
    "`SCANVI.setup_anndata`",
    "`SCVI(...)`",
    "`SCANVI(...)`",
    "`train`",
    "`SCANVI.train`",
    "inference",
    "`predict`",
    "`save`",
    "`load`",
    "`from_scvi_tools`",
    "reference mapping",
    "command line",
]


def describe(case_id: str) -> str:
    text = case_id.replace("_", " ")
    for k, v in WORDS.items():
        text = re.sub(rf"\b{re.escape(k)}\b", v, text)
    return text


def parametrised_rows(module) -> list[tuple[str, str, str]]:
    """(where, bad input, what you get) for each case of the module's tables."""
    rows = []
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and callable(fn)):
            continue
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names = [n.strip() for n in mark.args[0].split(",")]
            if "field" not in names and "exc" not in names:
                continue
            where = STAGES.get(name, f"`{name[5:].removesuffix('_rejects')}`")
            for case_id, values in zip(mark.kwargs["ids"], mark.args[1]):
                if "field" in names:
                    what = f"`InputError` naming `{values[names.index('field')]}`"
                else:
                    what = f"`{values[names.index('exc')].__name__}`"
                rows.append((where, describe(case_id), what))
    return rows


def section() -> str:
    sys.path.insert(0, str(TESTS))
    import importlib

    rows = []
    for src in SOURCES:
        rows += parametrised_rows(importlib.import_module(src))
    rows += [r[:3] for r in HAND_ROWS]
    rows.sort(key=lambda r: ORDER.index(r[0]) if r[0] in ORDER else len(ORDER))
    lines = [
        HEADING,
        "",
        "Bad input fails early with one exception that names the field, the value",
        "and the fix: `InputError` (a `ValueError`) for data and arguments, raised",
        "before anything is compiled; `ModelFormatError` for folders that are not,",
        "or no longer, readable models. Suspicious but usable input gives a",
        "`UserWarning`. The table is generated from the tests that check each row",
        "(`python tests/catalogue.py --write`; tests/test_reliability.py fails when",
        "the two drift apart).",
        "",
        "| bad input | what you get |",
        "| --- | --- |",
    ]
    lines += [f"| {where}: {bad} | {what} |" for where, bad, what in rows]
    return "\n".join(lines) + "\n"


def write() -> None:
    PAGE.write_text(section())


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    if "--write" in sys.argv:
        write()
    else:
        sys.stdout.write(section())

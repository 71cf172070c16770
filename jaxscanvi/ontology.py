"""A label hierarchy from Cell Ontology terms, through ``cellxgene-ontology-guide``.

The package (optional extra ``jaxscanvi[ontology]``) ships the Cell Ontology
offline; we parse nothing ourselves. The ontology is a graph in which a term
may have several parents; `hierarchy_from_cell_ontology` keeps, for each of
the given terms, its nearest ancestor among the given terms (fewest is_a
steps; ties broken by term ID), and puts terms with none under the root
``cell`` (CL:0000000). The result is the tree over exactly the labels in use
that `SCANVI.setup_anndata(label_hierarchy=...)` takes.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InputError

ROOT_ID = "CL:0000000"  # "cell"


def _parser(schema_version: str | None):
    try:
        from cellxgene_ontology_guide.ontology_parser import (  # pyright: ignore[reportMissingImports]  # optional extra (ontology)
            OntologyParser,
        )
    except ImportError:
        raise InputError(
            "cellxgene-ontology-guide",
            "not installed",
            "building a hierarchy from the Cell Ontology needs it",
            "pip install 'jaxscanvi[ontology]' (or cellxgene-ontology-guide)",
        ) from None
    return OntologyParser(schema_version)


def _term_id(parser, term: str) -> str:
    if term.startswith("CL:"):
        if not parser.is_valid_term_id(term):
            raise InputError(
                "terms",
                term,
                "not a term of the shipped Cell Ontology",
                "pass a current CL term ID (e.g. 'CL:0000084') or its label",
            )
        return term
    found = parser.get_term_id_by_label(term, "CL")
    if found is None:
        raise InputError(
            "terms",
            term,
            "is neither a CL term ID nor the label of one",
            "use the Cell Ontology's exact label (e.g. 'T cell') or its ID",
        )
    return found


def hierarchy_from_cell_ontology(
    terms: Iterable[str], *, names: str = "as_given", schema_version: str | None = None
) -> dict[str, str]:
    """child -> parent over ``terms`` (CL IDs such as ``"CL:0000084"`` or labels
    such as ``"T cell"``), each under its nearest ancestor among them, the
    rest under the root "cell".

    ``names``: ``"as_given"`` keys the map by the strings passed (the root is
    named like the first term: an ID or ``"cell"``), ``"id"`` by term IDs,
    ``"label"`` by ontology labels. ``schema_version`` picks the package's
    ontology release (default its latest).
    """
    if names not in ("as_given", "id", "label"):
        raise InputError("names", names, "unknown naming", "pass 'as_given', 'id' or 'label'")
    given = list(dict.fromkeys(str(t) for t in terms))
    if not given:
        raise InputError("terms", [], "no terms given", "pass the labels in use")
    parser = _parser(schema_version)
    ids = {t: _term_id(parser, t) for t in given}
    if len(set(ids.values())) < len(ids):
        dup = [t for t in given if list(ids.values()).count(ids[t]) > 1]
        raise InputError(
            "terms", dup[:10], "name the same ontology term twice", "keep one name per term"
        )
    in_set = set(ids.values())
    parent_id = {}
    for tid in in_set - {ROOT_ID}:
        dist = parser.get_term_ancestors_with_distances(tid)
        near = sorted((d, a) for a, d in dist.items() if a in in_set and a != tid)
        parent_id[tid] = near[0][1] if near else ROOT_ID
    if names == "id":
        return parent_id
    if names == "label":
        return {parser.get_term_label(c): parser.get_term_label(p) for c, p in parent_id.items()}
    back = {v: k for k, v in ids.items()}
    root = back.get(ROOT_ID, ROOT_ID if given[0].startswith("CL:") else "cell")
    return {back[c]: back.get(p, root) for c, p in parent_id.items()}

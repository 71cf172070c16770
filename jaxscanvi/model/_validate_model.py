"""A saved folder's own fields, checked (`_validate.check`): the seed, the
history, the split's cell indices, the query's record and scANVI's fields."""

from __future__ import annotations

import numpy as np

from ._validate_core import MAX_CELLS, SEED_RANGE, int_in, is_int, is_num, str_list, want


def model_fields(meta: dict, cls) -> None:
    int_in(meta.get("init_seed", 0), "init_seed", SEED_RANGE[0], SEED_RANGE[1] - 1)
    want(
        isinstance(meta.get("is_trained", False), bool),
        "is_trained",
        meta.get("is_trained"),
        "must be true or false",
    )
    str_list(meta.get("loss_terms", []), "loss_terms")
    custom = meta.get("custom_modules") or {}
    want(
        isinstance(custom, dict)
        and set(custom) <= {"encoder", "decoder"}
        and all(v is None or isinstance(v, str) for v in custom.values()),
        "custom_modules",
        custom,
        "must map encoder/decoder to a 'module:Class' path or null",
    )
    hist = meta.get("history") or []
    want(
        isinstance(hist, list)
        and all(
            isinstance(h, dict)
            and is_int(h.get("epoch"))
            and all(
                isinstance(k, str) and (v is None or isinstance(v, (int, float, str)))
                for k, v in h.items()
            )
            for h in hist
        ),
        "history",
        str(hist)[:60],
        "must be a list of per-epoch records, each with an integer epoch",
    )
    for k in ("train_indices", "validation_indices"):
        _indices(meta.get(k, []), k)
    train, val = set(meta.get("train_indices", [])), set(meta.get("validation_indices", []))
    want(
        not (train & val),
        "validation_indices",
        sorted(train & val)[:5],
        "cells also listed in train_indices",
    )
    if "query_info" in meta:
        _query_info(meta["query_info"])
    if cls.__name__ == "SCANVI":
        _scanvi_fields(meta)


def _indices(v, field: str) -> None:
    want(
        isinstance(v, list) and all(is_int(i) and 0 <= i < MAX_CELLS for i in v),
        field,
        v if not isinstance(v, list) else v[:5],
        f"must be a list of cell indices in [0, {MAX_CELLS})",
    )
    want(len(set(v)) == len(v), field, len(v), "must not repeat a cell")


def _query_info(q) -> None:
    if q is None:
        return
    want(
        isinstance(q, dict)
        and set(q) <= {"new_batches", "new_labels", "new_covariate_categories", "freeze"},
        "query_info",
        q,
        "must be an object with the fields QueryInfo.to_dict writes",
    )
    for k in ("new_batches", "new_labels", "new_covariate_categories"):
        want(isinstance(q.get(k, []), list), f"query_info.{k}", q.get(k), "must be a list")
    freeze = q.get("freeze")
    want(
        freeze is None
        or (isinstance(freeze, dict) and all(isinstance(v, bool) for v in freeze.values())),
        "query_info.freeze",
        freeze,
        "must map switch names to true/false",
    )


def _scanvi_fields(meta: dict) -> None:
    want(
        isinstance(meta.get("was_pretrained", False), bool),
        "was_pretrained",
        meta.get("was_pretrained"),
        "must be true or false",
    )
    t = meta.get("temperature", 1.0)
    want(is_num(t) and t > 0, "temperature", t, "must be a positive finite number")
    cal = meta.get("calibration") or {}
    want(
        isinstance(cal, dict)
        and all(v is None or isinstance(v, (int, float)) for v in cal.values()),
        "calibration",
        cal,
        "must map names to numbers",
    )
    stats = meta.get("reference_stats")
    if stats is None:
        return
    want(isinstance(stats, dict), "reference_stats", stats, "must be an object or null")
    if "threshold" in stats:
        want(
            is_num(stats["threshold"]) and stats["threshold"] > 0,
            "reference_stats.threshold",
            stats["threshold"],
            "must be a positive number",
        )
    if "latent_means" in stats:
        n_latent = meta["config"].get("n_latent", 10)
        n_labels = len(meta["registry"].get("label_categories", ["0"]))
        codes = stats.get("latent_codes")
        want(
            isinstance(codes, list) and all(is_int(c) and 0 <= c < n_labels for c in codes),
            "reference_stats.latent_codes",
            codes,
            f"must be cell-type codes below {n_labels}",
        )
        if not codes:
            want(
                stats.get("latent_means") == [] and stats.get("latent_sds") == [],
                "reference_stats",
                sorted(stats),
                "no codes, so no latent moments",
            )
            return
        try:
            means = np.asarray(stats.get("latent_means"), np.float64)
            sds = np.asarray(stats.get("latent_sds"), np.float64)
        except (TypeError, ValueError):
            means = sds = np.zeros((0, 0))
        want(
            means.shape == sds.shape == (len(codes), n_latent)
            and bool(np.isfinite(means).all())
            and bool((sds >= 0).all()),
            "reference_stats",
            sorted(stats),
            f"latent_means and latent_sds must hold one finite row of {n_latent} per code",
        )

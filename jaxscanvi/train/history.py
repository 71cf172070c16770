"""The training history: scvi-tools' metric names, and `History`, its container.

scvi-tools' ``model.history`` is a dict from metric name to a one-column
DataFrame indexed by epoch, holding the epochs where the metric was logged
(validation metrics only on validation epochs). `History` is that dict;
``to_frame()`` gives all metrics as one DataFrame, one row per epoch, as
they are saved (a list of records) in model folders and checkpoints.
"""

from __future__ import annotations

import json

import pandas as pd

# ours -> scvi-tools' names for the same numbers (both are kept). scvi-tools'
# F1 score is the micro-average, which for one label per cell is the accuracy.
SCVI_TOOLS_NAMES = {
    "classification_loss_train": ("train_classification_loss",),
    "accuracy_train": ("train_accuracy", "train_f1_score"),
    "classification_loss_validation": ("validation_classification_loss",),
    "accuracy_validation": ("validation_accuracy", "validation_f1_score"),
}


def add_scvi_tools_names(record: dict) -> dict:
    """``record`` (one epoch's metrics) with scvi-tools' names added beside ours,
    and its zero global KL (neither model has a global latent variable)."""
    for ours, theirs in SCVI_TOOLS_NAMES.items():
        if ours in record:
            record.update(dict.fromkeys(theirs, record[ours]))
    for split in ("train", "validation"):
        if f"kl_local_{split}" in record:
            record[f"kl_global_{split}"] = 0.0
    return record


class History(dict):
    """Metric name -> one-column DataFrame indexed by ``epoch`` (scvi-tools' form).

    ``history["elbo_train"]`` is a DataFrame with the column ``elbo_train``;
    ``history.to_frame()`` is every metric as one DataFrame (one row per
    epoch, NaN where a metric was not logged); ``history.n_epochs`` the
    number of epochs trained.
    """

    def __init__(self, frame: pd.DataFrame | None = None):
        frame = pd.DataFrame(index=pd.Index([], name="epoch")) if frame is None else frame
        super().__init__({c: frame[[c]].dropna() for c in frame.columns})
        self._frame = frame

    @classmethod
    def from_records(cls, records: list[dict] | None) -> History:
        """From a list of per-epoch dicts, each with an ``epoch`` key."""
        return cls(pd.DataFrame(records).set_index("epoch") if records else None)

    def to_records(self) -> list[dict]:
        """JSON-ready list of per-epoch dicts (NaN as None), as saved in model folders."""
        if not len(self._frame):
            return []
        text = self._frame.reset_index().to_json(orient="records")
        assert text is not None  # to_json returns the text when given no path
        return json.loads(text)

    def to_frame(self) -> pd.DataFrame:
        """Every metric as one DataFrame: one row per epoch, one column per metric."""
        return self._frame.copy()

    @property
    def n_epochs(self) -> int:
        return len(self._frame)

    def __repr__(self) -> str:
        return (
            f"History({self.n_epochs} epochs; metrics: {list(self)}; "
            "history[name] is a DataFrame, history.to_frame() all of them)"
        )

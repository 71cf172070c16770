"""Checkpoints of the whole train state, written atomically, for exact resume.

A checkpoint folder holds the TrainState (parameters, batch statistics,
optimiser state, PRNG key, step, epoch) and the host-side loop state
(history, early-stopping and LR-plateau counters), plus a fingerprint of the
run's settings. Resuming with different settings is refused, since it could
not reproduce the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import io
from ..errors import InputError, ModelFormatError
from .loop import LoopState
from .state import TrainState


def _meta(owner: dict, fingerprint: dict, loop: LoopState) -> dict:
    # owner: the model's class name, config and registry (as dicts)
    return {
        "kind": "checkpoint",
        **owner,
        "fingerprint": fingerprint,
        "loop": json.loads(json.dumps(dataclasses.asdict(loop), default=float)),
    }


def save(dir_path, ts: TrainState, loop: LoopState, fingerprint: dict, owner: dict) -> None:
    io.write_folder(
        dir_path, _meta(owner, fingerprint, loop), {"train_state": io.to_bytes(ts)}, overwrite=True
    )


def load(dir_path, template: TrainState, fingerprint: dict, owner: dict):
    """(TrainState, LoopState) from ``dir_path``, or None when it holds no checkpoint."""
    d = Path(dir_path)
    if not (d / io.METADATA).exists():
        return None
    meta = io.read_metadata(d)
    if meta.get("kind") != "checkpoint":
        raise ModelFormatError(f"{str(d)!r} is not a training checkpoint folder")
    mine = _meta(owner, fingerprint, LoopState())
    for key in ("model_class", "config", "registry", "fingerprint"):
        if json.loads(json.dumps(meta.get(key))) != json.loads(json.dumps(mine[key])):
            raise InputError(
                "resume",
                True,
                f"the checkpoint in {str(d)!r} was written with a different {key}",
                "resume with the same model, data "
                "and train() arguments, or pass a fresh checkpoint_dir",
            )
    loop = _loop_state(d, meta.get("loop"))
    ts = io.from_bytes(template, io.read_blob(d, meta, "train_state"), "train state")
    return ts, loop


def _loop_state(d: Path, raw) -> LoopState:
    """The saved loop counters, each of its type (a damaged file: ModelFormatError)."""

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31

    checks = {
        "history": lambda v: (
            isinstance(v, list) and all(isinstance(h, dict) and count(h.get("epoch")) for h in v)
        ),
        "best": num,
        "lr_best": num,
        "bad_epochs": count,
        "lr_bad_epochs": count,
        "stopped_early": lambda v: isinstance(v, bool),
    }
    fields = {f.name for f in dataclasses.fields(LoopState)}
    bad = (
        ["loop"]
        if not isinstance(raw, dict)
        else [k for k in raw if k not in fields or not checks.get(k, lambda v: True)(raw[k])]
    )
    if bad:
        raise ModelFormatError(
            f"{str(d / io.METADATA)!r}: the saved loop state is damaged "
            f"(field(s) {bad[:5]}). Fix: delete the checkpoint folder "
            "and train from the start, or restore it from a copy"
        )
    return LoopState(**raw)

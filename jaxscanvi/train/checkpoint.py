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
    return {"kind": "checkpoint", **owner, "fingerprint": fingerprint,
            "loop": json.loads(json.dumps(dataclasses.asdict(loop), default=float))}


def save(dir_path, ts: TrainState, loop: LoopState, fingerprint: dict, owner: dict) -> None:
    io.write_folder(dir_path, _meta(owner, fingerprint, loop),
                    {"train_state": io.to_bytes(ts)}, overwrite=True)


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
            raise InputError("resume", True, f"the checkpoint in {str(d)!r} was written "
                             f"with a different {key}", "resume with the same model, data "
                             "and train() arguments, or pass a fresh checkpoint_dir")
    ts = io.from_bytes(template, io.read_blob(d, meta, "train_state"), "train state")
    fields = {f.name for f in dataclasses.fields(LoopState)}
    loop = LoopState(**{k: v for k, v in meta["loop"].items() if k in fields})
    return ts, loop

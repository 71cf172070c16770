"""Training on many hosts: JAX's multi-controller runtime, one process per host.

Every process runs the same script on the same AnnData (a backed ``.h5ad``
keeps only ``obs`` and ``var`` in memory) after calling `initialize`. The
cells are cut into one contiguous slice per process (`shard_bounds`); a
process reads the counts of its own slice only, at set-up and in training.
Global minibatch i is the concatenation of every process's local minibatch
i, laid out over one mesh of all devices of all processes, so the step is
the single-host step. One process can replay a many-process run exactly with
``train(..., data_shards=n)``. Files (saved models, checkpoints) are written
by process 0 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import jax
import numpy as np

from .errors import InputError

LOST_PROCESS_TIMEOUT_S = 60
_KEY = "jaxscanvi/process"
# what a collective raises when a peer went away (gloo on CPU, the runtime elsewhere)
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset",
    "heartbeat",
    "UNAVAILABLE",
    "Gloo",
    "unhealthy",
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    *,
    lost_process_timeout_s: int = LOST_PROCESS_TIMEOUT_S,
    **kwargs,
) -> None:
    """Join the run: `jax.distributed.initialize` with gloo collectives on CPU.

    Call it first, before anything runs a JAX computation. On SLURM, TPU pods
    and other clusters JAX reads the arguments from the environment and all
    may be left out; on your own machines pass them (the same coordinator
    address, e.g. ``"10.0.0.1:1234"``, on every process).

    If a process dies, the others stop: at once with `LostProcessError` when
    a collective notices (a closed connection), and at the latest
    ``lost_process_timeout_s`` after its last heartbeat, when JAX's runtime
    ends them. Checkpoints are written whole or not at all, so the last
    complete one stays loadable.
    """
    kwargs.setdefault("heartbeat_timeout_seconds", int(lost_process_timeout_s))
    kwargs.setdefault("shutdown_timeout_seconds", int(lost_process_timeout_s))
    # CPU processes exchange tensors through gloo; other platforms ignore it; an
    # older JAX has no such option
    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )
    client = _client()
    if client is not None:  # who each process is, to name one that is lost
        client.key_value_set(
            f"{_KEY}/{jax.process_index()}",
            json.dumps({"host": socket.gethostname(), "pid": os.getpid()}),
        )


class LostProcessError(RuntimeError):
    """Another process of a many-process run died; this one stops too."""


def _client():
    """The runtime's key-value store client, or None (one process, or a JAX without it).

    The one use of JAX's private modules in jaxscanvi: `jax.distributed`
    publishes only ``initialize``, ``shutdown`` and ``is_initialized``, and no
    public API lets processes leave each other a note. Each process writes who
    it is (host, pid) there so a lost one can be named (`lost_processes`). If a
    JAX release moves it, this returns None and a lost process is named by its
    index alone: every caller treats None as "unknown". Pinned by
    ``tests/test_public_apis.py`` (None without a run) and by
    ``tests/test_multihost.py``'s lost-process test (a dead peer named by pid).
    """
    try:
        from jax._src import distributed as jd

        return jd.global_state.client
    except (ImportError, AttributeError):
        return None


def lost_processes() -> list[str]:
    """The processes of this run known to be gone (those on this host, by pid)."""
    client, here, gone = _client(), socket.gethostname(), []
    for p in range(jax.process_count()):
        if p == jax.process_index() or client is None:
            continue
        try:
            who = json.loads(client.key_value_try_get(f"{_KEY}/{p}"))
        except Exception:  # noqa: BLE001 (an unset key, or the coordinator is gone)
            continue
        if who.get("host") == here and not _running(int(who.get("pid", -1))):
            gone.append(f"process {p} (pid {who['pid']} on {here})")
    return gone


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def peer_lost(err: BaseException) -> LostProcessError | None:
    """A `LostProcessError` naming the lost process, if ``err`` says a peer went away."""
    if jax.process_count() == 1 or "Runtime" not in type(err).__name__:
        return None
    text = str(err)
    if not any(s in text for s in _PEER_LOST):
        return None
    # the peer's sockets close before it has finished exiting, so its pid may
    # still look alive for a moment: look again for up to a few seconds
    deadline = time.monotonic() + 3.0
    gone = lost_processes()
    while not gone and time.monotonic() < deadline:
        time.sleep(0.05)
        gone = lost_processes()
    if not gone and jax.process_count() == 2:
        gone = [f"process {1 - jax.process_index()}"]
    who = ", ".join(gone) if gone else "another process"
    first = " ".join(text.split())[:200]
    return LostProcessError(
        f"{who} of this {jax.process_count()}-process run is gone ({first}); process "
        f"{jax.process_index()} stops too. Fix: restart every process; with "
        "checkpoint_dir, train(..., resume=True) continues from the last complete "
        "checkpoint"
    )


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def is_main() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def shard_bounds(n_obs: int, n_shards: int) -> np.ndarray:
    """Boundaries (n_shards + 1,) of near-equal contiguous slices of the cells."""
    return (np.arange(n_shards + 1, dtype=np.int64) * n_obs) // n_shards


def local_slice(n_obs: int) -> slice:
    """The cells this process reads: its slice of `shard_bounds`."""
    b = shard_bounds(n_obs, jax.process_count())
    p = jax.process_index()
    return slice(int(b[p]), int(b[p + 1]))


def local_indices(n_obs: int) -> np.ndarray:
    """Row positions of this process's cells.

    With an in-memory AnnData, ``get_latent_representation(indices=...)``
    then embeds only this process's cells. Over a backed AnnData inference
    is shared by all processes (each maps its slice, all get every result),
    so pass the same indices everywhere and slice with `local_slice`.
    """
    s = local_slice(n_obs)
    return np.arange(s.start, s.stop)


def check_batch_size(batch_size: int, n_shards: int, local_devices: int = 1) -> int:
    """The per-shard minibatch size; the global one must split evenly."""
    step = n_shards * local_devices
    if batch_size % step:
        raise InputError(
            "batch_size",
            batch_size,
            f"the minibatch is split over {n_shards} data shard(s) with "
            f"{local_devices} device(s) each",
            f"pass a multiple of {step}, e.g. batch_size={-(-batch_size // step) * step}",
        )
    return batch_size // n_shards


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows (axis 0), concatenated in process order, on every process.

    Sent as bytes, so any dtype arrives exact (JAX would narrow float64 to float32).
    """
    local = np.ascontiguousarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils as mu

    n = np.asarray(mu.process_allgather(np.asarray([local.shape[0]], np.int32))).ravel()
    width = local.dtype.itemsize * int(np.prod(local.shape[1:], dtype=np.int64))
    if width == 0:
        return np.zeros((int(n.sum()), *local.shape[1:]), local.dtype)
    buf = np.zeros((int(n.max()), width), np.uint8)
    buf[: local.shape[0]] = np.frombuffer(local.tobytes(), np.uint8).reshape(-1, width)
    allp = np.asarray(mu.process_allgather(buf))
    rows = np.concatenate([allp[p, : int(k)] for p, k in enumerate(n)])
    return np.ascontiguousarray(rows).view(local.dtype).reshape((-1, *local.shape[1:]))


def sum_all(x: np.ndarray) -> np.ndarray:
    """The sum of ``x`` over processes (in its own dtype), on every process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    return gather_rows(x[None]).sum(axis=0)


def agree(fn):
    """Run ``fn()`` on every process; if it raised anywhere, raise everywhere.

    A check that fails on one process's slice must stop every process: the
    others would otherwise wait forever for it at the next collective.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils as mu

    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
        err = e
    msg = np.zeros(1024, np.uint8)
    if err is not None:
        text = f"{type(err).__name__}: {err}".encode()[:1023] or b"error"
        msg[: len(text)] = np.frombuffer(text, np.uint8)
    allm = np.asarray(mu.process_allgather(msg))
    if err is not None:
        raise err
    for p, m in enumerate(allm):
        if m.any():
            text = bytes(m[m > 0]).decode(errors="replace")
            raise RuntimeError(f"process {p} stopped the run: {text}")
    return out

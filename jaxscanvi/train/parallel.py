"""Data parallelism over local devices with sharded `jax.jit`.

One 1-D mesh with axis ``"data"``. Parameters, optimiser state and batch-norm
statistics are replicated; each global minibatch is split by rows across the
devices. The step function is unchanged: its means over the minibatch
(losses, batch-norm statistics) become cross-device reductions that XLA
inserts, so the result is the single-device result up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..data.batch import Batch
from ..errors import InputError

AXIS = "data"


def resolve_devices(devices) -> list | None:
    """The devices to train on, or None for plain single-device execution.

    ``"auto"``: every local device; an int n: the first n; a list: those.
    """
    local = jax.local_devices()
    if devices is None:
        return None
    if isinstance(devices, str) and devices == "local":  # this process's own devices
        return local if len(local) > 1 else None
    if jax.process_count() > 1:  # many hosts: one mesh over every device of every process
        if devices != "auto" and devices != len(local):
            raise InputError(
                "devices",
                devices,
                f"this run has {jax.process_count()} processes, and trains on every device of each",
                "pass devices='auto'; choose each process's devices with "
                "jaxscanvi.distributed.initialize(local_device_ids=...)",
            )
        return jax.devices()
    if isinstance(devices, str):
        if devices != "auto":
            raise InputError(
                "devices",
                devices,
                "not 'auto', an int or a list of devices",
                "pass devices='auto' (all local devices) or e.g. devices=2",
            )
        chosen = local
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise InputError(
                "devices",
                devices,
                f"this process has {len(local)} local device(s) ({local[0].platform})",
                f"pass an int from 1 to {len(local)}, or devices='auto'",
            )
        chosen = local[:devices]
    elif (
        isinstance(devices, (list, tuple))
        and devices
        and all(isinstance(d, jax.Device) for d in devices)
    ):
        chosen = list(devices)
    else:
        raise InputError(
            "devices",
            devices,
            "not 'auto', an int or a list of devices",
            "pass devices='auto' (all local devices) or e.g. devices=2",
        )
    return chosen if len(chosen) > 1 else None


@dataclass(frozen=True)
class DataParallel:
    """Shardings for one mesh (hashable: compiled functions are cached by it)."""

    mesh: Mesh

    @classmethod
    def over(cls, devices) -> DataParallel | None:
        devs = resolve_devices(devices)
        return None if devs is None else cls(Mesh(np.asarray(devs), (AXIS,)))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def rows(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    @overload
    def pad(self, rows: None) -> None: ...
    @overload
    def pad(self, rows: np.ndarray) -> np.ndarray: ...
    def pad(self, rows: np.ndarray | None) -> np.ndarray | None:
        """Pad (n_steps, B) row indices with -1 columns to a multiple of the device count."""
        if rows is None:
            return None
        rows = np.asarray(rows)
        extra = -rows.shape[-1] % self.size
        if extra:
            rows = np.concatenate(
                [rows, np.full((*rows.shape[:-1], extra), -1, rows.dtype)], axis=-1
            )
        return rows

    def batch_shardings(self, batch):
        """Per-row fields split across devices; the non-zero list replicated."""

        def one(b: Batch):
            spec = {f: self.rows for f in b._fields}
            out = b._replace(**{f: spec[f] for f in b._fields if f != "nz"})
            if b.nz is not None:
                out = out._replace(nz=b.nz._replace(**dict.fromkeys(b.nz._fields, self.replicated)))
            return out

        return one(batch) if isinstance(batch, Batch) else tuple(one(b) for b in batch)

    def put(self, batch):
        return jax.device_put(batch, self.batch_shardings(batch))

    def constrain(self, batch):
        """Inside jit: lay the minibatch out across the devices."""
        return jax.lax.with_sharding_constraint(batch, self.batch_shardings(batch))

    def put_local(self, batch):
        """This process's rows of a global minibatch (runs of several processes)."""
        return jax.tree_util.tree_map(
            jax.make_array_from_process_local_data, self.batch_shardings(batch), batch
        )

    def local_replica(self, a: np.ndarray) -> jax.Array:
        """A host value every process holds, replicated over the mesh from this
        process's copies alone: no cross-process check (a collective), so a
        feeding thread may build it while the main thread runs programs."""
        a = np.asarray(a)
        mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        return jax.make_array_from_single_device_arrays(
            a.shape, self.replicated, [jax.device_put(a, d) for d in mine]
        )

    def replicate(self, tree):
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        rep = self.replicated

        def one(a):  # across processes, from host values that every process holds
            if isinstance(a, jax.Array) and a.sharding == rep:
                return a
            return jax.device_put(np.asarray(a), rep)

        return jax.tree_util.tree_map(one, tree)


def to_default_device(tree):
    """Arrays spread over several devices, gathered onto this process's first one.

    Arrays replicated over several processes are read from a local copy.
    """
    dev = jax.local_devices()[0]

    def one(a):
        if isinstance(a, jax.Array) and len(a.sharding.device_set) > 1:
            if not a.is_fully_addressable:
                a = a.addressable_data(0)
            return jax.device_put(a, dev)
        return a

    return jax.tree_util.tree_map(one, tree)

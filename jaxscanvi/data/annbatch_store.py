"""annbatch collections (scverse's pre-shuffled, sharded zarr datasets), read through
annbatch's `Loader`.

A collection is written once by ``annbatch.DatasetCollection(path).add_adatas(
paths)``: the cells of many files, shuffled and cut into ``dataset_i`` zarr
groups with the same genes. `read_annbatch` opens it as one AnnData; its X
(`AnnbatchRows`) numbers the cells dataset after dataset, as
``DatasetCollection.obs()`` lists them, and reads any runs of rows with one
pass of an annbatch ``Loader`` whose sampler asks for exactly those runs, so
annbatch fetches them from the zarr shards concurrently.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .atlas import AtlasRows, atlas_anndata, canonical
from .collection import _anndata_io


def _require_annbatch():
    try:
        import annbatch  # pyright: ignore[reportMissingImports]  # optional extra (atlas, Python >= 3.12)
    except ImportError:
        raise InputError(
            "annbatch",
            "not installed",
            "reading an annbatch collection needs the annbatch package (Python 3.12 or newer)",
            "pip install 'jaxscanvi[atlas]' on Python >= 3.12",
        ) from None
    return annbatch


@functools.lru_cache(maxsize=1)
def _runs_sampler_class():
    """A sampler that yields one load request: the runs it was given, in order."""
    from annbatch.abc import Sampler  # pyright: ignore[reportMissingImports]  # optional extra

    class RunsSampler(Sampler):
        def __init__(self):
            self.runs: list[tuple[int, int]] = []

        @property
        def batch_size(self) -> int | None:
            return None

        @property
        def shuffle(self) -> bool:
            return False

        def n_batches(self, n_obs: int) -> int:
            return 1

        def validate(self, n_obs: int) -> None:
            if any(a < 0 or b > n_obs for a, b in self.runs):
                raise IndexError(f"runs {self.runs[:3]} outside [0, {n_obs})")

        def _sample(self, n_obs: int):
            total = sum(b - a for a, b in self.runs)
            # one split of every row, in the runs' order
            yield {"requests": [slice(a, b) for a, b in self.runs], "splits": [np.arange(total)]}

    return RunsSampler


class AnnbatchRows(AtlasRows):
    """The counts of an annbatch collection: its datasets stacked by rows."""

    backend = "annbatch"

    def __init__(self, datasets, *, block_size: int | None = None, cache_blocks: int = 4):
        annbatch = _require_annbatch()
        self.sampler = _runs_sampler_class()()
        self.loader = annbatch.Loader(batch_sampler=self.sampler, preload_to_gpu=False)
        self.loader.add_datasets(list(datasets))
        ptrs, base = [np.zeros(1, np.int64)], 0
        for ds in datasets:
            ip = np.asarray(ds.group["indptr"][:], np.int64)
            ptrs.append(ip[1:] - ip[0] + base)
            base += int(ip[-1] - ip[0])
        # the loader keeps one pass's state: one read at a time
        self._lock = threading.Lock()
        self._init_rows(
            (self.loader.n_obs, self.loader.n_var), np.concatenate(ptrs), block_size, cache_blocks
        )

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as canonical float32 CSR."""
        return self.read_runs([start], [stop])

    def read_runs(self, starts, stops) -> sp.csr_matrix:
        """Several runs in one annbatch load request, rows in the runs' order."""
        runs = [(max(int(a), 0), min(int(b), self.shape[0])) for a, b in zip(starts, stops)]
        runs = [(a, b) for a, b in runs if b > a]
        if not runs:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        with self._lock:
            self.sampler.runs = runs
            batches = iter(self.loader)
            try:
                X = next(batches)["X"]
            finally:
                batches.close()
        return canonical(X)


def _open_collection(collection):
    annbatch = _require_annbatch()
    if isinstance(collection, annbatch.DatasetCollection):
        return collection
    path = Path(collection)
    if not path.is_dir():
        raise InputError(
            "collection",
            str(collection),
            "no such folder",
            "pass the path "
            "of an annbatch collection (a .zarr folder written by "
            "annbatch.DatasetCollection(path).add_adatas(files))",
        )
    import zarr.errors

    try:
        return annbatch.DatasetCollection(str(path), mode="r")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError):
        raise InputError(
            "collection",
            str(collection),
            "not a zarr group, so not an annbatch collection",
            "pass the folder that annbatch.DatasetCollection(path).add_adatas(files) wrote",
        ) from None


def read_annbatch(
    collection,
    *,
    layer: str | None = None,
    obs_columns: list[str] | None = None,
    block_size: int | None = None,
) -> anndata.AnnData:
    """Open an annbatch collection (a path or an ``annbatch.DatasetCollection``).

    obs (``obs_columns``, default all) comes from ``DatasetCollection.obs``,
    var from the first dataset; X is an `AnnbatchRows` (``layer``: a layer
    of every dataset instead of X). Pass the result to ``SCVI.setup_anndata``.
    """
    coll = _open_collection(collection)
    if coll.is_empty:
        raise InputError(
            "collection",
            str(collection),
            "holds no annbatch datasets",
            "write it first with annbatch.DatasetCollection(path).add_adatas(files)",
        )
    io = _anndata_io()
    groups = list(coll)
    key = "X" if layer is None else f"layers/{layer}"
    var = io.read_elem(groups[0]["var"])
    datasets = []
    for i, g in enumerate(groups):
        if key not in g:
            raise InputError(
                "layer",
                layer,
                f"dataset_{i} of the collection has no {key!r}",
                "pass layer=None (X) or a layer every dataset has",
            )
        if g[key].attrs.get("encoding-type") != "csr_matrix":
            raise InputError(
                "collection",
                f"dataset_{i}",
                f"its {key} is not a CSR matrix",
                "rebuild the collection from files with CSR counts",
            )
        genes = io.read_elem(g["var"]).index
        if not pd.Index(genes).equals(var.index):
            raise InputError(
                "collection",
                f"dataset_{i}",
                "its genes differ from dataset_0's",
                "rebuild the collection from files with the "
                "same genes (add_adatas(..., var_subset=genes))",
            )
        datasets.append(io.sparse_dataset(g[key]))
    store = AnnbatchRows(datasets, block_size=block_size)
    obs = coll.obs(columns=obs_columns)
    if len(obs) != store.shape[0]:
        raise InputError(
            "collection",
            str(collection),
            f"obs has {len(obs)} rows for {store.shape[0]} cells",
            "rebuild the collection",
        )
    return atlas_anndata(store, obs, var)

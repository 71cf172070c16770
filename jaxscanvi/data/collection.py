"""Many ``.h5ad``/``.zarr`` files with the same genes, trained on as one dataset.

`read_collection` opens each file's counts lazily through anndata
(``anndata.io.sparse_dataset`` on the file's ``X`` or a layer) and
concatenates only the small obs tables (as ``anndata.concat`` would). Row i
of the collection is row i - offset[f] of file f; a run of rows that crosses
files is read from each file's slice and stacked.

A file's run is read as the slices of its ``data`` and ``indices`` arrays
that the offsets (read once, as `BackedRows` does) name, through h5py/zarr,
rather than by ``sparse_dataset[a:b]``: with anndata 0.12.19 and scipy 1.17
every ``__getitem__`` asks ``importlib.metadata.version("scipy")``, which
costs 10 ms here, 100x the read of a 144-row run (benchmarks/stores.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .atlas import AtlasRows, atlas_anndata, canonical
from .backed import as_csr_matrix, is_backed, offsets_of, ranges_of, rows_of
from .counts import counts_matrix


def _anndata_io():
    """anndata's element readers (``anndata.io`` from 0.11, ``experimental`` before)."""
    io = getattr(anndata, "io", None)
    if io is not None and hasattr(io, "sparse_dataset"):
        return io
    return anndata.experimental


class FileCollection(AtlasRows):
    """The counts of several files (or AnnDatas) stacked by rows, read in place.

    ``parts``: each file's CSR counts, an anndata sparse dataset (on disk) or a
    scipy CSR matrix, all with the same number of genes.
    """

    backend = "collection"

    def __init__(
        self,
        parts: Sequence,
        *,
        names: Sequence[str] = (),
        block_size: int | None = None,
        cache_blocks: int = 4,
    ):
        self.parts = list(parts)
        self.names = list(names) or [f"part {i}" for i in range(len(self.parts))]
        n_rows = np.array([p.shape[0] for p in self.parts], np.int64)
        # bounds[f]: the collection's first row of file f (bounds[-1]: all rows)
        self.bounds = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int64)
        ptrs, base = [np.zeros(1, np.int64)], 0
        # global position of a file's value = its own position + shift[f]
        self.shift = np.zeros(len(self.parts), np.int64)
        for f, p in enumerate(self.parts):
            ip = _indptr_of(p)
            ptrs.append(ip[1:] - ip[0] + base)
            self.shift[f] = base - ip[0]
            base += int(ip[-1] - ip[0])
        # a file's (data, indices) arrays on disk; None: an in-memory matrix
        self.arrays = [
            None if sp.issparse(p) else (p.group["data"], p.group["indices"]) for p in self.parts
        ]
        self._init_rows(
            (self.bounds[-1], self.parts[0].shape[1]),
            np.concatenate(ptrs),
            block_size,
            cache_blocks,
        )

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as canonical float32 CSR, from each file they span."""
        start, stop = max(int(start), 0), min(int(stop), self.shape[0])
        if stop <= start:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        last = int(np.searchsorted(self.bounds, stop, side="left")) - 1
        pieces = []
        for f in range(first, last + 1):
            lo = max(start, self.bounds[f]) - self.bounds[f]
            hi = min(stop, self.bounds[f + 1]) - self.bounds[f]
            if hi > lo:
                pieces.append(canonical(self._file_rows(f, int(lo), int(hi))))
        return pieces[0] if len(pieces) == 1 else as_csr_matrix(sp.vstack(pieces, format="csr"))

    def read_runs(self, starts, stops) -> sp.csr_matrix:
        """Runs [starts[i], stops[i]) one after another: each file's share of
        every run read in one call (`backed.ranges_of`), not one per run."""
        starts = np.maximum(np.asarray(starts, np.int64), 0)
        stops = np.minimum(np.asarray(stops, np.int64), self.shape[0])
        stops = np.maximum(stops, starts)
        # (run, file) pieces, in the order they are stacked: run by run, files in order
        lo = np.maximum(starts[:, None], self.bounds[None, :-1])
        hi = np.minimum(stops[:, None], self.bounds[None, 1:])
        run, f = np.nonzero(hi > lo)
        lo, hi = lo[run, f], hi[run, f]
        a, b = self.indptr[lo], self.indptr[hi]  # global value positions
        pieces: list = [None] * lo.size
        for g in np.unique(f).tolist():
            mine = np.flatnonzero(f == g)
            s = int(self.shift[g])
            arrays = self.arrays[g]
            if arrays is None:  # an in-memory part
                part = self.parts[g]
                data = ranges_of(part.data, a[mine] - s, b[mine] - s)
                indices = ranges_of(part.indices, a[mine] - s, b[mine] - s)
            else:
                data = ranges_of(arrays[0], a[mine] - s, b[mine] - s)
                indices = ranges_of(arrays[1], a[mine] - s, b[mine] - s)
            cut = np.cumsum(b[mine] - a[mine])[:-1]
            for i, d, ix in zip(mine.tolist(), np.split(data, cut), np.split(indices, cut)):
                pieces[i] = (d, ix)
        data = np.concatenate([np.zeros(0, np.float32)] + [d for d, _ in pieces])
        indices = np.concatenate([np.zeros(0, np.int32)] + [ix for _, ix in pieces])
        rows = rows_of(starts, stops)
        indptr = offsets_of(self.indptr[rows + 1] - self.indptr[rows])
        X = sp.csr_matrix(
            (data.astype(np.float32, copy=False), indices.astype(np.int32, copy=False), indptr),
            shape=(indptr.size - 1, self.shape[1]),
        )
        return canonical(X)

    def _file_rows(self, f: int, lo: int, hi: int) -> sp.csr_matrix:
        """Rows [lo, hi) of file f (see the module notes)."""
        arrays = self.arrays[f]
        if arrays is None:
            return self.parts[f][lo:hi]
        g0, g1 = self.bounds[f] + lo, self.bounds[f] + hi
        a, b = int(self.indptr[g0]), int(self.indptr[g1])
        s = int(self.shift[f])
        data, indices = arrays
        return sp.csr_matrix(
            (data[a - s : b - s], indices[a - s : b - s], self.indptr[g0 : g1 + 1] - a),
            shape=(hi - lo, self.shape[1]),
        )


def _indptr_of(part) -> np.ndarray:
    if sp.issparse(part):
        return np.asarray(part.indptr, np.int64)
    return np.asarray(part.group["indptr"][:], np.int64)


def _open_file(path: Path, where: str, layer: str | None):
    """(counts, obs, var) of one ``.h5ad`` or ``.zarr``: counts lazily, obs/var in memory."""
    io = _anndata_io()
    if not path.exists():
        raise InputError(
            where,
            str(path),
            "no such file or directory",
            "pass the paths of existing .h5ad files or .zarr stores",
        )
    if path.is_dir():
        import zarr

        group = zarr.open_group(str(path), mode="r")
    else:
        import h5py

        if not h5py.is_hdf5(path):
            raise InputError(
                where,
                str(path),
                "neither an .h5ad (HDF5) file nor a .zarr store",
                "pass .h5ad files or .zarr stores written by anndata",
            )
        group = h5py.File(path, "r")
    key = "X" if layer is None else f"layers/{layer}"
    if key not in group:
        raise InputError(
            where,
            str(path),
            f"the file has no {key!r}",
            "pass layer= naming the layer that holds raw counts in every file",
        )
    elem = group[key]
    if elem.attrs.get("encoding-type") not in ("csr_matrix", "csc_matrix"):
        raise InputError(
            where,
            str(path),
            f"{key} is stored dense, not as a sparse matrix",
            "re-save the counts as CSR: adata.X = "
            "scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)",
        )
    return io.sparse_dataset(elem), io.read_elem(group["obs"]), io.read_elem(group["var"])


def _open_part(part, i: int, layer: str | None):
    """(name, counts, obs, var) of a path or an AnnData (backed or in memory)."""
    where = f"paths[{i}]"
    if isinstance(part, anndata.AnnData):
        X = counts_matrix(part, layer)
        if not (is_backed(X) or sp.issparse(X)):
            raise InputError(
                where,
                f"AnnData with {type(X).__name__} counts",
                "a collection reads sparse counts",
                "store them as CSR, or pass the file's path",
            )
        name = str(part.filename) if part.isbacked else f"AnnData {i}"
        counts = X if is_backed(X) else sp.csr_matrix(X)
        return name, counts, part.obs, part.var
    path = Path(part)
    return (str(path), *_open_file(path, where, layer))


def _check_parts(names, counts, vars_) -> None:
    """Same genes in the same order, CSR, in every part; else name the first that differs."""
    genes = pd.Index(vars_[0].index.astype(str))
    for i, (name, X, var) in enumerate(zip(names, counts, vars_)):
        if getattr(X, "format", "csr") != "csr":
            raise InputError(
                f"paths[{i}]",
                name,
                "counts are stored column-compressed (CSC); streaming reads rows",
                "re-save them as CSR: adata.X = adata.X.tocsr(); adata.write_h5ad(path)",
            )
        other = pd.Index(var.index.astype(str))
        if i and not other.equals(genes):
            n = min(len(other), len(genes))
            diff = np.flatnonzero(other[:n] != genes[:n])
            at = int(diff[0]) if diff.size else n
            shown = (
                f"gene {at}: {other[at]!r} vs {genes[at]!r}"
                if at < n
                else f"{len(other)} genes vs {len(genes)}"
            )
            raise InputError(
                f"paths[{i}]",
                name,
                f"its genes differ from those of paths[0] ({names[0]}): {shown}",
                "give every file the "
                "same genes in the same order, e.g. adata[:, genes].copy() "
                "with one list of genes, before writing them",
            )


def read_collection(
    paths: Sequence,
    *,
    layer: str | None = None,
    join: Literal["inner", "outer"] = "inner",
    label: str | None = None,
    keys: Sequence[str] | None = None,
    index_unique: str | None = None,
    block_size: int | None = None,
) -> anndata.AnnData:
    """Open ``.h5ad``/``.zarr`` files (or AnnDatas) with the same genes as one AnnData.

    The counts stay in the files (``X`` is a `FileCollection`, read in place);
    obs is concatenated as ``anndata.concat(..., join=join, label=label,
    keys=keys, index_unique=index_unique)`` would, and var is the first
    file's. ``layer`` names the layer holding raw counts in every file
    (default: ``X``). Pass the result to ``SCVI.setup_anndata``.

    Raises `InputError` naming the first file whose genes differ from the
    first file's (names or order), or whose counts are not CSR.
    """
    paths = list(paths) if not isinstance(paths, (str, Path)) else [paths]
    if not paths:
        raise InputError("paths", [], "no files given", "pass a list of .h5ad or .zarr paths")
    opened = [_open_part(p, i, layer) for i, p in enumerate(paths)]
    names, counts, obs, var = (list(t) for t in zip(*opened))
    _check_parts(names, counts, var)
    store = FileCollection(counts, names=names, block_size=block_size)
    meta = anndata.concat(
        [anndata.AnnData(obs=o, var=pd.DataFrame(index=var[0].index)) for o in obs],
        join=join,
        label=label,
        keys=keys,
        index_unique=index_unique,
    )
    meta_obs = meta.obs
    # anndata types obs loosely (a DataFrame or its lazy Dataset2D); concat of
    # in-memory AnnDatas gives a DataFrame
    assert isinstance(meta_obs, pd.DataFrame)
    return atlas_anndata(store, meta_obs, var[0])

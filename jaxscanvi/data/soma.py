"""TileDB-SOMA experiments (the CELLxGENE Census format), read through tiledbsoma.

`read_soma` runs an axis query (obs/var value filters or coordinates) once,
keeps the selected cells' and genes' ``soma_joinid`` in ascending order (the
order they lie on disk), and returns an AnnData whose X is a `SomaRows`.
Row i is the cell with the i-th selected joinid; a run of rows is one
coordinate read of the measurement's X (a joinid range where the run is
contiguous on disk), turned into canonical CSR; `read_runs` issues the
runs' reads together on a few threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .atlas import AtlasRows, atlas_anndata, canonical, offsets

FILTER_FIX = (
    "write a TileDB-SOMA value filter over the columns, e.g. "
    "\"cell_type == 'B cell' and tissue in ['lung', 'blood']\""
)


def _require_tiledbsoma():
    try:
        import tiledbsoma  # pyright: ignore[reportMissingImports]  # optional extra (atlas)
    except ImportError:
        raise InputError(
            "tiledbsoma",
            "not installed",
            "reading a TileDB-SOMA experiment needs the tiledbsoma package",
            "pip install 'jaxscanvi[atlas]'",
        ) from None
    return tiledbsoma


class SomaRows(AtlasRows):
    """The selected cells x genes of a SOMA measurement's X layer, read by joinid.

    ``obs_ids``/``var_ids``: the selected joinids, ascending. ``experiment``:
    the open experiment ``array`` belongs to, kept open while the store lives
    (closing an experiment closes its arrays).
    """

    backend = "soma"
    # read_runs: one range read per run, 4 at a time. One query for every run's
    # joinids was measured slower (points, not ranges); 4 threads halved the
    # time per run (benchmarks/stores.py)
    read_threads = 4

    def __init__(
        self,
        array,
        obs_ids: np.ndarray,
        var_ids: np.ndarray,
        *,
        experiment=None,
        block_size: int | None = None,
        cache_blocks: int = 4,
    ):
        soma = _require_tiledbsoma()
        self.array, self.experiment = array, experiment
        self.obs_ids = np.asarray(obs_ids, np.int64)
        self.var_ids = np.asarray(var_ids, np.int64)
        # every gene, in joinid order: a value's column is its joinid
        self._all_vars = bool(np.array_equal(self.var_ids, np.arange(array.shape[1])))
        self._var_pos = None if self._all_vars else soma.IntIndexer(self.var_ids)
        self._init_rows((len(self.obs_ids), len(self.var_ids)), None, block_size, cache_blocks)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as canonical float32 CSR: one coordinate read."""
        return self._read_ids(self.obs_ids[max(int(start), 0) : max(int(stop), 0)])

    def _read_ids(self, ids: np.ndarray) -> sp.csr_matrix:
        """CSR of the cells with joinids ``ids`` (strictly ascending), in that order."""
        n, G = ids.size, self.shape[1]
        if n == 0:
            return sp.csr_matrix((0, G), dtype=np.float32)
        contiguous = int(ids[-1] - ids[0]) == n - 1
        # SOMA slices include both ends
        rows = slice(int(ids[0]), int(ids[-1])) if contiguous else ids
        coords = (rows,) if self._all_vars else (rows, self.var_ids)
        # unordered results read faster than row-major ones; scipy orders them
        table = self.array.read(coords=coords).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        data = table["soma_data"].to_numpy()
        r = dim0 - ids[0] if contiguous else np.searchsorted(ids, dim0)
        c = dim1 if self._var_pos is None else self._var_pos.get_indexer(dim1)  # None: all vars
        if r.size and (np.diff(r) < 0).any():  # not row-major after all: let scipy sort
            return canonical(sp.coo_matrix((data, (r, c)), shape=(n, G)).tocsr())
        ptr = offsets(np.bincount(r, minlength=n))
        return canonical(
            sp.csr_matrix(
                (data.astype(np.float32, copy=False), c.astype(np.int32), ptr), shape=(n, G)
            )
        )


def _joinids(query, axis: str, field: str, value) -> np.ndarray:
    soma = _require_tiledbsoma()
    try:
        ids = getattr(query, f"{axis}_joinids")().to_numpy()
    except (soma.SOMAError, ValueError, TypeError, KeyError) as e:
        raise InputError(
            field, value, f"the query failed: {str(e).splitlines()[0][:160]}", FILTER_FIX
        ) from None
    if ids.size == 0:
        raise InputError(
            field, value, f"selects no {'cells' if axis == 'obs' else 'genes'}", "loosen the filter"
        )
    return np.sort(ids.astype(np.int64))


def _frame(table, ids: np.ndarray, id_name: str) -> pd.DataFrame:
    """A query's obs/var table in joinid order ``ids``, indexed by ``id_name``."""
    df = table.concat().to_pandas().set_index("soma_joinid", drop=False).loc[ids]
    index = df.pop(id_name) if id_name in df.columns else df["soma_joinid"]
    df.index = pd.Index(index.astype(str).to_numpy(), name=None)
    return df


def _open(experiment, context):
    soma = _require_tiledbsoma()
    if isinstance(experiment, soma.Experiment):
        return experiment
    try:
        return soma.Experiment.open(str(experiment), context=context)
    except (soma.DoesNotExistError, soma.SOMAError) as e:
        raise InputError(
            "experiment",
            str(experiment),
            f"not a TileDB-SOMA experiment ({str(e)[:120]})",
            "pass the experiment's URI, or an open "
            "tiledbsoma.Experiment (e.g. census['census_data']['homo_sapiens'])",
        ) from None


def _x_layer(exp, measurement: str, X_name: str):
    soma = _require_tiledbsoma()
    if measurement not in exp.ms:
        raise InputError(
            "measurement",
            measurement,
            f"not a measurement of the experiment (it has {sorted(exp.ms.keys())})",
            "pass one of those",
        )
    layers = exp.ms[measurement].X
    if X_name not in layers:
        raise InputError(
            "X_name",
            X_name,
            f"no such X layer in measurement {measurement!r} (it has {sorted(layers.keys())})",
            "pass the layer holding raw counts (CELLxGENE Census: 'raw')",
        )
    array = layers[X_name]
    if not isinstance(array, soma.SparseNDArray):
        raise InputError(
            "X_name",
            X_name,
            f"a {type(array).__name__}, not a SparseNDArray",
            "ingest the counts as a sparse array",
        )
    return array


def read_soma(  # noqa: PLR0913 - the query's keywords
    experiment,
    *,
    measurement: str = "RNA",
    X_name: str = "raw",
    obs_value_filter: str | None = None,
    obs_coords=None,
    var_value_filter: str | None = None,
    var_coords=None,
    obs_column_names: Sequence[str] | None = None,
    obs_id_name: str = "obs_id",
    var_id_name: str = "var_id",
    block_size: int | None = None,
    context=None,
) -> anndata.AnnData:
    """Open the cells and genes of a TileDB-SOMA experiment that a query selects.

    ``experiment``: a URI or an open ``tiledbsoma.Experiment``. The filters
    are SOMA value filters over obs/var columns; ``*_coords`` select by
    ``soma_joinid`` (a slice, inclusive at both ends as in SOMA, or an array).
    The returned AnnData holds the selected obs (``obs_column_names``, default
    all) and var in memory, indexed by ``obs_id_name``/``var_id_name``
    (CELLxGENE Census: ``var_id_name="feature_id"``), and the counts on disk
    as X (`SomaRows`). Pass it to ``SCVI.setup_anndata``.
    """
    soma = _require_tiledbsoma()
    exp = _open(experiment, context)
    array = _x_layer(exp, measurement, X_name)

    def axis(value_filter, coords):
        return soma.AxisQuery(value_filter=value_filter, coords=() if coords is None else (coords,))

    query = exp.axis_query(
        measurement,
        obs_query=axis(obs_value_filter, obs_coords),
        var_query=axis(var_value_filter, var_coords),
    )
    obs_ids = _joinids(query, "obs", "obs_value_filter", obs_value_filter or obs_coords)
    var_ids = _joinids(query, "var", "var_value_filter", var_value_filter or var_coords)
    cols = None
    if obs_column_names is not None:
        cols = list(dict.fromkeys(["soma_joinid", obs_id_name, *obs_column_names]))
        known = set(exp.obs.schema.names)
        missing = [c for c in cols if c not in known and c != obs_id_name]
        if missing:
            raise InputError(
                "obs_column_names",
                missing,
                f"not obs columns (they are {sorted(known)[:20]})",
                "pass existing column names",
            )
        cols = [c for c in cols if c in known]
    obs = _frame(query.obs(column_names=cols), obs_ids, obs_id_name)
    var = _frame(query.var(), var_ids, var_id_name)
    store = SomaRows(array, obs_ids, var_ids, experiment=exp, block_size=block_size)
    return atlas_anndata(store, obs, var)

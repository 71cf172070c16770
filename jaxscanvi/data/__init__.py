"""AnnData -> validated registry -> arrays -> minibatches."""

from .annbatch_store import read_annbatch
from .batch import Batch, DeviceCells, device_batch, host_batch, nnz_cap
from .cells import CellData, cell_data
from .collection import read_collection
from .registry import Registry, registry_of, setup_anndata
from .soma import read_soma
from .synthetic import synthetic_atlas

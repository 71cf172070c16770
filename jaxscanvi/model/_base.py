"""`BaseModel`: what SCVI and SCANVI share, and where each shared method lives.

A model holds a registry, a linen module and its variables. Its methods are
thin: each public one below is bound from the file that implements it
(`_posterior`, `_downstream`, `_persist`, `_query`). `train()` plans a fit
(`fit_plan`: a `TrainConfig` and a `Task`) and `_train` hands it to
`train.fit`. `_adopt` is the one place the model's variables, freeze masks
and history are set.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import numpy as np

from ..data.batch import Batch, host_batch
from ..data.cells import CellData, cell_data
from ..data.registry import Registry
from ..errors import InputError
from ..train import budget
from ..train.config import TrainConfig
from ..train.fit import FitFailed, FitPlan, FitResult, Task, check, fit
from ..train.history import History
from ..train.parallel import to_default_device
from ..train.state import TrainState
from . import _align, _de, _downstream, _persist, _posterior, _query, _setup_view
from ._inference import map_cells, nnz_bucket, row_positions
from ._init import init_variables
from ._query import QueryInfo

_KEEP: Any = object()  # `_adopt`'s "leave this as it is"


class BaseModel:
    """Shared machinery; use `SCVI` or `SCANVI`."""

    config_cls: ClassVar[type]  # the module's config class, for `load`
    train: Callable[..., Any]  # each model's own; `fit_plan` binds to its signature
    # set by `load_query_data`: what the query added to its reference
    query_info: QueryInfo | None = None

    # ------------------------------------------------ the public methods' homes
    prepare_query_anndata = staticmethod(_align.prepare_query_anndata)
    load_query_data = classmethod(_query.load_query_data)
    save = _persist.save
    load = classmethod(_persist.load)
    get_latent_representation = _posterior.get_latent_representation
    get_normalized_expression = _posterior.get_normalized_expression
    get_elbo = _posterior.get_elbo
    get_reconstruction_error = _posterior.get_reconstruction_error
    get_marginal_ll = _posterior.get_marginal_ll
    differential_expression = _de.differential_expression
    posterior_predictive_sample = _downstream.posterior_predictive_sample
    get_likelihood_parameters = _downstream.get_likelihood_parameters
    get_latent_library_size = _downstream.get_latent_library_size
    get_feature_correlation_matrix = _downstream.get_feature_correlation_matrix
    adata_manager = property(_setup_view.adata_manager)
    view_anndata_setup = _setup_view.view_anndata_setup
    summary_string = property(_setup_view.summary_string)
    __str__ = _setup_view.summary_string

    # ----------------------------------------------------------------- setup
    def _build(self, adata, registry: Registry, module, seed: int) -> None:
        """Library prior from the data, parameter initialisation, bookkeeping."""
        config = module.config
        self.adata, self.registry, self._cells = adata, registry, None
        if adata is not None:
            means, var = library_prior(self._train_cells(), registry.n_batch)
            if not config.use_observed_lib_size and (var <= 0).any():
                bad = [registry.batch_categories[i] for i in np.flatnonzero(var <= 0)]
                raise InputError(
                    "batch_key",
                    bad[:5],
                    "these batches' log library sizes "
                    "have zero variance (one cell?), so the library prior is "
                    "degenerate",
                    "merge tiny batches, or keep use_observed_lib_size=True",
                )
        else:
            means = np.zeros(registry.n_batch, np.float32)
            var = np.ones(registry.n_batch, np.float32)
        # device_put, not jnp.asarray: that would compile a program per shape
        constants = {
            "library_log_means": jax.device_put(np.asarray(means, np.float32)),
            "library_log_vars": jax.device_put(np.asarray(var, np.float32)),
        }
        variables = init_variables(
            module,
            config.n_genes,
            config.n_continuous_cov,
            len(config.n_cats_per_cov),
            seed,
            constants,
        )
        self.module = module
        # (params mask, state mask) after query surgery: what train() may change
        self._adopt_variables(variables, freeze=None, history=History())
        self.init_seed = seed
        self.is_trained = False
        self.train_indices = np.zeros(0, np.int64)
        self.validation_indices = np.zeros(0, np.int64)
        self.train_state: TrainState | None = None
        self.loss_term_names: tuple[str, ...] = ()
        self.query_info = None
        # the devices of the last train(devices=...), which inference shards over too
        self._parallel = None
        # bytes of cells the last train() kept on its fullest device (0: fed per step)
        self.data_bytes_per_device = 0

    def _train_cells(self) -> CellData:
        if self._cells is None:
            self._cells = cell_data(self.adata, self.registry)
        return self._cells

    def _cells_for(self, adata) -> CellData:
        if adata is None or adata is self.adata:
            if self.adata is None:
                raise InputError(
                    "adata",
                    None,
                    "this model was loaded without data",
                    "pass adata=... set up like the training data",
                )
            return self._train_cells()
        return cell_data(adata, self.registry)

    @property
    def history(self) -> History:
        """The training history as scvi-tools gives it: metric name -> a one-column
        DataFrame indexed by epoch (``history.to_frame()``: all in one)."""
        return self._history

    @property
    def test_indices(self) -> np.ndarray:
        """Cells of the last training in neither split (scvi-tools' test set, when
        train_size + validation_size < 1)."""
        if self.adata is None or not len(self.train_indices):
            return np.zeros(0, np.int64)
        used = np.concatenate([self.train_indices, self.validation_indices])
        return np.setdiff1d(np.arange(self.adata.n_obs), used).astype(np.int64)

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.state}

    # -------------------------------------------------------- model hooks
    def _metadata(self) -> dict[str, Any]:
        """What this class adds to a saved model's metadata."""
        return {}

    def _read_metadata(self, meta: dict) -> None:
        """Take back what `_metadata` saved."""

    def _inherit_reference(self, reference_model) -> None:
        """What else a query model takes over from its reference."""

    # -------------------------------------------------------------- training
    def _task(self, config: TrainConfig, make_loss: Callable, loss_spec, **hooks) -> Task:
        owner = {
            "model_class": type(self).__name__,
            "config": self.module.config.to_dict(),
            "registry": self.registry.to_dict(),
        }
        return Task(
            cells=self._train_cells(),
            params=self.params,
            state=self.state,
            make_loss=make_loss,
            loss_spec=loss_spec,
            owner=owner,
            freeze=self._freeze,
            **hooks,
        )

    def fit_plan(self, **train_kwargs) -> FitPlan:
        """What ``train(**train_kwargs)`` would fit, without fitting it: its
        `TrainConfig` and `Task` (cells, variables, loss), as a `FitPlan`.
        The keywords are bound by name to `train`'s signature, its defaults
        fill the rest; what needs no data is checked here, the rest by `_train`.
        """
        bound = inspect.signature(self.train).bind(**train_kwargs)
        bound.apply_defaults()
        return self._plan(dict(bound.arguments))

    def _plan(self, arguments: dict) -> FitPlan:
        """The plan of `train` called with ``arguments`` (its parameter names)."""
        raise NotImplementedError

    def _after_fit(self, plan: FitPlan) -> None:
        """What follows a successful fit (scANVI: reference statistics, calibration)."""

    def _check_plan(self, plan: FitPlan, *, memory: bool = True):
        """Every input error of ``plan`` before anything compiles (and, with
        ``memory``, before anything is allocated): `fit.check`'s output."""
        checked = check(plan.config, plan.task.cells)
        if memory:
            budget.check(plan.config, plan.task.cells, self.module.config)
        return checked

    def _train(self, plan: FitPlan, result: FitResult | None = None):
        """Fit ``plan`` and keep the result (or adopt ``result``, fitted elsewhere:
        a sweep's member). A failed fit keeps its `FitFailed.result` and raises."""
        config = plan.config
        if self.loss_term_names and not config.loss_terms:
            warnings.warn(
                f"this model was trained with extra loss terms "
                f"{list(self.loss_term_names)}; train() without them drops "
                "them. Pass loss_terms=... again to keep them",
                UserWarning,
                stacklevel=3,
            )
        self.loss_term_names = config.loss_term_names
        # a result in memory already: a memory check now would count it against itself
        self._check_plan(plan, memory=result is None)
        if result is None:
            try:
                result = fit(config, plan.task)
            except FitFailed as err:  # keep the last good state
                self._adopt_fit(err.result)
                raise
        self._adopt_fit(result)
        self.is_trained = True
        self._after_fit(plan)
        return self

    # ------------------------------------------------------ the model's state
    def _twin(self):
        """A model that starts where this one is (a sweep's member): the same data
        and module; its own dicts and lists (variables, records), one level deep."""
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, (dict, list)):
                setattr(twin, name, copy.copy(value))
        return twin

    def _adopt(self, *, params=_KEEP, state=_KEEP, freeze=_KEEP, history=_KEEP) -> None:
        """The one place a model's parameters, mutable state, freeze masks and
        history are set; what is not passed stays. Construction, training,
        loading, importing, query surgery and pretraining all come through here."""
        if params is not _KEEP:
            self.params = params
        if state is not _KEEP:
            self.state = state
        if freeze is not _KEEP:
            self._freeze = freeze
        if history is not _KEEP:
            self._history = history

    def _adopt_variables(self, variables: dict, **rest) -> None:
        """`_adopt` with a flax variables dict: ``params`` and the other collections."""
        self._adopt(
            params=variables["params"],
            state={k: v for k, v in variables.items() if k != "params"},
            **rest,
        )

    def _adopt_fit(self, result: FitResult) -> None:
        ts = result.train_state
        # one copy on the default device: every inference path can use it as is
        params, state = to_default_device((ts.params, ts.state))
        self._adopt(params=params, state=state, history=History.from_records(result.loop.history))
        self.train_state = ts
        self.train_indices, self.validation_indices = result.train_idx, result.val_idx
        self._parallel = result.parallel
        self.data_bytes_per_device = result.data_bytes_per_device

    # ------------------------------------------------------------- inference
    @property
    def _n_devices(self) -> int:
        return 1 if self._parallel is None else self._parallel.size

    def _map(self, fn, cells: CellData, indices, batch_size, seed: int = 0) -> Any:
        """`map_cells` with this model's variables and devices."""
        return map_cells(
            fn, self.variables, cells, indices, batch_size, parallel=self._parallel, seed=seed
        )

    def minibatch(self, indices=None, adata=None) -> Batch:
        """Cells of ``adata`` (default: the model's) as one `Batch`, the input of
        the module and of every function in `jaxscanvi.losses`.

        For research code: ``losses.scvi_per_cell(model.module, model.params,
        model.state, model.minibatch(range(64)), key)``.
        """
        cells = self._cells_for(adata)
        idx = row_positions(cells.n_obs, indices)
        if idx.size == 0:
            raise InputError("indices", [], "selects no cells", "pass at least one index")
        b = host_batch(cells, idx, len(idx), nnz_bucket(cells, idx))
        return jax.device_put(b)

    def __repr__(self) -> str:
        c = self.module.config
        return (
            f"{type(self).__name__}(n_genes={c.n_genes}, n_batch={c.n_batch}, "
            f"n_latent={c.n_latent}, n_hidden={c.n_hidden}, n_layers={c.n_layers}, "
            f"gene_likelihood={c.gene_likelihood!r}, dispersion={c.dispersion!r}, "
            f"trained={self.is_trained})"
        )


def library_prior(cells, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log library size (scvi-tools' _init_library_size)."""
    means = np.zeros(n_batch, np.float32)
    var = np.ones(n_batch, np.float32)
    for b in range(n_batch):
        ll = cells.log_library[cells.batch == b].astype(np.float64)
        if ll.size:
            means[b], var[b] = ll.mean(), ll.var()
    return means, var

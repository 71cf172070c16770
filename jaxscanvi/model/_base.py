"""What SCVI and SCANVI share: data split, training, inference, save/load.

The model classes are thin: they hold a registry, an architecture config, a
linen module and its variables, and wire them to the pure loss and the
training engine.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .. import backend, distributed, io
from ..train import checkpoint
from ..data.batch import Batch, host_batch
from ..distributions import NonZeros
from ..data.cells import CellData, cell_data
from ..data.registry import Registry, registry_of
from ..errors import InputError, ModelFormatError, NonFiniteLossError
from ..train.parallel import DataParallel, to_default_device
from ..train.loop import FitConfig, LoopState, fit, make_eval_step, make_train_step
from ..train.sources import check_source, make_source
from ..train.state import KLSchedule, TrainState, make_optimizer, mask_key, pending_update

# Step functions by their full specification, so models with the same
# architecture and settings share compiled code.
_STEP_FNS: dict = {}


def max_epochs_heuristic(n_obs: int, epochs_cap: int = 400,
                         decay_at_n_obs: int = 20_000) -> int:
    """scvi-tools' default: 400 epochs up to 20k cells, then fewer."""
    return max(min(round((decay_at_n_obs / n_obs) * epochs_cap), epochs_cap), 1)


def split_indices(n: int, train_size: float, validation_size: float | None,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' DataSplitter: a seeded permutation, validation cells first."""
    if not (isinstance(train_size, (int, float)) and 0 < train_size <= 1):
        raise InputError("train_size", train_size, "must lie in (0, 1]",
                         "pass e.g. train_size=0.9")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    else:
        if not (0 <= validation_size < 1) or train_size + validation_size > 1:
            raise InputError("validation_size", validation_size,
                             "must lie in [0, 1) with train_size + validation_size <= 1",
                             "pass e.g. validation_size=0.1, or None for the rest")
        n_val = math.floor(n * validation_size)
    if n_train == 0:
        raise InputError("train_size", train_size, "leaves no training cells",
                         "increase train_size")
    perm = np.random.RandomState(seed=seed).permutation(n)
    return np.sort(perm[n_val:n_val + n_train]), np.sort(perm[:n_val])


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise InputError(name, value, "must be a positive integer",
                         f"pass e.g. {name}=128" if "batch" in name else f"pass {name}=1 "
                         "or more")


PLAN_KEYS = {"lr", "eps", "weight_decay", "n_epochs_kl_warmup", "n_steps_kl_warmup",
             "max_kl_weight", "min_kl_weight", "reduce_lr_on_plateau", "lr_factor",
             "lr_patience", "lr_threshold", "lr_min", "lr_scheduler_metric",
             "classification_ratio", "objective", "sparse_likelihood"}


class BaseModel:
    """Shared machinery; use `SCVI` or `SCANVI`."""

    _kind = "base"

    def _build(self, adata, registry: Registry, module, seed: int) -> None:
        """Library prior from the data, parameter initialisation, bookkeeping."""
        config = module.config
        self.adata, self.registry, self._cells = adata, registry, None
        if adata is not None:
            means, var = library_prior(self._train_cells(), registry.n_batch)
            if not config.use_observed_lib_size and (var <= 0).any():
                bad = [registry.batch_categories[i] for i in np.flatnonzero(var <= 0)]
                raise InputError("batch_key", bad[:5], "these batches' log library sizes "
                                 "have zero variance (one cell?), so the library prior is "
                                 "degenerate", "merge tiny batches, or keep "
                                 "use_observed_lib_size=True")
        else:
            means = np.zeros(registry.n_batch, np.float32)
            var = np.ones(registry.n_batch, np.float32)
        constants = {"library_log_means": jnp.asarray(means),
                     "library_log_vars": jnp.asarray(var)}
        variables = init_variables(module, config.n_genes, config.n_continuous_cov,
                                   len(config.n_cats_per_cov), seed, constants)
        cells = self._cells
        self._init_common(adata, registry, module, variables, seed=seed)
        self._cells = cells

    # ----------------------------------------------------------------- setup
    def _init_common(self, adata, registry: Registry, module, variables, *, seed: int):
        self.adata = adata
        self.registry = registry
        self.module = module
        self.params = variables["params"]
        self.state = {k: v for k, v in variables.items() if k != "params"}
        self.init_seed = seed
        self.is_trained = False
        self._history = pd.DataFrame()
        self.train_indices = np.zeros(0, np.int64)
        self.validation_indices = np.zeros(0, np.int64)
        self._cells: CellData | None = None
        self.train_state: TrainState | None = None
        self.loss_term_names: tuple[str, ...] = ()
        # (params mask, state mask) after query surgery: what train() may change
        self._freeze = None
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
                raise InputError("adata", None, "this model was loaded without data",
                                 "pass adata=... set up like the training data")
            return self._train_cells()
        return cell_data(adata, self.registry)

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training history (one row per epoch)."""
        return self._history

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.state}

    # -------------------------------------------------------------- training
    def _loss(self, *, train: bool, plan: dict, extra_terms, extra_weights) -> Callable:
        raise NotImplementedError

    def _loss_key(self):
        """Whatever else `_loss` bakes into the compiled step (hashable)."""
        return None

    def _step_fns(self, plan: dict, on_nonfinite: str, schedule: KLSchedule,
                  extra_terms: dict | None, extra_weights: dict | None,
                  trainable_mask=None, precision: str = "float32"):
        ex_key = tuple(sorted((extra_terms or {}).items(), key=lambda kv: kv[0]))
        w_key = tuple(sorted((extra_weights or {}).items()))
        params_mask, state_mask = trainable_mask if trainable_mask is not None \
            else (None, None)
        numerics = backend.current(precision)
        key = (self._kind, self.module, tuple(sorted(plan.items())), on_nonfinite, schedule,
               ex_key, w_key, mask_key(params_mask), mask_key(state_mask),
               self._loss_key(), numerics)
        if key not in _STEP_FNS:
            eps = plan.get("eps", 0.01)
            tx = make_optimizer(plan.get("lr", 1e-3), eps, plan.get("weight_decay", 1e-6),
                                params_mask)
            train_loss = self._loss(train=True, plan=plan, extra_terms=extra_terms,
                                    extra_weights=extra_weights)
            eval_loss = self._loss(train=False, plan=plan, extra_terms=extra_terms,
                                   extra_weights=extra_weights)
            pending = partial(pending_update, eps=eps, trainable_mask=params_mask) \
                if numerics.kernels.deferred_adam else None
            step = make_train_step(train_loss, tx, schedule, on_nonfinite, state_mask,
                                   pending)
            _STEP_FNS[key] = (tx, _pinned(step, numerics),
                              backend.traced(make_eval_step(eval_loss, schedule), numerics))
        return _STEP_FNS[key]

    def _fit(self, *, max_epochs, batch_size, train_size, validation_size, early_stopping,
             early_stopping_patience, early_stopping_monitor, check_val_every_n_epoch,
             plan_kwargs, seed, progress_bar, on_nonfinite, data_source,
             labelled_idx=None, val_labelled=None, loss_terms=None, loss_weights=None,
             trainable_mask=None, extra_val_metrics=None, default_plan=None,
             checkpoint_dir=None, checkpoint_every: int = 1, resume: bool = False,
             devices="auto", data_shards=None, precision: str = "float32"):
        backend.check_precision(precision)
        cells = self._train_cells()
        parallel = DataParallel.over(devices)
        check_positive_int("batch_size", batch_size)
        hosts = jax.process_count()
        # unset on one host: the device source on n devices draws from n slices
        spread = data_shards is None
        if data_shards is None:
            data_shards = hosts
        check_positive_int("data_shards", data_shards)
        if hosts > 1 and data_shards != hosts:
            raise InputError("data_shards", data_shards, f"this run has {hosts} processes, "
                             "each drawing from its own slice of the cells",
                             f"leave data_shards unset (or pass {hosts})")
        shards = None
        if data_shards > 1:
            distributed.check_batch_size(batch_size, data_shards,
                                         jax.local_device_count() if hosts > 1 else 1)
            shards = distributed.shard_bounds(cells.n_obs, data_shards)
        check_positive_int("max_epochs", max_epochs)
        if on_nonfinite not in ("raise", "skip_step"):
            raise InputError("on_nonfinite", on_nonfinite, "not 'raise' or 'skip_step'",
                             "pass on_nonfinite='raise' (default) or 'skip_step'")
        if data_source not in ("auto", "device", "host", "stream"):
            raise InputError("data_source", data_source,
                             "not 'auto', 'device', 'host' or 'stream'",
                             "pass data_source='auto' (default), 'device', 'host' or "
                             "'stream'")
        check_source(data_source, cells)
        plan = dict(default_plan or {})
        unknown = set(plan_kwargs or {}) - PLAN_KEYS
        if unknown:
            raise InputError("plan_kwargs", sorted(unknown), "unknown training-plan "
                             "options", f"use only {sorted(PLAN_KEYS)}")
        plan.update(plan_kwargs or {})
        lr = plan.get("lr", 1e-3)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise InputError("plan_kwargs['lr']", lr, "must be a positive number",
                             "pass e.g. plan_kwargs={'lr': 1e-3}")
        schedule = KLSchedule(
            n_epochs_kl_warmup=plan.pop("n_epochs_kl_warmup", 400),
            n_steps_kl_warmup=plan.pop("n_steps_kl_warmup", None),
            max_kl_weight=plan.pop("max_kl_weight", 1.0),
            min_kl_weight=plan.pop("min_kl_weight", 0.0))
        fit_keys = ("reduce_lr_on_plateau", "lr_factor", "lr_patience", "lr_threshold",
                    "lr_min", "lr_scheduler_metric")
        fit_plan = {k: plan.pop(k) for k in fit_keys if k in plan}
        weights = self._resolve_weights(loss_terms, loss_weights)
        if trainable_mask is None:
            trainable_mask = self._freeze
        tx, train_step, eval_step = self._step_fns(
            plan, on_nonfinite, schedule, loss_terms, weights, trainable_mask, precision)

        train_idx, val_idx = split_indices(cells.n_obs, train_size, validation_size, seed)
        self.train_indices, self.validation_indices = train_idx, val_idx
        cfg = FitConfig(max_epochs=max_epochs, batch_size=batch_size, seed=seed,
                        check_val_every_n_epoch=check_val_every_n_epoch,
                        early_stopping=early_stopping,
                        early_stopping_monitor=early_stopping_monitor,
                        early_stopping_patience=early_stopping_patience,
                        on_nonfinite=on_nonfinite, progress_bar=progress_bar, **fit_plan)
        key = jax.random.PRNGKey(seed)
        ts = TrainState(params=self.params, state=self.state,
                        opt_state=tx.init(self.params), rng=key,
                        step=jnp.asarray(0, jnp.int32), epoch=jnp.asarray(0, jnp.int32))
        self.loss_term_names = tuple(sorted(loss_terms or {}))
        fingerprint = {"batch_size": batch_size, "seed": seed,
                       "train_size": train_size, "validation_size": validation_size,
                       "plan": repr(sorted(plan.items())), "schedule": repr(schedule),
                       "loss_terms": list(self.loss_term_names), "n_obs": cells.n_obs}
        loop = None
        if resume:
            if checkpoint_dir is None:
                raise InputError("resume", True, "resuming needs checkpoint_dir",
                                 "pass checkpoint_dir=... (the folder written by an "
                                 "earlier train(..., checkpoint_dir=...))")
            restored = checkpoint.load(checkpoint_dir, ts, fingerprint, self)
            if restored is not None:
                ts, loop = restored
        on_epoch_end = None
        if checkpoint_dir is not None:
            check_positive_int("checkpoint_every", checkpoint_every)

            def on_epoch_end(ts_, loop_):
                if not distributed.is_main():  # one writer; every process can resume
                    return
                e = int(ts_.epoch)
                if e % checkpoint_every == 0 or e >= max_epochs or loop_.stopped_early:
                    checkpoint.save(checkpoint_dir, ts_, loop_, fingerprint, self)
        source = make_source(data_source, cells, batch_size, parallel=parallel,
                             shards=shards, spread=spread)
        # what a benchmark reads: bytes of cells held by the fullest device
        self.data_bytes_per_device = source.device_bytes()
        # inference runs on each process's own devices
        self._parallel = parallel if hosts == 1 else DataParallel.over("local")
        if hosts > 1 and extra_val_metrics is not None:
            inner = extra_val_metrics

            def extra_val_metrics(ts_):
                return inner(to_default_device(ts_))
        try:
            ts, loop = fit(ts, cfg=cfg, source=source, train_step=train_step,
                           eval_step=eval_step, train_idx=train_idx, val_idx=val_idx,
                           labelled_idx=labelled_idx, val_labelled=val_labelled,
                           extra_val_metrics=extra_val_metrics, loop=loop,
                           on_epoch_end=on_epoch_end)
        except NonFiniteLossError as err:
            ts = getattr(err, "train_state", ts)
            self._adopt(ts, getattr(err, "loop_state", LoopState()))
            raise
        self._adopt(ts, loop)
        self.is_trained = True
        return self

    def _adopt(self, ts: TrainState, loop: LoopState) -> None:
        # one copy on the default device: every inference path can use it as is
        self.params, self.state = to_default_device((ts.params, ts.state))
        self.train_state = ts
        self._history = pd.DataFrame(loop.history).set_index("epoch") \
            if loop.history else pd.DataFrame()

    def _resolve_weights(self, loss_terms, loss_weights):
        if loss_terms is not None and not isinstance(loss_terms, dict):
            raise InputError("loss_terms", type(loss_terms).__name__, "not a dict",
                             "pass loss_terms={'name': fn}, fn(outputs, batch, params) "
                             "-> scalar")
        for name, fn in (loss_terms or {}).items():
            if not callable(fn):
                raise InputError(f"loss_terms[{name!r}]", type(fn).__name__,
                                 "not a function", "pass fn(outputs, batch, params) -> "
                                 "scalar")
        if self.loss_term_names and not loss_terms:
            warnings.warn(f"this model was trained with extra loss terms "
                          f"{list(self.loss_term_names)}; train() without them drops "
                          "them. Pass loss_terms=... again to keep them", UserWarning,
                          stacklevel=4)
        if not loss_terms:
            if loss_weights:
                raise InputError("loss_weights", sorted(loss_weights), "names no loss term",
                                 "pass loss_terms={...} with these names")
            return None
        loss_weights = dict(loss_weights or {})
        unknown = set(loss_weights) - set(loss_terms)
        if unknown:
            raise InputError("loss_weights", sorted(unknown), "names no loss term",
                             f"use names of loss_terms: {sorted(loss_terms)}")
        out = {}
        for k in loss_terms:
            w = loss_weights.get(k, 1.0)
            if not callable(w):
                if isinstance(w, bool) or not isinstance(w, (int, float)) \
                        or not math.isfinite(w):
                    raise InputError(f"loss_weights[{k!r}]", w, "not a finite number or "
                                     "a schedule", "pass a float, or a function of the "
                                     "step such as optax.linear_schedule(0.0, 1.0, 1000)")
                w = float(w)
            out[k] = w
        return out

    def minibatch(self, indices=None, adata=None) -> Batch:
        """Cells of ``adata`` (default: the model's) as one `Batch`, the input of
        the module and of every function in `jaxscanvi.losses`.

        For research code: ``losses.scvi_per_cell(model.module, model.params,
        model.state, model.minibatch(range(64)), key)``.
        """
        cells = self._cells_for(adata)
        idx = _row_positions(cells.n_obs, indices)
        if idx.size == 0:
            raise InputError("indices", [], "selects no cells", "pass at least one index")
        b = host_batch(cells, idx, len(idx), _nnz_bucket(cells, idx))
        return jax.tree_util.tree_map(jnp.asarray, b)

    # ------------------------------------------------------------- inference
    def _chunks(self, cells: CellData, indices, batch_size: int | None):
        idx = _row_positions(cells.n_obs, indices)
        B = _chunk_size(batch_size)
        if batch_size is None:  # small requests: a power-of-two chunk, not 1024 padded rows
            B = min(B, 1 << max(len(idx) - 1, 15).bit_length())
        if self._parallel is not None:  # whole rows per device
            B = -(-B // self._parallel.size) * self._parallel.size
        for s in range(0, len(idx), B):
            rows = idx[s:s + B]
            # no list of non-zeros: no inference kernel reads one, and its length
            # (a short last chunk's is smaller) would compile each kernel again
            yield len(rows), host_batch(cells, rows, B, None)

    def _map(self, fn, cells: CellData, indices, batch_size, seed: int = 0):
        """Apply jitted fn(variables, batch, key) over chunks of cells, in order.

        ``fn`` returns arrays with the cell axis first. When each process of a
        many-host run reads only its slice of a backed file, each maps its
        own cells and every process gets all the results.
        """
        if getattr(cells.X, "rows", None) is not None and jax.process_count() > 1:
            return self._map_slices(fn, cells, indices, batch_size, seed)
        return self._map_here(fn, cells, indices, batch_size, seed)

    def _map_slices(self, fn, cells: CellData, indices, batch_size, seed: int):
        idx = _row_positions(cells.n_obs, indices)
        if idx.size == 0:
            raise InputError("indices", [], "selects no cells", "pass at least one index")
        # a collective: every process must ask for the same cells
        sig = np.array([[idx.size, zlib.crc32(np.ascontiguousarray(idx, np.int64))]],
                       np.int64)
        if (distributed.gather_rows(sig) != sig).any():
            raise InputError("indices", f"{idx.size} cells here", "the processes asked "
                             "for different cells; inference over a backed AnnData is "
                             "shared by all processes", "pass the same indices on every "
                             "process (default: all cells) and take your own rows with "
                             "distributed.local_slice(n_obs)")
        bounds = distributed.shard_bounds(cells.n_obs, jax.process_count())
        owner = np.searchsorted(bounds, idx, side="right") - 1
        p = jax.process_index()
        mine = idx[owner == p]
        # a process none of whose cells were asked for still joins the gather
        out = self._map_here(fn, cells, mine if mine.size else bounds[p:p + 1],
                             batch_size, seed + 7919 * p)
        if not mine.size:
            out = jax.tree_util.tree_map(lambda a: a[:0], out)
        where = np.concatenate([np.flatnonzero(owner == q) for q in range(len(bounds) - 1)])

        def place(a):
            a = distributed.gather_rows(a)
            res = np.empty_like(a)
            res[where] = a
            return res
        return jax.tree_util.tree_map(place, out)

    def _map_here(self, fn, cells: CellData, indices, batch_size, seed: int = 0):
        outs = []
        key = jax.random.PRNGKey(seed)
        par = self._parallel
        variables = self.variables if par is None else par.replicate(self.variables)
        for i, (n, b) in enumerate(self._chunks(cells, indices, batch_size)):
            if par is not None:  # rows split across the training devices
                b = par.put(b)
            res = fn(variables, b, jax.random.fold_in(key, i))
            outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], res))
        if not outs:
            raise InputError("indices", [], "selects no cells", "pass at least one index")
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *outs)

    def get_latent_representation(self, adata=None, indices=None, give_mean: bool = True,
                                  mc_samples: int = 5000, batch_size: int | None = None,
                                  return_dist: bool = False):
        """Latent representation of each cell: the posterior mean (or a sample).

        With ``return_dist=True`` returns ``(qz_mean, qz_var)``. For
        latent_distribution="ln" and give_mean, the mean of softmax(z) is
        estimated from ``mc_samples`` draws, as scvi-tools does.
        """
        fn = partial(_latent_fn, self.module, give_mean=give_mean,
                     mc_samples=int(mc_samples) if self.module.config.latent_distribution
                     == "ln" else 1)
        out = self._map(_jitted(fn), self._cells_for(adata), indices, batch_size)
        if return_dist:
            return out["qz_m"], out["qz_v"]
        return out["z"]

    def get_normalized_expression(self, adata=None, indices=None, transform_batch=None,
                                  gene_list: Sequence[str] | None = None,
                                  library_size: float | str = 1, n_samples: int = 1,
                                  n_samples_overall: int | None = None,
                                  batch_size: int | None = None, return_mean: bool = True,
                                  return_numpy: bool | None = None):
        """Denoised expression rho (times ``library_size``), scvi-tools' semantics.

        ``transform_batch`` (a batch name or list of names) decodes every cell
        as if from that batch; with several, the result is their average.
        ``library_size="latent"`` uses each cell's (observed or inferred) library.
        """
        cells = self._cells_for(adata)
        reg = self.registry
        check_positive_int("n_samples", n_samples)
        if n_samples_overall is not None:
            check_positive_int("n_samples_overall", n_samples_overall)
            pool = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
            indices = np.random.default_rng(0).choice(pool, n_samples_overall)
            n_samples = 1
        batches = _transform_batches(reg, transform_batch)
        gene_mask = self._gene_positions(gene_list)
        if not (library_size == "latent" or (isinstance(library_size, (int, float))
                                             and library_size > 0)):
            raise InputError("library_size", library_size, "must be a positive number or "
                             "'latent'", "pass e.g. library_size=1e4")
        jfn = self._expression_kernel(n_samples=int(n_samples),
                                      latent_library=library_size == "latent")
        acc = None
        for b in batches:
            def run(variables, batch, key, b=b):
                return jfn(variables, batch, key, b)
            out = self._map(run, cells, indices, batch_size)
            acc = out if acc is None else acc + out
        expr = acc / len(batches)
        if library_size != "latent":
            expr = expr * float(library_size)
        if gene_mask is not None:
            expr = expr[..., gene_mask]
        if n_samples > 1:  # kernels give (cells, samples, genes)
            expr = expr.mean(1) if return_mean else np.swapaxes(expr, 0, 1)
        if return_numpy is None:
            return_numpy = n_samples > 1 and not return_mean
        if return_numpy:
            return expr
        names = reg.var_names if gene_list is None else list(gene_list)
        idx = np.arange(cells.n_obs) if indices is None else np.asarray(indices)
        return pd.DataFrame(expr, index=cells.obs_names[idx], columns=list(names))

    def _gene_positions(self, gene_list) -> np.ndarray | None:
        if gene_list is None:
            return None
        names = list(self.registry.var_names)
        pos = {g: i for i, g in enumerate(names)}
        missing = [g for g in gene_list if g not in pos]
        if missing:
            raise InputError("gene_list", missing[:5], "genes the model does not have",
                             "pass names from model.registry.var_names")
        return np.asarray([pos[g] for g in gene_list])

    def _expression_kernel(self, **kw):
        """jitted fn(variables, batch, key, batch_code) -> expression; SCANVI extends it."""
        return _jitted(partial(_expression_fn, self.module, **kw))

    def _elbo_terms(self, adata, indices, batch_size):
        fn = partial(_terms_fn, self.module, self._kind)
        return self._map(_jitted(fn), self._cells_for(adata), indices, batch_size)

    def get_elbo(self, adata=None, indices=None, batch_size: int | None = None) -> float:
        """The ELBO (a negative number; higher is better), mean over cells.

        scvi-tools' sign convention: returns -(reconstruction + KL) averaged.
        """
        t = self._elbo_terms(adata, indices, batch_size)
        return -float(np.mean(t["reconstruction_loss"] + t["kl_local"]))

    def get_reconstruction_error(self, adata=None, indices=None,
                                 batch_size: int | None = None) -> dict[str, float]:
        """Mean reconstruction loss -log p(x|z), as scvi-tools returns it."""
        t = self._elbo_terms(adata, indices, batch_size)
        return {"reconstruction_loss": float(np.mean(t["reconstruction_loss"]))}

    def get_marginal_ll(self, adata=None, indices=None, n_mc_samples: int = 1000,
                        batch_size: int | None = None) -> float:
        """Importance-sampled log p(x), mean over cells (higher is better, as in scvi-tools)."""
        check_positive_int("n_mc_samples", n_mc_samples)
        return float(np.mean(self._marginal_ll_per_cell(self._cells_for(adata), indices,
                                                        n_mc_samples, batch_size)))

    def _marginal_ll_per_cell(self, cells, indices, n_mc_samples, batch_size) -> np.ndarray:
        """Importance-sampled log p(x) of each selected cell, up to 100 samples per pass."""
        per_pass = min(int(n_mc_samples), 100)
        n_pass = -(-int(n_mc_samples) // per_pass)
        fn = _jitted(partial(_log_weights_fn, self.module, n_samples=per_pass))
        logw = np.concatenate([self._map(fn, cells, indices, batch_size, seed=1000 + p)
                               for p in range(n_pass)], axis=1)[:, :n_mc_samples]  # (N, S)
        m = logw.max(1, keepdims=True)
        return m[:, 0] + np.log(np.exp(logw - m).sum(1)) - np.log(logw.shape[1])

    # ------------------------------------------------------------- save/load
    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def save(self, dir_path, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save parameters, config, registry and history to a folder, atomically.

        In a run of several processes, process 0 writes and the others wait
        for it (an error there is raised on every process).
        """
        distributed.agree(lambda: self._write(dir_path, overwrite, save_anndata)
                          if distributed.is_main() else None)

    def _write(self, dir_path, overwrite: bool, save_anndata: bool) -> None:
        meta = {
            "model_class": type(self).__name__,
            "config": self.module.config.to_dict(),
            "registry": self.registry.to_dict(),
            "init_seed": self.init_seed,
            "is_trained": self.is_trained,
            "loss_terms": list(self.loss_term_names),
            "custom_modules": {k: _qualified_name(getattr(self.module, f"{k}_cls"))
                               for k in ("encoder", "decoder")},
            "history": json.loads(self._history.reset_index().to_json(orient="records"))
            if len(self._history) else [],
            "train_indices": np.asarray(self.train_indices).tolist(),
            "validation_indices": np.asarray(self.validation_indices).tolist(),
            **self._extra_metadata(),
        }
        blobs = {"variables": io.to_bytes(self.variables)}
        if self._freeze is not None:  # a query model keeps what its training may change
            meta["query_info"] = getattr(self, "query_info", None)
            blobs["freeze"] = io.to_bytes({"params": self._freeze[0], "state": self._freeze[1]})
        extra = {}
        d = Path(dir_path)
        if d.is_dir() and (d / io.METADATA).exists() and not overwrite:
            raise FileExistsError(f"{d} already holds a saved model. Fix: pass "
                                  "overwrite=True to replace it, or another folder")
        if save_anndata and self.adata is None:
            raise InputError("save_anndata", True, "the model holds no AnnData",
                             "pass save_anndata=False")
        try:
            if save_anndata:
                d.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".adata.", suffix=".h5ad", dir=d)
                os.close(fd)
                extra["adata"] = Path(tmp)
                self.adata.write_h5ad(tmp)
            io.write_folder(d, meta, blobs, overwrite=overwrite, extra_files=extra)
        finally:
            for tmp_file in extra.values():  # moved into place on success
                tmp_file.unlink(missing_ok=True)

    @classmethod
    def _from_metadata(cls, meta, registry, config, adata):
        raise NotImplementedError

    @classmethod
    def load(cls, dir_path, adata=None, *, encoder=None, decoder=None):
        """Load a model saved by ``save``; ``adata`` must match its genes.

        A model built with a custom ``encoder``/``decoder`` records the class's
        import path; it is imported again, or pass the class here.
        """
        meta = io.read_metadata(dir_path)
        if meta.get("model_class") != cls.__name__:
            raise ModelFormatError(
                f"{str(dir_path)!r} holds a {meta.get('model_class')} model, not a "
                f"{cls.__name__}. Fix: load it with {meta.get('model_class')}.load(...)")
        try:
            registry = Registry.from_dict(meta["registry"])
            config = cls._config_cls().from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{str(dir_path)!r}: metadata is damaged ({e})") from None
        if adata is None:
            path = io.file_path(dir_path, meta, "adata")
            if path is not None:
                import anndata
                adata = anndata.read_h5ad(path)
        if adata is not None:
            from ..data.cells import check_var_names
            check_var_names(adata, registry)
            adata.uns["_jaxscanvi_registry"] = registry.to_json()
        custom = meta.get("custom_modules") or {}
        modules = {"encoder": _resolve_module(custom.get("encoder"), encoder, "encoder",
                                              dir_path),
                   "decoder": _resolve_module(custom.get("decoder"), decoder, "decoder",
                                              dir_path)}
        model = cls._from_metadata(meta, registry, config, adata, **modules)
        template = model.variables
        restored = io.from_bytes(template, io.read_blob(dir_path, meta, "variables"),
                                 "parameters")
        model.params = restored["params"]
        model.state = {k: v for k, v in restored.items() if k != "params"}
        model.is_trained = bool(meta.get("is_trained", False))
        model.loss_term_names = tuple(meta.get("loss_terms", ()))
        hist = meta.get("history") or []
        model._history = pd.DataFrame(hist).set_index("epoch") if hist else pd.DataFrame()
        if "freeze" in meta.get("files", {}):
            def as_bool(tree):
                return jax.tree_util.tree_map(lambda v: np.zeros(np.shape(v), bool), tree)
            masks = io.from_bytes({"params": as_bool(model.params),
                                   "state": as_bool(model.state)},
                                  io.read_blob(dir_path, meta, "freeze"), "freeze masks")
            model._freeze = tuple(jax.tree_util.tree_map(lambda m: np.asarray(m, bool), t)
                                  for t in (masks["params"], masks["state"]))
            model.query_info = meta.get("query_info")
        model.train_indices = np.asarray(meta.get("train_indices", []), np.int64)
        model.validation_indices = np.asarray(meta.get("validation_indices", []), np.int64)
        return model

    @classmethod
    def _config_cls(cls):
        raise NotImplementedError

    def __repr__(self) -> str:
        c = self.module.config
        return (f"{type(self).__name__}(n_genes={c.n_genes}, n_batch={c.n_batch}, "
                f"n_latent={c.n_latent}, n_hidden={c.n_hidden}, n_layers={c.n_layers}, "
                f"gene_likelihood={c.gene_likelihood!r}, dispersion={c.dispersion!r}, "
                f"trained={self.is_trained})")


def _qualified_name(obj) -> str | None:
    if obj is None:
        return None
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _resolve_module(name: str | None, given, what: str, dir_path):
    """The custom module a saved model was built with: ``given``, or imported by name."""
    if given is not None:
        return given
    if name is None:
        return None
    import importlib
    mod_name, _, qual = name.partition(":")
    try:
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        raise ModelFormatError(
            f"{str(dir_path)!r} was saved with a custom {what} {name!r}, which cannot be "
            f"imported here. Fix: pass {what}=<that class> to load()") from None


def library_prior(cells, n_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log library size (scvi-tools' _init_library_size)."""
    means = np.zeros(n_batch, np.float32)
    var = np.ones(n_batch, np.float32)
    for b in range(n_batch):
        ll = cells.log_library[cells.batch == b].astype(np.float64)
        if ll.size:
            means[b], var[b] = ll.mean(), ll.var()
    return means, var


def init_variables(module, n_genes: int, n_cont: int, n_cat: int, seed: int,
                   constants: dict | None = None):
    """Initialise a module's variables on a dummy batch of two cells."""
    B = 2
    batch = Batch(
        x=jnp.ones((B, n_genes)), nz=NonZeros(jnp.zeros(1, jnp.int32),
                                              jnp.zeros(1, jnp.int32), jnp.zeros(1)),
        weight=jnp.ones(B), batch=jnp.zeros(B, jnp.int32), labels=jnp.zeros(B, jnp.int32),
        cat_covs=jnp.zeros((B, n_cat), jnp.int32), cont_covs=jnp.zeros((B, n_cont)),
        log_size_factor=jnp.zeros(B), log_library=jnp.ones(B), lgamma_const=jnp.zeros(B))
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    if module not in _INIT:  # initialisation draws with jax.random alone
        # init runs once per model: skip XLA's backend optimisation, which would
        # otherwise take most of the construction time (same values either way)
        _INIT[module] = jax.jit(partial(module.init, train=False), compiler_options={
            "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    variables = _INIT[module]({"params": k1, "sample": k2, "dropout": k3}, batch)
    variables = dict(variables)
    variables.setdefault("batch_stats", {})
    if constants is not None:
        variables["constants"] = constants
    return variables


def _chunk_size(batch_size: int | None) -> int:
    if batch_size is None:
        return 1024
    check_positive_int("batch_size", batch_size)
    return int(batch_size)


def _row_positions(n_obs: int, indices) -> np.ndarray:
    """Row positions from ``indices`` (None: all; a bool mask; or positions), checked."""
    idx = np.arange(n_obs) if indices is None else np.asarray(indices)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n_obs):
        raise InputError("indices", f"[{idx.min()}, {idx.max()}]", "out of range for "
                         f"{n_obs} cells", "pass indices in [0, n_obs)")
    return idx


def _nnz_bucket(cells: CellData, rows) -> int:
    # round the non-zero cap up to a power of two so chunks reuse one compile
    indptr = cells.X.indptr
    nnz = int((indptr[np.asarray(rows) + 1] - indptr[rows]).sum())
    return 1 << max(nnz - 1, 1).bit_length()


_JIT: dict = {}
_INIT: dict = {}


def _jitted(fn: partial):
    numerics = backend.current()
    key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())), numerics)
    if key not in _JIT:
        _JIT[key] = jax.jit(backend.traced(fn, numerics))
    return _JIT[key]


def _pinned(step, numerics: backend.Numerics):
    """A train step (with its deferred-update pair, if any) traced under ``numerics``."""
    out = backend.traced(step, numerics)
    if hasattr(step, "deferred"):
        out.deferred = backend.traced(step.deferred, numerics)
        out.finish = backend.traced(step.finish, numerics)
    return out


def _transform_batches(reg: Registry, transform_batch) -> list:
    if transform_batch is None:
        return [None]
    names = [transform_batch] if isinstance(transform_batch, (str, int, np.integer)) \
        else list(transform_batch)
    codes = []
    for n in names:
        s = str(n)
        if s not in reg.batch_categories:
            raise InputError("transform_batch", n, f"not a batch the model knows "
                             f"({list(reg.batch_categories)[:10]})",
                             "pass one of model.registry.batch_categories")
        codes.append(reg.batch_categories.index(s))
    return codes


# ----------------------------------------------------------- jitted kernels
def _apply(module, variables, batch, key, method=None, **kw):
    return module.apply(variables, batch, train=False, rngs={"sample": key},
                        method=method, **kw)


def _latent_fn(module, variables, batch, key, *, give_mean: bool, mc_samples: int):
    inf = module.apply(variables, batch, train=False, rngs={"sample": key},
                       method=type(module).inference)
    if give_mean:
        if module.config.latent_distribution == "ln":
            eps = jax.random.normal(key, (mc_samples,) + inf["qz_m"].shape)
            z = jax.nn.softmax(inf["qz_m"] + jnp.sqrt(inf["qz_v"]) * eps, -1).mean(0)
        else:
            z = inf["qz_m"]
    else:
        z = inf["z"]
    return {"z": z, "qz_m": inf["qz_m"], "qz_v": inf["qz_v"]}


def _expression_fn(module, variables, batch, key, batch_code, *, n_samples: int,
                   latent_library: bool):
    def run(mdl, b):
        inf = mdl.inference(b, train=False, n_samples=n_samples)
        bidx = None if batch_code is None else jnp.full_like(b.batch, batch_code)
        gen = mdl.generative(inf["z"], inf["library"], b, train=False, batch_index=bidx)
        out = jnp.exp(gen["log_mu"] if latent_library else gen["log_scale"])
        return jnp.swapaxes(out, 0, 1) if out.ndim == 3 else out

    return module.apply(variables, batch, rngs={"sample": key}, method=run)


def _terms_fn(module, kind, variables, batch, key):
    from ..losses import forward, scvi_terms
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    outputs, _ = forward(module, params, state, batch, key, train=False)
    t = scvi_terms(module, outputs, batch, state, sparse=False)
    return {"reconstruction_loss": t["reconstruction_loss"], "kl_local": t["kl_z"] + t["kl_l"]}


def _log_weights_fn(module, variables, batch, key, *, n_samples: int):
    """log p(x|z,l) + log p(z) + log p(l) - log q(z|x) - log q(l|x), (S, B)."""
    from ..distributions import normal_log_prob
    from ..losses import reconstruction_loss
    outputs = module.apply(variables, batch, train=False, rngs={"sample": key},
                           n_samples=n_samples)
    cfg = module.config
    rec = reconstruction_loss(outputs, batch, cfg.gene_likelihood, sparse=False)
    z = outputs["untran_z"]
    log_pz = normal_log_prob(z, 0.0, 1.0).sum(-1)
    log_qz = normal_log_prob(z, outputs["qz_m"], outputs["qz_v"]).sum(-1)
    logw = -rec + log_pz - log_qz
    if "ql_m" in outputs:
        const = variables["constants"]
        lib = outputs["library"]
        m = const["library_log_means"][batch.batch]
        v = const["library_log_vars"][batch.batch]
        logw = logw + normal_log_prob(lib, m, v) - normal_log_prob(
            lib, outputs["ql_m"], outputs["ql_v"])
    return jnp.atleast_2d(logw).T  # (B, S); with n_samples=1 logw is (B,)

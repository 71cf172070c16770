"""The docstrings of `SCVI.train` and `SCANVI.train`.

They live here so that each `train` is its signature and one call: its
arguments, each by name, to `fit_plan` (see ``docs/guide/internals.md``).
"""

SCVI_TRAIN = """Train with Adam (coupled L2) and linear KL warm-up, as scvi-tools does.

scvi-tools' arguments, in its order, then jaxscanvi's (keyword-only).
Lightning trainer keywords (``trainer_kwargs``, ``trainer_config``)
are mapped where they mean something here (``enable_progress_bar``,
``early_stopping_min_delta``, ``gradient_clip_val``, ``precision``
"32-true"/"bf16-mixed"), ignored with a warning where they only
concern Lightning (``logger``, ``enable_checkpointing``, ...), and
refused otherwise; see `jaxscanvi.train.compat`.

Parameters
----------
max_epochs
    Default: scvi-tools' heuristic, min(round(20000 / n_cells * 400), 400).
accelerator, devices
    "auto" (JAX's default backend), "cpu", "gpu"/"cuda" or "tpu", which
    must be JAX's backend; ``devices`` "auto", an int n (the first n),
    a list of device indices or of jax devices (see below).
seed
    Default: ``jaxscanvi.settings.seed``.
plan_kwargs
    ``optimizer`` ("Adam": L2 weight decay as torch.optim.Adam;
    "AdamW": decoupled), ``lr`` (1e-3), ``eps`` (0.01), ``weight_decay`` (1e-6),
    ``n_epochs_kl_warmup`` (400), ``n_steps_kl_warmup``,
    ``max_kl_weight``, ``min_kl_weight``, ``reduce_lr_on_plateau`` and
    its ``lr_factor``/``lr_patience``/``lr_threshold``/``lr_min``.
data_source
    "device" keeps all counts on the accelerator (one jitted scan per
    epoch; on n devices each holds its own 1/n of the cells, see
    ``devices``); "host" feeds minibatches from host memory; "stream"
    reads a backed AnnData (``read_h5ad(path, backed="r")``) from disk
    in shuffled blocks; "auto" picks: "stream" for backed data, else
    "device" when the counts (each device's share) fit half the device
    memory, else "host". ``model.data_bytes_per_device`` then says
    how many bytes of cells the fullest device holds.
loss_terms, loss_weights
    Extra terms ``fn(outputs, batch, params) -> scalar`` added to the
    loss times their weight (default 1) and recorded in the history.
checkpoint_dir, checkpoint_every, resume
    Write the whole train state atomically every ``checkpoint_every``
    epochs; ``resume=True`` continues from it, bitwise as if never
    interrupted.
devices
    "auto" (every local device), an int n (the first n), or a list of
    devices: each minibatch is split across them (data parallelism,
    same results as one device); ``batch_size`` is the global batch,
    padded with masked rows to a multiple of the device count. With
    the device source on n devices, each device holds one contiguous
    slice of the cells and minibatches are drawn slice by slice: the
    same model as ``devices=1, data_shards=n``. In a run of several
    processes (`jaxscanvi.distributed`), "auto" is every device of
    every process.
data_shards
    Draw each global minibatch from this many contiguous slices of the
    cells, ``batch_size / data_shards`` cells from each. Default: the
    number of processes (1 on one host), or with the device source on
    n devices of one host, n. Set it on one process to replay a run of
    that many processes (or devices) exactly. A number that is not a
    multiple of the device count puts every cell on every device.
precision
    "float32" (default) or "bfloat16": the dense layers multiply in
    bf16 and accumulate in float32 (faster on GPUs and TPUs, slower
    on most CPUs); parameters, optimiser state, likelihood and KL stay
    float32. Which hand-written kernels run is `jaxscanvi.backend`'s
    choice, per backend.
"""

SCANVI_TRAIN = """Train on all cells, each minibatch paired with a minibatch of labelled cells.

``n_samples_per_label`` re-draws, every epoch, a class-balanced subset
of at most that many labelled training cells per type for the
labelled minibatches. ``plan_kwargs`` adds ``classification_ratio``
(50) and ``objective`` ("seed" or "scvi-tools") to SCVI's options.
A query model (`load_query_data`) may have no labelled cells; it then
trains on the unlabelled bound alone. With ``calibrate`` and labelled
validation cells, a temperature is fitted at the end (`calibrate`).
scvi-tools' and Lightning's other arguments as in `SCVI.train`.
"""

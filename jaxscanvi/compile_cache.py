"""JAX's persistent compilation cache, on by default for jaxscanvi.

On small data most of what a user waits for before the first epoch is XLA
compiling. With the cache, a new process running the same workflow loads
the compiled programs from disk instead of compiling them again.

At import, jaxscanvi points JAX at a per-user folder
(``$XDG_CACHE_HOME/jaxscanvi/jax``, else ``~/.cache/jaxscanvi/jax``) unless
the user already chose a cache folder for JAX (``JAX_COMPILATION_CACHE_DIR``
or ``jax.config.jax_compilation_cache_dir``), or turned ours off with
``JAXSCANVI_COMPILATION_CACHE=0``. That variable may also name a folder.

Beside it, `exported` keeps traced and lowered programs (``jax.export``), so
a warm process neither traces nor lowers them (`_export_cache`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from ._export_cache import exported  # noqa: F401 (the API: compile_cache.exported)

if TYPE_CHECKING:
    from .backend import Numerics

ENV = "JAXSCANVI_COMPILATION_CACHE"
_OFF = {"0", "false", "no", "off", "none"}
_ON = {"", "1", "true", "yes", "on"}

# JAX caches only programs that took >= 1 s to compile; ours mostly take
# less, and loading one from disk is still much faster than compiling it.
MIN_COMPILE_SECS = 0.0
MIN_ENTRY_BYTES = -1  # -1: no size floor (and JAX does not override it)

# the folder jaxscanvi set, so a later call knows the setting is ours
_ours: str | None = None


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxscanvi/jax``, else ``~/.cache/jaxscanvi/jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "jaxscanvi" / "jax"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _flag(name: str) -> Any:
    """A JAX flag's value (jax.config sets its flags as dynamic attributes)."""
    return getattr(jax.config, name)


def _user_dir() -> str | None:
    """A cache folder the user gave JAX (not one jaxscanvi set)."""
    current = _flag("jax_compilation_cache_dir")
    if current is not None and current != _ours:
        return current
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def _apply(path: str | None) -> None:
    global _ours
    from jax.experimental.compilation_cache import compilation_cache as cc

    if _flag("jax_compilation_cache_dir") != path:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # JAX reads the folder once, at its first compile
    _ours = path
    if path is not None:
        # JAX's defaults (1 s, 0 bytes) would leave most of our programs out;
        # a threshold the user changed is kept
        if _flag("jax_persistent_cache_min_compile_time_secs") == 1.0:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
        if _flag("jax_persistent_cache_min_entry_size_bytes") == 0:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_BYTES)


def set_compilation_cache(path: str | os.PathLike | None = "default") -> Path | None:
    """Use ``path`` as JAX's persistent compilation cache; ``None`` turns it off.

    ``"default"`` is the per-user folder (`default_dir`). Returns the folder
    in use, or None. Call it before the first training or inference of the
    process; JAX reads the setting at its first compile after a change.
    """
    if path is None:
        _apply(None)
        return None
    folder = default_dir() if path == "default" else Path(path).expanduser()
    if not _writable(folder):
        from .errors import InputError

        raise InputError(
            "path",
            str(folder),
            "cannot be created or written to",
            "pass a writable folder, or None to turn the cache off",
        )
    _apply(str(folder))
    return folder


def configure_at_import() -> Path | None:
    """What ``import jaxscanvi`` does: the default cache, unless opted out or
    configured by the user. Never raises; an unwritable folder only warns."""
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in _OFF or _user_dir() is not None:
        return None
    folder = None
    try:  # Path.home() raises where there is no home directory
        folder = default_dir() if choice.lower() in _ON else Path(choice).expanduser()
        ok = _writable(folder)
    except (OSError, RuntimeError, KeyError):
        ok = False
    if not ok:
        warnings.warn(
            f"jaxscanvi: cannot write the compilation cache folder {folder}; "
            f"compiling without a persistent cache (set {ENV}=<folder> to use "
            f"another, or {ENV}=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _apply(str(folder))
    return folder


# ------------------------------------------------------ compiled functions in memory
class ProgramKey:
    """A key of the compiled-function cache (`functions`).

    There is one frozen dataclass per kind of program, below, and each is
    built in one place: the function that makes that program. Two keys are
    equal when they are of the same kind and their fields are equal, so a
    field names everything the program's trace depends on. The kernel choice
    (`backend.Numerics`) is a field where the program reads it; see
    docs/guide/internals.md, "Cache keys".
    """

    __slots__ = ()


@dataclass(frozen=True)
class InitKey(ProgramKey):
    """A module's initialisation by ``module.init`` (`model._init.init_variables`,
    for modules it cannot describe).

    No numerics: initialisation draws with `jax.random` alone and returns
    only the variables, whatever kernels the traced forward pass would use,
    so one program serves every choice.
    """

    module: Hashable  # a flax module: its class and fields


@dataclass(frozen=True)
class InitDrawKey(ProgramKey):
    """The draws of every described module's initialisation
    (`model._init._draw_rows`): one program for all models, by block shape."""

    rows: int
    chunk: int


@dataclass(frozen=True)
class KernelKey(ProgramKey):
    """An inference kernel, ``partial(func, *args, **keywords)``, pinned to
    ``numerics`` (`model._inference.jitted`)."""

    func: Callable
    args: tuple
    keywords: tuple  # the partial's keywords as sorted (name, value) pairs
    numerics: Numerics


@dataclass(frozen=True)
class TrainStepKey(ProgramKey):
    """The optimiser, train step and eval step of one training configuration
    (`train.fit.step_fns`)."""

    loss_spec: Hashable  # the model's loss (`train.fit.Task.loss_spec`)
    plan: Hashable  # the optimiser plan (`TrainConfig.plan`)
    on_nonfinite: str
    loss_terms: Hashable
    loss_weights: Hashable
    params_mask: Hashable  # `train.state.mask_key` of what training may change
    state_mask: Hashable
    numerics: Numerics


@dataclass(frozen=True)
class SweepMemberKey(ProgramKey):
    """The step of any sweep member (`sweep._step.member_steps`): like
    `TrainStepKey`, less the numbers each member traces from its state."""

    loss_spec: Hashable
    plan_options: tuple  # the plan's options other than the traced numbers
    on_nonfinite: str
    loss_terms: Hashable
    callable_weights: tuple  # the extra-term weights that are schedules
    params_mask: Hashable
    state_mask: Hashable
    numerics: Numerics
    schedule_mode: str


@dataclass(frozen=True)
class DeviceEpochKey(ProgramKey):
    """One epoch over cells resident on the device (`train.sources.DeviceSource`).

    The step holds the numerics: it is pinned to them (`backend.traced`) by
    the program that made it, whose key has them; the gather reads none.
    """

    step_fn: Callable
    n_genes: int
    k_cap: int  # room for non-zeros per minibatch (0: dense counts)
    dense: bool
    parallel: Hashable  # `train.parallel.DataParallel`, or None
    sharded: bool  # each device holds its own slice of the cells


@dataclass(frozen=True)
class ChunkEpochKey(ProgramKey):
    """One chunk of S minibatches shipped from the host (`train.sources.HostSource`
    and the stream source); the numerics are the step's, as in `DeviceEpochKey`."""

    step_fn: Callable
    n_genes: int
    k_cap: int
    sparse: bool  # the likelihood takes the list of non-zeros (`backend`)
    parallel: Hashable


@dataclass(frozen=True)
class SweepEpochKey(ProgramKey):
    """A device epoch program vmapped over K members (`sweep._step.vmapped_epoch`);
    ``own_rows_axis`` is 1 when each member draws its own rows, else None."""

    epoch_fn: Callable
    own_rows_axis: int | None


class FunctionCache:
    """Jitted functions by a hashable spec; the least recently used go first.

    One cache for every train step, epoch program and inference kernel, so a
    new model with the same architecture and settings reuses what an earlier
    one compiled. It is bounded because an entry's closure can hold arrays
    (a device source keeps its model's counts on the device). With
    ``key_type``, a spec of another type is refused (TypeError): `functions`
    takes only `ProgramKey`s.
    """

    def __init__(self, max_entries: int, key_type: type | None = None):
        self.max_entries = max_entries
        self.key_type = key_type
        self._entries: OrderedDict = OrderedDict()

    def get(self, spec, build: Callable[[], Any]):
        """The function for ``spec``, made by ``build()`` the first time it is asked for."""
        if self.key_type is not None and not isinstance(spec, self.key_type):
            raise TypeError(
                f"compiled-function cache key {type(spec).__name__}: expected a "
                f"{self.key_type.__name__} (one per kind of program, compile_cache.py)"
            )
        if spec in self._entries:
            self._entries.move_to_end(spec)
            return self._entries[spec]
        fn = build()
        self._entries[spec] = fn
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return fn

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


functions = FunctionCache(max_entries=128, key_type=ProgramKey)


def clear_caches() -> None:
    """Forget every compiled function jaxscanvi holds in memory (and what they hold).

    The persistent cache on disk stays; the next call of each function
    compiles it again, or loads it from there.
    """
    functions.clear()

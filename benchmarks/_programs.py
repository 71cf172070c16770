"""Count the programs JAX builds, and the seconds it spends building them.

A "program" is one executable XLA hands back: one ``backend_compile``
event of ``jax.monitoring``, whether XLA compiled it or JAX loaded it from
the persistent cache (then the event's time is the lookup and load). Every
jit cache miss in a process ends in exactly one, so the count is the number
of distinct programs the process ran, each (function, shapes, options)
once. The alternatives were weaker: ``jax_log_compiles`` writes log lines
whose wording changes between JAX versions, and cache hit/miss events miss
every program when the persistent cache is off.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import jax

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"
HITS = "/jax/compilation_cache/cache_hits"
MISSES = "/jax/compilation_cache/cache_misses"


class ProgramLog:
    """While active (``with ProgramLog() as log:`` or `start`/`stop`), the
    programs built, as (name, backend seconds), and the seconds of tracing,
    lowering and backend compilation."""

    def __init__(self):
        self.secs: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.programs: list[tuple[str, float]] = []
        self._on = False

    def on_duration(self, event, duration, **kw):
        if event in (TRACE, LOWER, BACKEND):
            self.secs[event] += duration
            self.counts[event] += 1
            if event == BACKEND:
                self.programs.append((str(kw.get("fun_name", "?")), duration))

    def on_event(self, event, **kw):
        if event in (HITS, MISSES):
            self.counts[event] += 1

    def start(self) -> ProgramLog:
        if not self._on:
            jax.monitoring.register_event_duration_secs_listener(self.on_duration)
            jax.monitoring.register_event_listener(self.on_event)
            self._on = True
        return self

    def stop(self) -> None:
        if self._on:
            jax.monitoring.unregister_event_duration_listener(self.on_duration)
            jax.monitoring.unregister_event_listener(self.on_event)
            self._on = False

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def n_programs(self) -> int:
        return len(self.programs)

    def by_name(self, start: int = 0) -> dict[str, int]:
        """How many programs of each name since the ``start``-th."""
        return dict(Counter(n for n, _ in self.programs[start:]).most_common())

    def snapshot(self) -> dict:
        return {
            "trace_s": self.secs[TRACE],
            "lower_s": self.secs[LOWER],
            "backend_s": self.secs[BACKEND],
            "n_backend": self.counts[BACKEND],
            "n_programs": self.n_programs,
            "n_traced": self.counts[TRACE],
            "cache_hits": self.counts[HITS],
            "cache_misses": self.counts[MISSES],
        }

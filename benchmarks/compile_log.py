"""What a first call spends before it runs: JAX's own compile log, summed per program.

    with CompileLog() as log:
        sampler(...)                      # a first call
    log.summary()  # {"trace_s", "lower_s", "compile_s", "cache_read_s", "programs": {name: {...}}}

With `jax_log_compiles` on, JAX logs, for every jitted program it builds, the seconds spent tracing
the Python function to a jaxpr ("Finished tracing <f> for jit in"), lowering the jaxpr to a StableHLO
module ("Finished jaxpr to MLIR module conversion <f> in") and getting the executable ("Finished XLA
compilation of <f> in": XLA's compile, or the persistent cache's read when the cache has it).
`cache_read_s` is the persistent cache's own read time (jax.monitoring's
/jax/compilation_cache/cache_retrieval_time_sec). A first call's wall time minus these is the run
itself plus host work.
"""
from __future__ import annotations

import collections
import logging
import re

import jax

_LINE = re.compile(r"Finished (tracing|jaxpr to MLIR module conversion|XLA compilation of) (\S+) "
                   r"(?:for jit )?in ([0-9.e+-]+) sec")
_PHASE = {"tracing": "trace_s", "jaxpr": "lower_s", "XLA": "compile_s"}
_CACHE_READ = "/jax/compilation_cache/cache_retrieval_time_sec"


class CompileLog(logging.Handler):
    """Collects JAX's compile log while entered (jax_log_compiles on; restored on exit)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.programs = collections.defaultdict(lambda: collections.defaultdict(float))
        self.cache_read_s = 0.0
        self._on = False
        jax.monitoring.register_event_duration_secs_listener(self._duration)

    def _duration(self, event: str, seconds: float, **_) -> None:
        if self._on and event == _CACHE_READ:
            self.cache_read_s += seconds

    def emit(self, record: logging.LogRecord) -> None:
        m = _LINE.search(record.getMessage())
        if self._on and m:
            name = re.sub(r"^jit\((.*)\)$", r"\1", m.group(2))  # "jit(f)" (lowering, XLA) and "f" (tracing)
            self.programs[name][_PHASE[m.group(1).split()[0]]] += float(m.group(3))

    def __enter__(self) -> "CompileLog":
        self._was = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        logging.getLogger("jax").addHandler(self)
        self._on = True
        return self

    def __exit__(self, *exc) -> None:
        self._on = False
        logging.getLogger("jax").removeHandler(self)
        jax.config.update("jax_log_compiles", self._was)

    def around(self, run):
        """run() with its compile log collected here."""
        def call():
            with self:
                return run()
        return call

    def summary(self, top: int = 4) -> dict:
        """Seconds by phase over all programs, and the `top` programs by total seconds."""
        total = {phase: round(sum(p[phase] for p in self.programs.values()), 2) for phase in _PHASE.values()}
        ranked = sorted(self.programs.items(), key=lambda kv: -sum(kv[1].values()))[:top]
        return dict(total, cache_read_s=round(self.cache_read_s, 2), programs_built=len(self.programs),
                    top={name: {k: round(v, 2) for k, v in p.items()} for name, p in ranked})

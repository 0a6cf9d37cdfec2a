"""JAX's persistent compilation cache, on by default: a second run of the same config does not recompile.

    enable("~/.cache/rlsoft/jax")     # what the driver does with --compile_cache (the default)
    enable("")                        # --compile_cache= : off (nothing read or written)
    counts = CompileCounter()         # hits / misses of the persistent cache seen since it was made

XLA compiles every jitted program on its first call; for the small models of a laptop run that is
most of the start-up (a Countdown smoke run compiles the sampler, the warm-start and RL updates and
the eval sampler). JAX can store compiled executables on disk, keyed by the program, its shardings,
the backend and the jax/jaxlib versions, and load them in a later process (jax's
`jax_compilation_cache_dir`; the cache is safe to share between runs and to delete). By default JAX
stores only programs that took >= 1 s to compile; here every program is stored, since a start-up is
many sub-second compiles.

`compile_ahead(lowered)` compiles a run's programs at once, one thread each: XLA's compiler releases
Python's GIL, so a start-up that compiles the warm-start update, the RL update and two samplers
one after another (as their first calls would) pays for the longest rather than the sum where
cores are free. JAX keeps each executable in its in-memory cache (and in the persistent one), so
the later calls with the same argument types find it and compile nothing.
"""
from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Optional, Sequence

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rlsoft", "jax")
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}


def enable(path: Optional[str]) -> Optional[str]:
    """Point JAX's persistent compilation cache at `path` (created; "~" expanded), or turn it off for
    an empty `path`. Returns the directory in use (None: off). JAX opens its cache once per process,
    at the first compile; a changed setting drops the open one (jax's public `reset_cache`), so the
    latest call wins for the programs compiled after it."""
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(path)) if path else None
    if path:
        os.makedirs(path, exist_ok=True)
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != (path is not None, path):
        jax.config.update("jax_enable_compilation_cache", path is not None)
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
    # JAX's default stores only programs that took >= 1 s to compile; a start-up is many shorter ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileCounter:
    """Counts JAX's persistent-cache events from its monitoring hooks (jax.monitoring) while alive in
    this process: `hits` (a program loaded from disk) and `misses` (compiled, then stored)."""

    def __init__(self):
        self.hits = self.misses = 0
        self._on = True
        jax.monitoring.register_event_listener(self._event)

    def _event(self, event: str, **_) -> None:
        name = _EVENTS.get(event)
        if self._on and name:
            setattr(self, name, getattr(self, name) + 1)

    def stop(self) -> "CompileCounter":
        self._on = False
        return self


def compile_ahead(lowered: Sequence[Any], max_workers: Optional[int] = None) -> list[float]:
    """Compile `lowered` (jax.stages.Lowered, e.g. `jitted.lower(*args)`) concurrently, one thread
    per program up to `max_workers` (default: the CPU count). Returns each program's wall seconds.
    The compiled programs are the ones the jitted functions' calls with the same arguments use."""

    def compile_one(low) -> float:
        start = time.perf_counter()
        low.compile()
        return time.perf_counter() - start

    if not lowered:
        return []
    workers = max(1, min(len(lowered), max_workers or os.cpu_count() or 1))
    if workers == 1:
        return [compile_one(low) for low in lowered]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
        return list(pool.map(compile_one, lowered))

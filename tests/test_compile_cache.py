"""The persistent compilation cache: a second process with the same config loads every program.

Each run is a fresh Python process (the cache is what survives between them), counted with JAX's own
monitoring events (rlsoft.compile_cache.CompileCounter)."""
import os

import pytest

from benchmarks.startup import run_counted
from rlsoft import compile_cache


@pytest.mark.slow  # three smoke runs of Countdown, each a fresh process: ~1 min on 2 cores
def test_a_second_countdown_process_compiles_nothing(tmp_path):
    cache = tmp_path / "jax"
    flags = ["--preset=smoke", f"--cache_dir={tmp_path / 'spm'}", f"--compile_cache={cache}"]
    cold = run_counted("countdown", flags)
    warm = run_counted("countdown", flags)
    assert cold["misses"] > 0 and cold["hits"] == 0, cold
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"], (cold, warm)
    # Off: nothing read, nothing written.
    off = run_counted("countdown", flags[:-1] + ["--compile_cache="])
    assert off["hits"] == off["misses"] == 0, off


def test_enable_moves_and_disables_the_cache(tmp_path):
    import jax
    import jax.numpy as jnp

    counter = compile_cache.CompileCounter()
    try:
        first = compile_cache.enable(str(tmp_path / "a"))
        assert first == str(tmp_path / "a") and os.path.isdir(first)
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
        assert counter.misses >= 1 and os.listdir(first)
        # The same program from a new jit object (the in-memory cache misses): loaded from disk.
        hits = counter.hits
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
        assert counter.hits == hits + 1
        # Moved: a new, empty directory compiles again.
        second = compile_cache.enable(str(tmp_path / "b"))
        misses = counter.misses
        jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
        assert counter.misses == misses + 1 and os.listdir(second)
        # Off: no events at all.
        assert compile_cache.enable("") is None
        seen = (counter.hits, counter.misses)
        jax.jit(lambda x: x * 5 - 2)(jnp.arange(5.0)).block_until_ready()
        assert (counter.hits, counter.misses) == seen
    finally:
        counter.stop()
        compile_cache.enable("")


def test_an_unwritable_cache_is_one_line_and_exit_2(tmp_path, capsys):
    from experiments import countdown

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as e:
        countdown.main(["--preset=smoke", f"--compile_cache={blocker / 'jax'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile_cache" in err[0], err

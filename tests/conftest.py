"""Shared test fixtures."""
import contextlib

import jax
import pytest

# jax's public monitoring event for one XLA compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _compiles():
    """Collects one entry per XLA compilation inside the block (jax.monitoring, a public API)."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            seen.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def count_compiles():
    """`with count_compiles() as seen: ...` then `assert seen == []`: nothing compiled in the block."""
    return _compiles

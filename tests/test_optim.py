"""rlsoft.optim's non-finite guard is optax.apply_if_finite, also when the caller passes the verdict."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlsoft import optim


def _grads():
    """Finite, NaN and inf gradients (three in a row, past max_consecutive_errors=2), then finite."""
    rng = np.random.default_rng(0)
    out = []
    for bad in (None, np.nan, None, np.inf, np.nan, -np.inf, None, np.nan):
        g = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
        if bad is not None:
            g["b"][2] = bad
        out.append(jax.tree.map(jnp.asarray, g))
    return out


@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))])
@pytest.mark.parametrize("pass_verdict", [False, True])
def test_apply_if_finite_is_optax_apply_if_finite(inner, pass_verdict):
    ref, ours = optax.apply_if_finite(inner, 2), optim.apply_if_finite(inner, 2)
    params = {"a": jnp.ones((3, 4)), "b": jnp.zeros((5,))}
    s_ref, s_ours = ref.init(params), ours.init(params)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_ours)
    for g in _grads():
        u_ref, s_ref = ref.update(g, s_ref, params)
        verdict = {"all_finite": all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))} if pass_verdict else {}
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params, **verdict)
        for x, y in zip(jax.tree.leaves((u_ref, s_ref)), jax.tree.leaves((u_ours, s_ours))):
            np.testing.assert_array_equal(x, y)
        params = optax.apply_updates(params, u_ours)
    assert int(optim.skipped_updates(s_ours)) == 5


def test_make_optimizer_counts_skipped_updates():
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=0.1))
    params = jnp.ones((4,))
    state = tx.init(params)
    _, state = tx.update(jnp.array([1.0, jnp.nan, 0.0, 0.0]), state, params)
    updates, state = tx.update(jnp.ones((4,)), state, params)
    assert int(optim.skipped_updates(state)) == 1 and bool(jnp.all(updates != 0))

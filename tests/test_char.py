"""The char testbed: the regularised exhaustive loop and the experiment end to end."""
import dataclasses
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import char as char_exp
from rlsoft import exhaustive, exhaustive_loop as xl, monitors

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
V, C, B = 7, 3, 5


def _task(kl=False):
    def logits_fn(params, contexts):
        return params["table"][contexts[:, -1]] + params["bias"]

    def batch_fn(key):  # the next token is a function of the last one, so there is something to learn
        ctx = jax.random.randint(key, (B, C), 0, V)
        return ctx, (ctx[:, -1] * 3 + 1) % V

    def reward_fn(contexts, targets, probs):
        return jax.nn.one_hot(targets, V) + 0.1 * jnp.cos(contexts[:, -1:] + jnp.arange(V))

    ref = (lambda contexts: jax.nn.log_softmax(jnp.sin(contexts[:, -1:] * 1.0 + jnp.arange(V)))) if kl else None
    return xl.Task(logits_fn, batch_fn, reward_fn, ref)


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"table": jax.random.normal(k1, (V, V)), "bias": jax.random.normal(k2, (V,))}


@pytest.mark.parametrize("mixing", ["pi", "uniform"])
def test_clipped_objective_has_the_exhaustive_gradient_at_the_lagged_policy(mixing):
    logits = jax.random.normal(jax.random.PRNGKey(1), (V,))
    w = jax.random.normal(jax.random.PRNGKey(2), (V,))
    g_clip = jax.grad(lambda z: xl.clipped_objective(z, logits, w, mixing, 0.2))(logits)
    g_ex = jax.grad(lambda z: exhaustive.exhaustive_objective(z, w, mixing))(logits)
    np.testing.assert_allclose(g_clip, g_ex, rtol=1e-5, atol=1e-7)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    lag = jnp.zeros((V,))
    logits = lag.at[0].set(2.0)  # pi(0) / pi_lag(0) >> 1.2
    w = jnp.zeros((V,)).at[0].set(1.0)
    g = jax.grad(lambda z: xl.clipped_objective(z, lag, w, "uniform", 0.2))(logits)
    np.testing.assert_allclose(g, 0.0, atol=1e-7)


def test_chunk_equals_step_by_step_and_does_not_recompile():
    cfg = xl.ExhaustiveConfig(scheme="softmax", tau=0.5, learning_rate=0.05, lag_every=2, kl_coef=0.1,
                              entropy_coef=0.01)
    mcfg = monitors.MonitorConfig(window=4, min_steps=1)
    task = _task(kl=True)
    key = jax.random.PRNGKey(7)
    run = xl.make_train_chunk(task, cfg, mcfg, chunk=5)
    state, metrics = run(xl.init_state(_params(), cfg, mcfg), key)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, k):
        return xl.train_step(s, k, task=task, cfg=cfg, monitor_cfg=mcfg)

    ref = xl.init_state(_params(), cfg, mcfg)
    for t in range(5):
        ref, m = step(ref, jax.random.fold_in(key, t))
        np.testing.assert_allclose(metrics["loss"][t], m["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["kl_ref"][t], m["kl_ref"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    state, _ = run(state, key)
    assert run._cache_size() == 1 and int(state.step) == 10
    # lag_every=2: after 10 steps the lagged policy equals the current one.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.lag_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["exhaustive", "sampled"])
def test_training_raises_the_expected_reward(mode):
    cfg = xl.ExhaustiveConfig(scheme="softmax", tau=0.3, mode=mode, mixing="pi", learning_rate=0.1,
                              clip_eps=0.0)
    mcfg = monitors.MonitorConfig()
    run = xl.make_train_chunk(_task(), cfg, mcfg, chunk=60)
    _, metrics = run(xl.init_state(_params(), cfg, mcfg), jax.random.PRNGKey(3))
    r = np.asarray(metrics["expected_reward"])
    assert r[-10:].mean() > r[:10].mean() + 0.1


@pytest.mark.parametrize("field,value", [("mode", "greedy"), ("mixing", "beta"), ("clip_eps", 1.5),
                                         ("lag_every", 0), ("scheme", "nope"), ("tau", 0.0)])
def test_invalid_config(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(xl.ExhaustiveConfig(), **{field: value})


@pytest.mark.skipif(not TEXT.exists(), reason="shared tinyshakespeare file absent")
def test_experiment_smoke(tmp_path, capsys):
    result = char_exp.main(["--preset=smoke", f"--text_file={TEXT}", f"--logdir={tmp_path}", "--kl_coef=0.05",
                            "--entropy_coef=0.01"])
    out = capsys.readouterr().out
    assert "n-gram reference" in out and "char GPT, RL" in out and "sample:" in out
    assert np.isfinite(result["final"]["eval/cross_entropy"])
    assert len(result["sample"]) == 40
    assert [h["step"] for h in result["history"]] == [10, 20]
    from rlsoft.logger import read_scalars

    tags = read_scalars(str(tmp_path))
    for tag in ("loss", "entropy", "kl_ref", "weights/effective_n", "health/calibration_error",
                "health/collapse_share", "health/grad_norm_var", "eval/top1", "eval/cross_entropy"):
        assert tag in tags, tag


@pytest.mark.parametrize("flag", ["--scheme=nope", "--mode=x", "--context=0", "--text_file=/nonexistent/file.txt",
                                  "--bogus=1"])
def test_bad_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as e:
        char_exp.main(["--preset=smoke", flag])
    assert e.value.code == 2 or "error" in str(e.value.code)
    err = capsys.readouterr().err.strip().splitlines()
    msg = err[-1] if err else str(e.value.code)
    assert "error" in msg and len(err) <= 1

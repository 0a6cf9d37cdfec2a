"""The sparse-bandit testbed: compiled sweep == step-by-step replay, no recompiles, env."""
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import bandit as bandit_env
from experiments import bandit as bandit_exp
from rlsoft import bandit_sweep, optim, sampling, weighting
from tensorboard_events import read_scalars

K, S, T, G = 20, 3, 15, 8


def _setup(num_paying=1, noise_std=0.0):
    streams = jax.vmap(lambda k: jax.random.split(k, 2))(jax.random.split(jax.random.PRNGKey(3), S))
    envs = bandit_env.make_bandits(streams[:, 0], K, num_paying, 1.0, noise_std)
    return envs, streams[:, 1]


def test_make_bandit_pays_exactly_the_chosen_arms():
    b = bandit_env.make_bandit(jax.random.PRNGKey(0), 50, num_paying=3)
    assert b.payouts.shape == (50,)
    assert int(jnp.sum(b.payouts == 1.0)) == 3 and int(jnp.sum(b.payouts == 0.0)) == 47
    arms = jnp.arange(50)
    np.testing.assert_array_equal(bandit_env.pull(b, jax.random.PRNGKey(1), arms), b.payouts)


def test_noiseless_pull_equals_pull_without_noise():
    b = bandit_env.make_bandit(jax.random.PRNGKey(0), 30, num_paying=2)
    arms = jnp.arange(30)
    np.testing.assert_array_equal(bandit_env.pull_noiseless(b, jax.random.PRNGKey(1), arms),
                                  bandit_env.pull(b, jax.random.PRNGKey(1), arms))
    assert bandit_env.reward_fn_for(0.0) is bandit_env.pull_noiseless
    assert bandit_env.reward_fn_for(0.1) is bandit_env.pull


def test_noisy_pull_has_the_requested_noise():
    b = bandit_env.make_bandit(jax.random.PRNGKey(0), 10, noise_std=0.5)
    arms = jnp.zeros((20000,), jnp.int32)
    r = bandit_env.pull(b, jax.random.PRNGKey(1), arms)
    assert abs(float(jnp.mean(r)) - float(b.payouts[0])) < 0.02
    assert abs(float(jnp.std(r)) - 0.5) < 0.02


@pytest.mark.parametrize("kwargs", [dict(num_arms=1), dict(num_arms=5, num_paying=5), dict(num_arms=5, noise_std=-1.0)])
def test_make_bandit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        bandit_env.make_bandit(jax.random.PRNGKey(0), **kwargs)


def test_gradient_is_the_weighted_score_function():
    logits = jnp.array([0.3, -0.2, 1.0, 0.0])
    actions = jnp.array([0, 2, 2, 3])
    w = jnp.array([1.5, -0.5, 0.25, 2.0])
    grad = jax.grad(bandit_sweep.weighted_nll)(logits, actions, w)
    pi = np.asarray(jax.nn.softmax(logits))
    expected = -sum(float(w[i]) * (np.eye(4)[int(actions[i])] - pi) for i in range(4)) / 4
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
    closed_form = bandit_sweep.weighted_nll_grad(jnp.asarray(pi), actions, w)
    np.testing.assert_allclose(closed_form, expected, rtol=1e-6, atol=1e-7)


def test_make_hparams_has_one_tau_free_entry_per_lr():
    hps = bandit_sweep.make_hparams(["linear", "softmax"], (0.25, 0.5), (1.0, 3.0))
    assert hps.scheme_index.shape == (2 + 4,)
    names = [weighting.SCHEME_NAMES[int(i)] for i in hps.scheme_index]
    assert names.count("linear") == 2 and names.count("softmax") == 4


# Adam is replayed only with schemes whose weights do not sum to zero: for a zero-sum scheme the
# gradient on unsampled arms is -(sum w) pi / G, pure float rounding, and Adam divides it by its
# own RMS, so the run follows the rounding noise (vmapped and unbatched code round differently).
@pytest.mark.parametrize("optimizer,schemes", [("sgd", ["linear", "softmax", "quantile"]),
                                               ("adam", ["softmax", "best_of_n", "raw"])])
def test_compiled_sweep_equals_step_by_step_replay(optimizer, schemes):
    envs, policy_keys = _setup(noise_std=0.1)
    hps = bandit_sweep.make_hparams(schemes, (0.5,), (1.0, 3.0))
    chex.clear_trace_counter()  # the counter is keyed by code, shared across parametrizations
    kw = dict(reward_fn=bandit_env.pull, values_fn=bandit_env.arm_values, group_size=G, optimizer=optimizer)
    swept = bandit_sweep.sweep(hps, envs, policy_keys, num_actions=K, num_steps=T, **kw)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(hp, env, state, key):
        state, record = bandit_sweep.policy_step(hp, env, state, key, **kw)
        return state, bandit_sweep.step_metrics(record, env, bandit_env.arm_values)

    for c in range(hps.scheme_index.shape[0]):
        hp = jax.tree.map(lambda x: x[c], hps)
        for s in range(S):
            env = jax.tree.map(lambda x: x[s], envs)
            state = bandit_sweep.init_state(K, optimizer)
            for t in range(T):
                state, m = step(hp, env, state, jax.random.fold_in(policy_keys[s], t))
                for name, value in m.items():
                    np.testing.assert_allclose(
                        swept[name][c, s, t], value, rtol=1e-5, atol=1e-5, err_msg=f"{name} c={c} s={s} t={t}")
                # The sweep rebuilds the optimizer's running count after its scan: it must be the count.
                assert swept["train/skipped_updates"][c, s, t] == optim.skipped_updates(state.opt_state)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_non_finite_updates_are_skipped_and_counted(optimizer):
    # Raw weights are the rewards. Seed 0: every arm pays 3e38, so sum(w) overflows and every
    # gradient is inf/NaN: each update is skipped (logits stay uniform) and counted, grad_norm NaN.
    # Seed 1: every arm pays 3e20, finite gradients whose squares overflow (grad_norm inf): applied.
    # Seed 2: an ordinary bandit. Checked against a replay that asks isfinite of every gradient entry.
    payouts = jnp.zeros((S, K)).at[0].set(3e38).at[1].set(3e20).at[2, 3].set(1.0)
    envs, keys = bandit_env.Bandit(payouts, jnp.zeros((S,))), _setup()[1]
    hps = bandit_sweep.make_hparams(["raw"], (), (1.0,))
    kw = dict(reward_fn=bandit_env.pull, values_fn=bandit_env.arm_values, group_size=G, optimizer=optimizer)
    m = jax.tree.map(np.asarray, bandit_sweep.sweep(hps, envs, keys, num_actions=K, num_steps=T, **kw))
    hp = jax.tree.map(lambda x: x[0], hps)

    @jax.jit
    def replay(env, state, key):  # the step, and whether any entry of its gradient is not finite
        uniforms, reward_key = bandit_sweep.step_randomness(key, G)
        actions = sampling.inverse_cdf(uniforms, state.logits[None])[0]
        w = weighting.compute_weights_by_index(bandit_env.pull(env, reward_key, actions), hp.scheme_index, hp.tau)
        grads = bandit_sweep.weighted_nll_grad(jax.nn.softmax(state.logits), actions, w)
        return bandit_sweep.policy_step(hp, env, state, key, **kw)[0], ~jnp.all(jnp.isfinite(grads))

    for s in range(S):
        env, state, skipped = jax.tree.map(lambda x: x[s], envs), bandit_sweep.init_state(K, optimizer), 0
        for t in range(T):
            before = state.logits
            state, not_finite = replay(env, state, jax.random.fold_in(keys[s], t))
            skipped += int(not_finite)
            assert m["train/skipped_updates"][0, s, t] == skipped == optim.skipped_updates(state.opt_state)
            if s == 0:
                np.testing.assert_array_equal(state.logits, before)
    assert (m["train/skipped_updates"][0, 0] == np.arange(1, T + 1)).all()
    assert np.isnan(m["train/grad_norm"][0, 0]).all()
    assert (m["train/skipped_updates"][0, 1:] == 0).all() and np.isinf(m["train/grad_norm"][0, 1, 0])
    assert np.isfinite(m["train/grad_norm"][0, 2]).all()


def test_grads_all_finite_is_isfinite_of_every_entry():
    # The verdict reads only the sampled entries; it must agree with all K entries on any input:
    # NaN / +-inf logits, NaN / +-inf weights, weights whose sum or scatter overflows.
    rng = np.random.default_rng(0)
    specials = [np.nan, np.inf, -np.inf, 3e38, -3e38, 1e38, 1e20, 0.0]
    check = jax.jit(lambda z, a, w: (bandit_sweep.grads_all_finite(
        g := bandit_sweep.weighted_nll_grad(jax.nn.softmax(z), a, w), a), jnp.all(jnp.isfinite(g))))
    seen = set()
    for trial in range(600):
        k = int(rng.choice([2, 5, 20]))
        z = rng.normal(size=k).astype(np.float32) * 3
        w = rng.normal(size=G).astype(np.float32)
        if trial % 3:
            z[rng.integers(k, size=rng.integers(0, 2))] = rng.choice(specials[:3] + [-np.inf, -np.inf])
        if trial % 2:
            w[rng.integers(G, size=rng.integers(1, 4))] = rng.choice(specials)
        a = rng.integers(k, size=G).astype(np.int32)
        verdict, truth = map(bool, check(z, a, w))
        assert verdict == truth, (z, a, w)
        seen.add((bool(np.isfinite(z).all() and np.isfinite(w).all()), truth))
    # (inputs finite, gradient finite): (True, False) is an overflow, (False, True) a -inf logit.
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


def test_metrics_mask_rewards_unless_every_reward_is_finite():
    # The sweep checks all its rewards once. All finite: its metrics skip the non-finite masking,
    # which must change no value. Arm 0 paying NaN: they mask (nonfinite_rewards counts the NaNs).
    envs, keys = _setup(noise_std=0.1)
    hps = bandit_sweep.make_hparams(["softmax"], (0.5,), (1.0,))
    kw = dict(num_actions=K, num_steps=T, values_fn=bandit_env.arm_values, group_size=G, optimizer="sgd")
    nan_arm0 = lambda env, key, a: jnp.where(a == 0, jnp.nan, bandit_env.pull(env, key, a))  # noqa: E731
    for reward_fn in (bandit_env.pull, nan_arm0):
        run = functools.partial(bandit_sweep.run, reward_fn=reward_fn, **kw)
        records = jax.vmap(run, in_axes=(None, 0, 0))(jax.tree.map(lambda x: x[0], hps), envs, keys)
        metrics = jax.jit(jax.vmap(bandit_sweep.run_metrics, in_axes=(0, 0, None, None)), static_argnums=(2, 3))
        masked = metrics(records, envs, bandit_env.arm_values, False)
        if reward_fn is bandit_env.pull:
            fast = metrics(records, envs, bandit_env.arm_values, True)
            for name in masked:
                np.testing.assert_array_equal(fast[name], masked[name], err_msg=name)
        swept = bandit_sweep.sweep(hps, envs, keys, reward_fn=reward_fn, **kw)
        for name in masked:
            np.testing.assert_allclose(swept[name][0], masked[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.asarray(swept["train/weights/nonfinite_rewards"]).sum() > 0


def test_sweep_does_not_recompile_for_new_values(count_compiles):
    envs, policy_keys = _setup()
    kw = dict(num_actions=K, num_steps=T, reward_fn=bandit_env.pull, values_fn=bandit_env.arm_values,
              group_size=G, optimizer="sgd")
    hps = bandit_sweep.make_hparams(["linear", "softmax"], (0.5,), (1.0,))
    jax.block_until_ready(bandit_sweep.sweep(hps, envs, policy_keys, **kw))
    # New schemes, temperature, learning rate, tasks and keys: values, not shapes.
    hps2 = bandit_sweep.make_hparams(["rank", "softmax_centered"], (0.25,), (2.0,))
    envs2, keys2 = jax.block_until_ready(jax.tree.map(lambda x: x[::-1], (envs, policy_keys)))
    with count_compiles() as seen:
        jax.block_until_ready(bandit_sweep.sweep(hps2, envs2, keys2, **kw))
    assert seen == []


def test_sparse_bandit_is_learned():
    envs, policy_keys = _setup()
    hps = bandit_sweep.make_hparams(["linear", "softmax"], (0.5,), (3.0,))
    m = bandit_sweep.sweep(hps, envs, policy_keys, num_actions=K, num_steps=60, reward_fn=bandit_env.pull,
                          values_fn=bandit_env.arm_values, group_size=G, optimizer="sgd")
    p = np.asarray(m["eval/p_best"])
    np.testing.assert_allclose(p[:, :, 0], 1.0 / K, rtol=1e-5)  # uniform start
    assert (p[:, :, -1] > 0.5).all(), p[:, :, -1]


def test_logged_curves_reduce_the_seeds_as_a_batch_of_groups():
    envs, policy_keys = _setup()
    hps = bandit_sweep.make_hparams(["linear", "softmax"], (0.5,), (3.0,))
    m = jax.tree.map(np.asarray, bandit_sweep.sweep(
        hps, envs, policy_keys, num_actions=K, num_steps=T, reward_fn=bandit_env.pull,
        values_fn=bandit_env.arm_values, group_size=G, optimizer="sgd"))
    curves = jax.tree.map(np.asarray, bandit_sweep.logged_curves(m))
    assert {"eval/p_best", "train/reward", "train/loss", "train/grad_norm", "train/skipped_updates",
            "train/frac_reward_zero_std", "train/weights/effective_n"} <= set(curves)
    for name, v in curves.items():
        assert v.shape == (2, T), name
    np.testing.assert_allclose(curves["eval/p_best"], m["eval/p_best"].mean(axis=1), rtol=1e-6)
    informative = m["train/weights/zero_std"] == 0  # [C,S,T]
    assert informative.any() and not informative.all()
    eff = np.where(informative, m["train/weights/effective_n"], 0.0).sum(1) / np.maximum(informative.sum(1), 1)
    np.testing.assert_allclose(curves["train/weights/effective_n"], eff, rtol=1e-6)
    np.testing.assert_allclose(curves["train/frac_reward_zero_std"], 1.0 - informative.mean(1), rtol=1e-6)


def test_first_step():
    mask = jnp.array([[False, True, True], [False, False, False], [True, False, False]])
    np.testing.assert_array_equal(bandit_sweep.first_step(mask), [1, 3, 0])


def test_experiment_smoke(tmp_path, capsys):
    out = tmp_path / "bandit"
    result = bandit_exp.main(["--preset=tiny", "--steps=30", "--seeds=4", f"--out={out}"])
    assert (out / "bandit.md").exists() and (out / "bandit.png").exists()
    assert len(result["rows"]) == 4 * 2  # (linear + 3 softmax taus) x 2 lrs
    assert {r["label"] for r in result["tuned"]} == {"linear", "softmax tau=0.25", "softmax tau=0.5", "softmax tau=1"}
    runs = sorted(os.listdir(out / "tb"))
    assert len(runs) == 8
    scalars = read_scalars(str(out / "tb" / runs[0]))
    # The names every testbed logs (README, "Metric names").
    assert {"eval/p_best", "train/reward", "train/success", "train/loss", "train/grad_norm", "train/skipped_updates",
            "train/frac_reward_zero_std", "train/weights/effective_n", "train/weights/max_weight"} <= set(scalars)
    assert len(scalars["eval/p_best"]) == 30 // 5
    assert "one compiled call" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [
    "--arms=1", "--taus=0", "--schemes=nope", "--ref_lr=7", "--bogus=1", "--seeds=x",
    # every numeric field's domain: NaN, infinities, negatives, zero where it must be positive
    "--taus=nan", "--taus=inf", "--taus=0.5,-inf", "--lrs=nan", "--lrs=inf", "--lrs=-1", "--ref_lr=nan",
    "--ref_lr=inf", "--noise_std=nan", "--noise_std=inf", "--noise_std=-0.1", "--seeds=0", "--arms=-5",
    "--paying_arms=0", "--paying_arms=1000", "--group_size=1", "--steps=0", "--log_every=0", "--seed=-1",
    "--seed=99999999999999999999", "--out=",
])
def test_experiment_bad_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bandit_exp.main([flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    assert flag[2:].split("=")[0].rstrip("s") in err[0], err  # the line names the flag

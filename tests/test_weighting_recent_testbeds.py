"""The 2025-26 schemes (rlsoft.weighting_recent) in the testbeds: the bandit (exact log-probs of
the drawn arms), the language-model trainer (sequence log-probs of the rollout policy and the
reference), and one-line config errors (exit code 2) where a testbed cannot supply log-probs."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import bandit as bandit_env
from experiments import bandit as bandit_exp
from experiments import char as char_exp
from experiments import countdown as countdown_exp
from experiments import think as think_exp
from rlsoft import bandit_sweep, optim, trainer, weighting, weighting_recent
from rlsoft.config import parse_flags

RECENT = weighting_recent.SCHEMES
K, S, T, G = 20, 3, 15, 8


def test_bandit_experiment_smoke_with_each_new_scheme(tmp_path):
    out = tmp_path / "bandit"
    result = bandit_exp.main(["--preset=tiny", "--steps=40", "--seeds=4", "--lrs=3", "--ref_lr=3", "--taus=0.5",
                              f"--schemes={','.join(RECENT)}", "--tensorboard=false", "--plot=false", f"--out={out}"])
    assert (out / "bandit.md").exists()
    rows = {r["scheme"]: r for r in result["rows"]}
    assert set(rows) == set(RECENT)
    p_best = result["metrics"]["eval/p_best"]  # [C, S, T]
    assert np.all(np.isfinite(p_best)) and np.all(result["metrics"]["train/skipped_updates"] == 0)
    np.testing.assert_allclose(p_best[:, :, 0], 1 / 50, rtol=1e-5)  # uniform start over the 50 arms
    for name, r in rows.items():  # every scheme moves probability onto the paying arm
        assert r["p_best_final"] > 2 / 50, (name, r)


@pytest.mark.parametrize("flags", [["--schemes=softmax_ess", "--taus=0.5,2"], ["--schemes=linear,softmax_ess",
                                                                              "--taus=1.5"]])
def test_bandit_softmax_ess_taus_are_fractions(flags, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bandit_exp.main(flags + [f"--out={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "tau" in err[0] and "fraction" in err[0], err


def _bandit_setup():
    streams = jax.vmap(lambda k: jax.random.split(k, 2))(jax.random.split(jax.random.PRNGKey(3), S))
    return bandit_env.make_bandits(streams[:, 0], K, 2, 1.0, 0.1), streams[:, 1]


def test_bandit_step_weights_with_the_log_probs_of_the_drawn_arms():
    envs, keys = _bandit_setup()
    env = jax.tree.map(lambda x: x[0], envs)
    logits = jnp.linspace(-1.0, 1.0, K)
    state = bandit_sweep.PolicyState(logits, bandit_sweep.make_optimizer("sgd").init(logits))
    kw = dict(reward_fn=bandit_env.pull, values_fn=bandit_env.arm_values, group_size=G, optimizer="sgd")
    for s in RECENT:
        hp = jax.tree.map(lambda x: x[0], bandit_sweep.make_hparams([s], (0.5,), (1.0,)))
        _, rec = jax.jit(lambda h, st, k: bandit_sweep.policy_step(h, env, st, k, **kw))(hp, state, keys[0])
        logp = np.asarray(jax.nn.log_softmax(logits))[np.asarray(rec["actions"])]
        np.testing.assert_allclose(rec["logp_actions"], logp, rtol=1e-6, atol=1e-6)
        expected = weighting.compute_weights(rec["rewards"], s, tau=0.5, logp=logp)
        np.testing.assert_allclose(rec["weights"], expected, rtol=1e-6, atol=1e-6, err_msg=s)


def test_bandit_sweep_compiles_only_the_grid_schemes_with_the_same_result():
    envs, keys = _bandit_setup()
    hps = bandit_sweep.make_hparams(["linear", "gvpo", "softmax_ess"], (0.5,), (1.0,))
    assert bandit_sweep.schemes_in(hps) == ("linear", "softmax_ess", "gvpo")
    kw = dict(num_actions=K, num_steps=T, reward_fn=bandit_env.pull, values_fn=bandit_env.arm_values, group_size=G,
              optimizer="sgd")
    every = bandit_sweep.sweep(hps, envs, keys, **kw)
    only = bandit_sweep.sweep(hps, envs, keys, schemes=bandit_sweep.schemes_in(hps), **kw)
    for name in ("eval/p_best", "train/loss", "train/weights/effective_n"):
        np.testing.assert_allclose(only[name], every[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.all(np.isfinite(np.asarray(every["eval/p_best"])))


# --------------------------------------------------------------------------------------------
# The language-model trainer on a toy bigram "model" (as tests/test_trainer.py).

V, P, N, Q, GL = 11, 3, 4, 4, 3


def forward(params, tokens, positions, mask):
    del mask
    return params["table"][tokens] + params["pos"][positions][..., None]


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"table": jax.random.normal(k1, (V, V)), "pos": 0.1 * jax.random.normal(k2, (P + N,))}


def _batch():
    rng = np.random.default_rng(0)
    b = Q * GL
    prompts = rng.integers(1, V, (b, P)).astype(np.int32)
    pmask = np.ones((b, P), bool)
    resp = rng.integers(1, V, (b, N)).astype(np.int32)
    rmask = np.ones((b, N), bool)
    rmask[1::3, 2:] = False  # some rows stop early
    rewards = rng.choice([0.0, 0.1, 1.1], size=(Q, GL)).astype(np.float32)
    rewards[0] = [0.0, 1.0, 0.5]  # at least one informative group
    sl = rng.integers(1, V, (Q, N)).astype(np.int32)
    return trainer.Batch(prompts, pmask, resp, rmask, rewards, np.float32(0.5), sl, prompts[::GL], pmask[::GL],
                         np.zeros((Q, N), bool))


@pytest.mark.parametrize("scheme,kl_coef,ppo_epochs", [("tpo", 0.0, 1), ("gvpo", 0.0, 1), ("gvpo", 0.1, 1),
                                                       ("tpo", 0.0, 2)])
def test_trainer_weights_with_rollout_sequence_log_probs(scheme, kl_coef, ppo_epochs):
    cfg = trainer.UpdateConfig(scheme=scheme, tau=0.5, clip_eps=0.0, kl_coef=kl_coef, ppo_epochs=ppo_epochs,
                               policy=optim.OptimizerConfig(learning_rate=1e-2))
    batch = _batch()
    update, _ = trainer.make_update(forward, cfg)
    _, metrics = update(trainer.init_state(_params(), cfg), batch)
    tok, _ = trainer.response_log_probs(trainer.response_logits_from_forward(forward), _params(), batch.prompts,
                                        batch.prompt_mask, batch.responses, batch.response_mask)
    tok = np.asarray(tok, np.float64) * batch.response_mask
    seq = tok.sum(-1).reshape(Q, GL)
    if kl_coef > 0:  # the reference is the starting policy: l = log pi_old - log pi_ref = 0, Dr. GRPO
        w = np.asarray(weighting.compute_weights(batch.rewards, "drgrpo"))
    else:
        w = np.asarray(weighting.compute_weights(batch.rewards, scheme, tau=0.5, logp=seq.astype(np.float32)))
    assert np.abs(w).max() > 0.1
    if ppo_epochs == 1:  # the loss of the (only) epoch: the weighted token loss, token mean
        expected = -np.sum(w.reshape(-1)[:, None] * tok) / batch.response_mask.sum()
        np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)
    # Every epoch weights with the rollout's log-probs: the logged weight statistics are those of w.
    logged = weighting.summarize_weight_stats(weighting.weight_stats(jnp.asarray(w), batch.rewards))
    for k in ("max_weight", "effective_n"):
        np.testing.assert_allclose(metrics[f"train/weights/{k}"], logged[k], rtol=1e-5, err_msg=k)


def test_trainer_and_countdown_configs():
    for kwargs in (dict(scheme="softmax_ess", tau=1.5), dict(scheme="softmax_ess", tau="auto")):
        with pytest.raises(ValueError, match="fraction"):
            trainer.UpdateConfig(**kwargs)
    assert trainer.UpdateConfig(scheme="softmax_ess", tau=0.25).tau == 0.25
    with pytest.raises(SystemExit) as e:  # a scheduled tau must end inside (0, 1] too
        parse_flags(countdown_exp.CountdownConfig, ["--scheme=softmax_ess", "--tau=0.5", "--tau_end=2"], prog="x")
    assert e.value.code == 2
    cfg = parse_flags(countdown_exp.CountdownConfig, ["--scheme=gvpo", "--tau=0.1", "--kl_coef=0.05"], prog="x")
    assert cfg.scheme == "gvpo" and math.isclose(cfg.tau, 0.1)


@pytest.mark.parametrize("config", [char_exp.CharConfig, think_exp.ThinkExperimentConfig])
@pytest.mark.parametrize("scheme", ["gvpo", "tpo"])
def test_testbeds_without_log_probs_refuse_them_at_config_time(config, scheme, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(config, [f"--scheme={scheme}", "--tau=0.5"], prog="prog")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"scheme={scheme}" in err[0] and "log-probs" in err[0], err
    for ok in ("risk_seeking", "softmax_ess"):  # the reward-only ones work everywhere
        assert dataclasses.asdict(parse_flags(config, [f"--scheme={ok}", "--tau=0.5"], prog="prog"))["scheme"] == ok

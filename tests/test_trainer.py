"""rlsoft.trainer on a toy bigram "model": exact micro-batching, the non-finite guard, logging."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft import losses, optim, trainer, weighting

V, P, N, Q, G = 11, 3, 4, 4, 3


def forward(params, tokens, positions, mask):
    """Logits of the next token from the current one (a bigram table) plus a position bias."""
    del mask
    return params["table"][tokens] + params["pos"][positions][..., None]


def _log_probs(params, b):
    """Teacher-forced log-probs and entropies of the responses, one prompt per row (the update's path
    without a group-shared `response_logits`)."""
    return trainer.response_log_probs(trainer.response_logits_from_forward(forward), params, b.prompts,
                                      b.prompt_mask, b.responses, b.response_mask)


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    return {"table": jax.random.normal(k1, (V, V)), "pos": 0.1 * jax.random.normal(k2, (P + N,))}


def _batch(seed=0, rewards=None):
    rng = np.random.default_rng(seed)
    b = Q * G
    prompts = rng.integers(1, V, (b, P)).astype(np.int32)
    pmask = np.ones((b, P), bool)
    pmask[::2, 0] = False  # left padding on every other row
    resp = rng.integers(1, V, (b, N)).astype(np.int32)
    rmask = np.ones((b, N), bool)
    rmask[1::3, 2:] = False  # some rows stop early
    if rewards is None:
        rewards = rng.choice([0.0, 0.1, 1.1], size=(Q, G)).astype(np.float32)
    sl = rng.integers(1, V, (Q, N)).astype(np.int32)
    return trainer.Batch(prompts, pmask, resp, rmask, rewards, np.float32(0.5), sl, prompts[::G], pmask[::G],
                         np.ones((Q, N), bool))


CFG = trainer.UpdateConfig(scheme="softmax", tau=0.5, policy=optim.OptimizerConfig(learning_rate=1e-2))


def _lr(cfg, rate, **more):
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, learning_rate=rate, **more))


def _run(cfg, batch, steps=1):
    update, _ = trainer.make_update(forward, cfg)
    state = trainer.init_state(_params(), cfg)
    for _ in range(steps):
        state, metrics = update(state, batch)
    return state, metrics


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("sl_weight", [0.0, 0.5])
def test_micro_batches_accumulate_exactly(aggregation, sl_weight):
    # One epoch: a second Adam step divides near-zero gradients by their own RMS, which turns
    # float rounding (different summation order) into visible differences.
    base = dataclasses.replace(CFG, aggregation=aggregation, sl_weight=sl_weight, clip_eps=0.2)
    one, m1 = _run(base, _batch())
    two, m2 = _run(dataclasses.replace(base, micro_batches=2), _batch())
    for a, b in zip(jax.tree.leaves(one.params("policy")), jax.tree.leaves(two.params("policy"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["train/loss"], m2["train/loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m1["train/grad_norm"], m2["train/grad_norm"], rtol=1e-5)


def test_ppo_epochs_reuse_the_rollout_policy_as_old():
    cfg = _lr(dataclasses.replace(CFG, clip_eps=0.2, ppo_epochs=3), 0.3)
    _, metrics = _run(cfg, _batch())
    # Metrics are the last epoch's: by then the policy has moved away from the sampling policy.
    assert abs(float(metrics["train/ratio_mean"]) - 1.0) > 1e-3
    _, one = _run(dataclasses.replace(cfg, ppo_epochs=1), _batch())
    np.testing.assert_allclose(one["train/ratio_mean"], 1.0, rtol=1e-6)


def test_loss_is_the_weighted_token_loss_of_the_batch():
    batch = _batch()
    cfg = dataclasses.replace(CFG, clip_eps=0.0)
    _, metrics = _run(cfg, batch)
    params = _params()
    logp, _ = _log_probs(params, batch)
    w = weighting.compute_weights(batch.rewards, "softmax", tau=0.5).reshape(-1)
    expected = -np.sum(np.asarray(w)[:, None] * np.asarray(logp) * batch.response_mask) / batch.response_mask.sum()
    np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)


def test_response_log_probs_align_with_the_response():
    params = _params()
    batch = _batch()
    logp, ent = _log_probs(params, batch)
    # Row 1 (no padding): token j of the response is predicted from the token before it.
    row = 1
    seq = np.concatenate([batch.prompts[row], batch.responses[row]])
    pos = np.arange(P + N)
    for j in range(N):
        logits = np.asarray(forward(params, seq[None, P + j - 1], pos[None, P + j - 1], None))[0]
        ref = logits[seq[P + j]] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        np.testing.assert_allclose(logp[row, j], ref, rtol=1e-5, atol=1e-5)
    assert ent.shape == (Q * G, N)


def test_non_finite_step_is_skipped_and_counted():
    # A NaN temperature makes every softmax weight NaN, hence the loss and the gradient.
    state0 = trainer.init_state(_params(), CFG)
    before = jax.tree.map(np.asarray, state0.params("policy"))
    update, _ = trainer.make_update(forward, CFG)
    state, metrics = update(state0, _batch()._replace(tau=np.float32(np.nan)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params("policy"))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1 and metrics["train/skipped_updates"] == 1.0
    state, metrics = update(state, _batch())  # a finite batch afterwards is applied
    assert metrics["train/skipped_updates"] == 1.0
    assert not np.allclose(jax.tree.leaves(state.params("policy"))[0], jax.tree.leaves(before)[0])


def test_linear_and_softmax_weights_are_logged_side_by_side():
    _, metrics = _run(dataclasses.replace(CFG, scheme="rank"), _batch())
    for prefix in ("train/weights", "diag/linear", "diag/softmax_tau0.5"):
        for stat in ("max_weight", "entropy", "effective_n", "weight_on_best"):
            assert f"{prefix}/{stat}" in metrics
    rewards = _batch().rewards
    lin = weighting.summarize_weight_stats(weighting.weight_stats(weighting.compute_weights(rewards, "linear"),
                                                                  rewards))
    np.testing.assert_allclose(metrics["diag/linear/max_weight"], lin["max_weight"], rtol=1e-6)
    np.testing.assert_allclose(metrics["train/tau"], 0.5)


def test_sft_update_lowers_the_supervised_loss_and_does_not_recompile(count_compiles):
    cfg = _lr(CFG, 5e-2)
    _, sft = trainer.make_update(forward, cfg)
    state = trainer.init_state(_params(), cfg)
    b = _batch()
    args = (b.sl_prompts, b.sl_prompt_mask, b.sl_responses, b.sl_mask)
    state, metrics = sft(state, *args)
    first = metrics["sft/loss"]
    with count_compiles() as compiled:
        for _ in range(19):
            state, metrics = sft(state, *args)
    assert metrics["sft/loss"] < 0.7 * first
    assert compiled == []


def test_kl_reference_is_frozen():
    cfg = dataclasses.replace(CFG, kl_coef=0.1)
    state, metrics = _run(cfg, _batch(), steps=3)
    ref = _params()
    for a, b in zip(jax.tree.leaves(state.params("reference")), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    assert metrics["train/kl"] > 0


@pytest.mark.parametrize("field,value", [("scheme", "nope"), ("sft_learning_rate", 0.0), ("micro_batches", 0),
                                         ("aggregation", "sum"), ("tau", -1.0), ("clip_eps", 2.0)])
def test_invalid_update_config(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CFG, **{field: value})


def test_losses_module_matches_trainer_response_log_probs():
    params = _params()
    b = _batch()
    tokens = np.concatenate([b.prompts, b.responses], 1)
    mask = np.concatenate([b.prompt_mask, b.response_mask], 1)
    logits = forward(params, tokens, np.maximum(np.cumsum(mask, 1) - 1, 0), mask)[:, P - 1:-1]
    logp, _ = _log_probs(params, b)
    np.testing.assert_allclose(logp, losses.token_log_probs(logits, jnp.asarray(b.responses)), rtol=1e-6)


def test_learning_rate_schedule_has_a_warm_start_phase_then_the_rl_phase():
    cfg = _lr(dataclasses.replace(CFG, sft_learning_rate=1e-2, sft_steps=10), 1e-3, warmup_steps=4)
    lr = optim.learning_rate_schedule(cfg.policy, phases=((cfg.sft_steps, cfg.sft_learning_rate),))
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4, 9)], [0.0, 5e-3, 1e-2, 1e-2], rtol=1e-6)
    np.testing.assert_allclose([float(lr(s)) for s in (10, 12, 14, 100)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    flat = optim.learning_rate_schedule(_lr(CFG, 2e-3).policy)
    assert float(flat) == pytest.approx(2e-3)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_group_shared_prompt_path_equals_the_per_row_path(micro_batches):
    # `response_logits` takes one prompt per question (batch.prompts[::G]); the generic adapter
    # repeats it for the G rows, so both paths see the same sequences.
    cfg = dataclasses.replace(CFG, micro_batches=micro_batches, clip_eps=0.2, sl_weight=0.5)
    b = _batch()
    batch = b._replace(prompts=np.repeat(b.prompts[::G], G, 0), prompt_mask=np.repeat(b.prompt_mask[::G], G, 0))
    per_row, m1 = _run(cfg, batch)
    rl, _ = trainer.make_update(forward, cfg, response_logits=trainer.response_logits_from_forward(forward))
    shared, m2 = rl(trainer.init_state(_params(), cfg), batch)
    for a, b in zip(jax.tree.leaves(per_row.params("policy")), jax.tree.leaves(shared.params("policy"))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m1["train/loss"], m2["train/loss"], rtol=1e-6)


def test_one_epoch_update_is_adamw_on_the_weighted_log_likelihood_gradient():
    # ppo_epochs == 1 reuses the loss's own forward as the old policy (ratio exactly 1): the step
    # must be AdamW (clip 1.0) on the gradient of -sum_i w_i sum_t logp_it / (response tokens).
    cfg = _lr(dataclasses.replace(CFG, clip_eps=0.2), 1e-2)
    batch = _batch()
    state, metrics = _run(cfg, batch)
    w = weighting.compute_weights(batch.rewards, "softmax", tau=0.5).reshape(-1)
    mask = jnp.asarray(batch.response_mask, jnp.float32)

    def loss(params):
        logp, _ = _log_probs(params, batch)
        return -jnp.sum(w[:, None] * logp * mask) / jnp.sum(mask)

    params = _params()
    grads = jax.grad(loss)(params)
    tx = trainer.make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = jax.tree.map(lambda p, u: p + u, params, updates)
    for a, b in zip(jax.tree.leaves(state.params("policy")), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["train/ratio_mean"], 1.0, rtol=1e-6)
    assert metrics["train/clip_ratio/region_mean"] == 0.0


def test_policy_entropy_is_logged_without_an_entropy_bonus():
    batch = _batch()
    _, metrics = _run(CFG, batch)  # entropy_coef = 0
    _, ent = _log_probs(_params(), batch)
    want = np.sum(np.asarray(ent) * batch.response_mask) / batch.response_mask.sum()
    np.testing.assert_allclose(metrics["train/entropy"], want, rtol=1e-5)


def test_rl_weight_zero_is_the_supervised_update_alone():
    """rl_weight = 0, sl_weight = 1: the step is `sft_update` on the ground-truth rows, whatever the
    rewards; rl_weight scales the RL term's step under SGD."""
    cfg = dataclasses.replace(CFG, rl_weight=0.0, sl_weight=1.0)
    batch = _batch()
    state, _ = _run(cfg, batch)
    other, _ = _run(cfg, batch._replace(rewards=batch.rewards[:, ::-1] * 3.0))
    sft = trainer.make_update(forward, cfg)[1]
    ref, _ = sft(trainer.init_state(_params(), cfg), batch.sl_prompts, batch.sl_prompt_mask, batch.sl_responses,
                 batch.sl_mask)
    for a, b, c in zip(*(jax.tree.leaves(s.params("policy")) for s in (state, other, ref))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    sgd = dataclasses.replace(CFG, policy=optim.OptimizerConfig(name="sgd", learning_rate=0.1, grad_clip=0.0,
                                                                warmup_steps=0))
    start = jax.tree.leaves(_params())
    full, half = (jax.tree.leaves(_run(dataclasses.replace(sgd, rl_weight=w), batch)[0].params("policy"))
                  for w in (1.0, 0.5))
    for s0, f, h in zip(start, full, half):
        # A step read back as a difference of float32 parameters carries their rounding: 2 ulps.
        ulp = np.spacing(np.max(np.abs(np.asarray(s0))).astype(np.float32))
        np.testing.assert_allclose(h - s0, 0.5 * (f - s0), rtol=1e-5, atol=2 * ulp)
    assert max(np.max(np.abs(f - s0)) for f, s0 in zip(full, start)) > 1e-3  # the RL step moved the table
    with pytest.raises(ValueError, match="trains nothing"):
        dataclasses.replace(CFG, rl_weight=0.0)
    with pytest.raises(ValueError, match="rl_weight=-1"):
        dataclasses.replace(CFG, rl_weight=-1.0)

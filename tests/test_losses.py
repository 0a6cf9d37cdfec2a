"""Tests for rlsoft.losses.

Expected values are independent of the implementation: by hand (ratios, clip points, KL of two
named probabilities), or in float64 NumPy (log-softmax, entropy, exact KL of two categoricals).
tests/test_losses_variants.py checks every function under chex's variants against `ref_policy_loss`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsoft import losses
from rlsoft.losses import PolicyLossConfig, policy_loss

NO_CLIP = PolicyLossConfig(clip_eps=None)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def grad_logp(cfg, logp, old_logp, mask, weights, **kw):
    """d loss / d logp, plus (loss, metrics)."""
    fn = lambda lp: policy_loss(lp, old_logp, mask, weights, cfg, **kw)
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logp, jnp.float32))
    return np.asarray(g), float(loss), {k: float(v) for k, v in metrics.items()}


# A ragged batch: lengths 3, 1, 0 (an empty row) and 2, with T = 4.
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], np.float32)
WEIGHTS = np.array([1.5, -2.0, 0.7, 0.3], np.float32)


def ragged_logp(seed=0):
    return np.log(np.random.default_rng(seed).uniform(0.05, 0.95, MASK.shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits.


def test_token_log_probs_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)) * 3
    targets = rng.integers(0, 7, size=(2, 3))
    got = losses.token_log_probs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # One unbatched sequence [T, V] works too.
    np.testing.assert_allclose(losses.token_log_probs(logits[0].astype(np.float32), targets[0]), want[0], atol=2e-6)


def test_token_entropy_matches_numpy_and_handles_masked_vocab():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)) * 2
    lp = np_log_softmax(logits)
    want = -(np.exp(lp) * lp).sum(-1)
    got = losses.token_entropy(jnp.asarray(logits, jnp.float32))
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(losses.token_entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]], atol=1e-6)
    # -inf logits (a masked vocabulary): 0 log 0 = 0, finite value and gradient.
    z = jnp.array([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
    np.testing.assert_allclose(losses.token_entropy(z), [[math.log(2)]], atol=1e-6)
    g = jax.grad(lambda z: losses.token_entropy(z).sum())(z)
    assert np.all(np.isfinite(g))


def test_bf16_logits_give_float32_close_to_f32():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 4, 11)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 4)))
    b = logits.astype(jnp.bfloat16)
    lp, ent = losses.token_log_probs(b, targets), losses.token_entropy(b)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    # Exactly the float32 computation on the rounded logits ...
    np.testing.assert_allclose(lp, losses.token_log_probs(b.astype(jnp.float32), targets), atol=1e-6)
    # ... and within bf16's rounding (8 mantissa bits on |logit| < 16) of the float32 logits.
    np.testing.assert_allclose(lp, losses.token_log_probs(logits, targets), atol=0.15)
    np.testing.assert_allclose(ent, losses.token_entropy(logits), atol=0.15)


# --------------------------------------------------------------------------------------------
# Gradients of the plain weighted log-likelihood, by hand.


def test_unclipped_grad_token_mean():
    g, loss, m = grad_logp(NO_CLIP, ragged_logp(), ragged_logp(1), MASK, WEIGHTS)
    np.testing.assert_allclose(g, -WEIGHTS[:, None] * MASK / 6.0, atol=1e-7)
    lp = ragged_logp()
    np.testing.assert_allclose(loss, -(WEIGHTS[:, None] * lp * MASK).sum() / 6.0, rtol=1e-6)
    assert m["num_tokens"] == 6.0 and m["clip_frac"] == 0.0


def test_unclipped_grad_seq_mean():
    cfg = PolicyLossConfig(aggregation="seq_mean", clip_eps=None)
    g, loss, _ = grad_logp(cfg, ragged_logp(), ragged_logp(), MASK, WEIGHTS)
    lengths = np.array([3.0, 1.0, 1.0, 2.0])  # row 2 is empty: its entries are 0 anyway
    np.testing.assert_allclose(g, -WEIGHTS[:, None] * MASK / (lengths[:, None] * 3), atol=1e-7)
    lp = ragged_logp()
    per_seq = [-(WEIGHTS[i] * lp[i] * MASK[i]).sum() / lengths[i] for i in (0, 1, 3)]
    np.testing.assert_allclose(loss, np.mean(per_seq), rtol=1e-6)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_clipped_at_ratio_one_has_the_unclipped_gradient(aggregation):
    lp = jnp.asarray(ragged_logp())
    clip = PolicyLossConfig(aggregation=aggregation, clip_eps=0.2, clip_eps_high=0.28)
    plain = PolicyLossConfig(aggregation=aggregation, clip_eps=None)
    # old_logp = logp itself: policy_loss stops its gradient, so the ratio is 1 with slope 1.
    g_clip = jax.grad(lambda x: policy_loss(x, x, MASK, WEIGHTS, clip)[0])(lp)
    g_plain = jax.grad(lambda x: policy_loss(x, x, MASK, WEIGHTS, plain)[0])(lp)
    np.testing.assert_allclose(g_clip, g_plain, atol=1e-7)
    _, m = policy_loss(lp, lp, MASK, WEIGHTS, clip)
    assert m["clip_frac"] == 0.0 and m["approx_kl_old"] == 0.0
    np.testing.assert_allclose(m["ratio_mean"], 1.0)


def test_aggregations_by_hand():
    x = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    want = {"token_mean": 10 / 4, "seq_mean": (2 + 4) / 2, "seq_mean_token_sum": (6 + 4) / 2,
            "seq_mean_token_sum_norm": (6 + 4) / 2 / 4}
    for agg, w in want.items():
        np.testing.assert_allclose(losses.aggregate(x, mask, agg), w, rtol=1e-6, err_msg=agg)


# --------------------------------------------------------------------------------------------
# PPO clipping: one token, hand-computed.


def one_token(ratio, adv, cfg):
    old = math.log(0.3)
    g, loss, m = grad_logp(cfg, [[old + math.log(ratio)]], jnp.array([[old]]), jnp.ones((1, 1)), jnp.array([adv]))
    return float(g[0, 0]), loss, m


@pytest.mark.parametrize(
    "ratio, adv, eps_high, want_loss, want_grad, clipped",
    [
        (1.5, 2.0, None, -1.2 * 2.0, 0.0, 1.0),   # A > 0, r > 1 + eps: clipped at 1.2, no gradient
        (0.5, -1.0, None, 0.8, 0.0, 1.0),         # A < 0, r < 1 - eps: clipped at 0.8, no gradient
        (0.5, 2.0, None, -0.5 * 2.0, -2.0 * 0.5, 0.0),   # A > 0, r < 1: unclipped, grad -A r
        (1.5, -1.0, None, 1.5, 1.5, 0.0),         # A < 0, r > 1: unclipped, grad -A r
        (1.25, 1.0, 0.28, -1.25, -1.25, 0.0),     # clip-higher: 1.25 < 1.28 is inside the range
        (1.3, 1.0, 0.28, -1.28, 0.0, 1.0),        # ... 1.3 > 1.28 is clipped
        (1.25, 1.0, None, -1.2, 0.0, 1.0),        # the same 1.25 with symmetric eps is clipped
        (0.75, -1.0, 0.28, 0.8, 0.0, 1.0),        # the lower side keeps clip_eps = 0.2
        (3.0, 0.0, None, 0.0, 0.0, 0.0),          # A = 0: nothing to clip
    ],
)
def test_ppo_clip_by_hand(ratio, adv, eps_high, want_loss, want_grad, clipped):
    g, loss, m = one_token(ratio, adv, PolicyLossConfig(clip_eps=0.2, clip_eps_high=eps_high))
    np.testing.assert_allclose(loss, want_loss, atol=1e-6)
    np.testing.assert_allclose(g, want_grad, atol=1e-6)
    assert m["clip_frac"] == clipped
    np.testing.assert_allclose(m["ratio_mean"], ratio, rtol=1e-6)
    np.testing.assert_allclose(m["approx_kl_old"], ratio - 1 - math.log(ratio), atol=1e-6)


def test_clip_frac_counts_response_tokens_only():
    ratios = np.array([[1.5, 0.5], [0.5, 1.1], [1.5, 1.5], [0.5, 2.0]])
    adv = np.array([1.0, -1.0, 0.0, 1.0], np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], np.float32)
    # clipped: (0,0) A>0 r=1.5; (1,0) A<0 r=0.5. Not: (0,1), (1,1), A=0 row, (3,0); (3,1) is masked.
    old = np.full(ratios.shape, math.log(0.2), np.float32)
    _, m = policy_loss(jnp.asarray(old + np.log(ratios), jnp.float32), old, mask, adv, PolicyLossConfig())
    np.testing.assert_allclose(m["clip_frac"], 2 / 7, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.1 + 1.5 + 1.5 + 0.5) / 7, rtol=1e-6)
    assert m["num_tokens"] == 7.0


# --------------------------------------------------------------------------------------------
# KL to the reference.


@pytest.mark.parametrize(
    "p, q, k1, k3",
    [
        (0.5, 0.25, math.log(2), 0.5 - 1 + math.log(2)),   # r = q / p = 1/2
        (0.25, 0.5, -math.log(2), 2 - 1 - math.log(2)),   # r = 2: k1 < 0, k3 > 0
    ],
)
def test_kl_estimators_by_hand(p, q, k1, k3):
    lp, lq = jnp.float32(math.log(p)), jnp.float32(math.log(q))
    np.testing.assert_allclose(losses.kl_k1(lp, lq), k1, rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(lp, lq), k3, rtol=1e-5)
    # Through policy_loss: A = 0, so the loss is kl_coef * k and the gradient kl_coef * dk/dlogp.
    for est, k, dk in (("k1", k1, 1.0), ("k3", k3, 1.0 - q / p)):
        cfg = PolicyLossConfig(clip_eps=None, kl_coef=0.1, kl_estimator=est)
        g, loss, m = grad_logp(cfg, [[lp]], jnp.array([[lp]]), jnp.ones((1, 1)), jnp.zeros(1),
                               ref_logp=jnp.array([[lq]]))
        np.testing.assert_allclose([loss, m["kl"], g[0, 0]], [0.1 * k, k, 0.1 * dk], rtol=1e-5, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(st.floats(-40, 0, width=32), st.floats(-40, 0, width=32))
def test_k3_nonnegative_and_zero_on_identical(lp, lq):
    assert float(losses.kl_k3(jnp.float32(lp), jnp.float32(lq))) >= 0.0
    assert float(losses.kl_k3(jnp.float32(lp), jnp.float32(lp))) == 0.0


def test_k1_and_k3_monte_carlo_match_exact_kl():
    rng = np.random.default_rng(3)
    pi = np.exp(np_log_softmax(rng.normal(size=6)))
    ref = np.exp(np_log_softmax(rng.normal(size=6)))
    exact = float(np.sum(pi * np.log(pi / ref)))
    n = 50_000
    y = rng.choice(6, size=n, p=pi)
    lp = jnp.asarray(np.log(pi[y])[:, None], jnp.float32)
    lq = jnp.asarray(np.log(ref[y])[:, None], jnp.float32)
    for est, fn in (("k1", losses.kl_k1), ("k3", losses.kl_k3)):
        cfg = PolicyLossConfig(kl_estimator=est)
        _, m = policy_loss(lp, lp, jnp.ones((n, 1)), jnp.zeros(n), cfg, ref_logp=lq)
        samples = np.asarray(fn(lp, lq), np.float64)
        tol = 5 * samples.std() / math.sqrt(n) + 1e-5  # 5 standard errors of the mean
        assert abs(m["kl"] - exact) < tol, (est, m["kl"], exact, tol)


# --------------------------------------------------------------------------------------------
# Entropy bonus, masking, config errors, jit / vmap.


def test_entropy_bonus_lowers_the_loss():
    lp = jnp.asarray(ragged_logp())
    cfg = PolicyLossConfig(entropy_coef=0.1)
    ent = jnp.full(MASK.shape, 0.7)
    l0, m0 = policy_loss(lp, lp, MASK, WEIGHTS, cfg, entropy=ent)
    l1, _ = policy_loss(lp, lp, MASK, WEIGHTS, cfg, entropy=ent + 1.0)
    np.testing.assert_allclose(l1 - l0, -0.1, rtol=1e-5)
    np.testing.assert_allclose(m0["entropy"], 0.7, rtol=1e-6)
    g = jax.grad(lambda e: policy_loss(lp, lp, MASK, WEIGHTS, cfg, entropy=e)[0])(ent)
    np.testing.assert_allclose(g, -0.1 * MASK / 6.0, atol=1e-8)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
@pytest.mark.parametrize("clip_eps, est", [(None, "k1"), (0.2, "k3")])
def test_masked_tokens_have_zero_gradient_and_no_nan(aggregation, clip_eps, est):
    cfg = PolicyLossConfig(aggregation=aggregation, clip_eps=clip_eps, kl_coef=0.05, kl_estimator=est,
                           entropy_coef=0.01)
    dead = MASK == 0
    garbage = lambda x, v: jnp.asarray(np.where(dead, v, x), jnp.float32)
    lp = garbage(ragged_logp(), -np.inf)
    old, ref = garbage(ragged_logp(1), np.nan), garbage(ragged_logp(2), np.inf)
    ent = garbage(np.ones(MASK.shape), np.nan)
    fn = lambda lp, e: policy_loss(lp, old, MASK, WEIGHTS, cfg, ref_logp=ref, entropy=e)
    (loss, m), (g_lp, g_ent) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(lp, ent)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert np.all(np.isfinite(g_lp)) and np.all(np.isfinite(g_ent))
    assert np.all(np.asarray(g_lp)[dead] == 0) and np.all(np.asarray(g_ent)[dead] == 0)
    assert np.all(np.asarray(g_lp)[~dead] != 0)
    # A fully masked batch: loss 0, zero gradient, no NaN.
    none = jnp.zeros_like(MASK)
    fn0 = lambda lp: policy_loss(lp, old, none, WEIGHTS, cfg, ref_logp=ref, entropy=ent)
    (l0, m0), g0 = jax.value_and_grad(fn0, has_aux=True)(lp)
    assert float(l0) == 0.0 and m0["num_tokens"] == 0 and all(np.isfinite(float(v)) for v in m0.values())
    assert np.all(np.asarray(g0) == 0)


def test_sft_loss_by_hand():
    lp = jnp.array([[-1.0, -2.0, -jnp.inf], [-0.5, jnp.nan, 0.0]])
    mask = jnp.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(losses.sft_loss(lp, mask), (1 + 2 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(losses.sft_loss(lp, mask, "seq_mean"), (1.5 + 0.5) / 2, rtol=1e-6)
    g = jax.grad(lambda x: losses.sft_loss(x, mask))(lp)
    np.testing.assert_allclose(g, -np.asarray(mask, np.float32) / 3, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(aggregation="sum"), "aggregation"),
        (dict(clip_eps=-0.1), "clip_eps"),
        (dict(clip_eps=1.0), "clip_eps"),
        (dict(clip_eps=float("nan")), "clip_eps"),
        (dict(clip_eps="0.2"), "clip_eps"),
        (dict(clip_eps_high=0.0), "clip_eps_high"),
        (dict(clip_eps_high=float("inf")), "clip_eps_high"),
        (dict(clip_eps=None, clip_eps_high=0.28), "clip_eps_high"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_coef=float("nan")), "kl_coef"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(entropy_coef=-0.01), "entropy_coef"),
        (dict(entropy_coef=True), "entropy_coef"),
    ],
)
def test_invalid_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        PolicyLossConfig(**kwargs)


def test_config_defaults_and_missing_inputs():
    cfg = PolicyLossConfig()
    assert (cfg.aggregation, cfg.eps_low, cfg.eps_high, cfg.kl_estimator) == ("token_mean", 0.2, 0.2, "k3")
    assert PolicyLossConfig(clip_eps=0.0).clipped is False and hash(cfg) == hash(PolicyLossConfig())
    lp = jnp.asarray(ragged_logp())
    with pytest.raises(ValueError, match="kl_coef"):
        policy_loss(lp, lp, MASK, WEIGHTS, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(lp, lp, MASK, WEIGHTS, PolicyLossConfig(entropy_coef=0.1))


def test_jit_and_vmap():
    cfg = PolicyLossConfig(aggregation="seq_mean", clip_eps_high=0.28, kl_coef=0.02, entropy_coef=0.01)
    rng = np.random.default_rng(4)
    r = 3  # e.g. three independent batches of one sweep
    lp = jnp.asarray(np.log(rng.uniform(0.05, 0.95, (r,) + MASK.shape)), jnp.float32)
    old = lp + jnp.asarray(rng.normal(0, 0.3, lp.shape), jnp.float32)
    ref = lp + jnp.asarray(rng.normal(0, 0.3, lp.shape), jnp.float32)
    ent = jnp.asarray(rng.uniform(0, 2, lp.shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(r, MASK.shape[0])), jnp.float32)
    f = lambda lp, old, w, ref, ent: policy_loss(lp, old, MASK, w, cfg, ref_logp=ref, entropy=ent)
    eager = [f(lp[i], old[i], w[i], ref[i], ent[i]) for i in range(r)]
    jitted = jax.jit(policy_loss, static_argnames="cfg")(
        lp[0], old[0], MASK, w[0], cfg=cfg, ref_logp=ref[0], entropy=ent[0])
    np.testing.assert_allclose(jitted[0], eager[0][0], rtol=1e-6)
    loss_v, m_v = jax.jit(jax.vmap(f))(lp, old, w, ref, ent)
    for i in range(r):
        np.testing.assert_allclose(loss_v[i], eager[i][0], rtol=1e-6)
        for k in losses.METRIC_NAMES:
            np.testing.assert_allclose(m_v[k][i], eager[i][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
    grad = jax.grad(lambda x: f(x, old[0], w[0], ref[0], ent[0])[0])
    g = jax.jit(grad)(lp[0])
    np.testing.assert_allclose(g, grad(lp[0]), rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(g)[MASK == 0] == 0) and np.all(np.asarray(g)[MASK != 0] != 0)

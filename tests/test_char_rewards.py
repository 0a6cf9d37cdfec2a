"""Character rewards (envs.char_rewards) by hand on the vocabulary ' ', 'a', 'b' of "abab ba".

N-gram terms are checked against envs.ngram's float64 numpy `NGramModel.log_probs`, everything
else against numbers written out by hand.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs import char_rewards as cr
from envs import chartext, ngram

TINY = "abab ba"
K = 0.5
VOCAB = chartext.Vocab.from_text(TINY)  # ' ' = 0, 'a' = 1, 'b' = 2
V = 3
# Bigram by hand, (count + 1/2) / (total + 3/2), vocab order ' ', 'a', 'b':
BIGRAM_AFTER_B = [1.5 / 4.5, 2.5 / 4.5, 0.5 / 4.5]  # after 'b': ' ' once, 'a' twice
BIGRAM_AFTER_A = [0.5 / 3.5, 0.5 / 3.5, 2.5 / 3.5]  # after 'a': 'b' twice


def _model(order):
    return ngram.NGramModel(order, K).fit(VOCAB.encode(TINY), V)


def _ids(text):
    return jnp.asarray(VOCAB.encode(text))


# --------------------------------------------------------------------------------------------
# The terms.


def test_exact_match_is_one_hot_of_target():
    np.testing.assert_array_equal(cr.exact_match_rewards(jnp.asarray(2), V), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(cr.exact_match_rewards(jnp.asarray(0), V), [1.0, 0.0, 0.0])


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("text", ["abab", "b ab", "aa  "])  # "aa", "  " are unseen trigram contexts
def test_ngram_terms_match_numpy_log_probs(order, text):
    model = _model(order)
    table = model.table()
    ctx = VOCAB.encode(text)
    ref = model.log_probs(ctx[len(ctx) - (order - 1):])  # last n - 1 characters, float64
    got = {m: np.asarray(cr.ngram_rewards(table, jnp.asarray(ctx), order, m)) for m in cr.NGRAM_MODES}
    np.testing.assert_allclose(got["log_prob"], ref, rtol=1e-6)
    np.testing.assert_allclose(got["shifted"], ref - ref.max(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["prob"], np.exp(ref), rtol=1e-6)
    assert got["shifted"].max() == 0.0


def test_bigram_terms_by_hand():
    table = _model(2).table()
    got = cr.ngram_rewards(table, _ids("aab"), 2, "prob")  # only the last 'b' counts
    np.testing.assert_allclose(got, BIGRAM_AFTER_B, rtol=1e-6)
    got = cr.ngram_rewards(table, _ids("bba"), 2, "shifted")
    np.testing.assert_allclose(got, [math.log(0.2), math.log(0.2), 0.0], rtol=1e-6)


@pytest.mark.parametrize("p, scale, cap, expected", [
    (0.0, 1.0, 1.5, 1.0),
    (0.3, 1.0, 1.5, 1.3),
    (0.5, 1.0, 1.5, 1.5),  # exactly at the cap
    (0.9, 1.0, 1.5, 1.5),  # capped
    (0.9, 0.0, 1.5, 1.0),  # bonus off
    (0.4, 2.0, 3.0, 1.8),
    (1.0, 2.0, 3.0, 3.0),
])
def test_confidence_multiplier_by_hand(p, scale, cap, expected):
    cfg = cr.CharRewardConfig(confidence_scale=scale, bonus_cap=cap)
    assert float(cr.confidence_multiplier(cfg, jnp.asarray(p))) == pytest.approx(expected, rel=1e-6)


def test_bonus_multiplies_only_the_target_and_has_no_gradient():
    cfg = cr.CharRewardConfig(w_exact=2.0, w_ngram=0.0, confidence_scale=1.0, bonus_cap=1.5)
    table = _model(2).table()
    r = cr.candidate_rewards(cfg, table, _ids("ab"), jnp.asarray(1), jnp.asarray(0.2))
    np.testing.assert_allclose(r, [0.0, 2.0 * 1.2, 0.0], rtol=1e-6)
    r = cr.candidate_rewards(cfg, table, _ids("ab"), jnp.asarray(1), jnp.asarray(0.99))
    np.testing.assert_allclose(r, [0.0, 2.0 * 1.5, 0.0], rtol=1e-6)  # the cap
    grad = jax.grad(lambda p: cr.candidate_rewards(cfg, table, _ids("ab"), jnp.asarray(1), p).sum())(0.3)
    assert float(grad) == 0.0  # p(target) enters through stop_gradient


# --------------------------------------------------------------------------------------------
# The combination.


def test_combined_rewards_by_hand():
    cfg = cr.CharRewardConfig(w_exact=1.0, w_ngram=0.5, ngram_order=2, ngram_mode="prob",
                              confidence_scale=1.0, bonus_cap=1.5)
    table = _model(2).table()
    # context "ab" -> bigram after 'b'; target 'a' (1) with p = 0.25 -> bonus 1.25
    r = cr.candidate_rewards(cfg, table, _ids("ab"), jnp.asarray(1), jnp.asarray(0.25))
    expected = [0.5 * BIGRAM_AFTER_B[0], 1.25 + 0.5 * BIGRAM_AFTER_B[1], 0.5 * BIGRAM_AFTER_B[2]]
    np.testing.assert_allclose(r, expected, rtol=1e-6)

    cfg = cr.CharRewardConfig(w_exact=3.0, w_ngram=0.1, ngram_mode="log_prob", confidence_scale=0.0)
    r = cr.candidate_rewards(cfg, table, _ids("ba"), jnp.asarray(0), jnp.asarray(0.9))
    expected = [3.0 + 0.1 * math.log(BIGRAM_AFTER_A[0]), 0.1 * math.log(BIGRAM_AFTER_A[1]),
                0.1 * math.log(BIGRAM_AFTER_A[2])]
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_default_config_shifted_bigram():
    cfg = cr.CharRewardConfig()  # w_exact 1, w_ngram 0.1, bigram, shifted, s = 1, cap 1.5
    r = cr.candidate_rewards(cfg, _model(2).table(), _ids("ab"), jnp.asarray(2), jnp.asarray(0.1))
    shifted = np.log(BIGRAM_AFTER_B) - np.log(max(BIGRAM_AFTER_B))
    np.testing.assert_allclose(r, 0.1 * shifted + [0.0, 0.0, 1.1], rtol=1e-6)


def test_ngram_weight_zero_skips_the_table_term():
    cfg = cr.CharRewardConfig(w_ngram=0.0, confidence_scale=0.0)
    r = cr.candidate_rewards(cfg, _model(3).table(), _ids("b"), jnp.asarray(0), jnp.asarray(0.5))
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0])  # a 1-char context is fine: no lookup


# --------------------------------------------------------------------------------------------
# Batching, sampled actions, jit.

CONTEXTS = np.array([VOCAB.encode(s) for s in ["abab", "bab ", "  ab", "b ba"]])
TARGETS = np.array([1, 2, 0, 2])
P_TARGETS = np.array([0.1, 0.6, 0.3, 0.0], np.float32)
CFG3 = cr.CharRewardConfig(w_exact=1.0, w_ngram=0.2, ngram_order=3, ngram_mode="log_prob")


def test_batched_rewards_shape_and_rows():
    table = _model(3).table()
    r = cr.batch_candidate_rewards(CFG3, table, CONTEXTS, TARGETS, P_TARGETS)
    assert r.shape == (4, V)
    model = _model(3)
    for b in range(4):
        bonus = min(1.0 + P_TARGETS[b], 1.5)
        expected = 0.2 * model.log_probs(CONTEXTS[b, -2:]) + bonus * (np.arange(V) == TARGETS[b])
        np.testing.assert_allclose(r[b], expected, rtol=1e-5)


def test_jit_matches_eager():
    table = _model(3).table()
    eager = cr.batch_candidate_rewards(CFG3, table, CONTEXTS, TARGETS, P_TARGETS)
    jitted = jax.jit(lambda t, x, y, p: cr.batch_candidate_rewards(CFG3, t, x, y, p))
    np.testing.assert_allclose(jitted(table, CONTEXTS, TARGETS, P_TARGETS), eager, rtol=1e-6)


def test_sampled_rewards_gather_candidates():
    table = _model(3).table()
    actions = np.array([[0, 1, 1], [2, 2, 0], [1, 0, 2], [2, 1, 2]])
    full = np.asarray(cr.batch_candidate_rewards(CFG3, table, CONTEXTS, TARGETS, P_TARGETS))
    got = jax.jit(lambda *a: cr.batch_sampled_rewards(CFG3, table, *a))(CONTEXTS, TARGETS, P_TARGETS, actions)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, np.take_along_axis(full, actions, axis=1), rtol=1e-6)
    one = cr.sampled_rewards(CFG3, table, jnp.asarray(CONTEXTS[1]), jnp.asarray(2), jnp.asarray(0.6),
                             jnp.asarray([2, 0]))
    np.testing.assert_allclose(one, full[1, [2, 0]], rtol=1e-6)


def test_target_probs():
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]], np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(cr.target_probs(logits, np.array([2, 1])), [p[0, 2], p[1, 1]], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors: one line each.


@pytest.mark.parametrize("kwargs, match", [
    ({"ngram_mode": "kl"}, "ngram_mode='kl' is invalid"),
    ({"ngram_order": 0}, "ngram_order=0 is invalid"),
    ({"bonus_cap": 0.5}, "bonus_cap=0.5 is invalid"),
    ({"confidence_scale": -1.0}, "confidence_scale=-1.0 is invalid"),
    ({"w_ngram": math.nan}, "w_ngram=nan is invalid"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        cr.CharRewardConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_shape_errors():
    table = _model(3).table()
    with pytest.raises(ValueError, match="too short for an order-3"):
        cr.candidate_rewards(CFG3, table, _ids("a"), jnp.asarray(0), jnp.asarray(0.0))
    with pytest.raises(ValueError, match=r"batch shapes .* are invalid"):
        cr.batch_candidate_rewards(CFG3, table, CONTEXTS, TARGETS[:2], P_TARGETS)
    with pytest.raises(ValueError, match=r"actions \[B, G\]"):
        cr.batch_sampled_rewards(CFG3, table, CONTEXTS, TARGETS, P_TARGETS, np.zeros((4,), np.int32))

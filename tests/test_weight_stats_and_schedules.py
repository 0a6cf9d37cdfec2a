"""Tests for rlsoft.weighting's per-group diagnostics (max weight, entropy, effective_n, weight on
correct samples) and the tau schedules it re-exports from rlsoft.schedules.

Expected values are computed by hand or with plain numpy, independently of the implementation.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft import schedules, weighting, weighting_recent
from rlsoft.weighting import compute_weights

# The 2025-26 schemes (rlsoft.weighting_recent) are tested in test_weighting_recent.py: gvpo and tpo
# need log-probs, softmax_ess reads tau as a fraction; the loops here cover the seeds' schemes.
SCHEME_NAMES = tuple(s for s in weighting.SCHEME_NAMES if s not in weighting_recent.SCHEMES)

_stats = jax.jit(weighting.weight_stats)


def _all_schemes(r, tau=0.7):
    """Every scheme on `r: [..., G]`, by name."""
    return {s: compute_weights(r, s, tau=tau) for s in SCHEME_NAMES}




def test_group_weight_stats_by_hand():
    w = jnp.asarray([2.0, -1.0, 1.0, 0.0])
    r = jnp.asarray([1.0, 0.0, 1.0, 0.5])
    # p = |w| / 4 = [1/2, 1/4, 1/4, 0]
    expected = {
        "max_weight": 2.0,
        "min_weight": -1.0,
        "weight_sum": 2.0,
        "entropy": 0.5 * math.log(2) + 0.5 * math.log(4),
        "effective_n": 1 / (0.25 + 2 * 0.0625),
        "weight_on_best": 1.5,  # mean of w over the two samples tied at r = 1
        "mass_on_best": 0.75,
        "reward_mean": 0.625,
        "reward_std": math.sqrt(0.6875 / 4),
        "zero_std": 0.0,
        "nonfinite_rewards": 0.0,
    }
    for s in (_stats(w, r), weighting.group_weight_stats(w, r)):
        assert set(s) == set(expected)
        for k, v in expected.items():
            assert s[k].shape == ()
            np.testing.assert_allclose(float(s[k]), v, rtol=1e-6, err_msg=k)


def test_weight_stats_uniform_and_zero():
    g = 8
    s = _stats(jnp.ones(g), jnp.arange(g, dtype=jnp.float32))
    np.testing.assert_allclose(s["entropy"], math.log(g), rtol=1e-6)
    np.testing.assert_allclose(s["effective_n"], g, rtol=1e-6)
    np.testing.assert_allclose(s["mass_on_best"], 1 / g, rtol=1e-6)
    # A centred scheme on a constant group: all-zero weights -> entropy = effective_n = 0, no NaN.
    z = _stats(jnp.zeros(g), jnp.full(g, 0.3))
    assert float(z["entropy"]) == 0.0 and float(z["effective_n"]) == 0.0
    assert float(z["mass_on_best"]) == 0.0 and float(z["zero_std"]) == 1.0
    for v in z.values():
        assert np.isfinite(float(v))


def test_weight_stats_shapes():
    r = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
    w = _all_schemes(r)["softmax"]
    s3 = _stats(w, r)
    s2 = _stats(w[1], r[1])
    for k in s3:
        assert s3[k].shape == (2, 3), k
        assert s2[k].shape == (3,), k
        np.testing.assert_allclose(s2[k], s3[k][1], rtol=1e-6, err_msg=k)


def test_summarize_weight_stats():
    r = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0]])
    w = _all_schemes(r, 1.0)["softmax"]
    s = _stats(w, r)
    out = weighting.summarize_weight_stats(s)
    assert "zero_std" not in out
    np.testing.assert_allclose(out["zero_std_frac"], 1 / 3, rtol=1e-6)
    for k in weighting.WEIGHT_SHAPE_STATS:  # informative groups 0 and 2 only
        np.testing.assert_allclose(out[k], (s[k][0] + s[k][2]) / 2, rtol=1e-6, err_msg=k)
    for k in ("reward_mean", "reward_std", "weight_sum", "min_weight"):  # plain batch means
        np.testing.assert_allclose(out[k], np.mean(np.asarray(s[k])), rtol=1e-6, err_msg=k)
    # All groups constant: weight-shape stats are 0 (no division by zero), the fraction is 1.
    flat = weighting.summarize_weight_stats(_stats(jnp.ones((3, 4)), jnp.ones((3, 4))))
    assert float(flat["zero_std_frac"]) == 1.0
    for k in weighting.WEIGHT_SHAPE_STATS:
        assert float(flat[k]) == 0.0

# --------------------------------------------------------------------------------------------
# Tau schedules.


def test_schedules_reexported():
    assert weighting.make_tau_schedule is schedules.make_tau_schedule
    assert weighting.TAU_SCHEDULES == ("constant", "linear", "cosine")


def test_constant_schedule():
    s = schedules.make_tau_schedule("constant", 0.3)
    for t in (0, 1, 1000):
        np.testing.assert_allclose(s(t), 0.3, rtol=1e-7)


def test_linear_schedule():
    s = schedules.make_tau_schedule("linear", 0.75, 0.25, 10)
    np.testing.assert_allclose(s(0), 0.75, rtol=1e-7)
    np.testing.assert_allclose(s(5), 0.5, rtol=1e-6)
    for t in (10, 11, 1000):
        np.testing.assert_allclose(s(t), 0.25, rtol=1e-7)
    np.testing.assert_allclose(jax.jit(s)(jnp.int32(5)), 0.5, rtol=1e-6)


def test_cosine_schedule():
    s = schedules.make_tau_schedule("cosine", 0.75, 0.25, 10)
    assert float(s(0)) == float(np.float32(0.75))
    assert float(s(10)) == float(np.float32(0.25))
    assert float(s(50)) == float(np.float32(0.25))
    np.testing.assert_allclose(s(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(s(2), 0.25 + 0.5 * (1 + math.cos(math.pi * 0.2)) / 2, rtol=1e-6)
    up = schedules.make_tau_schedule("cosine", 0.25, 2.0, 10)  # annealing upwards works too
    np.testing.assert_allclose([up(0), up(5), up(10)], [0.25, 1.125, 2.0], rtol=1e-6)


@pytest.mark.parametrize(
    "args,word",
    [
        (("exponential", 1.0, 0.1, 10), "schedule"),
        (("constant", 0.0), "tau"),
        (("constant", -1.0), "tau"),
        (("constant", float("nan")), "tau"),
        (("linear", 1.0, 0.0, 10), "tau_end"),
        (("linear", 1.0, None, 10), "tau_end"),
        (("cosine", 1.0, None, 10), "tau_end"),
        (("linear", 1.0, 0.1, 0), "steps"),
        (("cosine", 1.0, 0.1, None), "steps"),
    ],
)
def test_schedule_errors(args, word):
    with pytest.raises(ValueError, match=word):
        schedules.make_tau_schedule(*args)
"""Non-finite rewards in rlsoft.weighting: one policy for every scheme (see its module docstring).

A NaN / +inf / -inf reward gets weight exactly 0, the rest of the group is weighted as if it were
absent (compared here with the same scheme on the group of the finite rewards alone, which
test_weighting.py checks against independent float64 references), a group with no finite reward
gets all-zero weights, and weight_stats counts them.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsoft import weighting, weighting_recent
from rlsoft.weighting import compute_weights

# The 2025-26 schemes (rlsoft.weighting_recent) are tested in test_weighting_recent.py: gvpo and tpo
# need log-probs, softmax_ess reads tau as a fraction; the loops here cover the seeds' schemes.
SCHEME_NAMES = tuple(s for s in weighting.SCHEME_NAMES if s not in weighting_recent.SCHEMES)

TAU = 0.7
NAN, INF = float("nan"), float("inf")
ALL_VARIANTS = dict(with_jit=True, without_jit=True, with_device=True, without_device=True)

# Groups with non-finite entries, and the finite rewards they must be weighted as.
MIXED = {
    "nan": [NAN, 1.0, 0.0, 2.0],
    "all_kinds": [3.0, INF, -0.5, 1.0, -INF, 2.0, 2.0, NAN],
    "constant_rest": [INF, 0.5, 0.5, -INF],
    "nan_first_ties": [NAN, 2.0, -1.0, 2.0],
}
# What a group of one finite reward (r = 2) gets; a group of none gets zeros.
GROUP_OF_ONE = {"softmax": 1.0, "quantile_softmax": 1.0, "best_of_n": 1.0, "raw": 2.0}


def _weights_of(groups, tau):
    return {s: [compute_weights(r, s, tau=tau) for r in groups] for s in SCHEME_NAMES}


def _weights_auto(groups):
    return _weights_of(groups, "auto")


@jax.jit
def _all_schemes(r, tau=TAU):
    return {s: compute_weights(r, s, tau=tau) for s in SCHEME_NAMES}


def _f32(groups):
    return [np.asarray(r, np.float32) for r in groups]


class NonFiniteVariantsTest(chex.TestCase):
    @chex.variants(**ALL_VARIANTS)
    def test_masked_as_if_absent(self):
        groups = _f32(MIXED.values())
        for tau in (TAU, "auto"):
            got = self.variant(_weights_of)(groups, tau) if tau != "auto" else self.variant(_weights_auto)(groups)
            for k, (name, r) in enumerate(zip(MIXED, groups)):
                ok = np.isfinite(r)
                alone = _weights_of([r[ok]], tau)
                for s in SCHEME_NAMES:
                    w = np.asarray(got[s][k])
                    ref = np.asarray(alone[s][0])
                    assert w.dtype == np.float32 and np.all(np.isfinite(w)), (s, name, w)
                    np.testing.assert_array_equal(w[~ok], 0.0, err_msg=f"{s} {name}")
                    if name == "constant_rest":  # exact, as for any constant group
                        np.testing.assert_array_equal(w[ok], ref, err_msg=f"{s} {name} {tau}")
                    np.testing.assert_allclose(w[ok], ref, rtol=1e-5, atol=1e-6, err_msg=f"{s} {name} {tau}")

    @chex.variants(**ALL_VARIANTS)
    def test_no_finite_and_one_finite(self):
        groups = _f32([[NAN, NAN, NAN, NAN], [INF, -INF, NAN, INF], [NAN, 2.0, INF, -INF]])
        got = self.variant(_weights_of)(groups, TAU)
        for s in SCHEME_NAMES:
            np.testing.assert_array_equal(np.asarray(got[s][0]), np.zeros(4), err_msg=s)
            np.testing.assert_array_equal(np.asarray(got[s][1]), np.zeros(4), err_msg=s)
            np.testing.assert_array_equal(np.asarray(got[s][2]), [0.0, GROUP_OF_ONE.get(s, 0.0), 0.0, 0.0],
                                          err_msg=s)

    @chex.variants(**ALL_VARIANTS)
    def test_nan_and_infinities_alike(self):
        base = [0.5, -1.0, 9.0, 2.0, 2.0, 0.25, 7.0, -3.0]
        groups = []
        for bad in (NAN, INF, -INF):
            r = list(base)
            r[2], r[6] = bad, bad
            groups.append(r)
        mixed = list(base)
        mixed[2], mixed[6] = INF, NAN
        got = self.variant(_weights_of)(_f32(groups + [mixed]), TAU)
        for s in SCHEME_NAMES:
            for k in (1, 2, 3):
                np.testing.assert_array_equal(np.asarray(got[s][k]), np.asarray(got[s][0]), err_msg=f"{s} {k}")


def test_by_index_and_batched_follow_the_policy():
    r = jnp.asarray(np.stack(_f32([MIXED["nan"], MIXED["constant_rest"], MIXED["nan_first_ties"],
                                   [NAN, NAN, -INF, 1.0], [0.0, 1.0, 3.0, 3.0]])))
    by_name = _all_schemes(r)
    vm = jax.jit(jax.vmap(weighting.compute_weights_by_index, in_axes=(None, 0, None)))(
        r, jnp.arange(len(SCHEME_NAMES)), TAU)
    for i, s in enumerate(SCHEME_NAMES):
        np.testing.assert_allclose(vm[i], by_name[s], rtol=1e-6, atol=1e-6, err_msg=s)
        for b in range(r.shape[0]):  # batched == per group
            np.testing.assert_allclose(by_name[s][b], _all_schemes(r[b])[s], rtol=1e-6, atol=1e-6, err_msg=s)


def test_bfloat16_and_gradients():
    r = jnp.asarray([NAN, 1.0, 0.0, 2.0])
    for s, w in _all_schemes(r.astype(jnp.bfloat16)).items():
        assert w.dtype == jnp.bfloat16 and float(w[0]) == 0.0, s
        np.testing.assert_allclose(np.asarray(w, np.float32), _all_schemes(r)[s], rtol=1e-2, atol=1e-2)
    c = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    for s in SCHEME_NAMES:  # no NaN leaks into a gradient through the masked entries
        g = jax.jit(jax.grad(lambda x, s=s: jnp.sum(c * compute_weights(x, s, tau=TAU))))(r)
        assert np.all(np.isfinite(np.asarray(g))) and float(g[0]) == 0.0, (s, g)


def test_tau_below_float32_range_is_the_cold_limit():
    # tau = 1e-40 is 0 in float32 (a subnormal, flushed): the weights are best_of_n's, not 0 / 0.
    r = jnp.asarray([0.0, 2.0, 1.0, 2.0])
    for s in ("softmax", "quantile_softmax"):
        np.testing.assert_array_equal(compute_weights(r, s, tau=1e-40), [0.0, 2.0, 0.0, 2.0], err_msg=s)
    np.testing.assert_array_equal(compute_weights(r, "softmax_centered", tau=1e-40), [-1.0, 1.0, -1.0, 1.0])


_five = st.lists(st.integers(-640, 640).map(lambda k: k / 64.0), min_size=5, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_five, st.permutations(range(8)), st.lists(st.sampled_from([NAN, INF, -INF]), min_size=3, max_size=3))
def test_property_masked_equals_group_without_them(finite, order, bad):
    r = np.asarray(finite + bad, np.float32)[list(order)]
    ok = np.isfinite(r)
    got, alone = _all_schemes(r), _all_schemes(r[ok])
    for s in SCHEME_NAMES:
        w = np.asarray(got[s])
        np.testing.assert_array_equal(w[~ok], 0.0, err_msg=s)
        np.testing.assert_allclose(w[ok], alone[s], rtol=1e-5, atol=1e-5, err_msg=s)


# --------------------------------------------------------------------------------------------
# Counting: weight_stats, summarize_weight_stats, count_nonfinite.


def test_weight_stats_count_and_ignore_nonfinite():
    r = jnp.asarray([[1.0, NAN, 0.0, INF], [0.5, 0.5, 0.5, 0.5], [NAN, NAN, -INF, NAN], [2.0, -INF, 2.0, 2.0]])
    w = _all_schemes(r)["softmax"]
    s = jax.jit(weighting.weight_stats)(w, r)
    np.testing.assert_array_equal(s["nonfinite_rewards"], [2.0, 0.0, 4.0, 1.0])
    # Group 0 is the group [1, 0]: mean 1/2, std 1/2, best = the sample with r = 1.
    np.testing.assert_allclose(s["reward_mean"], [0.5, 0.5, 0.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(s["reward_std"], [0.5, 0.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(s["zero_std"], [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(s["weight_on_best"][0], w[0, 0], rtol=1e-6)
    np.testing.assert_allclose(s["mass_on_best"][0], w[0, 0] / 2, rtol=1e-6)  # softmax weights sum to n = 2
    for k, v in s.items():
        assert np.all(np.isfinite(np.asarray(v))), (k, v)
    out = weighting.summarize_weight_stats(s)
    assert float(out["nonfinite_rewards"]) == 7.0  # the batch's total, not a mean
    np.testing.assert_array_equal(weighting.count_nonfinite(r), [2, 0, 4, 1])
    assert weighting.count_nonfinite(jnp.zeros((3, 4), jnp.int32)).dtype == jnp.int32
    np.testing.assert_allclose(float(out["zero_std_frac"]), 0.75)
    assert not math.isnan(float(out["weight_on_best"]))

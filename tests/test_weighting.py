"""Tests for rlsoft.weighting's schemes (diagnostics and tau schedules: test_weight_stats_and_schedules.py).

Expected values are computed independently of the implementation: by hand, or in float64 with
plain numpy + scipy (scipy.stats.rankdata 'average', scipy.stats.norm.ppf).
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from rlsoft import weighting, weighting_recent
from rlsoft.weighting import compute_weights

# The 2025-26 schemes (rlsoft.weighting_recent) are tested in test_weighting_recent.py: gvpo and tpo
# need log-probs, softmax_ess reads tau as a fraction; the loops here cover the seeds' schemes.
SCHEME_NAMES = tuple(s for s in weighting.SCHEME_NAMES if s not in weighting_recent.SCHEMES)

TAU = 0.7  # default temperature for the schemes that need one
# Schemes whose weights of an all-equal group are exactly zero (no gradient from such a group).
CENTRED = frozenset({"linear", "drgrpo", "rloo", "softmax_centered", "quantile", "rank"})
ALL_VARIANTS = dict(with_jit=True, without_jit=True, with_device=True, without_device=True)


# --------------------------------------------------------------------------------------------
# Independent float64 references.


def ref_weights(r, scheme, tau=TAU):
    r = np.asarray(r, np.float64)
    g = r.size

    def soft(x, t):
        e = np.exp((x - x.max()) / t)
        return g * e / e.sum()

    def quant(x):
        return sps.norm.ppf((sps.rankdata(x, method="average") - 0.5) / g)

    if scheme == "linear":
        return (r - r.mean()) / (r.std() + 1e-4)
    if scheme == "drgrpo":
        return r - r.mean()
    if scheme == "rloo":
        return np.array([r[i] - np.mean(np.delete(r, i)) for i in range(g)])
    if scheme == "softmax":
        return soft(r, tau)
    if scheme == "softmax_centered":
        return soft(r, tau) - 1.0
    if scheme == "quantile":
        return quant(r)
    if scheme == "quantile_softmax":
        return soft(quant(r), tau)
    if scheme == "rank":
        c = sps.rankdata(r, method="average") - (g + 1) / 2
        return c / c.std() if c.std() > 0 else np.zeros(g)
    if scheme == "best_of_n":
        best = (r == r.max()).astype(np.float64)
        return g * best / best.sum()
    if scheme == "raw":
        return r.copy()
    raise AssertionError(scheme)


# Small groups; sizes kept to {2, 4, 8} so compiled programs are shared between tests.
GROUPS = {
    "distinct": [3.0, 1.0, 2.0, -0.5],
    "ties": [0.0, 1.0, 1.0, 2.0],
    "tied_best": [2.0, 2.0, -1.0, 2.0],
    "seed": [1.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0],
    "pair": [0.0, 1.0],
}
# All-equal groups with the same sizes; 3 x 0.1 etc. do not average back to 0.1 in float32.
EQUAL = {"0.1": [0.1] * 4, "1/3": [1 / 3] * 4, "-3.3": [-3.3] * 4, "7.123456": [7.123456] * 8, "0.3": [0.3] * 2}
# |r / tau| up to 1e6 (tau=1), and r ~ 1 with tau=1e-6 (|r / tau| ~ 1e6 too).
EXTREME = [([1e6, -1e6, 0.0, 5.0], 1.0), ([1.0, 0.9, 1.1, 0.95], 1e-6), ([1e6, -1e6, 0.0, 5.0], 1e-6)]

# Literal hand-computed values (pen and paper).
HAND = [
    # r = [0, 1]: mean 1/2, std 1/2.
    ("linear", [0.0, 1.0], None, [-0.5 / 0.5001, 0.5 / 0.5001]),
    # r = [3, 1, 2, 2]: mean 2, std sqrt(1/2).
    ("linear", [3.0, 1.0, 2.0, 2.0], None, [1 / (math.sqrt(0.5) + 1e-4), -1 / (math.sqrt(0.5) + 1e-4), 0.0, 0.0]),
    ("drgrpo", [0.0, 1.0, 1.0, 2.0], None, [-1.0, 0.0, 0.0, 1.0]),
    # rloo: 0 - 4/3, 1 - 3/3, 1 - 3/3, 2 - 2/3.
    ("rloo", [0.0, 1.0, 1.0, 2.0], None, [-4 / 3, 0.0, 0.0, 4 / 3]),
    # softmax tau=1 on [0, ln 3]: probabilities 1/4, 3/4, times G=2.
    ("softmax", [0.0, math.log(3.0)], 1.0, [0.5, 1.5]),
    ("softmax_centered", [0.0, math.log(3.0)], 1.0, [-0.5, 0.5]),
    # quantile with ties: average ranks 1, 2.5, 2.5, 4 -> p = 1/8, 1/2, 1/2, 7/8.
    ("quantile", [0.0, 1.0, 1.0, 2.0], None, [-1.1503494, 0.0, 0.0, 1.1503494]),
    # quantile_softmax tau=1: G * softmax([-1.15035, 0, 0, 1.15035]); e^1.1503494 = 3.1592966.
    ("quantile_softmax", [0.0, 1.0, 1.0, 2.0], 1.0,
     [4 * x / (1 / 3.1592966 + 2 + 3.1592966) for x in (1 / 3.1592966, 1.0, 1.0, 3.1592966)]),
    # rank: ranks 4, 2, 2, 2 -> centred 1.5, -1/2 x 3, population std sqrt(3) / 2.
    ("rank", [1.0, 0.0, 0.0, 0.0], None, [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]),
    ("best_of_n", [2.0, 2.0, -1.0, 2.0], None, [4 / 3, 4 / 3, 0.0, 4 / 3]),
    ("best_of_n", [0.0, 3.0, 1.0, 0.5], None, [0.0, 4.0, 0.0, 0.0]),
    ("raw", [0.5, -2.0, 3.0, 0.0], None, [0.5, -2.0, 3.0, 0.0]),
]

SHIFT_INVARIANT = tuple(s for s in SCHEME_NAMES if s != "raw")
# quantile sums to zero only without ties (or symmetric ties): Phi^-1 of *average* ranks is not
# symmetric, e.g. on the seed group. The other ones sum to zero always.
SUM_ZERO = ("softmax_centered", "drgrpo", "rloo", "linear", "quantile", "rank")
SUM_G = ("softmax", "quantile_softmax", "best_of_n")
# r_i > r_j  =>  w_i > w_j  (best_of_n only >=).
STRICT = ("linear", "drgrpo", "rloo", "softmax", "softmax_centered", "quantile", "quantile_softmax", "rank", "raw")

_grid = st.integers(-640, 640).map(lambda k: k / 64.0)  # exact float32 values in [-10, 10]
# G in 2..32; a fixed set of sizes keeps the number of compilations (one per G) small.
_sizes = st.sampled_from([2, 3, 4, 5, 8, 13, 32])
float_groups = _sizes.flatmap(
    lambda g: st.lists(st.floats(-10, 10, width=32, allow_subnormal=False), min_size=g, max_size=g)
)
grid_groups = _sizes.flatmap(lambda g: st.lists(_grid, min_size=g, max_size=g))
HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@jax.jit
def _all_schemes(r, tau=TAU):
    """Every scheme on `r: [..., G]` in one program (one compile per shape); tau traced."""
    return {s: compute_weights(r, s, tau=tau) for s in SCHEME_NAMES}


_stats = jax.jit(weighting.weight_stats)


def _weights_of(groups, tau):
    """{scheme: [w for each group]}: the function the chex variants wrap (module-level so that the
    jit variant compiles once per group structure, not once per test)."""
    return {s: [compute_weights(r, s, tau=tau) for r in groups] for s in SCHEME_NAMES}


def _weights_auto(groups):
    return {s: [compute_weights(r, s, tau="auto") for r in groups] for s in SCHEME_NAMES}


def _f32(groups):
    return [np.asarray(r, np.float32) for r in groups]


def _tie_free(r):
    return len(np.unique(r)) == len(r)


def _check_ordering(r, w, strict, msg=""):
    r = np.asarray(r)
    w = np.asarray(w)
    hi, lo = np.nonzero(r[:, None] > r[None, :])
    assert np.all(w[hi] >= w[lo]), (msg, r, w)
    if strict:
        assert np.all(w[hi] > w[lo]), (msg, r, w)
    eq_i, eq_j = np.nonzero(r[:, None] == r[None, :])
    assert np.all(w[eq_i] == w[eq_j]), (msg, r, w)  # equal rewards, equal weights


def test_scheme_names_are_the_issue_list():
    assert set(SCHEME_NAMES) == {
        "linear", "drgrpo", "rloo", "softmax", "softmax_centered", "quantile",
        "quantile_softmax", "rank", "best_of_n", "raw",
    }
    assert CENTRED <= set(SCHEME_NAMES)
    assert weighting.NEEDS_TAU & set(SCHEME_NAMES) == {"softmax", "softmax_centered", "quantile_softmax"}
    assert {h[0] for h in HAND} == set(SCHEME_NAMES)  # every scheme has a literal hand value


@pytest.mark.parametrize("scheme,r,tau,expected", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_literal_hand_values(scheme, r, tau, expected):
    w = _all_schemes(jnp.asarray(r, jnp.float32), 1.0 if tau is None else tau)[scheme]
    np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=1e-6)
    if tau is None:  # the schemes without a temperature ignore it, and accept tau=None
        np.testing.assert_allclose(compute_weights(jnp.asarray(r, jnp.float32), scheme), w, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Core checks under chex variants: jit / no jit, device arrays / numpy inputs.


class VariantsTest(chex.TestCase):
    @chex.variants(**ALL_VARIANTS)
    def test_reference_values(self):
        got = self.variant(_weights_of)(_f32(GROUPS.values()), TAU)
        for s in SCHEME_NAMES:
            for name, r, w in zip(GROUPS, GROUPS.values(), got[s]):
                chex.assert_shape(w, (len(r),))
                chex.assert_type(w, jnp.float32)
                np.testing.assert_allclose(
                    np.asarray(w), ref_weights(r, s), rtol=2e-5, atol=2e-5, err_msg=f"{s} {name}"
                )

    @chex.variants(**ALL_VARIANTS)
    def test_all_equal_group(self):
        got = self.variant(_weights_of)(_f32(EQUAL.values()), TAU)
        got_auto = self.variant(_weights_auto)(_f32(EQUAL.values()))
        for s in SCHEME_NAMES:
            for name, r, w, wa in zip(EQUAL, _f32(EQUAL.values()), got[s], got_auto[s]):
                if s in CENTRED:
                    expected = np.zeros_like(r)  # exactly 0: no gradient from a constant group
                elif s in ("softmax", "quantile_softmax", "best_of_n"):
                    expected = np.ones_like(r)
                else:
                    expected = r
                np.testing.assert_array_equal(np.asarray(w), expected, err_msg=f"{s} {name}")
                np.testing.assert_array_equal(np.asarray(wa), expected, err_msg=f"{s} {name} auto")

    @chex.variants(**ALL_VARIANTS)
    def test_seed_table(self):
        r = _f32(GROUPS.values())
        fn = self.variant(_weights_of)
        for tau, on_correct, eff_n in [(1.0, 2.33, 6.38), (0.5, 4.33, 3.10), (0.1, 8.0, 1.0)]:
            got = fn(r, tau)
            w = got["softmax"][3]
            stats = _stats(w, r[3])
            assert round(float(w[0]), 2) == on_correct, (tau, w)
            assert round(float(stats["effective_n"]), 2) == eff_n, (tau, stats)
            assert round(float(stats["weight_on_best"]), 2) == on_correct
            assert round(float(got["linear"][3][0]), 2) == 2.62

    @chex.variants(**ALL_VARIANTS)
    def test_finite_for_extreme_ratios(self):
        fn = self.variant(_weights_of)
        got_auto = self.variant(_weights_auto)(_f32([r for r, _ in EXTREME]))
        for k, (r, tau) in enumerate(EXTREME):
            got = fn(_f32([r]), tau)
            for s in SCHEME_NAMES:
                for w in (got[s][0], got_auto[s][k]):
                    assert np.all(np.isfinite(np.asarray(w))), (s, r, tau, w)
        # |r / tau| ~ 1e6 drives softmax to best_of_n.
        np.testing.assert_allclose(np.asarray(fn(_f32([EXTREME[1][0]]), 1e-6)["softmax"][0]), [0, 0, 4, 0], atol=1e-6)

    @chex.variants(**ALL_VARIANTS)
    def test_shift_invariance(self):
        fn = self.variant(_weights_of)
        base = fn(_f32(GROUPS.values()), TAU)
        for c in (-3.7, 0.25, 100.0):
            shifted = fn([r + np.float32(c) for r in _f32(GROUPS.values())], TAU)
            for s in SHIFT_INVARIANT:
                for name, w0, w1 in zip(GROUPS, base[s], shifted[s]):
                    np.testing.assert_allclose(
                        np.asarray(w1), np.asarray(w0), atol=5e-4, rtol=1e-4, err_msg=f"{s} {name} {c}"
                    )

    @chex.variants(**ALL_VARIANTS)
    def test_positive_scaling(self):
        fn = self.variant(_weights_of)
        rs = _f32(GROUPS.values())
        base = fn(rs, TAU)
        for c in (0.5, 3.0, 40.0):
            scaled = fn([np.float32(c) * r for r in rs], TAU)
            scaled_tau = fn([np.float32(c) * r for r in rs], TAU * c)
            for k, r in enumerate(rs):
                cw = lambda d, s: np.asarray(d[s][k])
                for s in ("quantile", "rank", "best_of_n"):  # invariant
                    np.testing.assert_allclose(cw(scaled, s), cw(base, s), rtol=1e-6, atol=1e-6, err_msg=s)
                for s in ("drgrpo", "rloo", "raw"):  # scale linearly
                    np.testing.assert_allclose(cw(scaled, s), c * cw(base, s), rtol=1e-5, atol=1e-5, err_msg=s)
                # linear: (c r - c m) / (c std + eps) == (r - m) / (std + eps / c): invariant up to eps.
                std = float(np.std(r.astype(np.float64)))
                np.testing.assert_allclose(cw(scaled, "linear"), cw(base, "linear"), rtol=2e-4 * max(1, 1 / c) / std)
                np.testing.assert_allclose(
                    cw(scaled, "linear"), ref_weights(r, "drgrpo") / (std + 1e-4 / c), rtol=1e-5, atol=1e-6
                )
                for s in ("softmax", "softmax_centered"):  # softmax(c r, c tau) == softmax(r, tau)
                    np.testing.assert_allclose(cw(scaled_tau, s), cw(base, s), rtol=1e-5, atol=1e-5, err_msg=s)

    @chex.variants(**ALL_VARIANTS)
    def test_sums_and_ordering(self):
        got = self.variant(_weights_of)(_f32(GROUPS.values()), TAU)
        for s in SCHEME_NAMES:
            for name, r, w in zip(GROUPS, _f32(GROUPS.values()), got[s]):
                w = np.asarray(w)
                if s in SUM_ZERO and (s != "quantile" or _tie_free(r)):
                    np.testing.assert_allclose(w.sum(), 0.0, atol=1e-5, err_msg=f"{s} {name}")
                if s in SUM_G:
                    np.testing.assert_allclose(w.sum(), r.size, rtol=1e-6, err_msg=f"{s} {name}")
                _check_ordering(r, w, strict=s in STRICT, msg=f"{s} {name}")

    @chex.variants(**ALL_VARIANTS)
    def test_tau_limits(self):
        fn = self.variant(_weights_of)
        rs = _f32(GROUPS.values())
        cold, hot = fn(rs, 1e-4), fn(rs, 1e6)
        for k, r in enumerate(rs):
            bon = ref_weights(r, "best_of_n")
            # tau -> 0: best_of_n, ties sharing the weight (quantile keeps the ties of r).
            np.testing.assert_allclose(np.asarray(cold["softmax"][k]), bon, atol=1e-6)
            np.testing.assert_allclose(np.asarray(cold["quantile_softmax"][k]), bon, atol=1e-6)
            np.testing.assert_allclose(np.asarray(cold["softmax_centered"][k]), bon - 1, atol=1e-6)
            # tau -> infinity: uniform ones.
            np.testing.assert_allclose(np.asarray(hot["softmax"][k]), np.ones_like(r), atol=1e-5)
            np.testing.assert_allclose(np.asarray(hot["quantile_softmax"][k]), np.ones_like(r), atol=1e-5)
            np.testing.assert_allclose(np.asarray(hot["softmax_centered"][k]), np.zeros_like(r), atol=1e-5)


def test_quantile_with_asymmetric_ties_does_not_sum_to_zero():
    # Documents the behaviour: average ranks (as specified) -> sum != 0 on the seed group.
    r = GROUPS["seed"]
    w = np.asarray(_all_schemes(jnp.asarray(r, jnp.float32))["quantile"])
    np.testing.assert_allclose(w.sum(), ref_weights(r, "quantile").sum(), rtol=1e-5)
    assert abs(w.sum()) > 0.1


def test_softmax_centered_is_softmax_minus_one():
    r = jnp.asarray([0.3, -1.0, 2.0, 2.0])
    for tau in (0.1, 1.0):
        w = _all_schemes(r, tau)
        np.testing.assert_allclose(w["softmax_centered"], w["softmax"] - 1, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Batching, dtypes, index-based dispatch, tau="auto".


def test_batched_equals_loop():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(2, 3, 8)).astype(np.float32)
    r[0, 1] = 0.5  # a constant group
    r[1, 2, :3] = r[1, 2, 3]  # ties
    w3 = _all_schemes(r)  # [A, B, G]
    w2 = _all_schemes(r[1])  # [B, G]
    loop = [_all_schemes(g) for g in r.reshape(-1, 8)]
    for s in SCHEME_NAMES:
        chex.assert_shape(w3[s], r.shape)
        expected = np.stack([np.asarray(l[s]) for l in loop]).reshape(r.shape)
        np.testing.assert_allclose(w3[s], expected, rtol=1e-6, atol=1e-6, err_msg=s)
        np.testing.assert_allclose(w2[s], expected[1], rtol=1e-6, atol=1e-6, err_msg=s)
        np.testing.assert_allclose(expected[0, 0], ref_weights(r[0, 0], s), rtol=2e-5, atol=2e-5, err_msg=s)


def test_dtype_preserved():
    r = np.asarray([0.5, -1.0, 2.0, 2.0], np.float32)
    w32 = _all_schemes(jnp.asarray(r))
    wbf = _all_schemes(jnp.asarray(r, jnp.bfloat16))
    wint = _all_schemes(jnp.asarray([0, 1, 1, 2]))
    for s in SCHEME_NAMES:
        assert w32[s].dtype == jnp.float32, s
        assert wbf[s].dtype == jnp.bfloat16, s
        assert wint[s].dtype == jnp.float32, s  # integer rewards are promoted to float32
        # bfloat16 inputs here are exact; outputs are the float32 result rounded to bfloat16.
        np.testing.assert_allclose(np.asarray(wbf[s], np.float32), np.asarray(w32[s]), rtol=1e-2, atol=1e-2)


def test_float64_needs_x64():
    if not jax.config.jax_enable_x64:
        pytest.skip("float64 is only preserved with jax_enable_x64")
    w = compute_weights(np.asarray([0.0, 1.0, 2.0], np.float64), "linear")
    assert w.dtype == jnp.float64


def test_by_index_equals_compute_weights():
    r = jnp.asarray([[0.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]], jnp.float32)
    by_name = _all_schemes(r)
    expected = np.stack([np.asarray(by_name[s]) for s in SCHEME_NAMES])
    one = jax.jit(weighting.compute_weights_by_index)
    for s in SCHEME_NAMES:
        i = weighting.scheme_index(s)
        assert SCHEME_NAMES[i] == s
        np.testing.assert_allclose(one(r, i, TAU), expected[i], rtol=1e-6, atol=1e-6, err_msg=s)
    vm = jax.jit(jax.vmap(weighting.compute_weights_by_index, in_axes=(None, 0, None)))(
        r, jnp.arange(len(SCHEME_NAMES)), TAU
    )
    np.testing.assert_allclose(vm, expected, rtol=1e-6, atol=1e-6)


def test_traced_tau_is_accepted_and_vmappable():
    r = jnp.asarray([0.0, 1.0, 2.0, 2.0])
    taus = [0.5, 1.0, 2.0]
    w = jax.jit(jax.vmap(lambda t: compute_weights(r, "softmax", tau=t)))(jnp.asarray(taus))
    for k, t in enumerate(taus):
        np.testing.assert_allclose(w[k], ref_weights(r, "softmax", t), rtol=1e-5)


def test_tau_auto():
    r = jnp.asarray([[0.0, 1.0, 3.0, -1.0], [2.0, 2.5, 2.5, 2.0], [1.25, 1.25, 1.25, 1.25]])
    f = jax.jit(lambda x: {s: compute_weights(x, s, tau="auto") for s in weighting.NEEDS_TAU & set(SCHEME_NAMES)})
    auto = f(r)
    for b in range(2):
        rb = np.asarray(r[b])
        np.testing.assert_allclose(auto["softmax"][b], ref_weights(rb, "softmax", (rb.max() - rb.min()) / 2), rtol=1e-6)
    q = ref_weights(np.asarray(r[0]), "quantile")  # quantile_softmax: the range of q, not of r
    np.testing.assert_allclose(auto["quantile_softmax"][0], ref_weights(q, "softmax", (q.max() - q.min()) / 2), rtol=1e-5)
    for s, v in (("softmax", 1.0), ("quantile_softmax", 1.0), ("softmax_centered", 0.0)):  # constant group
        np.testing.assert_array_equal(auto[s][2], np.full(4, v), err_msg=s)


# --------------------------------------------------------------------------------------------
# Property tests.


@HYP
@given(float_groups)
def test_property_finite_sums_ordering(values):
    r = np.asarray(values, np.float32)
    g = r.size
    ws = {s: np.asarray(w) for s, w in _all_schemes(r).items()}
    for s, w in ws.items():
        assert w.shape == (g,) and np.all(np.isfinite(w)), (s, r, w)
        # float32 rounding of the sum grows with G and the largest weight.
        if s in SUM_ZERO and (s != "quantile" or _tie_free(r)):
            np.testing.assert_allclose(w.sum(), 0.0, atol=1e-5 * g * (1 + np.abs(w).max()), err_msg=s)
        if s in SUM_G:
            np.testing.assert_allclose(w.sum(), g, rtol=1e-5, err_msg=s)
        _check_ordering(r, w, strict=False, msg=s)


@HYP
@given(grid_groups, st.integers(-160, 160).map(lambda k: k / 4.0))
def test_property_shift_invariance_and_strict_ordering(values, shift):
    # Grid values keep r + shift exact in float32, so the invariance holds to rounding, ties included.
    r = np.asarray(values, np.float32)
    w0 = {s: np.asarray(w) for s, w in _all_schemes(r).items()}
    w1 = {s: np.asarray(w) for s, w in _all_schemes(r + np.float32(shift)).items()}
    for s in SHIFT_INVARIANT:
        np.testing.assert_allclose(w1[s], w0[s], rtol=1e-5, atol=1e-5, err_msg=s)
    # softmax_centered = softmax - 1 loses strictness to rounding where softmax < 1e-7.
    for s in STRICT:
        if s != "softmax_centered":
            _check_ordering(r, w0[s], strict=True, msg=s)


# --------------------------------------------------------------------------------------------
# Errors.


R4 = jnp.asarray([0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "kwargs,rewards,word",
    [
        (dict(scheme="nope"), R4, "scheme"),
        (dict(scheme="Softmax", tau=1.0), R4, "scheme"),
        (dict(scheme="softmax", tau=0.0), R4, "tau"),
        (dict(scheme="softmax", tau=-1.0), R4, "tau"),
        (dict(scheme="softmax", tau=float("nan")), R4, "tau"),
        (dict(scheme="softmax", tau=float("inf")), R4, "tau"),
        (dict(scheme="softmax", tau=jnp.asarray(-2.0)), R4, "tau"),
        (dict(scheme="softmax", tau="foo"), R4, "tau"),
        (dict(scheme="linear", tau="foo"), R4, "tau"),
        (dict(scheme="softmax", tau=jnp.asarray([1.0, 2.0])), R4, "tau"),
        (dict(scheme="softmax"), R4, "tau"),
        (dict(scheme="softmax_centered"), R4, "tau"),
        (dict(scheme="quantile_softmax"), R4, "tau"),
        (dict(scheme="linear"), jnp.asarray([1.0]), "G >= 2"),
        (dict(scheme="linear"), jnp.zeros((5, 1)), "G >= 2"),
        (dict(scheme="linear"), jnp.asarray(1.0), "G >= 2"),
    ],
)
def test_errors(kwargs, rewards, word):
    with pytest.raises(ValueError, match=word.replace("+", r"\+")) as info:
        compute_weights(rewards, **kwargs)
    if word == "G >= 2":
        assert "rewards" in str(info.value)
    # Raised at trace time, inside jit too.
    with pytest.raises(ValueError, match=word):
        jax.jit(lambda r: compute_weights(r, **kwargs))(rewards)


def test_scheme_index_and_by_index_errors():
    with pytest.raises(ValueError, match="scheme"):
        weighting.scheme_index("nope")
    with pytest.raises(ValueError, match="rewards"):
        weighting.compute_weights_by_index(jnp.zeros((3, 1)), 0, 1.0)


def test_schemes_without_tau_accept_none():
    for s in sorted(set(SCHEME_NAMES) - weighting.NEEDS_TAU):
        assert np.all(np.isfinite(np.asarray(compute_weights(R4, s))))


def test_auto_tau_is_half_on_binary_rewards():
    """On 0/1 rewards tau = "auto" is softmax at 0.5 (range 1 -> tau 0.5; all-equal groups get 1
    each at any tau): why the bandit study has no auto arm (README)."""
    rng = np.random.default_rng(0)
    r = (rng.random((500, 16)) < rng.random((500, 1)) ** 3).astype(np.float32)
    assert 0 < (r.sum(1) == 0).mean() < 1  # both kinds of group are present
    np.testing.assert_array_equal(weighting.compute_weights(jnp.asarray(r), "softmax", tau="auto"),
                                  weighting.compute_weights(jnp.asarray(r), "softmax", tau=0.5))

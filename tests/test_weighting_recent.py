"""The 2025-26 schemes of rlsoft.weighting_recent: risk_seeking, softmax_ess, gvpo, tpo.

Expected values are literal numbers worked out by hand, or float64 NumPy/SciPy written from the
papers' formulas (RS-GRPO's s via logsumexp, softmax_ess's temperature by Brent's root finder,
TPO's target by direct exponentiation), not from the implementation's stable forms.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from rlsoft import weighting, weighting_recent
from rlsoft.weighting import compute_weights

RECENT = weighting_recent.SCHEMES
NAN, INF = float("nan"), float("inf")
ALL_VARIANTS = dict(with_jit=True, without_jit=True, with_device=True, without_device=True)
A = 0.5 / 0.5001  # GRPO's whitened reward of a [0, .., 1, ..] group with equal halves: +-A


# --------------------------------------------------------------------------------------------
# Independent float64 references.


def ref_risk_seeking(r, tau):
    r, beta = np.asarray(r, np.float64), 1.0 / tau
    s = (special.logsumexp(beta * r) - math.log(r.size)) / beta
    return (np.exp(beta * (r - s)) - 1.0) / beta


def _ess(w):
    return w.sum() ** 2 / (w * w).sum()


def ref_softmax_ess(r, frac):
    """n softmax(r / t) with t the root of ESS(t) = frac n (Brent, on log t)."""
    r = np.asarray(r, np.float64)
    n = r.size
    soft = lambda t: n * special.softmax(r / t)  # noqa: E731
    log_t = optimize.brentq(lambda lt: _ess(soft(math.exp(lt))) - frac * n, -30.0, 30.0, xtol=1e-14)
    return soft(math.exp(log_t))


def ref_gvpo(r, tau, logp, ref_logp=0.0):
    r, l = np.asarray(r, np.float64), np.asarray(logp, np.float64) - np.asarray(ref_logp, np.float64)
    return (r - r.mean()) - tau * (l - l.mean())


def ref_tpo(r, tau, logp):
    r, logp = np.asarray(r, np.float64), np.asarray(logp, np.float64)
    u = (r - r.mean()) / (r.std() + 1e-4)
    p = np.exp(logp) / np.exp(logp).sum()
    q = p * np.exp(u / tau) / (p * np.exp(u / tau)).sum()
    return r.size * (q - p)


def _weights(r, scheme, tau, logp=None, ref_logp=None):
    return compute_weights(r, scheme, tau=tau, logp=logp, ref_logp=ref_logp)


_jit_weights = jax.jit(_weights, static_argnames="scheme")

# --------------------------------------------------------------------------------------------
# Registry and literal hand values.


def test_registered_after_the_old_schemes():
    names = weighting.SCHEME_NAMES
    assert names[:10] == ("linear", "drgrpo", "rloo", "softmax", "softmax_centered", "quantile",
                          "quantile_softmax", "rank", "best_of_n", "raw")  # old indices unchanged
    assert names[10:] == RECENT == ("risk_seeking", "softmax_ess", "gvpo", "tpo")
    assert set(RECENT) <= weighting.NEEDS_TAU
    assert weighting.NEEDS_LOGP == {"gvpo", "tpo"} and weighting.TAU_IS_FRACTION == {"softmax_ess"}
    with pytest.raises(ValueError, match="already"):
        weighting.register_scheme("tpo", weighting_recent.tpo)


LN3, LN2 = math.log(3.0), math.log(2.0)
HAND = [
    # w = tau (G softmax(r / tau) - 1): G softmax([0, ln 3]) = [1/2, 3/2].
    ("risk_seeking", [0.0, LN3], 1.0, None, None, [-0.5, 0.5]),
    ("risk_seeking", [0.0, 2 * LN3], 2.0, None, None, [-1.0, 1.0]),
    # logsumexp = ln 8, s = ln 8 - ln 4 = ln 2: exp(r - s) - 1 = [1/2 - 1 (x3), 5/2 - 1].
    ("risk_seeking", [0.0, 0.0, 0.0, math.log(5.0)], 1.0, None, None, [-0.5, -0.5, -0.5, 1.5]),
    # p = [1/6 x3, 1/2] (e^(1/t) = 3): sum p^2 = 1/3, ESS = 3 = 0.75 * 4; w = 4 p.
    ("softmax_ess", [0.0, 0.0, 0.0, 1.0], 0.75, None, None, [2 / 3, 2 / 3, 2 / 3, 2.0]),
    # p ∝ [1, 2, 4] (e^(1/t) = 2): sum p^2 = 21/49, ESS = 7/3 = (7/9) * 3; w = 3 p.
    ("softmax_ess", [0.0, 1.0, 2.0], 7 / 9, None, None, [3 / 7, 6 / 7, 12 / 7]),
    # ties: p = [3/8, 3/8, 1/8, 1/8], sum p^2 = 5/16, ESS = 3.2 = 0.8 * 4.
    ("softmax_ess", [1.0, 1.0, 0.0, 0.0], 0.8, None, None, [1.5, 1.5, 0.5, 0.5]),
    # target 0.5 * 4 = 2 = the two tied best: out of reach, best_of_n; and tau = 1: uniform.
    ("softmax_ess", [1.0, 1.0, 0.0, 0.0], 0.5, None, None, [2.0, 2.0, 0.0, 0.0]),
    ("softmax_ess", [1.0, 1.0, 0.0, 0.0], 0.25, None, None, [2.0, 2.0, 0.0, 0.0]),
    ("softmax_ess", [3.0, -1.0, 0.5, 2.0], 1.0, None, None, [1.0, 1.0, 1.0, 1.0]),
    # r - mean = [-1.5, -.5, .5, 1.5]; l - mean = [1, 0, 1, -2]; w = (r - mean) - 0.5 (l - mean).
    ("gvpo", [0.0, 1.0, 2.0, 3.0], 0.5, [-1.0, -2.0, -1.0, -4.0], None, [-2.0, -0.5, 0.0, 2.5]),
    # with a reference: l = [-1, -1, -1, -3], l - mean = [.5, .5, .5, -1.5].
    ("gvpo", [0.0, 1.0, 2.0, 3.0], 0.5, [-1.0, -2.0, -1.0, -4.0], [0.0, -1.0, 0.0, -1.0],
     [-1.75, -0.75, 0.25, 2.25]),
    # u = [-A, -A, A, A], e^(2A / eta) = 2: q ∝ [.1, .2, .6, .8] / 1.7; w = 4 (q - p).
    ("tpo", [0.0, 0.0, 1.0, 1.0], 2 * A / LN2, list(np.log([0.1, 0.2, 0.3, 0.4])), None,
     [4 * (1 / 17 - 0.1), 4 * (2 / 17 - 0.2), 4 * (6 / 17 - 0.3), 4 * (8 / 17 - 0.4)]),
    # p_old = [3/4, 1/4], e^(2A / eta) = 3: q = [1/2, 1/2]; w = 2 (q - p). A reference is ignored.
    ("tpo", [0.0, 1.0], 2 * A / LN3, [math.log(0.75), math.log(0.25)], [5.0, -7.0], [-0.5, 0.5]),
]


@pytest.mark.parametrize("scheme,r,tau,logp,ref_logp,expected", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_literal_hand_values(scheme, r, tau, logp, ref_logp, expected):
    w = _jit_weights(jnp.asarray(r, jnp.float32), scheme, tau, logp, ref_logp)
    np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# Against the float64 references, under chex variants (jit or not, device or numpy inputs).

RNG = np.random.default_rng(0)
GROUPS = [np.asarray(g, np.float32) for g in (
    [3.0, 1.0, 2.0, -0.5], [0.0, 1.0, 1.0, 2.0], [1.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0],
    RNG.normal(size=8), 5 * RNG.normal(size=16))]
LOGPS = [(-3 * RNG.random(g.size)).astype(np.float32) for g in GROUPS]
REFS = [(-3 * RNG.random(g.size)).astype(np.float32) for g in GROUPS]


def _all_groups(groups, logps, refs, tau, frac):
    return {"risk_seeking": [compute_weights(r, "risk_seeking", tau=tau) for r in groups],
            "softmax_ess": [compute_weights(r, "softmax_ess", tau=frac) for r in groups],
            "gvpo": [compute_weights(r, "gvpo", tau=tau, logp=l, ref_logp=q) for r, l, q in zip(groups, logps, refs)],
            "gvpo_noref": [compute_weights(r, "gvpo", tau=tau, logp=l) for r, l in zip(groups, logps)],
            "tpo": [compute_weights(r, "tpo", tau=tau, logp=l) for r, l in zip(groups, logps)]}


class VariantsTest(chex.TestCase):
    @chex.variants(**ALL_VARIANTS)
    def test_reference_values(self):
        fn = self.variant(_all_groups)
        for tau, frac in ((0.7, 0.6), (2.5, 0.9), (0.3, 0.3)):
            got = fn(GROUPS, LOGPS, REFS, tau, frac)
            for k, (r, l, q) in enumerate(zip(GROUPS, LOGPS, REFS)):
                n_best = np.sum(r == r.max())
                want = {"risk_seeking": ref_risk_seeking(r, tau),
                        "softmax_ess": ref_softmax_ess(r, frac) if frac * r.size > n_best
                        else r.size * (r == r.max()) / n_best,
                        "gvpo": ref_gvpo(r, tau, l, q), "gvpo_noref": ref_gvpo(r, tau, l), "tpo": ref_tpo(r, tau, l)}
                for s, expected in want.items():
                    w = got[s][k]
                    chex.assert_shape(w, r.shape)
                    chex.assert_type(w, jnp.float32)
                    np.testing.assert_allclose(np.asarray(w), expected, rtol=2e-5, atol=3e-5, err_msg=f"{s} {k} {tau}")


def test_sums_and_ordering():
    for k, (r, l) in enumerate(zip(GROUPS, LOGPS)):
        ws = {s: np.asarray(_jit_weights(r, s, 0.6, l)) for s in RECENT}
        for s in ("risk_seeking", "gvpo", "tpo"):
            np.testing.assert_allclose(ws[s].sum(), 0.0, atol=1e-5 * r.size, err_msg=s)
        np.testing.assert_allclose(ws["softmax_ess"].sum(), r.size, rtol=1e-5)
        for s in ("risk_seeking", "softmax_ess"):  # r_i > r_j => w_i > w_j, ties equal
            hi, lo = np.nonzero(r[:, None] > r[None, :])
            assert np.all(ws[s][hi] >= ws[s][lo]), (s, r, ws[s])
            # Strict on the small groups; on the wide ones exp underflows (risk_seeking -> -tau).
            assert k >= 4 or np.all(ws[s][hi] > ws[s][lo]), (s, r, ws[s])
            eq_i, eq_j = np.nonzero(r[:, None] == r[None, :])
            assert np.all(ws[s][eq_i] == ws[s][eq_j]), (s, r, ws[s])


# --------------------------------------------------------------------------------------------
# Limits and cross-checks with the older schemes.


def test_risk_seeking_limits():
    for r in GROUPS:
        drgrpo = np.asarray(compute_weights(r, "drgrpo"))
        for tau in (1e6, 1e8):  # tau -> inf: r - mean (Dr. GRPO), without float cancellation
            np.testing.assert_allclose(_jit_weights(r, "risk_seeking", tau), drgrpo, atol=2e-5 * (1 + np.abs(r).max()))
        # tau -> 0: tau (best_of_n - 1).
        bon = np.asarray(compute_weights(r, "best_of_n"))
        np.testing.assert_allclose(_jit_weights(r, "risk_seeking", 1e-4) / 1e-4, bon - 1, rtol=1e-5, atol=1e-5)
        # In between: tau * softmax_centered (the same formula by another road).
        np.testing.assert_allclose(_jit_weights(r, "risk_seeking", 0.8), 0.8 * np.asarray(
            compute_weights(r, "softmax_centered", tau=0.8)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("g", [2, 3, 8, 32, 100])
def test_softmax_ess_hits_its_target(g):
    rng = np.random.default_rng(g)
    rs = np.stack([rng.normal(size=g), rng.exponential(size=g) * 1e3, np.round(rng.normal(size=g))]).astype(np.float32)
    for frac in (0.05, 0.2, 0.5, 0.9, 0.999):
        w = np.asarray(_jit_weights(rs, "softmax_ess", frac), np.float64)
        for r, wr in zip(rs, w):
            k = np.sum(r == r.max())
            target = frac * g if frac * g > k else k  # out of reach: the k best (best_of_n)
            np.testing.assert_allclose(_ess(wr), target, rtol=1e-4, err_msg=f"{frac} {r}")
            np.testing.assert_allclose(wr.sum(), g, rtol=1e-5)


def test_softmax_ess_is_shift_and_scale_free():
    for r in GROUPS:
        w = np.asarray(_jit_weights(r, "softmax_ess", 0.6))
        for c, b in ((3.0, 0.0), (0.01, -7.0), (1e4, 5.0)):
            np.testing.assert_allclose(_jit_weights(c * r + np.float32(b), "softmax_ess", 0.6), w, rtol=1e-4, atol=1e-5)


def test_log_prob_schemes_reduce_to_older_ones_when_p_old_is_uniform():
    for r in GROUPS:
        flat = np.full(r.shape, -2.5, np.float32)  # any constant: p_old uniform, l - mean l = 0
        np.testing.assert_array_equal(_jit_weights(r, "gvpo", 0.4, flat), compute_weights(r, "drgrpo"))
        u = compute_weights(r, "linear")
        np.testing.assert_allclose(_jit_weights(r, "tpo", 0.4, flat), compute_weights(u, "softmax_centered", tau=0.4),
                                   rtol=1e-5, atol=1e-5)
        # tpo's eta -> inf: q = p, no update; gvpo's beta -> 0: Dr. GRPO whatever the log-probs.
        lp = np.linspace(-4, 0, r.size).astype(np.float32)
        np.testing.assert_allclose(_jit_weights(r, "tpo", 1e7, lp), 0.0, atol=1e-5)
        np.testing.assert_allclose(_jit_weights(r, "gvpo", 1e-8, lp), compute_weights(r, "drgrpo"), atol=1e-6)


def test_constant_groups_give_no_update():
    for r in ([0.1] * 4, [1 / 3] * 4, [-3.3] * 8, [7.123456] * 2):
        r = np.asarray(r, np.float32)
        lp = np.log(np.arange(1, r.size + 1) / r.size).astype(np.float32)
        for s in ("risk_seeking", "tpo"):
            np.testing.assert_array_equal(_jit_weights(r, s, 0.5, lp), 0.0, err_msg=s)
        np.testing.assert_array_equal(_jit_weights(r, "gvpo", 0.5, np.full_like(r, -1.7)), 0.0)
        np.testing.assert_array_equal(_jit_weights(r, "softmax_ess", 0.3), 1.0)


# --------------------------------------------------------------------------------------------
# Extreme values, non-finite rewards and log-probs, batching, by-index dispatch, errors.


def test_finite_for_huge_rewards_and_log_probs():
    r = np.asarray([1e6, -1e6, 0.0, 5.0], np.float32)
    lp = np.asarray([-1e6, 0.0, -3.0, -1e5], np.float32)
    for tau, frac in ((1.0, 0.5), (1e-6, 0.3), (1e6, 0.99)):
        for s in RECENT:
            w = np.asarray(_jit_weights(r, s, frac if s == "softmax_ess" else tau, lp))
            assert np.all(np.isfinite(w)), (s, tau, w)
    # |r / tau| = 1e6 and tau = 1e-40 (0 in float32): the cold limits, not 0 / 0.
    np.testing.assert_allclose(_jit_weights(r, "risk_seeking", 1.0), [3.0, -1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(_jit_weights(np.asarray([1.0, 0.9, 1.1, 0.95], np.float32), "tpo", 1e-40,
                                            np.zeros(4, np.float32)), [-1.0, -1.0, 3.0, -1.0], atol=1e-6)


MIXED = [[NAN, 1.0, 0.0, 2.0], [3.0, INF, -0.5, 1.0, -INF, 2.0, 2.0, NAN], [INF, 0.5, 0.5, -INF]]


def test_non_finite_rewards_and_log_probs_are_masked():
    for r in MIXED:
        r = np.asarray(r, np.float32)
        ok = np.isfinite(r)
        lp = np.linspace(-3, -1, r.size).astype(np.float32)
        for s in RECENT:
            tau = 0.6
            w = np.asarray(_jit_weights(r, s, tau, lp))
            alone = np.asarray(_jit_weights(r[ok], s, tau, lp[ok]))
            np.testing.assert_array_equal(w[~ok], 0.0, err_msg=s)
            np.testing.assert_allclose(w[ok], alone, rtol=1e-5, atol=1e-6, err_msg=s)
    # A NaN or -inf log-prob masks its sample like a bad reward; so does a bad reference log-prob.
    r = np.asarray([0.0, 1.0, 3.0, 2.0], np.float32)
    lp = np.asarray([-1.0, NAN, -2.0, -INF], np.float32)
    for s in ("gvpo", "tpo"):
        w = np.asarray(_jit_weights(r, s, 0.6, lp))
        np.testing.assert_array_equal(w[[1, 3]], 0.0)
        np.testing.assert_allclose(w[[0, 2]], _jit_weights(r[[0, 2]], s, 0.6, lp[[0, 2]]), rtol=1e-6)
    ref = np.asarray([0.0, 0.0, INF, 0.0], np.float32)
    w = np.asarray(_jit_weights(r, "gvpo", 0.6, np.zeros(4, np.float32), ref))
    assert w[2] == 0.0 and np.all(np.isfinite(w))
    for s in RECENT:  # no finite reward: zeros; one: what a group of one gets
        np.testing.assert_array_equal(_jit_weights(np.full(4, NAN, np.float32), s, 0.5, lp), 0.0)
        one = np.asarray(_jit_weights(np.asarray([NAN, 2.0, INF, -INF], np.float32), s, 0.5, np.zeros(4, np.float32)))
        np.testing.assert_array_equal(one, [0.0, 1.0 if s == "softmax_ess" else 0.0, 0.0, 0.0], err_msg=s)


def test_batched_vmap_and_jit_equal_the_loop():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(2, 3, 8)).astype(np.float32)
    r[0, 1], r[1, 2, :3] = 0.5, r[1, 2, 3]  # a constant group, ties
    lp = -rng.random(size=r.shape).astype(np.float32)
    for s in RECENT:
        tau = 0.4
        batched = np.asarray(_jit_weights(r, s, tau, lp))
        loop = np.stack([np.asarray(compute_weights(g, s, tau=tau, logp=l)) for g, l in
                         zip(r.reshape(-1, 8), lp.reshape(-1, 8))]).reshape(r.shape)
        np.testing.assert_allclose(batched, loop, rtol=1e-6, atol=1e-6, err_msg=s)
    # The core functions take ONE group and vmap from outside; traced taus vmap too.
    flat, lflat = r.reshape(-1, 8), lp.reshape(-1, 8)
    vm = jax.jit(jax.vmap(weighting_recent.tpo, in_axes=(0, None, 0)))(flat, 0.4, lflat)
    np.testing.assert_allclose(vm, _jit_weights(flat, "tpo", 0.4, lflat), rtol=1e-6, atol=1e-6)
    fracs = jnp.asarray([0.2, 0.5, 0.8])
    over = jax.jit(jax.vmap(lambda f: compute_weights(flat[4], "softmax_ess", tau=f)))(fracs)
    for f, w in zip(fracs, over):
        np.testing.assert_allclose(w, _jit_weights(flat[4], "softmax_ess", float(f)), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # chex: a group is rank 1
        weighting_recent.risk_seeking(jnp.zeros((2, 4)), 1.0)


def test_by_index_and_among():
    r = jnp.asarray([[0.0, 1.0, 1.0, 2.0], [NAN, 3.0, -1.0, 3.0], [0.5, 0.5, 0.5, 0.5]])
    lp = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4]] * 3))
    idx = jnp.asarray([weighting.scheme_index(s) for s in RECENT])
    vm = jax.jit(jax.vmap(lambda i: weighting.compute_weights_by_index(r, i, 0.5, lp)))(idx)
    some = jax.jit(jax.vmap(lambda i: weighting.compute_weights_by_index(r, i, 0.5, lp, among=("gvpo", "softmax_ess"))))
    pruned = some(jnp.asarray([weighting.scheme_index(s) for s in ("softmax_ess", "gvpo", "linear")]))
    for k, s in enumerate(RECENT):
        np.testing.assert_allclose(vm[k], _jit_weights(r, s, 0.5, lp), rtol=1e-6, atol=1e-6, err_msg=s)
    np.testing.assert_allclose(pruned[0], vm[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pruned[1], vm[2], rtol=1e-6, atol=1e-6)
    assert np.all(np.isnan(pruned[2]))  # linear is not among them: NaN, not a silent other scheme
    with pytest.raises(ValueError, match="logp"):
        weighting.compute_weights_by_index(r, 0, 0.5, among=("linear", "tpo"))


@pytest.mark.parametrize("scheme,kwargs,word", [
    ("softmax_ess", dict(tau=1.5), "fraction"), ("softmax_ess", dict(tau=0.0), "fraction"),
    ("softmax_ess", dict(tau="auto"), "fraction"), ("softmax_ess", dict(tau=NAN), "fraction"),
    ("softmax_ess", dict(), "tau"), ("risk_seeking", dict(tau=-1.0), "tau"), ("risk_seeking", dict(), "tau"),
    ("gvpo", dict(tau=0.5), "logp"), ("tpo", dict(tau=0.5), "logp"),
    ("tpo", dict(tau=0.5, logp=np.zeros(3, np.float32)), "shape"),
    ("gvpo", dict(tau=0.5, logp=np.zeros(4, np.float32), ref_logp=np.zeros(5, np.float32)), "shape"),
])
def test_errors(scheme, kwargs, word):
    with pytest.raises(ValueError, match=word):
        compute_weights(jnp.asarray([0.0, 1.0, 2.0, 3.0]), scheme, **kwargs)


def test_gradients_and_bfloat16():
    r = jnp.asarray([NAN, 1.0, 0.0, 2.0])
    lp = jnp.asarray([-1.0, -2.0, -0.5, -3.0])
    c = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    for s in RECENT:  # no NaN leaks into a gradient through the masked entry
        g = jax.jit(jax.grad(lambda x, l, s=s: jnp.sum(c * _weights(x, s, 0.6, l)), argnums=(0, 1)))(r, lp)
        for part in g:
            assert np.all(np.isfinite(np.asarray(part))) and float(part[0]) == 0.0, (s, g)
        w = _jit_weights(r.astype(jnp.bfloat16), s, 0.6, lp)
        assert w.dtype == jnp.bfloat16, s
        np.testing.assert_allclose(np.asarray(w, np.float32), _jit_weights(r, s, 0.6, lp), rtol=1e-2, atol=1e-2)

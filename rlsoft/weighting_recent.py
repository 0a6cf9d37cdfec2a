"""Four weighting schemes of the 2025-26 literature, registered into `rlsoft.weighting.SCHEMES`.

Same contract as the schemes of `rlsoft.weighting`: a pure jnp function of ONE group `r: [G]`
(chex-checked), vmapped outside by `compute_weights`; the policy loss is
`L = -(1/G) sum_i w_i log pi(y_i | x)`; non-finite rewards are masked out of their group (weight
exactly 0, the rest weighted as the group of its n finite rewards; `rlsoft.reward_groups`).

  risk_seeking  RS-GRPO (arXiv:2509.24261), beta = 1 / tau; zero-sum.
  softmax_ess   n * softmax(r / tau_g), tau_g set per group so that the effective sample size is
                the fraction `tau` of n (MPO's constrained temperature, arXiv:1806.06920); sums to n.
  gvpo          GVPO (arXiv:2504.19599): (r - mean r) - beta (l - mean l), beta = tau; zero-sum.
  tpo           Target Policy Optimization (arXiv:2604.06159): n (q - p), eta = tau; zero-sum.

gvpo and tpo read the samples' sequence log-probs (`NEEDS_LOGP`): they are called as
`fn(r, tau, logp, ref_logp)` with `logp[i] = log pi_old(y_i)` under the policy that drew the group
and `ref_logp[i] = log pi_ref(y_i)` (zeros when there is no reference). A sample whose log-probs
are not finite is masked out like a non-finite reward.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlsoft import weighting
from rlsoft.reward_groups import finite_group

# softmax_ess: bisection on log(tau_g / spread) over [log 1e-9, log 1e4], spread = max r - min r.
# Below 1e-9 every gap between float32 rewards is >= 60 tau_g (the cold limit, ESS = #best); above
# 1e4, ESS >= n (1 - 1e-8). 32 halvings of the 30-nat bracket reach 7e-9, past float32's resolution.
ESS_LOG_BRACKET = (-20.72326583694641, 9.210340371976184)
ESS_ITERATIONS = 32


def _masked_softmax(z: chex.Array, mask: chex.Array) -> chex.Array:
    """softmax of z over the entries in `mask` (0 elsewhere); entries of z may be -inf, and the
    max entry contributes exp(0) = 1, so an empty mask gives zeros, never 0 / 0."""
    top = jnp.max(jnp.where(mask, z, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, z - top, 0.0)), 0.0)
    return e / jnp.maximum(jnp.sum(e), 1.0)


def _cold_divide(d: chex.Array, tau: chex.Array) -> chex.Array:
    """d / tau for d <= 0 (max d ~ 0), with tau at least float's smallest normal: a tau that underflows
    to 0 gives the tau -> 0 limit (-inf, and a finite max entry), never 0 / 0. Not a where(d < 0):
    under jit XLA may recompute d in two fusions, and its max entry can come out -4e-8, not 0."""
    return d / jnp.maximum(tau, jnp.finfo(d.dtype).tiny)


def risk_seeking(r: chex.Array, tau: weighting.Tau = None) -> chex.Array:
    """RS-GRPO (arXiv:2509.24261): w_i = (exp(beta (r_i - s)) - 1) / beta with beta = 1 / tau and
    s = (logsumexp(beta r) - log G) / beta, i.e. w = tau (G softmax(r / tau) - 1).

    tau -> inf gives r - mean (Dr. GRPO); tau -> 0 gives tau (best_of_n - 1) -> 0. Computed as
    w = tau expm1(x_i - log1p(mean_j expm1(x_j))), x = (r - max r) / tau <= 0: the same identity
    (exp(beta (r - s)) = exp(x) / mean(exp(x)) = G softmax(beta r)), finite for any |r / tau|, and,
    unlike tau (G softmax - 1), exact in the tau >> spread limit, where the softmax form cancels
    down to tau * float eps. "auto" tau: half the range of r. Zero-sum; a constant group gives 0.
    """
    chex.assert_rank(r, 1)
    f = finite_group(r)
    t = weighting.resolve_tau(f.filled, tau)
    x = _cold_divide(f.filled - jnp.max(f.filled), t)
    a = jnp.sum(jnp.where(f.mask, jnp.expm1(x), 0.0)) / jnp.maximum(f.n, 1.0)  # in (-1, 0]
    return jnp.where(f.mask, t * jnp.expm1(x - jnp.log1p(a)), 0.0)


def softmax_ess(r: chex.Array, tau: weighting.Tau = None) -> chex.Array:
    """n softmax(r / tau_g) with tau_g chosen per group so that ESS = (sum w)^2 / sum w^2 = tau * n.

    Here `tau` is NOT a temperature but the target fraction of the effective sample size, in
    (0, 1]; the temperature is set by that constraint, as MPO sets its temperature by a KL bound
    (Abdolmaleki et al. 2018, "Maximum a Posteriori Policy Optimisation", arXiv:1806.06920; rlax
    `mpo_ops`): a scale-free, per-group "auto" tau. ESS(tau_g) rises monotonically from k (the
    samples tied for the best reward, tau_g -> 0) to n (tau_g -> inf), so tau_g is found by a
    fixed-count bisection on log(tau_g / (max r - min r)) (lax.fori_loop; ESS_LOG_BRACKET).
    A target tau * n <= k is out of reach: best_of_n (n / k on the best); tau = 1 or a constant
    group: ones. Invariant to shifting and positively scaling r. Sums to n.
    """
    chex.assert_rank(r, 1)
    f = finite_group(r)
    frac = jnp.asarray(tau, r.dtype)
    d = f.filled - jnp.max(f.filled)  # <= 0
    spread = -jnp.min(d)
    scaled = d / jnp.where(spread > 0, spread, 1.0)  # in [-1, 0]
    best = f.mask & (d == 0)
    k = jnp.sum(best).astype(r.dtype)
    target = frac * f.n

    def weights(log_t):
        return f.n * _masked_softmax(scaled / jnp.exp(log_t), f.mask)

    def ess(log_t):
        w = weights(log_t)
        return f.n * f.n / jnp.maximum(jnp.sum(w * w), 1e-30)

    def halve(_, bracket):
        lo, hi = bracket
        mid = (lo + hi) / 2
        below = ess(mid) < target
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, ESS_ITERATIONS, halve, tuple(jnp.asarray(b, r.dtype) for b in ESS_LOG_BRACKET))
    solved = weights((lo + hi) / 2)
    cold = f.n * best.astype(r.dtype) / jnp.maximum(k, 1.0)
    uniform = f.mask.astype(r.dtype)
    return jnp.where((spread > 0) & (frac < 1), jnp.where(target > k, solved, cold), uniform)


def _finite_with(r: chex.Array, *logps: chex.Array) -> chex.Array:
    """r with NaN where a log-prob is not finite: such samples are masked out like bad rewards."""
    ok = jnp.ones(r.shape, bool)
    for lp in logps:
        ok &= jnp.isfinite(lp)
    return jnp.where(ok, r, jnp.nan)


def gvpo(r: chex.Array, tau: weighting.Tau, logp: chex.Array, ref_logp: chex.Array | None = None) -> chex.Array:
    """GVPO (Group Variance Policy Optimization, arXiv:2504.19599), its per-sample gradient weight:

        w_i = (r_i - mean r) - beta (l_i - mean l),   l_i = log pi_old(y_i) - log pi_ref(y_i),

    beta = tau, means over the group. Its optimum is pi* ∝ pi_ref exp(r / beta), reached when
    beta (l_i - mean l) = r_i - mean r; w is zero-sum. Without a reference (`ref_logp` None or
    zeros) l_i = log pi_old(y_i): a uniform reference, whose constant log-prob cancels in the
    centring, so the target is the Boltzmann policy exp(r / beta) itself. "auto" tau: half the
    range of r. A constant group with equal log-probs gives exactly 0.
    """
    chex.assert_rank([r, logp], 1)
    chex.assert_equal_shape([r, logp])
    l = logp if ref_logp is None else logp - ref_logp
    r = _finite_with(r, l)
    f = finite_group(r)
    beta = weighting.resolve_tau(f.filled, tau)
    # drgrpo is the exactly-centred r - mean over the finite entries (0 on the others), of l too.
    return weighting.drgrpo(r) - beta * weighting.drgrpo(jnp.where(f.mask, l, jnp.nan))


def tpo(r: chex.Array, tau: weighting.Tau, logp: chex.Array, ref_logp: chex.Array | None = None) -> chex.Array:
    """Target Policy Optimization (arXiv:2604.06159) at the start of an update, scaled by n:

        w_i = n (q_i - p_i),   q = softmax(logp_old + u / eta),   p = softmax(logp_old),

    over the group, u = GRPO's whitened reward (`linear`), eta = tau. TPO minimises the cross-entropy
    from the target q_i ∝ p_old,i exp(u_i / eta) to p = the group-softmax of the current sequence
    log-probs; its gradient w.r.t. log pi(y_i) is p_i - q_i, so with p = p_old (current == old)
    the loss -(1/n) sum_i w_i log pi(y_i) has exactly TPO's gradient: the scale n makes w
    comparable with the other schemes (sum |w| is O(n), like an advantage). Zero-sum; a constant
    reward group gives exactly 0. `ref_logp` is unused (TPO has no reference). "auto" tau: half
    the range of u. eta -> 0: all of q on the best rewards (in proportion to p_old).
    """
    del ref_logp
    chex.assert_rank([r, logp], 1)
    chex.assert_equal_shape([r, logp])
    r = _finite_with(r, logp)
    f = finite_group(r)
    u = weighting.linear(r)  # 0 on the masked entries, within [min u, max u] of the finite ones
    eta = weighting.resolve_tau(u, tau)
    lp = jnp.where(f.mask, logp, 0.0)
    top = jnp.max(jnp.where(f.mask, u, -jnp.inf))
    x = _cold_divide(u - jnp.where(jnp.isfinite(top), top, 0.0), eta)
    q = _masked_softmax(lp + x, f.mask)
    p = _masked_softmax(lp, f.mask)
    informative = jnp.any(f.mask & (u != 0))  # u = 0 on a constant group: q = p, exactly no update
    return jnp.where(f.mask & informative, f.n * (q - p), 0.0)


weighting.register_scheme("risk_seeking", risk_seeking, needs_tau=True)
weighting.register_scheme("softmax_ess", softmax_ess, tau_is_fraction=True)
weighting.register_scheme("gvpo", gvpo, needs_tau=True, needs_logp=True)
weighting.register_scheme("tpo", tpo, needs_tau=True, needs_logp=True)
SCHEMES = ("risk_seeking", "softmax_ess", "gvpo", "tpo")  # the names this module registers

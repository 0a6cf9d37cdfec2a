"""Weighting schemes: one group of rewards `r: [G]` -> per-sample policy-gradient weights `w: [G]`.

Every scheme is a pure jnp function of ONE unbatched group (checked with chex); `compute_weights`
vmaps it over any leading axes. The policy loss that consumes the weights is
`L = -(1/G) sum_i w_i log pi(y_i | x)`, so `w_i` plays the role of an advantage.

Sources:
  * GRPO whitening as in GRPO-Zero (`grpo.py: normalize_rewards_per_group`): (r - mean) / (std + 1e-4).
  * Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): r - mean.
  * RLOO (Ahmadian et al. 2024): r_i - mean_{j != i} r_j.
  * Softmax / Boltzmann weighting, the AWR view (Peng et al. 2019; seeds 000 and 001):
    G * softmax(r / tau), scaled so that the weights sum to G like uniform weights of 1.
  * Gaussian quantile normalisation (seed 000): Phi^-1((rank - 1/2) / G) with average ranks for ties.

Schemes that need a temperature: softmax, softmax_centered, quantile_softmax. `tau` may be a
positive float, "auto" (= range of the softmax input / 2, the rule derived in seed 001), or a jnp
scalar (so that a sweep can vmap over it; traced values cannot be validated at trace time).

Four schemes of the 2025-26 literature live in `rlsoft.weighting_recent` and register themselves
here (`register_scheme`): risk_seeking, softmax_ess (its tau is a target fraction in (0, 1], the
schemes in TAU_IS_FRACTION), and gvpo and tpo, which also need the samples' sequence log-probs
(NEEDS_LOGP: `compute_weights(..., logp=, ref_logp=)`).

Non-finite rewards, one policy for every scheme (`rlsoft.reward_groups`): a NaN, +inf or -inf
reward is masked out of its group. Its weight is exactly 0 and the other samples are weighted as
if it were absent, i.e. by the scheme on the group of its n finite rewards (softmax and best_of_n
weights then sum to n, not G). A group with no finite reward gets all-zero weights; one with a
single finite reward gets what the scheme gives a group of one (1 for softmax, quantile_softmax
and best_of_n, the reward itself for raw, 0 for the others, rloo included). They are counted per
group by `weight_stats(...)["nonfinite_rewards"]` (summed over the batch by
`summarize_weight_stats`) and by `count_nonfinite`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Union

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from rlsoft.reward_groups import FiniteGroup, as_float, finite_group, validate_group_shape
from rlsoft.reward_groups import count_nonfinite  # noqa: F401  (re-export)
from rlsoft.weight_stats import (  # noqa: F401  (re-export: the per-group diagnostics)
    SUMMED_STATS, WEIGHT_SHAPE_STATS, group_weight_stats, summarize_weight_stats, weight_stats,
)

Tau = Union[float, str, jax.Array, None]

GRPO_EPS = 1e-4  # GRPO-Zero's `std + 1e-4`.


# --------------------------------------------------------------------------------------------
# Helpers on one group. `f = finite_group(r)`: mask, count n, finite stand-in `f.filled`.


def _assert_group(r: chex.Array) -> None:
    chex.assert_rank(r, 1)


def average_ranks(r: chex.Array) -> chex.Array:
    """1-based ranks of one group, ties sharing their average rank.

    rank_i = #{j: r_j < r_i} + (#{j: r_j == r_i} + 1) / 2.  O(G^2), exact, no sort needed.
    Ranks among the finite rewards only: pass `where(finite, r, inf)` (+inf is never < or == a
    finite value, so the finite entries' ranks are those of the group without the others).
    """
    _assert_group(r)
    less = jnp.sum(r[None, :] < r[:, None], axis=1)
    equal = jnp.sum(r[None, :] == r[:, None], axis=1)
    return less.astype(r.dtype) + (equal.astype(r.dtype) + 1.0) / 2.0


def _finite_ranks(r: chex.Array, f: FiniteGroup) -> chex.Array:
    return average_ranks(jnp.where(f.mask, r, jnp.inf))


def _centre(f: FiniteGroup) -> chex.Array:
    """r - mean(r) over the finite rewards (0 elsewhere), measured from one of them (f.ref) so that
    an all-equal group gives exactly 0.

    jnp.mean of G equal floats is not always that float (e.g. 3 x 0.1 in float32), so the plain
    r - mean(r) left ~1e-8 on a constant group, which linear's std division blew up to ~1e-4.
    """
    d = f.filled - f.ref  # exactly 0 on the non-finite entries
    return jnp.where(f.mask, d - jnp.sum(d) / jnp.maximum(f.n, 1.0), 0.0)


def _softmax_times_n(x: chex.Array, f: FiniteGroup, tau: chex.Array) -> chex.Array:
    """n * softmax(x / tau) over the finite entries (0 elsewhere), computed as exp((x - max x) / tau)
    so |x / tau| up to 1e6 stays finite. `x` must be finite (filled); the max entries get exp(0) = 1
    whatever tau (a tau that underflows to 0 in float32 gives the tau -> 0 limit, not 0 / 0), so the
    sum is >= 1 whenever n >= 1, and an empty group gives zeros."""
    d = x - jnp.max(x)
    e = jnp.where(f.mask, jnp.exp(jnp.where(d < 0, d / tau, 0.0)), 0.0)
    return f.n * e / jnp.maximum(jnp.sum(e), 1.0)


def resolve_tau(x: chex.Array, tau) -> chex.Array:
    """tau as a scalar array; "auto" is (max x - min x) / 2 (seed 001), 1 for a constant group."""
    if isinstance(tau, str):  # validated to be "auto" by compute_weights
        spread = (jnp.max(x) - jnp.min(x)) / 2.0
        return jnp.where(spread > 0, spread, jnp.ones_like(spread))
    return jnp.asarray(tau, x.dtype)


# --------------------------------------------------------------------------------------------
# The schemes, one group each; non-finite rewards are masked out (module docstring).


def linear(r: chex.Array, tau: Tau = None) -> chex.Array:
    """GRPO: (r - mean) / (std + 1e-4), population std (GRPO-Zero's exact formula)."""
    del tau
    _assert_group(r)
    f = finite_group(r)
    c = _centre(f)
    return c / (jnp.sqrt(jnp.sum(c * c) / jnp.maximum(f.n, 1.0)) + GRPO_EPS)


def drgrpo(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Dr. GRPO: r - mean (no std division)."""
    del tau
    _assert_group(r)
    return _centre(finite_group(r))


def rloo(r: chex.Array, tau: Tau = None) -> chex.Array:
    """RLOO: r_i - (sum_j r_j - r_i) / (n - 1)  ==  n / (n - 1) * (r_i - mean); 0 when n = 1."""
    del tau
    _assert_group(r)
    f = finite_group(r)
    d = f.filled - f.ref  # exact zeros on an all-equal group (see _centre), and on masked entries
    return jnp.where(f.mask, d - (jnp.sum(d) - d) / jnp.maximum(f.n - 1.0, 1.0), 0.0)


def softmax(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Boltzmann / AWR: G * softmax(r / tau). Sums to G; tau -> 0 is best_of_n, tau -> inf is 1."""
    _assert_group(r)
    f = finite_group(r)
    return _softmax_times_n(f.filled, f, resolve_tau(f.filled, tau))


def softmax_centered(r: chex.Array, tau: Tau = None) -> chex.Array:
    """G * softmax(r / tau) - 1. Sums to zero, so below-average samples are pushed down."""
    return jnp.where(jnp.isfinite(r), softmax(r, tau) - 1.0, 0.0)


def quantile(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Gaussian quantile normalisation: Phi^-1((rank - 0.5) / G), average ranks for ties.

    Matches all moments of N(0, 1) up to the grid, not just mean and std (seed 000).
    Equal rewards get equal weights; an all-equal group gets Phi^-1(1/2) = 0.
    """
    del tau
    _assert_group(r)
    f = finite_group(r)
    p = (_finite_ranks(r, f) - 0.5) / jnp.maximum(f.n, 1.0)
    return jnp.where(f.mask, ndtri(jnp.where(f.mask, p, 0.5)), 0.0)


def quantile_softmax(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Quantile first, then G * softmax(q / tau). "auto" tau uses the range of q."""
    f = finite_group(r)
    q = quantile(r)  # 0 on the masked entries, which is within [min q, max q] of the finite ones
    return _softmax_times_n(q, f, resolve_tau(q, tau))


def rank(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Centred average ranks, rank - (G + 1) / 2, scaled to unit population std (0 if all equal)."""
    del tau
    _assert_group(r)
    f = finite_group(r)
    c = jnp.where(f.mask, _finite_ranks(r, f) - (f.n + 1.0) / 2.0, 0.0)
    s = jnp.sqrt(jnp.sum(c * c) / jnp.maximum(f.n, 1.0))
    return jnp.where(s > 0, c / jnp.where(s > 0, s, 1.0), jnp.zeros_like(c))


def best_of_n(r: chex.Array, tau: Tau = None) -> chex.Array:
    """All weight on the best sample: G / k on each of the k samples tied for max, 0 elsewhere.

    The tau -> 0 limit of `softmax`.
    """
    del tau
    _assert_group(r)
    f = finite_group(r)
    best = (f.mask & (f.filled == jnp.max(f.filled))).astype(r.dtype)
    return f.n * best / jnp.maximum(jnp.sum(best), 1.0)


def raw(r: chex.Array, tau: Tau = None) -> chex.Array:
    """REINFORCE without a baseline: w = r."""
    del tau
    _assert_group(r)
    return jnp.where(jnp.isfinite(r), r, 0.0)


SchemeFn = Callable[[chex.Array, Tau], chex.Array]

SCHEMES: dict[str, SchemeFn] = {
    "linear": linear,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "softmax": softmax,
    "softmax_centered": softmax_centered,
    "quantile": quantile,
    "quantile_softmax": quantile_softmax,
    "rank": rank,
    "best_of_n": best_of_n,
    "raw": raw,
}
SCHEME_NAMES: tuple[str, ...] = tuple(SCHEMES)
NEEDS_TAU: frozenset[str] = frozenset({"softmax", "softmax_centered", "quantile_softmax"})
# Schemes called as fn(r, tau, logp, ref_logp) with the samples' sequence log-probs (see compute_weights).
NEEDS_LOGP: frozenset[str] = frozenset()
# Schemes whose tau is a fraction in (0, 1], not a temperature ("auto" is refused).
TAU_IS_FRACTION: frozenset[str] = frozenset()


def register_scheme(name: str, fn: Callable, *, needs_tau: bool = False, needs_logp: bool = False,
                    tau_is_fraction: bool = False) -> None:
    """Add a one-group scheme to SCHEMES (appended: the indices of the others do not move)."""
    global SCHEME_NAMES, NEEDS_TAU, NEEDS_LOGP, TAU_IS_FRACTION
    if name in SCHEMES:
        raise ValueError(f"scheme={name!r} is already registered")
    SCHEMES[name] = fn
    SCHEME_NAMES = tuple(SCHEMES)
    NEEDS_TAU = NEEDS_TAU | ({name} if needs_tau or tau_is_fraction else set())
    NEEDS_LOGP = NEEDS_LOGP | ({name} if needs_logp else set())
    TAU_IS_FRACTION = TAU_IS_FRACTION | ({name} if tau_is_fraction else set())


# --------------------------------------------------------------------------------------------
# Validation and the batched entry points.


def validate_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; allowed: {', '.join(SCHEME_NAMES)}")


def validate_tau(tau: Tau, scheme: str | None = None) -> None:
    """Raise ValueError for a tau that cannot work. Traced tau is accepted unchecked."""
    if tau is None:
        if scheme in NEEDS_TAU:
            raise ValueError(f"scheme={scheme!r} needs tau: a float > 0 or 'auto'")
        return
    if scheme in TAU_IS_FRACTION:
        allowed = f"scheme={scheme!r} takes tau as a fraction: a float in (0, 1]"
        if isinstance(tau, str) or not isinstance(tau, jax.core.Tracer) and not _is_float_in(tau, 0.0, 1.0):
            raise ValueError(f"tau={tau!r} is invalid; {allowed}")
        return
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"tau={tau!r} is invalid; allowed: a finite float > 0 or 'auto'")
        return
    if not isinstance(tau, jax.core.Tracer) and not _is_float_in(tau, 0.0, math.inf):
        raise ValueError(f"tau={tau!r} is invalid; allowed: a finite float > 0 or 'auto'")


def _is_float_in(tau, lo: float, hi: float) -> bool:
    """A finite float (or scalar array) in (lo, hi]."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and lo < value <= hi


def _compute_dtype(dtype) -> jnp.dtype:
    # Low-precision inputs are computed in float32 (ndtri, exp) and cast back.
    return jnp.promote_types(dtype, jnp.float32)


def _over_groups(fn: Callable[..., chex.Array], rewards: jax.Array, *more: jax.Array) -> jax.Array:
    """vmap a one-group function over all leading axes of `rewards: [..., G]` (and of `more`,
    arrays of the same shape: the groups' log-probs)."""
    lead, g = rewards.shape[:-1], rewards.shape[-1]
    flat = [x.reshape((-1, g)) for x in (rewards,) + more]
    return jax.vmap(fn)(*flat).reshape(lead + (g,))


def _log_probs(work: jax.Array, logp, ref_logp, needed: bool, what: str):
    """(logp, ref_logp) as arrays shaped like the rewards (ref_logp 0 when absent), or a ValueError."""
    if logp is None:
        if needed:
            raise ValueError(f"{what} needs logp: the samples' sequence log-probs under the policy that drew "
                             "them, shaped like rewards")
        return jnp.zeros_like(work), jnp.zeros_like(work)
    out = []
    for name, x in (("logp", logp), ("ref_logp", ref_logp)):
        x = jnp.zeros_like(work) if x is None else jnp.asarray(x)
        if x.shape != work.shape:
            raise ValueError(f"{name} must have the rewards' shape {work.shape}; got {x.shape}")
        out.append(x.astype(work.dtype))
    return tuple(out)


def compute_weights(rewards, scheme: str, *, tau: Tau = None, logp=None, ref_logp=None) -> jax.Array:
    """Weights for `rewards: [..., G]` under `scheme`, groups on the last axis; same shape and dtype.

    `logp` (a NEEDS_LOGP scheme needs it; the others ignore it): each sample's sequence log-prob
    log pi_old(y_i) under the policy that drew it, shaped like `rewards`; `ref_logp`, optional, the
    same under a reference policy (gvpo's log-ratio; absent, the reference is uniform).
    Non-finite rewards get weight 0 and the rest of their group is weighted without them (module
    docstring). Raises ValueError (at trace time) for an unknown scheme, an invalid tau, a missing
    tau or logp for a scheme that needs one, or G < 2.
    """
    validate_scheme(scheme)
    validate_tau(tau, scheme)
    rewards = as_float(rewards)
    validate_group_shape(rewards)
    fn = SCHEMES[scheme]
    work = rewards.astype(_compute_dtype(rewards.dtype))
    if scheme in NEEDS_TAU and not isinstance(tau, str) and jnp.ndim(tau) > 0:
        raise ValueError(f"tau must be a scalar here; got shape {jnp.shape(tau)} (vmap over taus instead)")
    if scheme not in NEEDS_LOGP:
        return _over_groups(lambda r: fn(r, tau), work).astype(rewards.dtype)
    lp, ref = _log_probs(work, logp, ref_logp, True, f"scheme={scheme!r}")
    return _over_groups(lambda r, l, q: fn(r, tau, l, q), work, lp, ref).astype(rewards.dtype)


def compute_weights_by_index(rewards, scheme_index, tau, logp=None, ref_logp=None, *,
                             among: tuple[str, ...] | None = None) -> jax.Array:
    """Like `compute_weights` but with the scheme as a (possibly traced) index into SCHEME_NAMES.

    Lets a compiled sweep vmap over schemes: under vmap `lax.switch` evaluates every branch and
    selects, so `among` (static) names the schemes the index can pick, and only those are built;
    an index outside them gets NaN weights. Default: every scheme, or every scheme but the
    NEEDS_LOGP ones when `logp` is None. `tau` must be a float or jnp scalar here.
    """
    rewards = as_float(rewards)
    validate_group_shape(rewards)
    work = rewards.astype(_compute_dtype(rewards.dtype))
    tau = jnp.asarray(tau, work.dtype)
    if among is None:
        among = tuple(n for n in SCHEME_NAMES if logp is not None or n not in NEEDS_LOGP)
    among = tuple(among)
    for n in among:
        validate_scheme(n)
    needed = [n for n in among if n in NEEDS_LOGP]
    lp, ref = _log_probs(work, logp, ref_logp, bool(needed), f"scheme={needed[0]!r}" if needed else "")
    branches = [functools.partial(_branch, SCHEMES[n], n in NEEDS_LOGP) for n in among]
    index = scheme_index
    if among != SCHEME_NAMES:  # positions in `among`; the others -> the NaN branch
        table = [among.index(n) if n in among else len(among) for n in SCHEME_NAMES]
        index = jnp.asarray(table, jnp.int32)[scheme_index]
        branches.append(lambda r, t, l, q: jnp.full_like(r, jnp.nan))
    one = lambda r, l, q: jax.lax.switch(index, branches, r, tau, l, q)
    return _over_groups(one, work, lp, ref).astype(rewards.dtype)


def _branch(fn: Callable, uses_logp: bool, r, tau, logp, ref_logp):
    return fn(r, tau, logp, ref_logp) if uses_logp else fn(r, tau)


def scheme_index(scheme: str) -> int:
    validate_scheme(scheme)
    return SCHEME_NAMES.index(scheme)


from rlsoft.schedules import TAU_SCHEDULES, make_tau_schedule  # noqa: E402  (re-export)
# Last: the 2025-26 schemes build on the ones above and register themselves (register_scheme).
from rlsoft import weighting_recent  # noqa: E402,F401

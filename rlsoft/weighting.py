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
"""
from __future__ import annotations

import math
from typing import Callable, Union

import chex
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

Tau = Union[float, str, jax.Array, None]

GRPO_EPS = 1e-4  # GRPO-Zero's `std + 1e-4`.
_TINY = 1e-30


# --------------------------------------------------------------------------------------------
# Helpers on one group.


def _assert_group(r: chex.Array) -> None:
    chex.assert_rank(r, 1)


def average_ranks(r: chex.Array) -> chex.Array:
    """1-based ranks of one group, ties sharing their average rank.

    rank_i = #{j: r_j < r_i} + (#{j: r_j == r_i} + 1) / 2.  O(G^2), exact, no sort needed.
    """
    _assert_group(r)
    less = jnp.sum(r[None, :] < r[:, None], axis=1)
    equal = jnp.sum(r[None, :] == r[:, None], axis=1)
    return less.astype(r.dtype) + (equal.astype(r.dtype) + 1.0) / 2.0


def _centre(r: chex.Array) -> chex.Array:
    """r - mean(r), measured from r[0] so that an all-equal group gives exactly 0.

    jnp.mean of G equal floats is not always that float (e.g. 3 x 0.1 in float32), so the plain
    r - mean(r) left ~1e-8 on a constant group, which linear's std division blew up to ~1e-4.
    """
    d = r - r[0]
    return d - jnp.mean(d)


def _softmax_times_g(x: chex.Array, tau: chex.Array) -> chex.Array:
    """G * softmax(x / tau), computed as exp((x - max x) / tau) so |x / tau| up to 1e6 stays finite."""
    g = x.shape[-1]
    z = (x - jnp.max(x)) / tau
    e = jnp.exp(z)
    return g * e / jnp.sum(e)


def _resolve_tau(x: chex.Array, tau) -> chex.Array:
    """tau as a scalar array; "auto" is (max x - min x) / 2 (seed 001), 1 for a constant group."""
    if isinstance(tau, str):  # validated to be "auto" by compute_weights
        spread = (jnp.max(x) - jnp.min(x)) / 2.0
        return jnp.where(spread > 0, spread, jnp.ones_like(spread))
    return jnp.asarray(tau, x.dtype)


# --------------------------------------------------------------------------------------------
# The schemes, one group each.


def linear(r: chex.Array, tau: Tau = None) -> chex.Array:
    """GRPO: (r - mean) / (std + 1e-4), population std (GRPO-Zero's exact formula)."""
    del tau
    _assert_group(r)
    c = _centre(r)
    return c / (jnp.sqrt(jnp.mean(c * c)) + GRPO_EPS)


def drgrpo(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Dr. GRPO: r - mean (no std division)."""
    del tau
    _assert_group(r)
    return _centre(r)


def rloo(r: chex.Array, tau: Tau = None) -> chex.Array:
    """RLOO: r_i - (sum_j r_j - r_i) / (G - 1)  ==  G / (G - 1) * (r_i - mean)."""
    del tau
    _assert_group(r)
    g = r.shape[0]
    d = r - r[0]  # exact zeros on an all-equal group (see _centre)
    return d - (jnp.sum(d) - d) / (g - 1)


def softmax(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Boltzmann / AWR: G * softmax(r / tau). Sums to G; tau -> 0 is best_of_n, tau -> inf is 1."""
    _assert_group(r)
    return _softmax_times_g(r, _resolve_tau(r, tau))


def softmax_centered(r: chex.Array, tau: Tau = None) -> chex.Array:
    """G * softmax(r / tau) - 1. Sums to zero, so below-average samples are pushed down."""
    return softmax(r, tau) - 1.0


def quantile(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Gaussian quantile normalisation: Phi^-1((rank - 0.5) / G), average ranks for ties.

    Matches all moments of N(0, 1) up to the grid, not just mean and std (seed 000).
    Equal rewards get equal weights; an all-equal group gets Phi^-1(1/2) = 0.
    """
    del tau
    _assert_group(r)
    g = r.shape[0]
    return ndtri((average_ranks(r) - 0.5) / g)


def quantile_softmax(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Quantile first, then G * softmax(q / tau). "auto" tau uses the range of q."""
    q = quantile(r)
    return _softmax_times_g(q, _resolve_tau(q, tau))


def rank(r: chex.Array, tau: Tau = None) -> chex.Array:
    """Centred average ranks, rank - (G + 1) / 2, scaled to unit population std (0 if all equal)."""
    del tau
    _assert_group(r)
    g = r.shape[0]
    c = average_ranks(r) - (g + 1) / 2.0
    s = jnp.std(c)
    return jnp.where(s > 0, c / jnp.where(s > 0, s, 1.0), jnp.zeros_like(c))


def best_of_n(r: chex.Array, tau: Tau = None) -> chex.Array:
    """All weight on the best sample: G / k on each of the k samples tied for max, 0 elsewhere.

    The tau -> 0 limit of `softmax`.
    """
    del tau
    _assert_group(r)
    g = r.shape[0]
    best = (r == jnp.max(r)).astype(r.dtype)
    return g * best / jnp.sum(best)


def raw(r: chex.Array, tau: Tau = None) -> chex.Array:
    """REINFORCE without a baseline: w = r."""
    del tau
    _assert_group(r)
    return r


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
# Schemes whose weights of an all-equal group are exactly zero (no gradient from such a group).
CENTRED: frozenset[str] = frozenset({"linear", "drgrpo", "rloo", "softmax_centered", "quantile", "rank"})


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
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"tau={tau!r} is invalid; allowed: a finite float > 0 or 'auto'")
        return
    if isinstance(tau, jax.core.Tracer):
        return
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau={tau!r} is invalid; allowed: a finite float > 0 or 'auto'") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"tau={value!r} is invalid; allowed: a finite float > 0 or 'auto'")


def _validate_rewards(rewards: chex.Array) -> None:
    if jnp.ndim(rewards) < 1 or jnp.shape(rewards)[-1] < 2:
        raise ValueError(
            f"rewards must have a group axis last with G >= 2; got shape {jnp.shape(rewards)}"
        )


def _as_float(rewards) -> jax.Array:
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    return rewards


def _compute_dtype(dtype) -> jnp.dtype:
    # Low-precision inputs are computed in float32 (ndtri, exp) and cast back.
    return jnp.promote_types(dtype, jnp.float32)


def _over_groups(fn: Callable[[chex.Array], chex.Array], rewards: jax.Array) -> jax.Array:
    """vmap a one-group function over all leading axes of `rewards: [..., G]`."""
    lead = rewards.shape[:-1]
    flat = rewards.reshape((-1, rewards.shape[-1]))
    return jax.vmap(fn)(flat).reshape(lead + (rewards.shape[-1],))


def compute_weights(rewards, scheme: str, *, tau: Tau = None) -> jax.Array:
    """Weights for `rewards: [..., G]` under `scheme`, groups on the last axis; same shape and dtype.

    Raises ValueError (at trace time) for an unknown scheme, an invalid tau, a missing tau for a
    scheme that needs one, or G < 2.
    """
    validate_scheme(scheme)
    validate_tau(tau, scheme)
    rewards = _as_float(rewards)
    _validate_rewards(rewards)
    fn = SCHEMES[scheme]
    work = rewards.astype(_compute_dtype(rewards.dtype))
    if scheme in NEEDS_TAU and not isinstance(tau, str) and jnp.ndim(tau) > 0:
        raise ValueError(f"tau must be a scalar here; got shape {jnp.shape(tau)} (vmap over taus instead)")
    return _over_groups(lambda r: fn(r, tau), work).astype(rewards.dtype)


def compute_weights_by_index(rewards, scheme_index, tau) -> jax.Array:
    """Like `compute_weights` but with the scheme as a (possibly traced) index into SCHEME_NAMES.

    Lets a compiled sweep vmap over schemes: under vmap `lax.switch` evaluates every branch and
    selects, which is cheap next to the rest of a step. `tau` must be a float or jnp scalar here.
    """
    rewards = _as_float(rewards)
    _validate_rewards(rewards)
    work = rewards.astype(_compute_dtype(rewards.dtype))
    tau = jnp.asarray(tau, work.dtype)
    branches = [lambda r, t, f=SCHEMES[n]: f(r, t) for n in SCHEME_NAMES]
    one = lambda r: jax.lax.switch(scheme_index, branches, r, tau)
    return _over_groups(one, work).astype(rewards.dtype)


def scheme_index(scheme: str) -> int:
    validate_scheme(scheme)
    return SCHEME_NAMES.index(scheme)


# --------------------------------------------------------------------------------------------
# Diagnostics (seed 000, "Specific metrics to log").

WEIGHT_SHAPE_STATS = ("max_weight", "entropy", "effective_n", "weight_on_best", "mass_on_best")


def group_weight_stats(w: chex.Array, r: chex.Array) -> dict[str, chex.Array]:
    """Statistics of one group's weights `w: [G]` given its rewards `r: [G]`.

    With p = |w| / sum|w|:  entropy = -sum p log p,  effective_n = 1 / sum p^2  (seed 000).
    weight_on_best is the mean weight of the samples tied for the best reward (the seed's
    "weight on correct"); mass_on_best is their share of sum|w|. A group whose weights are all
    zero (a centred scheme on equal rewards) gives no gradient: entropy = effective_n = 0 there.
    """
    chex.assert_rank([w, r], 1)
    chex.assert_equal_shape([w, r])
    a = jnp.abs(w)
    total = jnp.sum(a)
    live = total > 0
    p = a / jnp.where(live, total, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    best = r == jnp.max(r)
    n_best = jnp.sum(best)
    zero_std = jnp.all(r == r[0])
    return {
        "max_weight": jnp.max(w),
        "min_weight": jnp.min(w),
        "weight_sum": jnp.sum(w),
        "entropy": jnp.where(live, -jnp.sum(plogp), 0.0),
        "effective_n": jnp.where(live, 1.0 / jnp.maximum(jnp.sum(p * p), _TINY), 0.0),
        "weight_on_best": jnp.sum(jnp.where(best, w, 0.0)) / n_best,
        "mass_on_best": jnp.sum(jnp.where(best, p, 0.0)),
        "reward_mean": jnp.mean(r),
        "reward_std": jnp.std(r),
        "zero_std": zero_std.astype(w.dtype),
    }


def weight_stats(weights, rewards) -> dict[str, jax.Array]:
    """Per-group stats for `weights, rewards: [..., G]`; each value has shape `[...]`."""
    weights = _as_float(weights)
    rewards = _as_float(rewards).astype(weights.dtype)
    chex.assert_equal_shape([weights, rewards])
    _validate_rewards(rewards)
    lead = weights.shape[:-1]
    g = weights.shape[-1]
    stats = jax.vmap(group_weight_stats)(weights.reshape(-1, g), rewards.reshape(-1, g))
    return {k: v.reshape(lead) for k, v in stats.items()}


def summarize_weight_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Batch means for logging.

    The weight-shape stats (WEIGHT_SHAPE_STATS) are averaged over informative groups only (those
    whose rewards are not all equal), because on a constant group every scheme is trivially flat
    and would mask the comparison; `zero_std_frac` reports how many groups were left out.
    """
    informative = 1.0 - stats["zero_std"]
    n_inf = jnp.sum(informative)
    out = {}
    for k, v in stats.items():
        if k == "zero_std":
            out["zero_std_frac"] = jnp.mean(v)
        elif k in WEIGHT_SHAPE_STATS:
            out[k] = jnp.sum(v * informative) / jnp.maximum(n_inf, 1.0)
        else:
            out[k] = jnp.mean(v)
    return out


from rlsoft.schedules import TAU_SCHEDULES, make_tau_schedule  # noqa: E402  (re-export)

"""Per-group diagnostics of weighting-scheme weights: how concentrated they are, and on what.

Re-exported by `rlsoft.weighting`. Rewards follow the non-finite policy of `rlsoft.reward_groups`:
the reward statistics (best, mean, std, zero_std) are over a group's finite rewards only, and
`nonfinite_rewards` counts the others.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlsoft.reward_groups import as_float, finite_group, validate_group_shape

WEIGHT_SHAPE_STATS = ("max_weight", "entropy", "effective_n", "weight_on_best", "mass_on_best")
# Stats that `summarize_weight_stats` sums over the groups of a batch instead of averaging.
SUMMED_STATS = ("nonfinite_rewards",)
_TINY = 1e-30


def group_weight_stats(w: chex.Array, r: chex.Array, known_finite: bool = False) -> dict[str, chex.Array]:
    """Statistics of one group's weights `w: [G]` given its rewards `r: [G]`.

    With p = |w| / sum|w|:  entropy = -sum p log p,  effective_n = 1 / sum p^2.
    weight_on_best is the mean weight of the samples tied for the best reward (the seed's
    "weight on correct"); mass_on_best is their share of sum|w|. A group whose weights are all
    zero (a centred scheme on equal rewards) gives no gradient: entropy = effective_n = 0 there.
    Non-finite rewards are left out of best, mean, std and zero_std, and counted in
    nonfinite_rewards; a group without a finite reward has zero_std = 1 and reward stats 0.
    `known_finite=True`: the caller checked that every reward is finite (`finite_group`).
    """
    chex.assert_rank([w, r], 1)
    chex.assert_equal_shape([w, r])
    f = finite_group(r, known_finite)
    n = jnp.maximum(f.n, 1.0)
    a = jnp.abs(w)
    total = jnp.sum(a)
    live = total > 0
    p = a / jnp.where(live, total, 1.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    best = f.mask & (f.filled == jnp.max(f.filled))
    n_best = jnp.maximum(jnp.sum(best), 1)
    mean = jnp.sum(jnp.where(f.mask, f.filled, 0.0)) / n
    dev = jnp.where(f.mask, f.filled - mean, 0.0)
    return {
        "max_weight": jnp.max(w),
        "min_weight": jnp.min(w),
        "weight_sum": jnp.sum(w),
        "entropy": jnp.where(live, -jnp.sum(plogp), 0.0),
        "effective_n": jnp.where(live, 1.0 / jnp.maximum(jnp.sum(p * p), _TINY), 0.0),
        "weight_on_best": jnp.sum(jnp.where(best, w, 0.0)) / n_best,
        "mass_on_best": jnp.sum(jnp.where(best, p, 0.0)),
        "reward_mean": mean.astype(w.dtype),
        "reward_std": jnp.sqrt(jnp.sum(dev * dev) / n).astype(w.dtype),
        "zero_std": jnp.all(f.filled == f.ref).astype(w.dtype),
        "nonfinite_rewards": (r.shape[0] - f.n).astype(w.dtype),
    }


def weight_stats(weights, rewards) -> dict[str, jax.Array]:
    """Per-group stats for `weights, rewards: [..., G]`; each value has shape `[...]`."""
    weights = as_float(weights)
    rewards = as_float(rewards).astype(weights.dtype)
    chex.assert_equal_shape([weights, rewards])
    validate_group_shape(rewards)
    lead = weights.shape[:-1]
    g = weights.shape[-1]
    stats = jax.vmap(group_weight_stats)(weights.reshape(-1, g), rewards.reshape(-1, g))
    return {k: v.reshape(lead) for k, v in stats.items()}


def summarize_weight_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Batch means for logging; `nonfinite_rewards` (SUMMED_STATS) is the batch's total count.

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
        elif k in SUMMED_STATS:
            out[k] = jnp.sum(v)
        else:
            out[k] = jnp.mean(v)
    return out

"""Reward groups `[..., G]` (groups on the last axis): dtype and shape checks, and the one policy
for non-finite rewards that every weighting scheme and every weight statistic follows.

Non-finite rewards (NaN, +inf, -inf alike) are masked out of their group: such a sample gets a
weight of exactly 0, and the rest of the group is weighted as if it were absent (a group of
n = #finite samples). A group with no finite reward gets all-zero weights. `count_nonfinite`
(and `weight_stats(...)["nonfinite_rewards"]`) counts them so that a trainer can log them.

Inside a one-group function, `finite_group(r)` gives the mask, the count n and a copy of `r` whose
non-finite entries are replaced by the group's largest finite reward: its max, min and differences
are those of the finite rewards, so no NaN or inf reaches the arithmetic (nor its gradient).
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class FiniteGroup(NamedTuple):
    mask: chex.Array  # [G] bool: the finite rewards
    n: chex.Array  # scalar, r's dtype: how many there are
    filled: chex.Array  # [G] r with the non-finite entries replaced by ref
    ref: chex.Array  # scalar: the largest finite reward (0 if there is none)


def finite_group(r: chex.Array, known_finite: bool = False) -> FiniteGroup:
    """Mask, count and a finite stand-in for ONE group `r: [G]` (see the module docstring).

    `known_finite=True`: the caller has checked that every reward is finite (once, for a whole
    batch). The same FiniteGroup, built from constants that XLA folds away: no masking work.
    """
    chex.assert_rank(r, 1)
    if known_finite:
        return FiniteGroup(jnp.ones(r.shape, bool), jnp.asarray(r.shape[0], r.dtype), r, jnp.max(r))
    mask = jnp.isfinite(r)
    top = jnp.max(jnp.where(mask, r, -jnp.inf))  # a max, not an argmax: cheaper under vmap
    ref = jnp.where(top > -jnp.inf, top, jnp.zeros((), r.dtype))
    return FiniteGroup(mask, jnp.sum(mask).astype(r.dtype), jnp.where(mask, r, ref), ref)


def count_nonfinite(rewards) -> jax.Array:
    """Number of non-finite rewards per group: `[..., G]` -> int32 `[...]`."""
    rewards = as_float(rewards)
    validate_group_shape(rewards)
    return jnp.sum(~jnp.isfinite(rewards), axis=-1, dtype=jnp.int32)


def validate_group_shape(rewards: chex.Array) -> None:
    if jnp.ndim(rewards) < 1 or jnp.shape(rewards)[-1] < 2:
        raise ValueError(
            f"rewards must have a group axis last with G >= 2; got shape {jnp.shape(rewards)}"
        )


def as_float(rewards) -> jax.Array:
    """`rewards` as a jax array; integer and bool inputs become float32."""
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    return rewards

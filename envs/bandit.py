"""Sparse multi-armed bandits (a cheap, exactly solvable testbed for weighting schemes): K arms, few of them pay.

A bandit is a pytree `Bandit(payouts: [K], noise_std: scalar)`. Pulling arm a pays
`payouts[a] + noise_std * N(0, 1)`. By default exactly one arm, drawn uniformly per seed, pays 1
and the rest pay 0, so a uniform policy finds the paying arm in a group of G with probability
1 - (1 - 1/K)^G: about 1.6% per step at K = 1000, G = 16. That is the sparse regime the seeds
care about. All functions are pure and vmappable over seeds.
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


class Bandit(NamedTuple):
    payouts: chex.Array  # [K] mean payout of each arm
    noise_std: chex.Array  # scalar: std of Gaussian noise added to each pull


def make_bandit(key: chex.PRNGKey, num_arms: int, num_paying: int = 1, payout: float = 1.0,
                noise_std: float = 0.0) -> Bandit:
    """`num_paying` distinct arms, chosen uniformly at random, pay `payout`; the others pay 0."""
    if num_arms < 2:
        raise ValueError(f"num_arms={num_arms} is invalid; need >= 2")
    if not 1 <= num_paying < num_arms:
        raise ValueError(f"num_paying={num_paying} is invalid; need 1 <= num_paying < num_arms={num_arms}")
    if noise_std < 0:
        raise ValueError(f"noise_std={noise_std} is invalid; need >= 0")
    paying = jax.random.choice(key, num_arms, (num_paying,), replace=False)
    payouts = jnp.zeros((num_arms,), jnp.float32).at[paying].set(payout)
    return Bandit(payouts, jnp.asarray(noise_std, jnp.float32))


def make_bandits(keys: chex.PRNGKey, num_arms: int, num_paying: int = 1, payout: float = 1.0,
                 noise_std: float = 0.0) -> Bandit:
    """One bandit per key: a Bandit whose leaves have a leading seed axis."""
    make_bandit(keys[0], num_arms, num_paying, payout, noise_std)  # validates once, eagerly
    return jax.vmap(lambda k: make_bandit(k, num_arms, num_paying, payout, noise_std))(keys)


def pull(bandit: Bandit, key: chex.PRNGKey, arms: chex.Array) -> chex.Array:
    """Rewards of pulling `arms: [G]`."""
    chex.assert_rank(arms, 1)
    noise = jax.random.normal(key, arms.shape, bandit.payouts.dtype)
    return bandit.payouts[arms] + bandit.noise_std * noise


def pull_noiseless(bandit: Bandit, key: chex.PRNGKey, arms: chex.Array) -> chex.Array:
    """`pull` for bandits with noise_std == 0: draws no normals (the PRNG is a large share of a step)."""
    del key
    chex.assert_rank(arms, 1)
    return bandit.payouts[arms]


def reward_fn_for(noise_std: float):
    """The pull function to compile for a given noise level (a static choice, not a traced one)."""
    return pull if noise_std > 0 else pull_noiseless


def arm_values(bandit: Bandit) -> chex.Array:
    """Expected reward of each arm: [K]."""
    return bandit.payouts

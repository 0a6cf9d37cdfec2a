"""Compiled policy-gradient sweeps for a state-less softmax policy over K actions (PureJaxRL style).

The policy is `pi = softmax(logits)`, logits: [K]. One step draws a group of G actions, asks the
task for their rewards, turns the rewards into weights with any scheme of `rlsoft.weighting` and
follows the weighted log-likelihood gradient

    L(logits) = -(1/G) sum_i w_i log pi(a_i),      w = stop_gradient(weights(r; scheme, tau)),

through an optax transformation (SGD or Adam), scaled by a learning rate. The task is given as a
pytree `env` and a pure `reward_fn(env, key, actions) -> rewards` plus `values_fn(env) -> [K]` (the
expected reward of each action, for p(best) and the expected return); this module knows no task.

`run` is a whole training run as one `lax.scan`; `sweep` vmaps it over seeds and over a grid of
(scheme, tau, learning rate), so one compiled call covers the whole comparison. Schemes are
vmapped as indices through `weighting.compute_weights_by_index`.

PRNG: each seed's key is split once into named streams by the caller (task vs policy); the step
key is `fold_in(policy_key, step)`, so a step-by-step replay sees exactly the same randomness.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import weighting

OPTIMIZERS = ("sgd", "adam")

RewardFn = Callable[[Any, chex.PRNGKey, chex.Array], chex.Array]
ValuesFn = Callable[[Any], chex.Array]


class HParams(NamedTuple):
    """One point of a sweep; each field is a scalar (or [C] for a grid of C points)."""

    scheme_index: chex.Array  # int32 index into weighting.SCHEME_NAMES
    tau: chex.Array  # float32, ignored by schemes that take no temperature
    learning_rate: chex.Array  # float32


class PolicyState(NamedTuple):
    logits: chex.Array  # [K]
    opt_state: optax.OptState


def make_hparams(schemes, taus, learning_rates) -> HParams:
    """The grid schemes x taus x learning rates as an HParams of [C] arrays.

    A scheme that takes no temperature gets one entry per learning rate (tau = nan there), so
    the grid holds no duplicated runs.
    """
    rows = []
    for s in schemes:
        idx = weighting.scheme_index(s)
        for t in (taus if s in weighting.NEEDS_TAU else (float("nan"),)):
            for lr in learning_rates:
                rows.append((idx, t, lr))
    idx, tau, lr = zip(*rows)
    return HParams(jnp.asarray(idx, jnp.int32), jnp.asarray(tau, jnp.float32), jnp.asarray(lr, jnp.float32))


def base_optimizer(name: str) -> optax.GradientTransformation:
    """The optimizer without its learning rate, so that the rate can be a traced sweep value."""
    if name == "sgd":
        return optax.identity()
    if name == "adam":
        return optax.scale_by_adam()
    raise ValueError(f"optimizer={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")


def init_state(num_actions: int, optimizer: str) -> PolicyState:
    """Uniform policy (zero logits), fresh optimizer state."""
    logits = jnp.zeros((num_actions,), jnp.float32)
    return PolicyState(logits, base_optimizer(optimizer).init(logits))


def sample_actions(key: chex.PRNGKey, logits: chex.Array, group_size: int) -> chex.Array:
    """G actions from softmax(logits) by inverse-CDF sampling: one uniform per sample.

    Exact in distribution (up to float32 rounding of the CDF) and O(K + G log K), where
    `jax.random.categorical` draws G * K Gumbels: at K = 1000 the PRNG would dominate the step.
    """
    chex.assert_rank(logits, 1)
    cdf = jnp.cumsum(jax.nn.softmax(logits))
    u = jax.random.uniform(key, (group_size,), dtype=cdf.dtype) * cdf[-1]
    return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), logits.shape[0] - 1)


def weighted_nll(logits: chex.Array, actions: chex.Array, weights: chex.Array) -> chex.Array:
    """-(1/G) sum_i w_i log softmax(logits)[a_i]."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(weights * logp[actions])


def policy_step(
    hp: HParams,
    env: Any,
    state: PolicyState,
    key: chex.PRNGKey,
    *,
    reward_fn: RewardFn,
    values_fn: ValuesFn,
    group_size: int,
    optimizer: str,
) -> tuple[PolicyState, dict[str, chex.Array]]:
    """One pure step: sample G actions, reward, weight, update. Metrics describe the pre-update policy."""
    sample_key, reward_key = jax.random.split(key)
    actions = sample_actions(sample_key, state.logits, group_size)
    rewards = reward_fn(env, reward_key, actions)
    weights = weighting.compute_weights_by_index(rewards, hp.scheme_index, hp.tau)
    weights = jax.lax.stop_gradient(weights)
    loss, grads = jax.value_and_grad(weighted_nll)(state.logits, actions, weights)
    updates, opt_state = base_optimizer(optimizer).update(grads, state.opt_state, state.logits)
    logits = state.logits - hp.learning_rate * updates

    values = values_fn(env)
    best = values == jnp.max(values)
    probs = jax.nn.softmax(state.logits)
    metrics = {
        "p_best": jnp.sum(jnp.where(best, probs, 0.0)),
        "expected_reward": jnp.dot(probs, values),
        "reward_mean": jnp.mean(rewards),
        "n_best_sampled": jnp.sum(best[actions]).astype(jnp.float32),
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        **weighting.group_weight_stats(weights, rewards),
    }
    return PolicyState(logits, opt_state), metrics


def run(
    hp: HParams,
    env: Any,
    policy_key: chex.PRNGKey,
    *,
    num_actions: int,
    num_steps: int,
    reward_fn: RewardFn,
    values_fn: ValuesFn,
    group_size: int,
    optimizer: str,
) -> dict[str, chex.Array]:
    """A whole run as one `lax.scan`; returns metrics of shape [num_steps] each."""
    step = functools.partial(
        policy_step, reward_fn=reward_fn, values_fn=values_fn, group_size=group_size, optimizer=optimizer
    )

    def body(state, t):
        return step(hp, env, state, jax.random.fold_in(policy_key, t))

    _, metrics = jax.lax.scan(body, init_state(num_actions, optimizer), jnp.arange(num_steps))
    return metrics


@functools.partial(
    jax.jit,
    static_argnames=("num_actions", "num_steps", "reward_fn", "values_fn", "group_size", "optimizer"),
)
def sweep(
    hps: HParams,
    envs: Any,
    policy_keys: chex.PRNGKey,
    *,
    num_actions: int,
    num_steps: int,
    reward_fn: RewardFn,
    values_fn: ValuesFn,
    group_size: int,
    optimizer: str,
) -> dict[str, chex.Array]:
    """All runs in one compiled call: hps: [C], envs and policy_keys: [S]. Metrics: [C, S, T].

    Every grid point sees the same S tasks and keys (common random numbers), so differences
    between schemes are not differences in luck.
    """
    one = functools.partial(
        run,
        num_actions=num_actions,
        num_steps=num_steps,
        reward_fn=reward_fn,
        values_fn=values_fn,
        group_size=group_size,
        optimizer=optimizer,
    )
    over_seeds = jax.vmap(one, in_axes=(None, 0, 0))
    return jax.vmap(over_seeds, in_axes=(0, None, None))(hps, envs, policy_keys)


def first_step(mask: chex.Array) -> chex.Array:
    """Index of the first True along the last axis, or the axis length if there is none."""
    t = mask.shape[-1]
    return jnp.where(jnp.any(mask, axis=-1), jnp.argmax(mask, axis=-1), t)

"""Compiled policy-gradient sweeps for a state-less softmax policy over K actions (PureJaxRL style).

The policy is `pi = softmax(logits)`, logits: [K]. One step draws a group of G actions, asks the
task for their rewards, turns the rewards into weights with any scheme of `rlsoft.weighting` and
follows the weighted log-likelihood gradient

    L(logits) = -(1/G) sum_i w_i log pi(a_i),      w = stop_gradient(weights(r; scheme, tau)),

with plain SGD or Adam from the project's one optimizer builder (`rlsoft.optim.make_optimizer`:
no clipping, the learning rate a traced sweep value, inside its non-finite guard). The task is
given as a pytree `env` and a pure `reward_fn(env, key, actions) -> rewards` plus
`values_fn(env) -> [K]` (the expected reward of each action, for p(best) and the expected return);
this module knows no task.

`run` is a whole training run as one `lax.scan` (its records; `run_metrics` turns them into
metrics after the scan); `sweep` vmaps both over seeds and over a grid of (scheme, tau, learning
rate), so one compiled call covers the whole comparison. Schemes are vmapped as indices through
`weighting.compute_weights_by_index`, which also gets the exact log-probs of the drawn actions
(for gvpo and tpo, `weighting.NEEDS_LOGP`; there is no reference policy, so gvpo's reference is
uniform). Under that vmap every scheme's branch is evaluated: the static `schemes` (default: all,
one program for any grid) limits them to those of the grid (`schemes_in`), e.g. to leave out
softmax_ess's bisection.

PRNG: each seed's key is split once into named streams by the caller (task vs policy); the step
key is `fold_in(policy_key, step)`, so a step-by-step replay (`policy_step`) sees exactly the same
randomness as `run`, which draws every step's randomness before its scan (`run_randomness`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import optim, sampling, weighting

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
            if s in weighting.NEEDS_TAU:
                weighting.validate_tau(t, s)
            for lr in learning_rates:
                rows.append((idx, t, lr))
    idx, tau, lr = zip(*rows)
    return HParams(jnp.asarray(idx, jnp.int32), jnp.asarray(tau, jnp.float32), jnp.asarray(lr, jnp.float32))


def schemes_in(hps: HParams) -> tuple[str, ...]:
    """The schemes of a (concrete) grid, in SCHEME_NAMES order: `sweep`'s static `schemes`."""
    return tuple(weighting.SCHEME_NAMES[i] for i in sorted({int(i) for i in jnp.ravel(hps.scheme_index)}))


def make_optimizer(name: str, learning_rate: Any = 1.0) -> optax.GradientTransformation:
    """`rlsoft.optim.make_optimizer` for the sweep: plain SGD (no momentum) or Adam (Kingma & Ba,
    2015; optim's default b1, b2, eps), no gradient clipping, at `learning_rate`, which may be a
    traced sweep value. The update is -learning_rate * (the gradient, or Adam's direction)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
    return optim.make_optimizer(optim.OptimizerConfig(name=name, grad_clip=0.0), learning_rate=learning_rate)


def init_state(num_actions: int, optimizer: str) -> PolicyState:
    """Uniform policy (zero logits), fresh optimizer state (it does not depend on the rate)."""
    logits = jnp.zeros((num_actions,), jnp.float32)
    return PolicyState(logits, make_optimizer(optimizer).init(logits))


def weighted_nll(logits: chex.Array, actions: chex.Array, weights: chex.Array) -> chex.Array:
    """-(1/G) sum_i w_i log softmax(logits)[a_i]. The reference for `weighted_nll_grad`."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(weights * logp[actions])


def weighted_nll_grad(probs: chex.Array, actions: chex.Array, weights: chex.Array) -> chex.Array:
    """d weighted_nll / d logits = (1/G) [ (sum_i w_i) pi - sum_i w_i e_{a_i} ], in closed form.

    One fused pass over K plus a G-element scatter; autodiff through log_softmax costs more.
    """
    g = weights.shape[0]
    return (jnp.sum(weights) / g * probs).at[actions].add(-weights / g)


def grads_all_finite(grads: chex.Array, actions: chex.Array) -> chex.Array:
    """all(isfinite(grads)) for `weighted_nll_grad(softmax(logits), actions, w)`, from G entries.

    The optimizer's non-finite guard needs this verdict every step; reducing isfinite over all K
    entries (what optax.apply_if_finite does) cost ~8% of a bandit step. Reading only the sampled
    entries is exact: softmax gives probs that are all finite in [0, 1] or all NaN (a NaN or +inf
    logit makes every exp(z - max z) NaN), and an unsampled entry is c * p with c = sum(w) / G. If
    c and p are finite, |c * p| <= |c| is finite; if c or p is not, c * p is inf or NaN for every
    entry, and so is each sampled entry c * p - (its w_i / G terms) (inf + anything is inf or NaN).
    """
    return jnp.all(jnp.isfinite(grads[actions]))


def step_randomness(key: chex.PRNGKey, group_size: int) -> tuple[chex.Array, chex.PRNGKey]:
    """A step's randomness from its key fold_in(policy_key, step): the [1, G] uniforms its actions
    are drawn with (as `sampling.categorical(sample_key, ...)` draws them) and the reward key."""
    sample_key, reward_key = jax.random.split(key)
    return sampling.sampling_uniforms(sample_key, 1, group_size), reward_key


def run_randomness(policy_key: chex.PRNGKey, num_steps: int, group_size: int):
    """`step_randomness` of every step ([num_steps] leading), drawn in one vectorised call before
    `run`'s scan: the same values, but XLA:CPU runs each threefry call as a 5-round loop, and the
    three calls (fold_in, split, uniform) inside every step cost more than the step's O(K) work."""
    draw = lambda t: step_randomness(jax.random.fold_in(policy_key, t), group_size)  # noqa: E731
    return jax.vmap(draw)(jnp.arange(num_steps))


def policy_step(hp: HParams, env: Any, state: PolicyState, key: chex.PRNGKey, *, reward_fn: RewardFn,
                values_fn: ValuesFn, group_size: int, optimizer: str,
                schemes: tuple[str, ...] | None = None) -> tuple[PolicyState, dict[str, chex.Array]]:
    """`step_given` with the randomness of the step key `key` (a step-by-step replay of `run`)."""
    return step_given(hp, env, state, step_randomness(key, group_size), reward_fn=reward_fn, values_fn=values_fn,
                      group_size=group_size, optimizer=optimizer, schemes=schemes)


def step_given(
    hp: HParams,
    env: Any,
    state: PolicyState,
    randomness: tuple[chex.Array, chex.PRNGKey],
    *,
    reward_fn: RewardFn,
    values_fn: ValuesFn,
    group_size: int,
    optimizer: str,
    schemes: tuple[str, ...] | None = None,
) -> tuple[PolicyState, dict[str, chex.Array]]:
    """One pure step given its `step_randomness`: sample G actions, reward, weight, update.

    Returns the new state and the step's record: the group (actions, rewards, weights, log-probs
    of the actions) and the K-sized statistics of the pre-update policy (p_best, expected_reward,
    grad_norm; NaN grad_norm marks a skipped update). `step_metrics` turns a record into the logged
    metrics; it is applied after the scan, vectorised over all steps at once, because a dozen
    G-sized reductions per step would cost more than the step's O(K) work.
    """
    uniforms, reward_key = randomness
    logits = state.logits
    z = logits[None]  # [1,K]: the sampler's row; softmax of the same row shares its exp (XLA CSE)
    probs = jax.nn.softmax(z)[0]
    actions = sampling.inverse_cdf(uniforms, z)[0]
    rewards = reward_fn(env, reward_key, actions)
    logp_actions = jnp.log(probs[actions])  # exact: the policy that drew them (gvpo, tpo)
    weights = weighting.compute_weights_by_index(rewards, hp.scheme_index, hp.tau, logp_actions, among=schemes)
    grads = weighted_nll_grad(probs, actions, weights)
    all_finite = grads_all_finite(grads, actions)
    updates, opt_state = make_optimizer(optimizer, hp.learning_rate).update(
        grads, state.opt_state, logits, all_finite=all_finite)

    values = values_fn(env)
    record = {
        "actions": actions,
        "rewards": rewards,
        "weights": weights,
        "logp_actions": logp_actions,
        "p_best": jnp.sum(jnp.where(values == jnp.max(values), probs, 0.0)),
        "expected_reward": jnp.dot(probs, values),
        # NaN marks a skipped update (no gradient was applied): `run_metrics` counts them from it.
        "grad_norm": jnp.where(all_finite, jnp.sqrt(jnp.sum(grads * grads)), jnp.nan),
    }
    return PolicyState(optax.apply_updates(logits, updates), opt_state), record


WEIGHTS = "train/weights/"  # prefix of the weight statistics


def step_metrics(record: dict[str, chex.Array], env: Any, values_fn: ValuesFn,
                 rewards_finite: bool = False) -> dict[str, chex.Array]:
    """Metrics of one step's record (unbatched; vmap over steps, seeds and grid points).

    Named as every testbed logs them: `eval/...` for the exact quality of the pre-update policy
    (p_best, expected_reward), `train/...` for the step (reward, success = share of the group that
    drew a best arm, loss, grad_norm) and `train/weights/<stat>` for
    `weighting.group_weight_stats` of the group's weights (per group: `logged_curves` reduces them).
    `rewards_finite=True`: the caller checked that every reward is finite; the same metrics
    without the masking of non-finite rewards.
    """
    values = values_fn(env)
    best = values == jnp.max(values)
    w, r = record["weights"], record["rewards"]
    return {
        "eval/p_best": record["p_best"],
        "eval/expected_reward": record["expected_reward"],
        "train/reward": jnp.mean(r),
        "train/success": jnp.mean(best[record["actions"]].astype(jnp.float32)),
        "train/loss": -jnp.mean(w * record["logp_actions"]),
        "train/grad_norm": record["grad_norm"],
        **{WEIGHTS + k: v for k, v in weighting.group_weight_stats(w, r, rewards_finite).items()},
    }


def logged_curves(metrics: dict[str, chex.Array]) -> dict[str, chex.Array]:
    """Sweep metrics [C, S, T] -> the curves [C, T] a TensorBoard run of each grid point shows.

    The seeds of a step are its batch of groups, reduced as the trainers reduce a batch: means over
    seeds, and the weight statistics through `weighting.summarize_weight_stats` (shape statistics
    over the informative groups only, `zero_std_frac`), with `train/frac_reward_zero_std` and
    `train/reward_std` as the language testbeds log them.
    """
    stats = {k[len(WEIGHTS):]: v for k, v in metrics.items() if k.startswith(WEIGHTS)}
    per_step = jax.vmap(jax.vmap(weighting.summarize_weight_stats, in_axes=1), in_axes=0)  # over T, then C
    curves = {k: jnp.mean(v, axis=1) for k, v in metrics.items() if not k.startswith(WEIGHTS)}
    curves.update({WEIGHTS + k: v for k, v in per_step(stats).items()})
    curves["train/frac_reward_zero_std"] = curves[WEIGHTS + "zero_std_frac"]
    curves["train/reward_std"] = curves[WEIGHTS + "reward_std"]
    return curves


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
    schemes: tuple[str, ...] | None = None,
) -> dict[str, chex.Array]:
    """A whole run as one `lax.scan`: the records of its steps ([num_steps] leading)."""
    step = functools.partial(
        step_given, reward_fn=reward_fn, values_fn=values_fn, group_size=group_size, optimizer=optimizer,
        schemes=schemes,
    )

    def body(state, randomness):
        return step(hp, env, state, randomness)

    randomness = run_randomness(policy_key, num_steps, group_size)
    return jax.lax.scan(body, init_state(num_actions, optimizer), randomness)[1]


def run_metrics(records: dict[str, chex.Array], env: Any, values_fn: ValuesFn,
                rewards_finite: bool = False) -> dict[str, chex.Array]:
    """`step_metrics` of a run's records, vectorised over all its steps; metrics are [num_steps].

    `train/skipped_updates` is the optimizer's running count of skipped updates after each step
    (as the trainers log `optim.skipped_updates(opt_state)`), rebuilt here from the NaN grad
    norms that mark the skipped steps, rather than stored by every step of the scan.
    """
    metrics = jax.vmap(step_metrics, in_axes=(0, None, None, None))(records, env, values_fn, rewards_finite)
    skipped = jnp.cumsum(jnp.isnan(records["grad_norm"]), dtype=jnp.int32)
    return {**metrics, "train/skipped_updates": skipped.astype(jnp.float32)}


@functools.partial(
    jax.jit,
    static_argnames=("num_actions", "num_steps", "reward_fn", "values_fn", "group_size", "optimizer", "schemes"),
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
    schemes: tuple[str, ...] | None = None,
) -> dict[str, chex.Array]:
    """All runs in one compiled call: hps: [C], envs and policy_keys: [S]. Metrics: [C, S, T].

    Every grid point sees the same S tasks and keys (common random numbers), so differences
    between schemes are not differences in luck. `schemes`: the only schemes `hps` may index
    (`schemes_in(hps)`; a grid point outside them gets NaN weights), or None for all of them.
    """
    one = functools.partial(
        run,
        num_actions=num_actions,
        num_steps=num_steps,
        reward_fn=reward_fn,
        values_fn=values_fn,
        group_size=group_size,
        optimizer=optimizer,
        schemes=schemes,
    )
    over_seeds = jax.vmap(one, in_axes=(None, 0, 0))
    single = hps.scheme_index.shape[0] == 1
    if single:
        # A single grid point: without a vmap over it, lax.switch runs only the chosen scheme
        # instead of all of them followed by a select.
        records = over_seeds(jax.tree.map(lambda x: x[0], hps), envs, policy_keys)
    else:
        records = jax.vmap(over_seeds, in_axes=(0, None, None))(hps, envs, policy_keys)

    def metrics(rewards_finite):
        runs = jax.vmap(functools.partial(run_metrics, values_fn=values_fn, rewards_finite=rewards_finite))
        return runs if single else jax.vmap(runs, in_axes=(0, None))

    # Masking non-finite rewards is a large share of the metrics; one check of all the rewards
    # lets the usual all-finite sweep skip it (a real branch: it sits outside the vmaps).
    out = jax.lax.cond(jnp.all(jnp.isfinite(records["rewards"])), metrics(True), metrics(False), records, envs)
    return jax.tree.map(lambda x: x[None], out) if single else out


def first_step(mask: chex.Array) -> chex.Array:
    """Index of the first True along the last axis, or the axis length if there is none."""
    t = mask.shape[-1]
    return jnp.where(jnp.any(mask, axis=-1), jnp.argmax(mask, axis=-1), t)

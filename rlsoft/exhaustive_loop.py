"""Compiled next-token RL from contexts (seed 002): exhaustive or sampled exploration, regularised.

Each step draws a batch of contexts, asks the task for the reward of every next token (all V at
once), turns them into weights with any `rlsoft.weighting` scheme and follows the exact
expected policy gradient of `rlsoft.exhaustive` (or its sampled estimate), with three regularisers:

    L = -sum_c q(c) min(rho_c w_c, clip(rho_c, 1 - eps, 1 + eps) w_c)     PPO-style, vs a lagged policy
        - entropy_coef * H(pi)                                            entropy bonus
        + kl_coef * KL(pi || ref)                                         KL to a reference (n-gram)

with rho_c = pi(c) / pi_lag(c), q = sg(pi_lag) ("pi" mixing: the expectation of the clipped
surrogate under the lagged policy, whose gradient at pi = pi_lag is exactly the exhaustive policy
gradient) or q = 1/V ("uniform"). The lagged policy is refreshed every `lag_every` steps. With
clip_eps = 0 the policy term is `exhaustive.exhaustive_objective` of the current policy.

The loop is `lax.scan` over `chunk` steps inside one jit (PureJaxRL style); the host only logs
between chunks. It knows no model and no task: `logits_fn(params, contexts[B,C]) -> [B,V]`,
`batch_fn(key) -> (contexts, targets)`, `reward_fn(contexts, targets, probs) -> [B,V]` and
`ref_log_probs_fn(contexts) -> [B,V]` are pure jnp functions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import exhaustive, monitors, weighting
from rlsoft.config import check

MODES = ("exhaustive", "sampled")


@dataclasses.dataclass(frozen=True)
class ExhaustiveConfig:
    scheme: str = "softmax"
    tau: float = 0.5
    mode: str = "exhaustive"
    mixing: str = "uniform"
    group_size: int = 8  # sampled mode only
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    lag_every: int = 4
    entropy_coef: float = 0.0
    kl_coef: float = 0.0

    def __post_init__(self):
        weighting.validate_scheme(self.scheme)
        weighting.validate_tau(self.tau, self.scheme)
        check(self.mode in MODES, f"mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        exhaustive.validate_mixing(self.mixing)
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
              f"learning_rate={self.learning_rate} is invalid; need a finite value > 0")
        check(self.grad_clip > 0, f"grad_clip={self.grad_clip} is invalid; need > 0")
        check(0 <= self.clip_eps < 1, f"clip_eps={self.clip_eps} is invalid; need 0 <= clip_eps < 1")
        check(self.lag_every >= 1, f"lag_every={self.lag_every} is invalid; need >= 1")
        check(self.entropy_coef >= 0, f"entropy_coef={self.entropy_coef} is invalid; need >= 0")
        check(self.kl_coef >= 0, f"kl_coef={self.kl_coef} is invalid; need >= 0")


class State(NamedTuple):
    params: Any
    lag_params: Any
    opt_state: optax.OptState
    monitor: monitors.MonitorState
    step: jax.Array


class Task(NamedTuple):
    logits_fn: Callable[[Any, jax.Array], jax.Array]
    batch_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    reward_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    ref_log_probs_fn: Optional[Callable[[jax.Array], jax.Array]] = None


def make_optimizer(cfg: ExhaustiveConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(cfg.learning_rate))


def init_state(params: Any, cfg: ExhaustiveConfig, monitor_cfg: monitors.MonitorConfig) -> State:
    state = State(params, params, make_optimizer(cfg).init(params), monitors.init(monitor_cfg),
                  jnp.zeros((), jnp.int32))
    # Every leaf its own buffer: the compiled chunk donates the state, and a buffer shared by two
    # leaves (lag = params, zeros reused by an init) cannot be donated twice.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def clipped_objective(logits: chex.Array, lag_logits: chex.Array, weights: chex.Array, mixing: str,
                      clip_eps: float) -> chex.Array:
    """-sum_c q(c) min(rho_c w_c, clip(rho_c) w_c) for ONE context (see the module docstring)."""
    chex.assert_rank([logits, lag_logits, weights], 1)
    chex.assert_equal_shape([logits, lag_logits, weights])
    if clip_eps == 0:
        return exhaustive.exhaustive_objective(logits, weights, mixing)
    logp = jax.nn.log_softmax(logits)
    lag_logp = jax.lax.stop_gradient(jax.nn.log_softmax(lag_logits))
    q = exhaustive.mixing_distribution(lag_logp, mixing)
    w = jax.lax.stop_gradient(weights)
    rho = jnp.exp(jnp.clip(logp - lag_logp, -20.0, 20.0))
    surrogate = jnp.minimum(rho * w, jnp.clip(rho, 1 - clip_eps, 1 + clip_eps) * w)
    return -jnp.sum(q * surrogate)


def _loss(params, lag_params, contexts, targets, key, task: Task, cfg: ExhaustiveConfig):
    logits = task.logits_fn(params, contexts)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits))
    rewards = task.reward_fn(contexts, targets, probs)
    chex.assert_equal_shape([logits, rewards])
    if cfg.mode == "exhaustive":
        weights = weighting.compute_weights(rewards, cfg.scheme, tau=cfg.tau)
        lag_logits = task.logits_fn(lag_params, contexts) if cfg.clip_eps > 0 else logits
        policy = jax.vmap(functools.partial(clipped_objective, mixing=cfg.mixing, clip_eps=cfg.clip_eps))(
            logits, lag_logits, weights)
        w_stats, r_stats = weights, rewards
    else:
        actions = exhaustive.sample_actions(key, jax.lax.stop_gradient(logits), cfg.group_size)
        sampled = jnp.take_along_axis(rewards, actions, axis=1)
        weights = weighting.compute_weights(sampled, cfg.scheme, tau=cfg.tau)
        policy = jax.vmap(exhaustive.sampled_objective)(logits, actions, weights)
        w_stats, r_stats = weights, sampled
    logp = jax.nn.log_softmax(logits)
    pi = jnp.exp(logp)
    entropy = -jnp.sum(pi * logp, axis=-1)
    loss = jnp.mean(policy) - cfg.entropy_coef * jnp.mean(entropy)
    metrics = {"policy_loss": jnp.mean(policy), "entropy": jnp.mean(entropy),
               "expected_reward": jnp.mean(jnp.sum(pi * rewards, -1))}
    if task.ref_log_probs_fn is not None:
        kl = jnp.sum(pi * (logp - task.ref_log_probs_fn(contexts)), axis=-1)
        loss = loss + cfg.kl_coef * jnp.mean(kl)
        metrics["kl_ref"] = jnp.mean(kl)
    stats = weighting.summarize_weight_stats(weighting.weight_stats(w_stats, r_stats))
    metrics.update({f"weights/{k}": v for k, v in stats.items()})
    return loss, (metrics, logits)


def train_step(state: State, key: jax.Array, *, task: Task, cfg: ExhaustiveConfig,
               monitor_cfg: monitors.MonitorConfig) -> tuple[State, dict]:
    """One pure step: (state, key) -> (state, metrics). Keys: fold_in(stream, step) by the caller."""
    batch_key, sample_key = jax.random.split(key)
    contexts, targets = task.batch_fn(batch_key)
    (loss, (metrics, logits)), grads = jax.value_and_grad(_loss, has_aux=True)(
        state.params, state.lag_params, contexts, targets, sample_key, task, cfg)
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    params = keep(optax.apply_updates(state.params, updates), state.params)
    opt_state = keep(opt_state, state.opt_state)
    step = state.step + 1
    refresh = step % cfg.lag_every == 0
    lag = jax.tree.map(lambda p, l: jnp.where(refresh, p, l), params, state.lag_params)
    health = monitors.step_metrics(jax.lax.stop_gradient(logits), targets, grad_norm)
    monitor = monitors.update(state.monitor, health)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32),
                   confidence=health["confidence"], accuracy=health["accuracy"])
    return State(params, lag, opt_state, monitor, step), metrics


def make_train_chunk(task: Task, cfg: ExhaustiveConfig, monitor_cfg: monitors.MonitorConfig, chunk: int):
    """`chunk` steps as one jitted `lax.scan`: (state, stream_key) -> (state, metrics [chunk])."""
    step = functools.partial(train_step, task=task, cfg=cfg, monitor_cfg=monitor_cfg)

    def run(state: State, stream_key: jax.Array):
        def body(s, _):
            return step(s, jax.random.fold_in(stream_key, s.step))

        return jax.lax.scan(body, state, None, length=chunk)

    return jax.jit(run, donate_argnums=0)


def make_evaluator(logits_fn):
    """Jitted (params, contexts [B,C], targets [B], valid [B]) -> (sum of -log p(target), correct),
    summed over the valid rows (a padded last batch keeps one compiled shape)."""

    @jax.jit
    def evaluate(params, contexts, targets, valid):
        logp = jax.nn.log_softmax(logits_fn(params, contexts))
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid & (jnp.argmax(logp, -1) == targets))

    return evaluate


def make_text_sampler(logits_fn, context: int, length: int, temperature: float = 1.0):
    """Jitted (params, prompt [C] int, key) -> [length] sampled tokens, sliding the context window."""

    @jax.jit
    def sample(params, prompt, key):
        def body(window, k):
            logits = logits_fn(params, window[None])[0]
            nxt = jax.random.categorical(k, logits / temperature).astype(window.dtype)
            return jnp.concatenate([window[1:], nxt[None]]), nxt

        _, out = jax.lax.scan(body, prompt[-context:], jax.random.split(key, length))
        return out

    return sample

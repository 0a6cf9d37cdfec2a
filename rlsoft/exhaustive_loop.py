"""Compiled next-token RL from contexts (exact expectation over the whole vocabulary): exhaustive or sampled exploration, regularised.

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
between chunks. A population of P seeds (`cfg.population`) vmaps that scan over a leading member
axis: member p is exactly the run of seed `cfg.seed + p` (its own init and PRNG streams).
It knows no model and no task: `logits_fn(params, contexts[B,C]) -> [B,V]`,
`batch_fn(key) -> (contexts, targets)`, `reward_fn(contexts, targets, probs) -> [B,V]` and
`ref_log_probs_fn(contexts) -> [B,V]` are pure jnp functions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import chex
import numpy as np
import jax
import jax.numpy as jnp
import optax

from rlsoft import exhaustive, monitors, optim, roles, weighting
from rlsoft.driver import stream_keys
from rlsoft.roles import TrainState
from rlsoft.sampling import categorical
from rlsoft.config import check

MODES = ("exhaustive", "sampled")


@dataclasses.dataclass(frozen=True)
class ExhaustiveConfig:
    scheme: str = "softmax"
    tau: float | str = 0.5  # or "auto" (rlsoft.weighting.resolve_tau)
    mode: str = "exhaustive"
    mixing: str = "uniform"
    group_size: int = 8  # sampled mode only
    policy: optim.OptimizerConfig = optim.OptimizerConfig(name="adam", learning_rate=1e-3)
    clip_eps: float = 0.2
    lag_every: int = 4
    entropy_coef: float = 0.0
    kl_coef: float = 0.0

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"learning_rate": "policy.learning_rate", "grad_clip": "policy.grad_clip",
                                              "optimizer": "policy.name"}

    def __post_init__(self):
        weighting.validate_scheme(self.scheme)
        weighting.validate_tau(self.tau, self.scheme)
        check(self.scheme not in weighting.NEEDS_LOGP, f"scheme={self.scheme} is unavailable here: it needs the "
              "samples' log-probs, which this testbed does not pass; use experiments.bandit or experiments.countdown")
        check(self.mode in MODES, f"mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        exhaustive.validate_mixing(self.mixing)
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(0 <= self.clip_eps < 1, f"clip_eps={self.clip_eps} is invalid; need 0 <= clip_eps < 1")
        check(self.lag_every >= 1, f"lag_every={self.lag_every} is invalid; need >= 1")
        for name in ("entropy_coef", "kl_coef"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"{name}={value} is invalid; need a finite value >= 0")


class NextTokenFns(NamedTuple):
    """The model and the task as pure jnp functions. `reward_fn` is a device reward: it scores
    every candidate next token of every context on the accelerator, inside the compiled step."""

    logits_fn: Callable[[Any, jax.Array], jax.Array]  # (params, contexts [B,C]) -> [B,V]
    batch_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # key -> (contexts [B,C], targets [B])
    reward_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (contexts, targets, probs) -> [B,V]
    ref_log_probs_fn: Optional[Callable[[jax.Array], jax.Array]] = None  # contexts -> [B,V]


def make_optimizer(cfg: ExhaustiveConfig) -> optax.GradientTransformation:
    return optim.make_optimizer(cfg.policy)


def init_state(params: Any, cfg: ExhaustiveConfig, monitor_cfg: monitors.MonitorConfig) -> TrainState:
    """Roles: `policy` (trained) and `lagged` (the trust region's policy, refreshed every lag_every)."""
    return TrainState.create({"policy": roles.trainable(params, make_optimizer(cfg)), "lagged": roles.frozen(params)},
                             extra=monitors.init(monitor_cfg))


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


def step_loss(params, lag_params, contexts, targets, key, task: NextTokenFns, cfg: ExhaustiveConfig):
    """The loss `train_step` differentiates (module docstring): (loss, (metrics, logits)); `key`
    draws the sampled mode's actions."""
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


def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array, *, task: NextTokenFns,
               cfg: ExhaustiveConfig, monitor_cfg: monitors.MonitorConfig) -> tuple[TrainState, dict]:
    """One pure step: (state, (contexts, targets), key) -> (state, metrics); `key` draws the sampled
    mode's actions."""
    contexts, targets = batch
    policy = state.roles["policy"]
    (loss, (metrics, logits)), grads = jax.value_and_grad(step_loss, has_aux=True)(
        policy.params, state.params("lagged"), contexts, targets, key, task, cfg)
    policy = roles.apply_updates(policy, grads, make_optimizer(cfg))
    grad_norm = optax.tree.norm(grads)
    step = state.step + 1
    refresh = step % cfg.lag_every == 0
    lag = jax.tree.map(lambda p, l: jnp.where(refresh, p, l), policy.params, state.params("lagged"))
    health = monitors.step_metrics(jax.lax.stop_gradient(logits), targets, grad_norm)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, confidence=health["confidence"],
                   accuracy=health["accuracy"],
                   skipped_updates=optim.skipped_updates(policy.opt_state).astype(jnp.float32))
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    return TrainState(step, {"policy": policy, "lagged": roles.Role(lag)},
                      monitors.update(state.extra, health)), metrics


def make_train_chunk(task: NextTokenFns, cfg: ExhaustiveConfig, monitor_cfg: monitors.MonitorConfig, chunk: int,
                     population: bool = False):
    """`chunk` steps as one jitted `lax.scan`: (state, data_key, explore_key) -> (state, metrics [chunk]).
    Step t draws its batch with fold_in(data_key, t) and explores with fold_in(explore_key, t).
    `population`: vmapped over a leading member axis of the state, both keys and the metrics."""
    step = functools.partial(train_step, task=task, cfg=cfg, monitor_cfg=monitor_cfg)

    def run(state: TrainState, data_key: jax.Array, explore_key: jax.Array):
        def body(s, _):
            batch = task.batch_fn(jax.random.fold_in(data_key, s.step))
            return step(s, batch, jax.random.fold_in(explore_key, s.step))

        return jax.lax.scan(body, state, None, length=chunk)

    return jax.jit(jax.vmap(run) if population else run, donate_argnums=0)


def make_evaluator(logits_fn, population: bool = False):
    """Jitted (params, contexts [B,C], targets [B], valid [B]) -> (sum of -log p(target), correct),
    summed over the valid rows (a padded last batch keeps one compiled shape); `population`: params
    and both outputs carry a leading member axis."""

    def evaluate(params, contexts, targets, valid):
        logp = jax.nn.log_softmax(logits_fn(params, contexts))
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid & (jnp.argmax(logp, -1) == targets))

    return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)) if population else evaluate)


def make_text_sampler(logits_fn, context: int, length: int, temperature: float = 1.0):
    """Jitted (params, prompt [C] int, key) -> [length] sampled tokens, sliding the context window."""

    @jax.jit
    def sample(params, prompt, key):
        def body(window, k):
            logits = logits_fn(params, window[None])[0]
            nxt = categorical(k, logits[None] / temperature)[0].astype(window.dtype)
            return jnp.concatenate([window[1:], nxt[None]]), nxt

        _, out = jax.lax.scan(body, prompt[-context:], jax.random.split(key, length))
        return out

    return sample


class NextTokenTestbed:
    """A `rlsoft.driver.Driver` testbed: `cfg.chunk` compiled steps per call, eval on held-out windows.

    `cfg` is an ExhaustiveConfig with `seed`, `batch_size`, `chunk`, `eval_chars` and `eval_batch`
    fields (and `population`, default 1). `init_params(seed)` gives a member's initial parameters;
    `eval_windows(limit) -> iterable of (contexts [b,C], targets [b])` (numpy) comes from the task;
    the testbed pads the last batch to one compiled shape.

    A population (P > 1) trains seeds seed .. seed+P-1 in one program, each member with the PRNG
    streams of its own seed (`driver.stream_keys`), so member p equals the run of seed + p. Its
    training metrics are the members' mean (train/<m>) and each member's (train/member<p>/<m>);
    eval likewise (eval/<m>, eval/member<p>/<m>); health warnings name the member.
    """

    streams = ("data", "explore", "sample")
    progress_keys = ("train/loss", "train/accuracy", "train/entropy", "eval/cross_entropy", "eval/perplexity")

    def __init__(self, cfg, fns: NextTokenFns, init_params: Callable[[int], Any], eval_windows: Callable,
                 total_steps: int, monitor_cfg: monitors.MonitorConfig = monitors.MonitorConfig()):
        self.cfg, self.fns, self.init_params, self.eval_windows = cfg, fns, init_params, eval_windows
        self.total_steps, self.monitor_cfg = total_steps, monitor_cfg
        self.seeds = [cfg.seed + p for p in range(getattr(cfg, "population", 1))]
        self.population = len(self.seeds) > 1
        members = [stream_keys(seed, self.streams) for seed in self.seeds]
        self.member_keys = {k: jnp.stack([m[k] for m in members]) for k in self.streams}
        self._chunks: dict[int, Callable] = {}  # one compiled scan per length (the chunk, a remainder)
        self._evaluator = make_evaluator(fns.logits_fn, self.population)

    def init_state(self) -> TrainState:
        states = [init_state(self.init_params(seed), self.cfg, self.monitor_cfg) for seed in self.seeds]
        return roles.stack_members(states) if self.population else states[0]

    def member_params(self, state: TrainState, p: int = 0) -> Any:
        """Member p's policy parameters (the only member of a run of one)."""
        params = state.params("policy")
        return roles.unstack_member(params, p) if self.population else params

    def steps_per_call(self) -> int:
        return self.cfg.chunk

    def data_position(self, step: int) -> int:
        return step * self.cfg.batch_size

    def _chunk(self, num_steps: int) -> Callable:
        if num_steps not in self._chunks:
            self._chunks[num_steps] = make_train_chunk(self.fns, self.cfg, self.monitor_cfg, num_steps,
                                                       self.population)
        return self._chunks[num_steps]

    def _keys(self, keys) -> Mapping[str, jax.Array]:
        # A run of one uses the driver's streams (the same as stream_keys of its seed).
        return self.member_keys if self.population else keys

    def lower(self, state: TrainState, step: int, num_steps: int, keys) -> list:
        """The first train call's scan and the evaluator, lowered (the driver compiles them at once)."""
        keys = self._keys(keys)
        out = [self._chunk(num_steps).lower(state, keys["data"], keys["explore"])]
        for contexts, targets in self.eval_windows(self.cfg.eval_batch):
            out.append(self._evaluator.lower(state.params("policy"), *self._eval_batch(contexts, targets)))
            break
        return out

    def _eval_batch(self, contexts, targets):
        """One eval batch padded to `eval_batch` rows (one compiled shape); padded rows masked out."""
        b, n = self.cfg.eval_batch, len(targets)
        valid = np.arange(b) < n
        if n < b:
            contexts = np.concatenate([contexts, contexts[:1].repeat(b - n, 0)])
            targets = np.concatenate([targets, targets[:1].repeat(b - n, 0)])
        return contexts, targets, valid

    def _with_members(self, means: dict, per_member: Mapping[str, np.ndarray]) -> dict:
        """`means` plus <head>/member<p>/<name> for each <head>/<name> of `per_member` ([P, ...])."""
        for k, v in per_member.items():
            head, _, name = k.partition("/")
            means.update({f"{head}/member{p}/{name}": v[p] for p in range(len(self.seeds))})
        return means

    def train(self, state: TrainState, step: int, num_steps: int, keys) -> tuple[TrainState, dict]:
        keys = self._keys(keys)
        state, metrics = self._chunk(num_steps)(state, keys["data"], keys["explore"])
        if not self.population:
            healths = [monitors.report(state.extra)]
        else:
            reports = jax.device_get(jax.vmap(monitors.summarize)(state.extra))
            healths = [{k: float(v[p]) for k, v in reports.items()} for p in range(len(self.seeds))]
        for p, health in enumerate(healths):
            who = f"member {p} (seed {self.seeds[p]}): " if self.population else ""
            for w in monitors.warnings(health, self.monitor_cfg):
                print(f"warning: step {step + num_steps}: {who}{w}", flush=True)
        if self.population:  # [P, n] -> the members' mean [n], and each member's
            metrics = self._with_members({k: jnp.mean(v, axis=0) for k, v in metrics.items()}, metrics)
        metrics = dict(metrics)
        # Scalars: the last step's row (a population's: the members' mean).
        metrics.update({f"health/{k}": float(np.mean([h[k] for h in healths])) for k in healths[0]})
        return state, metrics

    def evaluate_members(self, state: TrainState, limit: Optional[int] = None) -> dict[str, np.ndarray]:
        """Each member's cross-entropy (nats/char), perplexity = exp(cross-entropy) and top-1
        accuracy, as arrays [P] (P = 1 for a run of one)."""
        nll = correct = np.zeros(len(self.seeds))
        count = 0
        for contexts, targets in self.eval_windows(self.cfg.eval_chars if limit is None else limit):
            s, c = self._evaluator(state.params("policy"), *self._eval_batch(contexts, targets))
            nll, correct, count = nll + np.asarray(s), correct + np.asarray(c), count + len(targets)
        ce = nll / max(count, 1)
        return {"eval/cross_entropy": ce, "eval/perplexity": np.exp(np.minimum(ce, 700.0)),
                "eval/top1": correct / max(count, 1)}

    def evaluate(self, state: TrainState, keys=None, limit: Optional[int] = None) -> dict[str, float]:
        """The members' mean of each eval metric, and (a population) each member's."""
        return self.eval_summary(self.evaluate_members(state, limit))

    def eval_summary(self, per_member: Mapping[str, np.ndarray]) -> dict[str, float]:
        """`evaluate`'s dict from `evaluate_members`' arrays (one eval pass serves both)."""
        means = {k: float(np.mean(v)) for k, v in per_member.items()}
        if not self.population:
            return means
        return {k: float(v) for k, v in self._with_members(means, per_member).items()}

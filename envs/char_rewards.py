"""Rewards for character-level RL from random weights: every candidate next character at once.

Seed 002 ("character-level RL from random weights") scores all V characters of a context
("exhaustive exploration") with "a combination of how close the character is to the bigram
distribution, exact match to the ground truth, and a confidence bonus (if confident and correct)",
the bonus carrying "a scaling factor". For one context x with ground-truth next character y and
candidate c in {0, ..., V - 1}:

    exact(c)  = 1[c == y]
    bonus     = min(1 + s * sg(p_theta(y | x)), cap)                     (a capped confidence bonus)
    ngram(c)  = one of, by `ngram_mode` (p_n = the add-k order-n model of envs.ngram,
                given the last n - 1 characters of x):
                  "log_prob": log p_n(c | x)                                in (-inf, 0]
                  "shifted":  log p_n(c | x) - max_c' log p_n(c' | x)       in (-inf, 0], best = 0
                  "prob":     p_n(c | x)                                    in (0, 1)
    r(c)      = w_exact * exact(c) * bonus + w_ngram * ngram(c)

sg is stop-gradient: p_theta(y | x) is the policy's probability of the target, passed in by the
caller; the bonus rewards being right AND confident, and grows as the policy's confidence in the
truth grows over training (the seed's "boost as the training goes forward"), up to `cap`.

Choice of the default n-gram term, "shifted": it keeps the order of log p_n (an implausible
character costs much more than a merely unlikely one, unlike "prob") but removes the per-context
constant log-normaliser, so the best candidate always scores 0 and the term does not drift with
the context's entropy (a sampled-reward / raw-REINFORCE user sees no context-dependent offset;
centred weightings such as GRPO are invariant to that constant anyway). avataRL's own
`compute_rewards` (gpt2/grpo_dense_v2_flash.py) used "log_prob" with weight 0.1 / 10.

Everything here is pure jnp over ONE unbatched context (chex-checked) and jittable with the
config static; `batch_*` vmap over a leading batch axis.
"""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

from envs.ngram import NGramTable, ngram_log_probs
from rlsoft.config import check

NGRAM_MODES = ("log_prob", "shifted", "prob")


@dataclasses.dataclass(frozen=True)
class CharRewardConfig:
    """Weights of r(c) = w_exact * exact(c) * bonus + w_ngram * ngram(c) (module docstring).

    Defaults are placeholders for the first sweeps, not tuned values.
    """

    w_exact: float = 1.0
    w_ngram: float = 0.1
    ngram_order: int = 2  # n of the n-gram table passed in (the table does not record it); seed: bigram
    ngram_mode: str = "shifted"  # one of NGRAM_MODES
    confidence_scale: float = 1.0  # s in 1 + s * p(target); 0 turns the bonus off
    bonus_cap: float = 1.5  # the multiplier's maximum (>= 1)

    def __post_init__(self):
        for name in ("w_exact", "w_ngram", "confidence_scale", "bonus_cap"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value),
                  f"{name}={value!r} is invalid; need a finite number")
        check(isinstance(self.ngram_order, int) and self.ngram_order >= 1,
              f"ngram_order={self.ngram_order!r} is invalid; need an integer >= 1")
        check(self.ngram_mode in NGRAM_MODES,
              f"ngram_mode={self.ngram_mode!r} is invalid; allowed: {', '.join(NGRAM_MODES)}")
        check(self.confidence_scale >= 0, f"confidence_scale={self.confidence_scale} is invalid; need >= 0")
        check(self.bonus_cap >= 1, f"bonus_cap={self.bonus_cap} is invalid; need >= 1 (no bonus is 1)")


# --------------------------------------------------------------------------------------------
# The terms, one context each.


def exact_match_rewards(target: chex.Array, vocab_size: int) -> chex.Array:
    """exact(c) = 1[c == target] for c = 0 .. V - 1: [V] float32 (a one-hot of the target)."""
    chex.assert_rank(target, 0)
    chex.assert_type(target, int)
    return (jnp.arange(vocab_size) == target).astype(jnp.float32)


def ngram_context(context: chex.Array, order: int) -> chex.Array:
    """The last n - 1 characters of `context: [C]` (C >= n - 1); [0] for the unigram."""
    chex.assert_rank(context, 1)
    width = order - 1
    if context.shape[0] < width:
        raise ValueError(f"context of length {context.shape[0]} is too short for an order-{order} n-gram")
    return context[context.shape[0] - width:]


def ngram_rewards(table: NGramTable, context: chex.Array, order: int, mode: str = "shifted") -> chex.Array:
    """ngram(c) for every candidate c: [V], from the order-`order` table (see the module docstring)."""
    if mode not in NGRAM_MODES:
        raise ValueError(f"mode={mode!r} is invalid; allowed: {', '.join(NGRAM_MODES)}")
    log_p = ngram_log_probs(table, ngram_context(context, order))
    chex.assert_rank(log_p, 1)
    if mode == "log_prob":
        return log_p
    if mode == "shifted":
        return log_p - jnp.max(log_p)
    return jnp.exp(log_p)


def confidence_multiplier(cfg: CharRewardConfig, p_target: chex.Array) -> chex.Array:
    """bonus = min(1 + s * sg(p_target), cap): scalar, no gradient to the policy through it."""
    p = jax.lax.stop_gradient(jnp.asarray(p_target, jnp.float32))
    chex.assert_rank(p, 0)
    return jnp.minimum(1.0 + cfg.confidence_scale * p, cfg.bonus_cap)


# --------------------------------------------------------------------------------------------
# Combined rewards.


def candidate_rewards(cfg: CharRewardConfig, table: NGramTable, context: chex.Array,
                      target: chex.Array, p_target: chex.Array) -> chex.Array:
    """r(c) for all V candidates of one context: [V] float32.

    context: [C] int ids (C >= ngram_order - 1), target: [] int id, p_target: [] policy
    probability of the target (stop-gradient applied here). V = table.log_probs.shape[-1].
    """
    context = jnp.asarray(context)
    target = jnp.asarray(target)
    chex.assert_rank([context, target], [1, 0])
    vocab_size = table.log_probs.shape[-1]
    exact = exact_match_rewards(target, vocab_size)
    r = cfg.w_exact * exact * confidence_multiplier(cfg, p_target)
    if cfg.w_ngram != 0:
        r = r + cfg.w_ngram * ngram_rewards(table, context, cfg.ngram_order, cfg.ngram_mode)
    chex.assert_shape(r, (vocab_size,))
    return r


def sampled_rewards(cfg: CharRewardConfig, table: NGramTable, context: chex.Array, target: chex.Array,
                    p_target: chex.Array, actions: chex.Array) -> chex.Array:
    """r(a_g) for sampled characters `actions: [G]` of one context: [G], gathered from the [V] rewards."""
    actions = jnp.asarray(actions)
    chex.assert_rank(actions, 1)
    return candidate_rewards(cfg, table, context, target, p_target)[actions]


def _check_batch(contexts, targets, p_targets, actions=None) -> None:
    b = contexts.shape[0] if contexts.ndim == 2 else -1
    ok = b >= 0 and targets.shape == (b,) and p_targets.shape == (b,)
    shapes = f"{contexts.shape}, {targets.shape}, {p_targets.shape}"
    need = "contexts [B, C], targets [B], p_targets [B]"
    if actions is not None:
        ok = ok and actions.ndim == 2 and actions.shape[0] == b
        shapes, need = f"{shapes}, {actions.shape}", f"{need}, actions [B, G]"
    if not ok:
        raise ValueError(f"batch shapes {shapes} are invalid; need {need}")


def batch_candidate_rewards(cfg: CharRewardConfig, table: NGramTable, contexts, targets, p_targets) -> jax.Array:
    """`candidate_rewards` vmapped: contexts [B, C], targets [B], p_targets [B] -> [B, V]."""
    contexts, targets, p_targets = jnp.asarray(contexts), jnp.asarray(targets), jnp.asarray(p_targets)
    _check_batch(contexts, targets, p_targets)
    fn = lambda x, y, p: candidate_rewards(cfg, table, x, y, p)
    return jax.vmap(fn)(contexts, targets, p_targets)


def batch_sampled_rewards(cfg: CharRewardConfig, table: NGramTable, contexts, targets, p_targets,
                          actions) -> jax.Array:
    """`sampled_rewards` vmapped: ... and actions [B, G] -> [B, G]."""
    contexts, targets, p_targets = jnp.asarray(contexts), jnp.asarray(targets), jnp.asarray(p_targets)
    actions = jnp.asarray(actions)
    _check_batch(contexts, targets, p_targets, actions)
    fn = lambda x, y, p, a: sampled_rewards(cfg, table, x, y, p, a)
    return jax.vmap(fn)(contexts, targets, p_targets, actions)


def target_probs(logits, targets) -> jax.Array:
    """sg(softmax(logits)[target]) per row: logits [..., V], targets [...] -> [...] (the p_targets input)."""
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not match; need [..., V] and [...]")
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.lax.stop_gradient(jnp.exp(picked))

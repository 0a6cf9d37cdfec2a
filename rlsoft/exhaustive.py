"""Exhaustive exploration for next-token RL (seed 002): score all V actions of a context at once.

Setting: a context x (e.g. 64 characters) is the state, the next character c in {0..V-1} the action,
pi(c) = softmax(logits(x))_c the policy. A reward r(c) is known for EVERY action (exact match with
the data, n-gram likelihood, ...), so instead of sampling we can take the expectation exactly.

Exhaustive loss (one context; w = compute_weights(r, scheme, tau) over the V actions as the group):

    L_ex = -sum_c sg(q(c)) sg(w(c)) log pi(c),     q = pi ("pi", default)  or  q = 1/V ("uniform")

    grad L_ex = -sum_c q(c) w(c) grad log pi(c);   d L_ex / d logit_j = -(q_j w_j - pi_j sum_c q_c w_c)

With q = pi this is E_{c~pi}[w(c) grad log pi(c)], the REINFORCE gradient (Williams 1992) computed
exactly instead of estimated: the "all-action" / expected policy gradient (Ciosek & Whiteson 2018,
"Expected Policy Gradients"; Allen et al. 2017, "Mean Actor-Critic"). It costs ONE forward pass:
the V candidates are the V entries of the softmax at the context's LAST position. Two consequences:
  * any baseline constant over the group cancels exactly (sum_c pi grad log pi = grad sum_c pi = 0),
    so "raw" (w = r), "drgrpo" (r - mean) and any other shift give the same gradient, and "linear"
    only rescales it by 1 / (std + 1e-4);
  * the per-logit gradient -pi_j (w_j - E_pi w) is proportional to pi_j: at a uniform random init
    the correct character is pulled up with strength only ~(1/V) w.

"uniform" (q = 1/V) is seed 002's "update on all 65 characters" taken literally: every action gets
the same mixing mass whatever pi. It is NOT the gradient of expected reward (it is the expectation
under the uniform distribution, off-policy), but it has no vanishing factor pi_j: for weights with
sum_c w = 0 the per-logit gradient is just -w_j / V. Useful identities:
  * best_of_n weights of an exact-match reward (w = V on the target, 0 elsewhere) give
    L = -log pi(target): supervised cross-entropy;
  * softmax weights (w = V softmax(r / tau)) give L = CE(softmax(r / tau), pi), minimised at
    pi = softmax(r / tau) (the AWR / Boltzmann view of seeds 000-001).

Sampled loss, for comparison (group of G draws c_i ~ pi per context, w over the G sampled rewards):

    L_s = -(1/G) sum_i sg(w_i) log pi(c_i)

For "raw", E[grad L_s] = grad L_ex(pi) exactly. For group-dependent schemes the two differ by design:
sampled "rloo" is unbiased (E = raw's gradient), sampled "drgrpo" has E = (G - 1)/G times it (the
group mean contains c_i itself), and "linear"/"softmax"/"rank" have no closed form. Exhaustive weights
are computed over all V actions (a uniform, not pi-weighted, population), so the exhaustive version
of a group scheme is a different objective, not the limit G -> inf of the sampled one.

Pitfall in the seed's code, not copied here: candidates scored one forward pass at a time, and on the
logits AFTER the candidate (position C, which predicts the character following c). The log-prob of
candidate c after context x[0:C] is log_softmax(logits[C - 1])_c; `per_candidate_value_and_grad` is
that V-pass reference done right (it equals the exhaustive loss; it is only slower).

Interfaces (model-agnostic; B contexts of C tokens, V actions):
    logits_fn(params, contexts[B,C]) -> logits[B,V]           next-token logits (last position)
    sequence_logits_fn(params, tokens[B,T]) -> logits[B,T,V]  per-position forward (reference only)
    reward_fn(contexts[B,C], actions[B,G]) -> rewards[B,G]    `table_reward_fn(rewards[B,V])` gathers
Core functions take one context (chex-checked); the batched losses vmap them and average over B.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import weighting
from rlsoft.rollout import categorical

MIXINGS: tuple[str, ...] = ("pi", "uniform")

LogitsFn = Callable[[Any, jax.Array], jax.Array]
SequenceLogitsFn = Callable[[Any, jax.Array], jax.Array]
RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


def validate_mixing(mixing: str) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"mixing={mixing!r} is unknown; allowed: {', '.join(MIXINGS)}")


def _log_softmax(logits: chex.Array) -> chex.Array:
    return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


# --------------------------------------------------------------------------------------------
# Core terms, one context each.


def mixing_distribution(logp: chex.Array, mixing: str) -> chex.Array:
    """q [V] (no gradient): sg(pi) for "pi", 1/V for "uniform"."""
    chex.assert_rank(logp, 1)
    validate_mixing(mixing)
    if mixing == "uniform":
        return jnp.full_like(logp, 1.0 / logp.shape[0])
    return jax.lax.stop_gradient(jnp.exp(logp))


def exhaustive_objective(logits: chex.Array, weights: chex.Array, mixing: str = "pi") -> chex.Array:
    """-sum_c sg(q(c)) sg(w(c)) log pi(c) for ONE context: logits [V], weights [V] -> scalar."""
    chex.assert_rank([logits, weights], 1)
    chex.assert_equal_shape([logits, weights])
    logp = _log_softmax(logits)
    q = mixing_distribution(logp, mixing)
    return -jnp.sum(q * jax.lax.stop_gradient(weights).astype(logp.dtype) * logp)


def sampled_objective(logits: chex.Array, actions: chex.Array, weights: chex.Array) -> chex.Array:
    """-(1/G) sum_i sg(w_i) log pi(a_i) for ONE context: logits [V], actions [G] int, weights [G]."""
    chex.assert_rank([logits, actions, weights], [1, 1, 1])
    chex.assert_equal_shape([actions, weights])
    logp = _log_softmax(logits)[actions]
    return -jnp.mean(jax.lax.stop_gradient(weights).astype(logp.dtype) * logp)


def policy_stats(logits: chex.Array, rewards: chex.Array) -> dict[str, chex.Array]:
    """Diagnostics of one context's policy against its full reward vector (logits, rewards [V]).

    entropy = -sum pi log pi (nats); expected_reward = sum pi r; p_best = pi-mass on the actions tied
    for max r; greedy_reward = r(argmax pi).
    """
    chex.assert_rank([logits, rewards], 1)
    chex.assert_equal_shape([logits, rewards])
    logp = _log_softmax(logits)
    pi = jnp.exp(logp)
    r = rewards.astype(pi.dtype)
    return {
        "entropy": -jnp.sum(pi * logp),
        "expected_reward": jnp.sum(pi * r),
        "p_best": jnp.sum(jnp.where(r == jnp.max(r), pi, 0.0)),
        "greedy_reward": r[jnp.argmax(logits)],
    }


def target_stats(logits: chex.Array, target: chex.Array) -> dict[str, chex.Array]:
    """p(target), log p(target) and top-1 accuracy of one context (logits [V], target scalar int)."""
    chex.assert_rank([logits, target], [1, 0])
    logp = _log_softmax(logits)
    return {"p_target": jnp.exp(logp[target]), "logp_target": logp[target],
            "accuracy": (jnp.argmax(logits) == target).astype(logp.dtype)}


# --------------------------------------------------------------------------------------------
# Batched losses (pure; usable inside jax.jit with logits_fn / scheme / tau / mixing static).


def _weight_metrics(weights: jax.Array, rewards: jax.Array) -> dict[str, jax.Array]:
    stats = weighting.summarize_weight_stats(weighting.weight_stats(weights, rewards))
    return {f"weights/{k}": v for k, v in stats.items()}


def _mean_stats(fn, *args) -> dict[str, jax.Array]:
    return {k: jnp.mean(v) for k, v in jax.vmap(fn)(*args).items()}


def exhaustive_loss(params, contexts, rewards, logits_fn: LogitsFn, scheme: str, tau: weighting.Tau = None,
                    *, mixing: str = "pi", targets: Optional[jax.Array] = None):
    """(loss, metrics): the mean over B contexts of `exhaustive_objective` from ONE forward pass.

    contexts [B,C] int, rewards [B,V] (every action's reward), optional targets [B] int for
    p_target / accuracy. Weights w = compute_weights(rewards, scheme, tau=tau), the V actions being
    the group. Metrics (scalars, batch means): loss, entropy, expected_reward, p_best, greedy_reward,
    [p_target, logp_target, accuracy], and `weights/...` from rlsoft.weighting.weight_stats.
    """
    validate_mixing(mixing)
    contexts, rewards = jnp.asarray(contexts), jnp.asarray(rewards)
    chex.assert_rank([contexts, rewards], 2)
    chex.assert_equal_shape_prefix([contexts, rewards], 1)
    logits = logits_fn(params, contexts)
    chex.assert_shape(logits, rewards.shape)
    weights = weighting.compute_weights(rewards, scheme, tau=tau)
    per_context = jax.vmap(lambda z, w: exhaustive_objective(z, w, mixing))(logits, weights)
    loss = jnp.mean(per_context)
    metrics = {"loss": loss, **_mean_stats(policy_stats, logits, rewards)}
    if targets is not None:
        chex.assert_shape(targets, rewards.shape[:1])
        metrics.update(_mean_stats(target_stats, logits, jnp.asarray(targets)))
    metrics.update(_weight_metrics(weights, rewards))
    return loss, metrics


def sample_actions(key, logits: jax.Array, group_size: int) -> jax.Array:
    """G actions per context, c ~ softmax(logits[b]): logits [B,V] -> int32 [B,G] (no gradient)."""
    chex.assert_rank(logits, 2)
    return categorical(key, jax.lax.stop_gradient(logits), group_size)  # one exp and cdf per context


def table_reward_fn(all_rewards: jax.Array) -> RewardFn:
    """reward_fn that looks actions up in a [B,V] table of every action's reward (for comparisons)."""
    return lambda contexts, actions: jnp.take_along_axis(all_rewards, actions, axis=-1)


def sampled_loss(params, contexts, key, reward_fn: RewardFn, logits_fn: LogitsFn, scheme: str,
                 tau: weighting.Tau = None, group_size: int = 8, *, targets: Optional[jax.Array] = None):
    """(loss, metrics): mean over B contexts of `sampled_objective` with G = group_size draws each.

    Rewards come from reward_fn(contexts, actions[B,G]) -> [B,G]; weights are computed over each
    context's G sampled rewards. Metrics: loss, entropy, sampled_reward, [p_target, logp_target,
    accuracy], weights/... .
    """
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size={group_size!r} is invalid; need an integer >= 2")
    contexts = jnp.asarray(contexts)
    chex.assert_rank(contexts, 2)
    logits = logits_fn(params, contexts)
    chex.assert_rank(logits, 2)
    chex.assert_axis_dimension(logits, 0, contexts.shape[0])
    actions = sample_actions(key, logits, group_size)
    rewards = jnp.asarray(reward_fn(contexts, actions))
    chex.assert_shape(rewards, actions.shape)
    weights = weighting.compute_weights(rewards, scheme, tau=tau)
    loss = jnp.mean(jax.vmap(sampled_objective)(logits, actions, weights))
    logp = _log_softmax(logits)
    metrics = {"loss": loss, "entropy": jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)),
               "sampled_reward": jnp.mean(rewards)}
    if targets is not None:
        chex.assert_shape(targets, contexts.shape[:1])
        metrics.update(_mean_stats(target_stats, logits, jnp.asarray(targets)))
    metrics.update(_weight_metrics(weights, rewards))
    return loss, metrics


# --------------------------------------------------------------------------------------------
# The V-pass reference: candidate appended to the context, scored at the right position.


def per_candidate_value_and_grad(params, contexts, rewards, sequence_logits_fn: SequenceLogitsFn, scheme: str,
                                 tau: weighting.Tau = None, *, mixing: str = "pi", candidates_per_pass: int = 1):
    """(loss, grads) of the exhaustive loss computed the seed's way: V forward passes per context.

    Pass c runs the model on [context, c] (length C + 1) and reads log pi(c) = log_softmax(logits[C-1])_c,
    the position that PREDICTS the candidate (logits[C] predict the character after it). Gradients
    are accumulated over a lax.scan of V / k steps, each a batch of k = candidates_per_pass
    candidates x B contexts (k must divide V): k = 1 is a loop with one pass' memory, k = V a
    single vmapped batch of B V sequences. Equal to `exhaustive_loss` and its gradient up to rounding.
    """
    validate_mixing(mixing)
    contexts, rewards = jnp.asarray(contexts), jnp.asarray(rewards)
    chex.assert_rank([contexts, rewards], 2)
    chex.assert_equal_shape_prefix([contexts, rewards], 1)
    (b, c_len), v = contexts.shape, rewards.shape[1]
    k = candidates_per_pass
    if not isinstance(k, int) or k < 1 or v % k:
        raise ValueError(f"candidates_per_pass={k!r} is invalid; need a positive divisor of V={v}")
    weights = jax.lax.stop_gradient(weighting.compute_weights(rewards, scheme, tau=tau))

    def chunk_loss(p, cands):  # cands [k]
        tokens = jnp.concatenate([jnp.broadcast_to(contexts[None], (k, b, c_len)),
                                  jnp.broadcast_to(cands[:, None, None], (k, b, 1)).astype(contexts.dtype)], -1)
        logits = sequence_logits_fn(p, tokens.reshape(k * b, c_len + 1))[:, c_len - 1]
        logp_all = _log_softmax(logits).reshape(k, b, v)
        logp = jnp.take_along_axis(logp_all, cands[:, None, None], axis=-1)[..., 0]  # [k, b]
        q = jax.lax.stop_gradient(jnp.exp(logp)) if mixing == "pi" else jnp.full_like(logp, 1.0 / v)
        w = weights.T[cands].astype(logp.dtype)  # [k, b]
        return -jnp.sum(q * w * logp) / b

    grad_fn = jax.value_and_grad(chunk_loss)

    def step(acc, cands):
        loss, grads = grad_fn(params, cands)
        return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(step, zeros, jnp.arange(v, dtype=jnp.int32).reshape(v // k, k))
    return loss, grads


# --------------------------------------------------------------------------------------------
# One optimizer step.


def apply_gradients(params, opt_state, grads, tx: optax.GradientTransformation):
    """(params, opt_state, grad_norm) after one `tx` step on `grads`."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def exhaustive_update(params, opt_state, contexts, rewards, *, logits_fn: LogitsFn, tx: optax.GradientTransformation,
                      scheme: str, tau: weighting.Tau = None, mixing: str = "pi", targets=None):
    """One exhaustive step: forward + backward of `exhaustive_loss` + `tx`. Jit with the keywords bound
    (functools.partial), e.g. jax.jit(partial(exhaustive_update, logits_fn=..., tx=..., scheme=...)).
    Returns (params, opt_state, metrics) with metrics["grad_norm"]."""
    loss_fn = lambda p: exhaustive_loss(p, contexts, rewards, logits_fn, scheme, tau, mixing=mixing, targets=targets)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state, grad_norm = apply_gradients(params, opt_state, grads, tx)
    return params, opt_state, dict(metrics, grad_norm=grad_norm)

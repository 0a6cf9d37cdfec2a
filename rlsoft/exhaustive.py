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
candidate c after context x[0:C] is log_softmax(logits[C - 1])_c, which the one pass already has
(benchmarks/per_candidate.py keeps the V-pass way, done right, as the baseline it is).

The per-context terms below are what `rlsoft.exhaustive_loop` (the char testbed's compiled step)
vmaps over a batch; they take one context each (chex-checked), V actions.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlsoft.sampling import categorical

MIXINGS: tuple[str, ...] = ("pi", "uniform")


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


# --------------------------------------------------------------------------------------------
# Sampled exploration.


def sample_actions(key, logits: jax.Array, group_size: int) -> jax.Array:
    """G actions per context, c ~ softmax(logits[b]): logits [B,V] -> int32 [B,G] (no gradient)."""
    chex.assert_rank(logits, 2)
    return categorical(key, jax.lax.stop_gradient(logits), group_size)  # one exp and cdf per context

"""Exploring thought sequences: exhaustive enumeration, and Monte-Carlo tree search when V^T is too big.

Setting (the thinking-token testbed): a *thinker* writes T thought tokens, each one of A classes:
V thoughts plus, optionally, an end-of-thought class `eot` (= V by convention) that ends the sequence
early. An *answerer* reads the thoughts; its log-probability of the correct answer is the reward
r(s) = log p(correct | s) of the finished sequence s. This module knows neither: it takes them as
functions.

Canonical sequences. After an EOT every later position is EOT: the sequence [2, EOT, 1] does not
exist, it is [2, EOT, EOT]. `canonicalize` maps any sequence to that form.

Enumeration (`enumerate_sequences`): all A^T sequences in lexicographic order (position 0 most
significant), guarded by a size limit; with an EOT class it includes non-canonical ones.

Tree search (`search_sequences`): AlphaZero's scheme (Silver et al. 2018, "A general reinforcement
learning algorithm that masters chess, shogi, and Go through self-play") with Gumbel MuZero's
search (Danihelka et al. 2022, "Policy improvement by planning with Gumbel"), DeepMind's `mctx`.
The sequence is built position by position: at t = 0..T-1 one `mctx.gumbel_muzero_policy` search
runs from the root = the current prefix, its improved policy pi'(a) = softmax(prior_logits + sigma(q))
(`PolicyOutput.action_weights`, the completed-Q policy of the paper's eq. 11) is the training target
for position t, and one action is appended. The search's MDP:

    state       (prefix [T] int32, length, done); prefix[i] for i >= length is the padding id
    action a    appended at position `length`
    finishes    length + 1 == T, or a == eot (then the rest of the prefix is filled with eot)
    finishing   reward = reward_fn(finished sequence), discount = 0
    otherwise   reward = 0, discount = 1, value = value_fn(prefix, length)
    finished    absorbing: reward 0, discount 0 (its Q, r + 0 * V, stays the final reward)

so the return of a path is the reward of the sequence it finishes. Q(prefix, a) is mctx's mean
return over the simulations through a (and the root value the mean over all of them); Gumbel MuZero's
interior selection concentrates simulations on the better continuations, so Q tends to the best
reachable reward as the number of simulations grows.

Value scale. r = log p is unbounded below (e.g. -20). mctx's default q-transform,
`qtransform_completed_by_mix_value`, min-max rescales the completed Q-values of each node to [0, 1]
before scaling them by (50 + max visits) * 0.1, so any affine scale of the reward gives the same
search: log-probabilities need no normalisation. Only their order and relative gaps matter. The
flip side: the range is per node, so one very bad sibling (an early EOT whose sequence scores
log p = -10) squeezes the gaps between the good ones, and a confident wrong prior can then outweigh
the search in pi' = softmax(prior_logits + sigma(q)); more simulations widen sigma's scale.
Likewise a constant `value_fn` is not neutral next to EOT: value 0 (= log p 1) makes every
unfinished prefix look better than stopping until its subtree is searched.

Padding. The padding id is `eot` when there is an EOT class, else 0. With EOT padding an unfinished
prefix reads as "stop thinking here", so `value_fn(prefix, length) = reward_fn(prefix)` is a valid
heuristic value (the answerer's log p reading the thoughts so far).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import mctx
import numpy as np

# (prefix [B,T] int32, position [B] int32) -> logits [B,A] for the token at `position`.
PriorLogitsFn = Callable[[chex.Array, chex.Array], chex.Array]
# (prefix [B,T] int32, length [B] int32) -> [B]: heuristic value of an unfinished prefix.
ValueFn = Callable[[chex.Array, chex.Array], chex.Array]
# (sequences [B,T] int32) -> [B]: reward of finished (canonical) sequences.
RewardFn = Callable[[chex.Array], chex.Array]


def enumerate_sequences(num_classes: int, length: int, max_sequences: int = 2 ** 16) -> jax.Array:
    """All num_classes**length sequences, int32 [num_classes**length, length], lexicographic.

    Row i is i written in base num_classes, position 0 most significant. Raises ValueError above
    `max_sequences` rows: that is the regime `search_sequences` is for. Built with numpy from static
    ints, so it is a constant under jit.
    """
    if num_classes < 1 or length < 1:
        raise ValueError(f"num_classes and length must be >= 1, got {num_classes}, {length}")
    count = num_classes ** length  # Python int: no overflow before the guard
    if count > max_sequences:
        raise ValueError(f"{num_classes}**{length} = {count} sequences exceed max_sequences="
                         f"{max_sequences}; use search_sequences")
    powers = num_classes ** np.arange(length - 1, -1, -1, dtype=np.int64)
    digits = (np.arange(count, dtype=np.int64)[:, None] // powers[None, :]) % num_classes
    return jnp.asarray(digits, dtype=jnp.int32)


def canonicalize(sequences: chex.Array, eot: int) -> jax.Array:
    """Every position after the first EOT becomes EOT. sequences: [..., T] int32."""
    is_eot = sequences == eot
    after_eot = jnp.cumsum(is_eot.astype(jnp.int32), axis=-1) > 0
    return jnp.where(after_eot, eot, sequences).astype(jnp.int32)


def thought_mask(sequences: chex.Array, eot: Optional[int]) -> jax.Array:
    """[..., T] bool: True where a token was chosen by search (up to and including the first EOT).

    Positions after the first EOT carry forced one-hot EOT targets in `SearchResult.policy_targets`;
    a trainer masks them with this. Without an EOT class every position is True.
    """
    if eot is None:
        return jnp.ones(sequences.shape, bool)
    is_eot = (sequences == eot).astype(jnp.int32)
    eots_before = jnp.cumsum(is_eot, axis=-1) - is_eot  # EOTs strictly before each position
    return eots_before == 0


class SearchResult(NamedTuple):
    """The output of `search_sequences`.

    sequences: [B,T] int32, canonical (after an EOT, all EOT).
    policy_targets: [B,T,A] float32, rows sum to 1. At position t: mctx's `action_weights` of the
      search rooted at sequences[:, :t]. At positions after the first EOT: one-hot EOT (no search
      decided them; mask them with `thought_mask`).
    root_values: [B,T] float32, the search's value of the root prefix at t (an estimate of the final
      reward, in reward units). 0 at positions after the first EOT (an absorbing state's value).
    """

    sequences: jax.Array
    policy_targets: jax.Array
    root_values: jax.Array


class _Node(NamedTuple):
    """A search-tree node's embedding, batched: prefix [B,T], length [B], done [B]."""

    prefix: jax.Array
    length: jax.Array
    done: jax.Array


def _make_recurrent_fn(prior_logits_fn, value_fn, reward_fn, length, num_classes, eot):
    """mctx's recurrent_fn(params, key, action [B], embedding) -> (RecurrentFnOutput, embedding)."""
    positions = jnp.arange(length, dtype=jnp.int32)

    def recurrent_fn(params, rng_key, action, node: _Node):
        del params, rng_key  # the MDP is deterministic; models come in through the closures
        batch = action.shape[0]
        action = action.astype(jnp.int32)
        at = jnp.minimum(node.length, length - 1)  # finished nodes have length T
        # Positions after `at` keep the padding id: the root prefix is padded and nothing else
        # writes there, so prior_logits_fn and value_fn always see the documented padding.
        appended = jnp.where(positions[None, :] == at[:, None], action[:, None], node.prefix)
        takes_eot = jnp.zeros((batch,), bool) if eot is None else action == eot
        if eot is not None:
            # An EOT fills the rest of the sequence: reward_fn sees canonical sequences.
            appended = jnp.where(takes_eot[:, None] & (positions[None, :] >= at[:, None]), eot, appended)
        prefix = jnp.where(node.done[:, None], node.prefix, appended)
        finishes = ~node.done & ((node.length + 1 >= length) | takes_eot)
        done = node.done | finishes
        new_length = jnp.where(done, length, node.length + 1).astype(jnp.int32)

        # Fixed shapes: every function runs on every row; rows that do not need a result ignore it.
        reward = jnp.where(finishes, reward_fn(prefix), 0.0)
        value = jnp.where(done, 0.0, value_fn(prefix, new_length))
        prior_logits = prior_logits_fn(prefix, jnp.minimum(new_length, length - 1))
        chex.assert_shape(prior_logits, (batch, num_classes))
        chex.assert_shape([reward, value], (batch,))
        out = mctx.RecurrentFnOutput(
            reward=reward.astype(jnp.float32),
            discount=jnp.where(done, 0.0, 1.0).astype(jnp.float32),
            prior_logits=prior_logits.astype(jnp.float32),
            value=value.astype(jnp.float32))
        return out, _Node(prefix, new_length, done)

    return recurrent_fn


def search_sequences(
    key: chex.PRNGKey,
    prior_logits_fn: PriorLogitsFn,
    value_fn: ValueFn,
    reward_fn: RewardFn,
    batch_size: int,
    length: int,
    num_classes: int,
    num_simulations: int,
    eot: Optional[int] = None,
    max_num_considered_actions: int = 16,
    gumbel_scale: float = 1.0,
    greedy: bool = False,
) -> SearchResult:
    """Builds B sequences of `length` tokens by one Gumbel MuZero search per position (see module doc).

    Args:
      key: PRNG key; split into one key per position.
      prior_logits_fn: (prefix [B,T] int32, position [B] int32) -> [B,A] logits of the token at
        `position` given prefix[:, :position]. prefix[:, position:] holds the padding id (eot, or 0
        without an EOT class). Also called on finished rows (position clipped to T-1); ignored there.
      value_fn: (prefix [B,T], length [B]) -> [B], heuristic value of an unfinished prefix (same
        padding), in reward units. Also called on finished rows (length = T); ignored there.
      reward_fn: (sequences [B,T]) -> [B], the reward of finished canonical sequences. Called on
        every expanded node; only rows that finish at that node are used.
      batch_size, length, num_classes: B, T and A (static).
      num_simulations: simulations per position (static); the cost is T * (num_simulations + 1)
        calls of each of the three functions on B rows.
      eot: index of the end-of-thought class in [0, A), or None for fixed-length sequences.
      max_num_considered_actions, gumbel_scale: passed to `mctx.gumbel_muzero_policy`.
      greedy: append argmax(action_weights) instead of mctx's Gumbel-sampled `action`.

    Returns:
      SearchResult(sequences [B,T] int32, policy_targets [B,T,A] float32, root_values [B,T] float32).

    Pure and jittable: all of it is one `lax.scan` over positions; the functions may close over
    traced arrays (model parameters inside a jitted train step). vmappable over a leading axis.
    """
    if length < 1 or num_classes < 1 or batch_size < 1 or num_simulations < 1:
        raise ValueError(f"length, num_classes, batch_size and num_simulations must be >= 1, got "
                         f"{length}, {num_classes}, {batch_size}, {num_simulations}")
    if eot is not None and not 0 <= eot < num_classes:
        raise ValueError(f"eot={eot} is not a class index in [0, {num_classes})")
    pad_id = 0 if eot is None else eot
    recurrent_fn = _make_recurrent_fn(prior_logits_fn, value_fn, reward_fn, length, num_classes, eot)
    rows = jnp.arange(batch_size)

    def step(node: _Node, inputs):
        t, step_key = inputs
        prior_logits = prior_logits_fn(node.prefix, jnp.full((batch_size,), t, jnp.int32))
        value = value_fn(node.prefix, node.length)
        chex.assert_shape(prior_logits, (batch_size, num_classes))
        chex.assert_shape(value, (batch_size,))
        root = mctx.RootFnOutput(
            prior_logits=prior_logits.astype(jnp.float32),
            value=jnp.where(node.done, 0.0, value).astype(jnp.float32),
            embedding=node)
        out = mctx.gumbel_muzero_policy(
            params=(), rng_key=step_key, root=root, recurrent_fn=recurrent_fn,
            num_simulations=num_simulations,
            # Deeper than the T - t tokens left is inside absorbing states: a wasted simulation.
            max_depth=length - t,
            max_num_considered_actions=max_num_considered_actions,
            gumbel_scale=gumbel_scale)
        weights = out.action_weights.astype(jnp.float32)
        action = jnp.argmax(weights, axis=-1) if greedy else out.action
        action = action.astype(jnp.int32)
        root_value = out.search_tree.summary().value
        if eot is not None:
            # A finished row's search is discarded: its token is EOT, its target one-hot EOT.
            action = jnp.where(node.done, eot, action)
            weights = jnp.where(node.done[:, None], jax.nn.one_hot(eot, num_classes), weights)
            root_value = jnp.where(node.done, 0.0, root_value)
            takes_eot = ~node.done & (action == eot)
            prefix = node.prefix.at[rows, t].set(action)
            fill = takes_eot[:, None] & (jnp.arange(length)[None, :] >= t)
            prefix = jnp.where(fill, eot, prefix)
            done = node.done | takes_eot | (t + 1 >= length)
        else:
            prefix = node.prefix.at[rows, t].set(action)
            done = node.done | (t + 1 >= length)
        new_node = _Node(prefix, jnp.where(done, length, t + 1).astype(jnp.int32), done)
        return new_node, (weights, root_value.astype(jnp.float32))

    init = _Node(
        prefix=jnp.full((batch_size, length), pad_id, jnp.int32),
        length=jnp.zeros((batch_size,), jnp.int32),
        done=jnp.zeros((batch_size,), bool))
    keys = jax.random.split(key, length)
    final, (weights, root_values) = jax.lax.scan(step, init, (jnp.arange(length, dtype=jnp.int32), keys))
    return SearchResult(
        sequences=final.prefix,
        policy_targets=jnp.swapaxes(weights, 0, 1),
        root_values=jnp.swapaxes(root_values, 0, 1))

"""The per-candidate baseline of benchmarks.char: the exhaustive policy gradient taken seed 002's way,
one forward pass per candidate next token instead of one per context.

Pass c runs the model on [context, c] (length C + 1) and reads log pi(c) = log_softmax(logits[C-1])_c,
the position that PREDICTS the candidate (the seed read logits[C], which predict the character
after it: a different, wrong gradient). The loss is the exhaustive objective of
rlsoft.exhaustive, -(1/B) sum_b sum_c sg(q_b(c)) sg(w_b(c)) log pi_b(c) with q = sg(pi) ("pi") or
1/V ("uniform"): the expected policy gradient (Ciosek & Whiteson 2018, "Expected Policy
Gradients"), here at V times the cost. Only the benchmark runs this; the char testbed takes the
same gradient from one pass (rlsoft.exhaustive_loop).
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import exhaustive, exhaustive_loop as xl, roles, weighting

SequenceLogitsFn = Callable[[Any, jax.Array], jax.Array]  # (params, tokens [B,T]) -> logits [B,T,V]


def per_candidate_value_and_grad(params, contexts, rewards, sequence_logits_fn: SequenceLogitsFn, scheme: str,
                                 tau: weighting.Tau = None, *, mixing: str = "pi", candidates_per_pass: int = 1):
    """(loss, grads) of the exhaustive loss over contexts [B,C] with rewards [B,V], V passes per context.

    Gradients are accumulated over a lax.scan of V / k steps, each a batch of k = candidates_per_pass
    candidates x B contexts (k must divide V): k = 1 is a loop with one pass' memory, k = V a
    single vmapped batch of B V sequences.
    """
    exhaustive.validate_mixing(mixing)
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
        logp_all = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32))).reshape(k, b, v)
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


def make_per_candidate_step(fns: xl.NextTokenFns, sequence_logits_fn: SequenceLogitsFn, cfg: xl.ExhaustiveConfig,
                            candidates_per_pass: int):
    """The char testbed's step with its policy gradient taken per candidate: jitted
    (state, data_key) -> (state, metrics), the state of `rlsoft.exhaustive_loop.init_state`.

    The same batch (fns.batch_fn at fold_in(data_key, step)), rewards (fns.reward_fn, on the
    probabilities of one forward pass without gradient, as the testbed scores them), weights and
    optimizer; the gradient is that of the exhaustive objective of the current policy, which is the
    clipped objective's whenever the lagged policy equals the current one (the first step). The
    lagged role, entropy and KL terms and the health monitors are left out.
    """
    tx = xl.make_optimizer(cfg)

    def step(state: roles.TrainState, data_key: jax.Array):
        policy = state.roles["policy"]
        contexts, targets = fns.batch_fn(jax.random.fold_in(data_key, state.step))
        probs = jax.lax.stop_gradient(jax.nn.softmax(fns.logits_fn(policy.params, contexts)))
        rewards = fns.reward_fn(contexts, targets, probs)
        loss, grads = per_candidate_value_and_grad(policy.params, contexts, rewards, sequence_logits_fn, cfg.scheme,
                                                   cfg.tau, mixing=cfg.mixing, candidates_per_pass=candidates_per_pass)
        state = state.replace_role("policy", roles.apply_updates(policy, grads, tx))._replace(step=state.step + 1)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)

"""The two weight products of the models, with hand-written VJPs laid out for XLA:CPU.

    y = dense_dot_general(x, kernel, dimension_numbers)   # x [..., n_in] @ kernel [n_in, n_out]
    logits = tied_logits(x, table)                        # x [..., d] @ table [V, d].T

Forward values are exactly `jnp.dot`'s. Only the backward differs from autodiff, and only in how the
weight gradient is written (the math is the same: d kernel = x^T g, d table = g^T x, summed over
every leading position):

  * `dense_dot_general` is nnx.Linear's `dot_general` argument. Autodiff's transpose rule writes
    d kernel as a dot_general with the output's axes swapped and then transposed back; XLA:CPU lays
    that out with a copy of x or g transposed, fused with the elementwise ops that produce it (the
    SiLU backward, RoPE's), which run at ~1-2 GB/s. Written as x^T g on the flattened
    positions, the tiny preset's RL update (benchmarks/train_step.py) ran 1.16x faster
    (paired median, 5 rounds, 505 vs 604 ms), with the same gradient norm to every printed digit;
    with `tied_logits` below, the char_gpt cpu preset's exhaustive step (benchmarks/char.py) ran
    1.17x faster (139 vs 162 ms, paired median of 15).
  * `tied_logits`: d table [V, d] = g^T x would copy g [N, V] transposed (16 MB per micro-batch on
    the tiny update); x^T g [d, V] transposes x instead (V / d times fewer bytes), and the
    optimization barrier stops XLA from folding the final transpose back into the dot: 1.11x on
    the same update (568 vs 634 ms).

Both are jax.custom_vjp functions, so forward-mode AD (jax.jvp, jacfwd, hessian) does not go through
them; nothing in the repository uses it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(res, g):
    x, kernel = res
    dx = jnp.dot(g, kernel.T).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return dx, jnp.dot(x2.T, g2).astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None,
                      out_sharding=None):
    """`jax.lax.dot_general` for nnx.Linear's contraction (x's last axis with kernel's first; no batch
    axes), with the hand-written VJP above. Other contractions, precisions or output types fall back
    to `jax.lax.dot_general` unchanged."""
    standard = dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and kernel.ndim == 2
    if not standard or precision is not None or preferred_element_type is not None or out_sharding is not None:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return _matmul(x, kernel)


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [..., d] @ table [V, d].T: a tied LM head (the product of nnx.Embed.attend)."""
    return jnp.dot(x, table.T)


def _tied_logits_fwd(x, table):
    return tied_logits(x, table), (x, table)


def _tied_logits_bwd(res, g):
    x, table = res
    dx = jnp.dot(g, table).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dtable = jax.lax.optimization_barrier(jnp.dot(x2.T, g2)).T
    return dx, dtable.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def embed_attend(embed, x: jax.Array) -> jax.Array:
    """`embed.attend(x)` of an nnx.Embed (its dtype promotion) through `tied_logits`."""
    x, table = embed.promote_dtype((x, embed.embedding[...]), dtype=embed.dtype)
    return tied_logits(x, table)

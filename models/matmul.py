"""nnx.Linear's product with a hand-written VJP laid out for XLA:CPU, and the swapped product it uses.

    y = dense_dot_general(x, kernel, dimension_numbers)   # x [..., n_in] @ kernel [n_in, n_out]

Forward values are exactly `jnp.dot`'s. Only the backward differs from autodiff, and only in how the
weight gradient is written (the math is the same: d kernel = x^T g, summed over every leading
position). `dense_dot_general` is nnx.Linear's `dot_general` argument (Qwen2 and char_gpt pass it).
Autodiff's transpose rule writes d kernel as a dot_general with the output's axes swapped and then
transposed back; XLA:CPU lays that out with a copy of x or g transposed, fused with the elementwise
ops that produce it (the SiLU backward, RoPE's), which run at ~1-2 GB/s. Written as x^T g on the
flattened positions, the tiny preset's RL update (benchmarks/train_step.py) ran 1.16x faster (paired
median, 5 rounds, 505 vs 604 ms), with the same gradient norm to every printed digit; the char_gpt
cpu preset's exhaustive step (benchmarks/char.py) 1.17x (139 vs 162 ms, paired median of 15).

`swapped_product` is the same idea for a product whose wide operand must keep its layout (the
attention backward of models/qwen2_train.py). A custom VJP for the tied LM head built on it gave
1.10x while `response_logits` concatenated V-wide logits (autodiff copied their gradient transposed,
fused with the split); once it concatenated the hidden states instead, it gave 0.99x (Qwen2) and
0.98x (char_gpt), and was removed.

`dense_dot_general` is a jax.custom_vjp, so forward-mode AD (jax.jvp, jacfwd, hessian) does not go
through the models' dense layers; nothing in the repository uses it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return _matmul(x, kernel), (x, kernel)


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


def swapped_product(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """einsum(spec, a, b) -> [..., j, i] (float32), returned with its last two axes swapped: [..., i, j].

    For a weight gradient that contracts positions, with `b` the wide operand (the logits' or the
    attention scores' gradient): b keeps its layout and XLA:CPU transposes the narrow `a` instead,
    and the optimization barrier stops XLA from folding the swap back into the dot.
    """
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return jnp.swapaxes(jax.lax.optimization_barrier(out), -1, -2)

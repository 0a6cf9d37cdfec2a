"""GPT-2-style character language model in Flax NNX (the policy of the char RL testbed).

Architecture (GPT-2, Radford et al. 2019; the layout of nanoGPT's `model.py`), d = n_embd, L = n_layer:

    x = wte[tokens] + wpe[0 .. T-1]                                  learned positions, T <= block_size
    for each of the L blocks (pre-LayerNorm):
        x = x + c_proj(attn(ln_1(x)))      attn: causal multi-head softmax(q k^T / sqrt(D)) v, fused
                                           qkv projection c_attn, D = d / n_head, scores in fp32
        x = x + mlp_proj(gelu(c_fc(ln_2(x))))   hidden 4 d, GELU with GPT-2's tanh approximation
    logits = ln_f(x) @ wte^T   (tied)   or   lm_head(ln_f(x))   (untied, no bias)     -> fp32

Init (GPT-2 paper section 2.3, nanoGPT): weights and embeddings N(0, 0.02), biases 0, LayerNorm 1 / 0,
and the two residual projections (c_proj, mlp_proj) N(0, 0.02 / sqrt(2 L)).

Parameters (`CharGPTConfig.num_params`, checked against the real tree by `param_count`):

    V d + block_size d + L (12 d^2 + 13 d) + 2 d  (+ V d untied);  without biases 13 d -> 2 d, 2 d -> d
    (mlp_ratio m: 12 d^2 + 13 d -> (4 + 2 m) d^2 + (9 + m) d).

Presets (V = 65, tinyshakespeare): "tiny" (tests, ~15k), "cpu" (~0.46M, the CPU default), "20m"
(~19.5M, the seed's "20m param gpt2 arch model"; 8 x 448 with 7 heads of 64).

Interface (`model` is a CharGPT; for plain jax.jit use the (graphdef, state) functions below):

    cfg = CharGPTConfig.preset("cpu", dtype="bfloat16")
    model = CharGPT(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens[B,T])                        # [B,T,V] fp32
    last = model.last_logits(contexts[B,C])            # [B,V] fp32: the next character after each context
    graphdef, state = nnx.split(model)                 # or init_model(cfg, seed): a jitted init
    fn = logits_fn(graphdef)                           # (state, contexts[B,C]) -> [B,V], for rlsoft.exhaustive
    seq = sequence_logits_fn(graphdef)                 # (state, tokens[B,T]) -> [B,T,V]
    param_count(model) == cfg.num_params
"""
from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from models.dtypes import DTYPES, DtypeFields  # noqa: F401  (DTYPES re-exported)
from models.matmul import dense_dot_general

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class CharGPTConfig(DtypeFields):
    """Hyper-parameters (nanoGPT's names). dtype is the compute dtype, param_dtype the storage one."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96
    mlp_ratio: int = 4
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid; need a positive integer")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} is invalid; need >= 2")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is invalid; not divisible by n_head={self.n_head}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is invalid; need a finite float > 0")
        self.check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_params(self) -> int:
        """Closed-form parameter count (module docstring); equals `param_count` of a built model."""
        d, v, t, l = self.n_embd, self.vocab_size, self.block_size, self.n_layer
        m = self.mlp_ratio  # qkv 3d^2, proj d^2, MLP 2 m d^2; biases 3d + d + m d + d, LayerNorms 4d
        per_block = (4 + 2 * m) * d * d + ((9 + m) if self.bias else 2) * d
        embeddings = v * d + t * d + (0 if self.tie_embeddings else v * d)
        return embeddings + l * per_block + (2 if self.bias else 1) * d

    @classmethod
    def preset(cls, name: str, **overrides) -> "CharGPTConfig":
        """A preset with `overrides`; an unknown preset or field is a one-line ValueError."""
        validate_preset(name)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{unknown[0]}={overrides[unknown[0]]!r} is invalid; not a CharGPTConfig field")
        return cls(**{**PRESETS[name], **overrides})


def validate_preset(name: str, flag: str = "preset") -> None:
    """Pure early check of a preset name (e.g. an experiment's --model_preset): one-line ValueError."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"{flag}={name!r} is unknown; allowed: {', '.join(PRESETS)}")


PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=8),  # tests: ~15k params
    "cpu": dict(n_layer=4, n_head=4, n_embd=96, block_size=64),  # ~0.46M, the CPU default
    "20m": dict(n_layer=8, n_head=7, n_embd=448, block_size=256),  # ~19.5M, the size of a small char GPT
}


# --------------------------------------------------------------------------------------------
# Layers.


def _linear(cfg: CharGPTConfig, n_in: int, n_out: int, rngs: nnx.Rngs, std: float | None = None,
            bias: bool | None = None) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=cfg.bias if bias is None else bias, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_param_dtype,
                      kernel_init=jax.nn.initializers.normal(std or cfg.initializer_range),
                      bias_init=jax.nn.initializers.zeros, dot_general=dense_dot_general, rngs=rngs)


def _layer_norm(cfg: CharGPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Flax computes the mean / variance in fp32 whatever the compute dtype.
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_eps, use_bias=cfg.bias, dtype=cfg.jnp_dtype,
                         param_dtype=cfg.jnp_param_dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: CharGPTConfig, rngs: nnx.Rngs):
        residual_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        self.c_attn = _linear(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, rngs, std=residual_std)
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B,T,d] -> [B,T,d]; position t attends to positions <= t."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (z.reshape(b, t, self.n_head, self.head_dim) for z in (q, k, v))
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        causal = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(causal, scores, MASK_VALUE), axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return self.c_proj(o.astype(x.dtype).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: CharGPTConfig, rngs: nnx.Rngs):
        residual_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        self.c_fc = _linear(cfg, cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, rngs)
        self.c_proj = _linear(cfg, cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, rngs, std=residual_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: CharGPTConfig, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------------------------
# The model.


class CharGPT(nnx.Module):
    def __init__(self, cfg: CharGPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                             embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                             embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        self.lm_head = None if cfg.tie_embeddings else _linear(cfg, cfg.n_embd, cfg.vocab_size, rngs, bias=False)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states before ln_f: tokens [B,T] int, T <= block_size -> [B,T,d]."""
        chex.assert_rank(tokens, 2)
        t = tokens.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} is invalid; block_size={self.cfg.block_size}")
        x = self.wte(tokens) + self.wpe(jnp.arange(t))[None]
        for block in self.blocks:
            x = block(x)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """ln_f and the LM head (tied or not): [..., d] -> fp32 logits [..., V]."""
        x = self.ln_f(x)
        return (self.wte.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [B,T,V] fp32; logits[:, t] is the distribution of the token after tokens[:, :t+1]."""
        return self.head(self.hidden(tokens))

    def last_logits(self, contexts: jax.Array) -> jax.Array:
        """Logits [B,V] of the character after each context [B,C] (the head runs on the last position only)."""
        return self.head(self.hidden(contexts)[:, -1])


# --------------------------------------------------------------------------------------------
# Pure functions of (graphdef, state) for plain jax.jit.


def forward(graphdef: nnx.GraphDef, state, tokens: jax.Array) -> jax.Array:
    """`CharGPT.__call__` on the merged (graphdef, state): tokens [B,T] -> logits [B,T,V] fp32."""
    return nnx.merge(graphdef, state)(tokens)


def last_logits(graphdef: nnx.GraphDef, state, contexts: jax.Array) -> jax.Array:
    """`CharGPT.last_logits` on the merged (graphdef, state): contexts [B,C] -> [B,V] fp32."""
    return nnx.merge(graphdef, state).last_logits(contexts)


def logits_fn(graphdef: nnx.GraphDef):
    """(state, contexts[B,C]) -> next-character logits [B,V]: the `logits_fn` of rlsoft.exhaustive."""
    return lambda state, contexts: last_logits(graphdef, state, contexts)


def sequence_logits_fn(graphdef: nnx.GraphDef):
    """(state, tokens[B,T]) -> logits [B,T,V]: the per-position forward (rlsoft.exhaustive's
    per-candidate reference)."""
    return lambda state, tokens: forward(graphdef, state, tokens)


def init_model(cfg: CharGPTConfig, seed: int = 0):
    """(graphdef, state) of a freshly initialised CharGPT, the init compiled as one jitted call
    (eager NNX init dispatches every initializer op by op, which is slow on CPU)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharGPT(cfg, rngs=nnx.Rngs(0))))
    state = jax.jit(lambda key: nnx.state(CharGPT(cfg, rngs=nnx.Rngs(key))))(jax.random.PRNGKey(seed))
    return graphdef, state


def param_count(model_or_state) -> int:
    """Number of parameters (nnx.Param leaves) of a CharGPT, an nnx.State, or any pytree of arrays.

    Works on abstract models too: `param_count(nnx.eval_shape(lambda: CharGPT(cfg, rngs=nnx.Rngs(0))))`.
    """
    tree = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))

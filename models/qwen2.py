"""Qwen2 decoder-only transformer in Flax NNX: one forward for training, cached prefill and decoding.

Architecture (Qwen2 / Qwen2.5, as in transformers' `modeling_qwen2.py`): token embedding, N pre-norm
blocks `x += o_proj(attn(rms(x))); x += down(silu(gate(rms(x))) * up(rms(x)))`, final RMSNorm, LM
head (optionally tied to the embedding). RMSNorm: `w * x / sqrt(mean(x^2) + eps)` computed in fp32.
RoPE on q and k with `inv_freq_i = theta^(-2i/D)` and rotate-half layout. Grouped-query attention:
query head h reads kv head `h // (H / H_kv)`; q, k, v projections have biases, o_proj has none.
Attention logits and softmax are fp32; logits returned are fp32 whatever the compute dtype.

Interface (B rows, T tokens, V vocab; `model` is a `Qwen2` or a `(graphdef, state)` pair from
`nnx.split`, so a jitted sampler can take `state` as an argument and merge inside):

    cfg = Qwen2Config.preset("tiny", dtype="bfloat16")
    model = Qwen2(cfg, rngs=nnx.Rngs(0))

    # Training: causal + padding (+ optional packing segments) mask; positions only feed RoPE.
    logits = model(tokens[B,T], positions[B,T], mask[B,T])            # [B,T,V] fp32
    # Left-padded prompts: mask = token is real, positions = max(cumsum(mask) - 1, 0).

    # Decoding against a preallocated cache; KVCache is a NamedTuple of arrays (a plain pytree
    # that lax.while_loop / scan can carry).
    cache = init_cache(cfg, batch=B, max_len=S)
    logits, cache = prefill(model, cache, tokens[B,T], positions[B,T], mask[B,T])  # [B,T,V]
    logits, cache = decode_step(model, cache, tokens[B], positions[B])            # [B,V]

    # Group-shared prompt: Bp prompts, G samples each; the prompt K/V is stored once per prompt.
    logits, cache = prefill_shared(model, prompts[Bp,P], positions[Bp,P], mask[Bp,P],
                                   group_size=G, max_new=N)                       # [Bp,P,V]
    logits, cache = decode_step(model, cache, tokens[Bp*G], positions[Bp*G])      # row p*G + g

Cache semantics: rows write slots in order; slot `index[b]` is the next one. A query in slot t sees
every valid slot <= t of its own row plus, with a shared prefix, every valid prefix slot of its
prompt `b // G`. Writes past `max_len` are dropped (scatter mode="drop"; no error inside jit): size the
cache for prompt + new tokens. A finished row may keep decoding; its outputs are simply ignored.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from models.dtypes import DTYPES, DtypeFields  # noqa: F401  (DTYPES re-exported)
from models.matmul import dense_dot_general

MASK_VALUE = float(jnp.finfo(jnp.float32).min)  # HF's masked value; a fully masked row stays finite.


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DtypeFields):
    """Hyper-parameters; names mirror transformers' Qwen2Config. dtypes are names in DTYPES."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; must be positive")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; must be > 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is invalid; not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} is invalid; must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is invalid; RoPE needs an even head_dim")
        self.check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "Qwen2Config":
        if name not in PRESETS:
            raise ValueError(f"preset={name} is invalid; expected one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_QWEN25 = dict(vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=True, max_position_embeddings=32768)
# Real Qwen2.5 hyper-parameters (the checkpoints' config.json on the Hugging Face hub, Qwen/Qwen2.5-*), plus two
# CPU-sized presets. 7B has a 152,064-token vocabulary and an untied LM head (0.5B-3B: 151,936, tied);
# totals: 0.494B, 1.544B, 3.086B, 7.616B parameters (the model cards: 0.49B, 1.54B, 3.09B, 7.61B).
PRESETS = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, tie_word_embeddings=False, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mid": dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
}


# --------------------------------------------------------------------------------------------
# Layers.


class RMSNorm(nnx.Module):
    """w * x / sqrt(mean(x^2) + eps), statistics in fp32, cast back before the weight (as HF)."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin: [..., head_dim] fp32 for integer positions [...] (HF's cat(freqs, freqs) layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B,T,heads,D]; cos/sin: [B,T,D]. x * cos + rotate_half(x) * sin in x's dtype."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        lin = _linear_factory(cfg, rngs)
        self.q_proj, self.k_proj, self.v_proj = lin(d, h * hd, True), lin(d, kv * hd, True), lin(d, kv * hd, True)
        self.o_proj = lin(h * hd, d, False)
        self.heads, self.kv_heads, self.head_dim = h, kv, hd

    def qkv(self, x, cos, sin):
        """x [B,T,d] -> q [B,T,H,D], k, v [B,T,H_kv,D], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        lin = _linear_factory(cfg, rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = lin(d, f, False), lin(d, f, False), lin(f, d, False)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)


def _linear_factory(cfg: Qwen2Config, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(cfg.initializer_range)  # HF's init: N(0, initializer_range)

    def make(n_in, n_out, bias):
        return nnx.Linear(n_in, n_out, use_bias=bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                          kernel_init=init, dot_general=dense_dot_general, rngs=rngs)
    return make


def _attend(q, segments, scale):
    """Softmax attention of q [Bp,G,T,K,R,D] over the concatenation of K/V segments.

    Each segment is (k, v, mask): k, v [Bp,S,K,D] shared by the G rows of a prompt, or [Bp,G,S,K,D]
    per row; mask bool broadcastable to [Bp,G,T,S]. Returns [Bp,G,T,K,R,D] in q's dtype.
    """
    scores = []
    for k, v, mask in segments:
        spec = "bgtkrd,bskd->bgkrts" if k.ndim == 4 else "bgtkrd,bgskd->bgkrts"
        s = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32) * scale
        scores.append(jnp.where(mask[:, :, None, None], s, MASK_VALUE))
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k, v, _ in segments:
        spec = "bgkrts,bskd->bgtkrd" if k.ndim == 4 else "bgkrts,bgskd->bgtkrd"
        n = k.shape[-3]
        out = out + jnp.einsum(spec, p[..., start:start + n].astype(v.dtype), v,
                               preferred_element_type=jnp.float32)
        start += n
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Cache.


class KVCache(NamedTuple):
    """Preallocated per-row K/V slots plus an optional K/V prefix shared by groups of G rows."""

    k: jax.Array  # [L, B, S, H_kv, D]
    v: jax.Array  # [L, B, S, H_kv, D]
    valid: jax.Array  # [B, S] bool: slot holds a real token
    index: jax.Array  # [B] int32: next slot to write
    prefix_k: Optional[jax.Array] = None  # [L, Bp, P, H_kv, D], row b reads prompt b // G
    prefix_v: Optional[jax.Array] = None
    prefix_valid: Optional[jax.Array] = None  # [Bp, P] bool


def init_cache(cfg: Qwen2Config, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots per row, in the compute dtype unless `dtype` is given."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((batch,), jnp.int32))


def cache_bytes(cache: KVCache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


# --------------------------------------------------------------------------------------------
# The model.


class Qwen2(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype,
                                      param_dtype=cfg.jnp_param_dtype,
                                      embedding_init=jax.nn.initializers.normal(cfg.initializer_range),
                                      rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear_factory(cfg, rngs)(
            cfg.hidden_size, cfg.vocab_size, False)

    def __call__(self, tokens, positions, mask=None, segment_ids=None, cache: Optional[KVCache] = None,
                 return_kv: bool = False, last_only: bool = False):
        """Logits [B,T,V] fp32; with `cache`, also the updated cache; with `return_kv`, also the
        per-layer (k, v) [L,B,T,H_kv,D] of these tokens (used to build a shared prefix).
        `last_only` gives logits [B,1,V] of the last position only, and runs the last layer's
        attention and MLP for that position alone (XLA slices neither the LM head nor the last layer
        through a later `[:, -1]`, so a prefill would otherwise hold [B,T,V] fp32 logits)."""
        cfg = self.cfg
        b, t = tokens.shape
        chex.assert_shape(positions, (b, t))
        mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        chex.assert_shape(mask, (b, t))
        kvh, hd = cfg.num_key_value_heads, cfg.head_dim
        rep = cfg.num_attention_heads // kvh
        cos, sin = rope_tables(positions, hd, cfg.rope_theta)

        if cache is None:
            if segment_ids is not None:
                chex.assert_shape(segment_ids, (b, t))
            bp, g = b, 1
            attn_mask = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
            if segment_ids is not None:  # packed sequences attend only inside their segment
                attn_mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
            attn_mask = attn_mask[:, None]  # [B,1,T,T]
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids is invalid with a cache; packing is for the training forward")
            s_max = cache.valid.shape[1]
            chex.assert_shape(cache.index, (b,))
            rows = jnp.arange(b)[:, None]
            slots = cache.index[:, None] + jnp.arange(t)[None]  # [B,T]
            valid = cache.valid.at[rows, slots].set(mask, mode="drop")
            own_mask = valid[:, None, :] & (jnp.arange(s_max)[None, None, :] <= slots[:, :, None])
            bp = b if cache.prefix_valid is None else cache.prefix_valid.shape[0]
            if b % bp:
                raise ValueError(f"cache batch={b} is invalid; not a multiple of prefix batch={bp}")
            g = b // bp
            own_mask = own_mask.reshape(bp, g, t, s_max)
            new_k, new_v = cache.k, cache.v

        x = self.embed_tokens(tokens)
        kvs = []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
            tq = t
            if last_only and i == len(self.layers) - 1:
                # Only the last position's output reaches the logits: the last layer needs that
                # query alone (K/V stay whole). Measured: the tiny preset's B=64 x 128 prefill ~1.5x faster.
                tq, q, x = 1, q[:, -1:], x[:, -1:]
            q = q.reshape(bp, g, tq, kvh, rep, hd)
            if return_kv:
                kvs.append((k, v))
            if cache is None:
                segments = [(k, v, attn_mask[:, :, t - tq:])]
            else:
                new_k = new_k.at[i, rows, slots].set(k.astype(new_k.dtype), mode="drop")
                new_v = new_v.at[i, rows, slots].set(v.astype(new_v.dtype), mode="drop")
                segments = [(new_k[i].reshape(bp, g, s_max, kvh, hd), new_v[i].reshape(bp, g, s_max, kvh, hd),
                             own_mask[:, :, t - tq:])]
                if cache.prefix_k is not None:
                    segments.insert(0, (cache.prefix_k[i], cache.prefix_v[i],
                                        cache.prefix_valid[:, None, None, :]))
            o = _attend(q, segments, hd ** -0.5).reshape(b, tq, cfg.num_attention_heads * hd)
            x = x + layer.self_attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))

        logits = self.head(x[:, -1:] if last_only else x)
        out = (logits,)
        if cache is not None:
            out += (cache._replace(k=new_k, v=new_v, valid=valid, index=cache.index + t),)
        if return_kv:
            out += (tuple(jnp.stack(z) for z in zip(*kvs)),)
        return out[0] if len(out) == 1 else out


    def head(self, x):
        """Final norm and LM head (tied or not): hidden states [..., d] -> fp32 logits [..., V]."""
        x = self.norm(x)
        return (self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)


ModelLike = Union[Qwen2, tuple]


def _as_module(model: ModelLike) -> Qwen2:
    return nnx.merge(*model) if isinstance(model, tuple) else model


def prefill(model: ModelLike, cache: KVCache, tokens, positions, mask=None, last_only: bool = False):
    """Write T tokens per row into the next cache slots; logits [B,T,V] fp32 ([B,1,V] with
    `last_only`) and the new cache."""
    return _as_module(model)(tokens, positions, mask, cache=cache, last_only=last_only)


def decode_step(model: ModelLike, cache: KVCache, tokens, positions):
    """One token per row at explicit positions [B]; logits [B,V] fp32 and the new cache."""
    chex.assert_rank([tokens, positions], 1)
    logits, cache = _as_module(model)(tokens[:, None], positions[:, None], cache=cache)
    return logits[:, 0], cache


def prefill_shared(model: ModelLike, tokens, positions, mask, group_size: int, max_new: int,
                   last_only: bool = False):
    """Prefill Bp prompts once and return a cache for Bp * group_size rows sharing them.

    The prompts' K/V become the cache prefix [L,Bp,P,...]; each row gets `max_new` private slots.
    Returns logits [Bp,P,V] ([Bp,1,V] with `last_only`; the last position gives every row of the
    group its first token).
    """
    if group_size <= 0 or max_new <= 0:
        raise ValueError(f"group_size={group_size}, max_new={max_new} is invalid; both must be positive")
    module = _as_module(model)
    logits, (k, v) = module(tokens, positions, mask, return_kv=True, last_only=last_only)
    bp = tokens.shape[0]
    cache = init_cache(module.cfg, bp * group_size, max_new, dtype=k.dtype)
    mask = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
    return logits, cache._replace(prefix_k=k, prefix_v=v, prefix_valid=mask)

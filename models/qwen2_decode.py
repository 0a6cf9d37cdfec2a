"""models/qwen2.py behind rlsoft.rollout's model-agnostic `DecodeFns` interface, with a decode cache
laid out for the sampler's lockstep loop.

    graphdef, state = nnx.split(model)
    fns = decode_fns(graphdef)                        # build once, reuse (jit keys on identity)
    sampler = rollout.make_sampler(fns, SamplingConfig(...), group_size=G)
    out = sampler(state, prompts, prompt_mask, key)   # params = the NNX state, any pytree

The prefill is the model's training forward (`return_kv`, logits of the last position only), run
over a few prompts at a time (`prefill_rows`); its K/V become a read-only prompt prefix, stored
once per prompt and read by the prompt's G rows (`shared_prompt=True`), or once per row after
repeating the prompts G times (`shared_prompt=False`, the memory and FLOPs of a plain cache; same
samples up to float rounding). Response tokens go to private slots in chunks that match the
sampler's segments: `chunk`, `chunk`, 2 `chunk`, 4 `chunk`, ... slots (rlsoft.rollout.segment_ends).

Why this layout rather than `qwen2.KVCache` (measured at B=64, tiny preset, 384 slots; the plain
`qwen2.decode_step` took ~6 ms a step, this one ~2 ms; benchmarks/rollout.py has the figures):
  * one array per layer (and per chunk): slicing layer i out of an [L, ...] array made XLA copy the
    whole layer's cache before every attention matmul;
  * K stored as [.., H_kv, D, S] and V as [.., H_kv, S, D], so both attention products are plain
    batched [M, D] x [D, S] and [M, S] x [S, D] matmuls with the batch dims leading (the
    [B, S, H_kv, D] layout made XLA transpose the cache every step);
  * every row writes the same private slot at step j (the sampler decodes all rows in lockstep), so
    a write is a dynamic_update_slice at one scalar index, and the sampler's static segment number
    (`DecodeFns.segment`) says which chunks can hold tokens yet: attention reads the prompt plus
    chunks 0..segment, not the empty rest of the cache. Doubling chunks keep the compiled copies of
    the step logarithmic in the response length (tiny preset, 64 x 128-token prompts, 256 new
    tokens: 3 segments instead of 4; benchmarks/peers.py's first-call figures).
`generic_decode_fns` is the plain `qwen2.prefill` / `qwen2.decode_step` path, kept as the
reference the benchmark compares against.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import qwen2
from rlsoft import mesh as mesh_lib
from rlsoft.mesh import constrain
from rlsoft.rollout import DecodeFns, segment_ends

MASK_VALUE = qwen2.MASK_VALUE  # the same masked value in decode and training


class DecodeCache(NamedTuple):
    prefix_k: tuple  # L x [Bp, H_kv, D, P], K transposed; row b reads prompt b // G
    prefix_v: tuple  # L x [Bp, H_kv, P, D]
    prefix_valid: jax.Array  # [Bp, P] bool: prompt token is real (left padding is not)
    k: tuple  # L x n_chunks x [B, H_kv, D, C_s], C_s = chunk s's slots (rollout.segment_ends)
    v: tuple  # L x n_chunks x [B, H_kv, C_s, D]
    index: jax.Array  # [] int32: private slot the next step writes (the same for every row)


def decode_fns(graphdef: nnx.GraphDef, *, shared_prompt: bool = True, chunk: int = 64,
               prefill_rows: int = 4) -> DecodeFns:
    """Prefill and step of a Qwen2 whose params are passed as the state of `nnx.split`.

    `chunk` is the first segment length of the sampler's loop and the private cache's first chunk
    size (then the same again, then doubling): a step attends over at most max(`chunk`, filled) - 1
    empty slots (a smaller chunk reads less but compiles more segments; at the tiny preset with
    fixed chunks, 32 and 128 were slower than 64: ~456 and ~424 vs ~380 ms a call).

    `prefill_rows`: the prefill runs over parts of this many prompt rows (the gcd with the batch),
    one after another in a `lax.map`, so that its activations and [rows, H, P, P] scores are those of
    one part, not of the whole batch. Measured at the tiny preset, B = 64 x 128 tokens: the prefill
    took ~42 ms instead of ~58, and the sampler's XLA temp buffer shrank from 61 to 28 MB. glibc
    mmaps a block of over 32 MB afresh on every call: ~16,000 page faults a call before, ~0 after
    (touching 63 MB of fresh pages took ~50 ms on this VM). Whole calls: 2-8% faster (medians of
    15-21 interleaved calls; 8 rows: 31 MB, a faster prefill but some calls faulted again).
    """
    if chunk < 1 or prefill_rows < 1:
        raise ValueError(f"chunk={chunk}, prefill_rows={prefill_rows} is invalid; both must be >= 1")

    def prefill(params, tokens, positions, mask, group_size: int, max_new: int):
        module = nnx.merge(graphdef, params)
        bp = tokens.shape[0]
        if not shared_prompt:  # row p*G + g is prompt p; each row gets its own copy of the prompt K/V
            tokens, positions, mask = (jnp.repeat(x, group_size, axis=0) for x in (tokens, positions, mask))
        rows = tokens.shape[0]
        shards = _row_shards(rows)  # devices the rows split over (1 without a mesh)
        part = math.gcd(rows, prefill_rows * shards)  # prefill_rows rows a device per part

        def forward(args):  # one part of the prompts; K [part,K,D,P] and V [part,K,P,D] per layer
            args = tuple(_rows(x) for x in args)
            logits, (k, v) = module(*args, return_kv=True, last_only=True)  # k [L,part,P,K,D]
            return (logits, tuple(x.transpose(0, 2, 3, 1) for x in k),
                    tuple(x.transpose(0, 2, 1, 3) for x in v))

        if shards == 1:  # parts of consecutive rows; the merge is a bitcast
            split = lambda x: x.reshape(rows // part, part, *x.shape[1:])  # noqa: E731
            merge = lambda x: x.reshape(rows, *x.shape[2:])  # noqa: E731
        else:  # part j takes rows j, j + rows/part, ...: every device's own rows, no gather
            split = lambda x: x.reshape(part, rows // part, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
            merge = lambda x: x.swapaxes(0, 1).reshape(rows, *x.shape[2:])  # noqa: E731
        parts = jax.lax.map(forward, (split(tokens), split(positions), split(mask)))
        logits, k, v = jax.tree.map(merge, parts)
        cfg = module.cfg
        b, kvh, hd = bp * group_size, cfg.num_key_value_heads, cfg.head_dim
        # The last sampled token is never fed back: max_new - 1 steps (one chunk at least).
        ends = segment_ends(max(1, max_new - 1), chunk)
        sizes = [e - s for s, e in zip((0,) + ends, ends)]
        zeros = lambda *shape: _kv(jnp.zeros(shape, k[0].dtype))  # noqa: E731
        cache = DecodeCache(
            prefix_k=tuple(map(_kv, k)),
            prefix_v=tuple(map(_kv, v)),
            prefix_valid=_rows(mask.astype(bool)),
            k=tuple(tuple(zeros(b, kvh, hd, c) for c in sizes) for _ in range(cfg.num_hidden_layers)),
            v=tuple(tuple(zeros(b, kvh, c, hd) for c in sizes) for _ in range(cfg.num_hidden_layers)),
            index=jnp.zeros((), jnp.int32))
        logits = logits[:, 0] if shared_prompt else logits[::group_size, 0]  # G equal copies: one per prompt
        return logits, cache

    def step(params, cache: DecodeCache, tokens, positions, segment: int):
        """Logits [B,V] fp32 of one token per row; `segment` (static): the token lands in chunk `segment`."""
        module = nnx.merge(graphdef, params)
        cfg = module.cfg
        b = tokens.shape[0]
        kvh, hd, heads = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
        begin = sum(c.shape[-1] for c in cache.k[0][:segment])  # slots of the chunks before `segment`
        size = cache.k[0][segment].shape[-1]
        offset = cache.index - begin  # slot inside chunk `segment`; in [0, size) by contract
        # Chunks before `segment` are full; in chunk `segment` slots up to and including this one.
        own = jnp.concatenate([jnp.ones((begin,), bool), jnp.arange(size) <= offset])
        cos, sin = qwen2.rope_tables(positions[:, None], hd, cfg.rope_theta)
        x = _rows(_embed(module, tokens[:, None]))  # [B,1,d]
        new_k, new_v = [], []
        for i, layer in enumerate(module.layers):
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)  # [B,1,H,D], [B,1,K,D]
            ks, vs = list(cache.k[i]), list(cache.v[i])
            ks[segment] = _kv(jax.lax.dynamic_update_slice(ks[segment], k[:, 0, :, :, None].astype(ks[0].dtype),
                                                           (0, 0, 0, offset)))
            vs[segment] = _kv(jax.lax.dynamic_update_slice(vs[segment], v[:, 0, :, None, :].astype(vs[0].dtype),
                                                           (0, 0, offset, 0)))
            new_k.append(tuple(ks))
            new_v.append(tuple(vs))
            o = _attend(q[:, 0].reshape(b, kvh, heads // kvh, hd), cache.prefix_k[i], cache.prefix_v[i],
                        cache.prefix_valid, ks[:segment + 1], vs[:segment + 1], own, hd ** -0.5)
            x = x + layer.self_attn.o_proj(o.reshape(b, 1, heads * hd))
            x = _rows(x + layer.mlp(layer.post_attention_layernorm(x)))
        return module.head(x[:, 0]), cache._replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + 1)

    return DecodeFns(prefill=prefill, step=step, segment=chunk)


# Sharding under a mesh (the sampler traces under the params' mesh; without one these are no-ops):
# rows over data x fsdp, KV heads over tensor where they divide (else replicated: Qwen2.5-3B's 2 KV
# heads on tensor=4), so each device holds and reads only its rows' and heads' cache.
def _kv(x):
    """A cache array [rows, H_kv, ., .]."""
    return constrain(x, ("batch", "kv_heads", None, None))


def _rows(x):
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _row_shards(rows: int) -> int:
    """How many devices `rows` rows split over under the current mesh (rlsoft.mesh.rows_spec)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = mesh_lib.rows_spec(rows, mesh)[0]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _embed(module: qwen2.Qwen2, tokens):
    """Token embeddings [B,T,d]; under a mesh the table's fsdp split of d is gathered first (as FSDP
    gathers a weight where it is used), so the lookup keeps the tokens' row split."""
    emb = module.embed_tokens
    if jax.sharding.get_abstract_mesh().empty:
        return emb(tokens)
    (table,) = emb.promote_dtype((emb.embedding[...],), dtype=emb.dtype, inexact=False)  # as nnx.Embed
    return jnp.take(constrain(table, ("vocab", None)), tokens, axis=0)


def _attend(q, pk, pv, pvalid, ks, vs, own, scale):
    """Softmax attention of one query per row, q [B,K,R,D], over the prompt prefix and private chunks.

    The prefix is shared by the G = B / Bp rows of a prompt: their G * R queries are one [G*R, D]
    matrix per (prompt, kv head), so the prompt K/V is read once per prompt, not once per row.
    Softmax without concatenating the two parts: a common max, exp, and one division at the end.
    """
    b, kvh, rep, hd = q.shape
    bp, p = pvalid.shape
    g = b // bp

    def grouped(a):  # [B,K,R,X] -> [Bp,K,G*R,X]
        return a.reshape(bp, g, kvh, rep, -1).transpose(0, 2, 1, 3, 4).reshape(bp, kvh, g * rep, -1)

    def ungrouped(a):  # [Bp,K,G*R,X] -> [B,K,R,X]
        return a.reshape(bp, kvh, g, rep, -1).transpose(0, 2, 1, 3, 4).reshape(b, kvh, rep, -1)

    f32 = jnp.float32
    s_p = jnp.einsum("bkmd,bkdp->bkmp", grouped(q).astype(pk.dtype), pk, preferred_element_type=f32) * scale
    s_p = jnp.where(pvalid[:, None, None, :], s_p, MASK_VALUE)
    qc = q.astype(ks[0].dtype)
    s_o = jnp.concatenate([jnp.einsum("bkrd,bkds->bkrs", qc, k, preferred_element_type=f32) for k in ks], -1)
    s_o = jnp.where(own, s_o * scale, MASK_VALUE)
    m = jnp.maximum(ungrouped(jnp.max(s_p, -1, keepdims=True)), jnp.max(s_o, -1, keepdims=True))  # [B,K,R,1]
    e_p, e_o = jnp.exp(s_p - grouped(m)), jnp.exp(s_o - m)
    z = ungrouped(jnp.sum(e_p, -1, keepdims=True)) + jnp.sum(e_o, -1, keepdims=True)
    out = ungrouped(jnp.einsum("bkmp,bkpd->bkmd", e_p.astype(pv.dtype), pv, preferred_element_type=f32))
    begin = 0
    for v in vs:  # chunks of unequal sizes (rollout.segment_ends)
        end = begin + v.shape[-2]
        out = out + jnp.einsum("bkrs,bksd->bkrd", e_o[..., begin:end].astype(v.dtype), v, preferred_element_type=f32)
        begin = end
    return (out / z).astype(q.dtype)


def generic_decode_fns(graphdef: nnx.GraphDef, *, shared_prompt: bool = True) -> DecodeFns:
    """The plain `qwen2.KVCache` path (`prefill_shared` / `prefill` + `decode_step`), the reference."""

    def prefill(params, tokens, positions, mask, group_size: int, max_new: int):
        model = (graphdef, params)
        if shared_prompt:
            logits, cache = qwen2.prefill_shared(model, tokens, positions, mask, group_size, max_new,
                                                 last_only=True)
            return logits[:, 0], cache
        module = nnx.merge(graphdef, params)
        rep = lambda x: jnp.repeat(x, group_size, axis=0)  # noqa: E731  row p*G + g is prompt p
        cache = qwen2.init_cache(module.cfg, tokens.shape[0] * group_size, tokens.shape[1] + max_new)
        logits, cache = qwen2.prefill(module, cache, rep(tokens), rep(positions), rep(mask), last_only=True)
        return logits[::group_size, 0], cache

    def step(params, cache, tokens, positions):
        return qwen2.decode_step((graphdef, params), cache, tokens, positions)

    return DecodeFns(prefill=prefill, step=step)

"""models/qwen2.py's training forwards as pure functions of (params, inputs), for rlsoft.trainer.

Two functions over the same weights (params = the state of `nnx.split`):

    forward = train_forward(graphdef)      # (params, tokens, positions, mask) -> logits [B,T,V]
    logits = response_logits(graphdef)     # (params, prompts[Q,P], prompt_mask, responses[Q*G,N],
                                           #  response_mask) -> logits [Q*G,N,V] predicting each
                                           #  response token

Both give the logits of `Qwen2.__call__` (whose parity with transformers tests/test_qwen2_parity.py
checks) at every real position, faster for training:

  * blocked causal attention: queries go in blocks of `block` positions and block i attends to keys
    0 .. end of block i only, so the masked-out upper triangle of T x T scores is mostly never
    computed (about 0.58 of the work at T = 384, block 64), in head-major layouts with the prefix and
    own-context scores merged by their softmax statistics (`_block_attention`). Measured on the tiny
    preset's update (64 x 384 tokens): 1.24x the update's speed with the full T x T attention, then
    1.08x more (forward + backward) from the layouts and the merge, then 1.045x from a hand-written
    backward that keeps the score gradients in their layout (`_block_attention`). Padding rows (queries
    at left-padding positions, whose keys are all masked) then average over their block's keys
    rather than all T keys; nothing reads those positions.
  * `response_logits` runs the prompt of a group once (its K/V are a prefix every row of the group
    attends to, as the sampler's shared prompt cache does) and the LM head only at the positions
    that predict response tokens: the last prompt position and response positions 0 .. N-2.
    With 8 questions x G = 8, 128-token prompts and 256 response tokens, that is 8 x 128 + 64 x 255
    instead of 64 x 384 positions through the layers, and 64 x 256 instead of 64 x 384 through the
    LM head. It needs the rows of a group to share their prompt (rlsoft.train_loop builds them so).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import qwen2
from models.matmul import swapped_product
from rlsoft.mesh import constrain
from rlsoft.rollout import prompt_positions

BLOCK = 64


def _probs(q, k, mask, prefix, scale):
    """Softmax probabilities of a query block over its own keys and the optional shared prefix.

    q [Bp,G,K,R,t,D]; k [Bp,G,K,e,D] with mask [Bp,G,t,e]; prefix (k [Bp,K,P,D], v, valid [Bp,P]) read
    by the G rows of a prompt. Returns (p_own [Bp,G,K,R,t,e], p_pre [Bp,K,G*R*t,P] or None), f32,
    jointly normalised. Each segment's scores are one batched matmul in its own head-major layout,
    merged by their max and sum rather than concatenated (measured 2.5x (forward) and 1.2-1.3x
    (forward + backward) faster than qwen2._attend's concatenation on the tiny preset's update).
    """
    s_own = jnp.einsum("bgkrtd,bgksd->bgkrts", q, k, preferred_element_type=jnp.float32) * scale
    s_own = jnp.where(mask[:, :, None, None], s_own, qwen2.MASK_VALUE)
    m = jnp.max(s_own, axis=-1)  # [Bp,G,K,R,t]
    if prefix is None:
        e_own = jnp.exp(s_own - m[..., None])
        return e_own / jnp.sum(e_own, axis=-1, keepdims=True), None
    pk, _, valid = prefix
    s_pre = jnp.einsum("bkmd,bkpd->bkmp", _query_rows(q), pk, preferred_element_type=jnp.float32) * scale
    s_pre = jnp.where(valid[:, None, None, :], s_pre, qwen2.MASK_VALUE)
    m = jnp.maximum(m, _block_rows(jnp.max(s_pre, axis=-1), q.shape))
    e_own = jnp.exp(s_own - m[..., None])
    e_pre = jnp.exp(s_pre - _query_rows(m)[..., None])
    total = jnp.sum(e_own, axis=-1) + _block_rows(jnp.sum(e_pre, axis=-1), q.shape)
    return e_own / total[..., None], e_pre / _query_rows(total)[..., None]


def _query_rows(x):
    """[Bp,G,K,R,t,...] -> [Bp,K,G*R*t,...]: the G rows' queries as rows of one matmul over the prefix."""
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[5:])


def _block_rows(x, q_shape):
    """The inverse of `_query_rows` for x [Bp,K,G*R*t,...] (q_shape: [Bp,G,K,R,t,D])."""
    bp, g, kvh, r, t, _ = q_shape
    return jnp.moveaxis(x.reshape((bp, kvh, g, r, t) + x.shape[3:]), 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block_attention(q, k, v, mask, prefix, scale):
    """Softmax attention of one query block (shapes: `_probs`) -> [Bp,G,K,R,t,D] in q's dtype.

    Hand-written VJP (standard softmax attention backward, dS = P (dP - rowsum(dO O))): the key and
    value gradients are written as [D, keys] products and swapped (models.matmul.swapped_product),
    where autodiff copies the [t, keys] score gradients transposed. Measured on the tiny preset's update: 1.045x
    (paired median of 7 rounds, 433 vs 449 ms). Masked scores get zero gradient, as autodiff through
    the `where` gives, also on rows whose every key is masked (P is uniform there, not 0). rowsum(dO O)
    uses the float32 output, before its cast to q's dtype. tests/test_qwen2_train.py checks the
    gradients against autodiff. Forward-mode AD (jax.jvp) does not go through a custom_vjp.
    """
    return _attention_fwd(q, k, v, mask, prefix, scale)[0]


def _attention_fwd(q, k, v, mask, prefix, scale):
    p_own, p_pre = _probs(q, k, mask, prefix, scale)
    out = jnp.einsum("bgkrts,bgksd->bgkrtd", p_own.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if prefix is not None:
        o_pre = jnp.einsum("bkmp,bkpd->bkmd", p_pre.astype(prefix[1].dtype), prefix[1],
                           preferred_element_type=jnp.float32)
        out = out + _block_rows(o_pre, q.shape)
    return out.astype(q.dtype), (q, k, v, mask, prefix, p_own, p_pre, out)


def _attention_bwd(scale, res, d_out):
    q, k, v, mask, prefix, p_own, p_pre, out = res  # out: float32
    delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)  # rowsum(dO * O)
    dp_own = jnp.einsum("bgkrtd,bgksd->bgkrts", d_out, v, preferred_element_type=jnp.float32)
    ds_own = jnp.where(mask[:, :, None, None], p_own * (dp_own - delta[..., None]) * scale, 0.0)
    dq = jnp.einsum("bgkrts,bgksd->bgkrtd", ds_own.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = swapped_product(q, ds_own.astype(q.dtype), "bgkrtd,bgkrts->bgkds")
    dv = swapped_product(d_out, p_own.astype(d_out.dtype), "bgkrtd,bgkrts->bgkds")
    d_prefix = None
    if prefix is not None:
        pk, pv, valid = prefix
        do_rows, q_rows = _query_rows(d_out), _query_rows(q)
        dp_pre = jnp.einsum("bkmd,bkpd->bkmp", do_rows, pv, preferred_element_type=jnp.float32)
        ds_pre = jnp.where(valid[:, None, None, :], p_pre * (dp_pre - _query_rows(delta)[..., None]) * scale, 0.0)
        dq_pre = jnp.einsum("bkmp,bkpd->bkmd", ds_pre.astype(pk.dtype), pk, preferred_element_type=jnp.float32)
        dq = dq + _block_rows(dq_pre, q.shape)
        d_prefix = (swapped_product(q_rows, ds_pre.astype(q.dtype), "bkmd,bkmp->bkdp").astype(pk.dtype),
                    swapped_product(do_rows, p_pre.astype(d_out.dtype), "bkmd,bkmp->bkdp").astype(pv.dtype), None)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, d_prefix


_block_attention.defvjp(_attention_fwd, _attention_bwd)


def _embed(module: qwen2.Qwen2, tokens):
    """The token embeddings [B,T,d]. Under a mesh (rlsoft.mesh.constrain) the table's fsdp split of d is
    gathered before the lookup, as FSDP gathers every weight where it is used, and the embeddings keep
    their rows split over data x fsdp: otherwise they inherit the table's split of d, which XLA can only
    undo by replicating the lookup, and later all-gathers the batch before the projections."""
    emb = module.embed_tokens
    if jax.sharding.get_abstract_mesh().empty:
        return emb(tokens)
    (table,) = emb.promote_dtype((emb.embedding[...],), dtype=emb.dtype, inexact=False)  # as nnx.Embed
    table = constrain(table, ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0), ("batch", None, None))


def _head(module: qwen2.Qwen2, x):
    """`module.head` (final norm, LM head: fp32 logits [..., V]) with the head's weight gathered over
    its fsdp split of d before the product, in the compute dtype, and the logits' rows kept split over
    data x fsdp (on a multi-device mesh; else `module.head` itself). Otherwise XLA's SPMD partitioner
    chose to keep the weight's d split for the backward's dlogits @ W and all-gathered the micro-batch's
    dlogits [rows, N, V] onto every device instead (f32: 9.3 GiB per device for 32 x 512 tokens of
    Qwen2.5-0.5B on 8 devices, against 0.27 GB for the bf16 table), which no remat policy touches."""
    if jax.sharding.get_abstract_mesh().size <= 1:  # no mesh, or one device: nothing to gather
        return module.head(x)
    x = module.norm(x)
    if module.lm_head is None:  # tied: as nnx.Embed.attend
        emb = module.embed_tokens
        x, table = emb.promote_dtype((x, emb.embedding[...]), dtype=emb.dtype)
        logits = jnp.dot(x, constrain(table, ("vocab", None)).T)
    else:  # as nnx.Linear.__call__ (no bias)
        lin = module.lm_head
        x, kernel, _ = lin.promote_dtype((x, lin.kernel[...], None), dtype=lin.dtype)
        logits = lin.dot_general(x, constrain(kernel, (None, "vocab")), (((x.ndim - 1,), (0,)), ((), ())),
                                 precision=lin.precision)
    return constrain(logits.astype(jnp.float32), ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))


# Per-block rematerialisation (--remat): the policy of jax.checkpoint around each transformer block.
# "full" saves only each block's input (the backward recomputes the block); "dots" also saves the
# outputs of matmuls without batch dimensions (the q/k/v/o and MLP projections) and recomputes the
# rest (attention scores and probabilities, norms, activations).
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_policy(remat: str):
    if remat not in REMAT:
        raise ValueError(f"remat={remat!r} is invalid; allowed: {', '.join(REMAT)}")
    return REMAT[remat]


def _block(layer: qwen2.Block, x, cos, sin, key_mask, pre, shape, block: int):
    """One transformer block: x [B,T,d] -> (x, (k, v) [B,T,H_kv,D]). `key_mask` [Bp,G,1,T] (the keys'
    padding; causality is added per query block); `shape` = (Bp, G, H, H_kv, D)."""
    bp, g, heads, kvh, hd = shape
    b, t, _ = x.shape
    rep = heads // kvh
    causal = jnp.tril(jnp.ones((t, t), bool))
    q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
    kv = (k, v)
    # Head-major layouts, once per layer: every attention product is then a plain batched matmul.
    q = q.reshape(bp, g, t, kvh, rep, hd).transpose(0, 1, 3, 4, 2, 5)  # [Bp,G,K,R,T,D]
    k, v = (z.reshape(bp, g, t, kvh, hd).transpose(0, 1, 3, 2, 4) for z in (k, v))  # [Bp,G,K,T,D]
    if pre is not None:
        pk, pv, valid = pre
        pre = (pk.transpose(0, 2, 1, 3), pv.transpose(0, 2, 1, 3), valid)
    outs = []
    for s in range(0, t, block):
        e = min(s + block, t)
        mask = causal[None, None, s:e, :e] & key_mask[..., :e]
        outs.append(_block_attention(q[..., s:e, :], k[..., :e, :], v[..., :e, :], mask, pre, hd ** -0.5))
    o = jnp.concatenate(outs, axis=4).transpose(0, 1, 4, 2, 3, 5)  # [Bp,G,T,K,R,D]
    x = x + layer.self_attn.o_proj(o.reshape(b, t, heads * hd))
    return constrain(x + layer.mlp(layer.post_attention_layernorm(x)), ("batch", None, None)), kv


def _layers(module: qwen2.Qwen2, tokens, positions, mask, prefix=None, block: int = BLOCK, remat: str = "none"):
    """Hidden states [B,T,d] after the last block (before the final norm), and each layer's (k, v)
    [B,T,H_kv,D].

    `prefix`: per-layer (k [Bp,P,H_kv,D], v) plus valid [Bp,P]; row b also attends to prefix b // G
    (G = B / Bp), every valid prefix slot, before its own causal context. `remat` (REMAT): each block
    runs under jax.checkpoint with that policy, its weights passed in as the split layer state.
    """
    cfg = module.cfg
    b, t = tokens.shape
    bp = b if prefix is None else prefix[2].shape[0]
    shape = (bp, b // bp, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    cos, sin = qwen2.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    key_mask = mask.astype(bool).reshape(bp, b // bp, 1, t)
    policy = _remat_policy(remat)
    x = _embed(module, tokens)
    kvs = []
    for i, layer in enumerate(module.layers):
        pre = None if prefix is None else (prefix[0][i], prefix[1][i], prefix[2])
        if remat == "none":
            x, kv = _block(layer, x, cos, sin, key_mask, pre, shape, block)
        else:
            layer_def, layer_state = nnx.split(layer)

            def run(state, x, cos, sin, key_mask, pre, layer_def=layer_def):
                return _block(nnx.merge(layer_def, state), x, cos, sin, key_mask, pre, shape, block)

            x, kv = jax.checkpoint(run, policy=policy)(layer_state, x, cos, sin, key_mask, pre)
        kvs.append(kv)
    return x, kvs


def train_forward(graphdef: nnx.GraphDef, block: int = BLOCK, remat: str = "none"):
    """(params, tokens[B,T], positions[B,T], mask[B,T]) -> logits [B,T,V] f32; params = nnx.split state.

    Causal plus padding mask and explicit positions; blocked causal attention (module docstring);
    `remat`: the per-block checkpoint policy (REMAT).
    """
    if block < 1:
        raise ValueError(f"block={block} is invalid; must be >= 1")
    _remat_policy(remat)

    def forward(params, tokens, positions, mask):
        module = nnx.merge(graphdef, params)
        x, _ = _layers(module, tokens, positions, mask, block=block, remat=remat)
        return _head(module, x)

    return forward


def response_logits(graphdef: nnx.GraphDef, block: int = BLOCK, remat: str = "none"):
    """(params, prompts[Q,P], prompt_mask[Q,P], responses[Q*G,N], response_mask[Q*G,N]) -> [Q*G,N,V].

    Row q*G + j is sample j of prompt q (prompts left-padded, responses right-padded). Entry [b, n]
    is the fp32 logits that predict responses[b, n], equal to those of the concatenated
    prompt + response sequence through `train_forward` at its position P - 1 + n. `remat`: as
    `train_forward`'s (both the prompt pass and the response pass).
    """
    if block < 1:
        raise ValueError(f"block={block} is invalid; must be >= 1")
    _remat_policy(remat)

    def fn(params, prompts, prompt_mask, responses, response_mask):
        module = nnx.merge(graphdef, params)
        (nq, _), (b, n) = prompts.shape, responses.shape
        if b % nq:
            raise ValueError(f"responses rows={b} is invalid; not a multiple of prompts rows={nq}")
        g = b // nq
        prompt_mask, response_mask = prompt_mask.astype(bool), response_mask.astype(bool)
        x, kvs = _layers(module, prompts, prompt_positions(prompt_mask), prompt_mask, block=block, remat=remat)
        first = jnp.repeat(x[:, -1:], g, axis=0)  # [B,1,d]: the state that predicts response token 0
        if n == 1:
            return _head(module, first)
        # Positions continue the concatenated sequence's: (real prompt tokens) + (response tokens so far).
        lengths = jnp.repeat(jnp.sum(prompt_mask, axis=1), g)[:, None]
        tokens, mask = responses[:, :-1], response_mask[:, :-1]  # the last token predicts nothing
        positions = jnp.maximum(lengths + jnp.cumsum(mask, axis=1) - 1, 0)
        prefix = (tuple(k for k, _ in kvs), tuple(v for _, v in kvs), prompt_mask)
        x, _ = _layers(module, tokens, positions, mask, prefix=prefix, block=block, remat=remat)
        # One LM head over [B, N, d]: the states are concatenated, not the V-wide logits.
        return _head(module, jnp.concatenate([first, x], axis=1))

    return fn

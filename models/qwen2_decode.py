"""models/qwen2.py behind rlsoft.rollout's model-agnostic `DecodeFns` interface.

    graphdef, state = nnx.split(model)
    fns = decode_fns(graphdef)                        # build once, reuse (jit keys on identity)
    sampler = rollout.make_sampler(fns, SamplingConfig(...), group_size=G)
    out = sampler(state, prompts, prompt_mask, key)   # params = the NNX state, any pytree

`shared_prompt=True` prefills each prompt once and stores its K/V as the cache prefix read by its G
rows (`prefill_shared`); False repeats the prompts G times into a plain cache of P + max_new slots
per row (same samples up to float rounding; kept as the reference and for models without sharing).
Only the last position's logits are computed in the prefill (`last_only`).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models import qwen2
from rlsoft.rollout import DecodeFns


def decode_fns(graphdef: nnx.GraphDef, *, shared_prompt: bool = True) -> DecodeFns:
    """Prefill and step of a Qwen2 whose params are passed as the state of `nnx.split`."""

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
        return logits[::group_size, 0], cache  # the G copies are equal: hand back one per prompt

    def step(params, cache, tokens, positions):
        return qwen2.decode_step((graphdef, params), cache, tokens, positions)

    return DecodeFns(prefill=prefill, step=step)


def train_forward(graphdef: nnx.GraphDef):
    """The training forward as a pure function: (params, tokens, positions, mask) -> logits [B,T,V] f32."""

    def forward(params, tokens, positions, mask):
        return nnx.merge(graphdef, params)(tokens, positions, mask)

    return forward

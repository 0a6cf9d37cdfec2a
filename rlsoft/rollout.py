"""Batched autoregressive sampling over any model's decode functions: one jitted prefill + decode loop.

The sampler knows no model. A model hands it a `DecodeFns` of two pure functions (`params` is any
pytree, e.g. an NNX state from `nnx.split`; `cache` is any pytree of static shape):

    prefill(params, tokens[Bp,P], positions[Bp,P], mask[Bp,P], group_size, max_new)
        -> (last_logits[Bp,V] fp32, cache for Bp*G rows, row p*G + g decoding prompt p)
    step(params, cache, tokens[B], positions[B]) -> (logits[B,V] fp32, cache)

`group_size` and `max_new` are static ints: the cache must hold `max_new` new tokens per row. A
model with a group-shared prompt cache prefills each prompt once; any other model can repeat the
prompts G times inside its `prefill` (models/qwen2_decode.py has both).

Segments (`DecodeFns.segment = C > 0`): the decode loop runs as consecutive loops whose lengths
double after the first two, C, C, 2C, 4C, ... (`segment_ends`), and calls
`step(params, cache, tokens, positions, s)` with the static segment number s: that step feeds
response token j (0-based; it is the (j+1)-th decode step) with ends[s-1] <= j < ends[s]. Every row
decodes in lockstep, so a model can bound its attention statically to the ends[s] response slots
that may be written, instead of its whole cache. It costs one compiled copy of the step per
segment: doubling keeps that to 1 + ceil(log2((N-1)/C)) copies (5, not 16, for 1,024 new tokens at
C = 64) while a step still reads at most as many empty slots as it has filled (beyond the first C).

Prompts are LEFT-padded ([Bp,P] tokens, mask = token is real, every row's last column real) and
positions are `max(cumsum(mask) - 1, 0)` (HF generate's rule), so the response of every row starts
at its own next position. A row with an empty prompt is not supported.

Sampling (order as transformers' logits warpers: temperature, then top-k, then top-p):
    z = logits / temperature;  keep z_i >= k-th largest z (top-k; ties kept);
    keep the smallest prefix of sorted softmax(kept z) whose mass reaches top_p (the first token is
    always kept; `p_excl(i) < top_p` with p_excl the mass of tokens ranked above i);
    y ~ softmax(kept z) by inverse CDF (`categorical`).  temperature == 0 (static) is argmax, with
    no division; top-k and top-p cannot change an argmax, so they are skipped there.

Returned log-probs (Rollout):
  * `logprobs`: log softmax(logits)[y], the model's UNMODIFIED distribution at temperature 1, no
    top-k/top-p. This is what a teacher-forced training forward on prompt + response computes, so
    it is the "old policy" log-prob for ratios and KL terms.
  * `sampling_logprobs`: log-prob of y under the distribution actually sampled from (temperature,
    top-k, top-p applied and renormalised); 0 for greedy (a point mass). Equal to `logprobs` when
    temperature == 1, top_k == 0 and top_p == 1.

Stopping: a row is done after it emits any id in `stop_ids`; the stop token is part of the
response (mask 1, it has a log-prob). After that the row emits `pad_id` with mask 0 and log-probs 0.
The loop is a `lax.while_loop` (one per segment) that exits when every row is done or
`max_new_tokens` were sampled.

PRNG: the caller's key is used as one stream; token j of every row is drawn with
`fold_in(key, j)`, independently per row.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlsoft.sampling import categorical, filter_logits, is_int
from rlsoft.mesh import constrain, under_mesh, without_axis

Params = Any
Cache = Any
PrefillFn = Callable[..., tuple[jax.Array, Cache]]
StepFn = Callable[[Params, Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]


class DecodeFns(NamedTuple):
    """A model's decoding interface (see the module docstring for shapes)."""

    prefill: PrefillFn  # (params, tokens, positions, mask, group_size, max_new) -> (last_logits, cache)
    step: StepFn  # (params, cache, tokens, positions[, segment]) -> (logits, cache)
    segment: int = 0  # > 0: steps come in segments (`segment_ends`) and get the segment number (static)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a jit compiles once per config).

    temperature 0 is greedy; top_k 0 disables top-k; top_p 1 disables top-p.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        # Accept any iterable of ids (list, set) but store a sorted tuple so that the config hashes.
        ids = self.stop_ids
        ids = list(ids) if hasattr(ids, "__iter__") and not isinstance(ids, (str, bytes)) else [ids]
        if not all(is_int(i) for i in ids):
            raise ValueError(f"stop_ids={self.stop_ids!r} is invalid; expected a collection of ints")
        stop = tuple(sorted({int(i) for i in ids}))
        object.__setattr__(self, "stop_ids", stop)
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid; must be an int >= 1")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} is invalid; must be a finite float >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid; must be an int >= 0 (0 disables)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} is invalid; must be in (0, 1] (1 disables)")
        if any(i < 0 for i in stop):
            raise ValueError(f"stop_ids={stop} is invalid; ids must be >= 0")
        if not is_int(self.pad_id) or self.pad_id < 0:
            raise ValueError(f"pad_id={self.pad_id!r} is invalid; must be an int >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Rollout(NamedTuple):
    """B = Bp * G responses, row p*G + g is sample g of prompt p; N = max_new_tokens."""

    tokens: jax.Array  # [B,N] int32, pad_id after a row's stop token
    logprobs: jax.Array  # [B,N] f32, log softmax(logits)[token] at temperature 1, 0 where mask is 0
    sampling_logprobs: jax.Array  # [B,N] f32, log-prob under the sampling distribution, 0 where mask 0
    mask: jax.Array  # [B,N] bool, True up to and including the stop token
    lengths: jax.Array  # [B] int32, number of response tokens (sum of mask)
    stopped: jax.Array  # [B] bool, ended by a stop id (False: cut at max_new_tokens)


# --------------------------------------------------------------------------------------------
# Helpers.


def prompt_positions(mask: chex.Array) -> chex.Array:
    """Positions of left-padded rows: max(cumsum(mask) - 1, 0), int32 (pads sit at 0, unused)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """Host-side: token lists -> (tokens [B,L] int32, mask [B,L] bool), left-padded to `length`."""
    longest = max(len(s) for s in seqs)
    length = longest if length is None else length
    if length < longest or min(len(s) for s in seqs) == 0:
        raise ValueError(f"length={length} is invalid; need every prompt non-empty and <= length")
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        tokens[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return tokens, mask


def sample_token(key: chex.PRNGKey, logits: chex.Array, config: SamplingConfig, greedy_rows=None):
    """One token per row from fp32 logits [B,V] -> (token [B], logprob [B], sampling_logprob [B]).
    `greedy_rows` ([B] bool, optional) rows take the argmax instead (sampling log-prob 0)."""
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    logp_model = jax.nn.log_softmax(logits, axis=-1)
    if config.greedy:  # static: temperature 0 never reaches a division
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, _take(logp_model, tok), jnp.zeros(tok.shape, jnp.float32)
    plain = config.temperature == 1.0 and config.top_k == 0 and config.top_p >= 1.0
    z = logits if plain else filter_logits(logits / config.temperature, config.top_k, config.top_p)
    tok = categorical(key, z)
    if greedy_rows is not None:
        tok = jnp.where(greedy_rows, jnp.argmax(logits, axis=-1).astype(jnp.int32), tok)
    lp = _take(logp_model, tok)  # plain: the model's own distribution, one log_softmax serves both
    slp = lp if plain else _take(jax.nn.log_softmax(z, axis=-1), tok)
    return tok, lp, slp if greedy_rows is None else jnp.where(greedy_rows, 0.0, slp)


def _take(x: chex.Array, idx: chex.Array) -> chex.Array:
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------------------------
# The sampler.


class _Carry(NamedTuple):
    t: jax.Array  # index of the token sampled next
    cache: Cache
    token: jax.Array  # [B] last sampled token (input of the next step)
    done: jax.Array  # [B] bool
    out: Rollout  # buffers written column by column; lengths filled at the end


def sample(fns: DecodeFns, config: SamplingConfig, params: Params, prompts: chex.Array, prompt_mask: chex.Array,
           key: chex.PRNGKey, *, group_size: int = 1, greedy_rows: int = 0) -> Rollout:
    """Sample `group_size` responses to each left-padded prompt [Bp,P]; pure, jit-able.

    The first `greedy_rows` of each group decode greedily (argmax), the others sample: a greedy and
    a sampled eval in one call. `fns`, `config`, `group_size` and `greedy_rows` are static; `params`,
    `prompts`, `prompt_mask` and `key` may be traced. `make_sampler` jits it once per prompt shape.
    """
    chex.assert_rank([prompts, prompt_mask], 2)
    chex.assert_equal_shape([prompts, prompt_mask])
    chex.assert_type(prompts, int)
    _check_group(group_size, greedy_rows)
    if not is_int(fns.segment) or fns.segment < 0:
        raise ValueError(f"segment={fns.segment!r} is invalid; must be an int >= 0 (0: one loop)")
    bp, _ = prompts.shape
    g, n = group_size, config.max_new_tokens
    b = bp * g
    # Under a mesh (make_sampler with shardings) rows split over data x fsdp; elsewhere no-ops.
    prompts, prompt_mask = (constrain(x, ("batch", None)) for x in (prompts, prompt_mask.astype(bool)))
    positions = prompt_positions(prompt_mask)

    logits, cache = fns.prefill(params, prompts, positions, prompt_mask, g, n)
    chex.assert_rank(logits, 2)
    chex.assert_axis_dimension(logits, 0, bp)
    vocab = logits.shape[-1]
    bad = [i for i in config.stop_ids + (config.pad_id,) if i >= vocab]
    if bad:
        raise ValueError(f"stop_ids/pad_id {bad} are invalid; vocab size is {vocab}")
    logits = jnp.repeat(logits, g, axis=0)  # the G rows of a prompt share its first-token logits
    # Response token j of every row sits at the row's next position + j (left padding: last column).
    start = jnp.repeat(positions[:, -1] + 1, g)
    stop_ids = jnp.asarray(config.stop_ids, jnp.int32)
    greedy = jnp.arange(b) % g < greedy_rows if greedy_rows and not config.greedy else None

    def emit(carry: _Carry, logits: chex.Array) -> _Carry:
        """Sample token t of every row from `logits` and write it (pad for rows already done)."""
        # Whole vocabulary rows (a tensor-split LM head gathered): the draw is one device's arithmetic.
        logits = constrain(logits, ("batch", None))
        tok, lp, slp = sample_token(jax.random.fold_in(key, carry.t), logits, config, greedy)
        live = ~carry.done
        tok = jnp.where(live, tok, config.pad_id)
        zero = jnp.zeros_like(lp)
        out = carry.out
        out = out._replace(
            tokens=out.tokens.at[:, carry.t].set(tok),
            logprobs=out.logprobs.at[:, carry.t].set(jnp.where(live, lp, zero)),
            sampling_logprobs=out.sampling_logprobs.at[:, carry.t].set(jnp.where(live, slp, zero)),
            mask=out.mask.at[:, carry.t].set(live),
        )
        hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1) & live  # [B,0] -> all False
        return _Carry(carry.t + 1, carry.cache, tok, carry.done | hit, out._replace(stopped=out.stopped | hit))

    empty = Rollout(
        tokens=jnp.full((b, n), config.pad_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        sampling_logprobs=jnp.zeros((b, n), jnp.float32),
        mask=jnp.zeros((b, n), bool),
        lengths=jnp.zeros((b,), jnp.int32),
        stopped=jnp.zeros((b,), bool),
    )
    empty = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), empty)
    # Token 0 comes from the prefill; each loop iteration runs one decode step and samples one token,
    # so exactly N - 1 steps run when no row stops (the last sampled token is never fed back).
    carry = emit(_Carry(jnp.zeros((), jnp.int32), cache, jnp.zeros((b,), jnp.int32),
                        jnp.zeros((b,), bool), empty), logits)

    def loop(carry: _Carry, end: int, *segment) -> _Carry:
        """Decode steps t = carry.t .. end - 1 (the step at t feeds token t - 1), or until all rows stop."""
        def cond(c: _Carry):
            return (c.t < end) & ~jnp.all(c.done)

        def body(c: _Carry) -> _Carry:
            # Finished rows keep decoding their pad (outputs ignored): shapes stay static.
            step_logits, cache = fns.step(params, c.cache, c.token, start + c.t - 1, *segment)
            return emit(c._replace(cache=cache), step_logits)

        return jax.lax.while_loop(cond, body, carry)

    if fns.segment:  # segment s: t - 1 in [ends[s-1], ends[s]); a segment after an early stop exits at once
        for s, end in enumerate(segment_ends(n - 1, fns.segment)):
            carry = loop(carry, end + 1, s)
    else:
        carry = loop(carry, n)
    out = carry.out
    return out._replace(lengths=jnp.sum(out.mask, axis=-1, dtype=jnp.int32))


def segment_ends(steps: int, first: int) -> tuple[int, ...]:
    """Exclusive ends of the decode segments over `steps` decode steps: first, 2 first, 4 first, ...,
    the last clipped to `steps` (segment lengths C, C, 2C, 4C, ...); () for no steps."""
    if not is_int(first) or first < 1:
        raise ValueError(f"segment={first!r} is invalid; must be an int >= 1")
    ends, end = [], first
    while (ends[-1] if ends else 0) < steps:
        ends.append(min(end, steps))
        end *= 2
    return tuple(ends)


def _check_group(group_size, greedy_rows) -> None:
    if not is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is invalid; must be an int >= 1")
    if not is_int(greedy_rows) or not 0 <= greedy_rows <= group_size:
        raise ValueError(f"greedy_rows={greedy_rows!r} is invalid; must be an int in 0..group_size={group_size}")


def make_sampler(fns: DecodeFns, config: SamplingConfig, group_size: int = 1, greedy_rows: int = 0,
                 params_sharding: Any = None):
    """`sample` jitted once for these static settings: `(params, prompts, prompt_mask, key) -> Rollout`.
    Plain jax.jit over pytrees (the Flax performance guide's nnx.split / plain jit pattern): it
    recompiles only for new prompt shapes or dtypes. Keep the returned function and reuse it.

    `params_sharding` (the policy params' NamedShardings in the train state): params are taken where
    the update leaves them, calls trace under their mesh, so rows of prompts, outputs and the model's
    decode cache split over data x fsdp (rlsoft.mesh.constrain). The weights' fsdp split is gathered
    once a call: left to XLA, each decode loop (one per segment) kept its own gathered copy.
    """
    _check_group(group_size, greedy_rows)

    def sampler(params, prompts, prompt_mask, key):
        if params_sharding is not None:
            params = jax.lax.with_sharding_constraint(params, jax.tree.map(lambda s: without_axis(s, "fsdp"),
                                                                           params_sharding))
        return sample(fns, config, params, prompts, prompt_mask, key, group_size=group_size, greedy_rows=greedy_rows)

    if params_sharding is None:
        return jax.jit(sampler)
    mesh = jax.tree.leaves(params_sharding)[0].mesh
    return under_mesh(jax.jit(sampler, in_shardings=(params_sharding, None, None, None)), mesh)

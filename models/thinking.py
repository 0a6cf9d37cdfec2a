"""The two GPTs of the thinking-token testbed: a thinker writes thoughts, an answerer answers from them.

Both roles are `models.char_gpt.CharGPT`s (GPT-2, see that module) over ONE joint token vocabulary;
each role's logits are sliced to the classes it emits. For modulus M and thought vocabulary V:

    ids [0, M)          numbers: operands and answers         (answerer classes: ids 0 .. M-1)
    ids [M, M+V)        thoughts 0 .. V-1                     (thinker classes: ids M .. M+V,
    id  M+V             EOT, thought class V                   i.e. thought class c = id - M)
    id  M+V+1           ASK: after it the answerer speaks
    vocab_size = M + V + 2

Thoughts are passed around as CLASS ids c in [0, V] and become tokens M + c inside.

Thinker, teacher-forced in one forward pass: with question q [B,k] and thoughts h [B,T],

    tokens = q ++ h[:, :T-1]                     (k + T - 1 tokens)
    logits[:, t] = head(x)[:, k-1+t, M : M+V+1]  t = 0 .. T-1: p(h_t | q, h_<t)   -> [B, T, V+1]

Answerer, at the last position, sliced to [0, M) -> [B, M]; its input by `answerer_reads`:

    "blind"     h ++ ASK              the thoughts alone (the question is not seen)
    "normal"    q ++ h ++ ASK         question and thoughts
    "question"  q ++ ASK              the no-think baseline: thoughts are ignored

The EOT logit (class V) is always present; a fixed-length task slices it off
(`envs.modadd.ModAddConfig.thought_classes`). Models are untied (separate LM head: number tokens are
operands on input and answers on output), biased, fp32, block_size = k + T + 1 for both roles.
Parameters per role: `char_config(role).num_params` (CharGPT's closed form).
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import char_gpt
from rlsoft.config import check

ROLES = ("thinker", "answerer")
ANSWERER_READS = ("blind", "normal", "question")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class ThinkingModelConfig:
    """Sizes of the task (M, k, V, T) and of the two GPTs (same shape for both roles)."""

    modulus: int = 100
    num_operands: int = 2
    thought_vocab: int = 10
    max_thoughts: int = 2
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    answerer_reads: str = "normal"

    def __post_init__(self):
        for name, low in (("modulus", 2), ("num_operands", 1), ("thought_vocab", 2), ("max_thoughts", 1),
                          ("d_model", 1), ("n_layer", 1), ("n_head", 1)):
            value = getattr(self, name)
            check(_is_int(value) and value >= low, f"{name}={value!r} is invalid; need an integer >= {low}")
        check(self.d_model % self.n_head == 0,
              f"d_model={self.d_model} is invalid; need a multiple of n_head={self.n_head}")
        check(self.answerer_reads in ANSWERER_READS,
              f"answerer_reads={self.answerer_reads!r} is invalid; need one of {', '.join(ANSWERER_READS)}")

    # --- the joint vocabulary -------------------------------------------------------------
    @property
    def thought_offset(self) -> int:
        """M: token id of thought class 0."""
        return self.modulus

    @property
    def eot_token(self) -> int:
        return self.modulus + self.thought_vocab

    @property
    def ask_token(self) -> int:
        return self.modulus + self.thought_vocab + 1

    @property
    def vocab_size(self) -> int:
        return self.modulus + self.thought_vocab + 2

    @property
    def block_size(self) -> int:
        return self.num_operands + self.max_thoughts + 1

    def char_config(self, role: str) -> char_gpt.CharGPTConfig:
        """The CharGPTConfig of `role` ("thinker" or "answerer")."""
        check(role in ROLES, f"role={role!r} is invalid; need one of {', '.join(ROLES)}")
        return char_gpt.CharGPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                                      n_layer=self.n_layer, n_head=self.n_head, n_embd=self.d_model,
                                      bias=True, tie_embeddings=False, dtype="float32", param_dtype="float32")


@functools.partial(jax.jit, static_argnums=0)
def _init_state(char_cfg: char_gpt.CharGPTConfig, key: jax.Array):
    return nnx.state(char_gpt.CharGPT(char_cfg, rngs=nnx.Rngs(key)))


def init_models(cfg: ThinkingModelConfig, seed: int = 0):
    """(thinker (graphdef, state), answerer (graphdef, state)) from the two keys of
    jax.random.split(PRNGKey(seed)). The same init as `char_gpt.init_model` (one jitted NNX
    construction) but keyed by a key, not an int, and compiled once per CharGPTConfig: both roles
    and later seeds reuse it (a compile costs seconds on CPU)."""
    keys = jax.random.split(jax.random.PRNGKey(seed))
    models = []
    for role, key in zip(ROLES, keys):
        char_cfg = cfg.char_config(role)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda c=char_cfg: char_gpt.CharGPT(c, rngs=nnx.Rngs(0))))
        models.append((graphdef, _init_state(char_cfg, key)))
    return tuple(models)


def thought_tokens(cfg: ThinkingModelConfig, thoughts: jax.Array) -> jax.Array:
    """Thought classes [..] in [0, V] -> token ids M + class."""
    return jnp.asarray(thoughts, jnp.int32) + cfg.thought_offset


def _check_inputs(cfg: ThinkingModelConfig, questions: jax.Array, thoughts: jax.Array | None) -> None:
    chex.assert_rank(questions, 2)
    chex.assert_axis_dimension(questions, 1, cfg.num_operands)
    if thoughts is not None:
        chex.assert_rank(thoughts, 2)
        chex.assert_axis_dimension(thoughts, 1, cfg.max_thoughts)
        chex.assert_equal_shape_prefix([questions, thoughts], 1)


def thinker_logits_fn(graphdef: nnx.GraphDef, cfg: ThinkingModelConfig):
    """f(params, questions [B,k], thoughts [B,T]) -> [B,T,V+1] fp32: position t is the distribution of
    thought t given the question and thoughts[:, :t] (teacher forcing; one forward pass)."""
    k, t, m, v = cfg.num_operands, cfg.max_thoughts, cfg.modulus, cfg.thought_vocab

    def f(params, questions: jax.Array, thoughts: jax.Array) -> jax.Array:
        _check_inputs(cfg, questions, thoughts)
        tokens = jnp.concatenate([jnp.asarray(questions, jnp.int32), thought_tokens(cfg, thoughts[:, :t - 1])], 1)
        model = nnx.merge(graphdef, params)
        logits = model.head(model.hidden(tokens)[:, k - 1:])  # [B, T, vocab]
        return logits[..., m:m + v + 1]

    return f


def answer_tokens(cfg: ThinkingModelConfig, questions: jax.Array, thoughts: jax.Array | None) -> jax.Array:
    """The answerer's input [B, L] for `cfg.answerer_reads` (module docstring)."""
    b = questions.shape[0]
    ask = jnp.full((b, 1), cfg.ask_token, jnp.int32)
    q = jnp.asarray(questions, jnp.int32)
    if cfg.answerer_reads == "question":
        return jnp.concatenate([q, ask], 1)
    h = thought_tokens(cfg, thoughts)
    return jnp.concatenate([h, ask] if cfg.answerer_reads == "blind" else [q, h, ask], 1)


def answer_logits_fn(graphdef: nnx.GraphDef, cfg: ThinkingModelConfig):
    """f(params, questions [B,k], thoughts [B,T]) -> [B,M] fp32 answer logits. Blind ignores the
    questions, "question" the thoughts (which may then be None)."""
    m = cfg.modulus

    def f(params, questions: jax.Array, thoughts: jax.Array | None) -> jax.Array:
        if cfg.answerer_reads != "question":
            check(thoughts is not None, f"thoughts=None is invalid; answerer_reads={cfg.answerer_reads} reads them")
        _check_inputs(cfg, questions, thoughts)
        tokens = answer_tokens(cfg, questions, thoughts)
        return nnx.merge(graphdef, params).last_logits(tokens)[:, :m]

    return f

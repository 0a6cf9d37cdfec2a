"""google-tunix's side of benchmarks.peers: its Qwen2 loaded from a Hugging Face directory, and its
vanilla sampler (`tunix.generate.sampler.Sampler`) called as a user would.

tunix 0.1.7 loads transformers' safetensors into its own Qwen2 (tunix.models.qwen2.params
`create_model_from_safe_tensors`), given a tunix ModelConfig; the one here is filled from the same
config.json through models/hf.config_from_hf, so both sides read one description of the model.
Its sampler takes strings, so a tokenizer of decimal ids stands in ("12 7 930" <-> [12, 7, 930]):
prompts go in as the very ids rlsoft gets. Left padding is tunix's own (pad id 0, as rollout.left_pad).
Install: `pip install -e ".[peers]"` (setup.py), in a venv of its own.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

from models import hf

INSTALL_HINT = 'pip install -e ".[dev,peers]" in a venv of its own (it pins transformers below dev\'s)'
NEVER = -1  # eos id: no token is -1, so every row runs to max_generation_steps (as the rlsoft side)


class IdTokenizer:
    """Decimal ids as text: the interface tunix's TokenizerAdapter asks for (encode, decode, bos/eos/pad)."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):  # None: tunix prepends no BOS
        return None

    def eos_id(self) -> int:
        return NEVER

    def pad_id(self) -> int:
        return 0


def load_model(model_dir: str):
    """tunix's Qwen2 with the weights transformers wrote to `model_dir` (float32)."""
    from tunix.models.qwen2 import model as qwen2_lib
    from tunix.models.qwen2 import params as qwen2_params

    with open(os.path.join(model_dir, "config.json")) as f:
        c = hf.config_from_hf(json.load(f))
    config = qwen2_lib.ModelConfig(
        num_layers=c.num_hidden_layers, vocab_size=c.vocab_size, embed_dim=c.hidden_size,
        hidden_dim=c.intermediate_size, num_heads=c.num_attention_heads, head_dim=c.head_dim,
        num_kv_heads=c.num_key_value_heads, rope_theta=c.rope_theta, norm_eps=c.rms_norm_eps,
        use_tied_embedding=c.tie_word_embeddings)
    model = qwen2_params.create_model_from_safe_tensors(model_dir, config)
    # tunix's sampler sizes its logits buffer (return_logits=True) by `transformer.num_embed`, which its
    # Gemma models have and its Qwen2 lacks (AttributeError); the vocabulary size is what it means.
    model.num_embed = c.vocab_size
    return model


def make_sampler(model, prompt_len: int, new_tokens: int):
    """tunix's vanilla Sampler with a KV cache of prompt_len + new_tokens slots."""
    from tunix.generate import sampler as sampler_lib

    cfg = model.config
    cache = sampler_lib.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    return sampler_lib.Sampler(model, IdTokenizer(), cache)


def as_text(tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Left-padded prompts (rollout.left_pad) as the id strings tunix tokenizes back to the same ids."""
    return [" ".join(map(str, t[m])) for t, m in zip(np.asarray(tokens), np.asarray(mask, bool))]


def sample_fn(sampler, tokens: np.ndarray, mask: np.ndarray, new_tokens: int):
    """run() -> one call at temperature 1, no top-k / top-p (tunix: top_p=1 samples jax.random.categorical
    over the full logits), a new seed per call; it asserts every row got new_tokens tokens."""
    text, prompt_len = as_text(tokens, mask), tokens.shape[1]
    seeds = itertools.count()

    def run():
        out = sampler(text, max_generation_steps=new_tokens, max_prompt_length=prompt_len, temperature=1.0,
                      top_p=1.0, eos_tokens=[NEVER], seed=next(seeds))
        assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens][:4]
    return run


def greedy(sampler, tokens: np.ndarray, mask: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy (temperature 0) tokens [B, new_tokens] and the logits the first of them was chosen from [B, V]."""
    out = sampler(as_text(tokens, mask), max_generation_steps=new_tokens, max_prompt_length=tokens.shape[1],
                  temperature=0.0, eos_tokens=[NEVER], return_logits=True)
    return (np.stack([np.asarray(t) for t in out.tokens]),
            np.stack([np.asarray(x)[0] for x in out.logits]))

"""Logical axes of models/qwen2.py's parameters, for rlsoft.mesh's rules (logical -> mesh axes).

    axes = logical_axes(("layers", 0, "self_attn", "k_proj", "kernel"))   # ("embed", "kv_heads")
    units = axis_units(cfg)                                              # {"heads": H, "kv_heads": H_kv}
    shardings = rlsoft.mesh.param_shardings(params, mesh, logical_axes, units)

A pure function of the parameter's path in the `nnx.split` state (str keys and int layer indices;
only the last two names matter). Names, as in tunix's Qwen2 ShardingConfig and maxtext's rules:

  embed     the hidden size d (embedding rows' width, every projection's d side)
  vocab     the vocabulary (the embedding table's rows, an untied LM head's columns)
  heads     the flat H x head_dim side of q_proj (and its bias) and o_proj
  kv_heads  the flat H_kv x head_dim side of k_proj / v_proj (and their biases)
  mlp       the intermediate size of gate / up / down
  norm      RMSNorm weights (unsharded by the rules)

The q/k/v/o projections keep heads and head_dim in one flat dimension, so head_dim never appears
on its own here; `axis_units` tells the rules how many heads a flat dimension holds, so a split
keeps whole heads (and falls back to replication where the heads do not divide, e.g. Qwen2.5-3B's
2 KV heads over tensor=4).
"""
from __future__ import annotations

from typing import Sequence

from models.qwen2 import Qwen2Config

_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("input_layernorm", "weight"): ("norm",),
    ("post_attention_layernorm", "weight"): ("norm",),
    ("norm", "weight"): ("norm",),
}


def logical_axes(path: Sequence) -> tuple[str, ...]:
    """One logical axis name per dimension of the Qwen2 parameter at `path`; ValueError for a path
    that is not a Qwen2 parameter (a new parameter must be named here, not silently replicated)."""
    names = tuple(k for k in path if isinstance(k, str))
    if names and names[-1] == "value":  # an NNX variable's payload
        names = names[:-1]
    try:
        return _AXES[names[-2:]]
    except KeyError:
        raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical axes in models.qwen2_sharding") from None


def axis_units(cfg: Qwen2Config) -> dict[str, int]:
    """How many heads the flat heads / kv_heads dimensions hold (the rules split whole heads only)."""
    return {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads}

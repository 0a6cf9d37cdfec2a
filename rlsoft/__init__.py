"""rlsoft: how a group of sampled answers with verifiable rewards becomes policy-gradient weights.

The public names, importable from the package (`from rlsoft import compute_weights, Driver`):

  weighting   compute_weights, SCHEME_NAMES, NEEDS_TAU, weight_stats, summarize_weight_stats,
              make_tau_schedule
  losses      PolicyLossConfig, policy_loss, sft_loss, token_log_probs, token_entropy
  sampling    SamplingConfig, DecodeFns, make_sampler, categorical
  training    UpdateConfig, make_update, OptimizerConfig, make_optimizer, TrainState, Role
  testbeds    LanguageTestbed, TrainConfig, PolicyModel, NextTokenTestbed, NextTokenFns, ExhaustiveConfig,
              ThinkTestbed, ThinkFns, ThinkConfig, search_sequences
  the driver  Driver, RunConfig, prepare_run, RunError, stream_keys
  runs        Checkpointer, TensorBoardLogger, parse_flags, make_mesh (1-D data mesh)
  sharding    MeshConfig, param_shardings, train_state_shardings, shard_rows ((data, fsdp, tensor) mesh)
  statistics  interval, paired_difference

Names are imported on first use, so `import rlsoft` stays cheap (no orbax or tensorboardX until
a run needs them).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "rlsoft.weighting": ("compute_weights", "SCHEME_NAMES", "NEEDS_TAU", "make_tau_schedule"),
    "rlsoft.weight_stats": ("weight_stats", "summarize_weight_stats"),
    "rlsoft.losses": ("PolicyLossConfig", "policy_loss", "sft_loss", "token_log_probs", "token_entropy"),
    "rlsoft.rollout": ("SamplingConfig", "DecodeFns", "make_sampler"),
    "rlsoft.sampling": ("categorical",),
    "rlsoft.trainer": ("UpdateConfig", "make_update"),
    "rlsoft.optim": ("OptimizerConfig", "make_optimizer"),
    "rlsoft.roles": ("TrainState", "Role"),
    "rlsoft.train_loop": ("LanguageTestbed", "TrainConfig", "PolicyModel"),
    "rlsoft.exhaustive_loop": ("NextTokenTestbed", "NextTokenFns", "ExhaustiveConfig"),
    "rlsoft.think_loop": ("ThinkFns", "ThinkConfig"),
    "rlsoft.think_testbed": ("ThinkTestbed",),
    "rlsoft.thought_search": ("search_sequences",),
    "rlsoft.driver": ("Driver", "RunConfig", "stream_keys"),
    "rlsoft.run_dir": ("prepare_run", "RunError"),
    "rlsoft.stats": ("interval", "paired_difference"),
    "rlsoft.checkpoint": ("Checkpointer",),
    "rlsoft.logger": ("TensorBoardLogger",),
    "rlsoft.config": ("parse_flags",),
    "rlsoft.sharding": ("make_mesh",),
    "rlsoft.mesh": ("MeshConfig", "param_shardings", "train_state_shardings", "shard_rows"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rlsoft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

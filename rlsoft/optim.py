"""The one optimizer builder: every role's optax chain comes from an `OptimizerConfig`.

    tx = make_optimizer(cfg)                          # apply_if_finite(clip -> AdamW/Adam/SGD on a schedule)
    tx = make_optimizer(cfg, phases=((300, 3e-3),))   # a warm-start phase at its own rate first

The chain is wrapped in `apply_if_finite` (optax.apply_if_finite's rule and state): an update
whose gradients hold a NaN or an inf is replaced by zeros and the optimizer state is kept, so a
single bad batch cannot poison the parameters. Its running count of such steps,
`skipped_updates(opt_state)`, is what the trainers log as `train/skipped_updates`.

The learning rate may be a traced scalar (a compiled sweep vmaps over it): every transformation
here multiplies by it, nothing branches on it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from rlsoft.config import check, check_finite

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")
# apply_if_finite gives up after this many consecutive non-finite steps and applies them anyway;
# a run should never silently start applying NaNs, so the limit is out of reach.
_MAX_CONSECUTIVE_SKIPS = 2**30


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One role's optimizer. `schedule` shapes the rate after `warmup_steps` of linear warmup:
    constant, or a cosine / linear decay to `end_lr_fraction * learning_rate` over `decay_steps`."""

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 0
    end_lr_fraction: float = 0.0
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    weight_decay: float = 0.0  # adamw only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only; 0 is plain SGD

    def __post_init__(self):
        check(self.name in OPTIMIZERS, f"name={self.name!r} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} is invalid; need >= 0")
        check(self.schedule in LR_SCHEDULES,
              f"schedule={self.schedule!r} is unknown; allowed: {', '.join(LR_SCHEDULES)}")
        check(self.schedule == "constant" or self.decay_steps >= 1,
              f"decay_steps={self.decay_steps} is invalid; schedule={self.schedule} needs >= 1")
        check_finite(0 <= self.end_lr_fraction <= 1, "end_lr_fraction", self.end_lr_fraction, "0 <= value <= 1")
        check_finite(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a finite value >= 0 (0: off)")
        check_finite(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a finite value >= 0")
        for name in ("b1", "b2"):
            check_finite(0 <= getattr(self, name) < 1, name, getattr(self, name), "0 <= value < 1")
        check_finite(self.eps > 0, "eps", self.eps, "a finite value > 0")
        check_finite(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= value < 1")


def learning_rate_schedule(cfg: OptimizerConfig, phases: Sequence[tuple[int, float]] = ()) -> optax.Schedule:
    """The rate at each optimizer step: optional leading `phases` of (steps, rate), then `cfg`'s own.

    Every phase starts with its own linear warmup of `warmup_steps` (a new phase, e.g. RL after a
    supervised warm start, has gradients of a different scale). A constant schedule without warmup
    or phases is a plain float, so the rate can also be a traced value.
    """

    def phase(rate) -> optax.Schedule:
        if cfg.schedule == "cosine":
            main = optax.cosine_decay_schedule(rate, cfg.decay_steps, alpha=cfg.end_lr_fraction)
        elif cfg.schedule == "linear":
            main = optax.linear_schedule(rate, rate * cfg.end_lr_fraction, cfg.decay_steps)
        else:
            main = optax.constant_schedule(rate)
        if cfg.warmup_steps == 0:
            return main
        return optax.join_schedules([optax.linear_schedule(0.0, rate, cfg.warmup_steps), main],
                                    [cfg.warmup_steps])

    if not phases and cfg.warmup_steps == 0 and cfg.schedule == "constant":
        return cfg.learning_rate
    schedules, boundaries, at = [], [], 0
    for steps, rate in phases:
        if steps <= 0:
            continue
        schedules.append(phase(rate))
        at += int(steps)
        boundaries.append(at)
    schedules.append(phase(cfg.learning_rate))
    return optax.join_schedules(schedules, boundaries) if boundaries else schedules[0]


def make_optimizer(cfg: OptimizerConfig, phases: Sequence[tuple[int, float]] = (),
                   learning_rate: Any = None) -> optax.GradientTransformation:
    """apply_if_finite(clip_by_global_norm -> AdamW | Adam | SGD on `learning_rate_schedule`).

    `learning_rate` (e.g. a traced sweep value) replaces the schedule when given.
    """
    rate = learning_rate_schedule(cfg, phases) if learning_rate is None else learning_rate
    if cfg.name == "adamw":
        inner = optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        inner = optax.adam(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        inner = optax.sgd(rate, momentum=cfg.momentum or None)
    chain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner) if cfg.grad_clip > 0 else inner
    return apply_if_finite(chain, max_consecutive_errors=_MAX_CONSECUTIVE_SKIPS)


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int) -> optax.GradientTransformationExtraArgs:
    """`optax.apply_if_finite` (its state, updates and counts), with one addition: the caller may
    pass the verdict, `update(grads, state, params, all_finite=flag)`, where `flag` must equal
    all(isfinite(grads)). Without it the verdict is reduced from the gradients as optax does.

    Why: optax reduces isfinite over every gradient entry on every step. A caller that knows the
    verdict more cheaply saves that pass: the bandit sweep reads G entries of its [K] gradient
    (`bandit_sweep.grads_all_finite`), where a full pass was ~8% of a step of its tiny policy.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32),
                                        last_finite=jnp.array(True, jnp.bool_),
                                        total_notfinite=jnp.zeros([], jnp.int32),
                                        inner_state=inner.init(params))

    def update(updates, state, params=None, all_finite=None, **extra_args):
        if all_finite is None:
            all_finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(updates)]))
        all_finite = jnp.asarray(all_finite, jnp.bool_)
        notfinite_count = jnp.where(all_finite, jnp.zeros([], jnp.int32),
                                    optax.safe_increment(state.notfinite_count))
        # A real branch where the step runs once; under vmap (a sweep) a select over both.
        updates, inner_state = jax.lax.cond(
            jnp.logical_or(all_finite, notfinite_count > max_consecutive_errors),
            lambda _: inner.update(updates, state.inner_state, params, **extra_args),
            lambda _: (optax.tree.zeros_like(updates), state.inner_state),
            operand=None)
        total = jnp.where(all_finite, state.total_notfinite, optax.safe_increment(state.total_notfinite))
        return updates, optax.ApplyIfFiniteState(notfinite_count=notfinite_count, last_finite=all_finite,
                                                 total_notfinite=total, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def skipped_updates(opt_state: Any) -> jax.Array:
    """Updates skipped so far for a non-finite gradient (int32), from apply_if_finite's state."""
    return jnp.asarray(opt_state.total_notfinite, jnp.int32)

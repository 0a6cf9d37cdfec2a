"""Tau schedules: step -> tau, as optax-style callables (jit- and scan-safe)."""
from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import optax

TAU_SCHEDULES = ("constant", "linear", "cosine")


def make_tau_schedule(
    kind: str, tau0: float, tau1: float | None = None, steps: int | None = None
) -> Callable[[int], jnp.ndarray]:
    """`constant`: tau0.  `linear` / `cosine`: anneal tau0 -> tau1 over `steps`, then hold tau1.

    cosine: tau(t) = tau1 + (tau0 - tau1) * (1 + cos(pi * t / steps)) / 2 (optax's cosine decay).
    """
    if kind not in TAU_SCHEDULES:
        raise ValueError(f"tau schedule={kind!r} is unknown; allowed: {', '.join(TAU_SCHEDULES)}")
    for name, value in (("tau", tau0), ("tau_end", tau1)):
        if value is not None and (not math.isfinite(float(value)) or float(value) <= 0):
            raise ValueError(f"{name}={value!r} is invalid; allowed: a finite float > 0")
    if kind == "constant":
        return optax.constant_schedule(float(tau0))
    if tau1 is None:
        raise ValueError(f"tau schedule={kind!r} needs tau_end")
    if steps is None or int(steps) < 1:
        raise ValueError(f"tau schedule={kind!r} needs steps >= 1; got {steps!r}")
    if kind == "linear":
        return optax.linear_schedule(float(tau0), float(tau1), int(steps))
    return optax.cosine_decay_schedule(float(tau0), int(steps), alpha=float(tau1) / float(tau0))

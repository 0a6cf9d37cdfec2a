"""Training-health monitors for RL from random weights: calibration error, confidence collapse, gradient stability.

Seed 002 ("a health monitor to my strategy") adds three warning metrics:
  * calibration error: is confidence matching accuracy?
  * confidence collapse: is the model becoming overconfident and ignoring exploration?
  * gradient stability: are the updates smooth and not wild?

Each training step contributes one record (`step_metrics`): the batch's mean confidence
conf_t = mean_b max_c p(c | x_b), its accuracy acc_t = mean_b 1[argmax_c p(c | x_b) == y_b], and
the global gradient norm g_t. The state keeps the last W records in fixed-size ring buffers
(a NamedTuple of jnp arrays, so `update` and `summarize` are pure and jittable, e.g. inside a
compiled train step or a lax.scan). Over the n = min(steps, W) most recent records:

    calibration_error = |mean_t conf_t - mean_t acc_t|        (the global calibration gap; with
                                                               equal batch sizes it is the gap over
                                                               all predictions of the window)
    collapse_share    = (1/n) sum_t 1[conf_t > collapse_confidence]
    grad_norm_var     = (1/m) sum_t (g_t - gbar)^2             (population variance)
    grad_norm_slope   = sum_t (t - tbar)(g_t - gbar) / sum_t (t - tbar)^2   (least squares, per step)
    grad_norm_cv      = sqrt(grad_norm_var) / gbar             (scale-free spread)
    grad_norm_rel_slope = grad_norm_slope / gbar               (scale-free trend: fraction per step)

The gradient statistics use the m finite g_t of the window only; `grad_nonfinite` counts the
others. Undefined statistics (empty window, m < 2 for the slope) are NaN, which
`TensorBoardLogger.scalars` skips and which never triggers a warning.

`report(state)` gives plain floats for TensorBoard; `warnings(report, cfg)` gives one-line
console warnings, each firing exactly when its statistic is strictly above its threshold and the
window holds at least `cfg.min_steps` records.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from rlsoft.config import check


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Window and warning thresholds (a warning fires when a statistic is > its threshold)."""

    window: int = 50  # W, steps kept
    min_steps: int = 10  # no warnings before the window holds this many steps
    collapse_confidence: float = 0.8  # a step "collapsed" when its mean confidence > this (a confident policy stops exploring)
    max_collapse_share: float = 0.5
    max_calibration_error: float = 0.1
    max_grad_cv: float = 0.5
    max_grad_rel_slope: float = 0.02  # +2 % of the mean grad norm per step
    max_grad_var: float = math.inf  # absolute thresholds: off by default (scale-dependent)
    max_grad_slope: float = math.inf
    max_grad_nonfinite: int = 0

    def __post_init__(self):
        check(isinstance(self.window, int) and self.window >= 2, f"window={self.window!r} is invalid; need an integer >= 2")
        check(isinstance(self.min_steps, int) and 1 <= self.min_steps <= self.window,
              f"min_steps={self.min_steps!r} is invalid; need 1 <= min_steps <= window={self.window}")
        check(0 <= self.collapse_confidence < 1,
              f"collapse_confidence={self.collapse_confidence} is invalid; need 0 <= value < 1")
        for name in ("max_collapse_share", "max_calibration_error", "max_grad_cv", "max_grad_rel_slope",
                     "max_grad_var", "max_grad_slope", "max_grad_nonfinite"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not math.isnan(value) and value >= 0,
                  f"{name}={value!r} is invalid; need a number >= 0 (inf turns the warning off)")


class MonitorState(NamedTuple):
    """Ring buffers of the last W steps; slot count % W is written next."""

    confidence: jax.Array  # [W] float32 mean max-probability of each step's batch
    accuracy: jax.Array  # [W] float32 mean argmax == target of each step's batch
    grad_norm: jax.Array  # [W] float32
    count: jax.Array  # [] int32, steps recorded so far
    collapse_confidence: jax.Array  # [] float32, copied from the config by `init`


METRIC_KEYS = ("confidence", "accuracy", "grad_norm")


def init(cfg: MonitorConfig) -> MonitorState:
    zeros = jnp.zeros((cfg.window,), jnp.float32)
    return MonitorState(zeros, zeros, zeros, jnp.zeros((), jnp.int32),
                        jnp.asarray(cfg.collapse_confidence, jnp.float32))


# --------------------------------------------------------------------------------------------
# Per-step inputs.


def prediction_confidence(logits: chex.Array, target: chex.Array) -> tuple[chex.Array, chex.Array]:
    """(max_c p(c), 1[argmax_c p(c) == target]) of ONE prediction; logits or log-probs [V], target []."""
    chex.assert_rank([logits, target], [1, 0])
    p = jax.nn.softmax(logits.astype(jnp.float32))
    return jnp.max(p), (jnp.argmax(p) == target).astype(jnp.float32)


def step_metrics(logits, targets, grad_norm) -> dict[str, jax.Array]:
    """One step's record: logits [B, V], targets [B], grad_norm [] -> the dict `update` takes."""
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} are invalid; need [B, V] and [B]")
    conf, correct = jax.vmap(prediction_confidence)(logits, targets)
    return {"confidence": jnp.mean(conf), "accuracy": jnp.mean(correct),
            "grad_norm": jnp.asarray(grad_norm, jnp.float32)}


def update(state: MonitorState, metrics: Mapping[str, chex.Array]) -> MonitorState:
    """Record one step: `metrics` has scalar "confidence", "accuracy" and "grad_norm". Pure, jittable."""
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {', '.join(missing)}; need {', '.join(METRIC_KEYS)}")
    values = [jnp.asarray(metrics[k], jnp.float32) for k in METRIC_KEYS]
    chex.assert_rank(values, 0)
    slot = state.count % state.confidence.shape[0]
    buffers = [buf.at[slot].set(v) for buf, v in zip(state[:3], values)]
    return MonitorState(*buffers, state.count + 1, state.collapse_confidence)


# --------------------------------------------------------------------------------------------
# Statistics of the window.


def _ages(state: MonitorState) -> tuple[jax.Array, jax.Array]:
    """Age of each slot (0 = newest) and whether it holds one of the last min(count, W) steps."""
    w = state.confidence.shape[0]
    newest = (state.count - 1) % w
    age = (newest - jnp.arange(w)) % w
    return age, age < jnp.minimum(state.count, w)


def _masked_mean(x, mask, n):
    return jnp.where(n > 0, jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1), jnp.nan)


def summarize(state: MonitorState) -> dict[str, jax.Array]:
    """The window's statistics (module docstring) as jnp scalars. Pure, jittable."""
    age, valid = _ages(state)
    n = jnp.sum(valid).astype(jnp.float32)
    conf = _masked_mean(state.confidence, valid, n)
    acc = _masked_mean(state.accuracy, valid, n)
    collapsed = (state.confidence > state.collapse_confidence).astype(jnp.float32)

    g_ok = valid & jnp.isfinite(state.grad_norm)
    m = jnp.sum(g_ok).astype(jnp.float32)
    g = jnp.where(g_ok, state.grad_norm, 0.0)
    g_mean = _masked_mean(g, g_ok, m)
    dg = jnp.where(g_ok, g - g_mean, 0.0)
    g_var = _masked_mean(dg * dg, g_ok, m)
    t = -age.astype(jnp.float32)  # step index relative to the newest step; small, exact in float32
    t_mean = _masked_mean(t, g_ok, m)
    dt = jnp.where(g_ok, t - t_mean, 0.0)
    sxx = jnp.sum(dt * dt)
    slope = jnp.where((m >= 2) & (sxx > 0), jnp.sum(dt * dg) / jnp.where(sxx > 0, sxx, 1.0), jnp.nan)
    return {
        "steps_in_window": n,
        "mean_confidence": conf,
        "accuracy": acc,
        "calibration_error": jnp.abs(conf - acc),
        "collapse_share": _masked_mean(collapsed, valid, n),
        "grad_norm_mean": g_mean,
        "grad_norm_var": g_var,
        "grad_norm_slope": slope,
        "grad_norm_cv": jnp.sqrt(g_var) / g_mean,
        "grad_norm_rel_slope": slope / g_mean,
        "grad_nonfinite": n - m,
    }


def report(state: MonitorState) -> dict[str, float]:
    """`summarize` as plain Python floats (for TensorBoard; NaN where undefined)."""
    return {k: float(v) for k, v in jax.device_get(summarize(state)).items()}


def warnings(rep: Mapping[str, float], cfg: MonitorConfig) -> list[str]:
    """One-line warnings for the statistics of `report` that are strictly above their thresholds."""
    n = int(rep["steps_in_window"])
    if n < cfg.min_steps:
        return []
    last = f"the last {n} steps"
    out = []
    if rep["calibration_error"] > cfg.max_calibration_error:
        out.append(f"calibration error: |confidence {rep['mean_confidence']:.3f} - accuracy {rep['accuracy']:.3f}| = "
                   f"{rep['calibration_error']:.3f} over {last} (threshold {cfg.max_calibration_error:g})")
    if rep["collapse_share"] > cfg.max_collapse_share:
        out.append(f"confidence collapse: {rep['collapse_share']:.0%} of {last} had confidence > "
                   f"{cfg.collapse_confidence:g} (threshold {cfg.max_collapse_share:.0%})")
    if rep["grad_norm_cv"] > cfg.max_grad_cv:
        out.append(f"gradient instability: grad-norm std/mean = {rep['grad_norm_cv']:.3f} over {last} "
                   f"(threshold {cfg.max_grad_cv:g})")
    if rep["grad_norm_rel_slope"] > cfg.max_grad_rel_slope:
        out.append(f"gradient growth: grad norm rising {rep['grad_norm_rel_slope']:.2%} of its mean per step "
                   f"over {last} (threshold {cfg.max_grad_rel_slope:.2%})")
    if rep["grad_norm_var"] > cfg.max_grad_var:
        out.append(f"gradient variance: {rep['grad_norm_var']:.4g} over {last} (threshold {cfg.max_grad_var:g})")
    if rep["grad_norm_slope"] > cfg.max_grad_slope:
        out.append(f"gradient trend: grad norm slope {rep['grad_norm_slope']:.4g} per step over {last} "
                   f"(threshold {cfg.max_grad_slope:g})")
    if rep["grad_nonfinite"] > cfg.max_grad_nonfinite:
        out.append(f"non-finite gradients: {int(rep['grad_nonfinite'])} of {last} had a NaN/inf grad norm "
                   f"(threshold {cfg.max_grad_nonfinite})")
    return out

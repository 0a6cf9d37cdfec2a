"""Standard errors of held-out success rates over problems, and their 95% normal intervals.

One eval scores n held-out problems. Per problem it has the greedy outcome s_i in {0, 1} and, with
k samples at temperature 1, the mean sampled success m_i in {0, 1/k, ..., 1} (mean@k).

    greedy success   p = mean(s),  SE = sqrt(p (1 - p) / n)              (binomial, plug-in)
    mean@k           m = mean(m_i), SE = std(m_i, ddof=1) / sqrt(n)      (SE of the per-problem means)
    paired change    d = mean(a_i - b_i) over the SAME problems, SE = std(a_i - b_i, ddof=1) / sqrt(n)

The intervals are estimate +- 1.96 SE. They measure the eval's sampling noise over problems (and
over the k draws), for one trained model: a run's seed noise (init, training samples) is not in
them; compare schemes over seeds (rlsoft.stats).
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.96


def _values(x, name: str) -> np.ndarray:
    v = np.asarray(x, np.float64).reshape(-1)
    if v.size and not np.all(np.isfinite(v)):
        raise ValueError(f"{name} holds non-finite values")
    return v


def binomial_se(outcomes) -> float:
    """sqrt(p (1 - p) / n) of 0/1 outcomes (one per problem); nan for none."""
    s = _values(outcomes, "outcomes")
    if not np.all((s == 0) | (s == 1)):
        raise ValueError("outcomes must be 0 or 1 (one per problem)")
    if not s.size:
        return math.nan
    p = float(s.mean())
    return math.sqrt(p * (1 - p) / s.size)


def mean_se(values) -> float:
    """The standard error of the mean of per-problem values: std (ddof 1) / sqrt(n); nan for n < 2."""
    v = _values(values, "values")
    return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size >= 2 else math.nan


def interval(estimate: float, se: float) -> tuple[float, float]:
    """(low, high) = estimate -+ 1.96 SE."""
    return estimate - Z95 * se, estimate + Z95 * se


def paired(after, before) -> tuple[float, float]:
    """(mean(after - before), its SE) over the same problems, in the same order."""
    a, b = _values(after, "after"), _values(before, "before")
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same problems; got {a.size} and {b.size}")
    d = a - b
    return (float(d.mean()) if d.size else math.nan), mean_se(d)


def summarize(outcomes: dict) -> dict[str, float]:
    """Per-problem outcomes {"success": s, "mean_at_k": m (optional), other greedy scores} ->
    "eval/" metrics: every mean, plus success_se (binomial) and mean_at_k_se."""
    out = {f"eval/{k}": float(np.mean(v)) if len(v) else math.nan for k, v in outcomes.items()}
    out["eval/success_se"] = binomial_se(outcomes["success"])
    if "mean_at_k" in outcomes:
        out["eval/mean_at_k_se"] = mean_se(outcomes["mean_at_k"])
    return out


def format_interval(estimate: float, se: float, signed: bool = False) -> str:
    """`0.231 [0.205, 0.257]` (estimate and its 95% interval); signed: `+0.149 [+0.128, +0.170]`."""
    def num(x: float) -> str:  # no "-0.000" for a bound that rounds to zero
        return ("{:+.3f}" if signed else "{:.3f}").format(0.0 if abs(x) < 5e-4 else x)

    if math.isnan(se):
        return num(estimate) + " [n/a]"
    low, high = interval(estimate, se)
    return f"{num(estimate)} [{num(low)}, {num(high)}]"

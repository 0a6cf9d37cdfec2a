"""Statistics for results tables: a score over seeds as a point estimate with a bootstrap 95% CI.

A claim about a scheme is a comparison over >= 5 seeds with 95% confidence intervals (Agarwal et
al. 2021, "Deep RL at the edge of the statistical precipice"; their library `rliable`). Scores are
arranged [runs, tasks] as rliable expects; a single task is [runs, 1].

    summary = interval(scores)                       # mean and its percentile-bootstrap 95% CI
    summary = interval(scores, aggregate="iqm")      # interquartile mean (rliable's IQM)
    diff = paired_difference(a, b)                   # mean(a - b) over shared seeds, with its CI

The bootstrap resamples runs (seeds) with replacement, stratified per task (rliable's
`StratifiedBootstrap`), `reps` times, from a fixed seed so a table is reproducible.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

AGGREGATES = ("mean", "iqm", "median")


class Interval(NamedTuple):
    estimate: float
    low: float
    high: float
    runs: int

    def format(self, digits: int = 3) -> str:
        """`0.912 [0.871, 0.950]` (n = runs is reported by the table, not here)."""
        if math.isnan(self.estimate):
            return "n/a"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


class _seeded_numpy:
    """rliable's bootstraps draw their indices from NumPy's GLOBAL generator (`np.random.choice` in
    `StratifiedBootstrap.update_indices`; the `random_state` it accepts is not used for them), so
    a table would change on every rebuild. Seed the global generator for the call, then restore it."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = np.random.get_state()
        np.random.seed(self.seed)

    def __exit__(self, *exc):
        np.random.set_state(self.saved)


def _aggregate(name: str):
    from rliable import metrics

    fn = {"mean": metrics.aggregate_mean, "iqm": metrics.aggregate_iqm, "median": metrics.aggregate_median}[name]
    return lambda scores: np.array([fn(scores)])


def _scores(scores) -> np.ndarray:
    x = np.asarray(scores, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"scores of shape {x.shape} are invalid; need [runs] or [runs, tasks]")
    return x


def interval(scores, aggregate: str = "mean", confidence: float = 0.95, reps: int = 2000, seed: int = 0) -> Interval:
    """Point estimate and percentile-bootstrap CI of `aggregate` over runs; NaN scores are refused."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is unknown; allowed: {', '.join(AGGREGATES)}")
    x = _scores(scores)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{int(np.sum(~np.isfinite(x)))} scores are not finite; report them, do not average them")
    if x.shape[0] < 2:
        v = float(_aggregate(aggregate)(x)[0]) if x.size else math.nan
        return Interval(v, math.nan, math.nan, x.shape[0])
    from rliable import library as rly

    with warnings.catch_warnings(), _seeded_numpy(seed):  # arch's notice: random_state is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates({"x": x}, _aggregate(aggregate), reps=reps,
                                               confidence_interval_size=confidence,
                                               random_state=np.random.RandomState(seed))
    return Interval(float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0]), x.shape[0])


def paired_difference(a, b, confidence: float = 0.95, reps: int = 2000, seed: int = 0) -> Interval:
    """mean(a - b) over the SAME seeds (arms run on shared seeds), with the bootstrap CI of the
    paired differences: tighter than comparing two independent intervals."""
    a, b = _scores(a), _scores(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one shape; got {a.shape} and {b.shape}")
    return interval(a - b, "mean", confidence, reps, seed)


def probability_of_improvement(a, b, confidence: float = 0.95, reps: int = 2000, seed: int = 0) -> Interval:
    """P(X > Y): the probability that a run of arm A scores above a run of arm B (ties count 1/2),
    the Mann-Whitney U statistic / (n_a n_b), averaged over tasks (rliable's
    `probability_of_improvement`, Agarwal et al. 2021), with the stratified-bootstrap CI that
    resamples each arm's runs independently. 0.5 = no difference; it ignores effect size."""
    a, b = _scores(a), _scores(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scores need the same tasks; got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores are not finite; report them, do not compare them")
    from rliable import library as rly
    from rliable import metrics

    poi = lambda x, y: np.array([metrics.probability_of_improvement(x, y)])
    if min(a.shape[0], b.shape[0]) < 2:
        return Interval(float(poi(a, b)[0]), math.nan, math.nan, min(a.shape[0], b.shape[0]))
    with warnings.catch_warnings(), _seeded_numpy(seed):
        warnings.simplefilter("ignore", FutureWarning)
        point, ci = rly.get_interval_estimates({"x": (a, b)}, poi, reps=reps, confidence_interval_size=confidence,
                                               random_state=np.random.RandomState(seed))
    return Interval(float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0]), min(a.shape[0], b.shape[0]))


def bootstrap_band(curves, confidence: float = 0.95, reps: int = 1000, seed: int = 0):
    """Learning-curve bands: `curves` [runs, points] -> (mean, low, high), each [points], the
    percentile bootstrap of the mean over runs at every point (runs resampled jointly across
    points, so a band is one bootstrap of whole curves). One run gives low = high = the curve."""
    x = np.asarray(curves, np.float64)
    if x.ndim != 2:
        raise ValueError(f"curves of shape {x.shape} are invalid; need [runs, points]")
    mean = x.mean(0)
    if x.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    idx = np.random.RandomState(seed).randint(0, x.shape[0], size=(reps, x.shape[0]))
    boot = x[idx].mean(1)  # [reps, points]
    tail = 100 * (1 - confidence) / 2
    return mean, np.percentile(boot, tail, axis=0), np.percentile(boot, 100 - tail, axis=0)

"""rlsoft.stats: bootstrap intervals over seeds (rliable)."""
import math

import numpy as np
import pytest

from rlsoft import stats


def test_interval_covers_the_mean_and_shrinks_with_more_runs():
    rng = np.random.default_rng(0)
    few = stats.interval(rng.normal(0.5, 0.1, 5))
    many = stats.interval(rng.normal(0.5, 0.1, 200))
    for s in (few, many):
        assert s.low <= s.estimate <= s.high
    assert many.high - many.low < few.high - few.low
    assert many.low < 0.5 < many.high
    assert few.runs == 5 and many.runs == 200


def test_interval_is_the_percentile_bootstrap_of_the_mean():
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.6, 0.55])
    s = stats.interval(x, reps=4000, seed=1)
    assert s.estimate == pytest.approx(x.mean())
    rng = np.random.default_rng(1)
    boot = np.array([rng.choice(x, len(x)).mean() for _ in range(4000)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert s.low == pytest.approx(lo, abs=0.03) and s.high == pytest.approx(hi, abs=0.03)


def test_iqm_ignores_the_outer_quartiles():
    x = np.array([0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 100.0])
    assert stats.interval(x, "iqm").estimate == pytest.approx(0.5)


def test_paired_difference_uses_shared_seeds():
    a = np.array([0.50, 0.61, 0.42, 0.70, 0.55])
    d = stats.paired_difference(a + 0.1, a)
    assert d.estimate == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_difference(a, a[:3])


def test_single_run_has_no_interval_and_nan_is_refused():
    s = stats.interval([0.7])
    assert s.estimate == 0.7 and math.isnan(s.low) and math.isnan(s.high)
    with pytest.raises(ValueError, match="not finite"):
        stats.interval([0.1, float("nan"), 0.3])
    assert stats.interval([0.25, 0.75]).format(2).startswith("0.50 [")


def test_probability_of_improvement_counts_pairs_and_ties():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 5.0])
    # pairs with a > b: 1>0 twice, 2>0 twice, 3>0 twice = 6 of 9; none tied.
    p = stats.probability_of_improvement(a, b, reps=500)
    assert p.estimate == pytest.approx(6 / 9) and p.low <= p.estimate <= p.high
    tie = stats.probability_of_improvement(np.array([1.0, 2.0]), np.array([1.0, 0.0]), reps=500)
    assert tie.estimate == pytest.approx((0.5 + 1 + 1 + 1) / 4)  # (1 vs 1) is a tie: 1/2
    assert stats.probability_of_improvement(a, a, reps=200).estimate == 0.5
    with pytest.raises(ValueError, match="not finite"):
        stats.probability_of_improvement(a, np.array([0.0, np.inf, 1.0]))


def test_bootstrap_band_is_the_bootstrap_of_whole_curves():
    rng = np.random.default_rng(0)
    curves = rng.normal(0, 1, (6, 4)) + np.arange(4)
    mean, low, high = stats.bootstrap_band(curves, reps=4000, seed=3)
    np.testing.assert_allclose(mean, curves.mean(0))
    for j in range(4):  # each point's band is the percentile bootstrap of that point's mean
        boot = np.array([rng.choice(curves[:, j], 6).mean() for _ in range(4000)])
        lo, hi = np.percentile(boot, [2.5, 97.5])
        assert low[j] == pytest.approx(lo, abs=0.06) and high[j] == pytest.approx(hi, abs=0.06)
    one = stats.bootstrap_band(curves[:1])
    np.testing.assert_array_equal(one[1], curves[0])


def test_intervals_are_reproducible_and_leave_numpy_global_state_alone():
    x = np.random.RandomState(0).rand(20)
    y = np.random.RandomState(1).rand(20)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert stats.interval(x) == stats.interval(x)  # rliable draws from NumPy's global generator
    assert stats.interval(x, seed=1) != stats.interval(x, seed=2)
    assert stats.probability_of_improvement(x, y) == stats.probability_of_improvement(x, y)
    np.testing.assert_array_equal(np.random.get_state()[1], before)

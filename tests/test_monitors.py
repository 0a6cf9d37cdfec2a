"""Health monitors (rlsoft.monitors) on short synthetic sequences, against numpy and hand values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft import monitors as mon


_update = jax.jit(mon.update)


def _feed(cfg, confidence, accuracy, grad_norm, state=None):
    state = mon.init(cfg) if state is None else state
    for c, a, g in zip(confidence, accuracy, grad_norm):
        state = _update(state, {"confidence": np.float32(c), "accuracy": np.float32(a), "grad_norm": np.float32(g)})
    return state


def _batch(max_prob, n_correct, batch=10, vocab=4):
    """logits [batch, V] whose argmax (id 0) has probability max_prob; n_correct rows target it."""
    rest = (1.0 - max_prob) / (vocab - 1)
    probs = np.full((batch, vocab), rest)
    probs[:, 0] = max_prob
    targets = np.where(np.arange(batch) < n_correct, 0, 1)
    return np.log(probs).astype(np.float32), targets


# --------------------------------------------------------------------------------------------
# Calibration and collapse.


def test_step_metrics_confidence_and_accuracy():
    logits, targets = _batch(0.7, 7)
    m = mon.step_metrics(logits, targets, 1.5)
    assert float(m["confidence"]) == pytest.approx(0.7, abs=1e-6)
    assert float(m["accuracy"]) == pytest.approx(0.7)
    assert float(m["grad_norm"]) == 1.5


@pytest.mark.parametrize("max_prob, n_correct, expected", [(0.7, 7, 0.0), (0.95, 6, 0.35), (0.4, 9, 0.5)])
def test_calibration_error_calibrated_vs_over_and_under_confident(max_prob, n_correct, expected):
    cfg = mon.MonitorConfig(window=20, min_steps=5)
    state = mon.init(cfg)
    for _ in range(12):
        state = mon.update(state, mon.step_metrics(*_batch(max_prob, n_correct), 1.0))
    rep = mon.report(state)
    assert rep["calibration_error"] == pytest.approx(expected, abs=1e-6)
    fired = [w for w in mon.warnings(rep, cfg) if w.startswith("calibration error")]
    assert bool(fired) == (expected > cfg.max_calibration_error)


def test_overconfident_predictor_warns_of_collapse_calibrated_does_not():
    cfg = mon.MonitorConfig(window=10, min_steps=5)
    over = mon.init(cfg)
    calibrated = mon.init(cfg)
    for _ in range(10):
        over = mon.update(over, mon.step_metrics(*_batch(0.95, 6), 1.0))
        calibrated = mon.update(calibrated, mon.step_metrics(*_batch(0.7, 7), 1.0))
    assert mon.warnings(mon.report(calibrated), cfg) == []
    warns = mon.warnings(mon.report(over), cfg)
    assert [w.split(":")[0] for w in warns] == ["calibration error", "confidence collapse"]
    assert warns[1] == "confidence collapse: 100% of the last 10 steps had confidence > 0.8 (threshold 50%)"


def test_collapse_share_counts_strictly_above_level():
    cfg = mon.MonitorConfig(window=8, min_steps=2, collapse_confidence=0.8)
    conf = [0.9, 0.5, 0.85, 0.81, 0.8, 0.2]  # 0.8 itself does not count
    rep = mon.report(_feed(cfg, conf, [0.5] * 6, [1.0] * 6))
    assert rep["collapse_share"] == pytest.approx(3 / 6)
    assert rep["mean_confidence"] == pytest.approx(np.mean(conf), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Gradient stability.


def test_linear_ramp_slope_and_variance():
    cfg = mon.MonitorConfig(window=16, min_steps=2)
    g = 2.0 + 0.5 * np.arange(10)
    rep = mon.report(_feed(cfg, [0.5] * 10, [0.5] * 10, g))
    assert rep["grad_norm_slope"] == pytest.approx(0.5, rel=1e-6)
    assert rep["grad_norm_var"] == pytest.approx(np.var(g), rel=1e-6)  # 0.25 * (100 - 1) / 12
    assert rep["grad_norm_var"] == pytest.approx(0.25 * 99 / 12, rel=1e-6)
    assert rep["grad_norm_mean"] == pytest.approx(np.mean(g))
    assert rep["grad_norm_rel_slope"] == pytest.approx(0.5 / np.mean(g), rel=1e-6)
    assert rep["grad_norm_cv"] == pytest.approx(np.std(g) / np.mean(g), rel=1e-6)


def test_noisy_grad_norms_match_numpy_polyfit():
    cfg = mon.MonitorConfig(window=30, min_steps=2)
    g = np.random.default_rng(0).gamma(2.0, 1.0, size=30).astype(np.float32)
    rep = mon.report(_feed(cfg, [0.5] * 30, [0.5] * 30, g))
    slope = np.polyfit(np.arange(30), g.astype(np.float64), 1)[0]
    assert rep["grad_norm_slope"] == pytest.approx(slope, rel=1e-4, abs=1e-6)
    assert rep["grad_norm_var"] == pytest.approx(np.var(g.astype(np.float64)), rel=1e-5)


def test_nonfinite_grad_norms_are_counted_and_left_out():
    cfg = mon.MonitorConfig(window=8, min_steps=2)
    g = [1.0, 2.0, math.nan, 3.0, math.inf, 4.0]  # finite ones at steps 0, 1, 3, 5
    rep = mon.report(_feed(cfg, [0.5] * 6, [0.5] * 6, g))
    assert rep["grad_nonfinite"] == 2
    t, y = np.array([0, 1, 3, 5]), np.array([1.0, 2.0, 3.0, 4.0])
    assert rep["grad_norm_slope"] == pytest.approx(np.polyfit(t, y, 1)[0], rel=1e-6)
    assert rep["grad_norm_var"] == pytest.approx(np.var(y), rel=1e-6)
    warns = mon.warnings(rep, cfg)
    assert any(w.startswith("non-finite gradients: 2 of the last 6 steps") for w in warns)


def test_constant_grad_norm_is_stable():
    cfg = mon.MonitorConfig(window=8, min_steps=2)
    rep = mon.report(_feed(cfg, [0.5] * 8, [0.5] * 8, [1.25] * 8))
    assert rep["grad_norm_var"] == 0.0 and rep["grad_norm_slope"] == 0.0 and rep["grad_norm_cv"] == 0.0
    assert mon.warnings(rep, cfg) == []


# --------------------------------------------------------------------------------------------
# Window semantics.


def test_only_the_last_w_steps_count():
    cfg = mon.MonitorConfig(window=7, min_steps=2)
    rng = np.random.default_rng(1)
    n = 7 * 3 + 4  # wraps the ring three times and a bit
    conf, acc = rng.uniform(size=n).astype(np.float32), rng.uniform(size=n).astype(np.float32)
    g = (3.0 - 0.1 * np.arange(n) + rng.normal(0, 0.05, n)).astype(np.float32)
    rep = mon.report(_feed(cfg, conf, acc, g))
    last = slice(n - 7, n)
    fresh = mon.report(_feed(cfg, conf[last], acc[last], g[last]))
    for k, v in fresh.items():
        assert rep[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert rep["steps_in_window"] == 7
    assert rep["mean_confidence"] == pytest.approx(np.mean(conf[last]), rel=1e-6)
    assert rep["calibration_error"] == pytest.approx(abs(np.mean(conf[last]) - np.mean(acc[last])), abs=1e-6)
    assert rep["collapse_share"] == pytest.approx(np.mean(conf[last] > 0.8))
    assert rep["grad_norm_slope"] == pytest.approx(np.polyfit(np.arange(7), g[last].astype(np.float64), 1)[0],
                                                   rel=1e-4)


def test_old_collapse_leaves_the_window():
    cfg = mon.MonitorConfig(window=5, min_steps=5)
    state = _feed(cfg, [0.99] * 5, [0.99] * 5, [1.0] * 5)
    assert any(w.startswith("confidence collapse") for w in mon.warnings(mon.report(state), cfg))
    state = _feed(cfg, [0.3] * 5, [0.3] * 5, [1.0] * 5, state)
    assert mon.report(state)["collapse_share"] == 0.0
    assert mon.warnings(mon.report(state), cfg) == []


def test_empty_and_short_windows():
    cfg = mon.MonitorConfig(window=6, min_steps=3)
    rep = mon.report(mon.init(cfg))
    assert rep["steps_in_window"] == 0
    assert all(math.isnan(v) for k, v in rep.items() if k not in ("steps_in_window", "grad_nonfinite"))
    assert mon.warnings(rep, cfg) == []
    rep = mon.report(_feed(cfg, [0.99], [0.0], [5.0]))
    assert math.isnan(rep["grad_norm_slope"]) and rep["grad_norm_var"] == 0.0
    assert mon.warnings(rep, cfg) == []  # below min_steps


# --------------------------------------------------------------------------------------------
# Warnings fire exactly when thresholds are crossed.

BASE = {"steps_in_window": 50.0, "mean_confidence": 0.5, "accuracy": 0.5, "calibration_error": 0.0,
        "collapse_share": 0.0, "grad_norm_mean": 1.0, "grad_norm_var": 0.0, "grad_norm_slope": 0.0,
        "grad_norm_cv": 0.0, "grad_norm_rel_slope": 0.0, "grad_nonfinite": 0.0}
THRESHOLDS = [  # report key, config field, warning prefix
    ("calibration_error", "max_calibration_error", "calibration error"),
    ("collapse_share", "max_collapse_share", "confidence collapse"),
    ("grad_norm_cv", "max_grad_cv", "gradient instability"),
    ("grad_norm_rel_slope", "max_grad_rel_slope", "gradient growth"),
    ("grad_norm_var", "max_grad_var", "gradient variance"),
    ("grad_norm_slope", "max_grad_slope", "gradient trend"),
    ("grad_nonfinite", "max_grad_nonfinite", "non-finite gradients"),
]


@pytest.mark.parametrize("key, field, prefix", THRESHOLDS)
def test_each_warning_fires_exactly_above_its_threshold(key, field, prefix):
    cfg = mon.MonitorConfig(max_grad_var=0.5, max_grad_slope=0.1)
    limit = getattr(cfg, field)
    assert mon.warnings(BASE, cfg) == []
    assert mon.warnings({**BASE, key: limit}, cfg) == []  # at the threshold: quiet
    above = limit + 1 if key == "grad_nonfinite" else np.nextafter(limit, np.inf)
    warns = mon.warnings({**BASE, key: above}, cfg)
    assert len(warns) == 1 and warns[0].startswith(prefix + ":") and "\n" not in warns[0]
    assert "the last 50 steps" in warns[0]
    assert mon.warnings({**BASE, key: above, "steps_in_window": cfg.min_steps - 1}, cfg) == []
    assert mon.warnings({**BASE, key: math.nan}, cfg) == []


def test_absolute_grad_thresholds_are_off_by_default():
    cfg = mon.MonitorConfig()
    assert mon.warnings({**BASE, "grad_norm_var": 1e9, "grad_norm_slope": 1e9}, cfg) == []


# --------------------------------------------------------------------------------------------
# Purity, jit, scan; config and input errors.


def test_jit_and_scan_match_eager():
    cfg = mon.MonitorConfig(window=6, min_steps=2)
    rng = np.random.default_rng(2)
    conf, acc, g = (rng.uniform(size=9).astype(np.float32) for _ in range(3))
    eager = mon.summarize(_feed(cfg, conf, acc, g))

    def body(state, x):
        c, a, n = x
        return mon.update(state, {"confidence": c, "accuracy": a, "grad_norm": n}), None

    final, _ = jax.jit(lambda s, xs: jax.lax.scan(body, s, xs))(mon.init(cfg), (conf, acc, g))
    jitted = jax.jit(mon.summarize)(final)
    for k in eager:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert int(final.count) == 9


def test_update_is_pure():
    cfg = mon.MonitorConfig(window=4, min_steps=2)
    s0 = mon.init(cfg)
    s1 = mon.update(s0, {"confidence": 0.9, "accuracy": 1.0, "grad_norm": 2.0})
    assert int(s0.count) == 0 and float(s0.confidence[0]) == 0.0
    assert int(s1.count) == 1 and float(s1.confidence[0]) == pytest.approx(0.9)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 1}, "window=1 is invalid"),
    ({"window": 10, "min_steps": 11}, "min_steps=11 is invalid"),
    ({"collapse_confidence": 1.0}, "collapse_confidence=1.0 is invalid"),
    ({"max_grad_cv": -0.1}, "max_grad_cv=-0.1 is invalid"),
    ({"max_calibration_error": math.nan}, "max_calibration_error=nan is invalid"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        mon.MonitorConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_input_errors():
    cfg = mon.MonitorConfig(window=4, min_steps=2)
    with pytest.raises(ValueError, match="metrics lack grad_norm"):
        mon.update(mon.init(cfg), {"confidence": 0.5, "accuracy": 0.5})
    with pytest.raises(ValueError, match=r"need \[B, V\] and \[B\]"):
        mon.step_metrics(np.zeros((3, 4)), np.zeros((2,), np.int32), 1.0)

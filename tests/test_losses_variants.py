"""rlsoft.losses under chex variants (jit / no jit, device arrays / host numpy, pmap), against
float64 NumPy references: the module docstring's formulas with their gradients written out.

The functions the variants wrap are module-level so that the jit and pmap variants compile once
per argument structure, not once per test.
"""
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlsoft import losses
from rlsoft.losses import PolicyLossConfig, policy_loss


def ref_coef(mask, aggregation):
    """c_it with aggregate(x) = sum_it c_it x_it (the module docstring's denominators); 0 off mask."""
    live = np.asarray(mask) != 0
    lengths = live.sum(1).astype(np.float64)
    n_seq = max(int((lengths > 0).sum()), 1)
    per_row = {
        "token_mean": np.full(lengths.shape, 1.0 / max(lengths.sum(), 1.0)),
        "seq_mean": 1.0 / (n_seq * np.maximum(lengths, 1.0)),
        "seq_mean_token_sum": np.full(lengths.shape, 1.0 / n_seq),
        "seq_mean_token_sum_norm": np.full(lengths.shape, 1.0 / (n_seq * live.shape[1])),
    }[aggregation]
    return per_row[:, None] * live


def ref_policy_loss(logp, old, mask, w, ref, ent, cfg):
    """float64 (loss, metrics, d loss / d logp, d loss / d entropy) from the docstring's formulas."""
    live = np.asarray(mask) != 0
    f = lambda x: np.where(live, np.asarray(x, np.float64), 0.0)
    lp, old, q, h = f(logp), f(old), f(ref), f(ent)
    a = np.asarray(w, np.float64)[:, None] * np.ones_like(lp)
    ratio = np.exp(lp - old)
    if cfg.clipped:
        unclipped, clipped = -a * ratio, -a * np.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
        cut = clipped > unclipped
        pg = np.maximum(unclipped, clipped)  # -min(r A, clip(r) A)
        d_pg = np.where(cut, 0.0, -a * ratio)  # d(-A r)/d logp = -A r
    else:
        cut = np.zeros_like(live)
        pg, d_pg = -a * lp, -a
    if cfg.kl_estimator == "k1":
        kl, d_kl = lp - q, np.ones_like(lp)
    else:  # k3 = e^(q - p) - 1 - (q - p)
        kl, d_kl = np.exp(q - lp) - 1 - (q - lp), 1 - np.exp(q - lp)
    c = ref_coef(mask, cfg.aggregation)
    per_token = lambda x: float((x * live).sum() / max(live.sum(), 1))
    metrics = {
        "pg_loss": float((c * pg).sum()),
        "kl": per_token(kl),
        "entropy": per_token(h),
        "clip_frac": per_token(cut),
        "ratio_mean": per_token(ratio),
        "approx_kl_old": per_token(ratio - 1 - (lp - old)),  # k3 with r = pi / pi_old
        "num_tokens": float(live.sum()),
    }
    loss = float((c * (pg + cfg.kl_coef * kl - cfg.entropy_coef * h)).sum())
    return loss, metrics, c * (d_pg + cfg.kl_coef * d_kl), -cfg.entropy_coef * c


def _variant_batch():
    """A ragged batch (lengths 5, 3, 0, 1, 4, 2; T = 5) with garbage off the mask and ratios
    e^N(0, 0.3) on it, so that both sides of each clip range are hit."""
    rng = np.random.default_rng(11)
    lengths = np.array([5, 3, 0, 1, 4, 2])
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int32)
    logp = np.log(rng.uniform(0.05, 0.95, mask.shape))
    old = logp + rng.normal(0, 0.3, mask.shape)
    ref = logp + rng.normal(0, 0.5, mask.shape)
    ent = rng.uniform(0, 2, mask.shape)
    w = np.array([1.3, -0.8, 0.5, 2.0, 0.0, -1.7])
    dead = mask == 0
    garbage = lambda x, v: np.where(dead, v, x).astype(np.float32)
    return (garbage(logp, -np.inf), garbage(old, np.nan), mask, w.astype(np.float32), garbage(ref, np.inf),
            garbage(ent, np.nan))


VARIANT_CONFIGS = (
    PolicyLossConfig(aggregation="token_mean", kl_coef=0.05),
    PolicyLossConfig(aggregation="seq_mean", clip_eps=None, kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01),
    PolicyLossConfig(aggregation="seq_mean_token_sum", clip_eps_high=0.28, kl_coef=0.05, entropy_coef=0.02),
    PolicyLossConfig(aggregation="seq_mean_token_sum_norm", clip_eps=0.1),
)


def _loss_and_grads(logp, old, mask, w, ref, ent, cfg):
    fn = lambda lp, e: policy_loss(lp, old, mask, w, cfg, ref_logp=ref, entropy=e)
    (loss, metrics), (g_lp, g_ent) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(logp, ent)
    return loss, metrics, g_lp, g_ent


def _loss_without_ref_and_entropy(logp, old, mask, w, cfg):
    return policy_loss(logp, old, mask, w, cfg)


def _logit_terms(logits, targets):
    """token_log_probs, token_entropy and d(sum lp + sum H)/d logits."""
    fn = lambda z: (losses.token_log_probs(z, targets).sum() + losses.token_entropy(z).sum())
    return losses.token_log_probs(logits, targets), losses.token_entropy(logits), jax.grad(fn)(logits)


def _one_sequence_terms(logits, targets):
    return losses.sequence_log_probs(logits, targets), losses.sequence_entropy(logits)


def _kls(lp, lq):
    return losses.kl_k1(lp, lq), losses.kl_k3(lp, lq), jax.grad(lambda x: losses.kl_k3(x, lq).sum())(lp)


def _sft_all(logp, mask):
    out = {agg: losses.sft_loss(logp, mask, agg) for agg in losses.AGGREGATIONS}
    return out, jax.grad(lambda x: losses.sft_loss(x, mask, "seq_mean"))(logp)


class LossVariantsTest(chex.TestCase):
    @chex.all_variants
    def test_policy_loss_value_metrics_and_gradients(self):
        batch = _variant_batch()
        fn = self.variant(_loss_and_grads, static_argnums=6)
        ratio = np.exp(batch[0] - batch[1])[batch[2] != 0]
        for cfg in VARIANT_CONFIGS:
            if cfg.clipped:  # no ratio within float32 rounding of a clip point: the cut is unambiguous
                edges = np.array([1 - cfg.eps_low, 1 + cfg.eps_high])
                assert np.abs(ratio[:, None] - edges).min() > 1e-4, cfg
            want_loss, want_m, want_g, want_g_ent = ref_policy_loss(*batch, cfg)
            loss, m, g, g_ent = fn(*batch, cfg)
            chex.assert_shape([g, g_ent], batch[0].shape)
            chex.assert_type([loss, g, g_ent], jnp.float32)
            np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7, err_msg=str(cfg))
            assert set(m) == set(losses.METRIC_NAMES)
            for k in losses.METRIC_NAMES:
                np.testing.assert_allclose(float(m[k]), want_m[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} {cfg}")
            np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-7, err_msg=str(cfg))
            np.testing.assert_allclose(np.asarray(g_ent), want_g_ent, rtol=1e-5, atol=1e-8, err_msg=str(cfg))
        # The data reaches both branches: some response tokens are clipped, not all.
        clipped = ref_policy_loss(*batch, VARIANT_CONFIGS[0])[1]["clip_frac"]
        assert 0.0 < clipped < 1.0

    @chex.all_variants
    def test_missing_reference_and_entropy_report_zero(self):
        logp, old, mask, w, _, _ = _variant_batch()
        cfg = VARIANT_CONFIGS[3]  # kl_coef = entropy_coef = 0: ref_logp and entropy may be left out
        loss, m = self.variant(_loss_without_ref_and_entropy, static_argnums=4)(logp, old, mask, w, cfg)
        zeros = np.zeros(logp.shape, np.float32)
        want_loss, want_m, _, _ = ref_policy_loss(logp, old, mask, w, logp, zeros, cfg)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
        assert float(m["kl"]) == 0.0 and float(m["entropy"]) == 0.0
        np.testing.assert_allclose(float(m["clip_frac"]), want_m["clip_frac"], rtol=1e-6)

    @chex.all_variants
    def test_log_probs_entropy_and_their_gradients(self):
        rng = np.random.default_rng(12)
        logits = (rng.normal(size=(3, 4, 6)) * 3).astype(np.float32)
        logits[1, 2, [0, 4]] = -np.inf  # a masked vocabulary
        targets = rng.integers(0, 6, size=(3, 4)).astype(np.int32)
        targets[1, 2] = 1
        lp, ent, g = self.variant(_logit_terms)(logits, targets)
        z = logits.astype(np.float64)
        logq = z - z.max(-1, keepdims=True)
        logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
        p = np.exp(logq)
        plogp = np.where(p > 0, p * np.where(p > 0, logq, 0.0), 0.0)  # 0 log 0 = 0
        h = -plogp.sum(-1)
        onehot = np.eye(6)[targets]
        chex.assert_type([lp, ent, g], jnp.float32)
        np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(logq, targets[..., None], -1)[..., 0],
                                   rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(ent), h, rtol=1e-5, atol=2e-6)
        # d logp_y / dz = onehot - p;  dH / dz = -p (log p + H), 0 where p = 0.
        want_g = onehot - p - np.where(p > 0, plogp + p * h[..., None], 0.0)
        np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=2e-6)
        assert np.all(np.asarray(g)[1, 2, [0, 4]] == 0)
        # One unbatched sequence [T, V].
        lp1, ent1 = self.variant(_one_sequence_terms)(logits[1], targets[1])
        np.testing.assert_allclose(np.asarray(lp1), np.asarray(lp)[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ent1), np.asarray(ent)[1], rtol=1e-6, atol=1e-6)

    @chex.all_variants
    def test_kl_estimators(self):
        rng = np.random.default_rng(13)
        lp = np.log(rng.uniform(0.01, 1.0, 64)).astype(np.float32)
        lq = (lp + rng.normal(0, 1.0, 64)).astype(np.float32)
        lq[:8] = lp[:8] + np.float32(1e-3) * np.arange(-4, 4, dtype=np.float32)  # r near 1: expm1's regime
        k1, k3, g3 = self.variant(_kls)(lp, lq)
        d = lq.astype(np.float64) - lp.astype(np.float64)
        np.testing.assert_allclose(np.asarray(k1), -d, rtol=1e-6, atol=1e-6)
        # Near r = 1, k3 ~ d^2 / 2 (down to 0 at d = 0): a relative error of 1e-3 there is 1e-9 absolute.
        np.testing.assert_allclose(np.asarray(k3), np.expm1(d) - d, rtol=2e-5, atol=1e-9)
        assert np.all(np.asarray(k3) >= 0) and float(np.asarray(k3)[4]) == 0.0
        np.testing.assert_allclose(np.asarray(g3), 1 - np.exp(d), rtol=2e-5, atol=1e-6)

    @chex.all_variants
    def test_sft_loss(self):
        logp, _, mask, _, _, _ = _variant_batch()
        out, g = self.variant(_sft_all)(logp, mask)
        lp = np.where(mask != 0, logp.astype(np.float64), 0.0)
        for agg in losses.AGGREGATIONS:
            np.testing.assert_allclose(float(out[agg]), (ref_coef(mask, agg) * -lp).sum(), rtol=1e-6, err_msg=agg)
        np.testing.assert_allclose(np.asarray(g), -ref_coef(mask, "seq_mean"), rtol=1e-6, atol=1e-9)


_PMAP_TESTS = sorted(n for n in dir(LossVariantsTest) if n.startswith("test_") and n.endswith("__with_pmap"))
_PMAP_SNIPPET = """
import sys, jax, pytest
print("devices", jax.device_count(), flush=True)
sys.exit(pytest.main(["-q", "-rs", "tests/test_losses_variants.py::LossVariantsTest", "-k", "with_pmap"]))
"""


def test_variants_pmap_over_8_host_devices():
    # With one device chex skips the with_pmap variants; 8 forced host devices run them for real
    # (the arguments broadcast to 8 devices, the first device's output checked).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _PMAP_SNIPPET], cwd=pathlib.Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.startswith("devices 8\n"), out.stdout[:200]
    assert len(_PMAP_TESTS) == 5 and f"{len(_PMAP_TESTS)} passed" in out.stdout, out.stdout[-2000:]
    assert "skipped" not in out.stdout, out.stdout[-2000:]
